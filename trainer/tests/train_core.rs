//! The trainer on the toy bigram model: DPO learns, DPO-PG's first step, exact resume,
//! NaN stop, trainer loss = library loss, gradient accumulation, clipping, the cache.

use std::cell::Cell;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use difinfo::loss::batch_loss;
use difinfo::objective::{LossType, ObjectiveSpec, Rule};
use difinfo::reward::side;
use difinfo::scalar::infallible;
use difinfo_trainer::train::checkpoint::latest_checkpoint;
use difinfo_trainer::train::toy::Bigram;
use difinfo_trainer::train::{
    Batch, Dataset, Examples, Objective, OptimizerKind, PolicyModel, PreferencePair, SchedulerType,
    SeqLogps, Sequence, TrainConfig, Trainer,
};
use proptest::prelude::*;

const VOCAB: usize = 12;

/// `n` pairs over tokens `1..VOCAB` (0 is padding): a prompt of 2–4 tokens; the chosen
/// completion prefers even tokens, the rejected odd ones; lengths 2–5.
fn pairs(n: usize, seed: u64) -> Vec<PreferencePair> {
    let mut rng = difinfo_trainer::train::rng::SplitMix64::new(seed);
    let mut tok = |parity: Option<u64>| -> u32 {
        let t = 1 + rng.below(VOCAB as u64 - 1);
        match parity {
            Some(p) if t % 2 != p => (if t + 1 < VOCAB as u64 { t + 1 } else { t - 1 }) as u32,
            _ => t as u32,
        }
    };
    (0..n)
        .map(|i| {
            let plen = 2 + i % 3;
            let prompt: Vec<u32> = (0..plen).map(|_| tok(None)).collect();
            let mut c = prompt.clone();
            let mut r = prompt.clone();
            for _ in 0..(2 + i % 4) {
                c.push(tok(Some(0)));
            }
            for _ in 0..(2 + (i + 1) % 4) {
                r.push(tok(Some(1)));
            }
            PreferencePair {
                chosen: Sequence {
                    ids: c,
                    completion_start: plen,
                },
                rejected: Sequence {
                    ids: r,
                    completion_start: plen,
                },
            }
        })
        .collect()
}

fn dataset(p: Vec<PreferencePair>) -> Dataset {
    Dataset {
        examples: Examples::Preference(p),
        pad_id: 0,
        settings: "toy-v1".into(),
    }
}

/// The objectives the tests cover: DPO, reference-free DPO, DPO-PG, SFT.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Dpo,
    RefFree,
    DpoPg,
    Sft,
}

/// `kind` with loss type `shape` and `β`.
fn objective(kind: Kind, shape: LossType, beta: f64) -> Objective {
    Objective::new(ObjectiveSpec {
        objective: match kind {
            Kind::Sft => Rule::Sft,
            Kind::DpoPg => Rule::ProjectedGradient,
            Kind::Dpo | Kind::RefFree => Rule::Preference,
        },
        loss_type: vec![shape],
        beta,
        reference_free: kind == Kind::RefFree,
        ..Default::default()
    })
    .unwrap()
}

/// The library's loss of one pair in `f64` (the text the trainer runs on tensors) at summed
/// log-probs `c`, `r`, token counts `nc`, `nr` and the reference's `(chosen, rejected)`.
fn library_pair_loss(
    o: &Objective,
    (c, nc): (f64, f64),
    (r, nr): (f64, f64),
    refs: Option<(f64, f64)>,
) -> f64 {
    let cs = infallible(side(o, c, refs.map(|x| x.0), nc));
    let rs = infallible(side(o, r, refs.map(|x| x.1), nr));
    infallible(batch_loss(o, &cs, &rs)).loss
}

fn model(dtype: DType) -> Bigram {
    Bigram::new(VOCAB, 6, 0.5, 7, dtype, &Device::Cpu).unwrap()
}

fn config(dir: &Path, kind: Kind) -> TrainConfig {
    TrainConfig {
        objective: objective(kind, LossType::Sigmoid, 0.1),
        output_dir: dir.to_path_buf(),
        learning_rate: 0.05,
        lr_scheduler_type: SchedulerType::ConstantWithWarmup,
        per_device_train_batch_size: 4,
        logging_steps: 1,
        save_steps: 0,
        max_steps: 10,
        ..TrainConfig::default()
    }
}

