//! GGUF import: a llama.cpp / Ollama model file → a Hugging Face checkpoint directory.
//!
//! candle reads the file ([`candle_core::quantized::gguf_file`]) and dequantizes every tensor
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 and the K-quants); this module turns the
//! result into what `transformers` would have: `config.json`, `model.safetensors` with Hugging
//! Face tensor names, `tokenizer.json` and `tokenizer_config.json` rebuilt from the GGUF
//! metadata, and `generation_config.json`.
//!
//! - Architectures: `general.architecture = llama` (Llama 2 and 3, Mistral, SmolLM, TinyLlama)
//!   and `qwen2`; anything else is [`Error::GgufUnsupportedArchitecture`].
//! - The q/k row permutation: llama.cpp's converter reorders the rows of each head of
//!   `q_proj` and `k_proj` for its interleaved RoPE ([`permute_for_gguf`]); the import undoes it
//!   ([`unpermute_from_gguf`]). Qwen2 files are not permuted (llama.cpp uses NeoX RoPE there).
//! - Tokenizers: `tokenizer.ggml.model = gpt2` (byte-level BPE with the stored merges and the
//!   pre-tokenizer named by `tokenizer.ggml.pre`, see [`PreTokenizerFamily`]) or `llama`
//!   (SentencePiece BPE: merges derived from the scores as transformers' converter does, byte
//!   fallback, `▁` for spaces).
//!
//! The file is also accepted where a checkpoint directory is expected: the conversion cache
//! (the `gguf_cache` module, one room above this one) converts it once, with [`convert`], into
//! a cache directory keyed by the SHA-256 of the file's content.
//!
//! The header is read by [`read_header`] (its own reader, sizes checked before allocation,
//! duplicates refused; see the `header` module), the tensors by candle under `catch_unwind`;
//! a dequantized weight that is NaN or infinite is refused.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::checkpoint::torch_dtype_name;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::write_json;

mod header;
pub use header::{read_header, MAX_READ_ARRAY_ELEMENTS, MAX_TENSOR_DIMS, READ_ARRAYS};

/// The GGUF magic, `"GGUF"` read as a little-endian u32's bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Bumped whenever the conversion's output changes, so cached conversions are redone.
pub const CONVERTER_VERSION: u32 = 1;

/// The `general.architecture` values this importer maps to Hugging Face models.
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// The GGML tensor types candle dequantizes.
pub const SUPPORTED_QUANTIZATIONS: [&str; 15] = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "Q8_K",
];

/// The name of a GGML tensor type id (ggml.h's `ggml_type`), for error messages.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

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

/// The names of [`PRE_TOKENIZERS`], comma-separated (for error messages).
pub fn known_pre_tokenizers() -> String {
    PRE_TOKENIZERS.map(|(n, _)| n).join(", ")
}

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

