//! Checkpoints `checkpoint-<step>/`: the weights (through [`PolicyModel::save_weights`]),
//! `optimizer.safetensors`, `trainer_state.json` and the resolved config, written into a
//! temporary directory and renamed into place, so a crash never leaves a half-written
//! checkpoint under the final name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{sha256_file, write_bytes as write_file};
use crate::train::config::{TrainConfig, CONFIG_JSON};
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
/// The checkpoint's manifest: one `<SHA-256 in hex>  <file name>` line per file of the
/// checkpoint (the format of `sha256sum`, so `sha256sum -c checksums.sha256` checks a copy by
/// hand), verified before a resume reads anything.
pub const CHECKSUM_FILE: &str = "checksums.sha256";

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
    /// Whether the checkpoint has a [`CHECKSUM_FILE`] (false in checkpoints written before
    /// there was one: those are resumed unverified).
    #[serde(default)]
    pub checksums: bool,
    /// Examples per global micro-batch: per-device batch × world size of the run that wrote
    /// the state. A resumed run keeps it, under any world size with the same product (`None`
    /// in states written before it was recorded: not checked).
    #[serde(default)]
    pub global_micro_batch: Option<usize>,
}

/// `output_dir/checkpoint-<step>`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint of `step` and returns its directory.
///
/// # Errors
/// I/O errors naming the file written (the temporary directory is removed, so a full disk
/// leaves no partial checkpoint; the final name is untouched).
pub fn save_checkpoint<M: PolicyModel + ?Sized>(
    output_dir: &Path,
    model: &M,
    optimizer: &Optimizer,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<PathBuf> {
    save_checkpoint_with_reference(output_dir, model, None, optimizer, state, config)
}

/// The file of a checkpoint that holds TR-DPO's reference weights (`sync_ref_model`: the
/// reference changes during the run, so a resumed run reads it back).
pub const REF_MODEL_FILE: &str = "ref_model.safetensors";

/// [`save_checkpoint`], with TR-DPO's reference model's weights in [`REF_MODEL_FILE`] when
/// `reference` is given (covered by the checksums like every file).
///
/// # Errors
/// See [`save_checkpoint`].
pub fn save_checkpoint_with_reference<M: PolicyModel + ?Sized>(
    output_dir: &Path,
    model: &M,
    reference: Option<&dyn PolicyModel>,
    optimizer: &Optimizer,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<PathBuf> {
    let step = state.global_step;
    let fin = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = reference
        .map_or(Ok(()), |r| {
            crate::train::policy::save_named(&r.named_vars(), &tmp.join(REF_MODEL_FILE), None)
        })
        .and_then(|()| write_checkpoint_files(&tmp, model, optimizer, state, config));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        // Name the checkpoint's file, not the temporary directory's (the outputs' rule).
        return Err(e.relocated(&tmp, &fin));
    }
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
    Ok(fin)
}

/// The files of a checkpoint, written into the (temporary) directory `tmp`.
fn write_checkpoint_files<M: PolicyModel + ?Sized>(
    tmp: &Path,
    model: &M,
    optimizer: &Optimizer,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<()> {
    model.save_weights(tmp)?;
    optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
    let state = TrainerState {
        checksums: true,
        ..state.clone()
    };
    let json =
        serde_json::to_string_pretty(&state).map_err(|e| Error::format(tmp.join(STATE_FILE), e))?;
    write_file(&tmp.join(STATE_FILE), json.as_bytes())?;
    let cfg = serde_json::to_string_pretty(config)
        .map_err(|e| Error::format(tmp.join(CONFIG_JSON), e))?;
    write_file(&tmp.join(CONFIG_JSON), cfg.as_bytes())?;
    write_checksums(tmp)
}

/// Reads `trainer_state.json` of a checkpoint, after verifying every file of the checkpoint
/// against its [`CHECKSUM_FILE`] ([`verify_checksums`]).
///
/// # Errors
/// A file that differs from its checksum or is missing; I/O, parse or format-version errors.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let verified = verify_checksums(dir)?;
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let s = parse_state(&text, &p)?;
    if s.checksums && !verified {
        return Err(Error::Checkpoint {
            path: dir.join(CHECKSUM_FILE),
            message: "missing: the checkpoint was written with one, so its files cannot be \
                      trusted; resume from another checkpoint"
                .into(),
        });
    }
    Ok(s)
}

/// Parses the text of a `trainer_state.json` (`path` names it in errors) and checks its
/// format version.
///
/// # Errors
/// Parse or format-version errors.
pub fn parse_state(text: &str, path: &Path) -> Result<TrainerState> {
    let s: TrainerState = serde_json::from_str(text).map_err(|e| Error::format(path, e))?;
    if s.format != STATE_FORMAT {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("state format {}, expected {STATE_FORMAT}", s.format),
        });
    }
    Ok(s)
}

