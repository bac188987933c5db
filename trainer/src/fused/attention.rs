//! The attention core as one node: `o = softmax(scale · q kᵀ + mask) v` for `q: [B, H, l, d]`,
//! `k`, `v: [B, H, t, d]`, with heads merged into `[B·l, H·d]`; computed in blocks of
//! `ATT_BLOCK` query rows that skip the keys the mask hides from the whole block. Backward
//! (per block): `∂p = ∂o vᵀ`, `∂s = scale · p ⊙ (∂p − Σ_k ∂p_k p_k)`, `∂q = ∂s k`,
//! `∂k += ∂sᵀ q`, `∂v += pᵀ ∂o`.
//!
//! Public op: [`attention`].

use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{apply, par_zeros, with_slice, Ins, Kernel, Op, Reads, SyncPtr};
use super::gemm::gemm_raw;
use super::real::{row_max, row_sum, Real};
use super::softmax::Geo;

/// Query rows per block of the blocked attention: a block computes scores only for the keys
/// its rows attend (a causal mask halves the work).
const ATT_BLOCK: usize = 64;

/// Mask entries at or below this count as masked: their probability underflows to exactly 0
/// (for scores far below 10⁸ in magnitude), so blocks skip them.
const MASKED_AT: f64 = -1e8;

/// Attention sizes: the scores' geometry `[B, H, l, t]` (batch, heads, queries, keys) and its
/// mask's, and the head dimension `d`.
#[derive(Clone, Copy)]
pub(super) struct AttDims {
    pub(super) geo: Geo,
    pub(super) d: usize,
}

impl AttDims {
    /// The sizes of `q: [B, H, l, d]`, `k`, `v: [B, H, t, d]` under `mask: [B or 1, 1, l, t]`.
    pub(super) fn of(q: &Shape, k: &Shape, v: &Shape, mask: &Shape) -> Result<Self> {
        let (b, h, l, d) = q.dims4()?;
        let (kb, kh, t, kd) = k.dims4()?;
        if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
            bail!("attention: q {q:?}, k {k:?}, v {v:?}");
        }
        let geo = Geo::of(&Shape::from((b, h, l, t)), mask)?;
        Ok(AttDims { geo, d })
    }

    /// Offset of head `i = (batch, head)` in the merged `[B·l, H·d]` layout (row stride `H·d`).
    fn merged(&self, i: usize) -> usize {
        let (_, h, l, _, d) = self.sizes();
        (i / h) * l * h * d + (i % h) * d
    }

    fn blocks(&self) -> usize {
        let (_, _, l, _) = self.geo.dims();
        l.div_ceil(ATT_BLOCK)
    }

    /// Query rows `[r0, r1)` of block `blk`.
    fn block_rows(&self, blk: usize) -> (usize, usize) {
        let (_, _, l, _) = self.geo.dims();
        (blk * ATT_BLOCK, ((blk + 1) * ATT_BLOCK).min(l))
    }

    /// `(B, H, l, t, d)`: batch, heads, queries, keys, head dimension.
    fn sizes(&self) -> (usize, usize, usize, usize, usize) {
        let (b, h, l, t) = self.geo.dims();
        (b, h, l, t, self.d)
    }

    /// The merged layout `[B·l, H·d]` of the output (and of its gradient).
    fn merged_dims(&self) -> (usize, usize) {
        let (b, h, l, _, d) = self.sizes();
        (b * l, h * d)
    }

    /// The lengths `(nq, nk)` of `q` (and of the merged output) and of `k` (and `v`).
    fn lens(&self) -> (usize, usize) {
        let (b, h, l, t, d) = self.sizes();
        (b * h * l * d, b * h * t * d)
    }
}