fn weights(m: &impl PolicyModel) -> Vec<Vec<f64>> {
    m.named_vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// Mean summed log-probs `(chosen, rejected)` over all pairs.
fn mean_logps(m: &impl PolicyModel, p: &[PreferencePair]) -> (f64, f64) {
    let c: Vec<&Sequence> = p.iter().map(|x| &x.chosen).collect();
    let r: Vec<&Sequence> = p.iter().map(|x| &x.rejected).collect();
    let f = |s: &[&Sequence]| {
        let b = Batch::for_training(s, 0, &Device::Cpu).unwrap();
        m.sequence_logps(&b)
            .unwrap()
            .sum
            .to_dtype(DType::F64)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (f(&c), f(&r))
}

#[test]
fn dpo_lowers_the_loss_for_every_loss_type() {
    for shape in [LossType::Sigmoid, LossType::Hinge, LossType::Ipo] {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F32);
        let p = pairs(16, 1);
        let beta = if shape == LossType::Ipo { 0.5 } else { 0.1 };
        let cfg = TrainConfig {
            objective: objective(Kind::Dpo, shape, beta),
            per_device_train_batch_size: 16,
            max_steps: 40,
            ..config(dir.path(), Kind::Dpo)
        };
        let mut t = Trainer::new(&m, cfg, dataset(p)).unwrap();
        let first = t.train_step().unwrap().unwrap();
        t.train().unwrap();
        let recs = t.metrics().read().unwrap();
        let last = recs.last().unwrap();
        let last_loss = last["loss"].as_f64().unwrap();
        assert!(
            last_loss < 0.7 * first.loss,
            "{shape:?}: {} → {last_loss}",
            first.loss
        );
        assert!(last["rewards/margins"].as_f64().unwrap() > 0.0);
        assert!(last["rewards/accuracies"].as_f64().unwrap() > 0.5);
        if shape == LossType::Sigmoid {
            assert!(
                (first.loss - std::f64::consts::LN_2).abs() < 1e-6,
                "policy = reference at step 1"
            );
        }
    }
}

#[test]
fn metrics_files_have_trl_names() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let mut t = Trainer::new(
        &m,
        TrainConfig {
            max_steps: 3,
            ..config(dir.path(), Kind::DpoPg)
        },
        dataset(pairs(8, 2)),
    )
    .unwrap();
    t.train().unwrap();
    let recs = t.metrics().read().unwrap();
    assert_eq!(recs.len(), 3);
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "tokens_per_second",
        "projection/active_fraction",
    ] {
        assert!(recs[0].contains_key(k), "missing {k}");
    }
    assert_eq!(recs[2]["step"].as_u64(), Some(3));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert!(csv.starts_with("step,epoch,loss,grad_norm,learning_rate,rewards/chosen"));
    assert_eq!(csv.lines().count(), 4);
    assert!(
        dir.path().join("train_config.toml").exists()
            && dir.path().join("train_config.json").exists()
    );
}

/// Pairs whose rejected completion is the chosen one with its last token changed: the two
/// NLL gradients point in similar directions, so the projection is active.
fn similar_pairs(n: usize, seed: u64) -> Vec<PreferencePair> {
    pairs(n, seed)
        .into_iter()
        .map(|mut p| {
            let mut r = p.chosen.clone();
            let last = r.ids.last_mut().unwrap();
            *last = 1 + (*last % (VOCAB as u32 - 1));
            p.rejected = r;
            p
        })
        .collect()
}

#[test]
fn one_sgd_step_of_dpo_pg_raises_chosen_and_not_rejected() {
    for (p, want_active) in [
        (similar_pairs(8, 3), Some(true)),
        (pairs(8, 3), None),
        (pairs(8, 11), None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F64);
        let (c0, r0) = mean_logps(&m, &p);
        let cfg = TrainConfig {
            optim: OptimizerKind::Sgd,
            learning_rate: 1e-3,
            lr_scheduler_type: SchedulerType::Constant,
            per_device_train_batch_size: 8,
            max_steps: 1,
            ..config(dir.path(), Kind::DpoPg)
        };
        let mut t = Trainer::new(&m, cfg, dataset(p.clone())).unwrap();
        let rep = t.train_step().unwrap().unwrap();
        let (c1, r1) = mean_logps(&m, &p);
        let proj = rep.projection.unwrap();
        assert!(c1 > c0, "logps/chosen {c0} → {c1}");
        // First order, Δ log π(y_l) ∝ ⟨g, g_l⟩ ≤ 0 (Theorem H.5); allow the O(η²) term.
        assert!(
            r1 <= r0 + 1e-6,
            "logps/rejected {r0} → {r1} (projection {proj:?})"
        );
        if let Some(a) = want_active {
            assert_eq!(proj.active, a, "{proj:?}");
            // Active: the rejected log-prob is unchanged to first order (⟨g, g_l⟩ = 0).
            assert!((r1 - r0).abs() < 1e-5, "{r0} → {r1}");
        }
        let rec = rep.logged.unwrap();
        let frac = rec
            .iter()
            .find(|(k, _)| k == "projection/active_fraction")
            .unwrap()
            .1;
        assert_eq!(frac, if proj.active { 1.0 } else { 0.0 });
    }
}

