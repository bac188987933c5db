//! The training objectives on candle tensors: SFT, DPO (`sigmoid`, `hinge`, `ipo`),
//! reference-free, and the two NLLs of DPO-PG, with TRL's semantics and metric names.
//!
//! The loss shapes are those of [`difinfo::loss::LossShape`] (a property test checks the
//! values against it): with the log-ratio margin
//!
//! ```text
//! h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))     (DPO)
//! h = log π(y_w) − log π(y_l)                                           (reference-free)
//! d = β h
//! sigmoid  ℓ = −log σ(d) = softplus(−d)
//! hinge    ℓ = max(0, 1 − d)
//! ipo      ℓ = (h − 1/(2β))²,  with log π the mean per-token log-prob (TRL's IPO)
//! label smoothing ε (sigmoid):  ℓ = (1 − ε) softplus(−d) + ε softplus(d)
//! rpo_alpha α:  loss += α · (mean NLL per chosen completion token)
//! loss = (1/B) Σ_i ℓ_i
//! rewards/chosen = β (log π(y_w) − log π_ref(y_w))  (detached; β log π(y_w) reference-free;
//!                  summed log-probs for every loss type, IPO included, as TRL 1.x logs them)
//! ```

use candle_core::{Tensor, D};
use difinfo::loss::LossShape;
use serde::{Deserialize, Serialize};

use crate::train::error::Result;
use crate::train::policy::{scalar_f64, SeqLogps};

/// What the trainer optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Token-level NLL (TRL `SFTTrainer`).
    Sft,
    /// DPO with reference log-probs (TRL `DPOTrainer`).
    Dpo,
    /// DPO with reward `β log π` (TRL `reference_free=True`; the DID estimator of Appendix K).
    RefFree,
    /// Appendix H: projected gradient of the chosen NLL against the rejected NLL.
    DpoPg,
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sft" => Ok(Self::Sft),
            "dpo" => Ok(Self::Dpo),
            "ref-free" | "ref_free" => Ok(Self::RefFree),
            "dpo-pg" | "dpo_pg" => Ok(Self::DpoPg),
            _ => Err(format!(
                "unknown objective `{s}` (sft, dpo, ref-free, dpo-pg)"
            )),
        }
    }
}

impl Objective {
    /// Whether the objective trains on preference pairs.
    pub fn is_preference(self) -> bool {
        self != Self::Sft
    }

    /// Whether the objective needs reference log-probs (for its loss or its logged loss).
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::DpoPg)
    }
}

/// `softplus(x) = log(1 + eˣ) = max(x, 0) + log(1 + e^{−|x|})`, differentiable and stable.
///
/// # Errors
/// Tensor errors.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `ℓ(d)` elementwise for the margin `d = β h` (`beta` is used by IPO); with label smoothing
/// `ε > 0` (sigmoid only) `ℓ_ε(d) = (1 − ε) softplus(−d) + ε softplus(d)`
/// (`difinfo::loss::label_smoothed_sigmoid`).
///
/// # Errors
/// Tensor errors.
pub fn loss_shape_value(
    shape: LossShape,
    d: &Tensor,
    beta: f64,
    label_smoothing: f64,
) -> candle_core::Result<Tensor> {
    match shape {
        LossShape::Sigmoid if label_smoothing > 0.0 => {
            softplus(&d.neg()?)?.affine(1.0 - label_smoothing, 0.0)?
                + softplus(d)?.affine(label_smoothing, 0.0)?
        }
        LossShape::Sigmoid => softplus(&d.neg()?),
        LossShape::Hinge => d.affine(-1.0, 1.0)?.relu(),
        LossShape::Ipo => d.affine(1.0 / beta, -0.5 / beta)?.sqr(),
    }
}

/// The log-probs a preference loss uses: the sum over completion tokens, or for IPO the mean
/// per token (TRL divides by the completion length when `loss_type="ipo"`).
///
/// # Errors
/// Tensor errors.
pub fn preference_logps(shape: LossShape, s: &SeqLogps) -> candle_core::Result<Tensor> {
    match shape {
        LossShape::Ipo => s.mean(),
        _ => Ok(s.sum.clone()),
    }
}

/// The output of a preference loss on a batch of `B` pairs.
#[derive(Debug, Clone)]
pub struct PreferenceLoss {
    /// The scalar loss `(1/B) Σ ℓ_i`, differentiable.
    pub loss: Tensor,
    /// `[B]` per-pair losses.
    pub losses: Tensor,
    /// `[B]` `β (log π(y_w) − log π_ref(y_w))`, detached.
    pub chosen_rewards: Tensor,
    /// `[B]` `β (log π(y_l) − log π_ref(y_l))`, detached.
    pub rejected_rewards: Tensor,
    /// `[B]` policy log-probs of the chosen (as used by the loss), detached.
    pub chosen_logps: Tensor,
    /// `[B]` policy log-probs of the rejected, detached.
    pub rejected_logps: Tensor,
}

