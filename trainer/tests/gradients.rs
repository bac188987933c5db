//! Every trainable variable receives a gradient, and candle's gradients agree with finite
//! differences: the guard against candle's fused ops that silently record no backward pass.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use difinfo_trainer::batch::Batch;
use difinfo_trainer::config_json::{Architecture, ModelConfig};
use difinfo_trainer::model::Model;

fn batch(dev: &Device) -> Batch {
    Batch::from_sequences(&common::two_sequences(), 2, dev).unwrap()
}

/// `Σ_b log π(y_b | x_b)` over the batch.
fn objective(m: &Model, b: &Batch) -> Tensor {
    m.sequence_logps(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
        .unwrap()
        .sum_all()
        .unwrap()
}

fn every_var_has_gradient(cfg: ModelConfig) {
    let arch = cfg.arch;
    let (_d, m) = common::model(cfg, DType::F32, 11);
    let b = batch(m.device());
    let grads = objective(&m, &b).backward().unwrap();
    let vars = m.named_vars();
    assert_eq!(vars.len(), m.config().tensor_shapes().len());
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{arch:?}: zero or non-finite gradient for {name} ({norm})"
        );
    }
}

#[test]
fn every_var_has_a_gradient_llama() {
    every_var_has_gradient(common::micro_config(Architecture::Llama));
}

#[test]
fn every_var_has_a_gradient_llama_tied_with_biases() {
    let mut c = common::micro_config(Architecture::Llama);
    c.tie_word_embeddings = true;
    c.qkv_bias = true;
    c.o_bias = true;
    c.mlp_bias = true;
    every_var_has_gradient(c);
}

#[test]
fn every_var_has_a_gradient_mistral() {
    every_var_has_gradient(common::micro_config(Architecture::Mistral));
}

#[test]
fn every_var_has_a_gradient_qwen3_qk_norms_window() {
    every_var_has_gradient(common::micro_config(Architecture::Qwen3));
}

#[test]
fn every_var_has_a_gradient_gemma2() {
    every_var_has_gradient(common::micro_config(Architecture::Gemma2));
}

#[test]
fn finite_differences_agree_with_candle_qwen3() {
    finite_differences_agree(
        common::micro_config(Architecture::Qwen3),
        &[
            ("model.layers.0.self_attn.q_norm.weight", 3),
            ("model.layers.1.self_attn.k_norm.weight", 5),
            ("model.layers.1.self_attn.q_proj.weight", 17),
            ("lm_head.weight", 40),
        ],
    );
}

#[test]
fn finite_differences_agree_with_candle_gemma2() {
    finite_differences_agree(
        common::micro_config(Architecture::Gemma2),
        &[
            ("model.embed_tokens.weight", 70),
            ("model.norm.weight", 2),
            ("model.layers.0.post_attention_layernorm.weight", 4),
            ("model.layers.0.pre_feedforward_layernorm.weight", 6),
            ("model.layers.1.post_feedforward_layernorm.weight", 1),
            ("model.layers.0.mlp.gate_proj.weight", 9),
            ("model.layers.1.self_attn.k_proj.weight", 33),
        ],
    );
}

#[test]
fn every_var_has_a_gradient_qwen2_with_bias() {
    every_var_has_gradient(common::micro_config(Architecture::Qwen2));
}

/// Sets element `idx` (flat) of `var` to `value`.
fn set_elem(var: &Var, idx: usize, value: f64) {
    let shape = var.dims().to_vec();
    let mut data: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    data[idx] = value;
    var.set(&Tensor::from_vec(data, shape, var.device()).unwrap())
        .unwrap();
}

fn get_elem(t: &Tensor, idx: usize) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx]
}

fn finite_differences_agree(cfg: ModelConfig, probes: &[(&str, usize)]) {
    let arch = cfg.arch;
    let (_d, m) = common::model(cfg, DType::F64, 12);
    let b = batch(m.device());
    let grads = objective(&m, &b).backward().unwrap();
    let vars: std::collections::BTreeMap<String, Var> = m.named_vars().into_iter().collect();
    // Central differences in f64: truncation error O(h²) ≈ 1e-12, rounding ≈ 1e-16 / h.
    let h = 1e-5;
    for &(name, idx) in probes {
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        let analytic = get_elem(grads.get(var.as_tensor()).unwrap(), idx);
        let x0 = get_elem(var.as_tensor(), idx);
        set_elem(var, idx, x0 + h);
        let fp = objective(&m, &b).to_scalar::<f64>().unwrap();
        set_elem(var, idx, x0 - h);
        let fm = objective(&m, &b).to_scalar::<f64>().unwrap();
        set_elem(var, idx, x0);
        let numeric = (fp - fm) / (2.0 * h);
        let err = (analytic - numeric).abs();
        assert!(
            err <= 1e-6 * (1.0 + analytic.abs()),
            "{arch:?} {name}[{idx}]: candle {analytic:e}, finite differences {numeric:e}"
        );
        assert!(
            analytic != 0.0,
            "{arch:?} {name}[{idx}] has a zero gradient; probe another entry"
        );
    }
}

#[test]
fn finite_differences_agree_with_candle_llama() {
    finite_differences_agree(
        common::micro_config(Architecture::Llama),
        &[
            ("model.embed_tokens.weight", 17 * 32 + 3),
            ("model.layers.0.self_attn.q_proj.weight", 40),
            ("model.layers.0.self_attn.k_proj.weight", 7),
            ("model.layers.1.self_attn.v_proj.weight", 100),
            ("model.layers.1.self_attn.o_proj.weight", 33),
            ("model.layers.0.mlp.gate_proj.weight", 5),
            ("model.layers.1.mlp.down_proj.weight", 77),
            ("model.layers.0.input_layernorm.weight", 9),
            ("model.layers.1.post_attention_layernorm.weight", 2),
            ("model.norm.weight", 4),
            ("lm_head.weight", 99 * 32 + 1),
        ],
    );
}

#[test]
fn finite_differences_agree_with_candle_qwen2_bias_tied() {
    finite_differences_agree(
        common::micro_config(Architecture::Qwen2),
        &[
            ("model.layers.0.self_attn.q_proj.bias", 3),
            ("model.layers.1.self_attn.k_proj.bias", 5),
            ("model.layers.0.self_attn.v_proj.bias", 1),
            // Tied: the embedding's gradient sums its input and output uses.
            ("model.embed_tokens.weight", 5 * 32 + 7),
        ],
    );
}

#[test]
fn finite_differences_agree_with_candle_mistral_window() {
    finite_differences_agree(
        common::micro_config(Architecture::Mistral),
        &[
            ("model.layers.1.self_attn.q_proj.weight", 12),
            ("model.layers.0.mlp.up_proj.weight", 30),
        ],
    );
}

#[test]
fn mixed_precision_bf16_compute_over_f32_parameters() {
    let (_d, mut m) = common::model(common::micro_config(Architecture::Qwen2), DType::F32, 13);
    let b = batch(m.device());
    let full = objective(&m, &b).to_scalar::<f32>().unwrap();
    m.set_compute_dtype(DType::BF16).unwrap();
    let loss = objective(&m, &b);
    let mixed = loss
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // bf16 rounding of activations: a few percent of a sum of log-probs.
    assert!(
        (full - mixed).abs() < 0.05 * full.abs(),
        "f32 {full} vs bf16 compute {mixed}"
    );
    let grads = loss.backward().unwrap();
    for (name, var) in m.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(
            g.dtype(),
            DType::F32,
            "{name}: gradient must come back in the parameter dtype"
        );
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}");
    }
}
