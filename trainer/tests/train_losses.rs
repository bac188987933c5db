//! The trainer's tensor losses and projection equal the `difinfo` library's formulas.

use candle_core::{DType, Device, Tensor};
use difinfo::loss::LossShape;
use difinfo_trainer::train::grads::{project, Grads};
use difinfo_trainer::train::objective::{preference_logps, preference_loss};
use difinfo_trainer::train::SeqLogps;
use proptest::prelude::*;

/// Log-probs of whole sequences: bounded like real ones (tens of tokens at ≥ −20 nats each).
const LOGP_MIN: f64 = -200.0;
/// Tolerance of f64 tensor arithmetic against the library's f64 (a few ulps of values ≤ 1e4).
const TOL_F64: f64 = 1e-9;
/// Tolerance of f32 tensor arithmetic, relative.
const TOL_F32_REL: f64 = 1e-4;

/// `(chosen, rejected, ref chosen, ref rejected, chosen counts, rejected counts)`, each `[B]`.
type Batch = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn shape() -> impl Strategy<Value = LossShape> {
    prop_oneof![
        Just(LossShape::Sigmoid),
        Just(LossShape::Hinge),
        Just(LossShape::Ipo)
    ]
}

prop_compose! {
    fn batch()(b in 1usize..6)(
        chosen in prop::collection::vec(LOGP_MIN..0.0, b),
        rejected in prop::collection::vec(LOGP_MIN..0.0, b),
        ref_chosen in prop::collection::vec(LOGP_MIN..0.0, b),
        ref_rejected in prop::collection::vec(LOGP_MIN..0.0, b),
        counts_c in prop::collection::vec(1usize..40, b),
        counts_r in prop::collection::vec(1usize..40, b),
    ) -> Batch {
        let f = |v: Vec<usize>| v.into_iter().map(|x| x as f64).collect();
        (chosen, rejected, ref_chosen, ref_rejected, f(counts_c), f(counts_r))
    }
}

fn t(v: &[f64], dt: DType) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// The library's batch loss: `(1/B) Σ ℓ(β h_i)`, `h` from sums or (IPO) per-token means;
/// label-smoothed (`eps > 0`, sigmoid) by `difinfo::loss::label_smoothed_sigmoid`.
fn library_loss(shape: LossShape, beta: f64, eps: f64, data: &Batch, with_ref: bool) -> f64 {
    let (c, r, rc, rr, nc, nr) = data;
    let b = c.len();
    let mut s = 0.0;
    for i in 0..b {
        let (wc, wr) = if shape == LossShape::Ipo {
            (nc[i], nr[i])
        } else {
            (1.0, 1.0)
        };
        let mut h = c[i] / wc - r[i] / wr;
        if with_ref {
            h -= rc[i] / wc - rr[i] / wr;
        }
        s += if shape == LossShape::Sigmoid {
            difinfo::loss::label_smoothed_sigmoid(beta * h, eps)
        } else {
            shape.value(beta * h, beta)
        };
    }
    s / b as f64
}

fn tensor_loss(
    shape: LossShape,
    beta: f64,
    eps: f64,
    data: &Batch,
    with_ref: bool,
    dt: DType,
) -> f64 {
    let (c, r, rc, rr, nc, nr) = data;
    let sc = SeqLogps {
        sum: t(c, dt),
        count: t(nc, dt),
    };
    let sr = SeqLogps {
        sum: t(r, dt),
        count: t(nr, dt),
    };
    let pc = preference_logps(shape, &sc).unwrap();
    let pr = preference_logps(shape, &sr).unwrap();
    let norm = |x: &[f64], n: &[f64]| -> Vec<f64> {
        x.iter()
            .zip(n)
            .map(|(a, b)| if shape == LossShape::Ipo { a / b } else { *a })
            .collect()
    };
    let (trc, trr) = (t(&norm(rc, nc), dt), t(&norm(rr, nr), dt));
    let out = if with_ref {
        preference_loss(shape, beta, eps, &pc, &pr, Some(&trc), Some(&trr)).unwrap()
    } else {
        preference_loss(shape, beta, eps, &pc, &pr, None, None).unwrap()
    };
    out.metrics().unwrap().loss
}

