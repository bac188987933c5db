//! The number types the loss formulas are written over: **one text per formula**, many
//! arithmetics (nalgebra's approach: the math is written once against a trait over the scalar).
//!
//! | trait | operations | implemented by |
//! |---|---|---|
//! | [`Arith`] | `+ − × ÷`, `a·x + b`, `max(x, 0)`, `|x|` | `f64`, `BigRational`, [`Dual`], the trainer's tensors |
//! | [`Real`] | [`Arith`] and `exp`, `ln(1 + x)`, `σ(x)`, and the batch operations `sort`, `mean`, `sum` | `f64`, `Dual<f64>`, [`Batch`], the trainer's tensors |
//!
//! A value is a *batch*: one number for `f64` and [`Dual`] (a batch of one: `sort`, `mean` and
//! `sum` are the identity), `B` numbers for the trainer's `[B]` tensors (element-wise
//! arithmetic, `mean`/`sum` reduce to a scalar that broadcasts). Every operation is fallible
//! (tensor ops can fail); the error type of `f64`, `BigRational` and [`Dual`] is
//! [`Infallible`], which [`infallible`] unwraps.
//!
//! [`Dual`] carries a value and `K` partial derivatives (forward-mode automatic
//! differentiation): evaluating a loss text over duals gives its value **and** its gradient, so
//! the derivatives of the loss shapes are not written a second time. The subgradients at the
//! kinks follow PyTorch and candle: `max(x, 0)' = |x|' = 1` at `x = 0` (then
//! `softplus'(0) = 1 − ½ = ½`, exactly σ(0)).

use std::convert::Infallible;

use num_traits::{FromPrimitive, One, Signed, Zero};

use crate::Rational;

/// Unwraps a result that cannot fail.
#[inline(always)]
pub fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(e) => match e {},
    }
}

/// Field arithmetic with `f64` coefficients (algebraic: exact over rationals).
pub trait Arith: Clone + Sized {
    /// What an operation can fail with ([`Infallible`] for numbers).
    type Error;
    /// `x + y`.
    fn add(&self, y: &Self) -> Result<Self, Self::Error>;
    /// `x − y`.
    fn sub(&self, y: &Self) -> Result<Self, Self::Error>;
    /// `x · y`.
    fn mul(&self, y: &Self) -> Result<Self, Self::Error>;
    /// `x / y`.
    fn div(&self, y: &Self) -> Result<Self, Self::Error>;
    /// `a · x + b` (exact over rationals: every `f64` is a dyadic rational).
    fn affine(&self, a: f64, b: f64) -> Result<Self, Self::Error>;
    /// `max(x, 0)`.
    fn relu(&self) -> Result<Self, Self::Error>;
    /// `|x|`.
    fn abs(&self) -> Result<Self, Self::Error>;
    /// `min(x, c)` (derivative 1 below `c`, 0 above: PyTorch's `clamp(max=c)`).
    fn min_const(&self, c: f64) -> Result<Self, Self::Error>;
    /// `x²`.
    fn sqr(&self) -> Result<Self, Self::Error> {
        self.mul(self)
    }
    /// `−x`.
    fn neg(&self) -> Result<Self, Self::Error> {
        self.affine(-1.0, 0.0)
    }
    /// `a · x`.
    fn scale(&self, a: f64) -> Result<Self, Self::Error> {
        self.affine(a, 0.0)
    }
}

/// [`Arith`] with the transcendental functions of the losses and the batch reductions.
pub trait Real: Arith {
    /// `eˣ`.
    fn exp(&self) -> Result<Self, Self::Error>;
    /// `ln(1 + x)` for `x > −1`.
    fn ln_1p(&self) -> Result<Self, Self::Error>;
    /// The logistic function `σ(x) = 1 / (1 + e^{−x})`, stable for every `x`.
    fn sigmoid(&self) -> Result<Self, Self::Error>;
    /// The batch sorted in increasing order (a batch of one: itself).
    fn sort(&self) -> Result<Self, Self::Error>;
    /// The batch mean (a batch of one: itself).
    fn mean(&self) -> Result<Self, Self::Error>;
    /// The batch sum (a batch of one: itself).
    fn sum(&self) -> Result<Self, Self::Error>;
}

