//! The training commands' shared part (`sft`, `dpo`, and `did-entropy`'s estimator): TRL-style
//! options (TRL's config field names with dashes), a TOML config file under them (the command
//! line wins), TRL-exact tokenization of the data, the training loop with a progress bar, and a
//! summary.
//!
//! Option resolution, lowest to highest: the command's defaults (TRL's `DPOConfig` /
//! `SFTConfig`), the `--config` file (or, with `--resume`, the run's saved
//! `train_config.toml`), the options given on the command line. The resolved options are saved
//! in the run directory as `train_config.toml` / `.json`; the model, data and tokenization
//! settings as `run_args.json`, so `--resume RUN_DIR` needs nothing else.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Args};
use serde::Serialize;

use crate::io::write_bytes as write_file;
use crate::pretrained::load_model;
use crate::train::adapter::TrainModel;
use crate::train::config::{as_typed, merge_onto, CONFIG_TOML};
use crate::train::dataset::load_dataset;
use crate::train::output_dir::{check_fresh_output_dir, RUN_FILES};
use crate::train::{Dataset, Error, TrainConfig, Trainer};
use difinfo::objective::Rule;

use crate::commands::shared::{
    accept_counts, load_bundle_with, main_process, progress_bar, report_provenance, usage,
};
use crate::train::run::{
    locate_resume, Resolved, RunFingerprint, RunLock, RunRecord, RunSettings, RunSummary, SavedRun,
    RUN_RECORD, SUMMARY_FILE,
};

/// Model, data and run options of `sft` and `dpo` (not training hyper-parameters).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Hugging Face checkpoint directory to train (config.json, safetensors, tokenizer files)
    /// [default: with --resume, the run's]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Training data, JSONL in TRL's standard or conversational format [default: with
    /// --resume, the run's]
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: Option<PathBuf>,
    /// TOML file of training options named as TRL's config fields (`beta = 0.1`,
    /// `learning_rate = 1e-6`, ...); options given on the command line win [default: none;
    /// with --resume, the run's train_config.toml]
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Continue a run from RUN_DIR's latest checkpoint or from a checkpoint-N directory; the
    /// run's saved options, model and data are reused, options given here override them
    /// (e.g. a larger --max-steps) [default: none, a fresh run]
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub settings: RunSettings,
}

/// Training options that only some commands read: the reference pass's (`dpo`, not the
/// reference-free DID estimator), SFT's masking (`sft`) and the reward model's centering
/// (`reward`).
pub(crate) const REFERENCE_OPTIONS: [&str; 6] = [
    "precompute_ref_log_probs",
    "ref_cache_dir",
    "ref_batch_size",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
];
/// See [`REFERENCE_OPTIONS`].
pub(crate) const SFT_OPTIONS: [&str; 1] = ["completion_only_loss"];
/// See [`REFERENCE_OPTIONS`]: the reward model's centering (`reward`).
pub(crate) const REWARD_OPTIONS: [&str; 1] = ["center_rewards_coefficient"];

/// The training options of a command (clap's `mut_args` on a command that flattens
/// [`TrainConfig`] or [`RunSettings`]): each option's default set from `base`, the command's
/// defaults (the one place they are written: [`TrainConfig`]'s `Default`, or a command's values
/// of it), or from [`RunSettings`]'s `Default`; and the options in `hidden` (groups such as
/// [`REFERENCE_OPTIONS`], whole, so an option added to a group is hidden wherever the group
/// is), which the command does not read, kept out of its help ([`refuse_hidden`] refuses them
/// on its command line).
/// An option left unset (an empty `Option`) keeps its help's `[default: …]` text.
pub(crate) fn training_options(
    base: &TrainConfig,
    hidden: &'static [&'static [&'static str]],
) -> impl FnMut(Arg) -> Arg {
    // Both always serialize to tables (`clap_defaults_are_the_commands_defaults` checks).
    let mut table = toml::Table::try_from(RunSettings::default()).unwrap_or_default();
    table.extend(toml::Table::try_from(base).unwrap_or_default());
    move |a| {
        let id = a.get_id().as_str().to_string();
        let a = match table.get(&id) {
            Some(v) if a.get_default_values().is_empty() => {
                a.default_value(as_typed(v)).required(false)
            }
            _ => a,
        };
        if hidden.iter().any(|g| g.contains(&id.as_str())) {
            a.hide(true)
        } else {
            a
        }
    }
}

/// Refuses an option of `hidden` given on `command`'s command line (an option the command
/// does not read: see [`training_options`]).
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option and the command.
pub(crate) fn refuse_hidden(
    command: &str,
    hidden: &[&[&str]],
    m: &ArgMatches,
) -> crate::Result<()> {
    match hidden
        .iter()
        .flat_map(|g| g.iter())
        .find(|id| from_command_line(m, id))
    {
        Some(id) => usage(format!(
            "--{} is not an option of `{command}`",
            id.replace('_', "-")
        )),
        None => Ok(()),
    }
}

/// The options given on the command line (not defaulted), as a TOML table keyed by
/// `TrainConfig` field names.
pub(crate) fn command_line_table<C: Serialize>(
    args: &C,
    m: &ArgMatches,
) -> crate::Result<toml::Table> {
    let all =
        toml::Table::try_from(args).map_err(|e| Error::InvalidArgument(format!("options: {e}")))?;
    Ok(all
        .into_iter()
        .filter(|(k, _)| m.value_source(k) == Some(ValueSource::CommandLine))
        .collect())
}

/// `base`, overridden by the options of `parsed` given on the command line (`m`).
///
/// # Errors
/// A value that does not serialize (none of the options' types).
fn given_over<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    parsed: &T,
    m: &ArgMatches,
) -> crate::Result<T> {
    let mut table =
        toml::Table::try_from(base).map_err(|e| Error::InvalidArgument(format!("options: {e}")))?;
    table.extend(command_line_table(parsed, m)?);
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| Error::InvalidArgument(format!("options: {e}")))
}

