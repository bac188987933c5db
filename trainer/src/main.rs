//! `difinfo-train`: command-line front end of difinfo-trainer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Tensor};
use clap::{Parser, Subcommand};
use rand::SeedableRng;
use serde_json::json;

use difinfo_trainer::batch::{Batch, Sequence};
use difinfo_trainer::checkpoint::{load_model, parse_dtype, write_json, write_jsonl};
use difinfo_trainer::config::Architecture;
use difinfo_trainer::data::PromptExample;
use difinfo_trainer::data::{default_report_path, write_error_report};
use difinfo_trainer::generate::{generate, SamplingParams};
use difinfo_trainer::init::{arch_config, init_checkpoint, size_config, ModelSize, BUILTIN_CORPUS};
use difinfo_trainer::io::{check_outputs, inputs, Named};
use difinfo_trainer::logps::preference_logps;
use difinfo_trainer::model::Model;
use difinfo_trainer::provenance::TokenizerCompat;
use difinfo_trainer::tokenize::{
    load_preferences, load_prompts, CompletionBoundary, TokenizeOptions, TokenizedDataset,
    TokenizerBundle, TruncationMode,
};
use difinfo_trainer::train::cli::{load_bundle, report_stats, require_examples};
use difinfo_trainer::{parse_device, DataError, Error, Result};

#[derive(Parser)]
#[command(
    name = "difinfo-train",
    version,
    about = "Hugging Face checkpoints, TRL-exact tokenization and log-probs on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A length limit: a positive integer, or `none`.
#[derive(Clone, Copy, Debug)]
struct Limit(Option<usize>);

/// Parses a [`Limit`].
fn parse_limit(s: &str) -> std::result::Result<Limit, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    match s.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("expected a positive integer or `none`, got `{s}`")),
        Ok(n) => Ok(Limit(Some(n))),
    }
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// Longest prompt + completion in tokens (`none`: no limit); completions are cut to fit,
    /// examples whose prompt alone fills it are dropped.
    #[arg(long, default_value = "1024", value_parser = parse_limit, allow_negative_numbers = true)]
    max_length: Limit,
    /// Longest prompt in tokens (`none`: no limit).
    #[arg(long, default_value = "none", value_parser = parse_limit, allow_negative_numbers = true)]
    max_prompt_length: Limit,
    /// Which end of an over-long prompt to keep.
    #[arg(long, value_enum, default_value_t = TruncationMode::KeepStart)]
    truncation_mode: TruncationMode,
    /// Where a completion starts: the common token prefix of prompt and prompt+completion, or
    /// the prompt's token count (TRL's literal slice).
    #[arg(long, value_enum, default_value_t = CompletionBoundary::CommonPrefix)]
    completion_boundary: CompletionBoundary,
    /// Tokenizer pipeline: the checkpoint's tokenizer.json as saved, or what transformers 5
    /// builds for its tokenizer_class (TRL's ids under transformers 5).
    #[arg(long, value_enum, default_value_t = TokenizerCompat::TokenizerJson)]
    tokenizer_compat: TokenizerCompat,
}

impl TokenizeArgs {
    fn options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: self.max_length.0,
            max_prompt_length: self.max_prompt_length.0,
            truncation_mode: self.truncation_mode,
            boundary: self.completion_boundary,
        }
    }
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer files), or a
    /// GGUF file (converted once into a cache directory; see `convert`).
    #[arg(long)]
    model: PathBuf,
    /// Parameter dtype: f32, bf16, f16 or f64 (bf16 on CPU computes matmuls through f32: slow).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; `dpo` carries TRL's DPOConfig loss fields
