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

use crate::commands::training::training_options;
use crate::init::{random_tensors, size_config, ModelSize};
use crate::model::Model;
use crate::pretrained::load_model;
use crate::train::adapter::TrainModel;
use crate::train::config::MemoryOptions;
use crate::train::rng::SplitMix64;
use crate::train::run::Placement;
use crate::train::{
    Batch, Dataset, Examples, Objective, OptimizerKind, PolicyModel, PreferencePair, SchedulerType,
    SeqLogps, Sequence, TrainConfig, Trainer,
};

/// `difinfo-train bench`: `--optim` and the memory options are the training commands' (their
/// defaults [`TrainConfig`]'s).
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&TrainConfig::default(), &[]))]
pub struct BenchArgs {
    /// Checkpoint directory [default: a random Llama of --size, built in memory]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Model size when --model is absent: tiny (~1M parameters), small (~20M) or smollm2-135m
    /// (SmolLM2-135M's configuration, 134.5M)
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    pub size: ModelSize,
    /// Preference pairs per step
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (half prompt, half completion) of the random pairs
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Measure on the pairs of a TRL preference file (JSONL, JSON or Parquet, any format
    /// `dpo --data` reads), tokenized as `dpo` tokenizes them with the tokenizer of
    /// --model: real lengths, so the padding of real batches; replaces --seq's random pairs
    #[arg(long, value_name = "FILE", requires = "model", conflicts_with = "seq")]
    pub data: Option<PathBuf>,
    /// Longest sequence of --data (prompt + completion; TRL's max_length, 0: none)
    #[arg(long, default_value_t = TrainConfig::default().max_length, requires = "data")]
    pub max_length: usize,
    /// Objectives to measure, comma-separated: dpo, dpo-pg, ref-free
    #[arg(long, default_value = "dpo", value_delimiter = ',', value_parser = ["dpo", "dpo-pg", "ref-free"])]
    pub objective: Vec<String>,
    /// Timed steps
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Optimizer (the training commands' --optim)
    #[arg(long, value_enum)]
    pub optim: OptimizerKind,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
    /// Mixed precision: bf16 compute over the parameters
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub memory: MemoryOptions,
    /// Also print where the timed steps' time went, kernel by kernel: exclusive wall time of
    /// each fused kernel, matrix-product family (with its GFLOP/s), the optimizer, and what no
    /// kernel covers (candle's own ops and graph)
    #[arg(long, default_value_t = false)]
    pub profile: bool,
    /// Also write the table as JSON (the rows, the machine's peak, the load average), e.g. for
    /// `bench/compare.sh`
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What `bench --json` writes.
#[derive(Debug, serde::Serialize)]
struct BenchJson<'a> {
    model: String,
    training: String,
    threads: usize,
    /// Timed steps per row.
    steps: usize,
    peak_flops: Option<f64>,
    peak_how: Option<String>,
    load_average: Option<String>,
    rows: &'a [BenchRow],
}

/// The model under a bench: checkpoints are not written (not part of a step).
struct NoSave<'a>(&'a TrainModel);

impl PolicyModel for NoSave<'_> {
    fn sequence_logps(&self, b: &Batch) -> crate::Result<SeqLogps> {
        self.0.sequence_logps(b)
    }
    fn sequence_logps_with_sq(&self, b: &Batch) -> crate::Result<SeqLogps> {
        self.0.sequence_logps_with_sq(b)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.0.named_vars()
    }
    fn reference_logps(&self, b: &Batch) -> crate::Result<SeqLogps> {
        self.0.reference_logps(b)
    }
    fn reference_vars(&self) -> Vec<(String, Var)> {
        self.0.reference_vars()
    }
    fn set_dropout_seed(&self, seed: Option<u64>) {
        self.0.set_dropout_seed(seed);
    }
    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.0.backward(loss)
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn save_weights(&self, _dir: &Path) -> crate::Result<()> {
        Ok(())
    }
    fn load_weights(&self, _dir: &Path) -> crate::Result<()> {
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
    /// The share of padding in the padded batches of the timed steps:
    /// `1 − real tokens / (rows × longest row)`, summed over the forward passes.
    pub padding_share: f64,
    /// Mean seconds per timed step.
    pub seconds_per_step: f64,
    /// Tokens per second over the timed steps.
    pub tokens_per_second: f64,
    /// Peak RSS during the steps, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Model FLOPs per second over the timed steps (see [`model_flops`]).
    pub flops_per_second: f64,
    /// Model-FLOPs utilization: `flops_per_second` over the machine's peak, when known.
    pub mfu: Option<f64>,
    /// Each rank's figures (one entry in a world of one).
    pub ranks: Vec<RankFigures>,
    /// With `--profile`: this rank's regions over the timed steps.
    pub profile: Option<crate::profile::Profile>,
}

/// What one rank of a bench measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RankFigures {
    /// Seconds of the timed steps.
    pub seconds: f64,
    /// The share of them spent in collectives ([`crate::dist::comm_seconds`]).
    pub comm_fraction: f64,
    /// Optimizer state held (this rank's shard under ZeRO-1), MiB.
    pub optimizer_state_mib: f64,
    /// Peak RSS during the steps, MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Every rank's [`RankFigures`], in rank order, on every rank.
///
/// # Errors
/// The engine's errors.
fn gather_ranks(mine: RankFigures) -> crate::Result<Vec<RankFigures>> {
    let world = crate::dist::world();
    let v = [
        mine.seconds,
        mine.comm_fraction,
        mine.optimizer_state_mib,
        mine.peak_rss_mib.unwrap_or(f64::NAN),
    ];
    let t = Tensor::from_slice(&v, v.len(), &Device::Cpu)?;
    let all = world.all_gather(&t)?.to_vec1::<f64>()?;
    Ok(all
        .chunks(v.len())
        .map(|c| RankFigures {
            seconds: c[0],
            comm_fraction: c[1],
            optimizer_state_mib: c[2],
            peak_rss_mib: (!c[3].is_nan()).then_some(c[3]),
        })
        .collect())
}

/// Model FLOPs of one training step (PaLM's accounting): the plan's one definition,
/// [`crate::plan::model_flops`].
pub use crate::plan::model_flops;

/// The machine's peak FLOP/s for the bench's arithmetic and how it was found:
/// `DIFINFO_PEAK_TFLOPS` when set; on a CUDA device the dense bf16 tensor-core peak of the
/// GPU named by `nvidia-smi` ([`gpu_bf16_peak_tflops`]); on the CPU
/// `threads × 2 FMA units × SIMD lanes × 2 FLOPs × clock` ([`cpu_peak`]).
pub fn peak_flops(device: &Device) -> Option<(f64, String)> {
    if let Some(t) = std::env::var("DIFINFO_PEAK_TFLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return Some((t * 1e12, format!("DIFINFO_PEAK_TFLOPS={t}")));
    }
    if device.is_cuda() {
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .ok()?;
        let name = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .to_string();
        let t = gpu_bf16_peak_tflops(&name)?;
        return Some((t * 1e12, format!("{name}: {t} TFLOP/s dense bf16")));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let max_khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok());
    let threads = rayon::current_num_threads();
    cpu_peak(&cpuinfo, max_khz, threads)
}

/// The CPU's peak f32 FLOP/s from `/proc/cpuinfo`: `threads × 2 × lanes × 2 × GHz`, where
/// `lanes` is 16 with `avx512f` in the flags, 8 with `avx2` and `fma`, 4 otherwise — except on
/// AMD before Zen 5 (`cpu family` below 26), whose Zen 4 runs AVX-512 on its two 256-bit FMA
/// units (8 lanes: an AVX-512 instruction takes two passes); two FMA units per core (every Intel core since Haswell and AMD's since Zen 2; cpuinfo does not
/// say, and some Xeon Bronze/Silver have one 512-bit unit: set `DIFINFO_PEAK_TFLOPS` there);
/// the clock is cpufreq's `cpuinfo_max_freq` (kHz) when given, else cpuinfo's `cpu MHz`.
pub fn cpu_peak(cpuinfo: &str, max_khz: Option<f64>, threads: usize) -> Option<(f64, String)> {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split_whitespace()
        .collect();
    let has = |f: &str| flags.contains(&f);
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
    };
    let amd_256_bit_fma = field("vendor_id") == Some("AuthenticAMD")
        && field("cpu family")
            .and_then(|f| f.parse::<u32>().ok())
            .is_some_and(|f| f < 26);
    let (lanes, isa) = if has("avx512f") && amd_256_bit_fma {
        (8.0, "AVX-512 on 256-bit FMA units, AMD Zen 4")
    } else if has("avx512f") {
        (16.0, "AVX-512")
    } else if has("avx2") && has("fma") {
        (8.0, "AVX2+FMA")
    } else {
        (4.0, "SSE")
    };
    let ghz = match max_khz {
        Some(k) => k / 1e6,
        None => {
            cpuinfo
                .lines()
                .find(|l| l.starts_with("cpu MHz"))?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()?
                / 1e3
        }
    };
    let peak = threads as f64 * 2.0 * lanes * 2.0 * ghz * 1e9;
    Some((
        peak,
        format!("{threads} threads × 2 FMA units × {lanes} f32 lanes ({isa}) × 2 × {ghz:.2} GHz"),
    ))
}

/// Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of a GPU by `nvidia-smi`'s name, from
/// NVIDIA's data sheets; `None` for GPUs not in the table (set `DIFINFO_PEAK_TFLOPS`).
pub fn gpu_bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let table: [(&str, f64); 10] = [
        ("B200", 2250.0),
        ("GH200", 989.4),
        ("H200", 989.4),
        ("H100 PCIE", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.4),
        ("A100", 312.0),
        ("L40S", 362.1),
        ("L4", 121.0),
        ("A10G", 70.0),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|&(_, t)| t)
}

/// The model a bench runs and its name in the table: the checkpoint `--model DIR`, or a
/// random Llama of `--size` built in memory (seed 0).
///
/// # Errors
/// Loading errors.
pub(crate) fn bench_model(
    dir: Option<&Path>,
    size: ModelSize,
    dtype: candle_core::DType,
    device: &Device,
) -> crate::Result<(Model, String)> {
    Ok(match dir {
        Some(dir) => (load_model(dir, dtype, device)?, dir.display().to_string()),
        None => {
            let cfg = size_config(size);
            let t = random_tensors(&cfg, 0)?;
            (
                Model::from_tensors(cfg, t, Path::new("<random>"), dtype, device)?,
                format!("random {size:?}").to_lowercase(),
            )
        }
    })
}

