//! Qwen3 and Gemma2 pinned to transformers: per-token log-probs and the gradient of the summed
//! log-prob with respect to every parameter, on closed-form weights that both sides build
//! (`base + 0.5 sin(1.7 i + 0.37 k)`, `k` the tensor's index in name order, `base` 1 for
//! Qwen3's norms and 0 elsewhere, Gemma2's `(1 + w)` norms included), float64, eager attention,
//! no `pad_token_id` (PyTorch's `padding_idx` would leave that embedding row without gradient).
//! `python trainer/scripts/check_arch_transformers.py pin` (transformers 5.25.0, torch 2.15.0)
//! prints the numbers. Each gradient is checked through two projections, `Σ g` and
//! `Σ g_i cos(0.7 i + 0.2)`, so that every entry takes part.
//!
//! The configurations: head_dim 6 ≠ hidden 8 / 2 heads, one key/value head, a window of 3
//! positions on one layer of two (Qwen3's second through `max_window_layers = 1`, Gemma2's
//! first through its default `layer_types`), Gemma2's `query_pre_attn_scalar` 5 and
//! soft-caps 1.5 (attention) and 2.0 (final), tied embeddings.

use std::collections::BTreeMap;
use std::path::Path;

mod common;

use candle_core::{DType, IndexOp, Tensor};
use difinfo_trainer::config_json::parse_config;
use difinfo_trainer::model::Model;

/// transformers' float64 model keeps float32 islands (RMSNorm's mean square, the attention
/// softmax, the RoPE cosines): a few 1e-8 on a log-prob, a few 1e-6 on a gradient projection.
const LOGP_TOL: f64 = 1e-6;
/// Relative (with a floor of 1 for the scale) on each gradient projection.
const GRAD_TOL: f64 = 2e-5;

const QWEN3: &str = r#"{"model_type": "qwen3", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1}"#;

const GEMMA2: &str = r#"{"model_type": "gemma2", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
    "query_pre_attn_scalar": 5, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0,
    "sliding_window": 3}"#;

