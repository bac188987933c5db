//! Checkpoint directories: round trips with the input's tensor names, sharded loading, dtype
//! conversion; config.json details (GQA, RoPE scaling, biases, windows).

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use difinfo_trainer::batch::Sequence;
use difinfo_trainer::config_json::{parse_config, Architecture, RopeScaling};
use difinfo_trainer::logps::sequence_logps;
use difinfo_trainer::pretrained::{load_model, read_tensors, save_pretrained};

fn probe() -> Vec<Sequence> {
    vec![Sequence {
        ids: vec![0, 10, 20, 30, 40, 50],
        completion_start: 2,
    }]
}

#[test]
fn save_then_load_preserves_names_values_and_logps() {
    let (src, _) = common::checkpoint(common::micro_config(Architecture::Llama), 3);
    // An extra tensor the model does not use must survive the round trip.
    let p = src.join("model.safetensors");
    let mut t: HashMap<String, Tensor> = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    t.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        Tensor::new(&[1f32, 0.5], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();

    let m = load_model(src.path(), DType::F32, &Device::Cpu).unwrap();
    let out = common::TempDir::new();
    save_pretrained(&m, Some(src.path()), out.path(), DType::F32).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let a = read_tensors(src.path()).unwrap().tensors;
    let b = read_tensors(out.path()).unwrap().tensors;
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let d = (v - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k} changed");
    }
    let m2 = load_model(out.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        sequence_logps(&m, &probe(), 2).unwrap(),
        sequence_logps(&m2, &probe(), 2).unwrap()
    );
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let (dir, _) = common::checkpoint(common::micro_config(Architecture::Qwen2), 4);
    let single = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let p = dir.join("model.safetensors");
    let all: BTreeMap<String, Tensor> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let s = i % 2;
        // Shards in bf16 too: loading converts to the training dtype.
        shards[s].insert(k.clone(), v.to_dtype(DType::BF16).unwrap());
        weight_map.insert(
            k,
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
    }
    for (s, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            dir.join(&format!("model-0000{}-of-00002.safetensors", s + 1)),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(&p).unwrap();
    let sharded = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(sharded.dtype(), DType::F32);
    let a = sequence_logps(&single, &probe(), 2).unwrap()[0];
    let b = sequence_logps(&sharded, &probe(), 2).unwrap()[0];
    // The shards were rounded to bf16.
    assert!((a - b).abs() < 0.05 * a.abs(), "{a} vs {b}");

    // An index naming a tensor its shard lacks is an error naming the tensor and the shard.
    let mut wm = weight_map.clone();
    wm.insert(
        "model.extra.weight".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": wm}).to_string(),
    )
    .unwrap();
    let err = load_model(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-00001-of-00002.safetensors: missing tensor `model.extra.weight`"),
        "{err}"
    );
}

#[test]
fn tied_checkpoint_has_no_lm_head_and_shares_the_embedding() {
    let (dir, cfg) = common::checkpoint(common::micro_config(Architecture::Qwen2), 5);
    assert!(cfg.tie_word_embeddings);
    let t = read_tensors(dir.path()).unwrap().tensors;
    assert!(!t.contains_key("lm_head.weight"));
    assert!(t.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert!(!t.contains_key("model.layers.0.self_attn.o_proj.bias"));
    let m = load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(m.named_vars().iter().all(|(n, _)| n != "lm_head.weight"));
    let names: Vec<String> = m.named_vars().into_iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "named_vars must be sorted");
}

#[test]
fn config_fields() {
    let c = parse_config(
        r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#,
    )
    .unwrap();
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.kv_groups(), 4);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    // Reference values from transformers' `_compute_llama3_parameters`, transcribed to
    // Python floats:
    //   inv = [1/500000**(k/128) for k in range(0,128,2)]; lw, hw = 8192/1, 8192/4
    //   f if 2π/f < hw else f/8 if 2π/f > lw else (1-s)f/8 + s f, s = (8192/(2π/f) - 1)/(4 - 1)
    let inv = c.rope_inv_freq();
    for (i, want) in [
        (0, 1.0),
        (20, 0.016560440080994446),
        (40, 3.428102195952591e-05),
        (45, 1.2297638677963614e-05),
        (50, 4.411534674558404e-06),
        (63, 3.068925988914511e-07),
    ] {
        assert!(
            (inv[i] - want).abs() <= 1e-12 * want,
            "inv_freq[{i}] = {} vs {want}",
            inv[i]
        );
    }
    // Llama 3 8B: 8.03B parameters.
    assert_eq!(c.num_parameters(), 8_030_261_248);

    let q = parse_config(r#"{"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": true,
        "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false}"#).unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings && q.sliding_window.is_none());
    // Qwen2.5-0.5B: 494M parameters.
    assert_eq!(q.num_parameters(), 494_032_768);

    let m = parse_config(r#"{"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096}"#).unwrap();
    assert_eq!(m.sliding_window, Some(4096));
    assert!(!m.qkv_bias);
    // Mistral 7B v0.1: 7.24B parameters.
    assert_eq!(m.num_parameters(), 7_241_732_096);

    // transformers ≥ 5 puts RoPE settings in `rope_parameters`.
    let r = parse_config(r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}"#).unwrap();
    assert_eq!(r.rope_theta, 1234.0);
    assert!(r.rope_scaling.is_none());
    // Round trip through the generated config.json.
    let back = parse_config(&c.to_hf_json().to_string()).unwrap();
    assert_eq!(back, c);
}
