//! AdamW in one pass over each parameter, bit-identical to the op-by-op update of
//! [`super::Optimizer`] (same operations and roundings, element by element):
//! `θ ← θ(1 − ηλ)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ − (η/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε)`, on contiguous f32/f64 CPU tensors
//! (parallel over rayon's pool); the optimizer falls back to candle's ops elsewhere.
//!
//! Public items: [`AdamWStep`], [`adamw_step`] (new tensors), [`adamw_step_in_place`] (the
//! variable's and moments' own storage).

use candle_core::{DType, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::dispatch::{InPlace, InPlaceKernel, Ins, Reads, MIN_ELEMS_PER_TASK};
use crate::fused::enabled;
use crate::fused::real::Real;

/// The constants of one AdamW update (see [`adamw_step`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate `η`.
    pub lr: f64,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f64,
    /// `β₁`.
    pub beta1: f64,
    /// `β₂`.
    pub beta2: f64,
    /// `ε`.
    pub eps: f64,
    /// Bias correction `1 − β₁ᵗ`.
    pub bc1: f64,
    /// Bias correction `1 − β₂ᵗ`.
    pub bc2: f64,
}

impl AdamWStep {
    /// One element: returns `(θ', m', v')`, with the operations and roundings of the
    /// op-by-op candle path in `train::optim` (each `affine` is `x·a + b` in `T`).
    #[inline]
    fn update<T: Real>(&self, c: &AdamWConsts<T>, p: T, g: T, m: T, v: T) -> (T, T, T) {
        let z = T::zero();
        let p = if self.weight_decay != 0.0 {
            p * c.decay + z
        } else {
            p
        };
        let m = (m * c.b1 + z) + (g * c.one_m_b1 + z);
        let v = (v * c.b2 + z) + ((g * g) * c.one_m_b2 + z);
        let denom = (v.sqrt() * c.inv_sqrt_bc2 + z) * T::one() + c.eps;
        let upd = (m / denom) * c.step + z;
        (p - upd, m, v)
    }
}

struct AdamWConsts<T> {
    decay: T,
    b1: T,
    one_m_b1: T,
    b2: T,
    one_m_b2: T,
    inv_sqrt_bc2: T,
    eps: T,
    step: T,
}

impl<T: Real> AdamWConsts<T> {
    fn of(s: &AdamWStep) -> Self {
        AdamWConsts {
            decay: T::from_f64(1.0 - s.lr * s.weight_decay),
            b1: T::from_f64(s.beta1),
            one_m_b1: T::from_f64(1.0 - s.beta1),
            b2: T::from_f64(s.beta2),
            one_m_b2: T::from_f64(1.0 - s.beta2),
            inv_sqrt_bc2: T::from_f64(1.0 / s.bc2.sqrt()),
            eps: T::from_f64(s.eps),
            step: T::from_f64(s.lr / s.bc1),
        }
    }
}

fn adamw_vecs<T: Real>(s: &AdamWStep, p: &[T], g: &[T], m: &[T], v: &[T]) -> [Vec<T>; 3] {
    let c = AdamWConsts::<T>::of(s);
    let n = p.len();
    // Written without zero-filling first: a memset of three parameter-sized buffers per step.
    let (mut np, mut nm, mut nv): (Vec<T>, Vec<T>, Vec<T>) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let chunk = MIN_ELEMS_PER_TASK;
    np.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .zip(nm.spare_capacity_mut()[..n].par_chunks_mut(chunk))
        .zip(nv.spare_capacity_mut()[..n].par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(k, ((op, om), ov))| {
            difinfo::simd::vectorized(|| {
                let o = k * chunk;
                for i in 0..op.len() {
                    let j = o + i;
                    let (a, b, d) = s.update(&c, p[j], g[j], m[j], v[j]);
                    op[i].write(a);
                    om[i].write(b);
                    ov[i].write(d);
                }
            })
        });
    // SAFETY: the loop wrote all n elements of each vector (equal lengths, chunked alike); a
    // panic propagates before these lines.
    unsafe {
        np.set_len(n);
        nm.set_len(n);
        nv.set_len(n);
    }
    [np, nm, nv]
}

