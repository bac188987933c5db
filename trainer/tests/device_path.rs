//! The GPU's code path run on the CPU, and what scales training to larger models: the plain
//! candle ops (fused kernels off), the chunked LM head, gradient checkpointing, LoRA and bf16
//! compute over f32 weights. Log-probs, gradients and DPO steps through that path equal the
//! fused CPU path's (f32 to 1e-5 relative; 1e-4 when `DIFINFO_TEST_DEVICE=cuda` puts that path
//! on a GPU); checkpointed gradients are bit-identical to kept-activation ones on the CPU;
//! LoRA's gradients are the full model's gradient projected through the adapter.

mod common;

use common::max_abs;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use difinfo_trainer::batch::{Batch, Sequence};
use difinfo_trainer::config_json::{Architecture, ModelConfig};
use difinfo_trainer::fused::GradSink;
use difinfo_trainer::lora::LoraConfig;
use difinfo_trainer::model::Model;
use difinfo_trainer::pretrained::load_model;
use difinfo_trainer::tokenize::{load_preferences, TokenizeOptions, TokenizerBundle};
use difinfo_trainer::train::{
    Dataset, Examples, Objective, OptimizerKind, PolicyModel, PreferencePair, SchedulerType,
    TrainConfig, TrainModel, Trainer,
};

/// How a model runs: fused CPU kernels or plain candle ops, checkpointing, LoRA, the LM
/// head's chunk size, bf16 compute.
#[derive(Clone, Debug)]
struct Variant {
    fused: bool,
    ckpt: bool,
    lora: Option<LoraConfig>,
    chunk: Option<usize>,
    bf16: bool,
}

const FUSED: Variant = Variant {
    fused: true,
    ckpt: false,
    lora: None,
    chunk: None,
    bf16: false,
};

impl Variant {
    fn plain() -> Self {
        Variant {
            fused: false,
            ..FUSED
        }
    }
    fn ckpt(mut self) -> Self {
        self.ckpt = true;
        self
    }
    fn lora(mut self, c: &LoraConfig) -> Self {
        self.lora = Some(c.clone());
        self
    }
    fn chunk(mut self, n: usize) -> Self {
        self.chunk = Some(n);
        self
    }
    fn bf16(mut self) -> Self {
        self.bf16 = true;
        self
    }

    /// The checkpoint in `dir` loaded this way on `dev` (a gradient sink set, as the trainer
    /// does), with the adapters' `B` set to deterministic non-zero values (an untrained `B = 0`
    /// would hide `A`'s gradient).
    fn load(&self, dir: &Path, dtype: DType, dev: &Device) -> Model {
        let mut m = load_model(dir, dtype, dev).unwrap();
        m.set_fused_kernels(self.fused);
        m.set_gradient_checkpointing(self.ckpt);
        m.set_grad_sink(Some(GradSink::default()));
        if let Some(n) = self.chunk {
            m.set_head_chunk_elems(n);
        }
        if self.bf16 {
            m.set_compute_dtype(DType::BF16).unwrap();
        }
        if let Some(c) = &self.lora {
            m.add_lora(c.clone(), 5).unwrap();
            for (i, (name, v)) in m.lora_vars().into_iter().enumerate() {
                if name.contains("lora_B") {
                    v.set(&rand_like(&v, 100 + i as u64, 0.3)).unwrap();
                }
            }
        }
        m
    }
}

/// Uniform(−a, a) values of `v`'s shape, dtype and device.
fn rand_like(v: &Var, seed: u64, a: f64) -> Tensor {
    let n = v.elem_count();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a
        })
        .collect();
    Tensor::from_vec(data, v.shape(), v.device())
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap()
}

fn seqs() -> Vec<Sequence> {
    vec![
        Sequence {
            ids: vec![0, 17, 99, 3, 250, 41, 8, 77, 12, 5, 300, 1, 44, 45],
            completion_start: 3,
        },
        Sequence {
            ids: vec![0, 5, 6, 200, 31, 9],
            completion_start: 2,
        },
        Sequence {
            ids: (0..19).map(|i| (i * 37 % 311) as u32).collect(),
            completion_start: 6,
        },
    ]
}

/// A Llama with GQA (and optionally tied embeddings) in a temporary checkpoint.
fn checkpoint(tied: bool) -> (common::TempDir, ModelConfig) {
    let mut c = common::micro_config(Architecture::Llama);
    c.tie_word_embeddings = tied;
    common::checkpoint(c, 31)
}

