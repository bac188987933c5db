//! Linear layers on the `gemm` crate: `y = x wᵀ` (`x: [N, in]`, `w: [out, in]`), and
//! `y = r + x wᵀ` with the residual `r` accumulated into by the product; backward
//! `∂x = g w`, `∂w = gᵀ x` (and `∂r = g`). The slice forms of the gradients (`input_grad`,
//! `add_input_grad`, `weight_grad`) serve the decoder layer and its LoRA adapters.
//!
//! Public ops: [`linear`], [`linear_add`].

use candle_core::{bail, Result, Shape, Tensor};

use super::dispatch::{apply, par_copy, Ins, Kernel, Op};
use super::gemm::{gemm_add, gemm_into, gemm_vec};
use super::real::Real;

/// `y = x wᵀ` for `x: [N, in]`, `w: [out, in]`.
pub(super) struct Linear;

impl Linear {
    pub(super) fn fwd<T: Real>(x: &[T], w: &[T], n: usize, d_in: usize, d_out: usize) -> Vec<T> {
        // wᵀ read through swapped strides: column j of wᵀ is row j of w.
        gemm_vec((n, d_out, d_in), x, (1, d_in), w, (d_in, 1))
    }

    fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
        let (n, d_in) = x.dims2()?;
        let (d_out, w_in) = w.dims2()?;
        if w_in != d_in {
            bail!("linear: input {x:?} for weight {w:?}");
        }
        Ok((n, d_in, d_out))
    }
}

impl Kernel for Linear {
    const NAME: &'static str = "fused-linear";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, d_in, d_out) = Self::dims(ins.shape(0), ins.shape(1))?;
        let out = Self::fwd(ins.get(0)?, ins.get(1)?, n, d_in, d_out);
        Ok((out, Shape::from((n, d_out))))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (gx, gw) = linear_grads(args[0], args[1], &grad.contiguous()?)?;
        Ok(vec![Some(gx), Some(gw)])
    }
}

/// `(∂/∂x, ∂/∂w)` of `y = x wᵀ` from `g = ∂/∂y` (contiguous), by [`LinearBwd`].
fn linear_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, d_in, d_out) = Linear::dims(x.shape(), w.shape())?;
    let both = x.apply_op3_no_bwd(w, g, &Op(LinearBwd))?;
    let gx = both.narrow(0, 0, n * d_in)?.reshape((n, d_in))?;
    let gw = both
        .narrow(0, n * d_in, d_out * d_in)?
        .reshape((d_out, d_in))?;
    Ok((gx, gw))
}

/// Gradients of `y = x wᵀ` from `g = ∂/∂y`, concatenated flat: `∂/∂x = g w` (`[N, in]`), then
/// `∂/∂w = gᵀ x` (`[out, in]`).
struct LinearBwd;

impl LinearBwd {
    fn bwd<T: Real>(x: &[T], w: &[T], g: &[T], n: usize, d_in: usize, d_out: usize) -> Vec<T> {
        let len = n * d_in + d_out * d_in;
        let mut out: Vec<T> = Vec::with_capacity(len);
        // SAFETY: out has capacity for both blocks, each written whole by gemm: g is n×d_out
        // (read as is, then as gᵀ through swapped strides), w d_out×d_in, x n×d_in.
        unsafe {
            let p = out.as_mut_ptr();
            gemm_into(n, d_in, d_out, p, g.as_ptr(), 1, d_out, w.as_ptr(), 1, d_in);
            gemm_into(
                d_out,
                d_in,
                n,
                p.add(n * d_in),
                g.as_ptr(),
                d_out,
                1,
                x.as_ptr(),
                1,
                d_in,
            );
            out.set_len(len);
        }
        out
    }
}

impl Kernel for LinearBwd {
    const NAME: &'static str = "fused-linear-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, d_in, d_out) = Linear::dims(ins.shape(0), ins.shape(1))?;
        if ins.shape(2).dims() != [n, d_out] {
            bail!("linear backward: gradient {:?}", ins.shape(2));
        }
        let out = Self::bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, n, d_in, d_out);
        Ok((out, Shape::from(n * d_in + d_out * d_in)))
    }
}

