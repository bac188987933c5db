//! Every loss type of TRL's `DPOTrainer`, as the trainer computes it (the library's one text,
//! on candle tensors), pinned to TRL's formulas on fixed inputs; candle's gradients of those
//! tensor losses against finite differences; the DPO-PG projection on the trainer's gradient
//! set against Theorems H.4 and H.5.
//!
//! The expected numbers were produced by TRL 1.16's formulas (`trl/trainer/dpo_trainer.py`,
//! `DPOTrainer._compute_loss`) re-typed in float64 PyTorch, on a batch of three pairs:
//!
//! ```python
//! import math, torch
//! import torch.nn.functional as F
//! t = lambda v: torch.tensor(v, dtype=torch.float64)
//! c, r = t([-12.5, -30.25, -7.0]), t([-14.0, -28.5, -9.75])      # policy, summed log-probs
//! rc, rr = t([-13.0, -29.0, -8.5]), t([-15.0, -28.0, -8.5])      # reference
//! nc, nr = t([5.0, 12.0, 3.0]), t([6.0, 10.0, 4.0])              # completion tokens
//! beta, eps, tau = 0.5, 0.1, 0.05
//! cu, ru = c - rc, r - rr                                        # log-ratios
//! def scores(f, a=0.5):
//!     if f == "reverse_kl": return cu, ru
//!     if f == "forward_kl": return 1 - torch.exp(-cu), 1 - torch.exp(-ru)
//!     if f == "js_divergence": return math.log(2) + F.logsigmoid(cu), math.log(2) + F.logsigmoid(ru)
//!     if f == "alpha_divergence":
//!         k = 1 / (a - 1)
//!         return (torch.exp((a - 1) * cu) - 1) * k, (torch.exp((a - 1) * ru) - 1) * k
//! def loss(kind, f="reverse_kl", e=eps):
//!     cs, rs = scores(f)
//!     z = beta * (cs - rs)
//!     if kind == "sigmoid": return -F.logsigmoid(z)
//!     if kind == "sigmoid_eps": return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
//!     if kind == "hinge": return torch.relu(1 - z)
//!     if kind == "ipo": return (cs / nc - rs / nr - 1 / (2 * beta)) ** 2
//!     if kind == "exo_pair":
//!         e = torch.tensor(1e-3, dtype=torch.float64)
//!         return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e))
//!                 + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(e)))
//!     if kind == "nca_pair":
//!         a, b = beta * cu, beta * ru
//!         return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
//!     if kind == "robust": return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
//!     if kind == "bco_pair": return -F.logsigmoid(beta * cu) - F.logsigmoid(-beta * ru)
//!     if kind == "sppo_hard": return (cu - 0.5 / beta) ** 2 + (ru + 0.5 / beta) ** 2
//!     if kind == "aot":
//!         dd = torch.sort(c - r).values - torch.sort(rc - rr).values
//!         return -F.logsigmoid(beta * dd) * (1 - e) - F.logsigmoid(-beta * dd) * e
//!     if kind == "aot_unpaired":
//!         dd = torch.sort(cu).values - torch.sort(ru).values
//!         return -F.logsigmoid(beta * dd) * (1 - e) - F.logsigmoid(-beta * dd) * e
//!     if kind == "apo_zero": return 1 - torch.sigmoid(beta * cu) + torch.sigmoid(beta * ru)
//!     if kind == "apo_down": return torch.sigmoid(beta * cu) + 1 - torch.sigmoid(beta * (cu - ru))
//!     if kind == "discopop":
//!         m = torch.sigmoid(z / tau)
//!         return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
//!     if kind == "sft": return (-c.sum() / nc.sum()).expand(3)
//!     if kind == "sigmoid_norm": return -F.logsigmoid(beta * (cs / nc - rs / nr))
//! print(loss(kind).mean().item())          # for each kind; loss(kind, f) for the f-divergences
//! ```
//!
//! The policy margins `c − r` and the reference margins `rc − rr` are ordered differently, so
//! AOT's sorting changes its value. Some values are checked by hand as well: `hinge` is
//! `mean(relu(1 − 0.5 (Δ)))` with `Δ = (0.5 − 1, −1.25 + 0.5, 1.5 + 1.25) = (−0.5, −0.75, 2.75)`
//! → `(1.25 + 1.375 + 0) / 3 = 0.875`; `sft` is `49.75 / 20 = 2.4875`; `sppo_hard` is
//! `mean((cu − 1)² + (ru + 1)²) = ((0.25 + 4) + (5.0625 + 0.25) + (0.25 + 0.0625)) / 3 = 3.291666…`.
//!
//! TRL 1.x's `bco_pair` has no running reward mean (TRL 0.x's `RunningMoments` δ is gone), so
//! the loss carries no state across steps and nothing extra is checkpointed.

