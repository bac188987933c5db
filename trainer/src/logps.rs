//! Summed completion log-probabilities of sequences and preference pairs.

use candle_core::DType;

use crate::batch::{Batch, Sequence};
use crate::error::Result;
use crate::model::Model;
use crate::tokenize::TokenizedPair;

/// Padded tokens per forward pass of [`sequence_logps`] at most (a longer sequence runs alone).
pub const TOKENS_PER_PASS: usize = 4096;

/// Summed completion log-probabilities of `seqs`, without a gradient.
///
/// The sequences are scored longest first in right-padded forward passes of at most
/// [`TOKENS_PER_PASS`] padded tokens, so memory does not grow with the number of sequences
/// and little is spent on padding; each value depends only on its own sequence (up to
/// floating-point rounding of the batch shape).
///
/// # Formula
/// `log π(y | x) = Σ_{t ≥ completion_start} log π(ids_t | ids_{<t})`.
///
/// # Errors
/// Tensor errors; an empty sequence.
pub fn sequence_logps(model: &Model, seqs: &[Sequence], pad_id: u32) -> Result<Vec<f64>> {
    let m = model.detached();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
    let mut out = vec![0.0; seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = seqs[order[start]].ids.len().max(2);
        let take = (TOKENS_PER_PASS / longest).clamp(1, order.len() - start);
        let group = &order[start..start + take];
        let batch: Vec<Sequence> = group.iter().map(|&i| seqs[i].clone()).collect();
        let b = Batch::from_sequences(&batch, pad_id, m.device())?;
        let lp = m.sequence_logps(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)?;
        for (&i, v) in group.iter().zip(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?) {
            out[i] = v;
        }
        start += take;
    }
    Ok(out)
}

/// Chosen and rejected log-probabilities of one pair.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairLogps {
    /// `log π(chosen | prompt)`.
    pub chosen: f64,
    /// `log π(rejected | prompt)`.
    pub rejected: f64,
}

/// Log-probabilities of every pair, `batch_size` pairs (2·`batch_size` sequences, chosen then
/// rejected, as TRL's concatenated forward) at a time, scored by [`sequence_logps`] (forward
/// passes of at most [`TOKENS_PER_PASS`] padded tokens). `on_batch` is called with the number
/// of pairs done after each batch.
///
/// # Errors
/// Tensor errors.
pub fn preference_logps(
    model: &Model,
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<PairLogps>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let mut seqs: Vec<Sequence> = chunk.iter().map(TokenizedPair::chosen_sequence).collect();
        seqs.extend(chunk.iter().map(TokenizedPair::rejected_sequence));
        let lp = sequence_logps(model, &seqs, pad_id)?;
        let n = chunk.len();
        out.extend((0..n).map(|i| PairLogps {
            chosen: lp[i],
            rejected: lp[n + i],
        }));
        on_batch(out.len());
    }
    Ok(out)
}
