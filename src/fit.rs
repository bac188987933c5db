//! Ordinary least squares in closed form (no LAPACK): the exponent of a power law
//! (Theorem 3.5) and the β of Appendix K.1 are both fits of this kind.

use serde::{Deserialize, Serialize};

use crate::error::{same_len, Error, Result};

/// A fitted line `y ≈ slope · x + intercept`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearFit {
    /// `β̂ = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²` (or `Σxy/Σx²` through the origin).
    pub slope: f64,
    /// `ĉ = ȳ − β̂ x̄` (0 through the origin).
    pub intercept: f64,
    /// `R² = 1 − SS_res / SS_tot`; defined as 1 when `SS_tot = 0` and the fit is exact.
    pub r_squared: f64,
    /// `max_i |y_i − (β̂ x_i + ĉ)|`.
    pub max_residual: f64,
    /// Number of points.
    pub n: usize,
}

fn check(x: &[f64], y: &[f64]) -> Result<()> {
    same_len(x.len(), y.len())?;
    for (what, v) in [("x", x), ("y", y)] {
        if let Some(index) = v.iter().position(|t| !t.is_finite()) {
            return Err(Error::NotFinite {
                index,
                what,
                value: v[index],
            });
        }
    }
    Ok(())
}

fn finish(x: &[f64], y: &[f64], slope: f64, intercept: f64, centered: bool) -> LinearFit {
    let n = x.len();
    let y_bar = if centered {
        y.iter().sum::<f64>() / n as f64
    } else {
        0.0
    };
    let (mut ss_res, mut ss_tot, mut max_residual) = (0.0, 0.0, 0.0f64);
    for (xi, yi) in x.iter().zip(y) {
        let e = yi - (slope * xi + intercept);
        ss_res += e * e;
        ss_tot += (yi - y_bar) * (yi - y_bar);
        max_residual = max_residual.max(e.abs());
    }
    let r_squared = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else if ss_res == 0.0 {
        1.0
    } else {
        0.0
    };
    LinearFit {
        slope,
        intercept,
        r_squared,
        max_residual,
        n,
    }
}

/// OLS with intercept: `min Σ (y_i − β x_i − c)²`.
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::NotFinite`], [`Error::Undetermined`] with fewer than
/// two distinct `x` values (the slope is then not identified).
pub fn ols(x: &[f64], y: &[f64]) -> Result<LinearFit> {
    check(x, y)?;
    let n = x.len();
    let x_bar = x.iter().sum::<f64>() / n.max(1) as f64;
    let y_bar = y.iter().sum::<f64>() / n.max(1) as f64;
    let sxx: f64 = x.iter().map(|xi| (xi - x_bar) * (xi - x_bar)).sum();
    if n < 2 || sxx == 0.0 || x.iter().all(|&xi| xi == x[0]) {
        return Err(Error::Undetermined(format!(
            "{n} point(s) with fewer than two distinct x values: the slope is not identified"
        )));
    }
    let sxy: f64 = x
        .iter()
        .zip(y)
        .map(|(xi, yi)| (xi - x_bar) * (yi - y_bar))
        .sum();
    let slope = sxy / sxx;
    Ok(finish(x, y, slope, y_bar - slope * x_bar, true))
}

/// OLS through the origin: `min Σ (y_i − β x_i)²`, `β̂ = Σ x y / Σ x²`. `R²` is the uncentered one.
///
/// # Errors
/// As [`ols`], with [`Error::Undetermined`] when every `x` is 0.
pub fn ols_through_origin(x: &[f64], y: &[f64]) -> Result<LinearFit> {
    check(x, y)?;
    let sxx: f64 = x.iter().map(|v| v * v).sum();
    if sxx == 0.0 {
        return Err(Error::Undetermined(
            "every x is 0: the slope is not identified".into(),
        ));
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    Ok(finish(x, y, sxy / sxx, 0.0, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_line() {
        let f = ols(&[1.0, 2.0, 3.0], &[3.0, 5.0, 7.0]).unwrap();
        assert_eq!((f.slope, f.intercept, f.r_squared), (2.0, 1.0, 1.0));
        assert!(matches!(
            ols(&[1.0, 1.0], &[0.0, 1.0]),
            Err(Error::Undetermined(_))
        ));
        assert!(matches!(ols(&[1.0], &[0.0]), Err(Error::Undetermined(_))));
        assert!(matches!(
            ols(&[1.0, 2.0], &[0.0]),
            Err(Error::LengthMismatch { .. })
        ));
        let g = ols_through_origin(&[1.0, -2.0], &[2.0, -4.0]).unwrap();
        assert_eq!(g.slope, 2.0);
    }
}
