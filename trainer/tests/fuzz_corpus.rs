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
    assert!(difinfo_trainer::data::parse_preference_str(&std_line).is_ok());
    for f in ["candidates_plain", "candidates_chat"] {
        let text = std::fs::read_to_string(dir.join("jsonl_example").join(f)).unwrap();
        let set = difinfo_trainer::data::parse_candidates_line(&text, std::path::Path::new(f), 1);
        assert!(set.is_ok_and(|s| s.candidates.len() >= 2), "{f}");
    }
    for f in ["llama3", "qwen2", "mistral"] {
        let text = std::fs::read_to_string(dir.join("config_json").join(f)).unwrap();
        assert!(difinfo_trainer::config::parse_config(&text).is_ok(), "{f}");
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
