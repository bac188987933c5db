//! `difinfo-train merge`: its options ([`MergeArgs`]) and its run.

use std::path::PathBuf;

use crate::dtype::parse_dtype;
use crate::Result;

/// Fold a PEFT LoRA adapter (a `--use-peft` run's checkpoint, or any PEFT LoRA adapter of
/// a Llama/Mistral/Qwen2 model) into its base model: a full Hugging Face checkpoint, as
/// PEFT's merge_and_unload + save_pretrained.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Base model directory [default: the adapter's base_model_name_or_path].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the saved weights: f32, bf16, f16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace the checkpoint in a non-empty --out (its stale shards, optimizer and trainer
    /// state are removed; other files stay) instead of refusing
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `difinfo-train merge`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: MergeArgs) -> Result<()> {
    let MergeArgs {
        adapter,
        model,
        out,
        dtype,
        overwrite,
    } = a;
    let dtype = parse_dtype(&dtype)?;
    let (_, base) = crate::lora::adapter_base(&adapter, model.as_deref())?;
    let base_option = match &model {
        Some(_) => "--model".to_string(),
        None => format!(
            "the base model (base_model_name_or_path of --adapter {}):",
            adapter.display()
        ),
    };
    crate::outputs::check_checkpoint_dir(
        "--out",
        &out,
        overwrite,
        &[("--adapter", &adapter), (&base_option, &base)],
    )?;
    for p in crate::outputs::prepare_checkpoint_dir("--out", &out, overwrite)? {
        eprintln!("removed stale {}", p.display());
    }
    let base = crate::io::write_dir_atomic(&out, |dir| {
        crate::pretrained::merge_adapter(&adapter, model.as_deref(), dir, dtype)
    })?;
    eprintln!(
        "merged {} into {} → {}",
        adapter.display(),
        base.display(),
        out.display()
    );
    Ok(())
}