pub(crate) fn from_command_line(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

pub(crate) fn resolve_common(
    command: &str,
    base: &TrainConfig,
    run: &RunArgs,
    ref_model: Option<PathBuf>,
    m: &ArgMatches,
    mut table: toml::Table,
) -> crate::Result<Resolved> {
    let (resume, saved) = match &run.resume {
        Some(p) => {
            let (dir, ckpt) = locate_resume(p)?;
            let rec_path = dir.join(RUN_RECORD);
            let rec: Option<RunRecord> = match std::fs::read_to_string(&rec_path) {
                Ok(t) => Some(serde_json::from_str(&t).map_err(|e| Error::format(&rec_path, e))?),
                Err(_) => None,
            };
            if !from_command_line(m, "output_dir") {
                table.insert(
                    "output_dir".into(),
                    toml::Value::String(dir.display().to_string()),
                );
            }
            (Some((dir, ckpt)), rec)
        }
        None => (None, None),
    };
    if let Some(rec) = &saved {
        if rec.command != command {
            return usage(format!(
                "--resume: that run was made by `{}`, not `{command}`",
                rec.command
            ));
        }
    }
    let config_file = match (&run.config, &resume) {
        (Some(f), _) => Some(f.clone()),
        (None, Some((dir, _))) => Some(dir.join(CONFIG_TOML)).filter(|p| p.exists()),
        (None, None) => None,
    };
    let config = match (&run.config, &config_file) {
        // A resume's saved options are its base, not a file of options given: a key it holds
        // was not given (an objective option the objective does not read is refused only
        // when given).
        (None, Some(saved)) => merge_onto(&TrainConfig::from_toml_file(saved)?, None, &table)?,
        _ => merge_onto(base, config_file.as_deref(), &table)?,
    };
    // The output directory is named where it came from (before: always `--output-dir`).
    let out_option = match (&run.config, &resume) {
        _ if from_command_line(m, "output_dir") => "--output-dir".to_string(),
        (_, Some(_)) => "--resume".to_string(),
        (Some(f), None) if config.output_dir != base.output_dir => {
            format!("{}: output_dir =", f.display())
        }
        _ => "the default --output-dir".to_string(),
    };
    crate::outputs::check_output_dir(&out_option, &config.output_dir)?;
    let pick =
        |given: &Option<PathBuf>, saved: Option<&PathBuf>, what: &str| -> crate::Result<PathBuf> {
            match (given, saved) {
                (Some(p), _) => Ok(p.clone()),
                (None, Some(p)) => Ok(p.clone()),
                (None, None) => usage(format!(
                    "--{what} is required (or --resume a run that recorded it)"
                )),
            }
        };
    // A recorded file that is gone is named, not replaced by whatever the path finds now.
    let recorded = |given: bool, p: &Path, what: &str| -> crate::Result<()> {
        match (&resume, given || p.exists()) {
            (Some((dir, _)), false) => Err(Error::ResumeChanged {
                path: p.to_path_buf(),
                what: format!(
                    "(the run's --{what}, recorded in {}) no longer exists; give --{what} to \
                     say where it is now",
                    dir.join(RUN_RECORD).display()
                ),
            }),
            _ => Ok(()),
        }
    };
    let model = pick(&run.model, saved.as_ref().map(|r| &r.model), "model")?;
    recorded(run.model.is_some(), &model, "model")?;
    let data = pick(&run.data, saved.as_ref().map(|r| &r.data), "data")?;
    recorded(run.data.is_some(), &data, "data")?;
    let settings = match &saved {
        // The resumed run's settings, overridden by those given on the command line.
        Some(rec) => given_over(&rec.settings, &run.settings, m)?,
        None => run.settings.clone(),
    };
    let ref_given = ref_model.is_some();
    let record = RunRecord {
        command: command.to_string(),
        model,
        ref_model: ref_model.or_else(|| saved.as_ref().and_then(|r| r.ref_model.clone())),
        data,
        settings,
    };
    if let Some(d) = &record.ref_model {
        recorded(ref_given, d, "ref-model")?;
    }
    Ok(Resolved {
        config,
        record,
        resume: resume.map(|(_, c)| c),
        config_file,
    })
}

pub(crate) fn r_report(r: &RunRecord) -> PathBuf {
    r.settings.invalid.report_for(&r.data)
}

/// One logged record as a line (`step 10: loss 0.6931 grad_norm …`).
pub fn format_record(rec: &[(String, f64)]) -> String {
    let mut s = String::new();
    for (k, v) in rec {
        if !s.is_empty() {
            s.push(' ');
        }
        if k == "step" {
            s.push_str(&format!("step {v}:"));
        } else if k == "learning_rate" {
            s.push_str(&format!("{k} {v:.3e}"));
        } else if k == "tokens_per_second" {
            s.push_str(&format!("{k} {v:.0}"));
        } else {
            s.push_str(&format!("{k} {v:.4}"));
        }
    }
    s
}

/// What a training command holds from its start to its end: the run directory's lock (a
/// second run or resume of the directory is refused meanwhile), the model's fingerprint and
/// its tokenizer.
pub(crate) struct RunStart {
    pub(crate) _lock: Option<RunLock>,
    pub(crate) fingerprint: RunFingerprint,
    pub(crate) bundle: crate::tokenize::TokenizerBundle,
}

/// A training command's first steps: the output directory checked and locked, the run's
/// paths checked, the model fingerprinted, its tokenizer loaded and its provenance reported.
///
/// # Errors
/// An output directory in use or not writable; missing inputs; tokenizer errors.
pub(crate) fn start_run(r: &Resolved) -> crate::Result<RunStart> {
    crate::outputs::check_output_dir("--output-dir", &r.config.output_dir)?;
    let _lock = lock_run(&r.config.output_dir)?;
    check_run_paths(r)?;
    let fingerprint = run_fingerprint(r)?;
    let bundle = load_bundle_with(
        &r.record.model,
        r.record.settings.tokenizer.tokenizer_compat,
    )?;
    report_provenance(&bundle);
    Ok(RunStart {
        _lock,
        fingerprint,
        bundle,
    })
}

/// Runs a resolved `sft` / `dpo` command to the end.
///
/// # Errors
/// Data, model, configuration errors; a non-finite loss or gradient (the message names the
/// step and batch; the last good checkpoint is kept).
pub fn train(r: &Resolved) -> crate::Result<RunSummary> {
    let RunStart {
        _lock,
        fingerprint,
        bundle,
    } = start_run(r)?;
    let loaded = load_dataset(&r.config, &r.record, &bundle)?;
    let skip = r.record.settings.invalid.skip_invalid;
    let report = r_report(&r.record);
    accept_counts(
        &r.record.data,
        &loaded.stats,
        &loaded.errors,
        skip,
        main_process().then_some(report.as_path()),
    )?;
    let (data, lines) = (loaded.dataset, loaded.lines);
    // Each example's largest token id and the field holding it: an id beyond the model's
    // vocabulary is reported at its example (file:line: field) and with the tokenizer.
    let largest: Vec<(u32, &str)> = match &data.examples {
        crate::train::Examples::Preference(p) => p
            .iter()
            .map(|x| {
                let (c, j) = (max_id(&x.chosen.ids), max_id(&x.rejected.ids));
                if c >= j {
                    (c, "chosen")
                } else {
                    (j, "rejected")
                }
            })
            .collect(),
        crate::train::Examples::Sft(v) => v.iter().map(|x| (max_id(&x.ids), "text")).collect(),
    };
    train_locked(r, data, fingerprint).map_err(|e| {
        if let Error::TokenOutOfVocab { vocab_size, .. } = &e {
            if let Some(i) = largest.iter().position(|&(m, _)| m as usize >= *vocab_size) {
                return crate::error::DataError {
                    file: r.record.data.clone(),
                    line: lines.get(i).copied().unwrap_or(0),
                    field: Some(largest[i].1.into()),
                    message: format!("{}: {e}", r.record.model.join("tokenizer.json").display()),
                }
                .into();
            }
        }
        // A non-finite value's examples by their place in the data file, not only their index.
        if let t @ Error::NonFinite { examples, .. } = &e {
            let at: Vec<String> = examples
                .iter()
                .filter_map(|&i| lines.get(i))
                .map(usize::to_string)
                .collect();
            return Error::InvalidArgument(format!(
                "{t}; the examples are lines {} of {}{}",
                at.join(", "),
                r.record.data.display(),
                objective_overflow_hint(&r.config.objective)
            ));
        }
        e
    })
}

/// The largest id of `ids` (0 for none).
fn max_id(ids: &[u32]) -> u32 {
    ids.iter().copied().max().unwrap_or(0)
}

/// The objective options that can make the loss non-finite, named for a non-finite loss's
/// message: `alpha_divergence` scales the log-ratios u by α − 1 (beyond the compute dtype's
/// range, f32's 3.4e38, that is ∞ · 0 = NaN at u = 0; beyond |(α − 1)u| > 80 the exponent is
/// clamped, as in TRL, and its gradient vanishes), `forward_kl`'s `e^{−u}` overflows f32 once
/// u < −88.
fn objective_overflow_hint(o: &difinfo::objective::Objective) -> String {
    use difinfo::objective::FDivergence;
    match o.f_divergence() {
        FDivergence::AlphaDivergence => {
            let a = o.f_alpha_divergence_coef();
            // As typed: 1e300, not its 301 digits.
            let a = if a.abs() >= 1e6 || (a != 0.0 && a.abs() < 1e-4) {
                format!("{a:e}")
            } else {
                a.to_string()
            };
            format!(
                "; the objective's --f-divergence-type alpha_divergence scales the log-ratios by \
             α − 1 with --f-alpha-divergence-coef {a}: beyond the compute dtype's range (f32: \
             3.4e38) that is NaN, and beyond |(α − 1)·u| > 80 the score is clamped and its \
             gradient vanishes; choose α near 1 (f-DPO uses α ∈ (0, 1))"
            )
        }
        FDivergence::ForwardKl => "; the objective's --f-divergence-type forward_kl computes \
             e^{−u} of the log-ratios u, which overflows f32 once u < −88"
            .to_string(),
        _ => String::new(),
    }
}

/// [`train`] on a dataset already tokenized (e.g. sampled token ids, as `did-entropy` trains
/// its estimator on); `r.record.data` is only recorded.
///
/// # Errors
/// See [`train`].
pub fn train_on(r: &Resolved, data: Dataset) -> crate::Result<RunSummary> {
    let _lock = lock_run(&r.config.output_dir)?;
    let fingerprint = run_fingerprint(r)?;
    train_locked(r, data, fingerprint)
}

/// The fingerprint of the run's model ([`RunFingerprint`]); on `--resume`, checked against
/// the one the run recorded in its `run_args.json` (runs saved before fingerprints were
/// recorded are not checked).
///
/// # Errors
/// [`Error::ResumeChanged`] naming the file that changed; I/O errors.
pub(crate) fn run_fingerprint(r: &Resolved) -> crate::Result<RunFingerprint> {
    let now = RunFingerprint::of(&r.record.model, r.config.memory.use_peft)?;
    if let Some(ck) = &r.resume {
        let (dir, _) = locate_resume(ck)?;
        let rec = dir.join(RUN_RECORD);
        let saved: Option<SavedRun> = match std::fs::read_to_string(&rec) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| Error::format(&rec, e))?),
            Err(_) => None,
        };
        if let Some(fp) = saved.and_then(|s| s.fingerprint) {
            fp.check(&now, &r.record.model, &rec)?;
        }
    }
    Ok(now)
}

