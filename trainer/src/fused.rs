//! Fused CPU kernels with hand-written backward passes, for the hot element-wise parts of the
//! training forward: RMSNorm, `silu(gate) ⊙ up`, the masked attention softmax and the
//! log-softmax-and-pick of the target tokens.
//!
//! Each op is a candle [`CustomOp2`] whose `bwd` returns the exact gradient (computed by a
//! second, no-backward custom op), so unlike candle's own fused ops (`softmax_last_dim`,
//! `rms_norm`, `rope`) they record a backward pass. They run on contiguous f32/f64 CPU tensors,
//! spread rows over rayon's pool, and replace chains of 4–8 candle ops, each of which
//! allocates and writes a full tensor in the forward and two more (a zero gradient buffer and
//! an accumulation) in the backward. [`enabled`] tells when they apply; otherwise the callers
//! in [`crate::model`] use the unfused, differentiable candle ops (other devices, half types).
//!
//! The arithmetic follows the unfused path op by op (same formulas, same order of the
//! element-wise operations); only the summation order of reductions may differ, so results
//! agree to rounding. `tests/fused_ops.rs` checks values and gradients against the unfused
//! path in f64.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Rows handled by one rayon task at least (keeps tasks large enough to amortize scheduling).
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Whether the fused kernels apply to `t`: a CPU tensor of dtype f32 or f64.
pub fn enabled(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float operations the kernels need, for f32 and f64.
trait Real: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn fmax(self, o: Self) -> Self;
    const NEG_INF: Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn fmax(self, o: Self) -> Self {
        f32::max(self, o)
    }
    const NEG_INF: Self = f32::NEG_INFINITY;
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn fmax(self, o: Self) -> Self {
        f64::max(self, o)
    }
    const NEG_INF: Self = f64::NEG_INFINITY;
}

/// The contiguous data of a CPU storage under `layout`.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let d = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("fused op: non-contiguous input"),
    }
}

/// Rows per rayon task for rows of `row_len` elements.
fn rows_per_task(row_len: usize) -> usize {
    MIN_ELEMS_PER_TASK.div_ceil(row_len.max(1)).max(1)
}

/// Fills `out` (rows of `row_len`) in parallel: `f(first_row_index, rows)`.
fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = rows_per_task(row_len);
    out.par_chunks_mut(rows * row_len)
        .enumerate()
        .for_each(|(c, chunk)| f(c * rows, chunk));
}

// ---------------------------------------------------------------------------------------------
// log-softmax + gather of the target token
// ---------------------------------------------------------------------------------------------

/// Log-sum-exp of a row with a max shift: `ln Σ exp(z − m) + m`.
#[inline]
fn row_lse<T: Real>(z: &[T]) -> T {
    let m = z.iter().fold(T::NEG_INF, |a, &b| a.fmax(b));
    let mut s = T::zero();
    for &v in z {
        s += (v - m).exp();
    }
    s.ln() + m
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    data::<u32>(s, l)
}

struct TokenLogps;

