//! What the subcommands share: the model and tokenization options, loading a model with its
//! tokenized prompts, the checks of outputs and inputs before any work, progress bars, the
//! messages printed about data files, and the command line's handling of negative numbers.
//! Errors reach the process exit as the crate's one [`crate::Error`] (`main` prints them).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::generate::check_sampling_options;
use crate::model::Model;
use crate::outputs::{check_outputs, inputs, Named};
use crate::pretrained::load_model;
use crate::records::{write_error_report, InvalidRecords, PromptExample};
use crate::tokenize::{
    load_prompts, TokenizationRules, TokenizeOptions, TokenizeStats, TokenizedDataset,
    TokenizerBundle,
};
use crate::train::config::Limit;
use crate::train::run::Placement;
use crate::{DataError, Error, Result};
use clap::ValueEnum;

/// Tokenization options of `logps` (TRL's names).
#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Longest prompt + completion in tokens (`none` or 0: no limit); completions are cut to
    /// fit, examples whose prompt alone fills it are dropped.
    #[arg(long, default_value = "1024", value_parser = Limit::parse, allow_negative_numbers = true)]
    pub max_length: Limit,
    /// Longest prompt in tokens (`none` or 0: no limit).
    #[arg(long, default_value = "none", value_parser = Limit::parse, allow_negative_numbers = true)]
    pub max_prompt_length: Limit,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub tokenizer: TokenizationRules,
}

impl TokenizeArgs {
    /// The [`TokenizeOptions`] these options ask for.
    pub fn options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: self.max_length.0,
            max_prompt_length: self.max_prompt_length.0,
            truncation_mode: self.tokenizer.truncation_mode,
            boundary: self.tokenizer.completion_boundary,
        }
    }
}

/// The model a command reads: checkpoint, dtype, device.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer files), or a
    /// GGUF file (converted once into a cache directory; see `convert`).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
}

/// The prompts a sampling command reads (`sample`, `entropy`).
#[derive(clap::Args)]
pub struct PromptArgs {
    /// Prompts (JSONL: `prompt` string or messages, or `messages`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Longest prompt in tokens, keeping its end (`none` or 0: no limit).
    #[arg(long, default_value = "none", value_parser = Limit::parse, allow_negative_numbers = true)]
    pub max_prompt_length: Limit,
}

/// How a sampling command decodes (`sample`, `entropy`, `beta-accuracy`).
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Most new tokens per sample (L); a sample ends earlier at EOS.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Random seed of the samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A tokenized prompt file: each prompt with its token ids.
pub type PromptSet = TokenizedDataset<(PromptExample, Vec<u32>)>;

/// What a command does with a data file just read and tokenized: with `skip_invalid`, its
/// invalid records listed in `report` (when there are any); its counts printed; an error when
/// no example is left ([`require_examples`]).
///
/// # Errors
/// The report cannot be written; no example left.
pub(crate) fn accept_dataset<T>(
    file: &Path,
    ds: &TokenizedDataset<T>,
    skip_invalid: bool,
    report: Option<&Path>,
) -> Result<()> {
    accept_counts(file, &ds.stats, &ds.errors, skip_invalid, report)
}

/// [`accept_dataset`] of a file's counts and invalid records.
///
/// # Errors
/// The report cannot be written; no example left.
pub(crate) fn accept_counts(
    file: &Path,
    stats: &TokenizeStats,
    errors: &[DataError],
    skip_invalid: bool,
    report: Option<&Path>,
) -> Result<()> {
    if let (Some(r), true) = (report, skip_invalid && !errors.is_empty()) {
        write_error_report(r, errors)?;
    }
    report_stats(file, stats, report);
    require_examples(file, stats)
}

/// The tokenizer, the tokenized prompt file (its counts printed; with `skip_invalid`, invalid
/// records listed in `report`) and the model, as `sample` and `entropy` read them.
pub(crate) fn model_and_prompts(
    model: &ModelArgs,
    prompts: &PromptArgs,
    skip_invalid: bool,
    report: Option<&Path>,
) -> Result<(TokenizerBundle, PromptSet, Model)> {
    let (device, dtype) = model.placement.parse()?;
    let bundle = load_bundle(&model.model)?;
    let (file, limit) = (&prompts.prompts, prompts.max_prompt_length.0);
    let ds = load_prompts(&bundle, file, limit, skip_invalid)?;
    accept_dataset(file, &ds, skip_invalid, report)?;
    let m = load_model(&model.model, dtype, &device)?;
    Ok((bundle, ds, m))
}

