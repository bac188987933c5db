//! The rule: what a run optimizes (SFT, the preference loss, DPO-PG, a reward model).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What is optimized. On a command line (the `clap` feature) the preference rules only:
/// `sft` is a command of its own there, as in TRL (`SFTTrainer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Rule {
    /// Token-level NLL (TRL's `SFTTrainer`).
    #[serde(rename = "sft")]
    #[cfg_attr(feature = "clap", value(skip))]
    Sft,
    /// The preference loss `Σ_k w_k mean ℓ_k` (TRL's `DPOTrainer`).
    #[default]
    #[serde(rename = "dpo")]
    #[cfg_attr(feature = "clap", value(name = "dpo"))]
    Preference,
    /// DPO-PG (Appendix H): a step along the chosen NLL's gradient projected off the rejected
    /// NLL's; the preference loss is computed for logging only.
    #[serde(rename = "dpo-pg")]
    #[cfg_attr(feature = "clap", value(name = "dpo-pg"))]
    ProjectedGradient,
    /// A reward model's Bradley–Terry loss on its scores of the chosen and rejected
    /// completions (TRL's `RewardTrainer`; [`crate::preference::bradley_terry_loss`]).
    #[serde(rename = "reward")]
    #[cfg_attr(feature = "clap", value(skip))]
    Reward,
}

impl Rule {
    /// `sft`, `dpo`, `dpo-pg`, `reward`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Sft => "sft",
            Rule::Preference => "dpo",
            Rule::ProjectedGradient => "dpo-pg",
            Rule::Reward => "reward",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
