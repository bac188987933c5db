//! The scaled, masked softmax over the last dimension (attention's, op by op):
//! `p = softmax(scale · s + mask)` for scores `[B, H, l, t]` and an additive mask
//! `[B or 1, 1, l, t]` (a constant); backward `∂s_j = scale · p_j (g_j − Σ_k g_k p_k)`.
//! [`Geo`] maps a score row to its mask row (also used by the attention core).
//!
//! Public op: [`masked_softmax`].

use candle_core::{bail, Result, Shape, Tensor};

use super::dispatch::{apply, build_rows, write_all, Ins, Kernel, Op};
use super::real::{row_max, row_sum, Real};

struct MaskedSoftmax {
    scale: f64,
}

/// Geometry: scores `[B, H, l, t]`, mask `[mb, 1, l, t]` with `mb ∈ {1, B}`; built only by
/// [`Geo::of`], which checks that the mask fits the scores.
#[derive(Clone, Copy)]
pub(super) struct Geo {
    b: usize,
    h: usize,
    l: usize,
    t: usize,
    per_batch_mask: bool,
}

impl Geo {
    /// The geometry of `scores` under `mask`.
    ///
    /// # Errors
    /// A mask that is not `[B or 1, 1, l, t]` for scores `[B, H, l, t]`.
    pub(super) fn of(scores: &Shape, mask: &Shape) -> Result<Self> {
        let (b, h, l, t) = scores.dims4()?;
        let (mb, m1, ml, mt) = mask.dims4()?;
        if m1 != 1 || ml != l || mt != t || !(mb == 1 || mb == b) {
            bail!("masked_softmax: mask {mask:?} for scores {scores:?}");
        }
        Ok(Geo {
            b,
            h,
            l,
            t,
            per_batch_mask: mb == b && b > 1,
        })
    }

    /// The scores' sizes `(B, H, l, t)`.
    pub(super) fn dims(&self) -> (usize, usize, usize, usize) {
        (self.b, self.h, self.l, self.t)
    }

    /// The mask's batch entries in use: `B` for a mask per sequence, else 1.
    pub(super) fn mask_batches(&self) -> usize {
        if self.per_batch_mask {
            self.b
        } else {
            1
        }
    }

    /// The mask batch entry of head `i = (batch, head)`.
    pub(super) fn mask_batch(&self, i: usize) -> usize {
        if self.per_batch_mask {
            i / self.h
        } else {
            0
        }
    }

    /// Offset of the mask row for score row `r`.
    pub(super) fn mask_row(&self, r: usize) -> usize {
        (self.mask_batch(r / self.l) * self.l + r % self.l) * self.t
    }
}

impl MaskedSoftmax {
    fn fwd<T: Real>(&self, s: &[T], m: &[T], geo: Geo) -> Vec<T> {
        let _p = crate::profile::region("masked softmax");
        let t = geo.t;
        let scale = T::from_f64(self.scale);
        build_rows(s.len() / t.max(1), t, |r0, o| {
            for (i, orow) in o.chunks_mut(t).enumerate() {
                let r = r0 + i;
                let srow = &s[r * t..(r + 1) * t];
                let mrow = &m[geo.mask_row(r)..geo.mask_row(r) + t];
                let orow = write_all(orow, srow.iter().zip(mrow).map(|(&x, &mk)| x * scale + mk));
                let mx = row_max(orow);
                for o in orow.iter_mut() {
                    *o = (*o - mx).exp();
                }
                let sum = row_sum(orow);
                for o in orow.iter_mut() {
                    *o /= sum;
                }
            }
        })
    }
}

impl Kernel for MaskedSoftmax {
    const NAME: &'static str = "fused-masked-softmax";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let geo = Geo::of(ins.shape(0), ins.shape(1))?;
        Ok((
            self.fwd(ins.get(0)?, ins.get(1)?, geo),
            ins.shape(0).clone(),
        ))
    }

    fn grads(&self, _args: &[&Tensor], res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let op = Op(SoftmaxBwd { scale: self.scale });
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        Ok(vec![Some(g), None])
    }
}

/// `∂/∂s_j = scale · p_j (g_j − Σ_k g_k p_k)` from the softmax output `p` and its gradient `g`.
struct SoftmaxBwd {
    scale: f64,
}

impl SoftmaxBwd {
    fn bwd<T: Real>(&self, p: &[T], g: &[T], t: usize) -> Vec<T> {
        let _p = crate::profile::region("masked softmax backward");
        let scale = T::from_f64(self.scale);
        build_rows(p.len() / t.max(1), t, |r0, o| {
            for (i, orow) in o.chunks_mut(t).enumerate() {
                let r = r0 + i;
                let prow = &p[r * t..(r + 1) * t];
                let grow = &g[r * t..(r + 1) * t];
                let mut dot = T::zero();
                for (&a, &b) in prow.iter().zip(grow) {
                    dot += a * b;
                }
                write_all(
                    orow,
                    prow.iter()
                        .zip(grow)
                        .map(|(&a, &b)| scale * (a * (b - dot))),
                );
            }
        })
    }
}

impl Kernel for SoftmaxBwd {
    const NAME: &'static str = "fused-masked-softmax-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let t = ins.shape(0).dims().last().copied().unwrap_or(1);
        Ok((self.bwd(ins.get(0)?, ins.get(1)?, t), ins.shape(0).clone()))
    }
}

/// `softmax(scale · scores + mask)` over the last dimension, differentiable in `scores`
/// (the mask is a constant: no gradient is computed for it).
///
/// `scores: [B, H, l, t]`, `mask: [B, 1, l, t]` or `[1, 1, l, t]`, same dtype.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    apply(&[scores, mask], MaskedSoftmax { scale })
}
