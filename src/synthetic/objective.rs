//! The seven objectives compared by the synthetic experiments (Theorem 3.4, Appendix H), as
//! presets of the library's one objective type ([`crate::objective::Objective`]).
//!
//! | name | reward `r(y)` | loss `ℓ`, `Δ = u(y_w) − u(y_l)` |
//! |---|---|---|
//! | `dpo` | `β log(π/π_ref)` | `sigmoid`: `−log σ(β Δ)` |
//! | `dpo-beta-mismatch` | `β' log(π/π_ref)`, `β' ≠ β` | `sigmoid` |
//! | `ref-free-beta` | `β log π` | `sigmoid` |
//! | `ref-free-1` | `log π` | `sigmoid` |
//! | `hinge` | `β log(π/π_ref)` | `hinge`: `max(0, 1 − β Δ)` (SLiC) |
//! | `ipo` | `β log(π/π_ref)` | `ipo`: `(Δ − 1/(2β))²` |
//! | `dpo-pg` | — | no loss: the projected gradient of Appendix H |
//!
//! Every formula is the library's; this module only names the combinations.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::objective::{LossType, Objective};

/// One of the seven objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Preset {
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

impl Preset {
    /// All seven, in the order of the tables.
    pub const ALL: [Preset; 7] = [
        Preset::Dpo,
        Preset::DpoBetaMismatch,
        Preset::RefFreeBeta,
        Preset::RefFree1,
        Preset::Hinge,
        Preset::Ipo,
        Preset::DpoPg,
    ];

    /// The name used in files and `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Dpo => "dpo",
            Preset::DpoBetaMismatch => "dpo-beta-mismatch",
            Preset::RefFreeBeta => "ref-free-beta",
            Preset::RefFree1 => "ref-free-1",
            Preset::Hinge => "hinge",
            Preset::Ipo => "ipo",
            Preset::DpoPg => "dpo-pg",
        }
    }

    /// The objective for data generated with `β`; `beta_prime` is the mismatched `β'` of
    /// `dpo-beta-mismatch`.
    ///
    /// # Errors
    /// [`Error::Objective`] ([`crate::objective::ObjectiveError::Beta`]) unless `β`, `β'` are
    /// finite and positive.
    pub fn objective(self, beta: f64, beta_prime: f64) -> Result<Objective> {
        Ok(match self {
            Preset::Dpo => Objective::dpo(beta),
            Preset::DpoBetaMismatch => Objective::dpo(beta_prime),
            Preset::RefFreeBeta => Objective::dpo(beta).and_then(|o| o.reference_free()),
            Preset::RefFree1 => Objective::dpo(1.0).and_then(|o| o.reference_free()),
            Preset::Hinge => Objective::loss(LossType::Hinge, beta),
            Preset::Ipo => Objective::loss(LossType::Ipo, beta),
            Preset::DpoPg => Objective::dpo_pg(beta),
        }?)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| Error::InvalidParameter {
                name: "objective",
                value: s.to_string(),
                reason: format!(
                    "expected one of {}",
                    Preset::ALL.map(|o| o.name()).join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for o in Preset::ALL {
            assert_eq!(o.name().parse::<Preset>().unwrap(), o);
        }
        assert!("dpo2".parse::<Preset>().is_err());
        assert!(Preset::Dpo.objective(-1.0, 2.0).is_err());
    }
}