/// The keys each query block attends and where its probabilities are kept: block `blk` of a
/// head under mask batch entry `mb` attends keys `[lo, hi)` (the first to `1 +` the last key
/// any row of the block leaves unmasked; all `t` keys when a row of the block masks every key,
/// where softmax is uniform over all keys as in the unblocked computation) and keeps its
/// `rows × (hi − lo)` probabilities, row-major, at `off` within its head's share. A causal
/// mask keeps about half of `l × t` per head; sequences packed into one row (a block-diagonal
/// mask) keep about `Σ_s len_s²` instead of `T²`.
pub(super) struct Spans {
    /// `(lo, hi)`, indexed `mask_batch · blocks + block`.
    keys: Vec<(usize, usize)>,
    /// The block's offset within its head's probabilities, indexed as `keys`.
    off: Vec<usize>,
    /// The start of head `i = (batch, head)`'s probabilities; `B·H + 1` entries.
    head: Vec<usize>,
}

impl Spans {
    fn of<T: Real>(mask: &[T], z: AttDims) -> Self {
        let masked = T::from_f64(MASKED_AT);
        let (b, h, l, t) = z.geo.dims();
        let (mbs, nb) = (z.geo.mask_batches(), z.blocks());
        let mut keys = Vec::with_capacity(mbs * nb);
        let mut off = Vec::with_capacity(mbs * nb);
        let mut per_head = Vec::with_capacity(mbs);
        for bi in 0..mbs {
            let mut o = 0;
            for blk in 0..nb {
                let (r0, r1) = z.block_rows(blk);
                let (mut lo, mut hi) = (t, 0);
                for r in r0..r1 {
                    let row = &mask[(bi * l + r) * t..][..t];
                    match (
                        row.iter().position(|&v| v > masked),
                        row.iter().rposition(|&v| v > masked),
                    ) {
                        (Some(a), Some(e)) => (lo, hi) = (lo.min(a), hi.max(e + 1)),
                        _ => (lo, hi) = (0, t),
                    }
                }
                let span = if lo < hi { (lo, hi) } else { (0, t.max(1)) };
                keys.push(span);
                off.push(o);
                o += (r1 - r0) * (span.1 - span.0);
            }
            per_head.push(o);
        }
        let mut head = Vec::with_capacity(b * h + 1);
        head.push(0);
        for i in 0..b * h {
            let last = head[i];
            head.push(last + per_head[z.geo.mask_batch(i)]);
        }
        Spans { keys, off, head }
    }

    /// The number of kept probabilities.
    fn len(&self) -> usize {
        self.head.last().copied().unwrap_or(0)
    }

    /// Block `blk` of head `i`: its keys `(lo, hi)` and its slab's offset in the kept
    /// probabilities.
    fn block(&self, z: AttDims, i: usize, blk: usize) -> ((usize, usize), usize) {
        let j = z.geo.mask_batch(i) * z.blocks() + blk;
        (self.keys[j], self.head[i] + self.off[j])
    }
}

