//! `difinfo-train build-pairs` end to end through the binary: the join of samples and scores,
//! the choice of chosen and rejected, ties, prompts of one completion, unmatched rows,
//! non-finite rewards, labels, and the Parquet output read back by the trainer's own reader.

mod common;

use std::path::{Path, PathBuf};

use common::{difinfo_train as run, jsonl, write_lines, TempDir};
use difinfo_trainer::records::{parse_preference_line, read_records, PreferenceExample, Text};
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `sample` output row.
fn sample(line: u64, k: u64, prompt: Value, completion: &str) -> String {
    json!({"line": line, "sample": k, "prompt": prompt, "prompt_ids": [1, 2],
           "completion": completion, "completion_ids": [3], "logp": -1.5, "finished": true})
    .to_string()
}

/// A `score` output row.
fn score(line: u64, k: u64, reward: f64) -> String {
    json!({"line": line, "sample": k, "reward": reward}).to_string()
}

/// Samples of three string prompts: line 1 with three completions (rewards 0.5, 2.0, −1.0),
/// line 2 with one, line 3 with two of equal reward.
fn plain_files(dir: &TempDir) -> (PathBuf, PathBuf) {
    let samples = [
        sample(1, 0, json!("Name a colour."), "blue"),
        sample(1, 1, json!("Name a colour."), "red"),
        sample(1, 2, json!("Name a colour."), "seven"),
        sample(2, 0, json!("Say hi."), "hi"),
        sample(3, 0, json!("Count to two."), "1 2"),
        sample(3, 1, json!("Count to two."), "one two"),
    ];
    let scores = [
        score(1, 0, 0.5),
        score(1, 1, 2.0),
        score(1, 2, -1.0),
        score(2, 0, 1.0),
        score(3, 0, 0.25),
        score(3, 1, 0.25),
    ];
    let sv: Vec<&str> = samples.iter().map(String::as_str).collect();
    let cv: Vec<&str> = scores.iter().map(String::as_str).collect();
    (
        write_lines(dir, "samples.jsonl", &sv),
        write_lines(dir, "scores.jsonl", &cv),
    )
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "failed: {args:?}");
    String::from_utf8(o.stderr).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "succeeded: {args:?}");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn best_and_worst_of_each_prompt_with_ties_and_singletons_reported() {
    let dir = TempDir::new();
    let (samples, scores) = plain_files(&dir);
    let (out, report) = (dir.join("pairs.jsonl"), dir.join("report.json"));
    let err = ok(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
        "--report",
        s(&report),
        "--score-columns",
    ]);
    assert!(err.contains("3 prompts (6 completions): 1 paired"), "{err}");
    let rows = jsonl(&out);
    assert_eq!(
        rows,
        [
            json!({"prompt": "Name a colour.", "chosen": "red", "rejected": "seven",
                "score_chosen": 2.0, "score_rejected": -1.0})
        ]
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for (k, v) in [
        ("prompts", 3),
        ("completions", 6),
        ("paired", 1),
        ("one_completion", 1),
        ("ties_skipped", 1),
        ("ties_kept", 0),
        ("samples_without_score", 0),
        ("scores_without_sample", 0),
    ] {
        assert_eq!(r[k], json!(v), "{k} in {r}");
    }

    // Ties kept: the rejected completion is the one after the chosen.
    let kept = dir.join("kept.jsonl");
    ok(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&kept),
        "--keep-ties",
    ]);
    let rows = jsonl(&kept);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[1],
        json!({"prompt": "Count to two.", "chosen": "1 2", "rejected": "one two"})
    );
}

#[test]
fn conversational_prompts_get_assistant_messages_and_parquet_reads_back() {
    let dir = TempDir::new();
    let chat = |q: &str| json!([{"role": "user", "content": q}]);
    let samples = [
        sample(1, 0, chat("2+2?"), "4"),
        sample(1, 1, chat("2+2?"), "5"),
        sample(2, 0, chat("Capital of France?"), "Lyon"),
        sample(2, 1, chat("Capital of France?"), "Paris"),
        sample(2, 2, chat("Capital of France?"), ""),
    ];
    let scores = [
        score(1, 0, 3.0),
        score(1, 1, -3.0),
        score(2, 0, 0.0),
        score(2, 1, 4.5),
        score(2, 2, -0.5),
    ];
    let sv: Vec<&str> = samples.iter().map(String::as_str).collect();
    let cv: Vec<&str> = scores.iter().map(String::as_str).collect();
    let samples = write_lines(&dir, "samples.jsonl", &sv);
    let scores = write_lines(&dir, "scores.jsonl", &cv);
    let (out_j, out_p) = (dir.join("pairs.jsonl"), dir.join("pairs.parquet"));
    for out in [&out_j, &out_p] {
        ok(&[
            "build-pairs",
            "--samples",
            s(&samples),
            "--scores",
            s(&scores),
            "--out",
            s(out),
            "--score-columns",
        ]);
    }
    let rows = jsonl(&out_j);
    assert_eq!(
        rows[1],
        json!({"prompt": chat("Capital of France?"),
               "chosen": [{"role": "assistant", "content": "Paris"}],
               "rejected": [{"role": "assistant", "content": ""}],
               "score_chosen": 4.5, "score_rejected": -0.5})
    );
    // The Parquet file, read by the trainer's reader, holds what the JSONL file holds.
    let as_text = |f: &Path| {
        read_records(f, false, |t, _, _| {
            Ok(serde_json::from_str::<Value>(t).unwrap())
        })
        .unwrap()
        .examples
        .into_iter()
        .map(|e| e.value)
        .collect::<Vec<_>>()
    };
    assert_eq!(as_text(&out_p), rows);
    // And parses as TRL conversational preference data.
    let read = read_records(&out_p, false, parse_preference_line).unwrap();
    let got: Vec<PreferenceExample> = read.examples.into_iter().map(|e| e.value).collect();
    assert_eq!(
        got[0],
        PreferenceExample {
            prompt: Text::Chat(vec![msg("user", "2+2?")]),
            chosen: Text::Chat(vec![msg("assistant", "4")]),
            rejected: Text::Chat(vec![msg("assistant", "5")]),
        }
    );
    assert_eq!(got[1].rejected, Text::Chat(vec![msg("assistant", "")]));
}

