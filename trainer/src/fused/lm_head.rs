//! Log-probabilities of target tokens: `out[n] = z[n, t_n] − log Σ_v exp z[n, v]`, from given
//! logits `z: [N, V]` ([`token_logps`]) or from the LM head `z = h wᵀ` formed a chunk of rows
//! at a time in a pooled buffer, never as a tensor ([`lm_head_logps`]). Backward:
//! `∂z[n, v] = g[n] · (1[v = t_n] − softmax(z[n])_v)`, then for the head `∂h = ∂z w`,
//! `∂w = ∂zᵀ h` chunk by chunk.
//!
//! Public ops: [`token_logps`], [`lm_head_logps`], [`lm_head_logps_into`],
//! [`lm_head_logps_chunked`]; [`HEAD_CHUNK_ELEMS`], [`head_chunk_rows`].

use std::any::Any;

use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::{
    apply, build_rows, par_rows, pooled_buf, recycle_any, recycle_buf, rows_per_task, write_all,
    Ins, Kernel, Op,
};
use super::gemm::{gemm_into, gemm_par, gemm_raw};
use super::real::{row_lse, Real};
use super::sink::GradSink;

/// An error naming `op` when a target lies outside a vocabulary of `v`.
fn check_targets(op: &str, t: &[u32], v: usize) -> Result<()> {
    if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
        bail!("{op}: target {bad} outside the vocabulary of {v}");
    }
    Ok(())
}

/// `out[r] = z[r, t_r] − lse_r` with `lse_r = ln Σ_v exp z[r, v]` (kept in `lse`), for each
/// `v`-wide row `r` of `z`, rows over rayon's pool.
fn pick_logps<T: Real>(z: &[T], t: &[u32], v: usize, out: &mut [T], lse: &mut [f64]) {
    let per = rows_per_task(v);
    out.par_chunks_mut(per)
        .zip(lse.par_chunks_mut(per))
        .enumerate()
        .for_each(|(c, (o, ls))| {
            for (i, (o, ls)) in o.iter_mut().zip(ls).enumerate() {
                let r = c * per + i;
                let row = &z[r * v..(r + 1) * v];
                let l = row_lse(row);
                *o = row[t[r] as usize] - l;
                *ls = l.to_f64();
            }
        });
}

struct TokenLogps {
    /// Each row's log-sum-exp from the forward pass (exact in f64), taken by the backward pass.
    lse: std::sync::Mutex<Option<Vec<f64>>>,
}

impl TokenLogps {
    fn fwd<T: Real>(&self, z: &[T], t: &[u32], v: usize) -> Result<Vec<T>> {
        let _p = crate::profile::region("LM head log-softmax");
        check_targets("token_logps", t, v)?;
        let mut out = vec![T::zero(); t.len()];
        let mut lse = vec![0f64; t.len()];
        pick_logps(z, t, v, &mut out, &mut lse);
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        Ok(out)
    }
}

impl Kernel for TokenLogps {
    const NAME: &'static str = "fused-token-logps";
    const IDS: Option<usize> = Some(1);

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, v) = ins.shape(0).dims2()?;
        if ins.shape(1).dims() != [n] {
            bail!(
                "token_logps: targets {:?} for logits [{n}, {v}]",
                ins.shape(1)
            );
        }
        Ok((self.fwd(ins.get(0)?, ins.get(1)?, v)?, Shape::from(n)))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let lse = self.lse.lock().ok().and_then(|mut s| s.take());
        let op = Op(TokenLogpsBwd { lse });
        let g = args[0].apply_op3_no_bwd(args[1], &grad.contiguous()?, &op)?;
        Ok(vec![Some(g), None])
    }
}

/// `∂/∂z[n, v] = g[n] · (1[v = t_n] − softmax(z[n])_v)`.
/// The forward pass's log-sum-exps when kept (recomputed otherwise, e.g. a second backward).
struct TokenLogpsBwd {
    lse: Option<Vec<f64>>,
}

impl TokenLogpsBwd {
    fn bwd<T: Real>(&self, z: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
        let _p = crate::profile::region("LM head log-softmax backward");
        build_rows(g.len(), v, |r0, o| {
            for (i, orow) in o.chunks_mut(v).enumerate() {
                let r = r0 + i;
                let row = &z[r * v..(r + 1) * v];
                let lse = match &self.lse {
                    Some(l) => T::from_f64(l[r]),
                    None => row_lse(row),
                };
                let gr = g[r];
                let orow = write_all(orow, row.iter().map(|&x| -(gr * (x - lse).exp())));
                orow[t[r] as usize] += gr;
            }
        })
    }
}

