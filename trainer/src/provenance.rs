//! Tokenizer provenance: which pipeline turns text into ids, and what transformers 5 builds
//! instead for the checkpoint's `tokenizer_class`.
//!
//! difinfo encodes with the checkpoint's `tokenizer.json` as saved (the pipeline the model was
//! trained with, and what the `tokenizers` library loads). transformers 5 does the same for
//! `PreTrainedTokenizerFast` (and any class without a constructor of its own), but a class with
//! its own constructor is rebuilt from the vocabulary and merges of `tokenizer.json` with the
//! class's fixed pipeline, keeping only the post-processor (and replacing that too when
//! tokenizer_config.json sets `add_bos_token` / `add_eos_token`):
//!
//! - `GPT2Tokenizer`: no normalizer; pre-tokenizer `ByteLevel(add_prefix_space)` with GPT-2's
//!   regex; BPE without byte fallback. SmolLM2 declares this class while its tokenizer.json
//!   splits digits one by one first (`Digits(individual_digits)`): under transformers 5 digit
//!   runs are merged as GPT-2 would, so ids differ wherever text has two digits in a row.
//! - `LlamaTokenizer`: no normalizer; `Metaspace(▁, prepend_scheme)` with `first` unless
//!   `legacy` is true (`always`) or `add_prefix_space` is false (`never`); BPE with byte
//!   fallback.
//! - `Qwen2Tokenizer`: NFC; Qwen2's Split regex, then `ByteLevel` without a regex.
//!
//! [`TokenizerCompat::Transformers5`] applies that rebuild, so ids match TRL under
//! transformers 5; [`TokenizerCompat::TokenizerJson`] (the default) keeps tokenizer.json.

use serde_json::{json, Value};

/// Which pipeline encodes text.
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
pub enum TokenizerCompat {
    /// The checkpoint's tokenizer.json as saved (what the model was trained with).
    #[default]
    TokenizerJson,
    /// What transformers 5 builds for the checkpoint's `tokenizer_class` (TRL's ids under
    /// transformers 5).
    #[value(name = "transformers5")]
    #[serde(rename = "transformers5")]
    Transformers5,
}

/// How transformers 5 treats a `tokenizer_class`.
#[derive(Debug, Clone, PartialEq)]
pub enum Rebuild {
    /// tokenizer.json is used as saved.
    AsIs,
    /// The class's own pipeline (a tokenizer.json document).
    Rebuilt(Value),
    /// A class with a constructor of its own that this module does not model.
    NotModelled,
}

/// Classes transformers 5 loads from tokenizer.json unchanged.
const AS_IS: [&str; 3] = [
    "PreTrainedTokenizerFast",
    "TokenizersBackend",
    "PreTrainedTokenizer",
];

/// Qwen2's pre-tokenization regex (transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Boolean `key` of tokenizer_config.json `cfg`, when given.
fn flag(cfg: &Value, key: &str) -> Option<bool> {
    cfg.get(key).and_then(Value::as_bool)
}

/// Special token `key` of tokenizer_config.json `cfg`: a string, or an added token's
/// `content`.
pub(crate) fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// transformers 5's tokenizer for `tokenizer_json` under tokenizer_config.json `cfg` (its
/// `tokenizer_class`, `add_prefix_space`, `legacy`, `add_bos_token`, `add_eos_token`).
pub fn transformers5(tokenizer_json: &Value, cfg: &Value) -> Rebuild {
    let class = cfg
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("PreTrainedTokenizerFast");
    let class = class.strip_suffix("Fast").unwrap_or(class);
    let class = if class == "PreTrainedTokenizer" {
        "PreTrainedTokenizerFast"
    } else {
        class
    };
    if AS_IS.contains(&class) || tokenizer_json.get("model").is_none() {
        return Rebuild::AsIs;
    }
    let mut t = tokenizer_json.clone();
    let model = &mut t["model"];
    match class {
        "GPT2Tokenizer" => {
            let prefix = flag(cfg, "add_prefix_space").unwrap_or(false);
            model["dropout"] = Value::Null;
            model["fuse_unk"] = json!(false);
            model["byte_fallback"] = json!(false);
            model["continuing_subword_prefix"] = Value::Null;
            model["end_of_word_suffix"] = Value::Null;
            t["normalizer"] = Value::Null;
            t["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": prefix,
                "trim_offsets": true, "use_regex": true});
            t["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true});
        }
        "LlamaTokenizer" => {
            let prefix = flag(cfg, "add_prefix_space").unwrap_or(true);
            let legacy = flag(cfg, "legacy").unwrap_or(false);
            let scheme = match (prefix, legacy) {
                (false, _) => "never",
                (true, true) => "always",
                (true, false) => "first",
            };
            model["dropout"] = Value::Null;
            model["fuse_unk"] = json!(true);
            model["byte_fallback"] = json!(true);
            model["unk_token"] = Value::Null;
            t["normalizer"] = Value::Null;
            t["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": scheme, "split": false});
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            t["decoder"] = json!({"type": "Sequence", "decoders": decoders});
        }
        "Qwen2Tokenizer" => {
            let prefix = flag(cfg, "add_prefix_space").unwrap_or(false);
            model["dropout"] = Value::Null;
            model["unk_token"] = Value::Null;
            model["fuse_unk"] = json!(false);
            model["byte_fallback"] = json!(false);
            t["normalizer"] = json!({"type": "NFC"});
            t["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": false}]});
            t["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true});
        }
        _ => return Rebuild::NotModelled,
    }
    // The post-processor is tokenizer.json's unless add_bos_token / add_eos_token are given
    // (or there is none): then transformers' TemplateProcessing.
    let (bos_on, eos_on) = (flag(cfg, "add_bos_token"), flag(cfg, "add_eos_token"));
    if bos_on.is_some() || eos_on.is_some() || t["post_processor"].is_null() {
        t["post_processor"] = template_processing(&t, cfg, bos_on, eos_on);
    }
    Rebuild::Rebuilt(t)
}

