//! Tokenization exactly as TRL 1.x prepares preference and SFT data.
//!
//! - Standard (string) data: the tokenizer's EOS text is appended to each completion unless it
//!   already ends with it; `prompt` and `prompt + completion` are tokenized with the
//!   post-processor (`add_special_tokens = true`, e.g. a BOS).
//! - Conversational data: the prompt is rendered alone with `add_generation_prompt = true`, the
//!   prompt followed by the completion without it; both are tokenized without special tokens
//!   (the template writes them), as `apply_chat_template(tokenize=True)` does.
//! - The completion starts at the common prefix of the prompt's tokens and the prompt +
//!   completion tokens ([`CompletionBoundary::CommonPrefix`], the default; a mismatch is
//!   counted so the caller can warn), or at the prompt's length as TRL literally slices
//!   ([`CompletionBoundary::PromptLength`]).
//! - Truncation: the prompt to `max_prompt_length` (keeping its start or its end), then each
//!   completion to `max_length − prompt length` (keeping its start); an example whose prompt
//!   alone fills `max_length` is dropped. With no `max_prompt_length` and `keep_start` this is
//!   TRL 1.x's `sequence[:max_length]` for every example that is kept.

use std::path::Path;

use serde_json::Value;

use crate::batch::Sequence;
use crate::error::{DataError, Error, Result};
use crate::provenance::special_token;
use crate::records::{
    parse_preference_line, parse_prompt_line, parse_sft_line, Located, PreferenceExample,
    PromptExample, SftExample, Text,
};
use crate::template::{ChatTemplate, Message, TemplateTokens};

/// A tokenizer with the special tokens and chat template of a checkpoint directory.
#[derive(Debug)]
pub struct TokenizerBundle {
    tokenizer: tokenizers::Tokenizer,
    tokens: TemplateTokens,
    template: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
    warnings: Vec<String>,
    provenance: crate::provenance::Provenance,
}

