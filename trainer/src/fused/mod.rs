//! Fused CPU kernels with hand-written backward passes for the training forward: RMSNorm,
//! `silu(gate) ⊙ up` and the gated MLP input, head split with RoPE and grouped-query
//! repetition, the attention core (in query blocks that skip masked keys), linear layers on the
//! `gemm` crate (with a residual folded in), the LM head with log-softmax and pick of the
//! targets, the embedding lookup, AdamW in one pass, and the whole-gradient reductions (global
//! norm, clipping, the DPO-PG projection). [`decoder_layer`] runs a whole decoder layer as one
//! node.
//!
//! Each op is a candle custom op whose `bwd` returns the exact gradient (computed by a
//! second, no-backward custom op or directly), so unlike candle's own fused ops
//! (`softmax_last_dim`, `rms_norm`, `rope`) they record a backward pass. They run on
//! contiguous f32/f64 CPU tensors, spread rows over rayon's pool, and replace chains of 4–8
//! candle ops, each of which allocates and writes a full tensor in the forward and two more (a
//! zero gradient buffer and an accumulation) in the backward. [`enabled`] tells when they
//! apply; otherwise the callers in [`crate::model`] use the unfused, differentiable candle ops
//! (other devices, half types).
//!
//! The arithmetic follows the unfused path op by op (same formulas, same order of the
//! element-wise operations); only the summation order of reductions may differ, so results
//! agree to rounding. `tests/fused_ops.rs` checks values and gradients against the unfused
//! path in f64 and f32.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `CpuStorage::F32(body)` or `CpuStorage::F64(body)`, with `$t` naming the float type of
/// `$dt` inside `body`: one kernel call written once for both precisions; any other dtype is an
/// error naming the op.
macro_rules! per_float {
    ($dt:expr, $op:literal, $t:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            DType::F64 => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            dt => bail!(
                concat!($op, ": fused CPU kernel needs f32 or f64, got {:?}"),
                dt
            ),
        }
    };
}

// After `per_float!`, which the layer module uses.
mod layer;
pub use layer::{decoder_layer, embedding, GradSink, LayerDims, LayerWeights, LoraWeights};

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
    const NEG_INF: Self;

    /// The larger of `self` and `o`, NaN when either is NaN (`f32::max` returns the other
    /// operand: a NaN would vanish from a row maximum). A select, not a branch: vectorizes.
    #[inline(always)]
    fn max_nan(self, o: Self) -> Self {
        #[allow(clippy::eq_op)] // o != o: o is NaN
        if o > self || o != o {
            o
        } else {
            self
        }
    }
}

/// `e^x` in f32 without a libm call, branch-free so that loops over slices vectorize: Cody–Waite
/// range reduction `x = n ln 2 + r`, Cephes' degree-6 polynomial for `e^r` (relative error
/// ≲ 2·10⁻⁷, about 2 ulp), `2^n` from the exponent bits; 0 below −87.3 (where f32 leaves the
/// normal range), inputs clamped at 88 above; NaN stays NaN (the clamp is written as a select
/// that keeps a NaN input: `f32::min` would turn it into 88).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = if x > 88.0 { 88.0 } else { x };
    let n = (xc * LOG2E + SHIFTER) - SHIFTER;
    let r = xc - n * C1 - n * C2;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let er = p * (r * r) + r + 1.0;
    // A NaN `n` gives some finite scale here; `er` is NaN then and carries it.
    let scale = f32::from_bits((((n.max(-127.0) as i32) + 127) as u32) << 23);
    let y = er * scale;
    if x < -87.33 {
        0.0
    } else {
        y
    }
}

impl Real for f32 {
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
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

/// Read guards on CPU tensors' storages, lending their data as slices.
struct Reads<'a>(Vec<(candle_core::StorageRef<'a>, &'a Layout)>);

impl<'a> Reads<'a> {
    fn of(ts: &[&'a Tensor]) -> Self {
        Self(ts.iter().map(|t| t.storage_and_layout()).collect())
    }

    /// The contiguous data of the `i`-th tensor.
    fn get<T: WithDType>(&self, i: usize) -> Result<&[T]> {
        let (st, l) = &self.0[i];
        match &**st {
            candle_core::Storage::Cpu(c) => data::<T>(c, l),
            _ => bail!("fused op: expected a CPU tensor"),
        }
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

/// A vector of `n_rows · row_len` elements built in parallel without zero-filling it first:
/// `f(first_row, rows)` receives consecutive whole rows, uninitialized, and must write every
/// element (through [`write_all`]).
fn build_rows<T: Send>(
    n_rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let n = n_rows * row_len;
    let mut v: Vec<T> = Vec::with_capacity(n);
    let rows = rows_per_task(row_len);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut((rows * row_len).max(1))
        .enumerate()
        .for_each(|(c, chunk)| f(c * rows, chunk));
    // SAFETY: `f` wrote every element (each write goes through `write_all`, which checks that
    // it covered its whole slice); a panic in `f` propagates before this line.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, written over rayon's pool (a serial memset of an activation-sized buffer
/// leaves the other cores idle).
fn par_zeros<T: WithDType>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(MIN_ELEMS_PER_TASK)
        .for_each(|c| {
            for x in c {
                x.write(T::zero());
            }
        });
    // SAFETY: every element was just written.
    unsafe { v.set_len(n) };
    v
}

/// A copy of `x`, written over rayon's pool.
fn par_copy<T: WithDType>(x: &[T]) -> Vec<T> {
    build_rows(x.len(), 1, |r0, o| {
        let n = o.len();
        write_all(o, x[r0..r0 + n].iter().copied());
    })
}

/// Writes `src` into every element of `dst` and returns it as initialized.
///
/// # Panics
/// If `src` does not have exactly `dst.len()` items.
fn write_all<T>(dst: &mut [MaybeUninit<T>], src: impl IntoIterator<Item = T>) -> &mut [T] {
    let mut k = 0;
    for (d, x) in dst.iter_mut().zip(src) {
        d.write(x);
        k += 1;
    }
    assert_eq!(k, dst.len(), "write_all: short source");
    // SAFETY: all `dst.len()` elements were just written; MaybeUninit<T> has T's layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) }
}

// ---------------------------------------------------------------------------------------------
// log-softmax + gather of the target token
// ---------------------------------------------------------------------------------------------

/// Log-sum-exp of a row with a max shift: `ln Σ exp(z − m) + m`.
#[inline]
fn row_lse<T: Real>(z: &[T]) -> T {
    let m = row_max(z);
    row_sum_exp(z, m).ln() + m
}

/// `Σ exp(z − m)` with 8 lane accumulators (vectorizes).
#[inline]
fn row_sum_exp<T: Real>(z: &[T], m: T) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = z.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - m).exp();
        }
    }
    let mut s = lane_sum(acc);
    for &v in chunks.remainder() {
        s += (v - m).exp();
    }
    s
}

/// The maximum of a row with 8 lane accumulators (vectorizes); NaN if the row holds a NaN.
#[inline]
fn row_max<T: Real>(z: &[T]) -> T {
    let mut acc = [T::NEG_INF; 8];
    let mut chunks = z.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max_nan(v);
        }
    }
    let mut m = acc.iter().fold(T::NEG_INF, |a, &b| a.max_nan(b));
    for &v in chunks.remainder() {
        m = m.max_nan(v);
    }
    m
}

/// `Σ z` with 8 lane accumulators (vectorizes).
#[inline]
fn row_sum<T: Real>(z: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = z.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = lane_sum(acc);
    for &v in chunks.remainder() {
        s += v;
    }
    s
}

#[inline]
fn lane_sum<T: Real>(a: [T; 8]) -> T {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    data::<u32>(s, l)
}

struct TokenLogps {
    /// Each row's log-sum-exp from the forward pass (exact in f64), taken by the backward pass.
    lse: std::sync::Mutex<Option<Vec<f64>>>,
}

