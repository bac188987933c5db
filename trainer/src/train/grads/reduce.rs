//! The whole-gradient kernels on contiguous f32/f64 CPU tensors, over rayon's pool: the dot
//! product `Σ_i a_i b_i` accumulated in f64 in fixed chunks (the global norm
//! `‖g‖ = sqrt(Σ g²)` and the DPO-PG projection's inner products), the scaling `c·x` (gradient
//! clipping; also in place) and the projection step `x − c·y`. Each returns `None` (or false)
//! where it does not apply, and [`super::Grads`] then uses candle's ops.
//!
//! Public functions: [`dot`], [`scale`], [`scale_in_place`], [`sub_scaled`].

use candle_core::{DType, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::dispatch::{
    build_rows, write_all, InPlace, InPlaceKernel, Ins, Kernel, Op, Reads, MIN_ELEMS_PER_TASK,
};
use crate::fused::enabled;
use crate::fused::real::Real;

/// Elements per task of the reductions below: a fixed chunking, so the f64 partial sums are
/// added in the same order on any number of threads (deterministic results).
const REDUCE_CHUNK: usize = 1 << 16;

/// The flat data of contiguous f32/f64 CPU tensors of one dtype and size, or `None`.
fn same_flat<'a>(ts: &[&'a Tensor]) -> Option<(DType, Reads<'a>)> {
    let t0 = ts.first()?;
    let dt = t0.dtype();
    let ok = ts.iter().all(|t| {
        enabled(t) && t.dtype() == dt && t.elem_count() == t0.elem_count() && t.is_contiguous()
    });
    ok.then(|| (dt, Reads::of(ts)))
}

fn dot_slices<T: Real>(a: &[T], b: &[T]) -> f64 {
    /// Elements summed in the tensors' dtype (16 lanes) before joining the f64 total.
    const BLOCK: usize = 1024;
    let partials: Vec<f64> = a
        .par_chunks(REDUCE_CHUNK)
        .zip(b.par_chunks(REDUCE_CHUNK))
        .map(|(x, y)| {
            let mut total = 0.0f64;
            for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
                // 16 independent lanes over fixed-size views: unrolls and vectorizes.
                let mut acc = [T::zero(); 16];
                let (xc, yc) = (xb.chunks_exact(16), yb.chunks_exact(16));
                let (xr, yr) = (xc.remainder(), yc.remainder());
                for (p, q) in xc.zip(yc) {
                    let (p, q): (&[T; 16], &[T; 16]) = match (p.try_into(), q.try_into()) {
                        (Ok(p), Ok(q)) => (p, q),
                        _ => unreachable!("chunks_exact(16) yields 16 elements"),
                    };
                    for j in 0..16 {
                        acc[j] += p[j] * q[j];
                    }
                }
                total += acc.iter().fold(0.0f64, |s, &v| s + v.to_f64());
                for (&u, &v) in xr.iter().zip(yr) {
                    total += (u * v).to_f64();
                }
            }
            total
        })
        .collect();
    partials.into_iter().sum()
}

/// `Σ_i a_i b_i` over two contiguous f32/f64 CPU tensors of equal dtype and size, accumulated
/// in f64 in parallel (fixed chunks, so the result does not depend on the thread count);
/// `None` when that does not apply (the caller uses candle's ops). With `a = b` it is the
/// squared norm behind the global gradient norm `‖g‖ = sqrt(Σ_tensors Σ g²)`.
///
/// # Errors
/// Storage access errors.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<Option<f64>> {
    let _p = crate::profile::region("gradient norm, clipping, projection");
    let Some((dt, r)) = same_flat(&[a, b]) else {
        return Ok(None);
    };
    Ok(Some(match dt {
        DType::F32 => dot_slices(r.get::<f32>(0)?, r.get::<f32>(1)?),
        _ => dot_slices(r.get::<f64>(0)?, r.get::<f64>(1)?),
    }))
}

