//! The import, step by step: the header ([`read_header`]), the tokenizer (first: the
//! vocabulary size may come from it), the configuration from the metadata (and Llama 3's RoPE
//! scaling from `rope_freqs.weight`), the tensors; and the Hugging Face directory written from
//! the result ([`write_checkpoint`], [`convert`]).

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::metadata::{self, Arch, Meta};
use super::read_header;
use super::tensors::{read_rope_freqs, read_weights, tensor_type_counts};
use super::tokenizer::build_tokenizer;
use crate::config_json::ModelConfig;
use crate::dtype::torch_dtype_name;
use crate::error::{Error, Result};
use crate::io::write_json;

/// What a GGUF file holds, converted: everything a Hugging Face directory needs.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The validated model configuration.
    pub config: ModelConfig,
    /// config.json (without `torch_dtype`, which the writer sets).
    pub config_json: Value,
    /// Tensors by Hugging Face name, f32 on the CPU, q/k rows in Hugging Face order.
    pub tensors: BTreeMap<String, Tensor>,
    /// tokenizer.json.
    pub tokenizer_json: Value,
    /// tokenizer_config.json.
    pub tokenizer_config: Value,
    /// generation_config.json.
    pub generation_config: Value,
    /// What was found, for the command's summary line.
    pub summary: ImportSummary,
}

/// A one-line account of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when given.
    pub name: Option<String>,
    /// Tensor counts by GGML type (`Q4_1: 210`, ...).
    pub tensor_types: BTreeMap<String, usize>,
    /// `tokenizer.ggml.model` and `tokenizer.ggml.pre`.
    pub tokenizer: String,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<String> = self
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        write!(
            f,
            "{}{} ({}; tokenizer {})",
            self.architecture,
            self.name
                .as_ref()
                .map(|n| format!(" `{n}`"))
                .unwrap_or_default(),
            types.join(", "),
            self.tokenizer
        )
    }
}

/// Reads and converts a GGUF file.
///
/// # Errors
/// [`Error`]'s `Gguf…` variants for malformed files, unsupported architectures, quantizations
/// or tokenizers, and tensors that do not match the metadata; I/O errors.
pub fn import_file(path: &Path) -> Result<Imported> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    import(&mut f, path, &mut |_, _| {})
}

/// Converts the GGUF content of `reader` (`path` names it in errors); `progress(done, total)`
/// is called after each tensor.
///
/// # Errors
/// See [`import_file`].
pub fn import<R: Read + Seek>(
    reader: &mut R,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Imported> {
    let content = read_header(reader, path)?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let (arch, arch_name) = Arch::of(&meta)?;
    // The tokenizer first: the vocabulary size comes from it when the model key is absent.
    let tok = build_tokenizer(&meta)?;
    let mut draft = metadata::model_config(
        &meta,
        arch,
        &content.tensor_infos,
        tok.vocab_len,
        tok.bos,
        tok.eos,
    )?;
    // rope_freqs.weight (Llama 3.1+): the scaling llama.cpp stores as a tensor.
    if let Some(factors) = read_rope_freqs(&content, reader, path, draft.head_dim)? {
        draft.rope_scaling = Some(metadata::rope_scaling_from_freqs(
            &factors,
            draft.head_dim,
            draft.rope_theta,
            path,
        )?);
    }
    let config_json = metadata::config_json(&draft, arch, tok.pad);
    let config = metadata::validated_config(&config_json, &draft, path)?;
    let heads = (draft.num_attention_heads, draft.num_key_value_heads);
    let tensors = read_weights(&content, reader, path, &config, arch, heads, progress)?;
    let summary = ImportSummary {
        architecture: arch_name.to_string(),
        name: meta
            .opt_str("general.name")
            .ok()
            .flatten()
            .map(str::to_string),
        tensor_types: tensor_type_counts(&content),
        tokenizer: tok.description.clone(),
    };
    Ok(Imported {
        config,
        config_json,
        tensors,
        generation_config: tok.generation_config(),
        tokenizer_json: tok.json,
        tokenizer_config: tok.config,
        summary,
    })
}

/// Writes an import as a Hugging Face directory `out` with the weights in `dtype`. Each file
/// is written atomically; model.safetensors last.
///
/// # Errors
/// I/O and tensor errors.
pub fn write_checkpoint(imported: &Imported, out: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut cfg = imported.config_json.clone();
    cfg["torch_dtype"] = json!(torch_dtype_name(dtype));
    write_json(&out.join("config.json"), &cfg)?;
    let mut tc = imported.tokenizer_config.clone();
    tc["model_max_length"] = json!(imported.config.max_position_embeddings);
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    write_json(&out.join("tokenizer.json"), &imported.tokenizer_json)?;
    write_json(
        &out.join("generation_config.json"),
        &imported.generation_config,
    )?;
    let cast: BTreeMap<&String, Tensor> = imported
        .tensors
        .iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    crate::safetensors::write_safetensors(
        &out.join(crate::hf_dir::WEIGHTS_FILE),
        cast.iter().map(|(k, v)| (k.as_str(), v)),
    )
}

/// `difinfo-train convert`: reads `gguf`, writes the Hugging Face directory `out` in `dtype`;
/// `progress(done, total)` follows the tensors.
///
/// # Errors
/// See [`import_file`] and [`write_checkpoint`].
pub fn convert(
    gguf: &Path,
    out: &Path,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportSummary> {
    let mut f = std::fs::File::open(gguf).map_err(|e| Error::io(gguf, e))?;
    let imported = import(&mut f, gguf, progress)?;
    write_checkpoint(&imported, out, dtype)?;
    Ok(imported.summary)
}
