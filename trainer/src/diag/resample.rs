//! The ideal rejected distribution of Eq. 1 made practical: sampling-importance-resampling.
//!
//! Candidates `y_1..y_M ~ π_ref(· | x)`; to draw `y_l ~ π_l ∝ π_ref^{1+β} π*^{−β}` (Theorem L.1)
//! weight each by the ratio of target to proposal,
//!
//! ```text
//! w_i ∝ π_l(y_i) / π_ref(y_i) ∝ (π_ref(y_i) / π*(y_i))^β,   log w_i = β (log π_ref(y_i) − log π*(y_i))
//! ```
//!
//! normalized in log space, and pick one candidate with probability `w_i`. The effective sample
//! size `ESS = (Σ w)² / Σ w² = 1 / Σ w_i²` (normalized weights) says how many candidates the draw
//! really rests on; `π*` is approximated by a stronger model.

use rand::Rng;
use serde::Serialize;

use crate::error::{Error, Result};

/// Normalized SIR log-weights `log w_i = log π_l(y_i) − log π_ref(y_i) − lse(…)`, with `π_l`
/// Eq. 1's ideal rejected distribution computed by the library
/// ([`difinfo::rejected::ideal_rejected`]) on the candidates: `π_ref` and `π*` restricted to
/// them (their normalizers cancel), so `log w_i = β (log π_ref(y_i) − log π*(y_i)) − lse(…)`.
///
/// # Errors
/// No candidates, a length mismatch, a non-finite log-probability, `β` not finite and
/// positive (the library's check).
pub fn sir_log_weights(ref_logps: &[f64], target_logps: &[f64], beta: f64) -> Result<Vec<f64>> {
    if ref_logps.len() != target_logps.len() {
        return Err(Error::InvalidArgument(format!(
            "{} reference log-probs against {} target log-probs",
            ref_logps.len(),
            target_logps.len()
        )));
    }
    let weights = |e: difinfo::Error| Error::InvalidArgument(format!("importance weights: {e}"));
    let pi_ref = difinfo::Policy::from_logits(ref_logps).map_err(weights)?;
    let pi_star = difinfo::Policy::from_logits(target_logps).map_err(weights)?;
    let pi_l = difinfo::rejected::ideal_rejected(&pi_ref, &pi_star, beta).map_err(weights)?;
    let log_ratio: Vec<f64> = pi_l
        .log_probs()
        .iter()
        .zip(pi_ref.log_probs())
        .map(|(l, r)| l - r)
        .collect();
    let w = difinfo::Policy::from_logits(&log_ratio).map_err(weights)?;
    Ok(w.log_probs().to_vec())
}

/// `ESS = 1 / Σ w_i²` of normalized log-weights (between 1 and the number of candidates).
pub fn effective_sample_size(log_w: &[f64]) -> f64 {
    1.0 / log_w.iter().map(|l| (2.0 * l).exp()).sum::<f64>()
}

/// One SIR draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Resampled {
    /// Index of the chosen candidate.
    pub index: usize,
    /// Its normalized weight.
    pub weight: f64,
    /// Effective sample size of the weights.
    pub ess: f64,
}

/// Picks one candidate with probability `w_i` (the library's categorical sampler).
///
/// # Errors
/// As [`sir_log_weights`].
pub fn resample(
    ref_logps: &[f64],
    target_logps: &[f64],
    beta: f64,
    rng: &mut impl Rng,
) -> Result<Resampled> {
    let log_w = sir_log_weights(ref_logps, target_logps, beta)?;
    let policy = difinfo::Policy::from_log_probs(&log_w)
        .map_err(|e| Error::InvalidArgument(format!("importance weights: {e}")))?;
    let index = policy.sampler().sample(rng);
    Ok(Resampled {
        index,
        weight: log_w[index].exp(),
        ess: effective_sample_size(&log_w),
    })
}

/// Pearson's chi-square goodness-of-fit test of draws against a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GoodnessOfFit {
    /// `X² = Σ_y (n_y − n p_y)² / (n p_y)`.
    pub statistic: f64,
    /// Degrees of freedom, `N − 1` (no parameter estimated from the draws).
    pub df: usize,
    /// `P(χ²_df ≥ X²)`.
    pub p_value: f64,
}

/// Tests whether `counts` (draws per outcome, e.g. the SIR picks of Eq. 1's `π_l` tallied by
/// outcome) come from `expected`: Pearson's `X²` against `χ²_{N−1}` (statrs' distribution).
/// The approximation wants every expected count `n p_y` ≳ 5.
///
/// # Errors
/// A length mismatch, fewer than two outcomes, or no draws.
pub fn goodness_of_fit(counts: &[usize], expected: &difinfo::Policy) -> Result<GoodnessOfFit> {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    if counts.len() != expected.len() || counts.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "goodness of fit: {} counts against {} outcomes (need equal, ≥ 2)",
            counts.len(),
            expected.len()
        )));
    }
    let n: usize = counts.iter().sum();
    if n == 0 {
        return Err(Error::InvalidArgument("goodness of fit: no draws".into()));
    }
    let statistic = counts
        .iter()
        .zip(expected.probs())
        .map(|(&c, p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    let df = counts.len() - 1;
    let chi2 = ChiSquared::new(df as f64).expect("df ≥ 1");
    Ok(GoodnessOfFit {
        statistic,
        df,
        p_value: chi2.sf(statistic),
    })
}

/// `log π(y_i | x)` of every candidate of `set` under `model`, tokenized with `tok` as TRL
/// tokenizes a completion (EOS appended, common-prefix boundary, no truncation).
///
/// # Errors
/// Template or tokenizer failures (naming the candidate), tensor errors.
pub fn score_candidates(
    model: &crate::model::Model,
    tok: &crate::tokenize::TokenizerBundle,
    set: &crate::records::CandidateSet,
) -> Result<Vec<f64>> {
    use crate::records::PreferenceExample;
    use crate::tokenize::{tokenize_preference, Outcome, TokenizeOptions, TokenizeStats};
    let opts = TokenizeOptions::default();
    let mut stats = TokenizeStats::default();
    let mut seqs = Vec::with_capacity(set.candidates.len());
    for (i, c) in set.candidates.iter().enumerate() {
        let ex = PreferenceExample {
            prompt: set.prompt.clone(),
            chosen: c.clone(),
            rejected: set.chosen.clone(),
        };
        match tokenize_preference(tok, &ex, &opts, 0, &mut stats) {
            Ok(Outcome::Kept(pair)) => seqs.push(pair.chosen_sequence()),
            Ok(Outcome::Dropped) => unreachable!("no max_length: nothing is dropped"),
            Err(e) => {
                // The candidate sits in the `chosen` slot of the scoring pair.
                let field = if e.field == "chosen" {
                    format!("candidates[{i}]")
                } else {
                    e.field.to_string()
                };
                return Err(Error::InvalidArgument(format!(
                    "field `{field}`: {}",
                    e.message
                )));
            }
        }
    }
    crate::logps::sequence_logps_named(model, &seqs, tok.pad_id(), &|i| {
        format!("field `candidates[{i}]`: its log-probability")
    })
}