/// The architecture-specific part of the import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    fn prefix(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// The GGUF metadata, with typed lookups that name the file and key on failure.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, GValue>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&GValue> {
        self.md.get(key)
    }

    fn bad(&self, key: &str, message: impl Into<String>) -> Error {
        Error::GgufBadKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::GgufMissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: Option<u64> = match v {
            GValue::U8(x) => Some(u64::from(*x)),
            GValue::U16(x) => Some(u64::from(*x)),
            GValue::U32(x) => Some(u64::from(*x)),
            GValue::U64(x) => Some(*x),
            GValue::I8(x) => u64::try_from(*x).ok(),
            GValue::I16(x) => u64::try_from(*x).ok(),
            GValue::I32(x) => u64::try_from(*x).ok(),
            GValue::I64(x) => u64::try_from(*x).ok(),
            _ => {
                return Err(self.bad(
                    key,
                    format!("expected an integer, found {:?}", v.value_type()),
                ))
            }
        };
        n.map(Some)
            .ok_or_else(|| self.bad(key, "expected a non-negative integer"))
    }

    /// A positive size (at most 2^31, far above any real model's).
    fn opt_size(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_uint(key)? {
            None => Ok(None),
            Some(0) => Err(self.bad(key, "must be positive")),
            Some(n) if n > 1 << 31 => Err(self.bad(key, format!("{n} is implausibly large"))),
            Some(n) => Ok(Some(n as usize)),
        }
    }

    fn size(&self, key: &str) -> Result<usize> {
        self.opt_size(key)?.ok_or_else(|| self.missing(key))
    }

    /// A token id below `vocab`.
    fn opt_token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        match self.opt_uint(key)? {
            None => Ok(None),
            Some(n) if n < vocab as u64 => Ok(Some(n as u32)),
            Some(n) => Err(self.bad(
                key,
                format!("token id {n} is outside the vocabulary of {vocab}"),
            )),
        }
    }

    /// A float written as its shortest decimal form (an f32 `1e-5` becomes the f64 `1e-5`, as
    /// in the original config.json, not `9.999999747e-6`).
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let x = match self.get(key) {
            None => return Ok(None),
            Some(GValue::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(f64::from(*x)),
            Some(GValue::F64(x)) => *x,
            Some(v) => {
                return Err(self.bad(key, format!("expected a float, found {:?}", v.value_type())))
            }
        };
        if x.is_finite() && x > 0.0 {
            Ok(Some(x))
        } else {
            Err(self.bad(key, format!("must be positive and finite, found {x}")))
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(
                key,
                format!("expected a boolean, found {:?}", v.value_type()),
            )),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<GValue>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::String(s) => Ok(s.as_str()),
                other => Err(self.bad(
                    key,
                    format!("element {i} is not a string ({:?})", other.value_type()),
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// What a GGUF file holds, converted: everything a Hugging Face directory needs.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The validated model configuration.
    pub config: ModelConfig,
    /// config.json (without `torch_dtype`, which the writer sets).
    pub config_json: Value,
    /// Tensors by Hugging Face name, f32 on the CPU, q/k rows in Hugging Face order.
    pub tensors: BTreeMap<String, Tensor>,
    /// tokenizer.json.
    pub tokenizer_json: Value,
    /// tokenizer_config.json.
    pub tokenizer_config: Value,
    /// generation_config.json.
    pub generation_config: Value,
    /// What was found, for the command's summary line.
    pub summary: ImportSummary,
}

/// A one-line account of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when given.
    pub name: Option<String>,
    /// Tensor counts by GGML type (`Q4_1: 210`, ...).
    pub tensor_types: BTreeMap<String, usize>,
    /// `tokenizer.ggml.model` and `tokenizer.ggml.pre`.
    pub tokenizer: String,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        write!(
            f,
            "{}{} ({}; tokenizer {})",
            self.architecture,
            self.name
                .as_ref()
                .map(|n| format!(" `{n}`"))
                .unwrap_or_default(),
            types.join(", "),
            self.tokenizer
        )
    }
}

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == GGUF_MAGIC
}

/// llama.cpp's q/k row order from Hugging Face's: with `heads` heads of `d / heads` rows,
/// each head's rows `[a_0 … a_{m−1}, b_0 … b_{m−1}]` (RoPE pairs the two halves) become
/// `[a_0, b_0, a_1, b_1, …]` (adjacent pairs):
/// `w.reshape(heads, 2, d/heads/2, cols).swapaxes(1, 2).reshape(d, cols)`.
///
/// # Errors
/// `d` not divisible by `2 · heads`; tensor errors.
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, true)
}

/// The inverse of [`permute_for_gguf`]: llama.cpp's q/k row order back to Hugging Face's,
/// `w.reshape(heads, d/heads/2, 2, cols).swapaxes(1, 2).reshape(d, cols)`.
///
/// # Errors
/// See [`permute_for_gguf`].
pub fn unpermute_from_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, false)
}

fn permute_rows(w: &Tensor, heads: usize, forward: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let d = dims.first().copied().unwrap_or(0);
    let cols: usize = dims.iter().skip(1).product();
    if heads == 0 || d % (2 * heads) != 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot permute {d} rows over {heads} heads (needs a multiple of 2 × heads)"
        )));
    }
    let half = d / heads / 2;
    let shape = if forward {
        (heads, 2, half, cols)
    } else {
        (heads, half, 2, cols)
    };
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Maps a GGUF tensor name to its Hugging Face name, with the head count to unpermute by
/// (`Some` for the llama q/k projections).
fn hf_name(
    gguf: &str,
    arch: Arch,
    heads: usize,
    kv_heads: usize,
) -> Option<(String, Option<usize>)> {
    let permute = arch == Arch::Llama;
    match gguf {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", permute.then_some(heads)),
        "attn_k" => ("self_attn.k_proj", permute.then_some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{kind}"), heads))
}

/// A candle error's message without the backtrace some of its errors carry.
fn candle_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// Reads the tensor `name` of `content` and dequantizes it to f32 on the CPU. The header has
/// been validated ([`read_header`]); candle's reader still runs under
/// [`crate::error::catch_panic`], so that a panic left inside it is an error naming the file
/// and the tensor.
fn read_tensor<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
    path: &Path,
) -> Result<Tensor> {
    let terr = |message: String| Error::GgufTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    let read = crate::error::catch_panic(|| {
        content
            .tensor(reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32))
    });
    match read {
        Ok(r) => r.map_err(|e| terr(candle_message(&e))),
        Err(panic) => Err(terr(format!("candle's reader failed on it: {panic}"))),
    }
}

