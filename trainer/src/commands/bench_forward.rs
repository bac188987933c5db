//! `difinfo-train bench-forward`: its options ([`BenchForwardArgs`]) and its run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::batch::{Batch, Sequence};
use crate::init::ModelSize;
use crate::train::run::Placement;
use crate::{Error, Result};

/// Measure forward (and forward+backward) throughput in tokens/s.
#[derive(clap::Args)]
pub struct BenchForwardArgs {
    /// Checkpoint directory; without it a random model of --size is built in memory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model size when --model is absent.
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    pub size: ModelSize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Timed iterations.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
}

/// Runs `difinfo-train bench-forward`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: BenchForwardArgs) -> Result<()> {
    let BenchForwardArgs {
        model,
        size,
        batch,
        seq,
        iters,
        warmup,
        placement,
    } = a;
    let (device, dtype) = placement.parse()?;
    if batch == 0 || seq < 2 || iters == 0 {
        return Err(Error::InvalidArgument(
            "need --batch ≥ 1, --seq ≥ 2, --iters ≥ 1".into(),
        ));
    }
    let (m, _) = crate::commands::bench::bench_model(model.as_deref(), size, dtype, &device)?;
    // Before the inputs are built; the passes below keep a graph, as the model checks.
    crate::commands::bench::check_bench_size(&m, batch, seq, batch)?;
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
    Ok(())
}
