#![warn(missing_docs)]
//! difinfo-trainer: Hugging Face checkpoints, TRL-exact tokenization and differentiable
//! log-probabilities on candle — the foundation of the paper's real-data pipeline
//! (docs/theory.md, Appendix J.2).
//!
//! Rooms, top down (each imports only rooms below it; `ARCHITECTURE.md` is the floor plan and
//! `tests/floors.rs` checks it):
//! - [`commands`]: the front end, one file per `difinfo-train` subcommand (options, progress
//!   bars, what is printed); nothing below knows of it. [`fuzzing`]: the fuzz targets' entries;
//! - [`diag`]: the paper's diagnostics (Monte Carlo entropy, β-accuracy, the DID entropy,
//!   rejected-response resampling, the run report); [`plan`]: the memory and compute plan of
//!   a run (`difinfo-train plan`); [`pairs`]: preference pairs from scored samples
//!   (Appendix J.2);
//! - [`train`]: SFT, DPO, reference-free DPO and DPO-PG training with checkpoints, metrics
//!   and exact resume; [`init`]: random checkpoints with a trained BPE tokenizer;
//! - [`pretrained`]: a model loaded from and saved as a Hugging Face directory (or a GGUF
//!   file), a PEFT adapter merged into its base; [`logps`]: summed completion log-probs;
//!   [`generate`]: KV-cache sampling; [`tokenize`]: TRL-exact tokenization;
//! - [`model`]: the decoder with trainable variables and a differentiable forward, on the
//!   fused CPU kernels of [`fused`] (hand-written backward passes) or candle's own ops with
//!   [`recompute`] (gradient checkpointing); [`lora`]: LoRA adapters in PEFT's format;
//! - the model's files: [`gguf_cache`] (a GGUF file accepted wherever a checkpoint directory
//!   is, through a content-keyed conversion), [`outputs`] (output paths checked before any
//!   work), [`gguf`] (the GGUF format), [`hf_dir`] (a Hugging Face directory),
//!   [`safetensors`] (the weights' format);
//! - the data's files: [`records`] (JSONL / JSON / Parquet datasets), [`template`] (chat
//!   templates);
//! - the ground floor: [`config_json`] (config.json → [`config_json::ModelConfig`]: Llama,
//!   Mistral, Qwen2, Qwen3, Gemma2), [`batch`] (right-padded batches and completion masks),
//!   [`io`] (the one atomic writer), [`memory`], [`dtype`], [`error`], [`units`],
//!   [`provenance`] (which tokenizer pipeline, and transformers 5's), [`dist`] (the collectives
//!   of more than one process: one, or MPI under `mpirun`), [`shard`] (ZeRO-1's variable
//!   owners).

pub mod batch;
pub mod commands;
pub mod config_json;
pub mod diag;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod fused;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod gguf_cache;
pub mod hf_dir;
pub mod init;
pub mod io;
pub mod logps;
pub mod lora;
pub mod memory;
pub mod model;
pub mod outputs;
pub mod pairs;
pub mod plan;
pub mod pretrained;
pub mod profile;
pub mod provenance;
pub mod recompute;
pub mod records;
pub mod safetensors;
pub mod scores;
pub mod shard;
pub mod template;
pub mod tokenize;
pub mod train;
pub mod units;

pub use error::{DataError, Error, Result};

/// Chooses the compute device: `cpu`, `cuda` or `cuda:N`; `cuda` is `cuda:0`, or the rank's
/// own GPU under the NCCL engine ([`dist::default_cuda_ordinal`]).
///
/// # Errors
/// Unknown names; CUDA requested in a build without the `cuda` feature or without a GPU.
pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        _ => {
            let ord = match s.strip_prefix("cuda") {
                // Under the NCCL engine, the rank's own GPU (its local rank).
                Some("") => crate::dist::default_cuda_ordinal(),
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
