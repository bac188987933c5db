//! NaN propagates: a NaN input of any fused kernel (forward) or a NaN output gradient
//! (backward) reaches every output it influences, in f32 and f64, and a NaN weight makes the
//! model's log-probs NaN with the fused kernels on (separate kernels or whole-layer nodes) and
//! off, in every dtype. Before, the f32 kernels' `exp` clamped NaN to 88 (`f32::min` drops
//! NaN) and the row maxima skipped NaN, so a NaN score or logit became an ordinary number.
//!
//! "Influences" is measured, not listed per kernel: an output entry is influenced by an input
//! entry when moving that input by a finite step changes the output entry. So the check is the
//! same for every kernel, and a masked attention key (which changes nothing) is not required to
//! spread its NaN.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{causal_and_padding_mask, rand};
use difinfo_trainer::batch::Batch;
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::fused;
use difinfo_trainer::model::Model;
use difinfo_trainer::train::grads::reduce;
use difinfo_trainer::train::optim::adamw;

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `t` with flat element `e` replaced by `f(old)`.
fn edit(t: &Tensor, e: usize, f: impl Fn(f64) -> f64) -> Tensor {
    let mut v = flat(t);
    v[e] = f(v[e]);
    Tensor::from_vec(v, t.shape(), t.device())
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

/// The entries of `a` and `b` that differ.
fn changed(a: &[f64], b: &[f64]) -> Vec<usize> {
    (0..a.len()).filter(|&i| a[i] != b[i]).collect()
}

/// A kernel under test: inputs (as variables) → output; `sink` collects gradients that a
/// node leaves outside candle's store.
type Kernel<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

/// Output and the gradients of `Σ out ⊙ r` with respect to every input.
fn run(f: Kernel, inputs: &[Tensor], r: &Tensor, sink: Option<&fused::GradSink>) -> Vec<Vec<f64>> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    if let Some(s) = sink {
        s.clear();
    }
    let mut g = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    if let Some(s) = sink {
        s.drain_into(&mut g).unwrap();
    }
    let mut res = vec![flat(&out)];
    for v in &vars {
        res.push(flat(
            g.get(v.as_tensor()).expect("a gradient for every input"),
        ));
    }
    res
}

fn assert_nan_at(what: &str, got: &[f64], want: &[usize]) {
    let missed: Vec<(usize, f64)> = want
        .iter()
        .filter(|&&i| !got[i].is_nan())
        .map(|&i| (i, got[i]))
        .take(5)
        .collect();
    assert!(
        missed.is_empty(),
        "{what}: {} of {} influenced entries are not NaN, e.g. {missed:?}",
        want.iter().filter(|&&i| !got[i].is_nan()).count(),
        want.len()
    );
}

