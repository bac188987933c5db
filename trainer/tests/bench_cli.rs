//! `bench` through the binary on a tiny random Llama: `--data` trains on the pairs of a
//! preference file tokenized as `dpo` tokenizes them and reports their padding share, which
//! `--json` writes with the rest of the table; `--data` needs `--model` (its tokenizer) and
//! replaces `--seq`.

mod common;

use std::path::{Path, PathBuf};

use common::difinfo_train as run;
use common::tiny_model;

fn prefs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `difinfo-train ARGS`, which must succeed; its standard output.
fn ok(args: &[&str]) -> String {
    let o = run(args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{args:?}: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn bench_on_a_data_file_reports_its_padding() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let json = dir.path().join("bench.json");
    let out = ok(&[
        "bench",
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--objective",
        "dpo,dpo-pg",
        "--json",
        s(&json),
    ]);
    assert!(out.contains("36 pairs"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let share = r["padding_share"].as_f64().unwrap();
        // The shipped pairs differ in length: real batches carry padding, never all of it.
        assert!(share > 0.0 && share < 0.9, "{r}");
        assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
        let row = format!("| {:.1} % |", 100.0 * share);
        assert!(out.contains(&row), "{row} not in\n{out}");
    }
    // DPO-PG pads chosen and rejected apart: never more padding than one shared batch.
    let (dpo, pg) = (
        rows[0]["padding_share"].as_f64().unwrap(),
        rows[1]["padding_share"].as_f64().unwrap(),
    );
    assert_eq!(rows[0]["tokens_per_step"], rows[1]["tokens_per_step"]);
    assert!(pg <= dpo, "dpo-pg {pg} > dpo {dpo}");
}

#[test]
fn bench_data_needs_a_model_and_replaces_seq() {
    for args in [
        vec!["bench", "--data", "x.jsonl"],
        vec!["bench", "--model", "m", "--data", "x.jsonl", "--seq", "64"],
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--data"), "{args:?}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let missing = dir.path().join("missing.jsonl");
    let o = run(&["bench", "--model", s(&model), "--data", s(&missing)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.jsonl"), "{err}");
}

/// `--profile` on random pairs without padding: the layers' matrix products run exactly the
/// model's FLOPs (forward once, backward twice: input and weight gradients), the regions add
/// up to no more than the timed steps, and the table is printed.
#[test]
fn bench_profile_counts_the_products_flops_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let (batch, seq, steps) = (2usize, 16usize, 2usize);
    let out = ok(&[
        "bench",
        "--size",
        "tiny",
        "--batch",
        &batch.to_string(),
        "--seq",
        &seq.to_string(),
        "--steps",
        &steps.to_string(),
        "--warmup",
        "1",
        "--profile",
        "--json",
        s(&json),
    ]);
    assert!(out.contains("where a dpo step went"), "{out}");
    assert!(out.contains("| gemm · decoder layer forward |"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = &v["rows"][0];
    let regions = row["profile"]["regions"].as_object().unwrap();
    let cfg = difinfo_trainer::init::size_config(difinfo_trainer::init::ModelSize::Tiny);
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let dq = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let dkv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
    let tokens = (2 * batch * seq * steps) as f64;
    let per_token = 2.0 * (h * dq + 2.0 * h * dkv + dq * h + 3.0 * h * i);
    let want = cfg.num_hidden_layers as f64 * tokens * per_token;
    let flops = |k: &str| regions[k]["flops"].as_f64().unwrap();
    assert_eq!(flops("gemm · decoder layer forward"), want);
    assert_eq!(flops("gemm · decoder layer backward"), 2.0 * want);
    let covered: f64 = regions
        .values()
        .map(|r| r["seconds"].as_f64().unwrap())
        .sum();
    let timed = row["seconds_per_step"].as_f64().unwrap() * steps as f64;
    assert!(
        covered > 0.0 && covered <= timed * (1.0 + 1e-9),
        "{covered} > {timed}"
    );
}
