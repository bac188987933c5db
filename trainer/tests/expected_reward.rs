//! `difinfo-train plot --expected-reward`: the paper's Figure 6 from a `score` summary and the
//! runs that made the policies (β and reward form read from their train_summary.json).

mod common;

use std::path::{Path, PathBuf};

use common::difinfo_train;
use difinfo_trainer::diag::expected_reward::{figure, table, RewardForm};

fn run_dir(root: &Path, name: &str, objective: &str, beta: f64, reference_free: bool) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let s = serde_json::json!({"objective": {"objective": objective, "beta": beta,
        "reference_free": reference_free}, "global_step": 3});
    std::fs::write(d.join("train_summary.json"), s.to_string()).unwrap();
    d
}

fn summary(root: &Path) -> PathBuf {
    let label = |l: &str, m: f64| {
        serde_json::json!({"label": l, "n": 8, "row_mean": m, "per_prompt": [],
            "prompts": {"n": 2, "mean": m, "std_error": 0.04, "ci_low": m - 0.5, "ci_high": m + 0.5}})
    };
    let s = serde_json::json!({"labels": [label("reference", 0.0), label("dpo-0.1", 1.5),
        label("dpo-0.3", 1.0), label("rf-0.1", -2.0)]});
    let f = root.join("scores.summary.json");
    std::fs::write(&f, s.to_string()).unwrap();
    f
}

#[test]
fn the_figure_pairs_labels_with_their_runs_beta_and_form() {
    let t = tempfile::tempdir().unwrap();
    let s = summary(t.path());
    let policies = vec![
        (
            "dpo-0.3".to_string(),
            run_dir(t.path(), "a", "dpo", 0.3, false),
        ),
        (
            "dpo-0.1".to_string(),
            run_dir(t.path(), "b", "dpo", 0.1, false),
        ),
        (
            "rf-0.1".to_string(),
            run_dir(t.path(), "c", "dpo", 0.1, true),
        ),
    ];
    let fig = figure(&s, &policies, Some("reference")).unwrap();
    let dpo = &fig.series[&RewardForm::LogRatio];
    // Sorted by β, each with its own label's reward.
    assert_eq!(
        dpo.iter()
            .map(|p| (p.beta, p.reward.mean))
            .collect::<Vec<_>>(),
        vec![(0.1, 1.5), (0.3, 1.0)]
    );
    let rf = &fig.series[&RewardForm::ReferenceFree];
    assert_eq!((rf[0].beta, rf[0].reward.interval), (0.1, (-2.5, -1.5)));
    assert_eq!(fig.baseline.as_ref().unwrap().mean, 0.0);
    let tab = table(&fig);
    assert!(
        tab.contains("| dpo-0.1 | β log π/π_ref | 0.1 | 8 | 1.5000 | [1.0000, 2.0000] |"),
        "{tab}"
    );
    assert!(tab.contains("| rf-0.1 | β log π | 0.1 |"), "{tab}");
}

#[test]
fn the_command_writes_the_png_and_prints_the_table() {
    let t = tempfile::tempdir().unwrap();
    let s = summary(t.path());
    let a = run_dir(t.path(), "a", "dpo", 0.1, false);
    let b = run_dir(t.path(), "b", "dpo", 0.1, true);
    let out = t.path().join("fig.png");
    let o = difinfo_train(&[
        "plot",
        "--expected-reward",
        s.to_str().unwrap(),
        "--policy",
        &format!("dpo-0.1={}", a.display()),
        "--policy",
        &format!("rf-0.1={}", b.display()),
        "--baseline",
        "reference",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("| reference | starting policy |"),
        "{stdout}"
    );
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn bad_inputs_name_the_file_and_field() {
    let t = tempfile::tempdir().unwrap();
    let s = summary(t.path());
    let sft = run_dir(t.path(), "sft", "sft", 0.1, false);
    let dpo = run_dir(t.path(), "dpo", "dpo", 0.1, false);
    let cases: Vec<(Vec<String>, String)> = vec![
        // A label the summary lacks.
        (
            vec![format!("nope={}", dpo.display())],
            "no label `nope`".into(),
        ),
        // A run of another objective.
        (
            vec![format!("dpo-0.1={}", sft.display())],
            "not a preference run".into(),
        ),
        // Not LABEL=RUN_DIR.
        (
            vec![dpo.display().to_string()],
            "expected LABEL=RUN_DIR".into(),
        ),
    ];
    for (policies, want) in cases {
        let mut args: Vec<String> = vec![
            "plot".into(),
            "--expected-reward".into(),
            s.display().to_string(),
        ];
        for p in policies {
            args.extend(["--policy".to_string(), p]);
        }
        args.extend([
            "--out".to_string(),
            t.path().join("x.png").display().to_string(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = difinfo_train(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&want), "{want}: {err}");
    }
    // Not score's summary format.
    std::fs::write(
        &s,
        r#"{"labels": [{"label": "dpo-0.1", "n": 3, "mean": 1.0}]}"#,
    )
    .unwrap();
    let o = difinfo_train(&[
        "plot",
        "--expected-reward",
        s.to_str().unwrap(),
        "--policy",
        &format!("dpo-0.1={}", dpo.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not a `score` summary: missing field `prompts`"),
        "{err}"
    );
    // A label of one prompt: no interval.
    std::fs::write(
        &s,
        r#"{"labels": [{"label": "dpo-0.1", "n": 3, "row_mean": 1.0, "per_prompt": [],
            "prompts": {"n": 1, "mean": 1.0, "std_error": null, "ci_low": null, "ci_high": null}}]}"#,
    )
    .unwrap();
    let o = difinfo_train(&[
        "plot",
        "--expected-reward",
        s.to_str().unwrap(),
        "--policy",
        &format!("dpo-0.1={}", dpo.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("label `dpo-0.1`: no interval") && err.contains("scores.summary.json"),
        "{err}"
    );
    assert!(!t.path().join("figure6.png").exists());
}