/// Writes `p = softmax(scale · q kᵀ + mask)` for head `i`, query block `blk` over the keys
/// `[lo, hi)` into the slab `p_blk` (`rows × (hi − lo)`, row-major).
///
/// # Safety
/// `q`, `k` must hold head `i`'s `l × d` and `t × d` blocks, `p_blk` must be valid for the
/// block's `rows · (hi − lo)` writes.
#[allow(clippy::too_many_arguments)]
unsafe fn probs_block<T: Real>(
    p_blk: *mut T,
    q: &[T],
    k: &[T],
    mask: &[T],
    z: AttDims,
    scale: T,
    (i, blk, (lo, hi)): (usize, usize, (usize, usize)),
) {
    let (_, _, l, t, d) = z.sizes();
    let (r0, r1) = z.block_rows(blk);
    let w = hi - lo;
    gemm_raw(
        (r1 - r0, w, d),
        p_blk,
        w,
        q.as_ptr().add((i * l + r0) * d),
        (1, d),
        k.as_ptr().add((i * t + lo) * d),
        (d, 1),
        gemm::Parallelism::None,
        false,
    );
    for r in r0..r1 {
        let row = std::slice::from_raw_parts_mut(p_blk.add((r - r0) * w), w);
        let m0 = z.geo.mask_row(i * l + r);
        let mrow = &mask[m0 + lo..m0 + hi];
        for (x, &mk) in row.iter_mut().zip(mrow) {
            *x = *x * scale + mk;
        }
        let mx = row_max(row);
        for x in row.iter_mut() {
            *x = (*x - mx).exp();
        }
        let sum = row_sum(row);
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

/// `p = softmax(scale · q kᵀ + mask)` block by block (heads over rayon's pool), kept in the
/// compact layout of [`Spans`]; also `o = p v` in the merged `[B·l, H·d]` layout when `v` is
/// given. With `keep` false (a forward pass no backward pass will read, `v` given) the
/// probabilities go to one head-sized scratch buffer per task instead and the returned `p` is
/// empty.
#[allow(clippy::too_many_arguments)]
fn att_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: Option<&[T]>,
    mask: &[T],
    z: AttDims,
    scale: f64,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let (b, h, l, t, d) = z.sizes();
    let keep = keep || v.is_none();
    let spans = Spans::of(mask, z);
    let nb = z.blocks();
    let mut p: Vec<T> = Vec::with_capacity(if keep { spans.len() } else { 0 });
    let mut o: Vec<T> = Vec::with_capacity(if v.is_some() { b * l * h * d } else { 0 });
    let (pp, op) = (SyncPtr(p.as_mut_ptr()), SyncPtr(o.as_mut_ptr()));
    let scale = T::from_f64(scale);
    (0..b * h)
        .into_par_iter()
        .for_each_init(Vec::<T>::new, |scratch, i| {
            difinfo::simd::vectorized(|| {
                let head_len = spans.head[i + 1] - spans.head[i];
                if !keep && scratch.capacity() < head_len {
                    *scratch = Vec::with_capacity(head_len);
                }
                for blk in 0..nb {
                    let ((lo, hi), at) = spans.block(z, i, blk);
                    // SAFETY: head i writes only its own share of p (each block's slab whole) or,
                    // without `keep`, the task's own scratch of the head's size; and its own l×d
                    // block of the merged o (rows of h·d, head offset); q, k, v are [B, H, ·, d]
                    // blocks.
                    unsafe {
                        let pb = if keep {
                            pp.get().add(at)
                        } else {
                            scratch.as_mut_ptr().add(at - spans.head[i])
                        };
                        probs_block(pb, q, k, mask, z, scale, (i, blk, (lo, hi)));
                        if let Some(v) = v {
                            let (r0, r1) = z.block_rows(blk);
                            gemm_raw(
                                (r1 - r0, d, hi - lo),
                                op.get().add(z.merged(i) + r0 * h * d),
                                h * d,
                                pb,
                                (1, hi - lo),
                                v.as_ptr().add((i * t + lo) * d),
                                (1, d),
                                gemm::Parallelism::None,
                                false,
                            );
                        }
                    }
                }
            })
        });
    // SAFETY: every head wrote its blocks of p (when kept; and of o when v was given) whole.
    unsafe {
        if keep {
            p.set_len(spans.len());
        }
        if v.is_some() {
            o.set_len(b * l * h * d);
        }
    }
    (p, v.map(|_| o))
}

/// The attention core as one graph node (see [`attention`]); the mask is a constant.
pub(super) struct Attention {
    pub(super) mask: Tensor,
    pub(super) scale: f64,
    /// The probabilities of the forward pass, taken by the backward pass.
    pub(super) probs: std::sync::Mutex<Option<Tensor>>,
    /// Whether the forward pass keeps the probabilities (false: no backward pass will run).
    pub(super) keep: bool,
}

impl Attention {
    pub(super) fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], z: AttDims) -> Result<Vec<T>> {
        let _p = crate::profile::region("attention forward");
        let (p, o) = with_slice::<T, _>(&self.mask, |m| {
            Ok(att_forward(q, k, Some(v), m, z, self.scale, self.keep))
        })?;
        if self.keep {
            let n = p.len();
            let p = Tensor::from_vec(p, n, &candle_core::Device::Cpu)?;
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(p);
            }
        }
        o.ok_or_else(|| candle_core::Error::Msg("attention: no output".into()))
    }
}

