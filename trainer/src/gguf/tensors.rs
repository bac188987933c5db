//! GGUF tensors → Hugging Face tensors: the names mapped, each tensor read and dequantized to
//! f32 by candle (under [`crate::error::catch_panic`]), checked against the shape the
//! configuration implies before its bytes are read, refused when NaN or infinite, and the
//! llama q/k rows put back in Hugging Face's order.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};

use super::ggml_dtype_name;
use super::metadata::Arch;
use crate::config_json::ModelConfig;
use crate::error::{Error, Result};

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
    let gemma = arch == Arch::Gemma2;
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" if gemma => ("pre_feedforward_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "post_attention_norm" if gemma => ("post_attention_layernorm", None),
        "post_ffw_norm" if gemma => ("post_feedforward_layernorm", None),
        "attn_q_norm" if arch == Arch::Qwen3 => ("self_attn.q_norm", None),
        "attn_k_norm" if arch == Arch::Qwen3 => ("self_attn.k_norm", None),
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
/// been validated ([`super::read_header`]); candle's reader still runs under
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

/// The per-pair RoPE frequency divisors of `rope_freqs.weight` (Llama 3.1+), `None` when the
/// file has no such tensor; `head_dim / 2` of them.
///
/// # Errors
/// [`Error::GgufTensor`]: another shape, or a tensor candle cannot read.
pub(super) fn read_rope_freqs<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
    head_dim: usize,
) -> Result<Option<Vec<f32>>> {
    const NAME: &str = "rope_freqs.weight";
    let Some(info) = content.tensor_infos.get(NAME) else {
        return Ok(None);
    };
    let terr = |message: String| Error::GgufTensor {
        path: path.to_path_buf(),
        name: NAME.into(),
        message,
    };
    if info.shape.dims() != [head_dim / 2] {
        return Err(terr(format!(
            "shape {:?}, expected [{}]",
            info.shape.dims(),
            head_dim / 2
        )));
    }
    read_tensor(content, reader, NAME, path)?
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map(Some)
        .map_err(|e| terr(candle_message(&e)))
}

/// Every tensor of the file but `rope_freqs.weight`, in name order, by Hugging Face name
/// ([`read_weight`]); each weight `config` implies must be there. `heads` are the attention's
/// query and key/value head counts (the llama q/k rows are unpermuted by them);
/// `progress(done, total)` is called after each tensor.
///
/// # Errors
/// [`Error::GgufTensor`]: a tensor without a Hugging Face name in this configuration, of
/// another shape, unreadable, not finite, or missing.
pub(super) fn read_weights<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
    config: &ModelConfig,
    arch: Arch,
    heads: (usize, usize),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<String, Tensor>> {
    let expected: BTreeMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = BTreeMap::new();
    let total = names.len();
    for (i, name) in names.into_iter().enumerate() {
        if name != "rope_freqs.weight" {
            let (hf, t) = read_weight(content, reader, path, name, &expected, arch, heads)?;
            tensors.insert(hf, t);
        }
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
    Ok(tensors)
}

/// The GGUF tensor `name` as its Hugging Face name and tensor: the name mapped
/// ([`hf_name`]), the shape checked against `expected` before any data is read (it bounds the
/// bytes candle allocates), the tensor read, checked finite and unpermuted.
fn read_weight<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
    name: &str,
    expected: &BTreeMap<String, Vec<usize>>,
    arch: Arch,
    (heads, kv_heads): (usize, usize),
) -> Result<(String, Tensor)> {
    let info = &content.tensor_infos[name];
    let terr = |message: String| Error::GgufTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    let Some((hf, perm)) = hf_name(name, arch, heads, kv_heads) else {
        return Err(terr(format!(
            "no Hugging Face name for it in a `{}` model",
            arch.name()
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
    let t = read_tensor(content, reader, name, path)?;
    // A NaN or infinite weight makes every log-prob NaN: refused as a checkpoint's is.
    crate::safetensors::check_finite(name, &t, path)?;
    let t = match perm {
        Some(h) => unpermute_from_gguf(&t, h).map_err(|e| terr(e.to_string()))?,
        None => t,
    };
    // llama.cpp's Gemma converter stores each norm weight as `1 + w` (the factor it
    // multiplies by): the `w` of transformers' `(1 + w)` RMSNorm is the stored value − 1.
    let t = if arch == Arch::Gemma2 && hf.ends_with("norm.weight") {
        t.affine(1.0, -1.0).map_err(|e| terr(e.to_string()))?
    } else {
        t
    };
    Ok((hf, t))
}

/// The number of tensors of each GGML type (`Q4_1: 210`, …), for the import summary.
pub(super) fn tensor_type_counts(content: &Content) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *counts
            .entry(ggml_dtype_name(info.ggml_dtype).to_string())
            .or_insert(0) += 1;
    }
    counts
}