/// The load average (1, 5, 15 min) from `/proc/loadavg`; `None` off Linux.
pub(crate) fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Refuses `--batch` × `--seq` beyond the machine's memory before the benchmark builds
/// anything of that size: the token ids of its `sequences` inputs (host memory,
/// [`crate::memory::check_memory`]) and a forward pass of `model` over `--batch` sequences of
/// `--seq` positions ([`Model::check_forward_size`]).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] naming `--batch` and `--seq` and the memory needed.
pub(crate) fn check_bench_size(
    model: &Model,
    batch: usize,
    seq: usize,
    sequences: usize,
) -> crate::Result<()> {
    let named = |e: crate::Error| {
        crate::Error::InvalidArgument(format!(
            "--batch {batch} --seq {seq}: {e}; lower --batch or --seq"
        ))
    };
    let ids = (sequences as u128)
        .saturating_mul(seq as u128)
        .saturating_mul(4);
    crate::memory::check_memory(
        || format!("building the benchmark's {sequences} sequences of {seq} tokens"),
        ids,
        || format!("{sequences} × {seq} token ids × 4 bytes"),
    )
    .map_err(named)?;
    model.check_forward_size(batch, seq, 0).map_err(named)
}

/// The pairs a bench trains on: random ones of `--seq` tokens, or the pairs of a data file,
/// repeated in order when the steps need more than it has.
pub struct BenchPairs {
    /// The distinct pairs.
    pub pairs: Vec<PreferencePair>,
    /// Their padding token.
    pub pad_id: u32,
}

impl BenchPairs {
    /// The pairs of a bench's steps: every rank's pairs of every step (a global micro-batch
    /// is --batch × ranks pairs), and one step more, so the run neither ends nor ends an epoch
    /// (no checkpoint is gathered or written within the measured steps). The first ones,
    /// cycling through a file's pairs when it has fewer.
    fn for_steps(&self, a: &BenchArgs, ranks: usize) -> Vec<PreferencePair> {
        let n = pairs_needed(a, ranks);
        self.pairs.iter().cycle().take(n).cloned().collect()
    }
}

/// How many pairs a bench's steps take ([`BenchPairs::for_steps`]).
fn pairs_needed(a: &BenchArgs, ranks: usize) -> usize {
    a.batch * ranks * (a.warmup + a.steps + 1)
}

