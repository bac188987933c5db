//! Appendix G: the temperature-relaxed log-margin ordering. With the power law `Δ2 = β Δ1` true,
//! the `γ`-scaled margins `σ(γΔ1)`, `σ(γΔ2)` saturate together on every pair once `γ` is large
//! enough: `γ ≥ T / min_{Δ>0} min(Δ1, Δ2)` with `T = logit(1 − ε)`. For `β ≠ 1` there is a band of
//! smaller `γ` where one margin saturates and the other does not, which is why the relaxation
//! needs "γ large enough".

use difinfo::power_law::log_margin_ordering;
use difinfo::rejected::ideal_rejected;
use difinfo::Policy;
use difinfo_proofs::*;
use proptest::prelude::*;

const EPS: f64 = 1e-3;
/// Margins below this are treated as ties and left out of the pair set: float margins carry
/// ~1e-13 of rounding, so a smaller one has no reliable sign.
const TIE: f64 = 1e-9;

fn instance() -> impl Strategy<Value = (Policy, Policy, f64)> {
    (2usize..=64)
        .prop_flat_map(|n| {
            (
                logits_n(n),
                logits_n(n),
                prop::sample::select(vec![0.25, 0.5, 1.0, 2.0, 3.0]),
            )
        })
        .prop_map(|(a, b, beta)| {
            (
                Policy::from_logits(&a).unwrap(),
                Policy::from_logits(&b).unwrap(),
                beta,
            )
        })
}

/// Ordered pairs whose `|Δ1|` is above [`TIE`].
fn untied_pairs(pi_star: &Policy, pi_ref: &Policy) -> Vec<(usize, usize)> {
    let n = pi_ref.len();
    let d = |y: usize| pi_star.log_probs()[y] - pi_ref.log_probs()[y];
    (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .filter(|&(a, b)| a != b && (d(a) - d(b)).abs() > TIE)
        .collect()
}

proptest! {
    #![proptest_config(config(192, "proptest-regressions/thm_g.txt"))]

    #[test]
    fn thm_g_power_law_gives_ordering_for_large_gamma((pi_ref, pi_star, beta) in instance()) {
        let pi_l = ideal_rejected(&pi_ref, &pi_star, beta).unwrap();
        let pairs = untied_pairs(&pi_star, &pi_ref);
        prop_assume!(!pairs.is_empty());
        let probe = log_margin_ordering(&pi_star, &pi_ref, &pi_l, &pairs, 1.0, EPS).unwrap();
        prop_assert!(probe.signs_agree);
        let min_pos = probe.pairs.iter()
            .filter(|p| p.delta1 > 0.0)
            .map(|p| p.delta1.min(p.delta2))
            .fold(f64::INFINITY, f64::min);
        let t = ((1.0 - EPS) / EPS).ln();
        let gamma_star = t / min_pos;
        prop_assume!(gamma_star.is_finite() && gamma_star < 1e300);
        for k in [1.0 + 1e-9, 2.0, 10.0, 1e3] {
            let r = log_margin_ordering(&pi_star, &pi_ref, &pi_l, &pairs, gamma_star * k, EPS).unwrap();
            prop_assert!(r.ordering_holds, "γ = {} γ*", k);
        }
    }

    /// For `β ≠ 1` the band exists: at `γ = T/Δ_big` (just saturating the larger of the two
    /// margins on some pair) the smaller one does not saturate.
    #[test]
    fn thm_g_beta_not_one_has_a_band_of_gamma_without_ordering(
        (pi_ref, pi_star, _) in instance(),
        beta in prop::sample::select(vec![0.25, 0.5, 2.0, 3.0]),
    ) {
        let pi_l = ideal_rejected(&pi_ref, &pi_star, beta).unwrap();
        let pairs = untied_pairs(&pi_star, &pi_ref);
        let probe = log_margin_ordering(&pi_star, &pi_ref, &pi_l, &pairs, 1.0, EPS).unwrap();
        // A pair whose two margins are both well above rounding.
        let Some(p) = probe.pairs.iter().find(|p| p.delta1 > 1e-3 && p.delta2 > 1e-3) else {
            return Ok(());
        };
        let t = ((1.0 - EPS) / EPS).ln();
        let big = p.delta1.max(p.delta2);
        let gamma = t / big * (1.0 + 1e-6);
        let r = log_margin_ordering(&pi_star, &pi_ref, &pi_l, &[(p.y_w, p.y_l)], gamma, EPS).unwrap();
        prop_assert!(!r.ordering_holds, "{:?}", r);
    }
}
