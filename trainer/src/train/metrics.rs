//! Metrics with TRL's names, appended at each logging step to `metrics.jsonl` (one JSON
//! object per line) and `metrics.csv` (a fixed column set, empty where not applicable).
//!
//! As in TRL / transformers: `loss` is the mean of the per-step losses since the last log,
//! the `rewards/*` and `logps/*` (and `nll_loss`, the `sft` term of RPO-style objectives) are
//! means over the micro-batches since the last log (so are a reward model's `min_reward`,
//! `mean_reward`, `max_reward`, `accuracy` and `margin`, TRL's `RewardTrainer` names),
//! `grad_norm` is the last step's norm before
//! clipping, `learning_rate` the rate the step used, `num_tokens` TRL 1.x's running count of
//! non-padding tokens trained on (every forward pass) since the start of the run. TRL's
//! `entropy`, `logits/*` and `mean_token_accuracy` need the full logits, which the trainer's
//! LM head never forms (it scores the completion tokens only): they are not logged.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The JSONL file name.
pub const METRICS_JSONL: &str = "metrics.jsonl";
/// The CSV file name.
pub const METRICS_CSV: &str = "metrics.csv";

/// Every column, in CSV order.
pub const COLUMNS: [&str; 20] = [
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "min_reward",
    "mean_reward",
    "max_reward",
    "accuracy",
    "margin",
    "projection/active_fraction",
    "num_tokens",
    "tokens_per_second",
];

/// Sums since the last log; part of the trainer state, so a resumed run logs the same numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogAccumulator {
    /// Optimizer steps since the last log.
    pub steps: usize,
    /// Sum of the per-step losses.
    pub loss_sum: f64,
    /// Micro-batches since the last log.
    pub microbatches: usize,
    /// Per-micro-batch metric sums by name (`rewards/chosen`, ...).
    pub sums: BTreeMap<String, f64>,
    /// DPO-PG steps whose projection was active.
    pub projection_active: usize,
    /// Tokens (non-padding, every forward pass) processed.
    pub tokens: usize,
    /// Wall-clock seconds spent in steps.
    pub seconds: f64,
    /// Tokens processed since the start of the run (not reset by a log; TRL's `num_tokens`).
    #[serde(default)]
    pub num_tokens: usize,
}

impl LogAccumulator {
    /// Adds one micro-batch's metrics.
    pub fn add_microbatch(&mut self, metrics: &[(&str, f64)]) {
        self.microbatches += 1;
        for (k, v) in metrics {
            *self.sums.entry((*k).to_string()).or_insert(0.0) += v;
        }
    }

    /// The record to log and a cleared accumulator.
    pub fn take_record(
        &mut self,
        step: usize,
        epoch: f64,
        grad_norm: f64,
        learning_rate: f64,
        dpo_pg: bool,
    ) -> Vec<(String, f64)> {
        let mut r: Vec<(String, f64)> = vec![
            ("step".into(), step as f64),
            ("epoch".into(), epoch),
            ("loss".into(), self.loss_sum / self.steps.max(1) as f64),
            ("grad_norm".into(), grad_norm),
            ("learning_rate".into(), learning_rate),
        ];
        for (k, v) in &self.sums {
            r.push((k.clone(), v / self.microbatches.max(1) as f64));
        }
        if dpo_pg {
            r.push((
                "projection/active_fraction".into(),
                self.projection_active as f64 / self.steps.max(1) as f64,
            ));
        }
        r.push(("num_tokens".into(), self.num_tokens as f64));
        r.push((
            "tokens_per_second".into(),
            if self.seconds > 0.0 {
                self.tokens as f64 / self.seconds
            } else {
                0.0
            },
        ));
        r.sort_by_key(|(k, _)| COLUMNS.iter().position(|c| c == k).unwrap_or(usize::MAX));
        *self = Self {
            num_tokens: self.num_tokens,
            ..Self::default()
        };
        r
    }
}

/// The two metrics files of a run directory.
#[derive(Debug, Clone)]
pub struct MetricsLog {
    jsonl: PathBuf,
    csv: PathBuf,
}