/// Token log-probs (loss-masked, `[B, L−1]`, f64 on the CPU) and the gradients of a fixed
/// weighted sum of them with respect to the trainable variables (the adapters for LoRA).
fn logps_and_grads(m: &Model, b: &Batch) -> (Tensor, Vec<(String, Tensor)>) {
    let lp = m
        .token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
        .unwrap();
    let n = lp.elem_count();
    let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
    let w = Tensor::from_vec(w, lp.shape(), lp.device())
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    let loss = (&lp * &w).unwrap().sum_all().unwrap();
    assert!(m.grad_sink().is_some());
    let store = m.backward(&loss).unwrap();
    let vars = match m.lora_config() {
        Some(_) => m.lora_vars(),
        None => m.named_vars(),
    };
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let grads = vars
        .into_iter()
        .map(|(n, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (n, host(g))
        })
        .collect();
    (host(&lp), grads)
}

/// `max |a − b| / max |b|` (0 when both are 0).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = max_abs(&(a - b).unwrap());
    let s = max_abs(b);
    if s == 0.0 {
        d
    } else {
        d / s
    }
}

/// `‖a − b‖ / ‖b‖` (Frobenius norms).
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - b).unwrap()) / norm(b).max(f64::MIN_POSITIVE)
}

/// The relative tolerance of f32 comparisons with the test device's plain path.
fn f32_tol() -> f64 {
    if common::device().is_cpu() {
        1e-5
    } else {
        1e-4
    }
}

/// Compares two runs' log-probs and gradients: relative difference at most `tol` each.
fn assert_close(
    what: &str,
    (lp_a, g_a): &(Tensor, Vec<(String, Tensor)>),
    (lp_b, g_b): &(Tensor, Vec<(String, Tensor)>),
    tol: f64,
) {
    let d = rel(lp_a, lp_b);
    assert!(d <= tol, "{what}: log-probs differ by {d:e} (relative)");
    assert_eq!(g_a.len(), g_b.len());
    for ((n, a), (_, b)) in g_a.iter().zip(g_b) {
        let d = rel(a, b);
        assert!(d <= tol, "{what}: ∂{n} differs by {d:e} (relative)");
    }
}

/// Bit-identical log-probs and gradients.
fn assert_identical(
    what: &str,
    (lp_a, g_a): &(Tensor, Vec<(String, Tensor)>),
    (lp_b, g_b): &(Tensor, Vec<(String, Tensor)>),
) {
    let bits = |t: &Tensor| -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(bits(lp_a), bits(lp_b), "{what}: log-probs");
    for ((n, a), (_, b)) in g_a.iter().zip(g_b) {
        assert_eq!(bits(a), bits(b), "{what}: ∂{n} not bit-identical");
    }
}

/// The plain-candle path (what CUDA runs: plain ops, chunked head, checkpointing) equals the
/// fused CPU path in f32: log-probs and every variable's gradient, tied and untied heads.
#[test]
fn plain_path_equals_fused_path_f32() {
    for tied in [false, true] {
        let (dir, _) = checkpoint(tied);
        let cpu = Device::Cpu;
        let dev = common::device();
        let b_cpu = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
        let b_dev = Batch::from_sequences(&seqs(), 2, &dev).unwrap();
        let reference = logps_and_grads(&FUSED.load(dir.path(), DType::F32, &cpu), &b_cpu);
        for v in [
            Variant::plain(),
            Variant::plain().ckpt(),
            // Rows of 16 by vocabulary chunks of 4: the online log-sum-exp over 80 chunks.
            Variant::plain().ckpt().chunk(64),
        ] {
            let got = logps_and_grads(&v.load(dir.path(), DType::F32, &dev), &b_dev);
            assert_close(&format!("tied {tied} {v:?}"), &got, &reference, f32_tol());
        }
    }
}

