//! Loss shapes on a reward margin and the exact **population** loss over a finite space.
//!
//! With the reward margin `d = r(y_w) − r(y_l)` (β already inside the reward, as in TRL where
//! `d = β · h` and `h` is the log-ratio margin):
//!
//! ```text
//! sigmoid (DPO):  ℓ(d) = −log σ(d)
//! hinge  (SLiC):  ℓ(d) = max(0, 1 − d)
//! ipo:            ℓ(d) = (d/β − 1/(2β))²        (TRL: (h − 1/(2β))²)
//! ```
//!
//! The population loss of data drawn as `y_w ~ p_w` (chosen), `y_l ~ p_l` (rejected):
//!
//! ```text
//! L(f) = Σ_a Σ_b p_w(a) p_l(b) ℓ(r(a) − r(b)),     π = softmax(f)
//! ```
//!
//! is the exact expectation that minibatch training estimates (Theorem 2.1, Theorem 3.4 (b)).

use num_traits::Zero;
use serde::{Deserialize, Serialize};

use crate::error::{same_len, Error, Result};
use crate::logspace::{sigmoid, softplus};
use crate::policy::{ExactPolicy, Policy};
use crate::reward::RewardForm;
use crate::Rational;

/// The shape `ℓ` of a preference loss, applied to the reward margin `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossShape {
    /// `ℓ(d) = −log σ(d)` (DPO; TRL `loss_type="sigmoid"`).
    Sigmoid,
    /// `ℓ(d) = max(0, 1 − d)` (SLiC; TRL `loss_type="hinge"`).
    Hinge,
    /// `ℓ(d) = (d/β − 1/(2β))²` (IPO; TRL `loss_type="ipo"`).
    Ipo,
}

impl LossShape {
    /// `ℓ(d)`; `beta` is used by IPO only.
    pub fn value(self, d: f64, beta: f64) -> f64 {
        match self {
            Self::Sigmoid => softplus(-d),
            Self::Hinge => (1.0 - d).max(0.0),
            Self::Ipo => {
                let t = (d - 0.5) / beta;
                t * t
            }
        }
    }

