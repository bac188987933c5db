//! A reward model's scores pinned to transformers' `LlamaForSequenceClassification` on
//! closed-form weights that both sides construct, with padding in the batch and rows whose
//! text ends in the pad id (the score is then read at the token before it); the checkpoint
//! round trip (`save_reward_pretrained` → `load_reward_model`); the reward loss against TRL's
//! formula. `trainer/scripts/check_reward_parity.py --pin` prints the numbers; its core:
//!
//! ```python
//! cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
//!                   num_attention_heads=2, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5,
//!                   rope_theta=10000.0, tie_word_embeddings=True, num_labels=1, pad_token_id=3)
//! model = LlamaForSequenceClassification(cfg).to(torch.float64)
//! # the decoder's tensors sorted by name, then score.weight; tensor k, entry i:
//! #   (1 if a norm weight else 0) + 0.5 sin(1.7 i + 0.37 k)
//! ids  = [[1, 5, 9, 2, 14, 3, 3, 7], [0, 15, 4, 3, 3, 3, 3, 3], [6, 3, 8, 11, 3, 3, 3, 3]]
//! mask = [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
//! model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
//! ```
//!
//! and again with RoPE's cos and sin and RMSNorm in float64 (transformers computes them in
//! float32 whatever the model's dtype).

use std::collections::BTreeMap;
use std::path::Path;

mod common;

use candle_core::{DType, Tensor};
use difinfo_trainer::batch::{Batch, Sequence};
use difinfo_trainer::config_json::parse_config;
use difinfo_trainer::model::{scored_position, Model, RewardModel};
use difinfo_trainer::pretrained::{load_reward_model, save_reward_pretrained, ScoreHead};
use difinfo_trainer::train::objective::reward_loss;

/// Both sides compute in float64; what remains is summation order.
const TOL: f64 = 1e-9;

const LLAMA: &str = r#"{"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
    "max_position_embeddings": 64}"#;

/// transformers' scores of the rows of `ROWS` with RoPE's cos and sin (of the float32 angles)
/// and RMSNorm in float64, as this crate computes a float64 model (the script's second line).
const WANT: [f64; 3] = [0.9017832872337802, -1.6383195617711857, -1.2646345660141827];

/// transformers' scores as it computes them: RoPE's cos and sin and RMSNorm in float32 even
/// for a float64 model (the script's first line), within [`F32_TOL`].
const TRANSFORMERS: [f64; 3] = [0.9017822078365039, -1.638319597394712, -1.264634634204513];

/// transformers' float32 RMSNorm and trigonometry inside a float64 model: ~1e-6 here.
const F32_TOL: f64 = 5e-6;

/// The rows' real tokens (the second and third end in the pad id, 3).
const ROWS: [&[u32]; 3] = [
    &[1, 5, 9, 2, 14, 3, 3, 7],
    &[0, 15, 4, 3],
    &[6, 3, 8, 11, 3],
];

/// Tensor `k` of the closed form: `(1 if a norm weight else 0) + 0.5 sin(1.7 i + 0.37 k)`.
fn closed_form(shape: Vec<usize>, k: usize, norm: bool) -> Tensor {
    let base = if norm { 1.0 } else { 0.0 };
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| base + 0.5 * (1.7 * i as f64 + 0.37 * k as f64).sin())
        .collect();
    Tensor::from_vec(v, shape, &common::device()).unwrap()
}

fn closed_form_reward_model() -> RewardModel {
    let cfg = parse_config(LLAMA).unwrap();
    let shapes = cfg.tensor_shapes();
    let mut t = BTreeMap::new();
    for (k, (name, shape)) in shapes.iter().enumerate() {
        let norm = name.ends_with("norm.weight");
        t.insert(name.clone(), closed_form(shape.clone(), k, norm));
    }
    let score = closed_form(vec![1, cfg.hidden_size], shapes.len(), false);
    let m = Model::from_tensors(
        cfg,
        t,
        Path::new("<closed form>"),
        DType::F64,
        &common::device(),
    )
    .unwrap();
    RewardModel::new(m, &score, Some(3)).unwrap()
}

fn batch() -> Batch {
    let seqs: Vec<Sequence> = ROWS
        .iter()
        .map(|r| Sequence {
            ids: r.to_vec(),
            completion_start: 0,
        })
        .collect();
    Batch::from_sequences(&seqs, 3, &common::device()).unwrap()
}