/// Writes `dir`'s [`CHECKSUM_FILE`]: the SHA-256 of every regular file in `dir` (sorted by
/// name; the manifest itself excluded).
///
/// # Errors
/// I/O errors.
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != CHECKSUM_FILE && e.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    let mut text = String::new();
    for n in names {
        text.push_str(&format!("{}  {n}\n", sha256_file(&dir.join(&n))?));
    }
    write_file(&dir.join(CHECKSUM_FILE), text.as_bytes())
}

/// The `(hex digest, file name)` lines of a [`CHECKSUM_FILE`]'s text (`path` names it in
/// errors): 64 hex digits, two spaces (or a space and `*`), a plain file name.
///
/// # Errors
/// A malformed line, naming its number.
pub fn parse_checksums(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || Error::format(path, format!("line {}: not `<sha256>  <file>`", i + 1));
        let (hex, rest) = line.split_at_checked(64).ok_or_else(bad)?;
        let name = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(bad)?;
        let plain = !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..";
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) || !plain {
            return Err(bad());
        }
        out.push((hex.to_ascii_lowercase(), name.to_string()));
    }
    Ok(out)
}

/// Verifies each file listed in `dir`'s [`CHECKSUM_FILE`] against its SHA-256, and that it
/// lists every file of the checkpoint (the regular files in `dir` but itself and hidden
/// ones: what [`write_checksums`] lists). Returns whether there was a manifest to verify.
///
/// # Errors
/// [`Error::Checkpoint`] naming the first file that is missing or differs (a truncated
/// write, a flipped bit, a file replaced by hand), or a file it does not list (an empty or
/// truncated manifest verifies nothing).
pub fn verify_checksums(dir: &Path) -> Result<bool> {
    let manifest = dir.join(CHECKSUM_FILE);
    let text = match std::fs::read_to_string(&manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(&manifest, e)),
    };
    let listed = parse_checksums(&text, &manifest)?;
    let mut present = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != CHECKSUM_FILE && !name.starts_with('.') && e.path().is_file() {
            present.push(name);
        }
    }
    present.sort();
    if let Some(n) = present
        .iter()
        .find(|n| !listed.iter().any(|(_, l)| l == *n))
    {
        return Err(Error::Checkpoint {
            path: manifest,
            message: format!(
                "does not list {n}{}: a checkpoint's checksum file lists all its files, so \
                 this one cannot vouch for them; resume from another checkpoint",
                if listed.is_empty() {
                    " (it is empty)"
                } else {
                    ""
                }
            ),
        });
    }
    for (want, name) in listed {
        let p = dir.join(&name);
        if !p.is_file() {
            return Err(Error::Checkpoint {
                path: p,
                message: format!("listed in {CHECKSUM_FILE} but missing"),
            });
        }
        let got = sha256_file(&p)?;
        if got != want {
            return Err(Error::Checkpoint {
                path: p,
                message: format!(
                    "SHA-256 mismatch: the file changed or is corrupt since the checkpoint was \
                     written (recorded {want}, found {got}); resume from another checkpoint"
                ),
            });
        }
    }
    Ok(true)
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
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// The complete checkpoints of `output_dir` (those with a trainer state), with their steps.
fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(output_dir, e))?;
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
