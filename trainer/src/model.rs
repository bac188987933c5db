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
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};
use crate::memory::physical_memory;

/// Additive mask value for a forbidden attention entry (finite so that a fully masked row
/// stays finite instead of becoming NaN).
pub const MASK_VALUE: f64 = -1e9;

/// A linear layer `y = x Wᵀ + b` with `W` of shape `[out, in]`, and optionally a LoRA
/// adapter `+ s · (drop(x) Aᵀ) Bᵀ` (see [`crate::lora`]).
#[derive(Debug, Clone)]
struct Lin {
    w: Tensor,
    b: Option<Tensor>,
    lora: Option<LoraLin>,
}

/// A LoRA adapter on a [`Lin`].
#[derive(Debug, Clone)]
struct LoraLin {
    /// `lora_A.weight`, `[r, in]`.
    a: Tensor,
    /// `lora_B.weight`, `[out, r]`.
    b: Tensor,
    /// `lora_alpha / r` (rsLoRA: `/ √r`).
    scale: f64,
    /// Dropout probability on the adapter's input.
    p: f64,
    /// This forward pass's dropout mask key (none: no dropout, e.g. evaluation).
    key: Option<u64>,
}

impl LoraLin {
    /// `s · (drop(x) Aᵀ) Bᵀ` for `x: [N, in]`, in `x`'s dtype.
    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xd = match self.key {
            Some(key) if self.p > 0.0 => {
                let (n, d) = x.dims2()?;
                (x * crate::lora::dropout_mask(key, n, d, self.p, dt, x.device())?)?
            }
            _ => x.clone(),
        };
        let u = xd.matmul(&self.a.to_dtype(dt)?.t()?)?;
        Ok(u.matmul(&self.b.to_dtype(dt)?.t()?)?
            .affine(self.scale, 0.0)?)
    }

    /// The adapter for [`crate::fused::decoder_layer`].
    fn weights(&self) -> crate::fused::LoraWeights {
        crate::fused::LoraWeights {
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
            dropout: self.key.filter(|_| self.p > 0.0).map(|k| (self.p, k)),
        }
    }
}

