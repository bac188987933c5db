//! Preference pairs from scored samples, as the paper's Appendix J.2 builds Magpie-G27: for
//! each prompt, the completion a reward model scores highest is `chosen` and the one it scores
//! lowest is `rejected` ([`build_pairs`]).
//!
//! The scored completions come from a scores file joined with `sample`'s output on (`line`,
//! `sample`) ([`crate::records::ScoreRecord`], [`crate::records::SampleRecord`]), or from a
//! scores file whose rows carry `prompt` and `completion` themselves. A prompt is its content:
//! rows with equal prompts (the same string, or the same messages) are one prompt's
//! completions, in the order read.
//!
//! # Selection
//! For a prompt with completions y₁ … y_n and rewards r₁ … r_n (file order):
//!
//! ```text
//! c = min { i : r_i = max_j r_j }              chosen: the first of the highest rewards
//! l = min { i ≠ c : r_i = min_{j≠c} r_j }      rejected: the first of the lowest of the rest
//! ```
//!
//! A prompt with one completion (n = 1) gives no pair. A *tie* is r_c = r_l (compared
//! exactly, as the rewards were written): every completion scored the same, so the pair
//! carries no preference; it is skipped unless ties are kept, and then `rejected` is the
//! first completion after `chosen`. Without a tie, `l` is simply the first lowest reward.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Error, Result};
use crate::records::{
    parse_sample_line, parse_score_line, read_records, Loaded, PreferenceExample, SampleKey, Text,
};
use crate::template::Message;

/// How [`build_pairs`] treats ties, invalid rows and labelled scores.
#[derive(Debug, Clone, Default)]
pub struct PairOptions {
    /// Keep prompts whose best and worst completions tie (see the module's doc).
    pub keep_ties: bool,
    /// Skip invalid rows and unmatched samples or scores (each listed as a [`DataError`])
    /// instead of failing on the first.
    pub skip_invalid: bool,
    /// Keep only the score rows whose `label` (or `data`) is this; other rows are counted in
    /// [`PairCounts::scores_other_label`]. Unset, rows of several labels are an error, unless
    /// some are labelled with the samples file's path as given or its file stem (`score`'s
    /// default label; then those are kept).
    pub label: Option<String>,
}

/// One completion with its reward and the row it was read from.
#[derive(Debug, Clone)]
struct Scored {
    prompt: Text,
    completion: Text,
    reward: f64,
    file: PathBuf,
    line: usize,
}

/// One prompt's pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The prompt, the highest-reward completion as `chosen` and the lowest as `rejected`, in
    /// TRL's format: a message-list prompt's completions are one assistant message each.
    pub example: PreferenceExample,
    /// `[score_chosen, score_rejected]`.
    pub scores: [f64; 2],
    /// How many scored completions the prompt had.
    pub completions: usize,
}

/// What [`build_pairs`] did, as the command reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairCounts {
    /// Distinct prompts among the scored completions.
    pub prompts: usize,
    /// Scored completions (samples joined with a score, or self-contained score rows).
    pub completions: usize,
    /// Prompts written as pairs (ties kept included).
    pub paired: usize,
    /// Prompts skipped because they have one completion.
    pub one_completion: usize,
    /// Prompts skipped because their best and worst completions tie.
    pub ties_skipped: usize,
    /// Prompts whose best and worst tie, kept (`keep_ties`).
    pub ties_kept: usize,
    /// Samples with no score row (skipped; without `skip_invalid`, the first is the error).
    pub samples_without_score: usize,
    /// Score rows with no sample (skipped; without `skip_invalid`, the first is the error).
    pub scores_without_sample: usize,
    /// Invalid rows of the samples file (skipped).
    pub invalid_samples: usize,
    /// Invalid rows of the scores file (skipped).
    pub invalid_scores: usize,
    /// Score rows of another label than [`PairOptions::label`] (left out).
    pub scores_other_label: usize,
}

/// The pairs, what was done, and the rows skipped (with `skip_invalid`).
#[derive(Debug, Clone)]
pub struct Built {
    /// One pair per prompt kept, in the order the prompts were first read.
    pub pairs: Vec<Pair>,
    /// The counts.
    pub counts: PairCounts,
    /// Each skipped row's error (file, line, field, message).
    pub errors: Vec<DataError>,
}

