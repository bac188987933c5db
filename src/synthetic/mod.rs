//! The synthetic energy-based experiments of Sections 3.5 and 4, as a library
//! (`difinfo synth` is a thin command line over [`run_experiment`] and [`write_summary`]).
//!
//! # Setting (docs/theory.md, Section 3.5)
//!
//! ```text
//! π = softmax(f) over N classes,  f_ref = s·z, z ~ N(0, I),  f* = f_ref/τ,
//! π_l ∝ π_ref^{1+β} π*^{−β}  (Eq. 1; equivalently f_l = (1+β) f_ref − β f*),
//! pairs y_w ~ π_ref (chosen), y_l ~ π_l (rejected), label y_w ≻ y_l.
//! ```
//!
//! Every formula comes from the library: [`crate::did`], [`crate::entropy`], [`crate::loss`]
//! (population loss and its exact gradient), [`crate::reward`], [`crate::rejected`],
//! [`crate::dpo_pg`], [`crate::beta_accuracy`]. This module only builds instances
//! ([`instance`]), names objectives ([`objective`]), trains ([`train`], [`optim`]) and writes
//! ([`output`], [`plot`]).
//!
//! # Experiments
//!
//! | name | what | module |
//! |---|---|---|
//! | `did-fit` | Fig. 1: `r = log π` fits the normalized `DID^β` (JS → 0), τ < 1 and τ > 1, several β | [`did_fit`] |
//! | `reward-forms` | only DPO's log-ratio with the matching β recovers π*, 7 objectives × 2 modes | [`reward_forms`] |
//! | `rejected` | DPO with π_l = Eq. 1, π_ref, uniform, a strong contrast | [`rejected`] |
//! | `entropy` | H(DID) vs H(π_ref) over τ; log-likelihood displacement; DPO-PG's DID entropy | [`entropy`] |
//! | `claim-map` | H(q_{π*/π_ref}) − H(π_ref) over τ × logit scale (and N): where Claim 4.1 holds | [`claim_map`] |
//! | `did-entropy` | Appendix K's DID-entropy estimator against the exact H(q) | [`did_entropy`] |
//! | `beta-accuracy` | Appendix K.1 on `P` prompts, as training proceeds | [`beta_accuracy`] |
//! | `loss-atlas` | every TRL loss type's population optimum: JS to π*, DID^β, π_ref over β × τ | [`loss_atlas`] |
//!
//! # Hyperparameters (Appendix J.1's numbers were lost; these are ours)
//!
//! | setting | default | `--quick` | flag |
//! |---|---|---|---|
//! | classes `N` | 128 | 128 | `--n` |
//! | logit scale `s` | 1 | 1 | `--scale` |
//! | reinforcing `τ` (default instance) | 0.4 | 0.4 | `--tau` |
//! | smoothing `τ` | 2 | 2 | `--tau-smooth` |
//! | `β` | 0.25 | 0.25 | `--beta` |
//! | mismatched `β'` | 2 | 2 | `--beta-mismatch` |
//! | did-fit's `β` list | 0.25, 0.5, 1, 2 | same | `--did-fit-betas` |
//! | strong contrast: Eq. 1 with `κβ` | κ = 4 | same | `--contrast` |
//! | sampled steps | 50 000 | 10 000 | `--steps` |
//! | pairs per step (per prompt) | 256 | 256 | `--batch` |
//! | RMSprop learning rate (constant) | 1e-3 | 2e-3 | `--lr` |
//! | RMSprop `α`, `ε` (PyTorch's defaults) | 0.99, 1e-8 | same | `--rms-alpha`, `--rms-eps` |
//! | global gradient-norm clip | 1 | 1 | `--clip` |
//! | population L-BFGS iterations (memory 20; stops at `‖∇‖∞ ≤ 1e-11` or when `L` stalls at its float resolution) | 3 000 | 1 000 | `--pop-iters` |
//! | recorded points per curve | 100 | 25 | `--records` |
//! | claim-map grid (τ × scale, both log-spaced in [0.1, 10]) | 40 × 31 | 20 × 11 | `--grid-tau`, `--grid-scale` |
//! | claim-map `N` values | 16, 64, 256, 1024 | 16, 128, 1024 | — |
//! | did-entropy τ values | 0.25, 0.4, 0.6, 0.8, 1.25, 2, 4 | same | `--did-entropy-taus` |
//! | Monte Carlo samples of the entropy estimate | 20 000 | 4 000 | `--mc-samples` |
//! | β-accuracy prompts `P` (τ = `--tau-smooth`), samples per fit | 64, 4 | 32, 4 | `--prompts`, `--beta-samples` |
//! | loss-atlas grid: `N`, β values, τ values | 32; 0.1, 0.25, 0.5, 1, 2; 0.25, 0.4, 0.6, 1.5, 3 | 16; 0.25, 1; 0.4, 2 | `--atlas-n`, `--atlas-betas`, `--atlas-taus` |
//! | seed | 0 | 0 | `--seed` |
//!
//! Why: `N = 128` keeps the `O(N²)` population loss cheap (16 384 pair terms) while π_ref's top
//! 1 % is two classes; `τ = 0.4` and `2` lie where Claim 4.1 holds for the tempered model
//! (`q ∝ π_ref^{(1−τ)/τ}`, see `claim-map`); `β = 0.25 ≠ 1` keeps `ref-free-beta` and
//! `ref-free-1` apart, and keeps every wrong choice of `rejected` far from π* (at `β = 0.5` the
//! uniform rejected distribution's optimum `π_ref^{1+1/β} = π_ref^3` lies within JS 0.01 of
//! `π* = π_ref^{2.5}`). Batch 256 and learning rate 1e-3 put sampled DPO within JS ≈ 1e-4 of
//! π*; smaller batches leave sparse per-class gradients that make RMSprop step sign-like (a
//! visible bias at batch 64). Population mode has no noise and L-BFGS reaches the float
//! resolution of the loss. Sampled mode runs in `f64` (float32 would not be faster here); one
//! seeded `StdRng` per run (seeded from `--seed` and the run's name), every reduction
//! sequential: the same seed gives bit-identical files.
//!
//! Cost (2-core Xeon, release): `--quick` `all` about 20 s, the full run about 3–5 minutes
//! (most of it `beta-accuracy`: `P · B` pairs a step); the population runs are `O(N²)` per
//! L-BFGS iteration, sampled steps `O(N + B)`.

