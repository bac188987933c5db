//! Log-probs pinned to an independent implementation: `trainer/scripts/check_logps_numpy.py`
//! (a from-scratch float64 NumPy version of transformers' modeling_llama / qwen2), on
//! closed-form weights that both sides construct. `trainer/scripts/pin_reference_values.py`
//! prints the numbers; its core:
//!
//! ```python
//! import sys, numpy as np
//! sys.path.insert(0, "trainer/scripts")
//! from check_logps_numpy import token_logps
//! # shapes(cfg): (name, shape) of every tensor, sorted by name (as ModelConfig::tensor_shapes)
//! def weights(cfg):
//!     w = {}
//!     for k, (name, shape) in enumerate(shapes(cfg)):
//!         i = np.arange(int(np.prod(shape)), dtype=np.float64)
//!         base = 1.0 if name.endswith("norm.weight") else 0.0
//!         w[name] = (base + 0.5 * np.sin(1.7 * i + 0.37 * k)).reshape(shape)
//!     return w
//! for s in [[1, 5, 9, 2, 14, 3, 3, 7], [0, 15, 4]]:
//!     print(token_logps(cfg, weights(cfg), np.array(s)))
//! ```

mod common;

use candle_core::{IndexOp, Tensor};
use difinfo_trainer::batch::Sequence;
use difinfo_trainer::config_json::parse_config;
use difinfo_trainer::logps::sequence_logps;

/// Both sides compute in float64 (RoPE angles rounded to float32 on both); what remains is
/// summation order.
const TOL: f64 = 1e-9;

const LLAMA: &str = r#"{"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16}}"#;

const QWEN2: &str = r#"{"model_type": "qwen2", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;

fn check(config: &str, expected: &[(&[u32], &[f64])]) {
    let m = common::closed_form_model(parse_config(config).unwrap());
    for (ids, want) in expected {
        let t = Tensor::new(*ids, &common::device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got: Vec<f64> = m
            .token_logps(&t, None)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (g - w).abs() < TOL,
                "{ids:?} position {i}: {g} vs numpy {w}"
            );
        }
    }
    // The same numbers through a padded batch with completion masks.
    let seqs: Vec<Sequence> = expected
        .iter()
        .map(|(ids, _)| Sequence {
            ids: ids.to_vec(),
            completion_start: 1,
        })
        .collect();
    let sums = sequence_logps(&m, &seqs, 0).unwrap();
    for (s, (_, want)) in sums.iter().zip(expected) {
        let w: f64 = want.iter().sum();
        assert!((s - w).abs() < 1e-8, "{s} vs {w}");
    }
}

#[test]
fn llama_gqa_llama3_rope_matches_numpy_reference() {
    check(
        LLAMA,
        &[
            (
                &[1, 5, 9, 2, 14, 3, 3, 7],
                &[
                    -3.3057023914787793,
                    -2.490288683155102,
                    -2.5592355148644694,
                    -2.3934381403422686,
                    -3.2276159039760133,
                    -3.4356682110930628,
                    -2.35902680228247,
                ],
            ),
            (&[0, 15, 4], &[-2.8521156924458366, -2.946994279280632]),
        ],
    );
}

#[test]
fn qwen2_bias_tied_matches_numpy_reference() {
    check(
        QWEN2,
        &[
            (
                &[1, 5, 9, 2, 14, 3, 3, 7],
                &[
                    -3.0586522795364988,
                    -2.730458587135797,
                    -2.163770939017554,
                    -2.614373855963338,
                    -2.7893301304693203,
                    -2.5944763488781937,
                    -2.8548131822963465,
                ],
            ),
            (&[0, 15, 4], &[-2.3178235152149536, -3.0036805672109397]),
        ],
    );
}
