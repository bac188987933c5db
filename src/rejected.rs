//! The ideal rejected distribution (Equation 1, Theorem L.1):
//!
//! ```text
//! π_l(y) ∝ π_ref(y) · (π_ref(y) / π*(y))^β = π_ref(y)^{1+β} π*(y)^{−β}
//! ```
//!
//! Sampling `y_w ~ π_ref`, `y_l ~ π_l` and training DPO with this `β` recovers `π*`; it is the
//! unique such `π_l` (Theorem L.1).

use num_traits::{Pow, Signed};

use crate::beta::Beta;
use crate::error::{Error, Result};
use crate::policy::{ExactPolicy, Policy};
use crate::power_law::Exponent;
use crate::Rational;

/// `log π_l(y) = (1+β) log π_ref(y) − β log π*(y) − Z`, in log space.
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::Beta`] unless `β > 0` is finite.
pub fn ideal_rejected(pi_ref: &Policy, pi_star: &Policy, beta: f64) -> Result<Policy> {
    pi_ref.check_same_space(pi_star)?;
    let beta = Beta::new(beta)?.get();
    let logits: Vec<f64> = pi_ref
        .log_probs()
        .iter()
        .zip(pi_star.log_probs())
        .map(|(lr, ls)| (1.0 + beta) * lr - beta * ls)
        .collect();
    Policy::from_logits(&logits)
}

/// Exact `π_l ∝ π_ref^{1+β} π*^{−β}` for an integer `β ≥ 1`.
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::Beta`] for `β = 0`.
pub fn ideal_rejected_exact(
    pi_ref: &ExactPolicy,
    pi_star: &ExactPolicy,
    beta: u32,
) -> Result<ExactPolicy> {
    pi_ref.check_same_space(pi_star)?;
    Beta::new(f64::from(beta))?;
    let w = pi_ref
        .probs()
        .iter()
        .zip(pi_star.probs())
        .map(|(r, s)| Pow::pow(r, beta + 1) / Pow::pow(s, beta))
        .collect::<Vec<Rational>>();
    ExactPolicy::from_weights(w)
}

/// Exact `π_l ∝ π_ref^{1+β} π*^{−β}` for a rational `β = u/v`, on instances where it is rational.
///
/// # Formula
/// `ρ(y) = π_ref(y)/π*(y)`, `t(y) = ρ(y)/ρ(0)`, `π_l(y) ∝ π_ref(y) · t(y)^{u/v}`
///
/// (the constant `ρ(0)^{u/v}` cancels in the normalization, so this is Eq. 1). `t(y)^{u/v}` is
/// computed as `(ⁿ√t(y))^u` with exact integer `v`-th roots of the reduced numerator and
/// denominator. (Equation 1, Theorem L.1.)
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::InvalidParameter`] when some `t(y)` is not the `v`-th power
/// of a rational (then `π_l` is irrational and has no exact form).
pub fn ideal_rejected_exact_rational(
    pi_ref: &ExactPolicy,
    pi_star: &ExactPolicy,
    beta: Exponent,
) -> Result<ExactPolicy> {
    pi_ref.check_same_space(pi_star)?;
    let rho: Vec<Rational> = pi_ref
        .probs()
        .iter()
        .zip(pi_star.probs())
        .map(|(r, s)| r / s)
        .collect();
    let mut w = Vec::with_capacity(rho.len());
    for (y, (r, rho_y)) in pi_ref.probs().iter().zip(&rho).enumerate() {
        let t = rho_y / &rho[0];
        let root = exact_root(&t, beta.den).ok_or_else(|| {
            Error::invalid(
                "beta",
                format!("{}/{}", beta.num, beta.den),
                format!("(π_ref/π*)({y}) relative to outcome 0 is not a perfect power: π_l is irrational"),
            )
        })?;
        w.push(r * Pow::pow(&root, beta.num));
    }
    ExactPolicy::from_weights(w)
}

/// The positive rational `v`-th root of a positive rational, when it exists.
fn exact_root(t: &Rational, v: u32) -> Option<Rational> {
    debug_assert!(t.is_positive() && v >= 1);
    let (n, d) = (t.numer(), t.denom());
    let (rn, rd) = (n.nth_root(v), d.nth_root(v));
    (Pow::pow(&rn, v) == *n && Pow::pow(&rd, v) == *d).then(|| Rational::new(rn, rd))
}