pub mod beta_accuracy;
pub mod claim_map;
pub mod did_entropy;
pub mod did_fit;
pub mod entropy;
pub mod files;
pub mod instance;
pub mod loss_atlas;
pub mod objective;
pub mod optim;
pub mod output;
pub mod plot;
pub mod rejected;
pub mod reward_forms;
pub mod train;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

use crate::policy::Policy;
pub use output::{Check, ExperimentOutput, Verdict};
pub use train::{Mode, TrainConfig};

/// Tolerances and thresholds of the verdicts, with their reasons.
pub mod thresholds {
    /// A population-mode run "recovers" its target when `JS < 1e-8`: L-BFGS stops at the float
    /// resolution of the loss, where JS is 1e-24 to 1e-12; 1e-8 leaves room for an
    /// ill-conditioned instance.
    pub const POPULATION_RECOVERED_JS: f64 = 1e-8;
    /// A run is "bounded away" from a target when `JS > 1e-2` nats (about 1.4 % of `ln 2`).
    pub const FAR_JS: f64 = 1e-2;
    /// A sampled run "recovers" its target when `JS < 3e-3`: constant-LR RMSprop has a noise
    /// floor (about 1e-4 at the defaults) and the distances it must tell apart are ≥ 1e-2.
    pub const SAMPLED_RECOVERED_JS: f64 = 3e-3;
    /// β-accuracy "near 1".
    pub const BETA_ACCURACY_NEAR_ONE: f64 = 0.9;
}

