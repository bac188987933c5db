//! Theorem H.5: the DPO-PG direction is never a descent direction for the rejected NLL:
//! `⟨g, g_l⟩ ≤ 0`, with equality when the projection is active (`g ⊥ g_l`).
//!
//! Exact over big rationals with `difinfo::dpo_pg::project`.

use difinfo::dpo_pg::{dot, project};
use difinfo::Rational;
use difinfo_proofs::*;
use num_traits::Zero;
use proptest::prelude::*;

fn entry() -> impl Strategy<Value = Rational> {
    (-20i64..=20, 1i64..=9).prop_map(|(a, b)| rat(a, b))
}

proptest! {
    #![proptest_config(config(512, "proptest-regressions/thm_h5.txt"))]

    #[test]
    fn thm_h5_projected_gradient_is_nonpositive_on_rejected(
        (g_w, g_l) in (1usize..=10).prop_flat_map(|d| (prop::collection::vec(entry(), d), prop::collection::vec(entry(), d))),
    ) {
        let p = project(&g_w, &g_l).unwrap();
        let inner = dot(&p.gradient, &g_l);
        prop_assert!(inner <= Rational::zero());
        if p.active {
            prop_assert!(inner.is_zero());
            prop_assert!(p.dot > Rational::zero());
        } else {
            prop_assert_eq!(inner, p.dot.clone());
            prop_assert!(p.dot <= Rational::zero() || dot(&g_l, &g_l).is_zero());
        }
    }

    /// Parallel gradients (`g_l = k g_w`, `k > 0`) are the extreme case: the projection removes
    /// everything, `g = 0`.
    #[test]
    fn thm_h5_parallel_gradients_project_to_zero(
        g_w in prop::collection::vec(entry(), 1..=10),
        k in (1i64..=9, 1i64..=9).prop_map(|(a, b)| rat(a, b)),
    ) {
        prop_assume!(g_w.iter().any(|x| !x.is_zero()));
        let g_l: Vec<Rational> = g_w.iter().map(|x| x * &k).collect();
        let p = project(&g_w, &g_l).unwrap();
        prop_assert!(p.active);
        prop_assert!(all_zero(&p.gradient));
    }
}

/// A zero rejected gradient leaves `g = g_w` (no projection; no division by zero).
#[test]
fn thm_h5_zero_rejected_gradient_is_not_projected() {
    let g_w = vec![rat(1, 1), rat(-2, 3)];
    let g_l = vec![Rational::zero(), Rational::zero()];
    let p = project(&g_w, &g_l).unwrap();
    assert!(!p.active);
    assert_eq!(p.gradient, g_w);
}
