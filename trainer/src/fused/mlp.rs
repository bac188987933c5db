//! The gated MLP's element-wise and input kernels: `silu(a) ⊙ b` with
//! `silu(x) = x / (1 + e^{−x})` (backward: `∂a = g ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`,
//! `∂b = g ⊙ silu(a)`), and the gated input `silu(x w_gateᵀ) ⊙ (x w_upᵀ)` as one node (backward:
//! the products `∂x = ∂a w_gate + ∂u w_up`, `∂w_gate = ∂aᵀ x`, `∂w_up = ∂uᵀ x`).
//!
//! Public ops: [`silu_mul`], [`gate_up`].

use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{
    apply, build_rows, with_slice, write_all, Ins, Kernel, Op, MIN_ELEMS_PER_TASK,
};
use super::gemm::{gemm_acc, gemm_into};
use super::linear::Linear;
use super::real::Real;

pub(super) struct SiluMul;

impl SiluMul {
    pub(super) fn fwd<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
        let _p = crate::profile::region("SiLU ⊙ up");
        build_rows(a.len(), 1, |r0, o| {
            let n = o.len();
            let (a, b) = (&a[r0..r0 + n], &b[r0..r0 + n]);
            write_all(
                o,
                a.iter()
                    .zip(b)
                    .map(|(&x, &y)| x / (T::one() + (-x).exp()) * y),
            );
        })
    }
}

impl Kernel for SiluMul {
    const NAME: &'static str = "fused-silu-mul";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (sa, sb) = (ins.shape(0), ins.shape(1));
        if sa != sb {
            bail!("silu_mul: shapes {sa:?} and {sb:?}");
        }
        Ok((Self::fwd(ins.get(0)?, ins.get(1)?), sa.clone()))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (args[0], args[1]);
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &Op(SiluMulBwd))?;
        let ga = both.narrow(0, 0, 1)?.reshape(a.shape())?;
        let gb = both.narrow(0, 1, 1)?.reshape(b.shape())?;
        Ok(vec![Some(ga), Some(gb)])
    }
}

/// Gradients of `silu(a) ⊙ b`, `[2, numel]`: `g ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))` then `g ⊙ silu(a)`.
pub(super) struct SiluMulBwd;

impl SiluMulBwd {
    pub(super) fn bwd<T: Real>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
        let _p = crate::profile::region("SiLU ⊙ up backward");
        let n = a.len();
        let mut out: Vec<T> = Vec::with_capacity(2 * n);
        let (ga, gb) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
        let chunk = MIN_ELEMS_PER_TASK;
        ga.par_chunks_mut(chunk)
            .zip(gb.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, (ga, gb))| {
                let o = c * chunk;
                for i in 0..ga.len() {
                    let (x, y, gv) = (a[o + i], b[o + i], g[o + i]);
                    let sig = T::one() / (T::one() + (-x).exp());
                    let silu = x * sig;
                    ga[i].write(gv * y * (sig * (T::one() + x * (T::one() - sig))));
                    gb[i].write(gv * silu);
                }
            });
        // SAFETY: the loop above wrote each of the 2n elements (ga and gb have equal lengths,
        // chunked alike); a panic propagates before this line.
        unsafe { out.set_len(2 * n) };
        out
    }
}

impl Kernel for SiluMulBwd {
    const NAME: &'static str = "fused-silu-mul-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let n = ins.shape(0).elem_count();
        let out = Self::bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?);
        Ok((out, Shape::from((2, n))))
    }
}

/// `silu(a) ⊙ b` with `silu(x) = x / (1 + e^{−x})`, differentiable in `a` and `b`.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(&[a, b], SiluMul)
}

/// The gated MLP input as one node (see [`gate_up`]); keeps the two projections for backward.
struct GateUp {
    kept: std::sync::Mutex<Option<(Tensor, Tensor)>>,
}

fn gate_up_dims(x: &Shape, wg: &Shape, wu: &Shape) -> Result<(usize, usize, usize)> {
    let (n, h) = x.dims2()?;
    let (i, gh) = wg.dims2()?;
    if gh != h || wu.dims() != [i, h] {
        bail!("gate_up: input {x:?}, weights {wg:?} and {wu:?}");
    }
    Ok((n, h, i))
}

/// `(x w_gateᵀ, x w_upᵀ)`.
pub(super) fn gate_up_proj<T: Real>(
    x: &[T],
    wg: &[T],
    wu: &[T],
    n: usize,
    h: usize,
    i: usize,
) -> [Vec<T>; 2] {
    [wg, wu].map(|w| Linear::fwd(x, w, n, h, i))
}

