//! The run's options, named after TRL's `DPOConfig` / `SFTConfig` and HF's
//! `TrainingArguments` fields, loadable from TOML, with command-line overrides merged on top
//! (the command line wins), and saved resolved into the run directory.
//!
//! The binary's clap struct merges by serializing itself with every unset option skipped
//! (`#[serde(skip_serializing_if = "Option::is_none")]`) and field names equal to these:
//! see [`merge`].
//!
//! The objective's fields (`objective`, `loss_type`, `loss_weights`, `beta`,
//! `reference_free`, `label_smoothing`, `rpo_alpha`, `f_divergence_type`,
//! `f_alpha_divergence_coef`, `discopop_tau`) sit at the top level, as in TRL's `DPOConfig`, and
//! deserialize into the library's validated [`Objective`] (flattened); an unknown key is an
//! error naming it.

use std::path::{Path, PathBuf};

use difinfo::objective::{LossType, Objective, ObjectiveSpec, Rule};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::error::RangeError;
use crate::train::optim::{OptimizerConfig, OptimizerKind};
use crate::train::schedule::SchedulerType;

/// All options of a training run. Defaults are TRL's `DPOConfig` (over HF's
/// `TrainingArguments`) unless stated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// What to optimize: the rule (`objective = "sft" | "dpo" | "dpo-pg"`; not a TRL field:
    /// TRL has one trainer class per rule) and TRL's loss fields, validated by the library
    /// (fields and defaults: [`ObjectiveSpec`]). Default DPO, `sigmoid`, β = 0.1.
    #[serde(flatten)]
    pub objective: Objective,
    /// Run directory: checkpoints, metrics, resolved config. Default `runs/difinfo`.
    pub output_dir: PathBuf,
    /// Peak learning rate. Default 1e-6 (TRL's `DPOConfig`).
    pub learning_rate: f64,
    /// `sgd`, `rmsprop` or `adamw` (HF's `adamw_torch`). Default `adamw`.
    pub optim: OptimizerKind,
    /// Default 0.
    pub weight_decay: f64,
    /// Default 0.9.
    pub adam_beta1: f64,
    /// Default 0.999.
    pub adam_beta2: f64,
    /// Default 1e-8.
    pub adam_epsilon: f64,
    /// `constant`, `constant_with_warmup`, `linear`, `cosine`. Default `linear` (HF).
    pub lr_scheduler_type: SchedulerType,
    /// Warm-up steps; when 0, `⌈warmup_ratio · total steps⌉`. Default 0.
    pub warmup_steps: usize,
    /// Default 0.
    pub warmup_ratio: f64,
    /// Global gradient-norm clipping (of the projected gradient for DPO-PG); ≤ 0 disables.
    /// Default 1.0.
    pub max_grad_norm: f64,
    /// Micro-batch size (pairs for preference objectives). Default 8.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub gradient_accumulation_steps: usize,
    /// Epochs, used when `max_steps ≤ 0`. Default 3.
    pub num_train_epochs: f64,
    /// Total optimizer steps when positive (overrides epochs). Default -1.
    pub max_steps: i64,
    /// Log every N steps (and at the last). Default 10 (TRL).
    pub logging_steps: usize,
    /// Checkpoint every N steps (0: never; the end of each epoch and of training always).
    /// Default 500.
    pub save_steps: usize,
    /// HF's `save_total_limit`: keep only the newest N `checkpoint-*` directories of the run,
    /// deleting older ones after each save. Default none (keep all).
    pub save_total_limit: Option<usize>,
    /// Seed of the data order and of the trainer's RNG. Default 42.
    pub seed: u64,
    /// Maximum tokens of prompt + completion (applied by tokenization; 0 = no limit, TRL's
    /// `None`). Default 1024.
    pub max_length: usize,
    /// Maximum prompt tokens (applied by tokenization; 0 = no limit). Default 512.
    pub max_prompt_length: usize,
    /// TRL's field. The trainer always computes the reference log-probs once before training
    /// and caches them on disk (it never holds a reference model), so `false` is accepted and
    /// behaves as `true` (with a warning). Default true.
    pub precompute_ref_log_probs: bool,
    /// Directory of the reference log-prob cache. Default: `output_dir`.
    pub ref_cache_dir: Option<PathBuf>,
    /// SFT: loss on completion tokens only (TRL's `completion_only_loss`); false trains on the
    /// whole sequence (the paper's SFT). Default true.
    pub completion_only_loss: bool,
    /// Micro-batch size of the reference log-prob pass. Default: `per_device_train_batch_size`.
    pub ref_batch_size: Option<usize>,
    /// HF's field: a fresh run in an `output_dir` that holds checkpoints deletes them when
    /// true and is an error when false (so a later resume cannot pick up a stale one).
    /// Default false.
    pub overwrite_output_dir: bool,
    /// HF's `gradient_checkpointing`: each decoder layer's activations are recomputed in the
    /// backward pass instead of kept (same gradients, less memory, ~a third more compute).
    /// Default false.
    pub gradient_checkpointing: bool,
    /// TRL's `use_peft`: train LoRA adapters on the frozen model (see the `lora_*` fields);
    /// the reference is the base model (adapters off); checkpoints hold the adapters in PEFT's
    /// format. Default false.
    pub use_peft: bool,
    /// TRL's `lora_r`. Default 16.
    pub lora_r: usize,
    /// TRL's `lora_alpha` (the scale is `lora_alpha / lora_r`). Default 32.
    pub lora_alpha: f64,
    /// TRL's `lora_dropout` (on the adapters' inputs). Default 0.05.
    pub lora_dropout: f64,
    /// TRL's `lora_target_modules`: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj` or `all-linear`. Default `["q_proj", "v_proj"]` (PEFT's for Llama,
    /// Mistral and Qwen2).
    pub lora_target_modules: Vec<String>,
    /// TRL's `use_rslora` (scale `lora_alpha / √r`). Default false.
    pub use_rslora: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::default(),
            output_dir: PathBuf::from("runs/difinfo"),
            learning_rate: 1e-6,
            optim: OptimizerKind::Adamw,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            logging_steps: 10,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            max_length: 1024,
            max_prompt_length: 512,
            precompute_ref_log_probs: true,
            ref_cache_dir: None,
            completion_only_loss: true,
            ref_batch_size: None,
            overwrite_output_dir: false,
            gradient_checkpointing: false,
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: crate::lora::DEFAULT_TARGETS.map(String::from).to_vec(),
            use_rslora: false,
        }
    }
}

