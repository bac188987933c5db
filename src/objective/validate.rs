//! [`Objective::new`]: every field of an [`ObjectiveSpec`] checked once, in named steps.

use super::{FDivergence, LossType, Objective, ObjectiveError, ObjectiveSpec, Rule};
use crate::beta::Beta;

impl Objective {
    /// Validates `spec`: `β > 0`; ε in `[0, 1/2]` (`< 1/2` for `robust`, `> 0` for
    /// `exo_pair`) and read by some loss type; one weight per loss type, each finite and `≥ 0`;
    /// `discopop_tau > 0`; a finite α-divergence coefficient; `rpo_alpha ≥ 0` (it becomes an
    /// `sft` term of weight α); `ld_alpha` in `[0, 1]`; `use_weighting` without `aot` or
    /// `aot_unpaired` (they sort the batch, so a pair's weight would meet another pair's loss;
    /// TRL refuses it too). `dpo-pg` takes no ε, no `sft` term, no `reference_free`, no
    /// `ld_alpha` and no `use_weighting` (its step is the NLL projection; the options would
    /// only change the logged loss).
    ///
    /// # Errors
    /// [`ObjectiveError`] naming the field.
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::{LossType, Objective, ObjectiveError, ObjectiveSpec};
    /// // MPO: TRL's `loss_type = ["sigmoid", "bco_pair", "sft"]`, `loss_weights = [0.8, 0.2, 1.0]`.
    /// let mpo = Objective::new(ObjectiveSpec {
    ///     loss_type: vec![LossType::Sigmoid, LossType::BcoPair, LossType::Sft],
    ///     loss_weights: Some(vec![0.8, 0.2, 1.0]),
    ///     ..ObjectiveSpec::default()
    /// })?;
    /// assert_eq!(mpo.terms()[1], (LossType::BcoPair, 0.2));
    /// assert_eq!(mpo.sft_weight(), Some(1.0));
    /// // β ≤ 0 is refused, naming the field.
    /// let bad = Objective::new(ObjectiveSpec { beta: 0.0, ..ObjectiveSpec::default() });
    /// assert!(matches!(bad, Err(ObjectiveError::Beta(b)) if b == 0.0));
    /// # Ok::<(), ObjectiveError>(())
    /// ```
    pub fn new(s: ObjectiveSpec) -> Result<Self, ObjectiveError> {
        let beta = Beta::new(s.beta)?;
        let terms = terms(&s)?;
        check_label_smoothing(&s, &terms)?;
        check_coefficients(&s, &terms)?;
        check_ld_and_weighting(&s, &terms)?;
        if s.objective == Rule::ProjectedGradient {
            check_projected_gradient(&s, &terms)?;
        }
        Ok(Self {
            rule: s.objective,
            terms,
            beta,
            reference_free: s.reference_free,
            label_smoothing: s.label_smoothing,
            f_divergence: s.f_divergence_type,
            f_alpha: s.f_alpha_divergence_coef,
            discopop_tau: s.discopop_tau,
            ld_alpha: s.ld_alpha,
            use_weighting: s.use_weighting,
        })
    }
}

/// The `(loss type, weight)` terms: one weight per loss type (1 each by default), each finite
/// and `≥ 0`, not all 0 for a preference rule; `rpo_alpha = α ≥ 0` appends an `sft` term of
/// weight α (refused beside an explicit `sft` loss type).
fn terms(s: &ObjectiveSpec) -> Result<Vec<(LossType, f64)>, ObjectiveError> {
    if s.loss_type.is_empty() {
        return Err(ObjectiveError::NoLossType);
    }
    let weights = match &s.loss_weights {
        Some(w) if w.len() != s.loss_type.len() => {
            return Err(ObjectiveError::LossWeightsLength {
                weights: w.len(),
                types: s.loss_type.len(),
            })
        }
        Some(w) => w.clone(),
        None => vec![1.0; s.loss_type.len()],
    };
    if let Some(&w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(ObjectiveError::LossWeight(w));
    }
    // SFT reads no loss type (a warning says so); the preference rules need a term.
    if s.objective != Rule::Sft && weights.iter().all(|w| *w == 0.0) {
        return Err(ObjectiveError::ZeroLossWeights(weights));
    }
    let mut terms: Vec<(LossType, f64)> = s.loss_type.iter().copied().zip(weights).collect();
    if let Some(a) = s.rpo_alpha {
        if !(a.is_finite() && a >= 0.0) {
            return Err(ObjectiveError::RpoAlpha(a));
        }
        if s.loss_type.contains(&LossType::Sft) {
            return Err(ObjectiveError::Inapplicable {
                option: "rpo_alpha",
                reason: "loss_type already has an `sft` term (rpo_alpha = α is the same as \
                         adding `sft` with weight α)"
                    .into(),
            });
        }
        terms.push((LossType::Sft, a));
    }
    Ok(terms)
}