impl Kernel for TokenLogpsBwd {
    const NAME: &'static str = "fused-token-logps-bwd";
    const IDS: Option<usize> = Some(1);

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (_, v) = ins.shape(0).dims2()?;
        let out = self.bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, v);
        Ok((out, ins.shape(0).clone()))
    }
}

/// `out[n] = z[n, t_n] − log Σ_v exp z[n, v]` for logits `z: [N, V]` and targets `t: [N]`
/// (u32), differentiable in `z`; never materializes the `[N, V]` log-softmax.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]), a target outside the vocabulary.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lse = std::sync::Mutex::new(None);
    apply(&[logits, targets], TokenLogps { lse })
}

/// The logits `z = h wᵀ` (`h: [N, H]`, `w: [V, H]`) in a pooled buffer.
fn head_logits<T: Real>(h: &[T], w: &[T], n: usize, hd: usize, v: usize) -> Vec<T> {
    let mut z: Vec<T> = pooled_buf(n * v);
    // SAFETY: z has capacity n·v; h is n×hd and w v×hd, read through wᵀ's strides; gemm
    // writes every element of z.
    unsafe {
        gemm_into(
            n,
            v,
            hd,
            z.as_mut_ptr(),
            h.as_ptr(),
            1,
            hd,
            w.as_ptr(),
            hd,
            1,
        );
        z.set_len(n * v);
    }
    z
}

/// Elements of one chunk of LM-head logits (`[rows, V]`) by default: 2²², 16 MiB in f32 (85
/// rows of a 49,152-token vocabulary, 32 of Llama 3's 128,256: enough rows for the products to
/// run at full speed, and below glibc's largest mmap threshold, so the pooled buffers come from
/// the heap).
pub const HEAD_CHUNK_ELEMS: usize = 1 << 22;

/// Rows per chunk of `v`-wide logits under a budget of `elems` elements (at least one).
pub fn head_chunk_rows(elems: usize, v: usize) -> usize {
    (elems / v.max(1)).max(1)
}

/// What the forward pass of [`LmHead`] keeps for its backward pass: each row's log-sum-exp,
/// and the logits themselves (a pooled `Vec` of the forward pass's float type) when they fit
/// in one chunk.
struct HeadKept {
    dtype: DType,
    z: Option<Box<dyn Any + Send>>,
    lse: Vec<f64>,
}

impl HeadKept {
    fn recycle(self) {
        if let Some(z) = self.z {
            recycle_any(z);
        }
    }

    /// The kept logits and log-sum-exps at element type `T`; `None` (the logits recycled)
    /// when they were kept at another.
    #[allow(clippy::type_complexity)]
    fn take<T: Real>(self) -> Option<(Option<Vec<T>>, Vec<f64>)> {
        if self.dtype != T::DTYPE {
            self.recycle();
            return None;
        }
        match self.z.map(|z| z.downcast::<Vec<T>>()) {
            None => Some((None, self.lse)),
            Some(Ok(z)) => Some((Some(*z), self.lse)),
            Some(Err(z)) => {
                recycle_any(z);
                None
            }
        }
    }
}

/// `out[n] = (h wᵀ)[n, t_n] − log Σ_v exp (h wᵀ)[n, v]` (see [`lm_head_logps`]).
struct LmHead {
    kept: std::sync::Mutex<Option<HeadKept>>,
    /// Where `∂w` goes instead of candle's store (see [`GradSink`]), if anywhere.
    sink: Option<GradSink>,
    /// Rows per chunk of logits.
    rows: usize,
    /// Whether a backward pass can follow (an input carries a gradient).
    keep: bool,
}

impl Drop for LmHead {
    fn drop(&mut self) {
        if let Some(k) = self.kept.get_mut().ok().and_then(Option::take) {
            k.recycle();
        }
    }
}

fn head_dims(h: &Shape, w: &Shape, t: &Shape) -> Result<(usize, usize, usize)> {
    let (n, hd) = h.dims2()?;
    let (v, w_hd) = w.dims2()?;
    if w_hd != hd || t.dims() != [n] {
        bail!("lm_head_logps: hidden {h:?}, weight {w:?}, targets {t:?}");
    }
    Ok((n, hd, v))
}