impl TokenLogps {
    fn fwd<T: Real>(z: &[T], t: &[u32], v: usize) -> Result<Vec<T>> {
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
            bail!("token_logps: target {bad} outside the vocabulary of {v}");
        }
        let mut out = vec![T::zero(); t.len()];
        let rows = rows_per_task(v);
        out.par_chunks_mut(rows).enumerate().for_each(|(c, o)| {
            for (i, o) in o.iter_mut().enumerate() {
                let r = c * rows + i;
                let row = &z[r * v..(r + 1) * v];
                *o = row[t[r] as usize] - row_lse(row);
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for TokenLogps {
    fn name(&self) -> &'static str {
        "fused-token-logps"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().dims() != [n] {
            bail!(
                "token_logps: targets {:?} for logits [{n}, {v}]",
                l2.shape()
            );
        }
        let t = targets_of(s2, l2)?;
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(Self::fwd(data::<f32>(s1, l1)?, t, v)?),
            DType::F64 => CpuStorage::F64(Self::fwd(data::<f64>(s1, l1)?, t, v)?),
            dt => bail!("token_logps: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TokenLogpsBwd)?;
        Ok((Some(g), None))
    }
}

/// `∂/∂z[n, v] = g[n] · (1[v = t_n] − softmax(z[n])_v)`.
struct TokenLogpsBwd;

impl TokenLogpsBwd {
    fn bwd<T: Real>(z: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); z.len()];
        par_rows(&mut out, v, |r0, o| {
            for (i, orow) in o.chunks_mut(v).enumerate() {
                let r = r0 + i;
                let row = &z[r * v..(r + 1) * v];
                let lse = row_lse(row);
                let gr = g[r];
                for (o, &x) in orow.iter_mut().zip(row) {
                    *o = -(gr * (x - lse).exp());
                }
                orow[t[r] as usize] += gr;
            }
        });
        out
    }
}

impl CustomOp3 for TokenLogpsBwd {
    fn name(&self) -> &'static str {
        "fused-token-logps-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let t = targets_of(s2, l2)?;
        let out = match s1.dtype() {
            DType::F32 => {
                CpuStorage::F32(Self::bwd(data::<f32>(s1, l1)?, t, data::<f32>(s3, l3)?, v))
            }
            DType::F64 => {
                CpuStorage::F64(Self::bwd(data::<f64>(s1, l1)?, t, data::<f64>(s3, l3)?, v))
            }
            dt => bail!("token_logps: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `out[n] = z[n, t_n] − log Σ_v exp z[n, v]` for logits `z: [N, V]` and targets `t: [N]`
/// (u32), differentiable in `z`; never materializes the `[N, V]` log-softmax.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]), a target outside the vocabulary.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenLogps)
}

// ---------------------------------------------------------------------------------------------
// scaled, masked softmax over the last dimension (attention)
// ---------------------------------------------------------------------------------------------

struct MaskedSoftmax {
    scale: f64,
}

/// Geometry: scores `[B, H, l, t]`, mask `[mb, 1, l, t]` with `mb ∈ {1, B}`.
#[derive(Clone, Copy)]
struct Geo {
    h: usize,
    l: usize,
    t: usize,
    per_batch_mask: bool,
}

impl Geo {
    fn of(scores: &Shape, mask: &Shape) -> Result<Self> {
        let (b, h, l, t) = scores.dims4()?;
        let (mb, m1, ml, mt) = mask.dims4()?;
        if m1 != 1 || ml != l || mt != t || !(mb == 1 || mb == b) {
            bail!("masked_softmax: mask {mask:?} for scores {scores:?}");
        }
        Ok(Geo {
            h,
            l,
            t,
            per_batch_mask: mb == b && b > 1,
        })
    }

    /// Offset of the mask row for score row `r`.
    fn mask_row(&self, r: usize) -> usize {
        let i = r % self.l;
        let b = if self.per_batch_mask {
            r / (self.h * self.l)
        } else {
            0
        };
        (b * self.l + i) * self.t
    }
}

impl MaskedSoftmax {
    fn fwd<T: Real>(&self, s: &[T], m: &[T], geo: Geo) -> Vec<T> {
        let t = geo.t;
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); s.len()];
        par_rows(&mut out, t, |r0, o| {
            for (i, orow) in o.chunks_mut(t).enumerate() {
                let r = r0 + i;
                let srow = &s[r * t..(r + 1) * t];
                let mrow = &m[geo.mask_row(r)..geo.mask_row(r) + t];
                let mut mx = T::NEG_INF;
                for ((o, &x), &mk) in orow.iter_mut().zip(srow).zip(mrow) {
                    *o = x * scale + mk;
                    mx = mx.fmax(*o);
                }
                let mut sum = T::zero();
                for o in orow.iter_mut() {
                    *o = (*o - mx).exp();
                    sum += *o;
                }
                for o in orow.iter_mut() {
                    *o /= sum;
                }
            }
        });
        out
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = Geo::of(l1.shape(), l2.shape())?;
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => {
                CpuStorage::F32(self.fwd(data::<f32>(s1, l1)?, data::<f32>(s2, l2)?, geo))
            }
            (DType::F64, DType::F64) => {
                CpuStorage::F64(self.fwd(data::<f64>(s1, l1)?, data::<f64>(s2, l2)?, geo))
            }
            (a, b) => bail!("masked_softmax: scores {a:?} and mask {b:?} (f32 or f64, equal)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(g), None))
    }
}

/// `∂/∂s_j = scale · p_j (g_j − Σ_k g_k p_k)` from the softmax output `p` and its gradient `g`.
struct SoftmaxBwd {
    scale: f64,
}

impl SoftmaxBwd {
    fn bwd<T: Real>(&self, p: &[T], g: &[T], t: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); p.len()];
        par_rows(&mut out, t, |r0, o| {
            for (i, orow) in o.chunks_mut(t).enumerate() {
                let r = r0 + i;
                let prow = &p[r * t..(r + 1) * t];
                let grow = &g[r * t..(r + 1) * t];
                let mut dot = T::zero();
                for (&a, &b) in prow.iter().zip(grow) {
                    dot += a * b;
                }
                for ((o, &a), &b) in orow.iter_mut().zip(prow).zip(grow) {
                    *o = scale * (a * (b - dot));
                }
            }
        });
        out
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = l1.shape().dims().last().copied().unwrap_or(1);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.bwd(data::<f32>(s1, l1)?, data::<f32>(s2, l2)?, t)),
            DType::F64 => CpuStorage::F64(self.bwd(data::<f64>(s1, l1)?, data::<f64>(s2, l2)?, t)),
            dt => bail!("masked_softmax: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `softmax(scale · scores + mask)` over the last dimension, differentiable in `scores`
/// (the mask is a constant: no gradient is computed for it).
///
/// `scores: [B, H, l, t]`, `mask: [B, 1, l, t]` or `[1, 1, l, t]`, same dtype.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    eps: f64,
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

    fn fwd<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let h = w.len();
        let eps = T::from_f64(self.eps);
        let mut out = vec![T::zero(); x.len()];
        par_rows(&mut out, h, |r0, o| {
            for (i, orow) in o.chunks_mut(h).enumerate() {
                let r = r0 + i;
                let xrow = &x[r * h..(r + 1) * h];
                let d = Self::denom(xrow, eps);
                for ((o, &xv), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                    *o = (xv / d) * wv;
                }
            }
        });
        out
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = l1.shape().dims().last().copied().unwrap_or(0);
        if l2.shape().dims() != [h] {
            bail!(
                "rms_norm: weight {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => {
                CpuStorage::F32(self.fwd(data::<f32>(s1, l1)?, data::<f32>(s2, l2)?))
            }
            (DType::F64, DType::F64) => {
                CpuStorage::F64(self.fwd(data::<f64>(s1, l1)?, data::<f64>(s2, l2)?))
            }
            (a, b) => bail!("rms_norm: input {a:?} and weight {b:?} (f32 or f64, equal)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count() / w.elem_count().max(1);
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let gx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let gw = both.narrow(0, n, 1)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw)))
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
    fn bwd<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let h = w.len();
        let n = x.len() / h.max(1);
        let eps = T::from_f64(self.eps);
        let hf = T::from_f64(h as f64);
        let mut out = vec![T::zero(); x.len() + h];
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

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = l2.shape().elem_count();
        let n = l1.shape().elem_count() / h.max(1);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.bwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                data::<f32>(s3, l3)?,
            )),
            DType::F64 => CpuStorage::F64(self.bwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                data::<f64>(s3, l3)?,
            )),
            dt => bail!("rms_norm: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok((out, Shape::from((n + 1, h))))
    }
}