enum Command {
    /// Create a random-weight checkpoint (Llama by default) with a BPE tokenizer trained on a corpus.
    Init {
        /// Model size: tiny (~1M parameters), small (~20M) or smollm2-135m (SmolLM2-135M's
        /// configuration, 134.5M).
        #[arg(long, value_enum, default_value_t = ModelSize::Tiny)]
        size: ModelSize,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Tokenizer training corpus (text, one sequence per line) [default: built-in corpus].
        #[arg(long)]
        tokenizer_corpus: Option<PathBuf>,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Architecture (model_type) of the random model.
        #[arg(long, value_enum, default_value_t = Architecture::Llama)]
        arch: Architecture,
        /// Replace the checkpoint in a non-empty --out (its stale shards, optimizer and trainer
        /// state are removed; other files stay) instead of refusing
        #[arg(long)]
        overwrite: bool,
    },
    /// Convert a GGUF file (llama.cpp, Ollama; Llama-family or Qwen2, any quantization candle
    /// dequantizes) into a Hugging Face checkpoint directory: config.json, model.safetensors,
    /// tokenizer.json and tokenizer_config.json rebuilt from its metadata, generation_config.json.
    Convert {
        /// The GGUF file.
        #[arg(long)]
        gguf: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights: f32 (lossless for every GGUF quantization) or bf16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
    },
    /// Write chosen/rejected completion log-probs of a preference dataset as JSONL.
    Logps {
        #[command(flatten)]
        model: ModelArgs,
        /// Preference data (JSONL: prompt, chosen, rejected; strings or message lists).
        #[arg(long)]
        data: PathBuf,
        /// Output JSONL (one object per kept example).
        #[arg(long)]
        out: PathBuf,
        /// Preference pairs per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        tok: TokenizeArgs,
        /// Skip invalid records (counted, and listed in the error report) instead of failing.
        #[arg(long)]
        skip_invalid: bool,
        /// Error report for --skip-invalid [default: DATA.errors.jsonl].
        #[arg(long)]
        error_report: Option<PathBuf>,
    },
    /// Sample completions of prompts, with their summed log-probs under the model.
    Sample {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompts (JSONL: `prompt` string or messages, or `messages`).
        #[arg(long)]
        prompts: PathBuf,
        /// Samples per prompt.
        #[arg(long, default_value_t = 4)]
        n: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Nucleus (top-p) mass in (0, 1]; 1 disables it.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Most new tokens per sample.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Longest prompt in tokens, keeping its end (`none`: no limit).
        #[arg(long, default_value = "none", value_parser = parse_limit, allow_negative_numbers = true)]
        max_prompt_length: Limit,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output JSONL (one object per sample).
        #[arg(long)]
        out: PathBuf,
        /// Skip invalid records instead of failing.
        #[arg(long)]
        skip_invalid: bool,
        /// Error report for --skip-invalid [default: PROMPTS.errors.jsonl].
        #[arg(long)]
        error_report: Option<PathBuf>,
    },
    /// Measure forward (and forward+backward) throughput in tokens/s.
    BenchForward {
        /// Checkpoint directory; without it a random model of --size is built in memory.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Model size when --model is absent.
        #[arg(long, value_enum, default_value_t = ModelSize::Small)]
        size: ModelSize,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Timed iterations.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Parameter dtype.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Supervised fine-tuning (TRL SFTTrainer options): NLL of completions or of whole sequences.
    Sft(difinfo_trainer::train::cli::SftArgs),
    /// Preference optimization (TRL DPOTrainer options): every TRL loss type and combination,
    /// reference-free, a separate reference model, DPO-PG.
    Dpo(difinfo_trainer::train::cli::DpoArgs),
    /// Draw a run's metrics.jsonl (loss, rewards, log-probs, grad norm, learning rate) into a PNG.
    Plot(difinfo_trainer::train::plot::PlotArgs),
    /// Tokens/s and peak memory of full training steps (DPO, DPO-PG), as a table.
    Bench(difinfo_trainer::train::bench::BenchArgs),
    /// Monte Carlo sequence entropy per prompt (Appendix K): pure ancestral sampling over the
    /// whole vocabulary, stopping at EOS or after --max-new-tokens; with standard errors and the
    /// mean exact next-token entropy.
    Entropy {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompts (JSONL: `prompt` string or messages, or `messages`).
        #[arg(long)]
        prompts: PathBuf,
        /// Samples per prompt (K ≥ 2).
        #[arg(long, default_value_t = 32)]
        samples: usize,
        /// Most new tokens per sample (L).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature T > 0: the entropy estimated is that of softmax(logits / T).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Longest prompt in tokens, keeping its end (`none`: no limit).
        #[arg(long, default_value = "none", value_parser = parse_limit, allow_negative_numbers = true)]
        max_prompt_length: Limit,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output JSON (per prompt: prompt, entropy, stderr, samples, token_entropy; and overall).
        #[arg(long)]
        out: PathBuf,
    },
    /// Appendix K end to end: pairs y_w ~ π, y_l ~ π_ref; a fresh π̂ (from π_ref) trained on
    /// them with the reference-free reward log π̂; the entropies H(π̂) (the DID entropy
    /// estimate), H(π_ref), H(π) and π̂'s β-accuracy. Artifacts stay in --output-dir.
    DidEntropy(difinfo_trainer::diag::did_entropy::DidEntropyArgs),
    /// Appendix K.1: per prompt, samples from the DID estimator π̂, the OLS fit of
    /// log π̂(y) = β log(π(y)/π_ref(y)) + c, and the fraction of prompts with β ≥ 0.
    BetaAccuracy {
        /// The DID estimator π̂ (checkpoint directory; its tokenizer is used for all three).
        #[arg(long)]
        estimator: PathBuf,
        /// The policy π.
        #[arg(long)]
        policy: PathBuf,
        /// The reference π_ref.
        #[arg(long)]
        reference: PathBuf,
        /// Prompts (JSONL: `prompt` string or messages, or `messages`).
        #[arg(long)]
        prompts: PathBuf,
        /// Samples per prompt (the paper uses 4).
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Most new tokens per sample.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output JSON (per prompt: x, y and the fit or "undetermined"; and the β-accuracy).
        #[arg(long)]
        out: PathBuf,
    },
    /// One-page log-likelihood displacement report of a finished preference run: report.md and
    /// report.png in RUN_DIR (from metrics.jsonl, and entropy.json if present).
    Report {
        /// Run directory (holds metrics.jsonl).
        #[arg(value_name = "RUN_DIR")]
        run_dir: PathBuf,
    },
    /// Fold a PEFT LoRA adapter (a `--use-peft` run's checkpoint, or any PEFT LoRA adapter of
    /// a Llama/Mistral/Qwen2 model) into its base model: a full Hugging Face checkpoint, as
    /// PEFT's merge_and_unload + save_pretrained.
    Merge {
        /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Base model directory [default: the adapter's base_model_name_or_path].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output directory (config.json, model.safetensors, tokenizer files).
        #[arg(long)]
        out: PathBuf,
        /// dtype of the saved weights: f32, bf16, f16 or f64.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Pick each prompt's rejected response from candidates drawn from π_ref by
    /// sampling-importance-resampling toward Eq. 1's π_l ∝ π_ref^{1+β} π*^{−β}, with weights
    /// (π_ref(y)/π*(y))^β; writes TRL preference lines (prompt, chosen, rejected, ess).
    ResampleRejected {
        /// The reference policy π_ref (checkpoint directory).
        #[arg(long)]
        reference: PathBuf,
        /// The stronger model that approximates π* (checkpoint directory).
        #[arg(long)]
        target: PathBuf,
        /// Candidates (JSONL: `prompt`, `chosen`, `candidates`: a list of completions drawn from π_ref).
        #[arg(long)]
        candidates: PathBuf,
        /// β of Eq. 1 (the DPO β the data is meant for).
        #[arg(long)]
        beta: f64,
        /// Warn when a prompt's effective sample size is below this.
        #[arg(long, default_value_t = 2.0)]
        min_ess: f64,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output JSONL (TRL standard preference format plus `ess` and `weight`).
        #[arg(long)]
        out: PathBuf,
    },
}

/// A tokenized prompt file: each prompt with its token ids.
type PromptSet = TokenizedDataset<(PromptExample, Vec<u32>)>;

/// The tokenizer, the tokenized prompt file (its counts printed; with `skip_invalid`, invalid
/// records listed in `report`) and the model, as `sample` and `entropy` read them.
fn model_and_prompts(
    model: &ModelArgs,
    prompts: &Path,
    max_prompt_length: Option<usize>,
    skip_invalid: bool,
    report: Option<&Path>,
) -> Result<(TokenizerBundle, PromptSet, Model)> {
    let device = parse_device(&model.device)?;
    let dtype = parse_dtype(&model.dtype)?;
    let bundle = load_bundle(&model.model)?;
    let ds = load_prompts(&bundle, prompts, max_prompt_length, skip_invalid)?;
    if let (Some(r), true) = (report, skip_invalid && !ds.errors.is_empty()) {
        write_error_report(r, &ds.errors)?;
    }
    report_stats(prompts, &ds.stats, report);
    require_examples(prompts, &ds.stats)?;
    let m = load_model(&model.model, dtype, &device)?;
    Ok((bundle, ds, m))
}

/// Refuses token ids beyond the model's vocabulary (a tokenizer from another checkpoint),
/// naming the example (`file:line`, field), the tokenizer file, the id and the vocabulary size.
fn check_vocab<'a>(
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

/// [`check_vocab`] over a prompt file's prompts.
fn check_prompt_vocab(model_dir: &Path, m: &Model, file: &Path, ds: &PromptSet) -> Result<()> {
    let ids = ds
        .examples
        .iter()
        .map(|e| (e.line, "prompt", &e.value.1[..]));
    check_vocab(model_dir, m, file, ids)
}

/// A generation error for the prompt at `file:line`; a size error suggests
/// `--max-prompt-length` and `--max-new-tokens`.
fn at_prompt(file: &Path, line: usize, e: Error) -> Error {
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

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    difinfo_trainer::train::cli::progress_bar(len, 0, what)
}

/// The outputs' checks before any work ([`check_outputs`]): each writable, none an input
/// file (`files`) nor a file of an input checkpoint directory (`checkpoints`).
fn check_paths(
    outputs: &[Named<'_>],
    files: &[Named<'_>],
    checkpoints: &[Named<'_>],
) -> Result<()> {
    check_outputs(outputs, &inputs(files, checkpoints))
}

/// `--out`, and `--error-report` when given with `--skip-invalid` (the default report,
/// DATA.errors.jsonl, is no input and is written, if at all, right after reading the data).
fn outputs_with_report<'a>(
    out: &'a Path,
    report: Option<&'a Path>,
    skip_invalid: bool,
) -> Vec<Named<'a>> {
    let mut v = vec![("--out", out)];
    if let (Some(r), true) = (report, skip_invalid) {
        v.push(("--error-report", r));
    }
    v
}

/// Converts each GGUF file named by an argument of the command into its cache directory
/// before the command runs, saying so: the loaders would convert it silently
/// ([`difinfo_trainer::gguf::resolve_model`]), and a first conversion takes a while.
fn convert_gguf_arguments(sub: &clap::ArgMatches) -> Result<()> {
    use difinfo_trainer::gguf::{cache_root, is_gguf, resolve_model_in};
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

fn run(cli: Cli, sub: &clap::ArgMatches) -> Result<()> {
    if !matches!(cli.command, Command::Convert { .. }) {
        convert_gguf_arguments(sub)?;
    }
    match cli.command {
        Command::Convert { gguf, out, dtype } => {
            let dtype = parse_dtype(&dtype)?;
            let t0 = Instant::now();
            let mut pb: Option<indicatif::ProgressBar> = None;
            let summary =
                difinfo_trainer::gguf::convert(&gguf, &out, dtype, &mut |done, total| {
                    pb.get_or_insert_with(|| progress(total as u64, "convert"))
                        .set_position(done as u64)
                })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            eprintln!(
                "{}: {summary}\nwrote {} ({:?}) in {:.1} s",
                gguf.display(),
                out.display(),
                dtype,
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Sft(a) => difinfo_trainer::train::cli::run_sft(&a, sub).map_err(train_error)?,
        Command::Dpo(a) => difinfo_trainer::train::cli::run_dpo(&a, sub).map_err(train_error)?,
        Command::Plot(a) => difinfo_trainer::train::plot::run_plot(&a).map_err(train_error)?,
        Command::Bench(a) => {
            difinfo_trainer::train::bench::run_bench(&a).map_err(train_error)?;
        }
        Command::BetaAccuracy {
            estimator,
            policy,
            reference,
            prompts,
            samples,
            max_new_tokens,
            seed,
            out,
        } => {
            use difinfo::beta_accuracy::{beta_accuracy, BetaFit};
            use difinfo_trainer::diag::beta_accuracy::prompt_fit;
            if samples == 0 || max_new_tokens == 0 {
                return Err(Error::InvalidArgument(format!(
                    "need --samples ≥ 1 and --max-new-tokens ≥ 1, got {samples} and {max_new_tokens}"
                )));
            }
            check_paths(
                &[("--out", &out)],
                &[("--prompts", &prompts)],
                &[
                    ("--estimator", &estimator),
                    ("--policy", &policy),
                    ("--reference", &reference),
                ],
            )?;
            let device = parse_device("cpu")?;
            let bundle = load_bundle(&estimator)?;
            let ds = load_prompts(&bundle, &prompts, None, false)?;
            report_stats(&prompts, &ds.stats, None);
            require_examples(&prompts, &ds.stats)?;
            let (m_hat, m_pi, m_ref) = (
                load_model(&estimator, DType::F32, &device)?,
                load_model(&policy, DType::F32, &device)?,
                load_model(&reference, DType::F32, &device)?,
            );
            check_prompt_vocab(&estimator, &m_hat, &prompts, &ds)?;
            let params = SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let pb = progress(ds.examples.len() as u64, "beta-accuracy");
            let (mut rows, mut fits) = (Vec::new(), Vec::new());
            println!("| line | β̂ | c | R² |\n|---:|---:|---:|---:|");
            for ex in &ds.examples {
                let (p, ids) = &ex.value;
                let f = prompt_fit(
                    &m_hat,
                    &m_pi,
                    &m_ref,
                    ids,
                    samples,
                    &params,
                    bundle.stop_ids(),
                    bundle.pad_id(),
                    &mut rng,
                )
                .map_err(|e| at_prompt(&prompts, ex.line, e))?;
                match &f.fit {
                    BetaFit::Determined(l) => {
                        println!(
                            "| {} | {:.4} | {:.4} | {:.4} |",
                            ex.line, l.slope, l.intercept, l.r_squared
                        )
                    }
                    BetaFit::Undetermined => println!("| {} | undetermined | | |", ex.line),
                }
                let mut row =
                    serde_json::to_value(&f).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                row["prompt"] = p.prompt.to_json();
                row["line"] = json!(ex.line);
                rows.push(row);
                fits.push(f.fit);
                pb.inc(1);
            }
            pb.finish_and_clear();
            let acc = beta_accuracy(&fits).ok();
            match &acc {
                Some(a) => println!(
                    "β-accuracy: {:.4} over {} determined prompt(s) ({} undetermined)",
                    a.accuracy, a.determined, a.undetermined
                ),
                None => println!("β-accuracy: undetermined (no prompt's samples determine β)"),
            }
            let doc =
                json!({ "beta_accuracy": acc, "samples": samples, "seed": seed, "prompts": rows });
            write_json(&out, &doc)?;
            eprintln!("wrote {}", out.display());
        }
        Command::DidEntropy(a) => did_entropy(&a)?,
        Command::Report { run_dir } => {
            let md = difinfo_trainer::diag::report::report(&run_dir).map_err(train_error)?;
            print!(
                "{}",
                std::fs::read_to_string(&md).map_err(|e| Error::io(&md, e))?
            );
            eprintln!(
                "wrote {} and {}",
                md.display(),
                run_dir.join("report.png").display()
            );
        }
        Command::ResampleRejected {
            reference,
            target,
            candidates,
            beta,
            min_ess,
            seed,
            out,
        } => {
            use difinfo_trainer::diag::resample::{resample, score_candidates};
            if !(beta.is_finite() && beta > 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "--beta must be finite and > 0, got {beta}"
                )));
            }
            if !(min_ess.is_finite() && min_ess >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "--min-ess must be finite and ≥ 0, got {min_ess}"
                )));
            }
            check_paths(
                &[("--out", &out)],
                &[("--candidates", &candidates)],
                &[("--reference", &reference), ("--target", &target)],
            )?;
            let loaded = difinfo_trainer::data::read_records(
                &candidates,
                false,
                difinfo_trainer::data::parse_candidates_line,
            )?;
            if loaded.examples.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{}: no records (the file is empty)",
                    candidates.display()
                )));
            }
            let device = parse_device("cpu")?;
            let (tok_ref, tok_tgt) = (load_bundle(&reference)?, load_bundle(&target)?);
            let m_ref = load_model(&reference, DType::F32, &device)?;
            let m_tgt = load_model(&target, DType::F32, &device)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let pb = progress(loaded.examples.len() as u64, "resample");
            let mut rows = Vec::new();
            let mut low = 0usize;
            println!("| line | candidates | picked | weight | ESS |");
            println!("|---:|---:|---:|---:|---:|");
            for ex in &loaded.examples {
                let set = &ex.value;
                let at = |e: Error| {
                    Error::InvalidArgument(format!("{}:{}: {e}", candidates.display(), ex.line))
                };
                let lr = score_candidates(&m_ref, &tok_ref, set).map_err(at)?;
                let lt = score_candidates(&m_tgt, &tok_tgt, set).map_err(at)?;
                let r = resample(&lr, &lt, beta, &mut rng).map_err(at)?;
                println!(
                    "| {} | {} | {} | {:.4} | {:.2} |",
                    ex.line,
                    set.candidates.len(),
                    r.index,
                    r.weight,
                    r.ess
                );
                if r.ess < min_ess {
                    low += 1;
                }
                rows.push(json!({
                    "prompt": set.prompt.to_json(),
                    "chosen": set.chosen.to_json(),
                    "rejected": set.candidates[r.index].to_json(),
                    "ess": r.ess,
                    "weight": r.weight,
                    "candidates": set.candidates.len(),
                }));
                pb.inc(1);
            }
            pb.finish_and_clear();
            if low > 0 {
                eprintln!(
                    "warning: {low} of {} prompt(s) have an effective sample size below {min_ess}: \
                     their rejected response rests on few candidates (draw more, or lower --beta)",
                    rows.len()
                );
            }
            let count = rows.len();
            write_jsonl(&out, rows)?;
            eprintln!("wrote {count} preference pairs to {}", out.display());
        }
        Command::Entropy {
            model,
            prompts,
            samples,
            max_new_tokens,
            temperature,
            max_prompt_length,
            seed,
            out,
        } => {
            use difinfo_trainer::diag::entropy::{overall, prompt_entropy};
            if samples < 2 || max_new_tokens == 0 {
                return Err(Error::InvalidArgument(format!(
                    "need --samples ≥ 2 (for a standard error) and --max-new-tokens ≥ 1, got {samples} and {max_new_tokens}"
                )));
            }
            check_paths(
                &[("--out", &out)],
                &[("--prompts", &prompts)],
                &[("--model", &model.model)],
            )?;
            let (bundle, ds, m) =
                model_and_prompts(&model, &prompts, max_prompt_length.0, false, None)?;
            check_prompt_vocab(&model.model, &m, &prompts, &ds)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let pb = progress(ds.examples.len() as u64, "entropy");
            let mut rows = Vec::new();
            let mut ests = Vec::new();
            println!("| line | entropy (nats) | stderr | samples | token entropy | mean length |");
            println!("|---:|---:|---:|---:|---:|---:|");
            for ex in &ds.examples {
                let (p, ids) = &ex.value;
                let (e, _) = prompt_entropy(
                    &m,
                    ids,
                    samples,
                    temperature,
                    max_new_tokens,
                    bundle.stop_ids(),
                    &mut rng,
                )
                .map_err(|e| at_prompt(&prompts, ex.line, e))?;
                println!(
                    "| {} | {:.4} | {:.4} | {} | {:.4} | {:.1} |",
                    ex.line, e.entropy, e.stderr, e.samples, e.token_entropy, e.mean_length
                );
                let mut row =
                    serde_json::to_value(&e).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                row["prompt"] = p.prompt.to_json();
                row["line"] = json!(ex.line);
                rows.push(row);
                ests.push(e);
                pb.inc(1);
            }
            pb.finish_and_clear();
            let (mean, se) = overall(&ests);
            println!(
                "overall: {mean:.4} ± {se:.4} nats over {} prompt(s)",
                ests.len()
            );
            let doc = json!({
                "model": model.model,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "overall": { "entropy": mean, "stderr": se, "prompts": ests.len() },
                "prompts": rows,
            });
            write_json(&out, &doc)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Init {
            size,
            out,
            tokenizer_corpus,
            seed,
            arch,
            overwrite,
        } => {
            use difinfo_trainer::init::{prepare_output_dir, INIT_FILES};
            difinfo_trainer::io::check_output_dir("--out", &out)?;
            let corpus = match &tokenizer_corpus {
                Some(p) => {
                    if let Some(f) = INIT_FILES
                        .iter()
                        .find(|f| difinfo_trainer::io::same_file(&out.join(f), p))
                    {
                        return Err(Error::InvalidArgument(format!(
                            "--tokenizer-corpus {} is {}, a file init writes: copy it elsewhere first",
                            p.display(),
                            out.join(f).display()
                        )));
                    }
                    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                    if text.trim().is_empty() {
                        return Err(Error::InvalidArgument(format!(
                            "--tokenizer-corpus {}: no text to train the tokenizer on (the file is empty or blank)",
                            p.display()
                        )));
                    }
                    text
                }
                None => BUILTIN_CORPUS.to_string(),
            };
            for p in prepare_output_dir(&out, overwrite)? {
                eprintln!("removed stale {}", p.display());
            }
            let cfg = init_checkpoint(&out, arch_config(size, arch), &corpus, seed)?;
            eprintln!(
                "wrote {} ({} parameters, vocab {}, {} layers, hidden {})",
                out.display(),
                cfg.num_parameters(),
                cfg.vocab_size,
                cfg.num_hidden_layers,
                cfg.hidden_size
            );
        }
        Command::Merge {
            adapter,
            model,
            out,
            dtype,
        } => {
            let dtype = parse_dtype(&dtype)?;
            let base =
                difinfo_trainer::lora::merge_adapter(&adapter, model.as_deref(), &out, dtype)?;
            eprintln!(
                "merged {} into {} → {}",
                adapter.display(),
                base.display(),
                out.display()
            );
        }
        Command::Logps {
            model,
            data,
            out,
            batch_size,
            tok,
            skip_invalid,
            error_report,
        } => {
            if batch_size == 0 {
                return Err(Error::InvalidArgument(
                    "--batch-size must be positive".into(),
                ));
            }
            check_paths(
                &outputs_with_report(&out, error_report.as_deref(), skip_invalid),
                &[("--data", &data)],
                &[("--model", &model.model)],
            )?;
            let report = error_report.unwrap_or_else(|| default_report_path(&data));
            let device = parse_device(&model.device)?;
            let dtype = parse_dtype(&model.dtype)?;
            let bundle =
                difinfo_trainer::train::cli::load_bundle_with(&model.model, tok.tokenizer_compat)?;
            difinfo_trainer::train::cli::report_provenance(&bundle);
            let ds = load_preferences(&bundle, &data, &tok.options(), skip_invalid)?;
            if skip_invalid && !ds.errors.is_empty() {
                write_error_report(&report, &ds.errors)?;
            }
            report_stats(&data, &ds.stats, Some(&report));
            require_examples(&data, &ds.stats)?;
            let m = load_model(&model.model, dtype, &device)?;
            check_vocab(
                &model.model,
                &m,
                &data,
                ds.examples.iter().flat_map(|e| {
                    let p = &e.value;
                    [
                        (e.line, "prompt", &p.prompt_ids[..]),
                        (e.line, "chosen", &p.chosen_ids[..]),
                        (e.line, "rejected", &p.rejected_ids[..]),
                    ]
                }),
            )?;
            let pb = progress(ds.examples.len() as u64, "logps");
            let lps = preference_logps(
                &m,
                &ds.examples,
                &data,
                batch_size,
                bundle.pad_id(),
                |done| pb.set_position(done as u64),
            )?;
            pb.finish_and_clear();
            write_jsonl(
                &out,
                ds.examples.iter().zip(&lps).map(|(e, lp)| {
                    json!({
                        "line": e.line,
                        "prompt_ids": e.value.prompt_ids,
                        "chosen_ids": e.value.chosen_ids,
                        "rejected_ids": e.value.rejected_ids,
                        "chosen_logps": lp.chosen,
                        "rejected_logps": lp.rejected,
                    })
                }),
            )?;
            eprintln!("wrote {} rows to {}", lps.len(), out.display());
        }
        Command::Sample {
            model,
            prompts,
            n,
            temperature,
            top_p,
            max_new_tokens,
            max_prompt_length,
            seed,
            out,
            skip_invalid,
            error_report,
        } => {
            let params = SamplingParams {
                temperature,
                top_p,
                max_new_tokens,
            };
            params.validate()?;
            if n == 0 {
                return Err(Error::InvalidArgument(
                    "--n must be ≥ 1 (samples per prompt), got 0".into(),
                ));
            }
            check_paths(
                &outputs_with_report(&out, error_report.as_deref(), skip_invalid),
                &[("--prompts", &prompts)],
                &[("--model", &model.model)],
            )?;
            let report = error_report.unwrap_or_else(|| default_report_path(&prompts));
            let (bundle, ds, m) = model_and_prompts(
                &model,
                &prompts,
                max_prompt_length.0,
                skip_invalid,
                Some(&report),
            )?;
            check_prompt_vocab(&model.model, &m, &prompts, &ds)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let pb = progress(ds.examples.len() as u64, "sample");
            let mut rows = Vec::new();
            for ex in &ds.examples {
                let (p, ids) = &ex.value;
                let samples = generate(&m, ids, n, &params, bundle.stop_ids(), &mut rng)
                    .map_err(|e| at_prompt(&prompts, ex.line, e))?;
                for (k, s) in samples.into_iter().enumerate() {
                    rows.push(json!({
                        "line": ex.line,
                        "sample": k,
                        "prompt": p.prompt.to_json(),
                        "prompt_ids": ids,
                        "completion": bundle.decode(&s.completion_ids, true)?,
                        "completion_ids": s.completion_ids,
                        "logp": s.logp,
                        "finished": s.finished,
                    }));
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
            let count = rows.len();
            write_jsonl(&out, rows)?;
            eprintln!("wrote {count} samples to {}", out.display());
        }
        Command::BenchForward {
            model,
            size,
            batch,
            seq,
            iters,
            warmup,
            dtype,
            device,
        } => {
            let device = parse_device(&device)?;
            let dtype = parse_dtype(&dtype)?;
            if batch == 0 || seq < 2 || iters == 0 {
                return Err(Error::InvalidArgument(
                    "need --batch ≥ 1, --seq ≥ 2, --iters ≥ 1".into(),
                ));
            }
            let m = match &model {
                Some(dir) => load_model(dir, dtype, &device)?,
                None => {
                    let cfg = size_config(size);
                    let t = difinfo_trainer::init::random_tensors(&cfg, 0)?;
                    difinfo_trainer::model::Model::from_tensors(
                        cfg,
                        t,
                        Path::new("<random>"),
                        dtype,
                        &device,
                    )?
                }
            };
            let vocab = m.config().vocab_size as u32;
            let seqs: Vec<Sequence> = (0..batch)
                .map(|b| Sequence {
                    ids: (0..seq)
                        .map(|t| ((b * 7919 + t * 104_729) as u32) % vocab)
                        .collect(),
                    completion_start: 0,
                })
                .collect();
            let bt = Batch::from_sequences(&seqs, 0, &device)?;
            let fwd = || -> Result<Tensor> {
                m.sequence_logps(&bt.input_ids, Some(&bt.attention_mask), &bt.loss_mask)
            };
            let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                for _ in 0..warmup {
                    f()?;
                }
                let t0 = Instant::now();
                for _ in 0..iters {
                    f()?;
                }
                Ok(t0.elapsed().as_secs_f64() / iters as f64)
            };
            let t_fwd = time(&|| {
                let lp = fwd()?;
                lp.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                Ok(())
            })?;
            let t_bwd = time(&|| {
                let lp = fwd()?;
                let g = lp.sum_all()?.backward()?;
                std::hint::black_box(g);
                Ok(())
            })?;
            let tokens = (batch * seq) as f64;
            println!("| model | params | dtype | device | batch × seq | forward tok/s | fwd+bwd tok/s | forward s/iter | fwd+bwd s/iter |");
            println!("|---|---:|---|---|---|---:|---:|---:|---:|");
            println!(
                "| {} | {:.2}M | {:?} | {} | {} × {} | {:.0} | {:.0} | {:.3} | {:.3} |",
                model
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("random {size:?}").to_lowercase()),
                m.num_parameters() as f64 / 1e6,
                dtype,
                if device.is_cpu() { "cpu" } else { "cuda" },
                batch,
                seq,
                tokens / t_fwd,
                tokens / t_bwd,
                t_fwd,
                t_bwd
            );
        }
    }
    Ok(())
}

