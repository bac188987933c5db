//! A training run's records: the defaults of `sft` and `dpo`, what a run needs besides its
//! options ([`RunRecord`], saved as `run_args.json` for `--resume`), a resolved run
//! ([`Resolved`]), where a resume starts ([`locate_resume`]) and the end-of-run summary
//! ([`RunSummary`], saved as `train_summary.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::InvalidRecords;
use crate::error::Error;
use crate::tokenize::TokenizerOptions;
use crate::train::checkpoint::{latest_checkpoint, STATE_FILE};
use crate::train::{Objective, TrainConfig};

/// The defaults of `dpo` (TRL's `DPOConfig`).
pub fn dpo_defaults() -> TrainConfig {
    TrainConfig {
        objective: Objective::default(),
        output_dir: PathBuf::from("runs/dpo"),
        ..TrainConfig::default()
    }
}

/// The defaults of `sft` (TRL's `SFTConfig`).
pub fn sft_defaults() -> TrainConfig {
    TrainConfig {
        objective: Objective::sft(),
        output_dir: PathBuf::from("runs/sft"),
        learning_rate: 2e-5,
        max_prompt_length: 0,
        ..TrainConfig::default()
    }
}

/// What a run needs besides its [`TrainConfig`], saved as `run_args.json` for `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `sft` or `dpo`.
    pub command: String,
    /// The model trained (its initial checkpoint; the reference unless `ref_model`).
    pub model: PathBuf,
    /// TRL's `ref_model`: the reference checkpoint, when not the initial policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_model: Option<PathBuf>,
    /// The data file.
    pub data: PathBuf,
    /// How the model runs and the data is read.
    #[serde(flatten)]
    pub settings: RunSettings,
}

/// How a training run's model runs and its data is read: the run's options besides its
/// [`TrainConfig`] and its files, recorded in `run_args.json` (flat, beside the model and data)
/// and reused by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct RunSettings {
    /// Parameter dtype: f32 or bf16 (optimizer state is f32 either way; bf16 on CPU is slow).
    #[arg(long)]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long)]
    pub device: String,
    /// Mixed precision (HF's bf16): f32 parameters and optimizer state, forward and backward
    /// computed in bf16 (the paper's setting on GPUs; slow on CPU).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub tokenizer: TokenizerOptions,
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub invalid: InvalidRecords,
}

impl Default for RunSettings {
    /// f32 parameters on the CPU, no mixed precision, the tokenizer's defaults, invalid
    /// records refused.
    fn default() -> Self {
        Self {
            dtype: "f32".into(),
            device: "cpu".into(),
            bf16: false,
            tokenizer: TokenizerOptions::default(),
            invalid: InvalidRecords::default(),
        }
    }
}

/// File name of the [`RunRecord`].
pub const RUN_RECORD: &str = "run_args.json";

/// File name of the end-of-run summary.
pub const SUMMARY_FILE: &str = "train_summary.json";

/// `(run dir, checkpoint)` of a `--resume` argument: a checkpoint directory (it has a
/// trainer state) or a run directory (its latest checkpoint).
pub fn locate_resume(p: &Path) -> crate::Result<(PathBuf, PathBuf)> {
    if p.join(STATE_FILE).exists() {
        let run = p
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        return Ok((run, p.to_path_buf()));
    }
    match latest_checkpoint(p)? {
        Some(c) => Ok((p.to_path_buf(), c)),
        None => Err(Error::InvalidArgument(format!(
            "--resume {}: no checkpoint-N directory there",
            p.display()
        ))),
    }
}

/// A resolved training command.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The options.
    pub config: TrainConfig,
    /// Model, data, tokenization.
    pub record: RunRecord,
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// What a finished run reports (also written as `train_summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The objective (its fields, as in the config).
    pub objective: Objective,
    /// Optimizer steps taken in total (including before a resume).
    pub global_step: usize,
    /// Steps taken by this process.
    pub steps_this_run: usize,
    /// Wall-clock seconds of this process's training loop.
    pub seconds: f64,
    /// The last logged record.
    pub final_metrics: serde_json::Map<String, serde_json::Value>,
    /// DPO-PG: steps whose projection was active, over all steps of the run.
    pub projection_active_steps: Option<usize>,
    /// DPO-PG: their fraction.
    pub projection_active_fraction: Option<f64>,
    /// The last checkpoint (a Hugging Face directory).
    pub last_checkpoint: Option<PathBuf>,
}

impl RunSummary {
    /// The one-line summary printed at the end.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}: done, {} steps",
            self.objective.label(),
            self.global_step
        );
        let f = |k: &str| {
            self.final_metrics
                .get(k)
                .and_then(serde_json::Value::as_f64)
        };
        if let Some(e) = f("epoch") {
            s.push_str(&format!(" ({e:.2} epochs)"));
        }
        s.push_str(&format!(" in {:.1} s", self.seconds));
        for k in [
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            if let Some(v) = f(k) {
                s.push_str(&format!(", {k} {v:.4}"));
            }
        }
        if let Some(v) = f("tokens_per_second") {
            s.push_str(&format!(", {v:.0} tokens/s"));
        }
        if let (Some(n), Some(fr)) = (
            self.projection_active_steps,
            self.projection_active_fraction,
        ) {
            s.push_str(&format!(
                "; projection active in {n}/{} steps ({:.1}%)",
                self.global_step,
                100.0 * fr
            ));
        }
        if let Some(c) = &self.last_checkpoint {
            s.push_str(&format!("; model: {}", c.display()));
        }
        s
    }
}
