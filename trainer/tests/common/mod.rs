//! Shared fixtures: tiny checkpoints built on the fly (random weights, a BPE tokenizer
//! trained on the built-in corpus), in temporary directories.
#![allow(dead_code)]

pub mod gguf;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use difinfo_trainer::config_json::{Architecture, ModelConfig};
use difinfo_trainer::init::{init_checkpoint, size_config, ModelSize, BUILTIN_CORPUS};
use difinfo_trainer::model::{Model, MASK_VALUE};
use difinfo_trainer::pretrained::load_model;
use difinfo_trainer::tokenize::TokenizerBundle;

/// A very small configuration of `arch` (GQA: 4 query heads over 2 key/value heads).
pub fn micro_config(arch: Architecture) -> ModelConfig {
    let mut c = size_config(ModelSize::Tiny);
    c.arch = arch;
    c.vocab_size = 320;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 8;
    c.max_position_embeddings = 256;
    c.initializer_range = 0.2;
    match arch {
        Architecture::Qwen2 => {
            c.qkv_bias = true;
            c.tie_word_embeddings = true;
        }
        Architecture::Mistral => c.sliding_window = Some(5),
        Architecture::Qwen3 => {
            // head_dim ≠ hidden / heads (8), a sliding window on the second layer.
            c.head_dim = 16;
            c.sliding_window = Some(5);
            c.sliding_layers = Some(vec![false, true]);
        }
        Architecture::Gemma2 => {
            c.head_dim = 16;
            c.tie_word_embeddings = true;
            c.query_pre_attn_scalar = Some(12.0);
            c.attn_logit_softcapping = Some(2.0);
            c.final_logit_softcapping = Some(3.0);
            c.sliding_window = Some(5);
            c.sliding_layers = Some(vec![true, false]);
        }
        Architecture::Llama => {}
    }
    c
}

/// A temporary directory that is removed on drop.
pub struct TempDir(pub tempfile::TempDir);

impl TempDir {
    pub fn new() -> Self {
        TempDir(tempfile::tempdir().expect("tempdir"))
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.path().join(p)
    }
}

/// Writes a checkpoint of `cfg` into a new temporary directory.
pub fn checkpoint(cfg: ModelConfig, seed: u64) -> (TempDir, ModelConfig) {
    let dir = TempDir::new();
    let cfg = init_checkpoint(dir.path(), cfg, BUILTIN_CORPUS, seed).expect("init checkpoint");
    (dir, cfg)
}

/// The device the tests run models on: `DIFINFO_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`; a
/// `cuda` value needs a build with `--features cuda`), the CPU by default.
/// `trainer/scripts/gpu_check.sh` runs the suite with `DIFINFO_TEST_DEVICE=cuda`.
pub fn device() -> Device {
    match std::env::var("DIFINFO_TEST_DEVICE") {
        Ok(d) if !d.is_empty() => difinfo_trainer::parse_device(&d)
            .unwrap_or_else(|e| panic!("DIFINFO_TEST_DEVICE={d}: {e}")),
        _ => Device::Cpu,
    }
}

/// A file of the repository's `data/` directory: under `DIFINFO_DATA_DIR` when set (test
/// binaries run away from their source tree, as `trainer/scripts/gpu_check.sh` does), else
/// next to this crate.
pub fn data_file(name: &str) -> PathBuf {
    match std::env::var_os("DIFINFO_DATA_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data")
            .join(name),
    }
}

/// A checkpoint and its model loaded in `dtype` on the test device ([`device`]).
pub fn model(cfg: ModelConfig, dtype: DType, seed: u64) -> (TempDir, Model) {
    let (dir, _) = checkpoint(cfg, seed);
    let m = load_model(dir.path(), dtype, &device()).expect("load model");
    (dir, m)
}

/// The tokenizer of a checkpoint directory.
pub fn tokenizer(dir: &Path) -> TokenizerBundle {
    TokenizerBundle::load(dir).expect("load tokenizer")
}

/// Writes `lines` into `name` under `dir`, returning the path.
pub fn write_lines(dir: &TempDir, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").expect("write");
    p
}

