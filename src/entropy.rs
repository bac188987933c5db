//! Entropy, KL and Jensen–Shannon divergences, in log space (Section 4), and the Monte Carlo
//! entropy estimator of Appendix K.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::logspace::fast_exp;
use crate::policy::Policy;

/// Shannon entropy in nats: `H(π) = −Σ_y π(y) log π(y)`.
pub fn entropy(pi: &Policy) -> f64 {
    let mut lanes = [0.0f64; 8];
    let lp = pi.log_probs();
    let chunks = lp.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] -= fast_exp(c[i]) * c[i];
        }
    }
    let mut h: f64 = lanes.iter().sum();
    for &l in rest {
        h -= fast_exp(l) * l;
    }
    h
}

/// Kullback–Leibler divergence `KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y))`.
pub fn kl(p: &Policy, q: &Policy) -> Result<f64> {
    p.check_same_space(q)?;
    let mut lanes = [0.0f64; 8];
    let (a, b) = (p.log_probs(), q.log_probs());
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += fast_exp(ca[i]) * (ca[i] - cb[i]);
        }
    }
    let mut s: f64 = lanes.iter().sum();
    for i in n8..a.len() {
        s += fast_exp(a[i]) * (a[i] - b[i]);
    }
    Ok(s.max(0.0))
}

/// Jensen–Shannon divergence in nats, `JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`, `m = (p + q)/2`.
///
/// Per outcome, with `a = log p(y)`, `b = log q(y)`, `hi = max(a, b)`, `t = e^{−|a − b|}`:
/// `log m(y) = hi + log(1 + t) − log 2`, so each term needs one exponential and one logarithm.
/// Bounded by `log 2`.
pub fn js(p: &Policy, q: &Policy) -> Result<f64> {
    p.check_same_space(q)?;
    let (a, b) = (p.log_probs(), q.log_probs());
    let mut lanes = [0.0f64; 8];
    let term = |x: f64, y: f64| -> f64 {
        let (hi, lo) = if x >= y { (x, y) } else { (y, x) };
        let t = fast_exp(lo - hi);
        let log_m = hi + (1.0 + t).ln() - std::f64::consts::LN_2;
        let (ex, ey) = (fast_exp(x), fast_exp(y));
        ex * (x - log_m) + ey * (y - log_m)
    };
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += term(ca[i], cb[i]);
        }
    }
    let mut s: f64 = lanes.iter().sum();
    for i in n8..a.len() {
        s += term(a[i], b[i]);
    }
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

/// Monte Carlo entropy from the log-probabilities of samples `y_i ~ π` (Appendix K):
/// `Ĥ = −(1/M) Σ_i log π(y_i)`, standard error `s/√M`. At sequence level `log π(y_i)` is the sum
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
}
