//! One record's JSON text → a typed example, with file:line:field error reporting: preference
//! pairs (with TRL's implicit prompt), SFT examples, prompts and candidate sets.

use std::path::Path;

use serde_json::{Map, Value};

use super::{
    CandidateSet, PreferenceExample, PromptExample, SampleKey, SampleRecord, ScoreRecord,
    SftExample, Text,
};
use crate::error::DataError;
use crate::template::{Message, KNOWN_ROLES};

/// Where one record stands, named by the errors about it.
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

/// How an error names the JSON type of `v` ("a string", "a list", …).
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

/// The record's JSON text as an object.
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

/// The string `key` of message `f` (`messages[i]`), errors naming `f.key`.
fn message_string(
    o: &Map<String, Value>,
    f: &str,
    key: &str,
    cx: &Ctx,
) -> std::result::Result<String, DataError> {
    match o.get(key) {
        None => Err(cx.err(Some(&format!("{f}.{key}")), "missing")),
        Some(Value::String(v)) => Ok(v.clone()),
        Some(other) => Err(cx.err(
            Some(&format!("{f}.{key}")),
            format!("expected a string, found {}", type_name(other)),
        )),
    }
}

/// The list of chat messages in field `field` (`v`), each with a known role and a string
/// content.
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
            let role = message_string(o, &f, "role", cx)?;
            if !KNOWN_ROLES.contains(&role.as_str()) {
                return Err(cx.err(
                    Some(&format!("{f}.role")),
                    format!(
                        "unknown role `{role}`; expected one of {}",
                        KNOWN_ROLES.join(", ")
                    ),
                ));
            }
            let content = message_string(o, &f, "content", cx)?;
            Ok(Message { role, content })
        })
        .collect()
}

/// A record in the conversation form (`messages` and no `prompt`): its parsed messages; `None`
/// for any other record.
fn messages_form(
    o: &Map<String, Value>,
    cx: &Ctx,
) -> Option<std::result::Result<Vec<Message>, DataError>> {
    if o.contains_key("messages") && !o.contains_key("prompt") {
        Some(parse_messages(&o["messages"], "messages", cx))
    } else {
        None
    }
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
    if let Some(messages) = messages_form(&o, &cx) {
        return Ok(SftExample::Messages(messages?));
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
    if let Some(messages) = messages_form(&o, &cx) {
        return Ok(PromptExample {
            prompt: Text::Chat(messages?),
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

/// The `line` and `sample` of a sample or score row, each a non-negative integer; `None` when
/// the row has neither.
fn sample_key(
    o: &Map<String, Value>,
    cx: &Ctx,
) -> std::result::Result<Option<SampleKey>, DataError> {
    let index = |name: &str| match o.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            cx.err(
                Some(name),
                format!("expected a non-negative integer, found {}", type_name(v)),
            )
        }),
    };
    match (index("line")?, index("sample")?) {
        (Some(line), Some(sample)) => Ok(Some(SampleKey { line, sample })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(cx.err(Some("sample"), "missing (the row has `line`)")),
        (None, Some(_)) => Err(cx.err(Some("line"), "missing (the row has `sample`)")),
    }
}

/// The `prompt` and `completion` of a sample or score row: the prompt a string or a message
/// list; the completion a string (an empty one allowed: a sample may end at once), or a
/// message list when the prompt is one.
fn prompt_completion(
    o: &Map<String, Value>,
    cx: &Ctx,
) -> std::result::Result<(Text, Text), DataError> {
    let prompt = text_field(o, "prompt", None, cx)?;
    let completion = match o.get("completion") {
        Some(Value::String(s)) => Text::Plain(s.clone()),
        _ if prompt.is_chat() => text_field(o, "completion", None, cx)?,
        _ => text_field(o, "completion", Some(false), cx)?,
    };
    Ok((prompt, completion))
}

/// Parses one row of `sample`'s output: `line`, `sample`, `prompt`, `completion` (other
/// fields ignored).
///
/// # Errors
/// A [`DataError`] naming the field: invalid JSON, not an object, a missing field, a wrong
/// type, a message-list completion of a string prompt.
pub fn parse_sample_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<SampleRecord, DataError> {
    let cx = Ctx { file, line };
    let o = parse_object(text, &cx)?;
    let key = sample_key(&o, &cx)?.ok_or_else(|| cx.err(Some("line"), "missing"))?;
    let (prompt, completion) = prompt_completion(&o, &cx)?;
    Ok(SampleRecord {
        key,
        prompt,
        completion,
    })
}

/// Parses one row of a scores file: a finite `reward` (a number), with `line` and `sample`
/// or `prompt` and `completion` (or both), and an optional string `label` or `data`.
///
/// JSON has no NaN or infinity: Python's `json` writes them as the bare words `NaN`,
/// `Infinity`, `-Infinity`, and serde and JavaScript write them as `null`; a `reward` of
/// either form is refused as non-finite, naming the field.
///
/// # Errors
/// A [`DataError`] naming the field: invalid JSON, not an object, a missing, mistyped or
/// non-finite `reward`, a half-given key or text.
pub fn parse_score_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<ScoreRecord, DataError> {
    let cx = Ctx { file, line };
    let non_finite = |what: &str| {
        cx.err(
            Some("reward"),
            format!("non-finite ({what}); every reward must be a finite number"),
        )
    };
    let o = match parse_object(text, &cx) {
        Ok(o) => o,
        Err(e) => {
            // Python's json.dumps of a NaN or infinite reward: say so, not "invalid JSON".
            let word = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| {
                text.split_once("\"reward\"")
                    .and_then(|(_, rest)| rest.trim_start().strip_prefix(':'))
                    .is_some_and(|rest| rest.trim_start().starts_with(w))
            });
            return Err(word.map_or(e, non_finite));
        }
    };
    let reward = match o.get("reward") {
        None => return Err(cx.err(Some("reward"), "missing")),
        Some(Value::Null) => return Err(non_finite("null, as NaN and infinities are written")),
        Some(Value::Number(n)) => n.as_f64().filter(|r| r.is_finite()),
        Some(other) => {
            return Err(cx.err(
                Some("reward"),
                format!("expected a number, found {}", type_name(other)),
            ))
        }
    };
    let reward = reward.ok_or_else(|| non_finite("out of the range of a 64-bit float"))?;
    let key = sample_key(&o, &cx)?;
    let text = match (o.contains_key("prompt"), o.contains_key("completion")) {
        (false, false) => None,
        _ => Some(prompt_completion(&o, &cx)?),
    };
    if key.is_none() && text.is_none() {
        return Err(cx.err(
            None,
            "the row names no sample: give `line` and `sample` (joined with --samples) or \
             `prompt` and `completion`",
        ));
    }
    let label = ["label", "data"]
        .into_iter()
        .find_map(|f| o.get(f).map(|v| (f, v)));
    let label = match label {
        None => None,
        Some((_, Value::String(s))) => Some(s.clone()),
        Some((f, v)) => {
            return Err(cx.err(
                Some(f),
                format!("expected a string, found {}", type_name(v)),
            ))
        }
    };
    Ok(ScoreRecord {
        key,
        label,
        text,
        reward,
    })
}