impl Arith for f64 {
    type Error = Infallible;
    #[inline(always)]
    fn add(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self + y)
    }
    #[inline(always)]
    fn sub(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self - y)
    }
    #[inline(always)]
    fn mul(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self * y)
    }
    #[inline(always)]
    fn div(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self / y)
    }
    #[inline(always)]
    fn affine(&self, a: f64, b: f64) -> Result<Self, Infallible> {
        Ok(a * self + b)
    }
    #[inline(always)]
    fn relu(&self) -> Result<Self, Infallible> {
        Ok(if *self > 0.0 { *self } else { 0.0 })
    }
    #[inline(always)]
    fn abs(&self) -> Result<Self, Infallible> {
        Ok(f64::abs(*self))
    }
    #[inline(always)]
    fn min_const(&self, c: f64) -> Result<Self, Infallible> {
        Ok(if *self < c { *self } else { c })
    }
    #[inline(always)]
    fn neg(&self) -> Result<Self, Infallible> {
        Ok(-self)
    }
    #[inline(always)]
    fn scale(&self, a: f64) -> Result<Self, Infallible> {
        Ok(a * self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(&self) -> Result<Self, Infallible> {
        Ok(f64::exp(*self))
    }
    #[inline(always)]
    fn ln_1p(&self) -> Result<Self, Infallible> {
        Ok(f64::ln_1p(*self))
    }
    #[inline(always)]
    fn sigmoid(&self) -> Result<Self, Infallible> {
        Ok(sigmoid(*self))
    }
    #[inline(always)]
    fn sort(&self) -> Result<Self, Infallible> {
        Ok(*self)
    }
    #[inline(always)]
    fn mean(&self) -> Result<Self, Infallible> {
        Ok(*self)
    }
    #[inline(always)]
    fn sum(&self) -> Result<Self, Infallible> {
        Ok(*self)
    }
}

/// An `f64` as the exact rational it is.
///
/// # Panics
/// For a non-finite `x` (the formulas' coefficients are validated finite).
pub fn rational(x: f64) -> Rational {
    Rational::from_f64(x).expect("finite coefficient")
}

impl Arith for Rational {
    type Error = Infallible;
    fn add(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self + y)
    }
    fn sub(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self - y)
    }
    fn mul(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self * y)
    }
    fn div(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(self / y)
    }
    fn affine(&self, a: f64, b: f64) -> Result<Self, Infallible> {
        Ok(rational(a) * self + rational(b))
    }
    fn relu(&self) -> Result<Self, Infallible> {
        Ok(if self.is_positive() {
            self.clone()
        } else {
            Rational::zero()
        })
    }
    fn abs(&self) -> Result<Self, Infallible> {
        Ok(Signed::abs(self))
    }
    fn min_const(&self, c: f64) -> Result<Self, Infallible> {
        let c = rational(c);
        Ok(if *self < c { self.clone() } else { c })
    }
}

/// The numbers a [`Dual`] can be built over: exact, ordered, with `0` and `1`.
pub trait DualBase: Arith<Error = Infallible> + PartialOrd + Zero + One {}
impl DualBase for f64 {}
impl DualBase for Rational {}

/// A forward-mode dual number: a value `v` and its partial derivatives `∂v/∂x_i` with respect
/// to `K` inputs. Each operation applies the chain rule, so a formula evaluated over duals
/// returns its gradient with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dual<T, const K: usize> {
    /// The value.
    pub v: T,
    /// `∂v/∂x_i`, `i < K`.
    pub d: [T; K],
}

/// The infallible arithmetic of a [`DualBase`] (named calls: `T`'s `std::ops` would shadow
/// the [`Arith`] methods).
fn add_<T: DualBase>(x: &T, y: &T) -> T {
    infallible(Arith::add(x, y))
}
fn sub_<T: DualBase>(x: &T, y: &T) -> T {
    infallible(Arith::sub(x, y))
}
fn mul_<T: DualBase>(x: &T, y: &T) -> T {
    infallible(Arith::mul(x, y))
}
fn div_<T: DualBase>(x: &T, y: &T) -> T {
    infallible(Arith::div(x, y))
}
fn affine_<T: DualBase>(x: &T, a: f64, b: f64) -> T {
    infallible(Arith::affine(x, a, b))
}

impl<T: DualBase, const K: usize> Dual<T, K> {
    /// A constant (every partial 0).
    pub fn constant(v: T) -> Self {
        Self {
            v,
            d: std::array::from_fn(|_| T::zero()),
        }
    }

    /// The input `x_i` itself (`∂/∂x_i = 1`, the others 0).
    pub fn variable(v: T, i: usize) -> Self {
        Self {
            v,
            d: std::array::from_fn(|j| if j == i { T::one() } else { T::zero() }),
        }
    }

    /// `(f(v), f'(v) · ∂v)`: the chain rule for a unary function with value `fv` and
    /// derivative `dfv` at `v`.
    #[inline(always)]
    fn chain(&self, fv: T, dfv: &T) -> Self {
        Self {
            v: fv,
            d: std::array::from_fn(|i| mul_(dfv, &self.d[i])),
        }
    }

