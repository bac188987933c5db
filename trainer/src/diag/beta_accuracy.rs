//! β-accuracy of a DID estimator (Appendix K.1).
//!
//! A converged estimator `π̂` satisfies `log π̂(y) = β log(π(y)/π_ref(y)) + c` with `β ≥ 0`. Per
//! prompt: `S` samples `y ~ π̂`, each scored under `π̂`, `π` and `π_ref` (summed completion
//! log-probs), and the library's closed-form OLS fit (`difinfo::beta_accuracy::fit_beta`) with
//! `x = log π(y) − log π_ref(y)`, `y = log π̂(y)`. A prompt whose samples share one `x` value (e.g.
//! four copies of one completion) is *undetermined*, not a number. The β-accuracy is the fraction
//! of determined prompts with `β̂ ≥ 0` (`difinfo::beta_accuracy::beta_accuracy`).
//!
//! The three models must share one tokenizer: completions are scored as token ids.

use difinfo::beta_accuracy::{fit_beta, BetaFit};
use rand::Rng;

use crate::batch::Sequence;
use crate::error::{Error, Result};
use crate::generate::{generate, SamplingParams};
use crate::logps::sequence_logps_named;
use crate::model::Model;

/// One prompt's samples and fit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptFit {
    /// The completions `y_i ~ π̂` (token ids after the prompt).
    pub completion_ids: Vec<Vec<u32>>,
    /// `x_i = log π(y_i) − log π_ref(y_i)`.
    pub x: Vec<f64>,
    /// `log π̂(y_i)`.
    pub y: Vec<f64>,
    /// The OLS fit, or undetermined.
    pub fit: BetaFit,
}

/// Samples `samples` completions from the estimator and fits `β, c` for one prompt.
///
/// # Errors
/// Models with different vocabularies, generation and tensor errors, non-finite log-probs.
#[allow(clippy::too_many_arguments)]
pub fn prompt_fit(
    estimator: &Model,
    policy: &Model,
    reference: &Model,
    prompt_ids: &[u32],
    samples: usize,
    params: &SamplingParams,
    stop_ids: &[u32],
    pad_id: u32,
    rng: &mut impl Rng,
) -> Result<PromptFit> {
    let v = estimator.config().vocab_size;
    if policy.config().vocab_size != v || reference.config().vocab_size != v {
        return Err(Error::InvalidArgument(
            "the estimator, policy and reference must share one tokenizer (vocabulary sizes differ)".into(),
        ));
    }
    let drawn = generate(estimator, prompt_ids, samples, params, stop_ids, rng)?;
    let seqs: Vec<Sequence> = drawn
        .iter()
        .map(|s| Sequence {
            ids: [prompt_ids, &s.completion_ids].concat(),
            completion_start: prompt_ids.len(),
        })
        .collect();
    let score = |m: &Model, who: &'static str| {
        sequence_logps_named(m, &seqs, pad_id, &|i| {
            format!("the {who}'s log-probability of sample {i}")
        })
    };
    let y = score(estimator, "estimator")?;
    let lp = score(policy, "policy")?;
    let lr = score(reference, "reference")?;
    let x: Vec<f64> = lp.iter().zip(&lr).map(|(a, b)| a - b).collect();
    let fit = fit_beta(&x, &y).map_err(|e| Error::InvalidArgument(format!("β fit: {e}")))?;
    Ok(PromptFit {
        completion_ids: drawn.into_iter().map(|s| s.completion_ids).collect(),
        x,
        y,
        fit,
    })
}