impl TokenLogps {
    fn fwd<T: Real>(&self, z: &[T], t: &[u32], v: usize) -> Result<Vec<T>> {
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
            bail!("token_logps: target {bad} outside the vocabulary of {v}");
        }
        let mut out = vec![T::zero(); t.len()];
        let mut lse = vec![0f64; t.len()];
        let rows = rows_per_task(v);
        out.par_chunks_mut(rows)
            .zip(lse.par_chunks_mut(rows))
            .enumerate()
            .for_each(|(c, (o, ls))| {
                for (i, (o, ls)) in o.iter_mut().zip(ls).enumerate() {
                    let r = c * rows + i;
                    let row = &z[r * v..(r + 1) * v];
                    let l = row_lse(row);
                    *o = row[t[r] as usize] - l;
                    *ls = l.to_f64();
                }
            });
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
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
        let out = per_float!(s1.dtype(), "token_logps", Fl =>
            self.fwd(data::<Fl>(s1, l1)?, t, v)?);
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().ok().and_then(|mut s| s.take());
        let g = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TokenLogpsBwd { lse })?;
        Ok((Some(g), None))
    }
}

/// `∂/∂z[n, v] = g[n] · (1[v = t_n] − softmax(z[n])_v)`.
/// The forward pass's log-sum-exps when kept (recomputed otherwise, e.g. a second backward).
struct TokenLogpsBwd {
    lse: Option<Vec<f64>>,
}

impl TokenLogpsBwd {
    fn bwd<T: Real>(&self, z: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
        build_rows(g.len(), v, |r0, o| {
            for (i, orow) in o.chunks_mut(v).enumerate() {
                let r = r0 + i;
                let row = &z[r * v..(r + 1) * v];
                let lse = match &self.lse {
                    Some(l) => T::from_f64(l[r]),
                    None => row_lse(row),
                };
                let gr = g[r];
                let orow = write_all(orow, row.iter().map(|&x| -(gr * (x - lse).exp())));
                orow[t[r] as usize] += gr;
            }
        })
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
        let out = per_float!(s1.dtype(), "token_logps", Fl =>
            self.bwd(data::<Fl>(s1, l1)?, t, data::<Fl>(s3, l3)?, v));
        Ok((out, l1.shape().clone()))
    }
}

/// `out[n] = z[n, t_n] − log Σ_v exp z[n, v]` for logits `z: [N, V]` and targets `t: [N]`
/// (u32), differentiable in `z`; never materializes the `[N, V]` log-softmax.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]), a target outside the vocabulary.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        TokenLogps {
            lse: std::sync::Mutex::new(None),
        },
    )
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
        let out = per_float!(s1.dtype(), "masked_softmax", Fl =>
            self.bwd(data::<Fl>(s1, l1)?, data::<Fl>(s2, l2)?, t));
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
    /// `resid`, when given (`[N, H]`), is added to `∂/∂x` (the residual stream's gradient
    /// joining the norm's, see [`layer`]).
    fn bwd<T: Real>(&self, x: &[T], w: &[T], g: &[T], resid: Option<&[T]>) -> Vec<T> {
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
        let out = per_float!(s1.dtype(), "rms_norm", Fl => self.bwd(
            data::<Fl>(s1, l1)?,
            data::<Fl>(s2, l2)?,
            data::<Fl>(s3, l3)?,
            None,
        ));
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
        let out = per_float!(s1.dtype(), "silu_mul", Fl => Self::bwd(
            data::<Fl>(s1, l1)?,
            data::<Fl>(s2, l2)?,
            data::<Fl>(s3, l3)?,
        ));
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
// whole-gradient reductions and maps (global norm, clipping, the DPO-PG projection)
// ---------------------------------------------------------------------------------------------

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
    if x.shape() != y.shape() {
        return Ok(None);
    }
    let Some((dt, r)) = same_flat(&[x, y]) else {
        return Ok(None);
    };
    let dev = candle_core::Device::Cpu;
    Ok(Some(match dt {
        DType::F32 => Tensor::from_vec(
            axpy_slices(r.get::<f32>(0)?, r.get::<f32>(1)?, c as f32),
            x.shape(),
            &dev,
        )?,
        _ => Tensor::from_vec(
            axpy_slices(r.get::<f64>(0)?, r.get::<f64>(1)?, c),
            x.shape(),
            &dev,
        )?,
    }))
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
    let Some((dt, r)) = same_flat(&[x]) else {
        return Ok(None);
    };
    let dev = candle_core::Device::Cpu;
    Ok(Some(match dt {
        DType::F32 => Tensor::from_vec(scale_slice(r.get::<f32>(0)?, c as f32), x.shape(), &dev)?,
        _ => Tensor::from_vec(scale_slice(r.get::<f64>(0)?, c), x.shape(), &dev)?,
    }))
}

/// `x ← c·x` (see [`scale_in_place`]).
struct ScaleAssign(f64);

impl candle_core::InplaceOp1 for ScaleAssign {
    fn name(&self) -> &'static str {
        "fused-scale-assign"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        fn run<T: Real>(x: &mut [T], c: T) {
            x.par_chunks_mut(MIN_ELEMS_PER_TASK).for_each(|x| {
                for u in x.iter_mut() {
                    *u = *u * c + T::zero();
                }
            });
        }
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("scale: non-contiguous".into()))?;
        match s {
            CpuStorage::F32(x) => run(&mut x[a..b], self.0 as f32),
            CpuStorage::F64(x) => run(&mut x[a..b], self.0),
            s => bail!("scale: needs f32 or f64, got {:?}", s.dtype()),
        }
        Ok(())
    }
}

/// [`scale`] in place (the tensor's own storage is overwritten; same roundings): no second
/// copy of the gradients when clipping them. False, and nothing done, when it does not apply.
///
/// # Errors
/// Tensor errors.
pub fn scale_in_place(x: &Tensor, c: f64) -> Result<bool> {
    if !enabled(x) || x.layout().contiguous_offsets().is_none() {
        return Ok(false);
    }
    x.inplace_op1(&ScaleAssign(c))?;
    Ok(true)
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
            let o = k * chunk;
            for i in 0..op.len() {
                let j = o + i;
                let (a, b, d) = s.update(&c, p[j], g[j], m[j], v[j]);
                op[i].write(a);
                om[i].write(b);
                ov[i].write(d);
            }
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

/// `m ← β₁m + (1−β₁)g` (`second`: `v ← β₂v + (1−β₂)g²`) in place, with [`AdamWStep::update`]'s
/// operations.
struct AdamWMoment {
    step: AdamWStep,
    second: bool,
}

/// `θ ← θ(1 − ηλ) − (η/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε)` in place from the updated moments, with
/// [`AdamWStep::update`]'s operations.
struct AdamWParam(AdamWStep);

/// The element range of a contiguous layout.
fn offsets(l: &Layout) -> Result<std::ops::Range<usize>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("adamw: non-contiguous state".into()))?;
    Ok(a..b)
}

impl AdamWMoment {
    fn run<T: Real>(&self, m: &mut [T], g: &[T]) {
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
                for (m, &g) in m.iter_mut().zip(g) {
                    let gg = if second { g * g } else { g };
                    *m = (*m * b + z) + (gg * one_m_b + z);
                }
            });
    }
}

impl candle_core::InplaceOp2 for AdamWMoment {
    fn name(&self) -> &'static str {
        "fused-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let r = offsets(l1)?;
        match s1 {
            CpuStorage::F32(m) => self.run(&mut m[r], data::<f32>(s2, l2)?),
            CpuStorage::F64(m) => self.run(&mut m[r], data::<f64>(s2, l2)?),
            s => bail!(
                "adamw: fused CPU kernel needs f32 or f64, got {:?}",
                s.dtype()
            ),
        }
        Ok(())
    }
}

impl AdamWParam {
    fn run<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let s = &self.0;
        let c = AdamWConsts::<T>::of(s);
        let z = T::zero();
        let decay = s.weight_decay != 0.0;
        p.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(m.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(v.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let q = if decay { *p * c.decay + z } else { *p };
                    let denom = (v.sqrt() * c.inv_sqrt_bc2 + z) * T::one() + c.eps;
                    *p = q - ((m / denom) * c.step + z);
                }
            });
    }
}

