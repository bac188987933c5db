//! Power law between two DIDs and log-margin ordering (Theorems 3.3, 3.5; Appendix G).
//!
//! Power law: `q_{π_ref/π_l}(y) ∝ q_{π*/π_ref}(y)^β` for one `β > 0`.
//! On a pair `(y_w, y_l)` with log-margins `m_π = log π(y_w) − log π(y_l)`:
//!
//! ```text
//! Δ1 = m_{π*} − m_{π_ref} = log q_{π*/π_ref}(y_w) − log q_{π*/π_ref}(y_l)
//! Δ2 = m_{π_ref} − m_{π_l} = log q_{π_ref/π_l}(y_w) − log q_{π_ref/π_l}(y_l)
//! ```
//!
//! and the power law over a set of pairs is `Δ2 = β Δ1` with one common `β > 0`. Log-margin
//! ordering (Theorem 3.5 (1), relaxed by a temperature `γ` in Appendix G) asks that `σ(γΔ1)`
//! saturates iff `σ(γΔ2)` does.

use std::cmp::Ordering;

use num_traits::Pow;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fit::{ols, ols_through_origin, LinearFit};
use crate::logspace::sigmoid;
use crate::policy::{ExactPolicy, Policy};
use crate::prec::MARGIN_TIE_ULPS;
use crate::Rational;

/// A positive rational exponent `β = num/den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exponent {
    /// Numerator `u ≥ 1`.
    pub num: u32,
    /// Denominator `v ≥ 1`.
    pub den: u32,
}

impl Exponent {
    /// `β = num/den`; errors unless both are positive.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `u = 0` or `v = 0`.
    ///
    /// # Examples
    /// ```
    /// use difinfo::power_law::Exponent;
    /// assert_eq!(Exponent::new(3, 2)?.value(), 1.5);
    /// assert!(Exponent::new(0, 1).is_err());
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn new(num: u32, den: u32) -> Result<Self> {
        if num == 0 || den == 0 {
            return Err(Error::invalid(
                "exponent",
                format!("{num}/{den}"),
                "β = u/v needs u, v ≥ 1",
            ));
        }
        Ok(Self { num, den })
    }

    /// `β` as a float.
    pub fn value(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// Exactly whether `data(y) ∝ target(y)^β` with `β = u/v`, i.e. whether `data(y)^v / target(y)^u`
/// is the same rational for every `y` (no logarithms, no tolerance). (Theorem 3.3.)
pub fn is_power_law_exact(
    data: &ExactPolicy,
    target: &ExactPolicy,
    beta: Exponent,
) -> Result<bool> {
    data.check_same_space(target)?;
    let ratio = |y: usize| -> Rational {
        Pow::pow(&data.probs()[y], beta.den) / Pow::pow(&target.probs()[y], beta.num)
    };
    let first = ratio(0);
    Ok((1..data.len()).all(|y| ratio(y) == first))
}

/// Least-squares fit of the exponent over the outcomes: `log data(y) ≈ β log target(y) + c`,
/// with `R²` and the largest residual. (Theorem 3.5 (2).)
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::Undetermined`] when `target` is uniform.
pub fn fit_exponent(data: &Policy, target: &Policy) -> Result<LinearFit> {
    data.check_same_space(target)?;
    ols(target.log_probs(), data.log_probs())
}

/// The log-margin `m_π(y_w, y_l) = log π(y_w) − log π(y_l)`.
pub fn log_margin(pi: &Policy, y_w: usize, y_l: usize) -> Result<f64> {
    Ok(pi.log_prob(y_w)? - pi.log_prob(y_l)?)
}

/// `Δ1`, `Δ2` of one pair and whether each `γ`-scaled margin saturates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairMargins {
    pub y_w: usize,
    pub y_l: usize,
    /// `Δ1 = m_{π*} − m_{π_ref}`.
    pub delta1: f64,
    /// `Δ2 = m_{π_ref} − m_{π_l}`.
    pub delta2: f64,
    /// `σ(γ Δ1) ≥ 1 − ε`.
    pub saturated1: bool,
    /// `σ(γ Δ2) ≥ 1 − ε`.
    pub saturated2: bool,
}

/// The log-margin ordering report over a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderingReport {
    pub pairs: Vec<PairMargins>,
    /// Theorem 3.5 (1): on every pair, `Δ1` saturates iff `Δ2` does.
    pub ordering_holds: bool,
    /// `sign Δ1 = sign Δ2` on every pair, a margin within [`MARGIN_TIE_ULPS`] ulp of the
    /// log-probabilities' magnitude counting as 0 (so exact ties are not split by rounding).
    pub signs_agree: bool,
}

/// Margins `Δ1`, `Δ2` of every pair, with saturation of `σ(γΔ) ≥ 1 − ε` (Appendix G).
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::OutOfRange`], [`Error::InvalidParameter`] unless `γ > 0`
/// and `0 < ε < 1/2`.
pub fn log_margin_ordering(
    pi_star: &Policy,
    pi_ref: &Policy,
    pi_l: &Policy,
    pairs: &[(usize, usize)],
    gamma: f64,
    epsilon: f64,
) -> Result<OrderingReport> {
    pi_star.check_same_space(pi_ref)?;
    pi_ref.check_same_space(pi_l)?;
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(Error::invalid(
            "gamma",
            gamma,
            "γ must be finite and positive",
        ));
    }
    if !(epsilon > 0.0 && epsilon < 0.5) {
        return Err(Error::invalid(
            "epsilon",
            epsilon,
            "saturation needs 0 < ε < 1/2",
        ));
    }
    let mut out = Vec::with_capacity(pairs.len());
    let mut signs_agree = true;
    for &(y_w, y_l) in pairs {
        let m_star = log_margin(pi_star, y_w, y_l)?;
        let m_ref = log_margin(pi_ref, y_w, y_l)?;
        let m_l = log_margin(pi_l, y_w, y_l)?;
        let (delta1, delta2) = (m_star - m_ref, m_ref - m_l);
        // The rounding of each Δ is bounded by a few ulp of the log-probabilities it combines.
        let scale = [pi_star, pi_ref, pi_l]
            .iter()
            .flat_map(|p| [p.log_probs()[y_w].abs(), p.log_probs()[y_l].abs()])
            .fold(1.0, f64::max);
        let tie = MARGIN_TIE_ULPS * f64::EPSILON * scale;
        signs_agree &= sign_with_ties(delta1, tie) == sign_with_ties(delta2, tie);
        out.push(PairMargins {
            y_w,
            y_l,
            delta1,
            delta2,
            saturated1: sigmoid(gamma * delta1) >= 1.0 - epsilon,
            saturated2: sigmoid(gamma * delta2) >= 1.0 - epsilon,
        });
    }
    let ordering_holds = out.iter().all(|p| p.saturated1 == p.saturated2);
    Ok(OrderingReport {
        pairs: out,
        ordering_holds,
        signs_agree,
    })
}

