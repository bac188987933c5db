//! ZeRO stage 1 (DeepSpeed's name; `--zero-stage 1`): each rank keeps and updates only its
//! shard of the optimizer state. The variables, in name order, are cut into one contiguous run
//! per rank ([`crate::shard::owners`]); a step reduce-scatters the gradients (rank `r` receives
//! the sum over ranks of its own variables' gradients), takes the global norm and the DPO-PG
//! inner products as sums of per-variable values over the ranks, updates its variables, and
//! all-gathers the parameters. Each collective moves one flat buffer of `N` equal blocks,
//! block `r` holding rank `r`'s variables end to end (zero-padded to the largest rank's share).
//!
//! Per-variable values are computed exactly as one process computes them and summed in the
//! variables' order, so the norm, the clipping and the update equal stage 0's bit for bit
//! (with two ranks, MPI's sums `a + b` and `a + 0` are exact and order-free).

use candle_core::{DType, Tensor, Var};
use difinfo::dpo_pg::InnerProduct;

use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::shard::owners;
use crate::train::grads::{grad_dtype, ordered_sum, Grads};
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::parallel::all_reduce_f64;

/// The partition of the variables over the ranks and the collectives over it.
#[derive(Clone)]
pub struct Zero1 {
    world: &'static dyn Collective,
    /// The owner of each variable.
    owners: Vec<usize>,
    /// Each variable's shape.
    shapes: Vec<candle_core::Shape>,
    /// The dtype of the flat buffers (the gradients' and optimizer state's).
    dtype: DType,
    /// The largest rank's share in elements: the block length.
    block: usize,
}

impl Zero1 {
    /// The partition of `vars` (sorted by name) over `world`.
    ///
    /// # Errors
    /// Variables whose gradients have different dtypes (an f64 variable among f32 ones).
    pub fn new(world: &'static dyn Collective, vars: &[(String, Var)]) -> Result<Self> {
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let owners = owners(&sizes, world.world_size());
        let dtype = vars
            .first()
            .map_or(DType::F32, |(_, v)| grad_dtype(v.dtype()));
        if vars.iter().any(|(_, v)| grad_dtype(v.dtype()) != dtype) {
            return Err(Error::Options(
                "--zero-stage 1 needs variables of one precision (f64 mixed with others)".into(),
            ));
        }
        let mut share = vec![0usize; world.world_size()];
        for (s, &o) in sizes.iter().zip(&owners) {
            share[o] += s;
        }
        Ok(Self {
            world,
            owners,
            shapes: vars.iter().map(|(_, v)| v.shape().clone()).collect(),
            dtype,
            block: share.into_iter().max().unwrap_or(0),
        })
    }

    /// Whether this rank owns each variable.
    pub fn owned(&self) -> Vec<bool> {
        let r = self.world.rank();
        self.owners.iter().map(|&o| o == r).collect()
    }

