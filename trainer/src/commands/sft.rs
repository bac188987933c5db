//! `difinfo-train sft`: supervised fine-tuning with TRL's `SFTTrainer` options.

use std::path::PathBuf;

use clap::{ArgAction, ArgMatches, Args};
use serde::Serialize;

use difinfo::objective::Rule;

use crate::commands::shared::usage;
use crate::commands::training::{command_line_table, resolve_common, train, HyperArgs, RunArgs};
use crate::train::run::{sft_defaults, Resolved};

/// `difinfo-train sft`: supervised fine-tuning (TRL's `SFTTrainer` options).
#[derive(Args, Debug, Clone, Serialize)]
pub struct SftArgs {
    #[command(flatten)]
    #[serde(skip)]
    #[allow(missing_docs)]
    pub run: RunArgs,
    /// Run directory: checkpoints, metrics, resolved config
    #[arg(long, default_value = "runs/sft")]
    pub output_dir: PathBuf,
    /// Peak learning rate (TRL's SFTConfig default)
    #[arg(long, default_value_t = 2e-5)]
    pub learning_rate: f64,
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub hyper: HyperArgs,
    /// Longest prompt in tokens (0: no limit)
    #[arg(long, default_value_t = 0)]
    pub max_prompt_length: usize,
    /// Loss on completion tokens only (TRL); `false` trains on the whole sequence, prompt and
    /// template tokens included (the paper's SFT, Appendix J.2)
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub completion_only_loss: bool,
}

/// Resolves `sft`'s options (`m`: the subcommand's matches).
///
/// # Errors
/// Bad options or config file, a preference objective.
pub fn resolve_sft(args: &SftArgs, m: &ArgMatches) -> crate::Result<Resolved> {
    let table = command_line_table(args, m)?;
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
    println!("{}", s.line());
    Ok(())
}
