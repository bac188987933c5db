//! Issue 20: see the module list in `hostile_round2.rs`. Outputs (class 3 and the weak results
//! on output paths), LoRA module paths (class 8), an `eos_token` that is not a token (class 9).

#[allow(unused_imports)]
use super::*;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};

/// The bytes of every file in `dir`, by name (to show a directory untouched).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The tensors of `file` (safetensors) on the CPU.
fn tensors(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

/// A hand-written PEFT LoRA adapter in `dir` whose adapter_config.json has `target_modules`
/// (a list or one pattern) and whose adapter_model.safetensors holds a non-zero adapter
/// (`r = 2`) for each module of `modules` (full names, e.g. `model.layers.0.self_attn.q_proj`)
/// of the base model `base`.
fn peft_adapter(
    dir: &Path,
    base: &Path,
    target_modules: serde_json::Value,
    modules: &[&str],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "base_model_name_or_path": s(base),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": target_modules,
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let w = tensors(&base.join("model.safetensors"));
    let mut out = HashMap::new();
    for m in modules {
        let (d_out, d_in) = w[&format!("{m}.weight")].dims2().unwrap();
        let a = Tensor::ones((2, d_in), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = (Tensor::ones((d_out, 2), candle_core::DType::F32, &Device::Cpu).unwrap() * 0.01)
            .unwrap();
        out.insert(format!("base_model.model.{m}.lora_A.weight"), a);
        out.insert(format!("base_model.model.{m}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&out, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// Whether tensor `name` differs between two safetensors files.
fn differs(a: &Path, b: &Path, name: &str) -> bool {
    let (x, y) = (&tensors(a)[name], &tensors(b)[name]);
    let f64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    crate::common::max_abs(&(f64(x) - f64(y)).unwrap()) > 0.0
}

/// Class 3: `convert` into a non-empty directory is refused before any work, naming `--out`
/// and `--overwrite`; the files there stay as they were (before: the checkpoint there was
/// written over).
#[test]
fn convert_into_a_non_empty_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let before = snapshot(&model);
    // The check comes before the GGUF file is read: any file shows it.
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    refused(
        &["convert", "--gguf", s(&gguf), "--out", s(&model)],
        &["--out", "is not empty", "--overwrite"],
    );
    assert_eq!(snapshot(&model), before);
}

/// Class 3: `merge` into a non-empty directory is refused, naming `--out` and `--overwrite`;
/// the checkpoint there is untouched (before: replaced by the merged model).
#[test]
fn merge_into_a_non_empty_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let adapter = peft_adapter(
        &dir.path().join("adapter"),
        &base,
        serde_json::json!(["q_proj"]),
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ],
    );
    let other = dir.path().join("other");
    init_checkpoint(
        &other,
        arch_config(ModelSize::Tiny, Architecture::Llama),
        BUILTIN_CORPUS,
        1,
    )
    .unwrap();
    let before = snapshot(&other);
    refused(
        &[
            "merge",
            "--adapter",
            s(&adapter),
            "--model",
            s(&base),
            "--out",
            s(&other),
        ],
        &["--out", "is not empty", "--overwrite"],
    );
    assert_eq!(snapshot(&other), before);
}

/// Class 3: `merge --model B --out B` (with or without `--overwrite`, and with the base named
/// only by the adapter's base_model_name_or_path) is refused naming both, and the base model
/// keeps its bytes (before: the base was replaced by the merged model in place).
#[test]
fn merge_onto_its_own_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let adapter = peft_adapter(
        &dir.path().join("adapter"),
        &base,
        serde_json::json!(["model.layers.0.self_attn.q_proj"]),
        &["model.layers.0.self_attn.q_proj"],
    );
    let before = snapshot(&base);
    let args = [
        "merge",
        "--adapter",
        s(&adapter),
        "--model",
        s(&base),
        "--out",
        s(&base),
    ];
    refused(&args, &["--out", "--model", "replace"]);
    let mut with = args.to_vec();
    with.push("--overwrite");
    refused(&with, &["--out", "--model", "replace"]);
    refused(
        &[
            "merge",
            "--adapter",
            s(&adapter),
            "--out",
            s(&base),
            "--overwrite",
        ],
        &["--out", "base_model_name_or_path", "replace"],
    );
    refused(
        &[
            "merge",
            "--adapter",
            s(&adapter),
            "--model",
            s(&base),
            "--out",
            s(&adapter),
            "--overwrite",
        ],
        &["--out", "--adapter", "replace"],
    );
    assert_eq!(snapshot(&base), before);
    // And `init`'s refusal is the same check: a non-empty --out without --overwrite.
    refused(
        &["init", "--out", s(&base)],
        &["--out", "is not empty", "--overwrite"],
    );
    assert_eq!(snapshot(&base), before);
}

/// Class 8: `--lora-target-modules model.layers.0.self_attn.q_proj` adapts q_proj of layer 0
/// only, and adapter_config.json records the module as given (before: q_proj of every layer,
/// recorded as `["q_proj"]`).
#[test]
fn a_one_layer_target_adapts_only_that_layer() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let out = dir.path().join("run");
    let data = prefs();
    ok(&dpo(
        s(&base),
        s(&data),
        s(&out),
        &[
            "--use-peft",
            "--lora-target-modules",
            "model.layers.0.self_attn.q_proj",
            "--max-steps",
            "1",
        ],
    ));
    let ck = out.join("checkpoint-1");
    let mut names: Vec<String> = tensors(&ck.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ]
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["model.layers.0.self_attn.q_proj"])
    );
    // A module path that names no module of the model is refused, naming it.
    refused(
        &dpo(
            s(&base),
            s(&data),
            s(&dir.path().join("run2")),
            &[
                "--use-peft",
                "--lora-target-modules",
                "model.layers.99.self_attn.q_proj",
                "--max-steps",
                "1",
            ],
        ),
        &["model.layers.99.self_attn.q_proj", "matches no module"],
    );
}