/// Llama 3.1-style RoPE scaling recovered from llama.cpp's `rope_freqs.weight` (the per-pair
/// frequency divisors it stores instead of `rope_scaling`): the standard Llama 3.1 / 3.2
/// parameters are tried and kept when they reproduce the stored factors.
fn llama3_scaling_from_factors(
    factors: &[f32],
    head_dim: usize,
    theta: f64,
) -> Option<crate::config::RopeScaling> {
    const CANDIDATES: [(f64, f64, f64, f64); 3] = [
        (8.0, 1.0, 4.0, 8192.0),
        (32.0, 1.0, 4.0, 8192.0),
        (16.0, 1.0, 4.0, 8192.0),
    ];
    CANDIDATES.iter().find_map(|&(factor, low, high, orig)| {
        let (low_wl, high_wl) = (orig / low, orig / high);
        let ok = factors.len() == head_dim / 2
            && factors.iter().enumerate().all(|(i, &f)| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let wl = 2.0 * std::f64::consts::PI / freq;
                let want = if wl < high_wl {
                    1.0
                } else if wl > low_wl {
                    factor
                } else {
                    let smooth = (orig / wl - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                ((f as f64) - want).abs() <= 1e-3 * want
            });
        ok.then_some(crate::config::RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        })
    })
}

/// Reads and converts a GGUF file.
///
/// # Errors
/// [`Error`]'s `Gguf…` variants for malformed files, unsupported architectures, quantizations
/// or tokenizers, and tensors that do not match the metadata; I/O errors.
pub fn import_file(path: &Path) -> Result<Imported> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    import(&mut f, path, &mut |_, _| {})
}

