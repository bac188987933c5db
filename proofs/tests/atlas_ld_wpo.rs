//! Loss atlas, TRL's LD-DPO and WPO modifiers (`src/loss.rs`: `length_desensitized`,
//! `wpo_weight`, `batch_loss`):
//!
//! ```text
//! LD-DPO  log π(y) = shared + α · verbose        α = 1: DPO's plain sum, for every loss type
//! WPO     w(y) = exp((1/|y|) Σ_t (log π(y_t) − log Σ_v π(v)²))
//!         E_{y_t ~ π}[π(y_t) / Σ_v π(v)²] = Σ_v π(v)² / Σ_v π(v)² = 1   (on-policy mean 1)
//!         L = mean_i w(y_w,i) w(y_l,i) ℓ(pair i)   (unit weights: the unweighted loss)
//! ```
//!
//! Numeric in `f64`: α = 1 and unit weights are compared exactly (the texts multiply by 1.0
//! and add, which rounds nothing); the on-policy mean within `1e-12` (a sum of at most
//! [`MAX_OUTCOMES`] terms of size ≤ 1, each rounded at ~1e-16 relative).

use difinfo::logspace::{log_softmax, log_sum_exp};
use difinfo::loss::{batch_loss, length_desensitized, wpo_weight};
use difinfo::objective::{LossType, Objective, ObjectiveSpec};
use difinfo::reward::side;
use difinfo::scalar::infallible;
use difinfo_proofs::*;
use proptest::prelude::*;

/// Summed completion log-probs of one side's two parts (a few tokens of log-prob ≥ −20 each).
fn part() -> impl Strategy<Value = f64> {
    -60.0f64..0.0
}

/// Every loss type that reads no batch order (the `aot` pair sorts; with one pair it is the
/// identity, kept in).
fn loss_type() -> impl Strategy<Value = LossType> {
    prop::sample::select(LossType::ALL.to_vec())
}

fn objective(t: LossType, beta: f64, ld_alpha: Option<f64>, use_weighting: bool) -> Objective {
    Objective::new(ObjectiveSpec {
        loss_type: vec![t],
        beta,
        label_smoothing: if t == LossType::ExoPair { 1e-3 } else { 0.0 },
        ld_alpha,
        use_weighting: use_weighting && !matches!(t, LossType::Aot | LossType::AotUnpaired),
        ..ObjectiveSpec::default()
    })
    .expect("a valid objective")
}

proptest! {
    /// α = 1 weighs the verbose tokens like the shared ones: the loss of every loss type is
    /// DPO's on the plain sums, exactly.
    #[test]
    fn atlas_ld_wpo_ld_alpha_one_is_the_plain_loss(
        t in loss_type(),
        beta in 0.01f64..2.0,
        (cs, cv, rs, rv) in (part(), part(), part(), part()),
        (ref_c, ref_r) in (part(), part()),
        (nc, nr) in (1.0f64..40.0, 1.0f64..40.0),
    ) {
        let ld = objective(t, beta, Some(1.0), false);
        let plain = objective(t, beta, None, false);
        let c_ld = infallible(length_desensitized(&cs, &cv, 1.0));
        let r_ld = infallible(length_desensitized(&rs, &rv, 1.0));
        let l_ld = infallible(batch_loss(
            &ld,
            &infallible(side(&ld, c_ld, Some(ref_c), nc.round())).with_nll_logps(cs + cv),
            &infallible(side(&ld, r_ld, Some(ref_r), nr.round())).with_nll_logps(rs + rv),
        ));
        let l = infallible(batch_loss(
            &plain,
            &infallible(side(&plain, cs + cv, Some(ref_c), nc.round())),
            &infallible(side(&plain, rs + rv, Some(ref_r), nr.round())),
        ));
        prop_assert_eq!(l_ld.loss, l.loss);
        prop_assert_eq!(l_ld.chosen_rewards, l.chosen_rewards);
    }

    /// α = 0 keeps the shared part only, and the LD log-prob is affine in α between the
    /// shared part and the plain sum.
    #[test]
    fn atlas_ld_wpo_ld_interpolates_shared_and_plain(
        (shared, verbose) in (part(), part()),
        alpha in 0.0f64..=1.0,
    ) {
        prop_assert_eq!(infallible(length_desensitized(&shared, &verbose, 0.0)), shared);
        let l = infallible(length_desensitized(&shared, &verbose, alpha));
        let want = (1.0 - alpha) * shared + alpha * (shared + verbose);
        prop_assert!((l - want).abs() <= 1e-12 * (1.0 + shared.abs() + verbose.abs()));
    }

    /// WPO's per-token weight `π(y_t) / Σ_v π(v)²` is positive with mean 1 when `y_t ~ π`
    /// (the normalization TRL's `log_sum_sq_probs` makes).
    #[test]
    fn atlas_ld_wpo_wpo_weight_is_positive_with_mean_one_on_policy(
        logits in prop::collection::vec(-10.0f64..10.0, MIN_OUTCOMES..=MAX_OUTCOMES),
    ) {
        let lp = log_softmax(&logits);
        let sq: Vec<f64> = lp.iter().map(|l| 2.0 * l).collect();
        let log_sum_sq = log_sum_exp(&sq);
        let mut mean = 0.0;
        for l in &lp {
            let w = infallible(wpo_weight(&(l - log_sum_sq), &1.0));
            prop_assert!(w > 0.0);
            mean += l.exp() * w;
        }
        prop_assert!((mean - 1.0).abs() < 1e-12, "on-policy mean {mean}");
    }

    /// Each pair's loss is multiplied by `w(y_w) w(y_l)`; unit weights change nothing.
    #[test]
    fn atlas_ld_wpo_wpo_scales_each_pair_loss(
        t in loss_type(),
        beta in 0.01f64..2.0,
        (c, r, ref_c, ref_r) in (part(), part(), part(), part()),
        (ac, ar) in (-30.0f64..5.0, -30.0f64..5.0),
        (nc, nr) in (1.0f64..40.0, 1.0f64..40.0),
    ) {
        prop_assume!(!matches!(t, LossType::Aot | LossType::AotUnpaired));
        let o = objective(t, beta, None, true);
        let (nc, nr) = (nc.round(), nr.round());
        let cs = infallible(side(&o, c, Some(ref_c), nc));
        let rs = infallible(side(&o, r, Some(ref_r), nr));
        let plain = infallible(batch_loss(&o, &cs, &rs)).loss;
        let (wc, wr) = (infallible(wpo_weight(&ac, &nc)), infallible(wpo_weight(&ar, &nr)));
        let weighted = infallible(batch_loss(
            &o,
            &cs.clone().with_weight(wc),
            &rs.clone().with_weight(wr),
        ))
        .loss;
        prop_assert!((weighted - wc * wr * plain).abs() <= 1e-12 * (1.0 + plain.abs()));
        let unit = infallible(batch_loss(&o, &cs.with_weight(1.0), &rs.with_weight(1.0))).loss;
        prop_assert_eq!(unit, plain);
    }
}
