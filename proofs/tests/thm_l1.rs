//! Equation (1) / Theorem L.1: the ideal rejected distribution
//! `π_l ∝ π_ref^{1+β} π*^{−β}` makes the data's preference distribution the power law
//! `q_{π_ref/π_l} ∝ q_{π*/π_ref}^β`, and it is the unique such `π_l`.
//!
//! Exact over big rationals (integer β, and rational β = u/v on exact-power instances). Uniqueness
//! is shown the executable way: any other `π_l'` (random, or `π_l` nudged by one part in 10^20)
//! changes the data's pair probability on some pair.

use difinfo::did::normalized_ratio_exact;
use difinfo::power_law::{is_power_law_exact, Exponent};
use difinfo::preference::{bradley_terry_exact, sampler_pair_probability_exact};
use difinfo::rejected::{ideal_rejected, ideal_rejected_exact, ideal_rejected_exact_rational};
use difinfo::{ExactPolicy, Rational};
use difinfo_proofs::*;
use num_traits::One;
use proptest::prelude::*;

const CASES: u32 = 192;

/// `p* ∝ q_{π*/π_ref}^β`.
fn target_preference(pi_star: &ExactPolicy, pi_ref: &ExactPolicy, beta: u32) -> ExactPolicy {
    let q = normalized_ratio_exact(pi_star, pi_ref).unwrap();
    ExactPolicy::from_weights(q.probs().iter().map(|x| rpow(x, beta)).collect()).unwrap()
}

/// Whether the sampler `(π_ref, π_l)` has Bradley–Terry pair probabilities of `p*` on every pair.
fn matches_on_every_pair(pi_ref: &ExactPolicy, pi_l: &ExactPolicy, p_star: &ExactPolicy) -> bool {
    let n = pi_ref.len();
    (0..n).all(|a| {
        (0..n).filter(|&b| b != a).all(|b| {
            sampler_pair_probability_exact(pi_ref, pi_l, a, b).unwrap()
                == bradley_terry_exact(p_star, a, b).unwrap()
        })
    })
}

proptest! {
    #![proptest_config(config(CASES, "proptest-regressions/thm_l1.txt"))]

    #[test]
    fn thm_l1_ideal_rejected_follows_equation_1(
        (pi_ref, pi_star) in exact_pair(),
        beta in int_beta(),
    ) {
        let pi_l = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap();
        // π_l(y) · π*(y)^β / π_ref(y)^{1+β} is one constant.
        let k = |y: usize| pi_l.prob(y).unwrap() * rpow(pi_star.prob(y).unwrap(), beta)
            / rpow(pi_ref.prob(y).unwrap(), beta + 1);
        let k0 = k(0);
        for y in 1..pi_ref.len() {
            prop_assert_eq!(k(y), k0.clone());
        }
    }

    #[test]
    fn thm_l1_ideal_rejected_gives_power_law_and_target_preferences(
        (pi_ref, pi_star) in exact_pair(),
        beta in int_beta(),
    ) {
        let pi_l = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap();
        let q_data = normalized_ratio_exact(&pi_ref, &pi_l).unwrap();
        let q_did = normalized_ratio_exact(&pi_star, &pi_ref).unwrap();
        prop_assert!(is_power_law_exact(&q_data, &q_did, Exponent::new(beta, 1).unwrap()).unwrap());
        prop_assert!(matches_on_every_pair(&pi_ref, &pi_l, &target_preference(&pi_star, &pi_ref, beta)));
    }

    #[test]
    fn thm_l1_ideal_rejected_is_unique_against_any_other(
        (pi_ref, pi_star, other) in exact_triple(),
        beta in int_beta(),
    ) {
        let pi_l = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap();
        prop_assume!(other != pi_l);
        prop_assert!(!matches_on_every_pair(&pi_ref, &other, &target_preference(&pi_star, &pi_ref, beta)));
    }

    #[test]
    fn thm_l1_ideal_rejected_is_unique_against_a_tiny_nudge(
        (pi_ref, pi_star) in exact_pair(),
        beta in int_beta(),
        k in 0usize..MAX_OUTCOMES,
    ) {
        let pi_l = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap();
        let y = k % pi_l.len();
        let mut w: Vec<Rational> = pi_l.probs().to_vec();
        w[y] = &w[y] * (Rational::one() + pow10(-20));
        let nudged = ExactPolicy::from_weights(w).unwrap();
        prop_assert!(!matches_on_every_pair(&pi_ref, &nudged, &target_preference(&pi_star, &pi_ref, beta)));
    }

    #[test]
    fn thm_l1_rational_beta_gives_power_law(inst in power_instance()) {
        let pi_l = ideal_rejected_exact_rational(&inst.pi_ref, &inst.pi_star, inst.beta).unwrap();
        let q_data = normalized_ratio_exact(&inst.pi_ref, &pi_l).unwrap();
        let q_did = normalized_ratio_exact(&inst.pi_star, &inst.pi_ref).unwrap();
        prop_assert!(is_power_law_exact(&q_data, &q_did, inst.beta).unwrap());
        prop_assert!(is_power_law_exact(&q_data, &inst.p_star(), Exponent::new(1, 1).unwrap()).unwrap());
    }

    #[test]
    fn thm_l1_rational_form_agrees_with_integer_form(
        (pi_ref, pi_star) in exact_pair(),
        beta in int_beta(),
    ) {
        prop_assert_eq!(
            ideal_rejected_exact_rational(&pi_ref, &pi_star, Exponent::new(beta, 1).unwrap()).unwrap(),
            ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap()
        );
    }

    /// The float `ideal_rejected` agrees with the exact one. Tolerance 1e-10 on `log π_l`: the
    /// exact logarithms carry ~1e-13 each and the float formula multiplies them by `1+β ≤ 5`.
    #[test]
    fn thm_l1_float_matches_exact((pi_ref, pi_star) in exact_pair(), beta in int_beta()) {
        let exact = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap().to_float();
        let float = ideal_rejected(&pi_ref.to_float(), &pi_star.to_float(), beta as f64).unwrap();
        for (a, b) in exact.log_probs().iter().zip(float.log_probs()) {
            prop_assert!((a - b).abs() <= 1e-10, "{} vs {}", a, b);
        }
    }
}