/// Converts the GGUF content of `reader` (`path` names it in errors); `progress(done, total)`
/// is called after each tensor.
///
/// # Errors
/// See [`import_file`].
pub fn import<R: Read + Seek>(
    reader: &mut R,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Imported> {
    let content = read_header(reader, path)?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch_name = meta.str("general.architecture")?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::GgufUnsupportedArchitecture {
                path: path.to_path_buf(),
                found: other.to_string(),
            })
        }
    };
    let p = arch.prefix();
    let key = |k: &str| format!("{p}.{k}");

    // --- tokenizer first: the vocabulary size comes from it when the model key is absent.
    let tok = build_tokenizer(&meta)?;
    let vocab_size = match meta.opt_size(&key("vocab_size"))? {
        Some(v) => v,
        None => tok.vocab_len,
    };
    if vocab_size < tok.vocab_len {
        return Err(meta.bad(
            &key("vocab_size"),
            format!(
                "{vocab_size} is smaller than the tokenizer's {} tokens",
                tok.vocab_len
            ),
        ));
    }

    // --- config
    let hidden = meta.size(&key("embedding_length"))?;
    let layers = meta.size(&key("block_count"))?;
    let inter = meta.size(&key("feed_forward_length"))?;
    // Each layer has tensors of its own: a block count above the tensor count is a corrupt
    // header (and would size the expected-tensor list by it).
    if layers > content.tensor_infos.len() {
        return Err(meta.bad(
            &key("block_count"),
            format!(
                "{layers} layers but only {} tensors in the file",
                content.tensor_infos.len()
            ),
        ));
    }
    let heads = meta.size(&key("attention.head_count"))?;
    let kv_heads = meta
        .opt_size(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = match meta.opt_size(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(meta.bad(
                &key("attention.head_count"),
                format!("{heads} heads do not divide the embedding length {hidden}"),
            ))
        }
    };
    if let Some(rot) = meta.opt_size(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(meta.bad(
                &key("rope.dimension_count"),
                format!(
                    "partial rotary embeddings ({rot} of {head_dim} dimensions) are not supported"
                ),
            ));
        }
    }
    let rope_theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let rms_eps = meta
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let context = meta.opt_size(&key("context_length"))?.unwrap_or(2048);
    let mut rope_scaling = match meta.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = meta
                .opt_f64(&key("rope.scaling.factor"))?
                .ok_or_else(|| meta.missing(&key("rope.scaling.factor")))?;
            Some(crate::config::RopeScaling::Linear { factor })
        }
        Some(other) => {
            return Err(meta
                .bad(
                    &key("rope.scaling.type"),
                    format!("RoPE scaling `{other}` is not supported (supported: none, linear, Llama 3's via rope_freqs.weight)"),
                ))
        }
    };
    let has = |n: &str| content.tensor_infos.contains_key(n);
    let tie = !has("output.weight");
    let qkv_bias = has("blk.0.attn_q.bias");
    if arch == Arch::Qwen2 && !qkv_bias {
        return Err(Error::GgufTensor {
            path: path.to_path_buf(),
            name: "blk.0.attn_q.bias".into(),
            message: "missing (Qwen2 has biases on q, k, v)".into(),
        });
    }
    let o_bias = has("blk.0.attn_output.bias");
    let mlp_bias = has("blk.0.ffn_up.bias");
    let config_json = {
        let mut c = ModelConfig {
            arch: match arch {
                Arch::Llama => crate::config::Architecture::Llama,
                Arch::Qwen2 => crate::config::Architecture::Qwen2,
            },
            vocab_size,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: rms_eps,
            rope_theta,
            rope_scaling: None,
            max_position_embeddings: context,
            tie_word_embeddings: tie,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window: None,
            bos_token_id: tok.bos,
            eos_token_ids: tok.eos.into_iter().collect(),
            initializer_range: 0.02,
        };
        // rope_freqs.weight (Llama 3.1+): the scaling is read after the tensors below.
        if let Some(info) = content.tensor_infos.get("rope_freqs.weight") {
            if info.shape.dims() != [head_dim / 2] {
                return Err(Error::GgufTensor {
                    path: path.to_path_buf(),
                    name: "rope_freqs.weight".into(),
                    message: format!("shape {:?}, expected [{}]", info.shape.dims(), head_dim / 2),
                });
            }
            let factors = read_tensor(&content, reader, "rope_freqs.weight", path)?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| Error::GgufTensor {
                    path: path.to_path_buf(),
                    name: "rope_freqs.weight".into(),
                    message: candle_message(&e),
                })?;
            rope_scaling = Some(
                llama3_scaling_from_factors(&factors, head_dim, rope_theta).ok_or_else(|| {
                    Error::GgufTensor {
                        path: path.to_path_buf(),
                        name: "rope_freqs.weight".into(),
                        message: "frequency factors that match no known Llama 3 RoPE scaling"
                            .into(),
                    }
                })?,
            );
        }
        c.rope_scaling = rope_scaling;
        let mut j = c.to_hf_json();
        if arch == Arch::Llama {
            j["attention_bias"] = json!(qkv_bias || o_bias);
        }
        if let Some(pad) = tok.pad {
            j["pad_token_id"] = json!(pad);
        }
        if let Some(o) = j.as_object_mut() {
            o.remove("torch_dtype");
        }
        j
    };
    let config = ModelConfig::from_json_str(&config_json.to_string(), path).map_err(|e| {
        Error::GgufMalformed {
            path: path.to_path_buf(),
            message: format!("the metadata gives an invalid configuration: {e}"),
        }
    })?;
    if o_bias && !qkv_bias {
        return Err(Error::GgufTensor {
            path: path.to_path_buf(),
            name: "blk.0.attn_output.bias".into(),
            message: "an output-projection bias without q/k/v biases is not supported".into(),
        });
    }

    // --- tensors
    let expected: BTreeMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = BTreeMap::new();
    let total = names.len();
    for (i, name) in names.into_iter().enumerate() {
        let info = &content.tensor_infos[name];
        let terr = |message: String| Error::GgufTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            message,
        };
        if name == "rope_freqs.weight" {
            progress(i + 1, total);
            continue;
        }
        let Some((hf, perm)) = hf_name(name, arch, heads, kv_heads) else {
            return Err(terr(format!(
                "no Hugging Face name for it in a `{arch_name}` model"
            )));
        };
        let Some(shape) = expected.get(&hf) else {
            return Err(terr(format!("`{hf}` is not part of this configuration")));
        };
        // Checked before any data is read: the shape bounds the bytes candle allocates.
        if info.shape.dims() != shape.as_slice() {
            return Err(terr(format!(
                "shape {:?}, the metadata implies {shape:?} (`{hf}`)",
                info.shape.dims()
            )));
        }
        let t = read_tensor(&content, reader, name, path)?;
        // A NaN or infinite weight makes every log-prob NaN: refused as a checkpoint's is.
        crate::checkpoint::check_finite(name, &t, path)?;
        let t = match perm {
            Some(h) => unpermute_from_gguf(&t, h).map_err(|e| terr(e.to_string()))?,
            None => t,
        };
        tensors.insert(hf, t);
        progress(i + 1, total);
    }
    for hf in expected.keys() {
        if !tensors.contains_key(hf) {
            return Err(Error::GgufTensor {
                path: path.to_path_buf(),
                name: hf.clone(),
                message: "missing from the file (no GGUF tensor maps to it)".into(),
            });
        }
    }

    let mut tensor_types = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *tensor_types
            .entry(ggml_dtype_name(info.ggml_dtype).to_string())
            .or_insert(0) += 1;
    }
    let generation_config = {
        let mut g = serde_json::Map::new();
        if let Some(b) = tok.bos {
            g.insert("bos_token_id".into(), json!(b));
        }
        match tok.stop_ids.as_slice() {
            [] => {}
            [e] => {
                g.insert("eos_token_id".into(), json!(e));
            }
            es => {
                g.insert("eos_token_id".into(), json!(es));
            }
        }
        if let Some(p) = tok.pad {
            g.insert("pad_token_id".into(), json!(p));
        }
        Value::Object(g)
    };
    let summary = ImportSummary {
        architecture: arch_name.to_string(),
        name: meta
            .opt_str("general.name")
            .ok()
            .flatten()
            .map(str::to_string),
        tensor_types,
        tokenizer: tok.description.clone(),
    };
    Ok(Imported {
        config,
        config_json,
        tensors,
        tokenizer_json: tok.json,
        tokenizer_config: tok.config,
        generation_config,
        summary,
    })
}

