//! The optimizers: RMSprop with global gradient-norm clipping (sampled mode, as Appendix J.1),
//! and L-BFGS on the exact population loss (population mode). Every reduction is a sequential
//! loop in index order, so results are bit-identical from run to run.

/// RMSprop as in PyTorch (`alpha`, `eps`, no momentum, no weight decay, not centered):
///
/// ```text
/// v ← α v + (1 − α) g²
/// θ ← θ − η g / (√v + ε)
/// ```
#[derive(Debug, Clone)]
pub struct RmsProp {
    /// Learning rate `η` (constant).
    pub lr: f64,
    /// Smoothing `α`.
    pub alpha: f64,
    /// `ε`.
    pub eps: f64,
    v: Vec<f64>,
}

impl RmsProp {
    /// A fresh optimizer for `dim` parameters (`v = 0`).
    pub fn new(dim: usize, lr: f64, alpha: f64, eps: f64) -> Self {
        Self {
            lr,
            alpha,
            eps,
            v: vec![0.0; dim],
        }
    }

    /// One update of `theta` with gradient `g`.
    pub fn step(&mut self, theta: &mut [f64], g: &[f64]) {
        for ((t, v), &gi) in theta.iter_mut().zip(self.v.iter_mut()).zip(g) {
            *v = self.alpha * *v + (1.0 - self.alpha) * gi * gi;
            *t -= self.lr * gi / (v.sqrt() + self.eps);
        }
    }
}

/// `‖g‖₂`, summed in index order.
pub fn norm(g: &[f64]) -> f64 {
    g.iter().fold(0.0, |a, x| a + x * x).sqrt()
}

/// Global gradient-norm clipping (PyTorch `clip_grad_norm_`): if `‖g‖ > max_norm`, scale `g` by
/// `max_norm / (‖g‖ + 1e-6)`. Returns the norm before clipping. `max_norm = ∞` disables it.
pub fn clip_grad_norm(g: &mut [f64], max_norm: f64) -> f64 {
    let n = norm(g);
    if n > max_norm {
        let k = max_norm / (n + 1e-6);
        g.iter_mut().for_each(|x| *x *= k);
    }
    n
}

/// Why L-BFGS stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `‖∇L‖∞ ≤ tol`.
    Converged,
    /// The iteration budget ran out.
    MaxIterations,
    /// No step along the search direction decreased the loss (flat or non-smooth region, or
    /// the float resolution of `L` reached).
    LineSearch,
    /// `L` changed by less than `1e-15 · max(1, |L|)` in each of the last 10 iterations: the
    /// float resolution of the loss is reached.
    Stalled,
}

/// L-BFGS (two-loop recursion, memory `m`) with a backtracking Armijo line search.
///
/// `f(θ) -> (L, ∇L)`; `observe(iteration, θ)` is called at iteration 0 and after every accepted
/// step. Returns the final `θ`, the number of iterations and why it stopped.
pub fn lbfgs<F, O>(
    mut theta: Vec<f64>,
    mut f: F,
    max_iter: usize,
    tol: f64,
    memory: usize,
    mut observe: O,
) -> crate::Result<(Vec<f64>, usize, Stop)>
where
    F: FnMut(&[f64]) -> crate::Result<(f64, Vec<f64>)>,
    O: FnMut(usize, &[f64]),
{
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).fold(0.0, |s, (x, y)| s + x * y);
    let (mut value, mut grad) = f(&theta)?;
    observe(0, &theta);
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let mut stalled = 0;
    for it in 1..=max_iter {
        if stalled >= 10 {
            return Ok((theta, it - 1, Stop::Stalled));
        }
        if grad.iter().fold(0.0f64, |m, g| m.max(g.abs())) <= tol {
            return Ok((theta, it - 1, Stop::Converged));
        }
        // Two-loop recursion: d = −H g.
        let mut q = grad.clone();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = match hist.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => 1.0 / norm(&grad).max(1e-300),
        };
        q.iter_mut().for_each(|x| *x *= gamma);
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|x| -x).collect();
        let mut slope = dot(&grad, &d);
        if slope >= 0.0 {
            // Not a descent direction (curvature lost): restart from steepest descent.
            hist.clear();
            let k = 1.0 / norm(&grad).max(1e-300);
            d = grad.iter().map(|g| -g * k).collect();
            slope = dot(&grad, &d);
        }
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..60 {
            let trial: Vec<f64> = theta.iter().zip(&d).map(|(t, di)| t + step * di).collect();
            let (v, g) = f(&trial)?;
            if v <= value + 1e-4 * step * slope {
                accepted = Some((trial, v, g));
                break;
            }
            step *= 0.5;
        }
        let Some((next, v, g)) = accepted else {
            return Ok((theta, it - 1, Stop::LineSearch));
        };
        let s: Vec<f64> = next.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g.iter().zip(&grad).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-300 {
            if hist.len() == memory {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        if (value - v).abs() <= 1e-15 * value.abs().max(1.0) {
            stalled += 1;
        } else {
            stalled = 0;
        }
        theta = next;
        value = v;
        grad = g;
        observe(it, &theta);
    }
    Ok((theta, max_iter, Stop::MaxIterations))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbfgs_minimizes_a_quadratic() {
        // L = Σ k (θ_k − k)² / 2, k = 1..5 (condition number 5).
        let f = |t: &[f64]| {
            let mut v = 0.0;
            let g = t
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let k = (i + 1) as f64;
                    v += k * (x - k) * (x - k) / 2.0;
                    k * (x - k)
                })
                .collect();
            Ok((v, g))
        };
        let (t, _, stop) = lbfgs(vec![0.0; 5], f, 100, 1e-12, 5, |_, _| {}).unwrap();
        assert_eq!(stop, Stop::Converged);
        for (i, x) in t.iter().enumerate() {
            assert!((x - (i + 1) as f64).abs() < 1e-10);
        }
    }

    #[test]
    fn clipping_caps_the_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((norm(&g) - 1.0).abs() < 1e-6);
        let mut h = vec![0.3, 0.4];
        clip_grad_norm(&mut h, 1.0);
        assert_eq!(h, vec![0.3, 0.4]);
    }
}
