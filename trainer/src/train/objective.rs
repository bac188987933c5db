//! The library's objective ([`difinfo::objective::Objective`]) on candle tensors: the trainer
//! keeps no formula of its own. [`Batched`] implements the library's number traits for `[B]`
//! tensors (element-wise, differentiable), so the loss types of [`difinfo::loss`], the rewards
//! and scores of [`difinfo::reward`], the NLLs of SFT and DPO-PG and the DPO-PG projection
//! ([`crate::train::grads`]) run the same texts that `proofs/` checks.
//!
//! ```text
//! sides      log π(y) summed over completion tokens, log π_ref(y) (cached), |y|
//!            LD-DPO: shared + α · verbose, split at the pair's shorter completion
//!                                                              (difinfo::loss::length_desensitized)
//! loss       L = Σ_k w_k mean_i ℓ_k(pair i)                   (difinfo::loss::batch_loss)
//!            WPO: each pair's ℓ times w(y_w) w(y_l)          (difinfo::loss::wpo_weight)
//! metrics    rewards/chosen = mean β (log π(y_w) − log π_ref(y_w)),  rewards/margins,
//!            rewards/accuracies, logps/chosen, logps/rejected   (TRL's names; summed
//!            log-probs for every loss type), nll_loss (the `sft` term, TRL 0.x's RPO name)
//! SFT        −Σ_b Σ_t log π / N, N the step's token count      (difinfo::loss::nll)
//! DPO-PG     L_w = −mean_i log π(y_w,i), L_l likewise           (difinfo::dpo_pg::sequence_nll)
//! reward     L = mean_i −log σ(r_w − r_l − m) + c mean_i (r_w + r_l)²
//!                                                   (difinfo::preference::bradley_terry_loss)
//! ```

use candle_core::Tensor;
use difinfo::loss::{batch_loss, length_desensitized, nll, wpo_weight};
use difinfo::objective::{LossType, Objective};
use difinfo::reward::side;
use difinfo::scalar::{Arith, Real};

use crate::error::Result;
use crate::train::policy::{scalar_f64, SeqLogps};

/// A batch of values as a `[B]` tensor (a scalar tensor after `mean` or `sum`, which then
/// broadcasts): the library's arithmetic element-wise, with candle's autograd.
#[derive(Debug, Clone)]
pub struct Batched(pub Tensor);

type R = candle_core::Result<Batched>;

impl Arith for Batched {
    type Error = candle_core::Error;
    fn add(&self, y: &Self) -> R {
        Ok(Batched(self.0.broadcast_add(&y.0)?))
    }
    fn sub(&self, y: &Self) -> R {
        Ok(Batched(self.0.broadcast_sub(&y.0)?))
    }
    fn mul(&self, y: &Self) -> R {
        Ok(Batched(self.0.broadcast_mul(&y.0)?))
    }
    fn div(&self, y: &Self) -> R {
        Ok(Batched(self.0.broadcast_div(&y.0)?))
    }
    fn affine(&self, a: f64, b: f64) -> R {
        Ok(Batched(self.0.affine(a, b)?))
    }
    fn relu(&self) -> R {
        Ok(Batched(self.0.relu()?))
    }
    fn abs(&self) -> R {
        Ok(Batched(self.0.abs()?))
    }
    fn min_const(&self, c: f64) -> R {
        Ok(Batched(self.0.minimum(c)?))
    }
    fn sqr(&self) -> R {
        Ok(Batched(self.0.sqr()?))
    }
    fn neg(&self) -> R {
        Ok(Batched(self.0.neg()?))
    }
}

impl Real for Batched {
    fn exp(&self) -> R {
        Ok(Batched(self.0.exp()?))
    }
    fn ln_1p(&self) -> R {
        Ok(Batched(self.0.affine(1.0, 1.0)?.log()?))
    }
    fn sigmoid(&self) -> R {
        Ok(Batched(candle_nn::ops::sigmoid(&self.0)?))
    }
    fn sort(&self) -> R {
        Ok(Batched(self.0.contiguous()?.sort_last_dim(true)?.0))
    }
    fn mean(&self) -> R {
        Ok(Batched(self.0.mean_all()?))
    }
    fn sum(&self) -> R {
        Ok(Batched(self.0.sum_all()?))
    }
}

/// The output of the preference loss on a batch of `B` pairs.
#[derive(Debug, Clone)]
pub struct PreferenceLoss {
    /// The scalar loss `Σ_k w_k mean ℓ_k`, differentiable.
    pub loss: Tensor,
    /// `[B]` `β (log π(y_w) − log π_ref(y_w))` (`β log π(y_w)` reference-free), detached.
    pub chosen_rewards: Tensor,
    /// `[B]` the same for the rejected, detached.
    pub rejected_rewards: Tensor,
    /// `[B]` summed policy log-probs of the chosen, detached.
    pub chosen_logps: Tensor,
    /// `[B]` summed policy log-probs of the rejected, detached.
    pub rejected_logps: Tensor,
    /// The `sft` term's value (the mean NLL per chosen completion token), detached.
    pub nll: Option<Tensor>,
}