/// Reads `scores` (and `samples`, when given, joined on `line` and `sample`), and pairs each
/// prompt's highest- and lowest-reward completions (see the module's doc).
///
/// Any format [`read_records`] reads: JSONL, a JSON array, Parquet, a directory of shards.
///
/// # Errors
/// Without `skip_invalid`: the first invalid row, sample without a score, score without a
/// sample, duplicate (`line`, `sample`), or prompt in the other format (strings and message
/// lists mixed), naming file, line and field. Either way: score rows of several labels and
/// no `label` chosen; no scored completion at all; I/O errors.
pub fn build_pairs(samples: Option<&Path>, scores: &Path, opts: &PairOptions) -> Result<Built> {
    let mut counts = PairCounts::default();
    let mut errors = Vec::new();
    let score_rows = read_records(scores, opts.skip_invalid, parse_score_line)?;
    counts.invalid_scores = score_rows.errors.len();
    errors.extend(score_rows.errors.iter().cloned());
    // Scores of several files, when --label does not choose: the rows labelled with
    // `--samples`' path as given, or else with its file stem (`score`'s default label).
    let names: Vec<String> = samples
        .map(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            std::iter::once(p.display().to_string())
                .chain(stem)
                .collect()
        })
        .unwrap_or_default();
    let label = opts.label.as_deref().or_else(|| {
        let labels = || score_rows.examples.iter().map(|r| r.value.label.as_deref());
        let several = labels().any(|l| l != labels().next().flatten());
        let name = names
            .iter()
            .find(|n| labels().any(|l| l == Some(n.as_str())))?;
        several.then_some(name.as_str())
    });
    let score_rows = by_label(scores, score_rows, label, &mut counts)?;
    let mut sink = Sink {
        skip: opts.skip_invalid,
        errors,
    };
    let scored = match samples {
        Some(samples) => {
            let sample_rows = read_records(samples, opts.skip_invalid, parse_sample_line)?;
            counts.invalid_samples = sample_rows.errors.len();
            sink.errors.extend(sample_rows.errors.iter().cloned());
            join(
                (samples, &sample_rows),
                (scores, &score_rows),
                &mut sink,
                &mut counts,
            )?
        }
        None => self_contained(scores, &score_rows, &mut sink)?,
    };
    let scored = one_format(scored, &mut sink)?;
    if scored.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no scored completion to pair{}",
            scores.display(),
            if sink.errors.is_empty() {
                ""
            } else {
                " (every row was skipped)"
            }
        )));
    }
    counts.completions = scored.len();
    let pairs = select(scored, opts.keep_ties, &mut counts);
    Ok(Built {
        pairs,
        counts,
        errors: sink.errors,
    })
}

/// Where row errors go: returned at once, or collected when skipping.
struct Sink {
    skip: bool,
    errors: Vec<DataError>,
}

impl Sink {
    fn push(&mut self, e: DataError) -> Result<()> {
        if self.skip {
            self.errors.push(e);
            Ok(())
        } else {
            Err(e.into())
        }
    }
}

/// An error about row `line` of `file` (`file` a directory of shards: its shard and row).
fn row_error<T>(
    loaded: &Loaded<T>,
    file: &Path,
    line: usize,
    field: Option<&str>,
    message: String,
) -> DataError {
    let (file, line) = loaded.locate(file, line);
    DataError {
        file,
        line,
        field: field.map(str::to_string),
        message,
    }
}

/// The score rows of the chosen label, or of the file's one label: rows of two labels and no
/// label chosen are an error naming the first row of the second.
fn by_label(
    file: &Path,
    mut rows: Loaded<crate::records::ScoreRecord>,
    label: Option<&str>,
    counts: &mut PairCounts,
) -> Result<Loaded<crate::records::ScoreRecord>> {
    if let Some(want) = label {
        let before = rows.examples.len();
        rows.examples
            .retain(|r| r.value.label.as_deref() == Some(want));
        counts.scores_other_label = before - rows.examples.len();
        if rows.examples.is_empty() && before > 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: no score row has label `{want}` (--label)",
                file.display()
            )));
        }
        return Ok(rows);
    }
    let first = rows.examples.first().map(|r| r.value.label.clone());
    if let Some(other) = rows
        .examples
        .iter()
        .find(|r| Some(&r.value.label) != first.as_ref())
    {
        let name = |l: &Option<String>| l.as_deref().map_or("none".into(), |s| format!("`{s}`"));
        let e = row_error(
            &rows,
            file,
            other.line,
            Some("label"),
            format!(
                "scores of several files (labels {} and {}): choose one with --label",
                name(first.as_ref().unwrap_or(&None)),
                name(&other.value.label)
            ),
        );
        return Err(e.into());
    }
    Ok(rows)
}