fn msg(role: &str, content: &str) -> difinfo_trainer::template::Message {
    difinfo_trainer::template::Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn plain_parquet_round_trip_through_the_preference_reader() {
    let dir = TempDir::new();
    let (samples, scores) = plain_files(&dir);
    let out = dir.join("pairs.parquet");
    ok(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
        "--keep-ties",
    ]);
    let got: Vec<PreferenceExample> = read_records(&out, false, parse_preference_line)
        .unwrap()
        .examples
        .into_iter()
        .map(|e| e.value)
        .collect();
    let plain = |p: &str, c: &str, r: &str| PreferenceExample {
        prompt: Text::Plain(p.into()),
        chosen: Text::Plain(c.into()),
        rejected: Text::Plain(r.into()),
    };
    assert_eq!(
        got,
        [
            plain("Name a colour.", "red", "seven"),
            plain("Count to two.", "1 2", "one two")
        ]
    );
}

#[test]
fn unmatched_samples_and_scores_name_file_and_line_or_are_skipped() {
    let dir = TempDir::new();
    let (samples, _) = plain_files(&dir);
    // Line 1 sample 2 has no score; the last row scores a sample that does not exist.
    let scores = write_lines(
        &dir,
        "partial.jsonl",
        &[
            &score(1, 0, 0.5),
            &score(1, 1, 2.0),
            &score(2, 0, 1.0),
            &score(3, 0, 0.1),
            &score(3, 1, 0.2),
            &score(9, 0, 7.0),
        ],
    );
    let out = dir.join("pairs.jsonl");
    let args = [
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
    ];
    let err = fails(&args);
    assert!(
        err.contains(&format!("{}:3: no score for line 1 sample 2", s(&samples))),
        "{err}"
    );
    assert!(!out.exists());
    let report = dir.join("report.json");
    let mut skip = args.to_vec();
    skip.extend(["--skip-invalid", "--report", s(&report)]);
    let err = ok(&skip);
    assert!(
        err.contains("1 samples without a score, 1 scores without a sample"),
        "{err}"
    );
    assert_eq!(jsonl(&out).len(), 2);
    let listed = jsonl(&dir.join("partial.jsonl.errors.jsonl"));
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[1]["line"], json!(6));
    assert!(listed[1]["message"]
        .as_str()
        .unwrap()
        .contains("no sample with line 9 sample 0"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["samples_without_score"], json!(1));
    assert_eq!(r["scores_without_sample"], json!(1));

    // Without --samples, score rows must carry their prompt and completion.
    let err = fails(&["build-pairs", "--scores", s(&scores), "--out", s(&out)]);
    assert!(
        err.contains("partial.jsonl:1: field `prompt`: missing"),
        "{err}"
    );
}

