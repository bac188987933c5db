//! `difinfo-train reward`: a reward model trained on preference pairs with TRL's
//! `RewardTrainer` options: the Bradley–Terry loss `−log σ(r_chosen − r_rejected − margin)`
//! (a `margin` column when the data has one) plus `center_rewards_coefficient ·
//! mean((r_chosen + r_rejected)²)`, TRL's metrics (`accuracy`, `margin`, `min_reward`,
//! `mean_reward`, `max_reward`, `num_tokens`), and the options, checkpoints, resume, LoRA and
//! data parallelism of `sft` and `dpo`. A causal LM starts with a new score head (its LM head
//! dropped); a sequence classifier with its own.

use clap::{ArgMatches, Args};

use difinfo::objective::Rule;

use crate::commands::shared::{accept_counts, main_process, usage};
use crate::commands::training::{
    announce, command_line_table, drive, r_report, refuse_hidden, resolve_common, start_run,
    training_options, RunArgs, RunStart, REFERENCE_OPTIONS, SFT_OPTIONS,
};
use crate::pretrained::{load_reward_model, ScoreHead};
use crate::train::dataset::load_reward_dataset;
use crate::train::reward_model::RewardTrainModel;
use crate::train::run::{reward_defaults, Resolved, RunSummary};
use crate::train::{TrainConfig, Trainer};

/// The options `reward` does not read: the reference pass's, SFT's masking, the prompt limit
/// and the tokenizer's truncation rules (TRL's reward data is never truncated: a pair longer
/// than `max_length` is dropped).
const HIDDEN: &[&[&str]] = &[
    &REFERENCE_OPTIONS,
    &SFT_OPTIONS,
    &[
        "max_prompt_length",
        "truncation_mode",
        "completion_boundary",
    ],
];

/// `difinfo-train reward`: a reward model (TRL's `RewardTrainer` options): [`TrainConfig`]'s
/// fields with `reward`'s defaults ([`reward_defaults`]).
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&reward_defaults(), HIDDEN))]
pub struct RewardArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub run: RunArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: TrainConfig,
}

/// Resolves `reward`'s options (`m`: the subcommand's matches).
///
/// # Errors
/// Bad options or config file, another objective.
pub fn resolve_reward(args: &RewardArgs, m: &ArgMatches) -> crate::Result<Resolved> {
    refuse_hidden("reward", HIDDEN, m)?;
    let table = command_line_table(&args.options, m)?;
    let r = resolve_common("reward", &reward_defaults(), &args.run, None, m, table)?;
    if r.config.objective.rule() != Rule::Reward {
        return usage(format!(
            "objective `{}` in the config file: use `difinfo-train {}`",
            r.config.objective.rule(),
            if r.config.objective.rule() == Rule::Sft {
                "sft"
            } else {
                "dpo"
            }
        ));
    }
    Ok(r)
}

/// Runs a resolved `reward` command to the end: the pairs tokenized as TRL's `RewardTrainer`
/// does ([`load_reward_dataset`]), the reward model loaded (a new score head from the run's
/// seed for a causal LM) with the tokenizer's padding id as its `pad_token_id` (TRL sets
/// it so), then the training loop.
///
/// # Errors
/// Data, model, configuration errors; a non-finite loss (the message names the step and
/// batch; the last good checkpoint is kept).
pub fn train_reward(r: &Resolved) -> crate::Result<RunSummary> {
    let RunStart {
        _lock,
        fingerprint,
        bundle,
    } = start_run(r)?;
    let c = &r.config;
    let loaded = load_reward_dataset(c, &r.record, &bundle)?;
    let main = main_process();
    if loaded.over_max_length > 0 && main {
        eprintln!(
            "{}: {} pairs with a side longer than max_length {} dropped (TRL's RewardTrainer filter)",
            r.record.data.display(),
            loaded.over_max_length,
            c.max_length
        );
    }
    let report = r_report(&r.record);
    let run = loaded.data;
    accept_counts(
        &r.record.data,
        &run.stats,
        &run.errors,
        r.record.settings.invalid.skip_invalid,
        main.then_some(report.as_path()),
    )?;
    announce(r);
    let (device, dtype) = r.record.settings.placement.parse()?;
    let mut m = load_reward_model(&r.record.model, dtype, &device, ScoreHead::OrNew(c.seed))?;
    m.set_pad_token_id(Some(bundle.pad_id()));
    if r.record.settings.bf16 {
        m.decoder_mut()
            .set_compute_dtype(candle_core::DType::BF16)?;
    }
    c.memory.apply_to(m.decoder_mut(), c.seed)?;
    let params = m.decoder().num_parameters();
    let model = RewardTrainModel::new(m, r.record.model.clone(), dtype);
    let mut trainer = match &r.resume {
        Some(ck) => {
            if main {
                eprintln!("resuming from {}", ck.display());
            }
            Trainer::resume(&model, c.clone(), run.dataset, ck)?
        }
        None => Trainer::new(&model, c.clone(), run.dataset)?,
    };
    if let Some(margins) = loaded.margins {
        if main {
            eprintln!("margins: the data's `margin` column");
        }
        trainer.set_margins(margins)?;
    }
    drive(r, &model, params, trainer, fingerprint)
}

/// `difinfo-train reward`.
///
/// # Errors
/// See [`train_reward`].
pub fn run(args: &RewardArgs, m: &ArgMatches) -> crate::Result<()> {
    let r = resolve_reward(args, m)?;
    let s = train_reward(&r)?;
    if crate::dist::world().rank() == 0 {
        println!("{}", s.line());
    }
    Ok(())
}
