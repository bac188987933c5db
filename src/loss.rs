//! Every preference loss of TRL 1.x's `DPOTrainer`, written **once**, generic over the number
//! type ([`Real`]): `f64` and dual numbers here (the exact population loss and its gradient,
//! [`crate::population`]), `[B]` candle tensors in the trainer. A reader finds each `ℓ` in
//! exactly one place: [`per_sequence`] (the algebraic ones, [`ipo`], [`hinge`], [`sppo_hard`],
//! in functions of their own that also run over exact rationals).
//!
//! # Formulas
//! With the scores `s = f(u)` and log-ratios `u` of [`crate::reward`] (`w`: chosen, `l`:
//! rejected), `Δ = s_w − s_l`, `z = β Δ`, `Δ̄ = s_w/|y_w| − s_l/|y_l|` (per-token means, the
//! lengths clamped at 1), ε the label smoothing, `c = 1/(2β)`:
//!
//! ```text
//! sigmoid       −log σ(z)                              (ε > 0: (1−ε)(−log σ(z)) + ε(−log σ(−z)))
//! hinge         max(0, 1 − z)
//! ipo           (Δ̄ − c)²
//! exo_pair      σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
//! nca_pair      −log σ(β u_w) − ½ log σ(−β u_w) − ½ log σ(−β u_l)
//! robust        ((1−ε)(−log σ(z)) − ε(−log σ(−z))) / (1 − 2ε)
//! bco_pair      −log σ(β u_w) − log σ(−β u_l)
//! sppo_hard     (u_w − c)² + (u_l + c)²
//! aot           ℓ_ε(β δ_i),  δ = sort_i(log π(y_w) − log π(y_l)) − sort_i(log π_ref(y_w) − log π_ref(y_l))
//! aot_unpaired  ℓ_ε(β δ_i),  δ = sort_i(u_w) − sort_i(u_l)
//! apo_zero      1 − σ(β u_w) + σ(β u_l)
//! apo_down      σ(β u_w) + 1 − σ(β (u_w − u_l))
//! discopop      (1 − m)(−log σ(z)) + m e^{−z},  m = σ(z/τ)
//! sft           −Σ_i log π(y_w,i) / Σ_i |y_w,i|       (mean NLL per chosen token; RPO's term)
//! sigmoid_norm  −log σ(β Δ̄)
//!
//! ℓ_ε(z) = (1−ε)(−log σ(z)) + ε(−log σ(−z))      (conservative DPO)
//! L = Σ_k w_k · mean_i ℓ_k(pair i)                 (TRL's loss_type with loss_weights)
//! L = Σ_k w_k · mean_i ω_i ℓ_k(pair i),  ω_i = w(y_w,i) w(y_l,i)     (WPO, use_weighting)
//! w(y) = exp((1/|y|) Σ_t (log π(y_t | y_<t) − log Σ_v π(v | y_<t)²))   (no gradient)
//! log π(y) = Σ_{t ≤ m} log π(y_t) + α Σ_{t > m} log π(y_t),  m = min(|y_w|, |y_l|)  (LD-DPO)
//! ```
//!
//! LD-DPO's α (TRL's `ld_alpha`) applies to the policy's and the reference's log-probs alike
//! (`log π` and `log π_ref` above, hence every log-ratio, reward and logged `logps/*`); the
//! `sft` term and WPO's `w(y)` read the plain per-token log-probs, as TRL's do.
//!
//! as in TRL's `DPOTrainer._compute_loss` (TRL 1.16; `sigmoid` with ε > 0 is TRL 0.x's
//! conservative DPO, which TRL 1.x dropped). `ipo` and `sigmoid_norm` normalize by length;
//! `aot` reads the raw log-probabilities and `nca_pair`, `bco_pair`, `sppo_hard`,
//! `aot_unpaired`, `apo_*` the log-ratios, not the f-divergence scores, as TRL does (an
//! f-divergence other than `reverse_kl` is refused for them, as TRL refuses it). DiscoPOP's `m e^{−z}` is computed as
//! `e^{−z + log σ(z/τ)}` (equal, and finite where TRL's product is `0 · ∞`).
//! Sources: DPO (Rafailov et al. 2023), SLiC (Zhao et al. 2023), IPO (Azar et al. 2023, Eq. 17),
//! EXO (Ji et al. 2024, Eq. 16), NCA (Chen et al. 2024), Robust DPO (Chowdhury et al. 2024),
//! BCO (Jung et al. 2024), SPPO (Wu et al. 2024), AOT (Melnyk et al. 2024), APO (D'Oosterlinck
//! et al. 2024, Eqs. 7–8), DiscoPOP (Chris Lu et al. 2024, Eq. 5).
//!
//! The population loss `Σ_a Σ_b p_w(a) p_l(b) ℓ(a, b)` (Theorem 2.1, Theorem 3.4 (b)) and its
//! gradient are in [`crate::population`]: it evaluates these same texts over dual numbers.

