//! Reward forms `r_π(y)` as functions of a policy's log-probabilities (Section 2, Theorem 3.4).
//!
//! - log-ratio (DPO): `r(y) = β log(π(y) / π_ref(y))`
//! - reference-free: `r(y) = β log π(y)` (β = 1 is the DID estimator of Appendix K)
//! - custom: any closure `y, log π(y) ↦ (r(y), ∂r/∂log π(y))`
//!
//! Each form also returns `∂r(y)/∂log π(y)`, which the population loss needs for its gradient.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::policy::Policy;

/// A user reward: `(y, log π(y)) ↦ (r(y), ∂r(y)/∂log π(y))`.
pub type RewardFn = Arc<dyn Fn(usize, f64) -> (f64, f64) + Send + Sync>;

/// A reward form.
#[derive(Clone)]
pub enum RewardForm {
    /// `r(y) = β log(π(y)/π_ref(y))`: DPO's implicit reward, the unique optimal form (Theorem 3.4).
    LogRatio { beta: f64, reference: Policy },
    /// `r(y) = β log π(y)`: reference-free (no `π_ref`).
    RefFree { beta: f64 },
    /// Any closure.
    Custom(RewardFn),
}

impl fmt::Debug for RewardForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LogRatio { beta, reference } => {
                write!(f, "LogRatio {{ beta: {beta}, N: {} }}", reference.len())
            }
            Self::RefFree { beta } => write!(f, "RefFree {{ beta: {beta} }}"),
            Self::Custom(_) => write!(f, "Custom(..)"),
        }
    }
}

fn check_beta(beta: f64) -> Result<()> {
    if beta.is_finite() && beta > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "beta",
            beta,
            "β must be finite and positive",
        ))
    }
}

impl RewardForm {
    /// DPO's `β log(π/π_ref)`. Errors unless `β > 0` is finite.
    pub fn log_ratio(beta: f64, reference: Policy) -> Result<Self> {
        check_beta(beta)?;
        Ok(Self::LogRatio { beta, reference })
    }

    /// Reference-free `β log π`. Errors unless `β > 0` is finite.
    pub fn ref_free(beta: f64) -> Result<Self> {
        check_beta(beta)?;
        Ok(Self::RefFree { beta })
    }

    /// `r(y)` and `∂r(y)/∂log π(y)` for every `y`, given `log π`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when the log-ratio reference lives on another space.
    pub fn evaluate(&self, log_pi: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        match self {
            Self::LogRatio { beta, reference } => {
                crate::error::same_len(log_pi.len(), reference.len())?;
                let r = log_pi
                    .iter()
                    .zip(reference.log_probs())
                    .map(|(l, lr)| beta * (l - lr))
                    .collect();
                Ok((r, vec![*beta; log_pi.len()]))
            }
            Self::RefFree { beta } => Ok((
                log_pi.iter().map(|l| beta * l).collect(),
                vec![*beta; log_pi.len()],
            )),
            Self::Custom(g) => Ok(log_pi.iter().enumerate().map(|(y, &l)| g(y, l)).unzip()),
        }
    }

    /// The reward margin `r(y_w) − r(y_l)` of one pair, given `log π`.
    pub fn margin(&self, log_pi: &[f64], y_w: usize, y_l: usize) -> Result<f64> {
        let n = log_pi.len();
        for y in [y_w, y_l] {
            if y >= n {
                return Err(Error::OutOfRange { index: y, len: n });
            }
        }
        let (r, _) = self.evaluate(log_pi)?;
        Ok(r[y_w] - r[y_l])
    }
}
