//! `difinfo-train resample-rejected`: its options ([`ResampleRejectedArgs`]) and its run.

use std::path::PathBuf;

use candle_core::DType;
use difinfo::beta::Beta;
use rand::SeedableRng;
use serde_json::json;

use crate::commands::shared::{check_paths, load_bundle, progress};
use crate::io::write_jsonl;
use crate::pretrained::load_model;
use crate::{parse_device, Error, Result};

/// Pick each prompt's rejected response from candidates drawn from π_ref by
/// sampling-importance-resampling toward Eq. 1's π_l ∝ π_ref^{1+β} π*^{−β}, with weights
/// (π_ref(y)/π*(y))^β; writes TRL preference lines (prompt, chosen, rejected, ess).
#[derive(clap::Args)]
pub struct ResampleRejectedArgs {
    /// The reference policy π_ref (checkpoint directory).
    #[arg(long)]
    pub reference: PathBuf,
    /// The stronger model that approximates π* (checkpoint directory).
    #[arg(long)]
    pub target: PathBuf,
    /// Candidates (JSONL: `prompt`, `chosen`, `candidates`: a list of completions drawn from π_ref).
    #[arg(long)]
    pub candidates: PathBuf,
    /// β of Eq. 1 (the DPO β the data is meant for).
    #[arg(long)]
    pub beta: f64,
    /// Warn when a prompt's effective sample size is below this.
    #[arg(long, default_value_t = 2.0)]
    pub min_ess: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output JSONL (TRL standard preference format plus `ess` and `weight`).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `difinfo-train resample-rejected`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: ResampleRejectedArgs) -> Result<()> {
    let ResampleRejectedArgs {
        reference,
        target,
        candidates,
        beta,
        min_ess,
        seed,
        out,
    } = a;
    use crate::diag::resample::{resample, score_candidates};
    // The library's one check of β, named as given: `--beta -1: beta must be …`.
    let beta = Beta::new(beta)
        .map_err(|e| Error::InvalidArgument(format!("--beta {beta}: {e}")))?
        .get();
    if !(min_ess.is_finite() && min_ess >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--min-ess must be finite and ≥ 0, got {min_ess}"
        )));
    }
    check_paths(
        &[("--out", &out)],
        &[("--candidates", &candidates)],
        &[("--reference", &reference), ("--target", &target)],
    )?;
    let loaded =
        crate::records::read_records(&candidates, false, crate::records::parse_candidates_line)?;
    if loaded.examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no records (the file is empty)",
            candidates.display()
        )));
    }
    let device = parse_device("cpu")?;
    let (tok_ref, tok_tgt) = (load_bundle(&reference)?, load_bundle(&target)?);
    let m_ref = load_model(&reference, DType::F32, &device)?;
    let m_tgt = load_model(&target, DType::F32, &device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pb = progress(loaded.examples.len() as u64, "resample");
    let mut rows = Vec::new();
    let mut low = 0usize;
    println!("| line | candidates | picked | weight | ESS |");
    println!("|---:|---:|---:|---:|---:|");
    for ex in &loaded.examples {
        let set = &ex.value;
        let at =
            |e: Error| Error::InvalidArgument(format!("{}:{}: {e}", candidates.display(), ex.line));
        let lr = score_candidates(&m_ref, &tok_ref, set).map_err(at)?;
        let lt = score_candidates(&m_tgt, &tok_tgt, set).map_err(at)?;
        let r = resample(&lr, &lt, beta, &mut rng).map_err(at)?;
        println!(
            "| {} | {} | {} | {:.4} | {:.2} |",
            ex.line,
            set.candidates.len(),
            r.index,
            r.weight,
            r.ess
        );
        if r.ess < min_ess {
            low += 1;
        }
        rows.push(json!({
            "prompt": set.prompt.to_json(),
            "chosen": set.chosen.to_json(),
            "rejected": set.candidates[r.index].to_json(),
            "ess": r.ess,
            "weight": r.weight,
            "candidates": set.candidates.len(),
        }));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if low > 0 {
        eprintln!(
            "warning: {low} of {} prompt(s) have an effective sample size below {min_ess}: \
             their rejected response rests on few candidates (draw more, or lower --beta)",
            rows.len()
        );
    }
    let count = rows.len();
    write_jsonl(&out, rows)?;
    eprintln!("wrote {count} preference pairs to {}", out.display());
    Ok(())
}
