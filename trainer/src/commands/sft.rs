//! `difinfo-train sft`: supervised fine-tuning with TRL's `SFTTrainer` options.

use clap::{ArgMatches, Args};

use difinfo::objective::Rule;

use crate::commands::shared::usage;
use crate::commands::training::{
    command_line_table, refuse_hidden, resolve_common, train, training_options, RunArgs,
    REFERENCE_OPTIONS, REWARD_OPTIONS,
};
use crate::train::run::{sft_defaults, Resolved};
use crate::train::TrainConfig;

/// The training options `sft` does not read: the reference pass's and the reward model's.
const HIDDEN: &[&[&str]] = &[&REFERENCE_OPTIONS, &REWARD_OPTIONS];

/// `difinfo-train sft`: supervised fine-tuning (TRL's `SFTTrainer` options): [`TrainConfig`]'s
/// fields with `sft`'s defaults ([`sft_defaults`]).
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&sft_defaults(), HIDDEN))]
pub struct SftArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub run: RunArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: TrainConfig,
}

/// Resolves `sft`'s options (`m`: the subcommand's matches).
///
/// # Errors
/// Bad options or config file, a preference objective.
pub fn resolve_sft(args: &SftArgs, m: &ArgMatches) -> crate::Result<Resolved> {
    refuse_hidden("sft", HIDDEN, m)?;
    let table = command_line_table(&args.options, m)?;
    let r = resolve_common("sft", &sft_defaults(), &args.run, None, m, table)?;
    if r.config.objective.rule() != Rule::Sft {
        return usage(format!(
            "objective `{}` in the config file: use `difinfo-train dpo`",
            r.config.objective.rule()
        ));
    }
    Ok(r)
}

/// `difinfo-train sft`.
///
/// # Errors
/// See [`train`].
pub fn run(args: &SftArgs, m: &ArgMatches) -> crate::Result<()> {
    let r = resolve_sft(args, m)?;
    let s = train(&r)?;
    if crate::dist::world().rank() == 0 {
        println!("{}", s.line());
    }
    Ok(())
}