/// The ranges of the settings ([`SynthConfig::validate`]) and why. Sizes are bounded by the
/// memory they allocate, counts that allocate nothing by what a typo would cost (a run that
/// never ends), the positive parameters by where the instances stop meaning anything in f64.
pub mod limits {
    /// Fewest classes `N` (16): below it the distributions the verdicts tell apart lie within
    /// their JS 1e-2 of each other (at `N = 8` hinge's optimum is JS 1e-3 from π*, the uniform
    /// rejected distribution's 6e-3), so "bounded away" fails on a theory that holds.
    pub const MIN_N: usize = 16;
    /// An instance is degenerate, and refused, when a distribution of it puts less than this
    /// mass outside its most likely class (one-hot to f64 precision: nothing left to learn or
    /// tell apart), or when two of its distributions that the theory tells apart (π* and π_ref,
    /// π_l and π_ref) lie within this JS of each other: the recovery threshold
    /// [`super::thresholds::POPULATION_RECOVERED_JS`], below which a run that never moved
    /// would count as recovering its target.
    pub const DEGENERATE: f64 = 1e-8;
    /// Most classes `N` (2²²): an experiment holds about 50 vectors of `N` f64 at once
    /// (L-BFGS keeps 20 pairs of them besides the instance), 1.6 GiB at this `N`, and its
    /// population loss costs `O(N²)` per iteration (days of L-BFGS beyond).
    pub const MAX_N: usize = 1 << 22;
    /// Most `P · N` of beta-accuracy (2²²): it trains all prompts' logits as one vector and
    /// keeps about 20 of that length (parameters, gradients, RMSprop state, the instances).
    pub const MAX_PROMPT_CLASSES: usize = 1 << 22;
    /// Most prompts `P` (2¹⁶).
    pub const MAX_PROMPTS: usize = 1 << 16;
    /// Most Monte Carlo samples (2²⁷): one f64 each, 1 GiB.
    pub const MAX_MC_SAMPLES: usize = 1 << 27;
    /// Most β-fit samples per prompt (2²⁰): three vectors of them per prompt.
    pub const MAX_BETA_SAMPLES: usize = 1 << 20;
    /// Most points per claim-map grid axis (1024): up to 2²⁰ cells kept with their results.
    pub const MAX_GRID: usize = 1024;
    /// Most recorded points per curve (10⁵): each copies the logits when taken.
    pub const MAX_RECORDS: usize = 100_000;
    /// Most sampled optimizer steps (10⁹; no allocation grows with them: at ~1 µs a step
    /// this is already a quarter of an hour per run, more is a typo).
    pub const MAX_STEPS: usize = 1_000_000_000;
    /// Most L-BFGS iterations (10⁷; as [`MAX_STEPS`], each costs `O(N²)`).
    pub const MAX_POP_ITERS: usize = 10_000_000;
    /// Most pairs per step and prompt (2²⁴; drawn one by one each step).
    pub const MAX_BATCH: usize = 1 << 24;
    /// Most values in `--did-fit-betas` / `--did-entropy-taus` (each is a training run or an
    /// estimate).
    pub const MAX_LIST: usize = 64;
    /// The range of β, β', the contrast, the logit scale and the temperatures' distance
    /// from 0: outside `[1e-6, 1e6]` an instance is one-hot or uniform to f64 precision, and a
    /// tiny β overflows DPO's optimum `f_ref + (1/β)·…` (NaN logits at β = 1e-200).
    pub const MIN_POSITIVE: f64 = 1e-6;
    /// See [`MIN_POSITIVE`].
    pub const MAX_POSITIVE: f64 = 1e6;
    /// Most RMSprop learning rate (1e3): each step moves a logit by about `lr`, so beyond
    /// this a single step pushes π to one-hot.
    pub const MAX_LR: f64 = 1e3;
}