fn ggml_dtype_name(d: candle_core::quantized::GgmlDType) -> &'static str {
    use candle_core::quantized::GgmlDType as G;
    match d {
        G::F32 => "F32",
        G::F16 => "F16",
        G::BF16 => "BF16",
        G::Q4_0 => "Q4_0",
        G::Q4_1 => "Q4_1",
        G::Q5_0 => "Q5_0",
        G::Q5_1 => "Q5_1",
        G::Q8_0 => "Q8_0",
        G::Q8_1 => "Q8_1",
        G::Q2K => "Q2_K",
        G::Q3K => "Q3_K",
        G::Q4K => "Q4_K",
        G::Q5K => "Q5_K",
        G::Q6K => "Q6_K",
        G::Q8K => "Q8_K",
    }
}

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// The rebuilt tokenizer files and the special ids.
struct BuiltTokenizer {
    json: Value,
    config: Value,
    vocab_len: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    /// EOS followed by `eot`/`eom` when they differ (generation stops at any).
    stop_ids: Vec<u32>,
    description: String,
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

fn build_tokenizer(meta: &Meta) -> Result<BuiltTokenizer> {
    let model = meta.str("tokenizer.ggml.model")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(meta.bad("tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types: Vec<u64> = match meta.array("tokenizer.ggml.token_type")? {
        None => vec![1; n],
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
                .collect::<std::result::Result<_, _>>()?
        }
    };
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        if let Some(j) = seen.insert(t, i) {
            return Err(meta.bad(
                "tokenizer.ggml.tokens",
                format!("token {t:?} appears twice (ids {j} and {i})"),
            ));
        }
    }
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

    // Special (control, unknown) and user-defined tokens are added tokens, as in the
    // tokenizer.json llama.cpp's converter read them from.
    let mut added = Vec::new();
    let mut added_decoder = serde_json::Map::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
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
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    let post_processor = |byte_level: Option<Value>| -> Value {
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
    };