/// `tokenizer` (read from `tj`) without truncation or padding: transformers calls tokenizers
/// without them (it switches off any saved in tokenizer.json on every call with default
/// arguments), so do we.
///
/// # Errors
/// The tokenizers crate refusing to switch truncation off.
fn untruncated(mut tokenizer: tokenizers::Tokenizer, tj: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// A tokenizer file's JSON.
///
/// # Errors
/// I/O errors; [`Error::Config`] (`invalid JSON: …`) naming `path`.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

impl TokenizerBundle {
    /// Builds a bundle from a tokenizer, the parsed tokenizer_config.json, and an optional
    /// chat template source (which takes precedence over `chat_template` in the config).
    ///
    /// # Errors
    /// A chat template that does not compile.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        tokenizer_config: &Value,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let tokens = TemplateTokens {
            bos_token: special_token(tokenizer_config, "bos_token"),
            eos_token: special_token(tokenizer_config, "eos_token"),
            pad_token: special_token(tokenizer_config, "pad_token"),
            unk_token: special_token(tokenizer_config, "unk_token"),
        };
        let source = chat_template.or_else(|| match tokenizer_config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use the one called `default`.
            Some(Value::Array(xs)) => xs
                .iter()
                .find(|x| x.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|x| x.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        });
        let template = source.as_deref().map(ChatTemplate::new).transpose()?;
        let eos_ids = tokens
            .eos_token
            .as_deref()
            .and_then(|e| tokenizer.token_to_id(e))
            .into_iter()
            .collect();
        let provenance = crate::provenance::Provenance {
            class: tokenizer_config
                .get("tokenizer_class")
                .and_then(Value::as_str)
                .map(str::to_string),
            ..Default::default()
        };
        Ok(TokenizerBundle {
            tokenizer,
            tokens,
            template,
            eos_ids,
            warnings: Vec::new(),
            provenance,
        })
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and `chat_template.jinja`
    /// (optional; preferred over the config's `chat_template`) from a checkpoint directory, or
    /// from the cached conversion of a GGUF file ([`crate::gguf_cache::resolve_model`]).
    ///
    /// # Errors
    /// Missing or invalid tokenizer.json, invalid JSON, a template that does not compile.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, crate::provenance::TokenizerCompat::default())
    }

    /// [`TokenizerBundle::load`] with the pipeline chosen by `compat`: tokenizer.json as saved,
    /// or what transformers 5 builds for the checkpoint's `tokenizer_class`
    /// ([`crate::provenance`]).
    ///
    /// # Errors
    /// See [`TokenizerBundle::load`].
    pub fn load_with(dir: &Path, compat: crate::provenance::TokenizerCompat) -> Result<Self> {
        crate::lora::refuse_adapter_as_model(dir)?;
        // A GGUF file stands for its converted directory (crate::gguf_cache::resolve_model).
        let resolved = crate::gguf_cache::resolve_model(dir)?;
        let dir = resolved.as_path();
        let tj = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?;
        let tokenizer = untruncated(tokenizer, &tj)?;
        let tc = dir.join("tokenizer_config.json");
        let config = if tc.exists() {
            read_json(&tc)?
        } else {
            Value::Object(Default::default())
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            None
        };
        let from_jinja = template.is_some();
        let mut b = Self::from_parts(tokenizer, &config, template)?;
        if let Some(t) = b.template.as_mut() {
            t.set_origin(if from_jinja { &jinja } else { &tc });
        }
        b.check_eos_in_vocabulary(&tc, &tj)?;
        b.choose_pipeline(&tj, &config, compat)?;
        b.add_generation_eos_ids(&dir.join("generation_config.json"));
        if b.tokens.eos_token.is_none() {
            b.warn_no_eos(&tc);
        }
        Ok(b)
    }

    /// TRL appends the tokenizer's eos_token_id: an eos_token that is no token of the
    /// vocabulary has none (TRL fails); appended as text it would be several pieces.
    ///
    /// # Errors
    /// [`Error::Config`] on `tc` (tokenizer_config.json) for such an eos_token.
    fn check_eos_in_vocabulary(&self, tc: &Path, tj: &Path) -> Result<()> {
        let Some(eos) = self.tokens.eos_token.as_deref() else {
            return Ok(());
        };
        if self.tokenizer.token_to_id(eos).is_some() {
            return Ok(());
        }
        Err(Error::Config {
            path: tc.to_path_buf(),
            message: format!(
                "field `eos_token`: {eos:?} is not a token of {}'s vocabulary (it would \
                 be appended to every completion as {} text pieces); set it to the \
                 model's end-of-sequence token",
                tj.display(),
                self.tokenizer
                    .encode(eos, false)
                    .map(|e| e.get_ids().len())
                    .unwrap_or(0)
            ),
        })
    }

    /// Provenance, and transformers 5's rebuild when `compat` asks for it
    /// ([`crate::provenance`]).
    ///
    /// # Errors
    /// tokenizer.json (`tj`) that is not JSON; a rebuild the tokenizers crate refuses.
    fn choose_pipeline(
        &mut self,
        tj: &Path,
        config: &Value,
        compat: crate::provenance::TokenizerCompat,
    ) -> Result<()> {
        let json = read_json(tj)?;
        self.provenance = crate::provenance::Provenance::analyse(&json, config, compat);
        if compat == crate::provenance::TokenizerCompat::Transformers5 {
            if let crate::provenance::Rebuild::Rebuilt(t) =
                crate::provenance::transformers5(&json, config)
            {
                let rebuilt: tokenizers::Tokenizer = t.to_string().parse().map_err(|e| {
                    Error::Tokenizer(format!("{}: transformers 5 rebuild: {e}", tj.display()))
                })?;
                self.tokenizer = untruncated(rebuilt, tj)?;
            }
        }
        Ok(())
    }

    /// The stop tokens generation_config.json (`gc`) may list besides the EOS (e.g. Llama 3's
    /// <|eot_id|>); a missing or unreadable file adds none.
    fn add_generation_eos_ids(&mut self, gc: &Path) {
        let Ok(text) = std::fs::read_to_string(gc) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return;
        };
        let ids: Vec<u32> = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
            Some(Value::Array(xs)) => xs
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        for id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    /// The warning of a bundle with no EOS token (`tc`: tokenizer_config.json, missing or
    /// naming none): no EOS appended, sampling stops only at the stop ids or the limit.
    fn warn_no_eos(&mut self, tc: &Path) {
        let why = if tc.exists() {
            format!("{} names no eos_token", tc.display())
        } else {
            format!("{} is missing", tc.display())
        };
        let stop = if self.eos_ids.is_empty() {
            "sampling stops only at the token limit".to_string()
        } else {
            format!(
                "sampling stops only at generation_config.json's eos_token_id {:?}",
                self.eos_ids
            )
        };
        self.warnings.push(format!(
            "{why}: no EOS token is known, so plain-text completions are tokenized without \
             an appended EOS (TRL appends the tokenizer's eos_token; the log-probs differ) \
             and {stop}"
        ));
    }

    /// What loading found missing and what is done instead (a missing tokenizer_config.json
    /// changes the EOS rule and so every log-prob): for the command to print.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Which pipeline encodes, and how transformers 5 would differ.
    pub fn provenance(&self) -> &crate::provenance::Provenance {
        &self.provenance
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Special-token strings.
    pub fn special_tokens(&self) -> &TemplateTokens {
        &self.tokens
    }

    /// The EOS text appended to plain completions.
    pub fn eos_token(&self) -> Option<&str> {
        self.tokens.eos_token.as_deref()
    }

    /// Token ids that end generation (EOS and generation_config.json's `eos_token_id`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The id used for padding (pad token, else EOS, else 0). Padding is masked out, so the
    /// choice does not change any log-probability.
    pub fn pad_id(&self) -> u32 {
        self.tokens
            .pad_token
            .as_deref()
            .and_then(|t| self.tokenizer.token_to_id(t))
            .or_else(|| self.eos_ids.first().copied())
            .unwrap_or(0)
    }

    /// The chat template, if the checkpoint has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Token ids of `text`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Renders messages with the chat template.
    ///
    /// # Errors
    /// No chat template; a render failure.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| {
            Error::Template("conversational data needs a chat template (tokenizer_config.json `chat_template` or chat_template.jinja)".into())
        })?;
        t.render(messages, add_generation_prompt, &self.tokens)
    }

    /// Tokens of a prompt as the model sees it before its completion (conversational:
    /// rendered with the generation prompt).
    ///
    /// # Errors
    /// Tokenizer and template errors.
    pub fn prompt_ids(&self, prompt: &Text) -> Result<Vec<u32>> {
        match prompt {
            Text::Plain(p) => self.encode(p, true),
            Text::Chat(m) => self.encode(&self.render_chat(m, true)?, false),
        }
    }

    /// Tokens of `prompt + completion`: plain text gets the EOS text appended to the
    /// completion (unless already there) and special tokens; messages are rendered without
    /// the generation prompt and tokenized without special tokens.
    ///
    /// # Errors
    /// Tokenizer and template errors; a prompt and completion of different kinds.
    pub fn full_ids(&self, prompt: &Text, completion: &Text) -> Result<Vec<u32>> {
        match (prompt, completion) {
            (Text::Plain(p), Text::Plain(c)) => {
                let c = match self.eos_token() {
                    Some(eos) if !c.ends_with(eos) => format!("{c}{eos}"),
                    _ => c.clone(),
                };
                self.encode(&format!("{p}{c}"), true)
            }
            (Text::Chat(p), Text::Chat(c)) => {
                let full: Vec<Message> = p.iter().chain(c.iter()).cloned().collect();
                self.encode(&self.render_chat(&full, false)?, false)
            }
            _ => Err(Error::InvalidArgument(
                "prompt and completion must both be strings or both be message lists".into(),
            )),
        }
    }
}