/// The JSON objects of a JSONL file.
pub fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Uniform(−2, 2) values of `shape` from SplitMix64 seeded with `seed`, in `dtype`:
/// deterministic without a RNG dependency.
pub fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    // SplitMix64 → uniform(−2, 2): deterministic without a RNG dependency.
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// An additive `[b, 1, l, l]` mask: causal, and batch entry `i`'s last `pad[i]` keys masked.
pub fn causal_and_padding_mask(b: usize, l: usize, pad: &[usize], dtype: DType) -> Tensor {
    let mut m = vec![0f64; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            for j in 0..l {
                if j > i || j >= l - pad[bi] {
                    m[(bi * l + i) * l + j] = MASK_VALUE;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, l, l), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Two sequences of a micro model's vocabulary (lengths 10 and 5, completions from 3 and 2):
/// a padded batch with prompt and completion positions.
pub fn two_sequences() -> Vec<difinfo_trainer::batch::Sequence> {
    use difinfo_trainer::batch::Sequence;
    vec![
        Sequence {
            ids: vec![0, 17, 99, 3, 250, 41, 8, 77, 12, 5],
            completion_start: 3,
        },
        Sequence {
            ids: vec![0, 5, 6, 200, 31],
            completion_start: 2,
        },
    ]
}

/// `max_i |t_i|` (exact: in f64).
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Runs the `difinfo-train` binary with `args`, echoing the command and its output to the
/// test's captured stderr (shown when the test fails).
pub fn difinfo_train(args: &[&str]) -> std::process::Output {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args(args)
        .output()
        .expect("run difinfo-train");
    eprintln!(
        "$ difinfo-train {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A tiny random Llama checkpoint (seed 0) in `dir/model`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    init_checkpoint(
        &m,
        difinfo_trainer::init::arch_config(ModelSize::Tiny, Architecture::Llama),
        BUILTIN_CORPUS,
        0,
    )
    .unwrap();
    m
}

/// A metrics record of a run (`metrics.jsonl`'s line).
pub type Record = serde_json::Map<String, serde_json::Value>;

/// The run's metrics records, without the timing column (`tokens_per_second`).
pub fn metrics_without_timing(run: &Path) -> Vec<Record> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: Record = serde_json::from_str(l).unwrap();
            r.remove("tokens_per_second");
            r
        })
        .collect()
}

/// A model of closed-form weights (no fixture file): tensor `k` of the config's shapes (in
/// name order) holds `base + 0.5 sin(1.7 i + 0.37 k)` at flat index `i`, `base` 1 for RMSNorm
/// weights and 0 elsewhere (Gemma2's norms, which scale by `1 + w`, 0 too); float64 on the
/// CPU. The scripts that pin reference values build the same weights
/// (`pin_reference_values.py`, `check_arch_transformers.py pin`).
pub fn closed_form_model(cfg: ModelConfig) -> Model {
    let mut t = BTreeMap::new();
    for (k, (name, shape)) in cfg.tensor_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let base = if name.ends_with("norm.weight") && cfg.arch != Architecture::Gemma2 {
            1.0
        } else {
            0.0
        };
        let v: Vec<f64> = (0..n)
            .map(|i| base + 0.5 * (1.7 * i as f64 + 0.37 * k as f64).sin())
            .collect();
        t.insert(name, Tensor::from_vec(v, shape, &device()).unwrap());
    }
    Model::from_tensors(cfg, t, Path::new("<closed form>"), DType::F64, &device()).unwrap()
}

/// SFT data (`prompt`, `completion`) in `dir/sft.jsonl`, from the shipped preference file's
/// chosen answers.
pub fn sft_from_prefs(dir: &Path) -> PathBuf {
    let out = dir.join("sft.jsonl");
    let text = std::fs::read_to_string(data_file("example_prefs.jsonl")).unwrap();
    let mut s = String::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        s.push_str(
            &serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string(),
        );
        s.push('\n');
    }
    std::fs::write(&out, s).unwrap();
    out
}
