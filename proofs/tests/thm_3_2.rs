//! Theorem 3.2: the DID is the normalized likelihood ratio,
//! `p(y | X) = q_{π/π_ref}(y) = (π(y)/π_ref(y)) / Σ_{y'} π(y')/π_ref(y')`.
//!
//! Exact over big rationals; the float `did` is checked against the exact one with a stated
//! tolerance, and on large float spaces for no underflow.

use difinfo::did::{did, did_exact, DidEvent};
use difinfo::{ExactPolicy, Policy, Rational};
use difinfo_proofs::*;
use proptest::prelude::*;

const CASES: u32 = 256;
/// Float-vs-exact tolerance on `log q`. The exact side takes `ln` of big numerators and
/// denominators (values up to ~10^150 here, so `ln` up to ~350) to a few ulp each, i.e.
/// ~1e-13 absolute; the float side adds a subtraction and a log-sum-exp of similar size.
/// 1e-11 leaves a factor ~30 over that error budget; a wrong formula is off by O(1).
const LOG_TOL: f64 = 1e-11;

proptest! {
    #![proptest_config(config(CASES, "proptest-regressions/thm_3_2.txt"))]

    #[test]
    fn thm_3_2_did_is_normalized_ratio((pi, pi_ref) in exact_pair()) {
        let q = did_exact(&pi, &pi_ref).unwrap();
        let z: Rational = pi.probs().iter().zip(pi_ref.probs()).map(|(p, r)| p / r).sum();
        for y in 0..pi.len() {
            prop_assert_eq!(q.prob(y).unwrap() * &z, pi.prob(y).unwrap() / pi_ref.prob(y).unwrap());
        }
        prop_assert!(q.is_valid());
    }

    #[test]
    fn thm_3_2_posterior_under_uniform_prior_is_did_for_every_c(
        (pi, pi_ref) in exact_pair(),
        (a, b) in (1i64..=50, 1i64..=50),
    ) {
        let c_max = DidEvent::max_c(&pi, &pi_ref).unwrap();
        let (lo, hi) = (a.min(b), a.max(b));
        let q = did_exact(&pi, &pi_ref).unwrap();
        for c in [c_max.clone() * rat(lo, hi), c_max] {
            prop_assert_eq!(DidEvent::new(&pi, &pi_ref, c).unwrap().did(), q.clone());
        }
    }

    #[test]
    fn thm_3_2_did_of_policy_over_itself_is_uniform(pi in exact_policy()) {
        prop_assert_eq!(did_exact(&pi, &pi).unwrap(), ExactPolicy::uniform(pi.len()).unwrap());
    }

    #[test]
    fn thm_3_2_did_of_pi_over_uniform_is_pi(pi in exact_policy()) {
        let u = ExactPolicy::uniform(pi.len()).unwrap();
        prop_assert_eq!(did_exact(&pi, &u).unwrap(), pi);
    }

    #[test]
    fn thm_3_2_float_did_matches_exact((pi, pi_ref) in exact_pair()) {
        let exact = did_exact(&pi, &pi_ref).unwrap().to_float();
        let float = did(&pi.to_float(), &pi_ref.to_float()).unwrap();
        for (a, b) in exact.log_probs().iter().zip(float.log_probs()) {
            prop_assert!((a - b).abs() <= LOG_TOL, "log q exact {} float {}", a, b);
        }
    }
}

proptest! {
    #![proptest_config(config(32, "proptest-regressions/thm_3_2.txt"))]

    /// On up to 10^4 outcomes with logits up to ±1e4, the float DID keeps full support and unit
    /// mass, and `log q(y) − log q(y') = (log π − log π_ref)(y) − (…)(y')`.
    #[test]
    fn thm_3_2_float_did_is_normalized_ratio_on_large_spaces(
        (f, g) in (2usize..=MAX_FLOAT_OUTCOMES).prop_flat_map(|n| (logits_n(n), logits_n(n))),
    ) {
        let pi = Policy::from_logits(&f).unwrap();
        let pi_ref = Policy::from_logits(&g).unwrap();
        let q = did(&pi, &pi_ref).unwrap();
        let lq = q.log_probs();
        prop_assert!(lq.iter().all(|l| l.is_finite()));
        // Unit mass within the library's own stated tolerance (N · 2^-53 summation error).
        prop_assert!(difinfo::logspace::log_sum_exp(lq).abs() <= difinfo::prec::MASS_TOLERANCE);
        let d = |y: usize| pi.log_probs()[y] - pi_ref.log_probs()[y];
        let scale = f.iter().chain(&g).fold(1.0f64, |m, x| m.max(x.abs()));
        for y in 1..f.len().min(64) {
            // Relative to the logit scale: each term carries a few ulp of |f|.
            prop_assert!(((lq[y] - lq[0]) - (d(y) - d(0))).abs() <= 1e-13 * scale);
        }
    }
}

/// Exhaustive small spaces first: every pair of policies on 2 and 3 outcomes with weights in
/// `{1, 3, 1e-30}`: the Lemma D.1 event at `c_max` has posterior `π` and uniform-prior
/// posterior `q_{π/π_ref}`, and `q · Z = π/π_ref` exactly.
#[test]
fn thm_3_2_exhaustive_small_spaces() {
    for n in 2..=3 {
        let all = all_small_policies(n);
        for pi in &all {
            for pi_ref in &all {
                let q = did_exact(pi, pi_ref).unwrap();
                let ev = DidEvent::new(pi, pi_ref, DidEvent::max_c(pi, pi_ref).unwrap()).unwrap();
                assert!(ev.likelihood_is_probability());
                assert_eq!(&ev.posterior(), pi);
                assert_eq!(ev.did(), q);
                let z: Rational = pi
                    .probs()
                    .iter()
                    .zip(pi_ref.probs())
                    .map(|(p, r)| p / r)
                    .sum();
                for y in 0..n {
                    assert_eq!(
                        q.prob(y).unwrap() * &z,
                        pi.prob(y).unwrap() / pi_ref.prob(y).unwrap()
                    );
                }
            }
        }
    }
}
