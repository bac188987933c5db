//! The DID entropy of a policy update, end to end (Appendix K).
//!
//! The entropy of the differential information distribution `q_{π/π_ref}(y) = π(y)/π_ref(y) / Z`
//! needs the partition function `Z = Σ_y π(y)/π_ref(y)`, whose Monte Carlo estimate has a high
//! variance. Appendix K estimates it without `Z`:
//!
//! 1. **Pairs.** For each training prompt `x`: `y_w ~ π(·|x)` and `y_l ~ π_ref(·|x)` (sampled, or
//!    greedy as in the paper's Table 2), the preference pair `(x, y_w ≻ y_l)`. An unordered pair
//!    `{a, b}` then has `P(a ≻ b) = π(a)π_ref(b) / (π(a)π_ref(b) + π(b)π_ref(a))
//!    = σ(log q(a) − log q(b))` with `q = q_{π/π_ref}` (Appendix F.2).
//! 2. **Estimator.** A fresh `π̂`, initialized from `π_ref`, trained on the pairs with the
//!    reference-free reward `r = log π̂` (DPO's sigmoid loss with `β = 1`, TRL's
//!    `reference_free`): by Theorem 2.1 its optimum is `π̂ = q_{π/π_ref}`. The paper's settings
//!    are the defaults: RMSprop without weight decay, learning rate `1e-6`, linear warm-up of
//!    150 steps then constant, effective batch 64, one epoch.
//! 3. **Entropies.** On evaluation prompts, the Monte Carlo sequence entropies
//!    ([`crate::diag::entropy`]) `H(π̂)` — the DID entropy estimate — `H(π_ref)` and `H(π)`, and the
//!    β-accuracy of `π̂` ([`crate::diag::beta_accuracy`], Appendix K.1), which says whether `π̂`
//!    has the form `log π̂ = β log(π/π_ref) + c` with `β ≥ 0` it should have at convergence.
//!
//! Every artifact stays in the run directory: `pairs.jsonl` (TRL's preference format plus the
//! token ids trained on), `estimator/` (the training run of `π̂`: metrics, `checkpoint-N`
//! Hugging Face directories), `samples.jsonl` (the completions each entropy and β fit used) and
//! `did_entropy.json` (per-prompt and overall results).
//!
//! With `π = π_ref` the DID is uniform: `π̂` flattens toward the uniform distribution over the
//! sampled support, and every `x = log π(y) − log π_ref(y)` is 0, so no prompt's β fit is
//! determined (reported as undetermined, not as a number).

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use serde::Serialize;

use difinfo::beta_accuracy::BetaAccuracy;

use crate::diag::beta_accuracy::PromptFit;
use crate::diag::entropy::{overall, overall_ci95, PromptEntropy};
use crate::generate::{generate, Sample, SamplingParams};
use crate::model::Model;
use crate::train::optim::OptimizerKind;
use crate::train::run::RunSummary;
use crate::train::schedule::SchedulerType;
use crate::train::{Objective, TrainConfig};

/// How the pair completions are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PairDecoding {
    /// Ancestral sampling at `--temperature` (no top-k / top-p).
    Sample,
    /// Greedy (argmax) decoding, one pair per prompt (the paper's Table 2).
    Greedy,
}

/// Appendix K's training of `π̂`: reference-free DPO (`r = log π̂`, `β = 1`), RMSprop without
/// weight decay, learning rate `1e-6` after a 150-step linear warm-up, effective batch 64
/// (8 × 8), one epoch, checkpoints at the end.
pub fn estimator_defaults(output_dir: &Path) -> TrainConfig {
    TrainConfig {
        objective: estimator_objective(),
        output_dir: output_dir.to_path_buf(),
        learning_rate: 1e-6,
        optim: OptimizerKind::Rmsprop,
        weight_decay: 0.0,
        lr_scheduler_type: SchedulerType::ConstantWithWarmup,
        warmup_steps: 150,
        num_train_epochs: 1.0,
        per_device_train_batch_size: 8,
        gradient_accumulation_steps: 8,
        max_length: 0,
        max_prompt_length: 0,
        save_steps: 0,
        ..TrainConfig::default()
    }
}

/// The estimator's objective: DPO's sigmoid loss with the reference-free reward `r = log π̂`
/// (`β = 1`), whose optimum is the DID `q_{π/π_ref}` (Theorem 2.1).
pub fn estimator_objective() -> Objective {
    Objective::dpo(1.0)
        .and_then(|o| o.reference_free())
        .expect("β = 1 is valid")
}

/// One sampled pair `(y_w ~ π, y_l ~ π_ref)` of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledPair {
    /// `y_w ~ π`.
    pub chosen: Sample,
    /// `y_l ~ π_ref`.
    pub rejected: Sample,
}

