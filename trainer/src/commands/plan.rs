//! `difinfo-train plan`: the memory per device and the FLOPs per optimizer step of a DPO run
//! before it starts ([`crate::plan`]), and whether it fits a device's memory.
//!
//! The options are the training commands' where they exist: the memory options (LoRA,
//! checkpointing) and `--dtype` / `--device` flattened from their structs
//! ([`MemoryOptions`], [`Placement`]); `--optim`, `--per-device-train-batch-size`,
//! `--max-length`, `--gradient-accumulation-steps` and `--bf16` take their defaults and values
//! from [`TrainConfig`] / `RunSettings` through [`training_options`], as `bench` does
//! (flattening all of `TrainConfig` would bring its 25 other options).

use std::path::PathBuf;

use clap::Args;

use crate::commands::training::{from_command_line, training_options};
use crate::plan::{parse_memory, plan, Plan, PlanModel, Setup};
use crate::train::config::{parse_limit_count, MemoryOptions};
use crate::train::run::Placement;
use crate::train::{OptimizerKind, TrainConfig};
use crate::units::format_bytes;
use crate::{Error, Result};

/// `difinfo-train plan`.
#[derive(Args, Debug, Clone)]
#[command(mut_args = training_options(&TrainConfig::default(), &[]))]
pub struct PlanArgs {
    /// A checkpoint directory (its config.json is read) or a config.json file: llama,
    /// mistral, qwen2, qwen3, gemma2
    #[arg(long, value_name = "DIR_OR_CONFIG")]
    pub model: PathBuf,
    /// Data-parallel ranks, one device each
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub placement: Placement,
    /// Mixed precision (HF's bf16, the training commands' --bf16): bf16 compute over the
    /// parameters (--dtype)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub memory: MemoryOptions,
    /// Examples (pairs) per micro-batch (the training commands' option)
    #[arg(long)]
    pub per_device_train_batch_size: usize,
    /// Tokens per sequence, every sequence counted at this length (the training commands'
    /// option; a number: the plan needs a length)
    #[arg(long, value_parser = parse_limit_count)]
    pub max_length: usize,
    /// Micro-batches per optimizer step (the training commands' option)
    #[arg(long)]
    pub gradient_accumulation_steps: usize,
    /// Optimizer (the training commands' --optim)
    #[arg(long, value_enum)]
    pub optim: OptimizerKind,
    /// A device's memory, e.g. 80GB (decimal units B, kB, MB, GB, TB; binary KiB … TiB): say
    /// whether the peak fits
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<String>,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    /// The library's [`Setup`] from the options.
    ///
    /// # Errors
    /// An unknown dtype or device name; invalid LoRA options.
    pub fn setup(&self) -> Result<Setup> {
        let param_dtype = crate::dtype::parse_dtype(&self.placement.dtype)?;
        let d = self.placement.device.as_str();
        let cuda = match d {
            "cpu" => false,
            _ if d == "cuda"
                || d.strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<usize>().is_ok()) =>
            {
                true
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown device `{d}`; expected cpu, cuda or cuda:N"
                )))
            }
        };
        Ok(Setup {
            world_size: self.world_size,
            zero_stage: usize::from(self.memory.zero_stage),
            param_dtype,
            compute_dtype: if self.bf16 {
                candle_core::DType::BF16
            } else {
                param_dtype
            },
            cuda,
            optim: self.optim,
            lora: self.memory.lora()?,
            gradient_checkpointing: self.memory.gradient_checkpointing,
            batch: self.per_device_train_batch_size,
            max_length: self.max_length,
            accumulation: self.gradient_accumulation_steps,
        })
    }
}

/// The plan and, with `--device-memory`, the memory it is compared with.
#[derive(serde::Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    plan: &'a Plan,
    device_memory: Option<u128>,
    fits: Option<bool>,
}

