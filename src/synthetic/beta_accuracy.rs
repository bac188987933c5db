//! `beta-accuracy` — Appendix K.1 on `P` prompts (`--prompts`), each a smoothing instance
//! (`τ = --tau-smooth`, its own `z`): the DID estimator `π̂_p` (from `π_ref,p`, reward
//! `r = log π̂`, pairs `y_w ~ π_p = π*_p`, `y_l ~ π_ref,p`, sampled, RMSprop) should converge to
//! `q_{π_p/π_ref,p}`, where `log π̂ = 1 · log(π/π_ref) + c`. At every recorded step, per prompt,
//! `--beta-samples` (4) samples `y ~ π̂_p` and an OLS fit of `log π̂_p(y)` on
//! `log π_p(y) − log π_ref,p(y)` ([`fit_beta`]); the β-accuracy ([`beta_accuracy`]) is the
//! fraction of determined prompts with `β̂ ≥ 0`.
//!
//! With a smoothing `π`, `log(π/π_ref) = (1/τ − 1) f_ref + c` decreases where `log π_ref`
//! increases: at the start (`π̂ = π_ref`) the fitted `β̂` is negative and the accuracy is low;
//! it rises to about 1 as `π̂` converges. `accuracy.csv`: `step, beta_accuracy, determined,
//! undetermined, mean_js` (mean over prompts of `JS(π̂_p, q_p)`).

use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::beta_accuracy::{beta_accuracy, fit_beta, BetaFit};
use crate::did::did;
use crate::entropy::js;
use crate::policy::Policy;

use super::instance::{sub_seed, ContextualInstance};
use super::objective::Preset;
use super::output::{Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Panel, Series};
use super::thresholds::BETA_ACCURACY_NEAR_ONE;
use super::train::{train, Mode, PromptTask, Trained};
use super::{fmt, SynthConfig, SynthError};

/// One recorded point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Training step.
    pub step: usize,
    /// β-accuracy (NaN when no prompt is determined).
    pub accuracy: f64,
    /// Prompts with a determined fit.
    pub determined: usize,
    /// Prompts whose samples could not determine `β`.
    pub undetermined: usize,
    /// Mean `JS(π̂_p, q_p)`.
    pub mean_js: f64,
}

/// The fixed quantities of one run: per prompt the DID `q_p`, the log-ratio
/// `log π_p − log π_ref,p` and the tasks (reference-free, β = 1; chosen `π_p`, rejected
/// `π_ref,p`).
struct Prompts {
    /// One task per prompt.
    tasks: Vec<PromptTask>,
    /// `q_{π_p/π_ref,p}`.
    dids: Vec<Policy>,
    /// `log π_p(y) − log π_ref,p(y)`.
    log_ratio: Vec<Vec<f64>>,
}

impl Prompts {
    /// The tasks and targets of `ctx`'s prompts.
    fn new(cfg: &SynthConfig, ctx: &ContextualInstance) -> Result<Self, SynthError> {
        let tasks = ctx
            .prompts
            .iter()
            .map(|inst| {
                Ok(PromptTask {
                    objective: Preset::RefFree1.objective(cfg.beta, cfg.beta_mismatch)?,
                    reference: inst.pi_ref.clone(),
                    chosen: inst.pi_star.clone(),
                    rejected: inst.pi_ref.clone(),
                })
            })
            .collect::<Result<Vec<_>, SynthError>>()?;
        let dids = ctx
            .prompts
            .iter()
            .map(|i| did(&i.pi_star, &i.pi_ref))
            .collect::<crate::Result<Vec<_>>>()?;
        let log_ratio: Vec<Vec<f64>> = ctx
            .prompts
            .iter()
            .map(|i| {
                i.pi_star
                    .log_probs()
                    .iter()
                    .zip(i.pi_ref.log_probs())
                    .map(|(a, b)| a - b)
                    .collect()
            })
            .collect();
        Ok(Prompts {
            tasks,
            dids,
            log_ratio,
        })
    }

    /// The β-accuracy and the mean JS to the DIDs of the estimators `logits` at `step`: per
    /// prompt, `--beta-samples` draws `y ~ π̂_p` and an OLS fit of `log π̂_p(y)` on the
    /// log-ratio.
    fn measure(
        &self,
        cfg: &SynthConfig,
        step: usize,
        logits: &[Vec<f64>],
    ) -> Result<Point, SynthError> {
        let mut rng =
            StdRng::seed_from_u64(sub_seed(cfg.seed, &format!("beta-accuracy samples {step}")));
        let mut fits = Vec::with_capacity(logits.len());
        let mut js_sum = 0.0;
        for (p, f) in logits.iter().enumerate() {
            let est = Policy::from_logits(f)?;
            let sampler = est.sampler();
            let ys: Vec<usize> = (0..cfg.beta_samples)
                .map(|_| sampler.sample(&mut rng))
                .collect();
            let x: Vec<f64> = ys.iter().map(|&y| self.log_ratio[p][y]).collect();
            let t: Vec<f64> = ys.iter().map(|&y| est.log_probs()[y]).collect();
            fits.push(fit_beta(&x, &t)?);
            js_sum += js(&est, &self.dids[p])?;
        }
        let undetermined = fits
            .iter()
            .filter(|f| matches!(f, BetaFit::Undetermined))
            .count();
        let accuracy = beta_accuracy(&fits).map_or(f64::NAN, |a| a.accuracy);
        Ok(Point {
            step,
            accuracy,
            determined: fits.len() - undetermined,
            undetermined,
            mean_js: js_sum / logits.len() as f64,
        })
    }
}