/// Which end of an over-long prompt is kept.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first tokens.
    #[default]
    #[value(alias = "keep_start")]
    KeepStart,
    /// Keep the last tokens.
    #[value(alias = "keep_end")]
    KeepEnd,
}

/// Where the completion of a tokenized `prompt + completion` starts.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionBoundary {
    /// At the common prefix of the prompt's and the prompt + completion's tokens; the scored
    /// sequence is exactly the tokenization of prompt + completion.
    #[default]
    CommonPrefix,
    /// At the prompt's token count, TRL's literal `ids[len(prompt_ids):]` (on a mismatch the
    /// model sees the prompt's tokens followed by that slice).
    PromptLength,
}

/// The rules by which a dataset's text becomes token ids, besides the length limits: the
/// tokenizer pipeline, the end of an over-long prompt that is kept and where a completion
/// starts (with the limits, all but the pipeline make the [`TokenizeOptions`] that tokenization
/// takes). Options of `logps` and of the training commands (recorded in a run's
/// `run_args.json`); each default is its enum's `Default`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::Args,
)]
#[serde(default)]
pub struct TokenizationRules {
    /// Which end of an over-long prompt to keep.
    #[arg(long, value_enum, default_value_t)]
    pub truncation_mode: TruncationMode,
    /// Where a completion starts: the common token prefix of prompt and prompt + completion,
    /// or the prompt's token count (TRL's literal slice).
    #[arg(long, value_enum, default_value_t)]
    pub completion_boundary: CompletionBoundary,
    /// Tokenizer pipeline: the checkpoint's tokenizer.json as saved, or what transformers 5
    /// builds for its tokenizer_class (TRL's ids under transformers 5).
    #[arg(long, value_enum, default_value_t)]
    pub tokenizer_compat: crate::provenance::TokenizerCompat,
}

