//! The fused CPU kernels of `difinfo_trainer::fused` against the unfused candle ops they
//! replace: values and gradients of every input, in f64 (tight) and f32 (rounding-level), on
//! sizes that span several rayon tasks; and the model's log-probs and gradients with and
//! without them.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{causal_and_padding_mask, max_abs, rand};
use difinfo_trainer::batch::Batch;
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::fused;
use difinfo_trainer::model::{packed_causal_mask, MASK_VALUE};
use difinfo_trainer::train::grads::reduce;
use difinfo_trainer::train::optim::adamw;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        _ => 2e-5,
    }
}

/// Checks `fused(inputs)` against `reference(inputs)`: values, and the gradients of
/// `Σ out ⊙ r` (a random cotangent) with respect to every input.
fn check(
    name: &str,
    inputs: &[Tensor],
    dtype: DType,
    fused_f: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused_f(&ts);
    let b = reference(&ts);
    let scale = 1.0 + max_abs(&b);
    let d = max_abs_diff(&a, &b);
    assert!(
        d <= tol(dtype) * scale,
        "{name} {dtype:?}: values differ by {d:e}"
    );
    let r = rand(a.dims(), 99, dtype);
    let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (
            ga.get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no fused gradient for input {i}")),
            gb.get(v.as_tensor()).unwrap(),
        );
        let scale = 1.0 + max_abs(y);
        let d = max_abs_diff(x, y);
        assert!(
            d <= tol(dtype) * scale,
            "{name} {dtype:?}: gradient of input {i} differs by {d:e}"
        );
    }
}

#[test]
fn rms_norm_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let x = rand(&[3, 50, 24], 1, dtype);
        let w = rand(&[24], 2, dtype);
        check(
            "rms_norm",
            &[x, w],
            dtype,
            |t| fused::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
        );
    }
}

#[test]
fn silu_mul_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let a = (rand(&[70, 300], 3, dtype) * 4.0).unwrap();
        let b = rand(&[70, 300], 4, dtype);
        check(
            "silu_mul",
            &[a, b],
            dtype,
            |t| fused::silu_mul(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }
}

#[test]
fn masked_softmax_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let (b, h, l) = (3, 4, 37);
        let s = (rand(&[b, h, l, l], 5, dtype) * 3.0).unwrap();
        for mask in [
            causal_and_padding_mask(b, l, &[0, 5, 36], dtype),
            causal_and_padding_mask(1, l, &[0], dtype),
        ] {
            let scale = 0.35;
            check(
                "masked_softmax",
                std::slice::from_ref(&s),
                dtype,
                |t| fused::masked_softmax(&t[0], &mask, scale).unwrap(),
                |t| {
                    let x = (&t[0] * scale).unwrap().broadcast_add(&mask).unwrap();
                    candle_nn::ops::softmax(&x, D::Minus1).unwrap()
                },
            );
        }
    }
}

#[test]
fn token_logps_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let (n, v) = (45, 1000);
        let z = (rand(&[n, v], 6, dtype) * 5.0).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        check(
            "token_logps",
            &[z],
            dtype,
            |x| fused::token_logps(&x[0], &t).unwrap(),
            |x| {
                let lsm = candle_nn::ops::log_softmax(&x[0], D::Minus1).unwrap();
                lsm.gather(&t.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
        );
    }
}

/// The LM head with log-softmax and pick as one node against the candle ops it replaces, for
/// `h` and `w`; a second backward through the same graph recomputes the logits.
#[test]
fn lm_head_logps_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let (n, hd, v) = (45, 24, 1000);
        let h = rand(&[n, hd], 81, dtype);
        let w = rand(&[v, hd], 82, dtype);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        check(
            "lm_head_logps",
            &[h.clone(), w.clone()],
            dtype,
            |x| fused::lm_head_logps(&x[0], &x[1], &t).unwrap(),
            |x| {
                let z = x[0].matmul(&x[1].t().unwrap()).unwrap();
                let lsm = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
                lsm.gather(&t.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
        );
        let (hv, wv) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
        let lp = fused::lm_head_logps(hv.as_tensor(), wv.as_tensor(), &t).unwrap();
        let loss = lp.sum_all().unwrap();
        let g1 = loss.backward().unwrap();
        let g2 = loss.backward().unwrap();
        for var in [&hv, &wv] {
            let (a, b) = (
                g1.get(var.as_tensor()).unwrap(),
                g2.get(var.as_tensor()).unwrap(),
            );
            assert!(
                max_abs_diff(a, b) <= tol(dtype),
                "{dtype:?}: second backward"
            );
        }
    }
}