    /// The step `[v ≥ 0]` as `0` or `1` (the subgradient convention at 0).
    fn step(&self) -> T {
        if self.v >= T::zero() {
            T::one()
        } else {
            T::zero()
        }
    }
}

impl<T: DualBase, const K: usize> Arith for Dual<T, K> {
    type Error = Infallible;
    #[inline(always)]
    fn add(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(Self {
            v: add_(&self.v, &y.v),
            d: std::array::from_fn(|i| add_(&self.d[i], &y.d[i])),
        })
    }
    #[inline(always)]
    fn sub(&self, y: &Self) -> Result<Self, Infallible> {
        Ok(Self {
            v: sub_(&self.v, &y.v),
            d: std::array::from_fn(|i| sub_(&self.d[i], &y.d[i])),
        })
    }
    #[inline(always)]
    fn mul(&self, y: &Self) -> Result<Self, Infallible> {
        // (uv)' = u'v + uv'
        Ok(Self {
            v: mul_(&self.v, &y.v),
            d: std::array::from_fn(|i| add_(&mul_(&self.d[i], &y.v), &mul_(&self.v, &y.d[i]))),
        })
    }
    #[inline(always)]
    fn div(&self, y: &Self) -> Result<Self, Infallible> {
        // (u/v)' = (u' − (u/v) v') / v
        let q = div_(&self.v, &y.v);
        Ok(Self {
            d: std::array::from_fn(|i| div_(&sub_(&self.d[i], &mul_(&q, &y.d[i])), &y.v)),
            v: q,
        })
    }
    #[inline(always)]
    fn affine(&self, a: f64, b: f64) -> Result<Self, Infallible> {
        Ok(Self {
            v: affine_(&self.v, a, b),
            d: std::array::from_fn(|i| infallible(Arith::scale(&self.d[i], a))),
        })
    }
    #[inline(always)]
    fn neg(&self) -> Result<Self, Infallible> {
        Ok(Self {
            v: infallible(Arith::neg(&self.v)),
            d: std::array::from_fn(|i| infallible(Arith::neg(&self.d[i]))),
        })
    }
    #[inline(always)]
    fn scale(&self, a: f64) -> Result<Self, Infallible> {
        Ok(Self {
            v: infallible(Arith::scale(&self.v, a)),
            d: std::array::from_fn(|i| infallible(Arith::scale(&self.d[i], a))),
        })
    }
    #[inline(always)]
    fn relu(&self) -> Result<Self, Infallible> {
        let s = self.step();
        Ok(self.chain(infallible(Arith::relu(&self.v)), &s))
    }
    #[inline(always)]
    fn abs(&self) -> Result<Self, Infallible> {
        // sign(x), with |x|'(0) = 1 (candle's convention).
        let s = affine_(&self.step(), 2.0, -1.0);
        Ok(self.chain(infallible(Arith::abs(&self.v)), &s))
    }
    #[inline(always)]
    fn min_const(&self, c: f64) -> Result<Self, Infallible> {
        let c = affine_(&T::zero(), 0.0, c);
        Ok(if self.v < c {
            self.clone()
        } else {
            Self::constant(c)
        })
    }
}

impl<const K: usize> Real for Dual<f64, K> {
    #[inline(always)]
    fn exp(&self) -> Result<Self, Infallible> {
        let e = self.v.exp();
        Ok(self.chain(e, &e))
    }
    #[inline(always)]
    fn ln_1p(&self) -> Result<Self, Infallible> {
        Ok(self.chain(self.v.ln_1p(), &(1.0 / (1.0 + self.v))))
    }
    #[inline(always)]
    fn sigmoid(&self) -> Result<Self, Infallible> {
        let s = sigmoid(self.v);
        Ok(self.chain(s, &(s * sigmoid(-self.v))))
    }
    fn sort(&self) -> Result<Self, Infallible> {
        Ok(self.clone())
    }
    fn mean(&self) -> Result<Self, Infallible> {
        Ok(self.clone())
    }
    fn sum(&self) -> Result<Self, Infallible> {
        Ok(self.clone())
    }
}

/// A batch of `f64` values, element-wise (a batch of one broadcasts): the loss texts over a
/// whole batch on the host, as the trainer runs them over `[B]` tensors (AOT sorts it).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch(pub Vec<f64>);

impl Batch {
    fn zip(&self, y: &Self, f: impl Fn(f64, f64) -> f64) -> Result<Self, Infallible> {
        let (a, b) = (&self.0, &y.0);
        Ok(Batch(match (a.len(), b.len()) {
            (1, _) => b.iter().map(|&v| f(a[0], v)).collect(),
            (_, 1) => a.iter().map(|&u| f(u, b[0])).collect(),
            _ => {
                assert_eq!(a.len(), b.len(), "batches of different sizes");
                a.iter().zip(b).map(|(&u, &v)| f(u, v)).collect()
            }
        }))
    }

