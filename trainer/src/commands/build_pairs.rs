//! `difinfo-train build-pairs`: its options ([`BuildPairsArgs`]) and its run; the pairing
//! itself is [`crate::pairs`]'.

use std::path::PathBuf;

use serde_json::json;

use crate::commands::shared::check_paths;
use crate::outputs::Named;
use crate::pairs::{build_pairs, PairOptions};
use crate::records::{write_error_report, write_preferences_parquet, InvalidRecords};
use crate::Result;

/// Appendix J.2: from scored samples, each prompt's highest-reward completion as `chosen` and
/// its lowest as `rejected`, in TRL's preference format (JSONL, or Parquet for `.parquet`).
#[derive(clap::Args)]
pub struct BuildPairsArgs {
    /// `sample`'s output (`line`, `sample`, `prompt`, `completion`), joined with --scores on
    /// `line` and `sample`; leave it out when the score rows carry `prompt` and `completion`.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// The rewards: rows of `reward` with `line` and `sample` (or `prompt` and `completion`),
    /// and `label` or `data` when several files were scored.
    #[arg(long)]
    pub scores: PathBuf,
    /// Output: TRL preference rows (`prompt`, `chosen`, `rejected`), Parquet when the name
    /// ends in `.parquet`, JSON Lines otherwise.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each pair's rewards as `score_chosen` and `score_rejected`.
    #[arg(long, default_value_t = false)]
    pub score_columns: bool,
    /// Keep prompts whose best and worst completions have the same reward (then `rejected`
    /// is the first completion after `chosen`); skipped by default.
    #[arg(long, default_value_t = false)]
    pub keep_ties: bool,
    /// Use the score rows whose `label` (or `data`) is this one (scores of several files)
    /// [default: the rows whose label is --samples' path as given, or its file stem (score's default label), if any]
    #[arg(long)]
    pub label: Option<String>,
    /// The counts as JSON (prompts paired, skipped with one completion or a tie, unmatched
    /// and invalid rows).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub invalid: InvalidRecords,
}

/// Runs `difinfo-train build-pairs`.
///
/// # Errors
/// Data errors naming file, line and field (invalid rows, unmatched samples or scores,
/// non-finite rewards) unless --skip-invalid; option and I/O errors.
pub fn run(a: BuildPairsArgs) -> Result<()> {
    let BuildPairsArgs {
        samples,
        scores,
        out,
        score_columns,
        keep_ties,
        label,
        report,
        invalid,
    } = a;
    let mut outputs: Vec<Named> = vec![("--out", &out)];
    if let Some(r) = &report {
        outputs.push(("--report", r));
    }
    if let Some(r) = invalid.named_report() {
        outputs.push(("--error-report", r));
    }
    let mut inputs: Vec<Named> = vec![("--scores", &scores)];
    if let Some(s) = &samples {
        inputs.push(("--samples", s));
    }
    check_paths(&outputs, &inputs, &[])?;
    let opts = PairOptions {
        keep_ties,
        skip_invalid: invalid.skip_invalid,
        label,
    };
    let built = build_pairs(samples.as_deref(), &scores, &opts)?;
    let error_report = invalid.report_for(&scores);
    if !built.errors.is_empty() {
        write_error_report(&error_report, &built.errors)?;
    }
    let parquet = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if parquet {
        let examples: Vec<_> = built.pairs.iter().map(|p| p.example.clone()).collect();
        let s: Vec<[f64; 2]> = built.pairs.iter().map(|p| p.scores).collect();
        write_preferences_parquet(&out, &examples, score_columns.then_some(&s[..]))?;
    } else {
        crate::io::write_jsonl(
            &out,
            built.pairs.iter().map(|p| {
                let e = &p.example;
                let mut row = json!({
                    "prompt": e.prompt.to_json(),
                    "chosen": e.chosen.to_json(),
                    "rejected": e.rejected.to_json(),
                });
                if score_columns {
                    row["score_chosen"] = json!(p.scores[0]);
                    row["score_rejected"] = json!(p.scores[1]);
                }
                row
            }),
        )?;
    }
    let c = &built.counts;
    eprintln!(
        "{}: {} prompts ({} completions): {} paired, {} skipped with one completion, \
         {} ties {}; {} samples without a score, {} scores without a sample, {} invalid rows \
         skipped",
        out.display(),
        c.prompts,
        c.completions,
        c.paired,
        c.one_completion,
        c.ties_skipped + c.ties_kept,
        if keep_ties { "kept" } else { "skipped" },
        c.samples_without_score,
        c.scores_without_sample,
        c.invalid_samples + c.invalid_scores,
    );
    if !built.errors.is_empty() {
        eprintln!("skipped rows listed in {}", error_report.display());
    }
    if let Some(r) = &report {
        let mut v = serde_json::to_value(c)
            .map_err(|e| crate::Error::InvalidArgument(format!("{}: {e}", r.display())))?;
        v["samples"] = json!(samples.as_ref().map(|p| p.display().to_string()));
        v["scores"] = json!(scores.display().to_string());
        v["out"] = json!(out.display().to_string());
        v["keep_ties"] = json!(keep_ties);
        if !built.errors.is_empty() {
            v["error_report"] = json!(error_report.display().to_string());
        }
        crate::io::write_json(r, &v)?;
    }
    Ok(())
}
