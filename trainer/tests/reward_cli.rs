//! `reward` and `score` end to end through the binary, on a tiny random Llama with the shipped
//! preference data: a reward model trained from a causal LM (a `margin` column and
//! `center_rewards_coefficient`), TRL's metric names, an exact `--resume`, the checkpoint as a
//! sequence classifier; then `score` of `sample`-style rows and of a preference file with its
//! summary; a causal LM refused as a reward model.

mod common;

use std::path::{Path, PathBuf};

use common::difinfo_train as run;
use common::tiny_model;

fn prefs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "failed: {args:?}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The preference file with a `margin` column, and its texts as `sample` rows.
fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let (m, smp) = (dir.join("margins.jsonl"), dir.join("samples.jsonl"));
    let (mut a, mut b) = (String::new(), String::new());
    let text = std::fs::read_to_string(prefs()).unwrap();
    for (i, l) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        for (k, side) in ["chosen", "rejected"].iter().enumerate() {
            let row = serde_json::json!({"line": i + 1, "sample": k, "prompt": v["prompt"],
                                         "completion": v[side]});
            b.push_str(&format!("{row}\n"));
        }
        v["margin"] = serde_json::json!(0.25 * (i % 3) as f64);
        a.push_str(&format!("{v}\n"));
    }
    std::fs::write(&m, a).unwrap();
    std::fs::write(&smp, b).unwrap();
    (m, smp)
}

#[test]
fn reward_then_score() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (margins, samples) = data(tmp.path());
    let rm = tmp.path().join("rm");
    let common_args = |steps: &'static str| {
        vec![
            "--max-steps",
            steps,
            "--per-device-train-batch-size",
            "6",
            "--learning-rate",
            "1e-3",
            "--logging-steps",
            "1",
            "--save-steps",
            "1",
            "--center-rewards-coefficient",
            "0.01",
        ]
    };
    let mut args = vec![
        "reward",
        "--model",
        s(&model),
        "--data",
        s(&margins),
        "--output-dir",
        s(&rm),
    ];
    args.extend(common_args("2"));
    ok(&args);
    let recs = jsonl(&rm.join("metrics.jsonl"));
    assert_eq!(recs.len(), 2);
    for k in [
        "loss",
        "grad_norm",
        "learning_rate",
        "num_tokens",
        "min_reward",
        "mean_reward",
        "max_reward",
        "accuracy",
        "margin",
    ] {
        assert!(recs[1][k].is_number(), "no {k} in {}", recs[1]);
    }
    let r = &recs[1];
    assert!(r["min_reward"].as_f64() <= r["mean_reward"].as_f64());
    assert!(r["mean_reward"].as_f64() <= r["max_reward"].as_f64());
    assert!(r.get("rewards/chosen").is_none(), "DPO's names in {r}");
    // The checkpoint is a one-label sequence classifier without an LM head.
    let ck = rm.join("checkpoint-2");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert!(cfg["pad_token_id"].is_u64());
    // Resumed from step 1: the same step 2, bit for bit.
    let step2 = recs[1]["loss"].clone();
    ok(&["reward", "--resume", s(&rm.join("checkpoint-1"))]);
    let again = jsonl(&rm.join("metrics.jsonl"));
    assert_eq!(again.len(), 2);
    assert_eq!(again[1]["loss"], step2);

    // score: sample rows and a preference file's both sides, two labels, batches of 5.
    let out = tmp.path().join("rewards.jsonl");
    let table = ok(&[
        "score",
        "--reward-model",
        s(&ck),
        "--data",
        &format!("pol={}", s(&samples)),
        "--data",
        s(&prefs()),
        "--out",
        s(&out),
        "--batch-size",
        "5",
    ]);
    assert!(table.contains("pol") && table.contains("example_prefs/chosen"));
    let rows = jsonl(&out);
    assert_eq!(rows.len(), 4 * 36);
    // A text scores the same as a sample row and as a preference side.
    let pol = |line: u64, k: u64| {
        rows.iter()
            .find(|r| r["label"] == "pol" && r["line"] == line && r["sample"] == k)
            .unwrap()["reward"]
            .as_f64()
            .unwrap()
    };
    let pref = |line: u64, side: &str| {
        rows.iter()
            .find(|r| r["label"] == "example_prefs" && r["line"] == line && r["side"] == side)
            .unwrap()["reward"]
            .as_f64()
            .unwrap()
    };
    let first_line = rows.iter().find(|r| r["label"] == "example_prefs").unwrap()["line"]
        .as_u64()
        .unwrap();
    assert!((pol(1, 0) - pref(first_line, "chosen")).abs() < 1e-5);
    assert!((pol(1, 1) - pref(first_line, "rejected")).abs() < 1e-5);
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("rewards.summary.json")).unwrap(),
    )
    .unwrap();
    let labels = summary["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 3);
    assert_eq!(labels[0]["label"], "pol");
    assert_eq!(labels[0]["n"], 72);
    assert_eq!(labels[0]["prompts"]["n"], 36);
    assert_eq!(labels[0]["per_prompt"][0]["n"], 2);
    let (lo, mean, hi) = (
        labels[0]["prompts"]["ci_low"].as_f64().unwrap(),
        labels[0]["prompts"]["mean"].as_f64().unwrap(),
        labels[0]["prompts"]["ci_high"].as_f64().unwrap(),
    );
    assert!(lo < mean && mean < hi);

    // A causal LM is no reward model.
    let o = run(&[
        "score",
        "--reward-model",
        s(&model),
        "--data",
        s(&prefs()),
        "--out",
        s(&tmp.path().join("x.jsonl")),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("score.weight"), "{err}");
}
