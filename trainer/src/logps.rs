//! Summed completion log-probabilities of sequences and preference pairs.

use std::path::Path;

use candle_core::DType;

use crate::batch::{Batch, Sequence};
use crate::error::{DataError, Error, Result};
use crate::model::Model;
use crate::records::Located;
use crate::tokenize::TokenizedPair;

/// Padded tokens per forward pass of [`sequence_logps`] at most (a longer sequence runs alone).
pub const TOKENS_PER_PASS: usize = 4096;

/// Summed completion log-probabilities of `seqs`, without a gradient (the
/// [detached](Model::detached) model, no autograd graph).
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
/// Tensor errors; an empty batch; a batch too large for the machine's memory
/// ([`Error::TooLarge`]); a non-finite log-prob ([`Error::NonFiniteOutput`], naming the
/// sequence by its index in `seqs`).
pub fn sequence_logps(model: &Model, seqs: &[Sequence], pad_id: u32) -> Result<Vec<f64>> {
    sequence_logps_named(model, seqs, pad_id, &|i| {
        format!("the log-probability of sequence {i}")
    })
}

/// [`sequence_logps`], naming the `i`-th sequence `name(i)` in a non-finite log-prob's error.
///
/// # Errors
/// As [`sequence_logps`].
pub fn sequence_logps_named(
    model: &Model,
    seqs: &[Sequence],
    pad_id: u32,
    name: &dyn Fn(usize) -> String,
) -> Result<Vec<f64>> {
    let lp = summed_logps(&model.detached(), seqs, pad_id)?;
    match first_non_finite(&lp) {
        Some((i, value)) => Err(Error::NonFiniteOutput {
            what: name(i),
            value,
        }),
        None => Ok(lp),
    }
}

/// The number of sequences of the first forward pass over `seqs` sorted longest first: as many
/// of the longest length `longest` as fit in [`TOKENS_PER_PASS`] padded tokens, at least one.
fn pass_size(longest: usize, remaining: usize) -> usize {
    (TOKENS_PER_PASS / longest.max(2)).clamp(1, remaining.max(1))
}

/// The summed log-probs of `seqs` under the detached `model` as they come (unchecked), in
/// passes of at most [`TOKENS_PER_PASS`] padded tokens, longest first.
fn summed_logps(model: &Model, seqs: &[Sequence], pad_id: u32) -> Result<Vec<f64>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
    let mut out = vec![0.0; seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let take = pass_size(seqs[order[start]].ids.len(), order.len() - start);
        let group = &order[start..start + take];
        let batch: Vec<Sequence> = group.iter().map(|&i| seqs[i].clone()).collect();
        let b = Batch::from_sequences(&batch, pad_id, model.device())?;
        let lp = model.sequence_logps(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)?;
        for (&i, v) in group.iter().zip(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?) {
            out[i] = v;
        }
        start += take;
    }
    Ok(out)
}

/// The index and value of the first NaN or infinite entry of `v`.
fn first_non_finite(v: &[f64]) -> Option<(usize, f64)> {
    v.iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite())
        .map(|(i, &x)| (i, x))
}

/// Chosen and rejected log-probabilities of one pair.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairLogps {
    /// `log π(chosen | prompt)`.
    pub chosen: f64,
    /// `log π(rejected | prompt)`.
    pub rejected: f64,
}

/// Log-probabilities of every pair of `file`, `batch_size` pairs (2·`batch_size` sequences,
/// chosen then rejected, as TRL's concatenated forward) scored in forward passes of at most
/// [`TOKENS_PER_PASS`] padded tokens. `on_batch` is called
/// with the number of pairs done after each batch.
///
/// Before each batch the size of its largest pass is checked against the machine's memory
/// ([`Model::check_forward_size`]), and after it every log-prob must be finite: either failure
/// is an error naming the example (`file:line`, and `chosen` or `rejected`).
///
/// # Errors
/// [`Error::Data`] for a batch too large (naming its longest example and suggesting
/// `--max-length`) or a non-finite log-prob; tensor errors.
pub fn preference_logps(
    model: &Model,
    pairs: &[Located<TokenizedPair>],
    file: &Path,
    batch_size: usize,
    pad_id: u32,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<PairLogps>> {
    let at = |line: usize, field: Option<&str>, message: String| -> Error {
        DataError {
            file: file.to_path_buf(),
            line,
            field: field.map(str::to_string),
            message,
        }
        .into()
    };
    let model = model.detached();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let mut seqs: Vec<Sequence> = chunk.iter().map(|p| p.value.chosen_sequence()).collect();
        seqs.extend(chunk.iter().map(|p| p.value.rejected_sequence()));
        let n = chunk.len();
        let side = |i: usize| if i < n { "chosen" } else { "rejected" };
        let longest = (0..seqs.len())
            .max_by_key(|&i| seqs[i].ids.len())
            .unwrap_or(0);
        let pass = pass_size(seqs[longest].ids.len(), seqs.len());
        if let Err(e @ Error::TooLarge { .. }) =
            model.check_forward_size(pass, seqs[longest].ids.len(), 0)
        {
            // A pass of one sequence is as small as passes get: only truncation helps.
            let or_batch = if pass > 1 {
                " or lower --batch-size"
            } else {
                ""
            };
            return Err(at(
                chunk[longest % n].line,
                Some(side(longest)),
                format!("{e}; truncate with --max-length (e.g. --max-length 1024){or_batch}"),
            ));
        }
        let lp = summed_logps(&model, &seqs, pad_id)?;
        if let Some((i, value)) = first_non_finite(&lp) {
            let what = "the log-probability".to_string();
            return Err(at(
                chunk[i % n].line,
                Some(side(i)),
                Error::NonFiniteOutput { what, value }.to_string(),
            ));
        }
        out.extend((0..n).map(|i| PairLogps {
            chosen: lp[i],
            rejected: lp[n + i],
        }));
        on_batch(out.len());
    }
    Ok(out)
}