use num_traits::Zero;

use crate::error::Error;
use crate::logspace::Softplus;
use crate::objective::{LossType, Objective};
use crate::policy::ExactPolicy;
use crate::reward::{reward, Side};
use crate::scalar::{Arith, Real};
use crate::Rational;

/// Conservative DPO's `ℓ_ε(z) = (1−ε)(−log σ(z)) + ε(−log σ(−z))` (`−log σ(z)` at ε = 0):
/// DPO's loss when each label is flipped with probability ε. For `ε > 0` its minimizer is the
/// finite margin `z* = log((1−ε)/ε)`.
///
/// # Errors
/// The number type's.
#[inline(always)]
pub fn smoothed_sigmoid<S: Real>(z: &S, eps: f64) -> Result<S, S::Error> {
    let clean = z.neg()?.softplus()?;
    if eps == 0.0 {
        return Ok(clean);
    }
    clean
        .affine(1.0 - eps, 0.0)?
        .add(&z.softplus()?.affine(eps, 0.0)?)
}

/// `max(x, 1)`, TRL's `clamp(min=1)` of a token count.
fn at_least_one<S: Arith>(x: &S) -> Result<S, S::Error> {
    x.affine(1.0, -1.0)?.relu()?.affine(1.0, 1.0)
}

/// `Δ̄ = s_w/|y_w| − s_l/|y_l|` (lengths clamped at 1).
fn mean_delta<S: Arith>(c: &Side<S>, r: &Side<S>) -> Result<S, S::Error> {
    c.score
        .div(&at_least_one(&c.len)?)?
        .sub(&r.score.div(&at_least_one(&r.len)?)?)
}

/// IPO (Azar et al. 2023, Eq. 17; TRL's length-normalized form): `(Δ̄ − 1/(2β))²`.
/// Algebraic, so it also runs exactly over rationals (the proofs of its population optimum).
///
/// # Errors
/// The number type's.
pub fn ipo<S: Arith>(c: &Side<S>, r: &Side<S>, beta: f64) -> Result<S, S::Error> {
    mean_delta(c, r)?.affine(1.0, -1.0 / (2.0 * beta))?.sqr()
}

/// SLiC's hinge `max(0, 1 − z)` of the margin `z = β Δ`.
///
/// # Errors
/// The number type's.
pub fn hinge<S: Arith>(z: &S) -> Result<S, S::Error> {
    z.affine(-1.0, 1.0)?.relu()
}

/// SPPO with hard labels: `(u_w − 1/(2β))² + (u_l + 1/(2β))²`.
///
/// # Errors
/// The number type's.
pub fn sppo_hard<S: Arith>(c: &Side<S>, r: &Side<S>, beta: f64) -> Result<S, S::Error> {
    let target = 1.0 / (2.0 * beta);
    c.logratio
        .affine(1.0, -target)?
        .sqr()?
        .add(&r.logratio.affine(1.0, target)?.sqr()?)
}

