//! `difinfo-train bench`: throughput (tokens/s) and peak memory of full training steps: the
//! forward passes of the chosen and rejected sequences, backward, (DPO-PG: the projection),
//! clipping and the optimizer step, through the same [`Trainer`] as `dpo`, after warm-up steps.
//!
//! Peak memory is the process's peak resident set (`VmHWM` of `/proc/self/status`), reset
//! (`/proc/self/clear_refs`) after the model and the reference log-probs are ready, so it
//! covers the training steps; `bench/pytorch_dpo_step.py` measures PyTorch the same way.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use clap::Args;

use crate::checkpoint::{load_model, parse_dtype};
use crate::init::{random_tensors, size_config, ModelSize};
use crate::model::Model;
use crate::train::adapter::TrainModel;
use crate::train::rng::SplitMix64;
use crate::train::{
    Dataset, Examples, Objective, PolicyModel, PreferencePair, SchedulerType, SeqLogps, Sequence,
    TokenBatch, TrainConfig, Trainer,
};

use crate::train::cli::{CliError, CliResult};

/// `difinfo-train bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Checkpoint directory [default: a random Llama of --size, built in memory]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Model size when --model is absent: tiny (~1M parameters) or small (~20M)
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    pub size: ModelSize,
    /// Preference pairs per step
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (half prompt, half completion)
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Objectives to measure, comma-separated: dpo, dpo-pg, ref-free
    #[arg(long, default_value = "dpo", value_delimiter = ',', value_parser = ["dpo", "dpo-pg", "ref-free"])]
    pub objective: Vec<String>,
    /// Timed steps
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Optimizer
    #[arg(long, default_value = "adamw", value_parser = ["sgd", "rmsprop", "adamw"])]
    pub optim: String,
    /// Parameter dtype
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Mixed precision: bf16 compute over the parameters
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
}

/// The model under a bench: checkpoints are not written (not part of a step).
struct NoSave<'a>(&'a TrainModel);

impl PolicyModel for NoSave<'_> {
    fn sequence_logps(&self, b: &TokenBatch) -> candle_core::Result<SeqLogps> {
        self.0.sequence_logps(b)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.0.named_vars()
    }
    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.0.backward(loss)
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn save_weights(&self, _dir: &Path) -> crate::train::Result<()> {
        Ok(())
    }
    fn load_weights(&self, _dir: &Path) -> crate::train::Result<()> {
        Ok(())
    }
}

/// A field of `/proc/self/status` in KiB (`VmHWM`, `VmRSS`); `None` off Linux.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resets the peak resident set to the current one (Linux ≥ 4.0); false if not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// Objective.
    pub objective: String,
    /// Tokens (non-padding, all forward passes) per step.
    pub tokens_per_step: usize,
    /// Mean seconds per timed step.
    pub seconds_per_step: f64,
    /// Tokens per second over the timed steps.
    pub tokens_per_second: f64,
    /// Peak RSS during the steps, MiB.
    pub peak_rss_mib: Option<f64>,
}

fn pairs(n: usize, seq: usize, vocab: u32, seed: u64) -> Vec<PreferencePair> {
    let mut rng = SplitMix64::new(seed);
    let p = seq / 2;
    let mut tok = move || 3 + rng.below(u64::from(vocab - 3)) as u32;
    (0..n)
        .map(|_| {
            let prompt: Vec<u32> = (0..p).map(|_| tok()).collect();
            let mut c = prompt.clone();
            c.extend((p..seq).map(|_| tok()));
            let mut r = prompt;
            r.extend((p..seq).map(|_| tok()));
            PreferencePair {
                chosen: Sequence {
                    ids: c,
                    completion_start: p,
                },
                rejected: Sequence {
                    ids: r,
                    completion_start: p,
                },
            }
        })
        .collect()
}

