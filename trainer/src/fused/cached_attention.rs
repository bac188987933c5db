//! Attention of a decoding step over the KV cache, read in place: for each query head,
//! `softmax(scale · q kᵀ + mask) v` over the first `t` cached positions of its key/value head
//! (grouped-query attention shares one among `heads / kv_heads` query heads), without the
//! repeated keys and values, the contiguous copies of the cache's views and the separate
//! score, softmax and product tensors of the plain path. No backward (a pass without a
//! gradient).
//!
//! Public op: [`cached_attention`].

use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{apply, Ins, Kernel, SyncPtr};
use super::real::Real;

/// The kernel of [`cached_attention`].
struct CachedAttention {
    t: usize,
    scale: f64,
    softcap: Option<f64>,
    /// The additive mask `[mb, l, t]` (`mb` 1 or the batch), in f64.
    mask: Option<(Vec<f64>, usize)>,
}

impl Kernel for CachedAttention {
    const NAME: &'static str = "fused-cached-attention";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (b, nh, l, d) = ins.shape(0).dims4()?;
        let (kb, nkv, cap, kd) = ins.shape(1).dims4()?;
        if kb != b || kd != d || ins.shape(2).dims() != ins.shape(1).dims() {
            bail!(
                "cached attention: queries {:?}, keys {:?}, values {:?}",
                ins.shape(0),
                ins.shape(1),
                ins.shape(2)
            );
        }
        let t = self.t;
        if t > cap || nkv == 0 || nh % nkv != 0 {
            bail!("cached attention: {t} positions in a cache of {cap}, {nh} heads over {nkv}");
        }
        if let Some((m, mb)) = &self.mask {
            if !(*mb == 1 || *mb == b) || m.len() != mb * l * t {
                bail!(
                    "cached attention: mask of {} values for [{mb}, {l}, {t}]",
                    m.len()
                );
            }
        }
        let (q, k, v) = (ins.get::<T>(0)?, ins.get::<T>(1)?, ins.get::<T>(2)?);
        let rep = nh / nkv;
        let mut out = vec![T::zero(); b * l * nh * d];
        let dst = SyncPtr(out.as_mut_ptr());
        let scale = T::from_f64(self.scale);
        (0..b * nh).into_par_iter().for_each(|bh| {
            let (bi, h) = (bh / nh, bh % nh);
            let kv = (bi * nkv + h / rep) * cap * d;
            let (kh, vh) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
            let mut s = vec![T::zero(); t];
            let mut o = vec![T::zero(); d];
            for li in 0..l {
                let qr = &q[((bi * nh + h) * l + li) * d..][..d];
                for (j, sj) in s.iter_mut().enumerate() {
                    let kr = &kh[j * d..(j + 1) * d];
                    let mut z = dot(qr, kr) * scale;
                    if let Some(c) = self.softcap {
                        z = T::from_f64(c * (z.to_f64() / c).tanh());
                    }
                    if let Some((m, mb)) = &self.mask {
                        let row = if *mb == 1 { 0 } else { bi };
                        z += T::from_f64(m[(row * l + li) * t + j]);
                    }
                    *sj = z;
                }
                let mx = super::real::row_max(&s);
                let mut sum = T::zero();
                for sj in s.iter_mut() {
                    *sj = (*sj - mx).exp();
                    sum += *sj;
                }
                o.iter_mut().for_each(|x| *x = T::zero());
                for (j, &e) in s.iter().enumerate() {
                    let p = e / sum;
                    for (x, &vv) in o.iter_mut().zip(&vh[j * d..(j + 1) * d]) {
                        *x += p * vv;
                    }
                }
                // SAFETY: the task of (bi, h) alone writes the d values of head h in row
                // (bi, li); they lie within the b·l·nh·d output.
                unsafe {
                    let p = dst.get().add(((bi * l + li) * nh + h) * d);
                    std::ptr::copy_nonoverlapping(o.as_ptr(), p, d);
                }
            }
        });
        Ok((out, Shape::from((b * l, nh * d))))
    }
}

/// `Σ a_i b_i` with eight partial sums.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ac.zip(bc) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    super::real::lane_sum(acc) + tail
}

/// `softmax(scale · q kᵀ + mask) v` for queries `q: [B, heads, l, d]` over the first `t`
/// positions of the cache's buffers `k`, `v: [B, kv_heads, capacity, d]` (query head `h` reads
/// key/value head `h / (heads / kv_heads)`), the scores soft-capped (`c · tanh(s / c)`) before
/// the additive `mask: [1 or B, 1, l, t]` when `softcap` is given; the heads merged,
/// `[B·l, heads·d]`. f32/f64 CPU tensors without a gradient.
///
/// # Errors
/// Shapes, dtypes (see [`super::enabled`]).
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
    softcap: Option<f64>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = match mask {
        Some(m) => {
            let (mb, one, l, mt) = m.dims4()?;
            if one != 1 || mt != t || l != q.dim(2)? {
                bail!("cached attention: mask {:?} for {t} positions", m.dims());
            }
            Some((m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?, mb))
        }
        None => None,
    };
    apply(
        &[q, k, v],
        CachedAttention {
            t,
            scale,
            softcap,
            mask,
        },
    )
}