/// TRL's `dpo_loss`: `ref_*` are `None` for the reference-free reward; `label_smoothing` is
/// TRL's ε (0 for plain DPO).
///
/// All inputs are `[B]` log-probs of the same dtype, already normalized for IPO (see
/// [`preference_logps`]).
///
/// # Errors
/// Shape or dtype mismatches.
#[allow(clippy::too_many_arguments)]
pub fn preference_loss(
    shape: LossShape,
    beta: f64,
    label_smoothing: f64,
    chosen: &Tensor,
    rejected: &Tensor,
    ref_chosen: Option<&Tensor>,
    ref_rejected: Option<&Tensor>,
) -> Result<PreferenceLoss> {
    let chosen_ratio = match ref_chosen {
        Some(r) => (chosen - r)?,
        None => chosen.clone(),
    };
    let rejected_ratio = match ref_rejected {
        Some(r) => (rejected - r)?,
        None => rejected.clone(),
    };
    let h = (&chosen_ratio - &rejected_ratio)?;
    let d = h.affine(beta, 0.0)?;
    let losses = loss_shape_value(shape, &d, beta, label_smoothing)?;
    let loss = losses.mean(D::Minus1)?;
    Ok(PreferenceLoss {
        loss,
        losses,
        chosen_rewards: chosen_ratio.affine(beta, 0.0)?.detach(),
        rejected_rewards: rejected_ratio.affine(beta, 0.0)?.detach(),
        chosen_logps: chosen.detach(),
        rejected_logps: rejected.detach(),
    })
}

impl PreferenceLoss {
    /// Replaces the logged rewards and log-probs by those of the **summed** completion
    /// log-probs, as TRL 1.x logs them for every loss type (IPO's loss uses per-token means,
    /// its metrics do not): `rewards/* = β (Σ log π − Σ log π_ref)`, `logps/* = Σ log π`.
    ///
    /// # Errors
    /// Shape or dtype mismatches.
    pub fn with_summed_metrics(
        mut self,
        beta: f64,
        chosen: &Tensor,
        rejected: &Tensor,
        ref_chosen: Option<&Tensor>,
        ref_rejected: Option<&Tensor>,
    ) -> Result<Self> {
        let ratio = |p: &Tensor, r: Option<&Tensor>| -> candle_core::Result<Tensor> {
            match r {
                Some(r) => (p - r)?.affine(beta, 0.0),
                None => p.affine(beta, 0.0),
            }
        };
        self.chosen_rewards = ratio(chosen, ref_chosen)?.detach();
        self.rejected_rewards = ratio(rejected, ref_rejected)?.detach();
        self.chosen_logps = chosen.detach();
        self.rejected_logps = rejected.detach();
        Ok(self)
    }
}

/// Host-side means of a preference loss, TRL's metrics of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceMetrics {
    /// `loss`.
    pub loss: f64,
    /// `rewards/chosen`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/accuracies`: the fraction of pairs with chosen reward > rejected reward.
    pub rewards_accuracies: f64,
    /// `rewards/margins`.
    pub rewards_margins: f64,
    /// `logps/chosen`.
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
}

impl PreferenceLoss {
    /// The batch means (one device-to-host transfer per metric).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn metrics(&self) -> Result<PreferenceMetrics> {
        let mean = |t: &Tensor| -> Result<f64> { Ok(scalar_f64(&t.mean_all()?)?) };
        let margins = (&self.chosen_rewards - &self.rejected_rewards)?;
        let acc = margins.gt(0.0)?.to_dtype(self.chosen_rewards.dtype())?;
        Ok(PreferenceMetrics {
            loss: scalar_f64(&self.loss.detach())?,
            rewards_chosen: mean(&self.chosen_rewards)?,
            rewards_rejected: mean(&self.rejected_rewards)?,
            rewards_accuracies: mean(&acc)?,
            rewards_margins: mean(&margins)?,
            logps_chosen: mean(&self.chosen_logps)?,
            logps_rejected: mean(&self.rejected_logps)?,
        })
    }
}

/// The SFT loss: the negative log-likelihood summed over the scored tokens of the batch,
/// divided by `normalizer` (the number of scored tokens of the whole accumulated batch, as
/// transformers does with `num_items_in_batch`).
///
/// # Formula
/// `L = −(1/N) Σ_b Σ_t mask[b, t] log π(y_{b,t+1} | y_{b,≤t})`, `N` = `normalizer`.
///
/// # Errors
/// Tensor errors.
pub fn sft_loss(s: &SeqLogps, normalizer: f64) -> candle_core::Result<Tensor> {
    s.sum.sum_all()?.affine(-1.0 / normalizer, 0.0)
}

/// RPO's `nll_loss`: the mean negative log-likelihood per completion token of the chosen
/// responses, `−Σ_b sum_b / Σ_b count_b` (TRL's cross-entropy over the chosen half, ignoring
/// prompt and padding tokens).
///
/// # Errors
/// Tensor errors.
pub fn chosen_nll(chosen: &SeqLogps) -> candle_core::Result<Tensor> {
    chosen
        .sum
        .sum_all()?
        .neg()?
        .div(&chosen.count.sum_all()?.clamp(1.0, f64::MAX)?)
}

/// The two DPO-PG losses: `L_w = −(1/B) Σ log π(y_w,i)`, `L_l = −(1/B) Σ log π(y_l,i)`
/// (sequence log-probs: sums over completion tokens), each scaled by `scale`
/// (`1 / accumulation steps`).
///
/// # Errors
/// Tensor errors.
pub fn nll_mean(sum_logps: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    sum_logps.mean_all()?.affine(-scale, 0.0)
}