#[test]
fn lm_head_logps_rejects_out_of_vocabulary_targets() {
    let h = rand(&[2, 4], 83, DType::F32);
    let w = rand(&[10, 4], 84, DType::F32);
    let t = Tensor::from_vec(vec![3u32, 10], 2, &Device::Cpu).unwrap();
    assert!(fused::lm_head_logps(&h, &w, &t).is_err());
}

#[test]
fn token_logps_rejects_out_of_vocabulary_targets() {
    let z = rand(&[2, 10], 7, DType::F32);
    let t = Tensor::from_vec(vec![3u32, 10], 2, &Device::Cpu).unwrap();
    assert!(fused::token_logps(&z, &t).is_err());
}

#[test]
fn fused_ops_are_off_for_half_types() {
    let x = rand(&[2, 4], 8, DType::F32);
    assert!(fused::enabled(&x));
    assert!(!fused::enabled(&x.to_dtype(DType::BF16).unwrap()));
}

/// Every variable's gradient of `loss` by name (`m.named_vars()` order), with the model's
/// gradient sink (if any) cleared before and drained into candle's store after the backward
/// pass; and whether that store lacked `probe`'s gradient before the drain (a whole-layer
/// node took it).
fn model_grads(
    m: &difinfo_trainer::model::Model,
    loss: &Tensor,
    probe: &str,
) -> (Vec<(String, Tensor)>, bool) {
    if let Some(s) = m.grad_sink() {
        s.clear();
    }
    let mut grads = loss.backward().unwrap();
    let vars = m.named_vars();
    let taken = vars
        .iter()
        .find(|(n, _)| n == probe)
        .is_some_and(|(_, v)| grads.get(v.as_tensor()).is_none());
    if let Some(s) = m.grad_sink() {
        s.drain_into(&mut grads).unwrap();
    }
    let g = vars
        .into_iter()
        .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (g, taken)
}

/// The whole model: per-token log-probs and every variable's gradient agree with the fused
/// kernels on and off (padding, GQA, a sliding window, biases and tied embeddings included),
/// and with the layers run as whole-layer nodes whose weight gradients come through a
/// [`fused::GradSink`] (Llama and Mistral; Qwen2's biased projections, Qwen3's q/k norms
/// and Gemma2's layers keep the separate kernels where they apply, plain ops elsewhere). A second backward pass through the same graph gives the same gradients.
#[test]
fn model_with_fused_kernels_matches_unfused() {
    let seqs = common::two_sequences();
    let q0 = "model.layers.0.self_attn.q_proj.weight";
    for arch in [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma2,
    ] {
        for dtype in [DType::F64, DType::F32] {
            let (_d, mut m) = common::model(common::micro_config(arch), dtype, 21);
            let b = Batch::from_sequences(&seqs, 2, m.device()).unwrap();
            assert!(m.fused_kernels());
            // Log-probs, every variable's gradient, and whether the store of candle's own
            // backward lacked the first query projection's (taken by a layer node).
            let run = |m: &difinfo_trainer::model::Model, passes: usize| {
                let lp = m
                    .token_logps(&b.input_ids, Some(&b.attention_mask))
                    .unwrap();
                let w = rand(lp.dims(), 5, dtype);
                let loss = (&lp * &w).unwrap().sum_all().unwrap();
                let out: Vec<_> = (0..passes).map(|_| model_grads(m, &loss, q0)).collect();
                (lp, out)
            };
            m.set_grad_sink(Some(fused::GradSink::default()));
            let (lp_l, passes_l) = run(&m, 2);
            m.set_grad_sink(None);
            let (lp_f, passes_f) = run(&m, 1);
            m.set_fused_kernels(false);
            let (lp_u, passes_u) = run(&m, 1);
            let g_u = &passes_u[0].0;
            assert_eq!(
                passes_l[0].1,
                matches!(arch, Architecture::Llama | Architecture::Mistral),
                "{arch:?}: layer nodes used"
            );
            assert!(!passes_f[0].1 && !passes_u[0].1);
            let runs = [
                ("whole-layer nodes", &lp_l, &passes_l[0].0),
                ("whole-layer nodes, second backward", &lp_l, &passes_l[1].0),
                ("separate kernels", &lp_f, &passes_f[0].0),
            ];
            for (what, lp, g) in runs {
                let d = max_abs_diff(lp, &lp_u);
                assert!(
                    d <= tol(dtype) * 10.0,
                    "{arch:?} {dtype:?} {what}: log-probs differ by {d:e}"
                );
                for ((name, a), (_, b)) in g.iter().zip(g_u) {
                    let scale = 1.0 + max_abs(b);
                    let d = max_abs_diff(a, b);
                    assert!(
                        d <= tol(dtype) * 10.0 * scale,
                        "{arch:?} {dtype:?} {what}: gradient of {name} differs by {d:e}"
                    );
                }
            }
        }
    }
}