/// LD-DPO's log-probability of a completion (Liu et al. 2024, "Length Desensitization in
/// Direct Preference Optimization"; TRL's `ld_alpha`): the tokens up to the shorter
/// completion of the pair count once, the rest (the "verbose" part) α times.
///
/// # Formula
/// `log π(y) = shared + α · verbose`, `shared = Σ_{t ≤ m} log π(y_t | y_<t)`,
/// `verbose = Σ_{t > m} log π(y_t | y_<t)`, `m = min(|y_w|, |y_l|)` the pair's shared length
/// (t counts completion tokens). α = 1 is the plain sum, α = 0 cuts every completion of the
/// pair to the shared length.
///
/// # Errors
/// The number type's.
///
/// # Examples
/// ```
/// use difinfo::loss::length_desensitized;
/// assert_eq!(length_desensitized(&-3.0, &-2.0, 0.5)?, -4.0);
/// assert_eq!(length_desensitized(&-3.0, &-2.0, 1.0)?, -5.0);
/// # Ok::<(), std::convert::Infallible>(())
/// ```
pub fn length_desensitized<S: Arith>(shared: &S, verbose: &S, alpha: f64) -> Result<S, S::Error> {
    shared.add(&verbose.affine(alpha, 0.0)?)
}

/// WPO's weight of one completion (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted
/// Preference Optimization", Eq. 2, as TRL's `use_weighting` computes it): the geometric mean
/// over the completion's tokens of the token's probability relative to the policy's
/// `Σ_v π(v)²`, the probability that two samples of the step agree.
///
/// # Formula
/// `w(y) = exp(a / max(|y|, 1))`, `a = Σ_t (log π(y_t | y_<t) − log Σ_v π(v | y_<t)²)`,
/// computed without gradient (the caller passes a detached `a`). Each factor
/// `π(y_t) / Σ_v π(v)²` has expectation 1 when `y_t ~ π`, so on-policy completions weigh
/// about 1 and off-policy ones less; `w(y) > 0`, and above 1 where a token is likelier than
/// the distribution's "self-agreement" `Σ_v π(v)²`.
///
/// # Errors
/// The number type's.
///
/// # Examples
/// ```
/// use difinfo::loss::wpo_weight;
/// // Two tokens, each with π(y_t) = Σ_v π(v)²: weight 1.
/// assert_eq!(wpo_weight(&0.0, &2.0)?, 1.0);
/// assert!((wpo_weight(&-2.0, &2.0)? - (-1.0f64).exp()).abs() < 1e-15);
/// # Ok::<(), std::convert::Infallible>(())
/// ```
pub fn wpo_weight<S: Real>(aligned: &S, len: &S) -> Result<S, S::Error> {
    aligned.div(&at_least_one(len)?)?.exp()
}

/// The mean NLL per token, `−Σ_i logps_i / tokens` (`tokens` may be a batch: it is summed).
/// TRL's `sft` loss type (RPO's term) with the chosen completions' token counts; the SFT rule
/// with the step's token count (transformers' `num_items_in_batch`).
///
/// # Errors
/// The number type's.
pub fn nll<S: Real>(logps: &S, tokens: &S) -> Result<S, S::Error> {
    logps.sum()?.neg()?.div(&tokens.sum()?)
}