/// Runs `objective` to completion in one go and with an interruption after `k` steps, and
/// returns both metric logs and final weights.
fn exact_resume_case(kind: Kind, optim: OptimizerKind, shape: LossType) {
    let data = || match kind {
        Kind::Sft => Dataset {
            examples: Examples::Sft(pairs(20, 4).into_iter().map(|p| p.chosen).collect()),
            pad_id: 0,
            settings: "toy".into(),
        },
        _ => dataset(pairs(20, 4)),
    };
    let cfg = |dir: &Path| TrainConfig {
        optim,
        objective: objective(kind, shape, 0.1),
        per_device_train_batch_size: 3,
        gradient_accumulation_steps: 2,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_steps: 2,
        max_steps: 10,
        logging_steps: 3,
        save_steps: 5,
        max_grad_norm: 0.5,
        ..config(dir, kind)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ma = model(DType::F32);
    Trainer::new(&ma, cfg(da.path()), data())
        .unwrap()
        .train()
        .unwrap();

    let mb = model(DType::F32);
    {
        let mut t = Trainer::new(&mb, cfg(db.path()), data()).unwrap();
        t.train_until(5).unwrap();
        // Keep going a little past the checkpoint, as a crash would, then lose that work.
        t.train_until(6).unwrap();
    }
    let fresh = model(DType::F32);
    let ck = latest_checkpoint(db.path()).unwrap().unwrap();
    assert!(
        ck.ends_with("checkpoint-6") || ck.ends_with("checkpoint-5"),
        "{ck:?}"
    );
    let ck5 = db.path().join("checkpoint-5");
    let mut t = Trainer::resume(&fresh, cfg(db.path()), data(), &ck5).unwrap();
    t.train().unwrap();

    let strip = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(l).unwrap();
                assert!(v.remove("tokens_per_second").is_some());
                serde_json::to_string(&v).unwrap()
            })
            .collect()
    };
    let (a, b) = (strip(da.path()), strip(db.path()));
    assert_eq!(a.len(), 4, "logged at 3, 6, 9, 10");
    assert_eq!(a, b, "{kind:?}: metrics differ after resume");
    assert_eq!(
        weights(&ma),
        weights(&fresh),
        "{kind:?}: weights differ after resume"
    );
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    exact_resume_case(Kind::Dpo, OptimizerKind::Adamw, LossType::Sigmoid);
    exact_resume_case(Kind::DpoPg, OptimizerKind::Rmsprop, LossType::Sigmoid);
    exact_resume_case(Kind::RefFree, OptimizerKind::Sgd, LossType::Hinge);
    exact_resume_case(Kind::Sft, OptimizerKind::Adamw, LossType::Sigmoid);
    exact_resume_case(Kind::Dpo, OptimizerKind::Rmsprop, LossType::Ipo);
}

/// The other reading of "k steps resumed for k more": a finished run of `max_steps = k`,
/// resumed with `max_steps = 2k`. Identical when the schedule does not depend on the total
/// (constant with warm-up) and `logging_steps` divides `k` (a run logs at its last step).
#[test]
fn finished_run_extended_equals_longer_run() {
    let cfg = |dir: &Path, max_steps: i64| TrainConfig {
        optim: OptimizerKind::Adamw,
        per_device_train_batch_size: 3,
        gradient_accumulation_steps: 2,
        warmup_steps: 2,
        max_steps,
        logging_steps: 2,
        ..config(dir, Kind::Dpo)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ma = model(DType::F32);
    Trainer::new(&ma, cfg(da.path(), 10), dataset(pairs(20, 13)))
        .unwrap()
        .train()
        .unwrap();
    let mb = model(DType::F32);
    Trainer::new(&mb, cfg(db.path(), 6), dataset(pairs(20, 13)))
        .unwrap()
        .train()
        .unwrap();
    let mc = model(DType::F32);
    let mut t = Trainer::resume_latest(&mc, cfg(db.path(), 10), dataset(pairs(20, 13))).unwrap();
    assert_eq!(t.global_step(), 6);
    t.train().unwrap();
    let strip = |d: &Path| -> Vec<serde_json::Map<String, serde_json::Value>> {
        let log = difinfo_trainer::train::metrics::MetricsLog::new(d);
        log.read()
            .unwrap()
            .into_iter()
            .map(|mut r| {
                r.remove("tokens_per_second");
                r
            })
            .collect()
    };
    assert_eq!(strip(da.path()), strip(db.path()));
    assert_eq!(weights(&ma), weights(&mc));
}

#[test]
fn a_fresh_run_refuses_a_directory_with_checkpoints_unless_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let cfg = TrainConfig {
        max_steps: 2,
        ..config(dir.path(), Kind::Dpo)
    };
    Trainer::new(&m, cfg.clone(), dataset(pairs(4, 14)))
        .unwrap()
        .train()
        .unwrap();
    assert!(latest_checkpoint(dir.path()).unwrap().is_some());
    let e = Trainer::new(&m, cfg.clone(), dataset(pairs(4, 14)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("overwrite_output_dir"), "{e}");
    let t = Trainer::new(
        &m,
        TrainConfig {
            overwrite_output_dir: true,
            ..cfg
        },
        dataset(pairs(4, 14)),
    )
    .unwrap();
    assert!(latest_checkpoint(dir.path()).unwrap().is_none());
    assert_eq!(t.global_step(), 0);
}

#[test]
fn a_pair_without_completion_tokens_is_rejected_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let mut p = pairs(3, 15);
    p[1].rejected.completion_start = p[1].rejected.ids.len();
    let e = Trainer::new(&m, config(dir.path(), Kind::Dpo), dataset(p))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("example 1: rejected"), "{e}");
}

