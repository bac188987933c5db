//! Datasets in TRL's formats, parsed with file:line:field error reporting.
//!
//! Files as users hold them ([`read_records`]): JSON Lines (`.jsonl`), a JSON array of records
//! (`.json`), Parquet (`.parquet`, as Hugging Face stores datasets) or a directory of Parquet
//! shards. Every format yields records as JSON text with their location (the line a JSONL
//! record or a JSON array element starts on, or the 1-based row of a Parquet file) and goes
//! through the same parse functions ([`parse_preference_line`] and its siblings). A file is
//! opened once and its format sniffed from the bytes its reader then consumes, so a pipe
//! (`--data /dev/stdin`) or a FIFO reads whole.
//!
//! Preference data: `{"prompt", "chosen", "rejected"}`, either all strings (standard) or all
//! lists of `{"role", "content"}` messages (conversational). SFT data: `{"prompt",
//! "completion"}` (strings or message lists) or `{"messages": [...]}`. Prompt files (for
//! sampling): `{"prompt": ...}` or `{"messages": [...]}`. Blank lines are skipped; other keys
//! are ignored.
//!
//! This file holds the record types and the reader's dispatch on [`DataFormat`]; one file each
//! for a record's fields (`json_record.rs`), JSON Lines (`jsonl.rs`), a JSON array
//! (`json_array.rs`), a file opened once for sniffing and pipes (`opened.rs`), Parquet
//! (`parquet_file.rs`), shard directories (`shards.rs`) and invalid records (`invalid.rs`).

mod invalid;
mod json_array;
mod json_record;
mod jsonl;
mod opened;
mod parquet_file;
mod parquet_writer;
mod shards;

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::template::Message;

use invalid::Collector;
use opened::Opened;
use parquet_file::ParquetRow;

pub use invalid::{default_report_path, write_error_report, InvalidRecords};
pub use json_record::{
    parse_candidates_line, parse_preference_line, parse_preference_str, parse_prompt_line,
    parse_sample_line, parse_score_line, parse_sft_line,
};
pub use jsonl::read_jsonl;
pub use parquet_writer::write_preferences_parquet;

/// A prompt or completion: a plain string or a list of chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    /// Standard format.
    Plain(String),
    /// Conversational format.
    Chat(Vec<Message>),
}

impl Text {
    /// Whether this is conversational.
    pub fn is_chat(&self) -> bool {
        matches!(self, Text::Chat(_))
    }

    /// The JSON form it was read from: a string, or a list of `{role, content}` messages.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Text::Plain(s) => serde_json::Value::String(s.clone()),
            Text::Chat(m) => serde_json::to_value(m).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceExample {
    /// The prompt.
    pub prompt: Text,
    /// The preferred completion.
    pub chosen: Text,
    /// The dispreferred completion.
    pub rejected: Text,
}

/// An SFT example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftExample {
    /// `prompt` + `completion` (loss on the completion).
    PromptCompletion {
        /// The prompt.
        prompt: Text,
        /// The completion.
        completion: Text,
    },
    /// A whole conversation (`messages`).
    Messages(Vec<Message>),
}

/// A prompt to sample from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptExample {
    /// The prompt (`prompt` string or message list, or `messages`).
    pub prompt: Text,
}

/// A parsed record with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// Line number in the file.
    pub line: usize,
    /// The record.
    pub value: T,
}

/// The result of reading a dataset.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// Valid records, in file order. For a directory of shards `line` counts rows across the
    /// shards in name order ([`Loaded::locate`] gives the shard and its row).
    pub examples: Vec<Located<T>>,
    /// Invalid records (only with `skip_invalid`; otherwise the first one is returned as an
    /// error).
    pub errors: Vec<DataError>,
    /// For a directory of shards: each shard with the number of rows before it.
    shards: Vec<(PathBuf, usize)>,
}

impl<T> Loaded<T> {
    /// The file and 1-based line (or row) of record `line` of the dataset at `path`: `path`
    /// itself, or for a directory the shard holding the row and the row within it.
    pub fn locate(&self, path: &Path, line: usize) -> (PathBuf, usize) {
        match self.shards.iter().rev().find(|(_, before)| *before < line) {
            Some((file, before)) => (file.clone(), line - before),
            None => (path.to_path_buf(), line),
        }
    }
}

/// One prompt's candidate completions for `resample-rejected`: `{"prompt", "chosen",
/// "candidates": [...]}`, the candidates drawn from `π_ref` (strings, or message lists when the
/// prompt is conversational).
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateSet {
    /// The prompt.
    pub prompt: Text,
    /// The chosen completion, kept as it is.
    pub chosen: Text,
    /// At least one candidate rejected completion.
    pub candidates: Vec<Text>,
}

/// Which sample of which prompt a row is: `line`, the prompt's line in the prompt file
/// `sample` read, and `sample`, its index among that prompt's samples (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    /// The prompt's line in the prompt file.
    pub line: u64,
    /// The sample's index among its prompt's samples.
    pub sample: u64,
}

