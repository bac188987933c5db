//! The gradients of one optimizer step, by the objective's rule ([`Trainer`]'s part of a step
//! before the update): each micro-batch's forward pass, objective and backward pass on this
//! rank's part of the global micro-batch, and the sum over the ranks (all-reduce, or ZeRO-1's
//! reduce-scatter; DPO-PG's two gradients before the projection).

use candle_core::Tensor;
use difinfo::objective::Rule;

use super::{bucket_bytes, Trainer};
use crate::batch::{Batch, Sequence};
use crate::error::{Error, Result};
use crate::train::data::{Examples, PreferencePair};
use crate::train::grads::{project, Grads, ProjectionStats};
use crate::train::objective::{
    nll_mean, pair_logps, preference_loss, reward_loss, sft_loss, PreferenceLoss, PreferenceMetrics,
};
use crate::train::parallel::{
    all_reduce_f64, all_reduce_grads, global_metrics, global_reward_metrics, local_part,
};
use crate::train::policy::{PolicyModel, SeqLogps};
use crate::train::rng::SplitMix64;
use crate::train::zero::ShardGrads;

/// What the micro-batches of one step computed: their summed gradient, the step's loss, the
/// tokens of their forward passes and what the objective reports.
#[derive(Default)]
pub(super) struct StepGrads {
    /// The running sum while the micro-batches run.
    sum: Option<Grads>,
    pub(super) loss: f64,
    pub(super) tokens: usize,
    pub(super) preference: Vec<PreferenceMetrics>,
    pub(super) projection: Option<ProjectionStats>,
}

impl StepGrads {
    /// Adds one micro-batch's gradient to the sum.
    fn add(&mut self, g: Grads) -> Result<()> {
        self.sum = Some(match self.sum.take() {
            None => g,
            Some(a) => a.add(&g)?,
        });
        Ok(())
    }

    /// The summed gradient and the rest of the step.
    fn finish(mut self) -> Result<(Grads, Self)> {
        let sum = self.sum.take();
        let g = sum.ok_or_else(|| Error::InvalidArgument("a step without micro-batches".into()))?;
        Ok((g, self))
    }
}

/// The objective's rule and the dataset's kind disagree (SFT data under a preference rule or
/// the reverse).
fn kinds_differ() -> Error {
    Error::Options("objective and data kind differ".into())
}

