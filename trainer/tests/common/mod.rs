//! Shared fixtures: tiny checkpoints built on the fly (random weights, a BPE tokenizer
//! trained on the built-in corpus), in temporary directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use difinfo_trainer::checkpoint::load_model;
use difinfo_trainer::config::{Architecture, ModelConfig};
use difinfo_trainer::init::{init_checkpoint, size_config, ModelSize, BUILTIN_CORPUS};
use difinfo_trainer::model::Model;
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

/// A checkpoint and its model loaded in `dtype` on the CPU.
pub fn model(cfg: ModelConfig, dtype: DType, seed: u64) -> (TempDir, Model) {
    let (dir, _) = checkpoint(cfg, seed);
    let m = load_model(dir.path(), dtype, &Device::Cpu).expect("load model");
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