/// Name of the resolved config files written into the run directory.
pub const CONFIG_TOML: &str = "train_config.toml";
/// JSON twin of [`CONFIG_TOML`].
pub const CONFIG_JSON: &str = "train_config.json";

impl TrainConfig {
    /// Parses a TOML file (unknown keys are errors, so typos are caught).
    ///
    /// # Errors
    /// I/O and parse errors naming the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| Error::format(path, e))?;
        let cfg: TrainConfig = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| Error::format(path, e))?;
        check_keys(&table, &cfg).map_err(|e| Error::Options(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// The optimizer hyper-parameters (RMSprop keeps PyTorch's α = 0.99, ε = 1e-8).
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optim,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            ..OptimizerConfig::default()
        }
    }

    /// The LoRA configuration when `use_peft` is set.
    ///
    /// # Errors
    /// Out-of-range LoRA options or an unknown target module.
    pub fn lora(&self) -> Result<Option<crate::lora::LoraConfig>> {
        if !self.use_peft {
            return Ok(None);
        }
        crate::lora::LoraConfig::new(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            &self.lora_target_modules,
            self.use_rslora,
        )
        .map(Some)
        .map_err(|e| Error::Options(e.to_string()))
    }

    /// The ranges of the numeric optimization options, as PyTorch's optimizers and HF's
    /// `TrainingArguments` / TRL enforce them: the optimizer's ([`OptimizerConfig::validate`]),
    /// `0 ≤ learning_rate`, `warmup_ratio ∈ [0, 1]`, a number for `max_grad_norm` (≤ 0
    /// disables clipping), `0 ≤ num_train_epochs`, and at least 1 for the batch sizes,
    /// accumulation steps, logging interval and `save_total_limit`; every float finite.
    ///
    /// # Errors
    /// The first option out of range.
    pub fn check_ranges(&self) -> std::result::Result<(), RangeError> {
        self.optimizer().validate()?;
        let lr = self.learning_rate;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(RangeError::new(
                "learning_rate",
                lr,
                "must be finite and ≥ 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(RangeError::new(
                "warmup_ratio",
                self.warmup_ratio,
                "must lie in [0, 1] (a fraction of the total steps)",
            ));
        }
        if self.max_grad_norm.is_nan() {
            return Err(RangeError::new(
                "max_grad_norm",
                self.max_grad_norm,
                "must be a number (≤ 0 disables clipping)",
            ));
        }
        let epochs = self.num_train_epochs;
        if !(epochs.is_finite() && epochs >= 0.0) {
            return Err(RangeError::new(
                "num_train_epochs",
                epochs,
                "must be finite and ≥ 0",
            ));
        }
        for (field, v) in [
            (
                "per_device_train_batch_size",
                Some(self.per_device_train_batch_size),
            ),
            (
                "gradient_accumulation_steps",
                Some(self.gradient_accumulation_steps),
            ),
            ("logging_steps", Some(self.logging_steps)),
            ("ref_batch_size", self.ref_batch_size),
            ("save_total_limit", self.save_total_limit),
        ] {
            if v == Some(0) {
                return Err(RangeError::new(field, 0.0, "must be ≥ 1"));
            }
        }
        Ok(())
    }

    /// Checks ranges ([`TrainConfig::check_ranges`]) and combinations.
    ///
    /// # Errors
    /// [`Error::Options`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.check_ranges()?;
        let bad = |m: String| Err(Error::Options(m));
        if self.max_steps <= 0
            && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0)
        {
            return bad("set max_steps > 0 or num_train_epochs > 0".into());
        }
        self.lora()?;
        Ok(())
    }

    /// Non-fatal surprises worth printing (HF semantics that differ from what one may expect).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.lr_scheduler_type == SchedulerType::Constant
            && (self.warmup_steps > 0 || self.warmup_ratio > 0.0)
        {
            w.push(
                "lr_scheduler_type `constant` ignores the warm-up (as in transformers); use `constant_with_warmup`"
                    .to_string(),
            );
        }
        if !self.precompute_ref_log_probs && self.objective.needs_reference() {
            w.push("reference log-probs are always precomputed and cached (precompute_ref_log_probs = false has no effect)".to_string());
        }
        if self.objective.rule() == Rule::Sft
            && self.objective.terms() != [(LossType::Sigmoid, 1.0)]
        {
            w.push("loss_type is ignored by sft".to_string());
        }
        w
    }

    /// Writes `train_config.toml` and `train_config.json` into `dir`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let toml_text =
            toml::to_string_pretty(self).map_err(|e| Error::format(dir.join(CONFIG_TOML), e))?;
        let json_text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::format(dir.join(CONFIG_JSON), e))?;
        crate::io::write_bytes(&dir.join(CONFIG_TOML), toml_text.as_bytes())?;
        crate::io::write_bytes(&dir.join(CONFIG_JSON), json_text.as_bytes())
    }
}