/// transformers' `TemplateProcessing` post-processor for the rebuilt tokenizer `t`: the BOS
/// before and the EOS after each sequence when `add_bos_token` / `add_eos_token` (`bos_on`,
/// `eos_on`) ask for them, with their ids from `t`'s vocabulary or added tokens.
fn template_processing(
    t: &Value,
    cfg: &Value,
    bos_on: Option<bool>,
    eos_on: Option<bool>,
) -> Value {
    let id = |tok: &str| -> Option<u64> {
        t["model"]["vocab"]
            .get(tok)
            .and_then(Value::as_u64)
            .or_else(|| {
                t["added_tokens"].as_array().and_then(|a| {
                    a.iter()
                        .find(|x| x["content"] == tok)
                        .and_then(|x| x["id"].as_u64())
                })
            })
    };
    let bos = special_token(cfg, "bos_token").filter(|_| bos_on == Some(true));
    let eos = special_token(cfg, "eos_token").filter(|_| eos_on == Some(true));
    let piece = |tok: &Option<String>, type_id: u32| {
        tok.as_ref()
            .map(|s| json!({"SpecialToken": {"id": s, "type_id": type_id}}))
    };
    let seq = |n: &str, type_id: u32| json!({"Sequence": {"id": n, "type_id": type_id}});
    let single: Vec<Value> = [piece(&bos, 0), Some(seq("A", 0)), piece(&eos, 0)]
        .into_iter()
        .flatten()
        .collect();
    let mut pair = single.clone();
    pair.extend(
        [piece(&bos, 1), Some(seq("B", 1)), piece(&eos, 1)]
            .into_iter()
            .flatten(),
    );
    let mut specials = serde_json::Map::new();
    for tok in [&bos, &eos].into_iter().flatten() {
        if let Some(i) = id(tok) {
            specials.insert(tok.clone(), json!({"id": tok, "ids": [i], "tokens": [tok]}));
        }
    }
    json!({"type": "TemplateProcessing", "single": single,
        "pair": pair, "special_tokens": specials})
}

/// The part of a pipeline component that decides token ids (offsets and decoding options
/// dropped), for comparing two tokenizer.json documents.
fn ids_relevant(v: &Value) -> Value {
    let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
    match ty {
        "Sequence" => {
            let items = ["pretokenizers", "normalizers", "processors"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_array))
                .map(|a| a.iter().map(ids_relevant).collect::<Vec<_>>())
                .unwrap_or_default();
            // A one-element sequence is that element.
            match items.as_slice() {
                [one] => one.clone(),
                _ => json!({"Sequence": items}),
            }
        }
        "ByteLevel" if v.get("use_regex").is_some() && v.get("trim_offsets").is_some() => {
            // A ByteLevel post-processor only trims offsets; as a pre-tokenizer its regex and
            // prefix space decide the splits.
            json!({"ByteLevel": [v["add_prefix_space"], v["use_regex"]]})
        }
        "BPE" => json!({"BPE": [v["byte_fallback"], v["fuse_unk"], v["unk_token"],
            v["ignore_merges"], v["dropout"]]}),
        _ => v.clone(),
    }
}