/// The per-pair losses `ℓ(pair i)` of loss type `t` over a batch of chosen sides `c` and
/// rejected sides `r` (the formulas of the module docs). `sft` returns its batch value and
/// `aot*` sort the batch (with one pair, the identity).
///
/// # Errors
/// The number type's.
#[inline(always)]
pub fn per_sequence<S: Real>(
    t: LossType,
    o: &Objective,
    c: &Side<S>,
    r: &Side<S>,
) -> Result<S, S::Error> {
    let beta = o.beta();
    let eps = o.label_smoothing();
    let z = || c.score.sub(&r.score)?.scale(beta);
    match t {
        LossType::Sigmoid => smoothed_sigmoid(&z()?, eps),
        LossType::Hinge => hinge(&z()?),
        LossType::Ipo => ipo(c, r, beta),
        LossType::ExoPair => {
            let z = z()?;
            let zn = z.neg()?;
            let kl_w = z.log_sigmoid()?.affine(1.0, -(-eps).ln_1p())?;
            let kl_l = zn.log_sigmoid()?.affine(1.0, -eps.ln())?;
            z.sigmoid()?.mul(&kl_w)?.add(&zn.sigmoid()?.mul(&kl_l)?)
        }
        LossType::NcaPair => {
            let cw = c.logratio.affine(beta, 0.0)?;
            let rl = r.logratio.affine(beta, 0.0)?;
            let a = cw.log_sigmoid()?;
            let b = cw.neg()?.log_sigmoid()?;
            let d = rl.neg()?.log_sigmoid()?;
            a.add(&b.add(&d)?.affine(0.5, 0.0)?)?.neg()
        }
        LossType::Robust => {
            let z = z()?;
            let clean = z.log_sigmoid()?.affine(-(1.0 - eps), 0.0)?;
            let flipped = z.neg()?.log_sigmoid()?.affine(-eps, 0.0)?;
            clean.sub(&flipped)?.affine(1.0 / (1.0 - 2.0 * eps), 0.0)
        }
        LossType::BcoPair => {
            let cw = c.logratio.affine(beta, 0.0)?;
            let rl = r.logratio.affine(-beta, 0.0)?;
            cw.log_sigmoid()?.add(&rl.log_sigmoid()?)?.neg()
        }
        LossType::SppoHard => sppo_hard(c, r, beta),
        LossType::Aot => {
            let policy = c.logps.sub(&r.logps)?;
            let delta = match (&c.ref_logps, &r.ref_logps) {
                (Some(rc), Some(rr)) => policy.sort()?.sub(&rc.sub(rr)?.sort()?)?,
                _ => policy.sort()?,
            };
            smoothed_sigmoid(&delta.affine(beta, 0.0)?, eps)
        }
        LossType::AotUnpaired => {
            let delta = c.logratio.sort()?.sub(&r.logratio.sort()?)?;
            smoothed_sigmoid(&delta.affine(beta, 0.0)?, eps)
        }
        LossType::ApoZero => {
            let w = c.logratio.affine(beta, 0.0)?.sigmoid()?.affine(-1.0, 1.0)?;
            w.add(&r.logratio.affine(beta, 0.0)?.sigmoid()?)
        }
        LossType::ApoDown => {
            let w = c.logratio.affine(beta, 0.0)?.sigmoid()?;
            let margin = c.logratio.sub(&r.logratio)?.affine(beta, 0.0)?;
            w.add(&margin.sigmoid()?.affine(-1.0, 1.0)?)
        }
        LossType::Discopop => {
            let z = z()?;
            let m = z.affine(1.0 / o.discopop_tau(), 0.0)?;
            let logistic = z.neg()?.softplus()?.mul(&m.sigmoid()?.affine(-1.0, 1.0)?)?;
            let exponential = m.log_sigmoid()?.sub(&z)?.exp()?;
            logistic.add(&exponential)
        }
        LossType::Sft => nll(c.nll_logps.as_ref().unwrap_or(&c.logps), &c.len),
        LossType::SigmoidNorm => mean_delta(c, r)?.affine(beta, 0.0)?.neg()?.softplus(),
    }
}

/// The loss of a batch and TRL's logged quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss<S> {
    /// `L = Σ_k w_k · mean_i ℓ_k(pair i)`.
    pub loss: S,
    /// Each loss type's `mean_i ℓ_k` (unweighted), in the objective's order.
    pub terms: Vec<(LossType, S)>,
    /// `β u(y_w)`: TRL's `rewards/chosen`, per pair.
    pub chosen_rewards: S,
    /// `β u(y_l)`: TRL's `rewards/rejected`, per pair.
    pub rejected_rewards: S,
}

/// The objective's loss on a batch of chosen sides `c` and rejected sides `r`; with WPO's
/// weights on both sides (`Side::weight`), each pair's loss times `w(y_w) w(y_l)`.
///
/// # Errors
/// The number type's.
pub fn batch_loss<S: Real>(
    o: &Objective,
    c: &Side<S>,
    r: &Side<S>,
) -> Result<BatchLoss<S>, S::Error> {
    let mut terms = Vec::with_capacity(o.terms().len());
    let mut loss: Option<S> = None;
    let pair_weight = match (&c.weight, &r.weight) {
        (Some(a), Some(b)) => Some(a.mul(b)?),
        _ => None,
    };
    for &(t, w) in o.terms() {
        let l = per_sequence(t, o, c, r)?;
        let m = match &pair_weight {
            Some(pw) => l.mul(pw)?,
            None => l,
        }
        .mean()?;
        let wm = m.affine(w, 0.0)?;
        loss = Some(match loss {
            None => wm,
            Some(l) => l.add(&wm)?,
        });
        terms.push((t, m));
    }
    Ok(BatchLoss {
        loss: loss.expect("an objective has at least one loss type"),
        terms,
        chosen_rewards: reward(o, c)?,
        rejected_rewards: reward(o, r)?,
    })
}

