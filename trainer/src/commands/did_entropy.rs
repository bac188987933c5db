//! `difinfo-train did-entropy`: Appendix K's DID entropy pipeline end to end
//! ([`crate::diag::did_entropy`]): pairs, the estimator's training (the training commands' run),
//! the entropies and β fits, and their table.

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, ValueEnum};

use crate::commands::shared::{progress, report_stats, usage};
use crate::commands::training::train_on;
use crate::commands::training::{
    command_line_table, refuse_hidden, training_options, REFERENCE_OPTIONS, REWARD_OPTIONS,
    SFT_OPTIONS,
};
use crate::diag::did_entropy::{
    check_estimator_objective, estimator_defaults, evaluate, pair_rows, pairs_dataset,
    sample_prompt_pairs, DidEntropyReport, EvalOptions, Evaluation, Models, Overall, PairDecoding,
    PairOptions, PromptPair, Stage, TokenizedPrompt, ESTIMATOR_DIR, PAIRS_FILE, REPORT_FILE,
    SAMPLES_FILE,
};
use crate::generate::check_sampling_options;
use crate::io::{write_json, write_jsonl};
use crate::model::Model;
use crate::pretrained::load_model;
use crate::tokenize::{load_prompts, TokenizerBundle};
use crate::train::config::{merge_onto, Limit};
use crate::train::run::{Placement, Resolved, RunRecord, RunSettings};
use crate::train::TrainConfig;
use crate::Result;

impl ValueEnum for PairDecoding {
    fn value_variants<'a>() -> &'a [Self] {
        &[PairDecoding::Sample, PairDecoding::Greedy]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            PairDecoding::Sample => PossibleValue::new("sample")
                .help("Ancestral sampling at `--temperature` (no top-k / top-p)"),
            PairDecoding::Greedy => PossibleValue::new("greedy")
                .help("Greedy (argmax) decoding, one pair per prompt (the paper's Table 2)"),
        })
    }
}

/// The run directory `did-entropy` writes by default (the estimator trains in its
/// `estimator/`).
pub const DEFAULT_OUTPUT_DIR: &str = "runs/did-entropy";

/// Training options `did-entropy` does not read: the reference pass's (π̂'s reward is
/// reference-free), SFT's and the reward model's.
const NOT_READ: &[&[&str]] = &[&REFERENCE_OPTIONS, &SFT_OPTIONS, &REWARD_OPTIONS];

/// `difinfo-train did-entropy` as parsed: the pipeline's options and the training commands'
/// options ([`TrainConfig`]) with Appendix K's defaults ([`estimator_defaults`]): the
/// estimator's training (`--learning-rate`, `--optim`, `--per-device-train-batch-size`, LoRA,
/// ...) and the run's `--output-dir` (the estimator trains in its `estimator/`), `--seed` (of
/// the pairs, the data order and the evaluation samples), `--overwrite-output-dir` and
/// `--max-prompt-length` (the prompts keep their end).
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&estimator_defaults(Path::new(DEFAULT_OUTPUT_DIR)), NOT_READ))]
pub struct DidEntropyCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub args: DidEntropyArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: TrainConfig,
}

/// `difinfo-train did-entropy`: Appendix K's DID entropy pipeline.
#[derive(Args, Debug, Clone)]
pub struct DidEntropyArgs {
    /// The policy π after the update (checkpoint directory).
    #[arg(long, value_name = "DIR")]
    pub policy: PathBuf,
    /// The reference π_ref before it (checkpoint directory; π̂ starts from it and its tokenizer
    /// is used for all three models).
    #[arg(long, value_name = "DIR")]
    pub reference: PathBuf,
    /// Training prompts for the pairs (JSONL: `prompt` string or messages, or `messages`).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Unseen prompts on which the entropies and β fits are measured [default: --prompts]
    #[arg(long, value_name = "FILE")]
    pub eval_prompts: Option<PathBuf>,
    /// Pair completions: sampled, or greedy (the paper's Table 2; one pair per prompt).
    #[arg(long, value_enum, default_value_t = PairDecoding::Sample)]
    pub decoding: PairDecoding,
    /// Pairs per training prompt (sampled decoding).
    #[arg(long, default_value_t = 1)]
    pub pairs_per_prompt: usize,
    /// Temperature of the sampled pair completions.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Most new tokens per completion (pairs, entropy samples and β samples).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Monte Carlo samples per evaluation prompt and model for the entropies (K ≥ 2).
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    /// Samples per evaluation prompt for π̂'s β fit (Appendix K.1 uses 4).
    #[arg(long, default_value_t = 4)]
    pub beta_samples: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// TOML file of the estimator's training options (TRL field names; the command line wins).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// The training options given on the command line ([`TrainConfig`]'s TOML keys: the
    /// run's `output_dir`, `seed`, `overwrite_output_dir`, `max_prompt_length` and the
    /// estimator's training), over Appendix K's defaults and the `--config` file's.
    #[arg(skip)]
    pub options: toml::Table,
}

