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
use rand::SeedableRng;
use serde::Serialize;

use difinfo::beta_accuracy::{beta_accuracy, BetaAccuracy, BetaFit};
use difinfo::objective::{FDivergence, LossType, Rule};

use crate::diag::beta_accuracy::{prompt_fit, PromptFit};
use crate::diag::entropy::{overall, overall_ci95, prompt_entropy, PromptEntropy};
use crate::generate::{generate, Sample, SamplingParams};
use crate::model::Model;
use crate::tokenize::TokenizerBundle;
use crate::train::optim::OptimizerKind;
use crate::train::run::RunSummary;
use crate::train::schedule::SchedulerType;
use crate::train::{Dataset, Examples, PreferencePair, Sequence};
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

/// An independent random stream for one purpose of the run (1, 2: the pairs' two sides; 3–6:
/// the entropies of π̂, π_ref, π and π̂'s β samples).
pub fn stream(seed: u64, purpose: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The estimator's objective must be [`estimator_objective`]'s: DPO's sigmoid loss with the
/// reference-free reward `r = log π̂` and `β = 1` (a `--config` file may ask for another).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] naming the objective asked for.
pub fn check_estimator_objective(o: &Objective) -> crate::Result<()> {
    if o.rule() != Rule::Preference
        || !o.is_reference_free()
        || o.beta() != 1.0
        || o.terms() != [(LossType::Sigmoid, 1.0)]
        || o.label_smoothing() != 0.0
        || o.f_divergence() != FDivergence::ReverseKl
    {
        return Err(crate::Error::InvalidArgument(format!(
            "did-entropy trains π̂ with DPO's sigmoid loss and the ref-free reward r = log π̂ \
             (reference_free = true, β = 1); the options ask for {} with β = {}",
            o.label(),
            o.beta()
        )));
    }
    Ok(())
}

/// A tokenized prompt as the pipeline's steps read it.
#[derive(Debug, Clone)]
pub struct TokenizedPrompt {
    /// 1-based line in its prompts file.
    pub line: usize,
    /// The prompt as read.
    pub prompt: serde_json::Value,
    /// Its token ids (chat template applied, truncated).
    pub ids: Vec<u32>,
}

/// How step 1 draws its pairs.
#[derive(Debug, Clone, Copy)]
pub struct PairOptions {
    /// Pairs per prompt (1 for greedy decoding).
    pub per_prompt: usize,
    /// Sampled or greedy.
    pub decoding: PairDecoding,
    /// Temperature of sampled pairs.
    pub temperature: f64,
    /// Most new tokens per completion.
    pub max_new_tokens: usize,
}

/// One training pair with its prompt.
#[derive(Debug, Clone)]
pub struct PromptPair {
    /// The prompt the pair was drawn for.
    pub prompt: TokenizedPrompt,
    /// `(y_w ~ π, y_l ~ π_ref)`.
    pub pair: SampledPair,
}

/// `e` located at `file:line`.
fn at(file: &Path, line: usize, e: crate::Error) -> crate::Error {
    crate::Error::InvalidArgument(format!("{}:{line}: {e}", file.display()))
}

/// Step 1 over every training prompt (read from `file`): [`sample_pairs`] with the streams
/// `stream(seed, 1)` (π's side) and `stream(seed, 2)` (π_ref's); `progress(Stage::Pairs, done,
/// total)` after each prompt.
///
/// # Errors
/// Generation errors, naming `file:line`.
#[allow(clippy::too_many_arguments)]
pub fn sample_prompt_pairs(
    policy: &Model,
    reference: &Model,
    prompts: &[TokenizedPrompt],
    file: &Path,
    options: &PairOptions,
    stop_ids: &[u32],
    seed: u64,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<Vec<PromptPair>> {
    let (mut rw, mut rl) = (stream(seed, 1), stream(seed, 2));
    let n = prompts.len();
    let mut pairs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let drawn = sample_pairs(
            policy,
            reference,
            &p.ids,
            options.per_prompt,
            options.decoding,
            options.temperature,
            options.max_new_tokens,
            stop_ids,
            &mut rw,
            &mut rl,
        )
        .map_err(|e| at(file, p.line, e))?;
        for pair in drawn {
            pairs.push(PromptPair {
                prompt: p.clone(),
                pair,
            });
        }
        progress(Stage::Pairs, i + 1, n);
    }
    Ok(pairs)
}

/// The rows of [`PAIRS_FILE`]: TRL's preference format (the completions decoded) plus the
/// token ids trained on and each side's log-prob under the model that drew it.
///
/// # Errors
/// Decoding errors.
pub fn pair_rows(
    pairs: &[PromptPair],
    bundle: &TokenizerBundle,
) -> crate::Result<Vec<serde_json::Value>> {
    let mut rows = Vec::with_capacity(pairs.len());
    for PromptPair { prompt, pair: d } in pairs {
        rows.push(serde_json::json!({
            "line": prompt.line,
            "prompt": prompt.prompt,
            "chosen": bundle.decode(&d.chosen.completion_ids, true)?,
            "rejected": bundle.decode(&d.rejected.completion_ids, true)?,
            "prompt_ids": prompt.ids,
            "chosen_ids": d.chosen.completion_ids,
            "rejected_ids": d.rejected.completion_ids,
            "chosen_logp_policy": d.chosen.logp,
            "rejected_logp_reference": d.rejected.logp,
        }));
    }
    Ok(rows)
}

/// Step 2's data: the pairs as the estimator's preference [`Dataset`], on the sampled token
/// ids (no text is tokenized again); `pairs_file` names it in the run's settings.
pub fn pairs_dataset(pairs: &[PromptPair], pad_id: u32, pairs_file: &Path) -> Dataset {
    let seq = |ids: &[u32], c: &[u32]| Sequence {
        ids: [ids, c].concat(),
        completion_start: ids.len(),
    };
    Dataset {
        examples: Examples::Preference(
            pairs
                .iter()
                .map(|PromptPair { prompt, pair: d }| PreferencePair {
                    chosen: seq(&prompt.ids, &d.chosen.completion_ids),
                    rejected: seq(&prompt.ids, &d.rejected.completion_ids),
                })
                .collect(),
        ),
        pad_id,
        settings: format!("did-entropy pairs of {}", pairs_file.display()),
    }
}

/// The three models step 3 samples.
#[derive(Clone, Copy)]
pub struct Models<'a> {
    /// π̂, the trained estimator.
    pub estimator: &'a Model,
    /// π_ref.
    pub reference: &'a Model,
    /// π.
    pub policy: &'a Model,
}

