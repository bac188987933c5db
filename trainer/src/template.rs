//! Chat templates (Jinja, as in transformers' `apply_chat_template`) rendered with minijinja.
//!
//! The environment mirrors transformers': `trim_blocks` and `lstrip_blocks` on, Python string
//! methods (`.strip()`, `.startswith()`, ...) through minijinja-contrib's pycompat,
//! `raise_exception(msg)` and `strftime_now(fmt)` functions, loop controls, and the special
//! tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) as variables. transformers'
//! `{% generation %}` markers (assistant-mask bookkeeping) are removed before compiling.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool` or `developer`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The roles accepted in conversational data.
pub const KNOWN_ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// Special-token strings passed to templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
}

/// Instruction budget of one template render (see minijinja's fuel).
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// The bound on one render's output: [`RENDER_GROWTH`] times the size of its messages (as
/// JSON) plus this many bytes (1 MiB: real chat templates add a few kilobytes of markup and a
/// system prompt at most). minijinja's fuel counts instructions and its string limit one
/// value: a short template that prints a 50 MB string in a loop passes both.
pub const RENDER_BASE: usize = 1 << 20;

/// See [`RENDER_BASE`]: how many times the messages' size one render may produce.
pub const RENDER_GROWTH: usize = 16;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// The file the template was read from, named in render errors.
    origin: Option<std::path::PathBuf>,
}

/// The render's output, refusing to grow past `limit` bytes.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(b.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("render output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

/// Removes `{% generation %}` / `{% endgeneration %}` tags (with any whitespace control).
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let inner = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner == "generation" || inner == "endgeneration" {
            out.push_str(&rest[..start]);
            rest = &after[end + 2..];
        } else {
            out.push_str(&rest[..start + 2 + end + 2]);
            rest = &after[end + 2..];
        }
    }
    out.push_str(rest);
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A small `strftime` (UTC) for the directives chat templates use: %d %m %Y %y %b %B %H %M %S %%.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles a template source.
    ///
    /// # Errors
    /// [`Error::Template`] with minijinja's description (line included) on a syntax error.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A bound on template work: real chat templates need thousands of instructions per
        // conversation; a runaway (hostile or buggy) template fails instead of hanging.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: None,
        })
    }

    /// Records the file the template was read from (`chat_template.jinja`,
    /// `tokenizer_config.json`): render errors name it.
    pub fn set_origin(&mut self, file: &std::path::Path) {
        self.origin = Some(file.to_path_buf());
    }

    /// An error of this template, naming its file when known.
    fn error(&self, message: String) -> Error {
        Error::Template(match &self.origin {
            Some(f) => format!("{}: {message}", f.display()),
            None => message,
        })
    }

    /// The template source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, optionally followed by the generation prompt.
    ///
    /// # Errors
    /// [`Error::Template`] when rendering fails (including the template's own
    /// `raise_exception`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        self.render_value(
            &Value::from_serialize(messages),
            add_generation_prompt,
            tokens,
        )
    }

    /// Renders an arbitrary `messages` value (anything serializable; the fuzzing path).
    ///
    /// The output is bounded: at most [`RENDER_GROWTH`] × the messages' size as JSON +
    /// [`RENDER_BASE`] bytes; a render that would write more stops there.
    ///
    /// # Errors
    /// See [`ChatTemplate::render`]; an output past the bound.
    pub fn render_value(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| self.error(describe(&e)))?;
        let input = serde_json::to_string(messages).map_or(0, |j| j.len());
        let limit = input
            .saturating_mul(RENDER_GROWTH)
            .saturating_add(RENDER_BASE);
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => tokens.bos_token.clone().unwrap_or_default(),
            eos_token => tokens.eos_token.clone().unwrap_or_default(),
            pad_token => tokens.pad_token.clone(),
            unk_token => tokens.unk_token.clone(),
        };
        let mut out = BoundedOutput {
            buf: Vec::new(),
            limit,
            exceeded: false,
        };
        let rendered = tmpl.render_captured_to(ctx, &mut out);
        if out.exceeded {
            return Err(self.error(format!(
                "the rendered text passes {limit} bytes ({RENDER_GROWTH} × the messages' {input} \
                 bytes as JSON + {RENDER_BASE}): a template whose output grows without bound"
            )));
        }
        rendered.map_err(|e| self.error(describe(&e)))?;
        String::from_utf8(out.buf)
            .map_err(|e| self.error(format!("the rendered text is not UTF-8: {e}")))
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// Compiles `template` and renders `messages_json` (a JSON array of messages) with it: the
/// fuzzing entry point.
///
/// # Errors
/// Invalid JSON, a template that does not compile or render.
pub fn render_chat_template(
    template: &str,
    messages_json: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let msgs: serde_json::Value = serde_json::from_str(messages_json)
        .map_err(|e| Error::InvalidArgument(format!("messages: invalid JSON: {e}")))?;
    let t = ChatTemplate::new(template)?;
    let tokens = TemplateTokens {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        ..Default::default()
    };
    t.render_value(
        &Value::from_serialize(&msgs),
        add_generation_prompt,
        &tokens,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_stripped() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}"),
            "abc{% if x %}"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        assert!(t.render(&[], false, &TemplateTokens::default()).is_err());
    }

    #[test]
    fn runaway_output_is_bounded() {
        // Within minijinja's fuel and its 100 MB string limit: 5 MB a line, 100 lines (500 MB).
        let t = ChatTemplate::new(
            "{% for i in range(100) %}{{ 'ab' * 2500000 }}{% endfor %}{{ messages[0].content }}",
        )
        .unwrap();
        let msgs = [Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        let err = t
            .render(&msgs, false, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("grows without bound"), "{err}");
        // A template's ordinary output passes.
        let ok = ChatTemplate::new("{{ 'ab' * 1000 }}{{ messages[0].content }}").unwrap();
        assert_eq!(
            ok.render(&msgs, false, &TemplateTokens::default())
                .unwrap()
                .len(),
            2002
        );
    }

    #[test]
    fn python_methods_and_raise() {
        let t = ChatTemplate::new("{% for m in messages %}{{ m.content.strip() }}|{% endfor %}{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}").unwrap();
        let msgs = vec![Message {
            role: "user".into(),
            content: "  hi  ".into(),
        }];
        assert_eq!(
            t.render(&msgs, false, &TemplateTokens::default()).unwrap(),
            "hi|"
        );
        let bad = vec![Message {
            role: "system".into(),
            content: "x".into(),
        }];
        let err = t
            .render(&bad, false, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }
}
