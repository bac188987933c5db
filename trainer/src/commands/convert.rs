//! `difinfo-train convert`: its options ([`ConvertArgs`]) and its run.

use std::path::PathBuf;
use std::time::Instant;

use crate::commands::shared::progress;
use crate::dtype::parse_dtype;
use crate::Result;

/// Convert a GGUF file (llama.cpp, Ollama; Llama-family or Qwen2, any quantization candle
/// dequantizes) into a Hugging Face checkpoint directory: config.json, model.safetensors,
/// tokenizer.json and tokenizer_config.json rebuilt from its metadata, generation_config.json.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The GGUF file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the written weights: f32 (lossless for every GGUF quantization) or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Replace the checkpoint in a non-empty --out (its stale shards, optimizer and trainer
    /// state are removed; other files stay) instead of refusing
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `difinfo-train convert`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: ConvertArgs) -> Result<()> {
    let ConvertArgs {
        gguf,
        out,
        dtype,
        overwrite,
    } = a;
    let dtype = parse_dtype(&dtype)?;
    crate::outputs::check_checkpoint_dir("--out", &out, overwrite, &[("--gguf", &gguf)])?;
    for p in crate::outputs::prepare_checkpoint_dir("--out", &out, overwrite)? {
        eprintln!("removed stale {}", p.display());
    }
    let t0 = Instant::now();
    let mut pb: Option<indicatif::ProgressBar> = None;
    let summary = crate::io::write_dir_atomic(&out, |dir| {
        crate::gguf::convert(&gguf, dir, dtype, &mut |done, total| {
            pb.get_or_insert_with(|| progress(total as u64, "convert"))
                .set_position(done as u64)
        })
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
    Ok(())
}