/// How step 3 samples.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Monte Carlo samples per prompt and model for the entropies (K ≥ 2).
    pub samples: usize,
    /// Samples per prompt for π̂'s β fit.
    pub beta_samples: usize,
    /// Most new tokens per completion.
    pub max_new_tokens: usize,
}

/// Step 3's results: per prompt, and every completion drawn (the rows of [`SAMPLES_FILE`]).
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Per evaluation prompt.
    pub prompts: Vec<PromptDid>,
    /// `{line, model, purpose, completion_ids, logp}` of each completion.
    pub samples: Vec<serde_json::Value>,
}

/// Step 3 over every evaluation prompt (read from `file`): the entropies `H(π̂)`, `H(π_ref)`,
/// `H(π)` at temperature 1 (streams 3, 4, 5 of `seed`) and π̂'s β fit (stream 6);
/// `progress(Stage::Evaluate, done, total)` after each prompt.
///
/// # Errors
/// Generation and fit errors, naming `file:line`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    models: Models<'_>,
    prompts: &[TokenizedPrompt],
    file: &Path,
    options: &EvalOptions,
    stop_ids: &[u32],
    pad_id: u32,
    seed: u64,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<Evaluation> {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: options.max_new_tokens,
    };
    let mut rngs = [3, 4, 5, 6].map(|k| stream(seed, k));
    let n = prompts.len();
    let mut out = Evaluation {
        prompts: Vec::with_capacity(n),
        samples: Vec::new(),
    };
    for (i, p) in prompts.iter().enumerate() {
        let [r_hat, r_ref, r_pi, r_beta] = &mut rngs;
        let mut entropy =
            |name: &str, m: &Model, rng: &mut StdRng| -> crate::Result<PromptEntropy> {
                let (e, drawn) = prompt_entropy(
                    m,
                    &p.ids,
                    options.samples,
                    1.0,
                    options.max_new_tokens,
                    stop_ids,
                    rng,
                )
                .map_err(|e| at(file, p.line, e))?;
                for s in &drawn {
                    out.samples.push(sample_row(
                        p.line,
                        name,
                        "entropy",
                        &s.completion_ids,
                        s.logp,
                    ));
                }
                Ok(e)
            };
        let did_entropy = entropy("estimator", models.estimator, r_hat)?;
        let reference_entropy = entropy("reference", models.reference, r_ref)?;
        let policy_entropy = entropy("policy", models.policy, r_pi)?;
        let beta = prompt_fit(
            models.estimator,
            models.policy,
            models.reference,
            &p.ids,
            options.beta_samples,
            &params,
            stop_ids,
            pad_id,
            r_beta,
        )
        .map_err(|e| at(file, p.line, e))?;
        for (c, y) in beta.completion_ids.iter().zip(&beta.y) {
            out.samples
                .push(sample_row(p.line, "estimator", "beta", c, *y));
        }
        out.prompts.push(PromptDid {
            line: p.line,
            prompt: p.prompt.clone(),
            did_entropy,
            reference_entropy,
            policy_entropy,
            beta,
        });
        progress(Stage::Evaluate, i + 1, n);
    }
    Ok(out)
}