/// Qwen3 (q/k norms, a window on one layer) and Gemma2 (soft-caps, output norms, GeGLU,
/// scaled embedding): the plain path, with checkpointing and a chunked soft-capped LM head,
/// and LoRA on every projection equal the fused path (f32); checkpointing changes no bit on
/// the CPU.
#[test]
fn qwen3_gemma2_plain_checkpointed_lora_equal_fused() {
    let cfg = LoraConfig::new(4, 8.0, 0.0, &["all-linear".into()], false).unwrap();
    for arch in [Architecture::Qwen3, Architecture::Gemma2] {
        let (dir, _) = common::checkpoint(common::micro_config(arch), 31);
        let cpu = Device::Cpu;
        let dev = common::device();
        let b_cpu = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
        let b_dev = Batch::from_sequences(&seqs(), 2, &dev).unwrap();
        for lora in [false, true] {
            let with = |v: Variant| if lora { v.lora(&cfg) } else { v };
            let reference =
                logps_and_grads(&with(FUSED).load(dir.path(), DType::F32, &cpu), &b_cpu);
            for v in [
                Variant::plain(),
                Variant::plain().ckpt(),
                Variant::plain().ckpt().chunk(64),
            ] {
                let v = with(v);
                let got = logps_and_grads(&v.load(dir.path(), DType::F32, &dev), &b_dev);
                assert_close(&format!("{arch:?} {v:?}"), &got, &reference, f32_tol());
            }
            let ckpt = with(FUSED.ckpt());
            let got = logps_and_grads(&ckpt.load(dir.path(), DType::F32, &cpu), &b_cpu);
            assert_identical(&format!("{arch:?} {ckpt:?}"), &got, &reference);
        }
    }
}

/// LoRA on every projection with dropout: the fused layer node and the plain path draw the
/// same masks and agree (f32); the adapters are the only variables with gradients.
#[test]
fn lora_plain_path_equals_fused_path_f32() {
    let (dir, _) = checkpoint(true);
    let cfg = LoraConfig::new(4, 8.0, 0.25, &["all-linear".into()], false).unwrap();
    let cpu = Device::Cpu;
    let dev = common::device();
    let b_cpu = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
    let b_dev = Batch::from_sequences(&seqs(), 2, &dev).unwrap();
    let run = |v: &Variant, d: &Device, b: &Batch| {
        let m = v.load(dir.path(), DType::F32, d);
        m.set_dropout_seed(Some(77));
        let out = logps_and_grads(&m, b);
        assert_eq!(
            out.1.len(),
            2 * 7 * 2,
            "two adapters per projection and layer"
        );
        out
    };
    let reference = run(&FUSED.lora(&cfg), &cpu, &b_cpu);
    let plain = run(&Variant::plain().ckpt().lora(&cfg), &dev, &b_dev);
    assert_close("LoRA plain + checkpointing", &plain, &reference, f32_tol());
    // Dropout is on: another seed changes the result.
    let m = FUSED.lora(&cfg).load(dir.path(), DType::F32, &cpu);
    m.set_dropout_seed(Some(78));
    let other = logps_and_grads(&m, &b_cpu);
    assert!(rel(&other.0, &reference.0) > 1e-4);
    // Without a seed (evaluation) there is no dropout: the plain path without dropout agrees.
    let m = FUSED.lora(&cfg).load(dir.path(), DType::F32, &cpu);
    let eval = logps_and_grads(&m, &b_cpu);
    let m = Variant::plain()
        .lora(&cfg)
        .load(dir.path(), DType::F32, &dev);
    assert_close("LoRA eval", &logps_and_grads(&m, &b_dev), &eval, f32_tol());
}

/// Gradient checkpointing changes no bit of the log-probs or gradients on the CPU: the fused
/// layer node, the plain path, and both with LoRA (dropout on).
#[test]
fn checkpointed_gradients_are_bit_identical() {
    let (dir, _) = checkpoint(false);
    let cpu = Device::Cpu;
    let b = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
    let cfg = LoraConfig::new(2, 4.0, 0.1, &["q_proj".into(), "down_proj".into()], false).unwrap();
    for dtype in [DType::F32, DType::F64] {
        for base in [FUSED, Variant::plain()] {
            for v in [base.clone(), base.clone().lora(&cfg)] {
                let run = |v: &Variant| {
                    let m = v.load(dir.path(), dtype, &cpu);
                    m.set_dropout_seed(Some(3));
                    logps_and_grads(&m, &b)
                };
                let kept = run(&v);
                let recomputed = run(&v.clone().ckpt());
                assert_identical(&format!("{dtype:?} {v:?}"), &recomputed, &kept);
            }
        }
    }
}

