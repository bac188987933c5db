//! The training loop, generic over a [`PolicyModel`].
//!
//! One optimizer step takes up to `gradient_accumulation_steps` micro-batches of the current
//! epoch's data order (the last step of an epoch may take fewer), sums their gradients each
//! scaled by `1 / (micro-batches in the step)` (transformers' division of the loss by the
//! accumulation steps; SFT instead divides the summed token NLL by the step's token count, as
//! transformers does with `num_items_in_batch`), then: the DPO-PG projection (dpo-pg only),
//! the pre-clip global norm (`grad_norm`), clipping to `max_grad_norm`, the optimizer step
//! with `lr(s)`, logging, checkpointing.
//!
//! Everything is reduced in a fixed order (variables by name, examples by the epoch's
//! permutation), and the state saved in a checkpoint is complete, so a run of `2k` steps and
//! a run of `k` steps resumed for `k` more log identical metrics (except the timing-based
//! `tokens_per_second`) and end with bit-identical weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use difinfo::objective::{Objective, Rule};

use crate::dist::{self, Collective};
use crate::error::{Error, Result};
use crate::train::checkpoint::{
    checkpoint_dir, latest_checkpoint, load_state, prune_checkpoints,
    save_checkpoint_with_reference, TrainerState, OPTIMIZER_FILE, REF_MODEL_FILE, STATE_FORMAT,
};
use crate::train::config::TrainConfig;
use crate::train::data::{Dataset, Examples};
use crate::train::grads::{Grads, ProjectionStats};
use crate::train::metrics::{LogAccumulator, MetricsLog};
use crate::train::objective::PreferenceMetrics;
use crate::train::optim::Optimizer;
use crate::train::output_dir::{check_fresh_output_dir, clear_earlier_run};
use crate::train::parallel::BUCKET_BYTES;
use crate::train::policy::{load_named_into, PolicyModel};
use crate::train::refcache::{cache_key, cache_path, fingerprint_vars, RefLogps};
use crate::train::rng::{epoch_permutation, SplitMix64};
use crate::train::schedule::{warmup_steps, LrSchedule};
use crate::train::tensorboard::{self, EventWriter};
use crate::train::zero::Zero1;

mod gradients;
use gradients::StepGrads;

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step number (1-based, as logged).
    pub step: usize,
    /// The step's loss (before the update).
    pub loss: f64,
    /// Pre-clip global gradient norm.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub learning_rate: f64,
    /// The micro-batches' dataset indices.
    pub examples: Vec<Vec<usize>>,
    /// DPO-PG: what the projection did.
    pub projection: Option<ProjectionStats>,
    /// Per-micro-batch preference metrics (preference objectives).
    pub preference: Vec<PreferenceMetrics>,
    /// The record appended to the metrics files, on a logging step.
    pub logged: Option<Vec<(String, f64)>>,
    /// The checkpoint written after the step, if any.
    pub checkpoint: Option<PathBuf>,
    /// Non-padding tokens of every forward pass of the step.
    pub tokens: usize,
    /// Wall-clock seconds of the step (forward, backward, optimizer; not logging or saving).
    pub seconds: f64,
    /// Of them, seconds in collectives ([`dist::comm_seconds`]; 0 in a world of one).
    pub comm_seconds: f64,
}

/// The end of [`Trainer::train`].
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps taken in total.
    pub global_step: usize,
    /// The last logged record.
    pub last_record: Option<Vec<(String, f64)>>,
    /// DPO-PG: fraction of all steps whose projection was active.
    pub projection_active_fraction: Option<f64>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// A training run.
pub struct Trainer<'m, M: PolicyModel + ?Sized> {
    model: &'m M,
    vars: Vec<(String, Var)>,
    config: TrainConfig,
    objective: Objective,
    data: Dataset,
    reference: Option<RefLogps>,
    optimizer: Optimizer,
    schedule: LrSchedule,
    state: TrainerState,
    log: MetricsLog,
    micro_per_epoch: usize,
    last_checkpoint: Option<PathBuf>,
    device: Device,
    /// The processes this run is spread over ([`dist::world`]).
    world: &'static dyn Collective,
    /// ZeRO stage 1 over more than one rank: the variables' partition.
    zero: Option<Zero1>,
    /// The variables this rank's optimizer updates: all of them, or its shard under ZeRO-1.
    owned_vars: Vec<(String, Var)>,
    /// `report_to` TensorBoard on rank 0: this run's event file, opened at its first log.
    tensorboard: Option<EventWriter>,
    /// TR-DPO (`sync_ref_model`): the reference model, run on each batch and synced toward
    /// the policy ([`Trainer::with_synced_reference`]).
    synced_reference: Option<&'m dyn PolicyModel>,
    /// A reward model's per-pair margins (TRL's `margin` column), by dataset index.
    margins: Option<Vec<f64>>,
}

