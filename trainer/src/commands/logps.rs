//! `difinfo-train logps`: its options ([`LogpsArgs`]) and its run.

use std::path::PathBuf;

use serde_json::json;

use crate::commands::shared::{
    accept_dataset, check_paths, check_vocab, load_bundle_with, outputs_with_report, progress,
    report_provenance, ModelArgs, TokenizeArgs,
};
use crate::io::write_jsonl;
use crate::logps::preference_logps;
use crate::pretrained::load_model;
use crate::records::InvalidRecords;
use crate::tokenize::load_preferences;
use crate::{Error, Result};

/// Write chosen/rejected completion log-probs of a preference dataset as JSONL.
#[derive(clap::Args)]
pub struct LogpsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// Preference data (JSONL: prompt, chosen, rejected; strings or message lists).
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL (one object per kept example).
    #[arg(long)]
    pub out: PathBuf,
    /// Preference pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub tok: TokenizeArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub invalid: InvalidRecords,
}

/// Runs `difinfo-train logps`.
///
/// # Errors
/// Bad options, data, model and I/O errors, naming the option, file and line.
pub fn run(a: LogpsArgs) -> Result<()> {
    let LogpsArgs {
        model,
        data,
        out,
        batch_size,
        tok,
        invalid,
    } = a;
    let skip_invalid = invalid.skip_invalid;
    if batch_size == 0 {
        return Err(Error::InvalidArgument(
            "--batch-size must be positive".into(),
        ));
    }
    check_paths(
        &outputs_with_report(&out, &invalid),
        &[("--data", &data)],
        &[("--model", &model.model)],
    )?;
    let report = invalid.report_for(&data);
    let (device, dtype) = model.placement.parse()?;
    let bundle = load_bundle_with(&model.model, tok.tokenizer.tokenizer_compat)?;
    report_provenance(&bundle);
    let ds = load_preferences(&bundle, &data, &tok.options(), skip_invalid)?;
    accept_dataset(&data, &ds, skip_invalid, Some(&report))?;
    let m = load_model(&model.model, dtype, &device)?;
    check_vocab(
        &model.model,
        &m,
        &data,
        ds.examples.iter().flat_map(|e| {
            let p = &e.value;
            [
                (e.line, "prompt", &p.prompt_ids[..]),
                (e.line, "chosen", &p.chosen_ids[..]),
                (e.line, "rejected", &p.rejected_ids[..]),
            ]
        }),
    )?;
    let pb = progress(ds.examples.len() as u64, "logps");
    let lps = preference_logps(
        &m,
        &ds.examples,
        &data,
        batch_size,
        bundle.pad_id(),
        |done| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    write_jsonl(
        &out,
        ds.examples.iter().zip(&lps).map(|(e, lp)| {
            json!({
                "line": e.line,
                "prompt_ids": e.value.prompt_ids,
                "chosen_ids": e.value.chosen_ids,
                "rejected_ids": e.value.rejected_ids,
                "chosen_logps": lp.chosen,
                "rejected_logps": lp.rejected,
            })
        }),
    )?;
    eprintln!("wrote {} rows to {}", lps.len(), out.display());
    Ok(())
}
