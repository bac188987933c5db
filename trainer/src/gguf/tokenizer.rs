//! The tokenizer files rebuilt from GGUF metadata: tokenizer.json (validated by loading it),
//! tokenizer_config.json, the special ids, and generation_config.json.
//!
//! Two tokenizer models: `tokenizer.ggml.model = gpt2` (byte-level BPE with the stored merges
//! and the pre-tokenizer named by `tokenizer.ggml.pre`, see [`PreTokenizerFamily`]) and
//! `llama` (SentencePiece BPE: merges derived from the scores as transformers' converter does,
//! byte fallback, `▁` for spaces).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::{json, Value};

use super::metadata::Meta;
use crate::error::{Error, Result};

/// A model family's pre-tokenizer, chosen by `tokenizer.ggml.pre` (the GGUF stores no regex:
/// the name selects llama.cpp's built-in one). Each maps to the `tokenizer.json` pre-tokenizer
/// of the family's Hugging Face checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerFamily {
    /// GPT-2's regex inside ByteLevel (`default`, `gpt-2`, `mpt`, `olmo`, `jais`).
    Gpt2,
    /// Single digits, then GPT-2's regex inside ByteLevel (`smollm`, `starcoder`, `refact`,
    /// `command-r`, `codeshell`).
    DigitsGpt2,
    /// Llama 3's Split regex (digits in groups of up to three), then ByteLevel without a regex
    /// (`llama-bpe`, `llama3`, `llama-v3`, `dbrx`, `smaug-bpe`).
    Llama3,
    /// Qwen2's Split regex (single digits) with NFC, then ByteLevel without a regex (`qwen2`).
    Qwen2,
}

/// The `tokenizer.ggml.pre` names the importer knows, with their family (llama.cpp's
/// `llama-vocab.cpp` groups them the same way).
pub const PRE_TOKENIZERS: [(&str, PreTokenizerFamily); 17] = [
    ("default", PreTokenizerFamily::Gpt2),
    ("gpt-2", PreTokenizerFamily::Gpt2),
    ("gpt2", PreTokenizerFamily::Gpt2),
    ("mpt", PreTokenizerFamily::Gpt2),
    ("olmo", PreTokenizerFamily::Gpt2),
    ("jais", PreTokenizerFamily::Gpt2),
    ("smollm", PreTokenizerFamily::DigitsGpt2),
    ("starcoder", PreTokenizerFamily::DigitsGpt2),
    ("refact", PreTokenizerFamily::DigitsGpt2),
    ("command-r", PreTokenizerFamily::DigitsGpt2),
    ("codeshell", PreTokenizerFamily::DigitsGpt2),
    ("llama-bpe", PreTokenizerFamily::Llama3),
    ("llama3", PreTokenizerFamily::Llama3),
    ("llama-v3", PreTokenizerFamily::Llama3),
    ("dbrx", PreTokenizerFamily::Llama3),
    ("smaug-bpe", PreTokenizerFamily::Llama3),
    ("qwen2", PreTokenizerFamily::Qwen2),
];

/// GPT-2's pre-tokenization regex (what ByteLevel with `use_regex` applies).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's Split regex (its tokenizer.json).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's Split regex (its tokenizer.json).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizerFamily {
    /// The family of a `tokenizer.ggml.pre` name.
    pub fn from_name(name: &str) -> Option<Self> {
        PRE_TOKENIZERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }

    /// The `tokenizer.json` normalizer.
    fn normalizer(self) -> Value {
        match self {
            PreTokenizerFamily::Qwen2 => json!({"type": "NFC"}),
            _ => Value::Null,
        }
    }

    /// The `tokenizer.json` pre-tokenizer.
    fn pre_tokenizer(self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        match self {
            PreTokenizerFamily::Gpt2 => byte_level(true),
            PreTokenizerFamily::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            PreTokenizerFamily::Llama3 => json!({"type": "Sequence", "pretokenizers": [
                split(LLAMA3_REGEX), byte_level(false)]}),
            PreTokenizerFamily::Qwen2 => json!({"type": "Sequence", "pretokenizers": [
                split(QWEN2_REGEX), byte_level(false)]}),
        }
    }

    /// The `tokenizer_class` the family's Hugging Face checkpoints declare in
    /// tokenizer_config.json (SmolLM2 and StarCoder: `GPT2Tokenizer`; Llama 3:
    /// `PreTrainedTokenizerFast`; Qwen2: `Qwen2Tokenizer`).
    pub fn tokenizer_class(self) -> &'static str {
        match self {
            PreTokenizerFamily::Gpt2 | PreTokenizerFamily::DigitsGpt2 => "GPT2Tokenizer",
            PreTokenizerFamily::Llama3 => "PreTrainedTokenizerFast",
            PreTokenizerFamily::Qwen2 => "Qwen2Tokenizer",
        }
    }
}