#[test]
fn non_finite_rewards_are_errors_naming_the_field() {
    let dir = TempDir::new();
    let (samples, _) = plain_files(&dir);
    for (name, bad) in [
        ("nan.jsonl", r#"{"line": 1, "sample": 1, "reward": NaN}"#),
        (
            "inf.jsonl",
            r#"{"line": 1, "sample": 1, "reward": -Infinity}"#,
        ),
        ("null.jsonl", r#"{"line": 1, "sample": 1, "reward": null}"#),
    ] {
        let scores = write_lines(&dir, name, &[&score(1, 0, 0.5), bad]);
        let err = fails(&[
            "build-pairs",
            "--samples",
            s(&samples),
            "--scores",
            s(&scores),
            "--out",
            s(&dir.join("o.jsonl")),
        ]);
        assert!(
            err.contains(&format!("{}:2: field `reward`: non-finite", s(&scores))),
            "{name}: {err}"
        );
    }
}

#[test]
fn self_contained_scores_and_labels() {
    let dir = TempDir::new();
    let row = |label: &str, p: &str, c: &str, r: f64| {
        json!({"label": label, "prompt": p, "completion": c, "reward": r}).to_string()
    };
    let scores = write_lines(
        &dir,
        "scores.jsonl",
        &[
            &row("a", "Q", "x", 1.0),
            &row("a", "Q", "y", 2.0),
            &row("b", "Q", "x", 5.0),
            &row("b", "Q", "y", -5.0),
        ],
    );
    let out = dir.join("o.jsonl");
    let err = fails(&["build-pairs", "--scores", s(&scores), "--out", s(&out)]);
    assert!(
        err.contains("scores.jsonl:3: field `label`: scores of several files"),
        "{err}"
    );
    for (label, chosen) in [("a", "y"), ("b", "x")] {
        ok(&[
            "build-pairs",
            "--scores",
            s(&scores),
            "--out",
            s(&out),
            "--label",
            label,
        ]);
        assert_eq!(jsonl(&out)[0]["chosen"], json!(chosen), "label {label}");
    }
}

#[test]
fn mixed_formats_and_duplicates_are_refused() {
    let dir = TempDir::new();
    let samples = write_lines(
        &dir,
        "samples.jsonl",
        &[
            &sample(1, 0, json!("Q"), "a"),
            &sample(2, 0, json!([{"role": "user", "content": "Q"}]), "b"),
            &sample(1, 0, json!("Q"), "c"),
        ],
    );
    let scores = write_lines(
        &dir,
        "scores.jsonl",
        &[&score(1, 0, 0.0), &score(2, 0, 1.0)],
    );
    let out = dir.join("o.jsonl");
    let err = fails(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("samples.jsonl:3: field `sample`: line 1 sample 0 appears twice"),
        "{err}"
    );
    let samples = write_lines(
        &dir,
        "samples2.jsonl",
        &[
            &sample(1, 0, json!("Q"), "a"),
            &sample(2, 0, json!([{"role": "user", "content": "Q"}]), "b"),
        ],
    );
    let err = fails(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("samples2.jsonl:2: field `prompt`: a message list, but the first prompt"),
        "{err}"
    );
}

#[test]
fn scores_of_several_files_pick_the_samples_file_by_its_path() {
    let dir = TempDir::new();
    let (samples, _) = plain_files(&dir);
    let row = |data: &str, line: u64, k: u64, r: f64| {
        json!({"data": data, "line": line, "sample": k, "reward": r}).to_string()
    };
    let mut lines = Vec::new();
    for (line, k, r) in [(1, 0, 0.5), (1, 1, 2.0), (1, 2, -1.0), (2, 0, 1.0)] {
        lines.push(row(s(&samples), line, k, r));
        lines.push(row("other.jsonl", line, k, -r));
    }
    lines.push(row(s(&samples), 3, 0, 0.0));
    lines.push(row(s(&samples), 3, 1, 1.0));
    let lv: Vec<&str> = lines.iter().map(String::as_str).collect();
    let scores = write_lines(&dir, "scores.jsonl", &lv);
    let out = dir.join("o.jsonl");
    let err = ok(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("2 paired"), "{err}");
    assert_eq!(jsonl(&out)[0]["chosen"], json!("red"));
    let err = fails(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
        "--label",
        "other.jsonl",
    ]);
    assert!(err.contains("no score for line 3 sample 0"), "{err}");
}

#[test]
fn scores_of_several_files_pick_the_samples_file_by_scores_default_label() {
    // `score`'s rows: `label` the file's stem, `data` the path as `score` was given it.
    let dir = TempDir::new();
    let (samples, _) = plain_files(&dir);
    let stem = samples.file_stem().unwrap().to_str().unwrap().to_string();
    let row = |label: &str, line: u64, k: u64, r: f64| {
        json!({"label": label, "data": format!("/elsewhere/{label}.jsonl"), "line": line,
            "sample": k, "reward": r})
        .to_string()
    };
    let mut lines = Vec::new();
    for (line, k, r) in [
        (1, 0, 0.5),
        (1, 1, 2.0),
        (1, 2, -1.0),
        (2, 0, 1.0),
        (3, 0, 0.0),
        (3, 1, 1.0),
    ] {
        lines.push(row(&stem, line, k, r));
        lines.push(row("other", line, k, -r));
    }
    let lv: Vec<&str> = lines.iter().map(String::as_str).collect();
    let scores = write_lines(&dir, "scores.jsonl", &lv);
    let out = dir.join("o.jsonl");
    let err = ok(&[
        "build-pairs",
        "--samples",
        s(&samples),
        "--scores",
        s(&scores),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("2 paired"), "{err}");
    // The samples' own rewards chose (the other label's are their negatives).
    assert_eq!(jsonl(&out)[0]["chosen"], json!("red"));
}
