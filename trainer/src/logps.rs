//! Summed completion log-probabilities of sequences and preference pairs.

use candle_core::DType;

use crate::batch::{Batch, Sequence};
use crate::error::Result;
use crate::model::Model;
use crate::tokenize::TokenizedPair;

/// Summed completion log-probabilities of `seqs`, scored as one right-padded batch.
///
/// # Formula
/// `log π(y | x) = Σ_{t ≥ completion_start} log π(ids_t | ids_{<t})`.
///
/// # Errors
/// Tensor errors; an empty batch.
pub fn sequence_logps(model: &Model, seqs: &[Sequence], pad_id: u32) -> Result<Vec<f64>> {
    let batch = Batch::from_sequences(seqs, pad_id, model.device())?;
    let lp = model.sequence_logps(
        &batch.input_ids,
        Some(&batch.attention_mask),
        &batch.loss_mask,
    )?;
    Ok(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?)
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
/// rejected, as TRL's concatenated forward) per forward pass. `on_batch` is called with the
/// number of pairs done after each batch.
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
