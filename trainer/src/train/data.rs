//! Tokenized training data: preference pairs or SFT sequences, already truncated by the
//! tokenizer (TRL's `max_length` / `max_prompt_length` are applied before they get here).

use crate::batch::Sequence;

/// A tokenized preference pair: prompt + chosen and prompt + rejected, each with the index
/// where its completion starts (TRL's common-prefix rule may give them different starts).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PreferencePair {
    /// Prompt followed by the chosen completion.
    pub chosen: Sequence,
    /// Prompt followed by the rejected completion.
    pub rejected: Sequence,
}

impl From<&crate::tokenize::TokenizedPair> for PreferencePair {
    /// The pair's chosen and rejected sequences, each with its completion boundary.
    fn from(p: &crate::tokenize::TokenizedPair) -> Self {
        PreferencePair {
            chosen: p.chosen_sequence(),
            rejected: p.rejected_sequence(),
        }
    }
}

/// The examples a run trains on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Examples {
    /// For `dpo`, `ref-free`, `dpo-pg`.
    Preference(Vec<PreferencePair>),
    /// For `sft`: `completion_start` marks the completion (ignored when the whole sequence is
    /// trained on).
    Sft(Vec<Sequence>),
}

/// A tokenized dataset and what is needed to batch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The examples.
    pub examples: Examples,
    /// The padding token id.
    pub pad_id: u32,
    /// The tokenization settings (tokenizer identity, chat template, `max_length`, truncation
    /// mode, ...) as text, part of the reference-cache key.
    pub settings: String,
}

impl Dataset {
    /// Number of examples (pairs or sequences).
    pub fn len(&self) -> usize {
        match &self.examples {
            Examples::Preference(p) => p.len(),
            Examples::Sft(s) => s.len(),
        }
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every sequence has at least one scored token (for SFT on whole sequences
    /// only the length matters: `whole_sequence`).
    ///
    /// # Errors
    /// The first offending example, by index and side.
    pub fn validate(&self, whole_sequence: bool) -> crate::Result<()> {
        let check = |s: &Sequence, what: String| -> crate::Result<()> {
            let n = if whole_sequence {
                s.ids.len().saturating_sub(1)
            } else {
                s.num_completion_tokens()
            };
            if n == 0 {
                return Err(crate::Error::InvalidArgument(format!(
                    "{what} has no token to score (length {}, completion start {})",
                    s.ids.len(),
                    s.completion_start
                )));
            }
            Ok(())
        };
        match &self.examples {
            Examples::Preference(p) => p.iter().enumerate().try_for_each(|(i, x)| {
                check(&x.chosen, format!("example {i}: chosen"))?;
                check(&x.rejected, format!("example {i}: rejected"))
            }),
            Examples::Sft(v) => v
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| check(x, format!("example {i}"))),
        }
    }

    /// The preference pairs, if this is preference data.
    pub fn pairs(&self) -> Option<&[PreferencePair]> {
        match &self.examples {
            Examples::Preference(p) => Some(p),
            Examples::Sft(_) => None,
        }
    }
}
