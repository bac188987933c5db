//! Gradients as a list aligned with the model's variables sorted by name: collection from a
//! `GradStore`, accumulation, the global norm, clipping, and the inner-product space the
//! library's DPO-PG projection (Appendix H) runs on, all reduced in that fixed order so that
//! runs are bit-identical.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use difinfo::dpo_pg::InnerProduct;

pub mod reduce;

use crate::error::{Error, Result};
use crate::train::policy::scalar_f64;

/// One gradient per variable, in the variables' (sorted-name) order, held in f32 (f64 for f64
/// variables).
#[derive(Debug, Clone)]
pub struct Grads(pub Vec<Tensor>);

/// The dtype gradients are accumulated in for a variable of dtype `d`.
pub fn grad_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl Grads {
    /// A zero gradient for each variable, in [`grad_dtype`] (a rank without examples in a
    /// micro-batch; a variable the backward pass did not reach).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn zeros(vars: &[(String, Var)]) -> Result<Grads> {
        let g = vars
            .iter()
            .map(|(_, v)| Self::zero(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Grads(g))
    }

    fn zero(var: &Var) -> candle_core::Result<Tensor> {
        Tensor::zeros(var.shape(), grad_dtype(var.dtype()), var.device())
    }

    /// `scale · ∇` for each variable from a backward pass. A variable without a gradient gets
    /// zeros; the names of such variables are returned (a model whose variables all take part
    /// in the loss returns none: see the notes on candle's ops without backward).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn from_store(
        store: &GradStore,
        vars: &[(String, Var)],
        scale: f64,
    ) -> Result<(Self, Vec<String>)> {
        let mut out = Vec::with_capacity(vars.len());
        let mut missing = Vec::new();
        for (name, var) in vars {
            let dt = grad_dtype(var.dtype());
            match store.get(var.as_tensor()) {
                Some(g) => {
                    let g = g.to_dtype(dt)?;
                    out.push(if scale == 1.0 {
                        g
                    } else {
                        g.affine(scale, 0.0)?
                    });
                }
                None => {
                    missing.push(name.clone());
                    out.push(Self::zero(var)?);
                }
            }
        }
        Ok((Grads(out), missing))
    }

    /// `self + other`, elementwise per variable.
    ///
    /// # Errors
    /// Different lengths or shapes.
    pub fn add(&self, other: &Grads) -> Result<Grads> {
        check_len(self, other)?;
        Ok(Grads(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// `Σ_v Σ_i a_vi · b_vi`, the sum over variables in f64 in name order; each variable's
    /// sum in f64 in fixed chunks on f32/f64 CPU tensors ([`reduce::dot`]), in the tensor
    /// dtype by candle's ops elsewhere.
    ///
    /// # Errors
    /// Different lengths or shapes.
    pub fn dot(&self, other: &Grads) -> Result<f64> {
        Ok(ordered_sum(&self.dots(other)?))
    }

    /// `Σ_i a_vi · b_vi` for each variable `v`, each in f64 as [`Grads::dot`] sums them.
    ///
    /// # Errors
    /// Different lengths or shapes.
    pub fn dots(&self, other: &Grads) -> Result<Vec<f64>> {
        check_len(self, other)?;
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| {
                Ok(match reduce::dot(a, b)? {
                    Some(d) => d,
                    None => scalar_f64(&(a * b)?.sum_all()?)?,
                })
            })
            .collect()
    }

    /// `sqrt(Σ_v ‖g_v‖²)` with each `‖g_v‖²` summed in the tensors' own dtype (candle's
    /// ops): infinite when a square or a sum overflows it (f32 values of magnitude ≳ 1e19),
    /// not only when a value is infinite or NaN. The trainer's check before writing weights:
    /// weights that large overflow in any forward pass.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn global_norm_in_dtype(&self) -> Result<f64> {
        let mut s = 0.0;
        for g in &self.0 {
            s += scalar_f64(&g.sqr()?.sum_all()?)?;
        }
        Ok(s.sqrt())
    }

    /// The global L2 norm `sqrt(Σ_v ‖g_v‖²)` (PyTorch's `clip_grad_norm_` total norm).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn global_norm(&self) -> Result<f64> {
        Ok(self.dot(self)?.sqrt())
    }

    /// `c · g` for every variable.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn scale(&self, c: f64) -> Result<Grads> {
        Ok(Grads(
            self.0
                .iter()
                .map(|g| match reduce::scale(g, c)? {
                    Some(t) => Ok(t),
                    None => g.affine(c, 0.0),
                })
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// PyTorch's `clip_grad_norm_(max_norm)` given the pre-clip norm: multiplies by
    /// `min(1, max_norm / (norm + 1e-6))`; `max_norm ≤ 0` disables clipping (HF semantics).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn clip(self, max_norm: f64, norm: f64) -> Result<Grads> {
        if max_norm <= 0.0 {
            return Ok(self);
        }
        let coef = max_norm / (norm + 1e-6);
        if coef >= 1.0 {
            return Ok(self);
        }
        // The gradients are this value's own: scaled in place where the kernel applies, else
        // one at a time (never a second copy of all of them).
        let mut out = Vec::with_capacity(self.0.len());
        for g in self.0 {
            if reduce::scale_in_place(&g, coef)? {
                out.push(g);
            } else {
                let s = match reduce::scale(&g, coef)? {
                    Some(t) => t,
                    None => g.affine(coef, 0.0)?,
                };
                drop(g);
                out.push(s);
            }
        }
        Ok(Grads(out))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no variable.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `Σ_v x_v` from 0 in the variables' order: the one summation of per-variable values, so a
/// sum over a rank's shard (zeros elsewhere, summed over ranks first) is bit-identical to the
/// sum over all variables in one process.
pub fn ordered_sum(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |s, v| s + v)
}

fn check_len(a: &Grads, b: &Grads) -> Result<()> {
    if a.0.len() != b.0.len() {
        return Err(Error::InvalidArgument(format!(
            "gradient lists of {} and {} variables",
            a.0.len(),
            b.0.len()
        )));
    }
    Ok(())
}

/// What the DPO-PG projection did at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProjectionStats {
    /// Whether `⟨g_w, g_l⟩ > 0` and `‖g_l‖ > 0`, i.e. whether `g ≠ g_w`.
    pub active: bool,
    /// `⟨g_w, g_l⟩` over all parameters.
    pub dot: f64,
    /// `‖g_l‖²` over all parameters.
    pub norm_l_sq: f64,
}