/// The LM head on the loss mask's positions only (`token_logps_masked`): the selected
/// log-probs and every gradient equal those of all positions times the mask, with the
/// layers as whole-layer nodes and without.
#[test]
fn masked_token_logps_match_all_positions_times_mask() {
    let seqs = common::two_sequences();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        for dtype in [DType::F64, DType::F32] {
            for sink in [false, true] {
                let (_d, mut m) = common::model(common::micro_config(arch), dtype, 23);
                if sink {
                    m.set_grad_sink(Some(fused::GradSink::default()));
                }
                let b = Batch::from_sequences(&seqs, 2, m.device()).unwrap();
                let mask = b.loss_mask.to_dtype(dtype).unwrap();
                let w = rand(mask.dims(), 6, dtype);
                let run = |masked: bool| {
                    let lp = if masked {
                        m.token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
                            .unwrap()
                    } else {
                        (m.token_logps(&b.input_ids, Some(&b.attention_mask))
                            .unwrap()
                            * &mask)
                            .unwrap()
                    };
                    let loss = (&lp * &w).unwrap().sum_all().unwrap();
                    let grads: Vec<Tensor> = model_grads(&m, &loss, "lm_head.weight")
                        .0
                        .into_iter()
                        .map(|(_, g)| g)
                        .collect();
                    (lp, grads)
                };
                let ((lp_m, g_m), (lp_a, g_a)) = (run(true), run(false));
                let d = max_abs_diff(&lp_m, &lp_a);
                assert!(
                    d <= tol(dtype),
                    "{arch:?} {dtype:?} sink {sink}: log-probs differ by {d:e}"
                );
                for (a, b) in g_m.iter().zip(&g_a) {
                    let d = max_abs_diff(a, b);
                    assert!(
                        d <= tol(dtype) * 10.0,
                        "{arch:?} {dtype:?} sink {sink}: gradient differs by {d:e}"
                    );
                }
            }
        }
    }
}

