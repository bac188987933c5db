//! One whole decoder layer (pre-norm attention and gated MLP, both with residuals) as one
//! autograd node, for training on the CPU.
//!
//! candle's backward pass gives every edge of the graph a zero buffer and an accumulation
//! (`or_insert` + `add`), single-threaded, whatever the op: with the layer built from the
//! separate fused kernels of [`super`] that is ~20 activation-sized buffers per layer and step
//! (a tenth of a DPO step on 2 cores). As one node the layer has one edge, its input. candle
//! carries gradients only for a custom op's inputs (three at most), so the node computes its
//! nine weights' gradients in its backward pass and leaves them in a [`GradSink`], which the
//! caller adds to the pass's [`GradStore`] ([`GradSink::drain_into`]).
//!
//! The arithmetic is the separate kernels' own (each step calls the same slice function), so
//! values and gradients equal the unfused-graph ones to rounding (`tests/fused_ops.rs`).

//!
//! Public op: [`decoder_layer`] (with [`LayerWeights`], [`LoraWeights`], [`LayerDims`]).

use std::sync::Mutex;

use candle_core::{bail, Result, Shape, Tensor, WithDType};

use super::attention::{AttDims, Attention, AttentionBwd};
use super::dispatch::{apply, Ins, Kernel, Op, Reads};
use super::gemm::{gemm_add, gemm_vec};
use super::heads::Heads;
use super::linear::{add_input_grad, input_grad, weight_grad, Linear, LinearAdd};
use super::mlp::{gate_up_proj, SiluMul, SiluMulBwd};
use super::norm::{norm_grad, RmsNorm};
use super::real::Real;
use super::sink::GradSink;
use super::softmax::Geo;

/// One layer's weights in Hugging Face's layout: norms `[H]`, projections `[out, in]`, no
/// biases.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `input_layernorm.weight`.
    pub ln1: Tensor,
    /// `self_attn.q_proj.weight`, `[heads·d, H]`.
    pub q: Tensor,
    /// `self_attn.k_proj.weight`, `[kv_heads·d, H]`.
    pub k: Tensor,
    /// `self_attn.v_proj.weight`, `[kv_heads·d, H]`.
    pub v: Tensor,
    /// `self_attn.o_proj.weight`, `[H, heads·d]`.
    pub o: Tensor,
    /// `post_attention_layernorm.weight`.
    pub ln2: Tensor,
    /// `mlp.gate_proj.weight`, `[I, H]`.
    pub gate: Tensor,
    /// `mlp.up_proj.weight`, `[I, H]`.
    pub up: Tensor,
    /// `mlp.down_proj.weight`, `[H, I]`.
    pub down: Tensor,
    /// LoRA adapters on the seven projections, in the order q, k, v, o, gate, up, down.
    pub lora: [Option<LoraWeights>; 7],
}

/// A LoRA adapter on one projection `y = x wᵀ`: `y += scale · (drop(x) aᵀ) bᵀ` with `a: [r, in]`,
/// `b: [out, r]` (PEFT's `lora_A`, `lora_B`), where `drop` multiplies by the mask of
/// [`crate::lora::dropout_scale`] for `dropout = Some((p, key))`.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Tensor,
    /// `lora_alpha / r` (or `/ √r` for rsLoRA).
    pub scale: f64,
    /// Dropout probability and mask key, when this forward pass drops.
    pub dropout: Option<(f64, u64)>,
}

impl LayerWeights {
    fn all(&self) -> [&Tensor; 9] {
        [
            &self.ln1, &self.q, &self.k, &self.v, &self.o, &self.ln2, &self.gate, &self.up,
            &self.down,
        ]
    }

    /// Every tensor that can carry a gradient: the nine weights, then the adapters' `a`, `b`.
    fn params(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.all().to_vec();
        for ad in self.lora.iter().flatten() {
            v.push(&ad.a);
            v.push(&ad.b);
        }
        v
    }
}

