//! One decoder layer on the plain candle path (pre-norm attention with RoPE and a causal
//! mask, then the gated MLP; Qwen3's per-head q/k norms, Gemma2's soft-capped scores, output
//! norms and GeGLU), and the ops it is built from: RMSNorm, rotate-half RoPE, the causal mask.
//! The fused CPU path runs [`crate::fused::decoder_layer`] instead (for the architectures
//! without those features).

use candle_core::{DType, Device, Tensor, D};

use crate::dtype::accumulation_dtype;
use crate::error::Result;

use super::adapted_linear::Lin;
use super::kv_cache::KvCache;

/// Additive mask value for a forbidden attention entry (finite so that a fully masked row
/// stays finite instead of becoming NaN).
pub const MASK_VALUE: f64 = -1e9;

#[derive(Debug, Clone)]
pub(super) struct Block {
    /// The attention's input norm (`input_layernorm`).
    pub(super) ln1: Tensor,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma2's `pre_feedforward_layernorm`).
    pub(super) ln2: Tensor,
    /// Qwen3's per-head norms of the queries and keys (`self_attn.q_norm`, `k_norm`).
    pub(super) qk_norm: Option<(Tensor, Tensor)>,
    /// Gemma2's norms of the attention's and the MLP's outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    pub(super) out_norms: Option<(Tensor, Tensor)>,
    pub(super) q: Lin,
    pub(super) k: Lin,
    pub(super) v: Lin,
    pub(super) o: Lin,
    pub(super) gate: Lin,
    pub(super) up: Lin,
    pub(super) down: Lin,
}

