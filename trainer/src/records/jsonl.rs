//! JSON Lines (`.jsonl`): one record a line, blank lines skipped, a byte-order mark ignored.

use std::io::BufRead;
use std::path::Path;

use super::invalid::Collector;
use super::{file_error, Loaded};
use crate::error::{DataError, Error, Result};

/// Reads a JSONL file with `parse` applied to each non-blank line.
///
/// With `skip_invalid`, invalid records are collected in [`Loaded::errors`]; without it the
/// first invalid record is the error.
///
/// # Errors
/// I/O errors; the first data error unless `skip_invalid`.
pub fn read_jsonl<T>(
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    jsonl_records(std::io::BufReader::new(f), path, skip_invalid, parse)
}

/// [`read_jsonl`] over an opened reader (`path` names it in errors).
pub(super) fn jsonl_records<T>(
    reader: impl BufRead,
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let mut out = Collector::new(skip_invalid);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let text = match line {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                out.push(Err(file_error(path, line_no, "not valid UTF-8")), line_no)?;
                continue;
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        // A UTF-8 byte-order mark (some editors write one) is not part of the first record.
        let text = if line_no == 1 {
            text.trim_start_matches('\u{feff}')
        } else {
            text.as_str()
        };
        if text.trim().is_empty() {
            continue;
        }
        out.push(parse(text, path, line_no), line_no)?;
    }
    Ok(out.finish(Vec::new()))
}