/// A linear map `y = x wᵀ` (`x: [N, in]`, `w: [out, in]` → `[N, out]`) through the `gemm`
/// crate, differentiable in `x` and `w`: the weight's gradient comes out in `w`'s own layout
/// (candle's `x.matmul(&w.t())` adds a transpose node whose backward is a strided
/// accumulation), and no output is zero-filled before the product is written. A few rows
/// without a gradient (a decoding step) run on [`super::rows`]' kernel instead.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if super::rows::applies(x, &[w]) {
        return apply(&[x, w], super::rows::LinearRows);
    }
    apply(&[x, w], Linear)
}

// ---------------------------------------------------------------------------------------------
// linear layer added to a residual stream
// ---------------------------------------------------------------------------------------------

/// `y = r + x wᵀ` (see [`linear_add`]).
pub(super) struct LinearAdd;

impl LinearAdd {
    pub(super) fn fwd<T: Real>(
        x: &[T],
        w: &[T],
        r: &[T],
        n: usize,
        d_in: usize,
        d_out: usize,
    ) -> Vec<T> {
        let mut y = par_copy(r);
        gemm_add((n, d_out, d_in), &mut y, x, (1, d_in), w, (d_in, 1));
        y
    }
}

impl Kernel for LinearAdd {
    const NAME: &'static str = "fused-linear-add";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let (n, d_in, d_out) = Linear::dims(ins.shape(0), ins.shape(1))?;
        if ins.shape(2).dims() != [n, d_out] {
            bail!(
                "linear_add: residual {:?} for output [{n}, {d_out}]",
                ins.shape(2)
            );
        }
        let out = Self::fwd(ins.get(0)?, ins.get(1)?, ins.get(2)?, n, d_in, d_out);
        Ok((out, Shape::from((n, d_out))))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = grad.contiguous()?;
        let (gx, gw) = linear_grads(args[0], args[1], &g)?;
        Ok(vec![Some(gx), Some(gw), Some(g)])
    }
}

/// `y = r + x wᵀ` for `x: [N, in]`, `w: [out, in]` and a residual `r: [N, out]`: the linear
/// layer of [`linear`] accumulated by the gemm straight into a copy of the residual, one graph
/// node instead of two (no separate add, with its zero buffers and accumulations in backward).
/// A few rows without a gradient (a decoding step) run on [`super::rows`]' kernel.
///
/// # Errors
/// Shapes, dtypes (f32/f64 CPU only, see [`super::enabled`]).
pub fn linear_add(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Tensor> {
    if super::rows::applies(x, &[w, r]) {
        return apply(&[x, w, r], super::rows::LinearAddRows);
    }
    apply(&[x, w, r], LinearAdd)
}

/// `∂/∂x = g w` for `y = x wᵀ` (`g: [n, out]`, `w: [out, in]` → `[n, in]`).
pub(super) fn input_grad<T: Real>(g: &[T], w: &[T], n: usize, d_out: usize, d_in: usize) -> Vec<T> {
    gemm_vec((n, d_in, d_out), g, (1, d_out), w, (1, d_in))
}

/// `dst += g w`: a further use's `∂/∂x` (`g: [n, out]`, `w: [out, in]`, `dst: [n, in]`).
///
/// # Panics
/// If a slice is shorter than its size.
pub(super) fn add_input_grad<T: Real>(
    dst: &mut [T],
    g: &[T],
    w: &[T],
    n: usize,
    d_out: usize,
    d_in: usize,
) {
    gemm_add((n, d_in, d_out), dst, g, (1, d_out), w, (1, d_in));
}

/// `∂/∂w = gᵀ x` for `y = x wᵀ` (`g: [n, out]` read as `gᵀ`, `x: [n, in]` → `[out, in]`).
pub(super) fn weight_grad<T: Real>(
    g: &[T],
    x: &[T],
    n: usize,
    d_out: usize,
    d_in: usize,
) -> Vec<T> {
    gemm_vec((d_out, d_in, n), g, (d_out, 1), x, (1, d_in))
}
