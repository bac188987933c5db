//! Preferences: Bradley–Terry, the Boltzmann distribution of a reward, and the preference
//! distribution of a chosen/rejected sampler (Sections 2 and 3.2).

use crate::did::{normalized_ratio, normalized_ratio_exact};
use crate::error::{Error, Result};
use crate::logspace::sigmoid;
use crate::policy::{ExactPolicy, Policy};
use crate::scalar::Real;
use crate::Rational;

/// Bradley–Terry: `p(y1 ≻ y2) = σ(r(y1) − r(y2))`. (Section 2.)
pub fn bradley_terry(r1: f64, r2: f64) -> f64 {
    sigmoid(r1 - r2)
}

/// The Bradley–Terry loss of a reward model over a batch of pairs, TRL's
/// `RewardTrainer.compute_loss`: the negative log-likelihood of the labels under
/// [`bradley_terry`], with an optional per-pair margin and TRL's centering term.
///
/// # Formula
/// ```text
/// L = mean_i −log σ(r_w,i − r_l,i − m_i) + c · mean_i (r_w,i + r_l,i)²
/// ```
/// `r_w`, `r_l`: the rewards of the chosen and the rejected completion (a batch, or one
/// pair); `m`: the margin (0 without one); `c`: `center_rewards_coefficient` (the term is
/// absent without one). `−log σ(z)` is [`crate::loss::smoothed_sigmoid`] at ε = 0, DPO's
/// sigmoid loss: DPO is this loss with the implicit reward `β log π/π_ref`. (Section 2.)
///
/// # Errors
/// The number type's.
///
/// # Examples
/// ```
/// use difinfo::preference::{bradley_terry, bradley_terry_loss};
/// // One pair: −log p(y_w ≻ y_l).
/// let l = bradley_terry_loss(&1.5, &0.5, None, None)?;
/// assert!((l + bradley_terry(1.5, 0.5).ln()).abs() < 1e-15);
/// // A margin of 1 asks for a reward gap of 1 more; centering adds c (r_w + r_l)².
/// let l = bradley_terry_loss(&1.5, &0.5, Some(&1.0), Some(0.01))?;
/// assert!((l - (2f64.ln() + 0.01 * 4.0)).abs() < 1e-15);
/// # Ok::<(), std::convert::Infallible>(())
/// ```
pub fn bradley_terry_loss<S: Real>(
    chosen: &S,
    rejected: &S,
    margin: Option<&S>,
    center_rewards_coefficient: Option<f64>,
) -> std::result::Result<S, S::Error> {
    let gap = chosen.sub(rejected)?;
    let z = match margin {
        Some(m) => gap.sub(m)?,
        None => gap,
    };
    let nll = crate::loss::smoothed_sigmoid(&z, 0.0)?.mean()?;
    match center_rewards_coefficient {
        Some(c) => nll.add(&chosen.add(rejected)?.sqr()?.mean()?.affine(c, 0.0)?),
        None => Ok(nll),
    }
}

/// Bradley–Terry from a preference distribution, exactly:
/// `p(a ≻ b) = p*(a) / (p*(a) + p*(b))` (equal to `σ(log p*(a) − log p*(b))`). (Section 2.)
pub fn bradley_terry_exact(p_star: &ExactPolicy, a: usize, b: usize) -> Result<Rational> {
    let (pa, pb) = (p_star.prob(a)?, p_star.prob(b)?);
    Ok(pa / (pa + pb))
}

/// Boltzmann distribution of a reward: `p_r(y) = exp r(y) / Σ_{y'} exp r(y')`. (Section 2.)
///
/// # Errors
/// [`Error::Empty`], [`Error::NotFinite`].
pub fn boltzmann(rewards: &[f64]) -> Result<Policy> {
    Policy::from_logits(rewards)
}

/// The preference distribution of data drawn as `y_w ~ π_ref` (chosen), `y_l ~ π_l`
/// (rejected): `p* = q_{π_ref/π_l}`. (Section 3.2.)
pub fn preference_distribution(pi_ref: &Policy, pi_l: &Policy) -> Result<Policy> {
    normalized_ratio(pi_ref, pi_l)
}

/// Exact preference distribution `q_{π_ref/π_l}`. (Section 3.2.)
pub fn preference_distribution_exact(
    pi_ref: &ExactPolicy,
    pi_l: &ExactPolicy,
) -> Result<ExactPolicy> {
    normalized_ratio_exact(pi_ref, pi_l)
}

/// The probability that, of an unordered pair `{a, b}` drawn by the chosen/rejected sampler,
/// `a` is the one labelled chosen:
///
/// ```text
/// P(a ≻ b) = π_ref(a) π_l(b) / (π_ref(a) π_l(b) + π_ref(b) π_l(a))
/// ```
///
/// Exact; equals [`bradley_terry_exact`] on [`preference_distribution_exact`]. (Section 3.2.)
pub fn sampler_pair_probability_exact(
    chosen: &ExactPolicy,
    rejected: &ExactPolicy,
    a: usize,
    b: usize,
) -> Result<Rational> {
    chosen.check_same_space(rejected)?;
    let ab = chosen.prob(a)? * rejected.prob(b)?;
    let ba = chosen.prob(b)? * rejected.prob(a)?;
    if a == b {
        return Err(Error::invalid(
            "pair",
            format!("({a}, {b})"),
            "a pair needs two distinct outcomes",
        ));
    }
    Ok(&ab / (&ab + ba))
}
