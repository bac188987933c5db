//! The DPO-PG projection (Appendix H).
//!
//! With `g_w = ∇L_w` (chosen NLL) and `g_l = ∇L_l` (rejected NLL) as flat vectors:
//!
//! ```text
//! g = g_w − (⟨g_w, g_l⟩ / ‖g_l‖²) g_l    if ⟨g_w, g_l⟩ > 0     (projection active)
//! g = g_w                                   otherwise
//! ```
//!
//! Then `⟨g, g_w⟩ ≥ 0` (Theorem H.4) and `⟨g, g_l⟩ ≤ 0` (Theorem H.5).
//!
//! Generic over the scalar, so the same code runs in `f64` and exactly over `BigRational`
//! (where the two theorems hold with no tolerance).
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

use crate::error::{same_len, Result};

/// The projected gradient and whether the projection was active.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection<T> {
    /// `g`.
    pub gradient: Vec<T>,
    /// Whether `⟨g_w, g_l⟩ > 0` (and `‖g_l‖ > 0`), i.e. whether `g ≠ g_w`.
    pub active: bool,
    /// `⟨g_w, g_l⟩`.
    pub dot: T,
}

/// `⟨a, b⟩`, summed in order.
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Zero + Clone,
    for<'x> &'x T: Mul<&'x T, Output = T>,
{
    a.iter().zip(b).fold(T::zero(), |acc, (x, y)| acc + x * y)
}

/// The DPO-PG projection of Appendix H.
///
/// # Errors
/// [`crate::Error::LengthMismatch`].
pub fn project<T>(g_w: &[T], g_l: &[T]) -> Result<Projection<T>>
where
    T: Zero + Clone + PartialOrd,
    for<'x> &'x T: Mul<&'x T, Output = T>
        + Sub<&'x T, Output = T>
        + Div<&'x T, Output = T>
        + Add<&'x T, Output = T>,
{
    same_len(g_w.len(), g_l.len())?;
    let d = dot(g_w, g_l);
    let norm2 = dot(g_l, g_l);
    if d > T::zero() && norm2 > T::zero() {
        let k = &d / &norm2;
        let gradient = g_w.iter().zip(g_l).map(|(w, l)| w - &(&k * l)).collect();
        Ok(Projection {
            gradient,
            active: true,
            dot: d,
        })
    } else {
        Ok(Projection {
            gradient: g_w.to_vec(),
            active: false,
            dot: d,
        })
    }
}
