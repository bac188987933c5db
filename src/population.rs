//! The exact **population** loss of an [`Objective`] over a finite outcome space, and the
//! minibatch loss of sampled pairs, with their gradients with respect to the logits.
//!
//! Data: `y_w ~ p_w` (chosen), `y_l ~ p_l` (rejected), a policy `π = softmax(f)`, every
//! completion one outcome (length 1). The loss of each pair is [`crate::loss::per_sequence`]
//! evaluated over dual numbers in `(log π(y_w), log π(y_l))`, so value and gradient come from
//! the one text of each loss:
//!
//! ```text
//! pairwise types   L = Σ_a Σ_b p_w(a) p_l(b) ℓ(a, b)
//! aot              L = ∫₀¹ ℓ_ε(β (F_X⁻¹(t) − F_Y⁻¹(t))) dt,  X = log π(a) − log π(b),
//!                      Y = log π_ref(a) − log π_ref(b), (a, b) ~ p_w × p_l
//! aot_unpaired     the same with X = u(a), a ~ p_w and Y = u(b), b ~ p_l
//! G_y      = ∂L/∂log π(y)
//! ∂L/∂f_j  = G_j − π_j Σ_y G_y                         (log-softmax)
//! ```
//!
//! AOT sorts the chosen and the rejected quantities of a batch and pairs them by rank: the
//! population form is that monotone (quantile) coupling, which the sorted batch of TRL converges
//! to as the batch grows; with equal masses `1/B` ([`sample_loss`]) it is exactly TRL's sorted
//! batch. The pairwise population loss is the exact expectation that minibatch training
//! estimates (Theorem 2.1, Theorem 3.4 (b)); `O(N²)` time, `O(N)` memory (AOT: `O(N²)` memory
//! and an `O(N² log N)` sort), summed in a fixed order (bit-identical across runs).

use crate::error::{same_len, Error, Result};
use crate::loss::per_sequence;
use crate::objective::{LossType, Objective, Rule};
use crate::policy::Policy;
use crate::reward::{side, Side};
use crate::scalar::{infallible, Dual};

/// Rejected outcomes per cache block of the pairwise double sum.
const PAIR_BLOCK: usize = 512;

/// A value with its partial derivatives in `log π(y_w)` (0) and `log π(y_l)` (1).
type D2 = Dual<f64, 2>;

/// The value and the gradient with respect to the logits of a population loss.
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationLoss {
    /// `L(f)`.
    pub value: f64,
    /// `∂L/∂f_k = G_k − π_k Σ_y G_y`, where `G_y = ∂L/∂log π(y)`.
    pub grad_logits: Vec<f64>,
}

/// One side per outcome `y` (log-probability `log π(y)`, the input `var` of the duals).
fn sides(o: &Objective, log_pi: &[f64], log_ref: Option<&[f64]>, var: usize) -> Vec<Side<D2>> {
    (0..log_pi.len())
        .map(|y| {
            infallible(side(
                o,
                D2::variable(log_pi[y], var),
                log_ref.map(|r| D2::constant(r[y])),
                D2::constant(1.0),
            ))
        })
        .collect()
}

/// The sides of every outcome (chosen: dual input 0, rejected: 1) and the objective's terms,
/// pairwise ones and coupled (AOT) ones apart.
struct Prepared {
    cs: Vec<Side<D2>>,
    rs: Vec<Side<D2>>,
    pairwise: Vec<(LossType, f64)>,
    coupled: Vec<(LossType, f64)>,
}

fn prepare(o: &Objective, log_pi: &[f64], log_ref: Option<&[f64]>) -> Prepared {
    let (pairwise, coupled) = o.terms().iter().partition(|(t, _)| t.is_pairwise());
    Prepared {
        cs: sides(o, log_pi, log_ref, 0),
        rs: sides(o, log_pi, log_ref, 1),
        pairwise,
        coupled,
    }
}

/// `Σ_k w_k ℓ_k(c, r)` over the pairwise loss types.
#[inline(always)]
fn pair_value(o: &Objective, terms: &[(LossType, f64)], c: &Side<D2>, r: &Side<D2>) -> D2 {
    if let [(t, w)] = terms {
        let l = infallible(per_sequence(*t, o, c, r));
        return if *w == 1.0 {
            l
        } else {
            D2 {
                v: w * l.v,
                d: [w * l.d[0], w * l.d[1]],
            }
        };
    }
    let mut acc = D2 {
        v: 0.0,
        d: [0.0, 0.0],
    };
    for &(t, w) in terms {
        let l = infallible(per_sequence(t, o, c, r));
        acc.v += w * l.v;
        acc.d[0] += w * l.d[0];
        acc.d[1] += w * l.d[1];
    }
    acc
}