use candle_core::{DType, Device, Tensor, Var, D};
use difinfo::loss::batch_loss;
use difinfo::objective::{FDivergence, LossType, Objective, ObjectiveSpec};
use difinfo::reward::side;
use difinfo::scalar::{infallible, Batch};
use difinfo_trainer::train::grads::{project, Grads};
use difinfo_trainer::train::objective::preference_loss;
use difinfo_trainer::train::SeqLogps;
use proptest::prelude::*;

const C: [f64; 3] = [-12.5, -30.25, -7.0];
const R: [f64; 3] = [-14.0, -28.5, -9.75];
const RC: [f64; 3] = [-13.0, -29.0, -8.5];
const RR: [f64; 3] = [-15.0, -28.0, -8.5];
const NC: [f64; 3] = [5.0, 12.0, 3.0];
const NR: [f64; 3] = [6.0, 10.0, 4.0];
const BETA: f64 = 0.5;
const EPS: f64 = 0.1;

/// f64 tensor arithmetic against float64 PyTorch: a few ulps of values ≤ 10.
const TOL_F64: f64 = 1e-13;

fn t(v: &[f64], dt: DType) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn spec(loss_type: &[LossType]) -> ObjectiveSpec {
    ObjectiveSpec {
        beta: BETA,
        loss_type: loss_type.to_vec(),
        ..Default::default()
    }
}

/// `loss_type` with β and label smoothing `eps`.
fn smoothed(loss_type: &[LossType], eps: f64) -> Objective {
    Objective::new(ObjectiveSpec {
        label_smoothing: eps,
        ..spec(loss_type)
    })
    .unwrap()
}

/// The trainer's loss of the pinned batch (policy log-probs `c`, `r`).
fn trainer_loss(o: &Objective, c: &Tensor, r: &Tensor, dt: DType) -> Tensor {
    let chosen = SeqLogps::from_sums(c, &t(&NC, dt)).unwrap();
    let rejected = SeqLogps::from_sums(r, &t(&NR, dt)).unwrap();
    let (rc, rr) = (t(&RC, dt), t(&RR, dt));
    preference_loss(o, &chosen, &rejected, Some((&rc, &rr)))
        .unwrap()
        .loss
}

fn value(o: &Objective) -> f64 {
    let l = trainer_loss(o, &t(&C, DType::F64), &t(&R, DType::F64), DType::F64);
    l.to_scalar::<f64>().unwrap()
}

/// `(loss types, label smoothing, TRL's mean loss)`.
fn pinned() -> Vec<(Vec<LossType>, f64, f64)> {
    use LossType::*;
    vec![
        (vec![Sigmoid], 0.0, 0.6498251118734438),
        (vec![Sigmoid], EPS, 0.674825111873444),
        (vec![Hinge], 0.0, 0.875),
        (vec![Ipo], 0.0, 0.761400462962963),
        (vec![ExoPair], 1e-3, 2.5029732091776755),
        (vec![NcaPair], 0.0, 1.4005417325243759),
        (vec![Robust], EPS, 0.6185751118734438),
        (vec![BcoPair], 0.0, 1.331742728868577),
        (vec![SppoHard], 0.0, 3.2916666666666665),
        (vec![Aot], EPS, 0.6277058447981935),
        (vec![AotUnpaired], EPS, 0.6060545282062986),
        (vec![ApoZero], 0.0, 0.9396425434182886),
        (vec![ApoDown], 0.0, 0.9822188861651279),
        (vec![Discopop], 0.0, 0.6600920019759036),
        (vec![Sft], 0.0, 2.4875),
        (vec![SigmoidNorm], 0.0, 0.6424150011368361),
    ]
}

/// Every loss type at TRL's value (and so the library's text behind the trainer).
#[test]
fn every_loss_type_equals_trl_formula() {
    for (types, eps, want) in pinned() {
        let o = smoothed(&types, eps);
        let got = value(&o);
        assert!(
            (got - want).abs() <= TOL_F64,
            "{}: {got} vs TRL {want}",
            o.label()
        );
        // The same text over the library's host batch of f64 (the population code's number).
        let b = |v: &[f64]| Batch(v.to_vec());
        let c = infallible(side(&o, b(&C), Some(b(&RC)), b(&NC)));
        let r = infallible(side(&o, b(&R), Some(b(&RR)), b(&NR)));
        let host = infallible(batch_loss(&o, &c, &r)).loss.0[0];
        assert!((host - want).abs() <= TOL_F64, "{}: {host}", o.label());
    }
}