proptest! {
    #![proptest_config(config(32, "proptest-regressions/thm_l1.txt"))]

    /// On float spaces of up to 10^4 outcomes and logits up to ±1e4, Eq. (1) holds in log space:
    /// `log π_l − (1+β) log π_ref + β log π*` is one constant. Tolerance `1e-12 · (1+2β) · L`
    /// with `L` the largest |log-probability|: each term carries a few ulp of its magnitude.
    #[test]
    fn thm_l1_float_equation_1_on_large_spaces(
        (pi_ref, pi_star) in float_pair(),
        beta in prop::sample::select(vec![0.25, 0.5, 1.0, 2.0, 3.0]),
    ) {
        let pi_l = ideal_rejected(&pi_ref, &pi_star, beta).unwrap();
        let k: Vec<f64> = (0..pi_ref.len()).map(|y| {
            pi_l.log_probs()[y] - (1.0 + beta) * pi_ref.log_probs()[y] + beta * pi_star.log_probs()[y]
        }).collect();
        let big = pi_ref.log_probs().iter().chain(pi_star.log_probs()).chain(pi_l.log_probs())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        for kv in &k {
            prop_assert!((kv - k[0]).abs() <= 1e-12 * (1.0 + 2.0 * beta) * big, "{} vs {}", kv, k[0]);
        }
    }
}

/// Not every rational β gives a rational `π_l`: the exact form refuses instead of rounding.
#[test]
fn thm_l1_irrational_ideal_rejected_is_refused() {
    let pi_ref = ExactPolicy::uniform(2).unwrap();
    let pi_star = ExactPolicy::from_probs(vec![rat(1, 3), rat(2, 3)]).unwrap();
    // (π_ref/π*)(1) / (π_ref/π*)(0) = 1/2, whose square root is irrational.
    assert!(
        ideal_rejected_exact_rational(&pi_ref, &pi_star, Exponent::new(1, 2).unwrap()).is_err()
    );
}

/// Exhaustive small spaces first: every `π_ref`, `π*` on 2 and 3 outcomes with weights in
/// `{1, 3, 1e-30}` and every integer `β ≤ 4`: Eq. (1) gives the power law and the target
/// preferences on every pair.
#[test]
fn thm_l1_exhaustive_small_spaces() {
    let mut checked = 0;
    for n in 2..=3 {
        let all = all_small_policies(n);
        for pi_ref in &all {
            for pi_star in &all {
                for beta in 1..=MAX_INT_BETA {
                    let pi_l = ideal_rejected_exact(pi_ref, pi_star, beta).unwrap();
                    let q_data = normalized_ratio_exact(pi_ref, &pi_l).unwrap();
                    let q_did = normalized_ratio_exact(pi_star, pi_ref).unwrap();
                    assert!(
                        is_power_law_exact(&q_data, &q_did, Exponent::new(beta, 1).unwrap())
                            .unwrap()
                    );
                    assert!(matches_on_every_pair(
                        pi_ref,
                        &pi_l,
                        &target_preference(pi_star, pi_ref, beta)
                    ));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "{checked}");
}