/// Samples joined with their scores on (`line`, `sample`), in the samples' order.
fn join(
    (samples, sample_rows): (&Path, &Loaded<crate::records::SampleRecord>),
    (scores, score_rows): (&Path, &Loaded<crate::records::ScoreRecord>),
    sink: &mut Sink,
    counts: &mut PairCounts,
) -> Result<Vec<Scored>> {
    // Each key's score row: its index in `score_rows`, whether a sample took it.
    let mut by_key: HashMap<SampleKey, (usize, bool)> = HashMap::new();
    for (i, r) in score_rows.examples.iter().enumerate() {
        let Some(key) = r.value.key else {
            sink.push(row_error(
                score_rows,
                scores,
                r.line,
                Some("line"),
                "missing: a score row names its sample by `line` and `sample` when joined \
                 with --samples"
                    .into(),
            ))?;
            continue;
        };
        if let Some(&(j, _)) = by_key.get(&key) {
            let (_, first) = score_rows.locate(scores, score_rows.examples[j].line);
            sink.push(row_error(
                score_rows,
                scores,
                r.line,
                Some("sample"),
                format!(
                    "line {} sample {} scored twice (first on line {first})",
                    key.line, key.sample
                ),
            ))?;
            continue;
        }
        by_key.insert(key, (i, false));
    }
    let mut seen: HashMap<SampleKey, usize> = HashMap::new();
    let mut out = Vec::new();
    for s in &sample_rows.examples {
        let key = s.value.key;
        if let Some(&first) = seen.get(&key) {
            let (_, first) = sample_rows.locate(samples, first);
            sink.push(row_error(
                sample_rows,
                samples,
                s.line,
                Some("sample"),
                format!(
                    "line {} sample {} appears twice (first on line {first})",
                    key.line, key.sample
                ),
            ))?;
            continue;
        }
        seen.insert(key, s.line);
        let Some((i, taken)) = by_key.get_mut(&key) else {
            counts.samples_without_score += 1;
            sink.push(row_error(
                sample_rows,
                samples,
                s.line,
                None,
                format!(
                    "no score for line {} sample {} in {}",
                    key.line,
                    key.sample,
                    scores.display()
                ),
            ))?;
            continue;
        };
        *taken = true;
        let (file, line) = sample_rows.locate(samples, s.line);
        out.push(Scored {
            prompt: s.value.prompt.clone(),
            completion: s.value.completion.clone(),
            reward: score_rows.examples[*i].value.reward,
            file,
            line,
        });
    }
    let mut unmatched: Vec<usize> = by_key
        .values()
        .filter(|(_, taken)| !taken)
        .map(|&(i, _)| i)
        .collect();
    unmatched.sort_unstable();
    for i in unmatched {
        let r = &score_rows.examples[i];
        let key = r.value.key.unwrap_or(SampleKey { line: 0, sample: 0 });
        counts.scores_without_sample += 1;
        sink.push(row_error(
            score_rows,
            scores,
            r.line,
            None,
            format!(
                "no sample with line {} sample {} in {}",
                key.line,
                key.sample,
                samples.display()
            ),
        ))?;
    }
    Ok(out)
}

/// The completions of a scores file whose rows carry `prompt` and `completion`.
fn self_contained(
    scores: &Path,
    rows: &Loaded<crate::records::ScoreRecord>,
    sink: &mut Sink,
) -> Result<Vec<Scored>> {
    let mut out = Vec::new();
    for r in &rows.examples {
        let Some((prompt, completion)) = &r.value.text else {
            sink.push(row_error(
                rows,
                scores,
                r.line,
                Some("prompt"),
                "missing: without --samples each score row carries its `prompt` and \
                 `completion`"
                    .into(),
            ))?;
            continue;
        };
        let (file, line) = rows.locate(scores, r.line);
        out.push(Scored {
            prompt: prompt.clone(),
            completion: completion.clone(),
            reward: r.value.reward,
            file,
            line,
        });
    }
    Ok(out)
}