impl<M: PolicyModel + ?Sized> Trainer<'_, M> {
    fn grads(&self, loss: &Tensor) -> Result<Grads> {
        let store = self.model.backward(loss)?;
        let (g, missing) = Grads::from_store(&store, &self.vars, 1.0)?;
        if !missing.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "variables without a gradient: {missing:?} (an op without backward in the model's forward?)"
            )));
        }
        Ok(g)
    }

    fn batch(&self, seqs: &[&Sequence]) -> Result<Batch> {
        Batch::for_training(seqs, self.data.pad_id, &self.device)
    }

    /// The pairs `idx` as one batch, chosen rows first then rejected (as TRL's collators stack
    /// them), its tokens added to `tokens`, and the model's dropout seeded for micro-batch `mb`.
    fn pair_batch(
        &self,
        pairs: &[PreferencePair],
        idx: &[usize],
        mb: usize,
        tokens: &mut usize,
    ) -> Result<Batch> {
        let seqs: Vec<&Sequence> = idx
            .iter()
            .map(|&i| &pairs[i].chosen)
            .chain(idx.iter().map(|&i| &pairs[i].rejected))
            .collect();
        let batch = self.batch(&seqs)?;
        *tokens += batch.num_tokens();
        self.model.set_dropout_seed(Some(self.dropout_seed(mb)));
        Ok(batch)
    }

    /// The objective's loss on the pairs `idx` (the reference log-probs from the cache, or
    /// TR-DPO's synced reference run on `batch`, the pairs' chosen then rejected sequences).
    fn preference_loss(
        &self,
        idx: &[usize],
        batch: Option<&Batch>,
        chosen: &SeqLogps,
        rejected: &SeqLogps,
    ) -> Result<PreferenceLoss> {
        let refs = match (&self.reference, self.synced_reference, batch) {
            _ if !self.objective.needs_reference() => None,
            (Some(r), _, _) => Some(r.select(idx, chosen.sum.dtype(), &self.device)?),
            (None, Some(m), Some(batch)) => {
                let s = m.reference_logps(batch)?;
                let b = idx.len();
                let (c, r) = pair_logps(&self.objective, &s.rows(0, b)?, &s.rows(b, b)?)?;
                Some((
                    c.to_dtype(chosen.sum.dtype())?,
                    r.to_dtype(chosen.sum.dtype())?,
                ))
            }
            _ => {
                return Err(Error::Options(
                    "the objective reads a reference, and the run has none".into(),
                ))
            }
        };
        preference_loss(
            &self.objective,
            chosen,
            rejected,
            refs.as_ref().map(|(c, r)| (c, r)),
        )
    }

    fn check_pref(&self, m: &PreferenceMetrics, mb: usize, idx: &[usize]) -> Result<()> {
        for (name, v) in [
            ("loss", m.loss),
            ("logps/chosen", m.logps_chosen),
            ("logps/rejected", m.logps_rejected),
        ] {
            if !v.is_finite() {
                return Err(self.non_finite(format!("{name} ({v})"), mb, idx.to_vec()));
            }
        }
        Ok(())
    }

    /// The dropout seed of micro-batch `mb` (its index in the epoch) of the current step: a
    /// function of the run's seed and the position alone, so a resumed run draws the same.
    fn dropout_seed(&self, mb: usize) -> u64 {
        let step = self.state.global_step as u64;
        let rank = (self.world.rank() as u64) << 44;
        SplitMix64::for_stream(
            self.config.seed,
            0x4452_4f50 ^ rank ^ (step << 20) ^ mb as u64,
        )
        .next_u64()
    }

    /// This rank's part of a global micro-batch and its weight: its examples over the
    /// micro-batch's ([`local_part`]).
    fn local(&self, idx: &[usize]) -> (std::ops::Range<usize>, f64) {
        let part = local_part(
            idx.len(),
            self.config.per_device_train_batch_size,
            self.world.rank(),
        );
        let w = part.len() as f64 / idx.len().max(1) as f64;
        (part, w)
    }

    /// The step's summed gradient over its micro-batches `mbs` (`(index in the epoch,
    /// examples)`), by the objective's rule; each micro-batch's metrics go to the log.
    ///
    /// Over several ranks: every rank's gradient is summed ([`all_reduce_grads`]; DPO-PG's
    /// two gradients before the projection, so the projection is of the global ones), and so
    /// are the tokens of the forward passes.
    pub(super) fn step_gradients(
        &mut self,
        mbs: &[(usize, Vec<usize>)],
    ) -> Result<(Grads, StepGrads)> {
        let (g, mut step) = match self.objective.rule() {
            Rule::Sft => self.sft_gradients(mbs)?,
            Rule::Preference => self.preference_gradients(mbs)?,
            Rule::Reward => self.reward_gradients(mbs)?,
            Rule::ProjectedGradient => return self.projected_gradients(mbs),
        };
        step.tokens = all_reduce_f64(self.world, &[step.tokens as f64])?[0] as usize;
        Ok((self.reduce(g)?, step))
    }

    /// The ranks' gradients summed: every variable's (all-reduce), or this rank's shard's
    /// under ZeRO-1 (reduce-scatter).
    fn reduce(&self, g: Grads) -> Result<Grads> {
        match &self.zero {
            Some(z) => z.reduce_scatter(g),
            None => all_reduce_grads(self.world, g, bucket_bytes(&self.config)),
        }
    }

    /// SFT: the token NLL of each micro-batch, divided by the step's completion tokens (the
    /// whole sequence's unless `completion_only_loss`), so the micro-batches' gradients sum to
    /// the step's mean.
    fn sft_gradients(&mut self, mbs: &[(usize, Vec<usize>)]) -> Result<(Grads, StepGrads)> {
        let Examples::Sft(seqs) = &self.data.examples else {
            return Err(kinds_differ());
        };
        let whole = !self.config.completion_only_loss;
        let pick = |i: usize| -> Sequence {
            let s = &seqs[i];
            if whole {
                Sequence {
                    ids: s.ids.clone(),
                    completion_start: 0,
                }
            } else {
                s.clone()
            }
        };
        let chosen: Vec<Vec<Sequence>> = mbs
            .iter()
            .map(|(_, idx)| idx.iter().map(|&i| pick(i)).collect())
            .collect();
        let normalizer: usize = chosen
            .iter()
            .flatten()
            .map(Sequence::num_completion_tokens)
            .sum();
        let mut out = StepGrads::default();
        for ((mb, idx), seqs) in mbs.iter().zip(&chosen) {
            let (part, _) = self.local(idx);
            let refs: Vec<&Sequence> = seqs[part].iter().collect();
            if refs.is_empty() {
                out.add(Grads::zeros(&self.vars)?)?;
                self.state.log.add_microbatch(&[]);
                continue;
            }
            let batch = self.batch(&refs)?;
            out.tokens += batch.num_tokens();
            self.model.set_dropout_seed(Some(self.dropout_seed(*mb)));
            let s = self.model.sequence_logps(&batch)?;
            let loss = sft_loss(&s, normalizer.max(1) as f64)?;
            let v = crate::train::policy::scalar_f64(&loss)?;
            if !v.is_finite() {
                return Err(self.non_finite(format!("loss ({v})"), *mb, idx.clone()));
            }
            out.loss += v;
            out.add(self.grads(&loss)?)?;
            self.state.log.add_microbatch(&[]);
        }
        // Each rank's share of the step's token mean, summed.
        out.loss = all_reduce_f64(self.world, &[out.loss])?[0];
        out.finish()
    }

    /// DPO and its variants: chosen and rejected in one forward pass, the objective's loss
    /// scaled by `1 / (micro-batches in the step)`.
    fn preference_gradients(&mut self, mbs: &[(usize, Vec<usize>)]) -> Result<(Grads, StepGrads)> {
        let Examples::Preference(pairs) = &self.data.examples else {
            return Err(kinds_differ());
        };
        let k = mbs.len() as f64;
        let mut out = StepGrads::default();
        for (mb, all_idx) in mbs {
            let (part, w) = self.local(all_idx);
            let idx = &all_idx[part];
            let (local, g) = if idx.is_empty() {
                (None, Grads::zeros(&self.vars)?)
            } else {
                let batch = self.pair_batch(pairs, idx, *mb, &mut out.tokens)?;
                let all = if self.objective.use_weighting() {
                    self.model.sequence_logps_with_sq(&batch)?
                } else {
                    self.model.sequence_logps(&batch)?
                };
                let b = idx.len();
                let pl =
                    self.preference_loss(idx, Some(&batch), &all.rows(0, b)?, &all.rows(b, b)?)?;
                let g = self.grads(&pl.loss.affine(w / k, 0.0)?)?;
                (Some(pl.metrics()?), g)
            };
            let m = global_metrics(self.world, local.as_ref(), w)?;
            self.check_pref(&m, *mb, all_idx)?;
            out.loss += m.loss / k;
            out.add(g)?;
            self.state.log.add_microbatch(&m.record());
            out.preference.push(m);
        }
        out.finish()
    }

    /// A reward model (TRL's `RewardTrainer`): chosen and rejected scored in one forward pass
    /// (chosen first, as TRL's collator stacks them), the Bradley–Terry loss (with the pairs'
    /// margins and `center_rewards_coefficient` when given) scaled by
    /// `1 / (micro-batches in the step)`.
    fn reward_gradients(&mut self, mbs: &[(usize, Vec<usize>)]) -> Result<(Grads, StepGrads)> {
        let Examples::Preference(pairs) = &self.data.examples else {
            return Err(kinds_differ());
        };
        let k = mbs.len() as f64;
        let center = self.config.center_rewards_coefficient;
        let mut out = StepGrads::default();
        for (mb, all_idx) in mbs {
            let (part, w) = self.local(all_idx);
            let idx = &all_idx[part];
            let (local, g) = if idx.is_empty() {
                (None, Grads::zeros(&self.vars)?)
            } else {
                let batch = self.pair_batch(pairs, idx, *mb, &mut out.tokens)?;
                let s = self.model.sequence_scores(&batch)?;
                let b = idx.len();
                let margin = match &self.margins {
                    Some(m) => {
                        let v: Vec<f64> = idx.iter().map(|&i| m[i]).collect();
                        Some(Tensor::from_vec(v, b, &self.device)?.to_dtype(s.dtype())?)
                    }
                    None => None,
                };
                let rl = reward_loss(
                    &s.narrow(0, 0, b)?,
                    &s.narrow(0, b, b)?,
                    margin.as_ref(),
                    center,
                )?;
                let g = self.grads(&rl.loss.affine(w / k, 0.0)?)?;
                (Some(rl.metrics()?), g)
            };
            let m = global_reward_metrics(self.world, local.as_ref(), w)?;
            if !m.loss.is_finite() {
                return Err(self.non_finite(format!("loss ({})", m.loss), *mb, all_idx.clone()));
            }
            out.loss += m.loss / k;
            out.add(g)?;
            self.state.log.add_microbatch(&m.record());
        }
        out.finish()
    }

    /// DPO-PG (Appendix H): the chosen and the rejected NLL's gradients, each summed over the
    /// micro-batches, then the chosen one projected off the rejected one; the preference loss
    /// is computed on detached log-probs, for the log only.
    fn projected_gradients(&mut self, mbs: &[(usize, Vec<usize>)]) -> Result<(Grads, StepGrads)> {
        let Examples::Preference(pairs) = &self.data.examples else {
            return Err(kinds_differ());
        };
        let k = mbs.len() as f64;
        let (mut out, mut rejected) = (StepGrads::default(), StepGrads::default());
        for (mb, all_idx) in mbs {
            let (part, w) = self.local(all_idx);
            let idx = &all_idx[part];
            if idx.is_empty() {
                let m = global_metrics(self.world, None, w)?;
                self.check_pref(&m, *mb, all_idx)?;
                out.loss += m.loss / k;
                out.add(Grads::zeros(&self.vars)?)?;
                rejected.add(Grads::zeros(&self.vars)?)?;
                self.state.log.add_microbatch(&m.record());
                out.preference.push(m);
                continue;
            }
            let cs: Vec<&Sequence> = idx.iter().map(|&i| &pairs[i].chosen).collect();
            let rs: Vec<&Sequence> = idx.iter().map(|&i| &pairs[i].rejected).collect();
            let (cb, rb) = (self.batch(&cs)?, self.batch(&rs)?);
            out.tokens += cb.num_tokens() + rb.num_tokens();
            self.model.set_dropout_seed(Some(self.dropout_seed(*mb)));
            let sc = self.model.sequence_logps(&cb)?;
            let sr = self.model.sequence_logps(&rb)?;
            let pl = self.preference_loss(idx, None, &sc.detach(), &sr.detach())?;
            let m = global_metrics(self.world, Some(&pl.metrics()?), w)?;
            self.check_pref(&m, *mb, all_idx)?;
            out.loss += m.loss / k;
            let gw = self.grads(&nll_mean(&sc.sum, w / k)?)?;
            let gl = self.grads(&nll_mean(&sr.sum, w / k)?)?;
            out.add(gw)?;
            rejected.add(gl)?;
            self.state.log.add_microbatch(&m.record());
            out.preference.push(m);
        }
        let (gw, mut out) = out.finish()?;
        let (gl, _) = rejected.finish()?;
        out.tokens = all_reduce_f64(self.world, &[out.tokens as f64])?[0] as usize;
        // The global g_w and g_l: the projection is of the whole batch's gradients.
        let (gw, gl) = (self.reduce(gw)?, self.reduce(gl)?);
        let (g, stats) = match &self.zero {
            Some(zero) => {
                let shard = |grads| ShardGrads { grads, zero };
                let (g, stats) = project(&shard(gw), &shard(gl))?;
                (g.grads, stats)
            }
            None => project(&gw, &gl)?,
        };
        out.projection = Some(stats);
        Ok((g, out))
    }
}