/// A short human-readable form of a pipeline component (`Sequence[Digits(individual),
/// ByteLevel(GPT-2 regex)]`).
pub fn describe(v: &Value) -> String {
    let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
    match ty {
        "" => "none".into(),
        "Sequence" => {
            let items = ["pretokenizers", "normalizers", "processors", "decoders"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_array))
                .map(|a| a.iter().map(describe).collect::<Vec<_>>())
                .unwrap_or_default();
            format!("Sequence[{}]", items.join(", "))
        }
        "ByteLevel" => format!(
            "ByteLevel({}{})",
            if v["use_regex"] == json!(false) {
                "no regex"
            } else {
                "GPT-2 regex"
            },
            if v["add_prefix_space"] == json!(true) {
                ", prefix space"
            } else {
                ""
            }
        ),
        "Digits" => {
            if v["individual_digits"] == json!(true) {
                "Digits(individual)".into()
            } else {
                "Digits".into()
            }
        }
        "Metaspace" => format!(
            "Metaspace(prepend {})",
            v["prepend_scheme"].as_str().unwrap_or("?")
        ),
        "Split" => "Split(regex)".into(),
        "TemplateProcessing" => {
            let parts: Vec<String> = v["single"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| match (p.get("SpecialToken"), p.get("Sequence")) {
                            (Some(s), _) => s["id"].as_str().unwrap_or("?").to_string(),
                            (_, Some(s)) => format!("${}", s["id"].as_str().unwrap_or("?")),
                            _ => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("Template({})", parts.join(" "))
        }
        "BPE" => format!(
            "BPE(byte fallback {})",
            v["byte_fallback"].as_bool().unwrap_or(false)
        ),
        other => other.to_string(),
    }
}

/// The differences in ids-deciding components between tokenizer.json `a` and `b`, each as
/// `component: A → B`.
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (key, name) in [
        ("normalizer", "normalizer"),
        ("pre_tokenizer", "pre-tokenizer"),
        ("post_processor", "post-processor"),
        ("model", "model"),
    ] {
        let (x, y) = (&a[key], &b[key]);
        let same = match key {
            "post_processor" | "pre_tokenizer" | "normalizer" => {
                ids_relevant(x) == ids_relevant(y) || (x.is_null() && y.is_null())
            }
            _ => ids_relevant(x) == ids_relevant(y),
        };
        if !same {
            out.push(format!("{name}: {} → {}", describe(x), describe(y)));
        }
    }
    out
}

/// Which pipeline a [`crate::tokenize::TokenizerBundle`] encodes with, and how transformers 5
/// would differ.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Provenance {
    /// tokenizer_config.json's `tokenizer_class`, when given.
    pub class: Option<String>,
    /// The pipeline in use.
    pub compat: TokenizerCompat,
    /// What transformers 5 changes relative to tokenizer.json (`component: tokenizer.json →
    /// transformers 5`); empty when it uses tokenizer.json as saved.
    pub transformers5_differences: Vec<String>,
    /// The class has a constructor of its own that is not modelled here.
    pub not_modelled: bool,
}

impl Provenance {
    /// The analysis of a checkpoint's tokenizer.json and tokenizer_config.json.
    pub fn analyse(tokenizer_json: &Value, cfg: &Value, compat: TokenizerCompat) -> Self {
        let class = cfg
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .map(str::to_string);
        let (diffs, not_modelled) = match transformers5(tokenizer_json, cfg) {
            Rebuild::AsIs => (Vec::new(), false),
            Rebuild::Rebuilt(t) => (differences(tokenizer_json, &t), false),
            Rebuild::NotModelled => (Vec::new(), true),
        };
        Provenance {
            class,
            compat,
            transformers5_differences: diffs,
            not_modelled,
        }
    }

    /// One line for the terminal: the pipeline in use.
    pub fn describe(&self) -> String {
        let class = self
            .class
            .as_deref()
            .map(|c| format!("tokenizer_class {c}"))
            .unwrap_or_else(|| "no tokenizer_class".into());
        match self.compat {
            TokenizerCompat::TokenizerJson => {
                format!("tokenizer: tokenizer.json as saved ({class})")
            }
            TokenizerCompat::Transformers5 if self.transformers5_differences.is_empty() => {
                format!("tokenizer: transformers 5's pipeline for {class}, which is tokenizer.json as saved")
            }
            TokenizerCompat::Transformers5 => format!(
                "tokenizer: transformers 5's rebuild for {class} (--tokenizer-compat transformers5): {}",
                self.transformers5_differences.join("; ")
            ),
        }
    }

    /// A warning when the ids may differ from TRL's under transformers 5.
    pub fn warning(&self) -> Option<String> {
        let class = self.class.as_deref().unwrap_or("?");
        if self.not_modelled {
            return Some(format!(
                "tokenizer_class {class} has a constructor of its own in transformers 5, which may rebuild the tokenizer differently from tokenizer.json; difinfo uses tokenizer.json"
            ));
        }
        if self.compat == TokenizerCompat::TokenizerJson
            && !self.transformers5_differences.is_empty()
        {
            return Some(format!(
                "transformers 5 rebuilds tokenizer_class {class} from the vocabulary and merges with its own pipeline, not tokenizer.json's ({}); difinfo follows tokenizer.json (the model's training pipeline), so a few token ids can differ from TRL's under transformers 5 (--tokenizer-compat transformers5 reproduces transformers' ids)",
                self.transformers5_differences.join("; ")
            ));
        }
        None
    }
}
