//! Hostile input, second round (issue 20): malformed GGUF and Parquet files, sizes that a user
//! or a file controls, outputs that would overwrite a checkpoint, piped data, GGUF trust gaps,
//! resumes whose surroundings changed, LoRA module paths, an `eos_token` that is not a token,
//! and the weak results of the same campaign. One binary; one module per area. Each test runs
//! the binary (or the library) and reads its exit status and message.

mod common;

#[path = "hostile_round2/data.rs"]
mod data;
#[path = "hostile_round2/gguf.rs"]
mod gguf;
#[path = "hostile_round2/outputs.rs"]
mod outputs;
#[path = "hostile_round2/resume.rs"]
mod resume;
#[path = "hostile_round2/sizes.rs"]
mod sizes;

use std::path::{Path, PathBuf};

use common::difinfo_train as run;
pub use common::tiny_model;
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::init::{arch_config, init_checkpoint, ModelSize, BUILTIN_CORPUS};

/// Runs a command that must fail cleanly (exit 1, or clap's 2 for a value that does not
/// parse; no panic, no abort) and returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "expected a clean failure, got {:?}: {args:?}\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// [`fails`], and the message names each of `names`.
pub fn refused(args: &[&str], names: &[&str]) -> String {
    let e = fails(args);
    for n in names {
        assert!(e.contains(n), "`{n}` not named: {e}");
    }
    e
}

/// Runs a command that must succeed; returns its stderr.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "failed: {args:?}\n{err}");
    err
}

/// `dpo --model model --data data --output-dir out`, then `extra`.
pub fn dpo<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["dpo", "--model", model, "--data", data, "--output-dir", out];
    a.extend_from_slice(extra);
    a
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The repository's small preference file (JSONL).
pub fn prefs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl")
}

/// The repository's small prompt file (JSONL).
pub fn prompts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prompts.jsonl")
}
