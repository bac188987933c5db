//! The ideal rejected distribution (Equation 1, Theorem L.1):
//!
//! ```text
//! π_l(y) ∝ π_ref(y) · (π_ref(y) / π*(y))^β = π_ref(y)^{1+β} π*(y)^{−β}
//! ```
//!
//! Sampling `y_w ~ π_ref`, `y_l ~ π_l` and training DPO with this `β` recovers `π*`; it is the
//! unique such `π_l` (Theorem L.1).

use num_traits::Pow;

use crate::error::{Error, Result};
use crate::policy::{ExactPolicy, Policy};
use crate::Rational;

/// `log π_l(y) = (1+β) log π_ref(y) − β log π*(y) − Z`, in log space.
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::InvalidParameter`] unless `β > 0` is finite.
pub fn ideal_rejected(pi_ref: &Policy, pi_star: &Policy, beta: f64) -> Result<Policy> {
    pi_ref.check_same_space(pi_star)?;
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::invalid(
            "beta",
            beta,
            "β must be finite and positive",
        ));
    }
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
/// [`Error::LengthMismatch`]; [`Error::InvalidParameter`] for `β = 0`.
pub fn ideal_rejected_exact(
    pi_ref: &ExactPolicy,
    pi_star: &ExactPolicy,
    beta: u32,
) -> Result<ExactPolicy> {
    pi_ref.check_same_space(pi_star)?;
    if beta == 0 {
        return Err(Error::invalid("beta", beta, "β must be positive"));
    }
    let w = pi_ref
        .probs()
        .iter()
        .zip(pi_star.probs())
        .map(|(r, s)| Pow::pow(r, beta + 1) / Pow::pow(s, beta))
        .collect::<Vec<Rational>>();
    ExactPolicy::from_weights(w)
}
