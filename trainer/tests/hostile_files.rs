//! Hostile and careless input on the command line and in files (issue 11): an output that
//! would replace an input, `init` over a checkpoint, a rerun into a crashed run, out-of-range
//! optimizer settings, and the weak records (a missing tokenizer_config.json, an empty data
//! file, a corrupt checkpoint on `--resume`, an unwritable destination, `plot`'s errors, an
//! empty tokenizer corpus). Each test runs the binary and reads its exit status and message.

mod common;

use std::path::{Path, PathBuf};

use common::difinfo_train as run;
use common::tiny_model;

/// Runs a command that must fail cleanly (exit 1, or clap's 2 for a value that does not
/// parse; no panic) and returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "expected a clean failure: {args:?}"
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// [`fails`], and the message names each of `names`.
fn refused(args: &[&str], names: &[&str]) -> String {
    let e = fails(args);
    for n in names {
        assert!(e.contains(n), "`{n}` not named: {e}");
    }
    e
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "failed: {args:?}");
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn prefs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl")
}

fn prompts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prompts.jsonl")
}

/// A copy of `src` at `dst`.
fn copy(src: &Path, dst: &Path) -> PathBuf {
    std::fs::copy(src, dst).unwrap();
    dst.to_path_buf()
}

// ------------------------------------------------------------ class 2: output = input

#[test]
fn an_output_equal_to_an_input_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = copy(&prefs(), &t.join("d.jsonl"));
    let ps = copy(&prompts(), &t.join("p.jsonl"));
    let before = std::fs::read(&data).unwrap();
    let ps_before = std::fs::read(&ps).unwrap();
    // The model does not exist: the refusal must come before it is read.
    let nope = t.join("no-model");
    let sub = t.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let other_spelling = format!("{}/../d.jsonl", sub.display());
    std::fs::hard_link(&data, t.join("hard.jsonl")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&data, t.join("sym.jsonl")).unwrap();
    let mut spellings = vec![
        s(&data).to_string(),
        other_spelling,
        s(&t.join("hard.jsonl")).to_string(),
    ];
    if cfg!(unix) {
        spellings.push(s(&t.join("sym.jsonl")).to_string());
    }
    for out in &spellings {
        refused(
            &[
                "logps",
                "--model",
                s(&nope),
                "--data",
                s(&data),
                "--out",
                out,
            ],
            &["--out", "--data", "same file"],
        );
    }
    refused(
        &[
            "logps",
            "--model",
            s(&nope),
            "--data",
            s(&data),
            "--out",
            s(&t.join("o.jsonl")),
            "--skip-invalid",
            "--error-report",
            s(&data),
        ],
        &["--error-report", "--data"],
    );
    refused(
        &[
            "sample",
            "--model",
            s(&nope),
            "--prompts",
            s(&ps),
            "--out",
            s(&ps),
        ],
        &["--out", "--prompts"],
    );
    refused(
        &[
            "entropy",
            "--model",
            s(&nope),
            "--prompts",
            s(&ps),
            "--out",
            s(&ps),
        ],
        &["--out", "--prompts"],
    );
    refused(
        &[
            "dpo",
            "--model",
            s(&nope),
            "--data",
            s(&data),
            "--output-dir",
            s(&t.join("run")),
            "--skip-invalid",
            "--error-report",
            s(&data),
        ],
        &["--error-report", "--data"],
    );
    // Two outputs on one file.
    refused(
        &[
            "logps",
            "--model",
            s(&nope),
            "--data",
            s(&data),
            "--out",
            s(&t.join("o.jsonl")),
            "--skip-invalid",
            "--error-report",
            s(&t.join("sub/../o.jsonl")),
        ],
        &["--out", "--error-report"],
    );
    // A file of the model's checkpoint directory is an input too.
    let model = tiny_model(t);
    let cfg_before = std::fs::read(model.join("config.json")).unwrap();
    refused(
        &[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&model.join("config.json")),
        ],
        &["--out", "--model"],
    );
    assert_eq!(
        std::fs::read(model.join("config.json")).unwrap(),
        cfg_before
    );
    // plot: the metrics file is its input.
    let run_dir = t.join("r");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::write(run_dir.join("metrics.jsonl"), "{\"step\":1,\"loss\":0.5}\n").unwrap();
    refused(
        &[
            "plot",
            s(&run_dir),
            "--out",
            s(&run_dir.join("metrics.jsonl")),
        ],
        &["--out", "metrics.jsonl"],
    );
    assert_eq!(std::fs::read(&data).unwrap(), before);
    assert_eq!(std::fs::read(&ps).unwrap(), ps_before);
}

// ------------------------------------------------------------ class 3: init over a checkpoint

