//! What a run optimizes: **the one objective type** of the workspace, used unchanged by the
//! synthetic experiments, the proofs and the trainer's configuration (TOML and command line
//! deserialize into it through [`ObjectiveSpec`]).
//!
//! An objective is a *rule* and, for the preference rules, TRL's `DPOConfig` loss fields:
//!
//! ```text
//! rule            sft | dpo | dpo-pg
//! loss            L = Σ_k w_k · mean_i ℓ_k(pair i)           (TRL: loss_type, loss_weights)
//! reward          r(y) = β · f(log π(y) − log π_ref(y))      (log-ratio; TRL's reverse_kl f = id)
//!                 r(y) = β · f(log π(y))                      (reference_free)
//! modifiers       label smoothing ε, RPO's NLL term (the `sft` loss type, weight α),
//!                 the f-divergence f (TRL's f_divergence_type, f_alpha_divergence_coef),
//!                 DiscoPOP's τ, LD-DPO's α (TRL's ld_alpha), WPO's pair weights
//!                 (TRL's use_weighting)
//! ```
//!
//! The formulas are in [`crate::loss`] (every loss type, generic over the number type) and
//! [`crate::reward`] (log-ratios, f-divergence scores); `dpo-pg` is Appendix H's projection
//! ([`crate::dpo_pg`]), which logs the preference loss but steps along the projected NLL
//! gradient. Every parameter is validated once, here (β by [`crate::beta::Beta`]): the fields are
//! private and [`Objective::new`] (or deserialization) is the only way in.
//!
//! # Examples
//! ```
//! use difinfo::objective::{LossType, Objective, ObjectiveSpec};
//! let ipo = ObjectiveSpec { beta: 0.5, loss_type: vec![LossType::Ipo], ..Default::default() };
//! let o = Objective::new(ipo)?;
//! assert_eq!(o.beta(), 0.5);
//! assert!(Objective::new(ObjectiveSpec { beta: -1.0, ..Default::default() }).is_err());
//! # Ok::<(), difinfo::objective::ObjectiveError>(())
//! ```

mod error;
mod f_divergence;
mod loss_type;
mod rule;
mod spec;
mod validate;

use serde::{Deserialize, Serialize};

use crate::beta::Beta;

pub use error::ObjectiveError;
pub use f_divergence::FDivergence;
pub use loss_type::LossType;
pub use rule::Rule;
pub use spec::ObjectiveSpec;

/// A validated objective (see the module docs). Serializes as its [`ObjectiveSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ObjectiveSpec", into = "ObjectiveSpec")]
pub struct Objective {
    rule: Rule,
    terms: Vec<(LossType, f64)>,
    beta: Beta,
    reference_free: bool,
    label_smoothing: f64,
    f_divergence: FDivergence,
    f_alpha: f64,
    discopop_tau: f64,
    ld_alpha: Option<f64>,
    use_weighting: bool,
}

impl Default for Objective {
    /// TRL's defaults: DPO (`sigmoid`), β = 0.1.
    fn default() -> Self {
        Objective::new(ObjectiveSpec::default()).expect("the defaults are valid")
    }
}

impl TryFrom<ObjectiveSpec> for Objective {
    type Error = ObjectiveError;
    fn try_from(s: ObjectiveSpec) -> Result<Self, ObjectiveError> {
        Objective::new(s)
    }
}

impl From<Objective> for ObjectiveSpec {
    fn from(o: Objective) -> Self {
        o.spec()
    }
}

