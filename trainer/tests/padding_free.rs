//! Padding-free batches (`--padding-free`): the sequences of a batch packed into one row
//! (positions restarting at 0, a block-diagonal causal mask, windows within a sequence) give
//! the padded batch's log-probs and gradients, on the fused and the plain path, with and
//! without the whole-layer node (gradient sink), with gradient checkpointing, in f32 and f64.

mod common;

use candle_core::{DType, Tensor};
use difinfo_trainer::batch::{Batch, Sequence};
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::train::adapter::TrainModel;
use difinfo_trainer::train::PolicyModel;

/// Four sequences of different lengths, longer than the micro configs' window (5).
fn sequences() -> Vec<Sequence> {
    let ids = |n: usize, k: u32| (0..n as u32).map(|i| (i * 37 + k * 11) % 320).collect();
    vec![
        Sequence {
            ids: ids(11, 1),
            completion_start: 4,
        },
        Sequence {
            ids: ids(3, 2),
            completion_start: 1,
        },
        Sequence {
            ids: ids(14, 3),
            completion_start: 6,
        },
        Sequence {
            ids: ids(8, 4),
            completion_start: 0,
        },
    ]
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b| / max(1, max |a|)`.
fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Every variable's gradient, by name.
type NamedGrads = Vec<(String, Vec<f64>)>;

/// The per-token log-probs `[B, L−1]`, their sums and every variable's gradient of
/// `Σ_b w_b · logp_b`.
fn run(tm: &TrainModel, batch: &Batch) -> (Vec<f64>, Vec<f64>, NamedGrads) {
    let s = tm.sequence_logps(batch).unwrap();
    let w = Tensor::new(&[1.0f64, -0.5, 0.25, 2.0], tm.model.device())
        .unwrap()
        .to_dtype(s.sum.dtype())
        .unwrap();
    let loss = (&s.sum * w).unwrap().sum_all().unwrap();
    let store = tm.backward(&loss).unwrap();
    let grads = tm
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (n, values(g))
        })
        .collect();
    (values(&s.tokens), values(&s.sum), grads)
}

fn check(arch: Architecture, dtype: DType) {
    let (tol_lp, tol_g) = if dtype == DType::F64 {
        (1e-10, 1e-10)
    } else {
        (1e-5, 1e-5)
    };
    let seqs = sequences();
    for fused in [true, false] {
        for (sink, ckpt) in [(false, false), (true, false), (true, true)] {
            let (_dir, mut m) = common::model(common::micro_config(arch), dtype, 7);
            m.set_fused_kernels(fused);
            m.set_gradient_checkpointing(ckpt);
            let mut tm = TrainModel::new(m, "<test>".into(), dtype);
            if !sink {
                tm.model.set_grad_sink(None);
            }
            let batch = Batch::for_training(&seqs, 0, tm.model.device()).unwrap();
            let padded = run(&tm, &batch);
            tm.model.set_padding_free(true);
            let packed = run(&tm, &batch);
            let what = format!("{arch:?} {dtype:?} fused {fused} sink {sink} checkpointing {ckpt}");
            let d = rel_diff(&padded.0, &packed.0);
            assert!(d <= tol_lp, "{what}: token log-probs differ by {d:e}");
            let d = rel_diff(&padded.1, &packed.1);
            assert!(d <= tol_lp, "{what}: summed log-probs differ by {d:e}");
            assert!(padded.1.iter().all(|x| x.is_finite() && *x < 0.0), "{what}");
            for ((n, a), (_, b)) in padded.2.iter().zip(&packed.2) {
                let d = rel_diff(a, b);
                assert!(d <= tol_g, "{what}: gradient of {n} differs by {d:e}");
            }
            // The reference pass: detached, and with the adapters off.
            let a = tm.reference_logps(&batch).unwrap();
            tm.model.set_padding_free(false);
            let b = tm.reference_logps(&batch).unwrap();
            let d = rel_diff(&values(&b.sum), &values(&a.sum));
            assert!(d <= tol_lp, "{what}: reference log-probs differ by {d:e}");
        }
    }
}

#[test]
fn packed_equals_padded_llama_f32() {
    check(Architecture::Llama, DType::F32);
}

#[test]
fn packed_equals_padded_llama_f64() {
    check(Architecture::Llama, DType::F64);
}

#[test]
fn packed_equals_padded_mistral_window_f32() {
    check(Architecture::Mistral, DType::F32);
}

#[test]
fn packed_equals_padded_mistral_window_f64() {
    check(Architecture::Mistral, DType::F64);
}

#[test]
fn packed_equals_padded_qwen3_layer_window_f64() {
    check(Architecture::Qwen3, DType::F64);
}

#[test]
fn packed_equals_padded_gemma2_f64() {
    check(Architecture::Gemma2, DType::F64);
}

/// The packed row: positions restart, each sequence's last target is masked, and the
/// unpacked layout is the padded one.
#[test]
fn packed_layout() {
    let seqs = sequences();
    let b = Batch::for_training(&seqs, 0, &candle_core::Device::Cpu).unwrap();
    let p = b.packed().unwrap();
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    assert_eq!(p.input_ids.dims(), [1, total]);
    assert_eq!(&p.positions[..12], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]);
    let lm = values(&p.loss_mask);
    // Targets 10 (sequence 0's last → sequence 1's first) and 13 (1's last) are masked.
    assert_eq!(lm[10], 0.0);
    assert_eq!(lm[13], 0.0);
    assert_eq!(
        lm.iter().sum::<f64>(),
        values(&b.loss_mask).iter().sum::<f64>()
    );
    assert_eq!(
        values(&p.unpack(&p.loss_mask).unwrap()),
        values(&b.loss_mask)
    );
}

fn example_prefs() -> std::path::PathBuf {
    common::data_file("example_prefs.jsonl")
}

/// The numbers of a run's metrics records (timing left out), key by key. The first step's
/// reward accuracy is left out: there the policy is the reference, every reward is 0 up to
/// rounding, and `chosen > rejected` compares rounding errors (a packed sequence's log-prob
/// depends on its neighbours in the row at the last bits, a padded row's does not).
fn metric_values(run: &std::path::Path) -> Vec<(String, f64)> {
    common::metrics_without_timing(run)
        .into_iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.into_iter()
                .filter(move |(k, _)| !(i == 0 && k == "rewards/accuracies"))
                .filter_map(move |(k, v)| v.as_f64().map(|x| (format!("{i}:{k}"), x)))
        })
        .collect()
}

/// The reference cache's tensors of a run directory, by name.
fn ref_cache(run: &std::path::Path) -> Vec<(String, Vec<f64>)> {
    let mut files: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let n = p.file_name()?.to_str()?.to_string();
            (n.starts_with("ref_logps-") && n.ends_with(".safetensors")).then_some(p)
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let mut t: Vec<_> = candle_core::safetensors::load(&f, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(t.into_iter().map(|(n, t)| (n, values(&t))));
    }
    out
}

/// A few steps of `args` with and without `--padding-free`: the same metrics (1e-5
/// relative) and the same reference cache.
fn same_run(args: &[&str], steps: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let sft = common::sft_from_prefs(tmp.path());
    let mut runs = Vec::new();
    for pf in ["false", "true"] {
        let out = tmp.path().join(format!("run-{pf}"));
        let data = if args[0] == "sft" {
            sft.clone()
        } else {
            example_prefs()
        };
        let steps = steps.to_string();
        let mut a: Vec<&str> = args.to_vec();
        a.extend([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            &steps,
            "--logging-steps",
            "1",
            "--per-device-train-batch-size",
            "3",
            "--learning-rate",
            "1e-3",
            "--max-length",
            "96",
            "--padding-free",
            pf,
        ]);
        let o = common::difinfo_train(&a);
        assert!(o.status.success(), "{a:?} failed");
        runs.push(out);
    }
    let (a, b) = (metric_values(&runs[0]), metric_values(&runs[1]));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= steps * 3, "{a:?}");
    for ((k, x), (k2, y)) in a.iter().zip(&b) {
        assert_eq!(k, k2);
        let d = (x - y).abs() / x.abs().max(1.0);
        assert!(d <= 1e-5, "{args:?}: {k} {x} padded, {y} padding-free");
    }
    let (a, b) = (ref_cache(&runs[0]), ref_cache(&runs[1]));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = rel_diff(x, y);
        assert!(d <= 1e-5, "{args:?}: reference cache {n} differs by {d:e}");
    }
}

#[test]
fn dpo_sigmoid_run_is_unchanged() {
    same_run(&["dpo"], 3);
}

#[test]
fn dpo_ipo_ld_wpo_run_is_unchanged() {
    // IPO's mean log-probs, LD-DPO's per-token split, WPO's per-token weights.
    same_run(&["dpo", "--loss-type", "ipo"], 2);
    same_run(&["dpo", "--ld-alpha", "0.5"], 2);
    same_run(&["dpo", "--use-weighting"], 2);
}

#[test]
fn dpo_pg_run_is_unchanged() {
    same_run(&["dpo", "--objective", "dpo-pg"], 2);
}

#[test]
fn sft_run_is_unchanged() {
    same_run(&["sft"], 3);
}

#[test]
fn lora_run_with_checkpointing_is_unchanged() {
    // The reference: the base model (adapters off). LoRA dropout draws its masks per row of
    // the layout (padded or packed), so the runs compare without it.
    same_run(
        &[
            "dpo",
            "--use-peft",
            "--gradient-checkpointing",
            "--lora-dropout",
            "0",
        ],
        2,
    );
}

/// `--ref-model`: the reference model packs its batches too.
#[test]
fn ref_model_run_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::tiny_model(&tmp.path().join("ref"));
    same_run(&["dpo", "--ref-model", reference.to_str().unwrap()], 2);
}

/// Reward modelling is refused with a clear error (a reward model scores padded rows).
#[test]
fn reward_refuses_padding_free() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let o = common::difinfo_train(&[
        "reward",
        "--model",
        model.to_str().unwrap(),
        "--data",
        example_prefs().to_str().unwrap(),
        "--output-dir",
        tmp.path().join("rm").to_str().unwrap(),
        "--max-steps",
        "1",
        "--padding-free",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("padding_free"), "{err}");
}