impl Kernel for Attention {
    const NAME: &'static str = "fused-attention";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let z = AttDims::of(ins.shape(0), ins.shape(1), ins.shape(2), self.mask.shape())?;
        if self.mask.dtype() != T::DTYPE {
            bail!(
                "attention: dtypes {:?} and mask {:?} (f32 or f64, equal)",
                T::DTYPE,
                self.mask.dtype()
            );
        }
        let out = self.fwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, z)?;
        Ok((out, Shape::from(z.merged_dims())))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (q, k, v) = (args[0], args[1], args[2]);
        let z = AttDims::of(q.shape(), k.shape(), v.shape(), self.mask.shape())?;
        let kept = self.probs.lock().ok().and_then(|mut s| s.take());
        let op = AttentionBwd {
            mask: self.mask.clone(),
            scale: self.scale,
            probs: kept,
            grad: grad.contiguous()?,
        };
        let all = q.apply_op3_no_bwd(k, v, &Op(op))?;
        let (nq, nk) = z.lens();
        let gq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let gk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let gv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok(vec![Some(gq), Some(gk), Some(gv)])
    }
}

/// Gradients of the attention core, flat `[∂q | ∂k | ∂v]`, from the output gradient (merged
/// layout) and the forward pass's probabilities (recomputed when absent).
pub(super) struct AttentionBwd {
    pub(super) mask: Tensor,
    pub(super) scale: f64,
    pub(super) probs: Option<Tensor>,
    pub(super) grad: Tensor,
}

impl AttentionBwd {
    pub(super) fn bwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], z: AttDims) -> Result<Vec<T>> {
        let _p = crate::profile::region("attention backward");
        let (b, h, l, t, d) = z.sizes();
        let bh = b * h;
        with_slice::<T, _>(&self.mask, |mask| {
            // The kept probabilities are read in place (no copy); recomputed when absent.
            let (kept, recomputed);
            let p: &[T] = match &self.probs {
                Some(p) => {
                    kept = Reads::of(&[p]);
                    kept.get::<T>(0)?
                }
                None => {
                    recomputed = att_forward(q, k, None, mask, z, self.scale, true).0;
                    &recomputed
                }
            };
            let spans = Spans::of(mask, z);
            if p.len() != spans.len() {
                bail!(
                    "attention backward: {} kept probabilities, {} expected",
                    p.len(),
                    spans.len()
                );
            }
            let nb = z.blocks();
            let (nq, nk) = z.lens();
            // ∂k and ∂v accumulate over query blocks: zeroed first.
            let mut out: Vec<T> = par_zeros(nq + 2 * nk);
            let base = SyncPtr(out.as_mut_ptr());
            let scale = T::from_f64(self.scale);
            with_slice::<T, _>(&self.grad, |go| {
                (0..bh).into_par_iter().for_each(|i| {
                    difinfo::simd::vectorized(|| {
                        let mut gs: Vec<T> = Vec::with_capacity(ATT_BLOCK * t);
                        for blk in 0..nb {
                            let ((lo, hi), at) = spans.block(z, i, blk);
                            let w = hi - lo;
                            let (r0, r1) = z.block_rows(blk);
                            let rows = r1 - r0;
                            let pb = &p[at..at + rows * w];
                            let gob = z.merged(i) + r0 * h * d;
                            // SAFETY: head i writes only its own blocks of ∂q (rows r0..r1),
                            // ∂k and ∂v (rows lo..hi, accumulated); gs has room for rows×w;
                            // the operands are read within their [B, H, ·, ·] or merged layouts.
                            unsafe {
                                // ∂p = ∂o · vᵀ over the block's keys
                                gemm_raw(
                                    (rows, w, d),
                                    gs.as_mut_ptr(),
                                    w,
                                    go.as_ptr().add(gob),
                                    (1, h * d),
                                    v.as_ptr().add((i * t + lo) * d),
                                    (d, 1),
                                    gemm::Parallelism::None,
                                    false,
                                );
                                gs.set_len(rows * w);
                            }
                            // ∂s = scale · p ⊙ (∂p − Σ_k ∂p_k p_k), in place
                            for (grow, prow) in gs.chunks_mut(w).zip(pb.chunks(w)) {
                                let mut dot = T::zero();
                                for (&a, &g) in prow.iter().zip(grow.iter()) {
                                    dot += a * g;
                                }
                                for (g, &a) in grow.iter_mut().zip(prow) {
                                    *g = scale * (a * (*g - dot));
                                }
                            }
                            // SAFETY: as above.
                            unsafe {
                                let o = base.get();
                                // ∂v[lo..hi] += pᵀ · ∂o
                                gemm_raw(
                                    (w, d, rows),
                                    o.add(nq + nk + (i * t + lo) * d),
                                    d,
                                    pb.as_ptr(),
                                    (w, 1),
                                    go.as_ptr().add(gob),
                                    (1, h * d),
                                    gemm::Parallelism::None,
                                    true,
                                );
                                // ∂q = ∂s · k
                                gemm_raw(
                                    (rows, d, w),
                                    o.add((i * l + r0) * d),
                                    d,
                                    gs.as_ptr(),
                                    (1, w),
                                    k.as_ptr().add((i * t + lo) * d),
                                    (1, d),
                                    gemm::Parallelism::None,
                                    false,
                                );
                                // ∂k[lo..hi] += ∂sᵀ · q
                                gemm_raw(
                                    (w, d, rows),
                                    o.add(nq + (i * t + lo) * d),
                                    d,
                                    gs.as_ptr(),
                                    (w, 1),
                                    q.as_ptr().add((i * l + r0) * d),
                                    (1, d),
                                    gemm::Parallelism::None,
                                    true,
                                );
                            }
                            gs.clear();
                        }
                    })
                });
                Ok(())
            })?;
            Ok(out)
        })
    }
}

