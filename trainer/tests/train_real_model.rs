//! The training core on difinfo-trainer's real decoder (Llama and Qwen2, micro sizes, random
//! weights, the BPE tokenizer and TRL tokenization of the shipped example data).

use std::path::Path;

mod common;

use candle_core::DType;
use common::micro_config;
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::init::{init_checkpoint, BUILTIN_CORPUS};
use difinfo_trainer::pretrained::load_model;
use difinfo_trainer::tokenize::{load_preferences, TokenizeOptions, TokenizerBundle};
use difinfo_trainer::train::checkpoint::latest_checkpoint;
use difinfo_trainer::train::TrainModel;
use difinfo_trainer::train::{
    Dataset, Examples, Objective, OptimizerKind, PolicyModel, PreferencePair, SchedulerType,
    Sequence, TrainConfig, Trainer,
};

/// A checkpoint in `dir`, the model loaded from it, and the example pairs tokenized.
fn setup(dir: &Path, arch: Architecture, n: usize) -> (TrainModel, Dataset) {
    init_checkpoint(dir, micro_config(arch), BUILTIN_CORPUS, 3).unwrap();
    let model = load_model(dir, DType::F32, &common::device()).unwrap();
    let tok = TokenizerBundle::load(dir).unwrap();
    let opts = TokenizeOptions {
        max_length: Some(64),
        max_prompt_length: Some(32),
        ..Default::default()
    };
    let file = common::data_file("example_prefs.jsonl");
    let data = load_preferences(&tok, &file, &opts, false).unwrap();
    let conv = |s: difinfo_trainer::batch::Sequence| Sequence {
        ids: s.ids,
        completion_start: s.completion_start,
    };
    let pairs: Vec<PreferencePair> = data
        .examples
        .iter()
        .take(n)
        .map(|e| PreferencePair {
            chosen: conv(e.value.chosen_sequence()),
            rejected: conv(e.value.rejected_sequence()),
        })
        .collect();
    let ds = Dataset {
        examples: Examples::Preference(pairs),
        pad_id: tok.pad_id(),
        settings: format!("{opts:?}"),
    };
    (TrainModel::new(model, dir.to_path_buf(), DType::F32), ds)
}

fn weights(m: &impl PolicyModel) -> Vec<Vec<f32>> {
    m.named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn adapter_log_probs_equal_the_trainers() {
    let ck = tempfile::tempdir().unwrap();
    let (m, ds) = setup(ck.path(), Architecture::Llama, 6);
    let pairs = ds.pairs().unwrap();
    let seqs: Vec<&Sequence> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let b =
        difinfo_trainer::train::Batch::for_training(&seqs, ds.pad_id, &common::device()).unwrap();
    let got = m.sequence_logps(&b).unwrap().sum.to_vec1::<f32>().unwrap();
    let theirs: Vec<difinfo_trainer::batch::Sequence> = seqs
        .iter()
        .map(|s| difinfo_trainer::batch::Sequence {
            ids: s.ids.clone(),
            completion_start: s.completion_start,
        })
        .collect();
    let want = difinfo_trainer::logps::sequence_logps(&m.model, &theirs, ds.pad_id).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

#[test]
fn dpo_and_dpo_pg_train_a_tiny_llama_and_qwen2() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for objective in [Objective::default(), Objective::dpo_pg(0.1).unwrap()] {
            let (ck, run) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (m, ds) = setup(ck.path(), arch, 8);
            let cfg = TrainConfig {
                objective: objective.clone(),
                output_dir: run.path().to_path_buf(),
                learning_rate: 3e-3,
                optim: OptimizerKind::Rmsprop,
                lr_scheduler_type: SchedulerType::ConstantWithWarmup,
                per_device_train_batch_size: 8,
                max_steps: 12,
                logging_steps: 1,
                save_steps: 0,
                ..TrainConfig::default()
            };
            let mut t = Trainer::new(&m, cfg, ds).unwrap();
            let s = t.train().unwrap();
            let recs = t.metrics().read().unwrap();
            let first = &recs[0];
            let last = &recs[recs.len() - 1];
            let f =
                |r: &serde_json::Map<String, serde_json::Value>, k: &str| r[k].as_f64().unwrap();
            eprintln!(
                "{arch:?} {}: loss {:.4} → {:.4}, margins {:.4}, logps/chosen {:.2} → {:.2}, logps/rejected {:.2} → {:.2}, tok/s {:.0}, active {:?}",
                objective.label(), f(first, "loss"), f(last, "loss"), f(last, "rewards/margins"), f(first, "logps/chosen"), f(last, "logps/chosen"),
                f(first, "logps/rejected"), f(last, "logps/rejected"), f(last, "tokens_per_second"), s.projection_active_fraction
            );
            assert!((f(first, "loss") - std::f64::consts::LN_2).abs() < 1e-4);
            if objective == Objective::default() {
                assert!(f(last, "loss") < f(first, "loss") - 0.05);
            } else {
                assert!(f(last, "logps/chosen") > f(first, "logps/chosen"));
            }
            // The final checkpoint is a Hugging Face directory that loads back.
            let ckpt = latest_checkpoint(run.path()).unwrap().unwrap();
            assert!(ckpt.join("config.json").exists() && ckpt.join("tokenizer.json").exists());
            let back = load_model(&ckpt, DType::F32, &common::device()).unwrap();
            let back = TrainModel::new(back, ckpt.clone(), DType::F32);
            assert_eq!(weights(&back), weights(&m));
        }
    }
}

#[test]
fn exact_resume_on_the_real_model() {
    let ck = tempfile::tempdir().unwrap();
    let cfg = |dir: &Path| TrainConfig {
        objective: Objective::default(),
        output_dir: dir.to_path_buf(),
        learning_rate: 1e-3,
        optim: OptimizerKind::Adamw,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_steps: 1,
        per_device_train_batch_size: 3,
        gradient_accumulation_steps: 2,
        max_steps: 6,
        logging_steps: 2,
        save_steps: 3,
        ..TrainConfig::default()
    };
    let (ra, rb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ma, ds) = setup(ck.path(), Architecture::Llama, 12);
    Trainer::new(&ma, cfg(ra.path()), ds.clone())
        .unwrap()
        .train()
        .unwrap();
    let (mb, _) = setup(ck.path(), Architecture::Llama, 12);
    Trainer::new(&mb, cfg(rb.path()), ds.clone())
        .unwrap()
        .train_until(3)
        .unwrap();
    let (mc, _) = setup(ck.path(), Architecture::Llama, 12);
    Trainer::resume(&mc, cfg(rb.path()), ds, &rb.path().join("checkpoint-3"))
        .unwrap()
        .train()
        .unwrap();
    let strip = |d: &Path| -> Vec<serde_json::Map<String, serde_json::Value>> {
        difinfo_trainer::train::metrics::MetricsLog::new(d)
            .read()
            .unwrap()
            .into_iter()
            .map(|mut r| {
                r.remove("tokens_per_second");
                r
            })
            .collect()
    };
    assert_eq!(strip(ra.path()), strip(rb.path()));
    assert_eq!(weights(&ma), weights(&mc));
}
