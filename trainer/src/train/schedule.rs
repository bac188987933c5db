//! Learning-rate schedules with Hugging Face `transformers` semantics.
//!
//! `lr(s) = learning_rate · λ(s)` where `s` is the number of optimizer steps already taken
//! (the step being computed uses `λ(s)`; HF logs `λ(s+1)` after the step, and so does the
//! trainer), `W` the warm-up steps and `T` the total steps:
//!
//! ```text
//! constant              λ(s) = 1                                       (get_constant_schedule: no warm-up)
//! constant_with_warmup  λ(s) = s / max(1, W)  if s < W,  else 1         (get_constant_schedule_with_warmup)
//! linear                λ(s) = s / max(1, W)  if s < W,  else max(0, (T − s) / max(1, T − W))
//! cosine                λ(s) = s / max(1, W)  if s < W,  else max(0, ½(1 + cos(π p))),
//!                       p = (s − W) / max(1, T − W)                     (num_cycles = 0.5)
//! ```
//!
//! As in HF, `constant` ignores the warm-up: use `constant_with_warmup` for the paper's
//! "constant LR with linear warm-up" (see `TrainConfig::warnings`).

use serde::{Deserialize, Serialize};

/// HF's `lr_scheduler_type` values that the trainer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SchedulerType {
    /// No warm-up, constant.
    Constant,
    /// Linear warm-up, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 (HF's default).
    Linear,
    /// Linear warm-up, then half a cosine to 0.
    Cosine,
}

impl std::str::FromStr for SchedulerType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(format!(
                "unknown lr_scheduler_type `{s}` (constant, constant_with_warmup, linear, cosine)"
            )),
        }
    }
}

/// HF's `get_warmup_steps`: `warmup_steps` if positive, else `⌈warmup_ratio · T⌉`.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total_steps as f64).ceil() as usize
    }
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The schedule's shape.
    pub kind: SchedulerType,
    /// The peak learning rate.
    pub learning_rate: f64,
    /// `W`.
    pub warmup_steps: usize,
    /// `T`.
    pub total_steps: usize,
}

impl LrSchedule {
    /// `λ(s)`.
    pub fn factor(&self, s: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if self.kind == SchedulerType::Constant {
            return 1.0;
        }
        if s < w {
            return s as f64 / w.max(1) as f64;
        }
        match self.kind {
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear => {
                (t.saturating_sub(s) as f64 / (t.saturating_sub(w)).max(1) as f64).max(0.0)
            }
            SchedulerType::Cosine => {
                let p = (s - w) as f64 / (t.saturating_sub(w)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            }
        }
    }

    /// `lr(s) = learning_rate · λ(s)`.
    pub fn lr(&self, s: usize) -> f64 {
        self.learning_rate * self.factor(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `lr_lambda`s (lr 1.0, W = 3, T = 10), evaluated with the Python of
    /// `[get_cosine_schedule_with_warmup(opt, 3, 10).lr_lambdas[0](s) for s in range(11)]` etc.
    #[test]
    fn matches_transformers() {
        let mk = |kind| LrSchedule {
            kind,
            learning_rate: 1.0,
            warmup_steps: 3,
            total_steps: 10,
        };
        let tol = 1e-12;
        let cos = mk(SchedulerType::Cosine);
        let want_cos = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.9504844339512095,
            0.8117449009293668,
            0.6112604669781572,
            0.38873953302184285,
            0.18825509907063323,
            0.04951556604879043,
            0.0,
        ];
        for (s, w) in want_cos.iter().enumerate() {
            assert!(
                (cos.lr(s) - w).abs() < tol,
                "cosine s={s}: {} vs {w}",
                cos.lr(s)
            );
        }
        let lin = mk(SchedulerType::Linear);
        let want_lin = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            6.0 / 7.0,
            5.0 / 7.0,
            4.0 / 7.0,
            3.0 / 7.0,
            2.0 / 7.0,
            1.0 / 7.0,
            0.0,
        ];
        for (s, w) in want_lin.iter().enumerate() {
            assert!((lin.lr(s) - w).abs() < tol, "linear s={s}");
        }
        let cw = mk(SchedulerType::ConstantWithWarmup);
        assert_eq!([cw.lr(0), cw.lr(3), cw.lr(9)], [0.0, 1.0, 1.0]);
        assert_eq!(mk(SchedulerType::Constant).lr(0), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(warmup_steps(0, 0.1, 25), 3);
        assert_eq!(warmup_steps(5, 0.1, 25), 5);
    }
}