/// Wraps a model and turns its log-probs into NaN from the `from`-th call on.
struct Poisoned<'a> {
    inner: &'a Bigram,
    calls: Cell<usize>,
    from: usize,
}

impl PolicyModel for Poisoned<'_> {
    fn sequence_logps(&self, batch: &Batch) -> difinfo_trainer::Result<SeqLogps> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        let s = self.inner.sequence_logps(batch)?;
        if n >= self.from {
            Ok(SeqLogps {
                sum: (s.sum + f64::NAN)?,
                ..s
            })
        } else {
            Ok(s)
        }
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.inner.named_vars()
    }
}

#[test]
fn nan_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let inner = model(DType::F32);
    // 8 pairs, batch 2: the reference pass makes 4 calls, then one call per step;
    // call 7 (0-based) is step 4's.
    let bad = Poisoned {
        inner: &inner,
        calls: Cell::new(0),
        from: 7,
    };
    let cfg = TrainConfig {
        per_device_train_batch_size: 2,
        save_steps: 2,
        max_steps: 6,
        ..config(dir.path(), Kind::Dpo)
    };
    let mut t = Trainer::new(&bad, cfg.clone(), dataset(pairs(8, 5))).unwrap();
    let before_step4 = {
        t.train_until(3).unwrap();
        weights(&inner)
    };
    let err = t.train().unwrap_err();
    match &err {
        difinfo_trainer::Error::NonFinite {
            step,
            batch,
            epoch,
            examples,
            last_checkpoint,
            ..
        } => {
            assert_eq!((*step, *batch, *epoch), (4, 3, 0));
            assert_eq!(examples.len(), 2);
            assert_eq!(
                last_checkpoint.as_deref(),
                Some(dir.path().join("checkpoint-2").as_path())
            );
        }
        e => panic!("unexpected error {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("step 4") && msg.contains("batch 3") && msg.contains("checkpoint-2"),
        "{msg}"
    );
    assert_eq!(
        weights(&inner),
        before_step4,
        "no update after a non-finite loss"
    );
    assert_eq!(
        latest_checkpoint(dir.path()).unwrap().unwrap(),
        dir.path().join("checkpoint-2")
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // The kept checkpoint resumes, and with a healthy model reproduces a clean run.
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = model(DType::F32);
    Trainer::new(
        &clean,
        TrainConfig {
            output_dir: clean_dir.path().to_path_buf(),
            ..cfg.clone()
        },
        dataset(pairs(8, 5)),
    )
    .unwrap()
    .train()
    .unwrap();
    let healed = model(DType::F32);
    Trainer::resume_latest(&healed, cfg, dataset(pairs(8, 5)))
        .unwrap()
        .train()
        .unwrap();
    assert_eq!(weights(&healed), weights(&clean));
}

#[test]
fn an_overflowing_update_is_not_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let cfg = TrainConfig {
        optim: OptimizerKind::Sgd,
        learning_rate: 1e-3,
        lr_scheduler_type: SchedulerType::Constant,
        max_grad_norm: 0.0,
        save_steps: 1,
        max_steps: 3,
        ..config(dir.path(), Kind::Dpo)
    };
    let mut t = Trainer::new(&m, cfg.clone(), dataset(pairs(8, 16))).unwrap();
    t.train_step().unwrap();
    drop(t);
    // Resume with a learning rate whose update overflows f32.
    let huge = TrainConfig {
        learning_rate: 1e39,
        ..cfg
    };
    let mut t = Trainer::resume_latest(&m, huge, dataset(pairs(8, 16))).unwrap();
    let e = t.train_step().unwrap_err();
    assert!(
        matches!(e, difinfo_trainer::Error::NonFinite { step: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("weights after the update"), "{e}");
    assert_eq!(
        latest_checkpoint(dir.path()).unwrap().unwrap(),
        dir.path().join("checkpoint-1")
    );
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    for kind in [Kind::Dpo, Kind::DpoPg, Kind::Sft] {
        let run = |bs: usize, ga: usize| {
            let dir = tempfile::tempdir().unwrap();
            let m = model(DType::F64);
            let cfg = TrainConfig {
                optim: OptimizerKind::Sgd,
                learning_rate: 0.5,
                lr_scheduler_type: SchedulerType::Constant,
                per_device_train_batch_size: bs,
                gradient_accumulation_steps: ga,
                max_grad_norm: 0.0,
                max_steps: 1,
                ..config(dir.path(), kind)
            };
            let data = match kind {
                // Sequences of unequal lengths: SFT normalizes by the step's token count.
                Kind::Sft => Dataset {
                    examples: Examples::Sft(pairs(8, 6).into_iter().map(|p| p.chosen).collect()),
                    pad_id: 0,
                    settings: String::new(),
                },
                _ => dataset(pairs(8, 6)),
            };
            // Every step sees the whole dataset (8 examples), whatever the split.
            let r = Trainer::new(&m, cfg, data)
                .unwrap()
                .train_step()
                .unwrap()
                .unwrap();
            (weights(&m), r.grad_norm, r.loss)
        };
        let (w1, n1, l1) = run(8, 1);
        for (bs, ga) in [(4, 2), (2, 4)] {
            let (w, n, l) = run(bs, ga);
            for (a, b) in w1.iter().flatten().zip(w.iter().flatten()) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "{kind:?} bs={bs} ga={ga}: {a} vs {b}"
                );
            }
            assert!(
                (n1 - n).abs() < 1e-12 && (l1 - l).abs() < 1e-12,
                "{kind:?}: {n1} {n} {l1} {l}"
            );
        }
    }
}