/// The sign of a float margin, with `|Δ| ≤ tie` counted as an exact tie.
fn sign_with_ties(delta: f64, tie: f64) -> Ordering {
    if delta.abs() <= tie {
        Ordering::Equal
    } else if delta > 0.0 {
        Ordering::Greater
    } else {
        Ordering::Less
    }
}

/// Fit of the common exponent `Δ2 ≈ β Δ1` through the origin over the pairs of a report.
pub fn fit_margin_exponent(report: &OrderingReport) -> Result<LinearFit> {
    let (d1, d2): (Vec<f64>, Vec<f64>) = report.pairs.iter().map(|p| (p.delta1, p.delta2)).unzip();
    ols_through_origin(&d1, &d2)
}

/// Exact signs of `Δ1` and `Δ2` on a pair, by cross-multiplication (no logarithms):
///
/// ```text
/// sign Δ1 = sign(π*(w) π_ref(l) − π*(l) π_ref(w))
/// sign Δ2 = sign(π_ref(w) π_l(l) − π_ref(l) π_l(w))
/// ```
pub fn margin_signs_exact(
    pi_star: &ExactPolicy,
    pi_ref: &ExactPolicy,
    pi_l: &ExactPolicy,
    y_w: usize,
    y_l: usize,
) -> Result<(Ordering, Ordering)> {
    pi_star.check_same_space(pi_ref)?;
    pi_ref.check_same_space(pi_l)?;
    let (s, r, l) = (pi_star, pi_ref, pi_l);
    let d1 = (s.prob(y_w)? * r.prob(y_l)?).cmp(&(s.prob(y_l)? * r.prob(y_w)?));
    let d2 = (r.prob(y_w)? * l.prob(y_l)?).cmp(&(r.prob(y_l)? * l.prob(y_w)?));
    Ok((d1, d2))
}

/// Exact ratio test of `Δ2 = β Δ1` on one pair for `β = u/v`:
/// `(q2(w)/q2(l))^v = (q1(w)/q1(l))^u` with `q1 = q_{π*/π_ref}`, `q2 = q_{π_ref/π_l}`, i.e.
/// comparing ratios, never logarithms.
pub fn pair_power_law_exact(
    pi_star: &ExactPolicy,
    pi_ref: &ExactPolicy,
    pi_l: &ExactPolicy,
    y_w: usize,
    y_l: usize,
    beta: Exponent,
) -> Result<bool> {
    pi_star.check_same_space(pi_ref)?;
    pi_ref.check_same_space(pi_l)?;
    let ratio1 =
        (pi_star.prob(y_w)? / pi_ref.prob(y_w)?) / (pi_star.prob(y_l)? / pi_ref.prob(y_l)?);
    let ratio2 = (pi_ref.prob(y_w)? / pi_l.prob(y_w)?) / (pi_ref.prob(y_l)? / pi_l.prob(y_l)?);
    Ok(Pow::pow(&ratio2, beta.den) == Pow::pow(&ratio1, beta.num))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shifted logits give the same policy: every margin difference is an exact tie, which
    /// rounding must not split into opposite signs.
    #[test]
    fn exact_ties_agree() {
        let f = [0.1, 0.2, 0.3, -1.7];
        let shift = |c: f64| Policy::from_logits(&f.map(|x| x + c)).unwrap();
        let (s, r, l) = (shift(0.7), shift(0.0), shift(-3.3));
        let pairs = [(0, 1), (1, 2), (2, 3), (3, 0)];
        let report = log_margin_ordering(&s, &r, &l, &pairs, 1.0, 0.01).unwrap();
        assert!(report.signs_agree);
        let other = Policy::from_logits(&[0.3, 0.1, 0.2, 0.0]).unwrap();
        let report = log_margin_ordering(&s, &r, &other, &pairs, 1.0, 0.01).unwrap();
        assert!(
            !report.signs_agree,
            "Δ1 = 0 against Δ2 ≠ 0 is a disagreement"
        );
    }
}