impl Kernel for GateUp {
    const NAME: &'static str = "fused-gate-up";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, h, i) = gate_up_dims(ins.shape(0), ins.shape(1), ins.shape(2))?;
        let [a, b] = gate_up_proj(ins.get(0)?, ins.get(1)?, ins.get(2)?, n, h, i);
        let m = SiluMul::fwd(&a, &b);
        let dev = candle_core::Device::Cpu;
        let kept = (
            Tensor::from_vec(a, (n, i), &dev)?,
            Tensor::from_vec(b, (n, i), &dev)?,
        );
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(kept);
        }
        Ok((m, Shape::from((n, i))))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, wg, wu) = (args[0], args[1], args[2]);
        let (n, h, i) = gate_up_dims(x.shape(), wg.shape(), wu.shape())?;
        let op = GateUpBwd {
            kept: self.kept.lock().ok().and_then(|mut s| s.take()),
            grad: grad.contiguous()?,
        };
        let all = x.apply_op3_no_bwd(wg, wu, &Op(op))?;
        let gx = all.narrow(0, 0, n * h)?.reshape((n, h))?;
        let gwg = all.narrow(0, n * h, i * h)?.reshape((i, h))?;
        let gwu = all.narrow(0, n * h + i * h, i * h)?.reshape((i, h))?;
        Ok(vec![Some(gx), Some(gwg), Some(gwu)])
    }
}

/// Gradients of [`gate_up`], flat `[∂x | ∂w_gate | ∂w_up]`.
struct GateUpBwd {
    kept: Option<(Tensor, Tensor)>,
    grad: Tensor,
}

impl Kernel for GateUpBwd {
    const NAME: &'static str = "fused-gate-up-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, h, i) = gate_up_dims(ins.shape(0), ins.shape(1), ins.shape(2))?;
        if self.grad.dims() != [n, i] {
            bail!("gate_up backward: gradient {:?}", self.grad.shape());
        }
        let (x, wg, wu) = (ins.get::<T>(0)?, ins.get::<T>(1)?, ins.get::<T>(2)?);
        // The kept projections are read in place (no copy); recomputed when absent.
        let gab = with_slice::<T, _>(&self.grad, |g| match &self.kept {
            Some((a, b)) => with_slice::<T, _>(a, |a| {
                with_slice::<T, _>(b, |b| Ok(SiluMulBwd::bwd(a, b, g)))
            }),
            None => {
                let [a, b] = gate_up_proj(x, wg, wu, n, h, i);
                Ok(SiluMulBwd::bwd(&a, &b, g))
            }
        })?;
        let (ga, gb) = gab.split_at(n * i);
        let len = n * h + 2 * i * h;
        let mut out: Vec<T> = Vec::with_capacity(len);
        // SAFETY: out has room for the three blocks; the first is written by gemm_into and then
        // accumulated into, the other two written whole; ga, gb are n×i, wg, wu i×h, x n×h.
        unsafe {
            let p = out.as_mut_ptr();
            gemm_into(n, h, i, p, ga.as_ptr(), 1, i, wg.as_ptr(), 1, h);
            gemm_acc((n, h, i), p, gb.as_ptr(), (1, i), wu.as_ptr(), (1, h));
            gemm_into(i, h, n, p.add(n * h), ga.as_ptr(), i, 1, x.as_ptr(), 1, h);
            gemm_into(
                i,
                h,
                n,
                p.add(n * h + i * h),
                gb.as_ptr(),
                i,
                1,
                x.as_ptr(),
                1,
                h,
            );
            out.set_len(len);
        }
        Ok((out, Shape::from(n * h + 2 * i * h)))
    }
}

/// The gated MLP input `silu(x w_gateᵀ) ⊙ (x w_upᵀ)` (`x: [N, H]`, weights `[I, H]` →
/// `[N, I]`) as one graph node, differentiable in `x` and both weights: the two projections are
/// kept for its backward pass (recomputed for a second one), whose `∂x` accumulates both
/// products in one buffer.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn gate_up(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    if super::rows::applies(x, &[w_gate, w_up]) {
        return apply(&[x, w_gate, w_up], super::rows::GateUpRows);
    }
    let kept = std::sync::Mutex::new(None);
    apply(&[x, w_gate, w_up], GateUp { kept })
}