impl candle_core::InplaceOp3 for AdamWParam {
    fn name(&self) -> &'static str {
        "fused-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let r = offsets(l1)?;
        match s1 {
            CpuStorage::F32(p) => self.run(&mut p[r], data::<f32>(s2, l2)?, data::<f32>(s3, l3)?),
            CpuStorage::F64(p) => self.run(&mut p[r], data::<f64>(s2, l2)?, data::<f64>(s3, l3)?),
            s => bail!(
                "adamw: fused CPU kernel needs f32 or f64, got {:?}",
                s.dtype()
            ),
        }
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
    let ts = [p, g, m, v];
    let dt = p.dtype();
    let applies = enabled(p)
        && ts.iter().all(|t| {
            t.device().is_cpu()
                && t.dtype() == dt
                && t.shape() == p.shape()
                && t.layout().contiguous_offsets().is_some()
        });
    if !applies {
        return Ok(false);
    }
    m.inplace_op2(
        g,
        &AdamWMoment {
            step: *step,
            second: false,
        },
    )?;
    v.inplace_op2(
        g,
        &AdamWMoment {
            step: *step,
            second: true,
        },
    )?;
    p.inplace_op3(m, v, &AdamWParam(*step))?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// head split (+ RoPE, + grouped-query repetition)
// ---------------------------------------------------------------------------------------------

/// `[B·l, h_in·d]` → `[B, h_out, l, d]`, output head `o` reading input head `o / (h_out/h_in)`,
/// with rotate-half RoPE applied when `rope` is set.
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    l: usize,
    h_in: usize,
    h_out: usize,
    d: usize,
    rope: bool,
}

impl Heads {
    fn check(&self, x: &Shape, cos: &Shape, sin: &Shape) -> Result<()> {
        let ok = x.dims() == [self.b * self.l, self.h_in * self.d]
            && cos.dims() == [self.l, self.d]
            && sin.dims() == [self.l, self.d]
            && self.h_in > 0
            && self.h_out % self.h_in == 0
            && self.d % 2 == 0;
        if !ok {
            bail!(
                "split_heads: input {x:?}, tables {cos:?} {sin:?} for {} heads of {} ({} out)",
                self.h_in,
                self.d,
                self.h_out
            );
        }
        Ok(())
    }

    fn fwd<T: Real>(&self, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let Heads {
            l,
            h_in,
            h_out,
            d,
            rope,
            ..
        } = *self;
        let rep = h_out / h_in;
        let half = d / 2;
        let mut out = par_zeros(self.b * h_out * l * d);
        par_rows(&mut out, d, |r0, o| {
            for (k, orow) in o.chunks_mut(d).enumerate() {
                let r = r0 + k; // (bi, ho, i)
                let i = r % l;
                let ho = (r / l) % h_out;
                let bi = r / (l * h_out);
                let src = &x[(bi * l + i) * h_in * d + (ho / rep) * d..][..d];
                if rope {
                    let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                    for j in 0..d {
                        let rot = if j < half {
                            -src[j + half]
                        } else {
                            src[j - half]
                        };
                        orow[j] = src[j] * c[j] + rot * s[j];
                    }
                } else {
                    orow.copy_from_slice(src);
                }
            }
        });
        out
    }