/// One adapter's data: `a`, `b`, the scale and the input mask (if dropping).
struct LoraSlices<'a, T> {
    a: &'a [T],
    b: &'a [T],
    r: usize,
    scale: T,
    mask: Option<Vec<T>>,
}

impl<T: Real> LoraSlices<'_, T> {
    /// `drop(x)` (`x` itself without dropout).
    fn dropped<'x>(&self, x: &'x [T]) -> std::borrow::Cow<'x, [T]> {
        match &self.mask {
            Some(m) => std::borrow::Cow::Owned(x.iter().zip(m).map(|(&a, &b)| a * b).collect()),
            None => std::borrow::Cow::Borrowed(x),
        }
    }

    /// `y += scale · (drop(x) aᵀ) bᵀ` for `x: [n, d_in]`, `y: [n, d_out]`.
    fn fwd(&self, x: &[T], y: &mut [T], n: usize, d_in: usize, d_out: usize) {
        let xd = self.dropped(x);
        let r = self.r;
        let mut u = gemm_vec((n, r, d_in), &xd, (1, d_in), self.a, (d_in, 1));
        for e in u.iter_mut() {
            *e *= self.scale;
        }
        gemm_add((n, d_out, r), y, &u, (1, r), self.b, (r, 1));
    }

    /// From `g = ∂/∂y`: `dx += drop((scale · g b) a)`; returns `(∂a, ∂b)` with
    /// `∂b = scale · gᵀ u`, `∂a = (scale · g b)ᵀ drop(x)`, `u = drop(x) aᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        x: &[T],
        g: &[T],
        dx: &mut [T],
        n: usize,
        d_in: usize,
        d_out: usize,
    ) -> (Vec<T>, Vec<T>) {
        let r = self.r;
        let xd = self.dropped(x);
        let mut u = gemm_vec((n, r, d_in), &xd, (1, d_in), self.a, (d_in, 1));
        for e in u.iter_mut() {
            *e *= self.scale;
        }
        let db = weight_grad(g, &u, n, d_out, r);
        drop(u);
        let mut du = input_grad(g, self.b, n, d_out, r);
        for e in du.iter_mut() {
            *e *= self.scale;
        }
        let da = weight_grad(&du, &xd, n, r, d_in);
        match &self.mask {
            Some(m) => {
                let mut dxd = input_grad(&du, self.a, n, r, d_in);
                for ((d, &e), &k) in dx.iter_mut().zip(&dxd).zip(m) {
                    *d += e * k;
                }
                dxd.clear();
            }
            None => add_input_grad(dx, &du, self.a, n, r, d_in),
        }
        (da, db)
    }
}

/// Sizes of a layer's input: `b` sequences of `l` positions; heads, key/value heads, head
/// dimension; RMSNorm's ε.
#[derive(Clone, Copy, Debug)]
pub struct LayerDims {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub l: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head dimension (even).
    pub head_dim: usize,
    /// RMSNorm's ε.
    pub eps: f64,
    /// Gradient checkpointing: keep only the MLP's inputs `h2 w_gateᵀ` and `h2 w_upᵀ` (the
    /// layer's input is kept by the graph), recompute the attention half and the element-wise
    /// rest in the backward pass (same arithmetic: gradients are bit-identical).
    pub recompute: bool,
}

/// What a forward pass keeps for the backward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Every activation backward reads ([`Kept`]).
    All,
    /// The gated MLP's two inputs only (gradient checkpointing): backward recomputes the
    /// attention half (its products are 30–40 % of the layer's) and the norms and SiLU, not
    /// the gate and up projections (half of the layer's products).
    MlpInputs,
}

/// What a forward pass kept.
enum Stash {
    All(Kept),
    MlpInputs { a: Tensor, up: Tensor },
}

/// What the forward pass keeps for the backward pass (each a flat CPU tensor of the layer's
/// dtype): the first norm's output, the split heads, the attention probabilities and output,
/// the residual stream after attention, the second norm's output, the two MLP projections and
/// their gated product.
struct Kept {
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Option<Tensor>,
    att: Tensor,
    x2: Tensor,
    h2: Tensor,
    a: Tensor,
    up: Tensor,
    m: Tensor,
}

