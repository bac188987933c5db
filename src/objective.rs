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
//!                 DiscoPOP's τ
//! ```
//!
//! The formulas are in [`crate::loss`] (every loss type, generic over the number type) and
//! [`crate::reward`] (log-ratios, f-divergence scores); `dpo-pg` is Appendix H's projection
//! ([`crate::dpo_pg`]), which logs the preference loss but steps along the projected NLL
//! gradient. Every parameter is validated once, here: the fields are private and
//! [`Objective::new`] (or deserialization) is the only way in.
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

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// TRL 1.x's `DPOTrainer` loss types (`DPOConfig.loss_type`); formulas in [`crate::loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
pub enum LossType {
    /// DPO: `−log σ(β Δ)`; with label smoothing ε conservative DPO.
    Sigmoid,
    /// SLiC: `max(0, 1 − β Δ)`.
    Hinge,
    /// IPO: `(Δ̄ − 1/(2β))²` on per-token mean scores.
    Ipo,
    /// EXO (pairwise): `KL(Bern(σ(β Δ)) ‖ Bern(1 − ε))`.
    ExoPair,
    /// NCA (pairwise): `−log σ(β u_w) − ½ log σ(−β u_w) − ½ log σ(−β u_l)`.
    NcaPair,
    /// Robust DPO: `((1 − ε)(−log σ(β Δ)) − ε(−log σ(−β Δ))) / (1 − 2ε)`.
    Robust,
    /// BCO (pairwise): `−log σ(β u_w) − log σ(−β u_l)`.
    BcoPair,
    /// SPPO (hard labels): `(u_w − 1/(2β))² + (u_l + 1/(2β))²`.
    SppoHard,
    /// AOT (paired): conservative DPO on sorted policy margins minus sorted reference margins.
    Aot,
    /// AOT (unpaired): conservative DPO on sorted chosen log-ratios minus sorted rejected ones.
    AotUnpaired,
    /// APO-zero: `1 − σ(β u_w) + σ(β u_l)`.
    ApoZero,
    /// APO-down: `σ(β u_w) + 1 − σ(β (u_w − u_l))`.
    ApoDown,
    /// DiscoPOP: a log-ratio-modulated blend of the logistic and exponential losses.
    Discopop,
    /// SFT: the mean NLL per chosen completion token (RPO's term).
    Sft,
    /// DPO on per-token mean scores: `−log σ(β Δ̄)`.
    SigmoidNorm,
}

impl LossType {
    /// All fifteen, in TRL's order.
    pub const ALL: [LossType; 15] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
    ];

    /// TRL's name (`"exo_pair"`, …).
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// Whether the loss reads the label smoothing ε (TRL: `robust`, `exo_pair`, `aot`,
    /// `aot_unpaired`; here also `sigmoid`, TRL 0.x's conservative DPO).
    pub fn uses_label_smoothing(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::Robust
                | LossType::ExoPair
                | LossType::Aot
                | LossType::AotUnpaired
        )
    }

    /// Whether the loss reads the f-divergence scores (TRL: sigmoid, sigmoid_norm, hinge, ipo,
    /// exo_pair, robust, discopop; sft reads neither), so that a non-default f-divergence
    /// applies.
    pub fn has_f_divergence_form(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::SigmoidNorm
                | LossType::Hinge
                | LossType::Ipo
                | LossType::ExoPair
                | LossType::Robust
                | LossType::Discopop
                | LossType::Sft
        )
    }

    /// Whether the batch loss is a mean of per-pair terms (every type but the AOT pair, which
    /// sort the batch and so couple its pairs).
    pub fn is_pairwise(self) -> bool {
        !matches!(self, LossType::Aot | LossType::AotUnpaired)
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, ObjectiveError> {
        LossType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| ObjectiveError::UnknownLossType(s.to_string()))
    }
}

/// TRL's `f_divergence_type`: the function `f` the scores apply to the log-ratios `u`
/// (f-DPO, Wang et al. 2023; formulas in [`crate::reward::score`]; TRL 1.16's forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
pub enum FDivergence {
    /// `f(u) = u` (standard DPO).
    #[default]
    ReverseKl,
    /// `f(u) = 1 − e^{−u}`.
    ForwardKl,
    /// `f(u) = log 2 + log σ(u)`.
    JsDivergence,
    /// `f(u) = (e^{(α−1) u} − 1) / (α − 1)` (`u` at `α = 1`).
    AlphaDivergence,
}