/// RMSNorm `y = (x / sqrt(mean(x²) + ε)) ⊙ w` over the last dimension, differentiable in `x`
/// and `w`.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// silu(a) ⊙ b
// ---------------------------------------------------------------------------------------------

struct SiluMul;

impl SiluMul {
    fn fwd<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); a.len()];
        par_rows(&mut out, 1, |r0, o| {
            let n = o.len();
            for ((o, &x), &y) in o.iter_mut().zip(&a[r0..r0 + n]).zip(&b[r0..r0 + n]) {
                *o = x / (T::one() + (-x).exp()) * y;
            }
        });
        out
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("silu_mul: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => {
                CpuStorage::F32(Self::fwd(data::<f32>(s1, l1)?, data::<f32>(s2, l2)?))
            }
            (DType::F64, DType::F64) => {
                CpuStorage::F64(Self::fwd(data::<f64>(s1, l1)?, data::<f64>(s2, l2)?))
            }
            (a, b) => bail!("silu_mul: dtypes {a:?} and {b:?} (f32 or f64, equal)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &SiluMulBwd)?;
        let ga = both.narrow(0, 0, 1)?.reshape(a.shape())?;
        let gb = both.narrow(0, 1, 1)?.reshape(b.shape())?;
        Ok((Some(ga), Some(gb)))
    }
}

