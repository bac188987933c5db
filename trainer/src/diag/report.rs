//! `difinfo-train report RUN_DIR`: the log-likelihood displacement story of a finished
//! preference run on one page (Section 4).
//!
//! From `RUN_DIR/metrics.jsonl` (TRL's names): `loss`, `logps/chosen`, `logps/rejected`,
//! `rewards/margins`, `rewards/accuracies` at the first and the last logged step, and whether
//! *log-likelihood displacement* happened — `logps/chosen` fell while `loss` fell. With a
//! model-entropy JSON in the run directory (`entropy.json`, as written by `difinfo-train
//! entropy`) its overall estimate is quoted; with a `did_entropy.json` (written by `difinfo-train
//! did-entropy`) in the run directory or one of its subdirectories, the DID entropy section:
//! `H(π̂)`, `H(π_ref)`, `H(π)`, which side of `H(π_ref)` the DID entropy lies on (Claim 4.1), and
//! the β-accuracy with a warning when it is below one half (Appendix K.1). Writes `report.png` (the training curves) and `report.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::io::write_atomic;
use crate::train::metrics::MetricsLog;
use crate::train::plot::plot;

/// First and last logged value of a metric.
fn ends(recs: &[serde_json::Map<String, serde_json::Value>], key: &str) -> Option<(f64, f64)> {
    let vals: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get(key)?.as_f64())
        .filter(|v| v.is_finite())
        .collect();
    Some((*vals.first()?, *vals.last()?))
}

/// Writes `report.md` and `report.png` into `run_dir`; returns the markdown path.
///
/// # Errors
/// A missing or empty `metrics.jsonl`, drawing and I/O errors.
pub fn report(run_dir: &Path) -> crate::Result<PathBuf> {
    let recs = MetricsLog::new(run_dir).read()?;
    if recs.is_empty() {
        return Err(crate::Error::InvalidArgument(format!(
            "{}: no metrics logged",
            run_dir.join("metrics.jsonl").display()
        )));
    }
    let png = run_dir.join("report.png");
    plot(run_dir, &png)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Log-likelihood displacement report: `{}`\n",
        run_dir.display()
    );
    let _ = writeln!(md, "![training curves](report.png)\n");
    let _ = writeln!(
        md,
        "| metric | first logged | last logged | change |\n|---|---:|---:|---:|"
    );
    for key in [
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        if let Some((a, b)) = ends(&recs, key) {
            let _ = writeln!(md, "| `{key}` | {a:.4} | {b:.4} | {:+.4} |", b - a);
        }
    }
    let loss = ends(&recs, "loss");
    let chosen = ends(&recs, "logps/chosen");
    // A change needs two logged steps: one row is its own first and last.
    let both = |r: &serde_json::Map<String, serde_json::Value>| {
        ["loss", "logps/chosen"].iter().all(|k| {
            r.get(*k)
                .and_then(serde_json::Value::as_f64)
                .is_some_and(f64::is_finite)
        })
    };
    let rows = recs.iter().filter(|r| both(r)).count();
    let verdict = match (loss, chosen) {
        (Some(_), Some(_)) if rows < 2 => format!(
            "**Log-likelihood displacement: too few logged steps to conclude.** {} holds {rows} \
             row with `loss` and `logps/chosen`; a change needs at least 2 logged steps (log \
             more often with --logging-steps, or train longer).",
            run_dir.join("metrics.jsonl").display()
        ),
        (Some((l0, l1)), Some((c0, c1))) if l1 < l0 && c1 < c0 => format!(
            "**Log-likelihood displacement: yes.** The loss fell ({l0:.4} → {l1:.4}) while the chosen \
             responses' log-probability also fell ({c0:.2} → {c1:.2})."
        ),
        (Some((l0, l1)), Some((c0, c1))) => format!(
            "**Log-likelihood displacement: no.** loss {l0:.4} → {l1:.4}, logps/chosen {c0:.2} → {c1:.2}."
        ),
        _ => "No `loss` / `logps/chosen` in the metrics (not a preference run?).".to_string(),
    };
    let _ = writeln!(md, "\n{verdict}\n");
    let _ = writeln!(
        md,
        "The paper (Section 4) ties displacement to a high-entropy (smoothing) differential \
         information distribution. Note that `logps/chosen` is a mean over the data's chosen \
         responses: if they were sampled from π_ref, it falls for any π ≠ π_ref by Gibbs' \
         inequality; the paper's distinction shows at π_ref's high-probability responses."
    );
    let entropy = run_dir.join("entropy.json");
    if let Ok(text) = std::fs::read_to_string(&entropy) {
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::Error::InvalidArgument(format!("{}: {e}", entropy.display())))?;
        if let (Some(h), Some(se)) = (
            v["overall"]["entropy"].as_f64(),
            v["overall"]["stderr"].as_f64(),
        ) {
            let _ = writeln!(
                md,
                "\nMeasured entropy (`entropy.json`): {h:.4} ± {se:.4} nats."
            );
            if let Ok([lo, hi]) = difinfo::entropy::normal_interval(h, se, 0.95) {
                let _ = writeln!(md, "95 % confidence interval: [{lo:.4}, {hi:.4}] nats.");
            }
        }
    }
    if let Some(did) = find_did_entropy(run_dir) {
        did_entropy_section(&mut md, run_dir, &did)?;
    }
    let path = run_dir.join("report.md");
    write_atomic(&path, |tmp| {
        std::fs::write(tmp, &md).map_err(|e| crate::Error::io(tmp, e))
    })?;
    Ok(path)
}

