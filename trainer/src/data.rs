//! JSONL datasets in TRL's formats, parsed with file:line:field error reporting.
//!
//! Preference data: `{"prompt", "chosen", "rejected"}`, either all strings (standard) or all
//! lists of `{"role", "content"}` messages (conversational). SFT data: `{"prompt",
//! "completion"}` (strings or message lists) or `{"messages": [...]}`. Prompt files (for
//! sampling): `{"prompt": ...}` or `{"messages": [...]}`. Blank lines are skipped; other keys
//! are ignored.

use std::io::{BufRead, Write};
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

/// The result of reading a JSONL file.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// Valid records, in file order.
    pub examples: Vec<Located<T>>,
    /// Invalid records (only with `skip_invalid`; otherwise the first one is returned as an
    /// error).
    pub errors: Vec<DataError>,
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
    let mut examples = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
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
    Ok(Loaded { examples, errors })
}

/// Writes data errors as JSONL (`file`, `line`, `field`, `message`), atomically.
///
/// # Errors
/// I/O errors.
pub fn write_error_report(path: &Path, errors: &[DataError]) -> Result<()> {
    crate::checkpoint::write_atomic(path, |tmp| {
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
