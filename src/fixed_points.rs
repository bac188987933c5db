//! Closed-form population optima of the loss types, where one exists: the statements of the
//! loss atlas (`difinfo synth loss-atlas`), proved against the loss texts in `proofs/`
//! (`atlas_two_outcome.rs`, `atlas_ipo_optimum.rs`).
//!
//! # Two outcomes
//! With two outcomes and data `y_w ~ w`, `y_l ~ v`, a loss of the margin `z = β Δ`
//! (`Δ = u(0) − u(1)`, `u = log π − log π_ref`) has population loss
//! `const + α ℓ(z) + γ ℓ(−z)`, `α = w₀ v₁`, `γ = w₁ v₀`, `p = α / (α + γ)` (the data's
//! preference for outcome 0). Its minimizer:
//!
//! ```text
//! sigmoid, sigmoid_norm   z* = logit p                                 (Theorem 2.1: recovers π*)
//! sigmoid, ε > 0          z* = logit(p (1 − ε) + (1 − p) ε)             (conservative DPO)
//! robust                  z* = logit((p − ε) / (1 − 2ε))   if ε < p < 1 − ε, else none
//! exo_pair                z* = (2p − 1) log((1 − ε)/ε)
//! ipo                     Δ* = (2p − 1) / (2β)             (z* = (2p − 1)/2)
//! hinge                   z* = 1 if p > ½, −1 if p < ½
//! ```
//!
//! On the synthetic instances (Eq. 1) `logit p = β (u*(0) − u*(1))` with `u* = log π*/π_ref`
//! (Theorem 3.3), so a margin loss recovers `π*` on every two-outcome instance exactly when
//! `z*(p) = logit p`: of the above, only the sigmoid loss (at ε = 0).
//!
//! # IPO on `N` outcomes
//! `L(u) = Σ_a Σ_b w_a v_b (u_a − u_b − c)²`, `c = 1/(2β)`, is a convex quadratic whose
//! Hessian is a weighted Laplacian of the complete graph (weights `w_a v_b + w_b v_a > 0`):
//! its minimizer is unique up to the constant that normalization fixes, and solves a linear
//! system in closed form:
//!
//! ```text
//! u*_k = (c (w_k − v_k) + v_k D) / (w_k + v_k),   D = −c Σ_k v_k (w_k − v_k)/(w_k + v_k) / Σ_k v_k²/(w_k + v_k)
//! ```
//!
//! (from `∂L/∂u_k = 2[(w_k + v_k) u_k − w_k ⟨v,u⟩ − v_k ⟨w,u⟩ − c (w_k − v_k)] = 0` with the
//! constant chosen so that `⟨v, u*⟩ = 0`, hence `⟨w, u*⟩ = D`). Rational in `w`, `v`, `c`: it is
//! not `u* = log(π*/π_ref)`, which is transcendental in them.

use crate::objective::{LossType, Objective};
use crate::scalar::Arith;

/// `log(x / (1 − x))`.
fn logit(x: f64) -> f64 {
    (x / (1.0 - x)).ln()
}

/// The two-outcome minimizer `z* = β Δ*` of a margin loss (see the module docs) for the
/// preference `p ∈ (0, 1)` of outcome 0, or `None` where the loss type has no closed form here
/// (or no finite minimizer).
pub fn two_outcome_margin(o: &Objective, t: LossType, p: f64) -> Option<f64> {
    let eps = o.label_smoothing();
    match t {
        LossType::Sigmoid => Some(logit(p * (1.0 - eps) + (1.0 - p) * eps)),
        LossType::SigmoidNorm => Some(logit(p)),
        LossType::Robust => {
            let q = (p - eps) / (1.0 - 2.0 * eps);
            (q > 0.0 && q < 1.0).then(|| logit(q))
        }
        LossType::ExoPair => Some((2.0 * p - 1.0) * ((1.0 - eps) / eps).ln()),
        LossType::Ipo => {
            let delta = (2.0 * p - 1.0) / (2.0 * o.beta());
            Some(o.beta() * delta)
        }
        LossType::Hinge if p > 0.5 => Some(1.0),
        LossType::Hinge if p < 0.5 => Some(-1.0),
        _ => None,
    }
}

/// IPO's population-optimal log-ratio `u*` on `N` outcomes with chosen distribution `w` and
/// rejected `v` (the closed form of the module docs, normalized so that `⟨v, u*⟩ = 0`); add
/// the constant that normalizes `π = π_ref e^{u*}`. Exact over rationals.
///
/// # Errors
/// The number type's.
///
/// # Panics
/// For empty or unequal-length `w`, `v`.
pub fn ipo_log_ratio<T: Arith>(w: &[T], v: &[T], beta: f64) -> Result<Vec<T>, T::Error> {
    assert!(
        !w.is_empty() && w.len() == v.len(),
        "two distributions on one space"
    );
    let c = 1.0 / (2.0 * beta);
    let zero = w[0].affine(0.0, 0.0)?;
    let (mut num, mut den) = (zero.clone(), zero);
    for (wk, vk) in w.iter().zip(v) {
        let s = wk.add(vk)?;
        num = num.add(&vk.mul(&wk.sub(vk)?)?.div(&s)?)?;
        den = den.add(&vk.sqr()?.div(&s)?)?;
    }
    let d = num.div(&den)?.affine(-c, 0.0)?;
    w.iter()
        .zip(v)
        .map(|(wk, vk)| {
            wk.sub(vk)?
                .affine(c, 0.0)?
                .add(&vk.mul(&d)?)?
                .div(&wk.add(vk)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::population::population_loss;

    /// The closed form is where the library's IPO population loss has zero gradient.
    #[test]
    fn ipo_closed_form_is_stationary() {
        let w = Policy::from_logits(&[0.3, -1.0, 0.8, 0.1, 0.0]).unwrap();
        let v = Policy::from_logits(&[-0.2, 0.5, 0.0, 1.0, -0.7]).unwrap();
        let r = Policy::from_logits(&[0.0, 0.2, -0.4, 0.3, 0.1]).unwrap();
        let o = Objective::loss(LossType::Ipo, 0.4).unwrap();
        let u = ipo_log_ratio(&w.probs(), &v.probs(), 0.4).unwrap();
        let f: Vec<f64> = u.iter().zip(r.log_probs()).map(|(a, b)| a + b).collect();
        let g = population_loss(&f, &w, &v, Some(&r), &o).unwrap();
        assert!(g.grad_logits.iter().all(|x| f64::abs(*x) < 1e-14), "{g:?}");
    }
}
