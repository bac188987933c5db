//! A training run's records: the defaults of `sft` and `dpo`, what a run needs besides its
//! options ([`RunRecord`], saved as `run_args.json` for `--resume`), a resolved run
//! ([`Resolved`]), where a resume starts ([`locate_resume`]) and the end-of-run summary
//! ([`RunSummary`], saved as `train_summary.json`), the run directory's lock ([`RunLock`]) and
//! the fingerprint of the files a resume must find unchanged ([`RunFingerprint`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::records::InvalidRecords;
use crate::tokenize::TokenizationRules;
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

/// The defaults of `reward` (TRL's `RewardConfig`: learning rate 1e-4, `max_length` 1024 and
/// no prompt limit; a pair longer than `max_length` is dropped, not truncated).
pub fn reward_defaults() -> TrainConfig {
    TrainConfig {
        objective: Objective::reward(),
        output_dir: PathBuf::from("runs/reward"),
        learning_rate: 1e-4,
        max_length: 1024,
        max_prompt_length: 0,
        ..TrainConfig::default()
    }
}

/// What a run needs besides its [`TrainConfig`], saved as `run_args.json` for `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `sft`, `dpo` or `reward`.
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

impl RunRecord {
    /// The record with its paths absolute (relative ones joined to the working directory,
    /// lexically: `/dev/stdin` stays itself), as `run_args.json` keeps them, so a resume from
    /// another working directory finds the same model and data.
    pub fn with_absolute_paths(&self) -> Self {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Self {
            model: abs(&self.model),
            ref_model: self.ref_model.as_deref().map(abs),
            data: abs(&self.data),
            ..self.clone()
        }
    }
}

/// Where and in what precision a model runs: `--dtype` and `--device`, written once for the
/// training commands ([`RunSettings`]) and the commands that load a model to sample or score
/// (`commands::shared::ModelArgs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct Placement {
    /// Parameter dtype: f32, bf16, f16 or f64 (training keeps its optimizer state in f32 either
    /// way; bf16 on CPU computes matmuls through f32: slow).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`; under the NCCL
    /// engine, cuda is the rank's GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Default for Placement {
    /// f32 parameters on the CPU.
    fn default() -> Self {
        Self {
            dtype: "f32".into(),
            device: "cpu".into(),
        }
    }
}

impl Placement {
    /// The device, then the dtype, parsed.
    ///
    /// # Errors
    /// An unknown device or dtype ([`crate::Error::InvalidArgument`]).
    pub fn parse(&self) -> crate::Result<(candle_core::Device, candle_core::DType)> {
        let device = crate::parse_device(&self.device)?;
        let dtype = crate::dtype::parse_dtype(&self.dtype)?;
        Ok((device, dtype))
    }
}

/// How a training run's model runs and its data is read: the run's options besides its
/// [`TrainConfig`] and its files, recorded in `run_args.json` (flat, beside the model and data)
/// and reused by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct RunSettings {
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
    /// Mixed precision (HF's bf16): f32 parameters and optimizer state, forward and backward
    /// computed in bf16 (the paper's setting on GPUs; slow on CPU).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub tokenizer: TokenizationRules,
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
            placement: Placement::default(),
            bf16: false,
            tokenizer: TokenizationRules::default(),
            invalid: InvalidRecords::default(),
        }
    }
}

/// File name of the [`RunRecord`].
pub const RUN_RECORD: &str = "run_args.json";

/// File name of the end-of-run summary.
pub const SUMMARY_FILE: &str = "train_summary.json";

/// File name of a run directory's lock ([`RunLock`]); it holds the holder's process id.
pub const LOCK_FILE: &str = ".difinfo-train.lock";

/// An exclusive advisory lock (`flock`) on a run directory, held while a run writes there:
/// a second run or `--resume` of the same directory is refused ([`Error::RunLocked`]) instead
/// of interleaving its metrics and checkpoints with the first's. The lock file holds the
/// holder's process id; the kernel releases the lock when the holder exits, even by SIGKILL
/// (a stale file then locks nothing). Dropping the lock removes the file, and the directory
/// when the lock created it and it is left empty.
///
/// Only on Linux with glibc (the target where `libc` is a dependency); elsewhere
/// [`RunLock::acquire`] creates the file but locks nothing.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    created: Option<PathBuf>,
    _file: std::fs::File,
}

