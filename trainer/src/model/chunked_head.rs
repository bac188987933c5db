//! The LM head with log-softmax and pick of the targets in chunks, from candle's own ops: the
//! path the CUDA build runs (and the CPU with the fused kernels off).
//!
//! Logits `z = h Wᵀ` exist only as one `[rows, cols]` chunk at a time: positions in chunks of
//! `rows`, and when one row of the vocabulary alone would exceed the budget, the vocabulary in
//! chunks of `cols` with an online log-sum-exp (running maximum `m` and sum `s`, rescaled by
//! `exp(m_old − m_new)` at each chunk). The backward pass is hand-written
//! ([`crate::recompute::with_backward`]): it recomputes each chunk's logits from the kept
//! log-sum-exps and forms `∂h = −(g ⊙ p) W + g ⊙ W[t]`, `∂W = −(g ⊙ p)ᵀ h + scatter(t, g ⊙ h)`
//! with `p = exp(z − lse)`, again one chunk at a time. The weight's gradient accumulates in
//! the accumulation dtype (f32 under bf16 compute) and goes to the gradient sink when one is
//! given (no zero buffer of the table's size in candle's store).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};
use crate::fused::GradSink;

/// How a head computation is cut: `rows` positions by `cols` vocabulary entries per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    /// Positions per chunk.
    pub rows: usize,
    /// Vocabulary entries per chunk.
    pub cols: usize,
}

/// Fewest positions per chunk before the vocabulary is cut instead.
pub const MIN_ROWS: usize = 16;

impl Chunks {
    /// The chunking of `n` positions over a vocabulary of `v` under a budget of `elems` logits
    /// per chunk: whole vocabulary rows while at least [`MIN_ROWS`] of them fit, else
    /// [`MIN_ROWS`] positions by `elems / MIN_ROWS` vocabulary entries.
    pub fn of(n: usize, v: usize, elems: usize) -> Self {
        let elems = elems.max(1);
        let full_rows = elems / v.max(1);
        if full_rows >= MIN_ROWS.min(n.max(1)) {
            Chunks {
                rows: full_rows.clamp(1, n.max(1)),
                cols: v.max(1),
            }
        } else {
            let rows = MIN_ROWS.min(n.max(1));
            Chunks {
                rows,
                cols: (elems / rows).clamp(1, v.max(1)),
            }
        }
    }
}

/// Chunk `c` of `0..len` in chunks of `size`: `(start, length)`.
fn spans(len: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(size.max(1))
        .map(move |s| (s, size.min(len - s)))
}

/// `[n]` f32 on `h`'s device: 1 where `lo ≤ t < lo + len`, else 0; and the targets made
/// chunk-local (clamped into the chunk), `[n, 1]` u32.
fn local_targets(
    t: &[u32],
    lo: usize,
    len: usize,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let inside: Vec<f32> = t
        .iter()
        .map(|&x| f32::from(u8::from((x as usize) >= lo && (x as usize) < lo + len)))
        .collect();
    let local: Vec<u32> = t
        .iter()
        .map(|&x| (x as usize).saturating_sub(lo).min(len - 1) as u32)
        .collect();
    let n = t.len();
    Ok((
        Tensor::from_vec(inside, n, dev)?,
        Tensor::from_vec(local, (n, 1), dev)?,
    ))
}

/// Log-probabilities of the targets, `out[n] = z[n, t_n] − log Σ_v exp z[n, v]` with
/// `z = h Wᵀ` (`h: [N, H]` in the compute dtype, `w: [V, H]` the head's weight in its own
/// dtype, cast chunk by chunk; `targets: [N]` u32), in the accumulation dtype, formed
/// `elems` logits at a time (see the module docs). Differentiable in `h` and `w` (when they
/// carry gradients); `w`'s gradient goes to `sink` when one is given (then `w` must be the
/// variable itself).
///
/// # Errors
/// Shapes; a target outside the vocabulary; tensor errors.
pub fn token_logps(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    elems: usize,
    sink: Option<&GradSink>,
) -> Result<Tensor> {
    token_logps_capped(h, w, targets, elems, sink, None)
}

