//! The run's options, named after TRL's `DPOConfig` / `SFTConfig` and HF's
//! `TrainingArguments` fields: one struct ([`TrainConfig`]) that is the TOML file, the command
//! line (clap's derive; the only clap here: how an option is spelled, no parsing logic) and the
//! resolved `train_config.toml` saved into the run directory.
//!
//! Resolution ([`merge_tables`]): the defaults, overridden by the file's keys, overridden by
//! the options given on the command line (the command line wins), each as a TOML table keyed
//! by the field names.
//!
//! The objective's fields (`objective`, `loss_type`, `loss_weights`, `beta`,
//! `reference_free`, `label_smoothing`, `rpo_alpha`, `f_divergence_type`,
//! `f_alpha_divergence_coef`, `discopop_tau`, `ld_alpha`, `use_weighting`) sit at the top level, as in TRL's `DPOConfig`, and
//! deserialize into the library's validated [`Objective`] (flattened); an unknown key is an
//! error naming it.

use std::path::{Path, PathBuf};

use clap::ArgAction;
use difinfo::objective::{LossType, Objective, ObjectiveSpec, Rule};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::optim::{OptimizerConfig, OptimizerKind, ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON};
use crate::train::range::RangeError;
use crate::train::schedule::SchedulerType;
use crate::train::tensorboard::ReportTo;

/// A length limit in tokens (`--max-length`, `--max-prompt-length`): a positive count, or no
/// limit (TRL's `None`). The one spelling rule of every command: `none` or `0` is no limit;
/// [`TrainConfig`]'s fields and its TOML file store no limit as 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(pub Option<usize>);

impl Limit {
    /// Parses `none` or `0` (no limit) or a positive integer.
    ///
    /// # Errors
    /// Anything else, as clap's message.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s == "none" {
            return Ok(Self(None));
        }
        match s.parse::<usize>() {
            Ok(n) => Ok(Self::from_count(n)),
            Err(_) => Err(format!(
                "expected a positive integer or `none` (0: no limit too), got `{s}`"
            )),
        }
    }

    /// The limit a count stores: 0 is no limit.
    pub fn from_count(n: usize) -> Self {
        Self((n > 0).then_some(n))
    }

    /// As a count stores it: no limit is 0.
    pub fn count(self) -> usize {
        self.0.unwrap_or(0)
    }
}

/// [`Limit::parse`] as the count [`TrainConfig`]'s fields store (clap's value parser of
/// `--max-length` and `--max-prompt-length`).
///
/// # Errors
/// See [`Limit::parse`].
pub fn parse_limit_count(s: &str) -> std::result::Result<usize, String> {
    Limit::parse(s).map(Limit::count)
}