/// Measures one objective on `model`.
///
/// # Errors
/// Training errors.
pub fn bench_objective(
    model: &TrainModel,
    a: &BenchArgs,
    name: &str,
    objective: Objective,
) -> CliResult<BenchRow> {
    let steps = a.warmup + a.steps;
    let vocab = model.model.config().vocab_size as u32;
    let data = Dataset {
        examples: Examples::Preference(pairs(a.batch * steps, a.seq, vocab, 7)),
        pad_id: 0,
        settings: "bench".into(),
    };
    let out = std::env::temp_dir().join(format!("difinfo-bench-{}-{}", std::process::id(), a.seq));
    let cfg = TrainConfig {
        objective,
        output_dir: out.clone(),
        learning_rate: 1e-6,
        optim: a.optim.parse().map_err(CliError::Usage)?,
        lr_scheduler_type: SchedulerType::Constant,
        per_device_train_batch_size: a.batch,
        max_steps: steps as i64,
        logging_steps: usize::MAX / 2,
        save_steps: 0,
        overwrite_output_dir: true,
        ..TrainConfig::default()
    };
    let m = NoSave(model);
    let mut t = Trainer::new(&m, cfg, data)?;
    let peak_reset = reset_peak_rss();
    let (mut tokens, mut secs) = (0usize, 0.0f64);
    for i in 0..steps {
        let r = t
            .train_step()?
            .ok_or_else(|| CliError::Usage("the bench run ended early".into()))?;
        if i >= a.warmup {
            tokens += r.tokens;
            secs += r.seconds;
        }
    }
    let peak = if peak_reset {
        proc_status_kib("VmHWM").map(|k| k as f64 / 1024.0)
    } else {
        None
    };
    drop(t);
    let _ = std::fs::remove_dir_all(&out);
    Ok(BenchRow {
        objective: name.to_string(),
        tokens_per_step: tokens / a.steps.max(1),
        seconds_per_step: secs / a.steps.max(1) as f64,
        tokens_per_second: tokens as f64 / secs.max(1e-12),
        peak_rss_mib: peak,
    })
}

/// `difinfo-train bench`: prints a Markdown table.
///
/// # Errors
/// Bad options, model loading and training errors.
pub fn run_bench(a: &BenchArgs) -> CliResult<Vec<BenchRow>> {
    if a.batch == 0 || a.seq < 4 || a.steps == 0 {
        return Err(CliError::Usage(
            "need --batch ≥ 1, --seq ≥ 4, --steps ≥ 1".into(),
        ));
    }
    let device = crate::parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let (mut model, name) = match &a.model {
        Some(dir) => (load_model(dir, dtype, &device)?, dir.display().to_string()),
        None => {
            let cfg = size_config(a.size);
            let t = random_tensors(&cfg, 0)?;
            (
                Model::from_tensors(cfg, t, Path::new("<random>"), dtype, &device)?,
                format!("random {:?}", a.size).to_lowercase(),
            )
        }
    };
    if a.bf16 {
        model.set_compute_dtype(candle_core::DType::BF16)?;
    }
    let params = model.num_parameters();
    let tm = TrainModel::new(model, PathBuf::from("<bench>"), dtype);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!("| model | params | objective | optim | dtype | device | threads | batch × seq | tokens/step | s/step | tokens/s | peak RSS (MiB) |");
    println!("|---|---:|---|---|---|---|---:|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for o in &a.objective {
        let obj = match o.as_str() {
            "dpo-pg" => Objective::dpo_pg(0.1),
            "ref-free" => Objective::default().reference_free(),
            _ => Ok(Objective::default()),
        }
        .map_err(|e| CliError::Usage(e.to_string()))?;
        let r = bench_objective(&tm, a, o, obj)?;
        println!(
            "| {name} | {:.2}M | {} | {} | {} | {} | {threads} | {} × {} | {} | {:.3} | {:.0} | {} |",
            params as f64 / 1e6,
            r.objective,
            a.optim,
            if a.bf16 { format!("{dtype:?}+bf16") } else { format!("{dtype:?}") },
            a.device,
            a.batch,
            a.seq,
            r.tokens_per_step,
            r.seconds_per_step,
            r.tokens_per_second,
            r.peak_rss_mib.map_or("n/a".to_string(), |m| format!("{m:.0}"))
        );
        rows.push(r);
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "\nload average (1, 5, 15 min): {}",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(rows)
}
