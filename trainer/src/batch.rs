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
}