/// Class 8: a valid PEFT adapter for one layer (a list naming the module path, or one
/// pattern, which PEFT matches with re.fullmatch) merges, changing only that layer's weight
/// (before: refused as "missing tensor" for the other layers).
#[test]
fn a_peft_adapter_for_one_layer_merges() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let w = base.join("model.safetensors");
    for (i, targets) in [
        serde_json::json!(["model.layers.0.self_attn.q_proj"]),
        serde_json::json!(r"model\.layers\.0\.self_attn\.(q|v)_proj"),
    ]
    .into_iter()
    .enumerate()
    {
        let adapter = peft_adapter(
            &dir.path().join(format!("adapter{i}")),
            &base,
            targets,
            &["model.layers.0.self_attn.q_proj"],
        );
        let out = dir.path().join(format!("merged{i}"));
        ok(&["merge", "--adapter", s(&adapter), "--out", s(&out)]);
        let m = out.join("model.safetensors");
        assert!(differs(&w, &m, "model.layers.0.self_attn.q_proj.weight"));
        assert!(!differs(&w, &m, "model.layers.1.self_attn.q_proj.weight"));
        assert!(!differs(&w, &m, "model.layers.0.self_attn.v_proj.weight"));
    }
    // A pattern reaching a module that is not a projection is refused, naming it.
    let adapter = peft_adapter(
        &dir.path().join("adapter_bad"),
        &base,
        serde_json::json!(".*"),
        &["model.layers.0.self_attn.q_proj"],
    );
    refused(
        &[
            "merge",
            "--adapter",
            s(&adapter),
            "--out",
            s(&dir.path().join("bad")),
        ],
        &["adapter_config.json", "target_modules", "not a projection"],
    );
}

