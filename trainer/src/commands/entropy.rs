//! `difinfo-train entropy`: its options ([`EntropyArgs`]) and its run.

use std::path::PathBuf;

use rand::SeedableRng;
use serde_json::json;

use crate::commands::shared::{
    at_prompt, check_paths, check_prompts_fit, model_and_prompts, progress, DecodeArgs, ModelArgs,
    PromptArgs,
};
use crate::io::write_json;
use crate::{Error, Result};

/// Monte Carlo sequence entropy per prompt (Appendix K): pure ancestral sampling over the
/// whole vocabulary, stopping at EOS or after --max-new-tokens; with standard errors and the
/// mean exact next-token entropy.
#[derive(clap::Args)]
pub struct EntropyArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub prompts: PromptArgs,
    /// Samples per prompt (K ≥ 2).
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub decode: DecodeArgs,
    /// Sampling temperature T > 0: the entropy estimated is that of softmax(logits / T).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Output JSON (per prompt: prompt, entropy, stderr, ci95, samples, token_entropy; and overall
    /// with its 95 % interval).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `difinfo-train entropy`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: EntropyArgs) -> Result<()> {
    let EntropyArgs {
        model,
        prompts,
        samples,
        temperature,
        out,
        decode: DecodeArgs {
            max_new_tokens,
            seed,
        },
    } = a;
    use crate::diag::entropy::{overall, overall_ci95, prompt_entropy};
    if samples < 2 || max_new_tokens == 0 {
        return Err(Error::InvalidArgument(format!(
            "need --samples ≥ 2 (for a standard error) and --max-new-tokens ≥ 1, got {samples} and {max_new_tokens}"
        )));
    }
    check_paths(
        &[("--out", &out)],
        &[("--prompts", &prompts.prompts)],
        &[("--model", &model.model)],
    )?;
    let (bundle, ds, m) = model_and_prompts(&model, &prompts, false, None)?;
    let prompts = prompts.prompts;
    let option = ("--samples", samples);
    check_prompts_fit(&model.model, &m, &prompts, &ds, option, max_new_tokens)?;
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
        "overall": {
            "entropy": mean,
            "stderr": se,
            "ci95": overall_ci95(mean, se)?,
            "prompts": ests.len(),
        },
        "prompts": rows,
    });
    write_json(&out, &doc)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