/// The layer node (see [`decoder_layer`]).
struct Layer {
    w: LayerWeights,
    z: LayerDims,
    cos: Tensor,
    sin: Tensor,
    att: Attention,
    sink: GradSink,
    kept: Mutex<Option<Stash>>,
}

fn flat<T: WithDType>(v: Vec<T>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, &candle_core::Device::Cpu)
}

/// Indices of the projections in [`LayerWeights::lora`] (and, plus one, in
/// [`LayerWeights::all`]).
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

impl Layer {
    fn hidden(&self) -> usize {
        self.w.ln1.elem_count()
    }

    fn inter(&self) -> usize {
        self.w.gate.dim(0).unwrap_or(0)
    }

    fn heads(&self, h_in: usize, rope: bool) -> Heads {
        let z = self.z;
        Heads {
            b: z.b,
            l: z.l,
            h_in,
            h_out: z.heads,
            d: z.head_dim,
            rope,
        }
    }

    /// The nine weights (in [`LayerWeights::all`]'s order), then the RoPE tables at 9, 10,
    /// then each present adapter's `a`, `b` (in projection order).
    fn reads(&self) -> Reads<'_> {
        let [ln1, wq, wk, wv, wo, ln2, wg, wu, wd] = self.w.all();
        let mut ts = vec![ln1, wq, wk, wv, wo, ln2, wg, wu, wd, &self.cos, &self.sin];
        for ad in self.w.lora.iter().flatten() {
            ts.push(&ad.a);
            ts.push(&ad.b);
        }
        Reads::of(&ts)
    }

    /// The adapters' data from [`Layer::reads`], masks built for `n` rows.
    fn adapters<'r, T: Real>(
        &self,
        r: &'r Reads,
        n: usize,
    ) -> Result<[Option<LoraSlices<'r, T>>; 7]> {
        let mut out: [Option<LoraSlices<'r, T>>; 7] = Default::default();
        let mut j = 11;
        for (slot, ad) in out.iter_mut().zip(&self.w.lora) {
            if let Some(ad) = ad {
                let (r_, d_in) = ad.a.dims2()?;
                let mask = ad.dropout.map(|(p, key)| {
                    let keep = T::from_f64(crate::lora::dropout_scale(p));
                    (0..n * d_in)
                        .map(|i| {
                            if crate::lora::dropout_keeps(key, i as u64, p) {
                                keep
                            } else {
                                T::zero()
                            }
                        })
                        .collect()
                });
                *slot = Some(LoraSlices {
                    a: r.get::<T>(j)?,
                    b: r.get::<T>(j + 1)?,
                    r: r_,
                    scale: T::from_f64(ad.scale),
                    mask,
                });
                j += 2;
            }
        }
        Ok(out)
    }

    /// Rows `B·l`, hidden width, MLP width, query and key/value projection widths.
    fn sizes(&self) -> [usize; 5] {
        let z = self.z;
        let (n, hs, i) = (z.b * z.l, self.hidden(), self.inter());
        [n, hs, i, z.heads * z.head_dim, z.kv_heads * z.head_dim]
    }

    /// The attention core's sizes: `l` queries and keys per sequence, under the layer's mask.
    fn att_dims(&self) -> Result<AttDims> {
        let z = self.z;
        let geo = Geo::of(
            &Shape::from((z.b, z.heads, z.l, z.l)),
            self.att.mask.shape(),
        )?;
        Ok(AttDims { geo, d: z.head_dim })
    }

    /// `x3 = x2 + (silu(h2 w_gateᵀ) ⊙ h2 w_upᵀ) w_downᵀ`, `h2 = norm₂(x2)`,
    /// `x2 = x + attention(split(norm₁(x) w_{q,k,v}ᵀ)) w_oᵀ` (each projection plus its adapter,
    /// if any); returns `x3` and what `keep` asks for. Without `out` (the recomputation of
    /// gradient checkpointing, which needs only what backward reads) `x3` is not formed: the
    /// down projection is skipped; with `mlp_in` (the MLP's inputs kept by that forward pass)
    /// the gate and up projections are.
    fn fwd<T: Real>(
        &self,
        x: &[T],
        keep: Keep,
        out: bool,
        mlp_in: Option<(&[T], &[T])>,
    ) -> Result<(Vec<T>, Option<Stash>)> {
        let (z, [n, hs, i, dq, dkv]) = (self.z, self.sizes());
        let r = self.reads();
        let s = |j| r.get::<T>(j);
        let ads = self.adapters::<T>(&r, n)?;
        let (cos, sin) = (s(9)?, s(10)?);
        let norm = RmsNorm { eps: z.eps };
        let proj = |xin: &[T], j: usize, d_in: usize, d_out: usize| -> Result<Vec<T>> {
            let mut y = Linear::fwd(xin, s(j + 1)?, n, d_in, d_out);
            if let Some(ad) = &ads[j] {
                ad.fwd(xin, &mut y, n, d_in, d_out);
            }
            Ok(y)
        };
        let h1 = norm.fwd(x, s(0)?);
        let q = self
            .heads(z.heads, true)
            .fwd(&proj(&h1, Q, hs, dq)?, cos, sin);
        let k = self
            .heads(z.kv_heads, true)
            .fwd(&proj(&h1, K, hs, dkv)?, cos, sin);
        let v = self
            .heads(z.kv_heads, false)
            .fwd(&proj(&h1, V, hs, dkv)?, cos, sin);
        let att_op = Attention {
            mask: self.att.mask.clone(),
            scale: self.att.scale,
            probs: Mutex::new(None),
            keep: keep == Keep::All,
        };
        let att = att_op.fwd(&q, &k, &v, self.att_dims()?)?;
        let probs = att_op.probs.lock().ok().and_then(|mut p| p.take());
        let mut x2 = LinearAdd::fwd(&att, s(4)?, x, n, dq, hs);
        if let Some(ad) = &ads[O] {
            ad.fwd(&att, &mut x2, n, dq, hs);
        }
        let h2 = norm.fwd(&x2, s(5)?);
        let (a, up) = match mlp_in {
            Some((a, up)) => (a.to_vec(), up.to_vec()),
            None => {
                let [mut a, mut up] = gate_up_proj(&h2, s(6)?, s(7)?, n, hs, i);
                if let Some(ad) = &ads[GATE] {
                    ad.fwd(&h2, &mut a, n, hs, i);
                }
                if let Some(ad) = &ads[UP] {
                    ad.fwd(&h2, &mut up, n, hs, i);
                }
                (a, up)
            }
        };
        let m = SiluMul::fwd(&a, &up);
        let mut x3 = Vec::new();
        if out {
            x3 = LinearAdd::fwd(&m, s(8)?, &x2, n, i, hs);
            if let Some(ad) = &ads[DOWN] {
                ad.fwd(&m, &mut x3, n, i, hs);
            }
        }
        match keep {
            Keep::MlpInputs => {
                let stash = Stash::MlpInputs {
                    a: flat(a)?,
                    up: flat(up)?,
                };
                return Ok((x3, Some(stash)));
            }
            Keep::All => {}
        }
        let kept = Kept {
            h1: flat(h1)?,
            q: flat(q)?,
            k: flat(k)?,
            v: flat(v)?,
            probs,
            att: flat(att)?,
            x2: flat(x2)?,
            h2: flat(h2)?,
            a: flat(a)?,
            up: flat(up)?,
            m: flat(m)?,
        };
        Ok((x3, Some(Stash::All(kept))))
    }

    /// `∂/∂x` from `g = ∂/∂x3`; the gradients of the weights and adapters that carry one go to
    /// the sink.
    fn bwd<T: Real>(&self, x: &[T], g3: &[T], kept: &Kept) -> Result<Vec<T>> {
        let (z, [n, hs, i, dq, dkv]) = (self.z, self.sizes());
        let r = self.reads();
        let s = |j| r.get::<T>(j);
        let ads = self.adapters::<T>(&r, n)?;
        let (cos, sin) = (s(9)?, s(10)?);
        let kr = Reads::of(&[
            &kept.h1, &kept.q, &kept.k, &kept.v, &kept.att, &kept.x2, &kept.h2, &kept.a, &kept.up,
            &kept.m,
        ]);
        let k = |j| kr.get::<T>(j);
        let ws = self.w.all();
        // A frozen weight (no gradient wanted) gets none computed.
        let need: Vec<bool> = ws.iter().map(|w| w.track_op()).collect();
        let mut grads: Vec<(usize, Vec<T>)> = Vec::with_capacity(9);
        let mut lora_grads: Vec<(usize, Vec<T>, Vec<T>)> = Vec::new();

        // x3 = x2 + m w_downᵀ (+ adapter)
        if need[8] {
            grads.push((8, weight_grad(g3, k(9)?, n, hs, i)));
        }
        let mut dm = input_grad(g3, s(8)?, n, hs, i);
        if let Some(ad) = &ads[DOWN] {
            let (da, db) = ad.bwd(k(9)?, g3, &mut dm, n, i, hs);
            lora_grads.push((DOWN, da, db));
        }
        // m = silu(a) ⊙ up, (a, up) = h2 (w_gate, w_up)ᵀ (+ adapters)
        let gab = SiluMulBwd::bwd(k(7)?, k(8)?, &dm);
        drop(dm);
        let (ga, gu) = gab.split_at(n * i);
        let h2 = k(6)?;
        for (j, gj) in [(6, ga), (7, gu)] {
            if need[j] {
                grads.push((j, weight_grad(gj, h2, n, i, hs)));
            }
        }
        let mut dh2 = input_grad(ga, s(6)?, n, i, hs);
        add_input_grad(&mut dh2, gu, s(7)?, n, i, hs);
        if let Some(ad) = &ads[GATE] {
            let (da, db) = ad.bwd(h2, ga, &mut dh2, n, hs, i);
            lora_grads.push((GATE, da, db));
        }
        if let Some(ad) = &ads[UP] {
            let (da, db) = ad.bwd(h2, gu, &mut dh2, n, hs, i);
            lora_grads.push((UP, da, db));
        }
        drop(gab);
        // h2 = norm₂(x2); the residual adds ∂/∂x3
        let (dx2, dln2) = norm_grad(z.eps, k(5)?, s(5)?, &dh2, g3);
        drop(dh2);
        if need[5] {
            grads.push((5, dln2));
        }
        // x2 = x + att w_oᵀ (+ adapter)
        let att = k(4)?;
        if need[4] {
            grads.push((4, weight_grad(&dx2, att, n, hs, dq)));
        }
        let mut datt = input_grad(&dx2, s(4)?, n, hs, dq);
        if let Some(ad) = &ads[O] {
            let (da, db) = ad.bwd(att, &dx2, &mut datt, n, dq, hs);
            lora_grads.push((O, da, db));
        }
        // attention core
        let ab = AttentionBwd {
            mask: self.att.mask.clone(),
            scale: self.att.scale,
            probs: kept.probs.clone(),
            grad: Tensor::from_vec(datt, (n, dq), &candle_core::Device::Cpu)?,
        };
        let dqkv = ab.bwd(k(1)?, k(2)?, k(3)?, self.att_dims()?)?;
        drop(ab);
        let (gq, rest) = dqkv.split_at(z.b * z.heads * z.l * z.head_dim);
        let (gk, gv) = rest.split_at(rest.len() / 2);
        let dqp = self.heads(z.heads, true).bwd(gq, cos, sin);
        let dkp = self.heads(z.kv_heads, true).bwd(gk, cos, sin);
        let dvp = self.heads(z.kv_heads, false).bwd(gv, cos, sin);
        drop(dqkv);
        let h1 = k(0)?;
        for (j, dp, d_out) in [(1, &dqp, dq), (2, &dkp, dkv), (3, &dvp, dkv)] {
            if need[j] {
                grads.push((j, weight_grad(dp, h1, n, d_out, hs)));
            }
        }
        let mut dh1 = input_grad(&dqp, s(1)?, n, dq, hs);
        add_input_grad(&mut dh1, &dkp, s(2)?, n, dkv, hs);
        add_input_grad(&mut dh1, &dvp, s(3)?, n, dkv, hs);
        for (j, dp, d_out) in [(Q, &dqp, dq), (K, &dkp, dkv), (V, &dvp, dkv)] {
            if let Some(ad) = &ads[j] {
                let (da, db) = ad.bwd(h1, dp, &mut dh1, n, hs, d_out);
                lora_grads.push((j, da, db));
            }
        }
        // h1 = norm₁(x); the residual adds ∂/∂x2
        let (dx, dln1) = norm_grad(z.eps, x, s(0)?, &dh1, &dx2);
        if need[0] {
            grads.push((0, dln1));
        }
        for (j, gw) in grads {
            let t = Tensor::from_vec(gw, ws[j].shape(), &candle_core::Device::Cpu)?;
            self.sink.push(ws[j], t)?;
        }
        for (j, da, db) in lora_grads {
            if let Some(ad) = &self.w.lora[j] {
                for (p, g) in [(&ad.a, da), (&ad.b, db)] {
                    if p.track_op() {
                        let t = Tensor::from_vec(g, p.shape(), &candle_core::Device::Cpu)?;
                        self.sink.push(p, t)?;
                    }
                }
            }
        }
        Ok(dx)
    }

    /// [`Layer::bwd`]; what the forward pass did not keep (gradient checkpointing, or a second
    /// backward pass through the same graph) is recomputed first.
    fn bwd_with<T: Real>(&self, xs: &[T], g3: &[T], stash: Option<Stash>) -> Result<Vec<T>> {
        let recompute = |mlp_in: Option<(&[T], &[T])>| -> Result<Kept> {
            let _p = crate::profile::region("decoder layer recompute");
            match self.fwd(xs, Keep::All, false, mlp_in)?.1 {
                Some(Stash::All(k)) => Ok(k),
                _ => Err(candle_core::Error::Msg(
                    "decoder layer: nothing kept".into(),
                )),
            }
        };
        let kept = match stash {
            Some(Stash::All(k)) => k,
            Some(Stash::MlpInputs { a, up }) => {
                let r = Reads::of(&[&a, &up]);
                recompute(Some((r.get::<T>(0)?, r.get::<T>(1)?)))?
            }
            None => recompute(None)?,
        };
        self.bwd(xs, g3, &kept)
    }

    fn check(&self, x: &Shape) -> Result<()> {
        let z = self.z;
        let hs = self.hidden();
        if x.dims() != [z.b * z.l, hs] {
            bail!(
                "decoder layer: input {x:?} for {} × {} positions of width {hs}",
                z.b,
                z.l
            );
        }
        Ok(())
    }
}