/// The fused AdamW update is bit-identical to the op-by-op candle update of `train::optim`
/// (same operations, same roundings), with and without weight decay, over several steps.
#[test]
fn adamw_step_is_bit_identical_to_op_by_op() {
    // Out of place and in place.
    for dtype in [DType::F32, DType::F64] {
        for wd in [0.0, 0.01] {
            let n = 40_000; // several rayon tasks
            let mut p = rand(&[n], 11, dtype);
            let mut m = p.zeros_like().unwrap();
            let mut v = p.zeros_like().unwrap();
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            // The in-place step's own copies (it writes into their storage).
            let (p3, m3, v3) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
            let (b1, b2, eps, lr) = (0.9, 0.999, 1e-8, 3e-3);
            for t in 1..=3 {
                let g = rand(&[n], 20 + t as u64, dtype);
                let bc1 = 1.0 - f64::powi(b1, t);
                let bc2 = 1.0 - f64::powi(b2, t);
                let step = adamw::AdamWStep {
                    lr,
                    weight_decay: wd,
                    beta1: b1,
                    beta2: b2,
                    eps,
                    bc1,
                    bc2,
                };
                let (np, nm, nv) = adamw::adamw_step(&p, &g, &m, &v, &step).unwrap().unwrap();
                (p, m, v) = (np, nm, nv);
                assert!(adamw::adamw_step_in_place(&p3, &g, &m3, &v3, &step).unwrap());
                // The op-by-op path of `Optimizer::step`.
                let pp = if wd != 0.0 {
                    p2.affine(1.0 - lr * wd, 0.0).unwrap()
                } else {
                    p2.clone()
                };
                m2 = (m2.affine(b1, 0.0).unwrap() + g.affine(1.0 - b1, 0.0).unwrap()).unwrap();
                v2 = (v2.affine(b2, 0.0).unwrap()
                    + g.sqr().unwrap().affine(1.0 - b2, 0.0).unwrap())
                .unwrap();
                let denom =
                    (v2.sqrt().unwrap().affine(1.0 / bc2.sqrt(), 0.0).unwrap() + eps).unwrap();
                let upd = (&m2 / denom).unwrap().affine(lr / bc1, 0.0).unwrap();
                p2 = (&pp - upd).unwrap();
            }
            for (a, b) in [
                (&p, &p2),
                (&m, &m2),
                (&v, &v2),
                (&p3, &p2),
                (&m3, &m2),
                (&v3, &v2),
            ] {
                assert_eq!(max_abs_diff(a, b), 0.0, "{dtype:?} wd {wd}");
            }
        }
    }
    // Not applicable: a bf16 tensor falls back.
    let x = rand(&[4], 1, DType::BF16);
    let step = adamw::AdamWStep {
        lr: 1e-3,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bc1: 0.1,
        bc2: 0.001,
    };
    assert!(adamw::adamw_step(&x, &x, &x, &x, &step).unwrap().is_none());
    assert!(!adamw::adamw_step_in_place(&x, &x, &x, &x, &step).unwrap());
}

#[test]
fn split_heads_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let (b, l, h_in, h_out, d) = (2, 19, 2, 6, 8);
        let x = rand(&[b * l, h_in * d], 31, dtype);
        let cos = rand(&[l, d], 32, dtype);
        let sin = rand(&[l, d], 33, dtype);
        for rope in [true, false] {
            check(
                "split_heads",
                std::slice::from_ref(&x),
                dtype,
                |t| fused::split_heads(&t[0], b, l, h_in, h_out, &cos, &sin, rope).unwrap(),
                |t| {
                    let z = t[0]
                        .reshape((b, l, h_in, d))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    let z = if rope {
                        difinfo_trainer::model::apply_rope(&z, &cos, &sin).unwrap()
                    } else {
                        z
                    };
                    z.unsqueeze(2)
                        .unwrap()
                        .broadcast_as((b, h_in, h_out / h_in, l, d))
                        .unwrap()
                        .reshape((b, h_out, l, d))
                        .unwrap()
                },
            );
        }
    }
}

