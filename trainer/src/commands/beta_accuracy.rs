//! `difinfo-train beta-accuracy`: its options ([`BetaAccuracyArgs`]) and its run.

use std::path::PathBuf;

use candle_core::DType;
use rand::SeedableRng;
use serde_json::json;

use crate::commands::shared::{
    at_prompt, check_paths, check_prompts_fit, load_bundle, progress, report_stats,
    require_examples, DecodeArgs,
};
use crate::generate::SamplingParams;
use crate::io::write_json;
use crate::pretrained::load_model;
use crate::tokenize::load_prompts;
use crate::{parse_device, Error, Result};

/// Appendix K.1: per prompt, samples from the DID estimator π̂, the OLS fit of
/// log π̂(y) = β log(π(y)/π_ref(y)) + c, and the fraction of prompts with β ≥ 0.
#[derive(clap::Args)]
pub struct BetaAccuracyArgs {
    /// The DID estimator π̂ (checkpoint directory; its tokenizer is used for all three).
    #[arg(long)]
    pub estimator: PathBuf,
    /// The policy π.
    #[arg(long)]
    pub policy: PathBuf,
    /// The reference π_ref.
    #[arg(long)]
    pub reference: PathBuf,
    /// Prompts (JSONL: `prompt` string or messages, or `messages`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Samples per prompt (the paper uses 4).
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub decode: DecodeArgs,
    /// Output JSON (per prompt: x, y and the fit or "undetermined"; and the β-accuracy).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `difinfo-train beta-accuracy`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: BetaAccuracyArgs) -> Result<()> {
    let BetaAccuracyArgs {
        estimator,
        policy,
        reference,
        prompts,
        samples,
        out,
        decode: DecodeArgs {
            max_new_tokens,
            seed,
        },
    } = a;
    use crate::diag::beta_accuracy::prompt_fit;
    use difinfo::beta_accuracy::{beta_accuracy, BetaFit};
    if samples == 0 || max_new_tokens == 0 {
        return Err(Error::InvalidArgument(format!(
            "need --samples ≥ 1 and --max-new-tokens ≥ 1, got {samples} and {max_new_tokens}"
        )));
    }
    check_paths(
        &[("--out", &out)],
        &[("--prompts", &prompts)],
        &[
            ("--estimator", &estimator),
            ("--policy", &policy),
            ("--reference", &reference),
        ],
    )?;
    let device = parse_device("cpu")?;
    let bundle = load_bundle(&estimator)?;
    let ds = load_prompts(&bundle, &prompts, None, false)?;
    report_stats(&prompts, &ds.stats, None);
    require_examples(&prompts, &ds.stats)?;
    let (m_hat, m_pi, m_ref) = (
        load_model(&estimator, DType::F32, &device)?,
        load_model(&policy, DType::F32, &device)?,
        load_model(&reference, DType::F32, &device)?,
    );
    let option = ("--samples", samples);
    check_prompts_fit(&estimator, &m_hat, &prompts, &ds, option, max_new_tokens)?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pb = progress(ds.examples.len() as u64, "beta-accuracy");
    let (mut rows, mut fits) = (Vec::new(), Vec::new());
    println!("| line | β̂ | c | R² |\n|---:|---:|---:|---:|");
    for ex in &ds.examples {
        let (p, ids) = &ex.value;
        let f = prompt_fit(
            &m_hat,
            &m_pi,
            &m_ref,
            ids,
            samples,
            &params,
            bundle.stop_ids(),
            bundle.pad_id(),
            &mut rng,
        )
        .map_err(|e| at_prompt(&prompts, ex.line, e))?;
        match &f.fit {
            BetaFit::Determined(l) => {
                println!(
                    "| {} | {:.4} | {:.4} | {:.4} |",
                    ex.line, l.slope, l.intercept, l.r_squared
                )
            }
            BetaFit::Undetermined => println!("| {} | undetermined | | |", ex.line),
        }
        let mut row =
            serde_json::to_value(&f).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        row["prompt"] = p.prompt.to_json();
        row["line"] = json!(ex.line);
        rows.push(row);
        fits.push(f.fit);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let acc = beta_accuracy(&fits).ok();
    match &acc {
        Some(a) => println!(
            "β-accuracy: {:.4} over {} determined prompt(s) ({} undetermined)",
            a.accuracy, a.determined, a.undetermined
        ),
        None => println!("β-accuracy: undetermined (no prompt's samples determine β)"),
    }
    let doc = json!({ "beta_accuracy": acc, "samples": samples, "seed": seed, "prompts": rows });
    write_json(&out, &doc)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
