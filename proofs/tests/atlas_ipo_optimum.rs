//! Loss atlas, IPO on `N` outcomes: the population optimum is the closed form of
//! `difinfo::fixed_points::ipo_log_ratio`, it is unique up to the constant that normalization
//! fixes, and (being rational in the data) it is not `π*`.
//!
//! ```text
//! L(u) = Σ_a Σ_b w_a v_b (u_a − u_b − 1/(2β))²        (IPO's population loss, length 1)
//! u*_k = (c (w_k − v_k) + v_k D)/(w_k + v_k),   c = 1/(2β),
//! D = −c Σ v_k (w_k − v_k)/(w_k + v_k) / Σ v_k²/(w_k + v_k)
//! ```
//!
//! Exact over big rationals: the gradient is the library's IPO text (`difinfo::loss::ipo`)
//! evaluated over dual numbers of rationals, summed over all pairs; `β` is dyadic (`f64`
//! coefficients are exact rationals).

use difinfo::fixed_points::ipo_log_ratio;
use difinfo::loss::ipo;
use difinfo::reward::Side;
use difinfo::scalar::{infallible, Dual};
use difinfo::{ExactPolicy, Rational};
use difinfo_proofs::*;
use num_traits::{One, Zero};
use proptest::prelude::*;

type D = Dual<Rational, 2>;

/// A side whose log-ratio (and score, reverse KL) is `u`, the input `var` of the duals.
fn side(u: &Rational, var: usize) -> Side<D> {
    let x = D::variable(u.clone(), var);
    Side {
        logps: x.clone(),
        ref_logps: None,
        logratio: x.clone(),
        score: x,
        len: D::constant(Rational::one()),
        nll_logps: None,
        weight: None,
    }
}

/// `L(u)` and `∂L/∂u` through the library's IPO text.
fn loss_and_gradient(
    w: &[Rational],
    v: &[Rational],
    u: &[Rational],
    beta: f64,
) -> (Rational, Vec<Rational>) {
    let n = u.len();
    let mut value = Rational::zero();
    let mut g = vec![Rational::zero(); n];
    for a in 0..n {
        for b in 0..n {
            let l = infallible(ipo(&side(&u[a], 0), &side(&u[b], 1), beta));
            let m = &w[a] * &v[b];
            value += &m * &l.v;
            g[a] += &m * &l.d[0];
            g[b] += &m * &l.d[1];
        }
    }
    (value, g)
}

/// Dyadic `β ∈ {1/8, 1/4, 1/2, 1, 2, 4}`.
fn dyadic_beta() -> impl Strategy<Value = f64> {
    (-3i32..=2).prop_map(|e| 2f64.powi(e))
}

proptest! {
    #![proptest_config(config(32, "proptest-regressions/atlas_ipo_optimum.txt"))]

    /// `∇L(u*) = 0` exactly.
    #[test]
    fn atlas_ipo_closed_form_is_stationary((w, v) in exact_pair(), beta in dyadic_beta()) {
        let (w, v) = (w.probs().to_vec(), v.probs().to_vec());
        let u = infallible(ipo_log_ratio(&w, &v, beta));
        let (_, g) = loss_and_gradient(&w, &v, &u, beta);
        prop_assert!(all_zero(&g), "∇L(u*) = {g:?}");
    }

    /// `L(u* + δ) > L(u*)` for every non-constant `δ`, and `= L(u*)` for a constant shift: the
    /// optimum is unique up to normalization (a weighted Laplacian of a connected graph).
    #[test]
    fn atlas_ipo_optimum_is_unique(
        (w, v) in exact_pair(),
        beta in dyadic_beta(),
        delta in prop::collection::vec((-9i64..=9, 1i64..=5), MAX_OUTCOMES),
        shift in (-9i64..=9, 1i64..=5),
    ) {
        let (w, v) = (w.probs().to_vec(), v.probs().to_vec());
        let n = w.len();
        let u = infallible(ipo_log_ratio(&w, &v, beta));
        let (at, _) = loss_and_gradient(&w, &v, &u, beta);
        let d: Vec<Rational> = delta[..n].iter().map(|&(a, b)| rat(a, b)).collect();
        let moved: Vec<Rational> = u.iter().zip(&d).map(|(x, y)| x + y).collect();
        let (there, _) = loss_and_gradient(&w, &v, &moved, beta);
        if d.iter().all(|x| *x == d[0]) {
            prop_assert_eq!(&there, &at);
        } else {
            prop_assert!(there > at);
        }
        let s = rat(shift.0, shift.1);
        let shifted: Vec<Rational> = u.iter().map(|x| x + &s).collect();
        prop_assert_eq!(loss_and_gradient(&w, &v, &shifted, beta).0, at);
    }
}

/// With the data of Eq. 1 on two outcomes (`p = 0.9`), IPO's optimal margin `(2p − 1)/(2β)`
/// is not `π*`'s `logit(p)/β`: a pinned instance, exact.
#[test]
fn atlas_ipo_optimum_is_not_the_target() {
    let w = ExactPolicy::from_probs(vec![rat(9, 10), rat(1, 10)]).unwrap();
    let v = ExactPolicy::from_probs(vec![rat(1, 2), rat(1, 2)]).unwrap();
    let u = infallible(ipo_log_ratio(w.probs(), v.probs(), 0.5));
    // Δ* = u0 − u1 = (2·(9/10·1/2)/(9/20 + 1/20) − 1)/(2·1/2) = 0.8.
    assert_eq!(&u[0] - &u[1], rat(4, 5));
    // π* has margin logit(0.9)/β = 2 ln 9 ≈ 4.39, irrational: not 4/5.
}