/// The step the trainer takes is `−lr ·` the gradient of the loss it reports: SGD's update
/// against central finite differences of the library's loss on the model's log-probs.
#[test]
fn sgd_update_is_the_finite_difference_gradient_of_the_library_loss() {
    for (shape, kind) in [
        (LossType::Sigmoid, Kind::Dpo),
        (LossType::Ipo, Kind::Dpo),
        (LossType::Hinge, Kind::RefFree),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F64);
        let p = pairs(6, 12);
        let lr = 1e-3;
        let o = objective(kind, shape, 0.7);
        let cfg = TrainConfig {
            objective: o.clone(),
            optim: OptimizerKind::Sgd,
            learning_rate: lr,
            lr_scheduler_type: SchedulerType::Constant,
            per_device_train_batch_size: 6,
            max_grad_norm: 0.0,
            max_steps: 1,
            ..config(dir.path(), kind)
        };
        let mut t = Trainer::new(&m, cfg, dataset(p.clone())).unwrap();
        let reference = t.reference().cloned();
        let w0 = weights(&m);
        t.train_step().unwrap();
        let w1 = weights(&m);
        let vars = m.named_vars();
        let set = |vi: usize, w: &[f64]| {
            let v = &vars[vi].1;
            v.set(&Tensor::from_slice(w, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        };
        for (vi, w) in w0.iter().enumerate() {
            set(vi, w);
        }
        let loss = || -> f64 {
            let mut s = 0.0;
            for (i, pair) in p.iter().enumerate() {
                let lp = |q: &Sequence| {
                    let o = m
                        .sequence_logps(&Batch::for_training(&[q], 0, &Device::Cpu).unwrap())
                        .unwrap();
                    (
                        o.sum.to_vec1::<f64>().unwrap()[0],
                        o.count.to_vec1::<f64>().unwrap()[0],
                    )
                };
                let refs = reference
                    .as_ref()
                    .map(|rf| (rf.chosen_sum[i], rf.rejected_sum[i]));
                s += library_pair_loss(&o, lp(&pair.chosen), lp(&pair.rejected), refs)
                    / p.len() as f64;
            }
            s
        };
        for (vi, w) in w0.iter().enumerate() {
            for j in [0, 7, 23, w.len() - 1] {
                let g_trainer = (w[j] - w1[vi][j]) / lr;
                let e = 1e-6;
                let mut wp = w.clone();
                wp[j] += e;
                set(vi, &wp);
                let lp = loss();
                wp[j] -= 2.0 * e;
                set(vi, &wp);
                let lm = loss();
                set(vi, w);
                let fd = (lp - lm) / (2.0 * e);
                assert!(
                    (fd - g_trainer).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{shape:?} var {vi} [{j}]: fd {fd} vs trainer {g_trainer}"
                );
            }
        }
    }
}

#[test]
fn clipping_bounds_the_update_and_logs_the_pre_clip_norm() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F64);
    let w0 = weights(&m);
    let cfg = TrainConfig {
        optim: OptimizerKind::Sgd,
        learning_rate: 1.0,
        lr_scheduler_type: SchedulerType::Constant,
        max_grad_norm: 1e-3,
        max_steps: 1,
        ..config(dir.path(), Kind::RefFree)
    };
    let mut t = Trainer::new(&m, cfg, dataset(pairs(8, 7))).unwrap();
    let r = t.train_step().unwrap().unwrap();
    let w1 = weights(&m);
    let step: f64 = w0
        .iter()
        .flatten()
        .zip(w1.iter().flatten())
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    assert!(r.grad_norm > 1e-2, "pre-clip norm {}", r.grad_norm);
    assert!(
        (step - 1e-3 * r.grad_norm / (r.grad_norm + 1e-6)).abs() < 1e-12,
        "update norm {step}"
    );
    let logged = r.logged.unwrap();
    assert_eq!(
        logged.iter().find(|(k, _)| k == "grad_norm").unwrap().1,
        r.grad_norm
    );
}

