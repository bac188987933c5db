//! One record's JSON text → a typed example, with file:line:field error reporting: preference
//! pairs (with TRL's implicit prompt), SFT examples, prompts and candidate sets.

use std::path::Path;

use serde_json::{Map, Value};

use super::{CandidateSet, PreferenceExample, PromptExample, SftExample, Text};
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
