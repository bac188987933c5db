//! The forward pass: embedding, RoPE tables, the decoder layers (fused, plain or
//! checkpointed) and the final norm, with or without a KV cache.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};

use super::adapted_linear::LoraLin;
use super::block::{
    causal_mask, fusable_mask, gemma_rms_norm, rms_norm, window_band, Block, LayerCtx, MASK_VALUE,
};
use super::kv_cache::KvCache;
use super::Model;

impl Model {
    /// The layer's weights for [`crate::fused::decoder_layer`], when it has no biases and
    /// every weight (and adapter) is in dtype `dt`.
    pub(super) fn layer_weights(blk: &Block, dt: DType) -> Option<crate::fused::LayerWeights> {
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

    pub(super) fn use_fused(&self, t: &Tensor) -> bool {
        self.fused && crate::fused::enabled(t)
    }

    /// RMSNorm with this model's ε (Gemma2's `(1 + w)` form for Gemma2), fused where
    /// `use_fused` allows.
    pub(super) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.config.arch == crate::config_json::Architecture::Gemma2 {
            if self.use_fused(x) {
                let w1 = w.to_dtype(x.dtype())?.affine(1.0, 1.0)?;
                return Ok(crate::fused::rms_norm(x, &w1, eps)?);
            }
            return gemma_rms_norm(x, w, eps);
        }
        if self.use_fused(x) {
            Ok(crate::fused::rms_norm(x, &w.to_dtype(x.dtype())?, eps)?)
        } else {
            rms_norm(x, w, eps)
        }
    }

    /// RoPE `cos`, `sin` tables `[l, head_dim]` for the `l` positions `positions` (row `i`
    /// for the `i`-th), in the compute dtype.
    ///
    /// As in transformers, the inverse frequencies and the angles `position · inv_freq` are
    /// float32 numbers (at position 4096 an f32 angle is off by up to ~2e-4 rad from the
    /// exact one; matching transformers' rounding keeps long-context log-probs identical).
    pub(super) fn rope_tables(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(Tensor, Tensor)> {
        let l = positions.len();
        let inv: Vec<f32> = self
            .config
            .rope_inv_freq()
            .iter()
            .map(|&f| f as f32)
            .collect();
        let d = self.config.head_dim;
        let mut cos = Vec::with_capacity(l * d);
        let mut sin = Vec::with_capacity(l * d);
        for p in positions {
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
    pub(super) fn pass_layers(&self, training: bool) -> std::borrow::Cow<'_, [Block]> {
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

    /// Runs the decoder on `ids: [B, l]` (u32) at positions `offset ..` (or, given
    /// `positions`, the RoPE positions of the `l` tokens of each row: packed sequences), with
    /// an additive mask broadcastable to `[B, 1, l, t]` (`causal`: the mask is causal, right
    /// padding and the window at most, so flash attention may replace it), returning the
    /// final-norm hidden states `[B, l, H]`.
    pub(super) fn decode(
        &self,
        ids: &Tensor,
        offset: usize,
        positions: Option<&[usize]>,
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
        let (cos, sin) = match positions {
            Some(p) if p.len() != l => {
                return Err(Error::InvalidArgument(format!(
                    "{} positions for {l} tokens per row",
                    p.len()
                )))
            }
            Some(p) => self.rope_tables(p.iter().copied())?,
            None => self.rope_tables(offset..offset + l)?,
        };
        let scale = cfg.attention_scale();
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
        if cfg.arch == crate::config_json::Architecture::Gemma2 {
            // √hidden_size rounded to the compute dtype, as transformers' scaled embedding.
            let normalizer = Tensor::new((cfg.hidden_size as f64).sqrt(), &self.device)?
                .to_dtype(cd)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            x = x.affine(normalizer, 0.0)?;
        }
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
            causal: causal.then_some(self.base_window()),
            memory_limit: self.memory_limit(),
            gemma: cfg.arch == crate::config_json::Architecture::Gemma2,
            attn_softcap: cfg.attn_logit_softcapping,
        };
        // Layers whose window differs from the base mask's: the mask with the window's band.
        let windowed = |w: usize| -> Result<LayerCtx> {
            let band = window_band(l, offset, w, acc, &self.device)?;
            let mut c = ctx.clone();
            c.mask = Some(match mask {
                Some(m) => m.broadcast_add(&band)?,
                None => band,
            });
            c.causal = causal.then_some(Some(w));
            Ok(c)
        };
        let window_ctx = match cfg.sliding_window {
            Some(w) if cfg.per_layer_windows() => Some(windowed(w)?),
            _ => None,
        };
        let fz = self.use_fused(&x);
        // Whole-layer nodes: sizes and mask, the same for every layer.
        let layer_node = match (sink, mask) {
            (Some(sink), Some(m))
                if fz && acc == cd && cfg.plain_layers() && fusable_mask(m, b, l, l) =>
            {
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
            let ctx = match &window_ctx {
                Some(c) if cfg.layer_window(li).is_some() => c,
                _ => &ctx,
            };
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

    /// The window of the base mask: every layer's when they share one (Mistral), else none
    /// (the layers with a window add its band, see `decode`).
    pub(super) fn base_window(&self) -> Option<usize> {
        let cfg = &self.config;
        if cfg.per_layer_windows() {
            None
        } else {
            cfg.layer_window(0)
        }
    }

    /// The additive mask of a training-style forward pass, and whether it is causal with right
    /// padding only (so flash attention computes the same for every real token).
    pub(super) fn training_mask(
        &self,
        b: usize,
        l: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, bool)> {
        let acc = accumulation_dtype(self.compute_dtype);
        let causal = causal_mask(l, 0, self.base_window(), acc, &self.device)?;
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

    /// The causal mask of `l` new positions over the cache (none for one position without a
    /// window in reach).
    pub(super) fn cache_mask(&self, l: usize, offset: usize) -> Result<Option<Tensor>> {
        let needs_mask = l > 1 || self.base_window().is_some_and(|w| offset + 1 > w);
        if !needs_mask {
            return Ok(None);
        }
        Ok(Some(causal_mask(
            l,
            offset,
            self.base_window(),
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
        let h = m.decode(ids, offset, None, mask.as_ref(), true, Some(cache))?;
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
            .decode(ids, offset, None, mask.as_ref(), true, Some(cache))?
            .narrow(1, l - 1, 1)?
            .contiguous()?;
        Ok(m.head(&h)?.squeeze(1)?)
    }
}
