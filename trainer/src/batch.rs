//! Right-padded batches of token sequences with completion masks: the one batch type of the
//! crate, read by the model's forward ([`crate::model::Model::sequence_logps`]), the log-prob
//! commands and the trainer ([`crate::train::PolicyModel`]).

use std::borrow::Borrow;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One sequence to score: tokens, and where its completion starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sequence {
    /// All token ids (prompt followed by completion).
    pub ids: Vec<u32>,
    /// Index of the first completion token in `ids` (0 = the whole sequence is scored,
    /// except its first token, which has no context).
    pub completion_start: usize,
}

impl Sequence {
    /// Number of scored (completion) tokens: `len − max(completion_start, 1)`.
    pub fn num_completion_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.completion_start.max(1))
    }
}

/// A right-padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, L]` u32 token ids, padded with `pad_id`.
    pub input_ids: Tensor,
    /// `[B, L]` u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, L−1]` f32: 1 where target token `t+1` is a completion token of a real sequence.
    pub loss_mask: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// Number of completion tokens of each row (the row sums of `loss_mask`).
    pub completion_counts: Vec<usize>,
}

impl Batch {
    /// Pads `seqs` on the right to the longest length (at least 2).
    ///
    /// # Formula
    /// `loss_mask[b, t] = 1` iff `completion_start_b ≤ t + 1 < len_b` (the prediction made at
    /// position `t` is of a completion token).
    ///
    /// # Errors
    /// An empty batch or an empty sequence.
    pub fn from_sequences<S: Borrow<Sequence>>(
        seqs: &[S],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if seqs.is_empty() {
            return Err(Error::InvalidArgument("empty batch".into()));
        }
        if let Some(i) = seqs.iter().position(|s| s.borrow().ids.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "sequence {i} of the batch is empty"
            )));
        }
        let l = seqs
            .iter()
            .map(|s| s.borrow().ids.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let b = seqs.len();
        let mut ids = vec![pad_id; b * l];
        let mut att = vec![0u32; b * l];
        let mut loss = vec![0f32; b * (l - 1)];
        let mut counts = Vec::with_capacity(b);
        for (r, s) in seqs.iter().enumerate() {
            let s = s.borrow();
            for (t, &id) in s.ids.iter().enumerate() {
                ids[r * l + t] = id;
                att[r * l + t] = 1;
            }
            let mut c = 0;
            for t in 0..l - 1 {
                if t + 1 >= s.completion_start && t + 1 < s.ids.len() {
                    loss[r * (l - 1) + t] = 1.0;
                    c += 1;
                }
            }
            counts.push(c);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, l), device)?,
            attention_mask: Tensor::from_vec(att, (b, l), device)?,
            loss_mask: Tensor::from_vec(loss, (b, l - 1), device)?,
            lengths: seqs.iter().map(|s| s.borrow().ids.len()).collect(),
            completion_counts: counts,
        })
    }

    /// [`Batch::from_sequences`] for training, where every row must have a completion token
    /// (a row without one has no log-prob to learn from and a mean log-prob of 0 / 0).
    ///
    /// # Errors
    /// An empty batch, a sequence with no completion token.
    pub fn for_training<S: Borrow<Sequence>>(
        seqs: &[S],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if let Some((r, s)) = seqs
            .iter()
            .map(Borrow::borrow)
            .enumerate()
            .find(|(_, s)| s.num_completion_tokens() == 0)
        {
            return Err(Error::InvalidArgument(format!(
                "sequence {r} of the batch has no completion token (length {}, completion start {})",
                s.ids.len(),
                s.completion_start
            )));
        }
        Self::from_sequences(seqs, pad_id, device)
    }

    /// Number of rows `B`.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Number of non-padding tokens.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The batch's sequences packed into one row (TRL's `padding_free`), see [`Packed`].
    ///
    /// # Errors
    /// A batch of fewer than 2 real tokens in all; tensor errors.
    pub fn packed(&self) -> Result<Packed> {
        let ids: Vec<Vec<u32>> = self
            .input_ids
            .to_dtype(candle_core::DType::U32)?
            .to_vec2()?;
        let mask: Vec<Vec<f32>> = self
            .loss_mask
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        let total = self.num_tokens();
        if total < 2 {
            return Err(Error::InvalidArgument(format!(
                "a packed batch needs at least 2 tokens, this one has {total}"
            )));
        }
        let lm1 = self.input_ids.dim(1)? - 1;
        let mut packed_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut loss = vec![0f32; total - 1];
        // Row r's target t (< len − 1) is packed target start_r + t; the others read the
        // appended zero at index T − 1.
        let mut unpack = vec![(total - 1) as u32; self.batch_size() * lm1];
        let mut start = 0;
        for (r, &len) in self.lengths.iter().enumerate() {
            packed_ids.extend_from_slice(&ids[r][..len]);
            positions.extend(0..len);
            for t in 0..len.saturating_sub(1) {
                loss[start + t] = mask[r][t];
                unpack[r * lm1 + t] = (start + t) as u32;
            }
            start += len;
        }
        let device = self.input_ids.device();
        Ok(Packed {
            input_ids: Tensor::from_vec(packed_ids, (1, total), device)?,
            positions,
            lengths: self.lengths.clone(),
            loss_mask: Tensor::from_vec(loss, (1, total - 1), device)?,
            unpack: Tensor::from_vec(unpack, self.batch_size() * lm1, device)?,
            rows: (self.batch_size(), lm1),
        })
    }
}

/// A batch's sequences packed into one row without padding (TRL's `padding_free`): the
/// sequences follow each other, each with its own positions `0 .. len` (RoPE restarts), and
/// attention stays within a sequence (a block-diagonal causal mask).
///
/// # Formula
/// For `T = Σ_b len_b` tokens, sequence `b` starting at `s_b = Σ_{c<b} len_c`:
/// `loss_mask[0, s_b + t] = loss_mask_b[t]` for `t < len_b − 1`, and 0 at the last token of
/// each sequence (its target is the next sequence's first token).
#[derive(Debug, Clone)]
pub struct Packed {
    /// `[1, T]` u32 token ids.
    pub input_ids: Tensor,
    /// `T` positions: `0 .. len_b` for each sequence in turn.
    pub positions: Vec<usize>,
    /// The sequences' lengths, in order (the block sizes of the attention mask).
    pub lengths: Vec<usize>,
    /// `[1, T−1]` f32: 1 where the packed target `t+1` is a completion token of the sequence
    /// of `t`.
    pub loss_mask: Tensor,
    /// `[B·(L−1)]` u32: for each target of the padded batch, its index among the `T − 1`
    /// packed targets, or `T − 1` (a zero appended) for padding.
    pub unpack: Tensor,
    /// The padded batch's `(B, L − 1)`.
    pub rows: (usize, usize),
}

impl Packed {
    /// Per-target values of the packed row `[1, T−1]` laid out as the padded batch's
    /// `[B, L−1]` (0 at padding), differentiable (`index_select`).
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn unpack(&self, packed: &Tensor) -> Result<Tensor> {
        let flat = packed.flatten_all()?;
        let zero = Tensor::zeros(1, flat.dtype(), flat.device())?;
        let ext = Tensor::cat(&[&flat, &zero], 0)?;
        Ok(ext.index_select(&self.unpack, 0)?.reshape(self.rows)?)
    }
}
