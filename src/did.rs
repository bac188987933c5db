//! The Differential Information Distribution (Definition 3.1, Lemma D.1, Theorem 3.2).
//!
//! The DID from `π_ref` to `π` is the normalized likelihood ratio
//!
//! ```text
//! q_{π/π_ref}(y) = (π(y) / π_ref(y)) / Z,     Z = Σ_{y'} π(y') / π_ref(y')
//! ```
//!
//! and, for any two policies `a`, `b`, [`normalized_ratio`] is `q_{a/b}`.

use num_traits::{One, Zero};

use crate::error::{Error, Result};
use crate::policy::{ExactPolicy, Policy};
use crate::Rational;

/// `q_{a/b}(y) = (a(y)/b(y)) / Σ_{y'} a(y')/b(y')`, in log space:
/// `log q(y) = log a(y) − log b(y) − lse(log a − log b)`. (Theorem 3.2.)
///
/// # Errors
/// [`Error::LengthMismatch`].
pub fn normalized_ratio(a: &Policy, b: &Policy) -> Result<Policy> {
    a.check_same_space(b)?;
    let (la, lb) = (a.log_probs(), b.log_probs());
    // One pass writes `log a − log b` block by block and accumulates its log-sum-exp; a second
    // subtracts it (no intermediate vector).
    Policy::from_logit_blocks(la.len(), |start, out| {
        let end = start + out.len();
        for ((o, x), y) in out.iter_mut().zip(&la[start..end]).zip(&lb[start..end]) {
            *o = x - y;
        }
    })
}

/// The DID `q_{π/π_ref}` (Theorem 3.2): [`normalized_ratio`]`(π, π_ref)`.
pub fn did(pi: &Policy, pi_ref: &Policy) -> Result<Policy> {
    normalized_ratio(pi, pi_ref)
}

/// Exact `q_{a/b}(y) = (a(y)/b(y)) / Σ_{y'} a(y')/b(y')` over rationals. (Theorem 3.2.)
pub fn normalized_ratio_exact(a: &ExactPolicy, b: &ExactPolicy) -> Result<ExactPolicy> {
    a.check_same_space(b)?;
    ExactPolicy::from_weights(
        a.probs()
            .iter()
            .zip(b.probs())
            .map(|(x, y)| x / y)
            .collect(),
    )
}

/// Exact DID `q_{π/π_ref}`.
pub fn did_exact(pi: &ExactPolicy, pi_ref: &ExactPolicy) -> Result<ExactPolicy> {
    normalized_ratio_exact(pi, pi_ref)
}

/// The event `X` of Lemma D.1: `p(X | y) = c · π(y)/π_ref(y)` for a constant
/// `0 < c ≤ min_y π_ref(y)/π(y)`.
///
/// Lemma D.1: `p(X | y) ∈ (0, 1]`, `p(X) = Σ_y π_ref(y) p(X | y) = c`, and the posterior
/// `π_ref(y | X) = π(y)`. Theorem 3.2: under a uniform prior, `p(y | X) = q_{π/π_ref}(y)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DidEvent {
    pi_ref: ExactPolicy,
    c: Rational,
    likelihood: Vec<Rational>,
}

impl DidEvent {
    /// The largest admissible constant, `c_max = min_y π_ref(y)/π(y)`.
    pub fn max_c(pi: &ExactPolicy, pi_ref: &ExactPolicy) -> Result<Rational> {
        pi.check_same_space(pi_ref)?;
        Ok(pi_ref
            .probs()
            .iter()
            .zip(pi.probs())
            .map(|(r, p)| r / p)
            .min()
            .expect("non-empty"))
    }

    /// Build the event for the constant `c`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`]; [`Error::InvalidParameter`] unless `0 < c ≤ max_c`.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{did::{did_exact, DidEvent}, ExactPolicy, Rational};
    /// let r = |a: i64, b: i64| Rational::new(a.into(), b.into());
    /// let pi_ref = ExactPolicy::from_probs(vec![r(1, 2), r(1, 4), r(1, 4)])?;
    /// let pi = ExactPolicy::from_probs(vec![r(1, 4), r(1, 4), r(1, 2)])?;
    /// let c = DidEvent::max_c(&pi, &pi_ref)?; // min π_ref/π = 1/2
    /// let x = DidEvent::new(&pi, &pi_ref, c.clone())?;
    /// assert_eq!(x.marginal(), c); // p(X) = c (Lemma D.1)
    /// assert_eq!(x.posterior(), pi); // π_ref(y | X) = π(y) (Lemma D.1)
    /// assert_eq!(x.did(), did_exact(&pi, &pi_ref)?); // p(y | X) = q_{π/π_ref}(y) (Theorem 3.2)
    /// assert!(DidEvent::new(&pi, &pi_ref, r(1, 1)).is_err()); // c > c_max
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn new(pi: &ExactPolicy, pi_ref: &ExactPolicy, c: Rational) -> Result<Self> {
        let c_max = Self::max_c(pi, pi_ref)?;
        if c <= Rational::zero() || c > c_max {
            return Err(Error::invalid(
                "c",
                &c,
                format!("Lemma D.1 needs 0 < c ≤ min π_ref/π = {c_max}"),
            ));
        }
        let likelihood = pi
            .probs()
            .iter()
            .zip(pi_ref.probs())
            .map(|(p, r)| &c * p / r)
            .collect();
        Ok(Self {
            pi_ref: pi_ref.clone(),
            c,
            likelihood,
        })
    }

