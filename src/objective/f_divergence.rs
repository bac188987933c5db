//! TRL's `f_divergence_type`: the function the scores apply to the log-ratios.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ObjectiveError;

/// TRL's `f_divergence_type`: the function `f` the scores apply to the log-ratios `u`
/// (f-DPO, Wang et al. 2023; formulas in [`crate::reward::score`]; TRL 1.16's forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
pub enum FDivergence {
    /// `f(u) = u` (standard DPO).
    #[default]
    ReverseKl,
    /// `f(u) = 1 − e^{−u}`.
    ForwardKl,
    /// `f(u) = log 2 + log σ(u)`.
    JsDivergence,
    /// `f(u) = (e^{(α−1) u} − 1) / (α − 1)` (`u` at `α = 1`).
    AlphaDivergence,
}

impl FDivergence {
    /// All four.
    pub const ALL: [FDivergence; 4] = [
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl FromStr for FDivergence {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, ObjectiveError> {
        FDivergence::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| ObjectiveError::UnknownFDivergence(s.to_string()))
    }
}