/// Errors of the experiments: the library's, file system, plotting, bad settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SynthError {
    /// An error of the theory library.
    #[error(transparent)]
    Lib(#[from] crate::Error),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Rendering a figure.
    #[error("plotting: {0}")]
    Plot(String),
    /// A setting outside its domain.
    #[error("invalid setting {name} = {value}: {reason}")]
    Setting {
        /// The flag.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
}

impl SynthError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One of the eight experiments ([`Experiment::about`] says what each shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Experiment {
    /// Fig. 1.
    DidFit,
    /// Reward-form comparison.
    RewardForms,
    /// Choice of the rejected distribution.
    Rejected,
    /// DID entropy and log-likelihood displacement.
    Entropy,
    /// Where Claim 4.1 holds.
    ClaimMap,
    /// Appendix K's estimator.
    DidEntropy,
    /// Appendix K.1.
    BetaAccuracy,
    /// Every loss type's population optimum.
    LossAtlas,
}

impl Experiment {
    /// All, in the order of `all` and of `summary.md`.
    pub const ALL: [Experiment; 8] = [
        Experiment::DidFit,
        Experiment::RewardForms,
        Experiment::Rejected,
        Experiment::Entropy,
        Experiment::ClaimMap,
        Experiment::DidEntropy,
        Experiment::BetaAccuracy,
        Experiment::LossAtlas,
    ];

    /// One line on what it shows (the command line's help for it).
    pub fn about(self) -> &'static str {
        match self {
            Experiment::DidFit => "Fig. 1: r = log π fits the normalized DID^β",
            Experiment::RewardForms => {
                "Only DPO's log-ratio with the matching β recovers π* (7 objectives × 2 modes)"
            }
            Experiment::Rejected => {
                "DPO with the ideal rejected distribution of Eq. 1 against other choices"
            }
            Experiment::Entropy => {
                "H(DID) over τ, log-likelihood displacement, DPO-PG's DID entropy"
            }
            Experiment::ClaimMap => {
                "Heat map of H(DID) − H(π_ref) over τ × logit scale: where Claim 4.1 holds"
            }
            Experiment::DidEntropy => {
                "Appendix K's DID-entropy estimator against the exact entropy"
            }
            Experiment::BetaAccuracy => {
                "Appendix K.1's β-accuracy as training proceeds (P prompts)"
            }
            Experiment::LossAtlas => {
                "Where every TRL loss type's population optimum lies (JS to π*, DID^β, π_ref) \
                 over β × τ"
            }
        }
    }

    /// The subcommand and folder name.
    pub fn name(self) -> &'static str {
        match self {
            Experiment::DidFit => "did-fit",
            Experiment::RewardForms => "reward-forms",
            Experiment::Rejected => "rejected",
            Experiment::Entropy => "entropy",
            Experiment::ClaimMap => "claim-map",
            Experiment::DidEntropy => "did-entropy",
            Experiment::BetaAccuracy => "beta-accuracy",
            Experiment::LossAtlas => "loss-atlas",
        }
    }
}

impl fmt::Display for Experiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Experiment {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, SynthError> {
        Experiment::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| SynthError::Setting {
                name: "experiment",
                value: s.into(),
                reason: format!(
                    "expected one of {}",
                    Experiment::ALL.map(|e| e.name()).join(", ")
                ),
            })
    }
}