    fn bwd<T: Real>(&self, g: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let Heads {
            l,
            h_in,
            h_out,
            d,
            rope,
            ..
        } = *self;
        let rep = h_out / h_in;
        let half = d / 2;
        let w = h_in * d;
        let mut out = par_zeros(self.b * l * w);
        par_rows(&mut out, w, |r0, o| {
            for (k, orow) in o.chunks_mut(w).enumerate() {
                let r = r0 + k; // (bi, i)
                let (bi, i) = (r / l, r % l);
                let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                for hk in 0..h_in {
                    let acc = &mut orow[hk * d..(hk + 1) * d];
                    for ho in hk * rep..(hk + 1) * rep {
                        let gr = &g[((bi * h_out + ho) * l + i) * d..][..d];
                        if rope {
                            for j in 0..d {
                                let t = if j < half {
                                    gr[j + half] * s[j + half]
                                } else {
                                    -(gr[j - half] * s[j - half])
                                };
                                acc[j] += gr[j] * c[j] + t;
                            }
                        } else {
                            for j in 0..d {
                                acc[j] += gr[j];
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

struct HeadsFwd(Heads);
struct HeadsBwd(Heads);

macro_rules! heads_cpu_fwd {
    ($self:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident, $s3:ident, $l3:ident, $f:ident) => {{
        match ($s1.dtype(), $s2.dtype(), $s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => CpuStorage::F32($self.0.$f(
                data::<f32>($s1, $l1)?,
                data::<f32>($s2, $l2)?,
                data::<f32>($s3, $l3)?,
            )),
            (DType::F64, DType::F64, DType::F64) => CpuStorage::F64($self.0.$f(
                data::<f64>($s1, $l1)?,
                data::<f64>($s2, $l2)?,
                data::<f64>($s3, $l3)?,
            )),
            (a, b, c) => bail!("split_heads: dtypes {a:?}, {b:?}, {c:?} (f32 or f64, equal)"),
        }
    }};
}

impl CustomOp3 for HeadsFwd {
    fn name(&self) -> &'static str {
        "fused-split-heads"
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
        self.0.check(l1.shape(), l2.shape(), l3.shape())?;
        let out = heads_cpu_fwd!(self, s1, l1, s2, l2, s3, l3, fwd);
        let h = self.0;
        Ok((out, Shape::from((h.b, h.h_out, h.l, h.d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &HeadsBwd(self.0))?;
        Ok((Some(g), None, None))
    }
}

impl CustomOp3 for HeadsBwd {
    fn name(&self) -> &'static str {
        "fused-split-heads-bwd"
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
        let h = self.0;
        if l1.shape().dims() != [h.b, h.h_out, h.l, h.d] {
            bail!("split_heads backward: gradient {:?}", l1.shape());
        }
        let out = heads_cpu_fwd!(self, s1, l1, s2, l2, s3, l3, bwd);
        Ok((out, Shape::from((h.b * h.l, h.h_in * h.d))))
    }
}

/// Splits the heads of a projection, `x: [B·l, h_in·d]` → `[B, h_out, l, d]` (contiguous),
/// output head `o` a copy of input head `o / (h_out / h_in)` (grouped-query attention's
/// key/value repetition), with rotate-half RoPE (`cos`, `sin`: `[l, d]` tables, see
/// [`crate::model::apply_rope`]) when `rope` is set; differentiable in `x` (the backward sums
/// the repeated heads). Replaces reshape → transpose → copy → RoPE (7 ops) → repeat.
///
/// # Errors
/// Shapes (`h_out` a multiple of `h_in`, even `d`), dtypes (f32/f64 CPU only, see [`enabled`]).
#[allow(clippy::too_many_arguments)]
pub fn split_heads(
    x: &Tensor,
    b: usize,
    l: usize,
    h_in: usize,
    h_out: usize,
    cos: &Tensor,
    sin: &Tensor,
    rope: bool,
) -> Result<Tensor> {
    let d = cos.dim(1)?;
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        HeadsFwd(Heads {
            b,
            l,
            h_in,
            h_out,
            d,
            rope,
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// attention core: softmax(scale · q kᵀ + mask) v, heads merged
// ---------------------------------------------------------------------------------------------

/// A raw pointer that rayon tasks writing disjoint parts of one buffer can share.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: only used for writes to disjoint elements, each by one task.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Query rows per block of the blocked attention: a block computes scores only for the keys
/// its rows attend (a causal mask halves the work).
const ATT_BLOCK: usize = 64;

/// Mask entries at or below this count as masked: their probability underflows to exactly 0
/// (for scores far below 10⁸ in magnitude), so blocks skip them.
const MASKED_AT: f64 = -1e8;

/// Attention sizes: batch, heads, queries, keys, head dimension.
#[derive(Clone, Copy)]
struct AttDims {
    b: usize,
    h: usize,
    l: usize,
    t: usize,
    d: usize,
}

impl AttDims {
    /// Offset of head `i = (batch, head)` in the merged `[B·l, H·d]` layout (row stride `H·d`).
    fn merged(&self, i: usize) -> usize {
        (i / self.h) * self.l * self.h * self.d + (i % self.h) * self.d
    }

    fn blocks(&self) -> usize {
        self.l.div_ceil(ATT_BLOCK)
    }

    /// Query rows `[r0, r1)` of block `blk`.
    fn block_rows(&self, blk: usize) -> (usize, usize) {
        (blk * ATT_BLOCK, ((blk + 1) * ATT_BLOCK).min(self.l))
    }
}

/// Keys each query block attends, per mask batch entry: `1 +` the last key any row of the
/// block leaves unmasked, or all `t` keys when a row of the block masks every key (softmax
/// over an all-masked row is uniform over all keys, as in the unblocked computation).
/// Indexed `mask_batch · blocks + block`.
fn key_spans<T: Real>(mask: &[T], z: AttDims, geo: Geo) -> Vec<usize> {
    let masked = T::from_f64(MASKED_AT);
    let mb = if geo.per_batch_mask { z.b } else { 1 };
    let mut spans = Vec::with_capacity(mb * z.blocks());
    for bi in 0..mb {
        for blk in 0..z.blocks() {
            let (r0, r1) = z.block_rows(blk);
            let span = (r0..r1)
                .map(|r| {
                    let row = &mask[(bi * z.l + r) * z.t..][..z.t];
                    match row.iter().rposition(|&v| v > masked) {
                        Some(j) => j + 1,
                        None => z.t,
                    }
                })
                .max()
                .unwrap_or(z.t);
            spans.push(span.max(1));
        }
    }
    spans
}

/// Writes `p = softmax(scale · q kᵀ + mask)` for head `i`, query block `blk`, into `p_head`
/// (the head's `l × t` probabilities, row-major): keys beyond the block's span get exactly 0.
///
/// # Safety
/// `q`, `k` must hold head `i`'s `l × d` and `t × d` blocks, `p_head` must be valid for the
/// head's `l·t` writes.
#[allow(clippy::too_many_arguments)]
unsafe fn probs_block<T: Real>(
    p_head: *mut T,
    q: &[T],
    k: &[T],
    mask: &[T],
    z: AttDims,
    geo: Geo,
    scale: T,
    (i, blk, span): (usize, usize, usize),
) {
    let AttDims { l, t, d, .. } = z;
    let (r0, r1) = z.block_rows(blk);
    gemm_raw(
        (r1 - r0, span, d),
        p_head.add(r0 * t),
        t,
        q.as_ptr().add((i * l + r0) * d),
        (1, d),
        k.as_ptr().add(i * t * d),
        (d, 1),
        gemm::Parallelism::None,
        false,
    );
    for r in r0..r1 {
        let row = std::slice::from_raw_parts_mut(p_head.add(r * t), t);
        let m0 = geo.mask_row(i * l + r);
        let mrow = &mask[m0..m0 + span];
        let (live, dead) = row.split_at_mut(span);
        for (x, &mk) in live.iter_mut().zip(mrow) {
            *x = *x * scale + mk;
        }
        let mx = row_max(live);
        for x in live.iter_mut() {
            *x = (*x - mx).exp();
        }
        let sum = row_sum(live);
        for x in live.iter_mut() {
            *x /= sum;
        }
        dead.fill(T::zero());
    }
}

/// `p = softmax(scale · q kᵀ + mask)`, `[B, H, l, t]`, block by block (heads over rayon's
/// pool); also `o = p v` in the merged `[B·l, H·d]` layout when `v` is given. With `keep`
/// false (a forward pass no backward pass will read, `v` given) the probabilities go to one
/// head-sized scratch buffer per task instead and the returned `p` is empty: no `[B, H, l, t]`
/// buffer is allocated.
#[allow(clippy::too_many_arguments)]
fn att_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: Option<&[T]>,
    mask: &[T],
    z: AttDims,
    geo: Geo,
    scale: f64,
    keep: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let AttDims { b, h, l, t, d } = z;
    let keep = keep || v.is_none();
    let spans = key_spans(mask, z, geo);
    let nb = z.blocks();
    let mut p: Vec<T> = Vec::with_capacity(if keep { b * h * l * t } else { 0 });
    let mut o: Vec<T> = Vec::with_capacity(if v.is_some() { b * l * h * d } else { 0 });
    let (pp, op) = (SyncPtr(p.as_mut_ptr()), SyncPtr(o.as_mut_ptr()));
    let scale = T::from_f64(scale);
    (0..b * h)
        .into_par_iter()
        .for_each_init(Vec::<T>::new, |scratch, i| {
            let mb = if geo.per_batch_mask { i / h } else { 0 };
            if !keep && scratch.capacity() < l * t {
                *scratch = Vec::with_capacity(l * t);
            }
            for blk in 0..nb {
                let span = spans[mb * nb + blk];
                // SAFETY: head i writes only its own l×t block of p (every element: the product
                // and softmax over the span, zeros after it) or, without `keep`, the task's own
                // scratch of l·t elements; and its own l×d block of the merged o (rows of h·d,
                // head offset); q, k, v are [B, H, ·, d] blocks.
                unsafe {
                    let ph = if keep {
                        pp.get().add(i * l * t)
                    } else {
                        scratch.as_mut_ptr()
                    };
                    probs_block(ph, q, k, mask, z, geo, scale, (i, blk, span));
                    if let Some(v) = v {
                        let (r0, r1) = z.block_rows(blk);
                        gemm_raw(
                            (r1 - r0, d, span),
                            op.get().add(z.merged(i) + r0 * h * d),
                            h * d,
                            ph.add(r0 * t),
                            (1, t),
                            v.as_ptr().add(i * t * d),
                            (1, d),
                            gemm::Parallelism::None,
                            false,
                        );
                    }
                }
            }
        });
    // SAFETY: every head wrote its blocks of p (when kept; and of o when v was given) whole.
    unsafe {
        if keep {
            p.set_len(b * h * l * t);
        }
        if v.is_some() {
            o.set_len(b * l * h * d);
        }
    }
    (p, v.map(|_| o))
}

/// The contiguous CPU data of a tensor, under its read guard.
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => f(data::<T>(c, l)?),
        _ => bail!("fused attention: expected a CPU tensor"),
    }
}

/// The attention core as one graph node (see [`attention`]); the mask is a constant.
struct Attention {
    mask: Tensor,
    scale: f64,
    /// The probabilities of the forward pass, taken by the backward pass.
    probs: std::sync::Mutex<Option<Tensor>>,
    /// Whether the forward pass keeps the probabilities (false: no backward pass will run).
    keep: bool,
}

impl Attention {
    fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], z: AttDims) -> Result<Vec<T>> {
        let AttDims { b, h, l, t, .. } = z;
        let geo = Geo::of(&Shape::from((b, h, l, t)), self.mask.shape())?;
        let (p, o) = with_slice::<T, _>(&self.mask, |m| {
            Ok(att_forward(q, k, Some(v), m, z, geo, self.scale, self.keep))
        })?;
        if self.keep {
            let p = Tensor::from_vec(p, (b, h, l, t), &candle_core::Device::Cpu)?;
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(p);
            }
        }
        o.ok_or_else(|| candle_core::Error::Msg("attention: no output".into()))
    }
}

fn att_dims(q: &Shape, k: &Shape, v: &Shape) -> Result<AttDims> {
    let (b, h, l, d) = q.dims4()?;
    let (kb, kh, t, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        bail!("attention: q {q:?}, k {k:?}, v {v:?}");
    }
    Ok(AttDims { b, h, l, t, d })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let z = att_dims(l1.shape(), l2.shape(), l3.shape())?;
        let out = match (s1.dtype(), self.mask.dtype()) {
            (DType::F32, DType::F32) => CpuStorage::F32(self.fwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                data::<f32>(s3, l3)?,
                z,
            )?),
            (DType::F64, DType::F64) => CpuStorage::F64(self.fwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                data::<f64>(s3, l3)?,
                z,
            )?),
            (a, b) => bail!("attention: dtypes {a:?} and mask {b:?} (f32 or f64, equal)"),
        };
        Ok((out, Shape::from((z.b * z.l, z.h * z.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = att_dims(q.shape(), k.shape(), v.shape())?;
        let kept = self.probs.lock().ok().and_then(|mut s| s.take());
        let op = AttentionBwd {
            mask: self.mask.clone(),
            scale: self.scale,
            probs: kept,
            grad: grad.contiguous()?,
        };
        let all = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (z.b * z.h * z.l * z.d, z.b * z.h * z.t * z.d);
        let gq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let gk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let gv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

/// Gradients of the attention core, flat `[∂q | ∂k | ∂v]`, from the output gradient (merged
/// layout) and the forward pass's probabilities (recomputed when absent).
struct AttentionBwd {
    mask: Tensor,
    scale: f64,
    probs: Option<Tensor>,
    grad: Tensor,
}

impl AttentionBwd {
    fn bwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], z: AttDims) -> Result<Vec<T>> {
        let AttDims { b, h, l, t, d } = z;
        let bh = b * h;
        let geo = Geo::of(&Shape::from((b, h, l, t)), self.mask.shape())?;
        with_slice::<T, _>(&self.mask, |mask| {
            // The kept probabilities are read in place (no copy); recomputed when absent.
            let (kept, recomputed);
            let p: &[T] = match &self.probs {
                Some(p) => {
                    kept = Reads::of(&[p]);
                    kept.get::<T>(0)?
                }
                None => {
                    recomputed = att_forward(q, k, None, mask, z, geo, self.scale, true).0;
                    &recomputed
                }
            };
            let spans = key_spans(mask, z, geo);
            let nb = z.blocks();
            let (nq, nk) = (bh * l * d, bh * t * d);
            // ∂k and ∂v accumulate over query blocks: zeroed first.
            let mut out: Vec<T> = par_zeros(nq + 2 * nk);
            let base = SyncPtr(out.as_mut_ptr());
            let scale = T::from_f64(self.scale);
            with_slice::<T, _>(&self.grad, |go| {
                (0..bh).into_par_iter().for_each(|i| {
                    let mb = if geo.per_batch_mask { i / h } else { 0 };
                    let mut gs: Vec<T> = Vec::with_capacity(ATT_BLOCK * t);
                    for blk in 0..nb {
                        let span = spans[mb * nb + blk];
                        let (r0, r1) = z.block_rows(blk);
                        let rows = r1 - r0;
                        let pb = &p[(i * l + r0) * t..];
                        let gob = z.merged(i) + r0 * h * d;
                        // SAFETY: head i writes only its own blocks of ∂q (rows r0..r1),
                        // ∂k and ∂v (rows 0..span, accumulated); gs has room for rows×span;
                        // the operands are read within their [B, H, ·, ·] or merged layouts.
                        unsafe {
                            // ∂p = ∂o · vᵀ over the block's span
                            gemm_raw(
                                (rows, span, d),
                                gs.as_mut_ptr(),
                                span,
                                go.as_ptr().add(gob),
                                (1, h * d),
                                v.as_ptr().add(i * t * d),
                                (d, 1),
                                gemm::Parallelism::None,
                                false,
                            );
                            gs.set_len(rows * span);
                        }
                        // ∂s = scale · p ⊙ (∂p − Σ_k ∂p_k p_k), in place
                        for (r, grow) in gs.chunks_mut(span).enumerate() {
                            let prow = &pb[r * t..r * t + span];
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
                            // ∂v[..span] += pᵀ · ∂o
                            gemm_raw(
                                (span, d, rows),
                                o.add(nq + nk + i * t * d),
                                d,
                                pb.as_ptr(),
                                (t, 1),
                                go.as_ptr().add(gob),
                                (1, h * d),
                                gemm::Parallelism::None,
                                true,
                            );
                            // ∂q = ∂s · k
                            gemm_raw(
                                (rows, d, span),
                                o.add((i * l + r0) * d),
                                d,
                                gs.as_ptr(),
                                (1, span),
                                k.as_ptr().add(i * t * d),
                                (1, d),
                                gemm::Parallelism::None,
                                false,
                            );
                            // ∂k[..span] += ∂sᵀ · q
                            gemm_raw(
                                (span, d, rows),
                                o.add(nq + i * t * d),
                                d,
                                gs.as_ptr(),
                                (span, 1),
                                q.as_ptr().add((i * l + r0) * d),
                                (1, d),
                                gemm::Parallelism::None,
                                true,
                            );
                        }
                        gs.clear();
                    }
                });
                Ok(())
            })?;
            Ok(out)
        })
    }
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
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
        let z = att_dims(l1.shape(), l2.shape(), l3.shape())?;
        if self.grad.dims() != [z.b * z.l, z.h * z.d] {
            bail!("attention backward: gradient {:?}", self.grad.shape());
        }
        let out = per_float!(s1.dtype(), "attention", Fl => self.bwd(
                data::<Fl>(s1, l1)?,
                data::<Fl>(s2, l2)?,
                data::<Fl>(s3, l3)?,
                z,
            )?);
        let n = z.b * z.h * (z.l + 2 * z.t) * z.d;
        Ok((out, Shape::from(n)))
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
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, l, _) = q.dims4()?;
    let t = k.dim(2)?;
    Geo::of(&Shape::from((b, h, l, t)), mask.shape())?;
    // Without a gradient to carry, nothing is kept (no [B, H, l, t] buffer).
    let keep = q.track_op() || k.track_op() || v.track_op();
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask: mask.detach().contiguous()?,
            scale,
            probs: std::sync::Mutex::new(None),
            keep,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// linear layer
// ---------------------------------------------------------------------------------------------

/// `dst = lhs · rhs` (`m × k` by `k × n`, row-major `dst`) through the `gemm` crate, written into
/// `n·m` uninitialized elements; `*_cs`/`*_rs` are column/row strides in elements.
///
/// # Safety
/// `dst` must be valid for `m·n` writes, `lhs` and `rhs` for reads at every index their
/// strides reach, and none may overlap `dst`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    lhs: *const T,
    lhs_cs: usize,
    lhs_rs: usize,
    rhs: *const T,
    rhs_cs: usize,
    rhs_rs: usize,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_raw(
        (m, n, k),
        dst,
        n,
        lhs,
        (lhs_cs, lhs_rs),
        rhs,
        (rhs_cs, rhs_rs),
        par,
        false,
    );
}

/// [`gemm_into`] with a row stride for `dst` and an explicit parallelism; with `acc` the
/// product is added to `dst` (initialized) instead of overwriting it.
///
/// # Safety
/// As [`gemm_into`], `dst` rows `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const T,
    (rhs_cs, rhs_rs): (usize, usize),
    par: gemm::Parallelism,
    acc: bool,
) {
    if m == 0 || n == 0 || (acc && k == 0) {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst.add(i * dst_rs + j).write(T::zero());
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if acc { T::one() } else { T::zero() },
        T::one(),
        false,
        false,
        false,
        par,
    );
}

/// `lhs · rhs` (`m × k` by `k × n`, operands read through their `(column, row)` strides) as a
/// new row-major `m × n` vector, written whole by the parallel gemm (no zero-fill first).
///
/// # Panics
/// If an operand is too short for the strides and sizes given.
fn gemm_vec<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[T],
    (rhs_cs, rhs_rs): (usize, usize),
) -> Vec<T> {
    let reach = |cs: usize, rs: usize, r: usize, c: usize| {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * rs + (c - 1) * cs + 1
        }
    };
    assert!(
        lhs.len() >= reach(lhs_cs, lhs_rs, m, k) && rhs.len() >= reach(rhs_cs, rhs_rs, k, n),
        "gemm_vec: operands too short"
    );
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: out has room for m·n elements, all written by the gemm; every operand index the
    // strides reach lies within the slices (checked above).
    unsafe {
        gemm_into(
            m,
            n,
            k,
            out.as_mut_ptr(),
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
        );
        out.set_len(m * n);
    }
    out
}

/// `y = x wᵀ` for `x: [N, in]`, `w: [out, in]`.
struct Linear;

impl Linear {
    fn fwd<T: Real>(x: &[T], w: &[T], n: usize, d_in: usize, d_out: usize) -> Vec<T> {
        // wᵀ read through swapped strides: column j of wᵀ is row j of w.
        gemm_vec((n, d_out, d_in), x, (1, d_in), w, (d_in, 1))
    }

    fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
        let (n, d_in) = x.dims2()?;
        let (d_out, w_in) = w.dims2()?;
        if w_in != d_in {
            bail!("linear: input {x:?} for weight {w:?}");
        }
        Ok((n, d_in, d_out))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d_in, d_out) = Self::dims(l1.shape(), l2.shape())?;
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => CpuStorage::F32(Self::fwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                n,
                d_in,
                d_out,
            )),
            (DType::F64, DType::F64) => CpuStorage::F64(Self::fwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                n,
                d_in,
                d_out,
            )),
            (a, b) => bail!("linear: dtypes {a:?} and {b:?} (f32 or f64, equal)"),
        };
        Ok((out, Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d_in, d_out) = Self::dims(x.shape(), w.shape())?;
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBwd)?;
        let gx = both.narrow(0, 0, n * d_in)?.reshape((n, d_in))?;
        let gw = both
            .narrow(0, n * d_in, d_out * d_in)?
            .reshape((d_out, d_in))?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Gradients of `y = x wᵀ` from `g = ∂/∂y`, concatenated flat: `∂/∂x = g w` (`[N, in]`), then
/// `∂/∂w = gᵀ x` (`[out, in]`).
struct LinearBwd;

impl LinearBwd {
    fn bwd<T: Real>(x: &[T], w: &[T], g: &[T], n: usize, d_in: usize, d_out: usize) -> Vec<T> {
        let len = n * d_in + d_out * d_in;
        let mut out: Vec<T> = Vec::with_capacity(len);
        // SAFETY: out has capacity for both blocks, each written whole by gemm: g is n×d_out
        // (read as is, then as gᵀ through swapped strides), w d_out×d_in, x n×d_in.
        unsafe {
            let p = out.as_mut_ptr();
            gemm_into(n, d_in, d_out, p, g.as_ptr(), 1, d_out, w.as_ptr(), 1, d_in);
            gemm_into(
                d_out,
                d_in,
                n,
                p.add(n * d_in),
                g.as_ptr(),
                d_out,
                1,
                x.as_ptr(),
                1,
                d_in,
            );
            out.set_len(len);
        }
        out
    }
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "fused-linear-bwd"
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
        let (n, d_in, d_out) = Linear::dims(l1.shape(), l2.shape())?;
        if l3.shape().dims() != [n, d_out] {
            bail!("linear backward: gradient {:?}", l3.shape());
        }
        let out = per_float!(s1.dtype(), "linear", Fl => Self::bwd(
            data::<Fl>(s1, l1)?,
            data::<Fl>(s2, l2)?,
            data::<Fl>(s3, l3)?,
            n,
            d_in,
            d_out,
        ));
        Ok((out, Shape::from(n * d_in + d_out * d_in)))
    }
}