/// Trains the DID estimators of all prompts together, measuring a [`Point`] at every recorded
/// step.
fn train_points(
    cfg: &SynthConfig,
    ctx: &ContextualInstance,
    pb: &ProgressBar,
) -> Result<(Vec<Point>, Trained), SynthError> {
    let prompts = Prompts::new(cfg, ctx)?;
    let init = ctx
        .prompts
        .iter()
        .map(|i| i.pi_ref.log_probs().to_vec())
        .collect();
    let mut points = Vec::new();
    let mut err: Option<SynthError> = None;
    let trained = train(
        Mode::Sampled,
        &prompts.tasks,
        init,
        &cfg.train,
        sub_seed(cfg.seed, "beta-accuracy train"),
        |step, logits| match prompts.measure(cfg, step, logits) {
            Ok(p) if step % 1000 == 0 => {
                pb.set_message(format!("beta-accuracy, step {step}"));
                points.push(p)
            }
            Ok(p) => points.push(p),
            Err(e) => err = Some(e),
        },
    )?;
    match err {
        Some(e) => Err(e),
        None => Ok((points, trained)),
    }
}

/// `accuracy.csv`.
fn table(points: &[Point]) -> Table {
    let mut table = Table::new(
        "accuracy",
        &[
            "step",
            "beta_accuracy",
            "determined",
            "undetermined",
            "mean_js",
        ],
    );
    for p in points {
        table.push(vec![
            p.step.into(),
            p.accuracy.into(),
            p.determined.into(),
            p.undetermined.into(),
            p.mean_js.into(),
        ]);
    }
    table
}

/// The figure's panels: β-accuracy and the mean JS to the DID over the steps.
fn panels(cfg: &SynthConfig, points: &[Point]) -> Vec<Panel> {
    vec![
        Panel {
            title: format!("Appendix K.1: β-accuracy over {} prompts", cfg.prompts),
            x_label: "RMSprop step".into(),
            y_label: "β-accuracy (fraction of prompts with β̂ ≥ 0)".into(),
            log_x: false,
            log_y: false,
            series: vec![Series::line(
                "β-accuracy",
                0,
                points.iter().map(|p| (p.step as f64, p.accuracy)).collect(),
            )],
        },
        Panel {
            title: "Convergence of the DID estimator".into(),
            x_label: "RMSprop step".into(),
            y_label: "mean over prompts of JS(π̂, q_{π/π_ref}) [nats]".into(),
            log_x: false,
            log_y: true,
            series: vec![Series::line(
                "mean JS(π̂, DID)",
                3,
                points.iter().map(|p| (p.step as f64, p.mean_js)).collect(),
            )],
        },
    ]
}

/// The verdicts of K.1: near 1 at the end, lower at the start.
fn checks(cfg: &SynthConfig, first: Point, last: Point) -> Vec<Check> {
    vec![
        Check::new(
            "K.1: a converged DID estimator has β-accuracy near 1",
            format!(
                "final {} (mean JS to the DID {}), {} of {} prompts determined",
                fmt(last.accuracy),
                fmt(last.mean_js),
                last.determined,
                cfg.prompts
            ),
            Verdict::of(last.accuracy >= BETA_ACCURACY_NEAR_ONE),
            "near 1 means ≥ 0.9; 4 samples per prompt leave some fits noisy",
        ),
        Check::new(
            "… and lower before it converges",
            format!("at step 0: {}", fmt(first.accuracy)),
            Verdict::of(first.accuracy < last.accuracy),
            "π̂ = π_ref at step 0; with a smoothing π the fitted β̂ is then negative",
        ),
    ]
}

/// Run the experiment.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let ctx = ContextualInstance::tempered(
        cfg.prompts,
        cfg.n,
        cfg.tau_smooth,
        cfg.beta,
        cfg.scale,
        cfg.seed,
    )?;
    let (points, trained) = train_points(cfg, &ctx, pb)?;
    pb.inc(1);
    let first = points[0];
    let last = *points.last().expect("observed");
    let finals: serde_json::Map<String, Value> = trained
        .logits
        .iter()
        .enumerate()
        .map(|(p, l)| (format!("prompt {p}"), json!(l)))
        .collect();
    Ok(ExperimentOutput {
        name: "beta-accuracy",
        title: "Appendix K.1: β-accuracy as the DID estimator trains".into(),
        tables: vec![table(&points)],
        figures: vec![Figure::Lines {
            name: "accuracy".into(),
            panels: panels(cfg, &points),
        }],
        instance: json!({
            "contextual": true,
            "prompts": ctx.prompts.iter().enumerate()
                .map(|(p, i)| i.record(&format!("prompt {p}"))).collect::<Vec<_>>(),
            "note": "π_p = π*_p (chosen), rejected π_ref,p; π_l of each record is unused",
        }),
        final_logits: Value::Object(finals),
        summary: json!({
            "final": last.accuracy,
            "initial": first.accuracy,
            "final_mean_js": last.mean_js,
            "final_undetermined": last.undetermined,
        }),
        checks: checks(cfg, first, last),
        settings: cfg.to_json(),
    })
}