/// The completions whose prompt is in the first one's format (a string, or a message list):
/// a preference file holds one; another is an invalid row.
fn one_format(scored: Vec<Scored>, sink: &mut Sink) -> Result<Vec<Scored>> {
    let Some(first) = scored.first() else {
        return Ok(scored);
    };
    let (chat, at) = (
        first.prompt.is_chat(),
        format!("{}:{}", first.file.display(), first.line),
    );
    let kind = |c: bool| if c { "a message list" } else { "a string" };
    let mut out = Vec::with_capacity(scored.len());
    for s in scored {
        if s.prompt.is_chat() == chat {
            out.push(s);
            continue;
        }
        sink.push(DataError {
            file: s.file.clone(),
            line: s.line,
            field: Some("prompt".into()),
            message: format!(
                "{}, but the first prompt ({at}) is {}: a preference file holds one format",
                kind(!chat),
                kind(chat)
            ),
        })?;
    }
    Ok(out)
}

/// Each prompt's pair (see the module's doc), prompts in first-read order.
fn select(scored: Vec<Scored>, keep_ties: bool, counts: &mut PairCounts) -> Vec<Pair> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<Scored>> = Vec::new();
    for s in scored {
        let key = s.prompt.to_json().to_string();
        let g = *index.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(s);
    }
    counts.prompts = groups.len();
    let mut pairs = Vec::new();
    for g in groups {
        if g.len() < 2 {
            counts.one_completion += 1;
            continue;
        }
        let rewards: Vec<f64> = g.iter().map(|s| s.reward).collect();
        let (c, l) = best_and_worst(&rewards);
        if rewards[c] == rewards[l] {
            if !keep_ties {
                counts.ties_skipped += 1;
                continue;
            }
            counts.ties_kept += 1;
        }
        counts.paired += 1;
        let prompt = g[c].prompt.clone();
        let side = |s: &Scored| as_completion(&prompt, &s.completion);
        pairs.push(Pair {
            example: PreferenceExample {
                chosen: side(&g[c]),
                rejected: side(&g[l]),
                prompt: prompt.clone(),
            },
            scores: [rewards[c], rewards[l]],
            completions: g.len(),
        });
    }
    pairs
}

/// The indices `(c, l)` of the chosen and rejected completions of `rewards` (at least two,
/// all finite): `c` the first highest, `l` the first lowest among the others.
///
/// # Examples
/// ```
/// use difinfo_trainer::pairs::best_and_worst;
/// assert_eq!(best_and_worst(&[0.5, 2.0, -1.0, 2.0, -1.0]), (1, 2));
/// assert_eq!(best_and_worst(&[3.0, 3.0, 3.0]), (0, 1)); // a tie: the next one
/// ```
pub fn best_and_worst(rewards: &[f64]) -> (usize, usize) {
    let first_by = |skip: Option<usize>, better: fn(f64, f64) -> bool| {
        let mut best: Option<usize> = None;
        for (i, &r) in rewards.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            if best.is_none_or(|b| better(r, rewards[b])) {
                best = Some(i);
            }
        }
        best.unwrap_or(0)
    };
    let c = first_by(None, |a, b| a > b);
    (c, first_by(Some(c), |a, b| a < b))
}

/// A completion in TRL's format for `prompt`: a string completion of a message-list prompt
/// becomes one assistant message.
fn as_completion(prompt: &Text, completion: &Text) -> Text {
    match (prompt, completion) {
        (Text::Chat(_), Text::Plain(s)) => Text::Chat(vec![Message {
            role: "assistant".into(),
            content: s.clone(),
        }]),
        _ => completion.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Small integer rewards, so that ties between the best, the worst and the rest are
        /// frequent.
        #[test]
        fn chosen_is_the_first_maximum_and_rejected_the_first_minimum_of_the_rest(
            r in prop::collection::vec(-2i8..=2, 2..8)
        ) {
            let r: Vec<f64> = r.into_iter().map(f64::from).collect();
            let (c, l) = best_and_worst(&r);
            prop_assert_ne!(c, l);
            let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            prop_assert_eq!(r[c], max);
            prop_assert!(r[..c].iter().all(|&x| x < max));
            let rest = || r.iter().enumerate().filter(|&(i, _)| i != c);
            let min = rest().map(|(_, &x)| x).fold(f64::INFINITY, f64::min);
            prop_assert_eq!(r[l], min);
            prop_assert!(rest().filter(|&(i, _)| i < l).all(|(_, &x)| x > min));
        }
    }
}