/// All options of a training run: the one definition of each training option, its name, its
/// doc and (in [`Default`]) its default. Defaults are TRL's `DPOConfig` (over HF's
/// `TrainingArguments`) unless stated; the commands' own defaults (`sft`'s learning rate,
/// the DID estimator's Appendix K values) are values of this struct too.
///
/// The same struct is the TOML file, the resolved `train_config.toml` and the command line:
/// clap's derive makes each field an option (`learning_rate` is `--learning-rate`, its doc the
/// help) and the front end sets the options' defaults from a `TrainConfig` value, so no default
/// is written twice. The objective's fields come from the library's [`ObjectiveSpec`] (its own
/// clap definition); here they are one validated field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct TrainConfig {
    /// What to optimize: the rule (`objective = "sft" | "dpo" | "dpo-pg"`; not a TRL field:
    /// TRL has one trainer class per rule) and TRL's loss fields, validated by the library
    /// (fields and defaults: [`ObjectiveSpec`]). Default DPO, `sigmoid`, β = 0.1.
    #[serde(flatten)]
    #[arg(skip)]
    pub objective: Objective,
    /// Run directory: checkpoints, metrics, resolved config.
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: f64,
    /// Optimizer (HF's optim): sgd, rmsprop (the paper's) or adamw (HF's adamw_torch).
    #[arg(long, value_enum)]
    pub optim: OptimizerKind,
    /// Weight decay (decoupled for adamw, L2 for sgd and rmsprop, as in PyTorch).
    #[arg(long)]
    pub weight_decay: f64,
    /// AdamW β₁.
    #[arg(long)]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[arg(long)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long)]
    pub adam_epsilon: f64,
    /// Learning-rate schedule (HF semantics: constant ignores the warm-up; the paper's
    /// "constant with linear warm-up" is constant_with_warmup).
    #[arg(long, value_enum)]
    pub lr_scheduler_type: SchedulerType,
    /// Linear warm-up steps (0: use the warm-up ratio, ⌈warmup_ratio · total steps⌉).
    #[arg(long)]
    pub warmup_steps: usize,
    /// Warm-up as a fraction of the total steps, when the warm-up steps are 0.
    #[arg(long)]
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (the projected gradient's for DPO-PG); ≤ 0
    /// disables.
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    /// Examples (pairs for preference objectives) per micro-batch.
    #[arg(long)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step (effective batch = this × batch size).
    #[arg(long)]
    pub gradient_accumulation_steps: usize,
    /// Epochs, used when max_steps ≤ 0.
    #[arg(long)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides the epochs when positive.
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// Append metrics (metrics.jsonl, metrics.csv) every N steps, and at the last.
    #[arg(long)]
    pub logging_steps: usize,
    /// Checkpoint every N steps (0: never); also at each epoch end and at the last step.
    #[arg(long)]
    pub save_steps: usize,
    /// Keep only the newest N checkpoints of the run, deleting older ones after each save
    /// (HF's save_total_limit) [default: all]
    #[arg(long, value_name = "N")]
    pub save_total_limit: Option<usize>,
    /// Where the logged metrics also go (HF's report_to): none (metrics.jsonl, metrics.csv and
    /// the plot only), tensorboard (event files under <output_dir>/runs/), all (every one this
    /// build has: tensorboard).
    #[arg(long, value_enum)]
    pub report_to: ReportTo,
    /// Seed of the data order and of the trainer's RNG.
    #[arg(long)]
    pub seed: u64,
    /// Longest prompt + completion in tokens (`none` or 0: no limit, TRL's None); completions
    /// are cut to fit, examples whose prompt alone fills it are dropped.
    #[arg(long, value_parser = parse_limit_count)]
    pub max_length: usize,
    /// Longest prompt in tokens (`none` or 0: no limit).
    #[arg(long, value_parser = parse_limit_count)]
    pub max_prompt_length: usize,
    /// TRL's field. Reference log-probs are always computed once before training and cached
    /// on disk (no reference model is held), so false behaves as true (with a warning).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub precompute_ref_log_probs: bool,
    /// Directory of the reference log-prob cache [default: the output dir]
    #[arg(long, value_name = "DIR")]
    pub ref_cache_dir: Option<PathBuf>,
    /// SFT: loss on completion tokens only (TRL's completion_only_loss); false trains on the
    /// whole sequence, prompt and template tokens included (the paper's SFT, Appendix J.2).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub completion_only_loss: bool,
    /// Pairs per forward pass of the reference pass [default: the per-device train batch
    /// size]
    #[arg(long, value_name = "N")]
    pub ref_batch_size: Option<usize>,
    /// Reward models: TRL's center_rewards_coefficient c, the weight of the term
    /// c · mean((r_chosen + r_rejected)²) that centers the rewards on 0 [default: none, no
    /// term]
    #[arg(long, value_name = "C")]
    pub center_rewards_coefficient: Option<f64>,
    /// HF's ddp_bucket_cap_mb: MiB of gradients per collective over the ranks (the all-reduce;
    /// under ZeRO-1 the reduce-scatter and the parameters' all-gather) [default: 25, PyTorch
    /// DDP's]
    #[arg(long, value_name = "MIB")]
    pub ddp_bucket_cap_mb: Option<usize>,
    /// HF's field: a fresh run in an output dir that holds an earlier run's checkpoints
    /// deletes them when true and is refused when false (so a later resume cannot pick up a
    /// stale one).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub overwrite_output_dir: bool,
    /// TR-DPO (TRL's sync_ref_model): every ref_model_sync_steps optimizer steps the
    /// reference's weights become α · π + (1 − α) · π_ref, α = ref_model_mixup_alpha. The
    /// reference model is then held in memory and runs on each batch (set
    /// precompute_ref_log_probs = false); its weights are saved in each checkpoint. Not with
    /// use_peft, as in TRL.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub sync_ref_model: bool,
    /// TR-DPO's α (TRL's ref_model_mixup_alpha), in [0, 1]: the policy's share of the synced
    /// reference, π_ref ← α · π + (1 − α) · π_ref. Read with sync_ref_model only.
    #[arg(long)]
    pub ref_model_mixup_alpha: f64,
    /// TR-DPO's τ (TRL's ref_model_sync_steps): optimizer steps between two syncs of the
    /// reference. Read with sync_ref_model only.
    #[arg(long)]
    pub ref_model_sync_steps: usize,
    /// The memory options: gradient checkpointing and LoRA (PEFT).
    #[serde(flatten)]
    #[command(flatten)]
    pub memory: MemoryOptions,
}

