//! Policies: probability distributions on a finite outcome space `Y = {0, …, N−1}` with full
//! support (`π(y) > 0` for every `y`) and unit mass (`Σ_y π(y) = 1`).
//!
//! [`Policy`] is the float form, held as log-probabilities (so that logits of ±1e4 keep full
//! support); [`ExactPolicy`] the exact form, held as big rationals. Neither can be built without
//! both invariants: every constructor validates and returns a typed [`Error`].

use num_traits::{One, Signed, Zero};
use rand::Rng;

use crate::error::{same_len, Error, Result};
use crate::logspace::{ln_rational, log_sum_exp, LseAcc};
use crate::prec::MASS_TOLERANCE;
use crate::simd::{block_stats, exp_into, zeroed, BLOCK};
use crate::Rational;

/// A float policy, stored as normalized log-probabilities `log π(y)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    log_p: Vec<f64>,
}

fn check_finite(xs: &[f64], what: &'static str) -> Result<()> {
    if xs.is_empty() {
        return Err(Error::Empty);
    }
    match xs.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NotFinite {
            index,
            what,
            value: xs[index],
        }),
        None => Ok(()),
    }
}

impl Policy {
    /// From probabilities `p(y)`.
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::NotFinite`] (NaN, ±∞), [`Error::NotPositive`] (zero or negative:
    /// no full support), [`Error::Mass`] when `|Σ p − 1| > MASS_TOLERANCE`. Within the tolerance the
    /// probabilities are renormalized exactly in log space.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{Error, Policy};
    /// let pi = Policy::from_probs(&[0.5, 0.3, 0.2])?;
    /// assert_eq!(pi.len(), 3);
    /// assert!((pi.log_probs()[0] - 0.5f64.ln()).abs() < 1e-15);
    /// // No full support, or no unit mass: typed errors, never a policy.
    /// assert!(matches!(Policy::from_probs(&[1.0, 0.0]), Err(Error::NotPositive { index: 1, .. })));
    /// assert!(matches!(Policy::from_probs(&[0.5, 0.4]), Err(Error::Mass { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_probs(p: &[f64]) -> Result<Self> {
        check_finite(p, "probability")?;
        if let Some(index) = p.iter().position(|&x| x <= 0.0) {
            return Err(Error::NotPositive {
                index,
                value: p[index].to_string(),
            });
        }
        let mass: f64 = p.iter().sum();
        if (mass - 1.0).abs() > MASS_TOLERANCE {
            return Err(Error::Mass {
                mass: mass.to_string(),
                tolerance: MASS_TOLERANCE,
            });
        }
        Ok(Self::normalized(p.iter().map(|x| x.ln()).collect()))
    }

    /// From log-probabilities `log p(y)`; `−∞` (zero probability) is rejected.
    ///
    /// # Errors
    /// As [`Policy::from_probs`], with the mass condition `|lse(log p)| ≤ MASS_TOLERANCE`.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{Error, Policy};
    /// let pi = Policy::from_log_probs(&[0.25f64.ln(), 0.75f64.ln()])?;
    /// assert!((pi.probs()[1] - 0.75).abs() < 1e-15);
    /// // log 0 = −∞ is no full support.
    /// assert!(matches!(
    ///     Policy::from_log_probs(&[0.0, f64::NEG_INFINITY]),
    ///     Err(Error::NotPositive { index: 1, .. })
    /// ));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_log_probs(log_p: &[f64]) -> Result<Self> {
        if let Some(index) = log_p.iter().position(|&x| x == f64::NEG_INFINITY) {
            return Err(Error::NotPositive {
                index,
                value: "0 (log-probability −∞)".into(),
            });
        }
        check_finite(log_p, "log-probability")?;
        let z = log_sum_exp(log_p);
        if z.abs() > MASS_TOLERANCE {
            return Err(Error::Mass {
                mass: z.exp().to_string(),
                tolerance: MASS_TOLERANCE,
            });
        }
        Ok(Self::normalized(log_p.to_vec()))
    }

    /// From logits: `π = softmax(f)`, `log π(y) = f(y) − lse(f)`.
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::NotFinite`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::{Error, Policy};
    /// // Logits of ±1e4 keep full support: every log-probability is finite.
    /// let pi = Policy::from_logits(&[1e4, 0.0, -1e4])?;
    /// assert_eq!(pi.log_probs()[0], 0.0);
    /// assert_eq!(pi.log_probs()[2], -2e4);
    /// assert!(matches!(Policy::from_logits(&[0.0, f64::NAN]), Err(Error::NotFinite { index: 1, .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_logits(f: &[f64]) -> Result<Self> {
        Self::from_logit_blocks(f.len(), |start, out| {
            out.copy_from_slice(&f[start..start + out.len()])
        })
    }

    /// `softmax` of the logits that `fill(start, out)` writes block by block into
    /// `out = logits[start .. start + out.len()]`: one pass that writes each block, checks it
    /// finite and takes its max and shifted exp-sum while it is in cache (the log-sum-exp of
    /// [`log_sum_exp`], blocked the same way), then one pass that subtracts `lse`.
    ///
    /// # Errors
    /// [`Error::Empty`] for `n = 0`, [`Error::NotFinite`] (`what = "logit"`) at the first
    /// non-finite logit.
    pub(crate) fn from_logit_blocks(
        n: usize,
        mut fill: impl FnMut(usize, &mut [f64]),
    ) -> Result<Self> {
        if n == 0 {
            return Err(Error::Empty);
        }
        let mut log_p = zeroed(n);
        let mut acc = LseAcc::new();
        for (j, block) in log_p.chunks_mut(BLOCK).enumerate() {
            fill(j * BLOCK, block);
            let [bm, bs, finite] = block_stats(block);
            if finite != 0.0 {
                check_finite(block, "logit").map_err(|e| match e {
                    Error::NotFinite { index, what, value } => Error::NotFinite {
                        index: j * BLOCK + index,
                        what,
                        value,
                    },
                    e => e,
                })?;
            }
            acc.push(bm, bs);
        }
        let z = acc.value();
        log_p.iter_mut().for_each(|x| *x -= z);
        Ok(Self { log_p })
    }

    /// The uniform policy `π(y) = 1/N`.
    ///
    /// # Errors
    /// [`Error::Empty`] for `N = 0`.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{entropy::entropy, Policy};
    /// let u = Policy::uniform(4)?;
    /// assert!((entropy(&u) - 4f64.ln()).abs() < 1e-15); // the largest entropy on 4 outcomes
    /// assert!(Policy::uniform(0).is_err());
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn uniform(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Empty);
        }
        Ok(Self {
            log_p: vec![-(n as f64).ln(); n],
        })
    }

    /// Subtract `lse` so that the stored log-probabilities sum to one (in exp space).
    fn normalized(mut log_p: Vec<f64>) -> Self {
        let z = log_sum_exp(&log_p);
        log_p.iter_mut().for_each(|x| *x -= z);
        Self { log_p }
    }

    /// `N`, the number of outcomes.
    pub fn len(&self) -> usize {
        self.log_p.len()
    }

    /// Always false: a policy has at least one outcome.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `log π(y)` for every `y`.
    pub fn log_probs(&self) -> &[f64] {
        &self.log_p
    }

    /// `log π(y)`.
    pub fn log_prob(&self, y: usize) -> Result<f64> {
        self.log_p.get(y).copied().ok_or(Error::OutOfRange {
            index: y,
            len: self.len(),
        })
    }

    /// `π(y)` for every `y` (may underflow to 0 for logits far below the maximum; the
    /// log-probabilities never do).
    pub fn probs(&self) -> Vec<f64> {
        let mut p = zeroed(self.len());
        exp_into(&self.log_p, &mut p);
        p
    }

    /// Fails with [`Error::LengthMismatch`] unless both policies live on the same space.
    pub fn check_same_space(&self, other: &Policy) -> Result<()> {
        same_len(self.len(), other.len())
    }

    /// A sampler for `y ~ π` (inverse CDF by binary search: `O(N)` to build, `O(log N)` a draw).
    pub fn sampler(&self) -> Categorical {
        let mut cdf = Vec::with_capacity(self.len());
        let mut acc = 0.0;
        for &l in &self.log_p {
            acc += l.exp();
            cdf.push(acc);
        }
        Categorical { cdf }
    }
}

