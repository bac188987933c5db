//! `config.json` parsing for the supported decoder-only architectures.
//!
//! `model_type` chooses the architecture: `llama` (Llama 2 and 3), `mistral`, `qwen2`, `qwen3`,
//! `gemma2`. The fields read are those of transformers' `LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`, `Qwen3Config` and `Gemma2Config`; unknown fields are ignored, contradictory
//! or unsupported ones are errors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

mod rope;

use rope::rope;
pub use rope::RopeScaling;

/// The `model_type` values this crate implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gemma2"];

/// The decoder architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2 / Llama 3 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`): Llama with an optional sliding attention window.
    Mistral,
    /// Qwen2 (`Qwen2ForCausalLM`): Llama with biases on the q, k, v projections.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): Llama with an RMSNorm over each query and key head
    /// (`q_norm`, `k_norm`) before RoPE, an explicit `head_dim`, optional sliding-window
    /// layers.
    Qwen3,
    /// Gemma 2 (`Gemma2ForCausalLM`): `(1 + w)` RMSNorms, four per layer (the attention's and
    /// the MLP's outputs normed before the residual add), the embedding scaled by
    /// `√hidden_size`, GeGLU (`gelu_pytorch_tanh`), `query_pre_attn_scalar`, attention and
    /// final logit soft-capping, sliding-window attention on alternate layers.
    Gemma2,
}

impl Architecture {
    /// The `model_type` string of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
        }
    }

    /// The transformers class name written in `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
        }
    }

    /// The `head_dim` transformers assumes when config.json has none: Qwen3's 128, Gemma2's
    /// 256; `None` for the others (`hidden_size / num_attention_heads`).
    pub fn default_head_dim(self) -> Option<usize> {
        match self {
            Architecture::Qwen3 => Some(128),
            Architecture::Gemma2 => Some(256),
            _ => None,
        }
    }
}

/// A parsed, validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture chosen by `model_type`.
    pub arch: Architecture,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (the MLP width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`; fewer means grouped-query
    /// attention).
    pub num_key_value_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (default 10000).
    pub rope_theta: f64,
    /// `rope_scaling`, when present and not `default`.
    pub rope_scaling: Option<RopeScaling>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`: the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Qwen2 always; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// `sliding_window`: a query of a sliding-window layer attends to at most this many
    /// positions (itself included).
    pub sliding_window: Option<usize>,
    /// Which layers use [`ModelConfig::sliding_window`] (`layer_types`: `true` for
    /// `sliding_attention`); `None`: every layer (Mistral). See [`ModelConfig::layer_window`].
    pub sliding_layers: Option<Vec<bool>>,
    /// Gemma2's `query_pre_attn_scalar` `s`: attention scores are scaled by `s^(−1/2)` instead
    /// of `head_dim^(−1/2)`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma2's `attn_logit_softcapping` `c`: scores become `c · tanh(s / c)` before the mask.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma2's `final_logit_softcapping` `c`: logits become `c · tanh(z / c)` before the
    /// log-softmax.
    pub final_logit_softcapping: Option<f64>,
    /// `bos_token_id`, when given.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (one or several), when given.
    pub eos_token_ids: Vec<u32>,
    /// `initializer_range` (used only by random initialization).
    pub initializer_range: f64,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<Value>,
    final_logit_softcapping: Option<Value>,
    use_bidirectional_attention: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    initializer_range: Option<f64>,
}

fn cfg_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The architecture `model_type` names.
///
/// # Errors
/// A missing `model_type`; [`Error::UnsupportedModelType`] for one this crate does not
/// implement.
fn architecture(raw: &RawConfig, path: &Path) -> Result<Architecture> {
    let model_type = raw
        .model_type
        .clone()
        .ok_or_else(|| cfg_err(path, "missing `model_type`"))?;
    match model_type.as_str() {
        "llama" => Ok(Architecture::Llama),
        "mistral" => Ok(Architecture::Mistral),
        "qwen2" => Ok(Architecture::Qwen2),
        "qwen3" => Ok(Architecture::Qwen3),
        "gemma2" => Ok(Architecture::Gemma2),
        _ => Err(Error::UnsupportedModelType {
            path: path.to_path_buf(),
            found: model_type,
            supported: SUPPORTED_MODEL_TYPES.to_vec(),
        }),
    }
}