impl Kernel for Layer {
    const NAME: &'static str = "fused-decoder-layer";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        self.check(ins.shape(0))?;
        let _p = crate::profile::region("decoder layer forward");
        let keep = if self.z.recompute {
            Keep::MlpInputs
        } else {
            Keep::All
        };
        let (y, kept) = self.fwd(ins.get(0)?, keep, true, None)?;
        if let Ok(mut slot) = self.kept.lock() {
            *slot = kept;
        }
        Ok((y, ins.shape(0).clone()))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = args[0];
        let op = LayerBwd {
            layer: self,
            kept: Mutex::new(self.kept.lock().ok().and_then(|mut k| k.take())),
        };
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &Op(op))?;
        Ok(vec![Some(dx.reshape(x.shape())?)])
    }
}

/// The layer's backward pass on `[x, ∂/∂x3]` → `∂/∂x` (see [`Layer::bwd_with`]), with what
/// its forward pass kept.
struct LayerBwd<'a> {
    layer: &'a Layer,
    kept: Mutex<Option<Stash>>,
}

impl Kernel for LayerBwd<'_> {
    const NAME: &'static str = "fused-decoder-layer-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let kept = self.kept.lock().ok().and_then(|mut k| k.take());
        let _p = crate::profile::region("decoder layer backward");
        let dx = self.layer.bwd_with(ins.get(0)?, ins.get(1)?, kept)?;
        Ok((dx, ins.shape(0).clone()))
    }
}

