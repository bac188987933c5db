//! `difinfo-train score`: one reward per prompt/completion under a reward model (a
//! `…ForSequenceClassification` checkpoint with one label), with the mean and a 95 % interval
//! per label and per prompt ([`crate::diag::reward_summary`]).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::commands::shared::{check_paths, load_bundle, progress, usage};
use crate::diag::reward_summary::{summarize, GroupSummary, Scored, LEVEL};
use crate::io::{write_json, write_jsonl};
use crate::pretrained::{load_reward_model, ScoreHead};
use crate::records::{read_records, InvalidRecords};
use crate::scores::{parse_score_line, reward_ids, score_sequences, ScoreRecord, Side};
use crate::train::config::Limit;
use crate::train::run::Placement;
use crate::{DataError, Result};

/// Score prompt/completion pairs with a reward model: `sample`'s rows or a preference file's
/// both sides.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The reward model: a `…ForSequenceClassification` checkpoint directory with one label
    /// (e.g. written by `difinfo-train reward`).
    #[arg(long, value_name = "DIR")]
    pub reward_model: PathBuf,
    /// Rows to score, as `FILE` or `LABEL=FILE` (the label defaults to the file's stem);
    /// repeat for several policies' samples. `sample`'s output (prompt, completion, line,
    /// sample) or preference records (chosen and rejected both scored; TRL's formats).
    #[arg(long, value_name = "[LABEL=]FILE", required = true)]
    pub data: Vec<String>,
    /// Output JSONL: one row per completion (label, data, the row's identifying fields,
    /// side, reward).
    #[arg(long)]
    pub out: PathBuf,
    /// Summary JSON (per label and per prompt: n, mean, 95 % interval) [default: OUT without
    /// `.jsonl`, then `.summary.json`].
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest text in tokens (`none` or 0: no limit); longer texts are dropped, as TRL's
    /// RewardTrainer drops them, and counted.
    #[arg(long, default_value = "none", value_parser = Limit::parse, allow_negative_numbers = true)]
    pub max_length: Limit,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub invalid: InvalidRecords,
}

/// One `--data` argument: its label and file.
fn split_data(arg: &str) -> (String, PathBuf) {
    let as_file = PathBuf::from(arg);
    match arg.split_once('=') {
        Some((label, file)) if !label.is_empty() && !as_file.exists() => {
            (label.to_string(), PathBuf::from(file))
        }
        _ => {
            let stem = as_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| arg.to_string());
            (stem, as_file)
        }
    }
}

/// The default summary path: `OUT` without `.jsonl`, then `.summary.json`.
pub fn default_summary_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    out.with_file_name(format!("{stem}.summary.json"))
}

/// One text to score, where it came from.
struct Item {
    label: usize,
    line: usize,
    side: Side,
    ids: Map<String, Value>,
    tokens: Vec<u32>,
}