/// Runs `difinfo-train plan`: prints the table (or JSON); exits 0 whether or not it fits.
/// `m` (its matches) tells the options given from the defaults: a LoRA option without
/// `--use-peft` is refused, as the training commands refuse it.
///
/// # Errors
/// An unreadable or unsupported config.json, options out of range, a bad `--device-memory`,
/// a LoRA option without `--use-peft`, `--padding-free`.
pub fn run(a: &PlanArgs, m: &clap::ArgMatches) -> Result<()> {
    let given = MemoryOptions::LORA_OPTIONS
        .into_iter()
        .filter(|id| from_command_line(m, id));
    if let Some(k) = a.memory.ignored_lora_option(given) {
        return Err(Error::InvalidArgument(format!(
            "--{}: a LoRA option is read only with --use-peft; add it or drop this option",
            k.replace('_', "-")
        )));
    }
    if a.memory.padding_free {
        return Err(Error::InvalidArgument(
            "--padding-free: the plan models padded batches of --seq tokens (with padding-free \
             batches the activations follow the real lengths); drop this option"
                .into(),
        ));
    }
    let memory = a
        .device_memory
        .as_deref()
        .map(|s| {
            parse_memory(s).map_err(|e| Error::InvalidArgument(format!("--device-memory {e}")))
        })
        .transpose()?;
    let model = PlanModel::read(&a.model)?;
    let p = plan(&model, &a.setup()?)?;
    let fits = memory.map(|m| p.peak_bytes <= m);
    if a.json {
        let out = Output {
            plan: &p,
            device_memory: memory,
            fits,
        };
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::InvalidArgument(format!("plan as JSON: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    print!("{}", table(a, &p, memory));
    Ok(())
}

/// The human-readable plan.
fn table(a: &PlanArgs, p: &Plan, memory: Option<u128>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let training = match a.memory.lora() {
        Ok(Some(l)) => format!("LoRA r = {} on {}", l.r(), l.target_modules().join(",")),
        _ => "full".to_string(),
    };
    let _ = writeln!(
        s,
        "{} ({}): {:.3} B parameters, {:.4} B trainable ({training}{})",
        a.model.display(),
        p.model_type,
        p.parameters as f64 / 1e9,
        p.trainable_parameters as f64 / 1e9,
        if a.memory.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "{} rank(s), ZeRO stage {}, parameters {}{}, {} on {} ({:?} kernels)",
        p.world_size,
        p.zero_stage,
        a.placement.dtype,
        if a.bf16 { " with bf16 compute" } else { "" },
        a.optim.name(),
        a.placement.device,
        p.kernels
    );
    let _ = writeln!(
        s,
        "per device and optimizer step: {} pair(s) → {} sequences (chosen + rejected) × {} tokens × {} micro-batch(es) = {} tokens; {} over the ranks\n",
        a.per_device_train_batch_size,
        p.sequences_per_micro_batch,
        a.max_length,
        a.gradient_accumulation_steps,
        p.tokens_per_step,
        p.global_tokens_per_step
    );
    let _ = writeln!(s, "| per device | bytes | what |\n|---|---:|---|");
    for i in &p.memory {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            i.name,
            format_bytes(i.bytes),
            i.detail
        );
    }
    let _ = writeln!(
        s,
        "| **total (peak)** | **{}** | the largest phase of a step: {} |",
        format_bytes(p.peak_bytes),
        p.peak_phase
    );
    let _ = writeln!(
        s,
        "\nFLOPs per optimizer step: {:.3e} per device (model FLOPs: forward + backward), {:.3e} over {} rank(s){}",
        p.flops_per_step,
        p.global_flops_per_step,
        p.world_size,
        if p.recompute_flops_per_step > 0.0 {
            format!(
                "; recomputation adds {:.3e} per device",
                p.recompute_flops_per_step
            )
        } else {
            String::new()
        }
    );
    if let Some(m) = memory {
        let verdict = if p.peak_bytes <= m {
            "fits"
        } else {
            "does not fit"
        };
        let _ = writeln!(
            s,
            "{verdict} in {} ({} peak, {} headroom)",
            format_bytes(m),
            format_bytes(p.peak_bytes),
            if p.peak_bytes <= m {
                format_bytes(m - p.peak_bytes)
            } else {
                format!("−{}", format_bytes(p.peak_bytes - m))
            }
        );
    }
    let _ = writeln!(s, "\nnotes:");
    for n in &p.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}
