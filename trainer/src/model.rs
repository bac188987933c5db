//! The decoder (Llama / Mistral / Qwen2) as a differentiable training model.
//!
//! Every parameter is a [`candle_core::Var`] held in a [`candle_nn::VarMap`] under its Hugging
//! Face name. The forward pass is built only from ops that record a backward pass: matmul,
//! an additive mask and [`candle_nn::ops::softmax`] for attention, a hand-written RMSNorm and a
//! hand-written rotate-half RoPE from cos/sin tables. candle's fused `softmax_last_dim`,
//! `rms_norm`, `RmsNorm::forward` and `rope` are never used: they record no gradient.
//! On f32/f64 CPU tensors, RMSNorm, `silu(gate) ⊙ up`, the head split with RoPE, the attention
//! core and the final log-softmax-and-pick run as the fused kernels of [`crate::fused`], which
//! carry hand-written backward passes ([`Model::set_fused_kernels`] turns them off).
//!
//! Low-precision models (bf16/f16) compute RMSNorm, the attention softmax and the final
//! log-softmax in f32, as transformers does; f32 and f64 models compute everything in their own
//! dtype (f64 is what the finite-difference tests use).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Additive mask value for a forbidden attention entry (finite so that a fully masked row
/// stays finite instead of becoming NaN).
pub const MASK_VALUE: f64 = -1e9;

/// A linear layer `y = x Wᵀ + b` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
struct Lin {
    w: Tensor,
    b: Option<Tensor>,
}