/// The settings tokenization takes: the length limits and the rules of [`TokenizationRules`]
/// (the pipeline is the bundle's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenizeOptions {
    /// Longest sequence (prompt + completion); `None`: unlimited.
    pub max_length: Option<usize>,
    /// Longest prompt; `None`: unlimited.
    pub max_prompt_length: Option<usize>,
    /// Which end of an over-long prompt is kept.
    pub truncation_mode: TruncationMode,
    /// Where completions start.
    pub boundary: CompletionBoundary,
}

/// Counts of what tokenization did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenizeStats {
    /// Records read.
    pub total: usize,
    /// Examples kept.
    pub kept: usize,
    /// Dropped because the prompt alone fills `max_length`.
    pub dropped_prompt_too_long: usize,
    /// Prompts shortened to `max_prompt_length`.
    pub truncated_prompts: usize,
    /// Examples with a completion shortened to fit `max_length`.
    pub truncated_completions: usize,
    /// Examples whose prompt tokens are not a prefix of the prompt + completion tokens.
    pub prefix_mismatches: usize,
    /// Line of the first prefix mismatch (for the warning).
    pub first_mismatch_line: Option<usize>,
    /// Invalid records skipped (with `skip_invalid`).
    pub invalid: usize,
}

/// A tokenized preference pair: the scored sequences are `prompt_ids ++ chosen_ids` and
/// `prompt_ids ++ rejected_ids`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenizedPair {
    /// Prompt tokens.
    pub prompt_ids: Vec<u32>,
    /// Chosen completion tokens.
    pub chosen_ids: Vec<u32>,
    /// Rejected completion tokens.
    pub rejected_ids: Vec<u32>,
}

impl TokenizedPair {
    /// The chosen sequence with its completion boundary.
    pub fn chosen_sequence(&self) -> Sequence {
        Sequence {
            ids: [&self.prompt_ids[..], &self.chosen_ids[..]].concat(),
            completion_start: self.prompt_ids.len(),
        }
    }

    /// The rejected sequence with its completion boundary.
    pub fn rejected_sequence(&self) -> Sequence {
        Sequence {
            ids: [&self.prompt_ids[..], &self.rejected_ids[..]].concat(),
            completion_start: self.prompt_ids.len(),
        }
    }
}

/// A tokenized SFT example: the sequence is `prompt_ids ++ completion_ids`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenizedSft {
    /// Prompt tokens (empty for `messages` data).
    pub prompt_ids: Vec<u32>,
    /// Completion tokens (the whole conversation for `messages` data).
    pub completion_ids: Vec<u32>,
}

impl TokenizedSft {
    /// The sequence with its completion boundary.
    pub fn sequence(&self) -> Sequence {
        Sequence {
            ids: [&self.prompt_ids[..], &self.completion_ids[..]].concat(),
            completion_start: self.prompt_ids.len(),
        }
    }
}

/// Length of the common prefix of two slices.
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What happened to one example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Kept.
    Kept(T),
    /// Dropped: the prompt alone fills `max_length`.
    Dropped,
}

/// A tokenization failure attributed to a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field (`prompt`, `chosen`, ...).
    pub field: &'static str,
    /// What went wrong.
    pub message: String,
}

/// Splits `prompt` / `prompt + completion` tokenizations of several completions at one shared
/// boundary. Returns the prompt part and the completions, and whether the prompt's tokens were
/// not a prefix of every full tokenization.
fn split_at_boundary(
    prompt: Vec<u32>,
    fulls: Vec<Vec<u32>>,
    boundary: CompletionBoundary,
) -> (Vec<u32>, Vec<Vec<u32>>, bool) {
    let k_common = fulls
        .iter()
        .map(|f| common_prefix_len(&prompt, f))
        .min()
        .unwrap_or(prompt.len());
    let mismatch = k_common < prompt.len();
    match boundary {
        CompletionBoundary::CommonPrefix => {
            let comps = fulls.iter().map(|f| f[k_common..].to_vec()).collect();
            let mut p = prompt;
            p.truncate(k_common);
            (p, comps, mismatch)
        }
        CompletionBoundary::PromptLength => {
            let k = prompt.len();
            let comps = fulls.iter().map(|f| f[k.min(f.len())..].to_vec()).collect();
            (prompt, comps, mismatch)
        }
    }
}