    fn map(&self, f: impl Fn(f64) -> f64) -> Result<Self, Infallible> {
        Ok(Batch(self.0.iter().map(|&x| f(x)).collect()))
    }
}

impl Arith for Batch {
    type Error = Infallible;
    fn add(&self, y: &Self) -> Result<Self, Infallible> {
        self.zip(y, |a, b| a + b)
    }
    fn sub(&self, y: &Self) -> Result<Self, Infallible> {
        self.zip(y, |a, b| a - b)
    }
    fn mul(&self, y: &Self) -> Result<Self, Infallible> {
        self.zip(y, |a, b| a * b)
    }
    fn div(&self, y: &Self) -> Result<Self, Infallible> {
        self.zip(y, |a, b| a / b)
    }
    fn affine(&self, a: f64, b: f64) -> Result<Self, Infallible> {
        self.map(|x| infallible(x.affine(a, b)))
    }
    fn relu(&self) -> Result<Self, Infallible> {
        self.map(|x| infallible(Arith::relu(&x)))
    }
    fn abs(&self) -> Result<Self, Infallible> {
        self.map(f64::abs)
    }
    fn min_const(&self, c: f64) -> Result<Self, Infallible> {
        self.map(|x| infallible(x.min_const(c)))
    }
}

impl Real for Batch {
    fn exp(&self) -> Result<Self, Infallible> {
        self.map(f64::exp)
    }
    fn ln_1p(&self) -> Result<Self, Infallible> {
        self.map(f64::ln_1p)
    }
    fn sigmoid(&self) -> Result<Self, Infallible> {
        self.map(sigmoid)
    }
    fn sort(&self) -> Result<Self, Infallible> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        Ok(Batch(v))
    }
    fn mean(&self) -> Result<Self, Infallible> {
        Ok(Batch(vec![
            self.0.iter().sum::<f64>() / self.0.len() as f64,
        ]))
    }
    fn sum(&self) -> Result<Self, Infallible> {
        Ok(Batch(vec![self.0.iter().sum()]))
    }
}

/// Logistic function `σ(t) = 1 / (1 + e^{−t})`, stable for any `t`: the
/// primitive of `f64`'s [`Real::sigmoid`], re-exported as [`crate::logspace::sigmoid`].
pub fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type D = Dual<f64, 2>;

    /// `f(x, y) = e^{x·y} / (1 + |x − y|) + σ(x) + ln(1 + y²) + max(x − 2y, 0)`, differentiated
    /// by the duals and by central finite differences.
    #[test]
    fn dual_derivatives_match_finite_differences() {
        fn f<S: Real>(x: &S, y: &S) -> Result<S, S::Error> {
            let a = x.mul(y)?.exp()?.div(&x.sub(y)?.abs()?.affine(1.0, 1.0)?)?;
            let b = x.sigmoid()?.add(&y.sqr()?.ln_1p()?)?;
            a.add(&b)?.add(&x.sub(&y.affine(2.0, 0.0)?)?.relu()?)
        }
        for (x, y) in [(0.3, -0.7), (1.9, 0.4), (-2.0, -1.5), (0.5, 0.1)] {
            let got = infallible(f(&D::variable(x, 0), &D::variable(y, 1)));
            let h = 1e-6;
            let fx = (infallible(f(&(x + h), &y)) - infallible(f(&(x - h), &y))) / (2.0 * h);
            let fy = (infallible(f(&x, &(y + h))) - infallible(f(&x, &(y - h)))) / (2.0 * h);
            assert!(
                (got.d[0] - fx).abs() < 1e-7,
                "{x} {y}: {} vs {fx}",
                got.d[0]
            );
            assert!(
                (got.d[1] - fy).abs() < 1e-7,
                "{x} {y}: {} vs {fy}",
                got.d[1]
            );
            assert_eq!(got.v, infallible(f(&x, &y)));
        }
    }

    /// Exact duals over rationals: `(x² − 3x) / (x + 1)` has derivative `(x² + 2x − 3)/(x + 1)²`.
    #[test]
    fn rational_duals_are_exact() {
        let x = Rational::new(3.into(), 7.into());
        let dx = Dual::<Rational, 1>::variable(x.clone(), 0);
        let f = infallible(
            infallible(infallible(dx.sqr()).sub(&infallible(dx.affine(3.0, 0.0))))
                .div(&infallible(dx.affine(1.0, 1.0))),
        );
        let one = Rational::one();
        let three = Rational::from_integer(3.into());
        let two = Rational::from_integer(2.into());
        let want = (&x * &x + &two * &x - &three) / ((&x + &one) * (&x + &one));
        assert_eq!(f.d[0], want);
    }
}