/// The `[B]` log-probs `(chosen, rejected)` of a batch of pairs as the objective reads them:
/// the sums over the completion tokens, or with LD-DPO's α (`o.ld_alpha()`) `shared + α ·
/// verbose`, the tokens of each completion up to the pair's shared length `min(|y_w|, |y_l|)`
/// and beyond it ([`length_desensitized`], TRL's `ld_alpha`). Used for the policy and for the
/// reference alike.
///
/// # Errors
/// Shape or dtype mismatches.
pub fn pair_logps(
    o: &Objective,
    chosen: &SeqLogps,
    rejected: &SeqLogps,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some(alpha) = o.ld_alpha() else {
        return Ok((chosen.sum.clone(), rejected.sum.clone()));
    };
    let shared_len = chosen.count.minimum(&rejected.count)?.unsqueeze(1)?;
    let split = |s: &SeqLogps| -> candle_core::Result<Tensor> {
        // The completion token's position 1, 2, … (a completion is one run of the mask).
        let pos = s.mask.cumsum(1)?;
        let shared = pos
            .broadcast_le(&shared_len)?
            .to_dtype(s.mask.dtype())?
            .mul(&s.mask)?;
        let verbose = (&s.mask - &shared)?;
        let sh = Batched(s.tokens.mul(&shared)?.sum(1)?);
        let vb = Batched(s.tokens.mul(&verbose)?.sum(1)?);
        Ok(length_desensitized(&sh, &vb, alpha)?.0)
    };
    Ok((split(chosen)?, split(rejected)?))
}

/// WPO's `[B]` weights `w(y)` of one side ([`wpo_weight`]): from the per-token log-probs and
/// `log Σ_v π_v²` (detached), over the side's token counts.
fn wpo_weights(s: &SeqLogps) -> Result<Tensor> {
    let sq = s.log_sum_sq.as_ref().ok_or_else(|| {
        crate::error::Error::Options(
            "use_weighting needs log Σ_v π(v)² from the model's forward pass".into(),
        )
    })?;
    let aligned = (s.tokens.detach() - sq)?.mul(&s.mask)?.sum(1)?;
    Ok(wpo_weight(&Batched(aligned), &Batched(s.count.clone()))?.0)
}

/// The objective's loss of a batch: `chosen` and `rejected` are the policy's log-probs of
/// the pairs' two sides (per token and summed, with the token counts); `refs` the
/// reference's `[B]` log-probs `(chosen, rejected)` as [`pair_logps`] makes them (`None`
/// reference-free). With LD-DPO the logged `logps/*` are the weighted ones (TRL's); with WPO
/// each pair's loss is weighted (the policy's `log_sum_sq` must be there).
///
/// # Errors
/// Shape or dtype mismatches; WPO without `log_sum_sq`.
pub fn preference_loss(
    o: &Objective,
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    refs: Option<(&Tensor, &Tensor)>,
) -> Result<PreferenceLoss> {
    let b = |t: &Tensor| Batched(t.clone());
    let (cl, rl) = pair_logps(o, chosen, rejected)?;
    let mut c = side(o, b(&cl), refs.map(|r| b(r.0)), b(&chosen.count))?;
    let mut r = side(o, b(&rl), refs.map(|r| b(r.1)), b(&rejected.count))?;
    if o.ld_alpha().is_some() {
        c = c.with_nll_logps(b(&chosen.sum));
        r = r.with_nll_logps(b(&rejected.sum));
    }
    if o.use_weighting() {
        c = c.with_weight(Batched(wpo_weights(chosen)?));
        r = r.with_weight(Batched(wpo_weights(rejected)?));
    }
    let out = batch_loss(o, &c, &r)?;
    let nll = out
        .terms
        .iter()
        .find(|(t, _)| *t == LossType::Sft)
        .map(|(_, v)| v.0.detach());
    Ok(PreferenceLoss {
        loss: out.loss.0,
        chosen_rewards: out.chosen_rewards.0.detach(),
        rejected_rewards: out.rejected_rewards.0.detach(),
        chosen_logps: cl.detach(),
        rejected_logps: rl.detach(),
        nll,
    })
}

/// Host-side means of a preference loss, TRL's metrics of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
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
    /// `nll_loss`: the `sft` term (RPO), when the objective has one.
    pub nll_loss: Option<f64>,
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
            nll_loss: self.nll.as_ref().map(scalar_f64).transpose()?,
        })
    }
}

