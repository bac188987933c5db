//! Entropy, KL and Jensen–Shannon divergences, in log space (Section 4), and the Monte Carlo
//! entropy estimator of Appendix K.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::simd::{fast_exp, lane_sum, lane_sum2, ln_1p_unit, multiversion};

multiversion! {
    /// `Σ_y e^{l_y} l_y` over log-probabilities, eight fixed lanes (bit-identical at every
    /// [`Level`](crate::simd::Level)).
    fn neg_entropy_sum / neg_entropy_sum_at(lp: &[f64]) -> f64 {
        lane_sum(lp, |l| fast_exp(l) * l)
    }
}

/// Shannon entropy in nats: `H(π) = −Σ_y π(y) log π(y)`.
pub fn entropy(pi: &Policy) -> f64 {
    -neg_entropy_sum(pi.log_probs())
}

multiversion! {
    /// `Σ_y e^{a_y} (a_y − b_y)`, eight fixed lanes. Panics unless the lengths agree.
    fn kl_sum / kl_sum_at(a: &[f64], b: &[f64]) -> f64 {
        lane_sum2(a, b, |x, y| fast_exp(x) * (x - y))
    }
}

/// Kullback–Leibler divergence `KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y))`.
pub fn kl(p: &Policy, q: &Policy) -> Result<f64> {
    p.check_same_space(q)?;
    Ok(kl_sum(p.log_probs(), q.log_probs()).max(0.0))
}

/// One outcome's share of `2·JS`: `p (log p − log m) + q (log q − log m)` with `a = log p`,
/// `b = log q`. With `hi = max(a, b)`, `δ = min(a, b) − hi ≤ 0`, `t = e^δ`:
/// `log m = hi + log(1 + t) − log 2`, `e^{min} = e^{hi} t`, so the share is
/// `e^{hi} ((1 + t) L + t δ)` with `L = log 2 − log(1 + t)`: two exponentials and one `log1p`.
#[inline(always)]
fn js_term(a: f64, b: f64) -> f64 {
    let hi = if a >= b { a } else { b };
    let lo = if a >= b { b } else { a };
    let d = lo - hi;
    let t = fast_exp(d);
    let l = std::f64::consts::LN_2 - ln_1p_unit(t);
    fast_exp(hi) * ((1.0 + t) * l + t * d)
}

multiversion! {
    /// `Σ_y js_term(a_y, b_y)`, eight fixed lanes. Panics unless the lengths agree.
    fn js_sum / js_sum_at(a: &[f64], b: &[f64]) -> f64 {
        lane_sum2(a, b, js_term)
    }
}

/// Jensen–Shannon divergence in nats, `JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`, `m = (p + q)/2`.
///
/// Per outcome, with `a = log p(y)`, `b = log q(y)`, `hi = max(a, b)`, `t = e^{−|a − b|}`:
/// `log m(y) = hi + log(1 + t) − log 2`, so each term needs one exponential and one logarithm
/// (and `e^{hi}`; `e^{min(a,b)} = e^{hi} t`).
/// Bounded by `log 2`.
pub fn js(p: &Policy, q: &Policy) -> Result<f64> {
    p.check_same_space(q)?;
    let s = js_sum(p.log_probs(), q.log_probs());
    Ok((0.5 * s).clamp(0.0, std::f64::consts::LN_2))
}

/// A Monte Carlo estimate with its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The sample mean.
    pub mean: f64,
    /// `s / √M` with the unbiased sample standard deviation `s` (0 when `M = 1`).
    pub stderr: f64,
    /// `M`, the number of samples.
    pub samples: usize,
}