/// Step 1: `n` pairs `y_w ~ π(·|x)`, `y_l ~ π_ref(·|x)` of one prompt (`n = 1` for greedy
/// decoding). `rng_w` and `rng_l` are separate streams so that either side's samples do not
/// depend on the other's.
///
/// # Errors
/// Greedy decoding with `n ≠ 1`; generation errors.
#[allow(clippy::too_many_arguments)]
pub fn sample_pairs(
    policy: &Model,
    reference: &Model,
    prompt_ids: &[u32],
    n: usize,
    decoding: PairDecoding,
    temperature: f64,
    max_new_tokens: usize,
    stop_ids: &[u32],
    rng_w: &mut StdRng,
    rng_l: &mut StdRng,
) -> crate::Result<Vec<SampledPair>> {
    if decoding == PairDecoding::Greedy && n != 1 {
        return Err(crate::Error::InvalidArgument(format!(
            "--decoding greedy gives one pair per prompt, not --pairs-per-prompt {n}"
        )));
    }
    let params = SamplingParams {
        temperature: match decoding {
            PairDecoding::Greedy => 0.0,
            PairDecoding::Sample => temperature,
        },
        top_p: 1.0,
        max_new_tokens,
    };
    let w = generate(policy, prompt_ids, n, &params, stop_ids, rng_w)?;
    let l = generate(reference, prompt_ids, n, &params, stop_ids, rng_l)?;
    Ok(w.into_iter()
        .zip(l)
        .map(|(chosen, rejected)| SampledPair { chosen, rejected })
        .collect())
}

/// A Monte Carlo entropy summed over prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OverallEntropy {
    /// Mean of the per-prompt estimates (nats).
    pub entropy: f64,
    /// Its standard error.
    pub stderr: f64,
    /// The 95 % normal interval `entropy ± z_{0.975} · stderr`.
    pub ci95: [f64; 2],
}

impl OverallEntropy {
    /// The mean and standard error over prompts ([`overall`]) and their 95 % interval.
    ///
    /// # Errors
    /// A non-finite mean or standard error.
    pub fn of(per_prompt: &[PromptEntropy]) -> crate::Result<Self> {
        let (entropy, stderr) = overall(per_prompt);
        Ok(Self {
            entropy,
            stderr,
            ci95: overall_ci95(entropy, stderr)?,
        })
    }
}

/// One evaluation prompt's results.
#[derive(Debug, Clone, Serialize)]
pub struct PromptDid {
    /// 1-based line in the evaluation prompts file.
    pub line: usize,
    /// The prompt as read.
    pub prompt: serde_json::Value,
    /// `H(π̂)`: the DID entropy estimate.
    pub did_entropy: PromptEntropy,
    /// `H(π_ref)`.
    pub reference_entropy: PromptEntropy,
    /// `H(π)`.
    pub policy_entropy: PromptEntropy,
    /// π̂'s β fit (Appendix K.1).
    pub beta: PromptFit,
}

/// The whole result, written as `did_entropy.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DidEntropyReport {
    /// π.
    pub policy: PathBuf,
    /// π_ref.
    pub reference: PathBuf,
    /// The trained estimator π̂ (a Hugging Face checkpoint directory).
    pub estimator: PathBuf,
    /// Pairs trained on.
    pub pairs: usize,
    /// Pair decoding.
    pub decoding: PairDecoding,
    /// The estimator's training summary.
    pub train: RunSummary,
    /// Mean `H(π̂)` over evaluation prompts: the DID entropy estimate.
    pub did_entropy: OverallEntropy,
    /// Mean `H(π_ref)`.
    pub reference_entropy: OverallEntropy,
    /// Mean `H(π)`.
    pub policy_entropy: OverallEntropy,
    /// π̂'s β-accuracy; `None` when no prompt's fit is determined.
    pub beta_accuracy: Option<BetaAccuracy>,
    /// Monte Carlo samples per prompt and model.
    pub samples: usize,
    /// β-fit samples per prompt.
    pub beta_samples: usize,
    /// Most new tokens per completion.
    pub max_new_tokens: usize,
    /// Seed.
    pub seed: u64,
    /// Per evaluation prompt.
    pub prompts: Vec<PromptDid>,
}

/// Progress of the sampling stages (the estimator's training reports its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Sampling pairs: prompts done of total.
    Pairs,
    /// Entropies and β fits: prompts done of total.
    Evaluate,
}

/// File names in the run directory.
pub const PAIRS_FILE: &str = "pairs.jsonl";
/// See [`PAIRS_FILE`].
pub const SAMPLES_FILE: &str = "samples.jsonl";
/// See [`PAIRS_FILE`].
pub const REPORT_FILE: &str = "did_entropy.json";
/// The estimator's training run, under the run directory.
pub const ESTIMATOR_DIR: &str = "estimator";
