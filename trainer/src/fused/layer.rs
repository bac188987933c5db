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

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{
    data, gate_up_proj, gemm_acc, gemm_vec, AttDims, Attention, AttentionBwd, Heads, Linear,
    LinearAdd, Reads, Real, RmsNorm, RmsNormBwd, SiluMul, SiluMulBwd,
};

/// Weight gradients computed by [`decoder_layer`] nodes during a backward pass, waiting to be
/// added to that pass's [`GradStore`].
///
/// Use: [`GradSink::clear`], `loss.backward()`, [`GradSink::drain_into`] the returned store.
/// A forward pass whose backward never runs leaves nothing here.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "GradSink({n} pending)")
    }
}

impl GradSink {
    /// Forgets pending gradients (of a backward pass that was not drained).
    pub fn clear(&self) {
        if let Ok(mut v) = self.0.lock() {
            v.clear();
        }
    }

    pub(super) fn push(&self, var: &Tensor, grad: Tensor) -> Result<()> {
        match self.0.lock() {
            Ok(mut v) => {
                v.push((var.clone(), grad));
                Ok(())
            }
            Err(_) => bail!("decoder layer: gradient sink poisoned"),
        }
    }

    /// Adds the pending gradients to `store` (summing with any gradient already there, as
    /// candle does for a variable used twice) and empties the sink.
    ///
    /// # Errors
    /// Shape mismatches (a gradient not of its variable's shape); a poisoned lock.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        let pending = match self.0.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => bail!("decoder layer: gradient sink poisoned"),
        };
        for (var, g) in pending {
            let sum = match store.get(&var) {
                Some(old) => (old + &g)?,
                None => g,
            };
            store.insert(&var, sum);
        }
        Ok(())
    }
}

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
}