fn axpy_slices<T: Real>(x: &[T], y: &[T], c: T) -> Vec<T> {
    build_rows(x.len(), 1, |r0, o| {
        let n = o.len();
        let (x, y) = (&x[r0..r0 + n], &y[r0..r0 + n]);
        write_all(o, x.iter().zip(y).map(|(&u, &v)| u - v * c));
    })
}

/// `x − c·y` (`c·y` rounded first, as candle's `x − y.affine(c, 0)`), element by element in
/// parallel, for contiguous f32/f64 CPU tensors of one dtype and shape: the DPO-PG projection
/// `g_w − (⟨g_w, g_l⟩ / ‖g_l‖²) g_l`. `None` when that does not apply.
///
/// # Errors
/// Storage access and tensor construction errors.
pub fn sub_scaled(x: &Tensor, y: &Tensor, c: f64) -> Result<Option<Tensor>> {
    let _p = crate::profile::region("gradient norm, clipping, projection");
    if x.shape() != y.shape() {
        return Ok(None);
    }
    if same_flat(&[x, y]).is_none() {
        return Ok(None);
    }
    Ok(Some(x.apply_op2_no_bwd(y, &Op(SubScaled(c)))?))
}

/// `x − c·y` (see [`sub_scaled`]).
struct SubScaled(f64);

impl Kernel for SubScaled {
    const NAME: &'static str = "fused-sub-scaled";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let out = axpy_slices(ins.get(0)?, ins.get(1)?, T::from_f64(self.0));
        Ok((out, ins.shape(0).clone()))
    }
}

fn scale_slice<T: Real>(x: &[T], c: T) -> Vec<T> {
    build_rows(x.len(), 1, |r0, o| {
        let n = o.len();
        write_all(o, x[r0..r0 + n].iter().map(|&u| u * c + T::zero()));
    })
}

/// `c·x` element by element in parallel (the same roundings as candle's `affine(c, 0)`) for a
/// contiguous f32/f64 CPU tensor; `None` when that does not apply. Gradient clipping scales
/// every gradient by `max_norm / (‖g‖ + 1e-6)`.
///
/// # Errors
/// Storage access and tensor construction errors.
pub fn scale(x: &Tensor, c: f64) -> Result<Option<Tensor>> {
    let _p = crate::profile::region("gradient norm, clipping, projection");
    if same_flat(&[x]).is_none() {
        return Ok(None);
    }
    Ok(Some(x.apply_op1_no_bwd(&Op(Scale(c)))?))
}

/// `c·x` (see [`scale`]).
struct Scale(f64);

impl Kernel for Scale {
    const NAME: &'static str = "fused-scale";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let out = scale_slice(ins.get(0)?, T::from_f64(self.0));
        Ok((out, ins.shape(0).clone()))
    }
}

/// `x ← c·x` (see [`scale_in_place`]).
struct ScaleAssign(f64);

impl InPlaceKernel for ScaleAssign {
    const NAME: &'static str = "fused-scale-assign";

    fn cpu<T: Real>(&self, x: &mut [T], _shape: &Shape, _srcs: &Ins<'_>) -> Result<()> {
        let c = T::from_f64(self.0);
        x.par_chunks_mut(MIN_ELEMS_PER_TASK).for_each(|x| {
            for u in x.iter_mut() {
                *u = *u * c + T::zero();
            }
        });
        Ok(())
    }
}

/// [`scale`] in place (the tensor's own storage is overwritten; same roundings): no second
/// copy of the gradients when clipping them. False, and nothing done, when it does not apply.
///
/// # Errors
/// Tensor errors.
pub fn scale_in_place(x: &Tensor, c: f64) -> Result<bool> {
    let _p = crate::profile::region("gradient norm, clipping, projection");
    if !enabled(x) || x.layout().contiguous_offsets().is_none() {
        return Ok(false);
    }
    x.inplace_op1(&InPlace(ScaleAssign(c)))?;
    Ok(true)
}