impl Estimate {
    /// The two-sided confidence interval of the mean at `level` (e.g. `0.95`), with Student's
    /// t quantile on `M − 1` degrees of freedom: `mean ± t_{M−1, (1+level)/2} · stderr`
    /// (Appendix K's estimates rest on few samples per prompt, where the normal quantile would
    /// be too narrow).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `0 < level < 1`, or with `M = 1` (no spread, no
    /// interval).
    ///
    /// # Examples
    /// ```
    /// use difinfo::entropy::monte_carlo_entropy;
    /// let est = monte_carlo_entropy(&[-1.0, -2.0, -3.0, -2.0])?;
    /// let [lo, hi] = est.interval(0.95)?;
    /// // t_{3, 0.975} = 3.182…: wider than the normal 1.96 · stderr.
    /// assert!((hi - lo) / 2.0 > 3.18 * est.stderr && (hi - lo) / 2.0 < 3.19 * est.stderr);
    /// assert!(lo < est.mean && est.mean < hi);
    /// assert!(monte_carlo_entropy(&[-1.0])?.interval(0.95).is_err());
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn interval(&self, level: f64) -> Result<[f64; 2]> {
        check_level(level)?;
        if self.samples < 2 {
            return Err(Error::invalid(
                "samples",
                self.samples,
                "a confidence interval needs M ≥ 2 samples",
            ));
        }
        let t = StudentsT::new(0.0, 1.0, (self.samples - 1) as f64)
            .expect("M − 1 ≥ 1 degrees of freedom")
            .inverse_cdf(0.5 + level / 2.0);
        Ok([self.mean - t * self.stderr, self.mean + t * self.stderr])
    }
}

fn check_level(level: f64) -> Result<()> {
    if level > 0.0 && level < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "level",
            level,
            "a confidence level lies in (0, 1)",
        ))
    }
}

/// The two-sided normal confidence interval `mean ± z_{(1+level)/2} · stderr` of an estimate
/// that averages many independent samples (e.g. a mean over prompts of per-prompt estimates).
///
/// # Errors
/// [`Error::InvalidParameter`] unless `0 < level < 1` and `stderr ≥ 0` is finite.
///
/// # Examples
/// ```
/// use difinfo::entropy::normal_interval;
/// let [lo, hi] = normal_interval(2.0, 0.1, 0.95)?;
/// assert!((hi - 2.0 - 0.195_996).abs() < 1e-6 && (2.0 - lo - 0.195_996).abs() < 1e-6);
/// # Ok::<(), difinfo::Error>(())
/// ```
pub fn normal_interval(mean: f64, stderr: f64, level: f64) -> Result<[f64; 2]> {
    check_level(level)?;
    if !(stderr.is_finite() && stderr >= 0.0) {
        return Err(Error::invalid(
            "stderr",
            stderr,
            "a standard error is finite and ≥ 0",
        ));
    }
    let z = Normal::new(0.0, 1.0)
        .expect("the standard normal")
        .inverse_cdf(0.5 + level / 2.0);
    Ok([mean - z * stderr, mean + z * stderr])
}

/// The two-sided test of `H_a = H_b` from two independent estimates:
/// `z = (a − b) / √(se_a² + se_b²)`, p-value `2 Φ(−|z|)` (normal approximation, both estimates
/// means of many samples). Returns `(z, p)`; `p = 1` when both standard errors are 0 and the
/// means agree, `p = 0` when they differ.
///
/// # Errors
/// [`Error::InvalidParameter`] for a non-finite input or a negative standard error.
///
/// # Examples
/// ```
/// use difinfo::entropy::difference_test;
/// let (z, p) = difference_test((2.3, 0.03), (2.0, 0.04))?;
/// assert!((z - 6.0).abs() < 1e-12 && p < 1e-8); // H_a > H_b, far beyond the noise
/// let (_, p) = difference_test((2.02, 0.03), (2.0, 0.04))?;
/// assert!(p > 0.5); // within the noise
/// # Ok::<(), difinfo::Error>(())
/// ```
pub fn difference_test(a: (f64, f64), b: (f64, f64)) -> Result<(f64, f64)> {
    for (name, v) in [("mean", a.0), ("mean", b.0)] {
        if !v.is_finite() {
            return Err(Error::invalid(name, v, "an estimate is finite"));
        }
    }
    for se in [a.1, b.1] {
        if !(se.is_finite() && se >= 0.0) {
            return Err(Error::invalid(
                "stderr",
                se,
                "a standard error is finite and ≥ 0",
            ));
        }
    }
    let se = (a.1 * a.1 + b.1 * b.1).sqrt();
    let d = a.0 - b.0;
    if se == 0.0 {
        return Ok(if d == 0.0 {
            (0.0, 1.0)
        } else {
            (d.signum() * f64::INFINITY, 0.0)
        });
    }
    let z = d / se;
    let p: f64 = 2.0
        * Normal::new(0.0, 1.0)
            .expect("the standard normal")
            .cdf(-z.abs());
    Ok((z, p.min(1.0)))
}