/// `step` and `num_tokens` as integers; every other value as a float (`null` if not finite).
fn json_number(key: &str, v: f64) -> serde_json::Value {
    if key == "step" || key == "num_tokens" {
        serde_json::Value::from(v as u64)
    } else {
        serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

impl MetricsLog {
    /// The files in `dir` (not created until the first record).
    pub fn new(dir: &Path) -> Self {
        Self {
            jsonl: dir.join(METRICS_JSONL),
            csv: dir.join(METRICS_CSV),
        }
    }

    /// Removes both files (a fresh run).
    ///
    /// # Errors
    /// I/O errors other than a missing file.
    pub fn reset(&self) -> Result<()> {
        for p in [&self.jsonl, &self.csv] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(p, e)),
            }
        }
        Ok(())
    }

    /// Appends one record (name, value) to both files; `step` is written as an integer.
    ///
    /// # Errors
    /// I/O errors.
    pub fn append(&self, record: &[(String, f64)]) -> Result<()> {
        let mut obj = serde_json::Map::new();
        for (k, v) in record {
            obj.insert(k.clone(), json_number(k, *v));
        }
        // serde_json's map is sorted by key; write the record in column order instead.
        let mut line = String::from("{");
        for (i, (k, _)) in record.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::to_string(k).unwrap_or_default());
            line.push(':');
            line.push_str(&obj[k].to_string());
        }
        line.push_str("}\n");
        append_to(&self.jsonl, line.as_bytes())?;
        let new = !self.csv.exists();
        let mut csv = String::new();
        if new {
            csv.push_str(&COLUMNS.join(","));
            csv.push('\n');
        }
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|c| {
                record
                    .iter()
                    .find(|(k, _)| k == c)
                    .map_or(String::new(), |(k, v)| json_number(k, *v).to_string())
            })
            .collect();
        csv.push_str(&cells.join(","));
        csv.push('\n');
        append_to(&self.csv, csv.as_bytes())
    }

    /// Keeps only the records with `step ≤ step` (a resumed run rewrites what followed its
    /// checkpoint); a last line cut short by a crash is dropped.
    ///
    /// # Errors
    /// I/O and parse errors.
    pub fn truncate_after(&self, step: usize) -> Result<()> {
        if self.jsonl.exists() {
            let text =
                std::fs::read_to_string(&self.jsonl).map_err(|e| Error::io(&self.jsonl, e))?;
            let mut kept = String::new();
            for line in complete_lines(&text).filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| Error::format(&self.jsonl, e))?;
                if v["step"].as_u64().is_some_and(|s| s as usize <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            crate::io::write_bytes(&self.jsonl, kept.as_bytes())?;
        }
        if self.csv.exists() {
            let text = std::fs::read_to_string(&self.csv).map_err(|e| Error::io(&self.csv, e))?;
            let mut kept = String::new();
            for (i, line) in complete_lines(&text).enumerate() {
                let s = line.split(',').next().and_then(|c| c.parse::<usize>().ok());
                if i == 0 || s.is_some_and(|s| s <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            crate::io::write_bytes(&self.csv, kept.as_bytes())?;
        }
        Ok(())
    }

    /// The JSONL records.
    ///
    /// # Errors
    /// I/O and parse errors.
    pub fn read(&self) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
        let text = std::fs::read_to_string(&self.jsonl).map_err(|e| Error::io(&self.jsonl, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| Error::format(&self.jsonl, e)))
            .collect()
    }

    /// The JSONL path.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl
    }

    /// The CSV path.
    pub fn csv_path(&self) -> &Path {
        &self.csv
    }
}

/// The lines of `text` that end in a newline: a last line without one is a record whose
/// append a crash cut short (nothing else writes these files), dropped on resume.
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let whole = text.rfind('\n').map_or("", |i| &text[..=i]);
    whole.lines()
}

fn append_to(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_after_drops_a_record_cut_short_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
        for step in 1..=3 {
            log.append(&[("step".into(), step as f64), ("loss".into(), 0.5)])
                .unwrap();
        }
        // A crash in the middle of the fourth append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log.jsonl_path())
            .unwrap();
        f.write_all(b"{\"step\":4,\"lo").unwrap();
        log.truncate_after(2).unwrap();
        let steps: Vec<u64> = log
            .read()
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2]);
        let csv = std::fs::read_to_string(log.csv_path()).unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
    }
}
