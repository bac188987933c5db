//! The training commands end to end through the binary, on a tiny random Llama with the
//! shipped example data: SFT then DPO then plot; exact `--resume`; a non-finite stop that keeps
//! the last checkpoint; bad input; TOML config under command-line overrides.

mod common;

use std::path::{Path, PathBuf};

use common::difinfo_train as run;
use common::tiny_model;

fn prefs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "failed: {args:?}");
    String::from_utf8(o.stdout).unwrap()
}

fn records(run_dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(r: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r:?}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sft_then_dpo_then_dpo_pg_then_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let sft = common::sft_from_prefs(tmp.path());
    let sft_dir = tmp.path().join("sft");
    let out = ok(&[
        "sft",
        "--model",
        s(&model),
        "--data",
        s(&sft),
        "--output-dir",
        s(&sft_dir),
        "--max-steps",
        "6",
        "--learning-rate",
        "2e-3",
        "--lr-scheduler-type",
        "constant",
        "--logging-steps",
        "1",
        "--completion-only-loss",
        "false",
    ]);
    assert!(out.contains("sft: done, 6 steps"), "{out}");
    let r = records(&sft_dir);
    assert_eq!(r.len(), 6);
    assert!(f(&r[5], "loss") < f(&r[0], "loss"), "SFT loss did not fall");
    let sft_model = sft_dir.join("checkpoint-6");
    assert!(sft_model.join("config.json").exists() && sft_model.join("tokenizer.json").exists());
    let cfg: toml::Table = std::fs::read_to_string(sft_dir.join("train_config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cfg["completion_only_loss"].as_bool(), Some(false));

    let dpo_dir = tmp.path().join("dpo");
    let out = ok(&[
        "dpo",
        "--model",
        s(&sft_model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&dpo_dir),
        "--max-steps",
        "8",
        "--learning-rate",
        "1e-3",
        "--optim",
        "rmsprop",
        "--lr-scheduler-type",
        "constant",
        "--logging-steps",
        "1",
        "--max-length",
        "128",
    ]);
    assert!(out.contains("dpo: done, 8 steps"), "{out}");
    let r = records(&dpo_dir);
    assert_eq!(r.len(), 8);
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "epoch",
        "tokens_per_second",
    ] {
        assert!(r[0].contains_key(k), "missing {k}");
    }
    assert!((f(&r[0], "loss") - std::f64::consts::LN_2).abs() < 1e-3);
    assert!(
        f(&r[7], "loss") < f(&r[0], "loss") - 0.02,
        "DPO loss did not fall"
    );
    assert!(dpo_dir.join("metrics.csv").exists() && dpo_dir.join("train_summary.json").exists());

    let pg_dir = tmp.path().join("pg");
    let out = ok(&[
        "dpo",
        "--objective",
        "dpo-pg",
        "--model",
        s(&sft_model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&pg_dir),
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-3",
        "--optim",
        "sgd",
        "--logging-steps",
        "1",
    ]);
    assert!(
        out.contains("dpo-pg: done, 3 steps") && out.contains("projection active in"),
        "{out}"
    );
    assert!(records(&pg_dir)[0].contains_key("projection/active_fraction"));

    let out = ok(&["plot", s(&dpo_dir)]);
    assert!(out.contains("6 panels"), "{out}");
    let png = std::fs::read(dpo_dir.join("metrics.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let out = ok(&["plot", s(&sft_dir), "--out", s(&tmp.path().join("sft.png"))]);
    assert!(out.contains("3 panels"), "{out}");
}

fn strip(
    mut r: Vec<serde_json::Map<String, serde_json::Value>>,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    for x in &mut r {
        x.remove("tokens_per_second");
    }
    r
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let data = prefs();
    let common = [
        "--data",
        s(&data),
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant_with_warmup",
        "--warmup-steps",
        "2",
        "--per-device-train-batch-size",
        "3",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
        "--max-length",
        "96",
    ];
    let go = |dir: &Path, steps: &str| {
        let mut v = vec![
            "dpo",
            "--model",
            s(&model),
            "--output-dir",
            s(dir),
            "--max-steps",
            steps,
        ];
        v.extend_from_slice(&common);
        ok(&v);
    };
    go(&a, "6");
    go(&b, "3");
    // Only the run directory and the new total: model, data and options come from the run.
    let out = ok(&["dpo", "--resume", s(&b), "--max-steps", "6"]);
    assert!(out.contains("dpo: done, 6 steps"), "{out}");
    let (ra, rb) = (strip(records(&a)), strip(records(&b)));
    assert_eq!(ra.len(), 6);
    assert_eq!(ra, rb);
    let w = |d: &Path| std::fs::read(d.join("checkpoint-6/model.safetensors")).unwrap();
    assert!(w(&a) == w(&b), "final weights differ");
}

fn dir_bytes(d: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn non_finite_stop_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run_dir = tmp.path().join("run");
    ok(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&run_dir),
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
    ]);
    let ck2 = run_dir.join("checkpoint-2");
    let before = dir_bytes(&ck2);
    // A learning rate of 1e38 sends the weights to ~1e38: their norm overflows, so the save
    // after step 3 must refuse to write them.
    let o = run(&[
        "dpo",
        "--resume",
        s(&run_dir),
        "--max-steps",
        "4",
        "--learning-rate",
        "1e38",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("non-finite") && err.contains("step 3") && err.contains("checkpoint-2"),
        "{err}"
    );
    assert!(!run_dir.join("checkpoint-3").exists());
    assert_eq!(dir_bytes(&ck2), before, "checkpoint-2 changed");
    // The kept checkpoint resumes.
    let out = ok(&[
        "dpo",
        "--resume",
        s(&run_dir),
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-3",
    ]);
    assert!(out.contains("dpo: done, 3 steps"), "{out}");
}

#[test]
fn bad_input_is_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let text = std::fs::read_to_string(prefs()).unwrap();
    let mut lines: Vec<&str> = text.lines().take(8).collect();
    lines.insert(2, "{\"prompt\": \"x\", \"chosen\": 3}");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let o = run(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&bad),
        "--output-dir",
        s(&tmp.path().join("r1")),
        "--max-steps",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.jsonl") && err.contains(":3"), "{err}");
    let o = run(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&bad),
        "--output-dir",
        s(&tmp.path().join("r2")),
        "--max-steps",
        "1",
        "--skip-invalid",
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 invalid"));
    assert!(
        tmp.path().join("bad.errors.jsonl").exists()
            || tmp.path().join("bad.jsonl.errors.jsonl").exists()
    );
    // Conversational data goes through the chat template.
    let chat = prefs().with_file_name("example_prefs_chat.jsonl");
    let out = ok(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&chat),
        "--output-dir",
        s(&tmp.path().join("r3")),
        "--max-steps",
        "2",
        "--reference-free",
    ]);
    assert!(out.contains("ref-free: done, 2 steps"), "{out}");
    // A missing model directory is an error, not a panic.
    let o = run(&[
        "dpo",
        "--model",
        s(&tmp.path().join("nope")),
        "--data",
        s(&bad),
        "--max-steps",
        "1",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).starts_with("error:"));
}