/// The LM head in small chunks (recomputed in backward) equals the one-chunk head, fused
/// and plain, in f64.
#[test]
fn chunked_lm_head_equals_one_chunk_f64() {
    let (dir, _) = checkpoint(true);
    let cpu = Device::Cpu;
    let b = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
    for base in [FUSED, Variant::plain()] {
        let whole = logps_and_grads(&base.load(dir.path(), DType::F64, &cpu), &b);
        for elems in [1, 64, 320 * 5, 320 * 17] {
            let v = base.clone().chunk(elems);
            let got = logps_and_grads(&v.load(dir.path(), DType::F64, &cpu), &b);
            assert_close(&format!("{v:?}"), &got, &whole, 1e-12);
        }
    }
}

/// bf16 compute over f32 weights on the plain path with checkpointing and LoRA (what a GPU
/// run with `--bf16 --gradient-checkpointing --use-peft` does): gradients come back in f32
/// and track the f32 run to bf16's precision.
#[test]
fn bf16_compute_with_f32_master_weights_on_the_plain_path() {
    // Weights at a real model's initialization scale (0.02, not the micro models' 0.2, whose
    // peaked attention amplifies bf16's rounding of the scores).
    let mut c = common::micro_config(Architecture::Llama);
    c.tie_word_embeddings = true;
    c.initializer_range = 0.02;
    let (dir, _) = common::checkpoint(c, 31);
    let dev = common::device();
    let b = Batch::from_sequences(&seqs(), 2, &dev).unwrap();
    let cfg = LoraConfig::new(4, 8.0, 0.0, &["all-linear".into()], false).unwrap();
    for v in [Variant::plain().ckpt(), Variant::plain().ckpt().lora(&cfg)] {
        let f32_run = logps_and_grads(&v.load(dir.path(), DType::F32, &dev), &b);
        let m = v.clone().bf16().load(dir.path(), DType::F32, &dev);
        let vars = match m.lora_config() {
            Some(_) => m.lora_vars(),
            None => m.named_vars(),
        };
        assert!(vars.iter().all(|(_, v)| v.dtype() == DType::F32));
        let (lp, g) = logps_and_grads(&m, &b);
        // bf16 keeps 8 significant bits (rounding 2⁻⁸ ≈ 0.4 % per value), compounded over
        // the forward and backward passes: log-probs and each gradient as a whole (relative
        // L2 distance) within a few percent, as `gradients.rs`'s mixed-precision test allows
        // for the loss. Measured: weights' gradients < 1 %, the adapters' 1.5–3.4 % (their
        // products of two rounded factors); in f16 (3 more bits) the adapters' fall to
        // ≤ 0.6 %, so this is rounding, not a missing term.
        let d = rel_l2(&lp, &f32_run.0);
        assert!(d < 0.02, "bf16 {v:?}: log-probs off by {d:e}");
        for ((n, a), (_, b)) in g.iter().zip(&f32_run.1) {
            let d = rel_l2(a, b);
            assert!(d < 0.05, "bf16 {v:?}: ∂{n} off by {d:e} (relative L2)");
        }
    }
}

