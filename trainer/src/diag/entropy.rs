//! Monte Carlo sequence entropy of a model (Appendix K).
//!
//! Per prompt `x`: `K` completions `y_i ~ π_T(· | x)` by pure ancestral sampling over the whole
//! vocabulary (`π_T = softmax(logits / T)`, no top-k / top-p), each stopping at EOS or after `L`
//! new tokens, and
//!
//! ```text
//! Ĥ(x) = −(1/K) Σ_i log π_T(y_i | x),      stderr = s / √K
//! ```
//!
//! computed by the library's `difinfo::entropy::monte_carlo_entropy` (`log π_T(y | x)` is the sum
//! of the token log-probabilities), with the 95 % interval `Ĥ(x) ± t_{K−1, 0.975} · stderr`. At `T = 1` this is the entropy of the model itself; at
//! `T ≠ 1` it is the entropy of the tempered sampling distribution. The mean per-token entropy
//! is `Σ_i Σ_t H(π_T(· | x, y_i,<t)) / Σ_i |y_i|`, exact at each visited position.

use rand::Rng;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::{generate, Sample, SamplingParams};
use crate::model::Model;

/// The estimate for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptEntropy {
    /// `Ĥ(x)` in nats.
    pub entropy: f64,
    /// Standard error of `Ĥ(x)`.
    pub stderr: f64,
    /// The 95 % confidence interval of `Ĥ(x)`: `Ĥ ± t_{K−1, 0.975} · stderr` (Student's t;
    /// `difinfo::entropy::Estimate::interval`).
    pub ci95: [f64; 2],
    /// `K`.
    pub samples: usize,
    /// Mean exact next-token entropy over the generated positions (nats per token).
    pub token_entropy: f64,
    /// Mean completion length in tokens.
    pub mean_length: f64,
    /// Fraction of samples that ended at a stop token (the rest hit the token budget, so `Ĥ`
    /// is the entropy of the truncated sequence distribution).
    pub finished_fraction: f64,
}

/// Samples `k` completions of `prompt_ids` from `π_T` and estimates the sequence entropy;
/// returns the estimate and the samples it rests on (to keep them as artifacts).
///
/// # Errors
/// `k < 2` (no standard error), `temperature ≤ 0` (a point mass has no Monte Carlo estimate),
/// generation errors.
pub fn prompt_entropy(
    model: &Model,
    prompt_ids: &[u32],
    k: usize,
    temperature: f64,
    max_new_tokens: usize,
    stop_ids: &[u32],
    rng: &mut impl Rng,
) -> Result<(PromptEntropy, Vec<Sample>)> {
    if k < 2 {
        return Err(Error::InvalidArgument(format!(
            "--samples must be ≥ 2, got {k}"
        )));
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "--temperature must be finite and > 0 for an entropy estimate, got {temperature}"
        )));
    }
    let params = SamplingParams {
        temperature,
        top_p: 1.0,
        max_new_tokens,
    };
    let samples = generate(model, prompt_ids, k, &params, stop_ids, rng)?;
    let logps: Vec<f64> = samples.iter().map(|s| s.logp_sampled).collect();
    let est = difinfo::entropy::monte_carlo_entropy(&logps)
        .map_err(|e| Error::InvalidArgument(format!("entropy estimate: {e}")))?;
    let tokens: usize = samples.iter().map(|s| s.completion_ids.len()).sum();
    let h_tokens: f64 = samples.iter().map(|s| s.token_entropy).sum();
    let e = PromptEntropy {
        entropy: est.mean,
        stderr: est.stderr,
        ci95: est
            .interval(0.95)
            .map_err(|e| Error::InvalidArgument(format!("entropy interval: {e}")))?,
        samples: k,
        token_entropy: if tokens > 0 {
            h_tokens / tokens as f64
        } else {
            0.0
        },
        mean_length: tokens as f64 / k as f64,
        finished_fraction: samples.iter().filter(|s| s.finished).count() as f64 / k as f64,
    };
    Ok((e, samples))
}

/// The 95 % normal interval `mean ± z_{0.975} · se` of [`overall`]'s mean over prompts.
///
/// # Errors
/// A non-finite standard error.
pub fn overall_ci95(mean: f64, se: f64) -> Result<[f64; 2]> {
    difinfo::entropy::normal_interval(mean, se, 0.95)
        .map_err(|e| Error::InvalidArgument(format!("entropy interval: {e}")))
}

/// The mean of per-prompt estimates and its standard error `√(Σ se²) / P` (independent prompts).
pub fn overall(per_prompt: &[PromptEntropy]) -> (f64, f64) {
    let p = per_prompt.len().max(1) as f64;
    let mean = per_prompt.iter().map(|e| e.entropy).sum::<f64>() / p;
    let se = per_prompt
        .iter()
        .map(|e| e.stderr * e.stderr)
        .sum::<f64>()
        .sqrt()
        / p;
    (mean, se)
}
