//! TRL 1.x tokenization: EOS appended to plain completions, special tokens from the
//! post-processor, the completion boundary at the common token prefix, truncation and drops.

mod common;

use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::records::{PreferenceExample, SftExample, Text};
use difinfo_trainer::template::Message;
use difinfo_trainer::tokenize::{
    load_preferences, tokenize_preference, tokenize_sft, CompletionBoundary, Outcome,
    TokenizeOptions, TokenizeStats, TruncationMode,
};

fn plain(p: &str, c: &str, r: &str) -> PreferenceExample {
    PreferenceExample {
        prompt: Text::Plain(p.into()),
        chosen: Text::Plain(c.into()),
        rejected: Text::Plain(r.into()),
    }
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn kept<T>(o: Outcome<T>) -> T {
    match o {
        Outcome::Kept(v) => v,
        Outcome::Dropped => panic!("example was dropped"),
    }
}

#[test]
fn eos_is_appended_to_plain_completions_once() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let eos_id = tok.tokenizer().token_to_id("</s>").unwrap();
    let bos_id = tok.tokenizer().token_to_id("<s>").unwrap();
    let mut st = TokenizeStats::default();
    let opts = TokenizeOptions::default();
    let a = kept(
        tokenize_preference(
            &tok,
            &plain(
                "Question: What is the capital of France?\nAnswer:",
                " Paris.",
                " Rome.",
            ),
            &opts,
            1,
            &mut st,
        )
        .unwrap(),
    );
    assert_eq!(*a.chosen_ids.last().unwrap(), eos_id);
    assert_eq!(*a.rejected_ids.last().unwrap(), eos_id);
    assert_eq!(
        a.chosen_sequence().ids,
        tok.encode(
            "Question: What is the capital of France?\nAnswer: Paris.</s>",
            true
        )
        .unwrap()
    );
    // The post-processor adds exactly one BOS, at the start.
    assert_eq!(a.prompt_ids[0], bos_id);
    assert_eq!(
        a.chosen_sequence()
            .ids
            .iter()
            .filter(|&&t| t == bos_id)
            .count(),
        1
    );
    // A completion that already ends with the EOS text is not given a second one.
    let b = kept(
        tokenize_preference(
            &tok,
            &plain(
                "Question: What is the capital of France?\nAnswer:",
                " Paris.</s>",
                " Rome.",
            ),
            &opts,
            1,
            &mut st,
        )
        .unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(st.prefix_mismatches, 0);
    assert_eq!(
        a.prompt_ids,
        tok.encode("Question: What is the capital of France?\nAnswer:", true)
            .unwrap()
    );
}

#[test]
fn completion_starts_at_common_prefix() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    // "th" + "e": the joint tokenization merges " the" across the boundary.
    let (p, c, r) = ("Look at th", "e sky.", "e sea.");
    let prompt_alone = tok.encode(p, true).unwrap();
    let full_c = tok.encode(&format!("{p}{c}</s>"), true).unwrap();
    let k = difinfo_trainer::tokenize::common_prefix_len(&prompt_alone, &full_c);
    assert!(
        k < prompt_alone.len(),
        "fixture must produce a prefix mismatch: {prompt_alone:?} vs {full_c:?}"
    );

    let mut st = TokenizeStats::default();
    let opts = TokenizeOptions::default();
    let t = kept(tokenize_preference(&tok, &plain(p, c, r), &opts, 7, &mut st).unwrap());
    assert_eq!(st.prefix_mismatches, 1);
    assert_eq!(st.first_mismatch_line, Some(7));
    // The scored sequence is exactly the tokenization of prompt + completion ...
    assert_eq!(t.chosen_sequence().ids, full_c);
    // ... and the completion starts at the common prefix.
    assert_eq!(t.prompt_ids, prompt_alone[..k].to_vec());

    // TRL's literal slice: prompt tokens, then full[len(prompt):].
    let lit = TokenizeOptions {
        boundary: CompletionBoundary::PromptLength,
        ..opts
    };
    let t2 = kept(tokenize_preference(&tok, &plain(p, c, r), &lit, 7, &mut st).unwrap());
    assert_eq!(t2.prompt_ids, prompt_alone);
    assert_eq!(t2.chosen_ids, full_c[prompt_alone.len()..].to_vec());
}

#[test]
fn truncation_and_drops() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let ex = plain(
        "Question: Why is the sky blue?\nAnswer:",
        " Air scatters blue light more than red light.",
        " No.",
    );
    let mut st = TokenizeStats::default();
    let full =
        kept(tokenize_preference(&tok, &ex, &TokenizeOptions::default(), 1, &mut st).unwrap());
    let np = full.prompt_ids.len();
    assert!(np > 6 && full.chosen_ids.len() > 5);

    let keep_end = TokenizeOptions {
        max_prompt_length: Some(4),
        truncation_mode: TruncationMode::KeepEnd,
        ..Default::default()
    };
    let t = kept(tokenize_preference(&tok, &ex, &keep_end, 1, &mut st).unwrap());
    assert_eq!(t.prompt_ids, full.prompt_ids[np - 4..].to_vec());
    assert_eq!(t.chosen_ids, full.chosen_ids);

    let keep_start = TokenizeOptions {
        max_prompt_length: Some(4),
        truncation_mode: TruncationMode::KeepStart,
        ..Default::default()
    };
    let t = kept(tokenize_preference(&tok, &ex, &keep_start, 1, &mut st).unwrap());
    assert_eq!(t.prompt_ids, full.prompt_ids[..4].to_vec());
    assert_eq!(st.truncated_prompts, 2);

    // max_length cuts completions (keeping their start) to fit after the prompt.
    let ml = TokenizeOptions {
        max_length: Some(np + 3),
        ..Default::default()
    };
    let t = kept(tokenize_preference(&tok, &ex, &ml, 1, &mut st).unwrap());
    assert_eq!(t.prompt_ids, full.prompt_ids);
    assert_eq!(t.chosen_ids, full.chosen_ids[..3].to_vec());
    assert_eq!(
        t.rejected_ids,
        full.rejected_ids[..3.min(full.rejected_ids.len())].to_vec()
    );
    assert_eq!(st.truncated_completions, 1);
    // With keep_start and no prompt limit this is TRL 1.x's sequence[:max_length].
    assert_eq!(
        t.chosen_sequence().ids,
        full.chosen_sequence().ids[..np + 3].to_vec()
    );

    // A prompt that alone fills max_length is dropped.
    let tight = TokenizeOptions {
        max_length: Some(np),
        ..Default::default()
    };
    assert_eq!(
        tokenize_preference(&tok, &ex, &tight, 1, &mut st).unwrap(),
        Outcome::Dropped
    );
    assert_eq!(st.dropped_prompt_too_long, 1);
    // ... unless max_prompt_length shortens it first.
    let both = TokenizeOptions {
        max_length: Some(np),
        max_prompt_length: Some(np - 2),
        ..Default::default()
    };
    let t = kept(tokenize_preference(&tok, &ex, &both, 1, &mut st).unwrap());
    assert_eq!(t.prompt_ids.len() + t.chosen_ids.len(), np);
}