/// The resolved configuration: defaults, overridden by the TOML file's keys, overridden by
/// the command line's set options.
///
/// `cli` is any serializable struct (the binary's clap arguments) whose field names are
/// [`TrainConfig`]'s and which skips unset options when serialized; fields that are not
/// training options (`model`, `data`, `config`, ...) must be `#[serde(skip)]`.
///
/// # Errors
/// An unknown key or a wrongly typed value, naming it; an invalid result.
pub fn merge<C: Serialize>(file: Option<&Path>, cli: &C) -> Result<TrainConfig> {
    merge_onto(&TrainConfig::default(), file, cli)
}

/// [`merge`] over the defaults `base` instead of [`TrainConfig::default`] (a command whose
/// defaults differ, e.g. `sft`'s learning rate): `base`, overridden by the file's keys,
/// overridden by the command line's.
///
/// # Errors
/// See [`merge`].
pub fn merge_onto<C: Serialize>(
    base: &TrainConfig,
    file: Option<&Path>,
    cli: &C,
) -> Result<TrainConfig> {
    let table =
        toml::Table::try_from(base).map_err(|e| Error::Options(format!("default options: {e}")))?;
    let file_table = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            text.parse::<toml::Table>()
                .map_err(|e| Error::format(p, e))?
        }
        None => toml::Table::new(),
    };
    let over = toml::Table::try_from(cli)
        .map_err(|e| Error::Options(format!("command-line options: {e}")))?;
    merge_tables(table, file.zip(Some(file_table)), over)
}