#[test]
fn reference_cache_is_reused_and_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let p = pairs(6, 8);
    let cfg = TrainConfig {
        max_steps: 1,
        ..config(dir.path(), Kind::Dpo)
    };
    let key = Trainer::new(&m, cfg.clone(), dataset(p.clone()))
        .unwrap()
        .state()
        .ref_cache_key
        .clone()
        .unwrap();
    let file = difinfo_trainer::train::refcache::cache_path(dir.path(), &key);
    let stamp = std::fs::metadata(&file).unwrap().modified().unwrap();
    let vars = m.named_vars();
    let fp = difinfo_trainer::train::refcache::fingerprint_vars(&vars).unwrap();
    let (r, hit) = difinfo_trainer::train::refcache::RefLogps::load_or_compute(
        &difinfo_trainer::dist::Single,
        &m,
        &p,
        Some(dir.path()),
        &key,
        4,
        0,
        None,
    )
    .unwrap();
    assert!(hit);
    assert_eq!(
        r,
        difinfo_trainer::train::refcache::RefLogps::compute(&m, &p, 4, 0).unwrap()
    );
    // Same everything: same key, file untouched (a rerun over the earlier run keeps its
    // reference cache).
    let rerun = TrainConfig {
        overwrite_output_dir: true,
        ..cfg.clone()
    };
    let again = Trainer::new(&m, rerun, dataset(p.clone()))
        .unwrap()
        .state()
        .ref_cache_key
        .clone()
        .unwrap();
    assert_eq!(again, key);
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), stamp);
    // Other data, settings or weights: another key.
    assert_ne!(
        difinfo_trainer::train::refcache::cache_key(fp, &p[1..], "toy-v1", 0, 4),
        key
    );
    assert_ne!(
        difinfo_trainer::train::refcache::cache_key(fp, &p, "toy-v2", 0, 4),
        key
    );
    assert_ne!(
        difinfo_trainer::train::refcache::cache_key(fp ^ 1, &p, "toy-v1", 0, 4),
        key
    );
}

#[test]
fn sft_lowers_the_nll_whole_sequence_and_completion_only() {
    for completion_only_loss in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F32);
        let seqs: Vec<Sequence> = pairs(12, 9).into_iter().map(|p| p.chosen).collect();
        let cfg = TrainConfig {
            completion_only_loss,
            per_device_train_batch_size: 12,
            max_steps: 30,
            ..config(dir.path(), Kind::Sft)
        };
        let mut t = Trainer::new(
            &m,
            cfg,
            Dataset {
                examples: Examples::Sft(seqs),
                pad_id: 0,
                settings: String::new(),
            },
        )
        .unwrap();
        let first = t.train_step().unwrap().unwrap().loss;
        let s = t.train().unwrap();
        let last = s
            .last_record
            .unwrap()
            .iter()
            .find(|(k, _)| k == "loss")
            .unwrap()
            .1;
        assert!(
            last < first - 0.3,
            "completion_only={completion_only_loss}: {first} → {last}"
        );
        // At initialization the per-token NLL is close to log |V|.
        assert!((first - (VOCAB as f64).ln()).abs() < 0.5, "{first}");
    }
}

/// A model with a variable that takes no part in the forward pass.
struct Dead(Bigram, Var);

impl PolicyModel for Dead {
    fn sequence_logps(&self, b: &Batch) -> difinfo_trainer::Result<SeqLogps> {
        self.0.sequence_logps(b)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = self.0.named_vars();
        v.push(("zz.unused".into(), self.1.clone()));
        v
    }
}

#[test]
fn a_variable_without_gradient_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = Dead(
        model(DType::F32),
        Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap(),
    );
    let mut t = Trainer::new(&m, config(dir.path(), Kind::Dpo), dataset(pairs(4, 10))).unwrap();
    let e = t.train_step().unwrap_err().to_string();
    assert!(e.contains("zz.unused"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// The loss the trainer logs equals the library's `f64` loss averaged over the step's
    /// pairs, with the model's own log-probs and the cached reference log-probs (the
    /// plumbing: batching, the cache, the token counts of IPO's normalization).
    #[test]
    fn trainer_loss_equals_library_loss(
        shape in prop_oneof![Just(LossType::Sigmoid), Just(LossType::Hinge), Just(LossType::Ipo)],
        kind in prop_oneof![Just(Kind::Dpo), Just(Kind::RefFree), Just(Kind::DpoPg)],
        beta in 0.05f64..1.0,
        seed in 0u64..1000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F64);
        let p = pairs(6, seed);
        let o = objective(kind, shape, beta);
        let cfg = TrainConfig {
            objective: o.clone(),
            optim: OptimizerKind::Sgd,
            learning_rate: 0.3,
            lr_scheduler_type: SchedulerType::Constant,
            per_device_train_batch_size: 3,
            max_steps: 2,
            ..config(dir.path(), kind)
        };
        let mut t = Trainer::new(&m, cfg, dataset(p.clone())).unwrap();
        t.train_step().unwrap();
        let idx = t.upcoming_examples().remove(0);
        let reference = t.reference().cloned();
        let lp = |s: &Sequence| -> (f64, f64) {
            let b = Batch::for_training(&[s], 0, &Device::Cpu).unwrap();
            let o = m.sequence_logps(&b).unwrap();
            (o.sum.to_vec1::<f64>().unwrap()[0], o.count.to_vec1::<f64>().unwrap()[0])
        };
        let mut want = 0.0;
        for &i in &idx {
            let refs = reference.as_ref().map(|rf| (rf.chosen_sum[i], rf.rejected_sum[i]));
            want += library_pair_loss(&o, lp(&p[i].chosen), lp(&p[i].rejected), refs) / idx.len() as f64;
        }
        let got = t.train_step().unwrap().unwrap().loss;
        prop_assert!((got - want).abs() < 1e-10 * (1.0 + want.abs()), "{kind:?} {shape:?}: {got} vs {want}");
    }
}

