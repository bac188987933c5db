//! `difinfo-train report`: its options ([`ReportArgs`]) and its run.

use std::path::PathBuf;

use crate::{Error, Result};

/// One-page log-likelihood displacement report of a finished preference run: report.md and
/// report.png in RUN_DIR (from metrics.jsonl, and entropy.json if present).
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Run directory (holds metrics.jsonl).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
}

/// Runs `difinfo-train report`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: ReportArgs) -> Result<()> {
    let ReportArgs { run_dir } = a;
    let md = crate::diag::report::report(&run_dir)?;
    print!(
        "{}",
        std::fs::read_to_string(&md).map_err(|e| Error::io(&md, e))?
    );
    eprintln!(
        "wrote {} and {}",
        md.display(),
        run_dir.join("report.png").display()
    );
    Ok(())
}
