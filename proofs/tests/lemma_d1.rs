//! Lemma D.1 (existence of the DID event), exactly over big rationals.
//!
//! For `0 < c ≤ min_y π_ref(y)/π(y)` and `p(X | y) = c · π(y)/π_ref(y)`:
//! `p(X | y) ∈ (0, 1]`, `p(X) = c`, and the posterior `π_ref(y | X) = π(y)`.

use difinfo::did::{did_exact, DidEvent};
use difinfo::Rational;
use difinfo_proofs::*;
use num_traits::{One, Zero};
use proptest::prelude::*;

/// Exact statements are cheap: 256 random instances per property.
const CASES: u32 = 256;

/// A fraction `t = a/b ∈ (0, 1]` scaling `c_max`.
fn fraction() -> impl Strategy<Value = Rational> {
    (1i64..=1000, 0i64..=1000).prop_map(|(a, extra)| rat(a, a + extra))
}

proptest! {
    #![proptest_config(config(CASES, "proptest-regressions/lemma_d1.txt"))]

    #[test]
    fn lemma_d1_event_is_probability_with_marginal_c_and_posterior_pi(
        (pi, pi_ref) in exact_pair(),
        t in fraction(),
    ) {
        let c = DidEvent::max_c(&pi, &pi_ref).unwrap() * t;
        let ev = DidEvent::new(&pi, &pi_ref, c.clone()).unwrap();
        prop_assert!(ev.likelihood_is_probability());
        for l in ev.likelihood() {
            prop_assert!(*l > Rational::zero() && *l <= Rational::one());
        }
        prop_assert_eq!(ev.marginal(), c);
        prop_assert_eq!(ev.posterior(), pi.clone());
        prop_assert_eq!(ev.did(), did_exact(&pi, &pi_ref).unwrap());
    }

    #[test]
    fn lemma_d1_largest_c_makes_some_likelihood_one(
        (pi, pi_ref) in exact_pair(),
    ) {
        let c = DidEvent::max_c(&pi, &pi_ref).unwrap();
        let ev = DidEvent::new(&pi, &pi_ref, c).unwrap();
        prop_assert!(ev.likelihood().iter().any(|l| l.is_one()));
    }

    #[test]
    fn lemma_d1_c_outside_range_is_rejected(
        (pi, pi_ref) in exact_pair(),
        t in fraction(),
    ) {
        let c_max = DidEvent::max_c(&pi, &pi_ref).unwrap();
        // Any c > c_max makes some p(X|y) exceed 1; c ≤ 0 is no probability.
        let above = &c_max + &c_max * &t;
        prop_assert!(DidEvent::new(&pi, &pi_ref, above).is_err());
        prop_assert!(DidEvent::new(&pi, &pi_ref, Rational::zero()).is_err());
        prop_assert!(DidEvent::new(&pi, &pi_ref, -t).is_err());
    }
}
