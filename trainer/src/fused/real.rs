//! The element types of the kernels and the row reductions they share.
//!
//! [`Real`] is what a kernel needs of f32 and f64: `exp` (in f32 a branch-free Cody–Waite
//! polynomial, `exp_f32`, so that loops vectorize), `ln`, `sqrt`, `−∞` and a NaN-keeping
//! maximum. Row reductions with 8 lane accumulators: `row_max` (NaN if the row holds one),
//! `row_sum = Σ z`, `row_sum_exp = Σ exp(z − m)`, `row_lse = ln Σ exp(z − m) + m` with
//! `m = row_max(z)` (the log-softmax denominator of the softmax, attention and LM-head kernels).

use candle_core::WithDType;

/// The float operations the kernels need, for f32 and f64.
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
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
    // n.max(−127) lies in [−127, 128] whatever x is (NaN included: max returns −127), so the
    // unchecked conversion is exact; the saturating `as i32` kept the loops from vectorizing.
    // SAFETY: finite and in i32's range, as above.
    let k = unsafe { n.max(-127.0).to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((k + 127) as u32) << 23);
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

/// Log-sum-exp of a row with a max shift: `ln Σ exp(z − m) + m`.
#[inline]
pub(crate) fn row_lse<T: Real>(z: &[T]) -> T {
    let m = row_max(z);
    row_sum_exp(z, m).ln() + m
}

/// `Σ exp(z − m)` with 8 lane accumulators (vectorizes).
#[inline]
pub(crate) fn row_sum_exp<T: Real>(z: &[T], m: T) -> T {
    lane_sum_map(z, |v| (v - m).exp())
}

/// The maximum of a row with 8 lane accumulators (vectorizes); NaN if the row holds a NaN.
#[inline]
pub(crate) fn row_max<T: Real>(z: &[T]) -> T {
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
pub(crate) fn row_sum<T: Real>(z: &[T]) -> T {
    lane_sum_map(z, |v| v)
}

/// `Σ f(z_j)`: 8 lane accumulators over the chunks of 8 (lane `k` adds `f(z_{8c+k})` in order),
/// joined by [`lane_sum`], then the remainder added in order.
#[inline(always)]
fn lane_sum_map<T: Real>(z: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = z.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut s = lane_sum(acc);
    for &v in chunks.remainder() {
        s += f(v);
    }
    s
}

#[inline]
pub(crate) fn lane_sum<T: Real>(a: [T; 8]) -> T {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_follows_libm_and_its_edges() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 400_000.0;
            let x = x as f32;
            let (got, want) = (f64::from(exp_f32(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "{worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-90.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::INFINITY).is_finite() && exp_f32(f32::INFINITY) > 1e38);
    }
}
