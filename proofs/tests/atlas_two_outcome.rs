//! Loss atlas, two outcomes: the population minimizer of each margin loss in closed form
//! (`difinfo::fixed_points::two_outcome_margin`), and which of them recover `π*`.
//!
//! With outcomes `{0, 1}`, data `y_w ~ w`, `y_l ~ v`, the population loss of a loss `ℓ` of the
//! margin `z = β (u(0) − u(1))` is `const + α ℓ(z) + γ ℓ(−z)`, `α = w₀v₁`, `γ = w₁v₀`, and its
//! minimizer depends on `p = α/(α + γ)` only:
//!
//! ```text
//! sigmoid          z* = logit p                     (ε > 0: logit(p(1−ε) + (1−p)ε))
//! robust           z* = logit((p − ε)/(1 − 2ε))
//! exo_pair         z* = (2p − 1) log((1 − ε)/ε)
//! ipo              z* = β (2p − 1)/(2β)              (the margin Δ* = (2p − 1)/(2β))
//! hinge            z* = ±1
//! ```
//!
//! Each is checked against the library's loss text: the minimizer of `population_loss` over
//! the margin, found by bisection on its exact (dual-number) derivative. On the instances of
//! Eq. 1, `logit p = β(u*(0) − u*(1))` (Theorem 3.3), so the loss recovers `π*` iff
//! `z*(p) = logit p`: only `sigmoid` (at ε = 0).
//!
//! Numeric: the bisection brackets the root to `1e-13` in the margin; the closed forms are
//! compared at `1e-9 (1 + |z*|)` (the derivative's rounding near the root, ~1e-16 relative,
//! divided by the curvature `α ℓ''`, which the generated `p ∈ [0.02, 0.98]` keep ≥ 1e-4).

use difinfo::fixed_points::two_outcome_margin;
use difinfo::objective::{LossType, Objective, ObjectiveSpec};
use difinfo::population::population_loss;
use difinfo::Policy;
use difinfo_proofs::config;
use proptest::prelude::*;

/// Closed form against the library: `|z_found − z*| ≤ CLOSED_TOL (1 + |z*|)`.
const CLOSED_TOL: f64 = 1e-9;