impl Kernel for AttentionBwd {
    const NAME: &'static str = "fused-attention-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let z = AttDims::of(ins.shape(0), ins.shape(1), ins.shape(2), self.mask.shape())?;
        let (rows, cols) = z.merged_dims();
        if self.grad.dims() != [rows, cols] {
            bail!("attention backward: gradient {:?}", self.grad.shape());
        }
        let out = self.bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, z)?;
        let (nq, nk) = z.lens();
        Ok((out, Shape::from(nq + 2 * nk)))
    }
}

/// The attention core `softmax(scale · q kᵀ + mask) v` with heads merged, as one graph node:
/// `q: [B, H, l, d]`, `k`, `v: [B, H, t, d]`, `mask: [B or 1, 1, l, t]` (a constant) →
/// `[B·l, H·d]`, differentiable in `q`, `k`, `v`. The `[B, H, l, t]` probabilities are kept
/// for one backward pass (a second one recomputes them) when an input carries a gradient, and
/// never formed whole otherwise (inference: one head's block at a time); the autograd graph
/// gets one node instead of six (no zero buffers and accumulations of the score size).
///
/// NaN in a query, or in a key or value that a row attends, makes that row NaN (forward and
/// backward). A NaN key the mask hides from a row reaches it only when it lies within the
/// row's query block's key span (candle's additive-mask path spreads it to every row): masked
/// keys carry no weight either way.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, l, _) = q.dims4()?;
    let t = k.dim(2)?;
    Geo::of(&Shape::from((b, h, l, t)), mask.shape())?;
    // Without a gradient to carry, nothing is kept (no [B, H, l, t] buffer).
    let keep = q.track_op() || k.track_op() || v.track_op();
    let mask = mask.detach().contiguous()?;
    let probs = std::sync::Mutex::new(None);
    apply(
        &[q, k, v],
        Attention {
            mask,
            scale,
            probs,
            keep,
        },
    )
}