/// LoRA's gradients are the full model's gradient projected through the adapter: with
/// `W' = W + s B A`, `∂A = s Bᵀ ∂W'` and `∂B = s ∂W' Aᵀ`, where `∂W'` is the gradient of the
/// merged model (f64, fused and plain paths); and they match central finite differences.
#[test]
fn lora_gradients_are_the_full_gradient_projected_through_the_adapter() {
    let (dir, _) = checkpoint(false);
    let cpu = Device::Cpu;
    let b = Batch::from_sequences(&seqs(), 2, &cpu).unwrap();
    let cfg = LoraConfig::new(3, 6.0, 0.0, &["q_proj".into(), "up_proj".into()], false).unwrap();
    let s = cfg.scale();
    for base in [FUSED, Variant::plain()] {
        let m = base.clone().lora(&cfg).load(dir.path(), DType::F64, &cpu);
        let (lp, g_lora) = logps_and_grads(&m, &b);
        // The merged model (a second copy: merging writes into the weights): the same
        // function, every weight trainable.
        let mut merged = base.clone().lora(&cfg).load(dir.path(), DType::F64, &cpu);
        merged.merge_lora().unwrap();
        let (lp_merged, g_full) = logps_and_grads(&merged, &b);
        assert!(rel(&lp, &lp_merged) < 1e-12, "merged model's log-probs");
        let full: std::collections::BTreeMap<_, _> = g_full.into_iter().collect();
        let adapters: std::collections::BTreeMap<_, _> = m.lora_vars().into_iter().collect();
        let grads: std::collections::BTreeMap<_, _> = g_lora.into_iter().collect();
        for (layer, proj) in [(0, "self_attn.q_proj"), (1, "mlp.up_proj")] {
            let m_name = format!("base_model.model.model.layers.{layer}.{proj}");
            let a = adapters[&format!("{m_name}.lora_A.weight")].as_tensor();
            let bm = adapters[&format!("{m_name}.lora_B.weight")].as_tensor();
            let gw = &full[&format!("model.layers.{layer}.{proj}.weight")];
            let want_a = (bm.t().unwrap().matmul(gw).unwrap() * s).unwrap();
            let want_b = (gw.matmul(&a.t().unwrap()).unwrap() * s).unwrap();
            let got_a = &grads[&format!("{m_name}.lora_A.weight")];
            let got_b = &grads[&format!("{m_name}.lora_B.weight")];
            assert!(rel(got_a, &want_a) < 1e-10, "{base:?} ∂A of {m_name}");
            assert!(rel(got_b, &want_b) < 1e-10, "{base:?} ∂B of {m_name}");
            assert!(max_abs(got_a) > 1e-6 && max_abs(got_b) > 1e-6);
        }
        // Finite differences on a few adapter entries.
        let loss = |m: &Model| -> f64 {
            let (lp, _) = logps_and_grads(m, &b);
            let n = lp.elem_count();
            let w: Vec<f64> = (0..n).map(|i| 1.0 + (i % 7) as f64 * 0.25).collect();
            (lp.flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .iter()
                .zip(&w)
                .map(|(a, b)| a * b)
                .sum()
        };
        for (name, idx) in [
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                5,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
                17,
            ),
        ] {
            let v = &adapters[name];
            let orig: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-5;
            let at = |x: f64| {
                let mut d = orig.clone();
                d[idx] = x;
                v.set(&Tensor::from_vec(d, v.shape(), &cpu).unwrap())
                    .unwrap();
                loss(&m)
            };
            let fd = (at(orig[idx] + eps) - at(orig[idx] - eps)) / (2.0 * eps);
            at(orig[idx]);
            let an: f64 = grads[name].flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
            assert!(
                (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                "{base:?} {name}[{idx}]: finite difference {fd} vs {an}"
            );
        }
    }
}

/// Tokenized example pairs and the checkpoint's tokenizer pad id.
fn pairs(dir: &Path, n: usize) -> Dataset {
    let tok = TokenizerBundle::load(dir).unwrap();
    let opts = TokenizeOptions {
        max_length: Some(64),
        max_prompt_length: Some(32),
        ..Default::default()
    };
    let file = common::data_file("example_prefs.jsonl");
    let data = load_preferences(&tok, &file, &opts, false).unwrap();
    let conv = |s: Sequence| difinfo_trainer::train::Sequence {
        ids: s.ids,
        completion_start: s.completion_start,
    };
    Dataset {
        examples: Examples::Preference(
            data.examples
                .iter()
                .take(n)
                .map(|e| PreferencePair {
                    chosen: conv(e.value.chosen_sequence()),
                    rejected: conv(e.value.rejected_sequence()),
                })
                .collect(),
        ),
        pad_id: tok.pad_id(),
        settings: format!("{opts:?}"),
    }
}

fn dpo_config(out: &Path, objective: Objective, steps: i64) -> TrainConfig {
    TrainConfig {
        objective,
        output_dir: out.to_path_buf(),
        learning_rate: 2e-3,
        optim: OptimizerKind::Adamw,
        lr_scheduler_type: SchedulerType::Constant,
        per_device_train_batch_size: 4,
        max_steps: steps,
        logging_steps: 1,
        save_steps: 2,
        ..TrainConfig::default()
    }
}

/// `(loss, grad_norm, logps/chosen)` of each step, and the final trainable weights (CPU).
type Steps = (Vec<[f64; 3]>, Vec<(String, Tensor)>);

fn train(model: &TrainModel, cfg: TrainConfig, data: Dataset) -> Steps {
    let mut t = Trainer::new(model, cfg, data).unwrap();
    let mut steps = Vec::new();
    while let Some(r) = t.train_step().unwrap() {
        steps.push([r.loss, r.grad_norm, r.preference[0].logps_chosen]);
    }
    let w = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().to_device(&Device::Cpu).unwrap()))
        .collect();
    (steps, w)
}

