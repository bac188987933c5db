//! Products of a few rows by a weight matrix, `y = x wᵀ` with `x: [n, k]`, `n ≤ ROWS_MAX`
//! (a decoding step: one new token per sample), `w: [m, k]`: bound by reading `w`, which a
//! general gemm packs into panels first (a copy of the whole weight, every call). Here each
//! weight row is read once, straight from memory, and multiplied by every input row while it
//! is in cache; rayon's tasks take ranges of weight rows. On x86-64 with AVX2 and FMA
//! (detected at run time) the f32 dot products run eight lanes wide with fused multiply-adds;
//! elsewhere (f64, other CPUs) a portable loop with eight partial sums.
//!
//! Only for passes without a gradient ([`applies`]): the ops have no backward. The kernels
//! [`LinearRows`], [`LinearAddRows`] and [`GateUpRows`] compute what [`super::linear()`],
//! [`super::linear_add`] and [`super::gate_up`] do, summing in another order (results agree
//! to rounding).

use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{Ins, Kernel, SyncPtr};
use super::real::Real;

/// The most input rows the few-row products take; above it the gemm's packing pays off.
pub(crate) const ROWS_MAX: usize = 16;

/// Whether `x: [n, k] · wᵀ` runs on the few-row kernels: `n ≤ ROWS_MAX` and nothing records
/// a gradient.
pub(crate) fn applies(x: &Tensor, ws: &[&Tensor]) -> bool {
    x.dims().first().is_some_and(|&n| n <= ROWS_MAX)
        && x.rank() == 2
        && !x.track_op()
        && ws.iter().all(|w| !w.track_op())
}

/// Weight rows per rayon task: enough to amortize a task, few enough to share the rows out.
const ROWS_PER_TASK: usize = 32;

/// `y[i, o] = init[i, o] + Σ_j x[i, j] w[o, j]` (`init` absent: 0) for `x: [n, k]`,
/// `w: [m, k]`, as a new row-major `[n, m]` vector.
///
/// # Panics
/// If a slice is shorter than its shape.
pub(crate) fn rows_matmul<T: Real>(
    x: &[T],
    w: &[T],
    init: Option<&[T]>,
    n: usize,
    k: usize,
    m: usize,
) -> Vec<T> {
    assert!(
        x.len() >= n * k && w.len() >= m * k && init.is_none_or(|r| r.len() >= n * m),
        "rows_matmul: operands too short"
    );
    let mut out: Vec<T> = match init {
        Some(r) => r[..n * m].to_vec(),
        None => vec![T::zero(); n * m],
    };
    let dst = SyncPtr(out.as_mut_ptr());
    let tasks = m.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|t| {
        let (o0, o1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(m));
        // SAFETY: task t writes only the columns o0..o1 of each output row: disjoint from
        // every other task's; all indices are within n·m (checked above).
        unsafe { rows_range(x, w, dst, n, k, m, o0, o1) };
    });
    out
}

/// The columns `o0 .. o1` of [`rows_matmul`], added into `dst`.
///
/// # Safety
/// `dst` valid for `n·m` elements; no other thread writes its columns `o0 .. o1`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_range<T: Real>(
    x: &[T],
    w: &[T],
    dst: SyncPtr<T>,
    n: usize,
    k: usize,
    m: usize,
    o0: usize,
    o1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: T is f32 (same layout); the CPU has AVX2 and FMA.
        let (x, w) = (
            std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()),
            std::slice::from_raw_parts(w.as_ptr().cast::<f32>(), w.len()),
        );
        avx2::range(x, w, dst.get().cast::<f32>(), n, k, m, o0, o1);
        return;
    }
    let p = dst.get();
    for o in o0..o1 {
        let wr = &w[o * k..(o + 1) * k];
        for i in 0..n {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [T::zero(); 8];
            let (xc, wc) = (xr.chunks_exact(8), wr.chunks_exact(8));
            let (xt, wt) = (xc.remainder(), wc.remainder());
            for (a, b) in xc.zip(wc) {
                for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
                    *s += a * b;
                }
            }
            let mut s = super::real::lane_sum(acc);
            for (&a, &b) in xt.iter().zip(wt) {
                s += a * b;
            }
            *p.add(i * m + o) += s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Columns `o0 .. o1`: two weight rows at a time against up to four input rows.
    ///
    /// # Safety
    /// AVX2 and FMA present; as [`super::rows_range`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn range(
        x: &[f32],
        w: &[f32],
        dst: *mut f32,
        n: usize,
        k: usize,
        m: usize,
        o0: usize,
        o1: usize,
    ) {
        let mut o = o0;
        while o < o1 {
            let c = (o1 - o).min(2);
            let mut i = 0;
            while i < n {
                let r = (n - i).min(4);
                match (c, r) {
                    (2, 4) => block::<2, 4>(x, w, dst, k, m, o, i),
                    (2, 3) => block::<2, 3>(x, w, dst, k, m, o, i),
                    (2, 2) => block::<2, 2>(x, w, dst, k, m, o, i),
                    (2, _) => block::<2, 1>(x, w, dst, k, m, o, i),
                    (_, 4) => block::<1, 4>(x, w, dst, k, m, o, i),
                    (_, 3) => block::<1, 3>(x, w, dst, k, m, o, i),
                    (_, 2) => block::<1, 2>(x, w, dst, k, m, o, i),
                    _ => block::<1, 1>(x, w, dst, k, m, o, i),
                }
                i += r;
            }
            o += c;
        }
    }

    /// `dst[i + a, o + b] += x[i + a] · w[o + b]` for `a < R`, `b < C`. Index loops over the
    /// accumulator registers (no closures: they would not inherit the target features).
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const C: usize, const R: usize>(
        x: &[f32],
        w: &[f32],
        dst: *mut f32,
        k: usize,
        m: usize,
        o: usize,
        i: usize,
    ) {
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(o * k);
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let k8 = k / 8 * 8;
        let mut j = 0;
        while j < k8 {
            let mut wv = [_mm256_setzero_ps(); C];
            for (b, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(b * k + j));
            }
            for a in 0..R {
                let xv = _mm256_loadu_ps(xp.add(a * k + j));
                for b in 0..C {
                    acc[b][a] = _mm256_fmadd_ps(xv, wv[b], acc[b][a]);
                }
            }
            j += 8;
        }
        for b in 0..C {
            for a in 0..R {
                let mut s = hsum(acc[b][a]);
                for t in k8..k {
                    s = (*xp.add(a * k + t)).mul_add(*wp.add(b * k + t), s);
                }
                *dst.add((i + a) * m + o + b) += s;
            }
        }
    }

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// The `(n, k, m)` of `x: [n, k]` by `w: [m, k]`.
fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
    let (n, k) = x.dims2()?;
    let (m, wk) = w.dims2()?;
    if wk != k {
        bail!("few-row linear: input {x:?} for weight {w:?}");
    }
    Ok((n, k, m))
}

