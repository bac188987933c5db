//! Differential-information diagnostics on real models (Section 4, Appendix K).
//!
//! - [`entropy`]: Monte Carlo sequence entropy per prompt (Appendix K) with its standard error,
//!   and the exact mean next-token entropy along the samples.
//! - [`report`]: the log-likelihood displacement story of a finished run.
//! - [`resample`]: sampling-importance-resampling of rejected responses from Eq. 1.

pub mod entropy;
pub mod report;
pub mod resample;
