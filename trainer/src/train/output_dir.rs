//! A run's output directory before a fresh run: what an earlier run left there
//! ([`earlier_run`]), refused unless `overwrite_output_dir` ([`check_fresh_output_dir`]) and
//! then cleared (`clear_earlier_run`, when a fresh run starts).

use std::path::Path;

use crate::error::{Error, Result};
use crate::train::checkpoint::latest_checkpoint;

/// The files an earlier run leaves in its output directory besides checkpoints and reference
/// caches: metrics, resolved config, the command's run record and summary.
pub const RUN_FILES: [&str; 6] = [
    crate::train::metrics::METRICS_JSONL,
    crate::train::metrics::METRICS_CSV,
    crate::train::config::CONFIG_TOML,
    crate::train::config::CONFIG_JSON,
    crate::train::run::RUN_RECORD,
    crate::train::run::SUMMARY_FILE,
];

/// What in `output_dir` shows an earlier run there (names, sorted): [`RUN_FILES`], checkpoint
/// directories (complete, or a `.checkpoint-N.tmp` a crash left mid-write) and reference
/// log-prob caches. A run that crashed before its first checkpoint leaves its metrics and
/// config, so checkpoints alone are not the test.
///
/// # Errors
/// I/O errors reading the directory.
pub fn earlier_run(output_dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut found = Vec::new();
    for e in rd {
        let name = e
            .map_err(|e| Error::io(output_dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let checkpoint = name.starts_with("checkpoint-")
            || (name.starts_with(".checkpoint-") && name.ends_with(".tmp"));
        let cache = name.starts_with("ref_logps-") && name.ends_with(".safetensors");
        if RUN_FILES.contains(&name.as_str()) || checkpoint || cache {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Refuses a fresh run in an `output_dir` that holds an [`earlier_run`] unless `overwrite`
/// (HF's `overwrite_output_dir`); `--resume` does not come here.
///
/// # Errors
/// [`Error::Options`] naming the files found and the ways out.
pub fn check_fresh_output_dir(output_dir: &Path, overwrite: bool) -> Result<()> {
    let found = earlier_run(output_dir)?;
    if overwrite || found.is_empty() {
        return Ok(());
    }
    let mut shown = found.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if found.len() > 5 {
        shown.push_str(", …");
    }
    let resume = match latest_checkpoint(output_dir)? {
        Some(c) => format!(
            "continue it with --resume {} (from {}), ",
            output_dir.display(),
            c.display()
        ),
        None => "it has no checkpoint to resume from; ".into(),
    };
    Err(Error::Options(format!(
        "{} holds an earlier run ({shown}): {resume}choose another --output-dir, or pass \
         --overwrite-output-dir (overwrite_output_dir = true) to replace it",
        output_dir.display()
    )))
}

/// With `overwrite_output_dir`: removes what an earlier run left in `output_dir` that the new
/// run would not replace itself (checkpoints, temporary checkpoint directories, metrics, the
/// summary), so no stale file is mistaken for the new run's. Reference caches stay: they are
/// keyed by model, data and settings, and reused only on a match.
pub(crate) fn clear_earlier_run(output_dir: &Path) -> Result<()> {
    for name in earlier_run(output_dir)? {
        let p = output_dir.join(&name);
        if name.starts_with("ref_logps-") {
            continue;
        }
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