/// `y = x wᵀ` on the few-row kernel (no backward).
pub(super) struct LinearRows;

impl Kernel for LinearRows {
    const NAME: &'static str = "fused-linear-rows";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, k, m) = dims(ins.shape(0), ins.shape(1))?;
        let y = rows_matmul(ins.get(0)?, ins.get(1)?, None, n, k, m);
        Ok((y, Shape::from((n, m))))
    }
}

/// `y = r + x wᵀ` on the few-row kernel (no backward).
pub(super) struct LinearAddRows;

impl Kernel for LinearAddRows {
    const NAME: &'static str = "fused-linear-add-rows";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, k, m) = dims(ins.shape(0), ins.shape(1))?;
        if ins.shape(2).dims() != [n, m] {
            bail!(
                "linear_add: residual {:?} for output [{n}, {m}]",
                ins.shape(2)
            );
        }
        let y = rows_matmul(ins.get(0)?, ins.get(1)?, Some(ins.get(2)?), n, k, m);
        Ok((y, Shape::from((n, m))))
    }
}

/// `silu(x w_gateᵀ) ⊙ (x w_upᵀ)` on the few-row kernel (no backward).
pub(super) struct GateUpRows;

impl Kernel for GateUpRows {
    const NAME: &'static str = "fused-gate-up-rows";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, k, m) = dims(ins.shape(0), ins.shape(1))?;
        if ins.shape(2).dims() != [m, k] {
            bail!("gate_up: weights {:?} and {:?}", ins.shape(1), ins.shape(2));
        }
        let x = ins.get::<T>(0)?;
        let a = rows_matmul(x, ins.get(1)?, None, n, k, m);
        let b = rows_matmul(x, ins.get(2)?, None, n, k, m);
        Ok((super::mlp::SiluMul::fwd(&a, &b), Shape::from((n, m))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd sizes (tails of the eight-lane loops, one and two weight rows, one to four input
    /// rows per block) against the plain triple loop, with and without the initial values.
    #[test]
    fn few_row_products_equal_the_definition() {
        for (n, k, m) in [(1, 13, 7), (3, 8, 5), (5, 19, 66), (16, 24, 33)] {
            let x: Vec<f64> = (0..n * k)
                .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
                .collect();
            let w: Vec<f64> = (0..m * k)
                .map(|i| ((i * 5 % 13) as f64 - 6.0) / 4.0)
                .collect();
            let r: Vec<f64> = (0..n * m).map(|i| i as f64 / 10.0).collect();
            let want = |init: bool| -> Vec<f64> {
                (0..n * m)
                    .map(|e| {
                        let (i, o) = (e / m, e % m);
                        let dot: f64 = (0..k).map(|j| x[i * k + j] * w[o * k + j]).sum();
                        dot + if init { r[e] } else { 0.0 }
                    })
                    .collect()
            };
            for init in [false, true] {
                let expect = want(init);
                let got = rows_matmul(&x, &w, init.then_some(&r[..]), n, k, m);
                for (a, b) in got.iter().zip(&expect) {
                    assert!((a - b).abs() < 1e-12, "f64 {n}×{k}·{m}: {a} vs {b}");
                }
                let f = |v: &[f64]| v.iter().map(|&z| z as f32).collect::<Vec<f32>>();
                let rf = f(&r);
                let got = rows_matmul(&f(&x), &f(&w), init.then_some(&rf[..]), n, k, m);
                for (a, b) in got.iter().zip(&expect) {
                    assert!(
                        (f64::from(*a) - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "f32 {n}×{k}·{m}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
