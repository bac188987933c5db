//! `difinfo-train bench-generate`: new tokens/s and peak memory of sampling, through the same
//! [`crate::generate::generate`] that `sample`, `entropy` and `did-entropy` use: `--batch`
//! samples of one `--prompt-len`-token prompt, exactly `--new-tokens` new tokens each (no stop
//! token), timed over `--steps` calls after `--warmup` untimed ones. Each timed call covers
//! the prompt's pass and every decoding step. `bench/pytorch_generate.py` measures
//! transformers' `generate` with the same options and prints the same table.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::SeedableRng;

use crate::commands::bench::{proc_status_kib, reset_peak_rss};
use crate::generate::{generate, SamplingParams};
use crate::init::ModelSize;
use crate::train::rng::SplitMix64;
use crate::train::run::Placement;
use crate::{Error, Result};

/// `difinfo-train bench-generate`.
#[derive(Args, Debug, Clone)]
pub struct BenchGenerateArgs {
    /// Checkpoint directory [default: a random Llama of --size, built in memory]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Model size when --model is absent: tiny, small or smollm2-135m
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    pub size: ModelSize,
    /// Samples drawn together (transformers' num_return_sequences)
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt tokens (random ids, the same prompt for every sample)
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// New tokens per sample, all of them generated (no stop token)
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Sampling temperature (0: greedy)
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables top-p
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the prompt and of the draws
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Untimed warm-up calls
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed calls
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Threads [default: all CPUs, or RAYON_NUM_THREADS]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the table's rows to this file as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateRow {
    /// Checkpoint directory or `random SIZE`.
    pub model: String,
    /// Threads of the pool that ran the calls.
    pub threads: usize,
    /// Samples per call.
    pub batch: usize,
    /// New tokens per sample.
    pub new_tokens: usize,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Mean seconds per timed call.
    pub seconds: f64,
    /// `batch × new_tokens / seconds`.
    pub new_tokens_per_second: f64,
    /// Peak RSS during the calls, MiB.
    pub peak_rss_mib: Option<f64>,
    /// `/proc/loadavg`'s 1, 5 and 15 minute figures at the end.
    pub load_average: Option<String>,
}

/// The header of the table (`bench/pytorch_generate.py` prints the same).
pub const HEADER: &str = "| model | threads | batch × new tokens | prompt | s | new tokens/s | peak RSS (MiB) | load average |\n|---|---:|---|---:|---:|---:|---:|---|";

impl GenerateRow {
    /// The row in the table's Markdown.
    pub fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} × {} | {} | {:.3} | {:.1} | {} | {} |",
            self.model,
            self.threads,
            self.batch,
            self.new_tokens,
            self.prompt_len,
            self.seconds,
            self.new_tokens_per_second,
            self.peak_rss_mib
                .map_or("n/a".to_string(), |m| format!("{m:.0}")),
            self.load_average.as_deref().unwrap_or("n/a")
        )
    }
}

/// Runs `difinfo-train bench-generate`: prints the table (and writes `--json`).
///
/// # Errors
/// Bad options ([`Error::InvalidArgument`] naming them), model loading and generation errors.
pub fn run(a: &BenchGenerateArgs) -> Result<GenerateRow> {
    if a.batch == 0 || a.prompt_len == 0 || a.new_tokens == 0 || a.steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "need --batch ≥ 1, --prompt-len ≥ 1, --new-tokens ≥ 1, --steps ≥ 1 (got {}, {}, {}, {})",
            a.batch, a.prompt_len, a.new_tokens, a.steps
        )));
    }
    if a.threads == Some(0) {
        return Err(Error::InvalidArgument(
            "--threads must be ≥ 1, got 0".into(),
        ));
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.new_tokens,
    };
    params.validate()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads.unwrap_or_else(rayon::current_num_threads))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("--threads: {e}")))?;
    let row = pool.install(|| measure(a, &params))?;
    println!("{HEADER}");
    println!("{}", row.markdown());
    if let Some(path) = &a.json {
        crate::io::write_json(path, &[&row])?;
    }
    Ok(row)
}

/// Loads the model and times the calls (in the caller's rayon pool).
fn measure(a: &BenchGenerateArgs, params: &SamplingParams) -> Result<GenerateRow> {
    let (device, dtype) = a.placement.parse()?;
    let (model, name) =
        crate::commands::bench::bench_model(a.model.as_deref(), a.size, dtype, &device)?;
    let ctx = model.config().max_position_embeddings;
    if a.prompt_len.saturating_add(a.new_tokens) > ctx {
        return Err(Error::InvalidArgument(format!(
            "--prompt-len {} + --new-tokens {} is more than the model's context of {ctx} positions",
            a.prompt_len, a.new_tokens
        )));
    }
    let vocab = model.config().vocab_size as u64;
    let mut ids = SplitMix64::new(a.seed);
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|_| (3 + ids.below(vocab.saturating_sub(3).max(1))) as u32)
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut call = || -> Result<()> {
        let samples = generate(&model, &prompt, a.batch, params, &[], &mut rng)?;
        if let Some(s) = samples
            .iter()
            .find(|s| s.completion_ids.len() != a.new_tokens)
        {
            return Err(Error::InvalidArgument(format!(
                "a sample got {} new tokens instead of --new-tokens {}",
                s.completion_ids.len(),
                a.new_tokens
            )));
        }
        std::hint::black_box(samples);
        Ok(())
    };
    for _ in 0..a.warmup {
        call()?;
    }
    let peak_reset = reset_peak_rss();
    let t0 = Instant::now();
    for _ in 0..a.steps {
        call()?;
    }
    let secs = t0.elapsed().as_secs_f64() / a.steps as f64;
    let peak_rss_mib = if peak_reset {
        proc_status_kib("VmHWM").map(|k| k as f64 / 1024.0)
    } else {
        None
    };
    let load_average = crate::commands::bench::load_average();
    Ok(GenerateRow {
        model: name,
        threads: rayon::current_num_threads(),
        batch: a.batch,
        new_tokens: a.new_tokens,
        prompt_len: a.prompt_len,
        seconds: secs,
        new_tokens_per_second: (a.batch * a.new_tokens) as f64 / secs.max(1e-12),
        peak_rss_mib,
        load_average,
    })
}
