//! TRL's loss types (`DPOConfig.loss_type`): their names and which options each reads.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ObjectiveError;

/// TRL 1.x's `DPOTrainer` loss types (`DPOConfig.loss_type`); formulas in [`crate::loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
pub enum LossType {
    /// DPO: `−log σ(β Δ)`; with label smoothing ε conservative DPO.
    Sigmoid,
    /// SLiC: `max(0, 1 − β Δ)`.
    Hinge,
    /// IPO: `(Δ̄ − 1/(2β))²` on per-token mean scores.
    Ipo,
    /// EXO (pairwise): `KL(Bern(σ(β Δ)) ‖ Bern(1 − ε))`.
    ExoPair,
    /// NCA (pairwise): `−log σ(β u_w) − ½ log σ(−β u_w) − ½ log σ(−β u_l)`.
    NcaPair,
    /// Robust DPO: `((1 − ε)(−log σ(β Δ)) − ε(−log σ(−β Δ))) / (1 − 2ε)`.
    Robust,
    /// BCO (pairwise): `−log σ(β u_w) − log σ(−β u_l)`.
    BcoPair,
    /// SPPO (hard labels): `(u_w − 1/(2β))² + (u_l + 1/(2β))²`.
    SppoHard,
    /// AOT (paired): conservative DPO on sorted policy margins minus sorted reference margins.
    Aot,
    /// AOT (unpaired): conservative DPO on sorted chosen log-ratios minus sorted rejected ones.
    AotUnpaired,
    /// APO-zero: `1 − σ(β u_w) + σ(β u_l)`.
    ApoZero,
    /// APO-down: `σ(β u_w) + 1 − σ(β (u_w − u_l))`.
    ApoDown,
    /// DiscoPOP: a log-ratio-modulated blend of the logistic and exponential losses.
    Discopop,
    /// SFT: the mean NLL per chosen completion token (RPO's term).
    Sft,
    /// DPO on per-token mean scores: `−log σ(β Δ̄)`.
    SigmoidNorm,
}

impl LossType {
    /// All fifteen, in TRL's order.
    pub const ALL: [LossType; 15] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
    ];

    /// TRL's name (`"exo_pair"`, …).
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// Whether the loss reads the label smoothing ε (TRL: `robust`, `exo_pair`, `aot`,
    /// `aot_unpaired`; here also `sigmoid`, TRL 0.x's conservative DPO).
    pub fn uses_label_smoothing(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::Robust
                | LossType::ExoPair
                | LossType::Aot
                | LossType::AotUnpaired
        )
    }

    /// Whether the loss reads the f-divergence scores (TRL: sigmoid, sigmoid_norm, hinge, ipo,
    /// exo_pair, robust, discopop; sft reads neither), so that a non-default f-divergence
    /// applies.
    pub fn has_f_divergence_form(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::SigmoidNorm
                | LossType::Hinge
                | LossType::Ipo
                | LossType::ExoPair
                | LossType::Robust
                | LossType::Discopop
                | LossType::Sft
        )
    }

    /// Whether the batch loss is a mean of per-pair terms (every type but the AOT pair, which
    /// sort the batch and so couple its pairs).
    pub fn is_pairwise(self) -> bool {
        !matches!(self, LossType::Aot | LossType::AotUnpaired)
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, ObjectiveError> {
        LossType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| ObjectiveError::UnknownLossType(s.to_string()))
    }
}