impl LmHead {
    /// Log-probs of the targets, the rows' log-sum-exps, and the logits when they are one
    /// chunk and `keep` is set. Chunks of `rows` rows reuse one pooled buffer.
    #[allow(clippy::type_complexity)]
    fn fwd<T: Real>(
        h: &[T],
        w: &[T],
        t: &[u32],
        (n, hd, v): (usize, usize, usize),
        rows: usize,
        keep: bool,
    ) -> Result<(Vec<T>, Option<Vec<T>>, Vec<f64>)> {
        let _p = crate::profile::region("LM head log-softmax");
        check_targets("lm_head_logps", t, v)?;
        let mut out = vec![T::zero(); n];
        let mut lse = vec![0f64; n];
        let mut whole = None;
        for r0 in (0..n).step_by(rows.max(1)) {
            let rn = rows.min(n - r0);
            let z = head_logits(&h[r0 * hd..(r0 + rn) * hd], w, rn, hd, v);
            let span = r0..r0 + rn;
            pick_logps(
                &z,
                &t[span.clone()],
                v,
                &mut out[span.clone()],
                &mut lse[span],
            );
            if keep && rn == n {
                whole = Some(z);
            } else {
                recycle_buf(z);
            }
        }
        Ok((out, whole, lse))
    }
}

impl Kernel for LmHead {
    const NAME: &'static str = "fused-lm-head-logps";
    const IDS: Option<usize> = Some(2);

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let dims = head_dims(ins.shape(0), ins.shape(1), ins.shape(2))?;
        let t = ins.get::<u32>(2)?;
        let (out, z, lse) = Self::fwd(ins.get(0)?, ins.get(1)?, t, dims, self.rows, self.keep)?;
        let kept = HeadKept {
            dtype: T::DTYPE,
            z: z.map(|z| Box::new(z) as Box<dyn Any + Send>),
            lse,
        };
        if self.keep {
            if let Ok(mut slot) = self.kept.lock() {
                if let Some(old) = slot.replace(kept) {
                    old.recycle();
                }
            }
        } else {
            kept.recycle();
        }
        Ok((out, Shape::from(dims.0)))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (h, w, targets) = (args[0], args[1], args[2]);
        let (n, hd, v) = head_dims(h.shape(), w.shape(), targets.shape())?;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        // A weight that carries no gradient (frozen) gets none computed.
        let need_w = w.track_op();
        let both = h.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &Op(LmHeadBwd {
                kept: std::sync::Mutex::new(kept),
                targets: targets.to_vec1::<u32>()?,
                rows: self.rows,
                need_w,
            }),
        )?;
        let gh = both.narrow(0, 0, n * hd)?.reshape((n, hd))?;
        if !need_w {
            return Ok(vec![Some(gh), None, None]);
        }
        let gw = both.narrow(0, n * hd, v * hd)?.reshape((v, hd))?;
        match &self.sink {
            Some(sink) => {
                sink.push(w, gw)?;
                Ok(vec![Some(gh), None, None])
            }
            None => Ok(vec![Some(gh), Some(gw), None]),
        }
    }
}

/// Gradients of [`LmHead`] from `g = ∂/∂out`, concatenated flat: `∂/∂h = dz w` (`[N, H]`),
/// then (with `need_w`) `∂/∂w = dzᵀ h` (`[V, H]`), with `dz[n, v] = g[n] · (1[v = t_n] −
/// softmax(z[n])_v)` written over the logits, chunk by chunk of `rows` rows: the kept ones
/// when the forward pass kept them, recomputed otherwise; `∂w` sums the chunks' products.
struct LmHeadBwd {
    kept: std::sync::Mutex<Option<HeadKept>>,
    targets: Vec<u32>,
    rows: usize,
    need_w: bool,
}

