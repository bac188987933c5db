//! Byte-level entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test, so both interpret inputs the same way. Each must return without panicking on any
//! input; errors are expected and ignored.

use std::path::Path;

/// JSONL example parsers: the bytes as one line of preference, SFT, prompt and
/// `resample-rejected` candidate data.
pub fn jsonl_example(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = Path::new("<fuzz>");
    let _ = crate::data::parse_preference_line(text, p, 1);
    let _ = crate::data::parse_sft_line(text, p, 1);
    let _ = crate::data::parse_prompt_line(text, p, 1);
    let _ = crate::data::parse_candidates_line(text, p, 1);
}

/// config.json parsing; a parsed config also derives its tensor list, parameter count and
/// RoPE frequencies (bounded sizes only).
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = crate::config::parse_config(text) {
        if c.num_hidden_layers <= 64 && c.head_dim <= 1 << 16 {
            let _ = c.tensor_shapes();
            let _ = c.rope_inv_freq();
        }
        let _ = c.to_hf_json();
    }
}

/// Chat-template rendering: the input is `template NUL messages-json` (without a NUL, the
/// whole input is the template and one user message is rendered); the generation prompt is
/// requested iff the template's byte length is odd.
pub fn chat_template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, messages) = text
        .split_once('\0')
        .unwrap_or((text, r#"[{"role": "user", "content": "hi"}]"#));
    let _ = crate::template::render_chat_template(template, messages, template.len() % 2 == 1);
}

/// GGUF import: the bytes as a GGUF file (header, metadata, tensor infos, tensor data),
/// through the whole conversion (config, tensor mapping and dequantization, tokenizer
/// rebuild).
pub fn gguf_import(data: &[u8]) {
    let mut cursor = std::io::Cursor::new(data);
    let _ = crate::gguf::import(&mut cursor, Path::new("<fuzz>"), &mut |_, _| {});
}
