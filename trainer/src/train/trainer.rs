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

use candle_core::{Device, Tensor, Var};
use difinfo::objective::{Objective, Rule};

use crate::batch::{Batch, Sequence};
use crate::error::{Error, Result};
use crate::train::checkpoint::{
    checkpoint_dir, latest_checkpoint, load_state, prune_checkpoints, save_checkpoint,
    TrainerState, OPTIMIZER_FILE, STATE_FORMAT,
};
use crate::train::config::TrainConfig;
use crate::train::data::{Dataset, Examples};
use crate::train::grads::{project, Grads, ProjectionStats};
use crate::train::metrics::{LogAccumulator, MetricsLog};
use crate::train::objective::{
    nll_mean, preference_loss, sft_loss, PreferenceLoss, PreferenceMetrics,
};
use crate::train::optim::Optimizer;
use crate::train::policy::{PolicyModel, SeqLogps};
use crate::train::refcache::{cache_key, cache_path, fingerprint_vars, RefLogps};
use crate::train::rng::{epoch_permutation, SplitMix64};
use crate::train::schedule::{warmup_steps, LrSchedule};

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
}

/// The files an earlier run leaves in its output directory besides checkpoints and reference
/// caches: metrics, resolved config, the command's run record and summary.
pub const RUN_FILES: [&str; 6] = [
    crate::train::metrics::METRICS_JSONL,
    crate::train::metrics::METRICS_CSV,
    crate::train::config::CONFIG_TOML,
    crate::train::config::CONFIG_JSON,
    crate::train::run::RUN_RECORD,
    crate::train::run::SUMMARY_FILE,
];

