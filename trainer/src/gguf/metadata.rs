//! GGUF metadata → the model: typed lookups that name the file and key on failure, the
//! architecture, [`ModelConfig`] and its config.json, the RoPE scaling (a `rope.scaling.type`
//! key, or Llama 3's recovered from the `rope_freqs.weight` factors).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{TensorInfo, Value as GValue};
use serde_json::{json, Value};

use crate::config_json::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};

/// The architecture-specific part of the import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
}

impl Arch {
    /// The architecture of a `general.architecture` value.
    pub(super) fn from_name(name: &str) -> Option<Self> {
        [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma2]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Its `general.architecture` value, the prefix of its metadata keys.
    pub(super) fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
        }
    }

    /// The metadata key `{architecture}.{k}`.
    fn key(self, k: &str) -> String {
        format!("{}.{k}", self.name())
    }

    /// `general.architecture` of `meta`, with its name.
    ///
    /// # Errors
    /// The key missing or not a string; [`Error::GgufUnsupportedArchitecture`].
    pub(super) fn of<'a>(meta: &'a Meta) -> Result<(Self, &'a str)> {
        let name = meta.str("general.architecture")?;
        let arch = Arch::from_name(name).ok_or_else(|| Error::GgufUnsupportedArchitecture {
            path: meta.path.to_path_buf(),
            found: name.to_string(),
            supported: &super::SUPPORTED_ARCHITECTURES,
        })?;
        Ok((arch, name))
    }
}

/// The GGUF metadata, with typed lookups that name the file and key on failure.
pub(super) struct Meta<'a> {
    /// The file, named in errors.
    pub(super) path: &'a Path,
    /// The header's metadata.
    pub(super) md: &'a HashMap<String, GValue>,
}

impl Meta<'_> {
    pub(super) fn get(&self, key: &str) -> Option<&GValue> {
        self.md.get(key)
    }

    pub(super) fn bad(&self, key: &str, message: impl Into<String>) -> Error {
        Error::GgufBadKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn missing(&self, key: &str) -> Error {
        Error::GgufMissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        }
    }

    pub(super) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    pub(super) fn str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub(super) fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
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
    pub(super) fn opt_size(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_uint(key)? {
            None => Ok(None),
            Some(0) => Err(self.bad(key, "must be positive")),
            Some(n) if n > 1 << 31 => Err(self.bad(key, format!("{n} is implausibly large"))),
            Some(n) => Ok(Some(n as usize)),
        }
    }

    pub(super) fn size(&self, key: &str) -> Result<usize> {
        self.opt_size(key)?.ok_or_else(|| self.missing(key))
    }

    /// A token id below `vocab`.
    pub(super) fn opt_token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
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
    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
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

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(
                key,
                format!("expected a boolean, found {:?}", v.value_type()),
            )),
        }
    }

    pub(super) fn array(&self, key: &str) -> Result<Option<&Vec<GValue>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
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