/// Class 9: an `eos_token` in tokenizer_config.json that is not one token of the vocabulary
/// is refused naming the file and the field (before: appended to every completion as text,
/// 11 BPE pieces, exit 0).
#[test]
fn an_eos_token_that_is_not_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let tc = base.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    cfg["eos_token"] = "<|not-a-token-at-all|>".into();
    std::fs::write(&tc, cfg.to_string()).unwrap();
    refused(
        &[
            "logps",
            "--model",
            s(&base),
            "--data",
            s(&prefs()),
            "--out",
            s(&dir.path().join("lp.jsonl")),
        ],
        &[
            "tokenizer_config.json",
            "eos_token",
            "<|not-a-token-at-all|>",
        ],
    );
}

/// Weak result: past `ulimit -f` the run ends with a message naming the output, exit 1, and
/// nothing left behind (before: killed by SIGXFSZ with no message).
#[test]
fn a_file_size_limit_is_an_error_naming_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 64 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_difinfo-train"))
        .args(["init", "--out", s(&out)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{:?}\n{err}", o.status);
    assert!(err.contains(s(&out)) && err.contains("too large"), "{err}");
    // Nothing is left: neither a temporary file or directory nor a checkpoint without weights.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Weak result: an output that is a symbolic link is refused naming it (before: the link was
/// replaced by a file, its target left as it was); one that is a device (`/dev/full`) is
/// refused before the work.
#[test]
fn symlink_and_device_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let target = dir.path().join("target.jsonl");
    std::fs::write(&target, "keep\n").unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(
        &[
            "logps",
            "--model",
            s(&base),
            "--data",
            s(&prefs()),
            "--out",
            s(&link),
        ],
        &["--out", s(&link), "symbolic link"],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
    refused(
        &[
            "logps",
            "--model",
            s(&base),
            "--data",
            s(&prefs()),
            "--out",
            "/dev/full",
        ],
        &["--out /dev/full", "not a regular file"],
    );
}

/// Weak result: a legal 250-byte `--out` name works (before: the temporary name, 250 bytes
/// plus a prefix, passed NAME_MAX and the run failed after the work); a 256-byte one is
/// refused before the work, naming the option.
#[test]
fn long_output_names_work_up_to_name_max() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let long = dir.path().join(format!("{}.jsonl", "a".repeat(244)));
    ok(&[
        "logps",
        "--model",
        s(&base),
        "--data",
        s(&prefs()),
        "--out",
        s(&long),
    ]);
    assert!(long.is_file());
    let longer = dir.path().join(format!("{}.jsonl", "a".repeat(250)));
    refused(
        &[
            "logps",
            "--model",
            s(&base),
            "--data",
            s(&prefs()),
            "--out",
            s(&longer),
        ],
        &["--out", "longer than the 255"],
    );
}

/// Weak result: an empty checksums.sha256 is refused on --resume, naming it (before: it
/// verified nothing and the resume went on).
#[test]
fn an_empty_checksum_file_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let run_dir = dir.path().join("run");
    let data = prefs();
    ok(&dpo(s(&base), s(&data), s(&run_dir), &["--max-steps", "1"]));
    let sums = run_dir.join("checkpoint-1/checksums.sha256");
    std::fs::write(&sums, "").unwrap();
    refused(
        &["dpo", "--resume", s(&run_dir), "--max-steps", "2"],
        &["checksums.sha256", "empty"],
    );
}

/// Weak results: LoRA options without `--use-peft` are refused naming the option (on the
/// command line and in a --config file; before: ignored), and `--lora-r` above a targeted
/// projection's rank is refused naming the option (before: accepted silently).
#[test]
fn lora_options_without_use_peft_and_oversized_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let run = |extra: &[&str], out: &str| {
        let mut a = vec![
            "dpo".to_string(),
            "--model".into(),
            s(&base).into(),
            "--data".into(),
            s(&prefs()).into(),
            "--output-dir".into(),
            s(&dir.path().join(out)).into(),
            "--max-steps".into(),
            "1".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    for (opt, v) in [
        ("--lora-r", "8"),
        ("--lora-alpha", "4"),
        ("--lora-dropout", "0.1"),
        ("--lora-target-modules", "q_proj"),
    ] {
        let a = run(&[opt, v], "r1");
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, &[opt, "--use-peft"]);
    }
    let toml = dir.path().join("c.toml");
    std::fs::write(&toml, "lora_r = 8\n").unwrap();
    let a = run(&["--config", s(&toml)], "r2");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(&a, &["c.toml", "lora_r = 8", "use_peft"]);
    let a = run(&["--use-peft", "--lora-r", "1000"], "r3");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    refused(&a, &["--lora-r", "1000", "exceeds"]);
}

