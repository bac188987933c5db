//! Claim 4.1 (qualitative): if `π` reinforces `π_ref`, the DID `q_{π/π_ref}` has low entropy,
//! `H(q) < H(π_ref)`; if `π` smooths `π_ref`, high entropy, `H(q) > H(π_ref)`.
//!
//! A claim, not a theorem: these properties map where it holds in the tempered EBM
//! `π_ref = softmax(f)`, `π = softmax(f/τ)`, where `q = softmax(κ f)` with `κ = 1/τ − 1`, and
//! `H(softmax(κ f))` is strictly decreasing in `|κ|` on each side of 0
//! (`dH/dκ = −κ Var_{softmax(κf)}(f)`, nonzero for non-constant `f`). Hence, exactly:
//!
//! - reinforcing (`τ < 1`, `κ > 0`): the claim holds **iff** `κ > 1`, i.e. `τ < 1/2`, for every
//!   non-constant `f` and every logit scale; for `1/2 < τ < 1` (reinforcing but close to 1) it
//!   **fails**: the DID is flatter than `π_ref`;
//! - smoothing (`τ > 1`, `−1 < κ < 0`): it holds near `τ = 1` (the DID tends to uniform), for every
//!   `τ > 1` when `H(softmax(−f)) ≥ H(softmax(f))`, and it **fails** for large `τ` on skewed
//!   logits (one outcome far below the rest: `softmax(−f)` concentrates on it).
//!
//! Tolerance: entropies are compared only where the exact difference exceeds 1e-9 (the instances
//! keep `|κ − 1| ≥ 0.2` and a logit gap ≥ 0.2, giving differences ≥ 1e-4), far above the float
//! rounding of an entropy over ≤ 10^4 outcomes (~1e-12).

use difinfo::did::did;
use difinfo::entropy::entropy;
use difinfo::Policy;
use difinfo_proofs::*;
use proptest::prelude::*;

/// Logits with a guaranteed gap (`f[0] − f[1] = 2·scale`), so `f` is not constant.
fn tempered_logits() -> impl Strategy<Value = Vec<f64>> {
    (2usize..=1000, 0.1f64..=5.0).prop_flat_map(|(n, scale)| {
        prop::collection::vec(-1.0f64..=1.0, n).prop_map(move |u| {
            let mut f: Vec<f64> = u.iter().map(|x| x * scale).collect();
            f[0] = scale;
            f[1] = -scale;
            f
        })
    })
}

/// `(H(q_{π/π_ref}), H(π_ref))` for `π_ref = softmax(f)`, `π = softmax(f/τ)`.
fn entropies(f: &[f64], tau: f64) -> (f64, f64) {
    let pi_ref = Policy::from_logits(f).unwrap();
    let pi = Policy::from_logits(&f.iter().map(|x| x / tau).collect::<Vec<_>>()).unwrap();
    (entropy(&did(&pi, &pi_ref).unwrap()), entropy(&pi_ref))
}