    /// This rank's variables.
    pub fn owned_vars(&self, vars: &[(String, Var)]) -> Vec<(String, Var)> {
        vars.iter()
            .zip(self.owned())
            .filter(|(_, k)| *k)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Rank `r`'s block: its variables' tensors (`of(i)` for variable `i`) flattened end to
    /// end in the buffers' dtype, zero-padded to the block length.
    fn block_of(&self, r: usize, of: impl Fn(usize) -> Result<Tensor>) -> Result<Tensor> {
        Ok(Tensor::cat(&self.block_parts(r, &of)?, 0)?)
    }

    /// The pieces of [`Zero1::block_of`] before they are joined (views where the tensors are
    /// contiguous and of the buffers' dtype: no copy until the one `cat`).
    fn block_parts(&self, r: usize, of: &impl Fn(usize) -> Result<Tensor>) -> Result<Vec<Tensor>> {
        let mut parts = Vec::new();
        let mut len = 0;
        for (i, _) in self.owners.iter().enumerate().filter(|(_, &o)| o == r) {
            let t = of(i)?.flatten_all()?.to_dtype(self.dtype)?;
            len += t.elem_count();
            parts.push(t);
        }
        let device = parts
            .first()
            .map_or(candle_core::Device::Cpu, |t| t.device().clone());
        parts.push(Tensor::zeros(self.block - len, self.dtype, &device)?);
        Ok(parts)
    }

    /// Rank `r`'s variables cut out of its block `block`, shaped: `(variable index, tensor)`.
    fn unblock(&self, r: usize, block: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        let mut offset = 0;
        let mut out = Vec::new();
        for (i, _) in self.owners.iter().enumerate().filter(|(_, &o)| o == r) {
            let n = self.shapes[i].elem_count();
            out.push((i, block.narrow(0, offset, n)?.reshape(&self.shapes[i])?));
            offset += n;
        }
        Ok(out)
    }

    /// Every rank's gradients `g` (all variables) summed, each rank receiving its own
    /// variables' sums (reduce-scatter): the gradient of this rank's shard.
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn reduce_scatter(&self, g: Grads) -> Result<Grads> {
        // One copy of the gradients: every rank's block joined by a single `cat`.
        let mut parts = Vec::new();
        for r in 0..self.world.world_size() {
            parts.extend(self.block_parts(r, &|i| Ok(g.0[i].clone()))?);
        }
        let flat = Tensor::cat(&parts, 0)?;
        drop((parts, g));
        let mine = self.world.reduce_scatter_sum(&flat)?;
        drop(flat);
        let parts = self.unblock(self.world.rank(), &mine)?;
        Ok(Grads(parts.into_iter().map(|(_, t)| t).collect()))
    }

    /// `⟨a, b⟩` over all variables of shard gradients `a`, `b` (this rank's variables): the
    /// per-variable products, zero for the others', summed over the ranks, then in order.
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn dot(&self, a: &Grads, b: &Grads) -> Result<f64> {
        let mut all = vec![0.0; self.owners.len()];
        for (i, d) in self.owned_indices().into_iter().zip(a.dots(b)?) {
            all[i] = d;
        }
        Ok(ordered_sum(&all_reduce_f64(self.world, &all)?))
    }

    /// Every rank's updated variables onto every rank (all-gather of the parameters).
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn all_gather_params(&self, vars: &[(String, Var)]) -> Result<()> {
        let r = self.world.rank();
        let mine = self.block_of(r, |i| Ok(vars[i].1.as_tensor().detach()))?;
        let all = self.world.all_gather(&mine)?;
        for q in (0..self.world.world_size()).filter(|&q| q != r) {
            let block = all.narrow(0, q * self.block, self.block)?;
            for (i, t) in self.unblock(q, &block)? {
                let var = &vars[i].1;
                var.set(&t.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The whole optimizer state (every variable's), gathered from the ranks' shards onto
    /// every rank, for a checkpoint that any world size resumes.
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn gather_optimizer(&self, shard: &Optimizer, vars: &[(String, Var)]) -> Result<Optimizer> {
        let (m, v) = shard.moments();
        let kind = shard.config().kind;
        let full = |part: &[Option<Tensor>], kept: bool| -> Result<Vec<Option<Tensor>>> {
            if !kept {
                return Ok(vec![None; vars.len()]);
            }
            let mine = self.owned_indices();
            let of = |i: usize| -> Result<Tensor> {
                let k = mine
                    .iter()
                    .position(|&j| j == i)
                    .expect("an owned variable");
                part[k].clone().ok_or_else(|| {
                    Error::InvalidArgument(format!("no optimizer state for `{}`", vars[i].0))
                })
            };
            let all = self
                .world
                .all_gather(&self.block_of(self.world.rank(), of)?)?;
            let mut out = vec![None; vars.len()];
            for q in 0..self.world.world_size() {
                let block = all.narrow(0, q * self.block, self.block)?;
                for (i, t) in self.unblock(q, &block)? {
                    out[i] = Some(t);
                }
            }
            Ok(out)
        };
        let (m, v) = (
            full(m, kind == OptimizerKind::Adamw)?,
            full(v, kind != OptimizerKind::Sgd)?,
        );
        Optimizer::from_moments(*shard.config(), vars, m, v, shard.step_count())
    }

    fn owned_indices(&self) -> Vec<usize> {
        (0..self.owners.len())
            .filter(|&i| self.owners[i] == self.world.rank())
            .collect()
    }
}

/// A rank's shard of a gradient set as an inner-product space over all variables: the
/// library's DPO-PG projection runs on it as on a whole [`Grads`].
#[derive(Clone)]
pub struct ShardGrads<'z> {
    /// This rank's variables' gradients.
    pub grads: Grads,
    /// The partition.
    pub zero: &'z Zero1,
}

impl InnerProduct for ShardGrads<'_> {
    type Coef = f64;
    type Error = Error;

    fn dot(&self, y: &Self) -> Result<f64> {
        self.zero.dot(&self.grads, &y.grads)
    }

    fn sub_scaled(&self, y: &Self, k: &f64) -> Result<Self> {
        Ok(Self {
            grads: self.grads.sub_scaled(&y.grads, k)?,
            zero: self.zero,
        })
    }
}