/// TRL's `rpo_alpha`: the logged loss is the DPO loss plus α times the mean NLL per chosen
/// completion token (logged as `nll_loss`), here at the first step where π = π_ref.
#[test]
fn rpo_adds_the_mean_chosen_nll_to_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F64);
    let p = pairs(8, 3);
    let chosen: Vec<&Sequence> = p.iter().map(|x| &x.chosen).collect();
    let b = Batch::for_training(&chosen, 0, &Device::Cpu).unwrap();
    let s = m.sequence_logps(&b).unwrap();
    let total = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
    let nll = -total(&s.sum) / total(&s.count);
    let alpha = 0.5;
    let mut t = Trainer::new(
        &m,
        TrainConfig {
            objective: Objective::new(ObjectiveSpec {
                rpo_alpha: Some(alpha),
                ..Default::default()
            })
            .unwrap(),
            per_device_train_batch_size: 8,
            max_steps: 1,
            ..config(dir.path(), Kind::Dpo)
        },
        dataset(p),
    )
    .unwrap();
    t.train().unwrap();
    let rec = &t.metrics().read().unwrap()[0];
    let logged_nll = rec["nll_loss"].as_f64().unwrap();
    assert!((logged_nll - nll).abs() < 1e-12, "{logged_nll} vs {nll}");
    let want = std::f64::consts::LN_2 + alpha * nll;
    let loss = rec["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
}

/// HF's `save_total_limit`: only the newest checkpoints remain, and the run resumes from them.
#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(DType::F32);
    let cfg = TrainConfig {
        save_steps: 1,
        save_total_limit: Some(2),
        max_steps: 5,
        ..config(dir.path(), Kind::Dpo)
    };
    Trainer::new(&m, cfg, dataset(pairs(8, 4)))
        .unwrap()
        .train()
        .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-4", "checkpoint-5"]);
    assert_eq!(
        latest_checkpoint(dir.path()).unwrap().unwrap(),
        dir.path().join("checkpoint-5")
    );
}

/// Options TRL would silently ignore are refused: label smoothing of a non-sigmoid loss, RPO
/// on DPO-PG, a zero checkpoint limit. (The objective's are refused when it is built, from a
/// file or the command line as well: the library validates it.)
#[test]
fn inapplicable_options_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), Kind::Dpo);
    for (spec, what) in [
        (
            ObjectiveSpec {
                label_smoothing: 0.1,
                loss_type: vec![LossType::Hinge],
                ..Default::default()
            },
            "label_smoothing",
        ),
        (
            ObjectiveSpec {
                label_smoothing: 0.6,
                ..Default::default()
            },
            "label_smoothing",
        ),
        (
            ObjectiveSpec {
                rpo_alpha: Some(1.0),
                objective: Rule::ProjectedGradient,
                ..Default::default()
            },
            "rpo_alpha",
        ),
    ] {
        let e = Objective::new(spec.clone()).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
        let table = toml::Table::try_from(&spec).unwrap();
        let e = difinfo_trainer::train::config::merge(None, &table)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    let c = TrainConfig {
        save_total_limit: Some(0),
        ..base
    };
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("save_total_limit"), "{e}");
}

