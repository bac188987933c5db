//! Shared generators and helpers for the executable proofs of `docs/theory.md`.
//!
//! Every random input of every property comes from a strategy here, so proptest can shrink it
//! and persist it. Domains are bounded by the named constants below; the exact strategies build
//! [`ExactPolicy`] values over big rationals, the float ones [`Policy`] values from logits.
//!
//! Helpers that are not strategies: [`minimize`] (plain gradient descent on the exact population
//! loss) and the rational-arithmetic shorthands.

use num_bigint::BigInt;
use num_traits::{One, Pow, Zero};
use proptest::prelude::*;

use difinfo::objective::Objective;
use difinfo::population::population_loss;
use difinfo::power_law::Exponent;
use difinfo::{ExactPolicy, Policy, Rational};

/// Fewest outcomes of a generated exact policy.
pub const MIN_OUTCOMES: usize = 2;
/// Most outcomes of a generated exact policy.
pub const MAX_OUTCOMES: usize = 12;
/// Weights are `m · 10^e` with `|e| ≤ MAX_DECADE`: masses spanning twenty orders of magnitude.
pub const MAX_DECADE: i32 = 10;
/// Largest mantissa `m` of a generated weight.
pub const MAX_MANTISSA: u32 = 1000;
/// The near-degenerate outcome has weight `10^-DEGENERATE_DECADE` (mass about 1e-30).
pub const DEGENERATE_DECADE: u32 = 30;
/// Integer `β` ranges over `1..=MAX_INT_BETA`.
pub const MAX_INT_BETA: u32 = 4;
/// Rational `β = u/v` has `1 ≤ u ≤ MAX_BETA_NUM`, `1 ≤ v ≤ MAX_BETA_DEN`.
pub const MAX_BETA_NUM: u32 = 4;
/// See [`MAX_BETA_NUM`].
pub const MAX_BETA_DEN: u32 = 3;
/// Base weights `s(y)` of exact-power instances are `a/b` with `1 ≤ a, b ≤ MAX_BASE`.
pub const MAX_BASE: u32 = 12;
/// Most outcomes of a generated float policy (the float statements' large spaces).
pub const MAX_FLOAT_OUTCOMES: usize = 10_000;
/// Logit scales of the float policies: from nearly uniform to nearly one-hot.
pub const LOGIT_SCALES: [f64; 5] = [0.01, 1.0, 10.0, 100.0, 1e4];
/// Outcomes of the optimization statements (exact `O(N²)` population loss, plain descent).
pub const MAX_OPT_OUTCOMES: usize = 8;

/// `n/d` as a big rational.
pub fn rat(n: i64, d: i64) -> Rational {
    Rational::new(n.into(), d.into())
}

/// `10^e` (any sign of `e`) as a big rational.
pub fn pow10(e: i32) -> Rational {
    let p = Pow::pow(&BigInt::from(10), e.unsigned_abs());
    if e >= 0 {
        Rational::from_integer(p)
    } else {
        Rational::new(BigInt::one(), p)
    }
}

/// `x^k` for a rational and a small exponent.
pub fn rpow(x: &Rational, k: u32) -> Rational {
    Pow::pow(x, k)
}

/// One positive weight `m · 10^e`.
pub fn weight() -> impl Strategy<Value = Rational> {
    (1..=MAX_MANTISSA, -MAX_DECADE..=MAX_DECADE)
        .prop_map(|(m, e)| Rational::from_integer(m.into()) * pow10(e))
}

prop_compose! {
    /// `n` positive weights of mixed magnitudes; with probability 1/4 one of them is replaced by
    /// `10^-30` (a near-degenerate outcome).
    pub fn weights(n: usize)(
        mut w in prop::collection::vec(weight(), n),
        degenerate in prop::option::weighted(0.25, 0..n),
    ) -> Vec<Rational> {
        if let Some(i) = degenerate {
            w[i] = pow10(-(DEGENERATE_DECADE as i32));
        }
        w
    }
}

prop_compose! {
    /// A full-support rational policy on `n` outcomes.
    pub fn exact_policy_n(n: usize)(w in weights(n)) -> ExactPolicy {
        ExactPolicy::from_weights(w).expect("positive weights")
    }
}