/// The run's options: Appendix K's defaults ([`estimator_defaults`], the output directory
/// [`DEFAULT_OUTPUT_DIR`]), overridden by the `--config` file's, overridden by those given on
/// the command line (`args.options`).
///
/// # Errors
/// An unreadable or invalid file, an option out of range.
pub fn resolve(args: &DidEntropyArgs) -> crate::Result<TrainConfig> {
    merge_onto(
        &estimator_defaults(Path::new(DEFAULT_OUTPUT_DIR)),
        args.config.as_deref(),
        &args.options,
    )
}

/// Runs the pipeline; `progress(stage, done, total)` is called after each prompt.
///
/// # Errors
/// Bad options (a β or objective other than the reference-free `β = 1` in `--config`, greedy
/// decoding with several pairs per prompt, fewer than 2 samples), an earlier run's artifacts in
/// the output directory without `--overwrite-output-dir`, models with different vocabularies,
/// data, model and training errors.
pub fn pipeline(
    args: &DidEntropyArgs,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<DidEntropyReport> {
    pipeline_with(args, resolve(args)?, progress)
}

/// [`pipeline`] with the run's options already resolved ([`resolve`]): the checks of the
/// options and the output directory, then the three steps of [`crate::diag::did_entropy`]
/// (pairs, the estimator's training run, the evaluation), each writing its file.
fn pipeline_with(
    args: &DidEntropyArgs,
    mut config: TrainConfig,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<DidEntropyReport> {
    check_counts(args)?;
    let out = &config.output_dir.clone();
    let est_dir = out.join(ESTIMATOR_DIR);
    let seed = config.seed;
    prepare_output_dir(args, out, config.overwrite_output_dir)?;
    check_estimator_objective(&config.objective)?;
    config.output_dir = est_dir.clone();

    let device = crate::parse_device(&args.device)?;
    let bundle = TokenizerBundle::load(&args.reference)?;
    let (train_prompts, eval_prompts) = read_prompts(args, &bundle, &config)?;

    // Step 1: pairs.
    let pairs = sample_step(
        args,
        &bundle,
        &device,
        (&train_prompts, &eval_prompts),
        seed,
        progress,
    )?;
    let pairs_path = out.join(PAIRS_FILE);
    write_jsonl(&pairs_path, pair_rows(&pairs, &bundle)?)?;

    // Step 2: the estimator π̂ from π_ref, on the sampled token ids.
    let data = pairs_dataset(&pairs, bundle.pad_id(), &pairs_path);
    let summary = train_on(&estimator_run(args, config, &pairs_path), data)?;
    let Some(estimator) = summary.last_checkpoint.clone() else {
        return usage(format!(
            "the estimator's run in {} saved no checkpoint",
            est_dir.display()
        ));
    };

    // Step 3: entropies and β fits on the evaluation prompts.
    let eval = evaluate_step(
        args,
        &estimator,
        &bundle,
        &device,
        &eval_prompts,
        seed,
        progress,
    )?;
    write_jsonl(&out.join(SAMPLES_FILE), eval.samples)?;
    let overall = Overall::of(&eval.prompts)?;
    let report = DidEntropyReport {
        policy: args.policy.clone(),
        reference: args.reference.clone(),
        estimator,
        pairs: pairs.len(),
        decoding: args.decoding,
        train: summary,
        did_entropy: overall.did_entropy,
        reference_entropy: overall.reference_entropy,
        policy_entropy: overall.policy_entropy,
        beta_accuracy: overall.beta_accuracy,
        samples: args.samples,
        beta_samples: args.beta_samples,
        max_new_tokens: args.max_new_tokens,
        seed,
        prompts: eval.prompts,
    };
    write_json(&out.join(REPORT_FILE), &report)?;
    Ok(report)
}

/// Step 1: π and π_ref loaded and checked against the prompts ([`check_pair_models`]), then
/// their pairs on the training prompts (`prompts`: training, evaluation).
fn sample_step(
    args: &DidEntropyArgs,
    bundle: &TokenizerBundle,
    device: &candle_core::Device,
    (train_prompts, eval_prompts): (&[TokenizedPrompt], &[TokenizedPrompt]),
    seed: u64,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<Vec<PromptPair>> {
    let m_pi = load_model(&args.policy, candle_core::DType::F32, device)?;
    let m_ref = load_model(&args.reference, candle_core::DType::F32, device)?;
    check_pair_models(args, [&m_pi, &m_ref], train_prompts, eval_prompts)?;
    let options = PairOptions {
        per_prompt: args.pairs_per_prompt,
        decoding: args.decoding,
        temperature: args.temperature,
        max_new_tokens: args.max_new_tokens,
    };
    let (file, stop) = (&args.prompts, bundle.stop_ids());
    sample_prompt_pairs(
        &m_pi,
        &m_ref,
        train_prompts,
        file,
        &options,
        stop,
        seed,
        progress,
    )
}

/// Step 3: π̂ (the checkpoint `estimator`), π_ref and π loaded, then the entropies and β fits
/// on the evaluation prompts.
fn evaluate_step(
    args: &DidEntropyArgs,
    estimator: &Path,
    bundle: &TokenizerBundle,
    device: &candle_core::Device,
    prompts: &[TokenizedPrompt],
    seed: u64,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> crate::Result<Evaluation> {
    let m_hat = load_model(estimator, candle_core::DType::F32, device)?;
    let m_ref = load_model(&args.reference, candle_core::DType::F32, device)?;
    let m_pi = load_model(&args.policy, candle_core::DType::F32, device)?;
    let models = Models {
        estimator: &m_hat,
        reference: &m_ref,
        policy: &m_pi,
    };
    let options = EvalOptions {
        samples: args.samples,
        beta_samples: args.beta_samples,
        max_new_tokens: args.max_new_tokens,
    };
    let file = args.eval_prompts.as_ref().unwrap_or(&args.prompts);
    let (stop, pad) = (bundle.stop_ids(), bundle.pad_id());
    evaluate(models, prompts, file, &options, stop, pad, seed, progress)
}

/// The sample counts' ranges: `--samples ≥ 2`, `--pairs-per-prompt`, `--beta-samples` and
/// `--max-new-tokens` ≥ 1.
fn check_counts(args: &DidEntropyArgs) -> crate::Result<()> {
    if args.samples < 2 {
        return usage(format!("--samples must be ≥ 2, got {}", args.samples));
    }
    if args.pairs_per_prompt == 0 {
        return usage("--pairs-per-prompt must be ≥ 1");
    }
    if args.beta_samples == 0 || args.max_new_tokens == 0 {
        return usage(format!(
            "need --beta-samples ≥ 1 and --max-new-tokens ≥ 1, got {} and {}",
            args.beta_samples, args.max_new_tokens
        ));
    }
    Ok(())
}

/// Checks the outputs against every input before anything is read or removed, then removes an
/// earlier run's files (with `--overwrite-output-dir`; without it an earlier run is an error)
/// and creates the directory `out`.
fn prepare_output_dir(args: &DidEntropyArgs, out: &Path, overwrite: bool) -> crate::Result<()> {
    crate::outputs::check_output_dir("--output-dir", out)?;
    let files: Vec<(&str, &Path)> = [
        ("--prompts", Some(args.prompts.as_path())),
        ("--eval-prompts", args.eval_prompts.as_deref()),
        ("--config", args.config.as_deref()),
    ]
    .into_iter()
    .filter_map(|(o, p)| Some((o, p?)))
    .collect();
    let inputs = crate::outputs::inputs(
        &files,
        &[("--policy", &args.policy), ("--reference", &args.reference)],
    );
    let outputs = [PAIRS_FILE, SAMPLES_FILE, REPORT_FILE].map(|f| out.join(f));
    crate::outputs::check_written_files(&outputs, &inputs)?;
    let est_dir = out.join(ESTIMATOR_DIR);
    let earlier = [PAIRS_FILE, SAMPLES_FILE, REPORT_FILE, ESTIMATOR_DIR]
        .iter()
        .map(|f| out.join(f))
        .find(|p| p.exists());
    if let Some(p) = earlier {
        if !overwrite {
            return usage(format!(
                "{} exists (an earlier did-entropy run): choose another --output-dir or pass --overwrite-output-dir",
                p.display()
            ));
        }
        // The earlier run's files go now, so none is taken for this run's if it stops early.
        for o in &outputs {
            if o.exists() {
                std::fs::remove_file(o).map_err(|e| crate::Error::io(o, e))?;
            }
        }
        if est_dir.exists() {
            std::fs::remove_dir_all(&est_dir).map_err(|e| crate::Error::io(&est_dir, e))?;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))
}

/// The training prompts and the evaluation prompts (`--eval-prompts`, or the training ones),
/// tokenized with `--max-prompt-length` (keeping their end), each file's counts printed.
fn read_prompts(
    args: &DidEntropyArgs,
    bundle: &TokenizerBundle,
    config: &TrainConfig,
) -> crate::Result<(Vec<TokenizedPrompt>, Vec<TokenizedPrompt>)> {
    let limit = Limit::from_count(config.max_prompt_length).0;
    let read = |f: &Path| -> crate::Result<Vec<TokenizedPrompt>> {
        let d = load_prompts(bundle, f, limit, false)?;
        report_stats(f, &d.stats, None);
        Ok(d.examples
            .into_iter()
            .map(|e| TokenizedPrompt {
                line: e.line,
                prompt: e.value.0.prompt.to_json(),
                ids: e.value.1,
            })
            .collect())
    };
    let train = read(&args.prompts)?;
    let eval = match &args.eval_prompts {
        Some(f) => read(f)?,
        None => train.clone(),
    };
    Ok((train, eval))
}

/// π and π_ref share one vocabulary, and every sampling stage's size fits both (checked before
/// the first is run; π̂ has π_ref's shape).
fn check_pair_models(
    args: &DidEntropyArgs,
    [m_pi, m_ref]: [&Model; 2],
    train: &[TokenizedPrompt],
    eval: &[TokenizedPrompt],
) -> crate::Result<()> {
    if m_pi.config().vocab_size != m_ref.config().vocab_size {
        return usage(format!(
            "--policy and --reference must share one tokenizer (vocabularies of {} and {})",
            m_pi.config().vocab_size,
            m_ref.config().vocab_size
        ));
    }
    let [lt, le] = [train, eval].map(|d| d.iter().map(|p| p.ids.len()).max().unwrap_or(0));
    for (m, dir) in [(m_pi, &args.policy), (m_ref, &args.reference)] {
        for (option, n, l) in [
            ("--pairs-per-prompt", args.pairs_per_prompt, lt),
            ("--samples", args.samples, le),
            ("--beta-samples", args.beta_samples, le),
        ] {
            check_sampling_options(m, dir, option, n, l, args.max_new_tokens)?;
        }
    }
    Ok(())
}

/// The estimator's training run: `dpo` from π_ref on the pairs file, on `--device`.
fn estimator_run(args: &DidEntropyArgs, config: TrainConfig, pairs_path: &Path) -> Resolved {
    Resolved {
        config,
        record: RunRecord {
            command: "dpo".into(),
            model: args.reference.clone(),
            ref_model: None,
            data: pairs_path.to_path_buf(),
            // Trained on sampled token ids: no text is tokenized.
            settings: RunSettings {
                placement: Placement {
                    device: args.device.clone(),
                    ..Placement::default()
                },
                ..RunSettings::default()
            },
        },
        resume: None,
        config_file: args.config.clone(),
    }
}

/// `did-entropy`: the pipeline with progress bars, then its table (`m`: the subcommand's
/// matches, which tell the options given from the defaults).
pub fn run(c: &DidEntropyCommand, m: &ArgMatches) -> Result<()> {
    use difinfo::beta_accuracy::BetaFit;
    refuse_hidden("did-entropy", NOT_READ, m)?;
    let a = DidEntropyArgs {
        options: command_line_table(&c.options, m)?,
        ..c.args.clone()
    };
    let config = resolve(&a)?;
    let out = config.output_dir.clone();
    let mut bar: Option<(Stage, indicatif::ProgressBar)> = None;
    let r = pipeline_with(&a, config, &mut |stage, done, total| {
        if bar.as_ref().map(|b| b.0) != Some(stage) {
            if let Some((_, b)) = bar.take() {
                b.finish_and_clear();
            }
            let what = match stage {
                Stage::Pairs => "pairs",
                Stage::Evaluate => "entropies",
            };
            bar = Some((stage, progress(total as u64, what)));
        }
        if let Some((_, b)) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some((_, b)) = bar {
        b.finish_and_clear();
    }
    println!("{}", r.train.line());
    println!("| line | H(π̂) DID | ± | H(π_ref) | ± | H(π) | ± | β̂ |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &r.prompts {
        let beta = match p.beta.fit {
            BetaFit::Determined(l) => format!("{:.4}", l.slope),
            BetaFit::Undetermined => "undetermined".into(),
        };
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {beta} |",
            p.line,
            p.did_entropy.entropy,
            p.did_entropy.stderr,
            p.reference_entropy.entropy,
            p.reference_entropy.stderr,
            p.policy_entropy.entropy,
            p.policy_entropy.stderr
        );
    }
    let (d, rf, pi) = (r.did_entropy, r.reference_entropy, r.policy_entropy);
    println!(
        "DID entropy H(π̂): {:.4} ± {:.4} nats; H(π_ref): {:.4} ± {:.4}; H(π): {:.4} ± {:.4} ({} prompt(s), {} samples each)",
        d.entropy, d.stderr, rf.entropy, rf.stderr, pi.entropy, pi.stderr, r.prompts.len(), r.samples
    );
    match &r.beta_accuracy {
        Some(b) => println!(
            "β-accuracy of π̂: {:.4} over {} determined prompt(s) ({} undetermined)",
            b.accuracy, b.determined, b.undetermined
        ),
        None => println!(
            "β-accuracy of π̂: undetermined (no prompt's {} samples determine β)",
            r.beta_samples
        ),
    }
    eprintln!("wrote {}", out.join(REPORT_FILE).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: DidEntropyCommand,
    }

    /// The estimator's options are the training commands' with Appendix K's defaults: shown in
    /// the help, kept unless given, the given ones winning over the `--config` file's.
    #[test]
    fn estimator_options_default_to_appendix_k() {
        let help = Cli::command().render_long_help().to_string();
        for shown in [
            "[default: rmsprop]",
            "[default: constant_with_warmup]",
            "[default: 150]",
        ] {
            assert!(help.contains(shown), "{shown} not in {help}");
        }
        assert!(!help.contains("--ref-batch-size"), "{help}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.toml");
        std::fs::write(&f, "learning_rate = 1e-4\nwarmup_steps = 3\n").unwrap();
        let argv = [
            "x",
            "--policy",
            "p",
            "--reference",
            "r",
            "--prompts",
            "q",
            "--config",
            f.to_str().unwrap(),
            "--learning-rate",
            "3e-3",
            "--seed",
            "5",
        ];
        let m = Cli::command().try_get_matches_from(argv).unwrap();
        let c = Cli::from_arg_matches(&m).unwrap().c;
        let a = DidEntropyArgs {
            options: command_line_table(&c.options, &m).unwrap(),
            ..c.args
        };
        let config = resolve(&a).unwrap();
        let k = estimator_defaults(Path::new(DEFAULT_OUTPUT_DIR));
        assert_eq!(config.learning_rate, 3e-3);
        assert_eq!(config.warmup_steps, 3);
        assert_eq!(config.seed, 5);
        assert_eq!(
            (
                config.optim,
                config.gradient_accumulation_steps,
                &config.output_dir
            ),
            (k.optim, k.gradient_accumulation_steps, &k.output_dir)
        );
    }
}
