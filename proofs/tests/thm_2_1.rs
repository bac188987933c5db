//! Theorem 2.1 (preference optimization = distribution matching): when the pairs cover `Y × Y`,
//! the population preference log-loss over free rewards `r` is minimized exactly where the
//! Boltzmann distribution `p_r = softmax(r)` equals the data's preference distribution
//! `p* = q_{p_w/p_l}` (so `r = log p* + C`).
//!
//! Exact: the gradient of the sigmoid population loss with respect to `r`, at rewards with
//! `e^r ∝ model` for a rational `model`, is rational; it is exactly zero at `model = q_{p_w/p_l}`
//! and nonzero at every other model (the loss is strictly convex modulo constants when every pair
//! has positive weight). Numeric: plain gradient descent over free rewards reaches `p*`.

use difinfo::did::{normalized_ratio, normalized_ratio_exact};
use difinfo::entropy::{js, kl};
use difinfo::loss::sigmoid_reward_gradient_exact;
use difinfo::objective::Objective;
use difinfo::{Policy, Rational};
use difinfo_proofs::*;
use num_traits::Zero;
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(192, "proptest-regressions/thm_2_1.txt"))]

    #[test]
    fn thm_2_1_gradient_is_exactly_zero_at_preference_distribution(
        (chosen, rejected) in exact_pair(),
    ) {
        let p_star = normalized_ratio_exact(&chosen, &rejected).unwrap();
        let grad = sigmoid_reward_gradient_exact(&chosen, &rejected, &p_star).unwrap();
        prop_assert!(all_zero(&grad), "{:?}", grad);
    }

    #[test]
    fn thm_2_1_gradient_is_nonzero_away_from_preference_distribution(
        (chosen, rejected, model) in exact_triple(),
    ) {
        let p_star = normalized_ratio_exact(&chosen, &rejected).unwrap();
        prop_assume!(model != p_star);
        let grad = sigmoid_reward_gradient_exact(&chosen, &rejected, &model).unwrap();
        prop_assert!(!all_zero(&grad));
        // The gradient sums to zero exactly: the loss is invariant to r + C.
        prop_assert!(grad.iter().sum::<Rational>().is_zero());
    }
}

/// JS below which the optimized Boltzmann distribution "equals" `p*` (see `GRAD_TOL`).
const NEAR: f64 = 1e-11;

proptest! {
    #![proptest_config(config(64, "proptest-regressions/thm_2_1.txt"))]

    /// Free rewards: `r = log softmax(f)` ranges over all rewards up to a constant, and
    /// `softmax(r) = softmax(f)`. Gradient descent to `‖∇L‖ < GRAD_TOL` lands on `p*`, and
    /// `KL(p* ‖ p_r)` is below the same tolerance.
    #[test]
    fn thm_2_1_optimization_over_free_rewards_recovers_preference_distribution(
        (fw, fl) in (2usize..=MAX_OPT_OUTCOMES).prop_flat_map(|n| (moderate_logits(n), moderate_logits(n))),
    ) {
        let chosen = Policy::from_logits(&fw).unwrap();
        let rejected = Policy::from_logits(&fl).unwrap();
        let free = Objective::dpo(1.0).unwrap().reference_free().unwrap();
        let f0 = vec![0.0; fw.len()];
        let m = minimize(&f0, &chosen, &rejected, None, &free, 1.5);
        prop_assert!(m.grad_norm < GRAD_TOL, "{:?}", m);
        let p_r = Policy::from_logits(&m.logits).unwrap();
        let p_star = normalized_ratio(&chosen, &rejected).unwrap();
        prop_assert!(js(&p_r, &p_star).unwrap() < NEAR);
        prop_assert!(kl(&p_star, &p_r).unwrap() < NEAR);
    }
}
