//! The score head: the decoder as transformers' `…ForSequenceClassification` with one label, a
//! reward model (`GenericForSequenceClassification` in transformers' `modeling_layers.py`).
//!
//! ```text
//! h        = the decoder's final-normed hidden states          [B, L, H]
//! t_b      = the scored position of row b (scored_position)
//! reward_b = score.weight · h[b, t_b]                           score.weight: [1, H], no bias
//! ```
//!
//! A sequence-classification checkpoint has no `lm_head.weight`: the decoder is held with its
//! LM head bound to the embedding (never used here), so no vocabulary-sized tensor is made for
//! it. `score.weight` is a variable of the decoder's [`candle_nn::VarMap`] (named as in the
//! checkpoint), so saving, loading and checkpoints see it like every other weight.

use candle_core::{DType, Tensor, Var};

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};

use super::Model;

/// The score head's tensor name: transformers' `score = nn.Linear(hidden, num_labels,
/// bias=False)`.
pub const SCORE_WEIGHT: &str = "score.weight";

/// The position transformers scores in a row of token ids: the rightmost token that is not
/// `pad_token_id` (0 when every token is padding), so a right-padded row is scored at its
/// last real token, and a row whose text ends in a pad id (EOS used as padding, TRL's default
/// when a tokenizer has no pad token) at the token before it. Without a `pad_token_id`,
/// transformers scores the last position and refuses batches of more than one row; this
/// crate then scores each row at its last attended position (`len − 1`, `len` the row's real
/// length), what a batch of one gives.
///
/// # Formula
/// `t = max { i : ids[i] ≠ pad }` (`0` if none); without a pad id `t = len − 1`.
pub fn scored_position(ids: &[u32], pad_token_id: Option<u32>, len: usize) -> usize {
    match pad_token_id {
        Some(p) => ids.iter().rposition(|&t| t != p).unwrap_or(0),
        None => len.saturating_sub(1),
    }
}

impl Model {
    /// The final-normed hidden states `[B, L, H]` (compute dtype) of `ids: [B, L]` with an
    /// optional `[B, L]` 0/1 attention mask, differentiable: what a head other than the LM
    /// head reads (the score head of [`RewardModel`]).
    ///
    /// # Errors
    /// [`Error::TooLarge`] (see [`Model::check_forward_size`]); shape mismatches; tensor
    /// errors.
    pub fn hidden_states(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.check_forward_size(b, l, 0)?;
        let (mask, causal) = self.training_mask(b, l, attention_mask)?;
        self.decode(ids, 0, None, Some(&mask), causal, None)
    }
}

/// A reward model: the decoder and its one-label score head, with the checkpoint's
/// `pad_token_id` that chooses the scored position ([`scored_position`]).
#[derive(Clone, Debug)]
pub struct RewardModel {
    decoder: Model,
    /// The head's variable.
    var: Var,
    /// The head as the forward reads it: the variable's tensor, or detached.
    score: Tensor,
    pad_token_id: Option<u32>,
}

impl RewardModel {
    /// The decoder with score head `score: [1, H]`, made a trainable variable (`score.weight`)
    /// in the decoder's dtype and on its device.
    ///
    /// # Errors
    /// A head of another shape: [`Error::InvalidArgument`] naming `num_labels` (a reward model
    /// has one label) or the hidden size.
    pub fn new(decoder: Model, score: &Tensor, pad_token_id: Option<u32>) -> Result<Self> {
        let h = decoder.config().hidden_size;
        match score.dims() {
            [1, n] if *n == h => {}
            [labels, n] if *n == h => {
                return Err(Error::InvalidArgument(format!(
                    "`{SCORE_WEIGHT}` has {labels} rows (num_labels = {labels}); a reward model has num_labels = 1"
                )))
            }
            d => {
                return Err(Error::InvalidArgument(format!(
                    "`{SCORE_WEIGHT}` has shape {d:?}; a reward model's is [1, hidden_size = {h}]"
                )))
            }
        }
        let var = Var::from_tensor(
            &score
                .to_device(decoder.device())?
                .to_dtype(decoder.dtype())?,
        )?;
        decoder
            .varmap()
            .data()
            .lock()
            .map_err(|_| Error::InvalidArgument("poisoned VarMap lock".into()))?
            .insert(SCORE_WEIGHT.to_string(), var.clone());
        Ok(Self {
            decoder,
            score: var.as_tensor().clone(),
            var,
            pad_token_id,
        })
    }

    /// The decoder (its settings: LoRA, checkpointing, compute dtype).
    pub fn decoder(&self) -> &Model {
        &self.decoder
    }

    /// The decoder, to change its settings.
    pub fn decoder_mut(&mut self) -> &mut Model {
        &mut self.decoder
    }

    /// The score head's variable `[1, H]`.
    pub fn score_var(&self) -> &Var {
        &self.var
    }

    /// The `pad_token_id` that chooses the scored position.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// Sets the `pad_token_id` (TRL sets the model's to the tokenizer's padding id).
    pub fn set_pad_token_id(&mut self, pad: Option<u32>) {
        self.pad_token_id = pad;
    }

    /// The same model with every tensor detached (no autograd graph): for scoring.
    pub fn detached(&self) -> RewardModel {
        Self {
            decoder: self.decoder.detached(),
            var: self.var.clone(),
            score: self.var.as_tensor().detach(),
            pad_token_id: self.pad_token_id,
        }
    }

    /// The scored position of each row of `ids: [B, L]` ([`scored_position`]; `lengths`: the
    /// rows' real lengths, read only without a pad id).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn positions(&self, ids: &Tensor, lengths: &[usize]) -> Result<Vec<usize>> {
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let len = lengths.get(i).copied().unwrap_or(r.len());
                scored_position(r, self.pad_token_id, len)
            })
            .collect())
    }

    /// The rewards `[B]` (accumulation dtype) of `ids: [B, L]` with attention mask `[B, L]`
    /// and real lengths `lengths`, differentiable with respect to the decoder's variables and
    /// the score head.
    ///
    /// # Formula
    /// `reward_b = Σ_j score[0, j] · h[b, t_b, j]`, `t_b` the scored position.
    ///
    /// # Errors
    /// See [`Model::hidden_states`].
    pub fn scores(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        lengths: &[usize],
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let at: Vec<u32> = self
            .positions(ids, lengths)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i * l + t) as u32)
            .collect();
        let h = self.decoder.hidden_states(ids, attention_mask)?;
        let hs = h.dim(2)?;
        let at = Tensor::from_vec(at, b, h.device())?;
        let picked = h.reshape((b * l, hs))?.index_select(&at, 0)?;
        let w = self.score.to_dtype(picked.dtype())?;
        let s = picked.matmul(&w.t()?)?.squeeze(1)?;
        Ok(s.to_dtype(accumulation_dtype(self.decoder.compute_dtype()))?)
    }
}
