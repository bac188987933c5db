//! Random-weight checkpoints with a freshly trained BPE tokenizer (`difinfo-train init`).
//!
//! The output is a Hugging Face directory: config.json, model.safetensors, tokenizer.json
//! (byte-level BPE, a post-processor that prepends `<s>`), tokenizer_config.json (special
//! tokens and a Zephyr-style chat template) and generation_config.json.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::config_json::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::io::{write_atomic, write_json};
use crate::model::Model;
use crate::pretrained::save_safetensors;

/// The built-in tokenizer training corpus.
pub const BUILTIN_CORPUS: &str = include_str!("corpus.txt");

/// Beginning-of-sequence token.
pub const BOS: &str = "<s>";
/// End-of-sequence token.
pub const EOS: &str = "</s>";
/// Padding token.
pub const PAD: &str = "<pad>";

/// The chat template written by `init` (Zephyr style).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// Named model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelSize {
    /// About 1M parameters: for tests and demos.
    Tiny,
    /// About 20M parameters: for throughput measurements.
    Small,
    /// SmolLM2-135M's configuration (Llama, 30 layers, hidden 576, intermediate 1536, 9 heads
    /// over 3 key/value heads, vocabulary 49,152, tied embeddings, RoPE θ 100,000): 134.5M
    /// parameters, for memory and speed measurements at a real model's size.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

/// The configuration of a named size for `arch`: Qwen2 gets q/k/v biases and tied
/// embeddings, Mistral no sliding window (set one in config.json to use it); Qwen3 tied
/// embeddings, q/k norms and full attention on every layer (as `use_sliding_window = false`);
/// Gemma2 transformers' defaults (tied embeddings, `query_pre_attn_scalar = head_dim`,
/// soft-caps 50 and 30, a 4096-position window on the even layers, ε 1e-6).
pub fn arch_config(size: ModelSize, arch: Architecture) -> ModelConfig {
    let mut c = size_config(size);
    c.arch = arch;
    match arch {
        Architecture::Qwen2 => {
            c.qkv_bias = true;
            c.tie_word_embeddings = true;
        }
        Architecture::Qwen3 => {
            c.tie_word_embeddings = true;
            c.rms_norm_eps = 1e-6;
            c.sliding_layers = Some(vec![false; c.num_hidden_layers]);
        }
        Architecture::Gemma2 => {
            c.tie_word_embeddings = true;
            c.rms_norm_eps = 1e-6;
            c.query_pre_attn_scalar = Some(c.head_dim as f64);
            c.attn_logit_softcapping = Some(50.0);
            c.final_logit_softcapping = Some(30.0);
            c.sliding_window = Some(4096);
            c.sliding_layers = Some((0..c.num_hidden_layers).map(|l| l % 2 == 0).collect());
        }
        Architecture::Llama | Architecture::Mistral => {}
    }
    c
}

/// The Llama configuration of a named size (vocabulary size before the tokenizer is known).
pub fn size_config(size: ModelSize) -> ModelConfig {
    let (vocab, hidden, inter, layers, heads, kv) = match size {
        ModelSize::Tiny => (1024, 128, 352, 4, 4, 2),
        ModelSize::Small => (8192, 384, 1152, 8, 6, 2),
        ModelSize::Smollm2_135m => {
            // HuggingFaceTB/SmolLM2-135M's config.json.
            return ModelConfig {
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                initializer_range: 0.041_666_666_666_666_664,
                ..llama_config(49_152, 576, 1536, 30, 9, 3)
            };
        }
    };
    llama_config(vocab, hidden, inter, layers, heads, kv)
}

/// A Llama configuration of these sizes with the defaults of [`size_config`].
fn llama_config(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
) -> ModelConfig {
    ModelConfig {
        arch: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        sliding_layers: None,
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        initializer_range: 0.02,
    }
}

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `corpus` (one sequence
/// per line); ids 0, 1, 2 are `<s>`, `</s>`, `<pad>`, and encoding with special tokens
/// prepends `<s>`.
///
/// # Errors
/// [`Error::Tokenizer`], also for a corpus without text.
pub fn train_tokenizer(corpus: &str, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let tk = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let specials: Vec<AddedToken> = [BOS, EOS, PAD]
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(tk)?;
    let lines: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(Error::Tokenizer(
            "the training corpus has no text (every line is blank)".into(),
        ));
    }
    tokenizer
        .train(&mut trainer, lines.into_iter())
        .map_err(tk)?;
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| Error::Tokenizer("BOS missing after training".into()))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .try_pair(format!("{BOS} $A {BOS}:1 $B:1"))
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(post)));
    let json = tokenizer.to_string(false).map_err(tk)?;
    json.parse::<tokenizers::Tokenizer>().map_err(tk)
}