/// Refuses token ids beyond the model's vocabulary (a tokenizer from another checkpoint),
/// naming the example (`file:line`, field), the tokenizer file, the id and the vocabulary size.
pub(crate) fn check_vocab<'a>(
    model_dir: &Path,
    m: &Model,
    file: &Path,
    ids: impl IntoIterator<Item = (usize, &'a str, &'a [u32])>,
) -> Result<()> {
    for (line, field, ids) in ids {
        if let Err(e) = m.check_token_ids(ids) {
            return Err(DataError {
                file: file.to_path_buf(),
                line,
                field: Some(field.into()),
                message: format!("{}: {e}", model_dir.join("tokenizer.json").display()),
            }
            .into());
        }
    }
    Ok(())
}

/// A prompt file fits the model a command samples: [`check_vocab`] over its prompts, then
/// `n` samples (the option `option`) of up to `max_new_tokens` after its longest prompt within
/// the model's limits ([`check_sampling_options`]).
pub(crate) fn check_prompts_fit(
    model_dir: &Path,
    m: &Model,
    file: &Path,
    ds: &PromptSet,
    (option, n): (&str, usize),
    max_new_tokens: usize,
) -> Result<()> {
    let ids = ds
        .examples
        .iter()
        .map(|e| (e.line, "prompt", &e.value.1[..]));
    check_vocab(model_dir, m, file, ids)?;
    let longest = ds.examples.iter().map(|e| e.value.1.len()).max();
    check_sampling_options(
        m,
        model_dir,
        option,
        n,
        longest.unwrap_or(0),
        max_new_tokens,
    )
}

/// A generation error for the prompt at `file:line`; a size error suggests
/// `--max-prompt-length` and `--max-new-tokens`.
pub(crate) fn at_prompt(file: &Path, line: usize, e: Error) -> Error {
    let (field, message) = match &e {
        Error::TooLarge { .. } => (
            Some("prompt".into()),
            format!("{e}; shorten the prompt (--max-prompt-length) or lower --max-new-tokens"),
        ),
        _ => (None, e.to_string()),
    };
    DataError {
        file: file.to_path_buf(),
        line,
        field,
        message,
    }
    .into()
}

pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    progress_bar(len, 0, what)
}

