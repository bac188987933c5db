#![warn(missing_docs)]
//! difinfo-trainer: Hugging Face checkpoints, TRL-exact tokenization and differentiable
//! log-probabilities on candle — the foundation of the paper's real-data pipeline
//! (docs/theory.md, Appendix J.2).
//!
//! Layers, bottom up:
//! - [`config_json`]: config.json → [`config::ModelConfig`] (Llama, Mistral, Qwen2);
//! - [`model`]: the decoder with trainable variables and a differentiable forward;
//! - [`fused`]: fused CPU kernels with hand-written backward passes used by [`model`];
//! - [`lm_head`]: the LM head and log-softmax in chunks from candle's own ops (any device);
//! - [`recompute`]: gradient checkpointing and hand-written backward passes on any device;
//! - [`lora`]: LoRA adapters in PEFT's format;
//! - [`checkpoint`]: loading (single/sharded safetensors) and saving with the input's names;
//! - [`gguf`]: llama.cpp / Ollama GGUF files → Hugging Face directories; [`gguf_cache`]: their
//!   content-keyed conversion cache, through which a GGUF file is accepted
//!   wherever a checkpoint directory is;
//! - [`template`], [`records`], [`tokenize`]: chat templates, JSONL / JSON / Parquet datasets, TRL
//!   tokenization; [`provenance`]: which tokenizer pipeline, and transformers 5's;
//! - [`batch`]: right-padded batches and completion masks;
//! - [`logps`]: summed completion log-probs of a preference dataset;
//! - [`generate`]: KV-cache sampling;
//! - [`init`]: random checkpoints with a trained BPE tokenizer;
//! - [`io`]: output paths checked before any work (never an input, always writable);
//! - [`train`]: SFT, DPO, reference-free DPO and DPO-PG training with checkpoints, metrics
//!   and exact resume;
//! - [`diag`]: the paper's diagnostics (Monte Carlo entropy, β-accuracy, the DID entropy,
//!   rejected-response resampling, the run report);
//! - [`commands`]: the front end, one file per `difinfo-train` subcommand (options, progress
//!   bars, what is printed); `train` and `diag` know nothing of it.

pub mod batch;
pub mod commands;
pub mod config_json;
pub mod diag;
pub mod dtype;
pub mod error;
pub mod fused;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod hf_dir;
pub mod gguf_cache;
pub mod init;
pub mod io;
pub mod logps;
pub mod lora;
pub mod memory;
pub mod model;
pub mod outputs;
pub mod pretrained;
pub mod provenance;
pub mod recompute;
pub mod records;
pub mod safetensors;
pub mod template;
pub mod tokenize;
pub mod train;
pub mod units;

pub use error::{DataError, Error, Result};

/// Chooses the compute device: `cpu`, `cuda` or `cuda:N`.
///
/// # Errors
/// Unknown names; CUDA requested in a build without the `cuda` feature or without a GPU.
pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        _ => {
            let ord = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "unknown device `{s}`; expected cpu, cuda or cuda:N"
                        ))
                    })?,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown device `{s}`; expected cpu, cuda or cuda:N"
                    )))
                }
            };
            if !cfg!(feature = "cuda") {
                return Err(Error::InvalidArgument("this binary was built without the `cuda` feature; rebuild with `--features cuda`".into()));
            }
            Ok(candle_core::Device::new_cuda(ord)?)
        }
    }
}

/// The README's code blocks, run as doctests (`cargo test --doc`): a Rust block a user would
/// paste compiles, runs and asserts what its comments claim (shell blocks are not run).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