/// Applies `max_prompt_length` / `max_length`. Returns `None` when the example is dropped.
fn truncate(
    mut prompt: Vec<u32>,
    mut comps: Vec<Vec<u32>>,
    opts: &TokenizeOptions,
    stats: &mut TokenizeStats,
) -> Option<(Vec<u32>, Vec<Vec<u32>>)> {
    if let Some(mp) = opts.max_prompt_length {
        if prompt.len() > mp {
            stats.truncated_prompts += 1;
            prompt = match opts.truncation_mode {
                TruncationMode::KeepStart => prompt[..mp].to_vec(),
                TruncationMode::KeepEnd => prompt[prompt.len() - mp..].to_vec(),
            };
        }
    }
    if let Some(ml) = opts.max_length {
        if prompt.len() >= ml {
            stats.dropped_prompt_too_long += 1;
            return None;
        }
        let budget = ml - prompt.len();
        let mut cut = false;
        for c in &mut comps {
            if c.len() > budget {
                c.truncate(budget);
                cut = true;
            }
        }
        if cut {
            stats.truncated_completions += 1;
        }
    }
    Some((prompt, comps))
}

fn field_err(field: &'static str) -> impl Fn(Error) -> FieldError {
    move |e| FieldError {
        field,
        message: e.to_string(),
    }
}

/// Tokenizes one preference pair (see the module docs). `line` is recorded in `stats` on a
/// prefix mismatch.
///
/// # Errors
/// A [`FieldError`] (template render or tokenizer failure).
pub fn tokenize_preference(
    tok: &TokenizerBundle,
    ex: &PreferenceExample,
    opts: &TokenizeOptions,
    line: usize,
    stats: &mut TokenizeStats,
) -> std::result::Result<Outcome<TokenizedPair>, FieldError> {
    let prompt = tok.prompt_ids(&ex.prompt).map_err(field_err("prompt"))?;
    let full_c = tok
        .full_ids(&ex.prompt, &ex.chosen)
        .map_err(field_err("chosen"))?;
    let full_r = tok
        .full_ids(&ex.prompt, &ex.rejected)
        .map_err(field_err("rejected"))?;
    let (prompt, comps, mismatch) = split_at_boundary(prompt, vec![full_c, full_r], opts.boundary);
    if mismatch {
        stats.prefix_mismatches += 1;
        stats.first_mismatch_line.get_or_insert(line);
    }
    let Some((prompt_ids, mut comps)) = truncate(prompt, comps, opts, stats) else {
        return Ok(Outcome::Dropped);
    };
    let rejected_ids = comps.pop().unwrap_or_default();
    let chosen_ids = comps.pop().unwrap_or_default();
    Ok(Outcome::Kept(TokenizedPair {
        prompt_ids,
        chosen_ids,
        rejected_ids,
    }))
}

/// Tokenizes one SFT example. `messages` data is one sequence scored from its second token,
/// truncated to `max_length` by `truncation_mode`.
///
/// # Errors
/// A [`FieldError`].
pub fn tokenize_sft(
    tok: &TokenizerBundle,
    ex: &SftExample,
    opts: &TokenizeOptions,
    line: usize,
    stats: &mut TokenizeStats,
) -> std::result::Result<Outcome<TokenizedSft>, FieldError> {
    match ex {
        SftExample::PromptCompletion { prompt, completion } => {
            let p = tok.prompt_ids(prompt).map_err(field_err("prompt"))?;
            let full = tok
                .full_ids(prompt, completion)
                .map_err(field_err("completion"))?;
            let (p, comps, mismatch) = split_at_boundary(p, vec![full], opts.boundary);
            if mismatch {
                stats.prefix_mismatches += 1;
                stats.first_mismatch_line.get_or_insert(line);
            }
            let Some((prompt_ids, mut comps)) = truncate(p, comps, opts, stats) else {
                return Ok(Outcome::Dropped);
            };
            Ok(Outcome::Kept(TokenizedSft {
                prompt_ids,
                completion_ids: comps.pop().unwrap_or_default(),
            }))
        }
        SftExample::Messages(m) => {
            let text = tok.render_chat(m, false).map_err(field_err("messages"))?;
            let mut ids = tok.encode(&text, false).map_err(field_err("messages"))?;
            if let Some(ml) = opts.max_length {
                if ids.len() > ml {
                    stats.truncated_completions += 1;
                    ids = match opts.truncation_mode {
                        TruncationMode::KeepStart => ids[..ml].to_vec(),
                        TruncationMode::KeepEnd => ids[ids.len() - ml..].to_vec(),
                    };
                }
            }
            Ok(Outcome::Kept(TokenizedSft {
                prompt_ids: Vec::new(),
                completion_ids: ids,
            }))
        }
    }
}

