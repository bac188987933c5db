//! Training a softmax policy `π = softmax(f)` (one logit row per prompt) on preference pairs
//! `y_w ~ chosen`, `y_l ~ rejected`, in two modes:
//!
//! - **population**: the exact expected loss and its gradient ([`population_loss`]), minimized by
//!   L-BFGS ([`lbfgs`]) to the float resolution of the loss; DPO-PG, which has no loss, takes
//!   RMSprop steps along the projection of the exact expected NLL gradients
//!   `g_w = π − chosen`, `g_l = π − rejected`.
//! - **sampled**: minibatches of `B` pairs per prompt and step, the batch-mean loss's gradient
//!   with respect to the logits, global gradient-norm clipping, then RMSprop at a constant
//!   learning rate (Appendix J.1). In `f64` (the paper's float32 is not needed for speed here),
//!   one seeded `StdRng`, every reduction a sequential loop: bit-identical reruns.
//!
//! The batch loss and its gradient `G_y = ∂L/∂log π(y)` are the library's
//! ([`sample_loss`]: the objective's loss texts over dual numbers, TRL's batch semantics, AOT
//! sorting the batch), then the log-softmax:
//!
//! ```text
//! ∂L/∂f_y  = G_y − π(y) Σ_k G_k
//! ```
//!
//! DPO-PG uses the batch NLL gradients `g_w = π − (1/B) Σ_i e_{y_w,i}`,
//! `g_l = π − (1/B) Σ_i e_{y_l,i}` and [`project`] (Appendix H); with `P` prompts the projection
//! acts on the flat `P·N` vector.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::dpo_pg::project;
use crate::error::Result;
use crate::objective::{Objective, Rule};
use crate::policy::Policy;
use crate::population::{population_loss, sample_loss};

use super::optim::{clip_grad_norm, lbfgs, RmsProp, Stop};

/// Hyperparameters of one training run (see the module docs of [`crate::synthetic`] for the
/// defaults and why).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Sampled mode (and population DPO-PG): optimizer steps.
    pub steps: usize,
    /// Sampled mode: pairs per prompt per step.
    pub batch: usize,
    /// RMSprop learning rate (constant).
    pub lr: f64,
    /// RMSprop `α`.
    pub alpha: f64,
    /// RMSprop `ε`.
    pub eps: f64,
    /// Global gradient-norm clipping threshold.
    pub clip: f64,
    /// Population mode: L-BFGS iteration budget.
    pub pop_iters: usize,
    /// Population mode: L-BFGS stops when `‖∇L‖∞ ≤ pop_tol`.
    pub pop_tol: f64,
    /// Population mode: L-BFGS memory.
    pub lbfgs_memory: usize,
    /// About how many points of each curve to record (plus the first and the last).
    pub records: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 6000,
            batch: 64,
            lr: 3e-3,
            alpha: 0.99,
            eps: 1e-8,
            clip: 1.0,
            pop_iters: 3000,
            pop_tol: 1e-11,
            lbfgs_memory: 20,
            records: 60,
        }
    }
}

impl TrainConfig {
    fn every(&self, total: usize) -> usize {
        (total / self.records.max(1)).max(1)
    }
}

/// Population or sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Exact expected loss and gradient.
    Population,
    /// Minibatches of sampled pairs.
    Sampled,
}

impl Mode {
    /// Both, population first.
    pub const ALL: [Mode; 2] = [Mode::Population, Mode::Sampled];

    /// `population` or `sampled`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Population => "population",
            Mode::Sampled => "sampled",
        }
    }
}

/// One prompt's data: the objective, the chosen/rejected distributions the pairs are drawn
/// from, and the reference policy of the log-ratio reward.
#[derive(Debug, Clone)]
pub struct PromptTask {
    /// What to optimize.
    pub objective: Objective,
    /// `y_w ~ chosen`.
    pub chosen: Policy,
    /// `y_l ~ rejected`.
    pub rejected: Policy,
    /// `π_ref` (read by the log-ratio reward only).
    pub reference: Policy,
}

