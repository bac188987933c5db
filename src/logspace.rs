//! Log-space primitives: log-sum-exp, log-softmax, the sigmoid family, and the logarithm of a
//! big rational. Everything the float arithmetic computes goes through these, so that logits of
//! ±1e4 and outcome spaces of 10^7 neither underflow nor overflow.

use num_bigint::BigInt;
use num_traits::{Signed, ToPrimitive, Zero};

use crate::scalar::{infallible, Real};
use crate::simd::{block_stats, zeroed, BLOCK};
use crate::Rational;

/// The vectorized loops these formulas run on, re-exported where they have always been public.
pub use crate::scalar::sigmoid;
pub use crate::simd::{fast_exp, max, sum_exp_shifted};

/// Running `(max, Σ exp(x − max))` over blocks, combined in a fixed order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LseAcc {
    m: f64,
    s: f64,
}

impl LseAcc {
    pub(crate) fn new() -> Self {
        Self {
            m: f64::NEG_INFINITY,
            s: 0.0,
        }
    }

    /// Add a block with finite max `bm` and `bs = Σ exp(x − bm)`.
    #[inline]
    pub(crate) fn push(&mut self, bm: f64, bs: f64) {
        if bm > self.m {
            self.s = self.s * (self.m - bm).exp() + bs;
            self.m = bm;
        } else {
            self.s += bs * (bm - self.m).exp();
        }
    }

    /// `m + log s`.
    pub(crate) fn value(&self) -> f64 {
        self.m + self.s.ln()
    }
}

/// The two-pass form (global max, then the shifted sum), for inputs with a non-finite element.
fn log_sum_exp_two_pass(xs: &[f64]) -> f64 {
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

/// Log-sum-exp.
///
/// # Formula
/// `lse(x) = m + log Σ_i exp(x_i − m)`, `m = max_i x_i`
///
/// Returns `-∞` for an empty slice and propagates NaN.
///
/// Computed in one pass over blocks of 2048 elements: each block's max `m_j` and
/// `s_j = Σ_{i∈j} exp(x_i − m_j)` are taken while the block is in cache, then combined as
/// `s ← s·e^{m−m_j} + s_j` (or `s ← s + s_j·e^{m_j−m}`), which is the same formula.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NEG_INFINITY;
    }
    let mut acc = LseAcc::new();
    for block in xs.chunks(BLOCK) {
        let [bm, bs, _] = block_stats(block);
        if !bm.is_finite() {
            return log_sum_exp_two_pass(xs);
        }
        acc.push(bm, bs);
    }
    acc.value()
}

/// Log-softmax: `log softmax(f)_y = f_y − lse(f)`.
pub fn log_softmax(f: &[f64]) -> Vec<f64> {
    let z = log_sum_exp(f);
    let mut out = zeroed(f.len());
    for (o, &x) in out.iter_mut().zip(f) {
        *o = x - z;
    }
    out
}

/// `log(exp(a) + exp(b))` without overflow.
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// The softplus family, written once for every [`Real`] number type (`f64`, dual numbers, the
/// trainer's tensors). A blanket implementation: no type can bring a text of its own.
pub trait Softplus: Real {
    /// `softplus(x) = log(1 + eˣ) = max(x, 0) + ln(1 + e^{−|x|})`, stable for any `x`
    /// (the exponent is never positive). Its derivative is `σ(x)` (½ at 0 with the
    /// subgradients of [`crate::scalar`]).
    fn softplus(&self) -> Result<Self, Self::Error>;
    /// `log σ(x) = −softplus(−x)`.
    fn log_sigmoid(&self) -> Result<Self, Self::Error>;
}

impl<S: Real> Softplus for S {
    #[inline(always)]
    fn softplus(&self) -> Result<Self, Self::Error> {
        self.relu()?.add(&self.abs()?.neg()?.exp()?.ln_1p()?)
    }

    #[inline(always)]
    fn log_sigmoid(&self) -> Result<Self, Self::Error> {
        self.neg()?.softplus()?.neg()
    }
}

/// [`Softplus::softplus`] of an `f64`.
pub fn softplus(t: f64) -> f64 {
    infallible(Softplus::softplus(&t))
}

/// [`Softplus::log_sigmoid`] of an `f64`.
pub fn log_sigmoid(t: f64) -> f64 {
    infallible(Softplus::log_sigmoid(&t))
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

    /// Straightforward two-pass log-sum-exp with libm `exp`.
    fn lse_reference(xs: &[f64]) -> f64 {
        let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    fn logits(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| scale * (rng.gen::<f64>() - 0.5)).collect()
    }

    #[test]
    fn blocked_lse_matches_two_pass() {
        for (n, scale) in [
            (1, 1.0),
            (7, 3.0),
            (BLOCK, 10.0),
            (BLOCK + 3, 10.0),
            (10 * BLOCK + 5, 40.0),
            (100_003, 2e3),
        ] {
            let mut xs = logits(n, n as u64, scale);
            // The global max late, in a later block than the first.
            if n > BLOCK {
                xs[n - 2] = scale;
            }
            let (got, want) = (log_sum_exp(&xs), lse_reference(&xs));
            assert!(
                (got - want).abs() <= 1e-13 * want.abs().max(1.0),
                "n = {n}: {got} vs {want}"
            );
            assert_eq!(log_sum_exp_two_pass(&xs).to_bits(), {
                let m = max(&xs);
                (m + sum_exp_shifted(&xs, m).ln()).to_bits()
            });
        }
        // Non-finite inputs anywhere: the two-pass semantics.
        let mut xs = logits(3 * BLOCK, 1, 1.0);
        xs[2 * BLOCK + 1] = f64::INFINITY;
        assert_eq!(log_sum_exp(&xs), f64::INFINITY);
        xs[5] = f64::NAN;
        assert!(log_sum_exp(&xs).is_nan());
        let mut xs = logits(3 * BLOCK, 1, 1.0);
        xs[BLOCK + 9] = f64::NAN;
        assert!(log_sum_exp(&xs).is_nan());
        let mut xs = logits(3 * BLOCK, 1, 1.0);
        let want = lse_reference(&xs[..BLOCK]);
        xs[BLOCK..].iter_mut().for_each(|x| *x = f64::NEG_INFINITY);
        assert!((log_sum_exp(&xs) - want).abs() < 1e-14);
        assert_eq!(log_sum_exp(&[f64::NEG_INFINITY; 5]), f64::NEG_INFINITY);
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