/// A linear map `y = x wᵀ` (`x: [N, in]`, `w: [out, in]` → `[N, out]`) through the `gemm`
/// crate, differentiable in `x` and `w`: the weight's gradient comes out in `w`'s own layout
/// (candle's `x.matmul(&w.t())` adds a transpose node whose backward is a strided
/// accumulation), and no output is zero-filled before the product is written.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

// ---------------------------------------------------------------------------------------------
// linear layer added to a residual stream
// ---------------------------------------------------------------------------------------------

/// `y = r + x wᵀ` (see [`linear_add`]).
struct LinearAdd;

impl LinearAdd {
    fn fwd<T: Real>(x: &[T], w: &[T], r: &[T], n: usize, d_in: usize, d_out: usize) -> Vec<T> {
        let mut y = par_copy(r);
        if d_in == 0 || n == 0 || d_out == 0 {
            return y;
        }
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: y is n×d_out (initialized: read and accumulated into), x n×d_in, w d_out×d_in
        // read as wᵀ.
        unsafe {
            gemm::gemm(
                n,
                d_out,
                d_in,
                y.as_mut_ptr(),
                1,
                d_out as isize,
                true,
                x.as_ptr(),
                1,
                d_in as isize,
                w.as_ptr(),
                d_in as isize,
                1,
                T::one(),
                T::one(),
                false,
                false,
                false,
                par,
            );
        }
        y
    }
}

