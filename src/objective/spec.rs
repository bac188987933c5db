//! The objective's fields as written (TOML, JSON, the command line): [`ObjectiveSpec`], the one
//! place of their defaults, and the loss-type list's one-or-many serde form.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{FDivergence, LossType, Rule};

/// The fields of an [`crate::objective::Objective`] as written in a TOML file or on the command line: TRL's
/// `DPOConfig` names and defaults, plus `objective` (the rule) and TRL 0.x's `reference_free`
/// and `rpo_alpha`. Plain data with [`Default`] (the one place of the defaults);
/// [`crate::objective::Objective::new`] validates it.
///
/// With the `clap` feature it is also the command line's definition (`--loss-type`,
/// `--beta`, …, each field's doc its help); the attributes carry no defaults: a front end sets
/// them from a default value (the trainer's `dpo` from `ObjectiveSpec::default()`), so each
/// default is written once, here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default)]
pub struct ObjectiveSpec {
    /// The rule: dpo, the preference loss; dpo-pg, DPO-PG (Appendix H), a step along the chosen
    /// NLL's gradient projected off the rejected NLL's (the loss is still logged). Not a TRL
    /// option: TRL has one trainer class per rule.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub objective: Rule,
    /// TRL's loss types, one or a list (comma-separated on the command line, e.g.
    /// sigmoid,sft), combined with the loss weights.
    #[serde(deserialize_with = "one_or_many", serialize_with = "one_or_many_ser")]
    #[cfg_attr(feature = "clap", arg(long, value_enum, value_delimiter = ','))]
    pub loss_type: Vec<LossType>,
    /// Weights of the loss types (TRL's loss_weights) [default: 1 each]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_delimiter = ',',
            value_name = "W,...",
            allow_negative_numbers = true
        )
    )]
    pub loss_weights: Option<Vec<f64>>,
    /// β, the inverse temperature of the rewards.
    #[cfg_attr(feature = "clap", arg(long))]
    pub beta: f64,
    /// The reward β f(log π) without a reference (TRL 0.x's reference_free; the DID estimator
    /// of Appendix K).
    #[cfg_attr(
        feature = "clap",
        arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)
    )]
    pub reference_free: bool,
    /// Label smoothing ε ∈ [0, 0.5]: the label-flip probability of conservative DPO (sigmoid),
    /// Robust DPO (ε < 0.5) and AOT, EXO's smoothing (exo_pair, ε > 0).
    #[cfg_attr(feature = "clap", arg(long))]
    pub label_smoothing: f64,
    /// RPO's α (TRL 0.x's rpo_alpha): α times the mean NLL per chosen completion token added
    /// to the loss, i.e. the sft loss type with weight α (logged as nll_loss) [default: none]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "ALPHA"))]
    pub rpo_alpha: Option<f64>,
    /// The f-divergence of the scores (f-DPO; TRL's f_divergence_type).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub f_divergence_type: FDivergence,
    /// α of the α-divergence (TRL's f_alpha_divergence_coef).
    #[cfg_attr(feature = "clap", arg(long, allow_negative_numbers = true))]
    pub f_alpha_divergence_coef: f64,
    /// DiscoPOP's τ (TRL's discopop_tau, the paper's).
    #[cfg_attr(feature = "clap", arg(long))]
    pub discopop_tau: f64,
    /// LD-DPO's α (TRL's ld_alpha), in [0, 1]: the log-probs of the completion tokens beyond
    /// the shorter completion of the pair count α times, log π(y) = shared + α · verbose,
    /// for the policy and the reference [default: none, every token counts once]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "ALPHA"))]
    pub ld_alpha: Option<f64>,
    /// WPO (TRL's use_weighting): each pair's loss times w(y_w) w(y_l), w(y) = exp(mean over
    /// y's tokens of log π(y_t) − log Σ_v π(v)²), the policy's, without gradient.
    #[cfg_attr(
        feature = "clap",
        arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)
    )]
    pub use_weighting: bool,
}

impl Default for ObjectiveSpec {
    fn default() -> Self {
        Self {
            objective: Rule::Preference,
            loss_type: vec![LossType::Sigmoid],
            loss_weights: None,
            beta: 0.1,
            reference_free: false,
            label_smoothing: 0.0,
            rpo_alpha: None,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
            ld_alpha: None,
            use_weighting: false,
        }
    }
}

impl ObjectiveSpec {
    /// The field names, as written in a file (for a reader that rejects unknown keys).
    pub fn field_names() -> Vec<String> {
        let all = ObjectiveSpec {
            loss_weights: Some(vec![1.0]),
            rpo_alpha: Some(0.0),
            ld_alpha: Some(1.0),
            ..ObjectiveSpec::default()
        };
        match serde_json::to_value(all) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LossType>, D::Error> {
    // A visitor, not an untagged enum: a wrongly typed value is named by what was expected
    // (serde's untagged enums say only "data did not match any variant").
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "a loss type name (\"sigmoid\"), a comma-separated string or a list of names",
            )
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(',').map(|x| x.trim().to_string()).collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = a.next_element::<String>()? {
                v.push(x);
            }
            Ok(v)
        }
    }
    let names = d.deserialize_any(Names)?;
    names
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn one_or_many_ser<S: Serializer>(v: &[LossType], s: S) -> Result<S::Ok, S::Error> {
    if let [one] = v {
        one.serialize(s)
    } else {
        v.serialize(s)
    }
}