/// The ZeRO-1 partition of `vars` when the run shards its optimizer state over more than one
/// rank (`zero_stage = 1`; one rank has nothing to shard).
fn partition(config: &TrainConfig, vars: &[(String, Var)]) -> Result<Option<Zero1>> {
    let world = dist::world();
    if config.memory.zero_stage == 1 && world.world_size() > 1 {
        Zero1::new(world, vars, bucket_bytes(config)).map(Some)
    } else {
        Ok(None)
    }
}

/// Bytes per collective of gradients: `ddp_bucket_cap_mb` MiB, or [`BUCKET_BYTES`].
fn bucket_bytes(config: &TrainConfig) -> usize {
    config
        .ddp_bucket_cap_mb
        .map_or(BUCKET_BYTES, |mb| mb.saturating_mul(1 << 20))
}

/// The variables a rank's optimizer updates under `zero`.
fn owned(zero: &Option<Zero1>, vars: &[(String, Var)]) -> Vec<(String, Var)> {
    zero.as_ref()
        .map_or_else(|| vars.to_vec(), |z| z.owned_vars(vars))
}

/// `(micro-batches per epoch, optimizer steps per epoch, total steps)`, a micro-batch being
/// the examples of all `world` ranks (per-device batch × world size).
fn plan(config: &TrainConfig, n: usize, world: usize) -> (usize, usize, usize) {
    let micro = n.div_ceil(config.per_device_train_batch_size * world);
    let steps_per_epoch = micro.div_ceil(config.gradient_accumulation_steps).max(1);
    let total = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        (config.num_train_epochs * steps_per_epoch as f64).ceil() as usize
    };
    (micro, steps_per_epoch, total)
}

fn check_data(objective: &Objective, data: &Dataset, config: &TrainConfig) -> Result<()> {
    if data.is_empty() {
        return Err(Error::InvalidArgument("the dataset is empty".into()));
    }
    data.validate(objective.rule() == Rule::Sft && !config.completion_only_loss)?;
    match (&data.examples, objective.is_preference()) {
        (Examples::Preference(_), true) | (Examples::Sft(_), false) => Ok(()),
        _ => Err(Error::Options(format!(
            "objective {} does not train on this kind of data",
            objective.rule()
        ))),
    }
}

impl<'m, M: PolicyModel + ?Sized> Trainer<'m, M> {
    /// A fresh run: validates the config, refuses an `output_dir` holding an earlier run
    /// ([`check_fresh_output_dir`]; with `overwrite_output_dir` its files are removed, its
    /// reference caches kept), creates `output_dir` and writes the resolved config there, and
    /// computes (or reloads from the cache) the reference log-probs with the model as it is
    /// now (the reference is the initial policy).
    ///
    /// # Errors
    /// Invalid config or data, an earlier run in `output_dir`, I/O, non-finite reference
    /// log-probs.
    pub fn new(model: &'m M, config: TrainConfig, data: Dataset) -> Result<Self> {
        Self::start(model, model, config, data)
    }

    /// A fresh run whose reference log-probs come from `reference` (TRL's `ref_model`), a
    /// model over the same vocabulary; see [`Trainer::new`]. The cache key hashes
    /// `reference`'s weights, so another reference never reuses a cache.
    ///
    /// # Errors
    /// See [`Trainer::new`].
    pub fn with_reference<R: PolicyModel + ?Sized>(
        model: &'m M,
        reference: &R,
        config: TrainConfig,
        data: Dataset,
    ) -> Result<Self> {
        Self::start(model, reference, config, data)
    }