/// Whether some term has loss type `t`.
fn has(terms: &[(LossType, f64)], t: LossType) -> bool {
    terms.iter().any(|(x, _)| *x == t)
}

/// ε in `[0, 1/2]`, below 1/2 for `robust`, above 0 for `exo_pair`, and read by some term.
fn check_label_smoothing(
    s: &ObjectiveSpec,
    terms: &[(LossType, f64)],
) -> Result<(), ObjectiveError> {
    let eps = s.label_smoothing;
    let ls = |reason: &str| {
        Err(ObjectiveError::LabelSmoothing {
            value: eps,
            reason: reason.into(),
        })
    };
    if !(0.0..=0.5).contains(&eps) {
        return ls("must lie in [0, 0.5]");
    }
    if has(terms, LossType::Robust) && eps >= 0.5 {
        return ls("the robust loss divides by 1 − 2ε: ε must be below 0.5");
    }
    if has(terms, LossType::ExoPair) && eps <= 0.0 {
        return ls("exo_pair needs ε > 0 (the EXO paper recommends 1e-3)");
    }
    if eps > 0.0 && !terms.iter().any(|(t, _)| t.uses_label_smoothing()) {
        return Err(ObjectiveError::Inapplicable {
            option: "label_smoothing",
            reason: format!(
                "no loss type of {:?} reads it (sigmoid, robust, exo_pair, aot, aot_unpaired do)",
                s.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>()
            ),
        });
    }
    Ok(())
}

/// `discopop_tau > 0` finite, a finite α-divergence coefficient, and an f-divergence other
/// than `reverse_kl` only with loss types that have an f-divergence form.
fn check_coefficients(s: &ObjectiveSpec, terms: &[(LossType, f64)]) -> Result<(), ObjectiveError> {
    if !(s.discopop_tau.is_finite() && s.discopop_tau > 0.0) {
        return Err(ObjectiveError::DiscopopTau(s.discopop_tau));
    }
    if !s.f_alpha_divergence_coef.is_finite() {
        return Err(ObjectiveError::FAlpha(s.f_alpha_divergence_coef));
    }
    if s.f_divergence_type != FDivergence::ReverseKl {
        if let Some((t, _)) = terms.iter().find(|(t, _)| !t.has_f_divergence_form()) {
            return Err(ObjectiveError::FDivergenceLossType {
                f: s.f_divergence_type.name(),
                loss_type: t.name(),
            });
        }
    }
    Ok(())
}

/// `ld_alpha` in `[0, 1]` (TRL's documented range); WPO's weights not with the loss types that
/// sort the batch (`aot`, `aot_unpaired`), as TRL refuses.
fn check_ld_and_weighting(
    s: &ObjectiveSpec,
    terms: &[(LossType, f64)],
) -> Result<(), ObjectiveError> {
    if let Some(a) = s.ld_alpha {
        if !(0.0..=1.0).contains(&a) {
            return Err(ObjectiveError::LdAlpha(a));
        }
    }
    if s.use_weighting {
        if let Some((t, _)) = terms
            .iter()
            .find(|(t, _)| matches!(t, LossType::Aot | LossType::AotUnpaired))
        {
            return Err(ObjectiveError::Inapplicable {
                option: "use_weighting",
                reason: format!(
                    "WPO's weights are per pair and {} sorts the batch's pairs, which would \
                     misalign them (TRL refuses it too)",
                    t.name()
                ),
            });
        }
    }
    Ok(())
}

/// `dpo-pg` steps along the projected NLL gradient: no `sft` term, no ε, no reference-free
/// reward, no LD-DPO α, no WPO weights (they would only change the logged loss).
fn check_projected_gradient(
    s: &ObjectiveSpec,
    terms: &[(LossType, f64)],
) -> Result<(), ObjectiveError> {
    let pg = |option: &'static str| {
        Err(ObjectiveError::Inapplicable {
            option,
            reason: "objective dpo-pg steps along the projected NLL gradient \
                     (Appendix H); it applies to objective dpo"
                .into(),
        })
    };
    if has(terms, LossType::Sft) {
        return pg(if s.rpo_alpha.is_some() {
            "rpo_alpha"
        } else {
            "the sft loss type"
        });
    }
    if s.label_smoothing > 0.0 {
        return pg("label_smoothing");
    }
    if s.reference_free {
        return pg("reference_free");
    }
    if s.ld_alpha.is_some() {
        return pg("ld_alpha");
    }
    if s.use_weighting {
        return pg("use_weighting");
    }
    Ok(())
}