#[test]
fn scored_position_is_transformers_rule() {
    // The rightmost non-pad token; all padding: 0; no pad id: the last real token.
    assert_eq!(scored_position(&[5, 6, 3, 3], Some(3), 4), 1);
    assert_eq!(scored_position(&[5, 3, 6, 3], Some(3), 4), 2);
    assert_eq!(scored_position(&[3, 3], Some(3), 2), 0);
    assert_eq!(scored_position(&[5, 6, 3, 3], None, 3), 2);
}

#[test]
fn scores_match_transformers_sequence_classifier() {
    let m = closed_form_reward_model();
    let b = batch();
    let got: Vec<f64> = m
        .scores(&b.input_ids, Some(&b.attention_mask), &b.lengths)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(WANT).enumerate() {
        assert!((g - w).abs() < TOL, "row {i}: {g} vs transformers {w}");
        let t = TRANSFORMERS[i];
        assert!(
            (g - t).abs() < F32_TOL,
            "row {i}: {g} vs transformers as is {t}"
        );
    }
    // One row at a time: the same numbers (padding changes nothing).
    for (i, r) in ROWS.iter().enumerate() {
        let ids = Tensor::new(*r, &common::device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let s: Vec<f64> = m.scores(&ids, None, &[r.len()]).unwrap().to_vec1().unwrap();
        assert!((s[0] - WANT[i]).abs() < TOL, "row {i} alone: {}", s[0]);
    }
}

#[test]
fn reward_checkpoint_round_trips_as_a_sequence_classifier() {
    let m = closed_form_reward_model();
    let dir = common::TempDir::new();
    save_reward_pretrained(&m, None, dir.path(), DType::F64).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert_eq!(cfg["pad_token_id"], 3);
    let back = load_reward_model(
        dir.path(),
        DType::F64,
        &common::device(),
        ScoreHead::Required,
    )
    .unwrap();
    assert_eq!(back.pad_token_id(), Some(3));
    let b = batch();
    let got: Vec<f64> = back
        .scores(&b.input_ids, Some(&b.attention_mask), &b.lengths)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (g, w) in got.iter().zip(WANT) {
        assert!((g - w).abs() < TOL, "{g} vs {w}");
    }
    // A causal LM is no reward model unless a new head is asked for.
    let lm = common::TempDir::new();
    let cfg = parse_config(LLAMA).unwrap();
    let plain = Model::from_tensors(
        cfg.clone(),
        cfg.tensor_shapes()
            .into_iter()
            .enumerate()
            .map(|(k, (n, s))| {
                let norm = n.ends_with("norm.weight");
                (n, closed_form(s, k, norm))
            })
            .collect(),
        Path::new("<closed form>"),
        DType::F64,
        &common::device(),
    )
    .unwrap();
    difinfo_trainer::pretrained::save_pretrained(&plain, None, lm.path(), DType::F64).unwrap();
    let err = load_reward_model(
        lm.path(),
        DType::F64,
        &common::device(),
        ScoreHead::Required,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("score.weight"), "{err}");
    let fresh = load_reward_model(
        lm.path(),
        DType::F64,
        &common::device(),
        ScoreHead::OrNew(7),
    )
    .unwrap();
    let w: Vec<Vec<f64>> = fresh.score_var().as_tensor().to_vec2().unwrap();
    let sd = (w[0].iter().map(|x| x * x).sum::<f64>() / 8.0).sqrt();
    assert!(sd > 0.0 && sd < 0.1, "N(0, 0.02²) head, got sd {sd}");
}

#[test]
fn reward_loss_is_trls() {
    // TRL: -logsigmoid(rc - rr - m).mean() + c * mean((rc + rr)**2), by hand:
    // rc = [1, -0.5], rr = [0.25, 0.5], m = [0.5, 0]: z = [0.25, -1];
    // softplus(-0.25) = 0.5759394199, softplus(1) = 1.3132616875; mean = 0.9446005537;
    // c = 0.1: (1.25² + 0²) / 2 · 0.1 = 0.078125.
    let d = common::device();
    let rc = Tensor::new(&[1.0f64, -0.5], &d).unwrap();
    let rr = Tensor::new(&[0.25f64, 0.5], &d).unwrap();
    let m = Tensor::new(&[0.5f64, 0.0], &d).unwrap();
    let l = reward_loss(&rc, &rr, Some(&m), Some(0.1)).unwrap();
    let v = l.loss.to_scalar::<f64>().unwrap();
    assert!((v - (0.944_600_553_7 + 0.078_125)).abs() < 1e-9, "{v}");
    let met = l.metrics().unwrap();
    assert_eq!(met.accuracy, 0.5);
    assert_eq!(met.min_reward, -0.5);
    assert_eq!(met.max_reward, 1.0);
    assert!((met.margin + 0.125).abs() < 1e-12); // mean(0.75, -1)
}
