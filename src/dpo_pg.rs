//! The DPO-PG projection (Appendix H), written once over an inner-product space.
//!
//! With `g_w = ∇L_w` (chosen NLL) and `g_l = ∇L_l` (rejected NLL):
//!
//! ```text
//! L_w = −(1/B) Σ_i log π(y_w,i),   L_l = −(1/B) Σ_i log π(y_l,i)          (sequence_nll)
//! g = g_w − (⟨g_w, g_l⟩ / ‖g_l‖²) g_l    if ⟨g_w, g_l⟩ > 0 and ‖g_l‖ > 0    (projection active)
//! g = g_w                                   otherwise
//! ```
//!
//! Then `⟨g, g_w⟩ ≥ 0` (Theorem H.4) and `⟨g, g_l⟩ ≤ 0` (Theorem H.5).
//!
//! [`project`] is generic over [`InnerProduct`]: the library implements it for vectors of
//! `f64` and of `BigRational` (where the two theorems hold with no tolerance), the trainer for
//! its gradient set (every variable's gradient, the inner products and the update run by its
//! fused parallel kernels).
//!
//! Caveat (Corollary H.5.1): the corollary's descent argument uses the batch-*mean* gradients.
//! The batch DPO loss `(1/B) Σ_i ℓ(βΔ_i)` weights each pair's gradient by its own `−ℓ'(βΔ_i)`,
//! so for `B > 1` the projected `g` need not be a descent direction of that loss; for `B = 1` it
//! always is. Counterexample (`proofs/tests/cor_h5_1.rs`, test
//! `cor_h5_1_batch_of_two_counterexample`): softmax logits `θ = log π`, `π = (1, 4, 8)/13`,
//! `π_ref` uniform, `β = 1`, batch `(1 ≻ 0), (2 ≻ 1)`: `⟨∇L_B, g⟩ = −7/1608 < 0`, so the step
//! `θ − ηg` raises the batch DPO loss; with equal per-pair weights the slope is `+25/536`.

use std::ops::{Add, Div, Mul, Sub};

use num_traits::Zero;

use crate::error::{same_len, Error};
use crate::scalar::Real;

/// A vector space with an inner product, as the projection needs it.
pub trait InnerProduct: Clone {
    /// The field of the coefficients (`f64`, `BigRational`).
    type Coef: Clone + PartialOrd + Zero + for<'x> Div<&'x Self::Coef, Output = Self::Coef>;
    /// What an operation can fail with.
    type Error;
    /// `⟨x, y⟩`.
    fn dot(&self, y: &Self) -> Result<Self::Coef, Self::Error>;
    /// `x − k y`.
    fn sub_scaled(&self, y: &Self, k: &Self::Coef) -> Result<Self, Self::Error>;
}

impl<T> InnerProduct for Vec<T>
where
    T: Zero + Clone + PartialOrd + for<'x> Div<&'x T, Output = T>,
    for<'x> &'x T: Mul<&'x T, Output = T> + Sub<&'x T, Output = T> + Add<&'x T, Output = T>,
{
    type Coef = T;
    type Error = Error;

    fn dot(&self, y: &Self) -> Result<T, Error> {
        same_len(self.len(), y.len())?;
        Ok(dot(self, y))
    }

    fn sub_scaled(&self, y: &Self, k: &T) -> Result<Self, Error> {
        same_len(self.len(), y.len())?;
        Ok(self.iter().zip(y).map(|(a, b)| a - &(k * b)).collect())
    }
}

/// The projected gradient and what the projection did.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection<V: InnerProduct> {
    /// `g`.
    pub gradient: V,
    /// Whether `⟨g_w, g_l⟩ > 0` and `‖g_l‖ > 0`, i.e. whether `g ≠ g_w`.
    pub active: bool,
    /// `⟨g_w, g_l⟩`.
    pub dot: V::Coef,
    /// `‖g_l‖²`.
    pub norm_l_sq: V::Coef,
}

/// `⟨a, b⟩`, summed in order.
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Zero + Clone,
    for<'x> &'x T: Mul<&'x T, Output = T>,
{
    a.iter().zip(b).fold(T::zero(), |acc, (x, y)| acc + x * y)
}

/// The DPO-PG projection of Appendix H (formula in the module docs).
///
/// # Errors
/// The space's (vectors of different lengths: [`Error::LengthMismatch`]).
pub fn project<V: InnerProduct>(g_w: &V, g_l: &V) -> Result<Projection<V>, V::Error> {
    let d = g_w.dot(g_l)?;
    let norm_l_sq = g_l.dot(g_l)?;
    let active = d > V::Coef::zero() && norm_l_sq > V::Coef::zero();
    let gradient = if active {
        let k = d.clone() / &norm_l_sq;
        g_w.sub_scaled(g_l, &k)?
    } else {
        g_w.clone()
    };
    Ok(Projection {
        gradient,
        active,
        dot: d,
        norm_l_sq,
    })
}

/// The NLL of a batch of sequences, `−(1/B) Σ_i log π(y_i)` (sequence log-probabilities: sums
/// over completion tokens): the losses `L_w`, `L_l` whose gradients DPO-PG projects.
///
/// # Errors
/// The number type's.
pub fn sequence_nll<S: Real>(logps: &S) -> Result<S, S::Error> {
    logps.mean()?.neg()
}