/// `RUN_DIR/did_entropy.json`, or one in a subdirectory (e.g. `did-entropy --output-dir
/// RUN_DIR/did`), the first in name order.
fn find_did_entropy(run_dir: &Path) -> Option<PathBuf> {
    use crate::diag::did_entropy::REPORT_FILE;
    let top = run_dir.join(REPORT_FILE);
    if top.is_file() {
        return Some(top);
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join(REPORT_FILE)))
        .filter(|p| p.is_file())
        .collect();
    subs.sort();
    subs.into_iter().next()
}

/// The DID entropy paragraph from a `did-entropy` result.
fn did_entropy_section(md: &mut String, run_dir: &Path, path: &Path) -> crate::Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let get = |k: &str| -> Option<(f64, f64)> {
        Some((v[k]["entropy"].as_f64()?, v[k]["stderr"].as_f64()?))
    };
    let (Some(d), Some(r), Some(p)) = (
        get("did_entropy"),
        get("reference_entropy"),
        get("policy_entropy"),
    ) else {
        return Err(crate::Error::InvalidArgument(format!(
            "{}: not a did-entropy result (no did_entropy / reference_entropy / policy_entropy)",
            path.display()
        )));
    };
    let shown = path.strip_prefix(run_dir).unwrap_or(path).display();
    let _ = writeln!(
        md,
        "
## DID entropy (`{shown}`, Appendix K)

| | entropy (nats) | stderr |\n|---|---:|---:|\n\
         | H(π̂): the DID entropy estimate | {:.4} | {:.4} |\n| H(π_ref) | {:.4} | {:.4} |\n| H(π) | {:.4} | {:.4} |\n",
        d.0, d.1, r.0, r.1, p.0, p.1
    );
    let side = if d.0 > r.0 {
        "higher than the reference's: a high-entropy DID, which Claim 4.1 ties to policy smoothing"
    } else {
        "not higher than the reference's: a low-entropy DID, which Claim 4.1 ties to policy sharpening"
    };
    let _ = writeln!(md, "The DID entropy is {side}.");
    if let Ok((z, p)) = difinfo::entropy::difference_test(d, r) {
        let _ = writeln!(
            md,
            "Test of H(π̂) = H(π_ref) (independent samples, normal approximation): \
             z = {z:.2}, two-sided p = {p:.3}{}.",
            if p < 0.05 {
                ""
            } else {
                "; the difference is within the Monte Carlo noise at the 5 % level (more \
                 --samples or evaluation prompts would settle the side)"
            }
        );
    }
    let acc = &v["beta_accuracy"];
    match (acc["accuracy"].as_f64(), acc["determined"].as_u64()) {
        (Some(a), Some(n)) => {
            let _ = write!(
                md,
                "\nβ-accuracy of π̂ (Appendix K.1): {a:.4} over {n} prompt(s)."
            );
            if a < 0.5 {
                let _ = write!(
                    md,
                    " Below one half: π̂ is far from the form log π̂ = β log(π/π_ref) + c of a \
                     converged estimator, so this DID entropy estimate is unreliable (train π̂ longer \
                     or on more pairs)."
                );
            }
            let _ = writeln!(md);
        }
        _ => {
            let _ = writeln!(
                md,
                "\nβ-accuracy of π̂: undetermined (no prompt's samples determine β; e.g. π = π_ref)."
            );
        }
    }
    Ok(())
}