/// Rows × longest row of the forward passes over `micro`'s pairs: chosen and rejected in one
/// padded batch, or (`separate`, DPO-PG's two passes) in one batch each.
pub fn padded_positions(micro: &[&PreferencePair], separate: bool) -> usize {
    let longest =
        |it: &mut dyn Iterator<Item = &Sequence>| it.map(|s| s.ids.len().max(2)).max().unwrap_or(0);
    let n = micro.len();
    if separate {
        n * longest(&mut micro.iter().map(|p| &p.chosen))
            + n * longest(&mut micro.iter().map(|p| &p.rejected))
    } else {
        2 * n * longest(&mut micro.iter().flat_map(|p| [&p.chosen, &p.rejected]))
    }
}

/// The pairs of a TRL preference file, tokenized as `dpo` tokenizes them (the tokenizer and
/// chat template of `model_dir`, TRL's defaults, `max_length`).
///
/// # Errors
/// Data errors (file:line:field) and a file that leaves no pair.
fn file_pairs(model_dir: &Path, file: &Path, max_length: usize) -> crate::Result<BenchPairs> {
    let bundle = crate::commands::shared::load_bundle(model_dir)?;
    let config = TrainConfig {
        max_length,
        ..TrainConfig::default()
    };
    let opts = crate::train::dataset::tokenize_options(&config, &Default::default());
    let ds = crate::tokenize::load_preferences(&bundle, file, &opts, false)?;
    crate::commands::shared::require_examples(file, &ds.stats)?;
    Ok(BenchPairs {
        pairs: ds
            .examples
            .iter()
            .map(|e| PreferencePair::from(&e.value))
            .collect(),
        pad_id: bundle.pad_id(),
    })
}

fn random_pairs(n: usize, seq: usize, vocab: u32, seed: u64) -> Vec<PreferencePair> {
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
    source: &BenchPairs,
    name: &str,
    objective: Objective,
) -> crate::Result<BenchRow> {
    let steps = a.warmup + a.steps;
    let ranks = crate::dist::world().world_size();
    let pairs = source.for_steps(a, ranks);
    let separate = objective.rule() == difinfo::objective::Rule::ProjectedGradient;
    let data = Dataset {
        examples: Examples::Preference(pairs.clone()),
        pad_id: source.pad_id,
        settings: "bench".into(),
    };
    let out = std::env::temp_dir().join(format!("difinfo-bench-{}-{}", std::process::id(), a.seq));
    let cfg = TrainConfig {
        objective,
        output_dir: out.clone(),
        learning_rate: 1e-6,
        optim: a.optim,
        lr_scheduler_type: SchedulerType::Constant,
        per_device_train_batch_size: a.batch,
        max_steps: steps as i64 + 1,
        logging_steps: usize::MAX / 2,
        save_steps: 0,
        overwrite_output_dir: true,
        memory: a.memory.clone(),
        ..TrainConfig::default()
    };
    let m = NoSave(model);
    let mut t = Trainer::new(&m, cfg, data)?;
    let peak_reset = reset_peak_rss();
    let (mut tokens, mut secs, mut comm) = (0usize, 0.0f64, 0.0f64);
    let (mut flops, mut positions) = (0.0f64, 0usize);
    let frozen = model.model.lora_config().is_some();
    for i in 0..steps {
        if a.profile && i == a.warmup {
            crate::profile::start();
        }
        let r = t
            .train_step()?
            .ok_or_else(|| crate::Error::InvalidArgument("the bench run ended early".into()))?;
        if i >= a.warmup {
            tokens += r.tokens;
            secs += r.seconds;
            comm += r.comm_seconds;
            for mb in &r.examples {
                let micro: Vec<&PreferencePair> = mb.iter().map(|&j| &pairs[j]).collect();
                positions += padded_positions(&micro, separate);
                flops += micro
                    .iter()
                    .flat_map(|p| [&p.chosen, &p.rejected])
                    .map(|s| {
                        let cfg = model.model.config();
                        model_flops(cfg, 1, s.ids.len(), s.num_completion_tokens(), frozen)
                    })
                    .sum::<f64>();
            }
        }
    }
    let profile = a.profile.then(crate::profile::stop);
    let optimizer_state_mib = t.optimizer().state_bytes() as f64 / (1u64 << 20) as f64;
    let peak = if peak_reset {
        proc_status_kib("VmHWM").map(|k| k as f64 / 1024.0)
    } else {
        None
    };
    drop(t);
    let _ = std::fs::remove_dir_all(&out);
    let ranks = gather_ranks(RankFigures {
        seconds: secs,
        comm_fraction: comm / secs.max(1e-12),
        optimizer_state_mib,
        peak_rss_mib: peak,
    })?;
    // The slowest rank sets the pace of a synchronous step.
    let secs = ranks.iter().map(|r| r.seconds).fold(secs, f64::max);
    let flops_per_second = flops / secs.max(1e-12);
    Ok(BenchRow {
        flops_per_second,
        // Every rank has its device's (or its threads') peak.
        mfu: peak_flops(model.model.device())
            .map(|(p, _)| flops_per_second / (p * ranks.len() as f64)),
        objective: name.to_string(),
        tokens_per_step: tokens / a.steps.max(1),
        padding_share: 1.0 - tokens as f64 / positions.max(1) as f64,
        seconds_per_step: secs / a.steps.max(1) as f64,
        tokens_per_second: tokens as f64 / secs.max(1e-12),
        peak_rss_mib: peak,
        ranks,
        profile,
    })
}

