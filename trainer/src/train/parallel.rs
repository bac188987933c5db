//! Data parallelism as Hugging Face's Trainer and accelerate define it, over the process's
//! [`Collective`]: the global batch is per-device batch × accumulation × world size, and the
//! ranks split each global micro-batch (`per-device × world` examples of the epoch's order)
//! into consecutive parts, rank `r` taking positions `[r·b, (r+1)·b)`, so a run of `N` ranks
//! with per-device batch `b` sees, step by step, the examples of one process with batch `N·b`.
//!
//! Each rank scales its part's loss by `(its examples) / (the micro-batch's examples)`, so the
//! sum over ranks of the gradients is the gradient of the micro-batch's mean, also when the
//! last micro-batch of an epoch is short (accelerate instead repeats examples to even the
//! parts). Gradients are summed by all-reduce in buckets of [`BUCKET_BYTES`] (DDP's
//! `bucket_cap_mb`), before the norm, clipping and the optimizer; metrics are the micro-batch's
//! means over all ranks' examples.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::dist::Collective;
use crate::error::Result;
use crate::train::grads::Grads;
use crate::train::objective::PreferenceMetrics;

/// The size of one all-reduce of gradients unless `ddp_bucket_cap_mb` says otherwise: 25 MiB,
/// PyTorch DDP's default `bucket_cap_mb`.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Rank `rank`'s positions in a global micro-batch of `len` examples when each rank takes
/// `per_device`: `[rank·per_device, (rank+1)·per_device)`, cut to the micro-batch (empty for
/// a rank past the end of a short last micro-batch).
pub fn local_part(len: usize, per_device: usize, rank: usize) -> Range<usize> {
    (rank * per_device).min(len)..((rank + 1) * per_device).min(len)
}

/// `Σ_ranks g`, variable by variable, in buckets of at most `bucket_bytes` of consecutive
/// variables of one dtype (a variable larger than a bucket is one bucket); `g` itself in a
/// world of one.
///
/// # Errors
/// The engine's and tensor errors.
pub fn all_reduce_grads(world: &dyn Collective, g: Grads, bucket_bytes: usize) -> Result<Grads> {
    if world.world_size() == 1 {
        return Ok(g);
    }
    let mut out: Vec<Tensor> = Vec::with_capacity(g.len());
    let mut bucket: Vec<Tensor> = Vec::new();
    let mut bytes = 0;
    for t in g.0 {
        let size = t.elem_count() * t.dtype().size_in_bytes();
        let same = bucket.first().is_none_or(|b| b.dtype() == t.dtype());
        if !bucket.is_empty() && (!same || bytes + size > bucket_bytes) {
            out.extend(reduce_bucket(world, std::mem::take(&mut bucket))?);
            bytes = 0;
        }
        bytes += size;
        bucket.push(t);
    }
    if !bucket.is_empty() {
        out.extend(reduce_bucket(world, bucket)?);
    }
    Ok(Grads(out))
}

/// One bucket: flattened into one tensor, all-reduced, cut back into its variables' shapes.
fn reduce_bucket(world: &dyn Collective, bucket: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let flat: Vec<Tensor> = bucket
        .iter()
        .map(Tensor::flatten_all)
        .collect::<candle_core::Result<_>>()?;
    let summed = world.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    drop(flat);
    let mut offset = 0;
    let mut out = Vec::with_capacity(bucket.len());
    for t in &bucket {
        let n = t.elem_count();
        out.push(summed.narrow(0, offset, n)?.reshape(t.shape())?);
        offset += n;
    }
    Ok(out)
}

/// `Σ_ranks v`, elementwise, in f64.
///
/// # Errors
/// The engine's errors.
pub fn all_reduce_f64(world: &dyn Collective, v: &[f64]) -> Result<Vec<f64>> {
    if world.world_size() == 1 {
        return Ok(v.to_vec());
    }
    let t = Tensor::from_slice(v, v.len(), &candle_core::Device::Cpu)?;
    Ok(world.all_reduce_sum(&t)?.to_dtype(DType::F64)?.to_vec1()?)
}

