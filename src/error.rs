//! The one error type of the library: one variant per broken invariant.

use thiserror::Error;

/// Shorthand for `Result<T, difinfo::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Every way an input can violate an invariant of the theory.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A distribution over an empty outcome space.
    #[error("empty outcome space: a policy needs at least one outcome")]
    Empty,
    /// A probability that is zero or negative: policies need full support.
    #[error("outcome {index}: probability {value} is not positive (a policy needs full support)")]
    NotPositive { index: usize, value: String },
    /// NaN or ±∞ where a finite number is required.
    #[error("outcome {index}: {what} {value} is not finite")]
    NotFinite {
        index: usize,
        what: &'static str,
        value: f64,
    },
    /// Probabilities that do not sum to one (exactly for rationals, within a tolerance for floats).
    #[error("total mass {mass} differs from 1 (tolerance {tolerance})")]
    Mass { mass: String, tolerance: f64 },
    /// Two vectors that should describe the same outcome space have different lengths.
    #[error("length mismatch: {left} outcomes against {right}")]
    LengthMismatch { left: usize, right: usize },
    /// An outcome index outside `0..len`.
    #[error("outcome index {index} out of range for {len} outcomes")]
    OutOfRange { index: usize, len: usize },
    /// A parameter outside its domain (β ≤ 0, c outside (0, min ratio], …).
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// A fit whose data cannot determine it (fewer than two distinct x values, …).
    #[error("undetermined fit: {0}")]
    Undetermined(String),
    /// A β that is not finite and positive ([`crate::beta::Beta::new`]).
    #[error(transparent)]
    Beta(#[from] crate::beta::BetaError),
    /// An invalid objective (β, ε, loss types, …).
    #[error(transparent)]
    Objective(#[from] crate::objective::ObjectiveError),
}

impl Error {
    pub(crate) fn invalid(
        name: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidParameter {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// `Ok(())` when both lengths agree, else [`Error::LengthMismatch`].
pub(crate) fn same_len(left: usize, right: usize) -> Result<()> {
    if left == right {
        Ok(())
    } else {
        Err(Error::LengthMismatch { left, right })
    }
}