/// Monte Carlo entropy from the log-probabilities of samples `y_i ~ π` (Appendix K):
/// `Ĥ = −(1/M) Σ_i log π(y_i)`, standard error `s/√M` (a confidence interval:
/// [`Estimate::interval`]). At sequence level `log π(y_i)` is the sum
/// of the token log-probabilities.
///
/// # Errors
/// [`Error::Empty`] with no sample, [`Error::NotFinite`] on a non-finite log-probability.
pub fn monte_carlo_entropy(sample_log_probs: &[f64]) -> Result<Estimate> {
    let m = sample_log_probs.len();
    if m == 0 {
        return Err(Error::Empty);
    }
    if let Some(index) = sample_log_probs.iter().position(|x| !x.is_finite()) {
        return Err(Error::NotFinite {
            index,
            what: "sample log-probability",
            value: sample_log_probs[index],
        });
    }
    let mean = -sample_log_probs.iter().sum::<f64>() / m as f64;
    let stderr = if m > 1 {
        let var = sample_log_probs
            .iter()
            .map(|l| (-l - mean) * (-l - mean))
            .sum::<f64>()
            / (m - 1) as f64;
        (var / m as f64).sqrt()
    } else {
        0.0
    };
    Ok(Estimate {
        mean,
        stderr,
        samples: m,
    })
}