    /// `ℓ'(d)` (the hinge's subgradient at `d = 1` is 0).
    pub fn derivative(self, d: f64, beta: f64) -> f64 {
        match self {
            Self::Sigmoid => -sigmoid(-d),
            Self::Hinge => {
                if d < 1.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            Self::Ipo => 2.0 * (d - 0.5) / (beta * beta),
        }
    }
}

/// The label-smoothed sigmoid loss (conservative DPO, TRL's `label_smoothing = ε`): the DPO loss
/// when each preference label is flipped with probability `ε`,
///
/// ```text
/// ℓ_ε(d) = (1 − ε) (−log σ(d)) + ε (−log σ(−d)),     0 ≤ ε ≤ 1/2
/// ```
///
/// `ε = 0` is [`LossShape::Sigmoid`]. For `ε > 0` its minimizer over `d` is
/// `d* = log((1 − ε)/ε)`: a finite margin, where DPO's loss keeps falling as `d → ∞`.
pub fn label_smoothed_sigmoid(d: f64, eps: f64) -> f64 {
    if eps == 0.0 {
        softplus(-d)
    } else {
        (1.0 - eps) * softplus(-d) + eps * softplus(d)
    }
}

/// The value and the gradient with respect to the logits of a population loss.
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationLoss {
    /// `L(f)`.
    pub value: f64,
    /// `∂L/∂f_k = G_k − π_k Σ_y G_y`, where `G_y = ∂L/∂log π(y)`.
    pub grad_logits: Vec<f64>,
}

/// The exact population loss and its gradient with respect to the logits `f` (`π = softmax f`):
///
/// ```text
/// L        = Σ_a Σ_b w_a v_b ℓ(d_ab),    d_ab = r(a) − r(b),   w = p_w (chosen), v = p_l (rejected)
/// ∂L/∂r_k  = Σ_b w_k v_b ℓ'(d_kb) − Σ_a w_a v_k ℓ'(d_ak)
/// G_k      = ∂L/∂r_k · ∂r_k/∂log π_k
/// ∂L/∂f_j  = G_j − π_j Σ_k G_k
/// ```
///
/// `O(N²)` time, `O(N)` memory, summed in a fixed order (bit-identical across runs). `beta` is
/// passed to the loss shape (IPO). (Theorem 2.1, Theorem 3.4 (b).)
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::NotFinite`] for non-finite logits.
pub fn population_loss(
    logits: &[f64],
    chosen: &Policy,
    rejected: &Policy,
    reward: &RewardForm,
    shape: LossShape,
    beta: f64,
) -> Result<PopulationLoss> {
    same_len(logits.len(), chosen.len())?;
    chosen.check_same_space(rejected)?;
    let pi = Policy::from_logits(logits)?;
    let (r, dr) = reward.evaluate(pi.log_probs())?;
    let w = chosen.probs();
    let v = rejected.probs();
    let n = logits.len();
    let mut value = 0.0;
    let mut dr_total = vec![0.0; n];
    for a in 0..n {
        let mut row_value = 0.0;
        let mut row_grad = 0.0;
        for b in 0..n {
            let d = r[a] - r[b];
            let vb = v[b];
            row_value += vb * shape.value(d, beta);
            let g = vb * shape.derivative(d, beta);
            row_grad += g;
            dr_total[b] -= w[a] * g;
        }
        value += w[a] * row_value;
        dr_total[a] += w[a] * row_grad;
    }
    let g: Vec<f64> = dr_total.iter().zip(&dr).map(|(x, d)| x * d).collect();
    let g_sum: f64 = g.iter().sum();
    let p = pi.probs();
    let grad_logits = g.iter().zip(&p).map(|(gj, pj)| gj - pj * g_sum).collect();
    Ok(PopulationLoss { value, grad_logits })
}

/// The exact gradient of the **sigmoid** population loss with respect to free rewards `r`,
/// at rewards whose Boltzmann distribution is the rational policy `model` (`e^{r} ∝ model`):
///
/// ```text
/// ∂L/∂r_k = −Σ_b w_k v_b σ(r_b − r_k) + Σ_a w_a v_k σ(r_k − r_a),
/// σ(r_b − r_k) = model_b / (model_b + model_k)
/// ```
///
/// Every term is rational, so the first-order condition of Theorem 2.1 (`∇ = 0` exactly at
/// `model = q_{p_w/p_l}`) is checked with no tolerance.
pub fn sigmoid_reward_gradient_exact(
    chosen: &ExactPolicy,
    rejected: &ExactPolicy,
    model: &ExactPolicy,
) -> Result<Vec<Rational>> {
    chosen.check_same_space(rejected)?;
    chosen.check_same_space(model)?;
    let (w, v, m) = (chosen.probs(), rejected.probs(), model.probs());
    let n = w.len();
    let mut grad = vec![Rational::zero(); n];
    for k in 0..n {
        for b in 0..n {
            // −log σ(r_k − r_b) has derivative −σ(r_b − r_k) = −m_b/(m_b + m_k) in r_k.
            let s_bk = &m[b] / (&m[b] + &m[k]);
            let t = &w[k] * &v[b] * &s_bk;
            grad[k] -= &t;
            grad[b] += t;
        }
    }
    Ok(grad)
}

/// Check that a rational `β` is positive (helper for the exact statements).
pub fn check_positive_rational(name: &'static str, beta: &Rational) -> Result<()> {
    if *beta > Rational::zero() {
        Ok(())
    } else {
        Err(Error::invalid(name, beta, "must be positive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ℓ_ε` is DPO's loss at ε = 0, symmetric at ε = 1/2, and minimal at `log((1 − ε)/ε)`.
    #[test]
    fn label_smoothed_sigmoid_limits_and_minimizer() {
        for d in [-3.0, -0.5, 0.0, 0.7, 4.0] {
            assert_eq!(
                label_smoothed_sigmoid(d, 0.0),
                LossShape::Sigmoid.value(d, 0.1)
            );
            let half = label_smoothed_sigmoid(d, 0.5);
            assert!((half - label_smoothed_sigmoid(-d, 0.5)).abs() < 1e-15);
        }
        let eps: f64 = 0.1;
        let d_star = ((1.0 - eps) / eps).ln();
        let at = label_smoothed_sigmoid(d_star, eps);
        for step in [-1e-3, 1e-3, -0.5, 0.5] {
            assert!(label_smoothed_sigmoid(d_star + step, eps) > at);
        }
    }

    /// The analytic gradient equals central finite differences.
    #[test]
    fn gradient_matches_finite_differences() {
        let chosen = Policy::from_logits(&[0.3, -1.0, 0.8, 0.1]).unwrap();
        let rejected = Policy::from_logits(&[-0.2, 0.5, 0.0, 1.0]).unwrap();
        let reference = Policy::from_logits(&[0.0, 0.2, -0.4, 0.3]).unwrap();
        let f = [0.1, 0.4, -0.3, 0.2];
        for (reward, shape) in [
            (
                RewardForm::log_ratio(0.7, reference.clone()).unwrap(),
                LossShape::Sigmoid,
            ),
            (RewardForm::ref_free(1.0).unwrap(), LossShape::Sigmoid),
            (
                RewardForm::log_ratio(0.7, reference.clone()).unwrap(),
                LossShape::Ipo,
            ),
        ] {
            let got = population_loss(&f, &chosen, &rejected, &reward, shape, 0.7).unwrap();
            for j in 0..f.len() {
                let h = 1e-6;
                let mut fp = f;
                fp[j] += h;
                let mut fm = f;
                fm[j] -= h;
                let lp = population_loss(&fp, &chosen, &rejected, &reward, shape, 0.7)
                    .unwrap()
                    .value;
                let lm = population_loss(&fm, &chosen, &rejected, &reward, shape, 0.7)
                    .unwrap()
                    .value;
                let fd = (lp - lm) / (2.0 * h);
                assert!(
                    (fd - got.grad_logits[j]).abs() < 1e-8,
                    "{shape:?} j={j}: {fd} vs {}",
                    got.grad_logits[j]
                );
            }
        }
    }
}