#[test]
fn init_refuses_a_non_empty_directory_without_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    std::fs::write(
        model.join("optimizer.safetensors"),
        b"stale optimizer state",
    )
    .unwrap();
    std::fs::write(model.join("trainer_state.json"), b"{}").unwrap();
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let e = fails(&["init", "--out", s(&model), "--seed", "7"]);
    assert!(e.contains("--overwrite") && e.contains(s(&model)), "{e}");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    // With the flag the checkpoint is replaced whole: no stale optimizer state beside it.
    ok(&["init", "--out", s(&model), "--seed", "7", "--overwrite"]);
    assert_ne!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!model.join("optimizer.safetensors").exists());
    assert!(!model.join("trainer_state.json").exists());
    // An existing empty directory is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&["init", "--out", s(&empty)]);
    // A file where the directory should be is refused.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    refused(&["init", "--out", s(&file)], &["not a directory"]);
}

// ------------------------------------------------------------ class 4: a crashed run's directory

#[test]
fn a_rerun_into_a_crashed_runs_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run_dir = tmp.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "dpo",
            "--model",
            s(&model),
            "--data",
            s(&prefs()),
            "--output-dir",
            s(&run_dir),
            "--max-steps",
            "2",
            "--logging-steps",
            "1",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a = args(&[]);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // A crash before the first checkpoint leaves metrics and config but no checkpoint.
    for e in std::fs::read_dir(&run_dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        }
    }
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    let config = std::fs::read(run_dir.join("train_config.toml")).unwrap();
    let a = args(&["--learning-rate", "1e-3"]);
    let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("metrics.jsonl") && e.contains("--overwrite-output-dir"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(run_dir.join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert_eq!(
        std::fs::read(run_dir.join("train_config.toml")).unwrap(),
        config
    );
    // Each earlier run's file alone is a run.
    for f in [
        "metrics.jsonl",
        "train_config.toml",
        "run_args.json",
        "train_summary.json",
    ] {
        let d = tmp.path().join(format!("only-{f}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(f), b"{}").unwrap();
        let e = fails(&[
            "sft",
            "--model",
            s(&model),
            "--data",
            s(&prefs()),
            "--output-dir",
            s(&d),
        ]);
        assert!(e.contains(f), "{f}: {e}");
    }
    // --overwrite-output-dir replaces the earlier run.
    let a = args(&["--overwrite-output-dir"]);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run_dir.join("checkpoint-2").exists());
    // did-entropy's samples file alone is an earlier run too.
    let d = tmp.path().join("did");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("samples.jsonl"), b"{}\n").unwrap();
    let e = fails(&[
        "did-entropy",
        "--policy",
        s(&model),
        "--reference",
        s(&model),
        "--prompts",
        s(&prompts()),
        "--output-dir",
        s(&d),
    ]);
    assert!(
        e.contains("samples.jsonl") && e.contains("--overwrite-output-dir"),
        "{e}"
    );
}

// ------------------------------------------------------------ class 8: optimizer settings

#[test]
fn out_of_range_training_options_are_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    // No model: the options are checked before anything is loaded.
    let nope = tmp.path().join("no-model");
    let cases: &[(&[&str], &str)] = &[
        (&["--adam-beta1", "1.5"], "--adam-beta1"),
        (&["--adam-beta1=-0.1"], "--adam-beta1"),
        (&["--adam-beta2=-0.5"], "--adam-beta2"),
        (&["--adam-beta2", "1"], "--adam-beta2"),
        (&["--adam-epsilon", "0"], "--adam-epsilon"),
        (&["--adam-epsilon", "-1e-8"], "--adam-epsilon"),
        (&["--weight-decay=-1"], "--weight-decay"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--weight-decay", "nan"], "--weight-decay"),
        (&["--learning-rate", "-1"], "--learning-rate"),
        (&["--learning-rate", "inf"], "--learning-rate"),
        (&["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (&["--warmup-ratio", "-0.5"], "--warmup-ratio"),
        (&["--max-grad-norm", "nan"], "--max-grad-norm"),
        (&["--num-train-epochs", "-1"], "--num-train-epochs"),
        (
            &["--num-train-epochs", "nan", "--max-steps", "3"],
            "--num-train-epochs",
        ),
        (
            &["--per-device-train-batch-size", "0"],
            "--per-device-train-batch-size",
        ),
        (
            &["--gradient-accumulation-steps", "0"],
            "--gradient-accumulation-steps",
        ),
        (&["--logging-steps", "0"], "--logging-steps"),
        (&["--ref-batch-size", "0"], "--ref-batch-size"),
        (&["--save-total-limit", "0"], "--save-total-limit"),
        (
            &["--per-device-train-batch-size", "-1"],
            "--per-device-train-batch-size",
        ),
    ];
    let (data, run_dir) = (prefs(), tmp.path().join("run"));
    for (extra, name) in cases {
        let mut a = vec![
            "dpo",
            "--model",
            s(&nope),
            "--data",
            s(&data),
            "--output-dir",
            s(&run_dir),
        ];
        a.extend_from_slice(extra);
        let e = fails(&a);
        assert!(e.contains(name), "{extra:?}: {e}");
        assert!(!e.contains("unexpected argument"), "{extra:?}: {e}");
    }
    // `--beta -1` reaches the range check instead of clap's "unexpected argument".
    let e = fails(&[
        "dpo",
        "--model",
        s(&nope),
        "--data",
        s(&prefs()),
        "--beta",
        "-1",
    ]);
    assert!(
        e.contains("beta") && !e.contains("unexpected argument"),
        "{e}"
    );
    // The same checks, with the file named, for a TOML config.
    for (line, name) in [
        ("adam_beta1 = 1.5", "adam_beta1"),
        ("weight_decay = -1.0", "weight_decay"),
        ("adam_epsilon = 0.0", "adam_epsilon"),
        ("warmup_ratio = 2.0", "warmup_ratio"),
        ("max_grad_norm = nan", "max_grad_norm"),
    ] {
        let f = tmp.path().join("c.toml");
        std::fs::write(&f, format!("{line}\n")).unwrap();
        let e = fails(&[
            "dpo",
            "--model",
            s(&nope),
            "--data",
            s(&prefs()),
            "--config",
            s(&f),
        ]);
        assert!(e.contains(name) && e.contains("c.toml"), "{line}: {e}");
    }
    // did-entropy's estimator options go through the same check.
    refused(
        &[
            "did-entropy",
            "--policy",
            s(&nope),
            "--reference",
            s(&nope),
            "--prompts",
            s(&prompts()),
            "--output-dir",
            s(&tmp.path().join("did")),
            "--max-grad-norm",
            "nan",
        ],
        &["--max-grad-norm"],
    );
}

// ------------------------------------------------------------ weak records

#[test]
fn a_missing_tokenizer_config_warns_with_the_rule_used() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    let err = ok(&[
        "logps",
        "--model",
        s(&model),
        "--data",
        s(&prefs()),
        "--out",
        s(&tmp.path().join("o.jsonl")),
    ]);
    assert!(
        err.contains("warning") && err.contains("tokenizer_config.json") && err.contains("EOS"),
        "{err}"
    );
}

#[test]
fn an_empty_data_file_is_an_error_in_logps_and_dpo() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let out = tmp.path().join("o.jsonl");
    let e1 = fails(&[
        "logps",
        "--model",
        s(&model),
        "--data",
        s(&empty),
        "--out",
        s(&out),
    ]);
    assert!(!out.exists());
    let e2 = fails(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&empty),
        "--output-dir",
        s(&tmp.path().join("run")),
    ]);
    for e in [&e1, &e2] {
        assert!(e.contains("empty.jsonl") && e.contains("no records"), "{e}");
    }
    refused(
        &[
            "sample",
            "--model",
            s(&model),
            "--prompts",
            s(&empty),
            "--out",
            s(&out),
        ],
        &["empty.jsonl", "no records"],
    );
}

