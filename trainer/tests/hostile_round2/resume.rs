//! Issue 20, class 7 (resume is not exact when the run's surroundings change) and the weak
//! results about the training options: a locked run directory, absolute recorded paths, the
//! tokenizer's and a LoRA base's fingerprints; objective options given but not read, all-zero
//! loss weights, an overflowing α, TOML type errors, an output directory from a config file,
//! and `report` of a single metrics row.

#[allow(unused_imports)]
use super::*;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use difinfo_trainer::train::checkpoint::latest_checkpoint;
use difinfo_trainer::train::run::LOCK_FILE;

/// `difinfo-train args` run in the working directory `cwd`.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run difinfo-train");
    eprintln!(
        "$ (cd {}; difinfo-train {})\n{}",
        cwd.display(),
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A short DPO run's arguments (2 steps, a checkpoint each), model and output as given.
fn dpo_args<'a>(model: &'a str, out: &'a str, data: &'a str) -> Vec<&'a str> {
    dpo(
        model,
        data,
        out,
        &[
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--per-device-train-batch-size",
            "2",
            "--max-length",
            "64",
        ],
    )
}

/// A finished 2-step DPO run of a tiny model in `dir/run` (`extra` appended).
fn finished_run(dir: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let model = tiny_model(dir);
    let run_dir = dir.join("run");
    let data = prefs();
    let mut a = dpo_args(s(&model), s(&run_dir), s(&data));
    a.extend_from_slice(extra);
    ok(&a);
    (model, run_dir)
}

/// Class 7a: a second process resuming (or freshly training into) a run directory while a
/// first one trains there is refused, naming the directory, its lock and the holder's process
/// id (before: both ran, interleaving metrics.jsonl and the checkpoints).
#[test]
fn a_second_run_of_a_locked_run_directory_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, run_dir) = finished_run(tmp.path(), &[]);
    // The first resume trains for a long time; it takes the lock before anything else.
    let mut first = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args(["dpo", "--resume", s(&run_dir), "--max-steps", "1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    let lock = run_dir.join(LOCK_FILE);
    let t0 = Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |t| t.trim() != pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the first resume took no lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let holder = format!("in use by another run (process {pid})");
    let second = fails(&["dpo", "--resume", s(&run_dir), "--max-steps", "3"]);
    let data = prefs();
    let mut fresh = dpo_args(s(&model), s(&run_dir), s(&data));
    fresh.push("--overwrite-output-dir");
    let third = fails(&fresh);
    first.kill().unwrap();
    first.wait().unwrap();
    for e in [second, third] {
        assert!(e.contains(&holder), "{e}");
        assert!(e.contains(s(&lock)), "{e}");
    }
    // The lock dies with its holder (even by SIGKILL): the run resumes, one step further.
    let last = latest_checkpoint(&run_dir).unwrap().unwrap();
    let step: usize = last
        .to_str()
        .unwrap()
        .rsplit('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    ok(&[
        "dpo",
        "--resume",
        s(&run_dir),
        "--max-steps",
        &(step + 1).to_string(),
    ]);
}

/// Class 7b: `run_args.json` records absolute paths, so a resume from another working
/// directory trains the run's model, not whatever the typed relative path finds there
/// (before: `--model model` was reloaded relative to the new directory: another model and
/// tokenizer, shipped in the next checkpoint); a recorded model that is gone is named.
#[test]
fn a_resume_from_another_directory_loads_the_recorded_model() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let model_a = tiny_model(&a);
    // Another checkpoint, with another tokenizer, at the same relative path under b.
    init_checkpoint(
        &b.join("model"),
        arch_config(ModelSize::Tiny, Architecture::Llama),
        &BUILTIN_CORPUS.to_uppercase(),
        1,
    )
    .unwrap();
    let data = prefs();
    let o = run_in(&a, &dpo_args("model", "run", s(&data)));
    assert!(o.status.success());
    let run_dir = a.join("run");
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run_args.json")).unwrap())
            .unwrap();
    assert_eq!(rec["model"].as_str(), Some(s(&model_a)), "{rec}");
    let o = run_in(&b, &["dpo", "--resume", s(&run_dir), "--max-steps", "3"]);
    assert!(o.status.success());
    let shipped = std::fs::read(run_dir.join("checkpoint-3/tokenizer.json")).unwrap();
    assert_eq!(
        shipped,
        std::fs::read(model_a.join("tokenizer.json")).unwrap()
    );
    // The recorded model moved away: named, not replaced by b/model.
    std::fs::rename(&model_a, a.join("moved")).unwrap();
    let o = run_in(&b, &["dpo", "--resume", s(&run_dir), "--max-steps", "4"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!("{} (the run's --model", s(&model_a))),
        "{e}"
    );
    assert!(e.contains("no longer exists"), "{e}");
}

/// Class 7c: a tokenizer changed between the save and the resume is refused naming
/// tokenizer.json (before: the run went on with the new tokenizer, loss 0.69 → 11.7).
#[test]
fn a_tokenizer_changed_before_the_resume_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, run_dir) = finished_run(tmp.path(), &[]);
    let other = tmp.path().join("other");
    init_checkpoint(
        &other,
        arch_config(ModelSize::Tiny, Architecture::Llama),
        &BUILTIN_CORPUS.to_uppercase(),
        0,
    )
    .unwrap();
    std::fs::copy(other.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let e = refused(
        &["dpo", "--resume", s(&run_dir), "--max-steps", "3"],
        &[
            s(&model.join("tokenizer.json")),
            "changed since the run started",
        ],
    );
    assert!(!run_dir.join("checkpoint-3").exists(), "{e}");
}

