//! Replays every file of the cargo-fuzz seed corpora (`fuzz/corpus/<target>/`) through the
//! same entry points the fuzz targets call, so CI catches regressions without a fuzzer.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

fn replay(target: &str, f: fn(&[u8])) {
    for (path, data) in corpus(target) {
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: {} panicked", path.display());
    }
}

#[test]
fn jsonl_example_corpus_replays() {
    replay("jsonl_example", difinfo_trainer::fuzzing::jsonl_example);
}

#[test]
fn config_json_corpus_replays() {
    replay("config_json", difinfo_trainer::fuzzing::config_json);
}

#[test]
fn chat_template_corpus_replays() {
    replay("chat_template", difinfo_trainer::fuzzing::chat_template);
}

#[test]
fn safetensors_file_corpus_replays() {
    replay(
        "safetensors_file",
        difinfo_trainer::fuzzing::safetensors_file,
    );
}

#[test]
fn trainer_state_corpus_replays() {
    replay("trainer_state", difinfo_trainer::fuzzing::trainer_state);
}

#[test]
fn train_config_toml_corpus_replays() {
    replay(
        "train_config_toml",
        difinfo_trainer::fuzzing::train_config_toml,
    );
}

#[test]
fn resume_file_seeds_exercise_success_and_refusal_paths() {
    use difinfo_trainer::train::{checkpoint, Optimizer, OptimizerConfig, OptimizerKind};
    use std::path::Path;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let p = Path::new("<seed>");
    let tensors =
        difinfo_trainer::safetensors::parse_safetensors(&read("safetensors_file/dtypes"), p)
            .unwrap();
    assert_eq!(tensors.len(), 8);
    let dev = candle_core::Device::Cpu;
    let vars = vec![
        (
            "a.weight".to_string(),
            candle_core::Var::zeros((2, 3), candle_core::DType::F32, &dev).unwrap(),
        ),
        (
            "b.bias".to_string(),
            candle_core::Var::zeros(4, candle_core::DType::F32, &dev).unwrap(),
        ),
    ];
    let cfg = |kind| OptimizerConfig {
        kind,
        ..OptimizerConfig::default()
    };
    let o = Optimizer::from_bytes(
        cfg(OptimizerKind::Adamw),
        &vars,
        &read("safetensors_file/adamw_state"),
        p,
    )
    .unwrap();
    assert_eq!(o.step_count(), 3);
    let o = Optimizer::from_bytes(
        cfg(OptimizerKind::Rmsprop),
        &vars,
        &read("safetensors_file/rmsprop_state"),
        p,
    )
    .unwrap();
    assert_eq!(o.step_count(), 7);
    let e = Optimizer::from_bytes(
        cfg(OptimizerKind::Rmsprop),
        &vars,
        &read("safetensors_file/nan_state"),
        p,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("non-finite"), "{e}");
    let text = |f: &str| String::from_utf8(read(f)).unwrap();
    let s = checkpoint::parse_state(&text("trainer_state/state_v1"), p).unwrap();
    assert!(s.checksums && s.global_step == 2);
    assert!(checkpoint::parse_state(&text("trainer_state/other_format"), p).is_err());
    let old = checkpoint::parse_state(&text("trainer_state/no_checksums_field"), p).unwrap();
    assert!(!old.checksums);
    let sums = checkpoint::parse_checksums(&text("trainer_state/checksums"), p).unwrap();
    assert_eq!(sums.len(), 8);
    assert!(sums.iter().any(|(_, n)| n == "optimizer.safetensors"));
    assert!(checkpoint::parse_checksums(&text("trainer_state/bad_checksum_line"), p).is_err());
    let merge = |f: &str| {
        difinfo_trainer::train::config::merge_tables(
            toml::Table::try_from(difinfo_trainer::train::TrainConfig::default()).unwrap(),
            Some((p, text(f).parse::<toml::Table>().unwrap())),
            toml::Table::new(),
        )
    };
    assert_eq!(
        merge("train_config_toml/paper_dpo").unwrap().warmup_steps,
        150
    );
    let e = merge("train_config_toml/beta1_out_of_range")
        .unwrap_err()
        .to_string();
    assert!(e.contains("<seed>: adam_beta1 = 1.5"), "{e}");
}

#[test]
fn gguf_import_corpus_replays() {
    replay("gguf_import", difinfo_trainer::fuzzing::gguf_import);
}

#[test]
fn gguf_seed_imports() {
    // The valid seed goes through the whole conversion; the broken ones are errors.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_import");
    let import = |f: &str| {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        difinfo_trainer::gguf::import(
            &mut std::io::Cursor::new(bytes),
            std::path::Path::new(f),
            &mut |_, _| {},
        )
    };
    let ok = import("valid_q4_1").unwrap();
    assert_eq!(ok.summary.tensor_types.get("Q4_1"), Some(&7));
    for f in [
        "bad_magic",
        "truncated_header",
        "truncated_data",
        "unsupported_arch",
    ] {
        assert!(import(f).is_err(), "{f}");
    }
}

