//! A training run's data file as the training [`Dataset`]: its records tokenized TRL-style
//! (chat template, implicit prompt, EOS, truncation) into preference pairs or SFT sequences,
//! by the objective's kind. The command reports the counts and refuses an empty result.

use crate::error::DataError;
use crate::tokenize::{
    load_preferences, load_sft, TokenizeOptions, TokenizeStats, TokenizerBundle,
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
/// and its tokenizer settings.
pub fn tokenize_options(c: &TrainConfig, r: &RunRecord) -> TokenizeOptions {
    TokenizeOptions {
        max_length: Limit::from_count(c.max_length).0,
        max_prompt_length: Limit::from_count(c.max_prompt_length).0,
        truncation_mode: r.settings.tokenizer.truncation_mode,
        boundary: r.settings.tokenizer.completion_boundary,
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
    let opts = tokenize_options(c, r);
    let skip = r.settings.invalid.skip_invalid;
    let (examples, lines, stats, errors) = if c.objective.is_preference() {
        let ds = load_preferences(bundle, &r.data, &opts, skip)?;
        let lines = ds.examples.iter().map(|e| e.line).collect();
        let pairs = ds
            .examples
            .iter()
            .map(|e| PreferencePair {
                chosen: e.value.chosen_sequence(),
                rejected: e.value.rejected_sequence(),
            })
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
