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

use clap::{ArgMatches, Args};

use difinfo::objective::{ObjectiveSpec, Rule};

use crate::commands::shared::usage;
use crate::commands::training::{
    command_line_table, refuse_hidden, resolve_common, train, training_options, RunArgs,
    REWARD_OPTIONS, SFT_OPTIONS,
};
use crate::train::run::{dpo_defaults, Resolved};
use crate::train::TrainConfig;

/// The training options `dpo` does not read: SFT's masking and the reward model's centering.
const HIDDEN: &[&[&str]] = &[&SFT_OPTIONS, &REWARD_OPTIONS];

/// `difinfo-train dpo`: preference optimization (TRL's `DPOTrainer` options). The options
/// are [`ObjectiveSpec`]'s and [`TrainConfig`]'s fields, with `dpo`'s defaults
/// ([`dpo_defaults`]).
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&dpo_defaults(), HIDDEN))]
pub struct DpoArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub run: RunArgs,
    /// The reference model, TRL's ref_model: a Hugging Face checkpoint directory with the
    /// policy's vocabulary whose log-probs are computed once and cached [default: the policy's
    /// starting weights]
    #[arg(long, value_name = "DIR")]
    pub ref_model: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub objective: ObjectiveSpec,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: TrainConfig,
}

/// Resolves `dpo`'s options (`m`: the subcommand's matches).
///
/// # Errors
/// Bad options or config file, an `sft` objective.
pub fn resolve_dpo(args: &DpoArgs, m: &ArgMatches) -> crate::Result<Resolved> {
    refuse_hidden("dpo", HIDDEN, m)?;
    let mut table = command_line_table(&args.options, m)?;
    table.extend(command_line_table(&args.objective, m)?);
    let r = resolve_common(
        "dpo",
        &dpo_defaults(),
        &args.run,
        args.ref_model.clone(),
        m,
        table,
    )?;
    match r.config.objective.rule() {
        Rule::Sft => return usage("objective `sft` in the config file: use `difinfo-train sft`"),
        Rule::Reward => {
            return usage("objective `reward` in the config file: use `difinfo-train reward`")
        }
        _ => {}
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
    if crate::dist::world().rank() == 0 {
        println!("{}", s.line());
    }
    Ok(())
}