/// TR-DPO (`sync_ref_model`): after every `ref_model_sync_steps`-th step the reference's
/// weights are `α π + (1 − α) π_ref` (TRL's `SyncRefModelCallback`), and before the first
/// sync the run equals plain DPO against the cached reference.
#[test]
fn synced_reference_mixes_toward_the_policy() {
    let cfg = |dir: &Path, sync: bool| TrainConfig {
        sync_ref_model: sync,
        precompute_ref_log_probs: !sync,
        ref_model_mixup_alpha: 0.6,
        ref_model_sync_steps: 2,
        max_steps: 3,
        ..config(dir, Kind::Dpo)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (policy, reference, plain) = (model(DType::F64), model(DType::F64), model(DType::F64));
    let mut t = Trainer::new(&policy, cfg(da.path(), true), dataset(pairs(8, 3)))
        .unwrap()
        .with_synced_reference(&reference)
        .unwrap();
    let mut p = Trainer::new(&plain, cfg(db.path(), false), dataset(pairs(8, 3))).unwrap();
    let r0 = weights(&reference);
    let first = t.train_step().unwrap().unwrap();
    let first_plain = p.train_step().unwrap().unwrap();
    // The same values, batched otherwise (the cache's batches against the step's).
    let near = |a: f64, b: f64| (a - b).abs() < 1e-12 * (1.0 + b.abs());
    assert!(
        near(first.loss, first_plain.loss),
        "the first step reads π_ref = π_0"
    );
    assert_eq!(weights(&reference), r0, "no sync after step 1 of τ = 2");
    t.train_step().unwrap().unwrap();
    p.train_step().unwrap().unwrap();
    let (pi, synced) = (weights(&policy), weights(&reference));
    for ((s, r), w) in synced.iter().zip(&r0).zip(&pi) {
        for ((s, r), w) in s.iter().zip(r).zip(w) {
            assert!((s - (0.4 * r + 0.6 * w)).abs() < 1e-15 * (1.0 + s.abs()));
        }
    }
    for (a, b) in weights(&policy).iter().zip(&weights(&plain)) {
        for (a, b) in a.iter().zip(b) {
            assert!(near(*a, *b), "step 2 still read π_0");
        }
    }
    let third = t.train_step().unwrap().unwrap();
    let third_plain = p.train_step().unwrap().unwrap();
    assert!(
        !near(third.loss, third_plain.loss),
        "step 3 reads the synced reference"
    );
}

/// A TR-DPO run resumed from a checkpoint equals the uninterrupted run: the checkpoint holds
/// the synced reference's weights.
#[test]
fn synced_reference_resumes_exactly() {
    let cfg = |dir: &Path| TrainConfig {
        sync_ref_model: true,
        precompute_ref_log_probs: false,
        ref_model_sync_steps: 2,
        max_steps: 6,
        save_steps: 3,
        ..config(dir, Kind::Dpo)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ma, ra) = (model(DType::F32), model(DType::F32));
    Trainer::new(&ma, cfg(da.path()), dataset(pairs(8, 5)))
        .unwrap()
        .with_synced_reference(&ra)
        .unwrap()
        .train()
        .unwrap();
    {
        let (mb, rb) = (model(DType::F32), model(DType::F32));
        let mut t = Trainer::new(&mb, cfg(db.path()), dataset(pairs(8, 5)))
            .unwrap()
            .with_synced_reference(&rb)
            .unwrap();
        t.train_until(3).unwrap();
    }
    let (mc, rc) = (model(DType::F32), model(DType::F32));
    let ck = db.path().join("checkpoint-3");
    assert!(ck.join("ref_model.safetensors").exists());
    Trainer::resume(&mc, cfg(db.path()), dataset(pairs(8, 5)), &ck)
        .unwrap()
        .with_synced_reference(&rc)
        .unwrap()
        .train()
        .unwrap();
    assert_eq!(
        weights(&ma),
        weights(&mc),
        "policy weights differ after resume"
    );
    assert_eq!(
        weights(&ra),
        weights(&rc),
        "reference weights differ after resume"
    );
}

/// TR-DPO's combinations that TRL refuses (or that read no reference) are config errors.
#[test]
fn sync_ref_model_refuses_what_trl_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        sync_ref_model: true,
        precompute_ref_log_probs: false,
        ..config(dir.path(), Kind::Dpo)
    };
    assert!(base.validate().is_ok());
    let e = |c: TrainConfig| c.validate().unwrap_err().to_string();
    let cached = e(TrainConfig {
        precompute_ref_log_probs: true,
        ..base.clone()
    });
    assert!(cached.contains("precompute_ref_log_probs"), "{cached}");
    let mut peft = base.clone();
    peft.memory.use_peft = true;
    assert!(e(peft).contains("use_peft"));
    for kind in [Kind::RefFree, Kind::DpoPg, Kind::Sft] {
        let msg = e(TrainConfig {
            objective: objective(kind, LossType::Sigmoid, 0.1),
            ..base.clone()
        });
        assert!(msg.contains("reads no reference"), "{kind:?}: {msg}");
    }
}

/// LD-DPO and WPO train the toy model through the trainer's forward (per-token log-probs and
/// `log Σ π²` from the bigram's logits) and lower the loss.
#[test]
fn ld_alpha_and_use_weighting_train() {
    for (ld_alpha, use_weighting) in [(Some(0.5), false), (None, true), (Some(0.0), true)] {
        let dir = tempfile::tempdir().unwrap();
        let m = model(DType::F64);
        let c = TrainConfig {
            objective: Objective::new(ObjectiveSpec {
                ld_alpha,
                use_weighting,
                ..Default::default()
            })
            .unwrap(),
            max_steps: 15,
            ..config(dir.path(), Kind::Dpo)
        };
        let mut t = Trainer::new(&m, c, dataset(pairs(8, 9))).unwrap();
        let first = t.train_step().unwrap().unwrap().loss;
        let mut last = first;
        while let Some(r) = t.train_step().unwrap() {
            last = r.loss;
        }
        assert!(
            last < first,
            "{ld_alpha:?} {use_weighting}: {first} → {last}"
        );
    }
}