/// The memory options of a training run (and of `bench`): HF's `gradient_checkpointing` and
/// TRL's `ModelConfig` PEFT fields (LoRA with PEFT's semantics). Flattened into
/// [`TrainConfig`]: the same flat keys in a TOML file, the same flat options on the command
/// line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct MemoryOptions {
    /// HF's gradient_checkpointing: recompute each decoder layer's activations in the backward
    /// pass instead of keeping them (same gradients; less memory, about a third more compute).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// TRL's use_peft: train LoRA adapters (PEFT) on the frozen model; the reference is the
    /// base model (adapters off) and checkpoints hold adapter_config.json +
    /// adapter_model.safetensors (merge with `difinfo-train merge`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub use_peft: bool,
    /// LoRA rank r (TRL's lora_r).
    #[arg(long)]
    pub lora_r: usize,
    /// LoRA alpha (scale lora_alpha / lora_r).
    #[arg(long)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA adapters' inputs.
    #[arg(long)]
    pub lora_dropout: f64,
    /// Adapted modules, comma-separated, matched as PEFT matches a list: a projection name
    /// (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) in every layer, a module
    /// path (model.layers.0.self_attn.q_proj) alone, or all-linear.
    #[arg(long, value_delimiter = ',')]
    pub lora_target_modules: Vec<String>,
    /// Rank-stabilized LoRA (TRL's use_rslora): scale lora_alpha / √r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub use_rslora: bool,
    /// DeepSpeed's ZeRO stage over the ranks of `mpirun`: 0 keeps the whole optimizer state
    /// on every rank; 1 shards it (each rank keeps and updates the moments of its share of
    /// the variables, then the parameters are all-gathered), the same updates as 0 with about
    /// 1/N of the optimizer memory per rank. Stages 2 and 3 (gradients, parameters) are not
    /// implemented.
    #[arg(long)]
    pub zero_stage: u8,
    /// TRL's padding_free: each micro-batch's sequences packed into one row without padding,
    /// each at positions from 0 and attending only to itself; the same log-probs as padded
    /// batches, no compute on padding. Not for reward modelling.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub padding_free: bool,
}

impl Default for MemoryOptions {
    /// No checkpointing, no LoRA; PEFT's LoRA defaults (r = 16, α = 32, dropout 0.05, the
    /// query and value projections as for Llama, Mistral and Qwen2).
    fn default() -> Self {
        Self {
            gradient_checkpointing: false,
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: crate::lora::DEFAULT_TARGETS.map(String::from).to_vec(),
            use_rslora: false,
            zero_stage: 0,
            padding_free: false,
        }
    }
}

impl MemoryOptions {
    /// The LoRA options that only `use_peft` reads.
    pub const LORA_OPTIONS: [&'static str; 5] = [
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "use_rslora",
    ];

    /// The first of the `given` option names (TOML keys) that is a LoRA option while
    /// `use_peft` is off: it would be ignored, which is an error (as an objective option that
    /// the objective does not read).
    pub fn ignored_lora_option<'a>(
        &self,
        given: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        if self.use_peft {
            return None;
        }
        given.into_iter().find(|k| Self::LORA_OPTIONS.contains(k))
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