/// A full-support rational policy on `MIN_OUTCOMES..=MAX_OUTCOMES` outcomes.
pub fn exact_policy() -> impl Strategy<Value = ExactPolicy> {
    (MIN_OUTCOMES..=MAX_OUTCOMES).prop_flat_map(exact_policy_n)
}

/// Two rational policies on one space (`π`, `π_ref`).
pub fn exact_pair() -> impl Strategy<Value = (ExactPolicy, ExactPolicy)> {
    (MIN_OUTCOMES..=MAX_OUTCOMES).prop_flat_map(|n| (exact_policy_n(n), exact_policy_n(n)))
}

/// Three rational policies on one space.
pub fn exact_triple() -> impl Strategy<Value = (ExactPolicy, ExactPolicy, ExactPolicy)> {
    (MIN_OUTCOMES..=MAX_OUTCOMES)
        .prop_flat_map(|n| (exact_policy_n(n), exact_policy_n(n), exact_policy_n(n)))
}

/// An integer `β` in `1..=MAX_INT_BETA`.
pub fn int_beta() -> impl Strategy<Value = u32> {
    1..=MAX_INT_BETA
}

/// A rational `β = u/v`.
pub fn rational_beta() -> impl Strategy<Value = Exponent> {
    (1..=MAX_BETA_NUM, 1..=MAX_BETA_DEN).prop_map(|(u, v)| Exponent::new(u, v).expect("u, v ≥ 1"))
}

/// An instance on which `q_{π*/π_ref}^{u/v}` is rational: `π_ref` is any rational policy and
/// `π*(y) ∝ π_ref(y) · s(y)^v` for base weights `s(y) = a/b`, so `q_{π*/π_ref} ∝ s^v` and
/// `q_{π*/π_ref}^{u/v} ∝ s^u` exactly.
#[derive(Debug, Clone)]
pub struct PowerInstance {
    pub pi_ref: ExactPolicy,
    pub pi_star: ExactPolicy,
    /// `s(y)`.
    pub base: Vec<Rational>,
    pub beta: Exponent,
}

impl PowerInstance {
    /// `p* ∝ s^u`, which equals `q_{π*/π_ref}^β` normalized.
    pub fn p_star(&self) -> ExactPolicy {
        ExactPolicy::from_weights(self.base.iter().map(|s| rpow(s, self.beta.num)).collect())
            .expect("positive")
    }
}

/// Base weights `a/b` of an exact-power instance.
pub fn base_weight() -> impl Strategy<Value = Rational> {
    (1..=MAX_BASE, 1..=MAX_BASE).prop_map(|(a, b)| rat(a.into(), b.into()))
}

/// A [`PowerInstance`] with a rational `β`.
pub fn power_instance() -> impl Strategy<Value = PowerInstance> {
    (MIN_OUTCOMES..=MAX_OUTCOMES).prop_flat_map(|n| {
        (
            exact_policy_n(n),
            prop::collection::vec(base_weight(), n),
            rational_beta(),
        )
            .prop_map(|(pi_ref, base, beta)| {
                let w = pi_ref
                    .probs()
                    .iter()
                    .zip(&base)
                    .map(|(r, s)| r * rpow(s, beta.den))
                    .collect();
                let pi_star = ExactPolicy::from_weights(w).expect("positive");
                PowerInstance {
                    pi_ref,
                    pi_star,
                    base,
                    beta,
                }
            })
    })
}

prop_compose! {
    /// `n` logits `scale · u`, `u ∈ [-1, 1]`.
    pub fn logits_n(n: usize)(
        u in prop::collection::vec(-1.0f64..=1.0, n),
        scale in prop::sample::select(LOGIT_SCALES.to_vec()),
    ) -> Vec<f64> {
        u.into_iter().map(|x| x * scale).collect()
    }
}

/// A float policy `softmax(f)` on `2..=MAX_FLOAT_OUTCOMES` outcomes, logit scale from
/// [`LOGIT_SCALES`].
pub fn float_policy() -> impl Strategy<Value = Policy> {
    (2..=MAX_FLOAT_OUTCOMES)
        .prop_flat_map(logits_n)
        .prop_map(|f| Policy::from_logits(&f).expect("finite logits"))
}

