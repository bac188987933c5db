//! Issue 20: see the module list in `hostile_round2.rs`. Sizes a user or a file controls
//! (class 2, the non-GGUF part: samples per prompt, a chat template's output, the benchmarks'
//! inputs) and `--max-new-tokens` past the model's context (a weak result). Every value here
//! needs more memory than any machine has: before the fix each command allocated it (an abort,
//! or a long climb to the OOM killer); now each is refused before, naming the option or file.

#[allow(unused_imports)]
use super::*;

/// The end of every memory refusal (`Error::TooLarge`).
const MORE_THAN: &str = "more than this machine's";

/// A sampling command on the tiny model and the repository's prompts with `extra` options.
fn sampling(cmd: &str, dir: &Path, m: &Path, extra: &[&str]) -> Vec<String> {
    let out = dir.join(format!("{cmd}.out"));
    let mut a: Vec<String> = [
        cmd,
        "--model",
        s(m),
        "--prompts",
        s(&prompts()),
        "--out",
        s(&out),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// `sample --n 1000000000` (before: 52 GB of prompt ids allocated at once, an abort).
#[test]
fn sample_n_beyond_memory_is_refused_naming_n() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let a = sampling("sample", dir.path(), &m, &["--n", "1000000000"]);
    let e = refused(&strs(&a), &["--n 1000000000", MORE_THAN, "lower --n"]);
    assert!(!dir.path().join("sample.out").exists(), "{e}");
}

/// `entropy --samples 1000000000` (before: an abort).
#[test]
fn entropy_samples_beyond_memory_is_refused_naming_samples() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let a = sampling("entropy", dir.path(), &m, &["--samples", "1000000000"]);
    refused(
        &strs(&a),
        &["--samples 1000000000", MORE_THAN, "lower --samples"],
    );
}

/// `beta-accuracy --samples 1000000000` (before: an abort).
#[test]
fn beta_accuracy_samples_beyond_memory_is_refused_naming_samples() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let out = dir.path().join("beta.json");
    let p = prompts();
    let a = [
        "beta-accuracy",
        "--estimator",
        s(&m),
        "--policy",
        s(&m),
        "--reference",
        s(&m),
        "--prompts",
        s(&p),
        "--out",
        s(&out),
        "--samples",
        "1000000000",
    ];
    refused(&a, &["--samples 1000000000", MORE_THAN]);
}

/// `did-entropy --pairs-per-prompt 1000000000` (before: an abort while sampling the pairs);
/// `--samples` and `--beta-samples` are checked at the same time, before the estimator's
/// training.
#[test]
fn did_entropy_sample_counts_beyond_memory_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let p = prompts();
    for option in ["--pairs-per-prompt", "--samples", "--beta-samples"] {
        let out = dir.path().join(format!("run{option}"));
        let a = [
            "did-entropy",
            "--policy",
            s(&m),
            "--reference",
            s(&m),
            "--prompts",
            s(&p),
            "--output-dir",
            s(&out),
            option,
            "1000000000",
        ];
        let e = refused(&a, &[&format!("{option} 1000000000"), MORE_THAN]);
        assert!(!out.join("estimator").exists(), "{e}");
    }
}

/// A 90-character chat template within minijinja's fuel and string limits that renders 50 MB a
/// line, 1000 lines (before: 50 GB rendered into one string).
#[test]
fn runaway_chat_template_is_bounded_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let tpl = m.join("chat_template.jinja");
    std::fs::write(
        &tpl,
        "{% for i in range(1000) %}{{ 'ab' * 25000000 }}{% endfor %}{{ messages[0].content }}",
    )
    .unwrap();
    let chat = dir.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let out = dir.path().join("o.jsonl");
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--prompts",
            s(&chat),
            "--out",
            s(&out),
        ],
        &[s(&tpl), "grows without bound", &format!("{}:1", s(&chat))],
    );
}

/// `bench` / `bench-forward --batch 100000 --seq 100000` (before: the inputs built first, 320 GB
/// and 40 GB, before the forward pass's own check).
#[test]
fn bench_inputs_beyond_memory_are_refused_naming_batch_and_seq() {
    for cmd in ["bench", "bench-forward"] {
        refused(
            &[
                cmd, "--size", "tiny", "--batch", "100000", "--seq", "100000",
            ],
            &[
                "--batch 100000 --seq 100000",
                MORE_THAN,
                "lower --batch or --seq",
            ],
        );
        // One sequence longer than any memory: before, its ids alone aborted.
        refused(
            &[
                cmd,
                "--size",
                "tiny",
                "--batch",
                "1",
                "--seq",
                "100000000000",
            ],
            &["--seq 100000000000", MORE_THAN],
        );
    }
}

/// `--max-new-tokens` past the model's context (2048 for the tiny model): before, accepted
/// without a word and sampled through positions the model was never trained on.
#[test]
fn max_new_tokens_beyond_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    for cmd in ["sample", "entropy"] {
        let a = sampling(cmd, dir.path(), &m, &["--max-new-tokens", "4096"]);
        refused(
            &strs(&a),
            &[
                "--max-new-tokens 4096",
                "context of 2048",
                "max_position_embeddings",
            ],
        );
    }
    // At the context, it runs.
    let a = sampling(
        "sample",
        dir.path(),
        &m,
        &["--max-new-tokens", "8", "--n", "2"],
    );
    ok(&strs(&a));
}