proptest! {
    #![proptest_config(config(256, "proptest-regressions/claim_4_1.txt"))]

    /// Reinforcing far from 1 (`τ ≤ 0.4`): low-entropy DID, as claimed.
    #[test]
    fn claim_4_1_holds_for_strong_reinforcement(f in tempered_logits(), tau in 0.05f64..=0.4) {
        let (h_q, h_ref) = entropies(&f, tau);
        prop_assert!(h_q < h_ref, "H(q) {} H(π_ref) {}", h_q, h_ref);
    }

    /// The failure regime: reinforcing but close to 1 (`0.6 ≤ τ < 1`): the DID is **flatter** than
    /// `π_ref`, against the claim.
    #[test]
    fn claim_4_1_fails_for_weak_reinforcement_near_tau_one(f in tempered_logits(), tau in 0.6f64..0.999) {
        let (h_q, h_ref) = entropies(&f, tau);
        prop_assert!(h_q > h_ref, "H(q) {} H(π_ref) {}", h_q, h_ref);
    }

    /// Smoothing near 1: with `KL(q ‖ uniform) ≤ |κ| · range(f)`, the claim holds once
    /// `|κ| · range(f) < log N − H(π_ref)`; `τ` is drawn inside that range.
    #[test]
    fn claim_4_1_holds_for_smoothing_near_tau_one(f in tempered_logits(), frac in 0.01f64..0.9) {
        let pi_ref = Policy::from_logits(&f).unwrap();
        let gap = (f.len() as f64).ln() - entropy(&pi_ref);
        let range = f.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - f.iter().cloned().fold(f64::INFINITY, f64::min);
        let kappa = frac * gap / range; // |κ| = 1 − 1/τ
        prop_assume!(kappa < 1.0 && gap > 1e-6);
        let tau = 1.0 / (1.0 - kappa);
        let (h_q, h_ref) = entropies(&f, tau);
        prop_assert!(h_q > h_ref, "τ {} H(q) {} H(π_ref) {}", tau, h_q, h_ref);
    }

    /// Smoothing for every `τ > 1` when `f` is symmetric (`−f` is a permutation of `f`, so
    /// `H(softmax(−f)) = H(softmax(f))` and monotonicity in `|κ| < 1` gives `H(q) > H(π_ref)`).
    #[test]
    fn claim_4_1_holds_for_smoothing_of_symmetric_logits(
        half in prop::collection::vec(-5.0f64..=5.0, 1..=500),
        tau in 1.05f64..=100.0,
    ) {
        let mut f: Vec<f64> = half.iter().map(|x| x.abs() + 0.1).collect();
        f.extend(half.iter().map(|x| -(x.abs() + 0.1)));
        let (h_q, h_ref) = entropies(&f, tau);
        prop_assert!(h_q > h_ref, "τ {} H(q) {} H(π_ref) {}", tau, h_q, h_ref);
    }

    /// The second failure regime: strong smoothing (`τ ≥ 5`) of skewed logits, one outcome `s ≥ 8`
    /// below the rest: `π_ref` is near-uniform on the other `n − 1 ≥ 2` outcomes
    /// (`H ≥ log 2 − o(1)`), while `q ∝ e^{|κ| s}` on that outcome with `|κ| s ≥ 6.4` and
    /// `n ≤ 50` puts mass ≥ 0.92 there.
    #[test]
    fn claim_4_1_fails_for_strong_smoothing_of_skewed_logits(
        n in 3usize..=50, s in 8.0f64..=20.0, tau in 5.0f64..=50.0,
    ) {
        let mut f = vec![0.0; n];
        f[0] = -s;
        let (h_q, h_ref) = entropies(&f, tau);
        prop_assert!(h_q < h_ref, "H(q) {} H(π_ref) {}", h_q, h_ref);
    }
}

/// The exact boundary of the reinforcing side, `τ = 1/2` (`κ = 1`): `q = π_ref`, equal entropies;
/// just below it the claim holds, just above it fails.
#[test]
fn claim_4_1_reinforcing_boundary_is_tau_one_half() {
    let f = [2.0, -1.0, 0.5, 0.0, -3.0];
    let (h_q, h_ref) = entropies(&f, 0.5);
    assert!((h_q - h_ref).abs() < 1e-12);
    let (lo, _) = entropies(&f, 0.45);
    let (hi, _) = entropies(&f, 0.55);
    assert!(lo < h_ref && hi > h_ref);
}

/// Explicit smoothing counterexample: `f = (−10, 0, …, 0)` on 10 outcomes, `τ = 10`.
#[test]
fn claim_4_1_smoothing_counterexample() {
    let mut f = vec![0.0; 10];
    f[0] = -10.0;
    let (h_q, h_ref) = entropies(&f, 10.0);
    assert!(h_ref > 2.19 && h_q < 0.02, "H(q) {h_q} H(π_ref) {h_ref}");
}
