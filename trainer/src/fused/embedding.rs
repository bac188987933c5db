//! The embedding lookup `y[r] = table[ids[r]]` (`table: [V, H]` → `[len(ids), H]`) as one node
//! whose backward `∂table[v] = Σ_{r: ids[r] = v} ∂y[r]` goes to a [`GradSink`] (added in place
//! to a tied table's pending LM-head gradient when there is one).
//!
//! Public op: [`embedding`].

use candle_core::{bail, Result, Shape, Tensor};

use super::dispatch::{
    apply, build_rows, par_zeros, write_all, InPlace, InPlaceKernel, Ins, Kernel, Op,
};
use super::real::Real;
use super::sink::GradSink;

/// The embedding lookup as a node whose backward leaves the table's gradient in a sink.
struct Embedding {
    ids: Vec<u32>,
    sink: GradSink,
}

impl Embedding {
    fn fwd<T: Real>(&self, e: &[T], hs: usize) -> Vec<T> {
        let _p = crate::profile::region("embedding");
        build_rows(self.ids.len(), hs, |r0, o| {
            for (k, orow) in o.chunks_mut(hs).enumerate() {
                let id = self.ids[r0 + k] as usize;
                write_all(orow, e[id * hs..(id + 1) * hs].iter().copied());
            }
        })
    }
}

/// `acc[ids[r]] += g[r]` for every row `r` of `g` (`hs` wide), in order.
fn scatter_rows<T: Real>(acc: &mut [T], g: &[T], ids: &[u32], hs: usize) {
    for (r, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for (d, &x) in acc[id * hs..(id + 1) * hs]
            .iter_mut()
            .zip(&g[r * hs..(r + 1) * hs])
        {
            *d += x;
        }
    }
}

/// `∂E[v] = Σ_{rows r with ids[r] = v} g[r]` (`[V, H]`) from the rows' gradients `g`, rows
/// added in order.
struct EmbeddingBwd<'a> {
    ids: &'a [u32],
    v: usize,
}

impl Kernel for EmbeddingBwd<'_> {
    const NAME: &'static str = "fused-embedding-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (_, hs) = ins.shape(0).dims2()?;
        let mut de: Vec<T> = par_zeros(self.v * hs);
        scatter_rows(&mut de, ins.get(0)?, self.ids, hs);
        Ok((de, Shape::from((self.v, hs))))
    }
}

impl Kernel for Embedding {
    const NAME: &'static str = "fused-embedding";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (v, hs) = ins.shape(0).dims2()?;
        if let Some(&bad) = self.ids.iter().find(|&&i| i as usize >= v) {
            bail!("embedding: token id {bad} outside the vocabulary of {v}");
        }
        let out = self.fwd(ins.get(0)?, hs);
        Ok((out, Shape::from((self.ids.len(), hs))))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let e = args[0];
        let (v, hs) = e.dims2()?;
        let g = grad.contiguous()?;
        // A tied table whose LM-head gradient is already pending: the rows are added into it
        // in place (no second table-sized buffer).
        if let Some(acc) = self.sink.pending(e) {
            let fits = super::enabled(&acc)
                && acc.dtype() == g.dtype()
                && acc.dims() == [v, hs]
                && acc.layout().contiguous_offsets().is_some();
            if fits
                && acc
                    .inplace_op2(&g, &InPlace(ScatterRows { ids: &self.ids }))
                    .is_ok()
            {
                return Ok(vec![None]);
            }
        }
        let de = g.apply_op1_no_bwd(&Op(EmbeddingBwd { ids: &self.ids, v }))?;
        self.sink.push(e, de)?;
        Ok(vec![None])
    }
}

/// `acc[ids[r]] += g[r]` for every row `r` in order, in place (see [`Embedding`]'s backward).
struct ScatterRows<'a> {
    ids: &'a [u32],
}

impl InPlaceKernel for ScatterRows<'_> {
    const NAME: &'static str = "fused-embedding-scatter";

    fn cpu<T: Real>(&self, acc: &mut [T], shape: &Shape, srcs: &Ins<'_>) -> Result<()> {
        let hs = shape.dims().get(1).copied().unwrap_or(1);
        if srcs.shape(0).dims() != [self.ids.len(), hs] {
            bail!(
                "embedding: gradient rows {:?} for {} ids",
                srcs.shape(0).dims(),
                self.ids.len()
            );
        }
        scatter_rows(acc, srcs.get(0)?, self.ids, hs);
        Ok(())
    }
}

/// The rows `table[ids[r]]` (`table: [V, H]` f32/f64 CPU → `[len(ids), H]`) as one node whose
/// backward pass leaves `∂table` (the rows' gradients added at their ids) in `sink` rather
/// than candle's store (no zero buffer and accumulation of the table's size there). `table`
/// must be the variable itself.
///
/// # Errors
/// An id outside the table; dtypes.
pub fn embedding(table: &Tensor, ids: &[u32], sink: &GradSink) -> Result<Tensor> {
    let (ids, sink) = (ids.to_vec(), sink.clone());
    apply(&[table], Embedding { ids, sink })
}