impl Objective {
    /// DPO (`sigmoid`, log-ratio reward) with `β`.
    ///
    /// # Errors
    /// [`ObjectiveError::Beta`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::{objective::Objective, population::population_loss, Policy};
    /// let o = Objective::dpo(0.1)?;
    /// // At π = π_ref every margin is 0: the population DPO loss is −log σ(0) = log 2.
    /// let pi_ref = Policy::from_logits(&[1.0, 0.0, -1.0])?;
    /// let pi_l = Policy::uniform(3)?;
    /// let l = population_loss(&[1.0, 0.0, -1.0], &pi_ref, &pi_l, Some(&pi_ref), &o)?;
    /// assert!((l.value - std::f64::consts::LN_2).abs() < 1e-12);
    /// assert!(Objective::dpo(-1.0).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dpo(beta: f64) -> Result<Self, ObjectiveError> {
        Self::new(ObjectiveSpec {
            beta,
            ..ObjectiveSpec::default()
        })
    }

    /// One loss type with `β` (log-ratio reward, other fields TRL's defaults; `exo_pair` gets
    /// the EXO paper's ε = 1e-3, TRL's required non-zero smoothing).
    ///
    /// # Errors
    /// [`ObjectiveError::Beta`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::{LossType, Objective};
    /// let ipo = Objective::loss(LossType::Ipo, 0.5)?;
    /// assert_eq!(ipo.terms(), &[(LossType::Ipo, 1.0)]);
    /// assert_eq!(Objective::loss(LossType::ExoPair, 0.1)?.label_smoothing(), 1e-3);
    /// # Ok::<(), difinfo::objective::ObjectiveError>(())
    /// ```
    pub fn loss(loss_type: LossType, beta: f64) -> Result<Self, ObjectiveError> {
        Self::new(ObjectiveSpec {
            beta,
            loss_type: vec![loss_type],
            label_smoothing: if loss_type == LossType::ExoPair {
                1e-3
            } else {
                0.0
            },
            ..ObjectiveSpec::default()
        })
    }

    /// The same objective with the reference-free reward `β f(log π)`.
    ///
    /// # Errors
    /// See [`Objective::new`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::Objective;
    /// // Appendix K's DID estimator: reference-free DPO with β = 1.
    /// let o = Objective::dpo(1.0)?.reference_free()?;
    /// assert!(o.is_reference_free() && !o.needs_reference());
    /// // DPO-PG's step is the NLL projection: a reference-free reward would change nothing.
    /// assert!(Objective::dpo_pg(1.0)?.reference_free().is_err());
    /// # Ok::<(), difinfo::objective::ObjectiveError>(())
    /// ```
    pub fn reference_free(&self) -> Result<Self, ObjectiveError> {
        Self::new(ObjectiveSpec {
            reference_free: true,
            ..self.spec()
        })
    }

    /// Token-level SFT.
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::{Objective, Rule};
    /// let o = Objective::sft();
    /// assert_eq!(o.rule(), Rule::Sft);
    /// assert!(!o.is_preference());
    /// ```
    pub fn sft() -> Self {
        Self::new(ObjectiveSpec {
            objective: Rule::Sft,
            ..ObjectiveSpec::default()
        })
        .expect("valid")
    }

    /// A reward model trained on preference pairs (TRL's `RewardTrainer`): the loss is
    /// [`crate::preference::bradley_terry_loss`] of its scores; it reads no reference and no
    /// loss type.
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::{Objective, Rule};
    /// let o = Objective::reward();
    /// assert_eq!(o.rule(), Rule::Reward);
    /// assert!(o.is_preference() && !o.needs_reference());
    /// ```
    pub fn reward() -> Self {
        Self::new(ObjectiveSpec {
            objective: Rule::Reward,
            ..ObjectiveSpec::default()
        })
        .expect("valid")
    }

    /// DPO-PG (Appendix H), logging DPO's loss with `β`.
    ///
    /// # Errors
    /// [`ObjectiveError::Beta`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::{Objective, Rule};
    /// let o = Objective::dpo_pg(0.1)?;
    /// assert_eq!(o.rule(), Rule::ProjectedGradient);
    /// assert_eq!(o.beta(), 0.1);
    /// # Ok::<(), difinfo::objective::ObjectiveError>(())
    /// ```
    pub fn dpo_pg(beta: f64) -> Result<Self, ObjectiveError> {
        Self::new(ObjectiveSpec {
            objective: Rule::ProjectedGradient,
            beta,
            ..ObjectiveSpec::default()
        })
    }

    /// Refuses the fields among `given` (those a user set explicitly, on a command line or
    /// in a file) that this objective does not read, as TRL would silently ignore them:
    /// `f_alpha_divergence_coef` without `f_divergence_type = alpha_divergence`, `discopop_tau`
    /// without the `discopop` loss type. (Options whose every non-default value is refused,
    /// such as `label_smoothing`, are checked by [`Objective::new`].)
    ///
    /// # Errors
    /// [`ObjectiveError::Inapplicable`] naming the first such field.
    ///
    /// # Examples
    /// ```
    /// use difinfo::objective::Objective;
    /// let dpo = Objective::dpo(0.1)?;
    /// assert!(dpo.check_given(["beta"]).is_ok());
    /// assert!(dpo.check_given(["discopop_tau"]).is_err());
    /// # Ok::<(), difinfo::objective::ObjectiveError>(())
    /// ```
    pub fn check_given<'a>(
        &self,
        given: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ObjectiveError> {
        for g in given {
            let reason = match g {
                "f_alpha_divergence_coef" if self.f_divergence != FDivergence::AlphaDivergence => {
                    format!(
                        "it is the α of f_divergence_type = alpha_divergence, and \
                         f_divergence_type is {}",
                        self.f_divergence.name()
                    )
                }
                "discopop_tau" if !self.terms.iter().any(|(t, _)| *t == LossType::Discopop) => {
                    format!(
                        "it is the τ of the discopop loss type, and loss_type is {}",
                        self.terms
                            .iter()
                            .map(|(t, _)| t.name())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
                _ => continue,
            };
            return Err(ObjectiveError::Inapplicable {
                option: if g == "discopop_tau" {
                    "discopop_tau"
                } else {
                    "f_alpha_divergence_coef"
                },
                reason,
            });
        }
        Ok(())
    }

    /// The fields, as written (with `rpo_alpha` folded into an `sft` term).
    pub fn spec(&self) -> ObjectiveSpec {
        let all_one = self.terms.iter().all(|(_, w)| *w == 1.0);
        ObjectiveSpec {
            objective: self.rule,
            loss_type: self.terms.iter().map(|(t, _)| *t).collect(),
            loss_weights: (!all_one).then(|| self.terms.iter().map(|(_, w)| *w).collect()),
            beta: self.beta.get(),
            reference_free: self.reference_free,
            label_smoothing: self.label_smoothing,
            rpo_alpha: None,
            f_divergence_type: self.f_divergence,
            f_alpha_divergence_coef: self.f_alpha,
            discopop_tau: self.discopop_tau,
            ld_alpha: self.ld_alpha,
            use_weighting: self.use_weighting,
        }
    }

    /// The rule.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// `(loss type, weight)` pairs: `L = Σ_k w_k mean ℓ_k`.
    pub fn terms(&self) -> &[(LossType, f64)] {
        &self.terms
    }

    /// β.
    pub fn beta(&self) -> f64 {
        self.beta.get()
    }

    /// Whether the reward is `β f(log π)` (no reference).
    pub fn is_reference_free(&self) -> bool {
        self.reference_free
    }

    /// ε.
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }

    /// The f-divergence of the scores.
    pub fn f_divergence(&self) -> FDivergence {
        self.f_divergence
    }

    /// The α of the α-divergence.
    pub fn f_alpha_divergence_coef(&self) -> f64 {
        self.f_alpha
    }

    /// DiscoPOP's τ.
    pub fn discopop_tau(&self) -> f64 {
        self.discopop_tau
    }

    /// LD-DPO's α: `log π(y) = shared + α · verbose` (see [`crate::loss::length_desensitized`]);
    /// `None`: every completion token counts once.
    pub fn ld_alpha(&self) -> Option<f64> {
        self.ld_alpha
    }

    /// Whether each pair's loss is weighted by WPO's `w(y_w) w(y_l)` (see
    /// [`crate::loss::wpo_weight`]).
    pub fn use_weighting(&self) -> bool {
        self.use_weighting
    }

    /// Whether the run trains on preference pairs (`dpo`, `dpo-pg`, `reward`).
    pub fn is_preference(&self) -> bool {
        self.rule != Rule::Sft
    }

    /// Whether the loss reads reference log-probabilities (a preference rule with the
    /// log-ratio reward; a reward model's loss reads none).
    pub fn needs_reference(&self) -> bool {
        self.is_preference() && self.rule != Rule::Reward && !self.reference_free
    }

    /// The weight of the `sft` term (RPO's α), if any.
    pub fn sft_weight(&self) -> Option<f64> {
        let w: f64 = self
            .terms
            .iter()
            .filter(|(t, _)| *t == LossType::Sft)
            .map(|(_, w)| w)
            .sum();
        self.terms
            .iter()
            .any(|(t, _)| *t == LossType::Sft)
            .then_some(w)
    }

    /// A short label: `sft`, `dpo-pg`, `reward`, `dpo` (the sigmoid loss), `ref-free` (its
    /// reference-free reward), with the loss types in parentheses otherwise (`dpo (ipo)`,
    /// `dpo (sigmoid+sft)`).
    pub fn label(&self) -> String {
        match self.rule {
            Rule::Sft => "sft".to_string(),
            Rule::ProjectedGradient => "dpo-pg".to_string(),
            Rule::Reward => "reward".to_string(),
            Rule::Preference => {
                let base = if self.reference_free {
                    "ref-free"
                } else {
                    "dpo"
                };
                if self.terms == [(LossType::Sigmoid, 1.0)] {
                    base.to_string()
                } else {
                    let types: Vec<&str> = self.terms.iter().map(|(t, _)| t.name()).collect();
                    format!("{base} ({})", types.join("+"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_rpo_alpha_is_an_sft_term() {
        let o = Objective::new(ObjectiveSpec {
            loss_type: vec![LossType::Ipo],
            rpo_alpha: Some(0.5),
            beta: 0.3,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(o.terms(), &[(LossType::Ipo, 1.0), (LossType::Sft, 0.5)]);
        assert_eq!(o.sft_weight(), Some(0.5));
        assert_eq!(Objective::new(o.spec()).unwrap(), o);
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Objective>(&json).unwrap(), o);
        for t in LossType::ALL {
            assert_eq!(t.name().parse::<LossType>().unwrap(), t);
            let j = serde_json::to_string(&t).unwrap();
            assert_eq!(j, format!("\"{}\"", t.name()));
        }
    }

    #[test]
    fn one_loss_type_or_a_list_or_a_comma_string() {
        for text in [
            r#"{"loss_type": ["sigmoid", "sft"]}"#,
            r#"{"loss_type": "sigmoid,sft"}"#,
        ] {
            let o: Objective = serde_json::from_str(text).unwrap();
            assert_eq!(o.terms(), &[(LossType::Sigmoid, 1.0), (LossType::Sft, 1.0)]);
        }
        let o: Objective = serde_json::from_str(r#"{"loss_type": "ipo"}"#).unwrap();
        assert_eq!(o.terms(), &[(LossType::Ipo, 1.0)]);
        let e = serde_json::from_str::<Objective>(r#"{"loss_type": "ipoo"}"#).unwrap_err();
        assert!(e.to_string().contains("ipoo"), "{e}");
        // A wrongly typed value says what was expected (not "untagged enum OneOrMany").
        let e = serde_json::from_str::<Objective>(r#"{"loss_type": 3}"#).unwrap_err();
        assert!(e.to_string().contains("expected a loss type name"), "{e}");
    }

    /// Options set explicitly but not read by the objective are refused, naming them.
    #[test]
    fn given_options_the_objective_does_not_read_are_refused() {
        let dpo = Objective::dpo(0.1).unwrap();
        let e = dpo.check_given(["f_alpha_divergence_coef"]).unwrap_err();
        assert!(e.to_string().starts_with("f_alpha_divergence_coef"), "{e}");
        let e = dpo.check_given(["beta", "discopop_tau"]).unwrap_err();
        assert!(e.to_string().starts_with("discopop_tau"), "{e}");
        let alpha = Objective::new(ObjectiveSpec {
            f_divergence_type: FDivergence::AlphaDivergence,
            loss_type: vec![LossType::Discopop],
            ..Default::default()
        })
        .unwrap();
        assert!(alpha
            .check_given(["f_alpha_divergence_coef", "discopop_tau"])
            .is_ok());
    }

    #[test]
    fn invalid_fields_are_named() {
        let bad = |s: ObjectiveSpec, what: &str| {
            let e = Objective::new(s).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        let d = ObjectiveSpec::default;
        bad(
            ObjectiveSpec {
                beta: f64::NAN,
                ..d()
            },
            "beta",
        );
        bad(ObjectiveSpec { beta: 0.0, ..d() }, "beta");
        bad(
            ObjectiveSpec {
                label_smoothing: 0.6,
                ..d()
            },
            "label_smoothing",
        );
        bad(
            ObjectiveSpec {
                label_smoothing: 0.1,
                loss_type: vec![LossType::Hinge],
                ..d()
            },
            "label_smoothing",
        );
        bad(
            ObjectiveSpec {
                loss_type: vec![LossType::ExoPair],
                ..d()
            },
            "label_smoothing",
        );
        bad(
            ObjectiveSpec {
                label_smoothing: 0.5,
                loss_type: vec![LossType::Robust],
                ..d()
            },
            "label_smoothing",
        );
        bad(
            ObjectiveSpec {
                loss_weights: Some(vec![1.0, 2.0]),
                ..d()
            },
            "loss_weights",
        );
        bad(
            ObjectiveSpec {
                loss_weights: Some(vec![-1.0]),
                ..d()
            },
            "loss_weights",
        );
        bad(
            ObjectiveSpec {
                loss_weights: Some(vec![0.0]),
                ..d()
            },
            "loss_weights are all 0",
        );
        bad(
            ObjectiveSpec {
                discopop_tau: 0.0,
                ..d()
            },
            "discopop_tau",
        );
        bad(
            ObjectiveSpec {
                objective: Rule::ProjectedGradient,
                rpo_alpha: Some(1.0),
                ..d()
            },
            "rpo_alpha",
        );
        bad(
            ObjectiveSpec {
                objective: Rule::ProjectedGradient,
                reference_free: true,
                ..d()
            },
            "reference_free",
        );
        bad(
            ObjectiveSpec {
                loss_type: vec![LossType::Sft],
                rpo_alpha: Some(1.0),
                ..d()
            },
            "rpo_alpha",
        );
        bad(
            ObjectiveSpec {
                loss_type: vec![],
                ..d()
            },
            "loss_type",
        );
    }
}
