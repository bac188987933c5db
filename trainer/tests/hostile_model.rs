//! Hostile input on the model side (issue 11): NaN weights, non-finite outputs, over-long
//! inputs, a tokenizer from another checkpoint, degenerate generation requests, and sampling
//! that must not keep an autograd graph. Each gets a clear error naming the file (and line,
//! field or tensor) and a non-zero exit, and writes nothing; before, each gave garbage with
//! exit 0, an abort, or an unnamed tensor error.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::model::KvCache;
use difinfo_trainer::pretrained::load_model;
use difinfo_trainer::Error;

use common::difinfo_train as run;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a command that must fail: non-zero exit, `want` in stderr, `out` not written.
fn refused(args: &[&str], want: &[&str], out: &Path) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded: {err}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?}: not a clean exit: {err}"
    );
    for w in want {
        assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
    }
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
}

/// A `--size tiny` checkpoint directory (as `difinfo-train init --size tiny` writes it).
fn tiny(dir: &common::TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    let o = run(&["init", "--size", "tiny", "--out", s(&p)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p
}

/// Rewrites tensor `name` of `dir`'s model.safetensors with `f` applied to its flat values.
fn edit_weights(dir: &Path, name: &str, f: impl Fn(&mut [f32])) {
    edit_tensors(&dir.join("model.safetensors"), name, f);
}

/// Rewrites tensor `name` of the safetensors file `path` with `f` applied to its flat values.
fn edit_tensors(path: &Path, name: &str, f: impl Fn(&mut [f32])) {
    let mut ts: HashMap<String, Tensor> =
        candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let t = &ts[name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    f(&mut v);
    let nt = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    ts.insert(name.into(), nt);
    candle_core::safetensors::save(&ts, path).unwrap();
}

fn pairs(dir: &common::TempDir) -> PathBuf {
    common::write_lines(
        dir,
        "pairs.jsonl",
        &[
            r#"{"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " ran away."}"#,
            r#"{"prompt": "Hello", "chosen": " world", "rejected": " there"}"#,
        ],
    )
}

fn prompts(dir: &common::TempDir) -> PathBuf {
    common::write_lines(dir, "prompts.jsonl", &[r#"{"prompt": "The cat"}"#])
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

/// Class 1: the issue's checkpoints (two NaN entries in one q_proj weight; a NaN norm weight)
/// are refused at load in every dtype, naming the tensor and the first NaN; `logps` and
/// `sample` exit 1 and write nothing (before: −76.54 instead of −76.21, `null`, garbage ids).
/// A finite weight that overflows the requested dtype is refused the same way.
#[test]
fn nan_weights_are_refused_at_load_naming_the_tensor() {
    let dir = common::TempDir::new();
    let (data, prm) = (pairs(&dir), prompts(&dir));
    let nan_q = tiny(&dir, "nan_q");
    edit_weights(&nan_q, Q0, |v| {
        v[5] = f32::NAN;
        v[301] = f32::NAN;
    });
    let nan_norm = tiny(&dir, "nan_norm");
    let norm = "model.layers.1.input_layernorm.weight";
    edit_weights(&nan_norm, norm, |v| v[3] = f32::NAN);
    let out = dir.join("out.jsonl");
    for (m, tensor, index) in [(&nan_q, Q0, "[0, 5]"), (&nan_norm, norm, "[3]")] {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            match load_model(m, dtype, &Device::Cpu) {
                Err(e @ Error::NonFiniteWeight { .. }) => {
                    let msg = e.to_string();
                    let want = format!("tensor `{tensor}` contains NaN at index {index}");
                    assert!(msg.contains(&want), "{msg}");
                }
                Err(e) => panic!("{dtype:?}: {e}"),
                Ok(_) => panic!("{dtype:?}: a NaN checkpoint loaded"),
            }
        }
        let want = format!("model.safetensors: tensor `{tensor}` contains NaN at index {index}");
        for dtype in ["f32", "f64", "bf16"] {
            refused(
                &[
                    "logps",
                    "--model",
                    s(m),
                    "--data",
                    s(&data),
                    "--out",
                    s(&out),
                    "--dtype",
                    dtype,
                ],
                &[&want],
                &out,
            );
        }
        refused(
            &[
                "sample",
                "--model",
                s(m),
                "--prompts",
                s(&prm),
                "--out",
                s(&out),
            ],
            &[&want],
            &out,
        );
    }
    // 1e5 is a finite f32 but overflows f16 (largest finite 65504).
    let big = tiny(&dir, "big");
    edit_weights(&big, "model.layers.2.mlp.up_proj.weight", |v| v[1000] = 1e5);
    refused(
        &["logps", "--model", s(&big), "--data", s(&data), "--out", s(&out), "--dtype", "f16"],
        &["tensor `model.layers.2.mlp.up_proj.weight` holds 100000 at index [7, 104], which overflows f16"],
        &out,
    );
    assert!(load_model(&big, DType::F32, &Device::Cpu).is_ok());
}

/// Class 1, at the output: finite weights whose activations overflow (a final norm weight of
/// 3e38: the logits are ±inf, the log-softmax NaN) pass the load check, and every command that
/// writes numbers refuses the non-finite value naming the example (before: `null`, exit 0).
#[test]
fn non_finite_log_probs_are_refused_naming_the_example() {
    let dir = common::TempDir::new();
    let (data, prm) = (pairs(&dir), prompts(&dir));
    let m = tiny(&dir, "overflow");
    edit_weights(&m, "model.norm.weight", |v| v.fill(3e38));
    let out = dir.join("out.jsonl");
    refused(
        &[
            "logps",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ],
        &[&format!(
            "{}:1: field `chosen`: the log-probability is NaN",
            s(&data)
        )],
        &out,
    );
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--prompts",
            s(&prm),
            "--out",
            s(&out),
        ],
        &[&format!(
            "{}:1: a next-token logit of sample 0 at new token 0 is NaN",
            s(&prm)
        )],
        &out,
    );
    refused(
        &[
            "entropy",
            "--model",
            s(&m),
            "--prompts",
            s(&prm),
            "--out",
            s(&out),
            "--samples",
            "2",
        ],
        &[&format!(
            "{}:1: a next-token logit of sample 0 at new token 0 is NaN",
            s(&prm)
        )],
        &out,
    );
    let cands = common::write_lines(
        &dir,
        "cands.jsonl",
        &[r#"{"prompt": "The cat", "chosen": " sat.", "candidates": [" ran.", " slept."]}"#],
    );
    let clean = tiny(&dir, "clean");
    refused(
        &[
            "resample-rejected",
            "--reference",
            s(&m),
            "--target",
            s(&clean),
            "--candidates",
            s(&cands),
            "--beta",
            "0.5",
            "--out",
            s(&out),
        ],
        &[&format!(
            "{}:1: field `candidates[0]`: its log-probability is NaN",
            s(&cands)
        )],
        &out,
    );
    refused(
        &[
            "beta-accuracy",
            "--estimator",
            s(&clean),
            "--policy",
            s(&m),
            "--reference",
            s(&clean),
            "--prompts",
            s(&prm),
            "--out",
            s(&out),
            "--max-new-tokens",
            "3",
        ],
        &[&format!(
            "{}:1: the policy's log-probability of sample 0 is NaN",
            s(&prm)
        )],
        &out,
    );
}

/// Training on such a model stops at the first non-finite loss, naming the micro-batch's
/// examples by their lines in the data file (before: by dataset index only).
#[test]
fn training_names_the_lines_of_a_non_finite_batch() {
    let dir = common::TempDir::new();
    let m = tiny(&dir, "overflow");
    edit_weights(&m, "model.norm.weight", |v| v.fill(3e38));
    let data = common::write_lines(
        &dir,
        "sft.jsonl",
        &["", r#"{"prompt": "The cat", "completion": " sat."}"#],
    );
    let run_dir = dir.join("run");
    refused(
        &[
            "sft",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--output-dir",
            s(&run_dir),
            "--max-steps",
            "1",
        ],
        &[
            "non-finite loss (NaN) at step 1, batch 0",
            &format!("the examples are lines 2 of {}", s(&data)),
        ],
        &run_dir.join("checkpoint-1"),
    );
}

/// Class 6: a 1 MB record with `--max-length none` (a 1 MB prompt for `sample`) is refused
/// before anything of its size is allocated, naming the example and the memory asked for
/// (before: `memory allocation of 604923061824 bytes failed`, abort).
#[test]
fn over_long_inputs_are_refused_before_allocating() {
    let dir = common::TempDir::new();
    let m = tiny(&dir, "tiny");
    let text = "the cat sat on the mat and the dog ran away from home ".repeat(20_000);
    let long = serde_json::json!({"prompt": "Hello", "chosen": text, "rejected": " no"});
    let short = r#"{"prompt": "Hi", "chosen": " a", "rejected": " b"}"#;
    let data = common::write_lines(&dir, "big.jsonl", &[short, &long.to_string()]);
    let out = dir.join("out.jsonl");
    refused(
        &[
            "logps",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-length",
            "none",
            "--batch-size",
            "1",
        ],
        &[
            // logps scores in passes of at most 4096 padded tokens (issue 15): a sequence this
            // long runs alone, so the refused pass is of one sequence.
            &format!(
                "{}:2: field `chosen`: a forward pass over 1 sequence(s) of",
                s(&data)
            ),
            "TB of memory (attention probabilities",
            "truncate with --max-length",
        ],
        &out,
    );
    let prompt = serde_json::json!({ "prompt": text });
    let prm = common::write_lines(&dir, "bigp.jsonl", &[&prompt.to_string()]);
    refused(
        &[
            "sample",
            "--model",
            s(&m),
            "--prompts",
            s(&prm),
            "--out",
            s(&out),
            "--n",
            "2",
        ],
        &[
            // The prompt is encoded once for the two samples.
            &format!(
                "{}:1: field `prompt`: a forward pass over 1 sequence(s) of",
                s(&prm)
            ),
            "shorten the prompt (--max-prompt-length)",
        ],
        &out,
    );
}

/// A tokenizer from another checkpoint (ids beyond `vocab_size`): a clear error naming the
/// example, the tokenizer file, the id and the vocabulary size (before: candle's
/// index-select error naming neither).
#[test]
fn token_ids_beyond_the_vocabulary_are_refused() {
    let dir = common::TempDir::new();
    let other = tiny(&dir, "tiny");
    let (m, cfg) = common::checkpoint(common::micro_config(Architecture::Llama), 1);
    assert!(cfg.vocab_size < 1024);
    std::fs::copy(other.join("tokenizer.json"), m.join("tokenizer.json")).unwrap();
    let data = pairs(&dir);
    let out = dir.join("out.jsonl");
    let want_vocab = format!("outside the model's vocabulary of {}", cfg.vocab_size);
    let tok = format!("{}: token id", s(&m.join("tokenizer.json")));
    refused(
        &[
            "logps",
            "--model",
            s(m.path()),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ],
        &[
            &format!("{}:1: field `rejected`: ", s(&data)),
            &tok,
            &want_vocab,
        ],
        &out,
    );
    let prm = common::write_lines(
        &dir,
        "p.jsonl",
        &[r#"{"prompt": "Hi"}"#, r#"{"prompt": "The cat ran away."}"#],
    );
    refused(
        &[
            "sample",
            "--model",
            s(m.path()),
            "--prompts",
            s(&prm),
            "--out",
            s(&out),
        ],
        &[
            &format!("{}:2: field `prompt`: ", s(&prm)),
            &tok,
            &want_vocab,
        ],
        &out,
    );
    // The model itself refuses such ids in any forward pass (training included).
    let model = load_model(m.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[0u32, 5, 1000]], &Device::Cpu).unwrap();
    let e = model.token_logps(&ids, None).unwrap_err();
    assert!(matches!(e, Error::TokenOutOfVocab { id: 1000, .. }), "{e}");
}

/// Degenerate generation requests fail up front, as transformers' `GenerationConfig.validate`
/// does for `max_new_tokens = 0` (before: exit 0 with empty or pointless output).
#[test]
fn degenerate_generation_requests_are_refused() {
    let dir = common::TempDir::new();
    let m = tiny(&dir, "tiny");
    let prm = prompts(&dir);
    let out = dir.join("out.jsonl");
    let base = ["--model", s(&m), "--prompts", s(&prm), "--out", s(&out)];
    for (cmd, extra, want) in [
        ("sample", ["--n", "0"], "--n must be ≥ 1"),
        (
            "sample",
            ["--max-new-tokens", "0"],
            "--max-new-tokens must be ≥ 1",
        ),
        ("entropy", ["--max-new-tokens", "0"], "--max-new-tokens ≥ 1"),
    ] {
        let mut args = vec![cmd];
        args.extend(base);
        args.extend(extra);
        refused(&args, &[want], &out);
    }
}

/// Class 5: incremental decoding builds no autograd graph (the model's weights are variables,
/// yet the logits and the cache track nothing), and the cache's buffers grow geometrically,
/// not by one step's copy per token; the cached decode still equals the full forward
/// (`model_equivalence.rs`). Before, each step's logits and keys carried the graph of every
/// earlier step: memory quadratic in the generated length.
#[test]
fn decoding_keeps_no_graph_and_a_linear_cache() {
    let (_d, m) = common::model(common::micro_config(Architecture::Llama), DType::F32, 3);
    assert!(m.tracks_graph());
    let mut cache = KvCache::new();
    let prompt = Tensor::new(&[[0u32, 44, 120, 7]], &Device::Cpu).unwrap();
    let logits = m.forward_with_cache(&prompt, &mut cache).unwrap();
    assert!(!logits.track_op(), "prefill logits record a graph");
    for t in 0..40u32 {
        let next = Tensor::new(&[[t % 300]], &Device::Cpu).unwrap();
        let logits = m.forward_with_cache(&next, &mut cache).unwrap();
        assert!(!logits.track_op(), "step {t}: logits record a graph");
        assert!(!cache.tracks_graph(), "step {t}: the cache records a graph");
        assert!(cache.capacity() >= cache.len() && cache.capacity() <= 2 * cache.len());
    }
    assert_eq!(cache.len(), 44);
    // With room reserved up front the buffers are allocated once.
    let mut cache = KvCache::with_capacity(64);
    m.forward_with_cache(&prompt, &mut cache).unwrap();
    assert_eq!(cache.capacity(), 64);
}

/// Class 1 for adapters: a PEFT adapter holding a NaN (a `--use-peft` run's checkpoint,
/// edited) is refused when read, naming the file, the tensor and the first NaN: `merge` exits 1
/// and writes no merged checkpoint (before: the NaN was folded into the base weights).
#[test]
fn nan_adapter_weights_are_refused_naming_the_tensor() {
    let dir = common::TempDir::new();
    let (base, data) = (tiny(&dir, "base"), pairs(&dir));
    let run_dir = dir.join("run");
    let o = run(&[
        "dpo",
        "--model",
        s(&base),
        "--data",
        s(&data),
        "--output-dir",
        s(&run_dir),
        "--use-peft",
        "--max-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let adapter = run_dir.join("checkpoint-1");
    let file = adapter.join("adapter_model.safetensors");
    let names: Vec<String> = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .into_keys()
        .filter(|k| k.contains("lora_B"))
        .collect();
    edit_tensors(&file, &names[0], |v| v[2] = f32::NAN);
    let out = dir.join("merged");
    let want = format!(
        "adapter_model.safetensors: tensor `{}` contains NaN at index",
        names[0]
    );
    refused(
        &[
            "merge",
            "--adapter",
            s(&adapter),
            "--model",
            s(&base),
            "--out",
            s(&out),
        ],
        &[&want],
        &out,
    );
    let e = difinfo_trainer::lora::read_weights(&adapter, &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::NonFiniteWeight { .. }), "{e}");
}