/// Every setting of the experiments (the command line's flags). See the module docs for the
/// defaults and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// `N`.
    pub n: usize,
    /// Seed of every instance and run.
    pub seed: u64,
    /// Logit scale `s`.
    pub scale: f64,
    /// The reinforcing temperature of the default instance (`0 < τ < 1`).
    pub tau: f64,
    /// The smoothing temperature (`τ > 1`).
    pub tau_smooth: f64,
    /// `β`.
    pub beta: f64,
    /// The mismatched `β'` of `dpo-beta-mismatch`.
    pub beta_mismatch: f64,
    /// did-fit's `β` values.
    pub did_fit_betas: Vec<f64>,
    /// The strong-contrast rejected distribution is Eq. 1 with `contrast · β`.
    pub contrast: f64,
    /// Training.
    pub train: TrainConfig,
    /// claim-map: τ grid size (log-spaced in [0.1, 10]; an even size avoids τ = 1).
    pub grid_tau: usize,
    /// claim-map: logit-scale grid size (log-spaced in [0.1, 10]).
    pub grid_scale: usize,
    /// claim-map: the `N` values of the holds-fraction-by-N table.
    pub grid_n: Vec<usize>,
    /// did-entropy: the τ values.
    pub did_entropy_taus: Vec<f64>,
    /// Monte Carlo samples of the entropy estimate.
    pub mc_samples: usize,
    /// β-accuracy: prompts `P`.
    pub prompts: usize,
    /// β-accuracy: samples per prompt for the fit (Appendix K.1: 4).
    pub beta_samples: usize,
    /// loss-atlas: classes of the β × τ grid.
    pub atlas_n: usize,
    /// loss-atlas: the grid's β values.
    pub atlas_betas: Vec<f64>,
    /// loss-atlas: the grid's τ values.
    pub atlas_taus: Vec<f64>,
    /// Whether these are the `--quick` settings (recorded in the outputs).
    pub quick: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            n: 128,
            seed: 0,
            scale: 1.0,
            tau: 0.4,
            tau_smooth: 2.0,
            beta: 0.25,
            beta_mismatch: 2.0,
            did_fit_betas: vec![0.25, 0.5, 1.0, 2.0],
            contrast: 4.0,
            train: TrainConfig {
                steps: 50_000,
                batch: 256,
                lr: 1e-3,
                pop_iters: 3000,
                records: 100,
                ..TrainConfig::default()
            },
            grid_tau: 40,
            grid_scale: 31,
            grid_n: vec![16, 64, 256, 1024],
            did_entropy_taus: vec![0.25, 0.4, 0.6, 0.8, 1.25, 2.0, 4.0],
            mc_samples: 20_000,
            prompts: 64,
            beta_samples: 4,
            atlas_n: 32,
            atlas_betas: vec![0.1, 0.25, 0.5, 1.0, 2.0],
            atlas_taus: vec![0.25, 0.4, 0.6, 1.5, 3.0],
            quick: false,
        }
    }
}

impl SynthConfig {
    /// The `--quick` settings: fewer steps and smaller grids, same instances.
    pub fn quick() -> Self {
        let d = Self::default();
        Self {
            train: TrainConfig {
                steps: 10_000,
                lr: 2e-3,
                pop_iters: 1000,
                records: 25,
                ..d.train.clone()
            },
            grid_tau: 20,
            grid_scale: 11,
            grid_n: vec![16, 128, 1024],
            mc_samples: 4000,
            prompts: 32,
            atlas_n: 16,
            atlas_betas: vec![0.25, 1.0],
            atlas_taus: vec![0.4, 2.0],
            quick: true,
            ..d
        }
    }

    /// The settings as JSON (recorded in every `result.json`).
    pub fn to_json(&self) -> Value {
        let t = &self.train;
        json!({
            "N": self.n, "seed": self.seed, "scale": self.scale, "tau": self.tau,
            "tau_smooth": self.tau_smooth, "beta": self.beta,
            "beta_mismatch": self.beta_mismatch, "did_fit_betas": self.did_fit_betas,
            "contrast": self.contrast, "steps": t.steps, "batch": t.batch, "lr": t.lr,
            "rms_alpha": t.alpha, "rms_eps": t.eps, "clip": t.clip, "pop_iters": t.pop_iters,
            "pop_tol": t.pop_tol, "lbfgs_memory": t.lbfgs_memory, "records": t.records,
            "grid_tau": self.grid_tau, "grid_scale": self.grid_scale, "grid_n": self.grid_n,
            "did_entropy_taus": self.did_entropy_taus, "mc_samples": self.mc_samples,
            "prompts": self.prompts, "beta_samples": self.beta_samples, "quick": self.quick,
            "atlas_n": self.atlas_n, "atlas_betas": self.atlas_betas, "atlas_taus": self.atlas_taus,
        })
    }
}

