//! Why an objective is invalid: one variant per broken field, each naming TRL's field.

use crate::beta::BetaError;

/// Why an objective is invalid (each names TRL's field).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectiveError {
    /// `β ≤ 0` or not finite (the message is [`BetaError`]'s).
    #[error("{}", BetaError(*.0))]
    Beta(f64),
    /// ε outside `[0, 1/2]` (`[0, 1/2)` for `robust`, `(0, 1/2]` for `exo_pair`).
    #[error("label_smoothing = {value}: {reason}")]
    LabelSmoothing {
        /// ε.
        value: f64,
        /// The violated range.
        reason: String,
    },
    /// No loss type.
    #[error("loss_type is empty: give at least one loss type")]
    NoLossType,
    /// An unknown loss type name.
    #[error(
        "unknown loss_type `{0}` (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, \
         sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm)"
    )]
    UnknownLossType(String),
    /// An unknown f-divergence name.
    #[error(
        "unknown f_divergence_type `{0}` (reverse_kl, forward_kl, js_divergence, alpha_divergence)"
    )]
    UnknownFDivergence(String),
    /// `loss_weights` of another length than `loss_type`.
    #[error("loss_weights has {weights} entries for {types} loss types")]
    LossWeightsLength {
        /// Weights given.
        weights: usize,
        /// Loss types given.
        types: usize,
    },
    /// A negative or non-finite loss weight.
    #[error("loss_weights must be finite and ≥ 0, got {0}")]
    LossWeight(f64),
    /// Every loss weight is 0: the loss is identically 0 and nothing would train.
    #[error(
        "loss_weights are all 0 ({0:?}): the loss would be 0 whatever the model, leaving nothing \
         to train; give at least one loss type a positive weight"
    )]
    ZeroLossWeights(Vec<f64>),
    /// `discopop_tau ≤ 0` or not finite.
    #[error("discopop_tau must be finite and positive, got {0}")]
    DiscopopTau(f64),
    /// A non-finite α-divergence coefficient.
    #[error("f_alpha_divergence_coef must be finite, got {0}")]
    FAlpha(f64),
    /// An f-divergence other than `reverse_kl` with a loss type that has no f-divergence form.
    #[error(
        "f_divergence_type = {f} applies to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, \
         discopop and sft only, not {loss_type} (TRL refuses it too: the f-DPO reparametrization \
         cancels only in the chosen − rejected difference)"
    )]
    FDivergenceLossType {
        /// The f-divergence.
        f: &'static str,
        /// The loss type.
        loss_type: &'static str,
    },
    /// A negative or non-finite `rpo_alpha`.
    #[error("rpo_alpha must be finite and ≥ 0, got {0}")]
    RpoAlpha(f64),
    /// LD-DPO's `ld_alpha` outside `[0, 1]`.
    #[error(
        "ld_alpha must lie in [0, 1] (1: no down-weighting, 0: the tokens beyond the shared \
         length masked), got {0}"
    )]
    LdAlpha(f64),
    /// An option that the rule or the loss types do not read (TRL would silently ignore it).
    #[error("{option} does not apply here: {reason}")]
    Inapplicable {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

impl ObjectiveError {
    /// The TRL field this error names first (its message begins with it: `beta must be …`,
    /// `loss_weights has …`), for a caller that names the option the user gave; `None` for an
    /// unknown name, whose message names the value instead.
    pub fn field(&self) -> Option<&'static str> {
        Some(match self {
            ObjectiveError::Beta(_) => "beta",
            ObjectiveError::LabelSmoothing { .. } => "label_smoothing",
            ObjectiveError::NoLossType => "loss_type",
            ObjectiveError::UnknownLossType(_) | ObjectiveError::UnknownFDivergence(_) => {
                return None
            }
            ObjectiveError::LossWeightsLength { .. }
            | ObjectiveError::LossWeight(_)
            | ObjectiveError::ZeroLossWeights(_) => "loss_weights",
            ObjectiveError::DiscopopTau(_) => "discopop_tau",
            ObjectiveError::FAlpha(_) => "f_alpha_divergence_coef",
            ObjectiveError::FDivergenceLossType { .. } => "f_divergence_type",
            ObjectiveError::RpoAlpha(_) => "rpo_alpha",
            ObjectiveError::LdAlpha(_) => "ld_alpha",
            ObjectiveError::Inapplicable { option, .. } => option,
        })
    }
}

impl From<BetaError> for ObjectiveError {
    fn from(e: BetaError) -> Self {
        ObjectiveError::Beta(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_begins_with_the_field_it_names() {
        let errors = [
            ObjectiveError::Beta(-1.0),
            ObjectiveError::LabelSmoothing {
                value: 0.7,
                reason: "outside [0, 1/2]".into(),
            },
            ObjectiveError::NoLossType,
            ObjectiveError::LossWeightsLength {
                weights: 2,
                types: 1,
            },
            ObjectiveError::LossWeight(-1.0),
            ObjectiveError::ZeroLossWeights(vec![0.0]),
            ObjectiveError::DiscopopTau(0.0),
            ObjectiveError::FAlpha(f64::NAN),
            ObjectiveError::FDivergenceLossType {
                f: "forward_kl",
                loss_type: "bco_pair",
            },
            ObjectiveError::RpoAlpha(-1.0),
            ObjectiveError::LdAlpha(2.0),
            ObjectiveError::Inapplicable {
                option: "label_smoothing",
                reason: "x".into(),
            },
        ];
        for e in errors {
            let f = e.field().expect("a field");
            assert!(e.to_string().starts_with(f), "{e} does not begin with {f}");
        }
        let unknown = ObjectiveError::UnknownLossType("x".into());
        assert_eq!(unknown.field(), None);
    }
}