/// A row of `sample`'s output as `build-pairs` reads it: `{"line", "sample", "prompt",
/// "completion", ...}` (other fields ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRecord {
    /// `line` and `sample`.
    pub key: SampleKey,
    /// The prompt (a string or a message list).
    pub prompt: Text,
    /// The completion: a string (possibly empty: a sample may end at once), or a message
    /// list when the prompt is one.
    pub completion: Text,
}

/// A row of a scores file: a finite `reward`, with the sample it scores named by `line` and
/// `sample` (joined with a samples file), or carried whole as `prompt` and `completion`, or
/// both; `label` (or, lacking it, `data`) names the scored file when several were.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRecord {
    /// `line` and `sample`, when the row has them.
    pub key: Option<SampleKey>,
    /// `label`, or `data` when there is no `label`.
    pub label: Option<String>,
    /// `prompt` and `completion`, when the row has them.
    pub text: Option<(Text, Text)>,
    /// The reward (finite).
    pub reward: f64,
}

/// The layout of a dataset file, from its name and first bytes ([`DataFormat::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// JSON Lines: one record per line.
    Jsonl,
    /// One JSON array of records.
    JsonArray,
    /// A Parquet file (one record per row; nested columns become lists and objects).
    Parquet,
    /// A directory of Parquet shards (`*.parquet`, read in name order).
    ParquetShards,
}

/// The 4-byte magic that starts (and ends) a Parquet file.
const PARQUET_MAGIC: &[u8; 4] = b"PAR1";

impl DataFormat {
    /// The format of `path`: a directory is Parquet shards; a file starting with `PAR1` is
    /// Parquet; a file whose first non-blank character (within its first 4 KiB) is `[` is a
    /// JSON array; anything else is JSON Lines (so a `.json` file of JSON Lines reads as such).
    /// Reads the file's first bytes (from a pipe, they are gone: [`read_records`] sniffs the
    /// bytes it then reads instead).
    ///
    /// # Errors
    /// I/O errors.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(DataFormat::ParquetShards);
        }
        Ok(Opened::open(path)?.format)
    }

    /// The format of a file that starts with `head` (at most its first 4 KiB).
    fn sniff(head: &[u8]) -> Self {
        if head.starts_with(PARQUET_MAGIC) {
            return DataFormat::Parquet;
        }
        let text = head.strip_prefix("\u{feff}".as_bytes()).unwrap_or(head);
        match text.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => DataFormat::JsonArray,
            _ => DataFormat::Jsonl,
        }
    }
}

/// Reads a dataset in any [`DataFormat`] with `parse` applied to each record's JSON text and
/// location (JSONL: the line; JSON array: the line the element starts on; Parquet: the
/// 1-based row, of its shard for a directory).
///
/// With `skip_invalid`, invalid records are collected in [`Loaded::errors`]; without it the
/// first invalid record is the error. A file that cannot be split into records at all (a JSON
/// array with a syntax error between elements, a corrupt Parquet file) is an error either way.
///
/// # Errors
/// I/O errors; structural errors (file:line); the first data error unless `skip_invalid`.
pub fn read_records<T>(
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    if path.is_dir() {
        return shards::read_shards(path, skip_invalid, parse);
    }
    let opened = Opened::open(path)?;
    match opened.format {
        DataFormat::Jsonl => jsonl::jsonl_records(opened.reader(), path, skip_invalid, parse),
        DataFormat::JsonArray => {
            json_array::read_json_array(opened.reader(), path, skip_invalid, parse)
        }
        DataFormat::Parquet => {
            let mut out = Collector::new(skip_invalid);
            opened.read_parquet(path, 0, &mut parquet_rows(&mut out, &parse, path, 0))?;
            Ok(out.finish(Vec::new()))
        }
        DataFormat::ParquetShards => shards::read_shards(path, skip_invalid, parse),
    }
}

/// Reads Parquet bytes held in memory (named `path` in errors) as [`read_records`] reads a
/// Parquet file: the fuzzing entry point of the Parquet reader.
///
/// # Errors
/// See [`read_records`].
pub fn read_parquet_bytes<T>(
    bytes: &[u8],
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let mut out = Collector::new(skip_invalid);
    let src = bytes::Bytes::copy_from_slice(bytes);
    let len = bytes.len() as u64;
    parquet_file::read_parquet(
        src,
        len,
        path,
        0,
        &mut parquet_rows(&mut out, &parse, path, 0),
    )?;
    Ok(out.finish(Vec::new()))
}

/// The row handler of a Parquet reader: row `row` (counted across shards) is parsed as row
/// `row - start` of `file` (errors restated by [`ParquetRow::explain`]) and collected in `out`
/// at `row`.
fn parquet_rows<'a, T>(
    out: &'a mut Collector<T>,
    parse: &'a impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
    file: &'a Path,
    start: usize,
) -> impl FnMut(usize, &ParquetRow) -> Result<()> + 'a {
    move |row, r| {
        let parsed = parse(&r.text, file, row - start).map_err(|e| r.explain(e));
        out.push(parsed, row)
    }
}

/// An error about a whole file, or a line of it no field of a record names (`line` 0: the
/// file itself).
fn file_error(file: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError {
        file: file.to_path_buf(),
        line,
        field: None,
        message: message.into(),
    }
}
