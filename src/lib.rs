//! # difinfo — differential information, executable
//!
//! The finite-outcome-space theory of *Differential Information: An Information-Theoretic
//! Perspective on Preference Optimization*, as code. Every formula lives in the module named
//! after its concept in `docs/theory.md`:
//!
//! | concept | module |
//! |---|---|
//! | policies with full support and unit mass (float and exact) | [`policy`] |
//! | log-sum-exp, sigmoid and friends (the log-space primitives) | [`logspace`] |
//! | the vectorized loops under them (instruction-set dispatch, lane sums, polynomial `exp`) | [`simd`] |
//! | the DID `q_{π/π_ref}` and the Lemma D.1 event (Theorem 3.2) | [`did`] |
//! | Bradley–Terry, Boltzmann, the data's preference distribution | [`preference`] |
//! | the number types every formula is written over (`f64`, rationals, dual numbers) | [`scalar`] |
//! | β, the scale of the rewards and of Eq. 1, validated once | [`beta`] |
//! | the one objective type: rule, TRL's loss types and weights, β, ε, f-divergence | [`objective`] |
//! | rewards: log-ratio, reference-free, f-divergence scores | [`reward`] |
//! | every TRL loss type, written once over any number type | [`loss`] |
//! | the exact population loss (and the sampled-batch loss) with its gradient | [`population`] |
//! | closed-form population optima of the loss types (IPO, two-outcome margins) | [`fixed_points`] |
//! | power law and log-margin ordering (Theorem 3.5, Appendix G) | [`power_law`] |
//! | the ideal rejected distribution (Eq. 1, Theorem L.1) | [`rejected`] |
//! | entropy, KL, JS and the Monte Carlo entropy (Section 4, Appendix K) | [`entropy`] |
//! | ordinary least squares in closed form | [`fit`] |
//! | β fit and β-accuracy (Appendix K.1) | [`beta_accuracy`] |
//! | the DPO-PG projection (Appendix H) | [`dpo_pg`] |
//! | the synthetic energy-based experiments (Sections 3.5 and 4) | [`synthetic`] |
//!
//! Two arithmetics share these concepts: **exact** rationals ([`ExactPolicy`], `BigRational`)
//! wherever a statement is algebraic, and `f64` in log space ([`Policy`]) elsewhere.
//!
//! ```
//! use difinfo::{Policy, did::did, entropy::entropy};
//! let pi_ref = Policy::from_probs(&[0.5, 0.3, 0.2])?;
//! let pi = Policy::from_probs(&[0.7, 0.2, 0.1])?;
//! let q = did(&pi, &pi_ref)?;            // q_{π/π_ref}(y) ∝ π(y)/π_ref(y)
//! assert!(entropy(&q) < entropy(&pi_ref)); // a reinforcing π has a low-entropy DID here
//! # Ok::<(), difinfo::Error>(())
//! ```

pub mod beta;
pub mod beta_accuracy;
pub mod did;
pub mod dpo_pg;
pub mod entropy;
pub mod error;
pub mod fit;
pub mod fixed_points;
#[cfg(feature = "plot")]
pub mod font;
pub mod logspace;
pub mod loss;
pub mod objective;
pub mod policy;
pub mod population;
pub mod power_law;
pub mod prec;
pub mod preference;
pub mod rejected;
pub mod reward;
pub mod scalar;
pub mod simd;
#[cfg(feature = "synth")]
pub mod synthetic;

pub use error::{Error, Result};

/// The top-level README's code blocks, run as doctests (`cargo test --doc`): every Rust block a
/// user would paste compiles, runs and asserts what its comments claim.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use policy::{ExactPolicy, Policy};

/// Arbitrary-precision rational used by the exact arithmetic.
pub type Rational = num_rational::BigRational;