/// The margin `z = βΔ` minimizing the library's population loss of `o` on two outcomes with
/// chosen `w`, rejected `v` and reference `r` (bisection on `∂L/∂f₀`, which is `∂L/∂Δ`).
fn minimizer(o: &Objective, w: &Policy, v: &Policy, r: &Policy) -> f64 {
    let lr = r.log_probs();
    let slope = |delta: f64| {
        let f = [lr[0] - lr[1] + delta, 0.0];
        population_loss(&f, w, v, Some(r), o).unwrap().grad_logits[0]
    };
    let (mut lo, mut hi) = (-1.0, 1.0);
    while slope(lo) > 0.0 {
        lo *= 2.0;
        assert!(lo > -1e12, "no bracket below");
    }
    while slope(hi) < 0.0 {
        hi *= 2.0;
        assert!(hi < 1e12, "no bracket above");
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if slope(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-13 {
            break;
        }
    }
    o.beta() * 0.5 * (lo + hi)
}

fn objective(t: LossType, beta: f64, eps: f64) -> Objective {
    Objective::new(ObjectiveSpec {
        beta,
        loss_type: vec![t],
        label_smoothing: eps,
        ..ObjectiveSpec::default()
    })
    .unwrap()
}

/// Two-outcome data with preference `p` for outcome 0: `w = (p, 1 − p)`, `v = (1/2, 1/2)`.
fn data(p: f64) -> (Policy, Policy) {
    (
        Policy::from_probs(&[p, 1.0 - p]).unwrap(),
        Policy::from_probs(&[0.5, 0.5]).unwrap(),
    )
}

fn logit(x: f64) -> f64 {
    (x / (1.0 - x)).ln()
}

fn check(t: LossType, beta: f64, eps: f64, p: f64, r: &Policy) -> Result<(), TestCaseError> {
    let o = objective(t, beta, eps);
    let (w, v) = data(p);
    let want = two_outcome_margin(&o, t, p).expect("closed form");
    let got = minimizer(&o, &w, &v, r);
    prop_assert!(
        (got - want).abs() <= CLOSED_TOL * (1.0 + want.abs()),
        "{t} β={beta} ε={eps} p={p}: minimizer {got}, closed form {want}"
    );
    Ok(())
}

fn reference() -> impl Strategy<Value = Policy> {
    (0.05f64..0.95).prop_map(|a| Policy::from_probs(&[a, 1.0 - a]).unwrap())
}

proptest! {
    #![proptest_config(config(64, "proptest-regressions/atlas_two_outcome.txt"))]

    /// DPO's sigmoid loss: `z* = logit p` (Theorem 2.1 on two outcomes; with the data of Eq. 1,
    /// the margin of `π*`).
    #[test]
    fn atlas_two_outcome_sigmoid_minimizer_is_the_preference_logit(
        beta in 0.05f64..2.0, p in 0.02f64..0.98, r in reference(),
    ) {
        check(LossType::Sigmoid, beta, 0.0, p, &r)?;
        check(LossType::SigmoidNorm, beta, 0.0, p, &r)?;
    }

    /// Conservative DPO shrinks the preference toward ½: `z* = logit(p(1−ε) + (1−p)ε)`.
    #[test]
    fn atlas_two_outcome_conservative_dpo_shrinks_the_preference(
        beta in 0.05f64..2.0, p in 0.02f64..0.98, eps in 0.01f64..0.5, r in reference(),
    ) {
        check(LossType::Sigmoid, beta, eps, p, &r)?;
    }

    /// Robust DPO undoes label noise ε: `z* = logit((p − ε)/(1 − 2ε))` when `ε < p < 1 − ε`.
    #[test]
    fn atlas_two_outcome_robust_minimizer_denoises_the_preference(
        beta in 0.05f64..2.0, p in 0.3f64..0.7, eps in 0.01f64..0.25, r in reference(),
    ) {
        check(LossType::Robust, beta, eps, p, &r)?;
    }

    /// EXO's minimizer is linear in the preference: `z* = (2p − 1) log((1 − ε)/ε)`.
    #[test]
    fn atlas_two_outcome_exo_minimizer_is_linear_in_the_preference(
        beta in 0.05f64..2.0, p in 0.02f64..0.98, eps in 1e-4f64..0.3, r in reference(),
    ) {
        check(LossType::ExoPair, beta, eps, p, &r)?;
    }

    /// IPO's minimizer is linear in the preference: the margin `Δ* = (2p − 1)/(2β)`.
    #[test]
    fn atlas_two_outcome_ipo_minimizer_is_linear_in_the_preference(
        beta in 0.05f64..2.0, p in 0.02f64..0.98, r in reference(),
    ) {
        check(LossType::Ipo, beta, 0.0, p, &r)?;
    }

    /// SLiC's hinge stops at the margin `z* = 1` (`−1` when the data prefer outcome 1).
    #[test]
    fn atlas_two_outcome_hinge_minimizer_is_the_unit_margin(
        beta in 0.05f64..2.0, p in prop_oneof![0.02f64..0.45, 0.55f64..0.98], r in reference(),
    ) {
        check(LossType::Hinge, beta, 0.0, p, &r)?;
    }
}

/// Only the sigmoid loss recovers `π*`: at `p = 0.9` (`logit p = 2.197…`) every other margin
/// loss stops elsewhere (conservative DPO and robust at ε = 0.1: `logit 0.82 = 1.516…` and no
/// finite minimizer; EXO at ε = 1e-3: `0.8 · 6.906… = 5.525…`; IPO: `0.4`; hinge: `1`).
#[test]
fn atlas_two_outcome_only_the_sigmoid_loss_recovers_the_target() {
    let p: f64 = 0.9;
    let target = logit(p);
    let r = Policy::from_probs(&[0.3, 0.7]).unwrap();
    let (w, v) = data(p);
    let sigmoid = minimizer(&objective(LossType::Sigmoid, 0.5, 0.0), &w, &v, &r);
    assert!((sigmoid - target).abs() < 1e-9, "{sigmoid} vs {target}");
    for (t, eps) in [
        (LossType::Sigmoid, 0.1),
        (LossType::ExoPair, 1e-3),
        (LossType::Ipo, 0.0),
        (LossType::Hinge, 0.0),
    ] {
        let o = objective(t, 0.5, eps);
        let z = minimizer(&o, &w, &v, &r);
        assert!(
            (z - target).abs() > 0.5,
            "{t} ε={eps}: minimizer {z} at logit p {target}"
        );
    }
    let robust = objective(LossType::Robust, 0.5, 0.1);
    assert_eq!(two_outcome_margin(&robust, LossType::Robust, p), None);
}