/// Draw `M` samples `y ~ π` and estimate `H(π)` by [`monte_carlo_entropy`].
pub fn sample_entropy<R: rand::Rng + ?Sized>(
    pi: &Policy,
    samples: usize,
    rng: &mut R,
) -> Result<Estimate> {
    let sampler = pi.sampler();
    let lp: Vec<f64> = (0..samples)
        .map(|_| pi.log_probs()[sampler.sample(rng)])
        .collect();
    monte_carlo_entropy(&lp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let u = Policy::uniform(4).unwrap();
        assert!((entropy(&u) - 4f64.ln()).abs() < 1e-15);
        let p = Policy::from_probs(&[0.5, 0.5]).unwrap();
        let q = Policy::from_logits(&[1e4, -1e4]).unwrap();
        // m = (3/4, 1/4): JS = ½(½ln(2/3)+½ln2) + ½ ln(4/3)
        let want = 0.5 * (0.5 * (0.5f64 / 0.75).ln() + 0.5 * (0.5f64 / 0.25).ln())
            + 0.5 * (1.0f64 / 0.75).ln();
        assert!((js(&p, &q).unwrap() - want).abs() < 1e-12);
        assert_eq!(kl(&p, &p).unwrap(), 0.0);
        assert!(js(&p, &Policy::uniform(3).unwrap()).is_err());
    }

    fn random_policy(n: usize, seed: u64, scale: f64) -> Policy {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let f: Vec<f64> = (0..n).map(|_| scale * (rng.gen::<f64>() - 0.5)).collect();
        Policy::from_logits(&f).unwrap()
    }

    /// The vectorized sums against the straightforward formulas with libm `exp` and `ln`.
    #[test]
    fn match_straightforward_formulas() {
        for (n, scale, seed) in [
            (1, 1.0, 1),
            (13, 4.0, 2),
            (1000, 10.0, 3),
            (20_011, 30.0, 4),
            (5000, 2000.0, 5), // most probabilities underflow
        ] {
            let p = random_policy(n, seed, scale);
            let q = random_policy(n, seed + 100, scale);
            let (a, b) = (p.log_probs(), q.log_probs());
            let h: f64 = -a.iter().map(|l| l.exp() * l).sum::<f64>();
            assert!((entropy(&p) - h).abs() <= 1e-13 * h.max(1.0), "n={n}");
            let k: f64 = a.iter().zip(b).map(|(x, y)| x.exp() * (x - y)).sum();
            assert!(
                (kl(&p, &q).unwrap() - k.max(0.0)).abs() <= 1e-12 * k.max(1.0),
                "n={n}"
            );
            let j: f64 = 0.5
                * a.iter()
                    .zip(b)
                    .map(|(&x, &y)| {
                        let m = ((x.exp() + y.exp()) / 2.0).ln();
                        let lm = if m.is_finite() {
                            m
                        } else {
                            x.max(y) + (-(x - y).abs()).exp().ln_1p() - std::f64::consts::LN_2
                        };
                        x.exp() * (x - lm) + y.exp() * (y - lm)
                    })
                    .sum::<f64>();
            assert!(
                (js(&p, &q).unwrap() - j).abs() <= 1e-13,
                "n={n}: {} vs {j}",
                js(&p, &q).unwrap()
            );
            assert_eq!(js(&p, &p).unwrap(), 0.0);
            assert!(js(&p, &q).unwrap() <= std::f64::consts::LN_2);
        }
    }

    /// The intervals' quantiles against published tables (t_{9, 0.975} = 2.262157,
    /// z_{0.975} = 1.959964), and the t interval covers the true entropy about 95 % of the time.
    #[test]
    fn intervals_have_their_quantiles_and_coverage() {
        use rand::SeedableRng;
        let lp: Vec<f64> = (0..10).map(|i| -1.0 - 0.1 * i as f64).collect();
        let e = monte_carlo_entropy(&lp).unwrap();
        let [lo, hi] = e.interval(0.95).unwrap();
        assert!(((hi - e.mean) / e.stderr - 2.262_157).abs() < 1e-5);
        assert!(((e.mean - lo) / e.stderr - 2.262_157).abs() < 1e-5);
        let [lo, hi] = normal_interval(1.0, 1.0, 0.95).unwrap();
        assert!((hi - 1.0 - 1.959_964).abs() < 1e-6 && (1.0 - lo - 1.959_964).abs() < 1e-6);
        assert!(e.interval(1.0).is_err() && e.interval(0.0).is_err());
        assert!(normal_interval(0.0, f64::NAN, 0.5).is_err());
        // Coverage: 2,000 estimates of H(π) from 50 samples each.
        let pi = random_policy(20, 3, 3.0);
        let h = entropy(&pi);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let runs = 2000;
        let covered = (0..runs)
            .filter(|_| {
                let [lo, hi] = sample_entropy(&pi, 50, &mut rng)
                    .unwrap()
                    .interval(0.95)
                    .unwrap();
                lo <= h && h <= hi
            })
            .count();
        // Binomial(2000, 0.95) lies within ±1.5 points with probability > 0.998.
        let rate = covered as f64 / runs as f64;
        assert!((0.935..=0.965).contains(&rate), "coverage {rate}");
    }

    /// Every SIMD level gives the same bits.
    #[test]
    fn simd_levels_are_bit_identical() {
        use crate::simd::Level;
        for n in [1, 8, 999, 4097] {
            let p = random_policy(n, 9, 50.0);
            let q = random_policy(n, 10, 50.0);
            let (a, b) = (p.log_probs(), q.log_probs());
            let base = (
                neg_entropy_sum_at(Level::Baseline, a),
                kl_sum_at(Level::Baseline, a, b),
                js_sum_at(Level::Baseline, a, b),
            );
            for l in Level::available() {
                assert_eq!(
                    neg_entropy_sum_at(l, a).to_bits(),
                    base.0.to_bits(),
                    "{l:?}"
                );
                assert_eq!(kl_sum_at(l, a, b).to_bits(), base.1.to_bits(), "{l:?}");
                assert_eq!(js_sum_at(l, a, b).to_bits(), base.2.to_bits(), "{l:?}");
            }
        }
    }
}