fn assert_steps_close(what: &str, a: &Steps, b: &Steps, tol: f64) {
    assert_eq!(a.0.len(), b.0.len());
    for (i, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        for k in 0..3 {
            let d = (x[k] - y[k]).abs() / y[k].abs().max(1e-12);
            assert!(
                d <= tol,
                "{what}: step {} metric {k}: {} vs {}",
                i + 1,
                x[k],
                y[k]
            );
        }
    }
    for ((n, x), (_, y)) in a.1.iter().zip(&b.1) {
        let d = rel(x, y);
        assert!(d <= tol, "{what}: final {n} differs by {d:e}");
    }
}

/// Three DPO steps (and DPO-PG, and LoRA DPO with dropout) through the plain path with
/// checkpointing and a chunked head equal the fused path's: losses, gradient norms,
/// log-probs and the final weights, f32 to 1e-5 relative.
#[test]
fn dpo_steps_through_the_plain_path_equal_the_fused_path() {
    let (dir, _) = checkpoint(true);
    let data = pairs(dir.path(), 8);
    let cfg_lora = LoraConfig::new(4, 8.0, 0.1, &["all-linear".into()], false).unwrap();
    let dev = common::device();
    for (objective, lora) in [
        (Objective::dpo(0.1).unwrap(), None),
        (Objective::dpo_pg(0.1).unwrap(), None),
        (Objective::dpo(0.1).unwrap(), Some(&cfg_lora)),
    ] {
        let objective = &objective;
        let run = |v: Variant, d: &Device| {
            let mut v = v;
            v.lora = None;
            let mut m = v.load(dir.path(), DType::F32, d);
            if let Some(c) = lora {
                m.add_lora(c.clone(), 9).unwrap();
            }
            let tm = TrainModel::new(m, dir.path().to_path_buf(), DType::F32);
            let out = common::TempDir::new();
            // SGD: the update is linear in the gradient. (AdamW's first steps move each
            // weight by about ±lr whatever its gradient's size, so a gradient element at
            // rounding level, e.g. of a LoRA B still near zero, could flip its weight's step.)
            let mut cfg = dpo_config(out.path(), objective.clone(), 3);
            cfg.optim = OptimizerKind::Sgd;
            cfg.learning_rate = 0.05;
            train(&tm, cfg, data.clone())
        };
        let fused = run(FUSED, &Device::Cpu);
        let plain = run(Variant::plain().ckpt().chunk(640), &dev);
        assert_steps_close(
            &format!("{objective:?} LoRA {}", lora.is_some()),
            &plain,
            &fused,
            f32_tol(),
        );
    }
}

/// LoRA DPO (TRL's defaults: r 16, α 32, dropout 0.05, q/v projections) lowers the loss, and
/// only the adapters change: the base weights stay bit for bit.
#[test]
fn lora_dpo_lowers_the_loss_and_trains_only_the_adapters() {
    let (dir, _) = checkpoint(false);
    let data = pairs(dir.path(), 8);
    let mut m = FUSED.load(dir.path(), DType::F32, &Device::Cpu);
    let before: Vec<Vec<f32>> = m
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    m.add_lora(LoraConfig::default(), 1).unwrap();
    let tm = TrainModel::new(m, dir.path().to_path_buf(), DType::F32);
    let out = common::TempDir::new();
    let mut cfg = dpo_config(out.path(), Objective::dpo(0.1).unwrap(), 12);
    cfg.learning_rate = 5e-3;
    cfg.per_device_train_batch_size = 8;
    let (steps, _) = train(&tm, cfg, data);
    let (first, last) = (steps[0][0], steps[steps.len() - 1][0]);
    eprintln!("LoRA DPO loss {first:.4} → {last:.4}");
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5);
    assert!(last < first - 0.05, "loss {first} → {last}");
    let after: Vec<Vec<f32>> = tm
        .model
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(before, after, "the base weights changed");
}