/// The gradient set as an inner-product space: the library's DPO-PG projection
/// ([`difinfo::dpo_pg::project`]) runs on it, with `⟨x, y⟩` = [`Grads::dot`] and `x − k y` by
/// the fused parallel kernel [`reduce::sub_scaled`] (candle's ops elsewhere).
impl InnerProduct for Grads {
    type Coef = f64;
    type Error = Error;

    fn dot(&self, y: &Self) -> Result<f64> {
        Grads::dot(self, y)
    }

    fn sub_scaled(&self, y: &Self, k: &f64) -> Result<Self> {
        check_len(self, y)?;
        Ok(Grads(
            self.0
                .iter()
                .zip(&y.0)
                .map(|(w, l)| match reduce::sub_scaled(w, l, *k)? {
                    Some(t) => Ok(t),
                    None => w - l.affine(*k, 0.0)?,
                })
                .collect::<candle_core::Result<_>>()?,
        ))
    }
}

/// The DPO-PG projection over **all** parameters at once (Appendix H): the library's
/// [`difinfo::dpo_pg::project`] on the gradient set, i.e. on the concatenation of every
/// variable's gradient in name order.
///
/// # Errors
/// Different variable lists.
pub fn project<G>(g_w: &G, g_l: &G) -> Result<(G, ProjectionStats)>
where
    G: InnerProduct<Coef = f64, Error = Error>,
{
    let p = difinfo::dpo_pg::project(g_w, g_l)?;
    Ok((
        p.gradient,
        ProjectionStats {
            active: p.active,
            dot: p.dot,
            norm_l_sq: p.norm_l_sq,
        },
    ))
}