/// Inverse-CDF categorical sampler built by [`Policy::sampler`].
#[derive(Debug, Clone)]
pub struct Categorical {
    cdf: Vec<f64>,
}

impl Categorical {
    /// Draw one outcome `y ~ π`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let total = *self.cdf.last().expect("non-empty");
        let u = rng.gen::<f64>() * total;
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// An exact policy: probabilities as big rationals, full support, mass exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExactPolicy {
    p: Vec<Rational>,
}

impl ExactPolicy {
    /// From probabilities that sum to exactly one.
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::NotPositive`], [`Error::Mass`] (any deviation from 1).
    ///
    /// # Examples
    /// ```
    /// use difinfo::{Error, ExactPolicy, Rational};
    /// let r = |a: i64, b: i64| Rational::new(a.into(), b.into());
    /// let pi = ExactPolicy::from_probs(vec![r(1, 2), r(1, 3), r(1, 6)])?;
    /// assert_eq!(pi.probs()[2], r(1, 6));
    /// // Exact: a mass of 1 − 10⁻³⁰ is not 1.
    /// let almost = r(1, 2) - Rational::new(1.into(), num_bigint::BigInt::from(10).pow(30));
    /// assert!(matches!(ExactPolicy::from_probs(vec![almost, r(1, 2)]), Err(Error::Mass { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_probs(p: Vec<Rational>) -> Result<Self> {
        Self::check_positive(&p)?;
        let mass: Rational = p.iter().sum();
        if !mass.is_one() {
            return Err(Error::Mass {
                mass: mass.to_string(),
                tolerance: 0.0,
            });
        }
        Ok(Self { p })
    }

    /// From positive weights `w(y)`: `π(y) = w(y) / Σ w`.
    ///
    /// # Errors
    /// [`Error::Empty`], [`Error::NotPositive`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::{ExactPolicy, Rational};
    /// let w = |a: i64| Rational::from_integer(a.into());
    /// let pi = ExactPolicy::from_weights(vec![w(1), w(2), w(5)])?;
    /// assert_eq!(pi.probs()[1], Rational::new(1.into(), 4.into()));
    /// assert!(pi.is_valid());
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn from_weights(w: Vec<Rational>) -> Result<Self> {
        Self::check_positive(&w)?;
        let z: Rational = w.iter().sum();
        Ok(Self {
            p: w.into_iter().map(|x| x / &z).collect(),
        })
    }

    /// The uniform policy `1/N`.
    ///
    /// # Errors
    /// [`Error::Empty`] for `N = 0`.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{ExactPolicy, Rational};
    /// let u = ExactPolicy::uniform(3)?;
    /// assert!(u.probs().iter().all(|p| *p == Rational::new(1.into(), 3.into())));
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn uniform(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Empty);
        }
        let u = Rational::new(1.into(), (n as u64).into());
        Ok(Self { p: vec![u; n] })
    }

    fn check_positive(p: &[Rational]) -> Result<()> {
        if p.is_empty() {
            return Err(Error::Empty);
        }
        match p.iter().position(|x| !x.is_positive()) {
            Some(index) => Err(Error::NotPositive {
                index,
                value: p[index].to_string(),
            }),
            None => Ok(()),
        }
    }

    /// `N`.
    pub fn len(&self) -> usize {
        self.p.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `π(y)` for every `y`.
    pub fn probs(&self) -> &[Rational] {
        &self.p
    }

    /// `π(y)`.
    pub fn prob(&self, y: usize) -> Result<&Rational> {
        self.p.get(y).ok_or(Error::OutOfRange {
            index: y,
            len: self.len(),
        })
    }

    /// Fails with [`Error::LengthMismatch`] unless both live on the same space.
    pub fn check_same_space(&self, other: &ExactPolicy) -> Result<()> {
        same_len(self.len(), other.len())
    }

    /// The float policy with `log π(y) = ln(π(y))` computed from the exact value (no underflow
    /// even for probabilities far below `f64::MIN_POSITIVE`).
    pub fn to_float(&self) -> Policy {
        Policy::normalized(self.p.iter().map(ln_rational).collect())
    }

    /// Whether every probability is positive and the mass is one (always true: the type
    /// guarantees it; exposed so that properties can state the invariant).
    pub fn is_valid(&self) -> bool {
        !self.p.is_empty()
            && self.p.iter().all(|x| x.is_positive())
            && self.p.iter().sum::<Rational>().is_one()
            && !self.p.iter().any(|x| x.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: i64, d: i64) -> Rational {
        Rational::new(n.into(), d.into())
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Policy::from_probs(&[]), Err(Error::Empty));
        assert!(matches!(
            Policy::from_probs(&[0.5, 0.5, 0.0]),
            Err(Error::NotPositive { index: 2, .. })
        ));
        assert!(matches!(
            Policy::from_probs(&[1.5, -0.5]),
            Err(Error::NotPositive { index: 1, .. })
        ));
        assert!(matches!(
            Policy::from_probs(&[f64::NAN, 1.0]),
            Err(Error::NotFinite { index: 0, .. })
        ));
        assert!(matches!(
            Policy::from_probs(&[0.5, 0.6]),
            Err(Error::Mass { .. })
        ));
        assert!(matches!(
            Policy::from_logits(&[f64::INFINITY]),
            Err(Error::NotFinite { .. })
        ));
        assert!(matches!(
            Policy::from_log_probs(&[0.0, f64::NEG_INFINITY]),
            Err(Error::NotPositive { index: 1, .. })
        ));
        assert!(matches!(
            ExactPolicy::from_probs(vec![r(1, 2), r(1, 3)]),
            Err(Error::Mass { .. })
        ));
        assert!(matches!(
            ExactPolicy::from_probs(vec![r(1, 1), r(0, 1)]),
            Err(Error::NotPositive { index: 1, .. })
        ));
        let a = Policy::uniform(2).unwrap();
        let b = Policy::uniform(3).unwrap();
        assert_eq!(
            a.check_same_space(&b),
            Err(Error::LengthMismatch { left: 2, right: 3 })
        );
    }

    #[test]
    fn extreme_logits_keep_full_support() {
        let p = Policy::from_logits(&[1e4, -1e4, 0.0]).unwrap();
        assert!(p.log_probs().iter().all(|l| l.is_finite()));
        assert_eq!(p.log_prob(0).unwrap(), 0.0);
        assert_eq!(p.log_prob(1).unwrap(), -2e4);
    }

    #[test]
    fn blocked_softmax_matches_straightforward() {
        use crate::simd::BLOCK;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for n in [1, 5, BLOCK, 3 * BLOCK + 7] {
            let f: Vec<f64> = (0..n).map(|_| 40.0 * (rng.gen::<f64>() - 0.5)).collect();
            let m = f.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z = m + f.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let p = Policy::from_logits(&f).unwrap();
            for (got, x) in p.log_probs().iter().zip(&f) {
                assert!((got - (x - z)).abs() <= 1e-13, "n = {n}");
            }
            let probs = p.probs();
            for (got, l) in probs.iter().zip(p.log_probs()) {
                assert!((got - l.exp()).abs() <= 4.0 * f64::EPSILON * l.exp());
            }
            // The first non-finite logit is reported, whichever block it is in.
            if n > BLOCK {
                let mut g = f.clone();
                g[2 * BLOCK + 3] = f64::NEG_INFINITY;
                g[n - 1] = f64::NAN;
                assert!(matches!(
                    Policy::from_logits(&g),
                    Err(Error::NotFinite { index, what: "logit", .. }) if index == 2 * BLOCK + 3
                ));
            }
        }
    }

    #[test]
    fn exact_to_float_roundtrip() {
        let e = ExactPolicy::from_weights(vec![r(1, 1), r(2, 1), r(5, 1)]).unwrap();
        let f = e.to_float();
        assert!((f.probs()[2] - 5.0 / 8.0).abs() < 1e-15);
        assert!(e.is_valid());
    }
}
