//! ZeRO stage 1 (DeepSpeed's name; `--zero-stage 1`): each rank keeps and updates only its
//! shard of the optimizer state. The variables, in name order, are cut into one contiguous run
//! per rank ([`crate::shard::owners`]); a step reduce-scatters the gradients (rank `r` receives
//! the sum over ranks of its own variables' gradients), takes the global norm and the DPO-PG
//! inner products as sums of per-variable values over the ranks, updates its variables, and
//! all-gathers the parameters. Rank `r`'s variables laid end to end make its block (zero-padded
//! to the largest rank's share); the collectives move the blocks in buckets (`ddp_bucket_cap_mb`,
//! 25 MiB by default, over all ranks), bucket `k` holding the `k`-th chunk of every rank's block, so no
//! parameter-sized buffer is ever built besides the rank's own share.
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
    /// Each variable's offset in its owner's block.
    offsets: Vec<usize>,
    /// The dtype of the flat buffers (the gradients' and optimizer state's).
    dtype: DType,
    /// The largest rank's share in elements: the block length.
    block: usize,
    /// Elements of one rank's block per collective: one bucket over all ranks.
    chunk: usize,
}

impl Zero1 {
    /// The partition of `vars` (sorted by name) over `world`, its collectives in buckets of
    /// `bucket_bytes` over all ranks.
    ///
    /// # Errors
    /// Variables whose gradients have different dtypes (an f64 variable among f32 ones).
    pub fn new(
        world: &'static dyn Collective,
        vars: &[(String, Var)],
        bucket_bytes: usize,
    ) -> Result<Self> {
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let n = world.world_size();
        let owners = owners(&sizes, n);
        let dtype = vars
            .first()
            .map_or(DType::F32, |(_, v)| grad_dtype(v.dtype()));
        if vars.iter().any(|(_, v)| grad_dtype(v.dtype()) != dtype) {
            return Err(Error::Options(
                "--zero-stage 1 needs variables of one precision (f64 mixed with others)".into(),
            ));
        }
        let mut share = vec![0usize; n];
        let mut offsets = Vec::with_capacity(sizes.len());
        for (s, &o) in sizes.iter().zip(&owners) {
            offsets.push(share[o]);
            share[o] += s;
        }
        Ok(Self {
            world,
            owners,
            shapes: vars.iter().map(|(_, v)| v.shape().clone()).collect(),
            offsets,
            dtype,
            block: share.into_iter().max().unwrap_or(0),
            chunk: (bucket_bytes / (n * dtype.size_in_bytes())).max(1),
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

    fn owned_indices(&self) -> Vec<usize> {
        (0..self.owners.len())
            .filter(|&i| self.owners[i] == self.world.rank())
            .collect()
    }

    /// The buckets' ranges `[a, b)` within a block.
    fn buckets(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.block.div_ceil(self.chunk))
            .map(|k| (k * self.chunk, ((k + 1) * self.chunk).min(self.block)))
    }

    /// Rank `r`'s variables that overlap `[a, b)` of its block, with the overlap:
    /// `(variable, start in the variable, start in [a, b), length)`.
    fn overlaps(&self, r: usize, a: usize, b: usize) -> Vec<(usize, usize, usize, usize)> {
        (0..self.owners.len())
            .filter(|&i| self.owners[i] == r)
            .filter_map(|i| {
                let (s, n) = (self.offsets[i], self.shapes[i].elem_count());
                let (lo, hi) = (a.max(s), b.min(s + n));
                (lo < hi).then_some((i, lo - s, lo - a, hi - lo))
            })
            .collect()
    }

    /// `[a, b)` of rank `r`'s block: its variables' tensors (`of(i)` for variable `i`)
    /// flattened end to end in the buffers' dtype, zero-padded past its share.
    fn segment(
        &self,
        r: usize,
        (a, b): (usize, usize),
        of: &impl Fn(usize) -> Result<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Vec<Tensor>> {
        let mut parts = Vec::new();
        let mut len = 0;
        for (i, from, _, n) in self.overlaps(r, a, b) {
            let t = of(i)?.flatten_all()?.narrow(0, from, n)?;
            parts.push(t.to_dtype(self.dtype)?);
            len += n;
        }
        if len < b - a {
            parts.push(Tensor::zeros(b - a - len, self.dtype, device)?);
        }
        Ok(parts)
    }

    /// Every rank's gradients `g` (all variables) summed, each rank receiving its own
    /// variables' sums: reduce-scatter, one bucket at a time (bucket `k`
    /// holds the `k`-th chunk of every rank's block). The gradient of this rank's shard.
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn reduce_scatter(&self, g: Grads) -> Result<Grads> {
        let device =
            g.0.first()
                .map_or(candle_core::Device::Cpu, |t| t.device().clone());
        let of = |i: usize| Ok(g.0[i].clone());
        let mut mine = Vec::new();
        for range in self.buckets() {
            let mut parts = Vec::new();
            for r in 0..self.world.world_size() {
                parts.extend(self.segment(r, range, &of, &device)?);
            }
            mine.push(self.world.reduce_scatter_sum(&Tensor::cat(&parts, 0)?)?);
        }
        drop(g);
        let block = match mine.len() {
            0 => Tensor::zeros(0, self.dtype, &device)?,
            _ => Tensor::cat(&mine, 0)?,
        };
        drop(mine);
        let shard = self
            .owned_indices()
            .into_iter()
            .map(|i| {
                let n = self.shapes[i].elem_count();
                Ok(block
                    .narrow(0, self.offsets[i], n)?
                    .reshape(&self.shapes[i])?)
            })
            .collect::<Result<_>>()?;
        Ok(Grads(shard))
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

    /// All-gather, one bucket at a time: this rank's tensors (`of(i)` for its variables `i`)
    /// to every rank; `sink(i, t)` receives each other rank's variable `i` whole (`t` shaped,
    /// in the buffers' dtype) once its last piece has arrived.
    fn all_gather_with(
        &self,
        of: &impl Fn(usize) -> Result<Tensor>,
        device: &candle_core::Device,
        mut sink: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let (me, n) = (self.world.rank(), self.world.world_size());
        let mut pending: Vec<Vec<Tensor>> = vec![Vec::new(); self.owners.len()];
        let mut have = vec![0usize; self.owners.len()];
        for (a, b) in self.buckets() {
            let mine = Tensor::cat(&self.segment(me, (a, b), of, device)?, 0)?;
            let all = self.world.all_gather(&mine)?;
            for q in (0..n).filter(|&q| q != me) {
                for (i, _, at, len) in self.overlaps(q, a, b) {
                    pending[i].push(all.narrow(0, q * (b - a) + at, len)?);
                    have[i] += len;
                    if have[i] == self.shapes[i].elem_count() {
                        let parts = std::mem::take(&mut pending[i]);
                        sink(i, Tensor::cat(&parts, 0)?.reshape(&self.shapes[i])?)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every rank's updated variables onto every rank (all-gather of the parameters, in
    /// buckets).
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn all_gather_params(&self, vars: &[(String, Var)]) -> Result<()> {
        let device = vars
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        let of = |i: usize| Ok(vars[i].1.as_tensor().detach());
        self.all_gather_with(&of, &device, |i, t| {
            let var = &vars[i].1;
            Ok(var.set(&t.to_dtype(var.dtype())?)?)
        })
    }

    /// The whole optimizer state (every variable's), gathered from the ranks' shards onto
    /// every rank, for a checkpoint that any world size resumes.
    ///
    /// # Errors
    /// The engine's and tensor errors.
    pub fn gather_optimizer(&self, shard: &Optimizer, vars: &[(String, Var)]) -> Result<Optimizer> {
        let device = vars
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        let kind = shard.config().kind;
        let mine = self.owned_indices();
        let full = |part: &[Option<Tensor>], kept: bool| -> Result<Vec<Option<Tensor>>> {
            let mut out = vec![None; vars.len()];
            if !kept {
                return Ok(out);
            }
            for (k, &i) in mine.iter().enumerate() {
                out[i] = part[k].clone();
            }
            let of = |i: usize| -> Result<Tensor> {
                let k = mine
                    .iter()
                    .position(|&j| j == i)
                    .expect("an owned variable");
                part[k].clone().ok_or_else(|| {
                    Error::InvalidArgument(format!("no optimizer state for `{}`", vars[i].0))
                })
            };
            self.all_gather_with(&of, &device, |i, t| {
                out[i] = Some(t);
                Ok(())
            })?;
            Ok(out)
        };
        let (m, v) = shard.moments();
        let (m, v) = (
            full(m, kind == OptimizerKind::Adamw)?,
            full(v, kind != OptimizerKind::Sgd)?,
        );
        Optimizer::from_moments(*shard.config(), vars, m, v, shard.step_count())
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