/// `--profile`'s table for one row: the regions by exclusive time per step, their share of the
/// step, the products' GFLOP/s, and the time no region covers.
fn print_profile(r: &BenchRow, steps: usize) {
    let Some(p) = &r.profile else { return };
    let step = r.seconds_per_step;
    let per = |x: f64| x / steps.max(1) as f64;
    let mut rows: Vec<(&String, &crate::profile::Stat)> = p.regions.iter().collect();
    rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    println!(
        "\nwhere a {} step went ({steps} timed steps, {:.3} s each):\n",
        r.objective, step
    );
    println!("| region | calls/step | ms/step | share | GFLOP/s |");
    println!("|---|---:|---:|---:|---:|");
    let gflops = |flops: f64, secs: f64| {
        if flops > 0.0 {
            format!("{:.1}", flops / secs.max(1e-12) / 1e9)
        } else {
            String::new()
        }
    };
    for (name, st) in rows {
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} % | {} |",
            per(st.calls as f64),
            1e3 * per(st.seconds),
            100.0 * per(st.seconds) / step.max(1e-12),
            gflops(st.flops, st.seconds)
        );
    }
    let total = step * steps as f64;
    let other = p.other(total);
    println!(
        "| other (no region: candle's graph and ops, allocation, data) | | {:.1} | {:.1} % | |",
        1e3 * per(other),
        100.0 * other / total.max(1e-12)
    );
    let (f, s): (f64, f64) = p
        .regions
        .values()
        .filter(|st| st.flops > 0.0)
        .fold((0.0, 0.0), |(f, s), st| (f + st.flops, s + st.seconds));
    println!(
        "| all matrix products (attention's own products are in its rows) | | {:.1} | {:.1} % | {} |",
        1e3 * per(s),
        100.0 * s / total.max(1e-12),
        gflops(f, s)
    );
}

/// The per-rank table of a bench over several ranks: each rank's share of tokens/s, the share
/// of its step time in collectives, its optimizer state and peak RSS.
fn print_ranks(rows: &[BenchRow], engine: &str, zero_stage: u8) {
    println!("\n| objective | rank | tokens/s (its examples) | comm share | optimizer state (MiB) | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        for (i, f) in r.ranks.iter().enumerate() {
            println!(
                "| {} | {i} | {:.0} | {:.1} % | {:.1} | {} |",
                r.objective,
                r.tokens_per_second / r.ranks.len() as f64,
                100.0 * f.comm_fraction,
                f.optimizer_state_mib,
                f.peak_rss_mib
                    .map_or("n/a".to_string(), |m| format!("{m:.0}"))
            );
        }
    }
    println!(
        "\n{} ranks over {engine}, ZeRO stage {zero_stage}",
        rows.first().map_or(0, |r| r.ranks.len())
    );
}

