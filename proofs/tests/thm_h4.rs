//! Theorem H.4: the DPO-PG direction `g` never opposes the chosen-NLL gradient,
//! `⟨g, g_w⟩ ≥ 0` (Cauchy–Schwarz), so `−g` is a descent direction for `L_w`.
//!
//! Exact over big rationals with `difinfo::dpo_pg::project` (generic over the scalar); also on the
//! gradients of a softmax model, and in `f64` with a stated tolerance.

use difinfo::dpo_pg::{dot, project};
use difinfo::Rational;
use difinfo_proofs::*;
use num_traits::Zero;
use proptest::prelude::*;

/// A rational vector entry `a/b`, `|a| ≤ 20`, `1 ≤ b ≤ 9`.
fn entry() -> impl Strategy<Value = Rational> {
    (-20i64..=20, 1i64..=9).prop_map(|(a, b)| rat(a, b))
}

/// Two rational gradient vectors of one dimension `1..=10`.
pub fn gradient_pair() -> impl Strategy<Value = (Vec<Rational>, Vec<Rational>)> {
    (1usize..=10).prop_flat_map(|d| {
        (
            prop::collection::vec(entry(), d),
            prop::collection::vec(entry(), d),
        )
    })
}

/// Softmax chosen/rejected NLL gradients: `∇_f −log π(y) = π − e_y`, for a rational `π`.
fn softmax_gradients() -> impl Strategy<Value = (Vec<Rational>, Vec<Rational>)> {
    (MIN_OUTCOMES..=MAX_OUTCOMES)
        .prop_flat_map(|n| (exact_policy_n(n), 0..n, 0..n))
        .prop_map(|(pi, w, l)| {
            let grad = |y: usize| -> Vec<Rational> {
                pi.probs()
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        if k == y {
                            p - Rational::from_integer(1.into())
                        } else {
                            p.clone()
                        }
                    })
                    .collect()
            };
            (grad(w), grad(l))
        })
}

proptest! {
    #![proptest_config(config(512, "proptest-regressions/thm_h4.txt"))]

    #[test]
    fn thm_h4_projected_gradient_is_nonnegative_on_chosen((g_w, g_l) in gradient_pair()) {
        let p = project(&g_w, &g_l).unwrap();
        let inner = dot(&p.gradient, &g_w);
        prop_assert!(inner >= Rational::zero());
        if p.active {
            // ⟨g, g_w⟩ = ‖g‖² = ‖g_w‖² − ⟨g_w, g_l⟩²/‖g_l‖² (the Cauchy–Schwarz gap).
            prop_assert_eq!(&inner, &dot(&p.gradient, &p.gradient));
            let gl2 = dot(&g_l, &g_l);
            prop_assert_eq!(inner, dot(&g_w, &g_w) - &p.dot * &p.dot / gl2);
        } else {
            prop_assert_eq!(&p.gradient, &g_w);
        }
    }

    #[test]
    fn thm_h4_projected_softmax_gradient_is_nonnegative_on_chosen((g_w, g_l) in softmax_gradients()) {
        let p = project(&g_w, &g_l).unwrap();
        prop_assert!(dot(&p.gradient, &g_w) >= Rational::zero());
    }

    /// In `f64`: `⟨g, g_w⟩ ≥ −1e-12 ‖g_w‖²`, the rounding of a few dot products of length ≤ 10.
    #[test]
    fn thm_h4_float_projection_is_nonnegative_on_chosen(
        (g_w, g_l) in (1usize..=10).prop_flat_map(|d| (prop::collection::vec(-1e3f64..1e3, d), prop::collection::vec(-1e3f64..1e3, d))),
    ) {
        let p = project(&g_w, &g_l).unwrap();
        let n2: f64 = dot(&g_w, &g_w);
        prop_assert!(dot(&p.gradient, &g_w) >= -1e-12 * n2);
    }
}