/// Weak result: an adapter directory given as `--model` is named as a PEFT adapter with its
/// base model (before: "config.json: No such file or directory").
#[test]
fn an_adapter_given_as_model_names_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let adapter = peft_adapter(
        &dir.path().join("adapter"),
        &base,
        serde_json::json!(["q_proj"]),
        &["model.layers.0.self_attn.q_proj"],
    );
    refused(
        &[
            "logps",
            "--model",
            s(&adapter),
            "--data",
            s(&prefs()),
            "--out",
            s(&dir.path().join("lp.jsonl")),
        ],
        &["PEFT adapter", s(&base), "--model", "merge"],
    );
}

/// Weak result: a token id beyond the model's vocabulary (a tokenizer from another
/// checkpoint) in training names the example (file:line: field) and the tokenizer (before:
/// only the id and the vocabulary size).
#[test]
fn an_out_of_vocabulary_id_names_the_example_and_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(dir.path());
    let tj = base.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    t["model"]["vocab"]["e"] = 50_000.into();
    std::fs::write(&tj, t.to_string()).unwrap();
    let data = prefs();
    refused(
        &dpo(
            s(&base),
            s(&data),
            s(&dir.path().join("run")),
            &["--max-steps", "1"],
        ),
        &[
            "example_prefs.jsonl:3: field `rejected`",
            "tokenizer.json",
            "50000",
        ],
    );
}

/// A small tmpfs mounted in a temporary directory (unmounted on drop), or `None` where this
/// process may not mount (not root): a full disk on demand.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Weak result: a full disk (ENOSPC) while a checkpoint directory is written names the output
/// file, not a temporary one or an input, and leaves no partial checkpoint: `init` into a new
/// directory leaves nothing, `init --overwrite` keeps the directory as it was (before: config,
/// tokenizer and generation files of a checkpoint without weights were left behind); `logps`'s
/// output is named and no temporary file is left.
#[test]
fn a_full_disk_names_the_output_and_leaves_no_partial_checkpoint() {
    let Some(disk) = SmallDisk::mount("2m") else {
        return;
    };
    let m = disk.path().join("m");
    let e = refused(
        &["init", "--size", "tiny", "--out", s(&m)],
        &["m/model.safetensors", "No space left on device"],
    );
    assert!(!e.contains(".tmp-"), "a temporary path is named: {e}");
    assert!(
        disk.entries().is_empty(),
        "left behind: {:?}",
        disk.entries()
    );

    let kept = disk.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("notes.txt"), b"mine").unwrap();
    refused(
        &["init", "--size", "tiny", "--out", s(&kept), "--overwrite"],
        &["kept/model.safetensors", "No space left on device"],
    );
    assert_eq!(disk.entries(), ["kept"]);
    let files: Vec<_> = snapshot(&kept).into_keys().collect();
    assert_eq!(files, ["notes.txt"]);

    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let Some(small) = SmallDisk::mount("8k") else {
        return;
    };
    let out = small.path().join("logps.jsonl");
    let e = refused(
        &[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&prefs()),
            "--out",
            s(&out),
        ],
        &["logps.jsonl", "No space left on device"],
    );
    assert!(!e.contains(".tmp-"), "a temporary path is named: {e}");
    assert!(
        small.entries().is_empty(),
        "left behind: {:?}",
        small.entries()
    );
}