/// The largest dimension accepted: far above any real model, it keeps arithmetic and
/// allocations sane on hostile input.
const MAX_DIM: usize = 1 << 24;
/// The largest number of layers accepted (as [`MAX_DIM`]).
const MAX_LAYERS: usize = 1 << 12;

/// Dimension `name` (value `v`): given, positive, at most its bound ([`MAX_LAYERS`] for
/// `num_hidden_layers`, [`MAX_DIM`] for the others).
///
/// # Errors
/// Missing, zero, or over the bound, naming `name`.
fn dimension(v: Option<usize>, name: &str, path: &Path) -> Result<usize> {
    let n = match v {
        Some(0) => return Err(cfg_err(path, format!("`{name}` must be positive"))),
        Some(n) => n,
        None => return Err(cfg_err(path, format!("missing `{name}`"))),
    };
    let max = if name == "num_hidden_layers" {
        MAX_LAYERS
    } else {
        MAX_DIM
    };
    if n > max {
        return Err(cfg_err(
            path,
            format!("`{name}` = {n} exceeds the supported maximum {max}"),
        ));
    }
    Ok(n)
}

/// The validated sizes of config.json: each [`dimension`], the heads dividing as attention
/// needs.
struct Dimensions {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
}

impl Dimensions {
    /// Reads the sizes, in config.json's order of checks.
    ///
    /// # Errors
    /// A missing, zero or oversized dimension; query heads that are no multiple of the
    /// key/value heads; a hidden size no multiple of the heads without `head_dim`; an odd
    /// `head_dim` (RoPE rotates pairs).
    fn read(raw: &RawConfig, arch: Architecture, path: &Path) -> Result<Self> {
        let need = |v: Option<usize>, name: &str| dimension(v, name, path);
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = need(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(
                path,
                format!("num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"),
            ));
        }
        let head_dim = match raw.head_dim.or(arch.default_head_dim()) {
            Some(d) => need(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(cfg_err(path, format!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and no head_dim is given")));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(cfg_err(
                path,
                format!("head_dim ({head_dim}) must be even for RoPE"),
            ));
        }
        Ok(Dimensions {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
        })
    }
}

/// A `sliding_window` value: a positive integer, or null / absent for none.
///
/// # Errors
/// Anything else.
fn window_value(v: &Option<Value>, path: &Path) -> Result<Option<usize>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            Ok(Some(v.as_u64().filter(|&w| w > 0).ok_or_else(|| {
                cfg_err(path, "`sliding_window` must be a positive integer or null")
            })? as usize))
        }
    }
}