/// Two float policies on one space of `2..=MAX_FLOAT_OUTCOMES` outcomes, logit scales varied
/// independently.
pub fn float_pair() -> impl Strategy<Value = (Policy, Policy)> {
    (2..=MAX_FLOAT_OUTCOMES)
        .prop_flat_map(|n| (logits_n(n), logits_n(n)))
        .prop_map(|(f, g)| {
            (
                Policy::from_logits(&f).expect("finite"),
                Policy::from_logits(&g).expect("finite"),
            )
        })
}

prop_compose! {
    /// Logits on `n` outcomes of moderate scale (`|f| ≤ scale ≤ 1.5`) for the optimization
    /// statements, where conditioning must stay bounded for plain descent to converge.
    pub fn moderate_logits(n: usize)(
        u in prop::collection::vec(-1.0f64..=1.0, n),
        scale in 0.3f64..=1.5,
    ) -> Vec<f64> {
        u.into_iter().map(|x| x * scale).collect()
    }
}

/// Euclidean norm.
pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The result of [`minimize`].
#[derive(Debug, Clone)]
pub struct Minimized {
    /// Final logits.
    pub logits: Vec<f64>,
    /// `‖∇L‖` at the final logits.
    pub grad_norm: f64,
    /// `L` at the final logits.
    pub value: f64,
    /// Iterations used.
    pub iterations: usize,
}

/// Gradient-norm target of the optimization statements (the stopping rule of [`minimize`]).
///
/// Why honest: the population losses minimized here are convex in the logits and strictly
/// convex on the complement of the constant direction (every pair has positive weight), so a
/// gradient norm of 1e-10 puts the logits within `1e-10/μ` of the optimum (`μ` the smallest
/// nonzero Hessian eigenvalue). Rather than trusting a bound on `μ`, every statement compares the
/// result with its closed-form limit (`π*`, the DID, `q_{p_w/p_l}`, …) and asserts JS < 1e-11
/// directly: a JS that small means log-probabilities agree to ~1e-5 or better.
pub const GRAD_TOL: f64 = 1e-10;
/// Iteration cap of [`minimize`] (reached only if a generated instance is ill-conditioned, which
/// the property then reports as a failure).
pub const MAX_ITERS: usize = 400_000;

/// First-order minimization of the exact population loss from logits `f0` with step `η`
/// (`η ≤ 1/L`, `L` the Lipschitz constant of the gradient), until `‖∇L‖ < GRAD_TOL` or
/// `MAX_ITERS`: Nesterov's accelerated gradient with adaptive (gradient) restart — no Hessian, no
/// line search.
///
/// # Formula
/// `y = x_k + (k−1)/(k+2) (x_k − x_{k−1})`, `x_{k+1} = y − η ∇L(y)`; the momentum restarts
/// (`k ← 1`) whenever `⟨∇L(y), x_{k+1} − x_k⟩ > 0` (O'Donoghue & Candès 2015).
///
/// Why accelerated: plain descent needs `O(κ log 1/ε)` steps, and near-degenerate rejected
/// distributions (an outcome of mass ~1e-6 under `π_l`) give condition numbers `κ ~ 10^6`; the
/// shrunk instance in `thm_3_4_b_ill_conditioned_instance_converges` stalled plain descent at
/// `‖∇L‖ ≈ 1e-7` after 400,000 steps. Acceleration needs `O(√κ log 1/ε)`.
pub fn minimize(
    f0: &[f64],
    chosen: &Policy,
    rejected: &Policy,
    reference: Option<&Policy>,
    objective: &Objective,
    step: f64,
) -> Minimized {
    let eval =
        |f: &[f64]| population_loss(f, chosen, rejected, reference, objective).expect("loss");
    let mut x = f0.to_vec();
    let mut x_prev = x.clone();
    let mut cur = eval(&x);
    let mut k = 1usize;
    let mut it = 0;
    while it < MAX_ITERS && norm(&cur.grad_logits) >= GRAD_TOL {
        let mom = (k as f64 - 1.0) / (k as f64 + 2.0);
        let y: Vec<f64> = x
            .iter()
            .zip(&x_prev)
            .map(|(a, b)| a + mom * (a - b))
            .collect();
        let gy = eval(&y).grad_logits;
        let x_new: Vec<f64> = y.iter().zip(&gy).map(|(a, g)| a - step * g).collect();
        let uphill: f64 = gy
            .iter()
            .zip(x_new.iter().zip(&x))
            .map(|(g, (n, o))| g * (n - o))
            .sum();
        if uphill > 0.0 {
            k = 1; // restart: drop the momentum, keep the iterate
            x_prev = x.clone();
        } else {
            k += 1;
            x_prev = std::mem::replace(&mut x, x_new);
            cur = eval(&x);
        }
        it += 1;
    }
    Minimized {
        grad_norm: norm(&cur.grad_logits),
        value: cur.value,
        logits: x,
        iterations: it,
    }
}