impl Lin {
    /// `x`: `[N, in]` → `[N, out]`, computed in `x`'s dtype (parameters are cast to it; a
    /// no-op when the dtypes already agree).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = x.matmul(&self.w.to_dtype(dt)?.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(dt)?)?,
            None => y,
        })
    }

    /// `r + self(x)`, one fused node ([`crate::fused::linear_add`]) under the conditions of
    /// [`Lin::apply`] when there is no bias.
    fn apply_add(&self, fused: bool, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        if fused && self.b.is_none() && x.rank() == 2 && self.w.dtype() == x.dtype() {
            return Ok(crate::fused::linear_add(x, &self.w, r)?);
        }
        Ok((r + self.apply(fused, x)?)?)
    }

    /// [`Lin::forward`], through the fused [`crate::fused::linear`] when `fused` is set and
    /// `x` is 2-D in the weight's dtype.
    fn apply(&self, fused: bool, x: &Tensor) -> Result<Tensor> {
        if fused && x.rank() == 2 && self.w.dtype() == x.dtype() {
            let y = crate::fused::linear(x, &self.w)?;
            return Ok(match &self.b {
                Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
                None => y,
            });
        }
        self.forward(x)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln1: Tensor,
    ln2: Tensor,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// Per-layer key/value cache for incremental decoding: one `[B, kv_heads, capacity, d]` buffer
/// for the keys and one for the values of each layer, written in place as positions are
/// appended (capacity doubles when full), detached from any autograd graph. Memory is linear in
/// the cached length: no step keeps an earlier step's tensors or graph alive.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Positions to allocate room for at the first append.
    reserve: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache that allocates room for `positions` at its first append (it still grows
    /// past them).
    pub fn with_capacity(positions: usize) -> Self {
        KvCache {
            reserve: positions,
            ..Self::default()
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a cached tensor records an autograd graph (never, by construction: the buffers
    /// are fresh tensors written in place).
    pub fn tracks_graph(&self) -> bool {
        self.layers
            .iter()
            .flatten()
            .any(|(k, v)| k.track_op() || v.track_op())
    }

    /// Positions the buffers hold room for (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Writes layer `li`'s new keys and values (`[B, kv_heads, l, d]`) at positions
    /// `len .. len + l` and returns all cached ones, `[B, kv_heads, len + l, d]` views of the
    /// buffers. `limit`: the bytes the buffers may take in all (the model's memory ceiling).
    fn append(
        &mut self,
        li: usize,
        k: &Tensor,
        v: &Tensor,
        limit: Option<u128>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, kvh, l, d) = k.dims4()?;
        let need = self.len + l;
        let cap = self.layers[li]
            .as_ref()
            .map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(2 * cap).max(self.reserve);
            let bytes = (b * kvh * d) as u128 * new_cap as u128 * k.dtype().size_in_bytes() as u128;
            if let Some(limit) = limit.filter(|&lim| 2 * bytes * self.layers.len() as u128 > lim) {
                return Err(Error::TooLarge {
                    what: format!("the key/value cache for {b} sequence(s) of {need} positions"),
                    bytes: 2 * bytes * self.layers.len() as u128,
                    detail: format!(
                        "{} layers × keys and values × {b} sequence(s) × {kvh} heads × {new_cap} \
                         positions × {d} × {} bytes",
                        self.layers.len(),
                        k.dtype().size_in_bytes()
                    ),
                    limit,
                });
            }
            let grow = |old: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kvh, new_cap, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.layers[li].take();
            let (ok, ov) = (old.as_ref().map(|x| &x.0), old.as_ref().map(|x| &x.1));
            self.layers[li] = Some((grow(ok, k)?, grow(ov, v)?));
        }
        let (kb, vb) = self.layers[li]
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("KV cache: layer without buffers".into()))?;
        kb.slice_set(&k.detach().contiguous()?, 2, self.len)?;
        vb.slice_set(&v.detach().contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// The dtype used for normalization, softmax and log-softmax: f32 for half types.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// RMSNorm, differentiable.
///
/// # Formula
/// `y = w ⊙ x / sqrt(mean(x²) + ε)`, the mean over the last dimension, computed in the
/// accumulation dtype and cast back before the multiplication by `w` (as transformers does).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xa = x.to_dtype(accumulation_dtype(dtype))?;
    let ms = xa.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xa.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)?)
}

/// Rotate-half RoPE, differentiable.
///
/// # Formula
/// `rope(x) = x ⊙ cos + rotate_half(x) ⊙ sin`, `rotate_half([x₁, x₂]) = [−x₂, x₁]` (halves of
/// the head dimension); `cos`, `sin` are `[L, head_dim]` tables with the frequencies repeated
/// twice, broadcast over batch and heads of `x: [B, H, L, head_dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// An additive causal mask `[1, 1, l, t]` for `l` queries at absolute positions
/// `offset .. offset + l` over `t = offset + l` keys; with a window `w`, a query at `i` sees
/// key `j` iff `j ≤ i` and `i − j < w`.
pub fn causal_mask(
    l: usize,
    offset: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = offset + l;
    let mut m = vec![0f32; l * t];
    for i in 0..l {
        let qi = offset + i;
        for j in 0..t {
            let allowed = j <= qi && window.is_none_or(|w| qi - j < w);
            if !allowed {
                m[i * t + j] = MASK_VALUE as f32;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, l, t), device)?.to_dtype(dtype)?)
}

/// Whether an additive mask has the `[B or 1, 1, l, t]` shape the fused softmax takes.
fn fusable_mask(m: &Tensor, b: usize, l: usize, t: usize) -> bool {
    matches!(m.dims(), &[mb, 1, ml, mt] if (mb == 1 || mb == b) && ml == l && mt == t)
}

/// Bytes of physical memory (`MemTotal` of `/proc/meminfo` on Linux), the ceiling of the size
/// checks on the CPU ([`Model::check_forward_size`], the KV cache's growth); `None` where unknown
/// (no ceiling then).
pub fn physical_memory() -> Option<u128> {
    static MEM: std::sync::OnceLock<Option<u128>> = std::sync::OnceLock::new();
    *MEM.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// `bytes` in decimal units with one decimal (`138.6 TB`).
pub fn format_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A decoder-only transformer with trainable parameters.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    varmap: VarMap,
    dtype: DType,
    compute_dtype: DType,
    device: Device,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    extra: BTreeMap<String, Tensor>,
    fused: bool,
    /// Where whole-layer nodes leave their weights' gradients; `None`: layers are graphs of
    /// the separate kernels (see [`Model::set_grad_sink`]).
    grad_sink: Option<crate::fused::GradSink>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Builds a model from named tensors (Hugging Face names), converting each to `dtype` and
    /// `device` and making it a trainable variable.
    ///
    /// Tensors the config does not use are kept unchanged (not trainable) and written back by
    /// [`crate::checkpoint::save_pretrained`], so a saved checkpoint has the input's tensor names.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor and `source`.
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        source: &std::path::Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidArgument(format!(
                "unsupported model dtype {dtype:?}; use f32, bf16, f16 or f64"
            )));
        }
        let varmap = VarMap::new();
        let mut vars: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: source.to_path_buf(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name,
                    file: source.to_path_buf(),
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            let var = Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)?;
            vars.insert(name.clone(), var.as_tensor().clone());
            varmap
                .data()
                .lock()
                .map_err(|_| Error::InvalidArgument("poisoned VarMap lock".into()))?
                .insert(name, var);
        }
        if config.tie_word_embeddings {
            if let Some(t) = tensors.get("lm_head.weight") {
                let want = [config.vocab_size, config.hidden_size];
                if t.dims() != want {
                    return Err(Error::ShapeMismatch {
                        name: "lm_head.weight".into(),
                        file: source.to_path_buf(),
                        expected: want.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
            }
        }
        let get = |n: &str| -> Tensor { vars[n].clone() };
        let opt = |n: &str| -> Option<Tensor> { vars.get(n).cloned() };
        let lin = |p: &str| Lin {
            w: get(&format!("{p}.weight")),
            b: opt(&format!("{p}.bias")),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Block {
                    ln1: get(&format!("{p}.input_layernorm.weight")),
                    ln2: get(&format!("{p}.post_attention_layernorm.weight")),
                    q: lin(&format!("{p}.self_attn.q_proj")),
                    k: lin(&format!("{p}.self_attn.k_proj")),
                    v: lin(&format!("{p}.self_attn.v_proj")),
                    o: lin(&format!("{p}.self_attn.o_proj")),
                    gate: lin(&format!("{p}.mlp.gate_proj")),
                    up: lin(&format!("{p}.mlp.up_proj")),
                    down: lin(&format!("{p}.mlp.down_proj")),
                }
            })
            .collect();
        let embed = get("model.embed_tokens.weight");
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")
        };
        Ok(Model {
            norm: get("model.norm.weight"),
            embed,
            lm_head,
            layers,
            varmap,
            dtype,
            compute_dtype: dtype,
            device: device.clone(),
            config,
            extra: tensors,
            fused: true,
            grad_sink: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the forward pass (by default the parameter dtype).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Sets the dtype of the forward pass, e.g. bf16 compute over f32 parameters (mixed
    /// precision: each parameter is cast where it is used, and the cast's backward returns
    /// gradients in the parameter dtype).
    ///
    /// # Errors
    /// A dtype other than f32, f64, bf16, f16.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidArgument(format!(
                "unsupported compute dtype {dtype:?}"
            )));
        }
        self.compute_dtype = dtype;
        Ok(())
    }

    /// Whether the forward uses the fused CPU kernels of [`crate::fused`] (RMSNorm,
    /// `silu(gate) ⊙ up`, head split + RoPE, the attention core, the final log-softmax and
    /// pick) where they apply: f32/f64 compute on the CPU, and for the head split and attention
    /// no KV cache. On by default; off, every op is a plain candle op (the reference the fused
    /// kernels are tested against).
    pub fn fused_kernels(&self) -> bool {
        self.fused
    }

    /// Turns the fused CPU kernels on or off (see [`Model::fused_kernels`]).
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused = on;
    }

    /// This model with its weights as constants (the same storage, detached from the
    /// variables): its forward passes record no autograd graph, so no activation outlives the
    /// op that reads it (PyTorch's `torch.no_grad()`). For inference: log-probs, sampling.
    pub fn detached(&self) -> Model {
        let d = |t: &Tensor| t.detach();
        let lin = |l: &Lin| Lin {
            w: d(&l.w),
            b: l.b.as_ref().map(d),
        };
        Model {
            config: self.config.clone(),
            varmap: self.varmap.clone(),
            dtype: self.dtype,
            compute_dtype: self.compute_dtype,
            device: self.device.clone(),
            embed: d(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|b| Block {
                    ln1: d(&b.ln1),
                    ln2: d(&b.ln2),
                    q: lin(&b.q),
                    k: lin(&b.k),
                    v: lin(&b.v),
                    o: lin(&b.o),
                    gate: lin(&b.gate),
                    up: lin(&b.up),
                    down: lin(&b.down),
                })
                .collect(),
            norm: d(&self.norm),
            lm_head: d(&self.lm_head),
            extra: self.extra.clone(),
            fused: self.fused,
            grad_sink: None,
        }
    }

    /// Whether forward passes record an autograd graph (the weights are variables; false for
    /// a [`Model::detached`] model).
    pub fn tracks_graph(&self) -> bool {
        self.embed.track_op()
    }

    /// The ceiling of the size checks: [`physical_memory`] on the CPU, none on other devices
    /// (their allocators fail with an error rather than aborting the process).
    fn memory_limit(&self) -> Option<u128> {
        if self.device.is_cpu() {
            physical_memory()
        } else {
            None
        }
    }

    /// The least memory a forward pass over `b` sequences of `l` positions attending `t` keys
    /// takes, and what it is made of: the `[B, heads, l, t]` attention probabilities (every
    /// layer's kept for the backward pass when the model [tracks a graph](Model::tracks_graph),
    /// one layer's otherwise) and the `[B, 1, l, t]` additive mask, in the accumulation dtype.
    /// A lower bound, so that a refusal is certain to be right.
    pub fn forward_memory(&self, b: usize, l: usize, t: usize) -> (u128, String) {
        let bytes = accumulation_dtype(self.compute_dtype).size_in_bytes() as u128;
        let heads = self.config.num_attention_heads as u128;
        let layers = if self.tracks_graph() {
            self.config.num_hidden_layers as u128
        } else {
            1
        };
        let (b, l, t) = (b as u128, l as u128, t as u128);
        let total = [b, l, t, bytes]
            .iter()
            .fold(layers * heads + 1, |acc, &x| acc.saturating_mul(x));
        let detail = format!(
            "attention probabilities: {b} sequence(s) × {heads} heads × {l} × {t} positions × {bytes} bytes{}, \
             and the mask",
            if layers > 1 {
                format!(" × {layers} layers kept for the backward pass")
            } else {
                String::new()
            }
        );
        (total, detail)
    }

    /// Refuses token ids the embedding has no row for.
    ///
    /// # Errors
    /// [`Error::TokenOutOfVocab`] with the first such id.
    pub fn check_token_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match ids.iter().find(|&&i| i as usize >= v) {
            Some(&id) => Err(Error::TokenOutOfVocab { id, vocab_size: v }),
            None => Ok(()),
        }
    }

    /// Refuses a forward pass over `b` sequences of `l` positions (attending `offset + l`
    /// keys) whose [`Model::forward_memory`] exceeds the machine's memory, before anything of
    /// that size is allocated.
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_forward_size(&self, b: usize, l: usize, offset: usize) -> Result<()> {
        let Some(limit) = self.memory_limit() else {
            return Ok(());
        };
        let (bytes, detail) = self.forward_memory(b, l, offset.saturating_add(l));
        if bytes > limit {
            return Err(Error::TooLarge {
                what: format!("a forward pass over {b} sequence(s) of {l} positions"),
                bytes,
                detail,
                limit,
            });
        }
        Ok(())
    }

    /// Runs each decoder layer of a training forward pass (no KV cache, f32/f64 CPU, fused
    /// kernels on, no biases) as one graph node ([`crate::fused::decoder_layer`]) whose
    /// backward pass leaves the layer weights' gradients in `sink` instead of the
    /// `GradStore` that `backward()` returns: whoever calls `backward()` on such a graph must
    /// add them with [`crate::fused::GradSink::drain_into`] (the trainer does). `None` (the
    /// default) turns this off, so a plain `backward()` holds every gradient.
    pub fn set_grad_sink(&mut self, sink: Option<crate::fused::GradSink>) {
        self.grad_sink = sink;
    }

    /// The sink set by [`Model::set_grad_sink`].
    pub fn grad_sink(&self) -> Option<&crate::fused::GradSink> {
        self.grad_sink.as_ref()
    }

    /// The layer's weights for [`crate::fused::decoder_layer`], when it has no biases and
    /// every weight is in dtype `dt`.
    fn layer_weights(blk: &Block, dt: DType) -> Option<crate::fused::LayerWeights> {
        let lins = [
            &blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down,
        ];
        if lins.iter().any(|l| l.b.is_some() || l.w.dtype() != dt)
            || blk.ln1.dtype() != dt
            || blk.ln2.dtype() != dt
        {
            return None;
        }
        Some(crate::fused::LayerWeights {
            ln1: blk.ln1.clone(),
            q: blk.q.w.clone(),
            k: blk.k.w.clone(),
            v: blk.v.w.clone(),
            o: blk.o.w.clone(),
            ln2: blk.ln2.clone(),
            gate: blk.gate.w.clone(),
            up: blk.up.w.clone(),
            down: blk.down.w.clone(),
        })
    }

    fn use_fused(&self, t: &Tensor) -> bool {
        self.fused && crate::fused::enabled(t)
    }

    /// RMSNorm with this model's ε, fused where `use_fused` allows.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.use_fused(x) {
            Ok(crate::fused::rms_norm(x, &w.to_dtype(x.dtype())?, eps)?)
        } else {
            rms_norm(x, w, eps)
        }
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variable store (Hugging Face names → trainable variables).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All trainable variables, sorted by name (deterministic order for optimizers,
    /// checkpoints and gradient norms).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Checkpoint tensors that the model does not use, kept to be written back unchanged.
    pub fn extra_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.extra
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// RoPE `cos`, `sin` tables `[l, head_dim]` for positions `offset .. offset + l`, in the
    /// compute dtype.
    ///
    /// As in transformers, the inverse frequencies and the angles `position · inv_freq` are
    /// float32 numbers (at position 4096 an f32 angle is off by up to ~2e-4 rad from the
    /// exact one; matching transformers' rounding keeps long-context log-probs identical).
    fn rope_tables(&self, offset: usize, l: usize) -> Result<(Tensor, Tensor)> {
        let inv: Vec<f32> = self
            .config
            .rope_inv_freq()
            .iter()
            .map(|&f| f as f32)
            .collect();
        let d = self.config.head_dim;
        let mut cos = Vec::with_capacity(l * d);
        let mut sin = Vec::with_capacity(l * d);
        for p in offset..offset + l {
            for _half in 0..2 {
                for &f in &inv {
                    let a = f64::from(p as f32 * f);
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (l, d), &self.device)?.to_dtype(self.compute_dtype)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// Runs the decoder on `ids: [B, l]` (u32) at positions `offset ..`, with an additive mask
    /// broadcastable to `[B, 1, l, t]`, returning the final-norm hidden states `[B, l, H]`.
    fn decode(
        &self,
        ids: &Tensor,
        offset: usize,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.check_token_ids(&ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)?;
        let cfg = &self.config;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let cd = self.compute_dtype;
        let acc = accumulation_dtype(cd);
        let (cos, sin) = self.rope_tables(offset, l)?;
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.is_empty() {
                c.layers = vec![None; cfg.num_hidden_layers];
            }
            if c.len != offset {
                return Err(Error::InvalidArgument(format!(
                    "KV cache holds {} positions, decode called at offset {offset}",
                    c.len
                )));
            }
        }
        let sink = self.grad_sink.as_ref().filter(|_| cache.is_none());
        let mut x = match sink {
            // The table itself (no conversion), so its gradient reaches the variable.
            Some(sink) if self.embed.dtype() == cd && self.use_fused(&self.embed) => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                crate::fused::embedding(&self.embed, &ids, sink)?
            }
            _ => self
                .embed
                .to_dtype(cd)?
                .index_select(&ids.flatten_all()?, 0)?, // [B*l, H]
        };
        let fz = self.use_fused(&x);
        // Whole-layer nodes: sizes and mask, the same for every layer.
        let layer_node = match (sink, mask) {
            (Some(sink), Some(m)) if fz && acc == cd && fusable_mask(m, b, l, l) => {
                let z = crate::fused::LayerDims {
                    b,
                    l,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    eps: cfg.rms_norm_eps,
                };
                Some((sink, z, m.to_dtype(cd)?))
            }
            _ => None,
        };
        for (li, blk) in self.layers.iter().enumerate() {
            if let Some((sink, z, m)) = &layer_node {
                if let Some(ws) = Self::layer_weights(blk, cd) {
                    x = crate::fused::decoder_layer(&x, &ws, *z, &cos, &sin, m, scale, sink)?;
                    continue;
                }
            }
            let h = self.norm(&x, &blk.ln1)?;
            let (q, k, v) = if cache.is_none() && self.use_fused(&h) {
                // Fused head split + RoPE + grouped-query repetition: [B, nh, l, hd] each.
                let (qp, kp, vp) = (
                    blk.q.apply(fz, &h)?,
                    blk.k.apply(fz, &h)?,
                    blk.v.apply(fz, &h)?,
                );
                let split = |z: &Tensor, heads: usize, rope: bool| {
                    crate::fused::split_heads(z, b, l, heads, nh, &cos, &sin, rope)
                };
                (
                    split(&qp, nh, true)?,
                    split(&kp, nkv, true)?,
                    split(&vp, nkv, false)?,
                )
            } else {
                let q = blk
                    .q
                    .apply(fz, &h)?
                    .reshape((b, l, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let k = blk
                    .k
                    .apply(fz, &h)?
                    .reshape((b, l, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let v = blk
                    .v
                    .apply(fz, &h)?
                    .reshape((b, l, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let q = apply_rope(&q, &cos, &sin)?;
                let mut k = apply_rope(&k, &cos, &sin)?;
                let mut v = v;
                if let Some(c) = cache.as_deref_mut() {
                    (k, v) = c.append(li, &k, &v, self.memory_limit())?;
                }
                let t = k.dim(2)?;
                let (k, v) = if nkv != nh {
                    let rep = nh / nkv;
                    let expand = |z: &Tensor| -> Result<Tensor> {
                        Ok(z.unsqueeze(2)?
                            .broadcast_as((b, nkv, rep, t, hd))?
                            .reshape((b, nh, t, hd))?)
                    };
                    (expand(&k)?, expand(&v)?)
                } else {
                    (k, v)
                };
                (q, k, v)
            };
            let t = k.dim(2)?;
            let att = match mask {
                // Fused scale + mask + softmax + PV + head merge (f32/f64 CPU): one graph node,
                // no gradient for the mask.
                Some(m) if acc == cd && self.use_fused(&q) && fusable_mask(m, b, l, t) => {
                    crate::fused::attention(&q, &k, &v, &m.to_dtype(cd)?, scale)?
                }
                _ => {
                    let raw = q.matmul(&k.t()?)?; // [B, nh, l, t]
                    let scores = (raw * scale)?.to_dtype(acc)?;
                    let scores = match mask {
                        Some(m) => scores.broadcast_add(m)?,
                        None => scores,
                    };
                    let p = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(cd)?;
                    p.matmul(&v)?.transpose(1, 2)?.reshape((b * l, nh * hd))?
                }
            };
            x = blk.o.apply_add(fz, &att, &x)?;
            let h = self.norm(&x, &blk.ln2)?;
            let whole = fz
                && blk.gate.b.is_none()
                && blk.up.b.is_none()
                && h.rank() == 2
                && blk.gate.w.dtype() == h.dtype();
            let m = if whole {
                // Both projections, silu and the product as one node.
                crate::fused::gate_up(&h, &blk.gate.w, &blk.up.w)?
            } else {
                let (gate, up) = (blk.gate.apply(fz, &h)?, blk.up.apply(fz, &h)?);
                if self.use_fused(&gate) {
                    crate::fused::silu_mul(&gate, &up)?
                } else {
                    (gate.silu()? * up)?
                }
            };
            x = blk.down.apply_add(fz, &m, &x)?;
        }
        if let Some(c) = cache {
            c.len += l;
        }
        let x = self.norm(&x, &self.norm)?;
        Ok(x.reshape((b, l, cfg.hidden_size))?)
    }

    fn training_mask(&self, b: usize, l: usize, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let acc = accumulation_dtype(self.compute_dtype);
        let causal = causal_mask(l, 0, self.config.sliding_window, acc, &self.device)?;
        Ok(match attention_mask {
            None => causal,
            Some(am) => {
                if am.dims() != [b, l] {
                    return Err(Error::InvalidArgument(format!(
                        "attention mask has shape {:?}, ids have [{b}, {l}]",
                        am.dims()
                    )));
                }
                // 0 where attended, MASK_VALUE where padding: (1 − m)·MASK_VALUE.
                let keys =
                    ((am.to_dtype(acc)?.affine(-1.0, 1.0)?) * MASK_VALUE)?.reshape((b, 1, 1, l))?;
                causal.broadcast_add(&keys)?
            }
        })
    }

    /// Logits `[B, L, V]` (accumulation dtype) for `ids: [B, L]` with an optional `[B, L]` 0/1
    /// attention mask (padding keys masked out; a causal mask is always applied).
    ///
    /// # Errors
    /// Shape mismatches between `ids` and the mask; tensor errors.
    pub fn logits(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mask = self.training_mask(b, l, attention_mask)?;
        let h = self.decode(ids, 0, Some(&mask), None)?;
        self.head(&h)
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, l, hs) = h.dims3()?;
        let cd = self.compute_dtype;
        let logits = h
            .reshape((b * l, hs))?
            .matmul(&self.lm_head.to_dtype(cd)?.t()?)?;
        Ok(logits
            .to_dtype(accumulation_dtype(cd))?
            .reshape((b, l, self.config.vocab_size))?)
    }

    /// Per-token log-probabilities of the next token: entry `[b, t]` is
    /// `log π(ids[b, t+1] | ids[b, ..=t])`, shape `[B, L−1]`, differentiable.
    ///
    /// # Formula
    /// `log π(y_{t+1} | y_{≤t}) = z_{t, y_{t+1}} − log Σ_v exp z_{t, v}` with `z` the logits.
    ///
    /// # Errors
    /// `L < 2`; see [`Model::logits`].
    pub fn token_logps(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.token_logps_at(ids, attention_mask, None)
    }

    /// [`Model::token_logps`] at the positions `loss_mask: [B, L−1]` selects (non-zero), 0
    /// elsewhere: the fused LM head then runs on the selected positions only (in DPO, the
    /// completion tokens: the prompt's logits are never formed), which changes no selected
    /// value and no gradient (an unselected position's log-prob is multiplied by 0 anyway).
    ///
    /// # Errors
    /// As [`Model::token_logps`]; a mask of another shape.
    pub fn token_logps_masked(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_mask: &Tensor,
    ) -> Result<Tensor> {
        let lp = self.token_logps_at(ids, attention_mask, Some(loss_mask))?;
        Ok((lp * loss_mask.to_dtype(accumulation_dtype(self.compute_dtype))?)?)
    }

    fn token_logps_at(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l < 2 {
            return Err(Error::InvalidArgument(
                "token_logps needs sequences of length ≥ 2".into(),
            ));
        }
        self.check_forward_size(b, l, 0)?;
        if let Some(r) = rows {
            if r.dims() != [b, l - 1] {
                return Err(Error::InvalidArgument(format!(
                    "loss mask has shape {:?}, log-probs have [{b}, {}]",
                    r.dims(),
                    l - 1
                )));
            }
        }
        let mask = self.training_mask(b, l, attention_mask)?;
        let h = self
            .decode(ids, 0, Some(&mask), None)?
            .narrow(1, 0, l - 1)?
            .contiguous()?;
        if self.use_fused(&h) {
            // Fused LM head + log-softmax + pick (f32/f64 CPU): one node; the [B(L−1), V]
            // logits live in a reused buffer, not a tensor, so backward spends no zero buffer
            // or accumulation of their size (see `fused::lm_head_logps`).
            let hs = h.dim(2)?;
            let h = h.reshape((b * (l - 1), hs))?;
            let targets = ids.narrow(1, 1, l - 1)?.flatten_all()?;
            // The selected positions only, when a mask selects fewer than all.
            let sel = match rows {
                Some(r) => {
                    let v = r.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    let idx: Vec<u32> = (0..v.len() as u32)
                        .filter(|&i| v[i as usize] != 0.0)
                        .collect();
                    let n = idx.len();
                    (n < v.len())
                        .then(|| Tensor::from_vec(idx, n, &self.device))
                        .transpose()?
                }
                None => None,
            };
            let (h, targets) = match &sel {
                Some(idx) => (h.index_select(idx, 0)?, targets.index_select(idx, 0)?),
                None => (h, targets),
            };
            // With a sink, the head's own variable (no conversion) takes its gradient there.
            let sink = self
                .grad_sink
                .as_ref()
                .filter(|_| self.lm_head.dtype() == h.dtype());
            let lp = crate::fused::lm_head_logps_into(
                &h,
                &self.lm_head.to_dtype(h.dtype())?,
                &targets,
                sink,
            )?;
            let lp = match &sel {
                Some(idx) => {
                    Tensor::zeros(b * (l - 1), lp.dtype(), &self.device)?.index_add(idx, &lp, 0)?
                }
                None => lp,
            };
            return Ok(lp.reshape((b, l - 1))?);
        }
        let logits = self.head(&h)?; // [B, L−1, V]
        let targets = ids.narrow(1, 1, l - 1)?.contiguous()?.unsqueeze(2)?;
        let picked = logits.gather(&targets, 2)?.squeeze(2)?;
        // log-sum-exp with a detached max: exact for any shift, so the gradient is unaffected.
        let m = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits
            .broadcast_sub(&m)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + m)?
            .squeeze(2)?;
        Ok((picked - lse)?)
    }

    /// Summed completion log-probabilities `[B]`: `Σ_t loss_mask[b, t] · token_logps[b, t]`.
    ///
    /// `loss_mask: [B, L−1]` selects the target positions (see [`crate::batch::Batch`]).
    ///
    /// # Errors
    /// See [`Model::token_logps`].
    pub fn sequence_logps(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .token_logps_masked(ids, attention_mask, loss_mask)?
            .sum(1)?)
    }

    /// Incremental decoding: runs `ids: [B, l]` at positions `cache.len() ..`, extends the
    /// cache and returns the logits `[B, l, V]` (accumulation dtype). Records no autograd
    /// graph (the weights are read [detached](Model::detached)): the logits and the cache hold
    /// no earlier step's tensors, so memory stays linear in the cached length.
    ///
    /// # Errors
    /// [`Error::TooLarge`] (see [`Model::check_forward_size`]; the cache's growth likewise);
    /// tensor errors.
    pub fn forward_with_cache(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if self.tracks_graph() {
            return self.detached().forward_with_cache(ids, cache);
        }
        let (b, l) = ids.dims2()?;
        let offset = cache.len();
        self.check_forward_size(b, l, offset)?;
        let needs_mask = l > 1 || self.config.sliding_window.is_some_and(|w| offset + 1 > w);
        let mask = if needs_mask {
            Some(causal_mask(
                l,
                offset,
                self.config.sliding_window,
                accumulation_dtype(self.compute_dtype),
                &self.device,
            )?)
        } else {
            None
        };
        let h = self.decode(ids, offset, mask.as_ref(), Some(cache))?;
        self.head(&h)
    }
}
