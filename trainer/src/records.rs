//! Datasets in TRL's formats, parsed with file:line:field error reporting.
//!
//! Files as users hold them ([`read_records`]): JSON Lines (`.jsonl`), a JSON array of records
//! (`.json`), Parquet (`.parquet`, as Hugging Face stores datasets) or a directory of Parquet
//! shards. Every format yields records as JSON text with their location (the line a JSONL
//! record or a JSON array element starts on, or the 1-based row of a Parquet file) and goes
//! through the same parse functions below. A file is opened once and its format sniffed from
//! the bytes its reader then consumes, so a pipe (`--data /dev/stdin`) or a FIFO reads whole.
//!
//! Preference data: `{"prompt", "chosen", "rejected"}`, either all strings (standard) or all
//! lists of `{"role", "content"}` messages (conversational). SFT data: `{"prompt",
//! "completion"}` (strings or message lists) or `{"messages": [...]}`. Prompt files (for
//! sampling): `{"prompt": ...}` or `{"messages": [...]}`. Blank lines are skipped; other keys
//! are ignored.

mod parquet_file;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Error, Result};
use crate::template::{Message, KNOWN_ROLES};

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

impl Text {
    /// The JSON form it was read from: a string, or a list of `{role, content}` messages.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Text::Plain(s) => serde_json::Value::String(s.clone()),
            Text::Chat(m) => serde_json::to_value(m).unwrap_or(serde_json::Value::Null),
        }
    }
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

struct Ctx<'a> {
    file: &'a Path,
    line: usize,
}

impl Ctx<'_> {
    fn err(&self, field: Option<&str>, message: impl Into<String>) -> DataError {
        DataError {
            file: self.file.to_path_buf(),
            line: self.line,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_object(text: &str, cx: &Ctx) -> std::result::Result<Map<String, Value>, DataError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| cx.err(None, format!("invalid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(cx.err(
            None,
            format!("expected a JSON object, found {}", type_name(&other)),
        )),
    }
}

