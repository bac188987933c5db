//! Bad input gets an error naming file, line and field (data) or tensor and file (checkpoints).

mod common;

use candle_core::{DType, Device, Tensor};
use difinfo_trainer::config_json::{parse_config, Architecture};
use difinfo_trainer::pretrained::load_model;
use difinfo_trainer::records::{
    parse_preference_line, parse_preference_str, read_jsonl, write_error_report,
};
use difinfo_trainer::tokenize::{load_preferences, TokenizeOptions};
use difinfo_trainer::Error;

fn first_error(lines: &[&str]) -> String {
    let dir = common::TempDir::new();
    let p = common::write_lines(&dir, "bad.jsonl", lines);
    let err = read_jsonl(&p, false, parse_preference_line).unwrap_err();
    err.to_string().replace(&p.display().to_string(), "FILE")
}

#[test]
fn data_errors_name_file_line_and_field() {
    let ok = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![ok, "{not json"], "FILE:2: invalid JSON"),
        (vec![ok, "", "[1, 2]"], "FILE:3: expected a JSON object, found a list"),
        (vec![r#"{"prompt": "p", "rejected": "r"}"#], "FILE:1: field `chosen`: missing"),
        (vec![r#"{"prompt": "", "chosen": "c", "rejected": "r"}"#], "FILE:1: field `prompt`: is empty"),
        (vec![r#"{"prompt": "p", "chosen": 3, "rejected": "r"}"#], "FILE:1: field `chosen`: expected a string (the prompt is a string)"),
        (vec![r#"{"prompt": "p", "chosen": "c", "rejected": null}"#], "FILE:1: field `rejected`: expected a string (the prompt is a string), found null"), (vec![r#"{"prompt": 5, "chosen": "c", "rejected": "r"}"#], "FILE:1: field `prompt`: expected a string or a list of messages, found a number"),
        (
            vec![r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "robot", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#],
            "FILE:1: field `chosen[0].role`: unknown role `robot`",
        ),
        (
            vec![r#"{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}"#],
            "FILE:1: field `prompt[0].content`: missing",
        ),
        (
            vec![r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}"#],
            "FILE:1: field `chosen`: expected a list of messages (the prompt is conversational), found a string",
        ),
        (
            vec![r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": []}"#],
            "FILE:1: field `chosen`: empty list of messages",
        ),
        (
            vec![r#"{"chosen": "abc", "rejected": "xyz"}"#],
            "FILE:1: field `prompt`: missing, and `chosen` and `rejected` share no prefix",
        ),
        (
            vec![r#"{"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}"#],
            "FILE:1: field `prompt`: missing, and `chosen` and `rejected` share no prefix",
        ),
        (
            vec![r#"{"prompt": [{"role": "user", "content": ["part"]}], "chosen": [], "rejected": []}"#],
            "FILE:1: field `prompt[0].content`: expected a string, found a list",
        ),
    ];
    for (lines, want) in cases {
        let got = first_error(&lines);
        assert!(got.starts_with(want), "got `{got}`, want prefix `{want}`");
    }
}

/// TRL's `maybe_extract_prompt`: without `prompt`, the common prefix of `chosen` and
/// `rejected` is the prompt (a space before the difference goes to the completions).
#[test]
fn implicit_prompt_is_extracted_as_trl_does() {
    use difinfo_trainer::records::Text;
    let p =
        parse_preference_str(r#"{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}"#).unwrap();
    assert_eq!(p.prompt, Text::Plain("Q: hi A:".into()));
    assert_eq!(p.chosen, Text::Plain(" yes".into()));
    assert_eq!(p.rejected, Text::Plain(" no".into()));
    let p = parse_preference_str(
        r#"{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}"#,
    )
    .unwrap();
    let Text::Chat(prompt) = &p.prompt else {
        panic!("{p:?}")
    };
    assert_eq!(prompt.len(), 1);
    assert_eq!(prompt[0].content, "hi");
    let (Text::Chat(c), Text::Chat(r)) = (&p.chosen, &p.rejected) else {
        panic!("{p:?}")
    };
    assert_eq!((c[0].content.as_str(), r[0].content.as_str()), ("a", "b"));
    assert_eq!((c.len(), r.len()), (1, 1));
}

#[test]
fn skip_invalid_counts_and_reports() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let data = common::write_lines(
        &dir,
        "mixed.jsonl",
        &[
            r#"{"prompt": "Hi", "chosen": " a", "rejected": " b"}"#,
            r#"{"prompt": "Hi", "chosen": " a"}"#,
            "garbage",
            r#"{"prompt": "Hello", "chosen": " c", "rejected": " d"}"#,
        ],
    );
    assert!(load_preferences(&tok, &data, &TokenizeOptions::default(), false).is_err());
    let ds = load_preferences(&tok, &data, &TokenizeOptions::default(), true).unwrap();
    assert_eq!(ds.stats.kept, 2);
    assert_eq!(ds.stats.invalid, 2);
    assert_eq!(ds.stats.total, 4);
    assert_eq!(
        ds.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let report = dir.join("report.jsonl");
    write_error_report(&report, &ds.errors).unwrap();
    let text = std::fs::read_to_string(&report).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["line"], 2);
    assert_eq!(rows[0]["field"], "rejected");
}

#[test]
fn template_render_failure_is_located() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = common::tokenizer(dir.path());
    let data = common::write_lines(
        &dir,
        "chat.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        ],
    );
    let err = load_preferences(&tok, &data, &TokenizeOptions::default(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}:2: field `prompt`: chat template:",
            data.display()
        )),
        "{err}"
    );
    assert!(err.contains("System role not supported"), "{err}");
}

#[test]
fn conversational_data_without_template_is_an_error() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = common::tokenizer(dir.path());
    let data = common::write_lines(
        &dir,
        "c.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        ],
    );
    let err = load_preferences(&tok, &data, &TokenizeOptions::default(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            ":1: field `prompt`: chat template: conversational data needs a chat template"
        ),
        "{err}"
    );
}

#[test]
fn config_errors() {
    let err = parse_config(r#"{"model_type": "gpt2", "vocab_size": 10}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unsupported model_type `gpt2`; supported: llama, mistral, qwen2"),
        "{err}"
    );
    let base = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2"#;
    assert!(parse_config(&format!("{base}}}")).is_ok());
    let err = parse_config(&format!("{base}, \"num_key_value_heads\": 3}}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a multiple of num_key_value_heads"),
        "{err}"
    );
    let err = parse_config(&format!(
        "{base}, \"rope_scaling\": {{\"rope_type\": \"yarn\", \"factor\": 4}}}}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unsupported rope scaling type `yarn`"),
        "{err}"
    );
    let err = parse_config(r#"{"model_type": "llama", "hidden_size": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing `vocab_size`"), "{err}");
    let err = parse_config("{").unwrap_err().to_string();
    assert!(err.contains("invalid JSON"), "{err}");
    let err = parse_config(&format!("{base}, \"hidden_act\": \"gelu\"}}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported hidden_act `gelu`"), "{err}");
}

fn rewrite_weights(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>),
) {
    let p = dir.join("model.safetensors");
    let mut t: std::collections::BTreeMap<String, Tensor> =
        candle_core::safetensors::load(&p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut t);
    let map: std::collections::HashMap<String, Tensor> = t.into_iter().collect();
    candle_core::safetensors::save(&map, &p).unwrap();
}

#[test]
fn missing_and_misshaped_tensors_are_named_with_their_file() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let file = dir.join("model.safetensors");
    rewrite_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "model.layers.1.mlp.up_proj.weight")
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}: missing tensor `model.layers.1.mlp.up_proj.weight`",
            file.display()
        )
    );

    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "model.norm.weight".into(),
            Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_model(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: tensor `model.norm.weight` has shape [7], config.json implies [32]",
            dir.join("model.safetensors").display()
        )
    );

    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    let err = load_model(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn fuzz_entry_points_do_not_panic_on_garbage() {
    for s in [
        "",
        "null",
        "{}",
        "[]",
        "\"x\"",
        "{\"prompt\": {}}",
        "{\"prompt\": [null]}",
        "\u{0}",
    ] {
        let _ = parse_preference_str(s);
        let _ = parse_config(s);
        let _ =
            difinfo_trainer::template::render_chat_template("{{ messages[0].content }}", s, true);
    }
}
