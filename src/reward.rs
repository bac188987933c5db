//! Rewards and scores (Section 2, Theorem 3.4; TRL's f-DPO scores), written once over any
//! [`Real`] number type.
//!
//! For a completion `y` with log-probability `log π(y)` (summed over its tokens):
//!
//! ```text
//! log-ratio        u(y) = log π(y) − log π_ref(y)          (u(y) = log π(y) reference-free)
//! reward (metric)  r(y) = β u(y)                           (TRL's rewards/chosen, rewards/rejected)
//! score            s(y) = f(u(y))                          (f from the f-divergence)
//!   reverse_kl       f(u) = u                                     (DPO: β s is DPO's implicit reward)
//!   forward_kl       f(u) = 1 − e^{−u}
//!   js_divergence    f(u) = log 2 + log σ(u)
//!   alpha_divergence f(u) = (e^{min((α−1) u, 80)} − 1) / (α − 1)  (f(u) = u when |α − 1| < 1e-6)
//! ```
//!
//! `f(u)` is `f'(t)` at `t = e^u` for the f-divergence's generator (f-DPO, Wang et al. 2023:
//! `f'(t) = 1 − 1/t`, `log(2t/(t+1))`, `(t^{α−1} − 1)/(α − 1)`), as in TRL 1.16; the clamp at 80
//! is TRL's (it keeps `e^{(α−1)u}` finite in float32). With the log-ratio reward and `f = id`,
//! the optimal reward of Theorem 3.4 is `β log(π/π_ref)`: DPO's.

use crate::logspace::Softplus;
use crate::objective::{FDivergence, Objective};
use crate::scalar::Real;

/// The quantities of one side of a pair (the chosen or the rejected completions of a batch)
/// that the loss types read.
#[derive(Debug, Clone, PartialEq)]
pub struct Side<S> {
    /// `log π(y)`, summed over the completion's tokens.
    pub logps: S,
    /// `log π_ref(y)` (`None` for the reference-free reward).
    pub ref_logps: Option<S>,
    /// `u(y) = log π(y) − log π_ref(y)` (`log π(y)` reference-free).
    pub logratio: S,
    /// `s(y) = f(u(y))`.
    pub score: S,
    /// The completion's token count `|y|` (1 for the synthetic outcomes).
    pub len: S,
    /// `log π(y)` with each completion token counted once, where `logps` weighs some tokens
    /// otherwise (LD-DPO's `shared + α · verbose`); `None`: `logps` is it. The `sft` loss type
    /// reads it, as TRL's reads the plain per-token log-probs.
    pub nll_logps: Option<S>,
    /// WPO's weight `w(y)` ([`crate::loss::wpo_weight`]) when the objective uses it: the
    /// pair's loss is multiplied by `w(y_w) w(y_l)`.
    pub weight: Option<S>,
}

impl<S> Side<S> {
    /// The side with the plain log-probability `full = Σ_t log π(y_t)`, when `logps` is
    /// LD-DPO's weighted one.
    pub fn with_nll_logps(self, full: S) -> Self {
        Self {
            nll_logps: Some(full),
            ..self
        }
    }

    /// The side with WPO's weight `w(y)`.
    pub fn with_weight(self, w: S) -> Self {
        Self {
            weight: Some(w),
            ..self
        }
    }
}

/// The f-divergence score `f(u)` (see the module docs).
///
/// # Errors
/// The number type's.
pub fn score<S: Real>(f: FDivergence, alpha: f64, u: &S) -> Result<S, S::Error> {
    match f {
        FDivergence::ReverseKl => Ok(u.clone()),
        FDivergence::ForwardKl => u.neg()?.exp()?.affine(-1.0, 1.0),
        FDivergence::JsDivergence => u.log_sigmoid()?.affine(1.0, std::f64::consts::LN_2),
        FDivergence::AlphaDivergence if (alpha - 1.0).abs() < 1e-6 => Ok(u.clone()),
        FDivergence::AlphaDivergence => u
            .affine(alpha - 1.0, 0.0)?
            .min_const(80.0)?
            .exp()?
            .affine(1.0 / (alpha - 1.0), -1.0 / (alpha - 1.0)),
    }
}

/// One side's quantities from its log-probabilities: `ref_logps` is used unless the objective
/// is reference-free; `len` is the completion token count.
///
/// # Errors
/// The number type's.
pub fn side<S: Real>(
    o: &Objective,
    logps: S,
    ref_logps: Option<S>,
    len: S,
) -> Result<Side<S>, S::Error> {
    let ref_logps = if o.is_reference_free() {
        None
    } else {
        ref_logps
    };
    let logratio = match &ref_logps {
        Some(r) => logps.sub(r)?,
        None => logps.clone(),
    };
    let score = score(o.f_divergence(), o.f_alpha_divergence_coef(), &logratio)?;
    Ok(Side {
        logps,
        ref_logps,
        logratio,
        score,
        len,
        nll_logps: None,
        weight: None,
    })
}

/// The logged reward `β u(y)` (TRL's `rewards/chosen` and `rewards/rejected`: of the summed
/// log-ratios, whatever the loss type and f-divergence).
///
/// # Errors
/// The number type's.
pub fn reward<S: Real>(o: &Objective, s: &Side<S>) -> Result<S, S::Error> {
    s.logratio.affine(o.beta(), 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::ObjectiveSpec;
    use crate::scalar::infallible;

    /// The scores at `u = 0.3` from their definitions (TRL's `_compute_loss`).
    #[test]
    fn scores_pinned() {
        let u: f64 = 0.3;
        let s = |f, a| infallible(score(f, a, &u));
        assert_eq!(s(FDivergence::ReverseKl, 0.5), 0.3);
        // 1 − e^{−0.3} = 0.259181779318282...
        assert!((s(FDivergence::ForwardKl, 0.5) - 0.259_181_779_318_282).abs() < 1e-15);
        // ln 2 + log σ(0.3) = 0.693147180559945 − 0.554355244468528 = 0.138791936091418
        assert!((s(FDivergence::JsDivergence, 0.5) - 0.138_791_936_091_418).abs() < 1e-15);
        // α = 0.5: (e^{−0.15} − 1) / (−0.5) = 2 (1 − 0.860707976425058) = 0.278584047149884
        assert!((s(FDivergence::AlphaDivergence, 0.5) - 0.278_584_047_149_884).abs() < 1e-15);
        assert_eq!(s(FDivergence::AlphaDivergence, 1.0), 0.3);
        // The clamp: (α − 1) u = 200 → (e^{80} − 1) / (α − 1).
        let big = infallible(score(FDivergence::AlphaDivergence, 3.0, &100.0f64));
        assert!((big / (80f64.exp() / 2.0) - 1.0).abs() < 1e-14);
    }

    #[test]
    fn reference_free_side_ignores_the_reference() {
        let o = Objective::new(ObjectiveSpec {
            reference_free: true,
            ..Default::default()
        })
        .unwrap();
        let s = infallible(side(&o, -3.0, Some(-1.0), 1.0));
        assert_eq!((s.logratio, s.ref_logps), (-3.0, None));
        let d = infallible(side(&Objective::default(), -3.0, Some(-1.0), 1.0));
        assert_eq!(d.logratio, -2.0);
        assert_eq!(infallible(reward(&Objective::default(), &d)), -0.2);
    }
}
