//! β, the scale of the rewards and of Eq. 1: **validated once, here**.
//!
//! ```text
//! reward      r(y) = β · f(log π(y) − log π_ref(y))        (Section 2, Theorem 3.4)
//! Eq. 1       π_l(y) ∝ π_ref(y)^{1+β} · π*(y)^{−β}         (Theorem L.1)
//! ```
//!
//! `β` is the inverse temperature of the rewards (DPO's KL coefficient); both formulas need a
//! finite `β > 0`. [`Beta::new`] is the one check: the objective ([`crate::objective`]), the
//! ideal rejected distribution ([`crate::rejected`]) and the front ends all go through it.

use thiserror::Error;

/// A finite, positive β. The field is private: [`Beta::new`] is the only way in.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Beta(f64);

/// A β that is not finite and positive.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[error("beta must be finite and positive, got {0}")]
pub struct BetaError(pub f64);

impl Beta {
    /// Validates `β`: finite and `β > 0`.
    ///
    /// # Errors
    /// [`BetaError`] carrying the refused value (NaN, ±∞, `β ≤ 0`).
    ///
    /// # Examples
    /// ```
    /// use difinfo::beta::{Beta, BetaError};
    /// assert_eq!(Beta::new(0.1)?.get(), 0.1);
    /// assert_eq!(Beta::new(-1.0), Err(BetaError(-1.0)));
    /// assert_eq!(
    ///     Beta::new(0.0).unwrap_err().to_string(),
    ///     "beta must be finite and positive, got 0"
    /// );
    /// # Ok::<(), BetaError>(())
    /// ```
    pub fn new(beta: f64) -> Result<Beta, BetaError> {
        if beta.is_finite() && beta > 0.0 {
            Ok(Beta(beta))
        } else {
            Err(BetaError(beta))
        }
    }

    /// The value, `β > 0`.
    pub fn get(self) -> f64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finite_positive_values_are_betas() {
        for ok in [f64::MIN_POSITIVE, 0.1, 1.0, 1e300] {
            assert_eq!(Beta::new(ok).map(Beta::get), Ok(ok));
        }
        for bad in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(Beta::new(bad).is_err(), "{bad}");
        }
    }
}
