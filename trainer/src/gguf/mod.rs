//! GGUF, the file format: a llama.cpp / Ollama model file → what a Hugging Face checkpoint
//! directory holds.
//!
//! candle reads the file ([`candle_core::quantized::gguf_file`]) and dequantizes every tensor
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 and the K-quants); this module turns the
//! result into what `transformers` would have: `config.json`, `model.safetensors` with Hugging
//! Face tensor names, `tokenizer.json` and `tokenizer_config.json` rebuilt from the GGUF
//! metadata, and `generation_config.json`.
//!
//! - Architectures: `general.architecture = llama` (Llama 2 and 3, Mistral, SmolLM, TinyLlama),
//!   `qwen2`, `qwen3` (`attn_q_norm`, `attn_k_norm`) and `gemma2` (`post_attention_norm`,
//!   `ffn_norm` as the pre-feed-forward norm, `post_ffw_norm`; the soft-caps and the window
//!   from the metadata); anything else is
//!   [`Error::GgufUnsupportedArchitecture`](crate::error::Error::GgufUnsupportedArchitecture).
//! - The q/k row permutation: llama.cpp's converter reorders the rows of each head of
//!   `q_proj` and `k_proj` for its interleaved RoPE ([`permute_for_gguf`]); the import undoes it
//!   ([`unpermute_from_gguf`]). Qwen2, Qwen3 and Gemma2 files are not permuted (llama.cpp uses
//!   NeoX RoPE there).
//! - Gemma2's norms: llama.cpp's converter stores `1 + w` for each `(1 + w)` RMSNorm weight;
//!   the import subtracts the 1.
//! - Tokenizers: `tokenizer.ggml.model = gpt2` (byte-level BPE with the stored merges and the
//!   pre-tokenizer named by `tokenizer.ggml.pre`, see [`PreTokenizerFamily`]) or `llama`
//!   (SentencePiece BPE: merges derived from the scores as transformers' converter does, byte
//!   fallback, `▁` for spaces).
//!
//! One file per concept, in the order of an import ([`import()`]):
//! - `header`: the validated header reader ([`read_header`]: sizes checked before allocation,
//!   duplicates refused);
//! - `tokenizer`: tokenizer.json, tokenizer_config.json and the special ids rebuilt from the
//!   metadata;
//! - `metadata`: the typed metadata lookups, the architecture, [`crate::config_json::ModelConfig`]
//!   and config.json, the RoPE scaling;
//! - `tensors`: the tensors read by candle under `catch_unwind`, dequantized, renamed to
//!   Hugging Face's names and unpermuted (a NaN or infinite weight is refused);
//! - `import`: the steps in order ([`import()`]), and the directory they write
//!   ([`write_checkpoint`], [`convert`]).
//!
//! The file is also accepted where a checkpoint directory is expected: the conversion cache
//! (the `gguf_cache` module, one room above this one) converts it once, with [`convert`], into
//! a cache directory keyed by the SHA-256 of the file's content.

use std::io::Read;
use std::path::Path;

use candle_core::quantized::GgmlDType;

mod header;
mod import;
mod metadata;
mod tensors;
mod tokenizer;

pub use header::{read_header, MAX_READ_ARRAY_ELEMENTS, MAX_TENSOR_DIMS, READ_ARRAYS};
pub use import::{convert, import, import_file, write_checkpoint, ImportSummary, Imported};
pub use tensors::{permute_for_gguf, unpermute_from_gguf};
pub use tokenizer::{gpt2_regex, PreTokenizerFamily, PRE_TOKENIZERS};

/// The GGUF magic, `"GGUF"` read as a little-endian u32's bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Bumped whenever the conversion's output changes, so cached conversions are redone.
pub const CONVERTER_VERSION: u32 = 1;

/// The `general.architecture` values this importer maps to Hugging Face models.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma2"];

/// The GGML tensor types candle dequantizes (the names of the types in `CANDLE_TYPES`).
pub const SUPPORTED_QUANTIZATIONS: [&str; 15] = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "Q8_K",
];

/// The GGML types candle reads, by id (ggml.h's `ggml_type`): the one table the header's
/// type check and the import summary's type names both read.
const CANDLE_TYPES: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// The candle type of a GGML type id, `None` for a type candle does not read.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    CANDLE_TYPES.iter().find(|(i, _)| *i == id).map(|(_, d)| *d)
}

/// The GGML name of a candle type (`Q4_1`, `Q2_K`, …), for the import summary.
fn ggml_dtype_name(d: GgmlDType) -> &'static str {
    CANDLE_TYPES
        .iter()
        .find(|(_, t)| *t == d)
        .map_or("unknown", |(id, _)| ggml_type_name(*id))
}

/// The name of a GGML tensor type id (ggml.h's `ggml_type`), for error messages.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// The names of [`PRE_TOKENIZERS`], comma-separated (for error messages).
pub fn known_pre_tokenizers() -> String {
    PRE_TOKENIZERS.map(|(n, _)| n).join(", ")
}

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == GGUF_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_quantizations_are_the_names_of_candles_types() {
        let mut table: Vec<&str> = CANDLE_TYPES
            .iter()
            .map(|(_, d)| ggml_dtype_name(*d))
            .collect();
        let mut listed = SUPPORTED_QUANTIZATIONS.to_vec();
        table.sort_unstable();
        listed.sort_unstable();
        assert_eq!(table, listed);
    }

    #[test]
    fn supported_architectures_are_the_importers() {
        for name in SUPPORTED_ARCHITECTURES {
            assert_eq!(
                metadata::Arch::from_name(name).map(|a| a.name()),
                Some(name)
            );
        }
    }
}