/// The run directory's lock, taken by the main process only (the other ranks write nothing
/// there).
///
/// # Errors
/// See [`RunLock::acquire`].
pub(crate) fn lock_run(dir: &Path) -> crate::Result<Option<RunLock>> {
    main_process().then(|| RunLock::acquire(dir)).transpose()
}

/// [`train_on`] with the run directory locked and the model's fingerprint taken.
fn train_locked(
    r: &Resolved,
    data: Dataset,
    fingerprint: RunFingerprint,
) -> crate::Result<RunSummary> {
    let c = &r.config;
    let main = main_process();
    announce(r);
    let (device, dtype) = r.record.settings.placement.parse()?;
    let mut m = load_model(&r.record.model, dtype, &device)?;
    if r.record.settings.bf16 {
        m.set_compute_dtype(candle_core::DType::BF16)?;
    }
    c.memory.apply_to(&mut m, c.seed)?;
    let model = TrainModel::new(m, r.record.model.clone(), dtype);
    // TR-DPO holds its reference: TRL's ref_model, or the policy's checkpoint loaded again.
    let bf16 = r.record.settings.bf16;
    let synced = match (c.sync_ref_model, &r.record.ref_model) {
        (false, _) => None,
        (true, dir) => {
            let dir = dir.as_ref().unwrap_or(&r.record.model);
            if main {
                eprintln!("reference model (synced, TR-DPO): {}", dir.display());
            }
            Some(load_reference(dir, &model, dtype, &device, bf16)?)
        }
    };
    let trainer = match &r.resume {
        Some(ck) => {
            if main {
                eprintln!("resuming from {}", ck.display());
            }
            Trainer::resume(&model, c.clone(), data, ck)?
        }
        None if synced.is_some() => Trainer::new(&model, c.clone(), data)?,
        None => match (&r.record.ref_model, c.objective.needs_reference()) {
            (Some(dir), true) => {
                let reference =
                    load_reference(dir, &model, dtype, &device, r.record.settings.bf16)?;
                if main {
                    eprintln!("reference model: {}", dir.display());
                }
                Trainer::with_reference(&model, &reference, c.clone(), data)?
            }
            (Some(dir), false) => {
                if main {
                    eprintln!(
                        "warning: --ref-model {} is not used: the objective reads no reference",
                        dir.display()
                    );
                }
                Trainer::new(&model, c.clone(), data)?
            }
            (None, _) => Trainer::new(&model, c.clone(), data)?,
        },
    };
    let trainer = match &synced {
        Some(reference) => trainer.with_synced_reference(reference)?,
        None => trainer,
    };
    let params = model.model.num_parameters();
    drive(r, &model, params, trainer, fingerprint)
}