/// The model of the metadata, before the `rope_freqs.weight` tensor is read: the RoPE scaling
/// is the `rope.scaling.type` key's.
///
/// `vocab_len`, `bos` and `eos` are the rebuilt tokenizer's (the vocabulary size comes from it
/// when the model key is absent); `tensors` are the header's tensor infos (the biases and the
/// tied head are read from which tensors exist).
///
/// # Errors
/// [`Error::GgufMissingKey`], [`Error::GgufBadKey`] (sizes that do not fit together, partial
/// rotary embeddings, an unsupported scaling), [`Error::GgufTensor`] (Qwen2 without q/k/v
/// biases).
pub(super) fn model_config(
    meta: &Meta,
    arch: Arch,
    tensors: &HashMap<String, TensorInfo>,
    vocab_len: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<ModelConfig> {
    let vocab_size = vocab_size(meta, arch, vocab_len)?;
    let hidden = meta.size(&arch.key("embedding_length"))?;
    let layers = meta.size(&arch.key("block_count"))?;
    let inter = meta.size(&arch.key("feed_forward_length"))?;
    // Each layer has tensors of its own: a block count above the tensor count is a corrupt
    // header (and would size the expected-tensor list by it).
    if layers > tensors.len() {
        return Err(meta.bad(
            &arch.key("block_count"),
            format!(
                "{layers} layers but only {} tensors in the file",
                tensors.len()
            ),
        ));
    }
    let (heads, kv_heads, head_dim) = attention_dims(meta, arch, hidden)?;
    let rope_theta = meta
        .opt_f64(&arch.key("rope.freq_base"))?
        .unwrap_or(10000.0);
    let rms_eps = meta
        .opt_f64(&arch.key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let context = meta.opt_size(&arch.key("context_length"))?.unwrap_or(2048);
    let rope_scaling = rope_scaling_key(meta, arch)?;
    let has = |n: &str| tensors.contains_key(n);
    let tie = !has("output.weight");
    let qkv_bias = has("blk.0.attn_q.bias");
    if arch == Arch::Qwen2 && !qkv_bias {
        return Err(Error::GgufTensor {
            path: meta.path.to_path_buf(),
            name: "blk.0.attn_q.bias".into(),
            message: "missing (Qwen2 has biases on q, k, v)".into(),
        });
    }
    let gemma = gemma2_keys(meta, layers, hidden, heads, head_dim)?;
    Ok(ModelConfig {
        arch: match arch {
            Arch::Llama => Architecture::Llama,
            Arch::Qwen2 => Architecture::Qwen2,
            Arch::Qwen3 => Architecture::Qwen3,
            Arch::Gemma2 => Architecture::Gemma2,
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
        rope_scaling,
        max_position_embeddings: context,
        tie_word_embeddings: tie,
        qkv_bias,
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        sliding_window: gemma.as_ref().and_then(|g| g.window),
        sliding_layers: match arch {
            Arch::Qwen3 => Some(vec![false; layers]),
            Arch::Gemma2 => Some((0..layers).map(|l| l % 2 == 0).collect()),
            Arch::Llama | Arch::Qwen2 => None,
        },
        query_pre_attn_scalar: gemma.as_ref().map(|g| g.query_pre_attn_scalar),
        attn_logit_softcapping: gemma.as_ref().and_then(|g| g.attn_softcap),
        final_logit_softcapping: gemma.as_ref().and_then(|g| g.final_softcap),
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        initializer_range: 0.02,
    })
}

/// Gemma2's settings from its metadata.
struct Gemma2Keys {
    window: Option<usize>,
    query_pre_attn_scalar: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
}

/// `gemma2.attention.sliding_window` (on the even layers, llama.cpp's pattern 2),
/// `gemma2.attn_logit_softcapping`, `gemma2.final_logit_softcapping`, and the query scale
/// llama.cpp derives (the file has no `query_pre_attn_scalar`): `hidden / heads` for the
/// 46-layer 27B model, `head_dim` otherwise. `None` for another architecture.
///
/// # Errors
/// A key of the wrong type or not positive.
fn gemma2_keys(
    meta: &Meta,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Option<Gemma2Keys>> {
    if meta.opt_str("general.architecture")? != Some("gemma2") {
        return Ok(None);
    }
    let arch = Arch::Gemma2;
    let scalar = if layers == 46 {
        hidden / heads
    } else {
        head_dim
    };
    Ok(Some(Gemma2Keys {
        window: meta.opt_size(&arch.key("attention.sliding_window"))?,
        query_pre_attn_scalar: scalar as f64,
        attn_softcap: meta.opt_f64(&arch.key("attn_logit_softcapping"))?,
        final_softcap: meta.opt_f64(&arch.key("final_logit_softcapping"))?,
    }))
}

/// `{arch}.vocab_size`, else the tokenizer's `vocab_len`; never below `vocab_len`.
fn vocab_size(meta: &Meta, arch: Arch, vocab_len: usize) -> Result<usize> {
    let key = arch.key("vocab_size");
    let vocab_size = meta.opt_size(&key)?.unwrap_or(vocab_len);
    if vocab_size < vocab_len {
        return Err(meta.bad(
            &key,
            format!("{vocab_size} is smaller than the tokenizer's {vocab_len} tokens"),
        ));
    }
    Ok(vocab_size)
}

/// The attention's `(heads, kv_heads, head_dim)`: the head dimension is `key_length`, else
/// `hidden / heads`; the rotary dimension, when given, must be the whole head.
fn attention_dims(meta: &Meta, arch: Arch, hidden: usize) -> Result<(usize, usize, usize)> {
    let heads = meta.size(&arch.key("attention.head_count"))?;
    let kv_heads = meta
        .opt_size(&arch.key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = match meta.opt_size(&arch.key("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(meta.bad(
                &arch.key("attention.head_count"),
                format!("{heads} heads do not divide the embedding length {hidden}"),
            ))
        }
    };
    if let Some(rot) = meta.opt_size(&arch.key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(meta.bad(
                &arch.key("rope.dimension_count"),
                format!(
                    "partial rotary embeddings ({rot} of {head_dim} dimensions) are not supported"
                ),
            ));
        }
    }
    Ok((heads, kv_heads, head_dim))
}

/// The RoPE scaling of `{arch}.rope.scaling.type`: none, or linear with its factor.
fn rope_scaling_key(meta: &Meta, arch: Arch) -> Result<Option<RopeScaling>> {
    match meta.opt_str(&arch.key("rope.scaling.type"))? {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = meta
                .opt_f64(&arch.key("rope.scaling.factor"))?
                .ok_or_else(|| meta.missing(&arch.key("rope.scaling.factor")))?;
            Ok(Some(RopeScaling::Linear { factor }))
        }
        Some(other) => Err(meta.bad(
            &arch.key("rope.scaling.type"),
            format!("RoPE scaling `{other}` is not supported (supported: none, linear, Llama 3's via rope_freqs.weight)"),
        )),
    }
}

/// Llama 3.1-style RoPE scaling recovered from llama.cpp's `rope_freqs.weight` (the per-pair
/// frequency divisors it stores instead of `rope_scaling`): the standard Llama 3.1 / 3.2
/// parameters are tried and kept when they reproduce the stored factors.
fn llama3_scaling_from_factors(
    factors: &[f32],
    head_dim: usize,
    theta: f64,
) -> Option<RopeScaling> {
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
        ok.then_some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        })
    })
}

