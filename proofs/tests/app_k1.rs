//! Appendix K.1: β fit and β-accuracy. A converged DID estimator `π̂` satisfies
//! `log π̂(y) = β log(π(y)/π_ref(y)) + c` with `β ≥ 0`; per prompt an OLS fit of `β, c` from
//! samples; the β-accuracy is the fraction of prompts with `β̂ ≥ 0`. A fit on fewer than two
//! distinct `x` values is undetermined.

use difinfo::beta_accuracy::{beta_accuracy, fit_beta, BetaFit};
use difinfo::did::did;
use difinfo::objective::Objective;
use difinfo::{Error, Policy};
use difinfo_proofs::*;
use proptest::prelude::*;

fn determined(f: BetaFit) -> difinfo::fit::LinearFit {
    match f {
        BetaFit::Determined(l) => l,
        BetaFit::Undetermined => panic!("expected a determined fit"),
    }
}

proptest! {
    #![proptest_config(config(256, "proptest-regressions/app_k1.txt"))]

    /// Data generated as `log π̂ = β x + c` (any `x` with two distinct values): the fit recovers
    /// `β` and `c`. Tolerance `1e-9 · (1 + |β| + |c|)`: closed-form OLS on ≤ 64 points of size ≤ 1e3
    /// loses a few hundred ulp at most.
    #[test]
    fn app_k1_fit_recovers_beta_of_exact_line(
        x in prop::collection::vec(-50.0f64..=50.0, 2..=64),
        beta in 0.0f64..=20.0,
        c in -50.0f64..=50.0,
    ) {
        let spread = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - x.iter().cloned().fold(f64::INFINITY, f64::min);
        prop_assume!(spread > 1e-3);
        let y: Vec<f64> = x.iter().map(|xi| beta * xi + c).collect();
        let fit = determined(fit_beta(&x, &y).unwrap());
        let tol = 1e-9 * (1.0 + beta + c.abs());
        prop_assert!((fit.slope - beta).abs() <= tol, "{:?}", fit);
        prop_assert!((fit.intercept - c).abs() <= tol * 100.0 / spread.min(1.0), "{:?}", fit);
        // β ≥ 0 is recovered as β̂ ≥ 0 (β = 0 exactly gives a slope within rounding of 0).
        prop_assert!(fit.slope >= -tol);
    }

    /// Fewer than two distinct `x` (e.g. four samples of one sequence): undetermined, not an error.
    #[test]
    fn app_k1_fit_is_undetermined_on_one_distinct_x(x in -50.0f64..=50.0, ys in prop::collection::vec(-9.0f64..0.0, 1..=4)) {
        let xs = vec![x; ys.len()];
        prop_assert_eq!(fit_beta(&xs, &ys).unwrap(), BetaFit::Undetermined);
    }

    /// β-accuracy counts determined prompts with `β̂ ≥ 0`, ignoring undetermined ones.
    #[test]
    fn app_k1_beta_accuracy_is_fraction_of_nonnegative_fits(slopes in prop::collection::vec(prop::option::of(-3.0f64..3.0), 1..=32)) {
        let fits: Vec<BetaFit> = slopes.iter().map(|s| match s {
            Some(b) => determined(fit_beta(&[0.0, 1.0], &[0.0, *b]).unwrap()).into_fit(),
            None => BetaFit::Undetermined,
        }).collect();
        let det: Vec<f64> = slopes.iter().flatten().cloned().collect();
        match beta_accuracy(&fits) {
            Ok(acc) => {
                prop_assert_eq!(acc.determined, det.len());
                prop_assert_eq!(acc.undetermined, slopes.len() - det.len());
                let want = det.iter().filter(|&&b| b >= 0.0).count() as f64 / det.len() as f64;
                prop_assert_eq!(acc.accuracy, want);
            }
            Err(e) => {
                prop_assert!(det.is_empty());
                prop_assert!(matches!(e, Error::Undetermined(_)));
            }
        }
    }
}

trait IntoFit {
    fn into_fit(self) -> BetaFit;
}
impl IntoFit for difinfo::fit::LinearFit {
    fn into_fit(self) -> BetaFit {
        BetaFit::Determined(self)
    }
}

proptest! {
    #![proptest_config(config(64, "proptest-regressions/app_k1.txt"))]

    /// On a converged estimator (`π̂` from the population loss, `‖∇L‖ < GRAD_TOL`), the fit over
    /// every outcome gives `β̂ = 1 ≥ 0` with `R² = 1` to 1e-6 (logits within ~1e-6 of the optimum,
    /// see `GRAD_TOL`), and 4-sample fits on distinct outcomes agree.
    #[test]
    fn app_k1_converged_estimator_has_beta_one(
        (f, g) in (4usize..=MAX_OPT_OUTCOMES).prop_flat_map(|n| (moderate_logits(n), moderate_logits(n))),
    ) {
        let pi = Policy::from_logits(&f).unwrap();
        let pi_ref = Policy::from_logits(&g).unwrap();
        let m = minimize(&g, &pi, &pi_ref, None, &Objective::dpo(1.0).unwrap().reference_free().unwrap(), 1.5);
        prop_assert!(m.grad_norm < GRAD_TOL);
        let pi_hat = Policy::from_logits(&m.logits).unwrap();
        let x: Vec<f64> = pi.log_probs().iter().zip(pi_ref.log_probs()).map(|(a, b)| a - b).collect();
        let spread = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - x.iter().cloned().fold(f64::INFINITY, f64::min);
        prop_assume!(spread > 1e-2);
        let fit = determined(fit_beta(&x, pi_hat.log_probs()).unwrap());
        prop_assert!((fit.slope - 1.0).abs() < 1e-6 / spread, "{:?}", fit);
        prop_assert!(fit.r_squared > 1.0 - 1e-9);
        // And the DID itself is the β = 1 line exactly up to rounding.
        let q = did(&pi, &pi_ref).unwrap();
        let exact = determined(fit_beta(&x, q.log_probs()).unwrap());
        prop_assert!((exact.slope - 1.0).abs() < 1e-12 / spread.min(1.0));
    }
}
