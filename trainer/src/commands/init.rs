//! `difinfo-train init`: its options ([`InitArgs`]) and its run.

use std::path::PathBuf;

use crate::config_json::Architecture;
use crate::init::{arch_config, init_checkpoint, ModelSize, BUILTIN_CORPUS};
use crate::{Error, Result};

/// Create a random-weight checkpoint (Llama by default) with a BPE tokenizer trained on a corpus.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Model size: tiny (~1M parameters), small (~20M) or smollm2-135m (SmolLM2-135M's
    /// configuration, 134.5M).
    #[arg(long, value_enum, default_value_t = ModelSize::Tiny)]
    pub size: ModelSize,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer training corpus (text, one sequence per line) [default: built-in corpus].
    #[arg(long)]
    pub tokenizer_corpus: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Architecture (model_type) of the random model.
    #[arg(long, value_enum, default_value_t = Architecture::Llama)]
    pub arch: Architecture,
    /// Replace the checkpoint in a non-empty --out (its stale shards, optimizer and trainer
    /// state are removed; other files stay) instead of refusing
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `difinfo-train init`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: InitArgs) -> Result<()> {
    let InitArgs {
        size,
        out,
        tokenizer_corpus,
        seed,
        arch,
        overwrite,
    } = a;
    use crate::init::{prepare_output_dir, INIT_FILES};
    crate::outputs::check_checkpoint_dir("--out", &out, overwrite, &[])?;
    let corpus = match &tokenizer_corpus {
        Some(p) => {
            if let Some(f) = INIT_FILES
                .iter()
                .find(|f| crate::outputs::same_file(&out.join(f), p))
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
    let cfg = crate::io::write_dir_atomic(&out, |dir| {
        init_checkpoint(dir, arch_config(size, arch), &corpus, seed)
    })?;
    eprintln!(
        "wrote {} ({} parameters, vocab {}, {} layers, hidden {})",
        out.display(),
        cfg.num_parameters(),
        cfg.vocab_size,
        cfg.num_hidden_layers,
        cfg.hidden_size
    );
    Ok(())
}
