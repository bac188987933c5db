//! Checkpoints `checkpoint-<step>/`: the weights (through [`PolicyModel::save_weights`]),
//! `optimizer.safetensors`, `trainer_state.json` and the resolved config, written into a
//! temporary directory and renamed into place, so a crash never leaves a half-written
//! checkpoint under the final name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::train::config::{write_file, TrainConfig, CONFIG_JSON};
use crate::train::error::{Result, TrainError};
use crate::train::metrics::LogAccumulator;
use crate::train::optim::Optimizer;
use crate::train::policy::PolicyModel;
use crate::train::rng::SplitMix64;

/// The optimizer state file of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state file of a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The state format written.
pub const STATE_FORMAT: &str = "difinfo-trainer-state-v1";

/// Everything besides weights and optimizer state that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// [`STATE_FORMAT`].
    pub format: String,
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Next micro-batch of the current epoch.
    pub batch_in_epoch: usize,
    /// `epoch + batch_in_epoch / micro-batches per epoch`, as logged.
    pub epoch_float: f64,
    /// The current epoch's data order (dataset indices).
    pub permutation: Vec<usize>,
    /// The trainer's RNG (for anything random besides the data order).
    pub rng: SplitMix64,
    /// Metric sums since the last log.
    pub log: LogAccumulator,
    /// Last step's pre-clip gradient norm.
    pub last_grad_norm: f64,
    /// DPO-PG steps with an active projection, over the whole run.
    pub projection_active_total: usize,
    /// The reference cache key (preference objectives with a reference).
    pub ref_cache_key: Option<String>,
}

/// `output_dir/checkpoint-<step>`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint of `step` and returns its directory.
///
/// # Errors
/// I/O errors (the temporary directory is left for inspection, the final name untouched).
pub fn save_checkpoint<M: PolicyModel + ?Sized>(
    output_dir: &Path,
    model: &M,
    optimizer: &Optimizer,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<PathBuf> {
    let step = state.global_step;
    let fin = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    model.save_weights(&tmp)?;
    optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| TrainError::format(tmp.join(STATE_FILE), e))?;
    write_file(&tmp.join(STATE_FILE), json.as_bytes())?;
    let cfg = serde_json::to_string_pretty(config)
        .map_err(|e| TrainError::format(tmp.join(CONFIG_JSON), e))?;
    write_file(&tmp.join(CONFIG_JSON), cfg.as_bytes())?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| TrainError::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| TrainError::io(&fin, e))?;
    Ok(fin)
}

/// Reads `trainer_state.json` of a checkpoint.
///
/// # Errors
/// I/O, parse or format-version errors.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    let s: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::format(&p, e))?;
    if s.format != STATE_FORMAT {
        return Err(TrainError::Checkpoint {
            path: p,
            message: format!("state format {}, expected {STATE_FORMAT}", s.format),
        });
    }
    Ok(s)
}

/// HF's `save_total_limit`: deletes all but the `keep` newest `checkpoint-<step>` directories
/// of `output_dir` (by step; only complete ones, with a trainer state, are counted or deleted).
///
/// # Errors
/// I/O errors.
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    let mut all = checkpoints(output_dir)?;
    all.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    for (_, dir) in all.into_iter().skip(keep.max(1)) {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    Ok(())
}

/// The complete checkpoints of `output_dir` (those with a trainer state), with their steps.
fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(output_dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| TrainError::io(output_dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join(STATE_FILE).exists() {
                out.push((step, e.path()));
            }
        }
    }
    Ok(out)
}

/// The checkpoint of `output_dir` with the highest step that has a trainer state, if any.
///
/// # Errors
/// I/O errors reading the directory.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(output_dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p))
}
