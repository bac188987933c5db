//! Log-space primitives: log-sum-exp, log-softmax, the sigmoid family, and the logarithm of a
//! big rational. Everything the float arithmetic computes goes through these, so that logits of
//! ±1e4 and outcome spaces of 10^7 neither underflow nor overflow.

use num_bigint::BigInt;
use num_traits::{Signed, ToPrimitive, Zero};

use crate::Rational;

/// Largest element of a slice (`-∞` for an empty one).
pub fn max(xs: &[f64]) -> f64 {
    // Eight independent lanes: the compiler vectorizes this, and the result is
    // independent of the order (max is associative and commutative).
    let mut lanes = [f64::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let mut m = lanes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for &x in rest {
        m = m.max(x);
    }
    m
}

/// `Σ_i exp(x_i − shift)`, summed in a fixed order (bit-identical on every run).
pub fn sum_exp_shifted(xs: &[f64], shift: f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += fast_exp(c[i] - shift);
        }
    }
    let mut s: f64 = lanes.iter().sum();
    for &x in rest {
        s += fast_exp(x - shift);
    }
    s
}

/// Log-sum-exp.
///
/// # Formula
/// `lse(x) = m + log Σ_i exp(x_i − m)`, `m = max_i x_i`
///
/// Returns `-∞` for an empty slice and propagates NaN.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = max(xs);
    if !m.is_finite() {
        return if xs.iter().any(|x| x.is_nan()) {
            f64::NAN
        } else {
            m
        };
    }
    m + sum_exp_shifted(xs, m).ln()
}

/// Log-softmax: `log softmax(f)_y = f_y − lse(f)`.
pub fn log_softmax(f: &[f64]) -> Vec<f64> {
    let z = log_sum_exp(f);
    f.iter().map(|&x| x - z).collect()
}

/// `log(exp(a) + exp(b))` without overflow.
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// Logistic function `σ(t) = 1 / (1 + e^{−t})`, stable for any `t`.
pub fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

/// `softplus(t) = log(1 + e^t)`, stable for any `t`.
pub fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

/// `log σ(t) = −softplus(−t)`.
pub fn log_sigmoid(t: f64) -> f64 {
    -softplus(-t)
}

/// `exp(x)` for the hot loops: a branch-free polynomial evaluation that the compiler can
/// vectorize, within 4 ulp of `f64::exp` on `[-708, 709]` (checked by a unit test); outside that
/// range, and for NaN, it defers to `f64::exp`.
///
/// Method: `x = k ln 2 + r` with `|r| ≤ ln2/2` (Cody–Waite split of ln 2), `exp(r)` by a degree-11
/// Taylor polynomial in Horner form (truncation error < 2e-17 on that interval), and `2^k` built
/// in the exponent bits.
#[inline(always)]
pub fn fast_exp(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    const INV_LN2: f64 = std::f64::consts::LOG2_E;
    // Clamp so that 2^k stays representable; results outside are fixed below.
    let xc = x.clamp(-708.0, 709.0);
    let k = (xc * INV_LN2).round();
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    let y = p * scale;
    if x < -708.0 {
        // Subnormal range and below: defer to libm (rare in practice; keeps exactness of 0).
        x.exp()
    } else if x > 709.0 || x.is_nan() {
        x.exp()
    } else {
        y
    }
}

/// Natural logarithm of a positive big rational, accurate to a few ulp even when numerator and
/// denominator are far outside the `f64` range (near-degenerate exact policies).
pub fn ln_rational(r: &Rational) -> f64 {
    assert!(r.is_positive(), "ln_rational of a non-positive number");
    ln_bigint(r.numer()) - ln_bigint(r.denom())
}

fn ln_bigint(n: &BigInt) -> f64 {
    debug_assert!(!n.is_zero());
    let bits = n.bits();
    if bits <= 1000 {
        return n.to_f64().expect("finite below 2^1000").ln();
    }
    let shift = bits - 64;
    let top = (n >> shift).to_f64().expect("64-bit value");
    top.ln() + shift as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm() {
        // 4 ulp: the documented accuracy.
        let mut x = -745.0;
        while x < 709.7 {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(
                ((a - b) / b).abs() <= 4.0 * f64::EPSILON || a == b,
                "x = {x}: {a} vs {b}"
            );
            x += 0.00137;
        }
        assert_eq!(fast_exp(f64::NEG_INFINITY), 0.0);
        assert!(fast_exp(f64::NAN).is_nan());
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn lse_handles_extreme_logits() {
        let xs = [1e4, -1e4, 0.0];
        assert_eq!(log_sum_exp(&xs), 1e4);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert!(log_sum_exp(&[1.0, f64::NAN]).is_nan());
    }

    #[test]
    fn ln_rational_of_huge_values() {
        let big = Rational::new(BigInt::from(1) << 5000u32, BigInt::from(3));
        let want = 5000.0 * std::f64::consts::LN_2 - 3f64.ln();
        assert!((ln_rational(&big) - want).abs() < 1e-9);
    }
}