impl Lin {
    /// `x`: `[N, in]` → `[N, out]`, computed in `x`'s dtype (parameters are cast to it; a
    /// no-op when the dtypes already agree).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = x.matmul(&self.w.to_dtype(dt)?.t()?)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(dt)?)?,
            None => y,
        };
        self.add_lora(x, y)
    }

    /// `y + adapter(x)` when there is an adapter.
    fn add_lora(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match &self.lora {
            Some(ad) => Ok((y + ad.delta(x)?)?),
            None => Ok(y),
        }
    }

    /// `r + self(x)`, one fused node ([`crate::fused::linear_add`]) under the conditions of
    /// [`Lin::apply`] when there is no bias.
    fn apply_add(&self, fused: bool, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        if fused && self.b.is_none() && x.rank() == 2 && self.w.dtype() == x.dtype() {
            let y = crate::fused::linear_add(x, &self.w, r)?;
            return self.add_lora(x, y);
        }
        Ok((r + self.apply(fused, x)?)?)
    }

    /// [`Lin::forward`], through the fused [`crate::fused::linear`] when `fused` is set and
    /// `x` is 2-D in the weight's dtype.
    fn apply(&self, fused: bool, x: &Tensor) -> Result<Tensor> {
        if fused && x.rank() == 2 && self.w.dtype() == x.dtype() {
            let y = crate::fused::linear(x, &self.w)?;
            let y = match &self.b {
                Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
                None => y,
            };
            return self.add_lora(x, y);
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

impl Block {
    /// The seven projections in [`crate::lora::PROJECTIONS`]' order.
    fn lins(&self) -> [&Lin; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn lins_mut(&mut self) -> [&mut Lin; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// The layer with every tensor detached (a forward pass through it records no graph).
    fn detached(&self) -> Block {
        let mut blk = self.clone();
        blk.ln1 = blk.ln1.detach();
        blk.ln2 = blk.ln2.detach();
        for lin in blk.lins_mut() {
            lin.w = lin.w.detach();
            lin.b = lin.b.as_ref().map(Tensor::detach);
            if let Some(ad) = &mut lin.lora {
                ad.a = ad.a.detach();
                ad.b = ad.b.detach();
            }
        }
        blk
    }

    /// Every tensor of the layer: norms, weights, biases, adapters.
    fn tensors(&self) -> Vec<Tensor> {
        let mut v = vec![self.ln1.clone(), self.ln2.clone()];
        for l in self.lins() {
            v.push(l.w.clone());
            v.extend(l.b.clone());
            if let Some(ad) = &l.lora {
                v.push(ad.a.clone());
                v.push(ad.b.clone());
            }
        }
        v
    }
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

/// What one decoder layer's forward pass needs besides its weights, owned (a checkpointed
/// layer runs it again in the backward pass).
#[derive(Clone)]
struct LayerCtx {
    b: usize,
    l: usize,
    /// Query heads, key/value heads, head dimension.
    heads: (usize, usize, usize),
    eps: f64,
    scale: f64,
    cd: DType,
    acc: DType,
    fused: bool,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// `Some(window)` when the mask is causal (with right padding and `window` at most).
    causal: Option<Option<usize>>,
    /// The KV cache's memory ceiling ([`Model::memory_limit`]).
    memory_limit: Option<u128>,
}

impl LayerCtx {
    fn use_fused(&self, t: &Tensor) -> bool {
        self.fused && crate::fused::enabled(t)
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.use_fused(x) {
            Ok(crate::fused::rms_norm(
                x,
                &w.to_dtype(x.dtype())?,
                self.eps,
            )?)
        } else {
            rms_norm(x, w, self.eps)
        }
    }

    /// One decoder layer on `x: [B·l, H]` (the separate fused kernels where they apply, plain
    /// candle ops elsewhere), appending to the layer's KV-cache slot when given.
    fn block(
        &self,
        blk: &Block,
        x: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, l) = (self.b, self.l);
        let (nh, nkv, hd) = self.heads;
        let (cd, acc, scale) = (self.cd, self.acc, self.scale);
        let (cos, sin) = (&self.cos, &self.sin);
        let fz = self.use_fused(x);
        let h = self.norm(x, &blk.ln1)?;
        let mut unexpanded = None;
        let (q, k, v) = if cache.is_none() && self.use_fused(&h) {
            // Fused head split + RoPE + grouped-query repetition: [B, nh, l, hd] each.
            let (qp, kp, vp) = (
                blk.q.apply(fz, &h)?,
                blk.k.apply(fz, &h)?,
                blk.v.apply(fz, &h)?,
            );
            let split = |z: &Tensor, heads: usize, rope: bool| {
                crate::fused::split_heads(z, b, l, heads, nh, cos, sin, rope)
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
            let q = apply_rope(&q, cos, sin)?;
            let mut k = apply_rope(&k, cos, sin)?;
            let mut v = v;
            if let Some((c, li)) = cache {
                (k, v) = c.append(li, &k, &v, self.memory_limit)?;
            }
            let t = k.dim(2)?;
            unexpanded = Some((k.clone(), v.clone()));
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
        let mask = self.mask.as_ref();
        let att = match mask {
            // Fused scale + mask + softmax + PV + head merge (f32/f64 CPU): one graph node,
            // no gradient for the mask.
            Some(m) if acc == cd && self.use_fused(&q) && fusable_mask(m, b, l, t) => {
                crate::fused::attention(&q, &k, &v, &m.to_dtype(cd)?, scale)?
            }
            _ => match self.flash(&q, unexpanded.as_ref())? {
                Some(o) => o,
                None => {
                    let raw = q.matmul(&k.t()?)?; // [B, nh, l, t]
                    let scores = (raw * scale)?.to_dtype(acc)?;
                    let scores = match mask {
                        Some(m) => scores.broadcast_add(m)?,
                        None => scores,
                    };
                    let p = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(cd)?;
                    p.matmul(&v)?.transpose(1, 2)?.reshape((b * l, nh * hd))?
                }
            },
        };
        let x = blk.o.apply_add(fz, &att, x)?;
        let h = self.norm(&x, &blk.ln2)?;
        let whole = fz
            && blk.gate.b.is_none()
            && blk.up.b.is_none()
            && blk.gate.lora.is_none()
            && blk.up.lora.is_none()
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
        blk.down.apply_add(fz, &m, &x)
    }

    /// Flash attention (`candle-flash-attn`, feature `flash-attn`): on a CUDA device, in
    /// bf16/f16, for a causal mask (right padding, a sliding window), when nothing carries a
    /// gradient (it has no backward pass). `q: [B, nh, l, d]`, `kv`: the keys and values
    /// before grouped-query repetition, `[B, nkv, t, d]`. `None` when it does not apply.
    #[cfg(feature = "flash-attn")]
    fn flash(&self, q: &Tensor, kv: Option<&(Tensor, Tensor)>) -> Result<Option<Tensor>> {
        let (Some((k, v)), Some(window)) = (kv, self.causal) else {
            return Ok(None);
        };
        let applies = q.device().is_cuda()
            && matches!(self.cd, DType::BF16 | DType::F16)
            && !(q.track_op() || k.track_op() || v.track_op());
        if !applies {
            return Ok(None);
        }
        let (b, l) = (self.b, self.l);
        let (nh, _, hd) = self.heads;
        let tr = |z: &Tensor| z.transpose(1, 2).and_then(|z| z.contiguous());
        let o = candle_flash_attn::flash_attn_windowed(
            &tr(q)?,
            &tr(k)?,
            &tr(v)?,
            self.scale as f32,
            window.map(|w| w.saturating_sub(1)),
            Some(0),
        )?;
        Ok(Some(o.reshape((b * l, nh * hd))?))
    }

    /// Without the `flash-attn` feature: never applies.
    #[cfg(not(feature = "flash-attn"))]
    fn flash(&self, _q: &Tensor, _kv: Option<&(Tensor, Tensor)>) -> Result<Option<Tensor>> {
        let _ = self.causal;
        Ok(None)
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
    /// LoRA adapters (the base weights are then frozen).
    lora: Option<LoraSet>,
    /// Whether the adapters take part in the forward pass.
    adapters_on: bool,
    /// Gradient checkpointing of the decoder layers in training forward passes.
    checkpointing: bool,
    /// Logits per chunk of the LM head.
    head_chunk: usize,
    /// The LoRA dropout seed and the count of training forward passes since it was set.
    dropout: Arc<Mutex<DropoutState>>,
}

/// LoRA adapters of a [`Model`]: their configuration and variables (PEFT names).
#[derive(Debug, Clone)]
struct LoraSet {
    config: crate::lora::LoraConfig,
    vars: Vec<(String, Var)>,
}

/// See [`Model::set_dropout_seed`].
#[derive(Debug, Default)]
struct DropoutState {
    seed: Option<u64>,
    passes: u64,
}

/// The model's tensors by role, in Hugging Face's names.
fn bind_weights(
    config: &ModelConfig,
    vars: &BTreeMap<String, Tensor>,
) -> (Tensor, Vec<Block>, Tensor, Tensor) {
    let get = |n: &str| -> Tensor { vars[n].clone() };
    let opt = |n: &str| -> Option<Tensor> { vars.get(n).cloned() };
    let lin = |p: &str| Lin {
        w: get(&format!("{p}.weight")),
        b: opt(&format!("{p}.bias")),
        lora: None,
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
    (embed, layers, get("model.norm.weight"), lm_head)
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
    /// [`crate::pretrained::save_pretrained`], so a saved checkpoint has the input's tensor names.
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
        let (embed, layers, norm, lm_head) = bind_weights(&config, &vars);
        Ok(Model {
            norm,
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
            lora: None,
            adapters_on: true,
            checkpointing: false,
            head_chunk: crate::fused::HEAD_CHUNK_ELEMS,
            dropout: Arc::default(),
        })
    }

    /// (Re)binds the layers to the variables: as themselves, or detached (frozen: no gradient
    /// reaches them), and re-attaches the adapters.
    fn rebind(&mut self, frozen: bool) {
        let vars: BTreeMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = v.as_tensor();
                (n, if frozen { t.detach() } else { t.clone() })
            })
            .collect();
        let (embed, layers, norm, lm_head) = bind_weights(&self.config, &vars);
        (self.embed, self.layers, self.norm, self.lm_head) = (embed, layers, norm, lm_head);
        if let Some(set) = &self.lora {
            let vars: BTreeMap<&str, &Var> =
                set.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
            let (scale, p) = (set.config.scale(), set.config.dropout());
            for (li, blk) in self.layers.iter_mut().enumerate() {
                for (j, lin) in blk.lins_mut().into_iter().enumerate() {
                    let (na, nb) = crate::lora::tensor_names(li, j);
                    if let (Some(a), Some(b)) = (vars.get(na.as_str()), vars.get(nb.as_str())) {
                        lin.lora = Some(LoraLin {
                            a: a.as_tensor().clone(),
                            b: b.as_tensor().clone(),
                            scale,
                            p,
                            key: None,
                        });
                    }
                }
            }
        }
    }

    /// Adds LoRA adapters (see [`crate::lora`]) to the projections `cfg` targets (matched by
    /// their full module names as PEFT matches them), initialized as PEFT does (deterministic in `seed`: `A` Kaiming-uniform, `B = 0`),
    /// and freezes every other weight: from now on only the adapters carry gradients
    /// ([`Model::lora_vars`]). Adapters are trained in f32 (f64 for an f64 model) whatever
    /// the parameter dtype, and cast to the compute dtype in the forward pass.
    ///
    /// # Errors
    /// A model that already has adapters; targets that match no module or a module that is
    /// not a projection ([`crate::lora::LoraConfig::check_targets`]); tensor errors.
    pub fn add_lora(&mut self, cfg: crate::lora::LoraConfig, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::InvalidArgument(
                "the model already has LoRA adapters".into(),
            ));
        }
        cfg.check_targets(self.layers.len())?;
        let mut shapes = Vec::new();
        for (li, blk) in self.layers.iter().enumerate() {
            for (j, lin) in blk.lins().into_iter().enumerate() {
                if cfg.targets(li, j) {
                    let (d_out, d_in) = lin.w.dims2()?;
                    if cfg.r() > d_in.min(d_out) {
                        return Err(Error::InvalidArgument(format!(
                            "lora_r (--lora-r) = {} exceeds the rank of {} ({d_out}×{d_in}): \
                             an adapter B·A of a larger r spans no more updates than r = {}; \
                             choose --lora-r ≤ {}",
                            cfg.r(),
                            crate::lora::PROJECTIONS[j].1,
                            d_in.min(d_out),
                            d_in.min(d_out)
                        )));
                    }
                    shapes.push((li, j, d_in, d_out));
                }
            }
        }
        let dt = accumulation_dtype(self.dtype);
        let vars = crate::lora::init_weights(&cfg, &shapes, seed)?
            .into_iter()
            .map(|(n, t)| {
                Ok((
                    n,
                    Var::from_tensor(&t.to_device(&self.device)?.to_dtype(dt)?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.lora = Some(LoraSet { config: cfg, vars });
        self.rebind(true);
        Ok(())
    }

    /// The LoRA configuration, when the model has adapters.
    pub fn lora_config(&self) -> Option<&crate::lora::LoraConfig> {
        self.lora.as_ref().map(|s| &s.config)
    }

    /// The adapters' variables by PEFT name, sorted (empty without adapters).
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        self.lora.as_ref().map_or_else(Vec::new, |s| s.vars.clone())
    }

    /// Sets the adapters' values from tensors named as PEFT names them (e.g. read by
    /// [`crate::lora::read_weights`]), converting dtype and device.
    ///
    /// # Errors
    /// No adapters; a missing, extra or mis-shaped tensor, naming it and `file`.
    pub fn set_lora_weights(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        let set = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the model has no LoRA adapters".into()))?;
        if let Some(extra) = tensors
            .keys()
            .find(|k| !set.vars.iter().any(|(n, _)| n == *k))
        {
            return Err(Error::Checkpoint {
                path: file.to_path_buf(),
                message: format!(
                    "tensor `{extra}` is not an adapter of this model and configuration"
                ),
            });
        }
        for (name, var) in &set.vars {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: file.to_path_buf(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    file: file.to_path_buf(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Sets the adapters' values from a PEFT adapter file that may hold only some of the
    /// targeted modules (PEFT loads such a file; the modules it lacks stay unadapted): an
    /// adapter with neither `lora_A` nor `lora_B` in `tensors` is removed, then
    /// [`Model::set_lora_weights`].
    ///
    /// # Errors
    /// [`Model::set_lora_weights`]'s; a file with no adapter of this model at all.
    pub fn load_lora_adapter(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        if let Some(set) = &mut self.lora {
            let pair = |n: &str| {
                let m = n
                    .strip_suffix(".lora_A.weight")
                    .or_else(|| n.strip_suffix(".lora_B.weight"))
                    .unwrap_or(n)
                    .to_string();
                [format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight")]
            };
            set.vars
                .retain(|(n, _)| pair(n).iter().any(|p| tensors.contains_key(p)));
            if set.vars.is_empty() {
                return Err(Error::Checkpoint {
                    path: file.to_path_buf(),
                    message: "holds no adapter of the modules its adapter_config.json targets"
                        .into(),
                });
            }
            self.rebind(true);
        }
        self.set_lora_weights(tensors, file)
    }

    /// Folds the adapters into the base weights (`W ← W + s · B A`, PEFT's
    /// `merge_and_unload`), removes them and unfreezes the model.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn merge_lora(&mut self) -> Result<()> {
        let Some(set) = self.lora.take() else {
            return Ok(());
        };
        let scale = set.config.scale();
        let base: BTreeMap<String, Var> = self.named_vars().into_iter().collect();
        let vars: BTreeMap<&str, &Var> = set.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for li in 0..self.layers.len() {
            for (j, (_, path)) in crate::lora::PROJECTIONS.iter().enumerate() {
                let (na, nb) = crate::lora::tensor_names(li, j);
                if let (Some(a), Some(b)) = (vars.get(na.as_str()), vars.get(nb.as_str())) {
                    let wname = format!("model.layers.{li}.{path}.weight");
                    let w = &base[&wname];
                    let merged = crate::lora::merged_weight(
                        w.as_tensor(),
                        a.as_tensor(),
                        b.as_tensor(),
                        scale,
                    )?;
                    w.set(&merged)?;
                }
            }
        }
        self.rebind(false);
        Ok(())
    }

    /// Turns the adapters on or off in the forward pass (off: the base model, e.g. as the
    /// reference of a LoRA run).
    pub fn set_adapters_enabled(&mut self, on: bool) {
        self.adapters_on = on;
    }

    /// Gradient checkpointing (TRL's `gradient_checkpointing`): in forward passes that carry
    /// gradients, each decoder layer keeps only its input, and its activations are recomputed
    /// in the backward pass. The gradients are the same (bit for bit on the CPU). Needs a
    /// gradient sink ([`Model::set_grad_sink`]), where the recomputed layers leave their
    /// weights' gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The LM head's chunk size in logits (positions × vocabulary entries; default
    /// [`crate::fused::HEAD_CHUNK_ELEMS`]): no `[tokens, vocabulary]` tensor larger than this
    /// is formed on any path.
    pub fn set_head_chunk_elems(&mut self, elems: usize) {
        self.head_chunk = elems.max(1);
    }

    /// LoRA dropout for the training forward passes that follow (`Some(seed)`), or none
    /// (`None`, the default: evaluation). Each forward pass after this call draws its masks
    /// from `seed` and its index since the call, so equal seeds give equal masks.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        if let Ok(mut d) = self.dropout.lock() {
            *d = DropoutState { seed, passes: 0 };
        }
    }

    /// The same model with every tensor detached (the same storage, detached from the
    /// variables, adapters included): its forward passes record no autograd graph, so no
    /// activation outlives the op that reads it (PyTorch's `torch.no_grad()`). For inference:
    /// log-probs, sampling.
    pub fn detached(&self) -> Model {
        let mut m = self.clone();
        let d = |t: &mut Tensor| *t = t.detach();
        d(&mut m.embed);
        d(&mut m.norm);
        d(&mut m.lm_head);
        for blk in &mut m.layers {
            *blk = blk.detached();
        }
        m.grad_sink = None;
        m.dropout = Arc::default();
        m
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
    /// every weight (and adapter) is in dtype `dt`.
    fn layer_weights(blk: &Block, dt: DType) -> Option<crate::fused::LayerWeights> {
        let lins = blk.lins();
        let adapters_ok = lins.iter().all(|l| {
            l.lora
                .as_ref()
                .is_none_or(|ad| ad.a.dtype() == dt && ad.b.dtype() == dt)
        });
        if lins.iter().any(|l| l.b.is_some() || l.w.dtype() != dt)
            || !adapters_ok
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
            lora: lins.map(|l| l.lora.as_ref().map(LoraLin::weights)),
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

    /// The layers of one forward pass: without their adapters when those are off, and with
    /// dropout mask keys when `training` and LoRA dropout is on (a seed is set).
    fn pass_layers(&self, training: bool) -> std::borrow::Cow<'_, [Block]> {
        use std::borrow::Cow;
        let Some(set) = &self.lora else {
            return Cow::Borrowed(&self.layers);
        };
        if !self.adapters_on {
            let mut layers = self.layers.clone();
            for blk in &mut layers {
                for lin in blk.lins_mut() {
                    lin.lora = None;
                }
            }
            return Cow::Owned(layers);
        }
        let draw = (training && set.config.dropout() > 0.0)
            .then(|| {
                let mut d = self.dropout.lock().ok()?;
                let seed = d.seed?;
                let pass = d.passes;
                d.passes += 1;
                Some((seed, pass))
            })
            .flatten();
        let Some((seed, pass)) = draw else {
            return Cow::Borrowed(&self.layers);
        };
        let mut layers = self.layers.clone();
        for (li, blk) in layers.iter_mut().enumerate() {
            for (j, lin) in blk.lins_mut().into_iter().enumerate() {
                if let Some(ad) = &mut lin.lora {
                    ad.key = Some(crate::lora::dropout_key(seed, pass, li, j));
                }
            }
        }
        Cow::Owned(layers)
    }

    /// Runs the decoder on `ids: [B, l]` (u32) at positions `offset ..`, with an additive mask
    /// broadcastable to `[B, 1, l, t]` (`causal`: the mask is causal, right padding and the
    /// window at most, so flash attention may replace it), returning the final-norm hidden
    /// states `[B, l, H]`.
    fn decode(
        &self,
        ids: &Tensor,
        offset: usize,
        mask: Option<&Tensor>,
        causal: bool,
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
            Some(sink)
                if self.embed.dtype() == cd
                    && self.embed.track_op()
                    && self.use_fused(&self.embed) =>
            {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                crate::fused::embedding(&self.embed, &ids, sink)?
            }
            _ => self
                .embed
                .to_dtype(cd)?
                .index_select(&ids.flatten_all()?, 0)?, // [B*l, H]
        };
        let layers = self.pass_layers(cache.is_none());
        // A training pass: its result carries gradients (no KV cache).
        let training = cache.is_none()
            && (x.track_op()
                || layers
                    .iter()
                    .any(|blk| blk.tensors().iter().any(Tensor::track_op)));
        let checkpoint = self.checkpointing && training;
        let ctx = LayerCtx {
            b,
            l,
            heads: (nh, nkv, hd),
            eps: cfg.rms_norm_eps,
            scale,
            cd,
            acc,
            fused: self.fused,
            cos: cos.clone(),
            sin: sin.clone(),
            mask: mask.cloned(),
            causal: causal.then_some(cfg.sliding_window),
            memory_limit: self.memory_limit(),
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
                    recompute: checkpoint,
                };
                Some((sink, z, m.to_dtype(cd)?))
            }
            _ => None,
        };
        for (li, blk) in layers.iter().enumerate() {
            if let Some((sink, z, m)) = &layer_node {
                if let Some(ws) = Self::layer_weights(blk, cd) {
                    x = crate::fused::decoder_layer(&x, &ws, *z, &cos, &sin, m, scale, sink)?;
                    continue;
                }
            }
            if checkpoint {
                let sink = self.grad_sink.as_ref().ok_or_else(|| {
                    Error::InvalidArgument(
                        "gradient checkpointing needs a gradient sink (Model::set_grad_sink)"
                            .into(),
                    )
                })?;
                let (c, grad_blk, frozen) = (ctx.clone(), blk.clone(), blk.detached());
                let f: crate::recompute::LayerFn = Arc::new(move |x, grad| {
                    c.block(if grad { &grad_blk } else { &frozen }, x, None)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                });
                x = crate::recompute::checkpoint(&x, f, blk.tensors(), sink)?;
                continue;
            }
            let slot = cache.as_deref_mut().map(|c| (c, li));
            x = ctx.block(blk, &x, slot)?;
        }
        if let Some(c) = cache {
            c.len += l;
        }
        let x = self.norm(&x, &self.norm)?;
        Ok(x.reshape((b, l, cfg.hidden_size))?)
    }

    /// The additive mask of a training-style forward pass, and whether it is causal with right
    /// padding only (so flash attention computes the same for every real token).
    fn training_mask(
        &self,
        b: usize,
        l: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, bool)> {
        let acc = accumulation_dtype(self.compute_dtype);
        let causal = causal_mask(l, 0, self.config.sliding_window, acc, &self.device)?;
        Ok(match attention_mask {
            None => (causal, true),
            Some(am) => {
                if am.dims() != [b, l] {
                    return Err(Error::InvalidArgument(format!(
                        "attention mask has shape {:?}, ids have [{b}, {l}]",
                        am.dims()
                    )));
                }
                let right_padded = cfg!(feature = "flash-attn") && {
                    let rows: Vec<Vec<f32>> = am.to_dtype(DType::F32)?.to_vec2()?;
                    rows.iter()
                        .all(|r| r.windows(2).all(|w| !(w[0] == 0.0 && w[1] != 0.0)))
                };
                // 0 where attended, MASK_VALUE where padding: (1 − m)·MASK_VALUE.
                let keys =
                    ((am.to_dtype(acc)?.affine(-1.0, 1.0)?) * MASK_VALUE)?.reshape((b, 1, 1, l))?;
                (causal.broadcast_add(&keys)?, right_padded)
            }
        })
    }

    /// Logits `[B, L, V]` (accumulation dtype) for `ids: [B, L]` with an optional `[B, L]` 0/1
    /// attention mask (padding keys masked out; a causal mask is always applied).
    ///
    /// This forms the whole `[B, L, V]` tensor: for inspecting small inputs (tests). The
    /// commands and the trainer use [`Model::token_logps`] / [`Model::sequence_logps`] and
    /// [`Model::forward_last_with_cache`], whose LM head runs in chunks.
    ///
    /// # Errors
    /// Shape mismatches between `ids` and the mask; tensor errors.
    pub fn logits(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (mask, causal) = self.training_mask(b, l, attention_mask)?;
        let h = self.decode(ids, 0, Some(&mask), causal, None)?;
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
    /// elsewhere: the LM head then runs on the selected positions only (in DPO, the
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

    /// `log softmax(h Wᵀ)[t]` for hidden states `h: [N, H]` (compute dtype) and targets
    /// `t: [N]`, in the accumulation dtype: the fused CPU kernel where it applies, else the
    /// plain-candle [`crate::lm_head::token_logps`]; both form at most `head_chunk` logits at
    /// a time. With a sink, the head's own variable (no conversion) takes its gradient there.
    fn head_logps(&self, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let sink = self
            .grad_sink
            .as_ref()
            .filter(|_| self.lm_head.track_op() && self.lm_head.dtype() == h.dtype());
        if self.use_fused(h) {
            let w = match sink {
                Some(_) => self.lm_head.clone(),
                None => self.lm_head.to_dtype(h.dtype())?,
            };
            return Ok(crate::fused::lm_head_logps_chunked(
                h,
                &w,
                targets,
                sink,
                self.head_chunk,
            )?);
        }
        let sink = self.grad_sink.as_ref().filter(|_| self.lm_head.track_op());
        crate::lm_head::token_logps(h, &self.lm_head, targets, self.head_chunk, sink)
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
        let (mask, causal) = self.training_mask(b, l, attention_mask)?;
        let h = self
            .decode(ids, 0, Some(&mask), causal, None)?
            .narrow(1, 0, l - 1)?
            .contiguous()?;
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
        let lp = self.head_logps(&h, &targets)?;
        let lp = match &sel {
            Some(idx) => {
                Tensor::zeros(b * (l - 1), lp.dtype(), &self.device)?.index_add(idx, &lp, 0)?
            }
            None => lp,
        };
        Ok(lp.reshape((b, l - 1))?)
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

    /// The causal mask of `l` new positions over the cache (none for one position without a
    /// window in reach).
    fn cache_mask(&self, l: usize, offset: usize) -> Result<Option<Tensor>> {
        let needs_mask = l > 1 || self.config.sliding_window.is_some_and(|w| offset + 1 > w);
        if !needs_mask {
            return Ok(None);
        }
        Ok(Some(causal_mask(
            l,
            offset,
            self.config.sliding_window,
            accumulation_dtype(self.compute_dtype),
            &self.device,
        )?))
    }

    /// Incremental decoding: runs `ids: [B, l]` at positions `cache.len() ..`, extends the
    /// cache and returns the logits `[B, l, V]` (accumulation dtype). Records no autograd
    /// graph (the weights are read [detached](Model::detached)): the logits and the cache hold
    /// no earlier step's tensors, so memory stays linear in the cached length.
    /// For sampling, [`Model::forward_last_with_cache`] forms only the last position's
    /// logits.
    ///
    /// # Errors
    /// [`Error::TooLarge`] (see [`Model::check_forward_size`]; the cache's growth likewise);
    /// tensor errors.
    pub fn forward_with_cache(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let offset = cache.len();
        self.check_forward_size(b, l, offset)?;
        let mask = self.cache_mask(l, offset)?;
        let m = self.detached();
        let h = m.decode(ids, offset, mask.as_ref(), true, Some(cache))?;
        m.head(&h)
    }

    /// [`Model::forward_with_cache`] returning only the last position's logits `[B, V]`
    /// (accumulation dtype): what sampling needs, without a `[B, l, V]` tensor for a prompt.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward_last_with_cache(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let offset = cache.len();
        self.check_forward_size(b, l, offset)?;
        let mask = self.cache_mask(l, offset)?;
        let m = self.detached();
        let h = m
            .decode(ids, offset, mask.as_ref(), true, Some(cache))?
            .narrow(1, l - 1, 1)?
            .contiguous()?;
        Ok(m.head(&h)?.squeeze(1)?)
    }
}
