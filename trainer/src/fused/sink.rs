//! Where weight gradients go that a node computes for tensors other than its inputs (candle
//! carries gradients only for a custom op's inputs): a [`GradSink`] holds them until the
//! caller adds them to the backward pass's store, `store[var] += Σ pending(var)`.
//!
//! Public type: [`GradSink`].

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{InPlace, InPlaceKernel, Ins, MIN_ELEMS_PER_TASK};
use super::real::Real;

/// Weight gradients computed by [`super::decoder_layer`] nodes (and the embedding and LM-head
/// nodes) during a backward pass, waiting to be
/// added to that pass's [`GradStore`].
///
/// Use: [`GradSink::clear`], `loss.backward()`, [`GradSink::drain_into`] the returned store.
/// A forward pass whose backward never runs leaves nothing here.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "GradSink({n} pending)")
    }
}

impl GradSink {
    /// Forgets pending gradients (of a backward pass that was not drained).
    pub fn clear(&self) {
        if let Ok(mut v) = self.0.lock() {
            v.clear();
        }
    }

    /// Adds a pending gradient `grad` of `var`.
    ///
    /// # Errors
    /// A poisoned lock.
    pub fn push(&self, var: &Tensor, grad: Tensor) -> Result<()> {
        match self.0.lock() {
            Ok(mut v) => {
                v.push((var.clone(), grad));
                Ok(())
            }
            Err(_) => bail!("decoder layer: gradient sink poisoned"),
        }
    }

    /// The pending gradient of `var` (the first, if several), if any.
    pub(super) fn pending(&self, var: &Tensor) -> Option<Tensor> {
        let v = self.0.lock().ok()?;
        v.iter()
            .find(|(x, _)| x.id() == var.id())
            .map(|(_, g)| g.clone())
    }

    /// Adds the pending gradients to `store` (summing with any gradient already there, as
    /// candle does for a variable used twice) and empties the sink.
    ///
    /// # Errors
    /// Shape mismatches (a gradient not of its variable's shape); a poisoned lock.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        let pending = match self.0.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => bail!("decoder layer: gradient sink poisoned"),
        };
        // Gradients of one variable from several nodes (a tied embedding's lookup and LM
        // head) are summed into the first: the sink's tensors are the nodes' own, so the sum
        // can be written in place (no third table-sized buffer).
        let mut merged: Vec<(Tensor, Tensor)> = Vec::with_capacity(pending.len());
        for (var, g) in pending {
            match merged.iter_mut().find(|(v, _)| v.id() == var.id()) {
                Some((_, acc)) => {
                    if !add_in_place(acc, &g)? {
                        *acc = (&*acc + &g)?;
                    }
                }
                None => merged.push((var, g)),
            }
        }
        for (var, g) in merged {
            let sum = match store.get(&var) {
                Some(old) => (old + &g)?,
                None => g,
            };
            store.insert(&var, sum);
        }
        Ok(())
    }
}

/// `dst += src` in place (contiguous f32/f64 CPU tensors of one shape, distinct storage); false
/// (nothing done) otherwise.
fn add_in_place(dst: &Tensor, src: &Tensor) -> Result<bool> {
    let ok = |t: &Tensor| {
        super::enabled(t) && t.dtype() == dst.dtype() && t.layout().contiguous_offsets().is_some()
    };
    if !(ok(dst) && ok(src) && dst.shape() == src.shape()) {
        return Ok(false);
    }
    // candle refuses (before writing anything) when the two share storage.
    Ok(dst.inplace_op2(src, &InPlace(AddAssign)).is_ok())
}

/// `dst += src` (see [`add_in_place`]).
struct AddAssign;

impl InPlaceKernel for AddAssign {
    const NAME: &'static str = "fused-add-assign";

    fn cpu<T: Real>(&self, d: &mut [T], _shape: &Shape, srcs: &Ins<'_>) -> Result<()> {
        let s = srcs.get::<T>(0)?;
        d.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(s.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|(d, s)| {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d += s;
                }
            });
        Ok(())
    }
}