#[test]
fn dataset_counts_are_reported() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let data = common::write_lines(
        &dir,
        "d.jsonl",
        &[
            r#"{"prompt": "Hi", "chosen": " there", "rejected": " you"}"#,
            "",
            r#"{"prompt": "A very long prompt that certainly has more than eight tokens in it", "chosen": " x", "rejected": " y"}"#,
            r#"{"prompt": "Hello", "chosen": " world", "rejected": " moon"}"#,
        ],
    );
    let ds = load_preferences(
        &tok,
        &data,
        &TokenizeOptions {
            max_length: Some(8),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(ds.stats.total, 3);
    assert_eq!(ds.stats.kept, 2);
    assert_eq!(ds.stats.dropped_prompt_too_long, 1);
    assert_eq!(
        ds.examples.iter().map(|e| e.line).collect::<Vec<_>>(),
        vec![1, 4]
    );
}

#[test]
fn conversational_data_uses_the_chat_template() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let prompt = vec![
        msg("system", "Be brief."),
        msg("user", "What is two plus two?"),
    ];
    let ex = PreferenceExample {
        prompt: Text::Chat(prompt.clone()),
        chosen: Text::Chat(vec![msg("assistant", "Four.")]),
        rejected: Text::Chat(vec![msg("assistant", "Five.")]),
    };
    let mut st = TokenizeStats::default();
    let t = kept(tokenize_preference(&tok, &ex, &TokenizeOptions::default(), 1, &mut st).unwrap());
    let rendered_prompt = tok.render_chat(&prompt, true).unwrap();
    assert_eq!(
        rendered_prompt,
        "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is two plus two?</s>\n<|assistant|>\n"
    );
    let full = tok
        .render_chat(
            &[prompt.clone(), vec![msg("assistant", "Four.")]].concat(),
            false,
        )
        .unwrap();
    assert_eq!(full, format!("{rendered_prompt}Four.</s>\n"));
    // Rendered text is tokenized without the post-processor: one BOS, from the template.
    assert_eq!(t.prompt_ids, tok.encode(&rendered_prompt, false).unwrap());
    assert_eq!(t.chosen_sequence().ids, tok.encode(&full, false).unwrap());
    assert_eq!(
        t.chosen_sequence().ids.iter().filter(|&&x| x == 0).count(),
        1
    );
    assert_eq!(st.prefix_mismatches, 0);
    assert_eq!(tok.decode(&t.chosen_ids, false).unwrap(), "Four.</s>\n");
}

#[test]
fn chat_template_jinja_file_takes_precedence() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}").unwrap();
    let tok = common::tokenizer(dir.path());
    assert_eq!(
        tok.render_chat(&[msg("user", "hi")], true).unwrap(),
        "[user] hi\n[assistant] "
    );
}

#[test]
fn sft_examples() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let tok = common::tokenizer(dir.path());
    let mut st = TokenizeStats::default();
    let opts = TokenizeOptions::default();
    let pc = SftExample::PromptCompletion {
        prompt: Text::Plain("Say hello.".into()),
        completion: Text::Plain(" Hello!".into()),
    };
    let t = kept(tokenize_sft(&tok, &pc, &opts, 1, &mut st).unwrap());
    assert_eq!(
        t.sequence().ids,
        tok.encode("Say hello. Hello!</s>", true).unwrap()
    );
    assert_eq!(t.sequence().completion_start, t.prompt_ids.len());
    let conv = vec![msg("user", "Say hello."), msg("assistant", "Hello!")];
    let t =
        kept(tokenize_sft(&tok, &SftExample::Messages(conv.clone()), &opts, 1, &mut st).unwrap());
    assert!(t.prompt_ids.is_empty());
    assert_eq!(
        t.completion_ids,
        tok.encode(&tok.render_chat(&conv, false).unwrap(), false)
            .unwrap()
    );
}

#[test]
fn saved_truncation_and_padding_are_ignored_like_transformers() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Llama), 0);
    let p = dir.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["truncation"] = serde_json::json!({"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0});
    v["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 2, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(&p, v.to_string()).unwrap();
    let tok = common::tokenizer(dir.path());
    let ids = tok
        .encode("The quick brown fox jumps over the lazy dog", true)
        .unwrap();
    assert!(ids.len() > 3 && ids.len() < 64, "{ids:?}");
}
