//! The head split of a projection: `[B·l, h_in·d] → [B, h_out, l, d]`, output head `o` a copy
//! of input head `o / (h_out / h_in)` (grouped-query repetition), with rotate-half RoPE
//! `y_j = x_j cos_j + rot(x)_j sin_j`, `rot(x) = [−x_{d/2..}, x_{..d/2}]`, when asked; backward
//! sums the repeated heads' gradients through the transposed rotation.
//!
//! Public op: [`split_heads`].

use candle_core::{bail, Result, Shape, Tensor};

use super::dispatch::{apply, par_rows, par_zeros, Ins, Kernel, Op};
use super::real::Real;

/// `[B·l, h_in·d]` → `[B, h_out, l, d]`, output head `o` reading input head `o / (h_out/h_in)`,
/// with rotate-half RoPE applied when `rope` is set.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub(super) b: usize,
    pub(super) l: usize,
    pub(super) h_in: usize,
    pub(super) h_out: usize,
    pub(super) d: usize,
    pub(super) rope: bool,
}

impl Heads {
    fn check(&self, x: &Shape, cos: &Shape, sin: &Shape) -> Result<()> {
        let ok = x.dims() == [self.b * self.l, self.h_in * self.d]
            && cos.dims() == [self.l, self.d]
            && sin.dims() == [self.l, self.d]
            && self.h_in > 0
            && self.h_out % self.h_in == 0
            && self.d % 2 == 0;
        if !ok {
            bail!(
                "split_heads: input {x:?}, tables {cos:?} {sin:?} for {} heads of {} ({} out)",
                self.h_in,
                self.d,
                self.h_out
            );
        }
        Ok(())
    }

    /// `(l, h_in, h_out, d)`, the repetition `h_out / h_in` and the rotation's half `d / 2`.
    fn sizes(&self) -> (usize, usize, usize, usize, usize, usize) {
        let (h_in, h_out, d) = (self.h_in, self.h_out, self.d);
        (self.l, h_in, h_out, d, h_out / h_in, d / 2)
    }

    pub(super) fn fwd<T: Real>(&self, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let _p = crate::profile::region("head split + RoPE");
        let (l, h_in, h_out, d, rep, half) = self.sizes();
        let mut out = par_zeros(self.b * h_out * l * d);
        par_rows(&mut out, d, |r0, o| {
            for (k, orow) in o.chunks_mut(d).enumerate() {
                let r = r0 + k; // (bi, ho, i)
                let i = r % l;
                let ho = (r / l) % h_out;
                let bi = r / (l * h_out);
                let src = &x[(bi * l + i) * h_in * d + (ho / rep) * d..][..d];
                if self.rope {
                    let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                    for j in 0..d {
                        let rot = if j < half {
                            -src[j + half]
                        } else {
                            src[j - half]
                        };
                        orow[j] = src[j] * c[j] + rot * s[j];
                    }
                } else {
                    orow.copy_from_slice(src);
                }
            }
        });
        out
    }

    pub(super) fn bwd<T: Real>(&self, g: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let _p = crate::profile::region("head split + RoPE backward");
        let (l, h_in, h_out, d, rep, half) = self.sizes();
        let w = h_in * d;
        let mut out = par_zeros(self.b * l * w);
        par_rows(&mut out, w, |r0, o| {
            for (k, orow) in o.chunks_mut(w).enumerate() {
                let r = r0 + k; // (bi, i)
                let (bi, i) = (r / l, r % l);
                let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                for hk in 0..h_in {
                    let acc = &mut orow[hk * d..(hk + 1) * d];
                    for ho in hk * rep..(hk + 1) * rep {
                        let gr = &g[((bi * h_out + ho) * l + i) * d..][..d];
                        if self.rope {
                            for j in 0..d {
                                let t = if j < half {
                                    gr[j + half] * s[j + half]
                                } else {
                                    -(gr[j - half] * s[j - half])
                                };
                                acc[j] += gr[j] * c[j] + t;
                            }
                        } else {
                            for j in 0..d {
                                acc[j] += gr[j];
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

struct HeadsFwd(Heads);
struct HeadsBwd(Heads);

impl Kernel for HeadsFwd {
    const NAME: &'static str = "fused-split-heads";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let h = self.0;
        h.check(ins.shape(0), ins.shape(1), ins.shape(2))?;
        let out = h.fwd(ins.get(0)?, ins.get(1)?, ins.get(2)?);
        Ok((out, Shape::from((h.b, h.h_out, h.l, h.d))))
    }

    fn grads(&self, args: &[&Tensor], _res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (cos, sin) = (args[1], args[2]);
        let g = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Op(HeadsBwd(self.0)))?;
        Ok(vec![Some(g), None, None])
    }
}

impl Kernel for HeadsBwd {
    const NAME: &'static str = "fused-split-heads-bwd";

    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)> {
        let h = self.0;
        if ins.shape(0).dims() != [h.b, h.h_out, h.l, h.d] {
            bail!("split_heads backward: gradient {:?}", ins.shape(0));
        }
        let out = h.bwd(ins.get(0)?, ins.get(1)?, ins.get(2)?);
        Ok((out, Shape::from((h.b * h.l, h.h_in * h.d))))
    }
}

/// Splits the heads of a projection, `x: [B·l, h_in·d]` → `[B, h_out, l, d]` (contiguous),
/// output head `o` a copy of input head `o / (h_out / h_in)` (grouped-query attention's
/// key/value repetition), with rotate-half RoPE (`cos`, `sin`: `[l, d]` tables, see
/// [`crate::model::apply_rope`]) when `rope` is set; differentiable in `x` (the backward sums
/// the repeated heads). Replaces reshape → transpose → copy → RoPE (7 ops) → repeat.
///
/// # Errors
/// Shapes (`h_out` a multiple of `h_in`, even `d`), dtypes (f32/f64 CPU only, see [`super::enabled`]).
#[allow(clippy::too_many_arguments)]
pub fn split_heads(
    x: &Tensor,
    b: usize,
    l: usize,
    h_in: usize,
    h_out: usize,
    cos: &Tensor,
    sin: &Tensor,
    rope: bool,
) -> Result<Tensor> {
    let d = cos.dim(1)?;
    let heads = Heads {
        b,
        l,
        h_in,
        h_out,
        d,
        rope,
    };
    apply(&[x, cos, sin], HeadsFwd(heads))
}