/// `did-entropy`: the pipeline with progress bars, then its table.
fn did_entropy(a: &difinfo_trainer::diag::did_entropy::DidEntropyArgs) -> Result<()> {
    use difinfo::beta_accuracy::BetaFit;
    use difinfo_trainer::diag::did_entropy::{run, Stage, REPORT_FILE};
    let mut bar: Option<(Stage, indicatif::ProgressBar)> = None;
    let r = run(a, &mut |stage, done, total| {
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
    })
    .map_err(train_error)?;
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
    eprintln!("wrote {}", a.output_dir.join(REPORT_FILE).display());
    Ok(())
}

/// The training commands' errors, as the binary's.
fn train_error(e: difinfo_trainer::train::cli::CliError) -> Error {
    Error::InvalidArgument(e.to_string())
}

/// Keeps freed memory in the process for reuse (glibc): candle allocates a fresh buffer for
/// every op's output, and with glibc's defaults each buffer above the dynamic mmap threshold is
/// a fresh `mmap` (page faults on first touch, `munmap` on drop) and the heap top is trimmed
/// back to the kernel after every large free. A training step allocates the same sizes step
/// after step, so raising both thresholds turns that into reuse (~10 % of a step's time on the
/// bench). Skipped when `GLIBC_TUNABLES` is set, so the environment can still choose.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Runs candle's element-wise CPU ops on the calling thread unless `CANDLE_NUM_THREADS` says
/// otherwise. candle splits element-wise ops over a spin-barrier pool of its own, beside the
/// rayon pool that runs matmuls and the fused kernels: on a machine with few cores (or shared
/// with other work) its barrier threads and rayon's workers take turns on the same cores and
/// the main thread spins at the barrier (a fifth of a bench step's cycles on 2 cores, with
/// `CANDLE_NUM_THREADS=1` 25–50 % more tokens/s under load). Matmuls keep all threads
/// (`RAYON_NUM_THREADS`).
fn tune_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any other thread exists and before candle reads the variable.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    tune_malloc();
    tune_candle_threads();
    let matches = difinfo_trainer::train::cli::negative_numbers_as_values(
        <Cli as clap::CommandFactory>::command(),
    )
    .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    match run(cli, &sub) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