impl RunLock {
    /// Creates `dir` if needed and takes its lock.
    ///
    /// # Errors
    /// [`Error::RunLocked`] naming the directory and the holder's process id when another
    /// process holds it; I/O errors naming the path.
    pub fn acquire(dir: &Path) -> crate::Result<Self> {
        use std::io::Write;
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        // The holder before us removes the file when it ends: if it did so between our open
        // and our lock, the lock is on a file no longer there; open the new one.
        for _ in 0..16 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            if !try_lock(&file).map_err(|e| Error::io(&path, e))? {
                let pid = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                return Err(Error::RunLocked {
                    dir: dir.to_path_buf(),
                    pid,
                    lock: path.clone(),
                });
            }
            if !still_at(&file, &path) {
                continue;
            }
            file.set_len(0).map_err(|e| Error::io(&path, e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
            return Ok(Self {
                path,
                created,
                _file: file,
            });
        }
        Err(Error::RunLocked {
            dir: dir.to_path_buf(),
            pid: None,
            lock: dir.join(LOCK_FILE),
        })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still held, so no other process locks the file being removed.
        let _ = std::fs::remove_file(&self.path);
        if let Some(d) = &self.created {
            // Fails, as it should, unless the directory is empty.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file holds it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this `File` owns and keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// No locking where `libc` is no dependency.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn try_lock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// Whether the open `file` is still the file at `path`.
#[cfg(unix)]
fn still_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// See the Unix version.
#[cfg(not(unix))]
fn still_at(_file: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

/// SHA-256 fingerprints of the files a resumed run must find as the run started, saved in
/// `run_args.json` (key `fingerprint`) and checked by `--resume`: the model directory's
/// tokenizer files (a resume reads the tokenizer from `--model`, and each checkpoint ships
/// them) and, for a LoRA run, the frozen base model's config and weights (a resume loads only
/// the adapter from the checkpoint). Keys are file names in the model directory; an absent
/// file has no key.
///
/// The base weights are hashed in full, once at the start of a LoRA run and once per resume:
/// 540 MB (a 135M-parameter f32 model) took 0.6 s with a SHA-NI SHA-256 on the development
/// machine (2 s with coreutils' `sha256sum`); a hash of the safetensors headers alone would
/// not see another fine-tune of the same architecture.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFingerprint {
    /// The tokenizer files ([`crate::hf_dir::SIDE_FILES`]) → SHA-256.
    pub tokenizer: BTreeMap<String, String>,
    /// LoRA runs: `config.json` and the weight files of the base model → SHA-256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub base_weights: BTreeMap<String, String>,
}

impl RunFingerprint {
    /// The fingerprint of the checkpoint directory `model` (a GGUF file: its converted
    /// directory), with its base weights when `lora`.
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn of(model: &Path, lora: bool) -> crate::Result<Self> {
        use crate::hf_dir::SIDE_FILES;
        use crate::io::sha256_file;
        let dir = crate::gguf_cache::resolve_model(model)?;
        let hash = |names: Vec<String>| -> crate::Result<BTreeMap<String, String>> {
            let mut m = BTreeMap::new();
            for n in names {
                let p = dir.join(&n);
                if p.is_file() {
                    m.insert(n, sha256_file(&p)?);
                }
            }
            Ok(m)
        };
        let tokenizer = hash(SIDE_FILES.iter().map(|s| s.to_string()).collect())?;
        let base_weights = if lora {
            let names = crate::hf_dir::checkpoint_inputs(&dir)
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !SIDE_FILES.contains(&n.as_str()))
                .collect();
            hash(names)?
        } else {
            BTreeMap::new()
        };
        Ok(Self {
            tokenizer,
            base_weights,
        })
    }

    /// Checks `now` (the model directory `model` as it is) against this fingerprint, saved
    /// in `record` when the run started. Base weights are compared only when both hold them
    /// (the run and the resume are LoRA runs).
    ///
    /// # Errors
    /// [`Error::ResumeChanged`] naming the first file that changed, appeared or was removed.
    pub fn check(&self, now: &Self, model: &Path, record: &Path) -> crate::Result<()> {
        let both = !self.base_weights.is_empty() && !now.base_weights.is_empty();
        let sets = [
            ("tokenizer", &self.tokenizer, &now.tokenizer),
            ("base model", &self.base_weights, &now.base_weights),
        ];
        for (what, was, is) in sets.into_iter().take(if both { 2 } else { 1 }) {
            let names: std::collections::BTreeSet<&String> = was.keys().chain(is.keys()).collect();
            for n in names {
                let how = match (was.get(n), is.get(n)) {
                    (Some(a), Some(b)) if a != b => "changed since the run started",
                    (Some(_), None) => "was removed since the run started",
                    (None, Some(_)) => "appeared since the run started",
                    _ => continue,
                };
                return Err(Error::ResumeChanged {
                    path: model.join(n),
                    what: format!(
                        "({what} file of --model) {how} (its SHA-256 is recorded in {}): the \
                         resumed run would train {}",
                        record.display(),
                        if what == "tokenizer" {
                            "with another tokenizer and ship it in its checkpoints"
                        } else {
                            "its adapter on other base weights"
                        }
                    ),
                });
            }
        }
        Ok(())
    }
}

/// `run_args.json`: the [`RunRecord`] and the [`RunFingerprint`] of its model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedRun {
    /// The record.
    #[serde(flatten)]
    pub record: RunRecord,
    /// The fingerprint (absent in runs saved before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<RunFingerprint>,
}

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