/// The f-divergence scores (TRL 1.16's `1 − e^{−u}`, `log 2 + log σ(u)`,
/// `(e^{(α−1)u} − 1)/(α − 1)` with α = 0.5) under `sigmoid` and `ipo`.
#[test]
fn f_divergences_equal_trl_formula() {
    for (f, sigmoid, ipo) in [
        (
            FDivergence::ForwardKl,
            0.7296387600951889,
            0.7912419440125857,
        ),
        (
            FDivergence::JsDivergence,
            0.6626393388761714,
            0.8404524142096045,
        ),
        (
            FDivergence::AlphaDivergence,
            0.6771831787164304,
            0.7721849369211408,
        ),
    ] {
        for (ty, want) in [(LossType::Sigmoid, sigmoid), (LossType::Ipo, ipo)] {
            let o = Objective::new(ObjectiveSpec {
                f_divergence_type: f,
                ..spec(&[ty])
            })
            .unwrap();
            let got = value(&o);
            assert!((got - want).abs() <= TOL_F64, "{f:?} {ty}: {got} vs {want}");
        }
    }
}

/// TRL's `loss_weights`: `Σ_k w_k mean ℓ_k` (MPO-style combinations), and RPO's `rpo_alpha`
/// as the `sft` term: `0.6498… + 0.5 · 2.4875`.
#[test]
fn weighted_combinations_add_the_pinned_terms() {
    let o = Objective::new(ObjectiveSpec {
        loss_weights: Some(vec![0.8, 0.2, 1.0]),
        ..spec(&[LossType::Sigmoid, LossType::BcoPair, LossType::Sft])
    })
    .unwrap();
    let want = 0.8 * 0.6498251118734438 + 0.2 * 1.331742728868577 + 2.4875;
    assert!((value(&o) - want).abs() <= TOL_F64);
    let rpo = Objective::new(ObjectiveSpec {
        rpo_alpha: Some(0.5),
        ..spec(&[LossType::Sigmoid])
    })
    .unwrap();
    let want = 0.6498251118734438 + 0.5 * 2.4875;
    assert!((value(&rpo) - want).abs() <= TOL_F64);
}

/// TRL's logged metrics of the pinned batch: `rewards/chosen = β mean(cu) = 0.5 · 0.25`,
/// `rewards/rejected = β mean(ru) = 0.5 · (1 − 0.5 − 1.25)/3`, one pair in three with the
/// chosen reward above the rejected (`0.75 > −0.625`), the summed log-probs' means.
#[test]
fn logged_metrics_are_trl_metrics() {
    let o = Objective::new(spec(&[LossType::Ipo])).unwrap();
    let chosen = SeqLogps::from_sums(&t(&C, DType::F64), &t(&NC, DType::F64)).unwrap();
    let rejected = SeqLogps::from_sums(&t(&R, DType::F64), &t(&NR, DType::F64)).unwrap();
    let (rc, rr) = (t(&RC, DType::F64), t(&RR, DType::F64));
    let m = preference_loss(&o, &chosen, &rejected, Some((&rc, &rr)))
        .unwrap()
        .metrics()
        .unwrap();
    let near = |a: f64, b: f64| (a - b).abs() < 1e-14 * (1.0 + b.abs());
    assert!(near(m.rewards_chosen, 0.125), "{m:?}");
    assert!(near(m.rewards_rejected, -0.125), "{m:?}");
    assert!(near(m.rewards_margins, 0.25), "{m:?}");
    assert!(near(m.rewards_accuracies, 1.0 / 3.0), "{m:?}");
    assert!(near(m.logps_chosen, -49.75 / 3.0), "{m:?}");
    assert!(near(m.logps_rejected, -52.25 / 3.0), "{m:?}");
    assert_eq!(m.nll_loss, None);
}

/// A hand-checked case: equal log-ratio margins give the loss at 0 (`ln 2`, `1`,
/// `(1/(2·0.1))² = 25`).
#[test]
fn zero_margin_values() {
    let z = t(&[-3.0, -5.0], DType::F64);
    let s = SeqLogps::from_sums(&z, &t(&[1.0, 1.0], DType::F64)).unwrap();
    for (ty, want) in [
        (LossType::Sigmoid, std::f64::consts::LN_2),
        (LossType::Hinge, 1.0),
        (LossType::Ipo, 25.0),
    ] {
        let o = Objective::loss(ty, 0.1).unwrap();
        let out = preference_loss(&o, &s, &s, Some((&z, &z))).unwrap();
        let m = out.metrics().unwrap();
        assert!((m.loss - want).abs() < 1e-12, "{ty}: {}", m.loss);
        assert_eq!(m.rewards_margins, 0.0);
        assert_eq!(m.rewards_accuracies, 0.0);
    }
}