#[test]
fn toml_config_under_command_line_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let cfg = tmp.path().join("dpo.toml");
    std::fs::write(
        &cfg,
        "beta = 0.5\nlearning_rate = 1e-4\noptim = \"rmsprop\"\nmax_steps = 2\nlogging_steps = 1\nloss_type = \"hinge\"\n",
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    ok(&[
        "dpo",
        "--config",
        s(&cfg),
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&run_dir),
        "--beta",
        "0.25",
    ]);
    let t: toml::Table = std::fs::read_to_string(run_dir.join("train_config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(t["beta"].as_float(), Some(0.25));
    assert_eq!(t["learning_rate"].as_float(), Some(1e-4));
    assert_eq!(t["optim"].as_str(), Some("rmsprop"));
    assert_eq!(t["loss_type"].as_str(), Some("hinge"));
    assert_eq!(t["max_steps"].as_integer(), Some(2));
    assert_eq!(t["per_device_train_batch_size"].as_integer(), Some(8));
    assert_eq!(records(&run_dir).len(), 2);
    // A fresh run into a directory with checkpoints is refused (resume or overwrite).
    let o = run(&[
        "dpo",
        "--config",
        s(&cfg),
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&run_dir),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("overwrite_output_dir"));
}

#[test]
fn bf16_mixed_precision_trains_f32_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let d = tmp.path().join("run");
    let out = ok(&[
        "dpo",
        "--bf16",
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--output-dir",
        s(&d),
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
    ]);
    assert!(out.contains("dpo: done, 2 steps"), "{out}");
    let r = records(&d);
    // Policy and reference are the same bf16 computation at step 1.
    assert!((f(&r[0], "loss") - std::f64::consts::LN_2).abs() < 1e-3);
    assert!(f(&r[1], "loss").is_finite() && f(&r[1], "grad_norm") > 0.0);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("checkpoint-2/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
}
