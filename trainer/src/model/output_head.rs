//! The output head: logits, and the log-probabilities of target tokens (per token and summed
//! over a completion) without the full `[B, L, V]` logits where the chunked heads apply.

use candle_core::{DType, Tensor};

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};

use super::Model;

impl Model {
    /// Logits `[B, L, V]` (accumulation dtype) for `ids: [B, L]` with an optional `[B, L]` 0/1
    /// attention mask (padding keys masked out; a causal mask is always applied).
    ///
    /// This forms the whole `[B, L, V]` tensor: for inspecting small inputs (tests). The
    /// commands and the trainer use [`Model::token_logps`] / [`Model::sequence_logps`] and
    /// [`Model::forward_last_with_cache`], whose LM head runs in chunks.
    ///
    /// # Errors
    /// Shape mismatches between `ids` and the mask; tensor errors.
    pub fn logits(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (mask, causal) = self.training_mask(b, l, attention_mask)?;
        let h = self.decode(ids, 0, None, Some(&mask), causal, None)?;
        self.head(&h)
    }

    pub(super) fn head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, l, hs) = h.dims3()?;
        let cd = self.compute_dtype;
        let h2 = h.reshape((b * l, hs))?;
        let w = self.lm_head.to_dtype(cd)?;
        let logits = if self.use_fused(&h2)
            && !h2.track_op()
            && !w.track_op()
            && b * l <= crate::fused::ROWS_MAX
        {
            // A decoding step: the few-row kernel reads the head's weight once.
            crate::fused::linear(&h2, &w)?
        } else {
            h2.matmul(&w.t()?)?
        }
        .to_dtype(accumulation_dtype(cd))?;
        let logits = match self.config.final_logit_softcapping {
            Some(c) => super::block::softcap(&logits, c)?,
            None => logits,
        };
        Ok(logits.reshape((b, l, self.config.vocab_size))?)
    }

    /// Per-token log-probabilities of the next token: entry `[b, t]` is
    /// `log π(ids[b, t+1] | ids[b, ..=t])`, shape `[B, L−1]`, differentiable.
    ///
    /// # Formula
    /// `log π(y_{t+1} | y_{≤t}) = z_{t, y_{t+1}} − log Σ_v exp z_{t, v}` with `z` the logits.
    ///
    /// # Errors
    /// `L < 2`; see [`Model::logits`].
    pub fn token_logps(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.token_logps_at(ids, attention_mask, None)
    }

    /// [`Model::token_logps`] at the positions `loss_mask: [B, L−1]` selects (non-zero), 0
    /// elsewhere: the LM head then runs on the selected positions only (in DPO, the
    /// completion tokens: the prompt's logits are never formed), which changes no selected
    /// value and no gradient (an unselected position's log-prob is multiplied by 0 anyway).
    ///
    /// # Errors
    /// As [`Model::token_logps`]; a mask of another shape.
    pub fn token_logps_masked(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_mask: &Tensor,
    ) -> Result<Tensor> {
        let lp = self.token_logps_at(ids, attention_mask, Some(loss_mask))?;
        Ok((lp * loss_mask.to_dtype(accumulation_dtype(self.compute_dtype))?)?)
    }

    /// `log softmax(h Wᵀ)[t]` for hidden states `h: [N, H]` (compute dtype) and targets
    /// `t: [N]`, in the accumulation dtype (the logits soft-capped first where the config
    /// says so): the fused CPU kernel where it applies (no soft-cap), else the plain-candle
    /// [`crate::model::chunked_head::token_logps_capped`]; both form at most `head_chunk` logits at
    /// a time. With a sink, the head's own variable (no conversion) takes its gradient there.
    pub(super) fn head_logps(&self, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let sink = self
            .grad_sink
            .as_ref()
            .filter(|_| self.lm_head.track_op() && self.lm_head.dtype() == h.dtype());
        let cap = self.config.final_logit_softcapping;
        if self.use_fused(h) && cap.is_none() {
            let w = match sink {
                Some(_) => self.lm_head.clone(),
                None => self.lm_head.to_dtype(h.dtype())?,
            };
            return Ok(crate::fused::lm_head_logps_chunked(
                h,
                &w,
                targets,
                sink,
                self.head_chunk,
            )?);
        }
        let sink = self.grad_sink.as_ref().filter(|_| self.lm_head.track_op());
        crate::model::chunked_head::token_logps_capped(
            h,
            &self.lm_head,
            targets,
            self.head_chunk,
            sink,
            cap,
        )
    }

    /// [`Model::token_logps_masked`] and, at the same positions (0 elsewhere), `log Σ_v π(v |
    /// ids[b, ..=t])²` without gradient (TRL's `log_sum_sq_probs`, WPO's weights): one forward
    /// pass, the second quantity from the same hidden states.
    ///
    /// # Errors
    /// As [`Model::token_logps_masked`].
    pub fn token_logps_masked_with_sq(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_mask: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (lp, sq) = self.token_logps_and_sq(ids, attention_mask, Some(loss_mask), true)?;
        let m = loss_mask.to_dtype(accumulation_dtype(self.compute_dtype))?;
        let sq = sq.ok_or_else(|| Error::InvalidArgument("log Σ π² not computed".into()))?;
        Ok(((lp * &m)?, (sq * m)?))
    }

    pub(super) fn token_logps_at(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.token_logps_and_sq(ids, attention_mask, rows, false)?.0)
    }

    /// The per-token log-probs `[B, L−1]` at the rows `rows` selects (all without it) and,
    /// with `sq`, `log Σ_v π_v²` at the same positions.
    fn token_logps_and_sq(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rows: Option<&Tensor>,
        sq: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l) = ids.dims2()?;
        if l < 2 {
            return Err(Error::InvalidArgument(
                "token_logps needs sequences of length ≥ 2".into(),
            ));
        }
        self.check_forward_size(b, l, 0)?;
        let (mask, causal) = self.training_mask(b, l, attention_mask)?;
        self.logps_on(ids, (&mask, causal, None), rows, sq)
    }

    /// The log-probs of [`crate::batch::Batch::packed`]'s row laid out as the padded batch's:
    /// `[B, L−1]`, `loss_mask · log π(target)` ([`Model::token_logps_masked`]'s values) and,
    /// with `sq`, `log Σ_v π_v²` at the same positions. Each sequence sees only itself
    /// (block-diagonal causal mask, the window within the sequence) at positions from 0.
    ///
    /// # Errors
    /// As [`Model::token_logps_masked`].
    pub fn packed_token_logps(
        &self,
        p: &crate::batch::Packed,
        sq: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.check_packed_size(&p.lengths)?;
        let acc = accumulation_dtype(self.compute_dtype);
        let mask =
            super::block::packed_causal_mask(&p.lengths, self.base_window(), acc, &self.device)?;
        let layout = (&mask, false, Some(p.positions.as_slice()));
        let (lp, sq) = self.logps_on(&p.input_ids, layout, Some(&p.loss_mask), sq)?;
        let m = p.loss_mask.to_dtype(acc)?;
        let lp = p.unpack(&(lp * &m)?)?;
        let sq = sq.map(|s| p.unpack(&(s * &m)?)).transpose()?;
        Ok((lp, sq))
    }

    /// [`Model::token_logps_and_sq`] under an additive mask, whether it is causal, and the
    /// RoPE positions (`None`: `0 .. l` in each row).
    fn logps_on(
        &self,
        ids: &Tensor,
        (mask, causal, positions): (&Tensor, bool, Option<&[usize]>),
        rows: Option<&Tensor>,
        sq: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l) = ids.dims2()?;
        if let Some(r) = rows {
            if r.dims() != [b, l - 1] {
                return Err(Error::InvalidArgument(format!(
                    "loss mask has shape {:?}, log-probs have [{b}, {}]",
                    r.dims(),
                    l - 1
                )));
            }
        }
        let h = self
            .decode(ids, 0, positions, Some(mask), causal, None)?
            .narrow(1, 0, l - 1)?
            .contiguous()?;
        let hs = h.dim(2)?;
        let h = h.reshape((b * (l - 1), hs))?;
        let targets = ids.narrow(1, 1, l - 1)?.flatten_all()?;
        // The selected positions only, when a mask selects fewer than all.
        let sel = match rows {
            Some(r) => {
                let v = r.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let idx: Vec<u32> = (0..v.len() as u32)
                    .filter(|&i| v[i as usize] != 0.0)
                    .collect();
                let n = idx.len();
                (n < v.len())
                    .then(|| Tensor::from_vec(idx, n, &self.device))
                    .transpose()?
            }
            None => None,
        };
        let (h, targets) = match &sel {
            Some(idx) => (h.index_select(idx, 0)?, targets.index_select(idx, 0)?),
            None => (h, targets),
        };
        let lp = self.head_logps(&h, &targets)?;
        let sq = sq
            .then(|| {
                crate::model::chunked_head::log_sum_sq_probs(
                    &h,
                    &self.lm_head,
                    self.head_chunk,
                    self.config.final_logit_softcapping,
                )
            })
            .transpose()?;
        let scatter = |t: Tensor| -> Result<Tensor> {
            let t = match &sel {
                Some(idx) => {
                    Tensor::zeros(b * (l - 1), t.dtype(), &self.device)?.index_add(idx, &t, 0)?
                }
                None => t,
            };
            Ok(t.reshape((b, l - 1))?)
        };
        Ok((scatter(lp)?, sq.map(scatter).transpose()?))
    }

    /// Summed completion log-probabilities `[B]`: `Σ_t loss_mask[b, t] · token_logps[b, t]`.
    ///
    /// `loss_mask: [B, L−1]` selects the target positions (see [`crate::batch::Batch`]).
    ///
    /// # Errors
    /// See [`Model::token_logps`].
    pub fn sequence_logps(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .token_logps_masked(ids, attention_mask, loss_mask)?
            .sum(1)?)
    }
}
