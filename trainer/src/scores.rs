//! Rewards of prompt/completion texts under a reward model ([`RewardModel`]): the rows of a
//! file read as TRL's `RewardTrainer` reads them, tokenized as it tokenizes them, and scored
//! in batches.
//!
//! A file holds either `sample`'s rows (`prompt`, `completion`, `line`, `sample`: one text per
//! row) or preference records in any of TRL's formats (explicit or implicit prompt, strings or
//! messages: two texts per row, `chosen` and `rejected`). Each text is tokenized as
//! [`TokenizerBundle::full_ids`] does, which is TRL's reward tokenization: plain text is
//! `prompt + completion + EOS` (the EOS text appended unless the completion ends with it) with
//! the tokenizer's special tokens; messages are the prompt's followed by the completion's,
//! rendered with the chat template without a generation prompt. A completion written by
//! `sample` as a string after a conversational prompt is the assistant's message.

use std::path::Path;

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::batch::{Batch, Sequence};
use crate::error::{DataError, Result};
use crate::model::RewardModel;
use crate::records::{parse_preference_line, parse_sft_line, SftExample, Text};
use crate::tokenize::TokenizerBundle;

/// Which completion of a record a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The one completion of a `sample` row.
    Completion,
    /// A preference record's `chosen`.
    Chosen,
    /// A preference record's `rejected`.
    Rejected,
}

/// One record to score: its prompt, its completions by side, and the fields that identify it
/// (`line` and `sample` of a `sample` row, kept as read).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRecord {
    /// The prompt (empty for a preference record whose prompt is implicit and empty).
    pub prompt: Text,
    /// The completions: one (`sample` rows) or chosen and rejected.
    pub completions: Vec<(Side, Text)>,
    /// Identifying fields copied to the output (`line`, `sample` of a `sample` row).
    pub ids: Map<String, Value>,
}

/// Parses one record of a file to score: a `sample` row (it has `completion`) or a preference
/// record (TRL's formats, [`parse_preference_line`]).
///
/// # Errors
/// Invalid JSON or fields, naming `file:line` and the field.
pub fn parse_score_line(
    text: &str,
    file: &Path,
    line: usize,
) -> std::result::Result<ScoreRecord, DataError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError {
        file: file.to_path_buf(),
        line,
        field: None,
        message: format!("invalid JSON: {e}"),
    })?;
    let Value::Object(mut o) = value else {
        return Err(DataError {
            file: file.to_path_buf(),
            line,
            field: None,
            message: "expected a JSON object (a `sample` row or a preference record)".into(),
        });
    };
    if !o.contains_key("completion") {
        let ex = parse_preference_line(text, file, line)?;
        return Ok(ScoreRecord {
            prompt: ex.prompt,
            completions: vec![(Side::Chosen, ex.chosen), (Side::Rejected, ex.rejected)],
            ids: Map::new(),
        });
    }
    // `sample` writes a string completion after a conversational prompt: the assistant's turn.
    if let (Some(Value::Array(_)), Some(Value::String(c))) = (o.get("prompt"), o.get("completion"))
    {
        let msg = serde_json::json!([{"role": "assistant", "content": c}]);
        o.insert("completion".into(), msg);
    }
    let ids: Map<String, Value> = ["line", "sample"]
        .iter()
        .filter_map(|k| o.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let reparsed = Value::Object(o).to_string();
    match parse_sft_line(&reparsed, file, line)? {
        SftExample::PromptCompletion { prompt, completion } => Ok(ScoreRecord {
            prompt,
            completions: vec![(Side::Completion, completion)],
            ids,
        }),
        SftExample::Messages(_) => Err(DataError {
            file: file.to_path_buf(),
            line,
            field: Some("prompt".into()),
            message: "missing".into(),
        }),
    }
}

/// The token ids TRL's `RewardTrainer` scores for `prompt` followed by `completion`
/// ([`TokenizerBundle::full_ids`]).
///
/// # Errors
/// Tokenizer and template errors; a prompt and completion of different kinds.
pub fn reward_ids(tok: &TokenizerBundle, prompt: &Text, completion: &Text) -> Result<Vec<u32>> {
    tok.full_ids(prompt, completion)
}

/// The rewards of `seqs` (token ids) under `model`, `batch_size` sequences per forward pass,
/// right-padded with the model's `pad_token_id` (else `pad_fallback`, the tokenizer's padding
/// id: the scored position then comes from the rows' lengths). `progress` is called with the
/// count scored so far. No autograd graph is recorded.
///
/// # Errors
/// An empty sequence; tensor errors; [`crate::Error::TooLarge`] for a batch beyond memory.
pub fn score_sequences(
    model: &RewardModel,
    seqs: &[Vec<u32>],
    batch_size: usize,
    pad_fallback: u32,
    mut progress: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let m = model.detached();
    let pad = model.pad_token_id().unwrap_or(pad_fallback);
    let device = model.decoder().device().clone();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let rows: Vec<Sequence> = chunk
            .iter()
            .map(|ids| Sequence {
                ids: ids.clone(),
                completion_start: 0,
            })
            .collect();
        let b = Batch::from_sequences(&rows, pad, &device)?;
        let s: Tensor = m.scores(&b.input_ids, Some(&b.attention_mask), &b.lengths)?;
        out.extend(s.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?);
        progress(out.len());
    }
    Ok(out)
}