impl PreferenceMetrics {
    /// The record of one micro-batch, TRL's names (the loss is summed per step separately).
    pub fn record(&self) -> Vec<(&'static str, f64)> {
        let mut r = vec![
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ];
        if let Some(v) = self.nll_loss {
            r.push(("nll_loss", v));
        }
        r
    }
}

/// The SFT loss: the negative log-likelihood summed over the scored tokens of the batch,
/// divided by `normalizer` (the number of scored tokens of the whole accumulated batch, as
/// transformers does with `num_items_in_batch`): `difinfo::loss::nll`.
///
/// # Formula
/// `L = −(1/N) Σ_b Σ_t mask[b, t] log π(y_{b,t+1} | y_{b,≤t})`, `N` = `normalizer`.
///
/// # Errors
/// Tensor errors.
pub fn sft_loss(s: &SeqLogps, normalizer: f64) -> candle_core::Result<Tensor> {
    let n = Tensor::new(normalizer, s.sum.device())?.to_dtype(s.sum.dtype())?;
    Ok(nll(&Batched(s.sum.clone()), &Batched(n))?.0)
}

/// A DPO-PG NLL `L = −(1/B) Σ_i log π(y_i)` (`difinfo::dpo_pg::sequence_nll`), scaled by
/// `scale` (`1 / accumulation steps`).
///
/// # Errors
/// Tensor errors.
pub fn nll_mean(sum_logps: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    difinfo::dpo_pg::sequence_nll(&Batched(sum_logps.clone()))?
        .0
        .affine(scale, 0.0)
}

/// The output of a reward model's loss on a batch of `B` pairs.
#[derive(Debug, Clone)]
pub struct RewardLoss {
    /// The scalar loss, differentiable.
    pub loss: Tensor,
    /// `[B]` the chosen completions' rewards, detached.
    pub chosen: Tensor,
    /// `[B]` the rejected completions' rewards, detached.
    pub rejected: Tensor,
}

/// A reward model's Bradley–Terry loss of a batch (TRL's `RewardTrainer`): the library's
/// [`difinfo::preference::bradley_terry_loss`] on `[B]` tensors, with the optional `[B]`
/// margins and `center_rewards_coefficient`.
///
/// # Formula
/// `L = mean_i −log σ(r_w,i − r_l,i − m_i) + c · mean_i (r_w,i + r_l,i)²`.
///
/// # Errors
/// Shape or dtype mismatches.
pub fn reward_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<RewardLoss> {
    let b = |t: &Tensor| Batched(t.clone());
    let m = margin.map(b);
    let loss = difinfo::preference::bradley_terry_loss(
        &b(chosen),
        &b(rejected),
        m.as_ref(),
        center_rewards_coefficient,
    )?;
    Ok(RewardLoss {
        loss: loss.0,
        chosen: chosen.detach(),
        rejected: rejected.detach(),
    })
}

/// TRL's `RewardTrainer` metrics of one micro-batch (host-side).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardMetrics {
    /// `loss`.
    pub loss: f64,
    /// `min_reward`: the smallest reward of the batch (chosen and rejected).
    pub min_reward: f64,
    /// `mean_reward`: the mean reward of the batch (chosen and rejected).
    pub mean_reward: f64,
    /// `max_reward`.
    pub max_reward: f64,
    /// `accuracy`: the fraction of pairs with `r_w > r_l`.
    pub accuracy: f64,
    /// `margin`: the mean of `r_w − r_l`.
    pub margin: f64,
}

impl RewardLoss {
    /// The batch's metrics.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn metrics(&self) -> Result<RewardMetrics> {
        let all: Vec<f64> = candle_core::Tensor::cat(&[&self.chosen, &self.rejected], 0)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        let gap = (&self.chosen - &self.rejected)?;
        let acc = gap.gt(0.0)?.to_dtype(self.chosen.dtype())?;
        Ok(RewardMetrics {
            loss: scalar_f64(&self.loss.detach())?,
            min_reward: all.iter().copied().fold(f64::INFINITY, f64::min),
            mean_reward: all.iter().sum::<f64>() / all.len().max(1) as f64,
            max_reward: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            accuracy: scalar_f64(&acc.mean_all()?)?,
            margin: scalar_f64(&gap.mean_all()?)?,
        })
    }
}

impl RewardMetrics {
    /// The record of one micro-batch, TRL's names (the loss is summed per step separately).
    pub fn record(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("min_reward", self.min_reward),
            ("mean_reward", self.mean_reward),
            ("max_reward", self.max_reward),
            ("accuracy", self.accuracy),
            ("margin", self.margin),
        ]
    }
}