impl Block {
    /// The seven projections in [`crate::lora::PROJECTIONS`]' order.
    pub(super) fn lins(&self) -> [&Lin; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    pub(super) fn lins_mut(&mut self) -> [&mut Lin; 7] {
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
    pub(super) fn detached(&self) -> Block {
        let mut blk = self.clone();
        blk.ln1 = blk.ln1.detach();
        blk.ln2 = blk.ln2.detach();
        let pair = |p: &(Tensor, Tensor)| (p.0.detach(), p.1.detach());
        blk.qk_norm = blk.qk_norm.as_ref().map(pair);
        blk.out_norms = blk.out_norms.as_ref().map(pair);
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
    pub(super) fn tensors(&self) -> Vec<Tensor> {
        let mut v = vec![self.ln1.clone(), self.ln2.clone()];
        for (a, b) in self.qk_norm.iter().chain(&self.out_norms) {
            v.push(a.clone());
            v.push(b.clone());
        }
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

/// Gemma's RMSNorm, differentiable.
///
/// # Formula
/// `y = x / sqrt(mean(x²) + ε) ⊙ (1 + w)`, the mean over the last dimension, computed in the
/// accumulation dtype and cast back after the multiplication (as transformers' `Gemma2RMSNorm`).
pub fn gemma_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let acc = accumulation_dtype(dtype);
    let xa = x.to_dtype(acc)?;
    let ms = xa.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xa.broadcast_div(&(ms + eps)?.sqrt()?)?;
    let scale = w.to_dtype(acc)?.affine(1.0, 1.0)?;
    Ok(normed.broadcast_mul(&scale)?.to_dtype(dtype)?)
}

/// The tanh approximation of GELU (`gelu_pytorch_tanh`), from differentiable ops.
///
/// # Formula
/// `gelu(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x.sqr()? * x)?.affine(0.044715, 0.0)? + x)?.affine(k, 0.0)?;
    Ok((x.affine(0.5, 0.0)? * inner.tanh()?.affine(1.0, 1.0)?)?)
}

/// Soft-capping, differentiable.
///
/// # Formula
/// `softcap(s) = c · tanh(s / c)`.
pub fn softcap(s: &Tensor, c: f64) -> Result<Tensor> {
    Ok(s.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?)
}

/// An additive mask `[1, 1, l, t]` forbidding, for `l` queries at positions
/// `offset .. offset + l`, the keys `j` with `i − j ≥ w` (what a window adds to a causal mask).
pub fn window_band(
    l: usize,
    offset: usize,
    w: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    additive_mask(l, offset, dtype, device, |qi, j| j <= qi && qi - j >= w)
}

/// An additive mask `[1, 1, l, t]` over `t = offset + l` keys for `l` queries at absolute
/// positions `offset .. offset + l`: [`MASK_VALUE`] where `masked(query, key)`, 0 elsewhere.
fn additive_mask(
    l: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
    masked: impl Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let t = offset + l;
    let mut m = vec![0f32; l * t];
    for i in 0..l {
        for j in 0..t {
            if masked(offset + i, j) {
                m[i * t + j] = MASK_VALUE as f32;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, l, t), device)?.to_dtype(dtype)?)
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
    additive_mask(l, offset, dtype, device, |qi, j| {
        !(j <= qi && window.is_none_or(|w| qi - j < w))
    })
}

/// The additive mask `[1, 1, T, T]` of sequences packed into one row
/// ([`crate::batch::Packed`]): block-diagonal causal, a query at packed index `i` of the
/// sequence starting at `s` sees key `j` iff `s ≤ j ≤ i` (and `i − j < w` with a window `w`).
pub fn packed_causal_mask(
    lengths: &[usize],
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t: usize = lengths.iter().sum();
    let mut m = vec![MASK_VALUE as f32; t * t];
    let mut start = 0;
    for &len in lengths {
        for i in start..start + len {
            let lo = window.map_or(start, |w| start.max((i + 1).saturating_sub(w)));
            m[i * t + lo..=i * t + i].fill(0.0);
        }
        start += len;
    }
    Ok(Tensor::from_vec(m, (1, 1, t, t), device)?.to_dtype(dtype)?)
}

/// Whether an additive mask has the `[B or 1, 1, l, t]` shape the fused softmax takes.
pub(super) fn fusable_mask(m: &Tensor, b: usize, l: usize, t: usize) -> bool {
    matches!(m.dims(), &[mb, 1, ml, mt] if (mb == 1 || mb == b) && ml == l && mt == t)
}

/// What one decoder layer's forward pass needs besides its weights, owned (a checkpointed
/// layer runs it again in the backward pass).
#[derive(Clone)]
pub(super) struct LayerCtx {
    pub(super) b: usize,
    pub(super) l: usize,
    /// Query heads, key/value heads, head dimension.
    pub(super) heads: (usize, usize, usize),
    pub(super) eps: f64,
    pub(super) scale: f64,
    pub(super) cd: DType,
    pub(super) acc: DType,
    pub(super) fused: bool,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) mask: Option<Tensor>,
    /// `Some(window)` when the mask is causal (with right padding and `window` at most).
    pub(super) causal: Option<Option<usize>>,
    /// The KV cache's memory ceiling ([`Model::memory_limit`]).
    pub(super) memory_limit: Option<u128>,
    /// Gemma2's `(1 + w)` norms ([`gemma_rms_norm`]) and GeGLU ([`gelu_tanh`]) instead of
    /// RMSNorm and SwiGLU.
    pub(super) gemma: bool,
    /// Soft-capping of the attention scores ([`softcap`]).
    pub(super) attn_softcap: Option<f64>,
}

impl LayerCtx {
    pub(super) fn use_fused(&self, t: &Tensor) -> bool {
        self.fused && crate::fused::enabled(t)
    }

    pub(super) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.gemma {
            if self.use_fused(x) {
                // The fused RMSNorm with the weight 1 + w (the same numbers in f32/f64).
                let w1 = w.to_dtype(x.dtype())?.affine(1.0, 1.0)?;
                return Ok(crate::fused::rms_norm(x, &w1, self.eps)?);
            }
            return gemma_rms_norm(x, w, self.eps);
        }
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
    pub(super) fn block(
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
        let (q, k, v) = if cache.is_none() && self.use_fused(&h) && blk.qk_norm.is_none() {
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
            // Qwen3: each head normed before RoPE.
            let (q, k) = match &blk.qk_norm {
                Some((qn, kn)) => (self.norm(&q, qn)?, self.norm(&k, kn)?),
                None => (q, k),
            };
            let q = apply_rope(&q, cos, sin)?;
            let mut k = apply_rope(&k, cos, sin)?;
            let mut v = v;
            if let Some((c, li)) = cache {
                (k, v) = c.append(li, &k, &v, self.memory_limit)?;
                let t = k.dim(2)?;
                let fits = self.mask.as_ref().is_none_or(|m| fusable_mask(m, b, l, t));
                if acc == cd && fits && self.use_fused(&q) && !q.track_op() {
                    // The cache's buffers read in place, the heads unrepeated.
                    let (kb, vb) = c.buffers(li)?;
                    let att = crate::fused::cached_attention(
                        &q,
                        &kb,
                        &vb,
                        t,
                        scale,
                        self.attn_softcap,
                        self.mask.as_ref(),
                    )?;
                    return self.finish(blk, x, &att);
                }
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
            Some(m)
                if acc == cd
                    && self.attn_softcap.is_none()
                    && self.use_fused(&q)
                    && fusable_mask(m, b, l, t) =>
            {
                crate::fused::attention(&q, &k, &v, &m.to_dtype(cd)?, scale)?
            }
            _ => match self.flash(&q, unexpanded.as_ref())? {
                Some(o) => o,
                None => {
                    let raw = q.matmul(&k.t()?)?; // [B, nh, l, t]
                    let scores = (raw * scale)?.to_dtype(acc)?;
                    let scores = match self.attn_softcap {
                        Some(c) => softcap(&scores, c)?,
                        None => scores,
                    };
                    let scores = match mask {
                        Some(m) => scores.broadcast_add(m)?,
                        None => scores,
                    };
                    let p = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(cd)?;
                    p.matmul(&v)?.transpose(1, 2)?.reshape((b * l, nh * hd))?
                }
            },
        };
        self.finish(blk, x, &att)
    }

    /// The rest of a decoder layer after the attention core `att: [B·l, heads·d]`: the output
    /// projection and residual (Gemma2: its norm), then the MLP with its residual.
    fn finish(&self, blk: &Block, x: &Tensor, att: &Tensor) -> Result<Tensor> {
        let fz = self.use_fused(x);
        let x = match &blk.out_norms {
            Some((post_attn, _)) => (x + self.norm(&blk.o.apply(fz, att)?, post_attn)?)?,
            None => blk.o.apply_add(fz, att, x)?,
        };
        let h = self.norm(&x, &blk.ln2)?;
        if self.gemma {
            let m = (gelu_tanh(&blk.gate.apply(fz, &h)?)? * blk.up.apply(fz, &h)?)?;
            let y = blk.down.apply(fz, &m)?;
            return match &blk.out_norms {
                Some((_, post_ff)) => Ok((x + self.norm(&y, post_ff)?)?),
                None => Ok((x + y)?),
            };
        }
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
    pub(super) fn flash(
        &self,
        q: &Tensor,
        kv: Option<&(Tensor, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let (Some((k, v)), Some(window)) = (kv, self.causal) else {
            return Ok(None);
        };
        let applies = q.device().is_cuda()
            && self.attn_softcap.is_none()
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
    pub(super) fn flash(
        &self,
        _q: &Tensor,
        _kv: Option<&(Tensor, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let _ = self.causal;
        Ok(None)
    }
}