/// GPT-2's regex, for callers that rebuild a plain ByteLevel pre-tokenizer.
pub fn gpt2_regex() -> &'static str {
    GPT2_REGEX
}

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// The rebuilt tokenizer files and the special ids.
pub(super) struct BuiltTokenizer {
    /// tokenizer.json.
    pub(super) json: Value,
    /// tokenizer_config.json (without `model_max_length`'s value, which the writer sets).
    pub(super) config: Value,
    /// The number of tokens.
    pub(super) vocab_len: usize,
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) pad: Option<u32>,
    /// EOS followed by `eot`/`eom` when they differ (generation stops at any).
    pub(super) stop_ids: Vec<u32>,
    /// The tokenizer model and pre-tokenizer, for the import summary.
    pub(super) description: String,
}

impl BuiltTokenizer {
    /// generation_config.json: the BOS id, the stop ids (one or a list) and the padding id.
    pub(super) fn generation_config(&self) -> Value {
        let mut g = serde_json::Map::new();
        if let Some(b) = self.bos {
            g.insert("bos_token_id".into(), json!(b));
        }
        match self.stop_ids.as_slice() {
            [] => {}
            [e] => {
                g.insert("eos_token_id".into(), json!(e));
            }
            es => {
                g.insert("eos_token_id".into(), json!(es));
            }
        }
        if let Some(p) = self.pad {
            g.insert("pad_token_id".into(), json!(p));
        }
        Value::Object(g)
    }
}

/// transformers' SentencePiece merge extraction: every split of every piece into two pieces of
/// the vocabulary is a merge; a piece's merges are ordered by the ids of their parts, and all
/// merges by the score of the merged piece, highest first (a stable sort, so ties keep id
/// order).
fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(b, _)| {
                let (l, r) = piece.split_at(b);
                Some((*ids.get(l)?, *ids.get(r)?, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// The special token ids of the metadata, each checked to lie in the vocabulary of `n`.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    /// EOS followed by `eot`/`eom` when they differ.
    stop_ids: Vec<u32>,
}

/// What both tokenizer models are built from: the vocabulary, its token types and special
/// ids, and the `add_*` switches.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    ids: SpecialIds,
    /// SentencePiece (`llama`) rather than byte-level BPE (`gpt2`).
    spm: bool,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// tokenizer.json's `added_tokens`.
    added: Vec<Value>,
    /// tokenizer_config.json's `added_tokens_decoder`.
    added_decoder: serde_json::Map<String, Value>,
}

/// One tokenizer model's files and names.
struct ModelFiles {
    /// tokenizer.json.
    json: Value,
    /// tokenizer_config.json's `tokenizer_class`.
    class: &'static str,
    /// For the import summary.
    description: String,
    /// The model's own keys of tokenizer_config.json.
    config: Value,
}

/// Rebuilds the tokenizer of the metadata `meta`: the vocabulary and special ids, then the
/// model's tokenizer.json (SentencePiece or byte-level BPE), checked to load with the
/// tokenizers library, then tokenizer_config.json.
///
/// # Errors
/// [`Error::GgufMissingKey`], [`Error::GgufBadKey`] (a bad or duplicate token, an id outside
/// the vocabulary, a tokenizer that does not load), [`Error::GgufUnsupportedTokenizer`],
/// [`Error::GgufUnknownPreTokenizer`].
pub(super) fn build_tokenizer(meta: &Meta) -> Result<BuiltTokenizer> {
    let v = read_vocab(meta)?;
    let files = if v.spm {
        spm_files(meta, &v)?
    } else {
        bpe_files(meta, &v)?
    };
    // Validate: the tokenizers library must load what was built.
    let text = files.json.to_string();
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        meta.bad(
            "tokenizer.ggml.tokens",
            format!("the rebuilt tokenizer does not load: {e}"),
        )
    })?;
    let config = tokenizer_config(meta, &v, files.class, &files.config)?;
    Ok(BuiltTokenizer {
        json: files.json,
        config,
        vocab_len: v.tokens.len(),
        bos: v.ids.bos,
        eos: v.ids.eos,
        pad: v.ids.pad,
        stop_ids: v.ids.stop_ids,
        description: files.description,
    })
}