/// The outputs' checks before any work ([`check_outputs`]): each writable, none an input
/// file (`files`) nor a file of an input checkpoint directory (`checkpoints`).
pub(crate) fn check_paths(
    outputs: &[Named<'_>],
    files: &[Named<'_>],
    checkpoints: &[Named<'_>],
) -> Result<()> {
    check_outputs(outputs, &inputs(files, checkpoints))
}

/// `--out`, and `--error-report` when given with `--skip-invalid` (the default report,
/// DATA.errors.jsonl, is no input and is written, if at all, right after reading the data).
pub(crate) fn outputs_with_report<'a>(
    out: &'a Path,
    invalid: &'a InvalidRecords,
) -> Vec<Named<'a>> {
    let mut v = vec![("--out", out)];
    if let Some(r) = invalid.named_report() {
        v.push(("--error-report", r));
    }
    v
}

/// Converts each GGUF file named by an argument of the command into its cache directory
/// before the command runs, saying so: the loaders would convert it silently
/// ([`crate::gguf_cache::resolve_model`]), and a first conversion takes a while.
pub(crate) fn convert_gguf_arguments(sub: &clap::ArgMatches) -> Result<()> {
    use crate::gguf::is_gguf;
    use crate::gguf_cache::{cache_root, resolve_model_in};
    for id in sub.ids() {
        let Ok(Some(values)) = sub.try_get_raw(id.as_str()) else {
            continue;
        };
        for v in values {
            let path = Path::new(v);
            if !is_gguf(path) {
                continue;
            }
            let dir = resolve_model_in(path, &cache_root()?, &mut |dir| {
                eprintln!(
                    "{}: GGUF file; converting it once into {} (f32)",
                    path.display(),
                    dir.display()
                )
            })?;
            eprintln!("{}: using its conversion {}", path.display(), dir.display());
        }
    }
    Ok(())
}

/// A [`crate::Error::InvalidArgument`] with message `m`.
pub(crate) fn usage<T>(m: impl Into<String>) -> crate::Result<T> {
    Err(crate::Error::InvalidArgument(m.into()))
}

/// Prints which tokenizer pipeline encodes (and the transformers 5 warning) to stderr.
pub fn report_provenance(bundle: &TokenizerBundle) {
    if !main_process() {
        return;
    }
    let p = bundle.provenance();
    eprintln!("{}", p.describe());
    if let Some(w) = p.warning() {
        eprintln!("warning: {w}");
    }
}

/// Whether this process is the main one (rank 0 under a launcher, or the only one): the one
/// that prints, locks a run directory and writes a run's files.
pub fn main_process() -> bool {
    crate::dist::world().rank() == 0
}

/// Prints tokenization counts (and the prefix-mismatch warning) to stderr (the main process
/// only).
pub fn report_stats(file: &Path, stats: &TokenizeStats, report: Option<&Path>) {
    if !main_process() {
        return;
    }
    eprintln!(
        "{}: {} records, {} kept, {} dropped (prompt fills max_length), {} prompts truncated, {} with completions truncated, {} invalid",
        file.display(),
        stats.total,
        stats.kept,
        stats.dropped_prompt_too_long,
        stats.truncated_prompts,
        stats.truncated_completions,
        stats.invalid
    );
    if let (Some(r), true) = (report, stats.invalid > 0) {
        eprintln!("invalid records listed in {}", r.display());
    }
    if stats.prefix_mismatches > 0 {
        eprintln!(
            "warning: in {} example(s) (first at {}:{}) the prompt's tokens are not a prefix of the prompt+completion tokens; \
             the completion starts at their common prefix (see --completion-boundary)",
            stats.prefix_mismatches,
            file.display(),
            stats.first_mismatch_line.unwrap_or(0)
        );
    }
}

/// A progress bar with ETA on stderr when it is a terminal (hidden otherwise), labelled `what`,
/// starting at `pos` of `len`.
pub fn progress_bar(len: u64, pos: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb.set_position(pos);
    pb
}

/// Loads a checkpoint directory's tokenizer files, printing what their absence changes
/// ([`TokenizerBundle::warnings`]).
///
/// # Errors
/// See [`TokenizerBundle::load`].
pub fn load_bundle(dir: &Path) -> crate::Result<TokenizerBundle> {
    load_bundle_with(dir, crate::provenance::TokenizerCompat::default())
}

/// [`load_bundle`] with the tokenizer pipeline chosen by `compat` (`--tokenizer-compat`).
///
/// # Errors
/// See [`TokenizerBundle::load_with`].
pub fn load_bundle_with(
    dir: &Path,
    compat: crate::provenance::TokenizerCompat,
) -> crate::Result<TokenizerBundle> {
    let b = TokenizerBundle::load_with(dir, compat)?;
    for w in b.warnings().iter().filter(|_| main_process()) {
        eprintln!("warning: {w}");
    }
    Ok(b)
}

/// A data file that left no example: an error naming the file and why (no records, all
/// invalid, all dropped), the same for every command (TRL refuses an empty dataset).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] when `stats.kept` is 0.
pub fn require_examples(file: &Path, stats: &TokenizeStats) -> crate::Result<()> {
    if stats.kept > 0 {
        return Ok(());
    }
    let why = if stats.total == 0 {
        "no records (the file is empty)".to_string()
    } else if stats.invalid == stats.total {
        format!(
            "no records left: all {} are invalid (see the error report)",
            stats.total
        )
    } else {
        format!(
            "no example left of {} records: {} dropped because the prompt alone fills --max-length, {} invalid",
            stats.total, stats.dropped_prompt_too_long, stats.invalid
        )
    };
    Err(crate::Error::InvalidArgument(format!(
        "{}: {why}",
        file.display()
    )))
}

/// `cmd` with every numeric option (and every subcommand's) taking a value that starts with a
/// hyphen, so `--beta -1` and `--adam-epsilon -1e-8` reach the range check ("beta must be …
/// positive") instead of clap's "unexpected argument '-1'" (clap's own negative-number test
/// misses exponents). A flag mistaken for the value (`--seed --model`) fails to parse as a
/// number, and that message names the option too.
pub fn negative_numbers_as_values(cmd: clap::Command) -> clap::Command {
    use std::any::TypeId;
    let numeric = [
        TypeId::of::<f64>(),
        TypeId::of::<f32>(),
        TypeId::of::<i64>(),
        TypeId::of::<i32>(),
        TypeId::of::<u64>(),
        TypeId::of::<u32>(),
        TypeId::of::<usize>(),
    ];
    cmd.mut_args(|a| {
        let t = a.get_value_parser().type_id();
        if numeric.iter().any(|n| t == *n) {
            a.allow_hyphen_values(true)
        } else {
            a
        }
    })
    .mut_subcommands(negative_numbers_as_values)
}

/// A [`crate::tokenize::TruncationMode`]'s command-line name.
pub fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}