/// Class 7c: a LoRA run whose base weights were replaced is refused naming the weights file
/// (before: the adapter resumed onto the other base).
#[test]
fn a_replaced_lora_base_is_refused_naming_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, run_dir) = finished_run(tmp.path(), &["--use-peft", "--lora-r", "2"]);
    let other = tmp.path().join("other");
    init_checkpoint(
        &other,
        arch_config(ModelSize::Tiny, Architecture::Llama),
        BUILTIN_CORPUS,
        7,
    )
    .unwrap();
    std::fs::copy(
        other.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    refused(
        &["dpo", "--resume", s(&run_dir), "--max-steps", "3"],
        &[
            s(&model.join("model.safetensors")),
            "base model file of --model",
            "changed since the run started",
        ],
    );
}

/// Weak: objective options given but not read are refused naming the option, on the command
/// line and in a config file (before: accepted and ignored).
#[test]
fn objective_options_the_objective_does_not_read_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = prefs();
    let out = tmp.path().join("run");
    let base = dpo_args(s(&model), s(&out), s(&data));
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    let refused = |a: &[String], names: &[&str]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, names)
    };
    refused(
        &with(&["--f-alpha-divergence-coef", "0.3"]),
        &[
            "--f-alpha-divergence-coef 0.3",
            "f_divergence_type is reverse_kl",
        ],
    );
    refused(
        &with(&["--discopop-tau", "0.1"]),
        &["--discopop-tau 0.1", "loss_type is sigmoid"],
    );
    let c = tmp.path().join("c.toml");
    std::fs::write(&c, "discopop_tau = 0.1\n").unwrap();
    let mut a = with(&["--config"]);
    a.push(s(&c).to_string());
    refused(&a, &[&format!("{}: discopop_tau = 0.1", s(&c))]);
    assert!(!out.exists());
}

/// Weak: `--loss-weights 0` is refused up front naming the option (before: "variables without
/// a gradient" after the reference pass).
#[test]
fn all_zero_loss_weights_are_refused_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prefs();
    let out = tmp.path().join("run");
    let model = tmp.path().join("no-model");
    let mut a = dpo_args(s(&model), s(&out), s(&data));
    a.extend_from_slice(&["--loss-weights", "0"]);
    refused(&a, &["--loss-weights 0: loss_weights are all 0"]);
}

/// Weak: a TOML value of the wrong type names its key and the type expected (before: "data
/// did not match any variant of untagged enum OneOrMany").
#[test]
fn toml_type_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prefs();
    let c = tmp.path().join("c.toml");
    for (text, want) in [
        (
            "loss_type = 3\n",
            "loss_type = 3: invalid type: integer `3`, expected a loss type name",
        ),
        ("beta = \"high\"\n", "beta = \"high\""),
    ] {
        std::fs::write(&c, text).unwrap();
        let e = refused(
            &["dpo", "--model", "m", "--data", s(&data), "--config", s(&c)],
            &[&format!("{}: {want}", s(&c))],
        );
        assert!(!e.contains("untagged"), "{e}");
    }
}

/// Weak: an output directory from the `--config` file is named as the file's key (before:
/// blamed on `--output-dir`, which was not given).
#[test]
fn an_output_dir_from_the_config_file_is_named_as_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prefs();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let c = tmp.path().join("c.toml");
    std::fs::write(&c, format!("output_dir = \"{}\"\n", s(&file.join("run")))).unwrap();
    let e = refused(
        &["dpo", "--model", "m", "--data", s(&data), "--config", s(&c)],
        &[
            &format!("{}: output_dir = {}", s(&c), s(&file.join("run"))),
            "exists and is not a directory",
        ],
    );
    assert!(!e.contains("--output-dir"), "{e}");
}

/// Weak: `report` of a run with one metrics row says it cannot conclude (before:
/// "displacement: no" from a row compared with itself).
#[test]
fn report_of_a_single_metrics_row_does_not_conclude() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path();
    std::fs::write(
        run_dir.join("metrics.jsonl"),
        r#"{"step":1,"epoch":0.1,"loss":0.69,"logps/chosen":-40.0,"logps/rejected":-41.0,"rewards/margins":0.0,"rewards/accuracies":0.5,"learning_rate":1e-6,"grad_norm":1.0}"#
            .to_string()
            + "\n",
    )
    .unwrap();
    let o = common::difinfo_train(&["report", s(run_dir)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("too few logged steps to conclude"), "{out}");
    assert!(!out.contains("displacement: no"), "{out}");
}

/// Weak: an α-divergence coefficient so large that the loss is NaN at step 1 names the
/// objective's options (before: the NaN, its step and examples, no option).
#[test]
fn a_nan_loss_from_a_huge_alpha_names_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = prefs();
    let out = tmp.path().join("run");
    let mut a = dpo_args(s(&model), s(&out), s(&data));
    a.extend_from_slice(&[
        "--f-divergence-type",
        "alpha_divergence",
        "--f-alpha-divergence-coef",
        "1e300",
    ]);
    refused(
        &a,
        &[
            "non-finite loss (NaN) at step 1",
            "--f-divergence-type alpha_divergence",
            "--f-alpha-divergence-coef 1e300",
        ],
    );
}