/// What in `output_dir` shows an earlier run there (names, sorted): [`RUN_FILES`], checkpoint
/// directories (complete, or a `.checkpoint-N.tmp` a crash left mid-write) and reference
/// log-prob caches. A run that crashed before its first checkpoint leaves its metrics and
/// config, so checkpoints alone are not the test.
///
/// # Errors
/// I/O errors reading the directory.
pub fn earlier_run(output_dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut found = Vec::new();
    for e in rd {
        let name = e
            .map_err(|e| Error::io(output_dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let checkpoint = name.starts_with("checkpoint-")
            || (name.starts_with(".checkpoint-") && name.ends_with(".tmp"));
        let cache = name.starts_with("ref_logps-") && name.ends_with(".safetensors");
        if RUN_FILES.contains(&name.as_str()) || checkpoint || cache {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Refuses a fresh run in an `output_dir` that holds an [`earlier_run`] unless `overwrite`
/// (HF's `overwrite_output_dir`); `--resume` does not come here.
///
/// # Errors
/// [`Error::Options`] naming the files found and the ways out.
pub fn check_fresh_output_dir(output_dir: &Path, overwrite: bool) -> Result<()> {
    let found = earlier_run(output_dir)?;
    if overwrite || found.is_empty() {
        return Ok(());
    }
    let mut shown = found.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if found.len() > 5 {
        shown.push_str(", …");
    }
    let resume = match latest_checkpoint(output_dir)? {
        Some(c) => format!(
            "continue it with --resume {} (from {}), ",
            output_dir.display(),
            c.display()
        ),
        None => "it has no checkpoint to resume from; ".into(),
    };
    Err(Error::Options(format!(
        "{} holds an earlier run ({shown}): {resume}choose another --output-dir, or pass \
         --overwrite-output-dir (overwrite_output_dir = true) to replace it",
        output_dir.display()
    )))
}

/// With `overwrite_output_dir`: removes what an earlier run left in `output_dir` that the new
/// run would not replace itself (checkpoints, temporary checkpoint directories, metrics, the
/// summary), so no stale file is mistaken for the new run's. Reference caches stay: they are
/// keyed by model, data and settings, and reused only on a match.
fn clear_earlier_run(output_dir: &Path) -> Result<()> {
    for name in earlier_run(output_dir)? {
        let p = output_dir.join(&name);
        if name.starts_with("ref_logps-") {
            continue;
        }
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// `(micro-batches per epoch, optimizer steps per epoch, total steps)`.
fn plan(config: &TrainConfig, n: usize) -> (usize, usize, usize) {
    let micro = n.div_ceil(config.per_device_train_batch_size);
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
        check_fresh_output_dir(&out, config.overwrite_output_dir)?;
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        if config.overwrite_output_dir {
            clear_earlier_run(&out)?;
        }
        config.save(&out)?;
        let vars = model.named_vars();
        let optimizer = Optimizer::new(config.optimizer(), &vars)?;
        let (reference, key) = if objective.needs_reference() {
            let pairs = data.pairs().unwrap_or_default();
            let bs = config
                .ref_batch_size
                .unwrap_or(config.per_device_train_batch_size);
            let key = cache_key(
                fingerprint_vars(&ref_model.reference_vars())?,
                pairs,
                &data.settings,
                data.pad_id,
                bs,
            );
            let dir = config.ref_cache_dir.clone().unwrap_or_else(|| out.clone());
            let (r, _hit) =
                RefLogps::load_or_compute(ref_model, pairs, Some(&dir), &key, bs, data.pad_id)?;
            (Some(r), Some(key))
        } else {
            (None, None)
        };
        let n = data.len();
        let (micro, _, total) = plan(&config, n);
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
        };
        let log = MetricsLog::new(&out);
        log.reset()?;
        Ok(Self::assemble(
            model, vars, config, objective, data, reference, optimizer, state, log, micro, None,
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
        let (micro, _, total) = plan(&config, n);
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
        let reference = match (objective.needs_reference(), &state.ref_cache_key) {
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
        config.save(&out)?;
        let log = MetricsLog::new(&out);
        log.truncate_after(state.global_step)?;
        Ok(Self::assemble(
            model,
            vars,
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
        Self {
            model,
            vars,
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
        }
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

    fn microbatches(&self) -> Vec<(usize, Vec<usize>)> {
        let bs = self.config.per_device_train_batch_size;
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

    fn grads(&self, loss: &Tensor) -> Result<Grads> {
        let store = self.model.backward(loss)?;
        let (g, missing) = Grads::from_store(&store, &self.vars, 1.0)?;
        if !missing.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "variables without a gradient: {missing:?} (an op without backward in the model's forward?)"
            )));
        }
        Ok(g)
    }

    fn batch(&self, seqs: &[&Sequence]) -> Result<Batch> {
        Batch::for_training(seqs, self.data.pad_id, &self.device)
    }

    /// The objective's loss on the pairs `idx` (the reference log-probs from the cache).
    fn preference_loss(
        &self,
        idx: &[usize],
        chosen: &SeqLogps,
        rejected: &SeqLogps,
    ) -> Result<PreferenceLoss> {
        let refs = match &self.reference {
            Some(r) if self.objective.needs_reference() => {
                Some(r.select(idx, chosen.sum.dtype(), &self.device)?)
            }
            _ => None,
        };
        preference_loss(
            &self.objective,
            chosen,
            rejected,
            refs.as_ref().map(|(c, r)| (c, r)),
        )
    }

    fn check_pref(&self, m: &PreferenceMetrics, mb: usize, idx: &[usize]) -> Result<()> {
        for (name, v) in [
            ("loss", m.loss),
            ("logps/chosen", m.logps_chosen),
            ("logps/rejected", m.logps_rejected),
        ] {
            if !v.is_finite() {
                return Err(self.non_finite(format!("{name} ({v})"), mb, idx.to_vec()));
            }
        }
        Ok(())
    }

    /// The dropout seed of micro-batch `mb` (its index in the epoch) of the current step: a
    /// function of the run's seed and the position alone, so a resumed run draws the same.
    fn dropout_seed(&self, mb: usize) -> u64 {
        let step = self.state.global_step as u64;
        SplitMix64::for_stream(self.config.seed, 0x4452_4f50 ^ (step << 20) ^ mb as u64).next_u64()
    }

    /// One optimizer step (`None` when the run is complete).
    ///
    /// # Errors
    /// [`Error::NonFinite`] (no update is made), tensor and I/O errors.
    pub fn train_step(&mut self) -> Result<Option<StepReport>> {
        if self.is_done() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let mbs = self.microbatches();
        let k = mbs.len() as f64;
        let mut step_loss = 0.0;
        let mut tokens = 0usize;
        let mut pref_metrics = Vec::new();
        let mut projection = None;
        let grads = match (self.objective.rule(), &self.data.examples) {
            (Rule::Sft, Examples::Sft(seqs)) => {
                let whole = !self.config.completion_only_loss;
                let pick = |i: usize| -> Sequence {
                    let s = &seqs[i];
                    if whole {
                        Sequence {
                            ids: s.ids.clone(),
                            completion_start: 0,
                        }
                    } else {
                        s.clone()
                    }
                };
                let chosen: Vec<Vec<Sequence>> = mbs
                    .iter()
                    .map(|(_, idx)| idx.iter().map(|&i| pick(i)).collect())
                    .collect();
                let normalizer: usize = chosen
                    .iter()
                    .flatten()
                    .map(Sequence::num_completion_tokens)
                    .sum();
                let mut acc: Option<Grads> = None;
                for ((mb, idx), seqs) in mbs.iter().zip(&chosen) {
                    let refs: Vec<&Sequence> = seqs.iter().collect();
                    let batch = self.batch(&refs)?;
                    tokens += batch.num_tokens();
                    self.model.set_dropout_seed(Some(self.dropout_seed(*mb)));
                    let s = self.model.sequence_logps(&batch)?;
                    let loss = sft_loss(&s, normalizer.max(1) as f64)?;
                    let v = crate::train::policy::scalar_f64(&loss)?;
                    if !v.is_finite() {
                        return Err(self.non_finite(format!("loss ({v})"), *mb, idx.clone()));
                    }
                    step_loss += v;
                    let g = self.grads(&loss)?;
                    acc = Some(match acc {
                        None => g,
                        Some(a) => a.add(&g)?,
                    });
                    self.state.log.add_microbatch(&[]);
                }
                acc.expect("at least one micro-batch")
            }
            (Rule::Preference, Examples::Preference(pairs)) => {
                let mut acc: Option<Grads> = None;
                for (mb, idx) in &mbs {
                    let seqs: Vec<&Sequence> = idx
                        .iter()
                        .map(|&i| &pairs[i].chosen)
                        .chain(idx.iter().map(|&i| &pairs[i].rejected))
                        .collect();
                    let batch = self.batch(&seqs)?;
                    tokens += batch.num_tokens();
                    self.model.set_dropout_seed(Some(self.dropout_seed(*mb)));
                    let out = self.model.sequence_logps(&batch)?;
                    let b = idx.len();
                    let half = |o: usize| -> candle_core::Result<SeqLogps> {
                        Ok(SeqLogps {
                            sum: out.sum.narrow(0, o, b)?,
                            count: out.count.narrow(0, o, b)?,
                        })
                    };
                    let pl = self.preference_loss(idx, &half(0)?, &half(b)?)?;
                    let m = pl.metrics()?;
                    self.check_pref(&m, *mb, idx)?;
                    step_loss += m.loss / k;
                    let g = self.grads(&pl.loss.affine(1.0 / k, 0.0)?)?;
                    acc = Some(match acc {
                        None => g,
                        Some(a) => a.add(&g)?,
                    });
                    self.state.log.add_microbatch(&m.record());
                    pref_metrics.push(m);
                }
                acc.expect("at least one micro-batch")
            }
            (Rule::ProjectedGradient, Examples::Preference(pairs)) => {
                let mut acc: Option<(Grads, Grads)> = None;
                for (mb, idx) in &mbs {
                    let cs: Vec<&Sequence> = idx.iter().map(|&i| &pairs[i].chosen).collect();
                    let rs: Vec<&Sequence> = idx.iter().map(|&i| &pairs[i].rejected).collect();
                    let (cb, rb) = (self.batch(&cs)?, self.batch(&rs)?);
                    tokens += cb.num_tokens() + rb.num_tokens();
                    self.model.set_dropout_seed(Some(self.dropout_seed(*mb)));
                    let sc = self.model.sequence_logps(&cb)?;
                    let sr = self.model.sequence_logps(&rb)?;
                    let detached = |s: &SeqLogps| SeqLogps {
                        sum: s.sum.detach(),
                        count: s.count.clone(),
                    };
                    let pl = self.preference_loss(idx, &detached(&sc), &detached(&sr))?;
                    let m = pl.metrics()?;
                    self.check_pref(&m, *mb, idx)?;
                    step_loss += m.loss / k;
                    let gw = self.grads(&nll_mean(&sc.sum, 1.0 / k)?)?;
                    let gl = self.grads(&nll_mean(&sr.sum, 1.0 / k)?)?;
                    acc = Some(match acc {
                        None => (gw, gl),
                        Some((aw, al)) => (aw.add(&gw)?, al.add(&gl)?),
                    });
                    self.state.log.add_microbatch(&m.record());
                    pref_metrics.push(m);
                }
                let (gw, gl) = acc.expect("at least one micro-batch");
                let (g, stats) = project(&gw, &gl)?;
                projection = Some(stats);
                g
            }
            _ => return Err(Error::Options("objective and data kind differ".into())),
        };
        self.model.set_dropout_seed(None);
        let norm = grads.global_norm()?;
        if !norm.is_finite() {
            let all: Vec<usize> = mbs.iter().flat_map(|(_, i)| i.clone()).collect();
            return Err(self.non_finite(format!("gradient norm ({norm})"), mbs[0].0, all));
        }
        let grads = grads.clip(self.config.max_grad_norm, norm)?;
        let lr = self.schedule.lr(self.state.global_step);
        self.optimizer.step(&self.vars, &grads, lr)?;

        // Advance the position.
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
        st.log.loss_sum += step_loss;
        st.log.tokens += tokens;
        st.log.num_tokens += tokens;
        let seconds = t0.elapsed().as_secs_f64();
        st.log.seconds += seconds;
        if let Some(p) = &projection {
            if p.active {
                st.log.projection_active += 1;
                st.projection_active_total += 1;
            }
        }
        let step = st.global_step;
        let last = step >= st.total_steps;
        let logged = if step % self.config.logging_steps == 0 || last {
            // The rate this step used, as transformers 5 logs it (4.x logged the next step's).
            let rec = st.log.take_record(
                step,
                st.epoch_float,
                norm,
                lr,
                self.objective.rule() == Rule::ProjectedGradient,
            );
            self.log.append(&rec)?;
            Some(rec)
        } else {
            None
        };
        let save =
            (self.config.save_steps > 0 && step % self.config.save_steps == 0) || epoch_end || last;
        let checkpoint = if save {
            // Never write non-finite weights over a good checkpoint (a finite gradient can
            // still overflow in the update), nor weights whose squared norm overflows their
            // dtype (they overflow in any forward pass).
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
            let dir = save_checkpoint(
                &self.config.output_dir,
                self.model,
                &self.optimizer,
                &self.state,
                &self.config,
            )?;
            if let Some(limit) = self.config.save_total_limit {
                prune_checkpoints(&self.config.output_dir, limit)?;
            }
            self.last_checkpoint = Some(dir.clone());
            Some(dir)
        } else {
            None
        };
        Ok(Some(StepReport {
            step,
            loss: step_loss,
            grad_norm: norm,
            learning_rate: lr,
            examples: mbs.into_iter().map(|(_, i)| i).collect(),
            projection,
            preference: pref_metrics,
            logged,
            checkpoint,
            tokens,
            seconds,
        }))
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
