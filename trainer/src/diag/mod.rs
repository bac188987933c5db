//! Differential-information diagnostics on real models (Section 4, Appendix K).
//!
//! - [`beta_accuracy`]: Appendix K.1, the per-prompt β fit of a DID estimator.
//! - [`did_entropy`]: Appendix K's DID entropy pipeline end to end (pairs, the estimator π̂,
//!   entropies of π̂, π_ref and π, β-accuracy).
//! - [`expected_reward`]: Section 3.5's real-data test (Figure 6): the expected reward of
//!   policies' samples against β, for DPO's and the reference-free reward form.
//! - [`entropy`]: Monte Carlo sequence entropy per prompt (Appendix K) with its standard error,
//!   and the exact mean next-token entropy along the samples.
//! - [`report`]: the log-likelihood displacement story of a finished run.
//! - [`resample`]: sampling-importance-resampling of rejected responses from Eq. 1.
//! - [`reward_summary`]: the expected reward of completions under a reward model, per label
//!   and per prompt, with Student-t intervals (Figure 6).

pub mod beta_accuracy;
pub mod did_entropy;
pub mod entropy;
pub mod expected_reward;
pub mod report;
pub mod resample;
pub mod reward_summary;