/// The configuration's warnings and where the options came from (the main process only).
pub(crate) fn announce(r: &Resolved) {
    if !main_process() {
        return;
    }
    for w in r.config.warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(f) = r.config_file.as_ref() {
        eprintln!("options from {} (command-line options win)", f.display());
    }
}

/// Runs `trainer` (over `model`, `num_parameters` weights in all) to the end: the run record,
/// the progress bar and the logged records, the summary file.
///
/// # Errors
/// The training loop's; I/O errors.
pub(crate) fn drive<M: crate::train::PolicyModel + ?Sized>(
    r: &Resolved,
    model: &M,
    num_parameters: usize,
    mut trainer: Trainer<'_, M>,
    fingerprint: RunFingerprint,
) -> crate::Result<RunSummary> {
    let c = &r.config;
    let main = main_process();
    let out = c.output_dir.clone();
    let saved = SavedRun {
        record: r.record.with_absolute_paths(),
        fingerprint: Some(fingerprint),
    };
    let rec_json =
        serde_json::to_string_pretty(&saved).map_err(|e| Error::format(out.join(RUN_RECORD), e))?;
    if main {
        write_file(&out.join(RUN_RECORD), rec_json.as_bytes())?;
    }
    let trainable: usize = model.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    let world = crate::dist::world();
    if world.world_size() > 1 && main {
        eprintln!(
            "data parallel over {} ranks ({}): {} examples per micro-batch, {} per optimizer step",
            world.world_size(),
            world.engine(),
            c.per_device_train_batch_size * world.world_size(),
            c.per_device_train_batch_size * world.world_size() * c.gradient_accumulation_steps
        );
    }
    if main {
        eprintln!(
            "{}: {} examples, {} parameters ({trainable} trainable), {}, from step {} to {} → {}",
            r.record.command,
            trainer_len(&trainer),
            num_parameters,
            match trainer.objective().rule() {
                // A reward model's loss has no β.
                Rule::Reward => "Bradley–Terry loss".to_string(),
                _ => format!(
                    "{} (β = {})",
                    trainer.objective().label(),
                    trainer.objective().beta()
                ),
            },
            trainer.global_step(),
            trainer.total_steps(),
            out.display()
        );
    }
    let pb = if main {
        progress_bar(
            trainer.total_steps() as u64,
            trainer.global_step() as u64,
            r.record.command.as_str(),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let start_step = trainer.global_step();
    let t0 = Instant::now();
    let result = loop {
        match trainer.train_step() {
            Ok(None) => break Ok(()),
            Ok(Some(rep)) => {
                pb.set_position(rep.step as u64);
                if let Some(rec) = rep.logged.as_ref().filter(|_| main) {
                    let line = format_record(rec);
                    if pb.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        pb.println(line);
                    }
                }
                pb.set_message(format!("loss {:.4}", rep.loss));
            }
            Err(e) => break Err(e),
        }
    };
    pb.finish_and_clear();
    result?;
    let seconds = t0.elapsed().as_secs_f64();
    // The metrics files are rank 0's.
    let final_metrics = match main {
        true => trainer.metrics().read()?.pop().unwrap_or_default(),
        false => Default::default(),
    };
    let st = trainer.state();
    let pg = trainer.objective().rule() == Rule::ProjectedGradient;
    let summary = RunSummary {
        objective: trainer.objective().clone(),
        global_step: st.global_step,
        steps_this_run: st.global_step - start_step,
        seconds,
        final_metrics,
        projection_active_steps: pg.then_some(st.projection_active_total),
        projection_active_fraction: pg
            .then(|| st.projection_active_total as f64 / st.global_step.max(1) as f64),
        last_checkpoint: trainer.last_checkpoint().map(Path::to_path_buf),
    };
    if main {
        let js = serde_json::to_string_pretty(&summary)
            .map_err(|e| Error::format(out.join(SUMMARY_FILE), e))?;
        write_file(&out.join(SUMMARY_FILE), js.as_bytes())?;
    }
    Ok(summary)
}

/// TRL's `ref_model`: the checkpoint in `dir`, loaded like the policy; its vocabulary must be
/// the policy's (the log-probs of the same token ids are compared).
pub(crate) fn load_reference(
    dir: &Path,
    policy: &TrainModel,
    dtype: candle_core::DType,
    device: &candle_core::Device,
    bf16: bool,
) -> crate::Result<TrainModel> {
    let mut m = load_model(dir, dtype, device)?;
    let (v_ref, v_pol) = (m.config().vocab_size, policy.model.config().vocab_size);
    if v_ref != v_pol {
        return usage(format!(
            "--ref-model {}: vocabulary of {v_ref} tokens, the policy's has {v_pol}",
            dir.display()
        ));
    }
    if bf16 {
        m.set_compute_dtype(candle_core::DType::BF16)?;
    }
    m.set_padding_free(policy.model.padding_free());
    Ok(TrainModel::new(m, dir.to_path_buf(), dtype))
}

/// What a run checks before any work: the output directory can be made and written; the
/// error report (with `--skip-invalid`) is no input; a fresh run's files in the output
/// directory are no input (a fresh run replaces them); a fresh run does not land on an earlier
/// run ([`check_fresh_output_dir`]).
///
/// # Errors
/// [`Error`] naming the options and paths.
pub(crate) fn check_run_paths(r: &Resolved) -> crate::Result<()> {
    use crate::outputs::{check_output_dir, check_outputs, check_written_files, inputs};
    let out = &r.config.output_dir;
    check_output_dir("--output-dir", out)?;
    let mut files: Vec<(&str, &Path)> = vec![("--data", &r.record.data)];
    if let Some(c) = &r.config_file {
        files.push(("--config", c));
    }
    let mut dirs: Vec<(&str, &Path)> = vec![("--model", &r.record.model)];
    if let Some(d) = &r.record.ref_model {
        dirs.push(("--ref-model", d));
    }
    let ins = inputs(&files, &dirs);
    // The default report (DATA.errors.jsonl) is no input and is written, if at all, right
    // after the data is read; a report given by name is checked like any output.
    if let Some(report) = r.record.settings.invalid.named_report() {
        check_outputs(&[("--error-report", report)], &ins)?;
    }
    if r.resume.is_none() {
        let written: Vec<PathBuf> = RUN_FILES.iter().map(|f| out.join(f)).collect();
        check_written_files(&written, &ins)?;
        check_fresh_output_dir(out, r.config.overwrite_output_dir)?;
    }
    Ok(())
}

pub(crate) fn trainer_len<M: crate::train::PolicyModel + ?Sized>(t: &Trainer<'_, M>) -> usize {
    t.state().permutation.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::dpo::{resolve_dpo, DpoArgs};
    use crate::commands::sft::{resolve_sft, SftArgs};
    use crate::train::run::{dpo_defaults, sft_defaults};
    use clap::{FromArgMatches, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand)]
    #[allow(clippy::large_enum_variant)]
    enum Cmd {
        Dpo(DpoArgs),
        Sft(SftArgs),
    }

    fn parse(args: &[&str]) -> (Cmd, ArgMatches) {
        // As `main` parses: a negative number is a value.
        let cmd = crate::commands::shared::negative_numbers_as_values(
            <Cli as clap::CommandFactory>::command(),
        );
        let m = cmd
            .try_get_matches_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let sub = m.subcommand().unwrap().1.clone();
        (cli.command, sub)
    }

    fn resolve(args: &[&str]) -> crate::Result<Resolved> {
        match parse(args) {
            (Cmd::Dpo(a), m) => resolve_dpo(&a, &m),
            (Cmd::Sft(a), m) => resolve_sft(&a, &m),
        }
    }

    #[test]
    fn clap_defaults_are_the_commands_defaults() {
        let r = resolve(&["dpo", "--model", "m", "--data", "d"]).unwrap();
        assert_eq!(r.config, dpo_defaults());
        let r = resolve(&["sft", "--model", "m", "--data", "d"]).unwrap();
        assert_eq!(r.config, sft_defaults());
        assert_eq!(r.record.settings.placement.dtype, "f32");
    }

    #[test]
    fn command_line_beats_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "beta = 0.5\nlearning_rate = 1e-4\noptim = \"rmsprop\"\nloss_type = \"ipo\"\nmax_steps = 9\n",
        )
        .unwrap();
        let fs = f.to_str().unwrap();
        let r = resolve(&[
            "dpo",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            fs,
            "--beta",
            "0.25",
            "--max-steps",
            "3",
        ])
        .unwrap();
        assert_eq!(r.config.objective.beta(), 0.25);
        assert_eq!(r.config.max_steps, 3);
        assert_eq!(r.config.learning_rate, 1e-4);
        assert_eq!(r.config.optim, crate::train::OptimizerKind::Rmsprop);
        assert_eq!(
            r.config.objective.terms(),
            &[(difinfo::objective::LossType::Ipo, 1.0)]
        );
        assert_eq!(r.config.logging_steps, 10);
        // A file value equal to the default is still overridden only by the command line.
        let r = resolve(&[
            "dpo",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            fs,
            "--learning-rate",
            "1e-6",
        ])
        .unwrap();
        assert_eq!(r.config.learning_rate, 1e-6);
        // sft's own defaults sit under the file.
        std::fs::write(&f, "num_train_epochs = 1.0\n").unwrap();
        let r = resolve(&[
            "sft",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            fs,
            "--completion-only-loss",
            "false",
        ])
        .unwrap();
        assert_eq!(r.config.learning_rate, 2e-5);
        assert_eq!(r.config.num_train_epochs, 1.0);
        assert!(!r.config.completion_only_loss);
    }

    /// Each objective field has one spelling: the option (`--objective`, `--reference-free`,
    /// `--loss-type a,b`, ...) is the config key; the command line wins over the file.
    #[test]
    fn objective_options() {
        use difinfo::objective::{FDivergence, LossType};
        let dpo = |extra: &[&str]| {
            let mut a = vec!["dpo", "--model", "m", "--data", "d"];
            a.extend_from_slice(extra);
            resolve(&a)
        };
        let r = dpo(&["--objective", "dpo-pg"]).unwrap();
        assert_eq!(r.config.objective.rule(), Rule::ProjectedGradient);
        let r = dpo(&["--reference-free"]).unwrap();
        assert!(r.config.objective.is_reference_free());
        assert_eq!(r.config.objective.rule(), Rule::Preference);
        let r = dpo(&["--reference-free", "false"]).unwrap();
        assert!(!r.config.objective.is_reference_free());
        // DPO-PG steps along the NLL projection: a reference-free reward would change nothing.
        assert!(dpo(&["--reference-free", "--objective", "dpo-pg"]).is_err());
        let r = dpo(&["--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"]).unwrap();
        assert_eq!(
            r.config.objective.terms(),
            &[(LossType::Sigmoid, 1.0), (LossType::Sft, 0.5)]
        );
        let r = dpo(&[
            "--loss-type",
            "discopop",
            "--discopop-tau",
            "0.1",
            "--f-divergence-type",
            "alpha_divergence",
            "--f-alpha-divergence-coef",
            "-0.5",
        ])
        .unwrap();
        assert_eq!(r.config.objective.discopop_tau(), 0.1);
        assert_eq!(
            r.config.objective.f_divergence(),
            FDivergence::AlphaDivergence
        );
        assert_eq!(r.config.objective.f_alpha_divergence_coef(), -0.5);
        for bad in [
            &["--loss-type", "ipo", "--loss-weights", "1,2"][..],
            &["--loss-type", "exo_pair"],
            &[
                "--loss-type",
                "bco_pair",
                "--f-divergence-type",
                "js_divergence",
            ],
        ] {
            assert!(dpo(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let fs = f.to_str().unwrap();
        std::fs::write(&f, "objective = \"sft\"\n").unwrap();
        let e = dpo(&["--config", fs]).unwrap_err();
        assert!(e.to_string().contains("difinfo-train sft"), "{e}");
        std::fs::write(
            &f,
            "objective = \"dpo-pg\"\nloss_type = [\"ipo\", \"hinge\"]\nloss_weights = [0.5, 2.0]\n",
        )
        .unwrap();
        let r = dpo(&["--config", fs]).unwrap();
        assert_eq!(r.config.objective.rule(), Rule::ProjectedGradient);
        assert_eq!(
            r.config.objective.terms(),
            &[(LossType::Ipo, 0.5), (LossType::Hinge, 2.0)]
        );
        let r = dpo(&[
            "--config",
            fs,
            "--objective",
            "dpo",
            "--loss-type",
            "robust",
        ]);
        // The file's two weights no longer match the command line's one loss type.
        assert!(r.unwrap_err().to_string().contains("loss_weights"));
        let r = dpo(&[
            "--config",
            fs,
            "--objective",
            "dpo",
            "--loss-weights",
            "1,1",
        ])
        .unwrap();
        assert_eq!(r.config.objective.rule(), Rule::Preference);
        std::fs::write(&f, "betta = 1.0\n").unwrap();
        let e = dpo(&["--config", fs]).unwrap_err();
        assert!(e.to_string().contains("betta"), "{e}");
        // TRL 0.x's rpo_alpha is the sft term: it round-trips as loss_type + loss_weights.
        let r = dpo(&["--rpo-alpha", "0.5"]).unwrap();
        assert_eq!(r.config.objective.sft_weight(), Some(0.5));
        r.config.save(dir.path()).unwrap();
        let back = TrainConfig::from_toml_file(&dir.path().join(CONFIG_TOML)).unwrap();
        assert_eq!(back, r.config);
    }

    #[test]
    fn the_shipped_paper_configs_resolve() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
        let r = resolve(&[
            "sft",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            &format!("{dir}/paper_sft.toml"),
        ])
        .unwrap();
        assert!(!r.config.completion_only_loss);
        assert_eq!(
            r.config.per_device_train_batch_size * r.config.gradient_accumulation_steps,
            256
        );
        let r = resolve(&[
            "dpo",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            &format!("{dir}/paper_dpo.toml"),
        ])
        .unwrap();
        assert_eq!(r.config.optim, crate::train::OptimizerKind::Rmsprop);
        assert_eq!(
            r.config.per_device_train_batch_size * r.config.gradient_accumulation_steps,
            64
        );
        assert_eq!(r.config.warmup_steps, 150);
        let r = resolve(&[
            "dpo",
            "--model",
            "m",
            "--data",
            "d",
            "--config",
            &format!("{dir}/mpo.toml"),
        ])
        .unwrap();
        assert_eq!(r.config.objective.sft_weight(), Some(1.0));
        assert_eq!(r.config.objective.terms().len(), 3);
    }

    /// An objective option out of range is named as it was given: `--beta -1` on the command
    /// line, the file's path for a file's value; options a command does not read are refused.
    #[test]
    fn objective_errors_name_the_option_where_it_was_given() {
        let e = resolve(&["dpo", "--model", "m", "--data", "d", "--beta", "-1"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--beta -1: beta must be finite and positive"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "label_smoothing = 0.7\n").unwrap();
        let fs = f.to_str().unwrap();
        let e = resolve(&["dpo", "--model", "m", "--data", "d", "--config", fs]).unwrap_err();
        assert!(
            e.to_string().contains("c.toml: label_smoothing = 0.7"),
            "{e}"
        );
        let e = resolve(&[
            "sft",
            "--model",
            "m",
            "--data",
            "d",
            "--ref-batch-size",
            "2",
        ]);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("--ref-batch-size is not an option of `sft`"));
        let e = resolve(&[
            "dpo",
            "--model",
            "m",
            "--data",
            "d",
            "--completion-only-loss",
        ]);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("not an option of `dpo`"));
    }

    #[test]
    fn model_and_data_are_required_without_resume() {
        let e = resolve(&["dpo", "--data", "d"]).unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
    }

    #[test]
    fn every_option_shows_its_default_in_help() {
        for sub in ["dpo", "sft"] {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let help = cmd
                .find_subcommand_mut(sub)
                .unwrap()
                .render_help()
                .to_string();
            let mut blocks: Vec<String> = Vec::new();
            for line in help.lines() {
                let t = line.trim_start();
                if t.starts_with("--")
                    || (t.starts_with('-') && t.len() > 1 && !t.starts_with("- "))
                {
                    blocks.push(t.to_string());
                } else if let Some(b) = blocks.last_mut() {
                    b.push(' ');
                    b.push_str(t);
                }
            }
            assert!(blocks.len() > 25, "{help}");
            for b in blocks {
                if b.starts_with("-h") {
                    continue;
                }
                assert!(b.contains("[default:"), "{sub}: no default shown for: {b}");
            }
        }
    }
}