    fn start<R: PolicyModel + ?Sized>(
        model: &'m M,
        ref_model: &R,
        config: TrainConfig,
        data: Dataset,
    ) -> Result<Self> {
        config.validate()?;
        let objective = config.objective.clone();
        check_data(&objective, &data, &config)?;
        let out = config.output_dir.clone();
        let world = dist::world();
        check_fresh_output_dir(&out, config.overwrite_output_dir)?;
        // Every rank has looked before rank 0 writes.
        world.barrier()?;
        if world.rank() == 0 {
            std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
            if config.overwrite_output_dir {
                clear_earlier_run(&out)?;
            }
            config.save(&out)?;
        }
        let vars = model.named_vars();
        let zero = partition(&config, &vars)?;
        let optimizer = Optimizer::new(config.optimizer(), &owned(&zero, &vars))?;
        let (reference, key) = if objective.needs_reference() && !config.sync_ref_model {
            let pairs = data.pairs().unwrap_or_default();
            let bs = config
                .ref_batch_size
                .unwrap_or(config.per_device_train_batch_size);
            // LD-DPO's α changes the cached sums (a key without it: the plain sums).
            let settings = match objective.ld_alpha() {
                Some(a) => format!("{} ld_alpha={a:?}", data.settings),
                None => data.settings.clone(),
            };
            let key = cache_key(
                fingerprint_vars(&ref_model.reference_vars())?,
                pairs,
                &settings,
                data.pad_id,
                bs,
            );
            let dir = config.ref_cache_dir.clone().unwrap_or_else(|| out.clone());
            let (r, _hit) = RefLogps::load_or_compute(
                world,
                ref_model,
                pairs,
                Some(&dir),
                &key,
                bs,
                data.pad_id,
                objective.ld_alpha(),
            )?;
            (Some(r), Some(key))
        } else {
            (None, None)
        };
        let n = data.len();
        let (micro, _, total) = plan(&config, n, world.world_size());
        let state = TrainerState {
            format: STATE_FORMAT.to_string(),
            global_step: 0,
            total_steps: total,
            epoch: 0,
            batch_in_epoch: 0,
            epoch_float: 0.0,
            permutation: epoch_permutation(config.seed, 0, n),
            rng: SplitMix64::new(config.seed),
            log: LogAccumulator::default(),
            last_grad_norm: 0.0,
            projection_active_total: 0,
            ref_cache_key: key,
            checksums: false,
            global_micro_batch: Some(config.per_device_train_batch_size * world.world_size()),
        };
        let log = MetricsLog::new(&out);
        if world.rank() == 0 {
            log.reset()?;
        }
        Ok(Self::assemble(
            model, vars, zero, config, objective, data, reference, optimizer, state, log, micro,
            None,
        ))
    }