#[test]
fn attention_matches_unfused() {
    // l = 150 spans three query blocks of the blocked kernel (64, 64, 22 rows), each with
    // its own key span; the last batch entry of the padded mask masks every key of every
    // row (softmax uniform over all keys), the windowed one masks early keys too.
    for (b, h, l, d) in [(3, 4, 21, 8), (3, 2, 150, 8)] {
        for dtype in [DType::F64, DType::F32] {
            let q = rand(&[b, h, l, d], 41, dtype);
            let k = rand(&[b, h, l, d], 42, dtype);
            let v = rand(&[b, h, l, d], 43, dtype);
            let windowed = {
                let mut m = vec![0f64; l * l];
                for i in 0..l {
                    for j in 0..l {
                        if j > i || i - j >= 70 {
                            m[i * l + j] = MASK_VALUE;
                        }
                    }
                }
                Tensor::from_vec(m, (1, 1, l, l), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // Sequences packed into one row (block-diagonal causal, a window of 6 within
            // each): blocks whose keys start past 0.
            let third = l / 3;
            let lens = [third, 5, l - third - 5];
            let packed = packed_causal_mask(&lens, Some(6), dtype, &Device::Cpu).unwrap();
            for mask in [
                packed,
                causal_and_padding_mask(b, l, &[0, 4, l], dtype),
                causal_and_padding_mask(1, l, &[0], dtype),
                windowed,
                Tensor::zeros((1, 1, l, l), dtype, &Device::Cpu).unwrap(),
            ] {
                let scale = 0.3;
                check(
                    "attention",
                    &[q.clone(), k.clone(), v.clone()],
                    dtype,
                    |t| fused::attention(&t[0], &t[1], &t[2], &mask, scale).unwrap(),
                    |t| {
                        let s = (t[0].matmul(&t[1].t().unwrap()).unwrap() * scale)
                            .unwrap()
                            .broadcast_add(&mask)
                            .unwrap();
                        candle_nn::ops::softmax(&s, D::Minus1)
                            .unwrap()
                            .matmul(&t[2])
                            .unwrap()
                            .transpose(1, 2)
                            .unwrap()
                            .reshape((b * l, h * d))
                            .unwrap()
                    },
                );
            }
        }
    }
}

/// A second backward pass through the attention node recomputes the probabilities (the
/// first took the kept ones) and gives the same gradients.
#[test]
fn attention_second_backward_recomputes() {
    let (b, h, l, d) = (2, 2, 130, 8);
    let dtype = DType::F64;
    let vars: Vec<candle_core::Var> = (0..3)
        .map(|i| candle_core::Var::from_tensor(&rand(&[b, h, l, d], 50 + i, dtype)).unwrap())
        .collect();
    let mask = causal_and_padding_mask(b, l, &[0, 70], dtype);
    let out = fused::attention(&vars[0], &vars[1], &vars[2], &mask, 0.25).unwrap();
    let loss = (&out * &rand(out.dims(), 9, dtype))
        .unwrap()
        .sum_all()
        .unwrap();
    let (g1, g2) = (loss.backward().unwrap(), loss.backward().unwrap());
    for v in &vars {
        let d = max_abs_diff(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(d <= 1e-13, "second backward differs by {d:e}");
    }
}

#[test]
fn linear_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let x = rand(&[37, 24], 51, dtype);
        let w = rand(&[40, 24], 52, dtype);
        check(
            "linear",
            &[x, w],
            dtype,
            |t| fused::linear(&t[0], &t[1]).unwrap(),
            |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
        );
    }
}

#[test]
fn linear_add_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let x = rand(&[37, 24], 61, dtype);
        let w = rand(&[40, 24], 62, dtype);
        let r = rand(&[37, 40], 63, dtype);
        check(
            "linear_add",
            &[x, w, r],
            dtype,
            |t| fused::linear_add(&t[0], &t[1], &t[2]).unwrap(),
            |t| (&t[2] + t[0].matmul(&t[1].t().unwrap()).unwrap()).unwrap(),
        );
    }
}

#[test]
fn gate_up_matches_unfused() {
    for dtype in [DType::F64, DType::F32] {
        let x = rand(&[37, 24], 71, dtype);
        let wg = rand(&[40, 24], 72, dtype);
        let wu = rand(&[40, 24], 73, dtype);
        check(
            "gate_up",
            &[x, wg, wu],
            dtype,
            |t| fused::gate_up(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                let g = t[0].matmul(&t[1].t().unwrap()).unwrap();
                let u = t[0].matmul(&t[2].t().unwrap()).unwrap();
                (g.silu().unwrap() * u).unwrap()
            },
        );
    }
}

/// Gradient clipping's in-place scaling gives candle's `affine(c, 0)` bit for bit, and so does
/// the out-of-place kernel.
#[test]
fn scale_in_place_is_bit_identical_to_affine() {
    for dtype in [DType::F32, DType::F64] {
        let x = rand(&[30_001], 4, dtype);
        let want = x.affine(0.37, 0.0).unwrap();
        let out = reduce::scale(&x, 0.37).unwrap().unwrap();
        let y = x.copy().unwrap();
        assert!(reduce::scale_in_place(&y, 0.37).unwrap());
        assert_eq!(max_abs_diff(&out, &want), 0.0, "{dtype:?}");
        assert_eq!(max_abs_diff(&y, &want), 0.0, "{dtype:?} in place");
    }
    assert!(!reduce::scale_in_place(&rand(&[4], 1, DType::BF16), 2.0).unwrap());
}