#[test]
fn corpus_seeds_exercise_success_paths() {
    // The seeds are not all errors: the well-formed ones parse and render.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let std_line = std::fs::read_to_string(dir.join("jsonl_example/standard")).unwrap();
    assert!(difinfo_trainer::records::parse_preference_str(&std_line).is_ok());
    for f in ["candidates_plain", "candidates_chat"] {
        let text = std::fs::read_to_string(dir.join("jsonl_example").join(f)).unwrap();
        let set =
            difinfo_trainer::records::parse_candidates_line(&text, std::path::Path::new(f), 1);
        assert!(set.is_ok_and(|s| s.candidates.len() >= 2), "{f}");
    }
    for f in ["llama3", "qwen2", "mistral"] {
        let text = std::fs::read_to_string(dir.join("config_json").join(f)).unwrap();
        assert!(
            difinfo_trainer::config_json::parse_config(&text).is_ok(),
            "{f}"
        );
    }
    let z = std::fs::read_to_string(dir.join("chat_template/zephyr")).unwrap();
    let (t, m) = z.split_once('\0').unwrap();
    let out = difinfo_trainer::template::render_chat_template(t, m, false).unwrap();
    assert_eq!(out, "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n");
    let p = std::fs::read_to_string(dir.join("chat_template/python_methods")).unwrap();
    let (t, m) = p.split_once('\0').unwrap();
    let out = difinfo_trainer::template::render_chat_template(t, m, false).unwrap();
    // Jinja2 renders Python booleans capitalized; minijinja matches.
    assert!(out.starts_with("\"a\\\"b\"False"), "{out}");
}

#[test]
fn parquet_file_corpus_replays() {
    replay("parquet_file", difinfo_trainer::fuzzing::parquet_file);
}

#[test]
fn parquet_seeds_read_as_datasets_read_them() {
    // String, binary (UTF-8 decoded; a non-UTF-8 value named), nested chat lists, a DATE
    // column beside SFT text, and the gzip, brotli and zstd codecs.
    use difinfo_trainer::records::{
        parse_preference_line, parse_sft_line, read_parquet_bytes, PreferenceExample, Text,
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/parquet_file");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let p = std::path::Path::new("<seed>");
    let prefs = |f: &str| read_parquet_bytes(&read(f), p, true, parse_preference_line).unwrap();
    let s = prefs("prefs_strings");
    assert_eq!((s.examples.len(), s.errors.len()), (1, 1));
    assert!(s.errors[0]
        .to_string()
        .contains("<seed>:2: field `rejected`: missing"));
    let b = prefs("prefs_binary");
    assert_eq!(
        b.examples[0].value.prompt,
        Text::Plain("What is 2+2?".into())
    );
    let e = b.errors[0].to_string();
    assert!(
        e.contains("<seed>:2: field `rejected`") && e.contains("not valid UTF-8"),
        "{e}"
    );
    let c = prefs("chat_list");
    assert!(matches!(
        &c.examples[0].value,
        PreferenceExample { prompt: Text::Chat(m), .. } if m[0].content == "hi"
    ));
    assert!(c.errors[0]
        .to_string()
        .contains("<seed>:2: field `rejected`"));
    assert_eq!(prefs("prefs_brotli").examples.len(), 1);
    let sft = read_parquet_bytes(&read("sft_date_zstd"), p, false, parse_sft_line).unwrap();
    assert_eq!(sft.examples.len(), 1);
}

#[test]
fn gguf_header_corpus_replays() {
    replay("gguf_header", difinfo_trainer::fuzzing::gguf_header);
}

#[test]
fn gguf_header_seeds_are_refused_naming_the_key_or_tensor() {
    // Each hostile header seed (issue 20: alignment 0 divided by zero in candle's reader, huge
    // arrays, duplicates) is an error naming what is wrong.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_header");
    let p = std::path::Path::new("<seed>");
    for (seed, names) in [
        ("alignment_zero", &["general.alignment", "power of two"][..]),
        ("alignment_three", &["general.alignment", "power of two"]),
        ("alignment_string", &["general.alignment", "integer"]),
        ("huge_array", &["x.blob", "1099511627776 elements"]),
        ("huge_string", &["x.str", "1099511627776 bytes"]),
        (
            "huge_tokens",
            &["tokenizer.ggml.tokens", "16777217 elements"],
        ),
        ("duplicate_key", &["general.name", "twice"]),
        ("duplicate_tensor", &["output_norm.weight", "twice"]),
        ("tensor_past_end", &["token_embd.weight", "past the end"]),
        ("tensor_dims_overflow", &["token_embd.weight", "overflow"]),
        ("tensor_many_dims", &["token_embd.weight", "9 dimensions"]),
        ("tensor_misaligned", &["output_norm.weight", "alignment"]),
        ("tensor_partial_block", &["output_norm.weight", "blocks"]),
        ("tensor_unknown_type", &["output_norm.weight", "IQ2_XXS"]),
        ("bool_byte", &["add_bos_token", "boolean"]),
        ("unknown_value_type", &["x.t", "value type 13"]),
    ] {
        let data = std::fs::read(dir.join(seed)).unwrap();
        let file = difinfo_trainer::fuzzing::gguf_header_file(&data).unwrap();
        let e = difinfo_trainer::gguf::read_header(&mut std::io::Cursor::new(&file), p)
            .unwrap_err()
            .to_string();
        for n in names {
            assert!(
                e.contains(n) && e.contains("<seed>"),
                "{seed}: `{n}` not named: {e}"
            );
        }
    }
    // The nested arrays are walked over; the minimal llama header reads (its import fails
    // later, on missing keys).
    for seed in ["nested_arrays", "llama_minimal"] {
        let data = std::fs::read(dir.join(seed)).unwrap();
        let file = difinfo_trainer::fuzzing::gguf_header_file(&data).unwrap();
        difinfo_trainer::gguf::read_header(&mut std::io::Cursor::new(&file), p)
            .unwrap_or_else(|e| panic!("{seed}: {e}"));
    }
}