/// Run one experiment in memory (no files): its tables, figures, records and verdicts.
/// `progress` counts training runs (pass `ProgressBar::hidden()` for none).
///
/// # Errors
/// [`SynthError::Setting`] from [`SynthConfig::validate`]; library errors.
pub fn run_experiment(
    e: Experiment,
    cfg: &SynthConfig,
    progress: &ProgressBar,
) -> Result<ExperimentOutput, SynthError> {
    cfg.validate_for(&[e])?;
    progress.set_message(e.name());
    match e {
        Experiment::DidFit => did_fit::run(cfg, progress),
        Experiment::RewardForms => reward_forms::run(cfg, progress),
        Experiment::Rejected => rejected::run(cfg, progress),
        Experiment::Entropy => entropy::run(cfg, progress),
        Experiment::ClaimMap => claim_map::run(cfg, progress),
        Experiment::DidEntropy => did_entropy::run(cfg, progress),
        Experiment::BetaAccuracy => beta_accuracy::run(cfg, progress),
        Experiment::LossAtlas => loss_atlas::run(cfg, progress),
    }
}

/// How many progress units (training runs, grid rows) an experiment takes.
pub fn work_units(e: Experiment, cfg: &SynthConfig) -> u64 {
    let u = match e {
        Experiment::DidFit => 2 * 2 * cfg.did_fit_betas.len(),
        Experiment::RewardForms => 2 * objective::Preset::ALL.len(),
        Experiment::Rejected => 2 * 4,
        Experiment::Entropy => 4,
        Experiment::ClaimMap => cfg.grid_scale + cfg.grid_n.len(),
        Experiment::DidEntropy => cfg.did_entropy_taus.len(),
        Experiment::BetaAccuracy => 1,
        Experiment::LossAtlas => 18 + cfg.atlas_betas.len() * cfg.atlas_taus.len(),
    };
    u as u64
}

/// Run `experiments`, write each under `dir/<name>/`, then rebuild `dir/summary.json` and
/// `dir/summary.md` from every `dir/<name>/result.json` present. Returns the summary JSON.
///
/// # Errors
/// Any experiment's error, file errors.
pub fn run_and_write(
    experiments: &[Experiment],
    cfg: &SynthConfig,
    dir: &Path,
    progress: &ProgressBar,
) -> Result<Value, SynthError> {
    cfg.validate_for(experiments)?;
    std::fs::create_dir_all(dir).map_err(|e| SynthError::io(dir, e))?;
    progress.set_length(experiments.iter().map(|&e| work_units(e, cfg)).sum());
    for &e in experiments {
        let out = run_experiment(e, cfg, progress)?;
        out.write(dir)?;
    }
    write_summary(dir)
}