/// A tokenized dataset.
#[derive(Debug, Clone)]
pub struct TokenizedDataset<T> {
    /// Kept examples with their source lines.
    pub examples: Vec<Located<T>>,
    /// Counts.
    pub stats: TokenizeStats,
    /// Data errors (parse and tokenization), only with `skip_invalid`.
    pub errors: Vec<DataError>,
}

/// Reads a dataset in any format of [`crate::records::read_records`] with `parse`, and turns
/// each record into a kept or dropped example with `tokenize` (given the record, its line and
/// the counts): the one body of [`load_preferences`], [`load_sft`] and [`load_prompts`]. A
/// tokenization error names the record's file and line (its shard's, for a directory) and the
/// field.
///
/// # Errors
/// I/O errors; the first data error (parse or tokenization) unless `skip_invalid`.
fn read_and_tokenize<E, T>(
    file: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<E, DataError>,
    mut tokenize: impl FnMut(
        &E,
        usize,
        &mut TokenizeStats,
    ) -> std::result::Result<Outcome<T>, FieldError>,
) -> Result<TokenizedDataset<T>> {
    let mut loaded = crate::records::read_records(file, skip_invalid, parse)?;
    let mut stats = TokenizeStats {
        total: loaded.examples.len() + loaded.errors.len(),
        ..Default::default()
    };
    let mut errors = std::mem::take(&mut loaded.errors);
    let mut examples = Vec::new();
    for ex in &loaded.examples {
        match tokenize(&ex.value, ex.line, &mut stats) {
            Ok(Outcome::Kept(v)) => examples.push(Located {
                line: ex.line,
                value: v,
            }),
            Ok(Outcome::Dropped) => {}
            Err(fe) => {
                let (file, line) = loaded.locate(file, ex.line);
                let de = DataError {
                    file,
                    line,
                    field: Some(fe.field.to_string()),
                    message: fe.message,
                };
                if skip_invalid {
                    errors.push(de);
                } else {
                    return Err(de.into());
                }
            }
        }
    }
    errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    stats.kept = examples.len();
    stats.invalid = errors.len();
    Ok(TokenizedDataset {
        examples,
        stats,
        errors,
    })
}

/// Reads and tokenizes a preference dataset (JSONL, JSON array, Parquet or a directory of
/// Parquet shards: [`crate::records::read_records`]).
///
/// # Errors
/// I/O errors; the first data error (file:line:field) unless `skip_invalid`.
pub fn load_preferences(
    tok: &TokenizerBundle,
    file: &Path,
    opts: &TokenizeOptions,
    skip_invalid: bool,
) -> Result<TokenizedDataset<TokenizedPair>> {
    read_and_tokenize(file, skip_invalid, parse_preference_line, |ex, line, st| {
        tokenize_preference(tok, ex, opts, line, st)
    })
}

/// Reads and tokenizes an SFT dataset (any format of [`crate::records::read_records`]).
///
/// # Errors
/// See [`load_preferences`].
pub fn load_sft(
    tok: &TokenizerBundle,
    file: &Path,
    opts: &TokenizeOptions,
    skip_invalid: bool,
) -> Result<TokenizedDataset<TokenizedSft>> {
    read_and_tokenize(file, skip_invalid, parse_sft_line, |ex, line, st| {
        tokenize_sft(tok, ex, opts, line, st)
    })
}

/// Reads a prompt dataset (any format of [`crate::records::read_records`]) and tokenizes each
/// prompt (truncated to `max_prompt_length`, keeping its end).
///
/// # Errors
/// See [`load_preferences`].
pub fn load_prompts(
    tok: &TokenizerBundle,
    file: &Path,
    max_prompt_length: Option<usize>,
    skip_invalid: bool,
) -> Result<TokenizedDataset<(PromptExample, Vec<u32>)>> {
    read_and_tokenize(file, skip_invalid, parse_prompt_line, |ex, _line, st| {
        let mut ids = tok.prompt_ids(&ex.prompt).map_err(field_err("prompt"))?;
        if let Some(mp) = max_prompt_length {
            if ids.len() > mp {
                st.truncated_prompts += 1;
                ids = ids[ids.len() - mp..].to_vec();
            }
        }
        Ok(Outcome::Kept((ex.clone(), ids)))
    })
}