impl CustomOp3 for LinearAdd {
    fn name(&self) -> &'static str {
        "fused-linear-add"
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
        let (n, d_in, d_out) = Linear::dims(l1.shape(), l2.shape())?;
        if l3.shape().dims() != [n, d_out] {
            bail!(
                "linear_add: residual {:?} for output [{n}, {d_out}]",
                l3.shape()
            );
        }
        let out = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => CpuStorage::F32(Self::fwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                data::<f32>(s3, l3)?,
                n,
                d_in,
                d_out,
            )),
            (DType::F64, DType::F64, DType::F64) => CpuStorage::F64(Self::fwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                data::<f64>(s3, l3)?,
                n,
                d_in,
                d_out,
            )),
            (a, b, c) => bail!("linear_add: dtypes {a:?}, {b:?}, {c:?} (f32 or f64, equal)"),
        };
        Ok((out, Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d_in, d_out) = Linear::dims(x.shape(), w.shape())?;
        let g = grad.contiguous()?;
        let both = x.apply_op3_no_bwd(w, &g, &LinearBwd)?;
        let gx = both.narrow(0, 0, n * d_in)?.reshape((n, d_in))?;
        let gw = both
            .narrow(0, n * d_in, d_out * d_in)?
            .reshape((d_out, d_in))?;
        Ok((Some(gx), Some(gw), Some(g)))
    }
}

/// `y = r + x wᵀ` for `x: [N, in]`, `w: [out, in]` and a residual `r: [N, out]`: the linear
/// layer of [`linear`] accumulated by the gemm straight into a copy of the residual, one graph
/// node instead of two (no separate add, with its zero buffers and accumulations in backward).
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn linear_add(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &r.contiguous()?, LinearAdd)
}

// ---------------------------------------------------------------------------------------------
// gated MLP input: silu(x w_gateᵀ) ⊙ (x w_upᵀ)
// ---------------------------------------------------------------------------------------------

/// `dst += lhs · rhs` (as [`gemm_into`], `dst` row-major `m × n` and initialized).
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_acc<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    lhs: *const T,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const T,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        true,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    );
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
fn gate_up_proj<T: Real>(x: &[T], wg: &[T], wu: &[T], n: usize, h: usize, i: usize) -> [Vec<T>; 2] {
    [wg, wu].map(|w| Linear::fwd(x, w, n, h, i))
}

impl GateUp {
    fn fwd<T: Real>(
        &self,
        x: &[T],
        wg: &[T],
        wu: &[T],
        n: usize,
        h: usize,
        i: usize,
    ) -> Result<Vec<T>> {
        let [a, b] = gate_up_proj(x, wg, wu, n, h, i);
        let m = SiluMul::fwd(&a, &b);
        let dev = candle_core::Device::Cpu;
        let kept = (
            Tensor::from_vec(a, (n, i), &dev)?,
            Tensor::from_vec(b, (n, i), &dev)?,
        );
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(kept);
        }
        Ok(m)
    }
}

impl CustomOp3 for GateUp {
    fn name(&self) -> &'static str {
        "fused-gate-up"
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
        let (n, h, i) = gate_up_dims(l1.shape(), l2.shape(), l3.shape())?;
        let out = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => CpuStorage::F32(self.fwd(
                data::<f32>(s1, l1)?,
                data::<f32>(s2, l2)?,
                data::<f32>(s3, l3)?,
                n,
                h,
                i,
            )?),
            (DType::F64, DType::F64, DType::F64) => CpuStorage::F64(self.fwd(
                data::<f64>(s1, l1)?,
                data::<f64>(s2, l2)?,
                data::<f64>(s3, l3)?,
                n,
                h,
                i,
            )?),
            (a, b, c) => bail!("gate_up: dtypes {a:?}, {b:?}, {c:?} (f32 or f64, equal)"),
        };
        Ok((out, Shape::from((n, i))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h, i) = gate_up_dims(x.shape(), wg.shape(), wu.shape())?;
        let op = GateUpBwd {
            kept: self.kept.lock().ok().and_then(|mut s| s.take()),
            grad: grad.contiguous()?,
        };
        let all = x.apply_op3_no_bwd(wg, wu, &op)?;
        let gx = all.narrow(0, 0, n * h)?.reshape((n, h))?;
        let gwg = all.narrow(0, n * h, i * h)?.reshape((i, h))?;
        let gwu = all.narrow(0, n * h + i * h, i * h)?.reshape((i, h))?;
        Ok((Some(gx), Some(gwg), Some(gwu)))
    }
}

/// Gradients of [`gate_up`], flat `[∂x | ∂w_gate | ∂w_up]`.
struct GateUpBwd {
    kept: Option<(Tensor, Tensor)>,
    grad: Tensor,
}

