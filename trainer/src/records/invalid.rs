//! Invalid records: refused (the first one is the error) or skipped, counted and listed in an
//! error report ([`InvalidRecords`], the options; [`Collector`], the accounting).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Loaded, Located};
use crate::error::{DataError, Error, Result};

/// What a reader does with an invalid record of a data file (a malformed line, a missing or
/// mistyped field): refuse the file, naming file, line and field (the default), or skip it,
/// counted and listed in an error report. The options of `logps`, `sample` and the training
/// commands (recorded in a run's `run_args.json`).
#[derive(
    Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::Args,
)]
#[serde(default)]
pub struct InvalidRecords {
    /// Skip invalid records (counted, and listed in the error report) instead of failing.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_invalid: bool,
    /// Error report of the skipped records (JSONL: line, field, message) [default: the data
    /// file's name + .errors.jsonl]
    #[arg(long, value_name = "FILE")]
    pub error_report: Option<PathBuf>,
}

impl InvalidRecords {
    /// Where the skipped records of `data` are listed: `--error-report`, or
    /// [`default_report_path`].
    pub fn report_for(&self, data: &Path) -> PathBuf {
        self.error_report
            .clone()
            .unwrap_or_else(|| default_report_path(data))
    }

    /// The report given by name when records are skipped (an output to check before any work;
    /// the default report is written, if at all, right after the data is read).
    pub fn named_report(&self) -> Option<&Path> {
        self.error_report.as_deref().filter(|_| self.skip_invalid)
    }
}

/// The default report path for `data`: `<data>.errors.jsonl`.
pub fn default_report_path(data: &Path) -> PathBuf {
    let mut s = data.as_os_str().to_owned();
    s.push(".errors.jsonl");
    PathBuf::from(s)
}

/// Writes data errors as JSONL (`file`, `line`, `field`, `message`), atomically.
///
/// # Errors
/// I/O errors.
pub fn write_error_report(path: &Path, errors: &[DataError]) -> Result<()> {
    crate::io::write_atomic(path, |tmp| {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?);
        for e in errors {
            let v = serde_json::json!({
                "file": e.file.display().to_string(), "line": e.line, "field": e.field, "message": e.message,
                "error": e.to_string(),
            });
            writeln!(f, "{v}").map_err(|e| Error::io(tmp, e))?;
        }
        f.flush().map_err(|e| Error::io(tmp, e))
    })
}

/// Gathers parsed records with their lines, and with `skip_invalid` the invalid ones' errors
/// (without it the first invalid record is the error).
pub(super) struct Collector<T> {
    skip_invalid: bool,
    examples: Vec<Located<T>>,
    errors: Vec<DataError>,
}

impl<T> Collector<T> {
    pub(super) fn new(skip_invalid: bool) -> Self {
        Collector {
            skip_invalid,
            examples: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, r: std::result::Result<T, DataError>, line: usize) -> Result<()> {
        match r {
            Ok(value) => self.examples.push(Located { line, value }),
            Err(e) if self.skip_invalid => self.errors.push(e),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    pub(super) fn finish(self, shards: Vec<(PathBuf, usize)>) -> Loaded<T> {
        Loaded {
            examples: self.examples,
            errors: self.errors,
            shards,
        }
    }
}