/// candle's gradient of every tensor loss (through `sort`, `minimum`, `sigmoid`, `relu`, …)
/// equals central finite differences of the same tensor loss: no op drops or bends a
/// gradient.
#[test]
fn tensor_gradients_match_finite_differences() {
    let mut cases: Vec<Objective> = pinned()
        .into_iter()
        .map(|(types, eps, _)| smoothed(&types, eps))
        .collect();
    for f in [FDivergence::ForwardKl, FDivergence::AlphaDivergence] {
        cases.push(
            Objective::new(ObjectiveSpec {
                f_divergence_type: f,
                ..spec(&[LossType::Sigmoid])
            })
            .unwrap(),
        );
    }
    for o in cases {
        let vc = Var::from_tensor(&t(&C, DType::F64)).unwrap();
        let vr = Var::from_tensor(&t(&R, DType::F64)).unwrap();
        let l = trainer_loss(&o, vc.as_tensor(), vr.as_tensor(), DType::F64);
        let g = l.backward().unwrap();
        // No gradient: the loss does not read that side (sft reads the chosen only).
        let grad = |v: &Var| {
            g.get(v.as_tensor())
                .map_or(vec![0.0; 3], |x| x.to_vec1::<f64>().unwrap())
        };
        let (gc, gr) = (grad(&vc), grad(&vr));
        let h = 1e-6;
        for i in 0..3 {
            for (which, got) in [(0, gc[i]), (1, gr[i])] {
                let at = |d: f64| {
                    let (mut c, mut r) = (C, R);
                    if which == 0 {
                        c[i] += d;
                    } else {
                        r[i] += d;
                    }
                    trainer_loss(&o, &t(&c, DType::F64), &t(&r, DType::F64), DType::F64)
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (got - fd).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{} ∂/∂{}[{i}]: {got} vs {fd}",
                    o.label(),
                    ["chosen", "rejected"][which]
                );
            }
        }
    }
}

/// f32 tensors (the trainer's dtype) agree with the f64 values to f32 precision.
#[test]
fn f32_values_agree_with_f64() {
    for (types, eps, want) in pinned() {
        let o = smoothed(&types, eps);
        let got = trainer_loss(&o, &t(&C, DType::F32), &t(&R, DType::F32), DType::F32)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{}: {got} vs {want}",
            o.label()
        );
    }
}