type Logps = [(&'static [u32], &'static [f64])];
type Grads = [(&'static str, f64, f64)];

const QWEN3_LOGPS: &Logps = &[
    (
        &[1, 5, 9, 2, 14, 3, 3, 7],
        &[
            -3.5037180435872153,
            -4.6122420367541,
            -6.414094182452514,
            -6.572464081949411,
            -6.225599362647916,
            -6.077220146849271,
            -3.0603057853806073,
        ],
    ),
    (&[0, 15, 4], &[-6.111848103928496, -6.063326869950712]),
];

const QWEN3_GRADS: &Grads = &[
    (
        "lm_head.weight",
        3.3306690738754696e-16,
        -2.4926502957785788,
    ),
    (
        "model.embed_tokens.weight",
        6.137802698649466,
        3.4693703836645895,
    ),
    (
        "model.layers.0.input_layernorm.weight",
        6.244821869652685,
        0.1111873398229708,
    ),
    (
        "model.layers.0.mlp.down_proj.weight",
        111.76953457598637,
        21.385788558287807,
    ),
    (
        "model.layers.0.mlp.gate_proj.weight",
        1.605931159510249,
        1.2323357656424005,
    ),
    (
        "model.layers.0.mlp.up_proj.weight",
        3.9521770873090682,
        3.1703147409516497,
    ),
    (
        "model.layers.0.post_attention_layernorm.weight",
        1.6331484498652105,
        -1.8405035282595974,
    ),
    (
        "model.layers.0.self_attn.k_norm.weight",
        5.180150011591248,
        -0.2550422750585932,
    ),
    (
        "model.layers.0.self_attn.k_proj.weight",
        -1.8884829380227575,
        1.1899778211103833,
    ),
    (
        "model.layers.0.self_attn.o_proj.weight",
        -0.7832815447590917,
        29.291929558887485,
    ),
    (
        "model.layers.0.self_attn.q_norm.weight",
        7.898182173810484,
        -0.6998902520958155,
    ),
    (
        "model.layers.0.self_attn.q_proj.weight",
        1.487403255968112,
        -4.82133299396802,
    ),
    (
        "model.layers.0.self_attn.v_proj.weight",
        -7.432818324631138,
        -1.1049821808564229,
    ),
    (
        "model.layers.1.input_layernorm.weight",
        -2.3335610144166434,
        -0.2849549933578932,
    ),
    (
        "model.layers.1.mlp.down_proj.weight",
        95.91188816094254,
        15.504688167459223,
    ),
    (
        "model.layers.1.mlp.gate_proj.weight",
        0.42521512987860066,
        0.41518680013339804,
    ),
    (
        "model.layers.1.mlp.up_proj.weight",
        1.0389116376520526,
        0.18270192553387332,
    ),
    (
        "model.layers.1.post_attention_layernorm.weight",
        0.9320946166424158,
        0.2035323396508531,
    ),
    (
        "model.layers.1.self_attn.k_norm.weight",
        -0.8716075737095804,
        -0.19077911213005297,
    ),
    (
        "model.layers.1.self_attn.k_proj.weight",
        0.3155200340305222,
        -0.017808291102874352,
    ),
    (
        "model.layers.1.self_attn.o_proj.weight",
        0.15908477423520107,
        -15.635459610553792,
    ),
    (
        "model.layers.1.self_attn.q_norm.weight",
        -0.9173376390789942,
        0.190302671803319,
    ),
    (
        "model.layers.1.self_attn.q_proj.weight",
        0.18816364920223103,
        3.070617581544557,
    ),
    (
        "model.layers.1.self_attn.v_proj.weight",
        1.2713820773678262,
        0.08399888129062599,
    ),
    ("model.norm.weight", -30.733895009484538, 3.6271272262360124),
];

const GEMMA2_LOGPS: &Logps = &[
    (
        &[1, 5, 9, 2, 14, 3, 3, 7],
        &[
            -3.119630713763862,
            -3.7898288301522878,
            -2.3893793823032694,
            -2.201501153711789,
            -4.981253751947275,
            -4.039240961014192,
            -2.0795031369450223,
        ],
    ),
    (&[0, 15, 4], &[-5.233220065286127, -5.4004150133459845]),
];

const GEMMA2_GRADS: &Grads = &[
    (
        "model.embed_tokens.weight",
        -3.557400473022306,
        -1.3117843037064403,
    ),
    (
        "model.layers.0.input_layernorm.weight",
        -0.1846246391069144,
        -0.08873632431502365,
    ),
    (
        "model.layers.0.mlp.down_proj.weight",
        3.8324109861795774,
        5.446917772272162,
    ),
    (
        "model.layers.0.mlp.gate_proj.weight",
        -1.2210622232291608,
        3.6425067804102857,
    ),
    (
        "model.layers.0.mlp.up_proj.weight",
        0.5679516567153695,
        2.328757066560012,
    ),
    (
        "model.layers.0.post_attention_layernorm.weight",
        -0.507501283660531,
        0.6620671377304057,
    ),
    (
        "model.layers.0.post_feedforward_layernorm.weight",
        -2.4940403550863266,
        0.6548463561755712,
    ),
    (
        "model.layers.0.pre_feedforward_layernorm.weight",
        0.39437292655929923,
        0.269487673561373,
    ),
    (
        "model.layers.0.self_attn.k_proj.weight",
        0.11580866800156028,
        0.10427546160543769,
    ),
    (
        "model.layers.0.self_attn.o_proj.weight",
        0.257914232643627,
        -19.049664320176216,
    ),
    (
        "model.layers.0.self_attn.q_proj.weight",
        -0.35426098368206055,
        0.1446858900985702,
    ),
    (
        "model.layers.0.self_attn.v_proj.weight",
        0.7386821238436303,
        0.420441967760914,
    ),
    (
        "model.layers.1.input_layernorm.weight",
        0.0492282509803772,
        0.12154710910966826,
    ),
    (
        "model.layers.1.mlp.down_proj.weight",
        -0.7504718332998811,
        1.4156272267395407,
    ),
    (
        "model.layers.1.mlp.gate_proj.weight",
        -0.2335431582124621,
        -0.07030529432898269,
    ),
    (
        "model.layers.1.mlp.up_proj.weight",
        0.06484125088225429,
        -0.042915225532286994,
    ),
    (
        "model.layers.1.post_attention_layernorm.weight",
        -1.0525561429094523,
        0.4038706939441798,
    ),
    (
        "model.layers.1.post_feedforward_layernorm.weight",
        0.09626931371167302,
        0.12891196439574626,
    ),
    (
        "model.layers.1.pre_feedforward_layernorm.weight",
        -0.001669831108301878,
        0.44214491923984767,
    ),
    (
        "model.layers.1.self_attn.k_proj.weight",
        0.06923020607373295,
        -0.0439904228889311,
    ),
    (
        "model.layers.1.self_attn.o_proj.weight",
        0.23106992533387705,
        -1.2139950921625953,
    ),
    (
        "model.layers.1.self_attn.q_proj.weight",
        0.001542202643985315,
        0.26378997866391524,
    ),
    (
        "model.layers.1.self_attn.v_proj.weight",
        0.20701473153645783,
        -0.02680644464015025,
    ),
    ("model.norm.weight", -5.319264106452465, 0.6587302767907776),
];

/// The largest relative differences (log-probs, gradient projections) of `m` against the
/// pinned values.
fn compare(m: &Model, logps: &Logps, grads: &Grads) -> (f64, f64) {
    let mut worst_lp = 0f64;
    let mut total: Option<Tensor> = None;
    for (ids, want) in logps {
        let t = Tensor::new(*ids, &common::device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lp = m.token_logps(&t, None).unwrap();
        let got: Vec<f64> = lp.i(0).unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel < LOGP_TOL,
                "{ids:?} position {i}: {g} vs transformers {w}"
            );
            worst_lp = worst_lp.max(rel);
        }
        let s = lp.sum_all().unwrap();
        total = Some(match total {
            None => s,
            Some(x) => (x + s).unwrap(),
        });
    }
    let store = total.unwrap().backward().unwrap();
    let vars: BTreeMap<String, _> = m.named_vars().into_iter().collect();
    assert_eq!(vars.len(), grads.len(), "one pinned gradient per variable");
    let mut worst_g = 0f64;
    for (name, want_sum, want_cos) in grads {
        let var = vars
            .get(*name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        let g: Vec<f64> = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = g.iter().sum();
        let cos: f64 = g
            .iter()
            .enumerate()
            .map(|(i, x)| x * (0.7 * i as f64 + 0.2).cos())
            .sum();
        for (what, got, want) in [("Σ g", sum, *want_sum), ("Σ g cos", cos, *want_cos)] {
            let rel = (got - want).abs() / want.abs().max(1.0);
            assert!(
                rel < GRAD_TOL,
                "{name} {what}: {got} vs transformers {want}"
            );
            worst_g = worst_g.max(rel);
        }
    }
    (worst_lp, worst_g)
}

fn check(config: &str, logps: &Logps, grads: &Grads) {
    let mut m = common::closed_form_model(parse_config(config).unwrap());
    for fused in [true, false] {
        m.set_fused_kernels(fused);
        let (lp, g) = compare(&m, logps, grads);
        println!(
            "{:?} fused {fused}: max relative difference to transformers: log-probs {lp:.1e}, gradients {g:.1e}",
            m.config().arch
        );
    }
}

#[test]
fn qwen3_logps_and_gradients_match_transformers() {
    check(QWEN3, QWEN3_LOGPS, QWEN3_GRADS);
}

#[test]
fn gemma2_logps_and_gradients_match_transformers() {
    check(GEMMA2, GEMMA2_LOGPS, GEMMA2_GRADS);
}

/// The sequences of [`dump_gradients`] (and of `check_arch_transformers.py grads`): `<s>`
/// then `(7 + 31 i + 97 s) mod 600 + 3`, lengths 12, 17, 22.
fn dump_sequences() -> Vec<Vec<u32>> {
    (0..3u32)
        .map(|s| {
            let mut ids = vec![0];
            ids.extend((1..12 + 5 * s).map(|i| (7 + 31 * i + 97 * s) % 600 + 3));
            ids
        })
        .collect()
}

/// Writes the gradient of the summed token log-probs of [`dump_sequences`] with respect to
/// every parameter of the checkpoint `DIFINFO_GRAD_MODEL` (f32, CPU, fused kernels) to the
/// safetensors file `DIFINFO_GRAD_OUT`, for `check_arch_transformers.py grads`, which
/// compares them with transformers' (needs torch: not part of `cargo test`).
#[test]
#[ignore = "a helper of trainer/scripts/check_arch_transformers.py"]
fn dump_gradients() {
    let (Ok(dir), Ok(out)) = (
        std::env::var("DIFINFO_GRAD_MODEL"),
        std::env::var("DIFINFO_GRAD_OUT"),
    ) else {
        panic!("set DIFINFO_GRAD_MODEL and DIFINFO_GRAD_OUT");
    };
    let dev = candle_core::Device::Cpu;
    let m = difinfo_trainer::pretrained::load_model(Path::new(&dir), DType::F32, &dev).unwrap();
    let mut total: Option<Tensor> = None;
    for ids in dump_sequences() {
        let t = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let s = m.token_logps(&t, None).unwrap().sum_all().unwrap();
        total = Some(match total {
            None => s,
            Some(x) => (x + s).unwrap(),
        });
    }
    let store = total.unwrap().backward().unwrap();
    let grads: Vec<(String, Tensor)> = m
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, store.get(v.as_tensor()).unwrap().clone()))
        .collect();
    difinfo_trainer::safetensors::write_safetensors(
        Path::new(&out),
        grads.iter().map(|(n, t)| (n.as_str(), t)),
    )
    .unwrap();
}