    /// Applies the options to a model about to train: LoRA adapters (seeded by `seed`, as TRL
    /// seeds before PEFT's initialization), gradient checkpointing and padding-free batches.
    ///
    /// # Errors
    /// Invalid LoRA options.
    pub fn apply_to(&self, model: &mut crate::model::Model, seed: u64) -> Result<()> {
        if let Some(lora) = self.lora()? {
            model.add_lora(lora, seed)?;
        }
        model.set_gradient_checkpointing(self.gradient_checkpointing);
        model.set_padding_free(self.padding_free);
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::default(),
            output_dir: PathBuf::from("runs/difinfo"),
            learning_rate: 1e-6,
            optim: OptimizerKind::Adamw,
            weight_decay: 0.0,
            adam_beta1: ADAM_BETA1,
            adam_beta2: ADAM_BETA2,
            adam_epsilon: ADAM_EPSILON,
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
            report_to: ReportTo::None,
            seed: 42,
            max_length: 1024,
            max_prompt_length: 512,
            precompute_ref_log_probs: true,
            ref_cache_dir: None,
            completion_only_loss: true,
            ref_batch_size: None,
            center_rewards_coefficient: None,
            ddp_bucket_cap_mb: None,
            overwrite_output_dir: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            memory: MemoryOptions::default(),
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

    /// The optimizer hyper-parameters (RMSprop keeps PyTorch's defaults,
    /// [`crate::train::optim::RMSPROP_ALPHA`] and [`crate::train::optim::RMSPROP_EPSILON`]).
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
            ("ddp_bucket_cap_mb", self.ddp_bucket_cap_mb),
            ("save_total_limit", self.save_total_limit),
            ("ref_model_sync_steps", Some(self.ref_model_sync_steps)),
        ] {
            if v == Some(0) {
                return Err(RangeError::new(field, 0.0, "must be ≥ 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
            return Err(RangeError::new(
                "ref_model_mixup_alpha",
                self.ref_model_mixup_alpha,
                "must lie in [0, 1] (the policy's share of the synced reference)",
            ));
        }
        if let Some(c) = self.center_rewards_coefficient {
            if !(c.is_finite() && c >= 0.0) {
                return Err(RangeError::new(
                    "center_rewards_coefficient",
                    c,
                    "must be finite and ≥ 0",
                ));
            }
        }
        if self.memory.zero_stage > 1 {
            return Err(RangeError::new(
                "zero_stage",
                f64::from(self.memory.zero_stage),
                "must be 0 or 1 (ZeRO stages 2 and 3 are not implemented)",
            ));
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
        self.memory.lora()?;
        if self.memory.padding_free && self.objective.rule() == Rule::Reward {
            return bad(
                "padding_free: not for reward modelling (a reward model scores each \
                 sequence's last token of a padded batch; TRL's RewardTrainer has no \
                 padding_free)"
                    .into(),
            );
        }
        self.check_sync_ref_model()
    }

    /// TR-DPO's combinations, refused as TRL refuses them (PEFT: no separate reference
    /// model to sync; precomputed reference log-probs: stale after a sync) or because nothing
    /// reads the reference (a reference-free reward, SFT, DPO-PG's NLL projection).
    fn check_sync_ref_model(&self) -> Result<()> {
        if !self.sync_ref_model {
            return Ok(());
        }
        let refuse = |why: &str| Err(Error::Options(format!("sync_ref_model: {why}")));
        if self.memory.use_peft {
            return refuse(
                "not with use_peft: a LoRA run's reference is the base model (adapters off), \
                 with no separate reference model to synchronize (TRL refuses it too)",
            );
        }
        if self.precompute_ref_log_probs {
            return refuse(
                "set precompute_ref_log_probs = false (--precompute-ref-log-probs false): \
                 precomputed reference log-probs assume a fixed reference, and the synced \
                 reference changes during the run (TRL refuses the pair too)",
            );
        }
        if self.objective.rule() != Rule::Preference || !self.objective.needs_reference() {
            return refuse(&format!(
                "objective {} reads no reference to synchronize (TR-DPO applies to objective \
                 dpo with the log-ratio reward)",
                self.objective.label()
            ));
        }
        Ok(())
    }

    /// The TR-DPO option among `given` that is read only with `sync_ref_model`, when it is
    /// off (TRL would ignore it).
    pub fn ignored_sync_option<'a>(
        &self,
        given: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        if self.sync_ref_model {
            return None;
        }
        given
            .into_iter()
            .find(|k| ["ref_model_mixup_alpha", "ref_model_sync_steps"].contains(k))
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
        if !self.precompute_ref_log_probs
            && self.objective.needs_reference()
            && !self.sync_ref_model
        {
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
    let defaults = base.clone();
    base.extend(file_table.clone());
    base.extend(cli.clone());
    let cfg: TrainConfig =
        toml::Value::Table(base.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                let e = e.to_string();
                // The objective's own error names its field (`beta must be …`).
                let field = objective_error(&base).and_then(|o| o.field());
                let named = field.filter(|k| cli.contains_key(*k));
                Error::Options(match (named, path) {
                    (Some(k), _) => {
                        format!("--{} {}: {e}", k.replace('_', "-"), as_typed(&cli[k]))
                    }
                    (None, Some(p)) => match culprit(&defaults, &file_table) {
                        // A wrongly typed value: serde's message names no key (flattened
                        // fields), so name the key that fails alone.
                        Some(k) if field != Some(k.as_str()) => {
                            format!("{}: {k} = {}: {e}", p.display(), file_table[&k])
                        }
                        _ => format!("{}: {e}", p.display()),
                    },
                    (None, None) => e,
                })
            })?;
    check_keys(&base, &cfg).map_err(Error::Options)?;
    // Objective options given (on the command line or in the file) that it does not read.
    for (given, on) in [(&on_cli, true), (&in_file, false)] {
        if let Err(e) = cfg.objective.check_given(given.iter().map(String::as_str)) {
            let k = match &e {
                difinfo::objective::ObjectiveError::Inapplicable { option, .. } => *option,
                _ => "",
            };
            let v = |t: &toml::Table| t.get(k).map(as_typed).unwrap_or_default();
            return Err(Error::Options(match (on, path) {
                (true, _) => format!("--{} {}: {e}", k.replace('_', "-"), v(&cli)),
                (false, Some(p)) => format!("{}: {k} = {}: {e}", p.display(), v(&file_table)),
                (false, None) => e.to_string(),
            }));
        }
        // LoRA options without use_peft, likewise (in a file, only those set to other than
        // the default: a saved train_config.toml lists every option).
        let set = given
            .iter()
            .map(String::as_str)
            .filter(|k| on || defaults.get(*k) != file_table.get(*k));
        let set: Vec<&str> = set.collect();
        if let Some(k) = cfg.ignored_sync_option(set.iter().copied()) {
            let why = "a TR-DPO option is read only with sync_ref_model (--sync-ref-model); \
                       add it or drop this option";
            return Err(Error::Options(match (on, path) {
                (true, _) => format!("--{} {}: {why}", k.replace('_', "-"), as_typed(&cli[k])),
                (false, Some(p)) => format!("{}: {k} = {}: {why}", p.display(), file_table[k]),
                (false, None) => format!("{k}: {why}"),
            }));
        }
        if let Some(k) = cfg.memory.ignored_lora_option(set.iter().copied()) {
            let why =
                "a LoRA option is read only with use_peft (--use-peft); add it or drop this option";
            return Err(Error::Options(match (on, path) {
                (true, _) => format!("--{} {}: {why}", k.replace('_', "-"), as_typed(&cli[k])),
                (false, Some(p)) => format!("{}: {k} = {}: {why}", p.display(), file_table[k]),
                (false, None) => format!("{k}: {why}"),
            }));
        }
    }
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

/// The objective's typed error for the options in `table`, when its fields parse and the
/// library's [`Objective::new`] refuses them (`None` otherwise).
fn objective_error(table: &toml::Table) -> Option<difinfo::objective::ObjectiveError> {
    let names = ObjectiveSpec::field_names();
    let fields: toml::Table = table
        .iter()
        .filter(|(k, _)| names.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let spec: ObjectiveSpec = toml::Value::Table(fields).try_into().ok()?;
    Objective::new(spec).err()
}

/// The first key of `file` whose value alone (over `defaults`) does not deserialize into a
/// [`TrainConfig`]: the key a type error is about.
fn culprit(defaults: &toml::Table, file: &toml::Table) -> Option<String> {
    file.iter()
        .find(|(k, v)| {
            let mut t = defaults.clone();
            t.insert((*k).clone(), (*v).clone());
            toml::Value::Table(t).try_into::<TrainConfig>().is_err()
        })
        .map(|(k, _)| k.clone())
}

/// An option's value as a user types it on the command line: a string unquoted, a float in
/// Rust's shortest round-trip form (`1e-6` as `0.000001`), a list comma-separated (the list
/// options split on commas). Used for the options' clap defaults and in error messages.
pub fn as_typed(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Array(a) => a.iter().map(as_typed).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
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