/// `Σ_i a_i b_i` over rationals.
pub fn rdot(a: &[Rational], b: &[Rational]) -> Rational {
    a.iter()
        .zip(b)
        .fold(Rational::zero(), |acc, (x, y)| acc + x * y)
}

/// Whether every entry is zero.
pub fn all_zero(v: &[Rational]) -> bool {
    v.iter().all(|x| x.is_zero())
}

/// Seed of the deterministic searches ([`search`]) and of the statistical properties, so that a
/// test that passes because a counterexample exists, or one with a 4-stderr band, is
/// reproducible run to run.
pub const SEARCH_SEED: u64 = 0x00D1_F1F0;

/// Run `cases` proptest-generated values of `strategy` (fixed seed [`SEARCH_SEED`]) and return
/// those for which `check` returns `Ok(true)`: a search for witnesses, e.g. counterexamples.
/// `check` may also fail (with `prop_assert!`), which fails the search with proptest's shrinking.
pub fn search<S, F>(cases: u32, strategy: S, check: F) -> Vec<S::Value>
where
    S: Strategy,
    S::Value: Clone,
    F: Fn(&S::Value) -> Result<bool, TestCaseError>,
{
    use proptest::test_runner::{Config, RngSeed, TestRunner};
    use std::cell::RefCell;
    let found = RefCell::new(Vec::new());
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(SEARCH_SEED),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
        if check(&v)? {
            found.borrow_mut().push(v);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("search failed: {e}");
    }
    found.into_inner()
}

/// A proptest config with `cases` cases whose failures persist to
/// `proofs/proptest-regressions/<file>.txt` (the default source-parallel persistence cannot find a
/// `lib.rs` beside integration tests and would silently drop them).
///
/// The environment variable `PROOFS_CASE_SCALE` (a positive integer, default 1) multiplies every
/// case count, for an occasional stress run: `PROOFS_CASE_SCALE=20 cargo test -p difinfo-proofs
/// --release`.
pub fn config(cases: u32, file: &'static str) -> ProptestConfig {
    let scale = std::env::var("PROOFS_CASE_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&s| s >= 1)
        .unwrap_or(1);
    ProptestConfig {
        cases: cases.saturating_mul(scale),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(file),
        )),
        ..ProptestConfig::default()
    }
}

/// Weights of the exhaustive small-space enumerations: two ordinary ones and a near-degenerate one.
pub fn small_weights() -> Vec<Rational> {
    vec![rat(1, 1), rat(3, 1), pow10(-(DEGENERATE_DECADE as i32))]
}

/// Every policy on `n` outcomes whose weights are drawn from [`small_weights`] (with repetition;
/// proportional weight vectors give the same policy and are kept once).
pub fn all_small_policies(n: usize) -> Vec<ExactPolicy> {
    let w = small_weights();
    let mut out: Vec<ExactPolicy> = Vec::new();
    let total = w.len().pow(n as u32);
    for mut code in 0..total {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(w[code % w.len()].clone());
            code /= w.len();
        }
        let p = ExactPolicy::from_weights(v).expect("positive");
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The README's code blocks, run as doctests (`cargo test --doc`): a Rust block a user would
/// paste compiles, runs and asserts what its comments claim (shell blocks are not run).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