/// The vocabulary, its types and special ids, the tokenizer model and the `add_*` switches,
/// and the added tokens.
fn read_vocab<'a>(meta: &'a Meta) -> Result<Vocab<'a>> {
    let model = meta.str("tokenizer.ggml.model")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(meta.bad("tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types = token_types(meta, n)?;
    check_unique(meta, &tokens)?;
    let ids = special_ids(meta, n)?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(Error::GgufUnsupportedTokenizer {
                path: meta.path.to_path_buf(),
                found: other.to_string(),
            })
        }
    };
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(spm);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let add_space_prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(spm);
    let (added, added_decoder) = added_tokens(&tokens, &types, spm);
    Ok(Vocab {
        tokens,
        ids,
        spm,
        add_bos,
        add_eos,
        add_space_prefix,
        added,
        added_decoder,
    })
}

/// `tokenizer.ggml.token_type`, one integer per token (all normal when absent).
fn token_types(meta: &Meta, n: usize) -> Result<Vec<u64>> {
    match meta.array("tokenizer.ggml.token_type")? {
        None => Ok(vec![1; n]),
        Some(a) => {
            if a.len() != n {
                return Err(meta.bad(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {n} tokens", a.len()),
                ));
            }
            a.iter()
                .map(|v| match v {
                    GValue::I32(x) => Ok(*x as i64 as u64),
                    GValue::U32(x) => Ok(u64::from(*x)),
                    GValue::I8(x) => Ok(*x as i64 as u64),
                    GValue::U8(x) => Ok(u64::from(*x)),
                    other => Err(meta.bad(
                        "tokenizer.ggml.token_type",
                        format!("expected integers, found {:?}", other.value_type()),
                    )),
                })
                .collect::<std::result::Result<_, _>>()
        }
    }
}

/// Refuses a token that appears twice (tokenizer.json's vocabulary is a map).
fn check_unique(meta: &Meta, tokens: &[&str]) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if let Some(j) = seen.insert(t, i) {
            return Err(meta.bad(
                "tokenizer.ggml.tokens",
                format!("token {t:?} appears twice (ids {j} and {i})"),
            ));
        }
    }
    Ok(())
}

/// The special ids of a vocabulary of `n` tokens; the stop ids are EOS, then `eot` and `eom`
/// when they differ from those before.
fn special_ids(meta: &Meta, n: usize) -> Result<SpecialIds> {
    let bos = meta.opt_token_id("tokenizer.ggml.bos_token_id", n)?;
    let eos = meta.opt_token_id("tokenizer.ggml.eos_token_id", n)?;
    let unk = meta.opt_token_id("tokenizer.ggml.unknown_token_id", n)?;
    let pad = meta.opt_token_id("tokenizer.ggml.padding_token_id", n)?;
    let mut stop_ids: Vec<u32> = eos.into_iter().collect();
    for k in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta.opt_token_id(k, n)? {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    Ok(SpecialIds {
        bos,
        eos,
        unk,
        pad,
        stop_ids,
    })
}

/// Special (control, unknown) and user-defined tokens are added tokens, as in the
/// tokenizer.json llama.cpp's converter read them from: tokenizer.json's `added_tokens` and
/// tokenizer_config.json's `added_tokens_decoder`.
fn added_tokens(
    tokens: &[&str],
    types: &[u64],
    spm: bool,
) -> (Vec<Value>, serde_json::Map<String, Value>) {
    let mut added = Vec::new();
    let mut added_decoder = serde_json::Map::new();
    for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
        let special = match *ty {
            TOKEN_CONTROL | TOKEN_UNKNOWN => true,
            TOKEN_USER_DEFINED => false,
            _ => continue,
        };
        added.push(
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": !special && spm, "special": special}),
        );
        added_decoder.insert(
            i.to_string(),
            json!({"content": t, "lstrip": false, "normalized": !special && spm,
                "rstrip": false, "single_word": false, "special": special}),
        );
    }
    (added, added_decoder)
}

impl Vocab<'_> {
    /// tokenizer.json's `model.vocab`: each token to its id.
    fn vocab_json(&self) -> serde_json::Map<String, Value> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect()
    }

    /// The token of a special id.
    fn name(&self, id: Option<u32>) -> Option<String> {
        id.map(|i| self.tokens[i as usize].to_string())
    }

    /// tokenizer.json's `post_processor`: `byte_level` alone when neither BOS nor EOS is
    /// added, else a TemplateProcessing that adds them (after `byte_level` when given).
    fn post_processor(&self, byte_level: Option<Value>) -> Value {
        let (add_bos, add_eos, bos, eos) = (self.add_bos, self.add_eos, self.ids.bos, self.ids.eos);
        let tokens = &self.tokens;
        if !add_bos && !add_eos {
            return byte_level.unwrap_or(Value::Null);
        }
        let (mut single, mut pair) = (Vec::new(), Vec::new());
        let mut specials = serde_json::Map::new();
        let spec = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}});
        let spec1 = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 1}});
        for (on, id) in [(add_bos, bos)] {
            if let (true, Some(id)) = (on, id) {
                single.push(spec(id));
                pair.push(spec(id));
            }
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if let (true, Some(id)) = (add_eos, eos) {
            single.push(spec(id));
            pair.push(spec(id));
        }
        if let (true, Some(id)) = (add_bos, bos) {
            pair.push(spec1(id));
        }
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        if let (true, Some(id)) = (add_eos, eos) {
            pair.push(spec1(id));
        }
        for (on, id) in [(add_bos, bos), (add_eos, eos)] {
            if let (true, Some(id)) = (on, id) {
                let t = tokens[id as usize];
                specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
        }
        let template = json!({"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": specials});
        match byte_level {
            Some(b) => json!({"type": "Sequence", "processors": [b, template]}),
            None => template,
        }
    }
}