impl FDivergence {
    /// All four.
    pub const ALL: [FDivergence; 4] = [
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl FromStr for FDivergence {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, ObjectiveError> {
        FDivergence::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| ObjectiveError::UnknownFDivergence(s.to_string()))
    }
}

/// What is optimized. On a command line (the `clap` feature) the preference rules only:
/// `sft` is a command of its own there, as in TRL (`SFTTrainer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Rule {
    /// Token-level NLL (TRL's `SFTTrainer`).
    #[serde(rename = "sft")]
    #[cfg_attr(feature = "clap", value(skip))]
    Sft,
    /// The preference loss `Σ_k w_k mean ℓ_k` (TRL's `DPOTrainer`).
    #[default]
    #[serde(rename = "dpo")]
    #[cfg_attr(feature = "clap", value(name = "dpo"))]
    Preference,
    /// DPO-PG (Appendix H): a step along the chosen NLL's gradient projected off the rejected
    /// NLL's; the preference loss is computed for logging only.
    #[serde(rename = "dpo-pg")]
    #[cfg_attr(feature = "clap", value(name = "dpo-pg"))]
    ProjectedGradient,
}

impl Rule {
    /// `sft`, `dpo`, `dpo-pg`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Sft => "sft",
            Rule::Preference => "dpo",
            Rule::ProjectedGradient => "dpo-pg",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an objective is invalid (each names TRL's field).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectiveError {
    /// `β ≤ 0` or not finite.
    #[error("beta must be finite and positive, got {0}")]
    Beta(f64),
    /// ε outside `[0, 1/2]` (`[0, 1/2)` for `robust`, `(0, 1/2]` for `exo_pair`).
    #[error("label_smoothing = {value}: {reason}")]
    LabelSmoothing {
        /// ε.
        value: f64,
        /// The violated range.
        reason: String,
    },
    /// No loss type.
    #[error("loss_type is empty: give at least one loss type")]
    NoLossType,
    /// An unknown loss type name.
    #[error(
        "unknown loss_type `{0}` (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, \
         sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm)"
    )]
    UnknownLossType(String),
    /// An unknown f-divergence name.
    #[error(
        "unknown f_divergence_type `{0}` (reverse_kl, forward_kl, js_divergence, alpha_divergence)"
    )]
    UnknownFDivergence(String),
    /// `loss_weights` of another length than `loss_type`.
    #[error("loss_weights has {weights} entries for {types} loss types")]
    LossWeightsLength {
        /// Weights given.
        weights: usize,
        /// Loss types given.
        types: usize,
    },
    /// A negative or non-finite loss weight.
    #[error("loss_weights must be finite and ≥ 0, got {0}")]
    LossWeight(f64),
    /// Every loss weight is 0: the loss is identically 0 and nothing would train.
    #[error(
        "loss_weights are all 0 ({0:?}): the loss would be 0 whatever the model, leaving nothing \
         to train; give at least one loss type a positive weight"
    )]
    ZeroLossWeights(Vec<f64>),
    /// `discopop_tau ≤ 0` or not finite.
    #[error("discopop_tau must be finite and positive, got {0}")]
    DiscopopTau(f64),
    /// A non-finite α-divergence coefficient.
    #[error("f_alpha_divergence_coef must be finite, got {0}")]
    FAlpha(f64),
    /// An f-divergence other than `reverse_kl` with a loss type that has no f-divergence form.
    #[error(
        "f_divergence_type = {f} applies to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, \
         discopop and sft only, not {loss_type} (TRL refuses it too: the f-DPO reparametrization \
         cancels only in the chosen − rejected difference)"
    )]
    FDivergenceLossType {
        /// The f-divergence.
        f: &'static str,
        /// The loss type.
        loss_type: &'static str,
    },
    /// A negative or non-finite `rpo_alpha`.
    #[error("rpo_alpha must be finite and ≥ 0, got {0}")]
    RpoAlpha(f64),
    /// An option that the rule or the loss types do not read (TRL would silently ignore it).
    #[error("{option} does not apply here: {reason}")]
    Inapplicable {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

/// The fields of an [`Objective`] as written in a TOML file or on the command line: TRL's
/// `DPOConfig` names and defaults, plus `objective` (the rule) and TRL 0.x's `reference_free`
/// and `rpo_alpha`. Plain data with [`Default`] (the one place of the defaults);
/// [`Objective::new`] validates it.
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
        }
    }
}

