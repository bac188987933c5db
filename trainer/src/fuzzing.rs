//! Byte-level entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test, so both interpret inputs the same way. Each must return without panicking on any
//! input; errors are expected and ignored.

use std::path::Path;

/// JSONL example parsers: the bytes as one line of preference, SFT, prompt,
/// `resample-rejected` candidate data, and of `build-pairs`' samples and scores.
pub fn jsonl_example(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = Path::new("<fuzz>");
    let _ = crate::records::parse_preference_line(text, p, 1);
    let _ = crate::records::parse_sft_line(text, p, 1);
    let _ = crate::records::parse_prompt_line(text, p, 1);
    let _ = crate::records::parse_candidates_line(text, p, 1);
    let _ = crate::records::parse_sample_line(text, p, 1);
    let _ = crate::records::parse_score_line(text, p, 1);
}

/// config.json parsing; a parsed config also derives its tensor list, parameter count and
/// RoPE frequencies (bounded sizes only).
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = crate::config_json::parse_config(text) {
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

/// A safetensors file as the resume and load paths read one: every tensor
/// ([`crate::safetensors::parse_safetensors`], as for model weights), and an optimizer state
/// for two small variables under AdamW and RMSprop ([`crate::train::Optimizer::from_bytes`]).
pub fn safetensors_file(data: &[u8]) {
    use crate::train::{Optimizer, OptimizerConfig, OptimizerKind};
    let p = Path::new("<fuzz>");
    let _ = crate::safetensors::parse_safetensors(data, p);
    let dev = candle_core::Device::Cpu;
    let Ok(a) = candle_core::Var::zeros((2, 3), candle_core::DType::F32, &dev) else {
        return;
    };
    let Ok(b) = candle_core::Var::zeros(4, candle_core::DType::F32, &dev) else {
        return;
    };
    let vars = vec![("a.weight".to_string(), a), ("b.bias".to_string(), b)];
    for kind in [OptimizerKind::Adamw, OptimizerKind::Rmsprop] {
        let config = OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        };
        let _ = Optimizer::from_bytes(config, &vars, data, p);
    }
}

/// A checkpoint's `trainer_state.json` ([`crate::train::checkpoint::parse_state`]) and its
/// `checksums.sha256` manifest ([`crate::train::checkpoint::parse_checksums`]), both read on
/// `--resume`.
pub fn trainer_state(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = Path::new("<fuzz>");
    let _ = crate::train::checkpoint::parse_state(text, p);
    let _ = crate::train::checkpoint::parse_checksums(text, p);
}

/// A `--config` TOML file merged over the defaults and validated, as `sft` and `dpo` read it
/// ([`crate::train::config::merge_tables`]).
pub fn train_config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return;
    };
    let Ok(base) = toml::Table::try_from(crate::train::TrainConfig::default()) else {
        return;
    };
    let _ = crate::train::config::merge_tables(
        base,
        Some((Path::new("<fuzz>"), table)),
        toml::Table::new(),
    );
}

/// GGUF import: the bytes as a GGUF file (header, metadata, tensor infos, tensor data),
/// through the whole conversion (config, tensor mapping and dequantization, tokenizer
/// rebuild).
pub fn gguf_import(data: &[u8]) {
    let mut cursor = std::io::Cursor::new(data);
    let _ = crate::gguf::import(&mut cursor, Path::new("<fuzz>"), &mut |_, _| {});
}

/// A Parquet dataset file: the bytes read in memory as `--data x.parquet` reads a file
/// ([`crate::records::read_parquet_bytes`]: the metadata checks, the `parquet` crate's row
/// reader under [`crate::error::catch_panic`], the rows as JSON), each row parsed as
/// preference and as SFT data.
pub fn parquet_file(data: &[u8]) {
    let p = Path::new("<fuzz>");
    let _ =
        crate::records::read_parquet_bytes(data, p, true, crate::records::parse_preference_line);
    let _ = crate::records::read_parquet_bytes(data, p, true, crate::records::parse_sft_line);
}

/// The GGUF a [`gguf_header`] input stands for: `"GGUF"`, version 3, then `data[1]` as the
/// tensor count and `data[0]` as the metadata count (u64 each), then `data[2..]` (the
/// metadata entries, tensor infos and data), so that mutations land in the metadata rather
/// than the magic. `None` for inputs shorter than two bytes.
pub fn gguf_header_file(data: &[u8]) -> Option<Vec<u8>> {
    let (counts, body) = data.split_at_checked(2)?;
    let mut file = b"GGUF".to_vec();
    file.extend(3u32.to_le_bytes());
    file.extend(u64::from(counts[1]).to_le_bytes());
    file.extend(u64::from(counts[0]).to_le_bytes());
    file.extend(body);
    Some(file)
}

/// A GGUF header with hostile metadata ([`gguf_header_file`] builds the file): read by
/// [`crate::gguf::read_header`] (alignment, array and string lengths, duplicate keys and
/// tensor names, tensor dimensions, types and offsets); a header that reads is imported whole.
pub fn gguf_header(data: &[u8]) {
    let Some(file) = gguf_header_file(data) else {
        return;
    };
    let p = Path::new("<fuzz>");
    if crate::gguf::read_header(&mut std::io::Cursor::new(&file), p).is_ok() {
        let _ = crate::gguf::import(&mut std::io::Cursor::new(&file), p, &mut |_, _| {});
    }
}