impl GateUpBwd {
    fn bwd<T: Real>(
        &self,
        x: &[T],
        wg: &[T],
        wu: &[T],
        n: usize,
        h: usize,
        i: usize,
    ) -> Result<Vec<T>> {
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
        Ok(out)
    }
}

impl CustomOp3 for GateUpBwd {
    fn name(&self) -> &'static str {
        "fused-gate-up-bwd"
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
        let (n, h, i) = gate_up_dims(l1.shape(), l2.shape(), l3.shape())?;
        if self.grad.dims() != [n, i] {
            bail!("gate_up backward: gradient {:?}", self.grad.shape());
        }
        let out = per_float!(s1.dtype(), "gate_up", Fl => self.bwd(
                data::<Fl>(s1, l1)?,
                data::<Fl>(s2, l2)?,
                data::<Fl>(s3, l3)?,
                n,
                h,
                i,
            )?);
        Ok((out, Shape::from(n * h + 2 * i * h)))
    }
}

/// The gated MLP input `silu(x w_gateᵀ) ⊙ (x w_upᵀ)` (`x: [N, H]`, weights `[I, H]` →
/// `[N, I]`) as one graph node, differentiable in `x` and both weights: the two projections are
/// kept for its backward pass (recomputed for a second one), whose `∂x` accumulates both
/// products in one buffer.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]).
pub fn gate_up(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w_gate.contiguous()?,
        &w_up.contiguous()?,
        GateUp {
            kept: std::sync::Mutex::new(None),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// LM head: projection to the vocabulary, log-softmax and pick of the target, one node
// ---------------------------------------------------------------------------------------------

/// Logits buffers (`[N, V]`, tens of MB) kept between steps: above glibc's mmap ceiling each
/// fresh one would be mapped, faulted in page by page and unmapped again every step.
static LOGITS_POOL: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> =
    std::sync::Mutex::new(Vec::new());

/// Buffers the pool keeps at most (chosen and rejected may run as two forward passes).
const LOGITS_POOL_MAX: usize = 2;

/// An empty vector with room for `len` elements, from the pool when one fits.
fn pooled_buf<T: Real>(len: usize) -> Vec<T> {
    if let Ok(mut pool) = LOGITS_POOL.lock() {
        let fits = pool.iter().position(|b| {
            b.downcast_ref::<Vec<T>>()
                .is_some_and(|v| v.capacity() >= len)
        });
        if let Some(i) = fits {
            if let Ok(v) = pool.swap_remove(i).downcast::<Vec<T>>() {
                let mut v = *v;
                v.clear();
                return v;
            }
        }
    }
    Vec::with_capacity(len)
}

/// Returns `v` to the pool (dropped when the pool is full).
fn recycle_buf<T: Real>(v: Vec<T>) {
    if let Ok(mut pool) = LOGITS_POOL.lock() {
        if pool.len() < LOGITS_POOL_MAX {
            pool.push(Box::new(v));
        }
    }
}

/// The logits `z = h wᵀ` (`h: [N, H]`, `w: [V, H]`) in a pooled buffer.
fn head_logits<T: Real>(h: &[T], w: &[T], n: usize, hd: usize, v: usize) -> Vec<T> {
    let mut z: Vec<T> = pooled_buf(n * v);
    // SAFETY: z has capacity n·v; h is n×hd and w v×hd, read through wᵀ's strides; gemm
    // writes every element of z.
    unsafe {
        gemm_into(
            n,
            v,
            hd,
            z.as_mut_ptr(),
            h.as_ptr(),
            1,
            hd,
            w.as_ptr(),
            hd,
            1,
        );
        z.set_len(n * v);
    }
    z
}

/// Elements of one chunk of LM-head logits (`[rows, V]`) by default: 2²², 16 MiB in f32 (85
/// rows of a 49,152-token vocabulary, 32 of Llama 3's 128,256: enough rows for the products to
/// run at full speed, and below glibc's largest mmap threshold, so the pooled buffers come from
/// the heap).
pub const HEAD_CHUNK_ELEMS: usize = 1 << 22;

/// Rows per chunk of `v`-wide logits under a budget of `elems` elements (at least one).
pub fn head_chunk_rows(elems: usize, v: usize) -> usize {
    (elems / v.max(1)).max(1)
}

/// What the forward pass of [`LmHead`] keeps for its backward pass: each row's log-sum-exp,
/// and the logits themselves when they fit in one chunk.
enum HeadKept {
    F32(Option<Vec<f32>>, Vec<f64>),
    F64(Option<Vec<f64>>, Vec<f64>),
}

impl HeadKept {
    fn recycle(self) {
        match self {
            HeadKept::F32(Some(z), _) => recycle_buf(z),
            HeadKept::F64(Some(z), _) => recycle_buf(z),
            _ => {}
        }
    }
}

/// `out[n] = (h wᵀ)[n, t_n] − log Σ_v exp (h wᵀ)[n, v]` (see [`lm_head_logps`]).
struct LmHead {
    kept: std::sync::Mutex<Option<HeadKept>>,
    /// Where `∂w` goes instead of candle's store (see [`GradSink`]), if anywhere.
    sink: Option<GradSink>,
    /// Rows per chunk of logits.
    rows: usize,
    /// Whether a backward pass can follow (an input carries a gradient).
    keep: bool,
}

impl Drop for LmHead {
    fn drop(&mut self) {
        if let Some(k) = self.kept.get_mut().ok().and_then(Option::take) {
            k.recycle();
        }
    }
}

fn head_dims(h: &Shape, w: &Shape, t: &Shape) -> Result<(usize, usize, usize)> {
    let (n, hd) = h.dims2()?;
    let (v, w_hd) = w.dims2()?;
    if w_hd != hd || t.dims() != [n] {
        bail!("lm_head_logps: hidden {h:?}, weight {w:?}, targets {t:?}");
    }
    Ok((n, hd, v))
}

impl LmHead {
    /// Log-probs of the targets, the rows' log-sum-exps, and the logits when they are one
    /// chunk and `keep` is set. Chunks of `rows` rows reuse one pooled buffer.
    #[allow(clippy::type_complexity)]
    fn fwd<T: Real>(
        h: &[T],
        w: &[T],
        t: &[u32],
        (n, hd, v): (usize, usize, usize),
        rows: usize,
        keep: bool,
    ) -> Result<(Vec<T>, Option<Vec<T>>, Vec<f64>)> {
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
            bail!("lm_head_logps: target {bad} outside the vocabulary of {v}");
        }
        let mut out = vec![T::zero(); n];
        let mut lse = vec![0f64; n];
        let mut whole = None;
        for r0 in (0..n).step_by(rows.max(1)) {
            let rn = rows.min(n - r0);
            let z = head_logits(&h[r0 * hd..(r0 + rn) * hd], w, rn, hd, v);
            let per = rows_per_task(v);
            out[r0..r0 + rn]
                .par_chunks_mut(per)
                .zip(lse[r0..r0 + rn].par_chunks_mut(per))
                .enumerate()
                .for_each(|(c, (o, ls))| {
                    for (i, (o, ls)) in o.iter_mut().zip(ls).enumerate() {
                        let r = c * per + i;
                        let row = &z[r * v..(r + 1) * v];
                        let l = row_lse(row);
                        *o = row[t[r0 + r] as usize] - l;
                        *ls = l.to_f64();
                    }
                });
            if keep && rn == n {
                whole = Some(z);
            } else {
                recycle_buf(z);
            }
        }
        Ok((out, whole, lse))
    }
}

impl CustomOp3 for LmHead {
    fn name(&self) -> &'static str {
        "fused-lm-head-logps"
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
        let dims = head_dims(l1.shape(), l2.shape(), l3.shape())?;
        let t = targets_of(s3, l3)?;
        let (rows, keep) = (self.rows, self.keep);
        let (out, kept) = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => {
                let (h, w) = (data::<f32>(s1, l1)?, data::<f32>(s2, l2)?);
                let (o, z, l) = Self::fwd(h, w, t, dims, rows, keep)?;
                (CpuStorage::F32(o), HeadKept::F32(z, l))
            }
            (DType::F64, DType::F64) => {
                let (h, w) = (data::<f64>(s1, l1)?, data::<f64>(s2, l2)?);
                let (o, z, l) = Self::fwd(h, w, t, dims, rows, keep)?;
                (CpuStorage::F64(o), HeadKept::F64(z, l))
            }
            (a, b) => bail!("lm_head_logps: dtypes {a:?} and {b:?} (f32 or f64, equal)"),
        };
        if keep {
            if let Ok(mut slot) = self.kept.lock() {
                if let Some(old) = slot.replace(kept) {
                    old.recycle();
                }
            }
        } else {
            kept.recycle();
        }
        Ok((out, Shape::from(dims.0)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, hd, v) = head_dims(h.shape(), w.shape(), targets.shape())?;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        // A weight that carries no gradient (frozen) gets none computed.
        let need_w = w.track_op();
        let both = h.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &LmHeadBwd {
                kept: std::sync::Mutex::new(kept),
                targets: targets.to_vec1::<u32>()?,
                rows: self.rows,
                need_w,
            },
        )?;
        let gh = both.narrow(0, 0, n * hd)?.reshape((n, hd))?;
        if !need_w {
            return Ok((Some(gh), None, None));
        }
        let gw = both.narrow(0, n * hd, v * hd)?.reshape((v, hd))?;
        match &self.sink {
            Some(sink) => {
                sink.push(w, gw)?;
                Ok((Some(gh), None, None))
            }
            None => Ok((Some(gh), Some(gw), None)),
        }
    }
}