/// An atom of a discrete distribution on the line: value, mass, and the pair it comes from.
#[derive(Debug, Clone, Copy)]
struct Atom {
    value: f64,
    mass: f64,
    a: usize,
    b: usize,
}

/// The monotone coupling of two discrete distributions of equal total mass: calls
/// `piece(x, y, m)` for each stretch of quantile levels of length `m` on which `F_X⁻¹` is the
/// atom `x` and `F_Y⁻¹` the atom `y`. Ties are broken by the atoms' order (stable sort).
fn quantile_coupling(
    mut xs: Vec<Atom>,
    mut ys: Vec<Atom>,
    mut piece: impl FnMut(&Atom, &Atom, f64),
) {
    xs.sort_by(|p, q| p.value.total_cmp(&q.value));
    ys.sort_by(|p, q| p.value.total_cmp(&q.value));
    let (mut i, mut j) = (0, 0);
    let (mut left_x, mut left_y) = (
        xs.first().map_or(0.0, |a| a.mass),
        ys.first().map_or(0.0, |a| a.mass),
    );
    while i < xs.len() && j < ys.len() {
        let m = left_x.min(left_y);
        if m > 0.0 {
            piece(&xs[i], &ys[j], m);
        }
        left_x -= m;
        left_y -= m;
        if left_x <= 0.0 {
            i += 1;
            left_x = xs.get(i).map_or(0.0, |a| a.mass);
        }
        if left_y <= 0.0 {
            j += 1;
            left_y = ys.get(j).map_or(0.0, |a| a.mass);
        }
    }
}

/// Adds one AOT term (`t` = `aot` or `aot_unpaired`, weight `w`) over the pairs `pairs`
/// (`(a, b, mass)`) to `value` and `g`.
#[allow(clippy::too_many_arguments)]
fn add_aot(
    t: LossType,
    w: f64,
    o: &Objective,
    pairs: &[(usize, usize, f64)],
    cs: &[Side<D2>],
    rs: &[Side<D2>],
    log_pi: &[f64],
    log_ref: Option<&[f64]>,
    value: &mut f64,
    g: &mut [f64],
) {
    let atom = |value, mass, a, b| Atom { value, mass, a, b };
    let (xs, ys): (Vec<Atom>, Vec<Atom>) = match t {
        LossType::Aot => {
            let refd = |a: usize, b: usize| match log_ref {
                Some(r) if !o.is_reference_free() => r[a] - r[b],
                _ => 0.0,
            };
            pairs
                .iter()
                .map(|&(a, b, m)| {
                    (
                        atom(log_pi[a] - log_pi[b], m, a, b),
                        atom(refd(a, b), m, a, b),
                    )
                })
                .unzip()
        }
        _ => pairs
            .iter()
            .map(|&(a, b, m)| {
                (
                    atom(cs[a].logratio.v, m, a, a),
                    atom(rs[b].logratio.v, m, b, b),
                )
            })
            .unzip(),
    };
    quantile_coupling(xs, ys, |x, y, m| {
        let l = match t {
            LossType::Aot => {
                // The policy's pair (x.a, x.b) against the reference's pair (y.a, y.b).
                let mut c = cs[x.a].clone();
                let mut r = rs[x.b].clone();
                if let (Some(_), Some(lr)) = (&c.ref_logps, log_ref) {
                    c.ref_logps = Some(D2::constant(lr[y.a]));
                    r.ref_logps = Some(D2::constant(lr[y.b]));
                }
                infallible(per_sequence(t, o, &c, &r))
            }
            _ => infallible(per_sequence(t, o, &cs[x.a], &rs[y.a])),
        };
        *value += w * m * l.v;
        g[x.a] += w * m * l.d[0];
        let rejected = if t == LossType::Aot { x.b } else { y.a };
        g[rejected] += w * m * l.d[1];
    });
}

fn check(o: &Objective, n: usize, reference: Option<&Policy>) -> Result<()> {
    if o.rule() == Rule::Sft {
        return Err(Error::invalid(
            "objective",
            "sft",
            "the population loss is of a preference objective (use the `sft` loss type)",
        ));
    }
    match reference {
        Some(r) => same_len(n, r.len()),
        None if o.needs_reference() => Err(Error::invalid(
            "reference",
            "none",
            "the log-ratio reward needs π_ref (or make the objective reference-free)",
        )),
        None => Ok(()),
    }
}

/// `∂L/∂f = G − π Σ G`.
fn to_logits(g: &[f64], pi: &Policy) -> Vec<f64> {
    let g_sum: f64 = g.iter().sum();
    let p = pi.probs();
    g.iter().zip(&p).map(|(gj, pj)| gj - pj * g_sum).collect()
}