/// [`token_logps`] of soft-capped logits (Gemma2's `final_logit_softcapping` `c`):
/// `z = c · tanh(h Wᵀ / c)` before the log-softmax; `None` is [`token_logps`]. The backward
/// pass multiplies each logit's gradient by the cap's derivative `1 − tanh²(h Wᵀ / c)`.
///
/// # Errors
/// As [`token_logps`].
pub fn token_logps_capped(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    elems: usize,
    sink: Option<&GradSink>,
    cap: Option<f64>,
) -> Result<Tensor> {
    let (n, hs) = h.dims2()?;
    let (v, w_hs) = w.dims2()?;
    if w_hs != hs || targets.dims() != [n] {
        return Err(Error::InvalidArgument(format!(
            "LM head: hidden {:?}, weight {:?}, targets {:?}",
            h.dims(),
            w.dims(),
            targets.dims()
        )));
    }
    let t: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
        return Err(Error::InvalidArgument(format!(
            "LM head: target {bad} outside the vocabulary of {v}"
        )));
    }
    let ch = Chunks::of(n, v, elems);
    let (out, lse) = forward(&h.detach(), &w.detach(), &t, ch, cap)?;
    if !h.track_op() && !w.track_op() {
        return Ok(out);
    }
    let sink = sink.cloned();
    let bwd: crate::recompute::BackwardFn = Arc::new(move |h, w, g| {
        let (gh, gw) = backward(h, w, &t, &lse, g, ch, w.track_op(), cap)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let gh = h.track_op().then_some(gh);
        match (gw, &sink) {
            (Some(gw), Some(s)) => {
                s.push(w, gw)?;
                Ok((gh, None))
            }
            (gw, _) => Ok((gh, gw)),
        }
    });
    Ok(crate::recompute::with_backward(&out, h, w, bwd)?)
}

/// `log Σ_v softmax(z_n)_v²` for `z = h Wᵀ` (`h: [N, H]`, `w: [V, H]`; soft-capped with `cap`
/// as the log-probs are), without gradient, in
/// the accumulation dtype, formed `elems` logits at a time: TRL's `log_sum_sq_probs` (WPO's
/// weights).
///
/// # Formula
/// `log Σ_v π_v² = log Σ_v e^{2 z_v} − 2 log Σ_v e^{z_v}`, each log-sum-exp over vocabulary
/// chunks combined by a log-sum-exp of the chunks'.
///
/// # Errors
/// Shapes; tensor errors.
pub fn log_sum_sq_probs(h: &Tensor, w: &Tensor, elems: usize, cap: Option<f64>) -> Result<Tensor> {
    let (h, w) = (h.detach(), w.detach());
    let (n, hs) = h.dims2()?;
    let (v, w_hs) = w.dims2()?;
    if w_hs != hs {
        return Err(Error::InvalidArgument(format!(
            "LM head: hidden {:?}, weight {:?}",
            h.dims(),
            w.dims()
        )));
    }
    let ch = Chunks::of(n, v, elems);
    let mut out = Vec::new();
    for (r0, rn) in spans(n, ch.rows) {
        let hr = h.narrow(0, r0, rn)?;
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for (c0, cn) in spans(v, ch.cols) {
            let z = logits(&hr, &w, c0, cn, cap)?;
            one.push(z.log_sum_exp(D::Minus1)?.unsqueeze(1)?);
            two.push(z.affine(2.0, 0.0)?.log_sum_exp(D::Minus1)?.unsqueeze(1)?);
        }
        let lse = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(Tensor::cat(parts, 1)?.log_sum_exp(D::Minus1)?)
        };
        out.push((lse(&two)? - lse(&one)?.affine(2.0, 0.0)?)?);
    }
    if out.is_empty() {
        return Ok(Tensor::zeros(0, accumulation_dtype(h.dtype()), h.device())?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// The logits chunk `h_r W_cᵀ` in the accumulation dtype (soft-capped with `cap`).
fn logits(hr: &Tensor, w: &Tensor, c0: usize, cn: usize, cap: Option<f64>) -> Result<Tensor> {
    let wc = w.narrow(0, c0, cn)?.to_dtype(hr.dtype())?;
    let z = hr
        .matmul(&wc.t()?)?
        .to_dtype(accumulation_dtype(hr.dtype()))?;
    Ok(match cap {
        Some(c) => z.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?,
        None => z,
    })
}

/// The cap's derivative at soft-capped logits `z = c · tanh(·)`: `1 − (z / c)²`.
fn cap_slope(z: &Tensor, c: f64) -> Result<Tensor> {
    Ok(z.affine(1.0 / c, 0.0)?.sqr()?.affine(-1.0, 1.0)?)
}

/// Values: the targets' log-probs and the rows' log-sum-exps, `[N]` each (accumulation dtype).
fn forward(
    h: &Tensor,
    w: &Tensor,
    t: &[u32],
    ch: Chunks,
    cap: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = h.dims2()?;
    let v = w.dim(0)?;
    let dev = h.device();
    let acc = accumulation_dtype(h.dtype());
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (r0, rn) in spans(n, ch.rows) {
        let hr = h.narrow(0, r0, rn)?;
        let tr = &t[r0..r0 + rn];
        let mut m: Option<Tensor> = None;
        let mut s: Option<Tensor> = None;
        let mut picked: Option<Tensor> = None;
        for (c0, cn) in spans(v, ch.cols) {
            let z = logits(&hr, w, c0, cn, cap)?; // [rn, cn]
            let (inside, local) = local_targets(tr, c0, cn, dev)?;
            let zt = (z.gather(&local, 1)?.squeeze(1)? * inside.to_dtype(acc)?)?;
            picked = Some(match picked {
                None => zt,
                Some(p) => (p + zt)?,
            });
            let zm = z.max_keepdim(D::Minus1)?; // [rn, 1]
            let m_new = match &m {
                None => zm,
                Some(m) => m.maximum(&zm)?,
            };
            let sum = z.broadcast_sub(&m_new)?.exp()?.sum_keepdim(D::Minus1)?;
            s = Some(match (s, &m) {
                (Some(s), Some(m_old)) => ((s * (m_old - &m_new)?.exp()?)? + sum)?,
                _ => sum,
            });
            m = Some(m_new);
        }
        let (m, s, picked) = match (m, s, picked) {
            (Some(m), Some(s), Some(p)) => (m, s, p),
            _ => return Err(Error::InvalidArgument("LM head: empty vocabulary".into())),
        };
        let lse = (s.log()? + m)?.squeeze(1)?;
        outs.push((picked - &lse)?);
        lses.push(lse);
    }
    if outs.is_empty() {
        let z = Tensor::zeros(0, acc, dev)?;
        return Ok((z.clone(), z));
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 0)?))
}