    /// Continues the run of checkpoint `dir`: weights, optimizer state, data order, RNG,
    /// pending metric sums; the reference log-probs come from the cache file recorded in the
    /// state; metrics logged after the checkpoint are removed. A changed `max_steps` /
    /// `num_train_epochs` is honored (the schedule uses the new total).
    ///
    /// # Errors
    /// A checkpoint that does not match the model, data or seed; a missing reference cache.
    pub fn resume(model: &'m M, config: TrainConfig, data: Dataset, dir: &Path) -> Result<Self> {
        config.validate()?;
        let objective = config.objective.clone();
        check_data(&objective, &data, &config)?;
        let out = config.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let mut state = load_state(dir)?;
        let n = data.len();
        let world = dist::world();
        let global = config.per_device_train_batch_size * world.world_size();
        if let Some(g) = state.global_micro_batch.filter(|&g| g != global) {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "the checkpoint's run took {g} examples per micro-batch over all ranks \
                     (per-device batch × world size); this one takes {} × {} = {global}: \
                     choose --per-device-train-batch-size so that the product stays {g}",
                    config.per_device_train_batch_size,
                    world.world_size()
                ),
            });
        }
        state.global_micro_batch = Some(global);
        let (micro, _, total) = plan(&config, n, world.world_size());
        if state.permutation != epoch_permutation(config.seed, state.epoch, n) {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: "the data order differs from the checkpoint's: data size or seed changed"
                    .into(),
            });
        }
        if state.batch_in_epoch >= micro {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: "batch position beyond the epoch: the batch size changed".into(),
            });
        }
        state.total_steps = total;
        let vars = model.named_vars();
        model.load_weights(dir)?;
        let optimizer = Optimizer::load(config.optimizer(), &vars, &dir.join(OPTIMIZER_FILE))?;
        // The checkpoint holds the whole state; a ZeRO-1 rank keeps its shard.
        let zero = partition(&config, &vars)?;
        let optimizer = match &zero {
            Some(z) => optimizer.restrict(&z.owned())?,
            None => optimizer,
        };
        let synced = config.sync_ref_model;
        let reference = match (objective.needs_reference() && !synced, &state.ref_cache_key) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    message: "no reference cache key in the state".into(),
                })
            }
            (true, Some(key)) => {
                let cdir = config.ref_cache_dir.clone().unwrap_or_else(|| out.clone());
                Some(RefLogps::load(&cache_path(&cdir, key), key, n)?)
            }
        };
        let log = MetricsLog::new(&out);
        if world.rank() == 0 {
            config.save(&out)?;
            log.truncate_after(state.global_step)?;
        }
        Ok(Self::assemble(
            model,
            vars,
            zero,
            config,
            objective,
            data,
            reference,
            optimizer,
            state,
            log,
            micro,
            Some(dir.to_path_buf()),
        ))
    }

    /// [`Trainer::resume`] from the latest checkpoint of `config.output_dir`.
    ///
    /// # Errors
    /// No checkpoint there; see [`Trainer::resume`].
    pub fn resume_latest(model: &'m M, config: TrainConfig, data: Dataset) -> Result<Self> {
        let dir = latest_checkpoint(&config.output_dir)?.ok_or_else(|| {
            Error::Options(format!("no checkpoint in {}", config.output_dir.display()))
        })?;
        Self::resume(model, config, data, &dir)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: &'m M,
        vars: Vec<(String, Var)>,
        zero: Option<Zero1>,
        config: TrainConfig,
        objective: Objective,
        data: Dataset,
        reference: Option<RefLogps>,
        optimizer: Optimizer,
        state: TrainerState,
        log: MetricsLog,
        micro_per_epoch: usize,
        last_checkpoint: Option<PathBuf>,
    ) -> Self {
        let total = state.total_steps;
        let schedule = LrSchedule {
            kind: config.lr_scheduler_type,
            learning_rate: config.learning_rate,
            warmup_steps: warmup_steps(config.warmup_steps, config.warmup_ratio, total),
            total_steps: total,
        };
        let device = model.device();
        let world = dist::world();
        let owned_vars = owned(&zero, &vars);
        Self {
            model,
            vars,
            zero,
            owned_vars,
            config,
            objective,
            data,
            reference,
            optimizer,
            schedule,
            state,
            log,
            micro_per_epoch,
            last_checkpoint,
            device,
            world,
            tensorboard: None,
            synced_reference: None,
            margins: None,
        }
    }

    /// TR-DPO (`sync_ref_model`, TRL's `SyncRefModelCallback`): `reference` (TRL's
    /// `ref_model`, or a second copy of the policy's starting checkpoint) is the run's
    /// reference, run on each batch; after every `ref_model_sync_steps`-th optimizer step its
    /// weights become `α · π + (1 − α) · π_ref` (`α = ref_model_mixup_alpha`), and each
    /// checkpoint holds them ([`REF_MODEL_FILE`]). A resumed run reads them back from the
    /// checkpoint it resumes. Its variables must be the policy's, by name and shape.
    ///
    /// # Errors
    /// `sync_ref_model` off; variables that differ from the policy's; a resumed checkpoint
    /// without the reference's weights.
    pub fn with_synced_reference(mut self, reference: &'m dyn PolicyModel) -> Result<Self> {
        if !self.config.sync_ref_model {
            return Err(Error::Options(
                "a synced reference model needs sync_ref_model".into(),
            ));
        }
        let rv = reference.named_vars();
        let same = rv.len() == self.vars.len()
            && rv
                .iter()
                .zip(&self.vars)
                .all(|((a, x), (b, y))| a == b && x.dims() == y.dims());
        if !same {
            return Err(Error::Options(
                "sync_ref_model: the reference model's weights must have the policy's names \
                 and shapes (it is mixed into them)"
                    .into(),
            ));
        }
        if let (Some(dir), true) = (&self.last_checkpoint, self.state.global_step > 0) {
            load_named_into(&rv, &dir.join(REF_MODEL_FILE))?;
        }
        self.synced_reference = Some(reference);
        Ok(self)
    }

    /// TR-DPO's sync, after the optimizer step that makes `global_step` a multiple of
    /// `ref_model_sync_steps`: `π_ref ← (1 − α) · π_ref + α · π` for every weight.
    fn sync_reference_if_due(&self) -> Result<()> {
        let Some(reference) = self.synced_reference else {
            return Ok(());
        };
        if self.state.global_step % self.config.ref_model_sync_steps != 0 {
            return Ok(());
        }
        let a = self.config.ref_model_mixup_alpha;
        for ((_, r), (_, p)) in reference.named_vars().iter().zip(&self.vars) {
            let mixed = (r.as_tensor().affine(1.0 - a, 0.0)? + p.as_tensor().affine(a, 0.0)?)?;
            r.set(&mixed)?;
        }
        Ok(())
    }

    /// Sets the per-pair margins a reward model's loss subtracts (TRL's `margin` column), one
    /// per example of the dataset.
    ///
    /// # Errors
    /// A count other than the dataset's; a non-finite margin.
    pub fn set_margins(&mut self, margins: Vec<f64>) -> Result<()> {
        if margins.len() != self.data.len() {
            return Err(Error::InvalidArgument(format!(
                "{} margins for {} examples",
                margins.len(),
                self.data.len()
            )));
        }
        if let Some((i, m)) = margins.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "example {i}: margin {m} is not finite"
            )));
        }
        self.margins = Some(margins);
        Ok(())
    }

    /// The resolved configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The objective.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// The state that a checkpoint would save now.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The reference log-probs, for objectives that use them.
    pub fn reference(&self) -> Option<&RefLogps> {
        self.reference.as_ref()
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The optimizer: this rank's shard of it under ZeRO-1.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The metrics files.
    pub fn metrics(&self) -> &MetricsLog {
        &self.log
    }

    /// The trainer's RNG (saved in checkpoints), for models that need randomness.
    pub fn rng_mut(&mut self) -> &mut SplitMix64 {
        &mut self.state.rng
    }

    /// The last checkpoint written or resumed from.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// Optimizer steps taken.
    pub fn global_step(&self) -> usize {
        self.state.global_step
    }

    /// Total optimizer steps of the run (for a progress bar).
    pub fn total_steps(&self) -> usize {
        self.state.total_steps
    }

    /// Whether every step has been taken.
    pub fn is_done(&self) -> bool {
        self.state.global_step >= self.state.total_steps
    }

    /// The dataset indices of the micro-batches the next step will use.
    pub fn upcoming_examples(&self) -> Vec<Vec<usize>> {
        self.microbatches()
            .into_iter()
            .map(|(_, idx)| idx)
            .collect()
    }

    /// The step's global micro-batches: `(index in the epoch, the examples of every rank)`.
    fn microbatches(&self) -> Vec<(usize, Vec<usize>)> {
        let bs = self.config.per_device_train_batch_size * self.world.world_size();
        let n = self.data.len();
        let start = self.state.batch_in_epoch;
        let end = (start + self.config.gradient_accumulation_steps).min(self.micro_per_epoch);
        (start..end)
            .map(|j| {
                (
                    j,
                    self.state.permutation[j * bs..((j + 1) * bs).min(n)].to_vec(),
                )
            })
            .collect()
    }

    fn non_finite(&self, what: String, mb: usize, examples: Vec<usize>) -> Error {
        Error::NonFinite {
            what,
            step: self.state.global_step + 1,
            batch: mb,
            epoch: self.state.epoch,
            examples,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// One optimizer step (`None` when the run is complete), top to bottom: the micro-batches'
    /// forward passes, objective and backward passes (`step_gradients`; DPO-PG's projection),
    /// the clipped optimizer update (`update`), the position and the log's sums (`advance`),
    /// then the metrics record and the checkpoint when due.
    ///
    /// # Errors
    /// [`Error::NonFinite`] (no update is made), tensor and I/O errors.
    pub fn train_step(&mut self) -> Result<Option<StepReport>> {
        if self.is_done() {
            return Ok(None);
        }
        let (t0, c0) = (Instant::now(), dist::comm_seconds());
        let mbs = self.microbatches();
        let (grads, step) = self.step_gradients(&mbs)?;
        self.model.set_dropout_seed(None);
        let (norm, lr) = self.update(grads, &mbs)?;
        let epoch_end = self.advance(&mbs, norm, &step);
        self.sync_reference_if_due()?;
        let seconds = t0.elapsed().as_secs_f64();
        let comm_seconds = dist::comm_seconds() - c0;
        self.state.log.seconds += seconds;
        let logged = self.log_if_due(norm, lr)?;
        let checkpoint = self.checkpoint_if_due(epoch_end, &mbs)?;
        Ok(Some(StepReport {
            step: self.state.global_step,
            loss: step.loss,
            grad_norm: norm,
            learning_rate: lr,
            examples: mbs.into_iter().map(|(_, i)| i).collect(),
            projection: step.projection,
            preference: step.preference,
            logged,
            checkpoint,
            tokens: step.tokens,
            seconds,
            comm_seconds,
        }))
    }

    /// The pre-clip global norm (an error when not finite: no update is made), clipping to
    /// `max_grad_norm`, and the optimizer's step at the schedule's rate; returns
    /// `(norm, rate)`.
    fn update(&mut self, grads: Grads, mbs: &[(usize, Vec<usize>)]) -> Result<(f64, f64)> {
        let norm = match &self.zero {
            Some(z) => z.dot(&grads, &grads)?.sqrt(),
            None => grads.global_norm()?,
        };
        if !norm.is_finite() {
            let all: Vec<usize> = mbs.iter().flat_map(|(_, i)| i.clone()).collect();
            return Err(self.non_finite(format!("gradient norm ({norm})"), mbs[0].0, all));
        }
        let grads = grads.clip(self.config.max_grad_norm, norm)?;
        let lr = self.schedule.lr(self.state.global_step);
        {
            let _p = crate::profile::region("optimizer (other)");
            self.optimizer.step(&self.owned_vars, &grads, lr)?;
        }
        if let Some(z) = &self.zero {
            z.all_gather_params(&self.vars)?;
        }
        Ok((norm, lr))
    }

    /// Advances the position past `mbs` (a new epoch's permutation at its end) and adds the
    /// step to the log's sums; returns whether the step ended an epoch.
    fn advance(&mut self, mbs: &[(usize, Vec<usize>)], norm: f64, step: &StepGrads) -> bool {
        let st = &mut self.state;
        st.global_step += 1;
        st.batch_in_epoch = mbs.last().map_or(st.batch_in_epoch, |(j, _)| j + 1);
        let epoch_end = st.batch_in_epoch >= self.micro_per_epoch;
        if epoch_end {
            st.epoch += 1;
            st.batch_in_epoch = 0;
            st.permutation = epoch_permutation(self.config.seed, st.epoch, self.data.len());
        }
        st.epoch_float = st.epoch as f64 + st.batch_in_epoch as f64 / self.micro_per_epoch as f64;
        st.last_grad_norm = norm;
        st.log.steps += 1;
        st.log.loss_sum += step.loss;
        st.log.tokens += step.tokens;
        st.log.num_tokens += step.tokens;
        if let Some(p) = &step.projection {
            if p.active {
                st.log.projection_active += 1;
                st.projection_active_total += 1;
            }
        }
        epoch_end
    }

    /// On a logging step (every `logging_steps`, and the last), the log's record, appended to
    /// the metrics files.
    fn log_if_due(&mut self, norm: f64, lr: f64) -> Result<Option<Vec<(String, f64)>>> {
        let st = &mut self.state;
        let step = st.global_step;
        let last = step >= st.total_steps;
        if step % self.config.logging_steps != 0 && !last {
            return Ok(None);
        }
        // The rate this step used, as transformers 5 logs it (4.x logged the next step's).
        let rec = st.log.take_record(
            step,
            st.epoch_float,
            norm,
            lr,
            self.objective.rule() == Rule::ProjectedGradient,
        );
        if self.world.rank() == 0 {
            self.log.append(&rec)?;
            if self.config.report_to.tensorboard() {
                self.tensorboard_record(&rec)?;
            }
        }
        Ok(Some(rec))
    }

    /// `report_to` TensorBoard: the record's scalars appended to this run's event file, which
    /// the first log creates under `<output_dir>/runs/` with the run's options as the text
    /// `args` (HF's `TensorBoardCallback`; a resumed run writes a new file).
    fn tensorboard_record(&mut self, rec: &[(String, f64)]) -> Result<()> {
        if self.tensorboard.is_none() {
            let host = tensorboard::hostname();
            let now = std::time::SystemTime::now();
            let dir = tensorboard::run_dir(&self.config.output_dir, now, &host);
            let mut w = EventWriter::create(&dir, &host)?;
            let args = serde_json::to_string_pretty(&self.config)
                .map_err(|e| Error::Options(format!("the run's options as JSON: {e}")))?;
            w.text("args", &args)?;
            self.tensorboard = Some(w);
        }
        match &mut self.tensorboard {
            Some(w) => w.scalars(rec),
            None => Ok(()),
        }
    }

    /// On a saving step (every `save_steps`, an epoch's end, the last), the checkpoint (older
    /// ones pruned to `save_total_limit`).
    fn checkpoint_if_due(
        &mut self,
        epoch_end: bool,
        mbs: &[(usize, Vec<usize>)],
    ) -> Result<Option<PathBuf>> {
        let step = self.state.global_step;
        let last = step >= self.state.total_steps;
        let save =
            (self.config.save_steps > 0 && step % self.config.save_steps == 0) || epoch_end || last;
        if !save {
            return Ok(None);
        }
        // Never write non-finite weights over a good checkpoint (a finite gradient can still
        // overflow in the update), nor weights whose squared norm overflows their dtype (they
        // overflow in any forward pass).
        let w = Grads(
            self.vars
                .iter()
                .map(|(_, v)| v.as_tensor().detach())
                .collect(),
        )
        .global_norm_in_dtype()?;
        if !w.is_finite() {
            let all: Vec<usize> = mbs.iter().flat_map(|(_, i)| i.clone()).collect();
            return Err(Error::NonFinite {
                what: format!("weights after the update (norm {w})"),
                step,
                batch: mbs[0].0,
                epoch: self.state.epoch,
                examples: all,
                last_checkpoint: self.last_checkpoint.clone(),
            });
        }
        let dir = checkpoint_dir(&self.config.output_dir, step);
        // The whole optimizer state, so that any world size resumes (every rank takes part).
        let gathered = match &self.zero {
            Some(z) => Some(z.gather_optimizer(&self.optimizer, &self.vars)?),
            None => None,
        };
        if self.world.rank() == 0 {
            save_checkpoint_with_reference(
                &self.config.output_dir,
                self.model,
                self.synced_reference,
                gathered.as_ref().unwrap_or(&self.optimizer),
                &self.state,
                &self.config,
            )?;
            if let Some(limit) = self.config.save_total_limit {
                prune_checkpoints(&self.config.output_dir, limit)?;
            }
        }
        // No rank runs ahead of a checkpoint being written.
        self.world.barrier()?;
        self.last_checkpoint = Some(dir.clone());
        Ok(Some(dir))
    }

    /// Steps until `step` optimizer steps have been taken in total (or the run ends).
    ///
    /// # Errors
    /// See [`Trainer::train_step`].
    pub fn train_until(&mut self, step: usize) -> Result<Option<Vec<(String, f64)>>> {
        let mut last = None;
        while self.state.global_step < step.min(self.state.total_steps) {
            if let Some(r) = self.train_step()? {
                if r.logged.is_some() {
                    last = r.logged;
                }
            }
        }
        Ok(last)
    }

    /// Runs every remaining step.
    ///
    /// # Errors
    /// See [`Trainer::train_step`].
    pub fn train(&mut self) -> Result<TrainSummary> {
        let last_record = self.train_until(self.state.total_steps)?;
        Ok(TrainSummary {
            global_step: self.state.global_step,
            last_record,
            projection_active_fraction: (self.objective.rule() == Rule::ProjectedGradient).then(
                || self.state.projection_active_total as f64 / self.state.global_step.max(1) as f64,
            ),
            last_checkpoint: self.last_checkpoint.clone(),
        })
    }

    /// The checkpoint directory a save at the current step would use.
    pub fn checkpoint_path(&self) -> PathBuf {
        checkpoint_dir(&self.config.output_dir, self.state.global_step)
    }
}