/// For each `(input, element)` of `nan_at`: a NaN there makes every output entry and every
/// gradient entry it influences NaN; and a NaN in the output gradient at `out_at` makes every
/// input-gradient entry it influences NaN.
fn check_nan(
    name: &str,
    f: Kernel,
    inputs: &[Tensor],
    nan_at: &[(usize, usize)],
    out_at: &[usize],
    sink: Option<&fused::GradSink>,
) {
    let dtype = inputs[0].dtype();
    let out_dims = f(inputs).dims().to_vec();
    let r = rand(&out_dims, 77, dtype);
    let base = run(f, inputs, &r, sink);
    for &(i, e) in nan_at {
        let mut moved = inputs.to_vec();
        moved[i] = edit(&inputs[i], e, |x| x + 0.5);
        let pert = run(f, &moved, &r, sink);
        let mut nan = inputs.to_vec();
        nan[i] = edit(&inputs[i], e, |_| f64::NAN);
        let got = run(f, &nan, &r, sink);
        let influenced = changed(&base[0], &pert[0]);
        assert!(
            !influenced.is_empty(),
            "{name}: input {i}[{e}] influences nothing"
        );
        assert_nan_at(
            &format!("{name} {dtype:?} forward, NaN in input {i}[{e}]"),
            &got[0],
            &influenced,
        );
        for j in 1..base.len() {
            assert_nan_at(
                &format!(
                    "{name} {dtype:?} backward, NaN in input {i}[{e}], gradient of input {}",
                    j - 1
                ),
                &got[j],
                &changed(&base[j], &pert[j]),
            );
        }
    }
    for &o in out_at {
        let pert = run(f, inputs, &edit(&r, o, |x| x + 0.5), sink);
        let got = run(f, inputs, &edit(&r, o, |_| f64::NAN), sink);
        let mut any = false;
        for j in 1..base.len() {
            let influenced = changed(&base[j], &pert[j]);
            any |= !influenced.is_empty();
            assert_nan_at(
                &format!(
                    "{name} {dtype:?} backward, NaN output gradient [{o}], gradient of input {}",
                    j - 1
                ),
                &got[j],
                &influenced,
            );
        }
        assert!(any, "{name}: output gradient [{o}] influences nothing");
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::F64];

#[test]
fn rms_norm_propagates_nan() {
    for dtype in DTYPES {
        let x = rand(&[3, 50, 24], 1, dtype);
        let w = rand(&[24], 2, dtype);
        check_nan(
            "rms_norm",
            &|t| fused::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            &[x, w],
            &[(0, 0), (0, 1000), (1, 7)],
            &[0, 3599],
            None,
        );
    }
}

#[test]
fn silu_mul_propagates_nan() {
    for dtype in DTYPES {
        let a = (rand(&[70, 300], 3, dtype) * 4.0).unwrap();
        let b = rand(&[70, 300], 4, dtype);
        check_nan(
            "silu_mul",
            &|t| fused::silu_mul(&t[0], &t[1]).unwrap(),
            &[a, b],
            &[(0, 5), (0, 20_999), (1, 11)],
            &[17],
            None,
        );
    }
}

#[test]
fn split_heads_propagates_nan() {
    for dtype in DTYPES {
        let (b, l, h_in, h_out, d) = (2, 19, 2, 6, 8);
        let x = rand(&[b * l, h_in * d], 31, dtype);
        let cos = rand(&[l, d], 32, dtype);
        let sin = rand(&[l, d], 33, dtype);
        for rope in [true, false] {
            check_nan(
                "split_heads",
                &|t| fused::split_heads(&t[0], b, l, h_in, h_out, &cos, &sin, rope).unwrap(),
                std::slice::from_ref(&x),
                &[(0, 0), (0, 13), (0, 600)],
                &[2, 1000],
                None,
            );
        }
    }
}

#[test]
fn masked_softmax_propagates_nan() {
    for dtype in DTYPES {
        let (b, h, l) = (2, 3, 37);
        let s = (rand(&[b, h, l, l], 5, dtype) * 3.0).unwrap();
        let mask = causal_and_padding_mask(b, l, &[0, 5], dtype);
        // Attended keys of rows in both batch entries (the second with 5 padded keys).
        let at = [10 * l + 3, (5 * l + 20) * l + 15, 4 * l * l + 36 * l];
        check_nan(
            "masked_softmax",
            &|t| fused::masked_softmax(&t[0], &mask, 0.35).unwrap(),
            std::slice::from_ref(&s),
            &at.map(|e| (0, e)),
            &[10 * l + 3],
            None,
        );
    }
}

/// The blocked attention kernel: NaN in a query, a key or a value of the first and of a later
/// query block (l = 150: blocks of 64, 64, 22 rows with their own key spans), with causal and
/// padding masks.
#[test]
fn attention_propagates_nan_through_every_key_span() {
    let (b, h, l, d) = (2, 2, 150, 8);
    for dtype in DTYPES {
        let q = rand(&[b, h, l, d], 41, dtype);
        let k = rand(&[b, h, l, d], 42, dtype);
        let v = rand(&[b, h, l, d], 43, dtype);
        let mask = causal_and_padding_mask(b, l, &[0, 30], dtype);
        let at = |bi: usize, hi: usize, pos: usize, j: usize| ((bi * h + hi) * l + pos) * d + j;
        let nan_at = [
            (0, at(0, 0, 3, 1)),
            (0, at(1, 1, 100, 0)),
            (1, at(0, 1, 2, 5)),
            (1, at(0, 0, 70, 3)),
            (1, at(1, 0, 110, 3)),
            (1, at(0, 1, 140, 3)),
            (2, at(0, 0, 0, 0)),
            (2, at(1, 1, 115, 7)),
            (2, at(0, 0, 149, 7)),
            (2, at(0, 1, 65, 2)),
        ];
        check_nan(
            "attention",
            &|t| fused::attention(&t[0], &t[1], &t[2], &mask, 0.3).unwrap(),
            &[q, k, v],
            &nan_at,
            &[5, 100 * h * d + 9],
            None,
        );
    }
}

#[test]
fn linear_kernels_propagate_nan() {
    for dtype in DTYPES {
        let x = rand(&[37, 24], 51, dtype);
        let w = rand(&[40, 24], 52, dtype);
        let w2 = rand(&[40, 24], 53, dtype);
        let r = rand(&[37, 40], 54, dtype);
        let nan_at = [(0, 0), (0, 500), (1, 30)];
        check_nan(
            "linear",
            &|t| fused::linear(&t[0], &t[1]).unwrap(),
            &[x.clone(), w.clone()],
            &nan_at,
            &[41],
            None,
        );
        check_nan(
            "linear_add",
            &|t| fused::linear_add(&t[0], &t[1], &t[2]).unwrap(),
            &[x.clone(), w.clone(), r],
            &[(0, 0), (1, 30), (2, 77)],
            &[41],
            None,
        );
        check_nan(
            "gate_up",
            &|t| fused::gate_up(&t[0], &t[1], &t[2]).unwrap(),
            &[x, w, w2],
            &[(0, 3), (1, 30), (2, 900)],
            &[41],
            None,
        );
    }
}

#[test]
fn log_softmax_and_pick_propagate_nan() {
    for dtype in DTYPES {
        let (n, hd, v) = (45, 24, 1000);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        let z = (rand(&[n, v], 6, dtype) * 5.0).unwrap();
        // Logits that are not the target, and targets (row 1's is 7919 % 1000, row 44's 436).
        check_nan(
            "token_logps",
            &|x| fused::token_logps(&x[0], &t).unwrap(),
            std::slice::from_ref(&z),
            &[(0, 5), (0, v + 919), (0, 44 * v + 436)],
            &[3],
            None,
        );
        let hs = rand(&[n, hd], 81, dtype);
        let w = rand(&[v, hd], 82, dtype);
        check_nan(
            "lm_head_logps",
            &|x| fused::lm_head_logps(&x[0], &x[1], &t).unwrap(),
            &[hs, w],
            &[(0, 0), (0, 44 * hd + 23), (1, 5), (1, 919 * hd)],
            &[3],
            None,
        );
    }
}

#[test]
fn embedding_propagates_nan() {
    for dtype in DTYPES {
        let table = rand(&[50, 16], 91, dtype);
        let ids: Vec<u32> = vec![3, 7, 3, 49, 0, 7];
        let sink = fused::GradSink::default();
        check_nan(
            "embedding",
            &|t| fused::embedding(&t[0], &ids, &sink).unwrap(),
            std::slice::from_ref(&table),
            &[(0, 3 * 16 + 2), (0, 49 * 16)],
            &[5, 2 * 16 + 1],
            Some(&sink),
        );
    }
}

#[test]
fn adamw_and_reductions_propagate_nan() {
    for dtype in DTYPES {
        let n = 40_000;
        let p = rand(&[n], 11, dtype);
        let g = rand(&[n], 12, dtype);
        let m = (rand(&[n], 13, dtype) * 0.1).unwrap();
        let v = rand(&[n], 14, dtype).abs().unwrap();
        let step = adamw::AdamWStep {
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            bc1: 0.1,
            bc2: 0.001,
        };
        for which in 0..4 {
            let mut ts = [p.clone(), g.clone(), m.clone(), v.clone()];
            ts[which] = edit(&ts[which], 30_000, |_| f64::NAN);
            let (np, nm, nv) = adamw::adamw_step(&ts[0], &ts[1], &ts[2], &ts[3], &step)
                .unwrap()
                .unwrap();
            assert!(
                flat(&np)[30_000].is_nan(),
                "{dtype:?}: NaN in input {which}"
            );
            if which != 0 {
                let (fm, fv) = (flat(&nm)[30_000], flat(&nv)[30_000]);
                assert!(fm.is_nan() || which == 3, "{dtype:?} m: {fm}");
                assert!(fv.is_nan() || which == 2, "{dtype:?} v: {fv}");
            }
        }
        let bad = edit(&g, 30_000, |_| f64::NAN);
        assert!(reduce::dot(&bad, &bad).unwrap().unwrap().is_nan());
        assert!(reduce::dot(&p, &bad).unwrap().unwrap().is_nan());
    }
}

/// A model whose tensor `name` has NaN at the flat `indices` (no load check: built from
/// tensors).
fn model_with_nan(
    cfg: &difinfo_trainer::config_json::ModelConfig,
    name: &str,
    indices: &[usize],
    dtype: DType,
) -> Model {
    let mut t: BTreeMap<String, Tensor> = difinfo_trainer::init::random_tensors(cfg, 5).unwrap();
    let mut w = t[name].clone();
    for &i in indices {
        w = edit(&w, i, |_| f64::NAN);
    }
    t.insert(name.to_string(), w);
    let src = std::path::Path::new("<test>");
    Model::from_tensors(cfg.clone(), t, src, dtype, &Device::Cpu).unwrap()
}

/// The model: two NaN entries in one query projection (the case), or one NaN in the
/// final norm's weight, make every log-prob NaN and the query projection's gradient NaN, with
/// whole-layer nodes, separate fused kernels, and plain candle ops (f32, f64, bf16).
#[test]
fn nan_weight_makes_model_log_probs_nan_on_every_path() {
    let seqs = common::two_sequences();
    let q0 = "model.layers.0.self_attn.q_proj.weight";
    let cfg = common::micro_config(Architecture::Llama);
    // The checkpoint had two NaN entries in one q_proj weight.
    for (name, indices) in [(q0, &[5, 301][..]), ("model.norm.weight", &[3][..])] {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            for path in ["whole-layer nodes", "separate kernels", "plain candle ops"] {
                if dtype == DType::BF16 && path != "plain candle ops" {
                    continue;
                }
                let mut m = model_with_nan(&cfg, name, indices, dtype);
                match path {
                    "whole-layer nodes" => m.set_grad_sink(Some(fused::GradSink::default())),
                    "plain candle ops" => m.set_fused_kernels(false),
                    _ => {}
                }
                let b = Batch::from_sequences(&seqs, 2, m.device()).unwrap();
                let lp = m
                    .token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
                    .unwrap();
                // Every scored position (the others are 0 by definition).
                let v = flat(&lp);
                let scored = flat(&b.loss_mask);
                assert!(
                    v.iter().zip(&scored).all(|(x, &s)| s == 0.0 || x.is_nan()),
                    "{name} {dtype:?} {path}: log-probs {v:?}"
                );
                let sums = flat(
                    &m.sequence_logps(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
                        .unwrap(),
                );
                assert!(
                    sums.iter().all(|x| x.is_nan()),
                    "{name} {dtype:?} {path}: {sums:?}"
                );
                if dtype != DType::BF16 {
                    let g = m.backward(&lp.sum_all().unwrap()).unwrap();
                    let (_, var) = m.named_vars().into_iter().find(|(n, _)| n == q0).unwrap();
                    let gq = flat(g.get(var.as_tensor()).unwrap());
                    assert!(
                        gq.iter().any(|x| x.is_nan()),
                        "{name} {dtype:?} {path}: q_proj gradient finite"
                    );
                }
            }
        }
    }
}