/// `difinfo-train bench`: prints a Markdown table.
///
/// # Errors
/// Bad options, model loading and training errors.
pub fn run_bench(a: &BenchArgs) -> crate::Result<Vec<BenchRow>> {
    if a.batch == 0 || a.seq < 4 || a.steps == 0 {
        return Err(crate::Error::InvalidArgument(
            "need --batch ≥ 1, --seq ≥ 4, --steps ≥ 1".into(),
        ));
    }
    if let Some(j) = &a.json {
        let mut files: Vec<crate::outputs::Named<'_>> = Vec::new();
        if let Some(d) = &a.data {
            files.push(("--data", d));
        }
        let dirs: Vec<crate::outputs::Named<'_>> =
            a.model.iter().map(|m| ("--model", m.as_path())).collect();
        crate::outputs::check_outputs(&[("--json", j)], &crate::outputs::inputs(&files, &dirs))?;
    }
    let (device, dtype) = a.placement.parse()?;
    let (mut model, name) = bench_model(a.model.as_deref(), a.size, dtype, &device)?;
    if a.bf16 {
        model.set_compute_dtype(candle_core::DType::BF16)?;
    }
    a.memory.apply_to(&mut model, 42)?;
    // The steps' pairs: chosen and rejected token ids of --batch pairs per step.
    // Its passes keep less than a graph's: the check of a pass without one is a lower bound.
    let sequences =
        (2usize.saturating_mul(a.batch)).saturating_mul(a.warmup.saturating_add(a.steps));
    check_bench_size(&model.detached(), a.batch, a.seq, sequences)?;
    let params = model.num_parameters();
    let source = match (&a.data, &a.model) {
        (Some(file), Some(dir)) => file_pairs(dir, file, a.max_length)?,
        _ => BenchPairs {
            pairs: random_pairs(
                pairs_needed(a, crate::dist::world().world_size()),
                a.seq,
                model.config().vocab_size as u32,
                7,
            ),
            pad_id: 0,
        },
    };
    let tm = TrainModel::new(model, PathBuf::from("<bench>"), dtype);
    let threads = rayon::current_num_threads();
    let peak = peak_flops(&device);
    let memory = match (a.memory.use_peft, a.memory.gradient_checkpointing) {
        (false, false) => "full".to_string(),
        (false, true) => "full + ckpt".to_string(),
        (true, c) => format!(
            "LoRA r{} {}{}",
            a.memory.lora_r,
            a.memory.lora_target_modules.join("+"),
            if c { " + ckpt" } else { "" }
        ),
    };
    let world = crate::dist::world();
    // Under a launcher every rank measures; rank 0 prints.
    let main = world.rank() == 0;
    if main {
        if let Some(file) = &a.data {
            let lens: Vec<usize> = source
                .pairs
                .iter()
                .flat_map(|p| [p.chosen.ids.len(), p.rejected.ids.len()])
                .collect();
            println!(
                "data: {}: {} pairs, sequence lengths mean {:.0}, max {} (--max-length {})\n",
                file.display(),
                source.pairs.len(),
                lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
                lens.iter().max().unwrap_or(&0),
                a.max_length
            );
        }
        println!("| model | params | objective | training | optim | dtype | device | ranks × threads | batch × seq per rank | tokens/step | padding | s/step | tokens/s | TFLOP/s | MFU | peak RSS (MiB) |");
        println!("|---|---:|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut rows = Vec::new();
    for o in &a.objective {
        let obj = match o.as_str() {
            "dpo-pg" => Objective::dpo_pg(0.1),
            "ref-free" => Objective::default().reference_free(),
            _ => Ok(Objective::default()),
        }
        .map_err(|e| crate::Error::InvalidArgument(e.to_string()))?;
        let r = bench_objective(&tm, a, &source, o, obj)?;
        if !main {
            rows.push(r);
            continue;
        }
        println!(
            "| {name} | {:.2}M | {} | {memory} | {} | {} | {} | {} × {threads} | {} × {} | {} | {:.1} % | {:.3} | {:.0} | {:.3} | {} | {} |",
            params as f64 / 1e6,
            r.objective,
            a.optim.name(),
            if a.bf16 { format!("{dtype:?}+bf16") } else { format!("{dtype:?}") },
            a.placement.device,
            world.world_size(),
            a.batch,
            if a.data.is_some() { "data".to_string() } else { a.seq.to_string() },
            r.tokens_per_step,
            100.0 * r.padding_share,
            r.seconds_per_step,
            r.tokens_per_second,
            r.flops_per_second / 1e12,
            r.mfu.map_or("n/a".to_string(), |m| format!("{:.1} %", 100.0 * m)),
            r.peak_rss_mib.map_or("n/a".to_string(), |m| format!("{m:.0}"))
        );
        rows.push(r);
    }
    if !main {
        return Ok(rows);
    }
    for r in &rows {
        print_profile(r, a.steps);
    }
    if world.world_size() > 1 {
        print_ranks(&rows, world.engine(), a.memory.zero_stage);
    }
    match &peak {
        Some((p, how)) => println!(
            "\npeak{}: {:.3} TFLOP/s ({how})",
            if world.world_size() > 1 {
                " per rank"
            } else {
                ""
            },
            p / 1e12
        ),
        None => println!("\npeak: unknown (set DIFINFO_PEAK_TFLOPS for MFU)"),
    }
    let load = load_average();
    if let Some(l) = &load {
        println!("load average (1, 5, 15 min): {l}");
    }
    if let Some(j) = &a.json {
        crate::io::write_json(
            j,
            &BenchJson {
                model: name,
                training: memory,
                threads,
                steps: a.steps,
                peak_flops: peak.as_ref().map(|p| p.0),
                peak_how: peak.map(|p| p.1),
                load_average: load,
                rows: &rows,
            },
        )?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_peak_reads_cpuinfo() {
        let info =
            "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma avx512f\ncpu MHz\t\t: 2600.000\n";
        let (p, how) = cpu_peak(info, None, 2).unwrap();
        assert!(
            (p - 2.0 * 2.0 * 16.0 * 2.0 * 2.6e9).abs() < 1.0,
            "{p} {how}"
        );
        let (p, _) = cpu_peak(&info.replace(" avx512f", ""), Some(3.0e6), 4).unwrap();
        assert!((p - 4.0 * 2.0 * 8.0 * 2.0 * 3.0e9).abs() < 1.0);
        assert!(cpu_peak("flags\t: sse\n", None, 1).is_none());
        // AMD Zen 4 (family 25) has AVX-512 on 256-bit units; Zen 5 (26) has 512-bit ones.
        let zen =
            |family: u32| format!("vendor_id\t: AuthenticAMD\ncpu family\t: {family}\n{info}");
        let (p, how) = cpu_peak(&zen(25), None, 2).unwrap();
        assert!((p - 2.0 * 2.0 * 8.0 * 2.0 * 2.6e9).abs() < 1.0, "{how}");
        let (p, _) = cpu_peak(&zen(26), None, 2).unwrap();
        assert!((p - 2.0 * 2.0 * 16.0 * 2.0 * 2.6e9).abs() < 1.0);
    }

    #[test]
    fn padded_positions_count_rows_times_the_longest() {
        let seq = |n: usize| Sequence {
            ids: vec![5; n],
            completion_start: 1,
        };
        let pair = |c: usize, r: usize| PreferencePair {
            chosen: seq(c),
            rejected: seq(r),
        };
        let (a, b) = (pair(3, 10), pair(7, 4));
        // One batch of four rows of 10; DPO-PG: two rows of 7, two rows of 10.
        assert_eq!(padded_positions(&[&a, &b], false), 40);
        assert_eq!(padded_positions(&[&a, &b], true), 14 + 20);
        // A row of one token is padded to two (Batch::from_sequences).
        assert_eq!(padded_positions(&[&pair(1, 1)], false), 4);
    }

    #[test]
    fn gpu_peaks_by_name() {
        assert_eq!(gpu_bf16_peak_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(gpu_bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(gpu_bf16_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(gpu_bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(gpu_bf16_peak_tflops("NVIDIA L40S"), Some(362.1));
        assert_eq!(gpu_bf16_peak_tflops("Tesla V100"), None);
    }

    #[test]
    fn model_flops_follow_palm() {
        let cfg = crate::init::size_config(ModelSize::Smollm2_135m);
        // One sequence, one token scored: 6 N + 6 V H + 12 L d · len² / len … per token.
        let (h, i, l) = (576.0, 1536.0, 30.0);
        let n = l * (2.0 * h * 576.0 + 2.0 * h * 192.0 + 3.0 * h * i);
        let f = model_flops(&cfg, 1, 8, 1, false);
        let want = 3.0 * (2.0 * n * 8.0 + 2.0 * 49_152.0 * h) + 3.0 * 4.0 * l * 64.0 * 576.0;
        assert!((f - want).abs() < 1.0, "{f} vs {want}");
        // Frozen weights (LoRA): the weights' backward is one product, not two.
        let g = model_flops(&cfg, 1, 8, 1, true);
        assert!((f - g - (2.0 * n * 8.0 + 2.0 * 49_152.0 * h)).abs() < 1.0);
    }
}