impl LmHeadBwd {
    #[allow(clippy::too_many_arguments)]
    fn bwd<T: Real>(
        h: &[T],
        w: &[T],
        g: &[T],
        t: &[u32],
        kept: Option<(Option<Vec<T>>, Vec<f64>)>,
        (n, hd, v): (usize, usize, usize),
        rows: usize,
        need_w: bool,
    ) -> Vec<T> {
        let _p = crate::profile::region("LM head log-softmax backward");
        let (mut whole, lse) = match kept {
            Some((z, l)) => (z, Some(l)),
            None => (None, None),
        };
        let len = n * hd + if need_w { v * hd } else { 0 };
        let mut out: Vec<T> = Vec::with_capacity(len);
        let par = gemm_par();
        let rows = rows.max(1);
        for r0 in (0..n).step_by(rows) {
            let rn = rows.min(n - r0);
            let hc = &h[r0 * hd..(r0 + rn) * hd];
            let mut dz = match whole.take() {
                Some(z) if rn == n => z,
                _ => head_logits(hc, w, rn, hd, v),
            };
            par_rows(&mut dz, v, |c0, chunk| {
                for (i, row) in chunk.chunks_mut(v).enumerate() {
                    let r = r0 + c0 + i;
                    let l = match &lse {
                        Some(l) => T::from_f64(l[r]),
                        None => row_lse(row),
                    };
                    let gr = g[r];
                    for x in row.iter_mut() {
                        *x = -(gr * (*x - l).exp());
                    }
                    row[t[r] as usize] += gr;
                }
            });
            // SAFETY: out has room for both blocks; chunk rows r0..r0+rn of ∂h are written
            // whole by the first gemm; ∂w (after the n·hd block) is written whole by the first
            // chunk and accumulated into by the others: dz is rn×v (read as is, then as dzᵀ
            // through swapped strides), w v×hd, hc rn×hd.
            unsafe {
                let p = out.as_mut_ptr();
                gemm_into(
                    rn,
                    hd,
                    v,
                    p.add(r0 * hd),
                    dz.as_ptr(),
                    1,
                    v,
                    w.as_ptr(),
                    1,
                    hd,
                );
                if need_w {
                    gemm_raw(
                        (v, hd, rn),
                        p.add(n * hd),
                        hd,
                        dz.as_ptr(),
                        (v, 1),
                        hc.as_ptr(),
                        (1, hd),
                        par,
                        r0 > 0,
                    );
                }
            }
            recycle_buf(dz);
        }
        if need_w && n == 0 {
            out.resize(len, T::zero());
        }
        // SAFETY: every element was written above (∂h row by row, ∂w by the chunks' gemms).
        unsafe { out.set_len(len) };
        out
    }
}

impl Kernel for LmHeadBwd {
    const NAME: &'static str = "fused-lm-head-logps-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let dims = head_dims(ins.shape(0), ins.shape(1), ins.shape(2))?;
        let (n, hd, v) = dims;
        let kept = self.kept.lock().ok().and_then(|mut s| s.take());
        let kept = kept.and_then(HeadKept::take::<T>);
        let (rows, need_w) = (self.rows, self.need_w);
        let (h, w, g) = (ins.get(0)?, ins.get(1)?, ins.get(2)?);
        let out = Self::bwd(h, w, g, &self.targets, kept, dims, rows, need_w);
        let len = n * hd + if need_w { v * hd } else { 0 };
        Ok((out, Shape::from(len)))
    }
}

/// Log-probabilities of the target tokens under the LM head: `out[n] = z[n, t_n] −
/// log Σ_v exp z[n, v]` with `z = h wᵀ` (`h: [N, H]`, `w: [V, H]`, targets `t: [N]` u32),
/// one graph node differentiable in `h` and `w` (a tied embedding matrix as `w` gets this
/// gradient summed with its other uses). The logits are formed [`HEAD_CHUNK_ELEMS`] at a time
/// (chunks of rows) in a buffer reused across calls, never as a tensor: the backward pass
/// turns them into `∂z` chunk by chunk (recomputing them when there was more than one chunk)
/// and returns `∂h = ∂z w` and `∂w = ∂zᵀ h` without the zero buffers and accumulations
/// candle's backward would spend on a logits tensor and its gradient. A `w` that carries no
/// gradient (a frozen head) gets none computed.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]), a target outside the vocabulary.
pub fn lm_head_logps(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    lm_head_logps_into(h, w, targets, None)
}

/// [`lm_head_logps`] whose backward pass leaves `∂w` in `sink` (when given) instead of
/// candle's store: no zero buffer and accumulation of `w`'s size there. `w` must then be the
/// variable itself (not a converted copy), so that the gradient reaches it.
///
/// # Errors
/// As [`lm_head_logps`].
pub fn lm_head_logps_into(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    sink: Option<&GradSink>,
) -> Result<Tensor> {
    lm_head_logps_chunked(h, w, targets, sink, HEAD_CHUNK_ELEMS)
}

/// [`lm_head_logps_into`] with chunks of at most `chunk_elems` logits (at least one row).
///
/// # Errors
/// As [`lm_head_logps`].
pub fn lm_head_logps_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    sink: Option<&GradSink>,
    chunk_elems: usize,
) -> Result<Tensor> {
    let v = w.dim(0)?;
    let head = LmHead {
        kept: std::sync::Mutex::new(None),
        sink: sink.cloned(),
        rows: head_chunk_rows(chunk_elems, v),
        keep: h.track_op() || w.track_op(),
    };
    apply(&[h, w, targets], head)
}
