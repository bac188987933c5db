//! A JSON array of records (`.json`): each element's text with the line it starts on.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::invalid::Collector;
use super::{file_error, Loaded};
use crate::error::{DataError, Error, Result};

/// Reads a whole JSON array of records (`reader` from its first byte; `path` names it in
/// errors) with `parse` applied to each element's text and the line it starts on.
///
/// # Errors
/// I/O errors; text that is not UTF-8 (at its line); the structural errors of
/// [`json_array_records`], either way; the first data error unless `skip_invalid`.
pub(super) fn read_json_array<T>(
    mut reader: impl Read,
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let mut text = Vec::new();
    reader
        .read_to_end(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(text).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        file_error(path, line, "not valid UTF-8")
    })?;
    let mut out = Collector::new(skip_invalid);
    for (line, record) in json_array_records(&text, path)? {
        out.push(parse(record, path, line), line)?;
    }
    Ok(out.finish(Vec::new()))
}

/// The elements of a JSON array, each as its text with the line it starts on.
///
/// # Errors
/// Not an array, a syntax error (at its line), text after the closing bracket.
fn json_array_records<'a>(
    text: &'a str,
    path: &Path,
) -> std::result::Result<Vec<(usize, &'a str)>, DataError> {
    let err = |line: usize, message: String| file_error(path, line, message);
    let bytes = text.as_bytes();
    let mut i = if text.starts_with('\u{feff}') { 3 } else { 0 };
    let mut line = 1;
    let skip_ws = |i: &mut usize, line: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            if bytes[*i] == b'\n' {
                *line += 1;
            }
            *i += 1;
        }
    };
    skip_ws(&mut i, &mut line);
    if bytes.get(i) != Some(&b'[') {
        return Err(err(line, "expected a JSON array of records".into()));
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(&mut i, &mut line);
        if out.is_empty() && bytes.get(i) == Some(&b']') {
            i += 1;
            break;
        }
        let start = i;
        let start_line = line;
        let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        match values.next() {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return Err(err(
                    start_line + e.line().saturating_sub(1),
                    format!("invalid JSON in the array: {e}"),
                ))
            }
            None => return Err(err(line, "the JSON array is not closed".into())),
        }
        let end = start + values.byte_offset();
        line += bytes[start..end].iter().filter(|&&b| b == b'\n').count();
        out.push((start_line, &text[start..end]));
        i = end;
        skip_ws(&mut i, &mut line);
        match bytes.get(i) {
            Some(b',') => i += 1,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(_) => {
                return Err(err(
                    line,
                    "expected `,` or `]` after an array element".into(),
                ))
            }
            None => return Err(err(line, "the JSON array is not closed".into())),
        }
    }
    skip_ws(&mut i, &mut line);
    if i < bytes.len() {
        return Err(err(line, "text after the JSON array".into()));
    }
    Ok(out)
}
