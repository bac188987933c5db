//! The seven objectives compared by the synthetic experiments (Theorem 3.4, Appendix H).
//!
//! | name | reward `r(y)` | loss shape `ℓ(d)`, `d = r(y_w) − r(y_l)` |
//! |---|---|---|
//! | `dpo` | `β log(π/π_ref)` | `−log σ(d)` |
//! | `dpo-beta-mismatch` | `β' log(π/π_ref)`, `β' ≠ β` | `−log σ(d)` |
//! | `ref-free-beta` | `β log π` | `−log σ(d)` |
//! | `ref-free-1` | `log π` | `−log σ(d)` |
//! | `hinge` | `β log(π/π_ref)` | `max(0, 1 − d)` (SLiC) |
//! | `ipo` | `β log(π/π_ref)` | `(d/β − 1/(2β))²` |
//! | `dpo-pg` | — | no loss: the projected gradient of Appendix H |
//!
//! Every reward and shape is the library's ([`RewardForm`], [`LossShape`]); this module only
//! names the combinations.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::loss::LossShape;
use crate::policy::Policy;
use crate::reward::RewardForm;

/// One of the seven objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Objective {
    /// DPO: log-ratio reward with the data's `β` (the unique optimal form, Theorem 3.4).
    Dpo,
    /// Log-ratio reward with a mismatched `β'`.
    DpoBetaMismatch,
    /// Reference-free `r = β log π`.
    RefFreeBeta,
    /// Reference-free `r = log π` (the DID estimator of Fig. 1 and Appendix K).
    RefFree1,
    /// SLiC hinge on the log-ratio reward.
    Hinge,
    /// IPO squared loss on the log-ratio reward.
    Ipo,
    /// DPO-PG: the projection of Appendix H applied to the chosen and rejected NLL gradients.
    DpoPg,
}

/// What an objective computes: a loss on a reward margin, or the DPO-PG projected gradient.
#[derive(Debug, Clone)]
pub enum Rule {
    /// `ℓ(r(y_w) − r(y_l))`; `beta` is passed to the shape (IPO).
    Loss {
        /// The reward form.
        reward: RewardForm,
        /// The loss shape.
        shape: LossShape,
        /// `β` for the shape.
        beta: f64,
    },
    /// Appendix H's projected gradient (no loss, no hyperparameter).
    ProjectedGradient,
}

impl Objective {
    /// All seven, in the order of the tables.
    pub const ALL: [Objective; 7] = [
        Objective::Dpo,
        Objective::DpoBetaMismatch,
        Objective::RefFreeBeta,
        Objective::RefFree1,
        Objective::Hinge,
        Objective::Ipo,
        Objective::DpoPg,
    ];

    /// The name used in files and `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Dpo => "dpo",
            Objective::DpoBetaMismatch => "dpo-beta-mismatch",
            Objective::RefFreeBeta => "ref-free-beta",
            Objective::RefFree1 => "ref-free-1",
            Objective::Hinge => "hinge",
            Objective::Ipo => "ipo",
            Objective::DpoPg => "dpo-pg",
        }
    }

    /// The rule for data generated with `β`, against `reference`; `beta_prime` is the
    /// mismatched `β'` of `dpo-beta-mismatch`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `β`, `β'` are finite and positive.
    pub fn rule(self, beta: f64, beta_prime: f64, reference: &Policy) -> Result<Rule> {
        let sigmoid = |reward| Rule::Loss {
            reward,
            shape: LossShape::Sigmoid,
            beta,
        };
        Ok(match self {
            Objective::Dpo => sigmoid(RewardForm::log_ratio(beta, reference.clone())?),
            Objective::DpoBetaMismatch => {
                sigmoid(RewardForm::log_ratio(beta_prime, reference.clone())?)
            }
            Objective::RefFreeBeta => sigmoid(RewardForm::ref_free(beta)?),
            Objective::RefFree1 => sigmoid(RewardForm::ref_free(1.0)?),
            Objective::Hinge => Rule::Loss {
                reward: RewardForm::log_ratio(beta, reference.clone())?,
                shape: LossShape::Hinge,
                beta,
            },
            Objective::Ipo => Rule::Loss {
                reward: RewardForm::log_ratio(beta, reference.clone())?,
                shape: LossShape::Ipo,
                beta,
            },
            Objective::DpoPg => Rule::ProjectedGradient,
        })
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Objective::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| Error::InvalidParameter {
                name: "objective",
                value: s.to_string(),
                reason: format!(
                    "expected one of {}",
                    Objective::ALL.map(|o| o.name()).join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for o in Objective::ALL {
            assert_eq!(o.name().parse::<Objective>().unwrap(), o);
        }
        assert!("dpo2".parse::<Objective>().is_err());
    }
}
