//! The training core of `difinfo-train`: SFT, DPO (`sigmoid`, `hinge`, `ipo`), reference-free
//! DPO and DPO-PG (docs/theory.md, Appendix H) over any [`PolicyModel`], with owned optimizers
//! (SGD, RMSprop, AdamW; f32 state that checkpoints), Hugging Face learning-rate schedules,
//! global gradient clipping, gradient accumulation, TRL's metric names, atomic checkpoints and
//! exact resume.
//!
//! The only contact with the model is the [`PolicyModel`] trait and [`Batch`] (the
//! trainer's `batch::Batch` fields); [`adapter::TrainModel`] implements it for
//! [`crate::model::Model`]. A plain library: the commands `sft`, `dpo`, `plot` and `bench` are
//! in [`crate::commands`].

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod grads;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod output_dir;
pub mod parallel;
pub mod plot;
pub mod policy;
pub mod range;
pub mod refcache;
pub mod reward_model;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod tensorboard;
pub mod toy;
pub mod trainer;
pub mod zero;

pub use crate::batch::{Batch, Sequence};
pub use crate::error::{Error, Result};
pub use adapter::TrainModel;
pub use config::{merge, TrainConfig};
pub use data::{Dataset, Examples, PreferencePair};
pub use difinfo::objective::Objective;
pub use optim::{Optimizer, OptimizerConfig, OptimizerKind};
pub use policy::{PolicyModel, SeqLogps};
pub use schedule::{LrSchedule, SchedulerType};
pub use trainer::{StepReport, TrainSummary, Trainer};