/// A micro-batch's metrics over all ranks: each rank's means (`None` for a rank without
/// examples) weighted by `weight` = its examples / the micro-batch's, summed over the ranks.
///
/// # Errors
/// The engine's errors.
pub fn global_metrics(
    world: &dyn Collective,
    local: Option<&PreferenceMetrics>,
    weight: f64,
) -> Result<PreferenceMetrics> {
    let zero = PreferenceMetrics::default();
    let m = local.unwrap_or(&zero);
    if world.world_size() == 1 {
        return Ok(*m);
    }
    let mut all: Vec<f64> = [
        m.loss,
        m.rewards_chosen,
        m.rewards_rejected,
        m.rewards_accuracies,
        m.rewards_margins,
        m.logps_chosen,
        m.logps_rejected,
        m.nll_loss.unwrap_or(0.0),
    ]
    .iter()
    .map(|x| x * weight)
    .collect();
    // How many ranks report an `sft` term (all or none: the objective is the same).
    all.push(f64::from(u8::from(m.nll_loss.is_some())));
    let s = all_reduce_f64(world, &all)?;
    Ok(PreferenceMetrics {
        loss: s[0],
        rewards_chosen: s[1],
        rewards_rejected: s[2],
        rewards_accuracies: s[3],
        rewards_margins: s[4],
        logps_chosen: s[5],
        logps_rejected: s[6],
        nll_loss: (s[8] > 0.0).then_some(s[7]),
    })
}

/// The global [`crate::train::objective::RewardMetrics`] of a micro-batch spread over the
/// ranks: the loss, mean, accuracy and margin summed with each rank's `weight` (its share of
/// the micro-batch, as [`global_metrics`]), the minimum and maximum over the ranks that hold
/// examples (`local` is `None` on a rank without any).
///
/// # Errors
/// Collective errors.
pub fn global_reward_metrics(
    world: &dyn Collective,
    local: Option<&crate::train::objective::RewardMetrics>,
    weight: f64,
) -> Result<crate::train::objective::RewardMetrics> {
    use crate::train::objective::RewardMetrics;
    let zero = RewardMetrics::default();
    let m = local.unwrap_or(&zero);
    let n = world.world_size();
    if n == 1 {
        return Ok(*m);
    }
    // Four weighted sums, then each rank's min and max in its own slot (0 where it has none).
    let mut all = vec![
        m.loss * weight,
        m.mean_reward * weight,
        m.accuracy * weight,
        m.margin * weight,
    ];
    let mut slots = vec![0.0; 3 * n];
    if local.is_some() {
        let r = world.rank();
        (slots[r], slots[n + r], slots[2 * n + r]) = (1.0, m.min_reward, m.max_reward);
    }
    all.extend(slots);
    let s = all_reduce_f64(world, &all)?;
    let held: Vec<usize> = (0..n).filter(|&r| s[4 + r] > 0.0).collect();
    let min = held
        .iter()
        .map(|&r| s[4 + n + r])
        .fold(f64::INFINITY, f64::min);
    let max = held
        .iter()
        .map(|&r| s[4 + 2 * n + r])
        .fold(f64::NEG_INFINITY, f64::max);
    Ok(RewardMetrics {
        loss: s[0],
        mean_reward: s[1],
        accuracy: s[2],
        margin: s[3],
        min_reward: min,
        max_reward: max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Single;

    #[test]
    fn parts_cover_the_micro_batch_in_order() {
        let parts: Vec<Range<usize>> = (0..3).map(|r| local_part(7, 3, r)).collect();
        assert_eq!(parts, [0..3, 3..6, 6..7]);
        assert!(local_part(7, 4, 2).is_empty());
    }

    #[test]
    fn one_rank_returns_its_input() {
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let g = all_reduce_grads(&Single, Grads(vec![t.clone()]), BUCKET_BYTES).unwrap();
        assert_eq!(
            g.0[0].to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()
        );
        assert_eq!(all_reduce_f64(&Single, &[1.5, -2.0]).unwrap(), [1.5, -2.0]);
    }

    #[test]
    fn buckets_keep_shapes_and_order() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(0f64, 4., &dev).unwrap();
        let out = reduce_bucket(&Single, vec![a.clone()]).unwrap();
        assert_eq!(out[0].dims(), [2, 3]);
        let g = all_reduce_grads(&Single, Grads(vec![a, b]), BUCKET_BYTES).unwrap();
        assert_eq!(g.0[1].dtype(), DType::F64);
    }
}
