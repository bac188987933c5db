//! β fit and β-accuracy (Appendix K.1).
//!
//! A converged DID estimator `π̂` satisfies `log π̂(y) = β log(π(y)/π_ref(y)) + c` with `β ≥ 0`.
//! Per prompt: samples `y ~ π̂`, an OLS fit of `β, c` with `x = log π(y) − log π_ref(y)`,
//! `y = log π̂(y)`. The β-accuracy is the fraction of prompts whose fitted `β` is non-negative.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fit::{ols, LinearFit};

/// The outcome of one prompt's fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum BetaFit {
    /// The fit exists.
    Determined(LinearFit),
    /// The samples do not identify `β` (fewer than two distinct `x` values).
    Undetermined,
}

/// Fit `log π̂(y) = β (log π(y) − log π_ref(y)) + c` by OLS in closed form.
///
/// Fewer than two distinct `x` (e.g. four samples of one sequence) is [`BetaFit::Undetermined`],
/// not an error.
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::NotFinite`].
pub fn fit_beta(log_ratio: &[f64], log_estimator: &[f64]) -> Result<BetaFit> {
    match ols(log_ratio, log_estimator) {
        Ok(f) => Ok(BetaFit::Determined(f)),
        Err(Error::Undetermined(_)) => Ok(BetaFit::Undetermined),
        Err(e) => Err(e),
    }
}

/// The β-accuracy over prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BetaAccuracy {
    /// `#{determined prompts with β̂ ≥ 0} / #{determined prompts}`.
    pub accuracy: f64,
    /// Prompts whose fit exists.
    pub determined: usize,
    /// Prompts whose samples could not determine `β`.
    pub undetermined: usize,
}

/// β-accuracy: the fraction of prompts (among those whose fit is determined) with `β̂ ≥ 0`.
///
/// # Errors
/// [`Error::Undetermined`] when no prompt has a determined fit.
pub fn beta_accuracy(fits: &[BetaFit]) -> Result<BetaAccuracy> {
    let betas: Vec<f64> = fits
        .iter()
        .filter_map(|f| match f {
            BetaFit::Determined(l) => Some(l.slope),
            BetaFit::Undetermined => None,
        })
        .collect();
    if betas.is_empty() {
        return Err(Error::Undetermined(format!(
            "none of {} prompt fits is determined",
            fits.len()
        )));
    }
    let ok = betas.iter().filter(|&&b| b >= 0.0).count();
    Ok(BetaAccuracy {
        accuracy: ok as f64 / betas.len() as f64,
        determined: betas.len(),
        undetermined: fits.len() - betas.len(),
    })
}