/// The exact population loss of `o` at logits `f` (`π = softmax f`) and its gradient, with
/// data `y_w ~ chosen`, `y_l ~ rejected` and, for the log-ratio reward, `reference` = `π_ref`
/// (see the module docs). Summed in a fixed order: bit-identical across runs.
///
/// # Errors
/// [`Error::LengthMismatch`]; [`Error::NotFinite`] for non-finite logits;
/// [`Error::InvalidParameter`] for an `sft` rule or a missing reference.
pub fn population_loss(
    logits: &[f64],
    chosen: &Policy,
    rejected: &Policy,
    reference: Option<&Policy>,
    o: &Objective,
) -> Result<PopulationLoss> {
    same_len(logits.len(), chosen.len())?;
    chosen.check_same_space(rejected)?;
    check(o, logits.len(), reference)?;
    let pi = Policy::from_logits(logits)?;
    let log_pi = pi.log_probs();
    let log_ref = reference.map(Policy::log_probs);
    let Prepared {
        cs,
        rs,
        pairwise,
        coupled,
    } = prepare(o, log_pi, log_ref);
    let w = chosen.probs();
    let v = rejected.probs();
    let n = logits.len();
    let mut value = 0.0;
    let mut g = vec![0.0; n];
    if !pairwise.is_empty() {
        // Blocks of rejected outcomes stay in cache while every chosen outcome meets them.
        let mut g_rejected = vec![0.0; n];
        let (mut row_value, mut row_grad) = (vec![0.0; n], vec![0.0; n]);
        for b0 in (0..n).step_by(PAIR_BLOCK) {
            let block = b0..(b0 + PAIR_BLOCK).min(n);
            for a in 0..n {
                let (mut rv, mut rg) = (0.0, 0.0);
                let (ca, wa) = (&cs[a], w[a]);
                for b in block.clone() {
                    let l = pair_value(o, &pairwise, ca, &rs[b]);
                    let vb = v[b];
                    rv += vb * l.v;
                    rg += vb * l.d[0];
                    g_rejected[b] += wa * vb * l.d[1];
                }
                row_value[a] += rv;
                row_grad[a] += rg;
            }
        }
        for a in 0..n {
            value += w[a] * row_value[a];
            g[a] += w[a] * row_grad[a] + g_rejected[a];
        }
    }
    for (t, wt) in coupled {
        if t == LossType::Aot {
            let pairs: Vec<(usize, usize, f64)> = (0..n)
                .flat_map(|a| (0..n).map(move |b| (a, b)))
                .map(|(a, b)| (a, b, w[a] * v[b]))
                .collect();
            add_aot(
                t, wt, o, &pairs, &cs, &rs, log_pi, log_ref, &mut value, &mut g,
            );
        } else {
            // Unpaired: the chosen atoms carry p_w, the rejected atoms p_l.
            add_unpaired(wt, o, &w, &v, &cs, &rs, &mut value, &mut g);
        }
    }
    Ok(PopulationLoss {
        value,
        grad_logits: to_logits(&g, &pi),
    })
}

/// `aot_unpaired` with chosen atoms `u(a)` of mass `p_w(a)` and rejected atoms `u(b)` of mass
/// `p_l(b)`.
#[allow(clippy::too_many_arguments)]
fn add_unpaired(
    wt: f64,
    o: &Objective,
    w: &[f64],
    v: &[f64],
    cs: &[Side<D2>],
    rs: &[Side<D2>],
    value: &mut f64,
    g: &mut [f64],
) {
    // One atom per outcome y of a side: u(y) with the side's mass p(y), indexed (y, y).
    let atoms = |side: &[Side<D2>], mass: &[f64]| -> Vec<Atom> {
        (0..mass.len())
            .map(|y| Atom {
                value: side[y].logratio.v,
                mass: mass[y],
                a: y,
                b: y,
            })
            .collect()
    };
    let (xs, ys) = (atoms(cs, w), atoms(rs, v));
    quantile_coupling(xs, ys, |x, y, m| {
        let l = infallible(per_sequence(LossType::AotUnpaired, o, &cs[x.a], &rs[y.a]));
        *value += wt * m * l.v;
        g[x.a] += wt * m * l.d[0];
        g[y.a] += wt * m * l.d[1];
    });
}