proptest! {
    /// The projection on the trainer's gradient set (the library's text, with the fused
    /// kernels' inner product and update) equals it on the concatenated vectors, and obeys
    /// Theorems H.4 (`⟨g, g_w⟩ ≥ 0`) and H.5 (`⟨g, g_l⟩ ≤ 0`).
    #[test]
    fn projection_on_the_gradient_set(
        sizes in prop::collection::vec(1usize..6, 1..5),
        seed_w in prop::collection::vec(-1.0f64..1.0, 30),
        seed_l in prop::collection::vec(-1.0f64..1.0, 30),
        flip in any::<bool>(),
    ) {
        let total: usize = sizes.iter().sum();
        let gw: Vec<f64> = (0..total).map(|i| seed_w[i % 30] * (1.0 + i as f64 / 7.0)).collect();
        let gl: Vec<f64> = (0..total).map(|i| if flip { -gw[i] * 0.5 + seed_l[i % 30] * 0.1 } else { seed_l[i % 30] }).collect();
        let split = |v: &[f64]| -> Grads {
            let mut off = 0;
            Grads(sizes.iter().map(|&s| { let x = t(&v[off..off + s], DType::F64); off += s; x }).collect())
        };
        let (g, stats) = project(&split(&gw), &split(&gl)).unwrap();
        let lib = difinfo::dpo_pg::project::<Vec<f64>>(&gw, &gl).unwrap();
        let flat: Vec<f64> = g.0.iter().flat_map(|x| x.to_vec1::<f64>().unwrap()).collect();
        prop_assert_eq!(stats.active, lib.active);
        prop_assert!((stats.dot - lib.dot).abs() <= 1e-12 * (1.0 + lib.dot.abs()));
        for (a, b) in flat.iter().zip(&lib.gradient) {
            prop_assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let gg = Grads(g.0.clone());
        prop_assert!(gg.dot(&split(&gw)).unwrap() >= -1e-12);
        prop_assert!(gg.dot(&split(&gl)).unwrap() <= 1e-12);
    }
}

// ------------------------------------------------------- end to end, with TRL's `ref_model`

mod common;

mod cli {
    use std::path::{Path, PathBuf};

    use super::common::jsonl;
    use std::process::Command;

    use difinfo::loss::batch_loss;
    use difinfo::objective::{LossType, Objective, ObjectiveSpec};
    use difinfo::reward::side;
    use difinfo::scalar::{infallible, Batch};

    fn bin() -> Command {
        Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
    }

    fn run(args: &[&str]) {
        let o = bin().args(args).output().expect("run difinfo-train");
        assert!(
            o.status.success(),
            "difinfo-train {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `(summed log-probs, completion tokens)` of the chosen and of the rejected, per pair.
    type Logps = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

    fn logps(model: &Path, data: &Path, out: &Path) -> Logps {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        run(&[
            "logps",
            "--model",
            &s(model),
            "--data",
            &s(data),
            "--out",
            &s(out),
            "--dtype",
            "f64",
            "--batch-size",
            "64",
        ]);
        let rows = jsonl(out);
        let f = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).collect();
        let n = |k: &str| {
            rows.iter()
                .map(|r| r[k].as_array().unwrap().len() as f64)
                .collect()
        };
        (
            f("chosen_logps"),
            n("chosen_ids"),
            f("rejected_logps"),
            n("rejected_ids"),
        )
    }

    /// `dpo --sync-ref-model` end to end: the reference is the policy's checkpoint loaded
    /// again, synced after every step, saved in each checkpoint; a run stopped after step 1
    /// and resumed to step 3 logs what the uninterrupted run logs, and the reference's weights
    /// at step 3 agree; the refusals name the option to change.
    #[test]
    fn sync_ref_model_runs_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let model = super::common::tiny_model(d);
        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let args = |run: &Path, steps: &str| -> Vec<String> {
            [
                "dpo",
                "--model",
                &s(&model),
                "--data",
                &s(&data),
                "--output-dir",
                &s(run),
                "--max-steps",
                steps,
                "--per-device-train-batch-size",
                "6",
                "--learning-rate",
                "1e-3",
                "--logging-steps",
                "1",
                "--save-steps",
                "1",
                "--sync-ref-model",
                "--precompute-ref-log-probs",
                "false",
                "--ref-model-sync-steps",
                "1",
                "--ref-model-mixup-alpha",
                "0.6",
                "--ld-alpha",
                "0.5",
                "--use-weighting",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect()
        };
        fn strs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let (a, b) = (d.join("straight"), d.join("resumed"));
        run(&strs(&args(&a, "3")));
        run(&strs(&args(&b, "1")));
        run(&["dpo", "--resume", &s(&b), "--max-steps", "3"]);
        assert_eq!(
            super::common::metrics_without_timing(&a),
            super::common::metrics_without_timing(&b)
        );
        let read = |p: PathBuf| std::fs::read(p).unwrap();
        assert_eq!(
            read(a.join("checkpoint-3/ref_model.safetensors")),
            read(b.join("checkpoint-3/ref_model.safetensors"))
        );
        assert_ne!(
            read(a.join("checkpoint-1/ref_model.safetensors")),
            read(a.join("checkpoint-3/ref_model.safetensors"))
        );
        let refused = |extra: &[&str]| -> String {
            let owned = args(&d.join("refused"), "1");
            let mut v = strs(&owned);
            v.extend_from_slice(extra);
            let o = bin().args(&v).output().unwrap();
            assert!(!o.status.success(), "{extra:?} was accepted");
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        assert!(refused(&["--precompute-ref-log-probs", "true"]).contains("precompute"));
        assert!(refused(&["--use-peft"]).contains("use_peft"));
        let e = bin()
            .args(["dpo", "--model", &s(&model), "--data", &s(&data)])
            .args([
                "--output-dir",
                &s(&d.join("x")),
                "--ref-model-sync-steps",
                "2",
            ])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&e.stderr);
        assert!(
            e.contains("--ref-model-sync-steps 2") && e.contains("sync_ref_model"),
            "{e}"
        );
    }

    /// `difinfo-train dpo --loss-type <each type> --ref-model R` on a tiny policy `P` and a
    /// different tiny reference `R`: the loss of step 1 (before any update, the whole dataset
    /// in one batch) equals the loss of TRL's formula — the library's text, pinned to TRL above —
    /// on the two models' own log-probs (`difinfo-train logps` of each); so do the logged
    /// rewards, which read the reference. The reference's log-probs are cached under a key of
    /// its weights: another reference, another cache file.
    #[test]
    fn every_loss_type_with_a_separate_reference_model() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The first 12 pairs of the example data (one batch; keeps 17 runs quick).
        let all = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl");
        let data = d.join("prefs.jsonl");
        let text = std::fs::read_to_string(all).unwrap();
        let lines: Vec<&str> = text.lines().take(12).collect();
        std::fs::write(&data, lines.join("\n") + "\n").unwrap();
        let (p, r) = (d.join("policy"), d.join("reference"));
        let s = |p: &Path| p.to_str().unwrap().to_string();
        for (m, seed) in [(&p, "1"), (&r, "2")] {
            run(&["init", "--size", "tiny", "--out", &s(m), "--seed", seed]);
        }
        let (c, nc, rj, nr) = logps(&p, &data, &d.join("p.jsonl"));
        let (rc, _, rr, _) = logps(&r, &data, &d.join("r.jsonl"));
        assert!(
            c.iter().zip(&rc).all(|(a, b)| (a - b).abs() > 1e-3),
            "the two models must differ"
        );
        let beta = 0.5;
        let cache = d.join("cache");
        let mut cases: Vec<(String, Vec<&str>, ObjectiveSpec)> = LossType::ALL
            .iter()
            .map(|t| {
                let eps = match t {
                    LossType::ExoPair => 1e-3,
                    LossType::Robust | LossType::Aot | LossType::AotUnpaired => 0.1,
                    _ => 0.0,
                };
                (
                    t.name().to_string(),
                    vec![],
                    ObjectiveSpec {
                        beta,
                        loss_type: vec![*t],
                        label_smoothing: eps,
                        ..Default::default()
                    },
                )
            })
            .collect();
        cases.push((
            "sigmoid,bco_pair,sft".into(),
            vec!["--loss-weights", "0.8,0.2,1"],
            ObjectiveSpec {
                beta,
                loss_type: vec![LossType::Sigmoid, LossType::BcoPair, LossType::Sft],
                loss_weights: Some(vec![0.8, 0.2, 1.0]),
                ..Default::default()
            },
        ));
        cases.push((
            "ipo".into(),
            vec!["--f-divergence-type", "alpha_divergence"],
            ObjectiveSpec {
                beta,
                loss_type: vec![LossType::Ipo],
                f_divergence_type: difinfo::objective::FDivergence::AlphaDivergence,
                ..Default::default()
            },
        ));
        for (k, (types, extra, spec)) in cases.into_iter().enumerate() {
            let out = d.join(format!("run-{k}"));
            let eps = spec.label_smoothing.to_string();
            let mut args = vec![
                "dpo".to_string(),
                "--model".into(),
                s(&p),
                "--ref-model".into(),
                s(&r),
                "--data".into(),
                s(&data),
                "--output-dir".into(),
                s(&out),
                "--ref-cache-dir".into(),
                s(&cache),
                "--dtype".into(),
                "f64".into(),
                "--loss-type".into(),
                types.clone(),
                "--beta".into(),
                beta.to_string(),
                "--label-smoothing".into(),
                eps,
                "--per-device-train-batch-size".into(),
                "64".into(),
                "--max-steps".into(),
                "1".into(),
                "--logging-steps".into(),
                "1".into(),
                "--save-steps".into(),
                "0".into(),
                "--max-prompt-length".into(),
                "0".into(),
            ];
            args.extend(extra.iter().map(|x| x.to_string()));
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&a);
            let rec = &jsonl(&out.join("metrics.jsonl"))[0];
            let o = Objective::new(spec).unwrap();
            let b = |v: &[f64]| Batch(v.to_vec());
            let cs = infallible(side(&o, b(&c), Some(b(&rc)), b(&nc)));
            let rs = infallible(side(&o, b(&rj), Some(b(&rr)), b(&nr)));
            let want = infallible(batch_loss(&o, &cs, &rs));
            let got = rec["loss"].as_f64().unwrap();
            assert!(
                (got - want.loss.0[0]).abs() < 1e-9 * (1.0 + got.abs()),
                "{types} {extra:?}: step-1 loss {got} vs {}",
                want.loss.0[0]
            );
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let rw = rec["rewards/chosen"].as_f64().unwrap();
            assert!(
                (rw - mean(&want.chosen_rewards.0)).abs() < 1e-9,
                "{types}: {rw}"
            );
        }
        // One cache file per reference: the runs above shared R's; the default reference (the
        // policy's own starting weights) gets another.
        let out = d.join("run-default-ref");
        run(&[
            "dpo",
            "--model",
            &s(&p),
            "--data",
            &s(&data),
            "--output-dir",
            &s(&out),
            "--ref-cache-dir",
            &s(&cache),
            "--dtype",
            "f64",
            "--per-device-train-batch-size",
            "64",
            "--max-steps",
            "1",
            "--save-steps",
            "0",
            "--max-prompt-length",
            "0",
        ]);
        let files = std::fs::read_dir(&cache).unwrap().count();
        assert_eq!(files, 2, "one reference cache per reference model");
        let rec = &jsonl(&out.join("metrics.jsonl"))[0];
        assert!((rec["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-12);
    }
}

/// LD-DPO (`ld_alpha`) and WPO (`use_weighting`) on per-token log-probs, pinned to TRL 1.16's
/// `_compute_loss` lines (the `comp_pos` / `shared_mask` / `tail_mask` split and the
/// `log_sum_sq_probs` weights) re-typed in float64 PyTorch on a batch of two pairs whose
/// chosen and rejected completions differ in length both ways:
///
/// ```python
/// import torch, torch.nn.functional as F
/// t = lambda v: torch.tensor(v, dtype=torch.float64)
/// # rows: chosen 0, chosen 1, rejected 0, rejected 1 (TRL's concatenated batch)
/// mask = t(MASK); lp = t(POLICY) * mask; ref = t(REFERENCE) * mask; lsq = t(LOG_SUM_SQ) * mask
/// def ld(per_token, alpha):
///     if alpha is None: return per_token.sum(1)
///     comp_pos = mask.cumsum(dim=1); comp_lens = mask.sum(dim=1).long()
///     chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
///     shared_lens = torch.minimum(chosen_lens, rejected_lens)
///     shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
///     shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
///     tail_mask = comp_pos > shared_lens.unsqueeze(1)
///     return (per_token * shared_mask).sum(1) + alpha * (per_token * tail_mask).sum(1)
/// def run(kinds, alpha=None, weighting=False, beta=0.5):
///     c, r = ld(lp, alpha).chunk(2); rc, rr = ld(ref, alpha).chunk(2)
///     cu, ru = c - rc, r - rr
///     loss = 0.0
///     for kind in kinds:
///         if kind == "sigmoid": l = -F.logsigmoid(beta * (cu - ru))
///         if kind == "ipo":
///             cm, rm = mask.chunk(2)
///             l = (cu / cm.sum(1).clamp(min=1.0) - ru / rm.sum(1).clamp(min=1.0) - 1 / (2 * beta)) ** 2
///         if kind == "sft":
///             cm, _ = mask.chunk(2); cl, _ = lp.chunk(2)
///             l = (-cl[cm.bool()].mean()).expand(2)
///         if weighting:
///             w = torch.exp(((lp - lsq) * mask).sum(1) / mask.sum(1).clamp_min(1))
///             cw, rw = w.chunk(2)
///             l = l * cw * rw
///         loss += l.mean()
///     return loss.item(), (beta * cu).mean().item(), (beta * ru).mean().item(), c.mean().item(), r.mean().item()
/// ```
#[test]
fn ld_alpha_and_use_weighting_equal_trl_formula() {
    const MASK: [[f64; 6]; 4] = [
        [0., 1., 1., 1., 1., 0.],
        [0., 0., 1., 1., 0., 0.],
        [0., 1., 1., 0., 0., 0.],
        [0., 0., 1., 1., 1., 1.],
    ];
    const POLICY: [[f64; 6]; 4] = [
        [0., -1.5, -0.25, -2.0, -0.75, 0.],
        [0., 0., -3.0, -0.5, 0., 0.],
        [0., -2.5, -1.0, 0., 0., 0.],
        [0., 0., -0.5, -1.25, -2.25, -0.125],
    ];
    const REFERENCE: [[f64; 6]; 4] = [
        [0., -1.25, -0.5, -1.75, -1.0, 0.],
        [0., 0., -2.5, -0.75, 0., 0.],
        [0., -2.0, -1.5, 0., 0., 0.],
        [0., 0., -0.75, -1.0, -2.0, -0.5],
    ];
    const LOG_SUM_SQ: [[f64; 6]; 4] = [
        [0., -1.0, -0.5, -1.5, -0.625, 0.],
        [0., 0., -2.0, -0.25, 0., 0.],
        [0., -1.75, -0.875, 0., 0., 0.],
        [0., 0., -0.375, -1.125, -1.5, -0.25],
    ];
    let m2 = |v: &[[f64; 6]; 4]| {
        Tensor::from_iter(v.iter().flatten().copied(), &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap()
    };
    let seq = |v: &[[f64; 6]; 4]| {
        let mut s = SeqLogps::from_token_logps(&m2(v), &m2(&MASK)).unwrap();
        s.log_sum_sq = Some((m2(&LOG_SUM_SQ) * m2(&MASK)).unwrap());
        (s.rows(0, 2).unwrap(), s.rows(2, 2).unwrap())
    };
    let (pc, pr) = seq(&POLICY);
    let (rc, rr) = seq(&REFERENCE);
    use LossType::*;
    // (loss types, ld_alpha, use_weighting, TRL's loss, rewards/chosen, rewards/rejected,
    // logps/chosen, logps/rejected)
    /// `(loss types, ld_alpha, use_weighting, TRL's values)`.
    type Case = (&'static [LossType], Option<f64>, bool, [f64; 5]);
    let cases: [Case; 6] = [
        (
            &[Sigmoid],
            Some(0.5),
            false,
            [0.7337340097836067, -0.0625, 0.015625, -3.3125, -3.21875],
        ),
        (
            &[Ipo, Sft],
            Some(0.5),
            false,
            [2.483846028645833, -0.0625, 0.015625, -3.3125, -3.21875],
        ),
        (
            &[Sigmoid],
            Some(0.0),
            false,
            [0.7253731079385572, -0.0625, 0.0, -2.625, -2.625],
        ),
        (
            &[Sigmoid],
            None,
            true,
            [0.34996379116097165, -0.0625, 0.03125, -4.0, -3.8125],
        ),
        (
            &[Sigmoid, Sft],
            None,
            true,
            [0.982555662023606, -0.0625, 0.03125, -4.0, -3.8125],
        ),
        (
            &[Ipo],
            Some(0.25),
            true,
            [0.5353591017312815, -0.0625, 0.0078125, -2.96875, -2.921875],
        ),
    ];
    for (types, ld_alpha, use_weighting, want) in cases {
        let o = Objective::new(ObjectiveSpec {
            ld_alpha,
            use_weighting,
            ..spec(types)
        })
        .unwrap();
        let (refc, refr) = difinfo_trainer::train::objective::pair_logps(&o, &rc, &rr).unwrap();
        let m = preference_loss(&o, &pc, &pr, Some((&refc, &refr)))
            .unwrap()
            .metrics()
            .unwrap();
        let got = [
            m.loss,
            m.rewards_chosen,
            m.rewards_rejected,
            m.logps_chosen,
            m.logps_rejected,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < TOL_F64 * (1.0 + w.abs()),
                "{types:?} ld_alpha {ld_alpha:?} weighting {use_weighting}: {got:?} vs {want:?}"
            );
        }
    }
}

/// WPO's `log Σ_v π(v)²` from the model's chunked head (one forward pass with the log-probs)
/// equals its definition on the full logits, `log Σ_v softmax(z)_v²`, at every completion
/// position, whole-vocabulary chunks or not; the log-probs are the plain head's.
#[test]
fn log_sum_sq_of_the_head_equals_the_full_logits() {
    use difinfo_trainer::batch::Batch;
    use difinfo_trainer::config_json::Architecture;
    let (_dir, mut m) = common::model(common::micro_config(Architecture::Llama), DType::F64, 11);
    let b = Batch::for_training(&common::two_sequences(), 0, &common::device()).unwrap();
    let logits = m.logits(&b.input_ids, Some(&b.attention_mask)).unwrap();
    let l = logits.dim(1).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits.narrow(1, 0, l - 1).unwrap(), D::Minus1).unwrap();
    let want = lsm
        .affine(2.0, 0.0)
        .unwrap()
        .log_sum_exp(D::Minus1)
        .unwrap()
        .mul(&b.loss_mask.to_dtype(DType::F64).unwrap())
        .unwrap();
    let plain = m
        .token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
        .unwrap();
    // The default budget (whole rows), then 7 logits per chunk (the vocabulary cut).
    for elems in [None, Some(7)] {
        if let Some(e) = elems {
            m.set_head_chunk_elems(e);
        }
        let (lp, sq) = m
            .token_logps_masked_with_sq(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
            .unwrap();
        assert!(common::max_abs(&(sq - &want).unwrap()) < 1e-12, "{elems:?}");
        assert!(
            common::max_abs(&(lp - &plain).unwrap()) < 1e-12,
            "{elems:?}"
        );
    }
}