proptest! {
    /// DPO and reference-free losses (sigmoid, label-smoothed sigmoid, hinge, IPO) equal the
    /// library's `LossShape::value` / `label_smoothed_sigmoid` in f64.
    #[test]
    fn tensor_loss_equals_library_loss(shape in shape(), beta in 0.01f64..2.0, smooth in prop_oneof![Just(0.0), 0.0f64..=0.5], data in batch(), with_ref in any::<bool>()) {
        let eps = if shape == LossShape::Sigmoid { smooth } else { 0.0 };
        let want = library_loss(shape, beta, eps, &data, with_ref);
        let got = tensor_loss(shape, beta, eps, &data, with_ref, DType::F64);
        prop_assert!((got - want).abs() <= TOL_F64 * (1.0 + want.abs()), "{shape:?} β={beta} ε={eps}: {got} vs {want}");
        let got32 = tensor_loss(shape, beta, eps, &data, with_ref, DType::F32);
        prop_assert!((got32 - want).abs() <= TOL_F32_REL * (1.0 + want.abs()) * (1.0 + (LOGP_MIN * beta).abs()),
            "f32 {shape:?} β={beta}: {got32} vs {want}");
    }

    /// The gradient of the tensor loss in `log π(y_w)` equals `(1/B) ℓ'(β h) β` (÷ count for IPO).
    #[test]
    fn tensor_loss_gradient_equals_library_derivative(shape in shape(), beta in 0.05f64..2.0, data in batch()) {
        let (c, r, rc, rr, nc, nr) = &data;
        let var = candle_core::Var::from_tensor(&t(c, DType::F64)).unwrap();
        let sc = SeqLogps { sum: var.as_tensor().clone(), count: t(nc, DType::F64) };
        let sr = SeqLogps { sum: t(r, DType::F64), count: t(nr, DType::F64) };
        let pc = preference_logps(shape, &sc).unwrap();
        let pr = preference_logps(shape, &sr).unwrap();
        let w = |i: usize, n: &[f64]| if shape == LossShape::Ipo { n[i] } else { 1.0 };
        let trc: Vec<f64> = (0..c.len()).map(|i| rc[i] / w(i, nc)).collect();
        let trr: Vec<f64> = (0..c.len()).map(|i| rr[i] / w(i, nr)).collect();
        let out = preference_loss(shape, beta, 0.0, &pc, &pr, Some(&t(&trc, DType::F64)), Some(&t(&trr, DType::F64))).unwrap();
        let g = out.loss.backward().unwrap();
        let got = g.get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let b = c.len() as f64;
        for i in 0..c.len() {
            let h = (c[i] - rc[i]) / w(i, nc) - (r[i] - rr[i]) / w(i, nr);
            let d = beta * h;
            // The hinge's kink: skip exact ties (measure zero).
            if shape == LossShape::Hinge && (d - 1.0).abs() < 1e-9 { continue; }
            let want = shape.derivative(d, beta) * beta / w(i, nc) / b;
            prop_assert!((got[i] - want).abs() <= 1e-9 * (1.0 + want.abs()), "{shape:?} i={i}: {} vs {want}", got[i]);
        }
    }

    /// The projection over all variables equals `difinfo::dpo_pg::project` on the
    /// concatenated vectors (in f64), including whether it was active.
    #[test]
    fn projection_equals_library_projection(
        sizes in prop::collection::vec(1usize..6, 1..5),
        seed_w in prop::collection::vec(-1.0f64..1.0, 30),
        seed_l in prop::collection::vec(-1.0f64..1.0, 30),
        flip in any::<bool>(),
    ) {
        let total: usize = sizes.iter().sum();
        let gw: Vec<f64> = (0..total).map(|i| seed_w[i % 30] * (1.0 + i as f64 / 7.0)).collect();
        let gl: Vec<f64> = (0..total).map(|i| if flip { -gw[i] * 0.5 + seed_l[i % 30] * 0.1 } else { seed_l[i % 30] }).collect();
        let split = |v: &[f64]| -> Grads {
            let mut off = 0;
            Grads(sizes.iter().map(|&s| { let x = t(&v[off..off + s], DType::F64); off += s; x }).collect())
        };
        let (g, stats) = project(&split(&gw), &split(&gl)).unwrap();
        let lib = difinfo::dpo_pg::project::<f64>(&gw, &gl).unwrap();
        let flat: Vec<f64> = g.0.iter().flat_map(|x| x.to_vec1::<f64>().unwrap()).collect();
        prop_assert_eq!(stats.active, lib.active);
        prop_assert!((stats.dot - lib.dot).abs() <= 1e-12 * (1.0 + lib.dot.abs()));
        for (a, b) in flat.iter().zip(&lib.gradient) {
            prop_assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // Theorems H.4 and H.5 on the trainer's output.
        let gg = Grads(g.0.clone());
        prop_assert!(gg.dot(&split(&gw)).unwrap() >= -1e-12);
        prop_assert!(gg.dot(&split(&gl)).unwrap() <= 1e-12);
    }
}

/// A hand-checked case: equal log-ratio margins give the loss at 0.
#[test]
fn zero_margin_values() {
    let z = t(&[-3.0, -5.0], DType::F64);
    for (shape, want) in [
        (LossShape::Sigmoid, std::f64::consts::LN_2),
        (LossShape::Hinge, 1.0),
        (LossShape::Ipo, 25.0),
    ] {
        let out = preference_loss(shape, 0.1, 0.0, &z, &z, Some(&z), Some(&z)).unwrap();
        let m = out.metrics().unwrap();
        assert!((m.loss - want).abs() < 1e-12, "{shape:?}: {}", m.loss);
        assert_eq!(m.rewards_margins, 0.0);
        assert_eq!(m.rewards_accuracies, 0.0);
    }
}