#[test]
fn a_corrupt_checkpoint_file_is_named_on_resume() {
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
    ]);
    let ck = run_dir.join("checkpoint-2");
    assert!(ck.join("checksums.sha256").exists());
    // One flipped bit in the optimizer state's data (the header still parses).
    let opt = ck.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&opt, &bytes).unwrap();
    let e = fails(&["dpo", "--resume", s(&run_dir), "--max-steps", "4"]);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("SHA-256"),
        "{e}"
    );
    assert!(!e.contains("last good checkpoint"), "{e}");
}

#[test]
fn an_unwritable_destination_is_refused_before_the_work_naming_the_real_path() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let missing_dir = tmp.path().join("no/such/dir/o.jsonl");
    let e = fails(&[
        "logps",
        "--model",
        s(&tmp.path().join("no-model")),
        "--data",
        s(&prefs()),
        "--out",
        s(&missing_dir),
    ]);
    assert!(e.contains("--out") && e.contains(s(&missing_dir)), "{e}");
    // Not the hidden temporary file the output is written through.
    assert!(!e.contains(".o.jsonl.tmp"), "{e}");
    // A directory where a file should go.
    refused(
        &[
            "sample",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts()),
            "--out",
            s(tmp.path()),
        ],
        &["--out", "directory"],
    );
    let e = fails(&[
        "entropy",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts()),
        "--out",
        s(&missing_dir),
    ]);
    assert!(e.contains("--out") && e.contains(s(&missing_dir)), "{e}");
}

#[test]
fn plot_errors_are_plain_sentences() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("r");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::write(
        run_dir.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n",
    )
    .unwrap();
    let out = tmp.path().join("missing/metrics.png");
    let e = fails(&["plot", s(&run_dir), "--out", s(&out)]);
    assert!(e.contains(s(&out)), "{e}");
    for raw in [
        "DrawingError",
        "BackendError",
        "Os {",
        "kind:",
        "metrics.tmp.png",
    ] {
        assert!(!e.contains(raw), "{raw} in {e}");
    }
    refused(&["plot", s(&tmp.path().join("nope"))], &["metrics.jsonl"]);
}

#[test]
fn init_with_an_empty_tokenizer_corpus_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "\n  \n").unwrap();
    let out = tmp.path().join("m");
    let e = fails(&["init", "--out", s(&out), "--tokenizer-corpus", s(&corpus)]);
    assert!(
        e.contains("corpus.txt") && e.contains("--tokenizer-corpus"),
        "{e}"
    );
    assert!(!out.join("model.safetensors").exists());
}