    /// The constant `c`.
    pub fn c(&self) -> &Rational {
        &self.c
    }

    /// `p(X | y) = c · π(y)/π_ref(y)` for every `y`; each lies in `(0, 1]`.
    pub fn likelihood(&self) -> &[Rational] {
        &self.likelihood
    }

    /// `p(X) = Σ_y π_ref(y) p(X | y)` (equals `c`).
    pub fn marginal(&self) -> Rational {
        self.pi_ref
            .probs()
            .iter()
            .zip(&self.likelihood)
            .map(|(r, l)| r * l)
            .sum()
    }

    /// The Bayes posterior `π_ref(y | X) = π_ref(y) p(X | y) / p(X)` (equals `π`).
    pub fn posterior(&self) -> ExactPolicy {
        let w = self
            .pi_ref
            .probs()
            .iter()
            .zip(&self.likelihood)
            .map(|(r, l)| r * l)
            .collect();
        ExactPolicy::from_weights(w).expect("positive weights")
    }

    /// `p(y | X)` under a uniform prior on `Y`: `p(X | y) / Σ_{y'} p(X | y')` (equals the DID).
    pub fn did(&self) -> ExactPolicy {
        ExactPolicy::from_weights(self.likelihood.clone()).expect("positive weights")
    }

    /// Whether every `p(X | y)` is a probability in `(0, 1]`.
    pub fn likelihood_is_probability(&self) -> bool {
        self.likelihood
            .iter()
            .all(|l| *l > Rational::zero() && *l <= Rational::one())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: i64, d: i64) -> Rational {
        Rational::new(n.into(), d.into())
    }

    /// The fused float DID against `log a − log b − lse(log a − log b)` with libm.
    #[test]
    fn float_did_matches_straightforward() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in [1, 3, 2048, 10_007] {
            let mut draw = || -> Policy {
                let f: Vec<f64> = (0..n).map(|_| 30.0 * (rng.gen::<f64>() - 0.5)).collect();
                Policy::from_logits(&f).unwrap()
            };
            let (pi, pi_ref) = (draw(), draw());
            let d: Vec<f64> = pi
                .log_probs()
                .iter()
                .zip(pi_ref.log_probs())
                .map(|(a, b)| a - b)
                .collect();
            let m = d.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z = m + d.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let q = did(&pi, &pi_ref).unwrap();
            for (got, x) in q.log_probs().iter().zip(&d) {
                assert!((got - (x - z)).abs() <= 1e-13, "n = {n}");
            }
        }
        let e = did(&Policy::uniform(2).unwrap(), &Policy::uniform(3).unwrap());
        assert_eq!(e, Err(Error::LengthMismatch { left: 2, right: 3 }));
    }

    #[test]
    fn lemma_d1_by_hand() {
        let pi = ExactPolicy::from_probs(vec![r(1, 2), r(1, 4), r(1, 4)]).unwrap();
        let pi_ref = ExactPolicy::from_probs(vec![r(1, 4), r(1, 4), r(1, 2)]).unwrap();
        assert_eq!(DidEvent::max_c(&pi, &pi_ref).unwrap(), r(1, 2));
        let ev = DidEvent::new(&pi, &pi_ref, r(1, 2)).unwrap();
        assert_eq!(ev.marginal(), r(1, 2));
        assert_eq!(ev.posterior(), pi);
        assert_eq!(ev.did(), did_exact(&pi, &pi_ref).unwrap());
        assert_eq!(ev.did().probs(), &[r(4, 7), r(2, 7), r(1, 7)]);
        assert!(DidEvent::new(&pi, &pi_ref, r(3, 4)).is_err());
        assert!(DidEvent::new(&pi, &pi_ref, r(0, 1)).is_err());
    }
}