/// `layer_types` as sliding (`true`) or full (`false`) attention per layer.
///
/// # Errors
/// A list of another length than `num_hidden_layers`; an entry other than
/// `sliding_attention` / `full_attention`.
fn layer_types(types: &[String], layers: usize, path: &Path) -> Result<Vec<bool>> {
    if types.len() != layers {
        return Err(cfg_err(
            path,
            format!(
                "`layer_types` has {} entries, num_hidden_layers is {layers}",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(cfg_err(
                path,
                format!("unsupported layer type `{other}` in `layer_types`; supported: sliding_attention, full_attention"),
            )),
        })
        .collect()
}

/// The attention window and the layers that use it, as transformers' configs resolve them:
/// Mistral's `sliding_window` on every layer; Qwen2's refused; Qwen3's only with
/// `use_sliding_window`, on `layer_types` or else the layers from `max_window_layers` on;
/// Gemma2's (default 4096) on `layer_types` or else the even layers (0, 2, …); none for Llama.
///
/// # Errors
/// A window that is not a positive integer or null; Qwen2 with `use_sliding_window`; a bad
/// `layer_types`.
fn sliding_window(
    arch: Architecture,
    raw: &RawConfig,
    layers: usize,
    path: &Path,
) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    let given = |raw: &RawConfig| -> Result<Option<Vec<bool>>> {
        raw.layer_types
            .as_deref()
            .map(|t| layer_types(t, layers, path))
            .transpose()
    };
    match arch {
        Architecture::Mistral => Ok((window_value(&raw.sliding_window, path)?, None)),
        Architecture::Qwen2 => {
            if raw.use_sliding_window == Some(true) {
                return Err(cfg_err(
                    path,
                    "qwen2 with use_sliding_window=true is not supported",
                ));
            }
            Ok((None, None))
        }
        Architecture::Qwen3 => {
            let window = match raw.use_sliding_window {
                Some(true) => match &raw.sliding_window {
                    None => Some(4096),
                    v => window_value(v, path)?,
                },
                _ => None,
            };
            let sliding = match given(raw)? {
                Some(t) => t,
                None => {
                    let from = raw.max_window_layers.unwrap_or(28);
                    (0..layers).map(|i| window.is_some() && i >= from).collect()
                }
            };
            Ok((window, Some(sliding)))
        }
        Architecture::Gemma2 => {
            let window = match &raw.sliding_window {
                None => Some(4096),
                v => window_value(v, path)?,
            };
            let sliding = match given(raw)? {
                Some(t) => t,
                None => (0..layers).map(|i| (i + 1) % 2 == 1).collect(),
            };
            Ok((window, Some(sliding)))
        }
        Architecture::Llama => Ok((None, None)),
    }
}

/// A soft-cap value: a positive number, or null for none; `default` when absent.
///
/// # Errors
/// Anything else, naming `field`.
fn softcap(v: &Option<Value>, default: f64, field: &str, path: &Path) -> Result<Option<f64>> {
    match v {
        None => Ok(Some(default)),
        Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|c| c.is_finite() && *c > 0.0)
            .map(Some)
            .ok_or_else(|| cfg_err(path, format!("`{field}` must be a positive number or null"))),
    }
}

/// The MLP activation: `silu` (`hidden_act`) everywhere but Gemma2, whose
/// `hidden_activation` (or else `hidden_act`) must be `gelu_pytorch_tanh`.
///
/// # Errors
/// Another activation.
fn check_activation(arch: Architecture, raw: &RawConfig, path: &Path) -> Result<()> {
    let (given, want, field) = match arch {
        Architecture::Gemma2 => (
            raw.hidden_activation.as_ref().or(raw.hidden_act.as_ref()),
            "gelu_pytorch_tanh",
            if raw.hidden_activation.is_some() {
                "hidden_activation"
            } else {
                "hidden_act"
            },
        ),
        _ => (raw.hidden_act.as_ref(), "silu", "hidden_act"),
    };
    match given {
        Some(act) if act != want => Err(cfg_err(
            path,
            format!("unsupported {field} `{act}`; supported: {want}"),
        )),
        _ => Ok(()),
    }
}

fn token_ids(v: &Option<Value>, field: &str, path: &Path) -> Result<Vec<u32>> {
    let as_id = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                cfg_err(
                    path,
                    format!("`{field}` must be a token id or a list of ids"),
                )
            })
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

