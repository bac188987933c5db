//! A training run's data file as the training [`Dataset`]: its records tokenized TRL-style
//! (chat template, implicit prompt, EOS, truncation) into preference pairs or SFT sequences,
//! by the objective's kind. The command reports the counts and refuses an empty result.

use crate::error::DataError;
use crate::tokenize::{
    load_preferences, load_sft, TokenizationRules, TokenizeOptions, TokenizeStats, TokenizerBundle,
};
use crate::train::config::{Limit, TrainConfig};
use crate::train::data::{Dataset, Examples, PreferencePair};
use crate::train::run::RunRecord;

/// A run's data as tokenized.
#[derive(Debug)]
pub struct RunData {
    /// The training examples.
    pub dataset: Dataset,
    /// Each example's line in the data file, by dataset index.
    pub lines: Vec<usize>,
    /// The tokenizer's counts (kept, dropped, truncated, invalid).
    pub stats: TokenizeStats,
    /// The invalid records skipped (with `skip_invalid`; otherwise the first is an error).
    pub errors: Vec<DataError>,
}

/// The tokenization a run asks for: its length limits ([`Limit::from_count`]: 0 is no limit)
/// and its tokenizer rules (a run's `r.settings.tokenizer`).
pub fn tokenize_options(c: &TrainConfig, rules: &TokenizationRules) -> TokenizeOptions {
    TokenizeOptions {
        max_length: Limit::from_count(c.max_length).0,
        max_prompt_length: Limit::from_count(c.max_prompt_length).0,
        truncation_mode: rules.truncation_mode,
        boundary: rules.completion_boundary,
    }
}

/// Tokenizes the run's data file (`r.data`) TRL-style into a training [`Dataset`]: preference
/// pairs for a preference objective, SFT sequences otherwise.
///
/// # Errors
/// Data errors (file:line:field) unless `skip_invalid`.
pub fn load_dataset(
    c: &TrainConfig,
    r: &RunRecord,
    bundle: &TokenizerBundle,
) -> crate::Result<RunData> {
    let opts = tokenize_options(c, &r.settings.tokenizer);
    let skip = r.settings.invalid.skip_invalid;
    let (examples, lines, stats, errors) = if c.objective.is_preference() {
        let ds = load_preferences(bundle, &r.data, &opts, skip)?;
        let lines = ds.examples.iter().map(|e| e.line).collect();
        let pairs = ds
            .examples
            .iter()
            .map(|e| PreferencePair::from(&e.value))
            .collect();
        (Examples::Preference(pairs), lines, ds.stats, ds.errors)
    } else {
        let ds = load_sft(bundle, &r.data, &opts, skip)?;
        let lines = ds.examples.iter().map(|e| e.line).collect();
        let seqs = ds.examples.iter().map(|e| e.value.sequence()).collect();
        (Examples::Sft(seqs), lines, ds.stats, ds.errors)
    };
    let dataset = Dataset {
        examples,
        pad_id: bundle.pad_id(),
        settings: format!("{opts:?} bf16={}", r.settings.bf16),
    };
    Ok(RunData {
        dataset,
        lines,
        stats,
        errors,
    })
}

/// A reward model's training data: the pairs as TRL's `RewardTrainer` prepares them, and
/// their margins when the file has a `margin` column.
#[derive(Debug)]
pub struct RewardData {
    /// The pairs and what the run logs about them.
    pub data: RunData,
    /// Each kept pair's margin, when the records have one.
    pub margins: Option<Vec<f64>>,
    /// Pairs dropped because a side is longer than `max_length` (TRL's filter).
    pub over_max_length: usize,
}

/// Tokenizes the run's data file as TRL's `RewardTrainer` does: each side is the tokenization
/// of `prompt + completion` ([`crate::tokenize::TokenizerBundle::full_ids`]: EOS appended to
/// plain text, the chat template for messages), never truncated; a pair with a side longer
/// than `max_length` is dropped (0: no limit). A `margin` column (a number in every record,
/// TRL's collator reads it whenever the first record has one) gives the margins.
///
/// # Errors
/// Data errors (file:line:field) unless `skip_invalid`; a `margin` that is missing in some
/// records or not a number, naming its record.
pub fn load_reward_dataset(
    c: &TrainConfig,
    r: &RunRecord,
    bundle: &TokenizerBundle,
) -> crate::Result<RewardData> {
    let opts = TokenizeOptions {
        max_length: None,
        max_prompt_length: None,
        truncation_mode: Default::default(),
        boundary: crate::tokenize::CompletionBoundary::CommonPrefix,
    };
    let skip = r.settings.invalid.skip_invalid;
    let ds = load_preferences(bundle, &r.data, &opts, skip)?;
    let margin_rows = crate::records::read_records(&r.data, skip, parse_margin)?;
    let by_line: std::collections::BTreeMap<usize, Option<f64>> = margin_rows
        .examples
        .iter()
        .map(|m| (m.line, m.value))
        .collect();
    let limit = Limit::from_count(c.max_length).0;
    let mut stats = ds.stats;
    let (mut pairs, mut lines, mut margins) = (Vec::new(), Vec::new(), Vec::new());
    let mut over = 0usize;
    for e in &ds.examples {
        // The whole text is the reward model's input: no completion boundary.
        let whole = |s: crate::batch::Sequence| crate::batch::Sequence {
            ids: s.ids,
            completion_start: 0,
        };
        let pair = PreferencePair {
            chosen: whole(e.value.chosen_sequence()),
            rejected: whole(e.value.rejected_sequence()),
        };
        if limit.is_some_and(|m| pair.chosen.ids.len() > m || pair.rejected.ids.len() > m) {
            over += 1;
            continue;
        }
        pairs.push(pair);
        lines.push(e.line);
        margins.push(by_line.get(&e.line).copied().flatten());
    }
    stats.kept = pairs.len();
    let has_margin = margins.iter().any(Option::is_some);
    let margins = if has_margin {
        let mut out = Vec::with_capacity(margins.len());
        for (m, &line) in margins.iter().zip(&lines) {
            match m {
                Some(v) => out.push(*v),
                None => {
                    let (file, line) = margin_rows.locate(&r.data, line);
                    return Err(DataError {
                        file,
                        line,
                        field: Some("margin".into()),
                        message: "missing (other records have a margin: every record needs one)"
                            .into(),
                    }
                    .into());
                }
            }
        }
        Some(out)
    } else {
        None
    };
    let dataset = Dataset {
        examples: Examples::Preference(pairs),
        pad_id: bundle.pad_id(),
        settings: format!(
            "reward {opts:?} max_length={limit:?} bf16={}",
            r.settings.bf16
        ),
    };
    Ok(RewardData {
        data: RunData {
            dataset,
            lines,
            stats,
            errors: ds.errors,
        },
        margins,
        over_max_length: over,
    })
}

/// A record's `margin`: a number, or `None` when absent or null.
///
/// # Errors
/// Invalid JSON; a `margin` that is not a finite number.
fn parse_margin(
    text: &str,
    file: &std::path::Path,
    line: usize,
) -> std::result::Result<Option<f64>, DataError> {
    let err = |m: String| DataError {
        file: file.to_path_buf(),
        line,
        field: Some("margin".into()),
        message: m,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    match v.get("margin") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|m| m.is_finite())
            .map(Some)
            .ok_or_else(|| err(format!("expected a finite number, got {x}"))),
    }
}
