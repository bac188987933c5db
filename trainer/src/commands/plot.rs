//! `difinfo-train plot RUN_DIR`: a run's training curves in one PNG ([`crate::train::plot`]);
//! `difinfo-train plot --expected-reward SUMMARY --policy LABEL=RUN_DIR …`: the paper's
//! Figure 6, expected reward against β for both reward forms
//! ([`crate::diag::expected_reward`]).

use std::path::PathBuf;

use clap::Args;

use crate::train::plot::plot;

/// `difinfo-train plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Run directory (holds metrics.jsonl)
    #[arg(value_name = "RUN_DIR", required_unless_present = "expected_reward")]
    pub run_dir: Option<PathBuf>,
    /// Output PNG [default: RUN_DIR/metrics.png; with --expected-reward, SUMMARY's directory's
    /// figure6.png]
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Figure 6 instead of training curves: the summary `score` wrote (each label's mean reward
    /// and 95 % interval), drawn against β for DPO's and the reference-free reward form
    #[arg(
        long,
        value_name = "SUMMARY.json",
        conflicts_with = "run_dir",
        requires = "policy"
    )]
    pub expected_reward: Option<PathBuf>,
    /// With --expected-reward: a policy as the summary's label and the training run that made
    /// it (its train_summary.json gives β and the reward form); repeat for every policy
    #[arg(long, value_name = "LABEL=RUN_DIR", value_parser = parse_policy)]
    pub policy: Vec<(String, PathBuf)>,
    /// With --expected-reward: the label of the starting policy's samples (a dashed line)
    #[arg(long, value_name = "LABEL", requires = "expected_reward")]
    pub baseline: Option<String>,
}

fn parse_policy(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() => Ok((l.to_string(), PathBuf::from(d))),
        _ => Err(format!("`{s}`: expected LABEL=RUN_DIR")),
    }
}

/// Figure 6: the table on stdout and the PNG.
fn expected_reward(a: &PlotArgs, summary: &std::path::Path) -> crate::Result<()> {
    use crate::diag::expected_reward::{figure, plot, table};
    let out = a.out.clone().unwrap_or_else(|| {
        summary
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("figure6.png")
    });
    let summaries: Vec<PathBuf> = a
        .policy
        .iter()
        .map(|(_, d)| d.join("train_summary.json"))
        .collect();
    let mut files: Vec<(&str, &std::path::Path)> = vec![("--expected-reward", summary)];
    files.extend(summaries.iter().map(|f| ("--policy", f.as_path())));
    crate::outputs::check_outputs(&[("--out", &out)], &crate::outputs::inputs(&files, &[]))?;
    let fig = figure(summary, &a.policy, a.baseline.as_deref())?;
    plot(&fig, &out)?;
    print!("{}", table(&fig));
    println!("wrote {}", out.display());
    Ok(())
}

/// `difinfo-train plot`.
///
/// # Errors
/// See [`plot`].
pub fn run(a: &PlotArgs) -> crate::Result<()> {
    if let Some(summary) = &a.expected_reward {
        return expected_reward(a, summary);
    }
    let run_dir = a
        .run_dir
        .as_ref()
        .ok_or_else(|| crate::Error::InvalidArgument("plot: RUN_DIR is missing".into()))?;
    let out = a.out.clone().unwrap_or_else(|| run_dir.join("metrics.png"));
    let metrics = run_dir.join(crate::train::metrics::METRICS_JSONL);
    if !metrics.is_file() {
        return Err(crate::Error::InvalidArgument(format!(
            "{}: no such file (RUN_DIR must be a training run's output directory)",
            metrics.display()
        )));
    }
    crate::outputs::check_outputs(
        &[("--out", &out)],
        &crate::outputs::inputs(&[("RUN_DIR's", &metrics)], &[]),
    )?;
    let n = plot(run_dir, &out)?;
    println!("wrote {} ({n} panels)", out.display());
    Ok(())
}