/// Gradients of `silu(a) ⊙ b`, `[2, numel]`: `g ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))` then `g ⊙ silu(a)`.
struct SiluMulBwd;

impl SiluMulBwd {
    fn bwd<T: Real>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
        let n = a.len();
        let mut out = vec![T::zero(); 2 * n];
        let (ga, gb) = out.split_at_mut(n);
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
                    ga[i] = gv * y * (sig * (T::one() + x * (T::one() - sig)));
                    gb[i] = gv * silu;
                }
            });
        out
    }
}

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "fused-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(Self::bwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                data::<f32>(s3, l3)?,
            )),
            DType::F64 => CpuStorage::F64(Self::bwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                data::<f64>(s3, l3)?,
            )),
            dt => bail!("silu_mul: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        Ok((out, Shape::from((2, n))))
    }
}

/// `silu(a) ⊙ b` with `silu(x) = x / (1 + e^{−x})`, differentiable in `a` and `b`.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, SiluMul)
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

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
    let (mut np, mut nm, mut nv) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
    let chunk = MIN_ELEMS_PER_TASK;
    np.par_chunks_mut(chunk)
        .zip(nm.par_chunks_mut(chunk))
        .zip(nv.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(k, ((op, om), ov))| {
            let o = k * chunk;
            for i in 0..op.len() {
                let j = o + i;
                (op[i], om[i], ov[i]) = s.update(&c, p[j], g[j], m[j], v[j]);
            }
        });
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
    let ts = [p, g, m, v];
    let dt = p.dtype();
    if !enabled(p)
        || ts
            .iter()
            .any(|t| !t.device().is_cpu() || t.dtype() != dt || t.shape() != p.shape())
    {
        return Ok(None);
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut cpu = Vec::with_capacity(4);
    for (st, l) in &guards {
        match &**st {
            candle_core::Storage::Cpu(c) => match l.contiguous_offsets() {
                Some(r) => cpu.push((c, r)),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    fn sl<'a, T: WithDType>(x: &(&'a CpuStorage, (usize, usize))) -> Result<&'a [T]> {
        Ok(&x.0.as_slice::<T>()?[x.1 .0..x.1 .1])
    }
    let out: [CpuStorage; 3] = match dt {
        DType::F32 => {
            adamw_vecs::<f32>(step, sl(&cpu[0])?, sl(&cpu[1])?, sl(&cpu[2])?, sl(&cpu[3])?)
                .map(CpuStorage::F32)
        }
        DType::F64 => {
            adamw_vecs::<f64>(step, sl(&cpu[0])?, sl(&cpu[1])?, sl(&cpu[2])?, sl(&cpu[3])?)
                .map(CpuStorage::F64)
        }
        _ => return Ok(None),
    };
    drop(cpu);
    drop(guards);
    let [a, b, c] = out;
    let mk = |s: CpuStorage| -> Result<Tensor> {
        let t = match s {
            CpuStorage::F32(v) => Tensor::from_vec(v, p.shape(), p.device())?,
            CpuStorage::F64(v) => Tensor::from_vec(v, p.shape(), p.device())?,
            _ => bail!("adamw_step: unexpected dtype"),
        };
        Ok(t)
    };
    Ok(Some((mk(a)?, mk(b)?, mk(c)?)))
}