/// A LoRA run saves PEFT's format; resuming it reproduces the uninterrupted run exactly
/// (dropout masks included); `merge` folds the adapter into a checkpoint whose log-probs are
/// the adapter model's; the reference is the base model.
#[test]
fn lora_checkpoints_resume_exactly_and_merge() {
    let (dir, _) = checkpoint(false);
    let data = pairs(dir.path(), 8);
    let cfg = LoraConfig::new(
        4,
        8.0,
        0.2,
        &["q_proj".into(), "v_proj".into(), "down_proj".into()],
        true,
    )
    .unwrap();
    let fresh = || {
        let mut m = FUSED.load(dir.path(), DType::F32, &Device::Cpu);
        m.add_lora(cfg.clone(), 42).unwrap();
        TrainModel::new(m, dir.path().to_path_buf(), DType::F32)
    };
    // 4 steps straight.
    let (full_out, part_out) = (common::TempDir::new(), common::TempDir::new());
    let straight = train(
        &fresh(),
        dpo_config(full_out.path(), Objective::dpo(0.1).unwrap(), 4),
        data.clone(),
    );
    // 2 steps, then a fresh model resumed from checkpoint-2 for 2 more.
    let m1 = fresh();
    let mut t = Trainer::new(
        &m1,
        dpo_config(part_out.path(), Objective::dpo(0.1).unwrap(), 2),
        data.clone(),
    )
    .unwrap();
    let mut steps = Vec::new();
    while let Some(r) = t.train_step().unwrap() {
        steps.push([r.loss, r.grad_norm, r.preference[0].logps_chosen]);
    }
    drop(t);
    let ck = part_out.join("checkpoint-2");
    assert!(ck.join("adapter_config.json").exists());
    assert!(ck.join("adapter_model.safetensors").exists());
    assert!(ck.join("tokenizer.json").exists());
    assert!(
        !ck.join("model.safetensors").exists(),
        "a LoRA checkpoint holds the adapter only"
    );
    let m2 = fresh();
    let mut t = Trainer::resume(
        &m2,
        dpo_config(part_out.path(), Objective::dpo(0.1).unwrap(), 4),
        data,
        &ck,
    )
    .unwrap();
    while let Some(r) = t.train_step().unwrap() {
        steps.push([r.loss, r.grad_norm, r.preference[0].logps_chosen]);
    }
    assert_eq!(steps, straight.0, "resumed metrics");
    for ((n, a), (_, b)) in m2.named_vars().iter().zip(&straight.1) {
        let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "resumed {n}");
    }
    // PEFT's adapter_config.json.
    let last = full_out.join("checkpoint-4");
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(js["peft_type"], "LORA");
    assert_eq!(js["task_type"], "CAUSAL_LM");
    assert_eq!(js["r"], 4);
    assert_eq!(js["lora_alpha"], 8);
    assert_eq!(js["use_rslora"], true);
    assert_eq!(
        js["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let names: Vec<String> = difinfo_trainer::lora::read_weights(&last, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(
        names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string())
    );
    assert_eq!(names.len(), 2 * 2 * 3);
    // Merge: the merged checkpoint's log-probs are the trained adapter model's.
    let merged_dir = common::TempDir::new();
    let base =
        difinfo_trainer::pretrained::merge_adapter(&last, None, merged_dir.path(), DType::F32)
            .unwrap();
    assert_eq!(base, std::fs::canonicalize(dir.path()).unwrap());
    let merged = load_model(merged_dir.path(), DType::F32, &Device::Cpu).unwrap();
    let trained = fresh();
    trained.load_weights(&last).unwrap();
    let b = Batch::from_sequences(&seqs(), 2, &Device::Cpu).unwrap();
    let lp = |m: &Model| {
        m.sequence_logps(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (x, y) = (lp(&merged), lp(&trained.model));
    for (a, b) in x.iter().zip(&y) {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "merged {a} vs adapter {b}"
        );
    }
    // The trained adapter moved the log-probs; the reference (adapters off) is the base.
    let base_model = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let z = lp(&base_model);
    assert!(x.iter().zip(&z).any(|(a, b)| (a - b).abs() > 1e-3));
    let tb = difinfo_trainer::train::Batch::for_training(
        &seqs()
            .iter()
            .map(|s| difinfo_trainer::train::Sequence {
                ids: s.ids.clone(),
                completion_start: s.completion_start,
            })
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
        2,
        &Device::Cpu,
    )
    .unwrap();
    let r: Vec<f32> = trained.reference_logps(&tb).unwrap().sum.to_vec1().unwrap();
    for (a, b) in r.iter().zip(&z) {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "reference {a} vs base {b}"
        );
    }
}
