//! `difinfo-train dpo`: preference optimization with TRL's `DPOTrainer` options.
//!
//! Objective selection: the options are the fields of the library's one objective type
//! ([`difinfo::objective::ObjectiveSpec`]), spelled as TRL's `DPOConfig`, each once:
//! `--loss-type a,b` (any of TRL 1.x's fifteen loss types) with `--loss-weights`, `--beta`,
//! `--label-smoothing`, `--f-divergence-type`, `--f-alpha-divergence-coef`, `--discopop-tau`,
//! TRL 0.x's `--reference-free` (the reward `β log π`, the DID estimator of Appendix K) and
//! `--rpo-alpha`, and `--objective dpo|dpo-pg` (DPO-PG, Appendix H; not a TRL option). A TOML
//! file uses the same names with underscores. `--ref-model DIR` is TRL's `ref_model`: the
//! reference whose log-probs are cached (default: the policy's starting weights).

use std::path::PathBuf;

use clap::{ArgAction, ArgMatches, Args};
use serde::Serialize;

use difinfo::objective::Rule;

use crate::commands::shared::usage;
use crate::commands::training::{command_line_table, resolve_common, train, HyperArgs, RunArgs};
use crate::train::run::{dpo_defaults, Resolved};

/// TRL's loss type names (`DPOConfig.loss_type`).
const LOSS_TYPES: [&str; 15] = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
];

/// `difinfo-train dpo`: preference optimization (TRL's `DPOTrainer` options).
#[derive(Args, Debug, Clone, Serialize)]
pub struct DpoArgs {
    #[command(flatten)]
    #[serde(skip)]
    #[allow(missing_docs)]
    pub run: RunArgs,
    /// Run directory: checkpoints, metrics, resolved config
    #[arg(long, default_value = "runs/dpo")]
    pub output_dir: PathBuf,
    /// The reference model, TRL's ref_model: a Hugging Face checkpoint directory with the
    /// policy's vocabulary whose log-probs are computed once and cached [default: the policy's
    /// starting weights]
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub ref_model: Option<PathBuf>,
    /// dpo: the preference loss; dpo-pg: DPO-PG (Appendix H), a step along the chosen NLL's
    /// gradient projected off the rejected NLL's (the loss is still logged; the summary reports
    /// how often the projection was active)
    #[arg(long, default_value = "dpo", value_parser = ["dpo", "dpo-pg"])]
    pub objective: String,
    /// TRL's loss types, comma-separated (combined with --loss-weights): sigmoid (DPO), hinge
    /// (SLiC), ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
    /// apo_zero, apo_down, discopop, sft, sigmoid_norm
    #[arg(long, default_value = "sigmoid", value_delimiter = ',', value_parser = LOSS_TYPES)]
    pub loss_type: Vec<String>,
    /// Weights of the loss types, comma-separated (TRL's loss_weights) [default: 1 each]
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "W,...",
        allow_negative_numbers = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// β
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Reward β log π without a reference (TRL 0.x's reference_free; the DID estimator)
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub reference_free: bool,
    /// Label smoothing ε ∈ [0, 0.5]: conservative DPO (sigmoid), robust (ε < 0.5), exo_pair
    /// (ε > 0), aot, aot_unpaired
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// RPO: add α times the mean NLL per chosen completion token to the loss, i.e. the sft loss
    /// type with weight α (logged as nll_loss) [default: none]
    #[arg(long, value_name = "ALPHA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo_alpha: Option<f64>,
    /// The f-divergence of the scores (f-DPO): reverse_kl (DPO), forward_kl, js_divergence,
    /// alpha_divergence
    #[arg(long, default_value = "reverse_kl", value_parser = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])]
    pub f_divergence_type: String,
    /// α of alpha_divergence
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub f_alpha_divergence_coef: f64,
    /// DiscoPOP's τ
    #[arg(long, default_value_t = 0.05)]
    pub discopop_tau: f64,
    /// Peak learning rate (TRL's DPOConfig default)
    #[arg(long, default_value_t = 1e-6)]
    pub learning_rate: f64,
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub hyper: HyperArgs,
    /// Longest prompt in tokens (0: no limit)
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// TRL's field: reference log-probs are always computed once before training and cached
    /// on disk, so false behaves as true (with a warning)
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub precompute_ref_log_probs: bool,
    /// Directory of the reference log-prob cache [default: the output dir]
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_cache_dir: Option<PathBuf>,
    /// Pairs per forward pass of the reference pass [default: --per-device-train-batch-size]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_batch_size: Option<usize>,
}

/// Resolves `dpo`'s options (`m`: the subcommand's matches).
///
/// # Errors
/// Bad options or config file, an `sft` objective.
pub fn resolve_dpo(args: &DpoArgs, m: &ArgMatches) -> crate::Result<Resolved> {
    let table = command_line_table(args, m)?;
    let r = resolve_common(
        "dpo",
        &dpo_defaults(),
        &args.run,
        args.ref_model.clone(),
        m,
        table,
    )?;
    if r.config.objective.rule() == Rule::Sft {
        return usage("objective `sft` in the config file: use `difinfo-train sft`");
    }
    Ok(r)
}

/// `difinfo-train dpo`.
///
/// # Errors
/// See [`train`].
pub fn run(args: &DpoArgs, m: &ArgMatches) -> crate::Result<()> {
    let r = resolve_dpo(args, m)?;
    let s = train(&r)?;
    println!("{}", s.line());
    Ok(())
}