impl ObjectiveSpec {
    /// The field names, as written in a file (for a reader that rejects unknown keys).
    pub fn field_names() -> Vec<String> {
        let all = ObjectiveSpec {
            loss_weights: Some(vec![1.0]),
            rpo_alpha: Some(0.0),
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

/// A validated objective (see the module docs). Serializes as its [`ObjectiveSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ObjectiveSpec", into = "ObjectiveSpec")]
pub struct Objective {
    rule: Rule,
    terms: Vec<(LossType, f64)>,
    beta: f64,
    reference_free: bool,
    label_smoothing: f64,
    f_divergence: FDivergence,
    f_alpha: f64,
    discopop_tau: f64,
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
    /// Validates `spec`: `β > 0`; ε in `[0, 1/2]` (`< 1/2` for `robust`, `> 0` for
    /// `exo_pair`) and read by some loss type; one weight per loss type, each finite and `≥ 0`;
    /// `discopop_tau > 0`; a finite α-divergence coefficient; `rpo_alpha ≥ 0` (it becomes an
    /// `sft` term of weight α). `dpo-pg` takes no ε, no `sft` term and no `reference_free`
    /// (its step is the NLL projection; the options would only change the logged loss).
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
        if !(s.beta.is_finite() && s.beta > 0.0) {
            return Err(ObjectiveError::Beta(s.beta));
        }
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
        let has = |t: LossType| terms.iter().any(|(x, _)| *x == t);
        if has(LossType::Robust) && eps >= 0.5 {
            return ls("the robust loss divides by 1 − 2ε: ε must be below 0.5");
        }
        if has(LossType::ExoPair) && eps <= 0.0 {
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
        if s.objective == Rule::ProjectedGradient {
            let pg = |option: &'static str| {
                Err(ObjectiveError::Inapplicable {
                    option,
                    reason: "objective dpo-pg steps along the projected NLL gradient \
                             (Appendix H); it applies to objective dpo"
                        .into(),
                })
            };
            if has(LossType::Sft) {
                return pg(if s.rpo_alpha.is_some() {
                    "rpo_alpha"
                } else {
                    "the sft loss type"
                });
            }
            if eps > 0.0 {
                return pg("label_smoothing");
            }
            if s.reference_free {
                return pg("reference_free");
            }
        }
        Ok(Self {
            rule: s.objective,
            terms,
            beta: s.beta,
            reference_free: s.reference_free,
            label_smoothing: eps,
            f_divergence: s.f_divergence_type,
            f_alpha: s.f_alpha_divergence_coef,
            discopop_tau: s.discopop_tau,
        })
    }

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
            beta: self.beta,
            reference_free: self.reference_free,
            label_smoothing: self.label_smoothing,
            rpo_alpha: None,
            f_divergence_type: self.f_divergence,
            f_alpha_divergence_coef: self.f_alpha,
            discopop_tau: self.discopop_tau,
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
        self.beta
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

    /// Whether the run trains on preference pairs (`dpo`, `dpo-pg`).
    pub fn is_preference(&self) -> bool {
        self.rule != Rule::Sft
    }

    /// Whether the loss reads reference log-probabilities (a preference rule with the
    /// log-ratio reward).
    pub fn needs_reference(&self) -> bool {
        self.is_preference() && !self.reference_free
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

    /// A short label: `sft`, `dpo-pg`, `dpo` (the sigmoid loss), `ref-free` (its
    /// reference-free reward), with the loss types in parentheses otherwise (`dpo (ipo)`,
    /// `dpo (sigmoid+sft)`).
    pub fn label(&self) -> String {
        match self.rule {
            Rule::Sft => "sft".to_string(),
            Rule::ProjectedGradient => "dpo-pg".to_string(),
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