/// Rebuild `dir/summary.json` and `dir/summary.md` from the `result.json` of every experiment
/// found under `dir` (in the canonical order). Returns the summary JSON.
///
/// # Errors
/// File errors; a `result.json` that is not JSON.
pub fn write_summary(dir: &Path) -> Result<Value, SynthError> {
    let mut summary = Map::new();
    let mut md = String::from(
        "# Synthetic experiments: which predictions of the paper held\n\n\
         Generated by `difinfo synth`. Each table: the paper's prediction (docs/theory.md), what was \
         measured, and whether it held. JS is the Jensen–Shannon divergence in nats. Settings \
         are in each experiment's `result.json`.\n",
    );
    for e in Experiment::ALL {
        let p = dir.join(e.name()).join("result.json");
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let r: Value = serde_json::from_str(&text).map_err(|err| SynthError::Io {
            path: p.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
        })?;
        let mut section = r["summary"].clone();
        if let Value::Object(o) = &mut section {
            o.insert("settings".into(), r["settings"].clone());
        }
        summary.insert(e.name().into(), section);
        md.push_str(&format!(
            "\n## {} — {}\n\n",
            e.name(),
            r["title"].as_str().unwrap_or("")
        ));
        let s = &r["settings"];
        md.push_str(&format!(
            "N = {}, seed = {}, quick = {}.\n\n",
            s["N"], s["seed"], s["quick"]
        ));
        md.push_str("| prediction | measured | verdict | why |\n|---|---|---|---|\n");
        for c in r["checks"].as_array().into_iter().flatten() {
            let verdict = match c["verdict"].as_str() {
                Some("held") => Verdict::Held.word(),
                Some("failed") => Verdict::Failed.word(),
                Some("partly") => Verdict::Partly.word(),
                _ => Verdict::Reported.word(),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                cell(&c["prediction"]),
                cell(&c["measured"]),
                verdict,
                cell(&c["note"])
            ));
        }
    }
    let v = Value::Object(summary);
    files::write_json(&dir.join("summary.json"), &v)?;
    files::write_atomic(&dir.join("summary.md"), md.as_bytes())?;
    Ok(v)
}

fn cell(v: &Value) -> String {
    v.as_str()
        .unwrap_or("")
        .replace('|', "\\|")
        .replace('\n', " ")
}

/// `softmax(f)` of learned logits (always finite: the optimizers keep them so).
pub(crate) fn policy(logits: &[f64]) -> Result<Policy, SynthError> {
    Ok(Policy::from_logits(logits)?)
}

/// A float as a user would type it: plain when moderate, in exponent form when tiny or huge
/// (`1e-300`, not three hundred zeros).
fn compact(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-4..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// Short float for the tables of `summary.md`.
pub(crate) fn fmt(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() < 1e-3 || x.abs() >= 1e4 {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

/// `k` values log-spaced in `[lo, hi]`.
pub(crate) fn log_grid(lo: f64, hi: f64, k: usize) -> Vec<f64> {
    if k == 1 {
        return vec![(lo * hi).sqrt()];
    }
    (0..k)
        .map(|i| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (k - 1) as f64).exp())
        .collect()
}

/// One single-prompt training run from `log π_ref`, recording `JS(π, target)` at every
/// observation. Returns the curve `(step, JS)` and the run.
pub(crate) fn run_js(
    mode: Mode,
    task: train::PromptTask,
    init: &Policy,
    cfg: &TrainConfig,
    seed: u64,
    target: &Policy,
) -> Result<(Vec<(usize, f64)>, train::Trained), SynthError> {
    let mut curve = Vec::new();
    let trained = train::train(
        mode,
        &[task],
        vec![init.log_probs().to_vec()],
        cfg,
        seed,
        |step, logits| {
            let js = Policy::from_logits(&logits[0])
                .and_then(|p| crate::entropy::js(&p, target))
                .unwrap_or(f64::NAN);
            curve.push((step, js));
        },
    )?;
    Ok((curve, trained))
}

/// The x coordinate of a recorded step: `1 + iteration` in population mode (plotted on a log
/// axis), the step itself in sampled mode.
pub(crate) fn x_axis(mode: Mode, step: usize) -> f64 {
    match mode {
        Mode::Population => step as f64 + 1.0,
        Mode::Sampled => step as f64,
    }
}

/// An empty panel of one mode's JS curves (log y), with [`x_axis`]'s x: `population_x` in
/// population mode (a log axis), `RMSprop step` in sampled mode.
pub(crate) fn mode_panel(
    title: String,
    mode: Mode,
    population_x: &str,
    y_label: &str,
) -> plot::Panel {
    plot::Panel {
        title,
        x_label: match mode {
            Mode::Population => population_x.into(),
            Mode::Sampled => "RMSprop step".into(),
        },
        y_label: y_label.into(),
        log_x: mode == Mode::Population,
        log_y: true,
        series: Vec::new(),
    }
}
