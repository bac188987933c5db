//! The `difinfo-train` binary end to end: the README demo, outputs, errors and exit codes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run difinfo-train")
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
}

use common::jsonl;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn readme_demo_init_logps_sample() {
    let dir = common::TempDir::new();
    let model = dir.join("tiny");
    let o = run(&["init", "--size", "tiny", "--out", s(&model)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(model.join(f).exists(), "{f}");
    }
    let cfg =
        difinfo_trainer::config_json::ModelConfig::from_file(&model.join("config.json")).unwrap();
    let n = cfg.num_parameters();
    assert!((800_000..1_300_000).contains(&n), "tiny has {n} parameters");

    for (file, rows) in [
        ("example_prefs.jsonl", 36),
        ("example_prefs_chat.jsonl", 24),
    ] {
        let out = dir.join(&format!("{file}.logps"));
        let o = run(&[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&data(file)),
            "--out",
            s(&out),
            "--batch-size",
            "4",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = jsonl(&out);
        assert_eq!(v.len(), rows);
        for r in &v {
            for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
                assert!(!r[k].as_array().unwrap().is_empty(), "{k}");
            }
            let c = r["chosen_logps"].as_f64().unwrap();
            assert!(c < 0.0 && c.is_finite());
        }
        // Batch size does not change the numbers.
        let out1 = dir.join("bs1.jsonl");
        assert!(run(&[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&data(file)),
            "--out",
            s(&out1),
            "--batch-size",
            "1"
        ])
        .status
        .success());
        for (a, b) in v.iter().zip(jsonl(&out1)) {
            let d =
                (a["chosen_logps"].as_f64().unwrap() - b["chosen_logps"].as_f64().unwrap()).abs();
            assert!(d < 1e-3, "batch size changed a log-prob by {d}");
        }
    }

    let out = dir.join("samples.jsonl");
    let o = run(&[
        "sample",
        "--model",
        s(&model),
        "--prompts",
        s(&data("example_prompts.jsonl")),
        "--n",
        "2",
        "--temperature",
        "0.7",
        "--max-new-tokens",
        "5",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = jsonl(&out);
    assert_eq!(v.len(), 20);
    assert!(v
        .iter()
        .all(|r| r["completion_ids"].as_array().unwrap().len() <= 5
            && r["logp"].as_f64().unwrap() <= 0.0));
}

#[test]
fn bad_data_fails_with_location_and_skip_invalid_reports() {
    let dir = common::TempDir::new();
    let model = dir.join("m");
    assert!(run(&["init", "--out", s(&model)]).status.success());
    let bad = common::write_lines(
        &dir,
        "bad.jsonl",
        &[
            r#"{"prompt": "a", "chosen": " b", "rejected": " c"}"#,
            r#"{"prompt": "a", "chosen": " b"}"#,
        ],
    );
    let out = dir.join("o.jsonl");
    let o = run(&[
        "logps",
        "--model",
        s(&model),
        "--data",
        s(&bad),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "error: {}:2: field `rejected`: missing",
            bad.display()
        )),
        "{err}"
    );
    assert!(!out.exists(), "no partial output on failure");

    let report = dir.join("report.jsonl");
    let o = run(&[
        "logps",
        "--model",
        s(&model),
        "--data",
        s(&bad),
        "--out",
        s(&out),
        "--skip-invalid",
        "--error-report",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("2 records, 1 kept, 0 dropped"));
    assert_eq!(jsonl(&out).len(), 1);
    assert_eq!(jsonl(&report)[0]["line"], 2);

    let o = run(&[
        "logps",
        "--model",
        s(&dir.join("nope")),
        "--data",
        s(&bad),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: tokenizer:"));
}

#[test]
fn help_shows_every_default() {
    let o = run(&["logps", "--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    for want in [
        "[default: 8]",
        "[default: 1024]",
        "[default: none]",
        "[default: keep-start]",
        "[default: common-prefix]",
        "[default: f32]",
        "[default: cpu]",
    ] {
        assert!(h.contains(want), "logps --help lacks {want}:\n{h}");
    }
    let o = run(&["sample", "--help"]);
    let h = String::from_utf8_lossy(&o.stdout);
    for want in [
        "[default: 4]",
        "[default: 1]",
        "[default: 64]",
        "[default: 0]",
    ] {
        assert!(h.contains(want), "sample --help lacks {want}:\n{h}");
    }
    let o = run(&["init", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("[default: tiny]"));
}

#[test]
fn padding_free_is_a_training_option() {
    for cmd in ["sft", "dpo"] {
        let o = run(&[cmd, "--help"]);
        let h = String::from_utf8_lossy(&o.stdout);
        assert!(
            h.contains("--padding-free"),
            "{cmd} --help lacks --padding-free:\n{h}"
        );
        assert!(
            h.contains("padding_free"),
            "{cmd} --help lacks TRL's name:\n{h}"
        );
    }
}