/// The exact gradient of the **sigmoid** population loss with respect to free rewards `r`,
/// at rewards whose Boltzmann distribution is the rational policy `model` (`e^{r} ∝ model`):
///
/// ```text
/// ∂L/∂r_k = −Σ_b w_k v_b σ(r_b − r_k) + Σ_a w_a v_k σ(r_k − r_a),
/// σ(r_b − r_k) = model_b / (model_b + model_k)
/// ```
///
/// Every term is rational, so the first-order condition of Theorem 2.1 (`∇ = 0` exactly at
/// `model = q_{p_w/p_l}`) is checked with no tolerance. (This is `−log σ`'s derivative in the
/// Boltzmann parametrization, where `σ` of a reward difference is a ratio of probabilities:
/// the float texts above cannot run over rationals, `e^r` is not rational.)
///
/// # Errors
/// [`Error::LengthMismatch`].
pub fn sigmoid_reward_gradient_exact(
    chosen: &ExactPolicy,
    rejected: &ExactPolicy,
    model: &ExactPolicy,
) -> crate::Result<Vec<Rational>> {
    chosen.check_same_space(rejected)?;
    chosen.check_same_space(model)?;
    let (w, v, m) = (chosen.probs(), rejected.probs(), model.probs());
    let n = w.len();
    let mut grad = vec![Rational::zero(); n];
    for k in 0..n {
        for b in 0..n {
            // −log σ(r_k − r_b) has derivative −σ(r_b − r_k) = −m_b/(m_b + m_k) in r_k.
            let s_bk = &m[b] / (&m[b] + &m[k]);
            let t = &w[k] * &v[b] * &s_bk;
            grad[k] -= &t;
            grad[b] += t;
        }
    }
    Ok(grad)
}

/// Check that a rational `β` is positive (helper for the exact statements).
///
/// # Errors
/// [`Error::InvalidParameter`].
pub fn check_positive_rational(name: &'static str, beta: &Rational) -> crate::Result<()> {
    if *beta > Rational::zero() {
        Ok(())
    } else {
        Err(Error::invalid(name, beta, "must be positive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::ObjectiveSpec;
    use crate::reward::side;
    use crate::scalar::infallible;

    /// `ℓ_ε` is DPO's loss at ε = 0, symmetric at ε = 1/2, and minimal at `log((1 − ε)/ε)`.
    #[test]
    fn smoothed_sigmoid_limits_and_minimizer() {
        let l = |d: f64, e: f64| infallible(smoothed_sigmoid(&d, e));
        for d in [-3.0, -0.5, 0.0, 0.7, 4.0] {
            assert_eq!(l(d, 0.0), crate::logspace::softplus(-d));
            assert!((l(d, 0.5) - l(-d, 0.5)).abs() < 1e-15);
        }
        let eps: f64 = 0.1;
        let d_star = ((1.0 - eps) / eps).ln();
        let at = l(d_star, eps);
        for step in [-1e-3, 1e-3, -0.5, 0.5] {
            assert!(l(d_star + step, eps) > at);
        }
    }

    /// With one pair, the batch loss is the weighted sum of the per-type values.
    #[test]
    fn weighted_terms_add_up() {
        let o = Objective::new(ObjectiveSpec {
            loss_type: vec![LossType::Sigmoid, LossType::Ipo, LossType::Sft],
            loss_weights: Some(vec![0.8, 0.2, 1.0]),
            ..Default::default()
        })
        .unwrap();
        let c = infallible(side(&o, -4.0, Some(-5.0), 3.0));
        let r = infallible(side(&o, -6.0, Some(-5.5), 2.0));
        let b = infallible(batch_loss(&o, &c, &r));
        let want: f64 = b
            .terms
            .iter()
            .zip([0.8, 0.2, 1.0])
            .map(|((_, v), w)| w * v)
            .sum();
        assert!((b.loss - want).abs() < 1e-15);
        assert!((b.terms[2].1 - 4.0 / 3.0).abs() < 1e-15);
    }
}
