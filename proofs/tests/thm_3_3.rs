//! Theorem 3.3: if `q_{π_ref/π_l} ∝ q_{π*/π_ref}^β`, the data's preference probability is the
//! Bradley–Terry probability of the reward `β log(π*/π_ref)`:
//! `p(y_w ≻ y_l) = σ(β log(π*(y_w)/π_ref(y_w)) − β log(π*(y_l)/π_ref(y_l)))`.
//!
//! Exactly over big rationals, with no logarithm: `σ(β log R_a − β log R_b) = R_a^β/(R_a^β + R_b^β)`
//! with `R = π*/π_ref`, for integer `β`, and for rational `β = u/v` on instances built as exact
//! powers (`q_{π*/π_ref} ∝ s^v`, so `q^{u/v} ∝ s^u`).

use difinfo::did::normalized_ratio_exact;
use difinfo::power_law::{is_power_law_exact, pair_power_law_exact, Exponent};
use difinfo::preference::{
    bradley_terry_exact, preference_distribution_exact, sampler_pair_probability_exact,
};
use difinfo::rejected::{ideal_rejected_exact, ideal_rejected_exact_rational};
use difinfo::{ExactPolicy, Rational};
use difinfo_proofs::*;
use proptest::prelude::*;

const CASES: u32 = 192;

/// `R_a^β / (R_a^β + R_b^β)` with `R = π*/π_ref`: the BT probability of `β log(π*/π_ref)`.
fn bt_of_log_ratio(
    pi_star: &ExactPolicy,
    pi_ref: &ExactPolicy,
    beta: u32,
    a: usize,
    b: usize,
) -> Rational {
    let r = |y: usize| rpow(&(pi_star.prob(y).unwrap() / pi_ref.prob(y).unwrap()), beta);
    let (ra, rb) = (r(a), r(b));
    &ra / (&ra + rb)
}

proptest! {
    #![proptest_config(config(CASES, "proptest-regressions/thm_3_3.txt"))]

    /// Section 3.2: for any `π_l`, the chosen/rejected sampler's pair probability is Bradley–Terry
    /// on `p* = q_{π_ref/π_l}`.
    #[test]
    fn thm_3_3_sampler_preference_is_q_ref_over_l((pi_ref, pi_l, _) in exact_triple()) {
        let p_star = preference_distribution_exact(&pi_ref, &pi_l).unwrap();
        for a in 0..pi_ref.len() {
            for b in 0..pi_ref.len() {
                if a != b {
                    prop_assert_eq!(
                        sampler_pair_probability_exact(&pi_ref, &pi_l, a, b).unwrap(),
                        bradley_terry_exact(&p_star, a, b).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn thm_3_3_integer_beta_pair_probability_is_bradley_terry_of_log_ratio(
        (pi_ref, pi_star) in exact_pair(),
        beta in int_beta(),
    ) {
        let pi_l = ideal_rejected_exact(&pi_ref, &pi_star, beta).unwrap();
        let q_data = normalized_ratio_exact(&pi_ref, &pi_l).unwrap();
        let q_did = normalized_ratio_exact(&pi_star, &pi_ref).unwrap();
        let exp = Exponent::new(beta, 1).unwrap();
        // The hypothesis: a power law with exponent β.
        prop_assert!(is_power_law_exact(&q_data, &q_did, exp).unwrap());
        // p* ∝ q_{π*/π_ref}^β.
        let p_star = ExactPolicy::from_weights(q_did.probs().iter().map(|x| rpow(x, beta)).collect()).unwrap();
        for a in 0..pi_ref.len() {
            for b in 0..pi_ref.len() {
                if a == b { continue; }
                let data = sampler_pair_probability_exact(&pi_ref, &pi_l, a, b).unwrap();
                prop_assert_eq!(&data, &bradley_terry_exact(&p_star, a, b).unwrap());
                prop_assert_eq!(&data, &bt_of_log_ratio(&pi_star, &pi_ref, beta, a, b));
            }
        }
    }

    #[test]
    fn thm_3_3_rational_beta_pair_probability_is_bradley_terry_of_did_power(inst in power_instance()) {
        let PowerInstance { pi_ref, pi_star, beta, .. } = &inst;
        let pi_l = ideal_rejected_exact_rational(pi_ref, pi_star, *beta).unwrap();
        let q_data = normalized_ratio_exact(pi_ref, &pi_l).unwrap();
        let q_did = normalized_ratio_exact(pi_star, pi_ref).unwrap();
        prop_assert!(is_power_law_exact(&q_data, &q_did, *beta).unwrap());
        // p* ∝ s^u is the normalized q_{π*/π_ref}^{u/v} (positive v-th roots are unique).
        let p_star = inst.p_star();
        prop_assert!(is_power_law_exact(&p_star, &q_did, *beta).unwrap());
        for a in 0..pi_ref.len() {
            for b in 0..pi_ref.len() {
                if a == b { continue; }
                prop_assert_eq!(
                    sampler_pair_probability_exact(pi_ref, &pi_l, a, b).unwrap(),
                    bradley_terry_exact(&p_star, a, b).unwrap()
                );
                prop_assert!(pair_power_law_exact(pi_star, pi_ref, &pi_l, a, b, *beta).unwrap());
            }
        }
    }
}