/// A Llama/Mistral decoder layer (no biases) as one graph node, differentiable in `x` only:
/// `x: [B·l, H]` → `x + attn(norm₁ x) w_oᵀ` followed by `· + mlp(norm₂ ·)`, where attention is
/// `softmax(scale · q kᵀ + mask) v` over RoPE'd, grouped-query heads (`cos`, `sin`: `[l, d]`;
/// `mask: [B or 1, 1, l, l]`, a constant) and the MLP is `(silu(h w_gateᵀ) ⊙ h w_upᵀ) w_downᵀ`;
/// each projection plus its LoRA adapter when `w.lora` has one. The gradients of the weights
/// and adapters that carry one (variables; a detached, frozen weight gets none computed) are
/// left in `sink` by the backward pass (see [`GradSink`]); the intermediate activations are
/// kept for one backward pass (a second recomputes them), or with `z.recompute` only the
/// MLP's two inputs are, the rest recomputed in the backward pass (gradient checkpointing).
///
/// # Errors
/// Shapes; dtypes (f32/f64 CPU, all equal).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    x: &Tensor,
    w: &LayerWeights,
    z: LayerDims,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    scale: f64,
    sink: &GradSink,
) -> Result<Tensor> {
    let dt = x.dtype();
    if w.params().iter().any(|t| t.dtype() != dt) || cos.dtype() != dt || mask.dtype() != dt {
        bail!("decoder layer: weights, tables and mask must have the input's dtype {dt:?}");
    }
    if z.kv_heads == 0 || z.heads % z.kv_heads != 0 || z.head_dim % 2 != 0 {
        bail!(
            "decoder layer: {} heads over {} key/value heads of dim {}",
            z.heads,
            z.kv_heads,
            z.head_dim
        );
    }
    let c = |t: &Tensor| t.contiguous();
    let mut lora: [Option<LoraWeights>; 7] = Default::default();
    for (dst, src) in lora.iter_mut().zip(&w.lora) {
        if let Some(ad) = src {
            *dst = Some(LoraWeights {
                a: c(&ad.a)?,
                b: c(&ad.b)?,
                ..ad.clone()
            });
        }
    }
    let layer = Layer {
        w: LayerWeights {
            ln1: c(&w.ln1)?,
            q: c(&w.q)?,
            k: c(&w.k)?,
            v: c(&w.v)?,
            o: c(&w.o)?,
            ln2: c(&w.ln2)?,
            gate: c(&w.gate)?,
            up: c(&w.up)?,
            down: c(&w.down)?,
            lora,
        },
        z,
        cos: c(cos)?,
        sin: c(sin)?,
        att: Attention {
            mask: mask.detach().contiguous()?,
            scale,
            probs: Mutex::new(None),
            keep: false,
        },
        sink: sink.clone(),
        kept: Mutex::new(None),
    };
    let (b, l, hd) = (z.b, z.l, z.head_dim);
    let geo_ok =
        matches!(mask.dims(), &[mb, 1, ml, mt] if (mb == 1 || mb == b) && ml == l && mt == l);
    if !geo_ok || cos.dims() != [l, hd] || sin.dims() != [l, hd] {
        bail!(
            "decoder layer: mask {:?}, tables {:?} {:?} for {b} × {l} positions, head dim {hd}",
            mask.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    let x = x.contiguous()?;
    // A layer whose input carries no gradient (a frozen embedding) but whose adapters or
    // weights do must still be a graph node: its input becomes a leaf that does.
    let x = if !x.track_op() && w.params().iter().any(|t| t.track_op()) {
        candle_core::Var::from_tensor(&x)?.as_tensor().clone()
    } else {
        x
    };
    apply(&[&x], layer)
}