/// Random weights for `config` (f32, CPU): every matrix and bias drawn from
/// `N(0, initializer_range²)` (biases are random, not zero, so that tests exercise them),
/// norms the identity (one; zero for Gemma2's `(1 + w)` norms); deterministic in `seed`.
///
/// # Errors
/// Tensor errors.
pub fn random_tensors(config: &ModelConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            let identity = if config.arch == Architecture::Gemma2 {
                0.0
            } else {
                1.0
            };
            vec![identity; n]
        } else {
            (0..n)
                .map(|_| {
                    // Box–Muller.
                    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.gen();
                    ((-2.0 * u1.ln()).sqrt()
                        * (2.0 * std::f64::consts::PI * u2).cos()
                        * config.initializer_range) as f32
                })
                .collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// Writes the tokenizer files (tokenizer.json, tokenizer_config.json) for a tokenizer made by
/// [`train_tokenizer`].
///
/// # Errors
/// I/O errors.
pub fn write_tokenizer_files(
    dir: &Path,
    tokenizer: &tokenizers::Tokenizer,
    chat_template: &str,
    model_max_length: usize,
) -> Result<()> {
    let tj = dir.join("tokenizer.json");
    write_atomic(&tj, |tmp| {
        tokenizer
            .save(tmp, true)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))
    })?;
    let mut added = serde_json::Map::new();
    for t in [BOS, EOS, PAD] {
        if let Some(id) = tokenizer.token_to_id(t) {
            added.insert(
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
            );
        }
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "added_tokens_decoder": added,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": null,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )
}

/// The files [`init_checkpoint`] writes.
pub const INIT_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

/// Readies `dir` for [`init_checkpoint`] ([`crate::outputs::prepare_checkpoint_dir`] for
/// `--out`): a missing or empty directory is fine; a non-empty one is refused unless
/// `overwrite`, when the checkpoint files that the new checkpoint would not replace are
/// removed (its shards, optimizer and trainer state, …; other files stay). Returns the files
/// removed.
///
/// # Errors
/// `dir` is a file; `dir` is not empty and `overwrite` is false; I/O errors.
pub fn prepare_output_dir(dir: &Path, overwrite: bool) -> Result<Vec<std::path::PathBuf>> {
    crate::outputs::prepare_checkpoint_dir("--out", dir, overwrite)
}

/// Creates a random-weight checkpoint directory for `config` with a BPE tokenizer trained on
/// `corpus`. The vocabulary is `max(config.vocab_size, tokenizer size)`; the token ids of
/// `<s>`, `</s>`, `<pad>` are written into config.json and generation_config.json.
/// Returns the final configuration.
///
/// # Errors
/// I/O, tokenizer and tensor errors.
pub fn init_checkpoint(
    dir: &Path,
    mut config: ModelConfig,
    corpus: &str,
    seed: u64,
) -> Result<ModelConfig> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tokenizer = train_tokenizer(corpus, config.vocab_size)?;
    config.vocab_size = config.vocab_size.max(tokenizer.get_vocab_size(true));
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| Error::Tokenizer(format!("token {t} missing")))
    };
    let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(PAD)?);
    config.bos_token_id = Some(bos);
    config.eos_token_ids = vec![eos];
    let tensors = random_tensors(&config, seed)?;
    let model = Model::from_tensors(
        config.clone(),
        tensors,
        &dir.join("model.safetensors"),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let mut cfg_json = config.to_hf_json();
    cfg_json["pad_token_id"] = pad.into();
    write_json(&dir.join("config.json"), &cfg_json)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "transformers_version": "4.46.0"}),
    )?;
    write_tokenizer_files(
        dir,
        &tokenizer,
        CHAT_TEMPLATE,
        config.max_position_embeddings,
    )?;
    save_safetensors(
        &model,
        &dir.join("model.safetensors"),
        candle_core::DType::F32,
    )?;
    Ok(config)
}
