//! `difinfo-train plot RUN_DIR`: a run's training curves in one PNG ([`crate::train::plot`]).

use std::path::PathBuf;

use clap::Args;

use crate::train::plot::plot;

/// `difinfo-train plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Run directory (holds metrics.jsonl)
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Output PNG [default: RUN_DIR/metrics.png]
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
}

/// `difinfo-train plot`.
///
/// # Errors
/// See [`plot`].
pub fn run(a: &PlotArgs) -> crate::Result<()> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.run_dir.join("metrics.png"));
    let metrics = a.run_dir.join(crate::train::metrics::METRICS_JSONL);
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
    let n = plot(&a.run_dir, &out)?;
    println!("wrote {} ({n} panels)", out.display());
    Ok(())
}
