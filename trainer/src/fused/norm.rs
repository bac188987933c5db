//! RMSNorm over the last dimension: `y = (x / d) ⊙ w` with `d = sqrt(mean(x²) + ε)`; its
//! backward `∂/∂x_k = g_k w_k / d − x_k Σ_j g_j w_j x_j / (H d³)`, `∂/∂w_j = Σ_rows g_j x_j / d`
//! (with the residual stream's gradient added in the decoder layer: `norm_grad`).
//!
//! Public op: [`rms_norm`].

use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{apply, build_rows, par_zeros, rows_per_task, write_all, Ins, Kernel, Op};
use super::real::Real;

pub(super) struct RmsNorm {
    pub(super) eps: f64,
}

impl RmsNorm {
    #[inline]
    fn denom<T: Real>(row: &[T], eps: T) -> T {
        let mut s = T::zero();
        for &v in row {
            s += v * v;
        }
        (s / T::from_f64(row.len() as f64) + eps).sqrt()
    }

    pub(super) fn fwd<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let _p = crate::profile::region("RMSNorm");
        let h = w.len();
        let eps = T::from_f64(self.eps);
        build_rows(x.len() / h.max(1), h, |r0, o| {
            for (i, orow) in o.chunks_mut(h.max(1)).enumerate() {
                let r = r0 + i;
                let xrow = &x[r * h..(r + 1) * h];
                let d = Self::denom(xrow, eps);
                write_all(orow, xrow.iter().zip(w).map(|(&xv, &wv)| (xv / d) * wv));
            }
        })
    }
}

impl Kernel for RmsNorm {
    const NAME: &'static str = "fused-rms-norm";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (xs, ws) = (ins.shape(0), ins.shape(1));
        let h = xs.dims().last().copied().unwrap_or(0);
        if ws.dims() != [h] {
            bail!("rms_norm: weight {ws:?} for input {xs:?}");
        }
        Ok((self.fwd(ins.get(0)?, ins.get(1)?), xs.clone()))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (args[0], args[1]);
        let n = x.elem_count() / w.elem_count().max(1);
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &Op(RmsNormBwd { eps: self.eps }))?;
        let gx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let gw = both.narrow(0, n, 1)?.reshape(w.shape())?;
        Ok(vec![Some(gx), Some(gw)])
    }
}

/// Gradients of RMSNorm, `[N + 1, H]`: rows `0..N` are `∂/∂x`, row `N` is `∂/∂w`.
///
/// With `d = sqrt(mean(x²) + ε)`: `∂/∂x_k = g_k w_k / d − x_k Σ_j g_j w_j x_j / (H d³)`,
/// `∂/∂w_j = Σ_rows g_j x_j / d`.
struct RmsNormBwd {
    eps: f64,
}

impl RmsNormBwd {
    /// `resid`, when given (`[N, H]`), is added to `∂/∂x` (the residual stream's gradient
    /// joining the norm's, see `layer.rs`).
    fn bwd<T: Real>(&self, x: &[T], w: &[T], g: &[T], resid: Option<&[T]>) -> Vec<T> {
        let _p = crate::profile::region("RMSNorm backward");
        let h = w.len();
        let n = x.len() / h.max(1);
        let eps = T::from_f64(self.eps);
        let hf = T::from_f64(h as f64);
        let mut out = par_zeros(x.len() + h);
        let rows = rows_per_task(h);
        let (gx, gw) = out.split_at_mut(n * h);
        // Per-task partial sums of ∂/∂w, added in task order (deterministic).
        let partials: Vec<Vec<T>> = gx
            .par_chunks_mut(rows * h)
            .enumerate()
            .map(|(c, chunk)| {
                let mut pw = vec![T::zero(); h];
                for (i, orow) in chunk.chunks_mut(h).enumerate() {
                    let r = c * rows + i;
                    let xrow = &x[r * h..(r + 1) * h];
                    let grow = &g[r * h..(r + 1) * h];
                    let d = RmsNorm::denom(xrow, eps);
                    let mut dot = T::zero();
                    for ((&gv, &wv), &xv) in grow.iter().zip(w).zip(xrow) {
                        dot += gv * wv * xv;
                    }
                    let c2 = dot / (hf * d * d * d);
                    for ((((o, &gv), &wv), &xv), p) in orow
                        .iter_mut()
                        .zip(grow)
                        .zip(w)
                        .zip(xrow)
                        .zip(pw.iter_mut())
                    {
                        *o = gv * wv / d - xv * c2;
                        *p += gv * (xv / d);
                    }
                    if let Some(rs) = resid {
                        for (o, &rv) in orow.iter_mut().zip(&rs[r * h..(r + 1) * h]) {
                            *o += rv;
                        }
                    }
                }
                pw
            })
            .collect();
        for p in partials {
            for (a, b) in gw.iter_mut().zip(p) {
                *a += b;
            }
        }
        out
    }
}

impl Kernel for RmsNormBwd {
    const NAME: &'static str = "fused-rms-norm-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let h = ins.shape(1).elem_count();
        let n = ins.shape(0).elem_count() / h.max(1);
        let out = self.bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, None);
        Ok((out, Shape::from((n + 1, h))))
    }
}

/// RMSNorm `y = (x / sqrt(mean(x²) + ε)) ⊙ w` over the last dimension, differentiable in `x`
/// and `w`.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    apply(&[x, w], RmsNorm { eps })
}

/// RMSNorm's gradients `(∂/∂x + resid, ∂/∂w)` from `g = ∂/∂y`.
pub(super) fn norm_grad<T: Real>(
    eps: f64,
    x: &[T],
    w: &[T],
    g: &[T],
    resid: &[T],
) -> (Vec<T>, Vec<T>) {
    let mut gx = RmsNormBwd { eps }.bwd(x, w, g, Some(resid));
    let gw = gx.split_off(x.len());
    (gx, gw)
}