impl LayerWeights {
    fn all(&self) -> [&Tensor; 9] {
        [
            &self.ln1, &self.q, &self.k, &self.v, &self.o, &self.ln2, &self.gate, &self.up,
            &self.down,
        ]
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
    kept: Mutex<Option<Kept>>,
}

fn flat<T: WithDType>(v: Vec<T>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, &candle_core::Device::Cpu)
}

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

    /// The nine weights (in [`LayerWeights::all`]'s order), then the RoPE tables at 9, 10.
    fn reads(&self) -> Reads<'_> {
        let [ln1, wq, wk, wv, wo, ln2, wg, wu, wd] = self.w.all();
        Reads::of(&[ln1, wq, wk, wv, wo, ln2, wg, wu, wd, &self.cos, &self.sin])
    }

    fn att_dims(&self) -> AttDims {
        let z = self.z;
        AttDims {
            b: z.b,
            h: z.heads,
            l: z.l,
            t: z.l,
            d: z.head_dim,
        }
    }

    /// `x3 = x2 + (silu(h2 w_gateᵀ) ⊙ h2 w_upᵀ) w_downᵀ`, `h2 = norm₂(x2)`,
    /// `x2 = x + attention(split(norm₁(x) w_{q,k,v}ᵀ)) w_oᵀ`; returns `x3` and what backward
    /// needs.
    fn fwd<T: Real>(&self, x: &[T]) -> Result<(Vec<T>, Kept)> {
        let z = self.z;
        let (n, hs, i) = (z.b * z.l, self.hidden(), self.inter());
        let (dq, dkv) = (z.heads * z.head_dim, z.kv_heads * z.head_dim);
        let r = self.reads();
        let s = |j| r.get::<T>(j);
        let (cos, sin) = (s(9)?, s(10)?);
        let norm = RmsNorm { eps: z.eps };
        let h1 = norm.fwd(x, s(0)?);
        let q = self
            .heads(z.heads, true)
            .fwd(&Linear::fwd(&h1, s(1)?, n, hs, dq), cos, sin);
        let k = self
            .heads(z.kv_heads, true)
            .fwd(&Linear::fwd(&h1, s(2)?, n, hs, dkv), cos, sin);
        let v = self
            .heads(z.kv_heads, false)
            .fwd(&Linear::fwd(&h1, s(3)?, n, hs, dkv), cos, sin);
        let att = self.att.fwd(&q, &k, &v, self.att_dims())?;
        let probs = self.att.probs.lock().ok().and_then(|mut p| p.take());
        let x2 = LinearAdd::fwd(&att, s(4)?, x, n, dq, hs);
        let h2 = norm.fwd(&x2, s(5)?);
        let [a, up] = gate_up_proj(&h2, s(6)?, s(7)?, n, hs, i);
        let m = SiluMul::fwd(&a, &up);
        let x3 = LinearAdd::fwd(&m, s(8)?, &x2, n, i, hs);
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
        Ok((x3, kept))
    }

    /// `∂/∂x` from `g = ∂/∂x3`; the weights' gradients go to the sink.
    fn bwd<T: Real>(&self, x: &[T], g3: &[T], kept: &Kept) -> Result<Vec<T>> {
        let z = self.z;
        let (n, hs, i) = (z.b * z.l, self.hidden(), self.inter());
        let (dq, dkv) = (z.heads * z.head_dim, z.kv_heads * z.head_dim);
        let r = self.reads();
        let s = |j| r.get::<T>(j);
        let (cos, sin) = (s(9)?, s(10)?);
        let kr = Reads::of(&[
            &kept.h1, &kept.q, &kept.k, &kept.v, &kept.att, &kept.x2, &kept.h2, &kept.a, &kept.up,
            &kept.m,
        ]);
        let k = |j| kr.get::<T>(j);
        let mut grads: Vec<(usize, Vec<T>)> = Vec::with_capacity(9);

        // x3 = x2 + m w_downᵀ
        grads.push((8, weight_grad(g3, k(9)?, n, hs, i)));
        let dm = input_grad(g3, s(8)?, n, hs, i);
        // m = silu(a) ⊙ up, (a, up) = h2 (w_gate, w_up)ᵀ
        let gab = SiluMulBwd::bwd(k(7)?, k(8)?, &dm);
        drop(dm);
        let (ga, gu) = gab.split_at(n * i);
        grads.push((6, weight_grad(ga, k(6)?, n, i, hs)));
        grads.push((7, weight_grad(gu, k(6)?, n, i, hs)));
        let mut dh2 = input_grad(ga, s(6)?, n, i, hs);
        add_input_grad(&mut dh2, gu, s(7)?, n, i, hs);
        drop(gab);
        // h2 = norm₂(x2); the residual adds ∂/∂x3
        let (dx2, dln2) = norm_grad(z.eps, k(5)?, s(5)?, &dh2, g3);
        drop(dh2);
        grads.push((5, dln2));
        // x2 = x + att w_oᵀ
        grads.push((4, weight_grad(&dx2, k(4)?, n, hs, dq)));
        let datt = input_grad(&dx2, s(4)?, n, hs, dq);
        // attention core
        let ab = AttentionBwd {
            mask: self.att.mask.clone(),
            scale: self.att.scale,
            probs: kept.probs.clone(),
            grad: Tensor::from_vec(datt, (n, dq), &candle_core::Device::Cpu)?,
        };
        let dqkv = ab.bwd(k(1)?, k(2)?, k(3)?, self.att_dims())?;
        drop(ab);
        let (gq, rest) = dqkv.split_at(z.b * z.heads * z.l * z.head_dim);
        let (gk, gv) = rest.split_at(rest.len() / 2);
        let dqp = self.heads(z.heads, true).bwd(gq, cos, sin);
        let dkp = self.heads(z.kv_heads, true).bwd(gk, cos, sin);
        let dvp = self.heads(z.kv_heads, false).bwd(gv, cos, sin);
        drop(dqkv);
        let h1 = k(0)?;
        grads.push((1, weight_grad(&dqp, h1, n, dq, hs)));
        grads.push((2, weight_grad(&dkp, h1, n, dkv, hs)));
        grads.push((3, weight_grad(&dvp, h1, n, dkv, hs)));
        let mut dh1 = input_grad(&dqp, s(1)?, n, dq, hs);
        add_input_grad(&mut dh1, &dkp, s(2)?, n, dkv, hs);
        add_input_grad(&mut dh1, &dvp, s(3)?, n, dkv, hs);
        // h1 = norm₁(x); the residual adds ∂/∂x2
        let (dx, dln1) = norm_grad(z.eps, x, s(0)?, &dh1, &dx2);
        grads.push((0, dln1));
        let ws = self.w.all();
        for (j, gw) in grads {
            let t = Tensor::from_vec(gw, ws[j].shape(), &candle_core::Device::Cpu)?;
            self.sink.push(ws[j], t)?;
        }
        Ok(dx)
    }

    /// [`Layer::bwd`] on `r = [x, ∂/∂x3]`; a second backward pass through the same graph
    /// (nothing kept) recomputes the forward first.
    fn bwd_with<T: Real>(&self, r: &Reads, kept: Option<Kept>) -> Result<Tensor> {
        let xs = r.get::<T>(0)?;
        let kept = match kept {
            Some(k) => k,
            None => self.fwd(xs)?.1,
        };
        flat(self.bwd(xs, r.get::<T>(1)?, &kept)?)
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

/// `∂/∂x = g w` for `y = x wᵀ` (`g: [n, out]`, `w: [out, in]` → `[n, in]`).
fn input_grad<T: Real>(g: &[T], w: &[T], n: usize, d_out: usize, d_in: usize) -> Vec<T> {
    gemm_vec((n, d_in, d_out), g, (1, d_out), w, (1, d_in))
}

/// `dst += g w`: a further use's `∂/∂x` (`g: [n, out]`, `w: [out, in]`, `dst: [n, in]`).
///
/// # Panics
/// If a slice is shorter than its size.
fn add_input_grad<T: Real>(dst: &mut [T], g: &[T], w: &[T], n: usize, d_out: usize, d_in: usize) {
    assert!(dst.len() >= n * d_in && g.len() >= n * d_out && w.len() >= d_out * d_in);
    // SAFETY: dst is n×d_in (initialized), g n×d_out, w d_out×d_in (checked above).
    unsafe {
        gemm_acc(
            (n, d_in, d_out),
            dst.as_mut_ptr(),
            g.as_ptr(),
            (1, d_out),
            w.as_ptr(),
            (1, d_in),
        )
    }
}

/// `∂/∂w = gᵀ x` for `y = x wᵀ` (`g: [n, out]` read as `gᵀ`, `x: [n, in]` → `[out, in]`).
fn weight_grad<T: Real>(g: &[T], x: &[T], n: usize, d_out: usize, d_in: usize) -> Vec<T> {
    gemm_vec((d_out, d_in, n), g, (d_out, 1), x, (1, d_in))
}

/// RMSNorm's gradients `(∂/∂x + resid, ∂/∂w)` from `g = ∂/∂y`.
fn norm_grad<T: Real>(eps: f64, x: &[T], w: &[T], g: &[T], resid: &[T]) -> (Vec<T>, Vec<T>) {
    let mut gx = RmsNormBwd { eps }.bwd(x, w, g, Some(resid));
    let gw = gx.split_off(x.len());
    (gx, gw)
}

impl CustomOp1 for Layer {
    fn name(&self) -> &'static str {
        "fused-decoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l.shape())?;
        let (out, kept) = match s.dtype() {
            DType::F32 => {
                let (y, k) = self.fwd(data::<f32>(s, l)?)?;
                (CpuStorage::F32(y), k)
            }
            DType::F64 => {
                let (y, k) = self.fwd(data::<f64>(s, l)?)?;
                (CpuStorage::F64(y), k)
            }
            dt => bail!("decoder layer: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(kept);
        }
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let kept = self.kept.lock().ok().and_then(|mut k| k.take());
        let r = Reads::of(&[x, &g]);
        let dx = match x.dtype() {
            DType::F32 => self.bwd_with::<f32>(&r, kept)?,
            DType::F64 => self.bwd_with::<f64>(&r, kept)?,
            dt => bail!("decoder layer: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// A Llama/Mistral decoder layer (no biases) as one graph node, differentiable in `x` only:
/// `x: [B·l, H]` → `x + attn(norm₁ x) w_oᵀ` followed by `· + mlp(norm₂ ·)`, where attention is
/// `softmax(scale · q kᵀ + mask) v` over RoPE'd, grouped-query heads (`cos`, `sin`: `[l, d]`;
/// `mask: [B or 1, 1, l, l]`, a constant) and the MLP is `(silu(h w_gateᵀ) ⊙ h w_upᵀ) w_downᵀ`.
/// The weights' gradients are left in `sink` by the backward pass (see [`GradSink`]); the
/// intermediate activations are kept for one backward pass (a second recomputes them).
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
    if w.all().iter().any(|t| t.dtype() != dt) || cos.dtype() != dt || mask.dtype() != dt {
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
    let layer = Layer {
        w: LayerWeights {
            ln1: w.ln1.contiguous()?,
            q: w.q.contiguous()?,
            k: w.k.contiguous()?,
            v: w.v.contiguous()?,
            o: w.o.contiguous()?,
            ln2: w.ln2.contiguous()?,
            gate: w.gate.contiguous()?,
            up: w.up.contiguous()?,
            down: w.down.contiguous()?,
        },
        z,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        att: Attention {
            mask: mask.detach().contiguous()?,
            scale,
            probs: Mutex::new(None),
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
    x.contiguous()?.apply_op1(layer)
}

/// The embedding lookup as a node whose backward leaves the table's gradient in a sink.
struct Embedding {
    ids: Vec<u32>,
    sink: GradSink,
}

impl Embedding {
    fn fwd<T: Real>(&self, e: &[T], hs: usize) -> Vec<T> {
        super::build_rows(self.ids.len(), hs, |r0, o| {
            for (k, orow) in o.chunks_mut(hs).enumerate() {
                let id = self.ids[r0 + k] as usize;
                super::write_all(orow, e[id * hs..(id + 1) * hs].iter().copied());
            }
        })
    }

    /// `∂E[v] = Σ_{rows r with ids[r] = v} g[r]`, rows added in order.
    fn bwd<T: Real>(&self, g: &[T], v: usize, hs: usize) -> Vec<T> {
        let mut de: Vec<T> = super::par_zeros(v * hs);
        for (r, &id) in self.ids.iter().enumerate() {
            let id = id as usize;
            for (d, &x) in de[id * hs..(id + 1) * hs]
                .iter_mut()
                .zip(&g[r * hs..(r + 1) * hs])
            {
                *d += x;
            }
        }
        de
    }
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, hs) = l.shape().dims2()?;
        if let Some(&bad) = self.ids.iter().find(|&&i| i as usize >= v) {
            bail!("embedding: token id {bad} outside the vocabulary of {v}");
        }
        let out = per_float!(s.dtype(), "embedding", Fl => self.fwd(data::<Fl>(s, l)?, hs));
        Ok((out, Shape::from((self.ids.len(), hs))))
    }

    fn bwd(&self, e: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (v, hs) = e.dims2()?;
        let g = grad.contiguous()?;
        let r = Reads::of(&[&g]);
        let de = match g.dtype() {
            DType::F32 => flat(self.bwd(r.get::<f32>(0)?, v, hs))?,
            DType::F64 => flat(self.bwd(r.get::<f64>(0)?, v, hs))?,
            dt => bail!("embedding: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        self.sink.push(e, de.reshape((v, hs))?)?;
        Ok(None)
    }
}

/// The rows `table[ids[r]]` (`table: [V, H]` f32/f64 CPU → `[len(ids), H]`) as one node whose
/// backward pass leaves `∂table` (the rows' gradients added at their ids) in `sink` rather
/// than candle's store (no zero buffer and accumulation of the table's size there). `table`
/// must be the variable itself.
///
/// # Errors
/// An id outside the table; dtypes.
pub fn embedding(table: &Tensor, ids: &[u32], sink: &GradSink) -> Result<Tensor> {
    table.contiguous()?.apply_op1(Embedding {
        ids: ids.to_vec(),
        sink: sink.clone(),
    })
}