/// The Llama 3 RoPE scaling of the `rope_freqs.weight` `factors`
/// ([`llama3_scaling_from_factors`]).
///
/// # Errors
/// [`Error::GgufTensor`]: factors that match no known scaling.
pub(super) fn rope_scaling_from_freqs(
    factors: &[f32],
    head_dim: usize,
    theta: f64,
    path: &Path,
) -> Result<RopeScaling> {
    llama3_scaling_from_factors(factors, head_dim, theta).ok_or_else(|| Error::GgufTensor {
        path: path.to_path_buf(),
        name: "rope_freqs.weight".into(),
        message: "frequency factors that match no known Llama 3 RoPE scaling".into(),
    })
}

/// config.json of `config` as the import writes it: `attention_bias` for Llama, the padding
/// id `pad` when there is one, no `torch_dtype` (the writer sets it).
pub(super) fn config_json(config: &ModelConfig, arch: Arch, pad: Option<u32>) -> Value {
    let mut j = config.to_hf_json();
    if arch == Arch::Llama {
        j["attention_bias"] = json!(config.qkv_bias || config.o_bias);
    }
    if let Some(pad) = pad {
        j["pad_token_id"] = json!(pad);
    }
    if let Some(o) = j.as_object_mut() {
        o.remove("torch_dtype");
    }
    j
}

/// The configuration config.json `json` gives, validated as a checkpoint's is; an
/// output-projection bias needs the q/k/v biases (`draft` is the configuration `json` was
/// written from).
///
/// # Errors
/// [`Error::GgufMalformed`]: an invalid configuration; [`Error::GgufTensor`]: an output bias
/// without q/k/v biases.
pub(super) fn validated_config(
    json: &Value,
    draft: &ModelConfig,
    path: &Path,
) -> Result<ModelConfig> {
    let config =
        ModelConfig::from_json_str(&json.to_string(), path).map_err(|e| Error::GgufMalformed {
            path: path.to_path_buf(),
            message: format!("the metadata gives an invalid configuration: {e}"),
        })?;
    if draft.o_bias && !draft.qkv_bias {
        return Err(Error::GgufTensor {
            path: path.to_path_buf(),
            name: "blk.0.attn_output.bias".into(),
            message: "an output-projection bias without q/k/v biases is not supported".into(),
        });
    }
    Ok(config)
}