fn parse_messages(
    v: &Value,
    field: &str,
    cx: &Ctx,
) -> std::result::Result<Vec<Message>, DataError> {
    let Value::Array(items) = v else {
        return Err(cx.err(
            Some(field),
            format!("expected a list of messages, found {}", type_name(v)),
        ));
    };
    if items.is_empty() {
        return Err(cx.err(Some(field), "empty list of messages"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let f = format!("{field}[{i}]");
            let Value::Object(o) = m else {
                return Err(cx.err(
                    Some(&f),
                    format!("expected a message object, found {}", type_name(m)),
                ));
            };
            let role = match o.get("role") {
                None => return Err(cx.err(Some(&format!("{f}.role")), "missing")),
                Some(Value::String(r)) => r.clone(),
                Some(other) => {
                    return Err(cx.err(
                        Some(&format!("{f}.role")),
                        format!("expected a string, found {}", type_name(other)),
                    ))
                }
            };
            if !KNOWN_ROLES.contains(&role.as_str()) {
                return Err(cx.err(
                    Some(&format!("{f}.role")),
                    format!(
                        "unknown role `{role}`; expected one of {}",
                        KNOWN_ROLES.join(", ")
                    ),
                ));
            }
            let content = match o.get("content") {
                None => return Err(cx.err(Some(&format!("{f}.content")), "missing")),
                Some(Value::String(c)) => c.clone(),
                Some(other) => {
                    return Err(cx.err(
                        Some(&format!("{f}.content")),
                        format!("expected a string, found {}", type_name(other)),
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// Reads field `name` as a [`Text`]; `chat` forces the kind (`Some(true)`: messages).
fn text_field(
    o: &Map<String, Value>,
    name: &str,
    chat: Option<bool>,
    cx: &Ctx,
) -> std::result::Result<Text, DataError> {
    let v = o.get(name).ok_or_else(|| cx.err(Some(name), "missing"))?;
    match (v, chat) {
        (Value::String(s), None | Some(false)) => {
            if s.is_empty() {
                Err(cx.err(Some(name), "is empty"))
            } else {
                Ok(Text::Plain(s.clone()))
            }
        }
        (Value::Array(_), None | Some(true)) => Ok(Text::Chat(parse_messages(v, name, cx)?)),
        (other, Some(true)) => Err(cx.err(
            Some(name),
            format!(
                "expected a list of messages (the prompt is conversational), found {}",
                type_name(other)
            ),
        )),
        (other, Some(false)) => Err(cx.err(
            Some(name),
            format!(
                "expected a string (the prompt is a string), found {}",
                type_name(other)
            ),
        )),
        (other, None) => Err(cx.err(
            Some(name),
            format!(
                "expected a string or a list of messages, found {}",
                type_name(other)
            ),
        )),
    }
}

/// Parses one line of preference data. `file` and `line` locate errors.
///
/// # Errors
/// A [`DataError`] naming the field: invalid JSON, not an object, a missing or empty field, a
/// wrong type, mixed formats, an unknown role.
pub fn parse_preference_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<PreferenceExample, DataError> {
    let cx = Ctx { file, line };
    let o = parse_object(text, &cx)?;
    if !o.contains_key("prompt") && o.contains_key("chosen") && o.contains_key("rejected") {
        return implicit_prompt(&o, &cx);
    }
    let prompt = text_field(&o, "prompt", None, &cx)?;
    let chat = Some(prompt.is_chat());
    let chosen = text_field(&o, "chosen", chat, &cx)?;
    let rejected = text_field(&o, "rejected", chat, &cx)?;
    Ok(PreferenceExample {
        prompt,
        chosen,
        rejected,
    })
}

/// TRL's implicit prompt (`maybe_extract_prompt`): a record with `chosen` and `rejected` but no
/// `prompt` has the longest common prefix of the two as its prompt — characters of two strings
/// (a space just before the point where they differ goes to the completions), or messages of
/// two conversations — and the rest as the completions. When one is a prefix of the other, the
/// prompt stops one element short of the shorter, as TRL's loop does.
fn implicit_prompt(
    o: &Map<String, Value>,
    cx: &Ctx,
) -> std::result::Result<PreferenceExample, DataError> {
    /// TRL's split index over two sequences (`space`: whether the element before it is a space).
    fn split<T: PartialEq>(c: &[T], r: &[T], space: impl Fn(&T) -> bool) -> usize {
        let n = c.len().min(r.len());
        match (0..n).find(|&i| c[i] != r[i]) {
            Some(i) if i > 0 && space(&c[i - 1]) => i - 1,
            Some(i) => i,
            None => n.saturating_sub(1),
        }
    }
    let chosen = text_field(o, "chosen", None, cx)?;
    let rejected = text_field(o, "rejected", Some(chosen.is_chat()), cx)?;
    let none = || {
        cx.err(
            Some("prompt"),
            "missing, and `chosen` and `rejected` share no prefix to take as the implicit prompt",
        )
    };
    Ok(match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let i = split(&cc, &rc, |ch| *ch == ' ');
            if i == 0 {
                return Err(none());
            }
            let text = |v: &[char]| v.iter().collect::<String>();
            // i < min(|c|, |r|): both completions keep at least one character.
            PreferenceExample {
                prompt: Text::Plain(text(&cc[..i])),
                chosen: Text::Plain(text(&cc[i..])),
                rejected: Text::Plain(text(&rc[i..])),
            }
        }
        (Text::Chat(c), Text::Chat(r)) => {
            let i = split(&c, &r, |_| false);
            if i == 0 {
                return Err(none());
            }
            // i < min(|c|, |r|): both completions keep at least one message.
            PreferenceExample {
                prompt: Text::Chat(c[..i].to_vec()),
                chosen: Text::Chat(c[i..].to_vec()),
                rejected: Text::Chat(r[i..].to_vec()),
            }
        }
        _ => {
            return Err(cx.err(
                Some("rejected"),
                "must be of the same kind as `chosen` (both strings or both message lists)",
            ))
        }
    })
}

/// Parses one line of SFT data (`prompt`/`completion` or `messages`).
///
/// # Errors
/// See [`parse_preference_line`].
pub fn parse_sft_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<SftExample, DataError> {
    let cx = Ctx { file, line };
    let o = parse_object(text, &cx)?;
    if o.contains_key("messages") && !o.contains_key("prompt") {
        return Ok(SftExample::Messages(parse_messages(
            &o["messages"],
            "messages",
            &cx,
        )?));
    }
    if !o.contains_key("prompt") {
        return Err(cx.err(
            Some("prompt"),
            "missing (SFT data needs `prompt` and `completion`, or `messages`)",
        ));
    }
    let prompt = text_field(&o, "prompt", None, &cx)?;
    let completion = text_field(&o, "completion", Some(prompt.is_chat()), &cx)?;
    Ok(SftExample::PromptCompletion { prompt, completion })
}

/// Parses one line of a prompt file (`prompt` string or messages, or `messages`).
///
/// # Errors
/// See [`parse_preference_line`].
pub fn parse_prompt_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<PromptExample, DataError> {
    let cx = Ctx { file, line };
    let o = parse_object(text, &cx)?;
    if o.contains_key("messages") && !o.contains_key("prompt") {
        return Ok(PromptExample {
            prompt: Text::Chat(parse_messages(&o["messages"], "messages", &cx)?),
        });
    }
    Ok(PromptExample {
        prompt: text_field(&o, "prompt", None, &cx)?,
    })
}

/// Parses a preference line with a placeholder location: the fuzzing entry point.
///
/// # Errors
/// See [`parse_preference_line`].
pub fn parse_preference_str(text: &str) -> std::result::Result<PreferenceExample, DataError> {
    parse_preference_line(text, Path::new("<input>"), 1)
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

/// How many bytes the format sniffer looks at.
const SNIFF_BYTES: usize = 4096;

/// A data file opened once, its first bytes read to sniff its [`DataFormat`] and kept in
/// front of the rest for the reader: nothing is read twice, so a pipe or a FIFO (which can be
/// read, and for a FIFO opened, only once) reads whole.
struct Opened {
    format: DataFormat,
    /// The first bytes (up to [`SNIFF_BYTES`]), already read from `file`.
    head: Vec<u8>,
    file: std::fs::File,
}

impl Opened {
    /// Opens `path` and reads its first bytes.
    fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        Ok(Opened {
            format: DataFormat::sniff(&head),
            head,
            file,
        })
    }

    /// The whole file as a buffered reader, from its first byte.
    fn reader(self) -> std::io::BufReader<impl Read> {
        std::io::BufReader::new(std::io::Cursor::new(self.head).chain(self.file))
    }

    /// Reads the file as Parquet: a regular file in place (the reader seeks), anything else
    /// (a pipe) into memory first, up to a quarter of the machine's memory.
    fn read_parquet(
        self,
        path: &Path,
        first: usize,
        on_row: &mut dyn FnMut(usize, &parquet_file::ParquetRow) -> Result<()>,
    ) -> Result<usize> {
        let meta = self.file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            return parquet_file::read_parquet(self.file, meta.len(), path, first, on_row);
        }
        let limit = crate::model::physical_memory().map_or(u64::MAX, |m| (m / 4) as u64);
        let mut bytes = Vec::new();
        self.reader()
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > limit {
            return Err(DataError {
                file: path.to_path_buf(),
                line: 0,
                field: None,
                message: format!(
                    "a Parquet file that is not a regular file (a pipe) is read into memory, \
                     and this one is larger than {} (a quarter of this machine's memory); \
                     save it to a file and pass that",
                    crate::model::format_bytes(u128::from(limit))
                ),
            }
            .into());
        }
        let len = bytes.len() as u64;
        parquet_file::read_parquet(bytes::Bytes::from(bytes), len, path, first, on_row)
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
        return read_shards(path, skip_invalid, parse);
    }
    let opened = Opened::open(path)?;
    match opened.format {
        DataFormat::Jsonl => jsonl_records(opened.reader(), path, skip_invalid, parse),
        DataFormat::JsonArray => {
            let mut text = Vec::new();
            opened
                .reader()
                .read_to_end(&mut text)
                .map_err(|e| Error::io(path, e))?;
            let text = String::from_utf8(text).map_err(|e| {
                let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                DataError {
                    file: path.to_path_buf(),
                    line,
                    field: None,
                    message: "not valid UTF-8".into(),
                }
            })?;
            let mut out = Collector::new(skip_invalid);
            for (line, record) in json_array_records(&text, path)? {
                out.push(parse(record, path, line), line)?;
            }
            Ok(out.finish(Vec::new()))
        }
        DataFormat::Parquet => {
            let mut out = Collector::new(skip_invalid);
            opened.read_parquet(path, 0, &mut |row, r| {
                out.push(parse(&r.text, path, row).map_err(|e| r.explain(e)), row)
            })?;
            Ok(out.finish(Vec::new()))
        }
        DataFormat::ParquetShards => read_shards(path, skip_invalid, parse),
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
    parquet_file::read_parquet(src, bytes.len() as u64, path, 0, &mut |row, r| {
        out.push(parse(&r.text, path, row).map_err(|e| r.explain(e)), row)
    })?;
    Ok(out.finish(Vec::new()))
}

/// Whether `p`'s extension is `ext`, in any case (`.PARQUET` is Parquet).
fn has_extension(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|x| x.eq_ignore_ascii_case(ext))
}

/// Reads a directory of Parquet shards (`*.parquet` in any case, in name order). A JSON Lines
/// file there (`*.jsonl`) is refused, named, rather than skipped in silence.
fn read_shards<T>(
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let refuse = |file: &Path, message: String| -> Error {
        DataError {
            file: file.to_path_buf(),
            line: 0,
            field: None,
            message,
        }
        .into()
    };
    let mut files = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if !p.is_file() {
            continue;
        }
        if has_extension(&p, "parquet") {
            files.push(p);
        } else if has_extension(&p, "jsonl") {
            return Err(refuse(
                &p,
                format!(
                    "a JSON Lines file in a dataset directory, which is read as Parquet shards \
                     (*.parquet) only; pass it as --data itself, or move it out of {}",
                    path.display()
                ),
            ));
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(refuse(
            path,
            "a dataset directory must hold Parquet shards (*.parquet); none found".into(),
        ));
    }
    let mut out = Collector::new(skip_invalid);
    let mut shards = Vec::new();
    let mut before = 0;
    for f in files {
        shards.push((f.clone(), before));
        let start = before;
        before = Opened::open(&f)?.read_parquet(&f, start, &mut |row, r| {
            // Errors name the shard and its row; records count rows across shards.
            let parsed = parse(&r.text, &f, row - start).map_err(|e| r.explain(e));
            out.push(parsed, row)
        })?;
    }
    Ok(out.finish(shards))
}

/// Gathers parsed records (or the first error, without `skip_invalid`).
struct Collector<T> {
    skip_invalid: bool,
    examples: Vec<Located<T>>,
    errors: Vec<DataError>,
}

impl<T> Collector<T> {
    fn new(skip_invalid: bool) -> Self {
        Collector {
            skip_invalid,
            examples: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn push(&mut self, r: std::result::Result<T, DataError>, line: usize) -> Result<()> {
        match r {
            Ok(value) => self.examples.push(Located { line, value }),
            Err(e) if self.skip_invalid => self.errors.push(e),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn finish(self, shards: Vec<(PathBuf, usize)>) -> Loaded<T> {
        Loaded {
            examples: self.examples,
            errors: self.errors,
            shards,
        }
    }
}

/// The elements of a JSON array, each as its text with the line it starts on.
///
/// # Errors
/// Not an array, a syntax error (at its line), text after the closing bracket.
fn json_array_records<'a>(
    text: &'a str,
    path: &Path,
) -> std::result::Result<Vec<(usize, &'a str)>, DataError> {
    let err = |line: usize, message: String| DataError {
        file: path.to_path_buf(),
        line,
        field: None,
        message,
    };
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
fn jsonl_records<T>(
    reader: impl BufRead,
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let text = match line {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let err = DataError {
                    file: path.to_path_buf(),
                    line: line_no,
                    field: None,
                    message: "not valid UTF-8".into(),
                };
                if skip_invalid {
                    errors.push(err);
                    continue;
                }
                return Err(err.into());
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
        match parse(text, path, line_no) {
            Ok(v) => examples.push(Located {
                line: line_no,
                value: v,
            }),
            Err(e) if skip_invalid => errors.push(e),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Loaded {
        examples,
        errors,
        shards: Vec::new(),
    })
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

/// Parses one line of candidate data.
///
/// # Errors
/// A [`DataError`] naming the field (`candidates[i]` for a bad candidate), as
/// [`parse_preference_line`].
pub fn parse_candidates_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<CandidateSet, DataError> {
    let cx = Ctx { file, line };
    let o = parse_object(text, &cx)?;
    let prompt = text_field(&o, "prompt", None, &cx)?;
    let chat = prompt.is_chat();
    let chosen = text_field(&o, "chosen", Some(chat), &cx)?;
    let Some(list) = o.get("candidates") else {
        return Err(cx.err(Some("candidates"), "missing"));
    };
    let Value::Array(items) = list else {
        return Err(cx.err(
            Some("candidates"),
            format!("expected a list of completions, found {}", type_name(list)),
        ));
    };
    if items.is_empty() {
        return Err(cx.err(Some("candidates"), "is empty"));
    }
    let candidates = items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut one = Map::new();
            one.insert(format!("candidates[{i}]"), v.clone());
            text_field(&one, &format!("candidates[{i}]"), Some(chat), &cx)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(CandidateSet {
        prompt,
        chosen,
        candidates,
    })
}