/// Gradients of [`LmHead`] from `g = ∂/∂out`, concatenated flat: `∂/∂h = dz w` (`[N, H]`),
/// then (with `need_w`) `∂/∂w = dzᵀ h` (`[V, H]`), with `dz[n, v] = g[n] · (1[v = t_n] −
/// softmax(z[n])_v)` written over the logits, chunk by chunk of `rows` rows: the kept ones
/// when the forward pass kept them, recomputed otherwise; `∂w` sums the chunks' products.
struct LmHeadBwd {
    kept: std::sync::Mutex<Option<HeadKept>>,
    targets: Vec<u32>,
    rows: usize,
    need_w: bool,
}

impl LmHeadBwd {
    #[allow(clippy::too_many_arguments)]
    fn bwd<T: Real>(
        h: &[T],
        w: &[T],
        g: &[T],
        t: &[u32],
        kept: Option<(Option<Vec<T>>, Vec<f64>)>,
        (n, hd, v): (usize, usize, usize),
        rows: usize,
        need_w: bool,
    ) -> Vec<T> {
        let (mut whole, lse) = match kept {
            Some((z, l)) => (z, Some(l)),
            None => (None, None),
        };
        let len = n * hd + if need_w { v * hd } else { 0 };
        let mut out: Vec<T> = Vec::with_capacity(len);
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let rows = rows.max(1);
        for r0 in (0..n).step_by(rows) {
            let rn = rows.min(n - r0);
            let hc = &h[r0 * hd..(r0 + rn) * hd];
            let mut dz = match whole.take() {
                Some(z) if rn == n => z,
                _ => head_logits(hc, w, rn, hd, v),
            };
            par_rows(&mut dz, v, |c0, chunk| {
                for (i, row) in chunk.chunks_mut(v).enumerate() {
                    let r = r0 + c0 + i;
                    let l = match &lse {
                        Some(l) => T::from_f64(l[r]),
                        None => row_lse(row),
                    };
                    let gr = g[r];
                    for x in row.iter_mut() {
                        *x = -(gr * (*x - l).exp());
                    }
                    row[t[r] as usize] += gr;
                }
            });
            // SAFETY: out has room for both blocks; chunk rows r0..r0+rn of ∂h are written
            // whole by the first gemm; ∂w (after the n·hd block) is written whole by the first
            // chunk and accumulated into by the others: dz is rn×v (read as is, then as dzᵀ
            // through swapped strides), w v×hd, hc rn×hd.
            unsafe {
                let p = out.as_mut_ptr();
                gemm_into(
                    rn,
                    hd,
                    v,
                    p.add(r0 * hd),
                    dz.as_ptr(),
                    1,
                    v,
                    w.as_ptr(),
                    1,
                    hd,
                );
                if need_w {
                    gemm_raw(
                        (v, hd, rn),
                        p.add(n * hd),
                        hd,
                        dz.as_ptr(),
                        (v, 1),
                        hc.as_ptr(),
                        (1, hd),
                        par,
                        r0 > 0,
                    );
                }
            }
            recycle_buf(dz);
        }
        if need_w && n == 0 {
            out.resize(len, T::zero());
        }
        // SAFETY: every element was written above (∂h row by row, ∂w by the chunks' gemms).
        unsafe { out.set_len(len) };
        out
    }
}

impl CustomOp3 for LmHeadBwd {
    fn name(&self) -> &'static str {
        "fused-lm-head-logps-bwd"
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
        let dims = head_dims(l1.shape(), l2.shape(), l3.shape())?;
        let (n, hd, v) = dims;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        let (rows, need_w) = (self.rows, self.need_w);
        let out = match (s1.dtype(), kept) {
            (DType::F32, kept) => {
                let kept = match kept {
                    Some(HeadKept::F32(z, l)) => Some((z, l)),
                    other => {
                        if let Some(k) = other {
                            k.recycle();
                        }
                        None
                    }
                };
                CpuStorage::F32(Self::bwd(
                    data::<f32>(s1, l1)?,
                    data::<f32>(s2, l2)?,
                    data::<f32>(s3, l3)?,
                    &self.targets,
                    kept,
                    dims,
                    rows,
                    need_w,
                ))
            }
            (DType::F64, kept) => {
                let kept = match kept {
                    Some(HeadKept::F64(z, l)) => Some((z, l)),
                    other => {
                        if let Some(k) = other {
                            k.recycle();
                        }
                        None
                    }
                };
                CpuStorage::F64(Self::bwd(
                    data::<f64>(s1, l1)?,
                    data::<f64>(s2, l2)?,
                    data::<f64>(s3, l3)?,
                    &self.targets,
                    kept,
                    dims,
                    rows,
                    need_w,
                ))
            }
            (dt, _) => bail!("lm_head_logps: fused CPU kernel needs f32 or f64, got {dt:?}"),
        };
        let len = n * hd + if need_w { v * hd } else { 0 };
        Ok((out, Shape::from(len)))
    }
}

/// Log-probabilities of the target tokens under the LM head: `out[n] = z[n, t_n] −
/// log Σ_v exp z[n, v]` with `z = h wᵀ` (`h: [N, H]`, `w: [V, H]`, targets `t: [N]` u32),
/// one graph node differentiable in `h` and `w` (a tied embedding matrix as `w` gets this
/// gradient summed with its other uses). The logits are formed [`HEAD_CHUNK_ELEMS`] at a time
/// (chunks of rows) in a buffer reused across calls, never as a tensor: the backward pass
/// turns them into `∂z` chunk by chunk (recomputing them when there was more than one chunk)
/// and returns `∂h = ∂z w` and `∂w = ∂zᵀ h` without the zero buffers and accumulations
/// candle's backward would spend on a logits tensor and its gradient. A `w` that carries no
/// gradient (a frozen head) gets none computed.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`enabled`]), a target outside the vocabulary.
pub fn lm_head_logps(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    lm_head_logps_into(h, w, targets, None)
}

/// [`lm_head_logps`] whose backward pass leaves `∂w` in `sink` (when given) instead of
/// candle's store: no zero buffer and accumulation of `w`'s size there. `w` must then be the
/// variable itself (not a converted copy), so that the gradient reaches it.
///
/// # Errors
/// As [`lm_head_logps`].
pub fn lm_head_logps_into(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    sink: Option<&GradSink>,
) -> Result<Tensor> {
    lm_head_logps_chunked(h, w, targets, sink, HEAD_CHUNK_ELEMS)
}

/// [`lm_head_logps_into`] with chunks of at most `chunk_elems` logits (at least one row).
///
/// # Errors
/// As [`lm_head_logps`].
pub fn lm_head_logps_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    sink: Option<&GradSink>,
    chunk_elems: usize,
) -> Result<Tensor> {
    let v = w.dim(0)?;
    h.contiguous()?.apply_op3(
        &w.contiguous()?,
        &targets.contiguous()?,
        LmHead {
            kept: std::sync::Mutex::new(None),
            sink: sink.cloned(),
            rows: head_chunk_rows(chunk_elems, v),
            keep: h.track_op() || w.track_op(),
        },
    )
}