/// Runs `difinfo-train score`.
///
/// # Errors
/// Bad options, data (file:line:field), model and I/O errors.
pub fn run(a: ScoreArgs) -> Result<()> {
    if a.batch_size == 0 {
        return usage("--batch-size must be positive");
    }
    let data: Vec<(String, PathBuf)> = a.data.iter().map(|d| split_data(d)).collect();
    for (i, (l, _)) in data.iter().enumerate() {
        if data[..i].iter().any(|(m, _)| m == l) {
            return usage(format!(
                "--data: label `{l}` given twice; name them LABEL=FILE"
            ));
        }
    }
    let summary = a
        .summary
        .clone()
        .unwrap_or_else(|| default_summary_path(&a.out));
    let files: Vec<(&str, &Path)> = data.iter().map(|(_, f)| ("--data", f.as_path())).collect();
    let mut outs = vec![("--out", a.out.as_path()), ("--summary", summary.as_path())];
    if let Some(r) = a.invalid.named_report() {
        outs.push(("--error-report", r));
    }
    check_paths(&outs, &files, &[("--reward-model", &a.reward_model)])?;
    let (device, dtype) = a.placement.parse()?;
    let bundle = load_bundle(&a.reward_model)?;
    let model = load_reward_model(&a.reward_model, dtype, &device, ScoreHead::Required)?;
    let mut items = Vec::new();
    let mut dropped = 0usize;
    for (li, (label, file)) in data.iter().enumerate() {
        let loaded = read_records(file, a.invalid.skip_invalid, parse_score_line)?;
        if !loaded.errors.is_empty() {
            crate::records::write_error_report(&a.invalid.report_for(file), &loaded.errors)?;
            eprintln!(
                "{}: {} invalid records skipped (listed in {})",
                file.display(),
                loaded.errors.len(),
                a.invalid.report_for(file).display()
            );
        }
        let before = items.len();
        for rec in &loaded.examples {
            let ScoreRecord {
                prompt,
                completions,
                ids,
            } = &rec.value;
            for (side, completion) in completions {
                let tokens = reward_ids(&bundle, prompt, completion).map_err(|e| {
                    let (file, line) = loaded.locate(file, rec.line);
                    DataError {
                        file,
                        line,
                        field: Some(side_field(*side).into()),
                        message: e.to_string(),
                    }
                })?;
                if let Err(e) = model.decoder().check_token_ids(&tokens) {
                    let (file, line) = loaded.locate(file, rec.line);
                    return Err(DataError {
                        file,
                        line,
                        field: Some(side_field(*side).into()),
                        message: format!(
                            "{}: {e}",
                            a.reward_model.join("tokenizer.json").display()
                        ),
                    }
                    .into());
                }
                if a.max_length.0.is_some_and(|m| tokens.len() > m) {
                    dropped += 1;
                    continue;
                }
                items.push(Item {
                    label: li,
                    line: rec.line,
                    side: *side,
                    ids: ids.clone(),
                    tokens,
                });
            }
        }
        eprintln!(
            "{}: label `{label}`, {} records, {} texts to score",
            file.display(),
            loaded.examples.len(),
            items.len() - before
        );
        if items.len() == before {
            return usage(format!("{}: nothing to score", file.display()));
        }
    }
    if dropped > 0 {
        eprintln!(
            "{dropped} texts longer than --max-length {} dropped",
            a.max_length.count()
        );
    }
    let seqs: Vec<Vec<u32>> = items.iter().map(|i| i.tokens.clone()).collect();
    let pb = progress(seqs.len() as u64, "score");
    let rewards = score_sequences(&model, &seqs, a.batch_size, bundle.pad_id(), |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let rows = items.iter().zip(&rewards).map(|(it, r)| {
        let (label, file) = &data[it.label];
        let mut o = Map::new();
        o.insert("label".into(), json!(label));
        o.insert("data".into(), json!(file));
        o.insert("row".into(), json!(it.line));
        o.extend(it.ids.clone());
        if it.side != Side::Completion {
            o.insert("line".into(), json!(it.line));
            o.insert("side".into(), json!(it.side));
        }
        o.insert("reward".into(), json!(r));
        Value::Object(o)
    });
    write_jsonl(&a.out, rows)?;
    let scored: Vec<Scored> = items
        .iter()
        .zip(&rewards)
        .map(|(it, &reward)| {
            let label = &data[it.label].0;
            let group = match it.side {
                Side::Completion => label.clone(),
                s => format!("{label}/{}", side_field(s)),
            };
            let prompt = it
                .ids
                .get("line")
                .and_then(Value::as_u64)
                .unwrap_or(it.line as u64);
            Scored {
                group,
                prompt,
                reward,
            }
        })
        .collect();
    let groups = summarize(&scored);
    print_table(&groups);
    write_json(
        &summary,
        &json!({
            "reward_model": a.reward_model,
            "level": LEVEL,
            "interval": "student-t over the per-prompt means",
            "dropped_over_max_length": dropped,
            "labels": groups,
        }),
    )?;
    eprintln!(
        "wrote {} rewards to {} and the summary to {}",
        rewards.len(),
        a.out.display(),
        summary.display()
    );
    Ok(())
}

/// The record field a side's text came from.
fn side_field(s: Side) -> &'static str {
    match s {
        Side::Completion => "completion",
        Side::Chosen => "chosen",
        Side::Rejected => "rejected",
    }
}

/// The per-label table on stdout.
fn print_table(groups: &[GroupSummary]) {
    let w = groups
        .iter()
        .map(|g| g.label.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:>6}  {:>7}  {:>10}  {:>23}",
        "label", "n", "prompts", "mean", "95% interval"
    );
    for g in groups {
        let ci = match (g.prompts.ci_low, g.prompts.ci_high) {
            (Some(l), Some(h)) => format!("[{l:.4}, {h:.4}]"),
            _ => "-".to_string(),
        };
        println!(
            "{:<w$}  {:>6}  {:>7}  {:>10.4}  {:>23}",
            g.label, g.n, g.prompts.n, g.prompts.mean, ci
        );
    }
}