/// One row of [`SAMPLES_FILE`].
fn sample_row(
    line: usize,
    model: &str,
    purpose: &str,
    ids: &[u32],
    logp: f64,
) -> serde_json::Value {
    serde_json::json!({
        "line": line, "model": model, "purpose": purpose, "completion_ids": ids, "logp": logp,
    })
}

/// The overall results over the evaluation prompts.
#[derive(Debug, Clone, Copy)]
pub struct Overall {
    /// Mean `H(π̂)`: the DID entropy estimate.
    pub did_entropy: OverallEntropy,
    /// Mean `H(π_ref)`.
    pub reference_entropy: OverallEntropy,
    /// Mean `H(π)`.
    pub policy_entropy: OverallEntropy,
    /// π̂'s β-accuracy; `None` when no prompt's fit is determined.
    pub beta_accuracy: Option<BetaAccuracy>,
}

impl Overall {
    /// Each entropy's mean over `prompts` ([`OverallEntropy::of`]) and π̂'s β-accuracy over
    /// their fits.
    ///
    /// # Errors
    /// A non-finite mean or standard error.
    pub fn of(prompts: &[PromptDid]) -> crate::Result<Self> {
        let pick = |f: fn(&PromptDid) -> &PromptEntropy| -> Vec<PromptEntropy> {
            prompts.iter().map(|p| f(p).clone()).collect()
        };
        let fits: Vec<BetaFit> = prompts.iter().map(|p| p.beta.fit).collect();
        Ok(Self {
            did_entropy: OverallEntropy::of(&pick(|p| &p.did_entropy))?,
            reference_entropy: OverallEntropy::of(&pick(|p| &p.reference_entropy))?,
            policy_entropy: OverallEntropy::of(&pick(|p| &p.policy_entropy))?,
            beta_accuracy: beta_accuracy(&fits).ok(),
        })
    }
}