/// One fused AdamW update on CPU tensors: returns `(θ', m', v')` for parameters `p`,
/// gradient `g` and moments `m`, `v`, or `None` when the fused kernel does not apply (another
/// device, a dtype other than f32/f64, mixed dtypes or sizes, a non-contiguous input); the
/// caller then runs the op-by-op update.
///
/// # Formula
/// `θ ← θ(1 − ηλ)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `θ ← θ − (η/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε)`, element by element with the same
/// operations and roundings as the op-by-op path (bit-identical results), in one pass.
///
/// # Errors
/// Tensor errors building the outputs.
pub fn adamw_step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamWStep,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let _p = crate::profile::region("AdamW");
    let ts = [p, g, m, v];
    if !applies(&ts) {
        return Ok(None);
    }
    let r = Reads::of(&ts);
    Ok(Some(match p.dtype() {
        DType::F32 => adamw_tensors::<f32>(step, &r, p)?,
        _ => adamw_tensors::<f64>(step, &r, p)?,
    }))
}

/// Whether the fused step applies to `[p, g, m, v]`: contiguous f32/f64 CPU tensors of one
/// dtype and shape.
fn applies(ts: &[&Tensor; 4]) -> bool {
    let p = ts[0];
    enabled(p)
        && ts.iter().all(|t| {
            t.device().is_cpu()
                && t.dtype() == p.dtype()
                && t.shape() == p.shape()
                && t.layout().contiguous_offsets().is_some()
        })
}

/// [`adamw_vecs`] on the data of `[p, g, m, v]`, as new tensors of `p`'s shape.
fn adamw_tensors<T: Real>(
    s: &AdamWStep,
    r: &Reads,
    p: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let [a, b, c] = adamw_vecs::<T>(s, r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
    let mk = |v: Vec<T>| Tensor::from_vec(v, p.shape(), p.device());
    Ok((mk(a)?, mk(b)?, mk(c)?))
}

/// `m ← β₁m + (1−β₁)g` (`second`: `v ← β₂v + (1−β₂)g²`) in place, with [`AdamWStep::update`]'s
/// operations.
struct AdamWMoment {
    step: AdamWStep,
    second: bool,
}

/// `θ ← θ(1 − ηλ) − (η/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε)` in place from the updated moments, with
/// [`AdamWStep::update`]'s operations.
struct AdamWParam(AdamWStep);

impl InPlaceKernel for AdamWMoment {
    const NAME: &'static str = "fused-adamw-moment";

    fn cpu<T: Real>(&self, m: &mut [T], _shape: &Shape, srcs: &Ins<'_>) -> Result<()> {
        let g = srcs.get::<T>(0)?;
        let c = AdamWConsts::<T>::of(&self.step);
        let z = T::zero();
        let (b, one_m_b) = if self.second {
            (c.b2, c.one_m_b2)
        } else {
            (c.b1, c.one_m_b1)
        };
        let second = self.second;
        m.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(g.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|(m, g)| {
                difinfo::simd::vectorized(|| {
                    for (m, &g) in m.iter_mut().zip(g) {
                        let gg = if second { g * g } else { g };
                        *m = (*m * b + z) + (gg * one_m_b + z);
                    }
                })
            });
        Ok(())
    }
}

impl InPlaceKernel for AdamWParam {
    const NAME: &'static str = "fused-adamw-param";

    fn cpu<T: Real>(&self, p: &mut [T], _shape: &Shape, srcs: &Ins<'_>) -> Result<()> {
        let (m, v) = (srcs.get::<T>(0)?, srcs.get::<T>(1)?);
        let s = &self.0;
        let c = AdamWConsts::<T>::of(s);
        let z = T::zero();
        let decay = s.weight_decay != 0.0;
        p.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(m.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(v.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((p, m), v)| {
                difinfo::simd::vectorized(|| {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let q = if decay { *p * c.decay + z } else { *p };
                        let denom = (v.sqrt() * c.inv_sqrt_bc2 + z) * T::one() + c.eps;
                        *p = q - ((m / denom) * c.step + z);
                    }
                })
            });
        Ok(())
    }
}

/// [`adamw_step`] in place: `m`, `v` and then `θ` (the variable's own storage) are overwritten
/// with their updated values, element by element with the same operations (bit-identical
/// results), in three parallel passes and without any new parameter-sized buffer (the
/// out-of-place step holds three more copies of the largest parameter). Returns false, and
/// changes nothing, when the fused kernel does not apply (as [`adamw_step`]).
///
/// # Errors
/// Tensor errors.
pub fn adamw_step_in_place(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamWStep,
) -> Result<bool> {
    let _p = crate::profile::region("AdamW");
    if !applies(&[p, g, m, v]) {
        return Ok(false);
    }
    m.inplace_op2(
        g,
        &InPlace(AdamWMoment {
            step: *step,
            second: false,
        }),
    )?;
    v.inplace_op2(
        g,
        &InPlace(AdamWMoment {
            step: *step,
            second: true,
        }),
    )?;
    p.inplace_op3(m, v, &InPlace(AdamWParam(*step)))?;
    Ok(true)
}
