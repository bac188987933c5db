//! `difinfo-train sample`: its options ([`SampleArgs`]) and its run.

use std::path::PathBuf;

use rand::SeedableRng;
use serde_json::json;

use crate::commands::shared::{
    at_prompt, check_paths, check_prompts_fit, model_and_prompts, outputs_with_report, progress,
    DecodeArgs, ModelArgs, PromptArgs,
};
use crate::generate::{generate, SamplingParams};
use crate::io::write_jsonl_from;
use crate::records::InvalidRecords;
use crate::{Error, Result};

/// Sample completions of prompts, with their summed log-probs under the model.
#[derive(clap::Args)]
pub struct SampleArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub prompts: PromptArgs,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus (top-p) mass in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub decode: DecodeArgs,
    /// Output JSONL (one object per sample).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub invalid: InvalidRecords,
}

/// Runs `difinfo-train sample`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: SampleArgs) -> Result<()> {
    let SampleArgs {
        model,
        prompts,
        n,
        temperature,
        top_p,
        out,
        invalid,
        decode: DecodeArgs {
            max_new_tokens,
            seed,
        },
    } = a;
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
        &outputs_with_report(&out, &invalid),
        &[("--prompts", &prompts.prompts)],
        &[("--model", &model.model)],
    )?;
    let report = invalid.report_for(&prompts.prompts);
    let (bundle, ds, m) = model_and_prompts(&model, &prompts, invalid.skip_invalid, Some(&report))?;
    let prompts = prompts.prompts;
    check_prompts_fit(&model.model, &m, &prompts, &ds, ("--n", n), max_new_tokens)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pb = progress(ds.examples.len() as u64, "sample");
    // Each prompt's rows go to the (temporary) output as they are drawn: memory holds one
    // prompt's samples, never the whole file's.
    let mut count = 0usize;
    write_jsonl_from(&out, |emit| {
        for ex in &ds.examples {
            let (p, ids) = &ex.value;
            let samples = generate(&m, ids, n, &params, bundle.stop_ids(), &mut rng)
                .map_err(|e| at_prompt(&prompts, ex.line, e))?;
            for (k, s) in samples.into_iter().enumerate() {
                emit(&json!({
                    "line": ex.line,
                    "sample": k,
                    "prompt": p.prompt.to_json(),
                    "prompt_ids": ids,
                    "completion": bundle.decode(&s.completion_ids, true)?,
                    "completion_ids": s.completion_ids,
                    "logp": s.logp,
                    "finished": s.finished,
                }))?;
                count += 1;
            }
            pb.inc(1);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {count} samples to {}", out.display());
    Ok(())
}