    let (json, class, description, family_config) = if spm {
        let scores: Vec<f32> = match meta.array("tokenizer.ggml.scores")? {
            None => return Err(meta.missing("tokenizer.ggml.scores")),
            Some(a) if a.len() != n => {
                return Err(meta.bad(
                    "tokenizer.ggml.scores",
                    format!("{} entries for {n} tokens", a.len()),
                ))
            }
            Some(a) => a
                .iter()
                .map(|v| match v {
                    GValue::F32(x) if x.is_finite() => Ok(*x),
                    other => Err(meta.bad(
                        "tokenizer.ggml.scores",
                        format!("expected finite f32 scores, found {other:?}"),
                    )),
                })
                .collect::<std::result::Result<_, _>>()?,
        };
        let merges: Vec<Value> = spm_merges(&tokens, &scores)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect();
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
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": null,
            "post_processor": post_processor(None),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": name(unk),
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let cfg = json!({"add_bos_token": add_bos, "add_eos_token": add_eos,
            "legacy": true, "add_prefix_space": add_space_prefix});
        (
            json,
            "LlamaTokenizer",
            "llama (SentencePiece BPE)".to_string(),
            cfg,
        )
    } else {
        let pre_name = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let family = PreTokenizerFamily::from_name(pre_name).ok_or_else(|| {
            Error::GgufUnknownPreTokenizer {
                path: meta.path.to_path_buf(),
                found: pre_name.to_string(),
            }
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
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": family.normalizer(), "pre_tokenizer": family.pre_tokenizer(),
            "post_processor": post_processor(Some(byte_level_post)),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let mut cfg = json!({"add_prefix_space": false});
        if add_bos || add_eos {
            cfg["add_bos_token"] = json!(add_bos);
            cfg["add_eos_token"] = json!(add_eos);
        }
        (
            json,
            family.tokenizer_class(),
            format!("gpt2 (byte-level BPE), pre-tokenizer `{pre_name}`"),
            cfg,
        )
    };
    // Validate: the tokenizers library must load what was built.
    let text = json.to_string();
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        meta.bad(
            "tokenizer.ggml.tokens",
            format!("the rebuilt tokenizer does not load: {e}"),
        )
    })?;
    let mut config = json!({
        "added_tokens_decoder": added_decoder,
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(unk),
        "pad_token": name(pad),
        "clean_up_tokenization_spaces": false,
        "model_max_length": Value::Null,
        "tokenizer_class": class,
    });
    if let Some(o) = family_config.as_object() {
        for (k, v) in o {
            config[k] = v.clone();
        }
    }
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        config["chat_template"] = json!(t);
    }
    Ok(BuiltTokenizer {
        json,
        config,
        vocab_len: n,
        bos,
        eos,
        pad,
        stop_ids,
        description,
    })
}

/// Writes an import as a Hugging Face directory `out` with the weights in `dtype`. Each file
/// is written atomically; model.safetensors last.
///
/// # Errors
/// I/O and tensor errors.
pub fn write_checkpoint(imported: &Imported, out: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut cfg = imported.config_json.clone();
    cfg["torch_dtype"] = json!(torch_dtype_name(dtype));
    write_json(&out.join("config.json"), &cfg)?;
    let mut tc = imported.tokenizer_config.clone();
    tc["model_max_length"] = json!(imported.config.max_position_embeddings);
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    write_json(&out.join("tokenizer.json"), &imported.tokenizer_json)?;
    write_json(
        &out.join("generation_config.json"),
        &imported.generation_config,
    )?;
    let cast: BTreeMap<&String, Tensor> = imported
        .tensors
        .iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    crate::checkpoint::write_safetensors(
        &out.join(crate::checkpoint::WEIGHTS_FILE),
        cast.iter().map(|(k, v)| (k.as_str(), v)),
    )
}

/// `difinfo-train convert`: reads `gguf`, writes the Hugging Face directory `out` in `dtype`;
/// `progress(done, total)` follows the tensors.
///
/// # Errors
/// See [`import_file`] and [`write_checkpoint`].
pub fn convert(
    gguf: &Path,
    out: &Path,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportSummary> {
    let mut f = std::fs::File::open(gguf).map_err(|e| Error::io(gguf, e))?;
    let imported = import(&mut f, gguf, progress)?;
    write_checkpoint(&imported, out, dtype)?;
    Ok(imported.summary)
}