/// `tokenizer.ggml.scores`: one finite f32 per token.
fn spm_scores(meta: &Meta, n: usize) -> Result<Vec<f32>> {
    match meta.array("tokenizer.ggml.scores")? {
        None => Err(meta.missing("tokenizer.ggml.scores")),
        Some(a) if a.len() != n => Err(meta.bad(
            "tokenizer.ggml.scores",
            format!("{} entries for {n} tokens", a.len()),
        )),
        Some(a) => a
            .iter()
            .map(|v| match v {
                GValue::F32(x) if x.is_finite() => Ok(*x),
                other => Err(meta.bad(
                    "tokenizer.ggml.scores",
                    format!("expected finite f32 scores, found {other:?}"),
                )),
            })
            .collect::<std::result::Result<_, _>>(),
    }
}

/// The SentencePiece (`llama`) tokenizer: BPE with merges from the scores ([`spm_merges`]),
/// byte fallback, `▁` for spaces (prepended when `add_space_prefix`).
fn spm_files(meta: &Meta, v: &Vocab) -> Result<ModelFiles> {
    let scores = spm_scores(meta, v.tokens.len())?;
    let merges: Vec<Value> = spm_merges(&v.tokens, &scores)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let add_space_prefix = v.add_space_prefix;
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": v.added,
        "normalizer": normalizer, "pre_tokenizer": null,
        "post_processor": v.post_processor(None),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": v.name(v.ids.unk),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": v.vocab_json(), "merges": merges},
    });
    let config = json!({"add_bos_token": v.add_bos, "add_eos_token": v.add_eos,
        "legacy": true, "add_prefix_space": add_space_prefix});
    Ok(ModelFiles {
        json,
        class: "LlamaTokenizer",
        description: "llama (SentencePiece BPE)".to_string(),
        config,
    })
}

/// The byte-level BPE (`gpt2`) tokenizer: the stored merges, the pre-tokenizer of the
/// `tokenizer.ggml.pre` family.
fn bpe_files(meta: &Meta, v: &Vocab) -> Result<ModelFiles> {
    let pre_name = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let family =
        PreTokenizerFamily::from_name(pre_name).ok_or_else(|| Error::GgufUnknownPreTokenizer {
            path: meta.path.to_path_buf(),
            found: pre_name.to_string(),
            known: super::known_pre_tokenizers(),
        })?;
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.merges"))?;
    let merges: Vec<Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                meta.bad(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({m:?}) is not two tokens separated by a space"),
                )
            })?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_>>()?;
    let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": v.added,
        "normalizer": family.normalizer(), "pre_tokenizer": family.pre_tokenizer(),
        "post_processor": v.post_processor(Some(byte_level_post)),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": v.vocab_json(), "merges": merges},
    });
    let mut config = json!({"add_prefix_space": false});
    if v.add_bos || v.add_eos {
        config["add_bos_token"] = json!(v.add_bos);
        config["add_eos_token"] = json!(v.add_eos);
    }
    Ok(ModelFiles {
        json,
        class: family.tokenizer_class(),
        description: format!("gpt2 (byte-level BPE), pre-tokenizer `{pre_name}`"),
        config,
    })
}

/// tokenizer_config.json: the added tokens, the special tokens by name, the class, the
/// model's own keys (`model_config`) and the chat template when the metadata has one.
fn tokenizer_config(meta: &Meta, v: &Vocab, class: &str, model_config: &Value) -> Result<Value> {
    let mut config = json!({
        "added_tokens_decoder": v.added_decoder,
        "bos_token": v.name(v.ids.bos),
        "eos_token": v.name(v.ids.eos),
        "unk_token": v.name(v.ids.unk),
        "pad_token": v.name(v.ids.pad),
        "clean_up_tokenization_spaces": false,
        "model_max_length": Value::Null,
        "tokenizer_class": class,
    });
    if let Some(o) = model_config.as_object() {
        for (k, val) in o {
            config[k] = val.clone();
        }
    }
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        config["chat_template"] = json!(t);
    }
    Ok(config)
}