/// `(∂h, ∂W)` of `Σ_n g_n out_n` (see the module docs); `∂W` only with `need_w`.
#[allow(clippy::too_many_arguments)]
fn backward(
    h: &Tensor,
    w: &Tensor,
    t: &[u32],
    lse: &Tensor,
    g: &Tensor,
    ch: Chunks,
    need_w: bool,
    cap: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, hs) = h.dims2()?;
    let v = w.dim(0)?;
    let dev = h.device();
    let cd = h.dtype();
    let acc = accumulation_dtype(cd);
    let g = g.to_dtype(acc)?;
    let tt = Tensor::from_vec(t.to_vec(), n, dev)?;
    let gcol = g.unsqueeze(1)?;
    let wt = w.index_select(&tt, 0)?;
    // The target terms: ∂h += g' ⊙ W[t], ∂W[t] += g' ⊙ h, with g' = g (times the cap's slope
    // at the target's logit).
    let gt = match cap {
        Some(c) => {
            let zt = (h.to_dtype(acc)? * wt.to_dtype(acc)?)?.sum_keepdim(1)?;
            let zt = zt.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?;
            (&gcol * cap_slope(&zt, c)?)?
        }
        None => gcol.clone(),
    };
    let mut dh = wt.to_dtype(acc)?.broadcast_mul(&gt)?; // [n, H]
    let mut dw_chunks = Vec::new();
    for (c0, cn) in spans(v, ch.cols) {
        let wc = w.narrow(0, c0, cn)?.to_dtype(cd)?;
        let mut dwc: Option<Tensor> = None;
        let mut dh_rows = Vec::new();
        for (r0, rn) in spans(n, ch.rows) {
            let hr = h.narrow(0, r0, rn)?;
            let z = logits(&hr, w, c0, cn, cap)?;
            let p = z
                .broadcast_sub(&lse.narrow(0, r0, rn)?.unsqueeze(1)?)?
                .exp()?;
            // dz = −g ⊙ p (the target term is added separately), through the cap.
            let p = match cap {
                Some(c) => (p * cap_slope(&z, c)?)?,
                None => p,
            };
            let dz = p
                .broadcast_mul(&gcol.narrow(0, r0, rn)?)?
                .neg()?
                .to_dtype(cd)?;
            dh_rows.push(dz.matmul(&wc)?.to_dtype(acc)?);
            if need_w {
                let part = dz.t()?.matmul(&hr)?.to_dtype(acc)?; // [cn, H]
                dwc = Some(match dwc {
                    None => part,
                    Some(d) => (d + part)?,
                });
            }
        }
        if !dh_rows.is_empty() {
            dh = (dh + Tensor::cat(&dh_rows, 0)?)?;
        }
        if let Some(d) = dwc {
            dw_chunks.push(d);
        } else if need_w {
            dw_chunks.push(Tensor::zeros((cn, hs), acc, dev)?);
        }
    }
    let dw = if need_w {
        let d = Tensor::cat(&dw_chunks, 0)?;
        let target = h.to_dtype(acc)?.broadcast_mul(&gt)?;
        Some(d.index_add(&tt, &target, 0)?.to_dtype(w.dtype())?)
    } else {
        None
    };
    Ok((dh.to_dtype(cd)?, dw))
}