impl ModelConfig {
    /// Parses config.json text. `path` is only used in error messages.
    ///
    /// # Errors
    /// Invalid JSON, a missing or zero dimension, heads that do not divide, an unsupported
    /// `model_type`, activation or RoPE scaling.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| cfg_err(path, format!("invalid JSON: {e}")))?;
        let arch = architecture(&raw, path)?;
        let dims = Dimensions::read(&raw, arch, path)?;
        check_activation(arch, &raw, path)?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(cfg_err(
                path,
                "`rms_norm_eps` must be a finite non-negative number",
            ));
        }
        let (rope_theta, rope_scaling) = rope(&raw, path)?;
        let (sliding_window, sliding_layers) =
            sliding_window(arch, &raw, dims.num_hidden_layers, path)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Qwen3 | Architecture::Gemma2 => {
                (attention_bias, attention_bias)
            }
            Architecture::Mistral => (false, false),
        };
        let gemma = arch == Architecture::Gemma2;
        if raw.use_bidirectional_attention == Some(true) {
            return Err(cfg_err(
                path,
                "use_bidirectional_attention=true is not supported (a causal decoder only)",
            ));
        }
        let query_pre_attn_scalar = match (gemma, raw.query_pre_attn_scalar) {
            (false, _) => None,
            (true, None) => Some(256.0),
            (true, Some(s)) if s.is_finite() && s > 0.0 => Some(s),
            (true, Some(_)) => {
                return Err(cfg_err(
                    path,
                    "`query_pre_attn_scalar` must be a positive number",
                ))
            }
        };
        let (attn_logit_softcapping, final_logit_softcapping) = if gemma {
            (
                softcap(
                    &raw.attn_logit_softcapping,
                    50.0,
                    "attn_logit_softcapping",
                    path,
                )?,
                softcap(
                    &raw.final_logit_softcapping,
                    30.0,
                    "final_logit_softcapping",
                    path,
                )?,
            )
        } else {
            (None, None)
        };
        let mlp_bias = arch == Architecture::Llama && raw.mlp_bias.unwrap_or(false);
        let bos = token_ids(&raw.bos_token_id, "bos_token_id", path)?;
        let eos_token_ids = token_ids(&raw.eos_token_id, "eos_token_id", path)?;
        Ok(ModelConfig {
            arch,
            vocab_size: dims.vocab_size,
            hidden_size: dims.hidden_size,
            intermediate_size: dims.intermediate_size,
            num_hidden_layers: dims.num_hidden_layers,
            num_attention_heads: dims.num_attention_heads,
            num_key_value_heads: dims.num_key_value_heads,
            head_dim: dims.head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            sliding_layers,
            query_pre_attn_scalar,
            attn_logit_softcapping,
            final_logit_softcapping,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            initializer_range: raw.initializer_range.unwrap_or(0.02),
        })
    }

    /// Reads and parses `path` (a config.json file).
    ///
    /// # Errors
    /// See [`ModelConfig::from_json_str`]; also I/O errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// The attention window of layer `layer` (see [`ModelConfig::sliding_layers`]).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match &self.sliding_layers {
            None => self.sliding_window,
            Some(s) => self
                .sliding_window
                .filter(|_| s.get(layer).copied().unwrap_or(false)),
        }
    }

    /// Whether the layers differ in their window (then each layer's mask is its own).
    pub fn per_layer_windows(&self) -> bool {
        (1..self.num_hidden_layers).any(|l| self.layer_window(l) != self.layer_window(0))
    }

    /// The scale of the attention scores.
    ///
    /// # Formula
    /// `query_pre_attn_scalar^(−1/2)` where given (Gemma2), else `head_dim^(−1/2)`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Whether the decoder layers are Llama's (no q/k norms, no output norms, SwiGLU, no
    /// soft-capping, the scale `head_dim^(−1/2)`): what the whole-layer fused kernel computes.
    pub fn plain_layers(&self) -> bool {
        matches!(
            self.arch,
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2
        )
    }

    /// The number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The name and shape of every tensor this config implies, sorted by name.
    ///
    /// With tied embeddings there is no `lm_head.weight`.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            match self.arch {
                Architecture::Qwen3 => {
                    let hd = self.head_dim;
                    out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                    out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
                }
                Architecture::Gemma2 => {
                    out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
                    out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
                }
                _ => {}
            }
            for (name, rows, bias) in [
                ("q_proj", q, self.qkv_bias),
                ("k_proj", kv, self.qkv_bias),
                ("v_proj", kv, self.qkv_bias),
            ] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![rows, h]));
                if bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.o_bias {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            for (name, shape) in [
                ("gate_proj", [i, h]),
                ("up_proj", [i, h]),
                ("down_proj", [h, i]),
            ] {
                out.push((format!("{p}.mlp.{name}.weight"), shape.to_vec()));
                if self.mlp_bias {
                    out.push((format!("{p}.mlp.{name}.bias"), vec![shape[0]]));
                }
            }
        }
        out.sort();
        out
    }

    /// Total number of parameters (tied embeddings counted once; saturating on overflow).
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().fold(1usize, |a, &d| a.saturating_mul(d)))
            .fold(0usize, usize::saturating_add)
    }

    /// `layer_types` as config.json writes it: `sliding_attention` or `full_attention` per
    /// layer.
    fn layer_types_json(&self) -> Value {
        (0..self.num_hidden_layers)
            .map(|l| {
                let sliding = self
                    .sliding_layers
                    .as_ref()
                    .is_none_or(|s| s.get(l).copied().unwrap_or(false));
                Value::from(if sliding {
                    "sliding_attention"
                } else {
                    "full_attention"
                })
            })
            .collect()
    }

    /// A Hugging Face style config.json for this configuration.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": true,
            "torch_dtype": "float32",
            "transformers_version": "4.46.0",
        });
        let o = v.as_object_mut().expect("object literal");
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                o.insert("eos_token_id".into(), (*e).into());
            }
            es => {
                o.insert("eos_token_id".into(), es.to_vec().into());
            }
        }
        match self.arch {
            Architecture::Llama => {
                o.insert("attention_bias".into(), self.qkv_bias.into());
                o.insert("mlp_bias".into(), self.mlp_bias.into());
            }
            Architecture::Mistral => {
                o.insert(
                    "sliding_window".into(),
                    self.sliding_window.map(Value::from).unwrap_or(Value::Null),
                );
            }
            Architecture::Qwen2 => {
                o.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Qwen3 => {
                o.insert("attention_bias".into(), self.qkv_bias.into());
                o.insert(
                    "use_sliding_window".into(),
                    self.sliding_window.is_some().into(),
                );
                o.insert(
                    "sliding_window".into(),
                    self.sliding_window.map(Value::from).unwrap_or(Value::Null),
                );
                o.insert("layer_types".into(), self.layer_types_json());
            }
            Architecture::Gemma2 => {
                o.remove("hidden_act");
                o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
                o.insert("attention_bias".into(), self.qkv_bias.into());
                o.insert(
                    "sliding_window".into(),
                    self.sliding_window.map(Value::from).unwrap_or(Value::Null),
                );
                o.insert("layer_types".into(), self.layer_types_json());
                let num = |v: Option<f64>| v.map(Value::from).unwrap_or(Value::Null);
                // An integer in Gemma2Config.
                let scalar = match self.query_pre_attn_scalar {
                    Some(s) if s.fract() == 0.0 && s < 1e15 => Value::from(s as u64),
                    s => num(s),
                };
                o.insert("query_pre_attn_scalar".into(), scalar);
                o.insert(
                    "attn_logit_softcapping".into(),
                    num(self.attn_logit_softcapping),
                );
                o.insert(
                    "final_logit_softcapping".into(),
                    num(self.final_logit_softcapping),
                );
            }
        }
        if let Some(s) = &self.rope_scaling {
            o.insert("rope_scaling".into(), s.to_json());
        }
        v
    }
}

/// Parses config.json text (the fuzzing entry point); `<input>` names the source in errors.
///
/// # Errors
/// See [`ModelConfig::from_json_str`].
pub fn parse_config(text: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_str(text, &PathBuf::from("<input>"))
}
