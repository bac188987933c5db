//! Loss atlas, AOT: where `log π*` is an increasing function of `log π_ref` (the tempered
//! instances, `f* = f_ref/τ`), `π*` is a stationary point of AOT's population loss: the sorted
//! (quantile) coupling of the policy margins `X = log π(a) − log π(b)` with the reference
//! margins `Y` is then the identity pairing, so AOT's gradient is DPO's, which vanishes at `π*`
//! (Theorem 3.4). Where `π*` is not comonotone with `π_ref`, it is not.
//!
//! Numeric: the gradient at `π*` is compared with `GRAD_TOL_AOT = 1e-12` (sums of `N²` terms
//! of size ≤ 1 in `f64`, `N ≤ 8`); the counterexample needs `> 1e-6`.

use difinfo::objective::{LossType, Objective};
use difinfo::population::population_loss;
use difinfo::rejected::ideal_rejected;
use difinfo::Policy;
use difinfo_proofs::*;
use proptest::prelude::*;

/// Stationarity tolerance in `f64` (see the module docs).
const GRAD_TOL_AOT: f64 = 1e-12;

fn aot_gradient_at_target(f_ref: &[f64], f_star: &[f64], beta: f64) -> f64 {
    let pi_ref = Policy::from_logits(f_ref).unwrap();
    let pi_star = Policy::from_logits(f_star).unwrap();
    let pi_l = ideal_rejected(&pi_ref, &pi_star, beta).unwrap();
    let o = Objective::loss(LossType::Aot, beta).unwrap();
    let g = population_loss(f_star, &pi_ref, &pi_l, Some(&pi_ref), &o).unwrap();
    norm(&g.grad_logits)
}

proptest! {
    #![proptest_config(config(64, "proptest-regressions/atlas_aot_comonotone.txt"))]

    /// Tempered instances: `∇L_AOT(π*) = 0`.
    #[test]
    fn atlas_aot_target_is_stationary_when_comonotone(
        f_ref in (2usize..=MAX_OPT_OUTCOMES).prop_flat_map(moderate_logits),
        tau in 0.2f64..5.0,
        beta in 0.1f64..2.0,
    ) {
        let f_star: Vec<f64> = f_ref.iter().map(|x| x / tau).collect();
        let g = aot_gradient_at_target(&f_ref, &f_star, beta);
        prop_assert!(g < GRAD_TOL_AOT, "‖∇‖ = {g}");
    }
}

/// A `π*` that reverses `π_ref`'s order is not stationary for AOT (DPO's `π*` still is).
#[test]
fn atlas_aot_target_is_not_stationary_when_not_comonotone() {
    let f_ref = [1.0, 0.0, -1.0];
    let f_star = [-1.0, 0.5, 1.0];
    assert!(aot_gradient_at_target(&f_ref, &f_star, 0.5) > 1e-6);
    let pi_ref = Policy::from_logits(&f_ref).unwrap();
    let pi_star = Policy::from_logits(&f_star).unwrap();
    let pi_l = ideal_rejected(&pi_ref, &pi_star, 0.5).unwrap();
    let dpo = Objective::dpo(0.5).unwrap();
    let g = population_loss(&f_star, &pi_ref, &pi_l, Some(&pi_ref), &dpo).unwrap();
    assert!(norm(&g.grad_logits) < GRAD_TOL_AOT);
}