/// The last step of [`merge_onto`]: `base` (a [`TrainConfig`] as a table), overridden by the
/// keys of `file` (its path and table), overridden by `cli`'s, parsed and validated. An option
/// out of range is named where it was given: `--adam-beta1 1.5: …` on the command line,
/// `c.toml: adam_beta1 = 1.5: …` in a file.
///
/// # Errors
/// See [`merge`].
pub fn merge_tables(
    mut base: toml::Table,
    file: Option<(&Path, toml::Table)>,
    cli: toml::Table,
) -> Result<TrainConfig> {
    let (path, file_table) = match file {
        Some((p, t)) => (Some(p), t),
        None => (None, toml::Table::new()),
    };
    let in_file: Vec<String> = file_table.keys().cloned().collect();
    let on_cli: Vec<String> = cli.keys().cloned().collect();
    base.extend(file_table);
    base.extend(cli);
    let cfg: TrainConfig =
        toml::Value::Table(base.clone())
            .try_into()
            .map_err(|e: toml::de::Error| match path {
                Some(p) => Error::Options(format!("{}: {e}", p.display())),
                None => Error::Options(e.to_string()),
            })?;
    check_keys(&base, &cfg).map_err(Error::Options)?;
    if let Err(e) = cfg.check_ranges() {
        let given = |keys: &[String]| keys.iter().any(|k| k == e.field);
        return Err(Error::Options(if given(&on_cli) {
            format!("{} {}: {}", e.flag(), e.value, e.requirement)
        } else if let (true, Some(p)) = (given(&in_file), path) {
            format!("{}: {e}", p.display())
        } else {
            e.to_string()
        }));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Every key of `table` must be an option: a field of [`TrainConfig`] (those set in `cfg`, or
/// present in the defaults) or of the objective ([`ObjectiveSpec::field_names`]). Serde cannot
/// deny unknown fields next to the flattened objective, so this does.
fn check_keys(table: &toml::Table, cfg: &TrainConfig) -> std::result::Result<(), String> {
    let mut known: Vec<String> = ObjectiveSpec::field_names();
    for t in [TrainConfig::default(), cfg.clone()] {
        let tt = toml::Table::try_from(&t).map_err(|e| e.to_string())?;
        known.extend(tt.keys().cloned());
    }
    match table.keys().find(|k| !known.contains(k)) {
        Some(k) => Err(format!("unknown option `{k}`")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Cli {
        #[serde(skip_serializing_if = "Option::is_none")]
        beta: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        optim: Option<OptimizerKind>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_steps: Option<i64>,
        #[serde(skip)]
        #[allow(dead_code)]
        model: PathBuf,
    }

    #[test]
    fn command_line_wins_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "beta = 0.5\nlearning_rate = 1e-4\noptim = \"rmsprop\"\nloss_type = \"ipo\"\n",
        )
        .unwrap();
        let cli = Cli {
            beta: Some(0.25),
            max_steps: Some(7),
            ..Default::default()
        };
        let c = merge(Some(&f), &cli).unwrap();
        assert_eq!(c.objective.beta(), 0.25);
        assert_eq!(c.learning_rate, 1e-4);
        assert_eq!(c.optim, OptimizerKind::Rmsprop);
        assert_eq!(c.objective.terms(), &[(LossType::Ipo, 1.0)]);
        assert_eq!(c.max_steps, 7);
        assert_eq!(c.seed, 42);
        let none = merge(None, &Cli::default()).unwrap();
        assert_eq!(none, TrainConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "betta = 0.5\n").unwrap();
        let e = merge(Some(&f), &Cli::default()).unwrap_err().to_string();
        assert!(e.contains("betta"), "{e}");
        std::fs::write(&f, "optim = \"adam8bit\"\n").unwrap();
        assert!(merge(Some(&f), &Cli::default()).is_err());
        std::fs::write(&f, "beta = -1.0\n").unwrap();
        assert!(merge(Some(&f), &Cli::default())
            .unwrap_err()
            .to_string()
            .contains("beta"));
    }

    #[test]
    fn an_option_out_of_range_is_named_where_it_was_given() {
        #[derive(Serialize, Default)]
        struct Opt {
            #[serde(skip_serializing_if = "Option::is_none")]
            adam_beta1: Option<f64>,
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "adam_beta1 = 1.5\n").unwrap();
        let e = merge(Some(&f), &Opt::default()).unwrap_err().to_string();
        assert!(
            e.contains("c.toml: adam_beta1 = 1.5: must lie in [0, 1)"),
            "{e}"
        );
        let cli = Opt {
            adam_beta1: Some(-0.5),
        };
        let e = merge(Some(&f), &cli).unwrap_err().to_string();
        assert!(e.contains("--adam-beta1 -0.5: must lie in [0, 1)"), "{e}");
        let e = TrainConfig {
            adam_epsilon: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("adam_epsilon = 0: must be finite and > 0"),
            "{e}"
        );
    }

    #[test]
    fn saved_config_reloads_identically() {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            objective: Objective::dpo_pg(0.3).unwrap(),
            max_length: 0,
            ref_batch_size: Some(3),
            ..Default::default()
        };
        c.save(dir.path()).unwrap();
        let back = TrainConfig::from_toml_file(&dir.path().join(CONFIG_TOML)).unwrap();
        assert_eq!(back, c);
        let json: TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_JSON)).unwrap())
                .unwrap();
        assert_eq!(json, c);
    }
}