/// The minibatch loss of the sampled pairs `(y_w,i, y_l,i)` (TRL's batch loss: the mean over
/// the batch, AOT sorting it) at `log π`, and `G_y = ∂L/∂log π(y)`.
///
/// # Errors
/// [`Error::OutOfRange`] for an outcome outside the space; see [`population_loss`].
pub fn sample_loss(
    log_pi: &[f64],
    reference: Option<&Policy>,
    o: &Objective,
    pairs: &[(usize, usize)],
) -> Result<(f64, Vec<f64>)> {
    let n = log_pi.len();
    check(o, n, reference)?;
    for &(a, b) in pairs {
        for y in [a, b] {
            if y >= n {
                return Err(Error::OutOfRange { index: y, len: n });
            }
        }
    }
    let log_ref = reference.map(Policy::log_probs);
    let Prepared {
        cs,
        rs,
        pairwise,
        coupled,
    } = prepare(o, log_pi, log_ref);
    let m = 1.0 / pairs.len().max(1) as f64;
    let mut value = 0.0;
    let mut g = vec![0.0; n];
    if !pairwise.is_empty() {
        for &(a, b) in pairs {
            let l = pair_value(o, &pairwise, &cs[a], &rs[b]);
            value += m * l.v;
            g[a] += m * l.d[0];
            g[b] += m * l.d[1];
        }
    }
    let weighted: Vec<(usize, usize, f64)> = pairs.iter().map(|&(a, b)| (a, b, m)).collect();
    for (t, wt) in coupled {
        add_aot(
            t, wt, o, &weighted, &cs, &rs, log_pi, log_ref, &mut value, &mut g,
        );
    }
    Ok((value, g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::ObjectiveSpec;

    fn fd_check(o: &Objective, reference: Option<&Policy>) {
        let chosen = Policy::from_logits(&[0.3, -1.0, 0.8, 0.1]).unwrap();
        let rejected = Policy::from_logits(&[-0.2, 0.5, 0.0, 1.0]).unwrap();
        // No ties among the log-ratios u (AOT's sorting is not differentiable at a tie).
        let f = [0.1, 0.4, -0.35, 0.2];
        let got = population_loss(&f, &chosen, &rejected, reference, o).unwrap();
        for j in 0..f.len() {
            let h = 1e-6;
            let mut fp = f;
            fp[j] += h;
            let mut fm = f;
            fm[j] -= h;
            let lp = population_loss(&fp, &chosen, &rejected, reference, o)
                .unwrap()
                .value;
            let lm = population_loss(&fm, &chosen, &rejected, reference, o)
                .unwrap()
                .value;
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - got.grad_logits[j]).abs() < 1e-7,
                "{} j={j}: {fd} vs {}",
                o.label(),
                got.grad_logits[j]
            );
        }
    }

    /// The dual-number gradient equals central finite differences, for every loss type (and
    /// the reference-free reward, and each f-divergence with DPO).
    #[test]
    fn gradient_matches_finite_differences() {
        let reference = Policy::from_logits(&[0.0, 0.2, -0.4, 0.3]).unwrap();
        for t in LossType::ALL {
            let mut o = Objective::loss(t, 0.7).unwrap();
            if t.uses_label_smoothing() && t != LossType::ExoPair {
                o = Objective::new(ObjectiveSpec {
                    label_smoothing: 0.1,
                    ..o.spec()
                })
                .unwrap();
            }
            fd_check(&o, Some(&reference));
            fd_check(&o.reference_free().unwrap(), None);
        }
        for f in crate::objective::FDivergence::ALL {
            let o = Objective::new(ObjectiveSpec {
                beta: 0.7,
                f_divergence_type: f,
                ..Default::default()
            })
            .unwrap();
            fd_check(&o, Some(&reference));
        }
    }

    /// With equal masses the coupling is the sorted pairing, TRL's batch AOT: the pair of
    /// ranks (i, i).
    #[test]
    fn aot_sample_loss_is_the_sorted_batch() {
        let o = Objective::loss(LossType::AotUnpaired, 0.5).unwrap();
        let log_pi = [-0.3f64, -1.2, -2.5, -1.9];
        let log_ref = Policy::from_logits(&[-1.0, -1.5, -1.2, -1.9]).unwrap();
        let pairs = [(0, 2), (3, 1), (2, 0)];
        let (value, _) = sample_loss(&log_pi, Some(&log_ref), &o, &pairs).unwrap();
        let lr = log_ref.log_probs();
        let mut cw: Vec<f64> = pairs.iter().map(|&(a, _)| log_pi[a] - lr[a]).collect();
        let mut cl: Vec<f64> = pairs.iter().map(|&(_, b)| log_pi[b] - lr[b]).collect();
        cw.sort_by(f64::total_cmp);
        cl.sort_by(f64::total_cmp);
        let want: f64 = cw
            .iter()
            .zip(&cl)
            .map(|(x, y)| crate::logspace::softplus(-0.5 * (x - y)))
            .sum::<f64>()
            / 3.0;
        assert!((value - want).abs() < 1e-15, "{value} vs {want}");
    }
}