impl PromptTask {
    fn is_projected_gradient(&self) -> bool {
        self.objective.rule() == Rule::ProjectedGradient
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    /// Final logits, one row per prompt.
    pub logits: Vec<Vec<f64>>,
    /// Steps (sampled, DPO-PG) or L-BFGS iterations (population) taken.
    pub steps: usize,
    /// Why it stopped: `steps`, `converged`, `max-iterations`, `line-search`, `stalled`.
    pub stop: &'static str,
}

/// Train one policy row per task from `init` (usually `log π_ref`) in `mode`.
///
/// `observe(step, logits)` is called at step 0, about every `steps / records` steps, and at the
/// end. In population mode with several prompts the loss is the mean over prompts.
///
/// # Errors
/// Length mismatches and non-finite logits from the library.
pub fn train<O>(
    mode: Mode,
    tasks: &[PromptTask],
    init: Vec<Vec<f64>>,
    cfg: &TrainConfig,
    seed: u64,
    observe: O,
) -> Result<Trained>
where
    O: FnMut(usize, &[Vec<f64>]),
{
    let pg = tasks.iter().all(PromptTask::is_projected_gradient);
    match (mode, pg) {
        (Mode::Population, false) => train_population_lbfgs(tasks, init, cfg, observe),
        (Mode::Population, true) => train_steps(tasks, init, cfg, None, observe),
        (Mode::Sampled, _) => {
            train_steps(tasks, init, cfg, Some(StdRng::seed_from_u64(seed)), observe)
        }
    }
}

fn flatten(rows: &[Vec<f64>]) -> Vec<f64> {
    rows.iter().flatten().copied().collect()
}

fn unflatten(flat: &[f64], n: usize) -> Vec<Vec<f64>> {
    flat.chunks(n).map(|c| c.to_vec()).collect()
}

fn train_population_lbfgs<O>(
    tasks: &[PromptTask],
    init: Vec<Vec<f64>>,
    cfg: &TrainConfig,
    mut observe: O,
) -> Result<Trained>
where
    O: FnMut(usize, &[Vec<f64>]),
{
    let n = init[0].len();
    let p = tasks.len() as f64;
    let every = cfg.every(cfg.pop_iters);
    let objective = |flat: &[f64]| -> Result<(f64, Vec<f64>)> {
        let mut value = 0.0;
        let mut grad = Vec::with_capacity(flat.len());
        for (task, f) in tasks.iter().zip(flat.chunks(n)) {
            let pl = population_loss(
                f,
                &task.chosen,
                &task.rejected,
                Some(&task.reference),
                &task.objective,
            )?;
            value += pl.value / p;
            grad.extend(pl.grad_logits.iter().map(|g| g / p));
        }
        Ok((value, grad))
    };
    let mut last = usize::MAX;
    let (theta, iters, stop) = lbfgs(
        flatten(&init),
        objective,
        cfg.pop_iters,
        cfg.pop_tol,
        cfg.lbfgs_memory,
        |it, theta| {
            if it % every == 0 {
                observe(it, &unflatten(theta, n));
                last = it;
            }
        },
    )?;
    let logits = unflatten(&theta, n);
    if last != iters {
        observe(iters, &logits);
    }
    Ok(Trained {
        logits,
        steps: iters,
        stop: match stop {
            Stop::Converged => "converged",
            Stop::MaxIterations => "max-iterations",
            Stop::LineSearch => "line-search",
            Stop::Stalled => "stalled",
        },
    })
}

/// RMSprop steps: on sampled minibatches (`rng = Some`) or, for population DPO-PG, on the exact
/// expected NLL gradients (`rng = None`).
fn train_steps<O>(
    tasks: &[PromptTask],
    init: Vec<Vec<f64>>,
    cfg: &TrainConfig,
    mut rng: Option<StdRng>,
    mut observe: O,
) -> Result<Trained>
where
    O: FnMut(usize, &[Vec<f64>]),
{
    let n = init[0].len();
    let p = tasks.len();
    let mut theta = flatten(&init);
    let mut opt = RmsProp::new(theta.len(), cfg.lr, cfg.alpha, cfg.eps);
    let samplers: Vec<_> = tasks
        .iter()
        .map(|t| (t.chosen.sampler(), t.rejected.sampler()))
        .collect();
    let every = cfg.every(cfg.steps);
    let b = cfg.batch.max(1);
    let inv_b = 1.0 / b as f64;
    observe(0, &unflatten(&theta, n));
    let pg = tasks[0].is_projected_gradient();
    let mut grad = vec![0.0; theta.len()];
    let mut g_l = vec![0.0; theta.len()];
    let mut pairs = Vec::with_capacity(b);
    for step in 1..=cfg.steps {
        for (k, task) in tasks.iter().enumerate() {
            let range = k * n..(k + 1) * n;
            let pi = Policy::from_logits(&theta[range.clone()])?;
            let probs = pi.probs();
            let gk = &mut grad[range.clone()];
            match (task.is_projected_gradient(), rng.as_mut()) {
                (true, None) => {
                    // Exact expectations: g_w = π − chosen, g_l = π − rejected.
                    let (cw, cl) = (task.chosen.probs(), task.rejected.probs());
                    for y in 0..n {
                        gk[y] = probs[y] - cw[y];
                        g_l[k * n + y] = probs[y] - cl[y];
                    }
                }
                (true, Some(rng)) => {
                    gk.copy_from_slice(&probs);
                    g_l[range.clone()].copy_from_slice(&probs);
                    let (sw, sl) = &samplers[k];
                    for _ in 0..b {
                        let w = sw.sample(rng);
                        let l = sl.sample(rng);
                        gk[w] -= inv_b;
                        g_l[k * n + l] -= inv_b;
                    }
                }
                (false, Some(rng)) => {
                    let (sw, sl) = &samplers[k];
                    pairs.clear();
                    for _ in 0..b {
                        let w = sw.sample(rng);
                        let l = sl.sample(rng);
                        pairs.push((w, l));
                    }
                    let (_, g) = sample_loss(
                        pi.log_probs(),
                        Some(&task.reference),
                        &task.objective,
                        &pairs,
                    )?;
                    let total: f64 = g.iter().sum();
                    let scale = 1.0 / p as f64;
                    for ((gy, q), x) in gk.iter_mut().zip(&probs).zip(&g) {
                        *gy = (x - q * total) * scale;
                    }
                }
                (false, None) => unreachable!("population losses use L-BFGS"),
            }
        }
        if pg {
            // The NLL losses are means over prompts too.
            if p > 1 {
                let s = 1.0 / p as f64;
                grad.iter_mut().for_each(|g| *g *= s);
                g_l.iter_mut().for_each(|g| *g *= s);
            }
            let proj = project(&grad, &g_l)?;
            grad.copy_from_slice(&proj.gradient);
        }
        clip_grad_norm(&mut grad, cfg.clip);
        opt.step(&mut theta, &grad);
        if step % every == 0 || step == cfg.steps {
            observe(step, &unflatten(&theta, n));
        }
    }
    Ok(Trained {
        logits: unflatten(&theta, n),
        steps: cfg.steps,
        stop: "steps",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::js;
    use crate::synthetic::instance::Instance;
    use crate::synthetic::objective::Preset;

    fn task(o: Preset, inst: &Instance) -> PromptTask {
        PromptTask {
            objective: o.objective(inst.beta, 2.0 * inst.beta).unwrap(),
            chosen: inst.pi_ref.clone(),
            rejected: inst.pi_l.clone(),
            reference: inst.pi_ref.clone(),
        }
    }

    #[test]
    fn population_dpo_recovers_pi_star() {
        let inst = Instance::tempered(16, 0.4, 0.5, 1.0, 3).unwrap();
        let cfg = TrainConfig::default();
        let t = train(
            Mode::Population,
            &[task(Preset::Dpo, &inst)],
            vec![inst.pi_ref.log_probs().to_vec()],
            &cfg,
            0,
            |_, _| {},
        )
        .unwrap();
        let pi = Policy::from_logits(&t.logits[0]).unwrap();
        assert!(js(&pi, &inst.pi_star).unwrap() < 1e-10, "{t:?}");
    }

    #[test]
    fn sampled_gradient_is_an_unbiased_estimate() {
        // With a huge batch the sampled gradient ≈ the population gradient.
        let inst = Instance::tempered(6, 0.4, 0.5, 1.0, 3).unwrap();
        let tk = task(Preset::Ipo, &inst);
        let f = inst.pi_ref.log_probs().to_vec();
        let exact = population_loss(
            &f,
            &tk.chosen,
            &tk.rejected,
            Some(&tk.reference),
            &tk.objective,
        )
        .unwrap();
        // One RMSprop step with α = 0, ε = 0 and no clipping moves each logit by −η sign(g):
        // with a huge batch its signs are those of the population gradient.
        let cfg = TrainConfig {
            steps: 1,
            batch: 400_000,
            lr: 1e-9,
            alpha: 0.0,
            eps: 0.0,
            clip: f64::INFINITY,
            ..TrainConfig::default()
        };
        let t = train(
            Mode::Sampled,
            std::slice::from_ref(&tk),
            vec![f.clone()],
            &cfg,
            1,
            |_, _| {},
        )
        .unwrap();
        for (y, g) in exact.grad_logits.iter().enumerate() {
            if g.abs() > 1e-3 {
                let moved = t.logits[0][y] - f[y];
                assert!(moved * g < 0.0, "y={y}: g={g}, moved={moved}");
            }
        }
    }
}
