//! `loss-atlas` — where each loss's population optimum lies, the question Theorem 3.4 answers
//! for DPO. On the tempered instances (`f* = f_ref/τ`, π_l from Eq. 1 with β, pairs
//! `y_w ~ π_ref`, `y_l ~ π_l`), for every loss type of TRL's `DPOTrainer` (and DPO under the
//! three other f-divergences) with the data's β: the exact population optimum (L-BFGS on the
//! exact expected loss from `π_ref`, [`crate::population`]) and its JS divergence to
//!
//! ```text
//! π*                     the policy the data encodes (Theorem 3.4's target)
//! DID^β target           normalize(q_{π*/π_ref}^β)  (what r = log π fits, Fig. 1)
//! π_ref                  the chosen distribution, where the run starts
//! ```
//!
//! over a grid of β × τ on `N = --atlas-n` classes (`grid.csv`, the heat maps `atlas.png`),
//! and on the default instance (`--n`, `--tau`, `--beta`; `default.csv`) with two more
//! numbers: the JS between the optima reached from `π_ref` and from the uniform policy (0 when
//! the optimum is unique), and the JS to the closed-form optimum where one exists
//! ([`crate::fixed_points`]: `sigmoid` and `sigmoid_norm` → π*, `ipo` → its linear-system
//! solution, `sft` → the chosen distribution `π_ref`).
//!
//! Loss settings: TRL's defaults, except `robust` (ε = 0.1, the Robust DPO paper's value: at
//! TRL's default ε = 0 it is `sigmoid`) and `exo_pair` (ε = 1e-3, the EXO paper's value; TRL
//! refuses ε = 0). Every completion is one outcome (length 1), so `sigmoid_norm` is `sigmoid`
//! and IPO's per-token mean is the log-ratio itself. A run whose logits keep spreading (a loss
//! with no finite minimizer) stops at the iteration budget: `logit_range` reports the spread.

use indicatif::ProgressBar;
use ndarray::Array2;
use serde_json::{json, Map, Value};

use crate::entropy::js;
use crate::fixed_points::ipo_log_ratio;
use crate::objective::{FDivergence, LossType, Objective, ObjectiveSpec};
use crate::policy::Policy;
use crate::population::population_loss;

use super::did_fit::did_power;
use super::instance::{Instance, InstanceRecord};
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{CategoricalHeat, Figure};
use super::thresholds::{FAR_JS, POPULATION_RECOVERED_JS};
use super::train::{train, Mode, PromptTask};
use super::{fmt, SynthConfig, SynthError};

/// The atlas's objectives for data generated with `β`: `(name, objective)`, the fifteen TRL
/// loss types then DPO (`sigmoid`) under `forward_kl`, `js_divergence`, `alpha_divergence`.
///
/// # Errors
/// An invalid `β`.
pub fn atlas_objectives(beta: f64) -> Result<Vec<(String, Objective)>, SynthError> {
    let mut out = Vec::new();
    for t in LossType::ALL {
        let label_smoothing = match t {
            LossType::Robust => 0.1,
            LossType::ExoPair => 1e-3,
            _ => 0.0,
        };
        let o = Objective::new(ObjectiveSpec {
            beta,
            loss_type: vec![t],
            label_smoothing,
            ..ObjectiveSpec::default()
        })
        .map_err(crate::Error::from)?;
        out.push((t.name().to_string(), o));
    }
    for f in [
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ] {
        let o = Objective::new(ObjectiveSpec {
            beta,
            f_divergence_type: f,
            ..ObjectiveSpec::default()
        })
        .map_err(crate::Error::from)?;
        out.push((format!("sigmoid+{}", f.name()), o));
    }
    Ok(out)
}

/// One population optimum and where it lies.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimum {
    /// Final logits.
    pub logits: Vec<f64>,
    /// `JS(π, π*)`.
    pub js_star: f64,
    /// `JS(π, DID^β target)`.
    pub js_did: f64,
    /// `JS(π, π_ref)`.
    pub js_ref: f64,
    /// L-BFGS iterations.
    pub iterations: usize,
    /// Why L-BFGS stopped.
    pub stop: &'static str,
    /// `max f − min f` of the normalized logits (large: the optimum is at infinity).
    pub logit_range: f64,
    /// `‖∇L‖∞` at the end.
    pub grad_inf: f64,
}

/// The population optimum of `o` on `inst` from the logits `init`.
///
/// # Errors
/// Library errors.
pub fn optimum(
    inst: &Instance,
    o: &Objective,
    init: Vec<f64>,
    cfg: &SynthConfig,
) -> Result<Optimum, SynthError> {
    let task = PromptTask {
        objective: o.clone(),
        chosen: inst.pi_ref.clone(),
        rejected: inst.pi_l.clone(),
        reference: inst.pi_ref.clone(),
    };
    let trained = train(
        Mode::Population,
        std::slice::from_ref(&task),
        vec![init],
        &cfg.train,
        0,
        |_, _| {},
    )?;
    let logits = trained.logits[0].clone();
    let pi = Policy::from_logits(&logits)?;
    let g = population_loss(&logits, &inst.pi_ref, &inst.pi_l, Some(&inst.pi_ref), o)?;
    let lp = pi.log_probs();
    let (lo, hi) = lp
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    Ok(Optimum {
        js_star: js(&pi, &inst.pi_star)?,
        js_did: js(&pi, &did_power(inst)?)?,
        js_ref: js(&pi, &inst.pi_ref)?,
        iterations: trained.steps,
        stop: trained.stop,
        logit_range: hi - lo,
        grad_inf: g.grad_logits.iter().fold(0.0f64, |m, x| m.max(x.abs())),
        logits,
    })
}

/// The closed-form optimum of `o` on `inst`, where the library has one (see the module docs).
///
/// # Errors
/// Library errors.
pub fn closed_form(inst: &Instance, o: &Objective) -> Result<Option<Policy>, SynthError> {
    if o.f_divergence() != FDivergence::ReverseKl || o.terms().len() != 1 {
        return Ok(None);
    }
    Ok(match o.terms()[0].0 {
        LossType::Sigmoid | LossType::SigmoidNorm if o.label_smoothing() == 0.0 => {
            Some(inst.pi_star.clone())
        }
        LossType::Sft => Some(inst.pi_ref.clone()),
        LossType::Ipo => {
            let u = crate::scalar::infallible(ipo_log_ratio(
                &inst.pi_ref.probs(),
                &inst.pi_l.probs(),
                o.beta(),
            ));
            let f: Vec<f64> = u
                .iter()
                .zip(inst.pi_ref.log_probs())
                .map(|(a, b)| a + b)
                .collect();
            Some(Policy::from_logits(&f)?)
        }
        _ => None,
    })
}

/// Whether a run that ended at `logits` short of π* stalled before the minimum rather than
/// found a lower one: the exact population loss at π* is at most the loss at `logits` (up to
/// 1e-12 relative, the losses' float resolution).
///
/// # Errors
/// Library errors.
pub fn stalled_before(inst: &Instance, o: &Objective, logits: &[f64]) -> Result<bool, SynthError> {
    let loss = |f: &[f64]| {
        population_loss(f, &inst.pi_ref, &inst.pi_l, Some(&inst.pi_ref), o).map(|l| l.value)
    };
    let (at_star, at_end) = (loss(inst.pi_star.log_probs())?, loss(logits)?);
    Ok(at_star <= at_end + 1e-12 * at_end.abs().max(1.0))
}

/// A log-probability range beyond which the optimum is reported as degenerate (at infinite
/// logits): `e^{−50}` of the top outcome's mass is below any float resolution of the losses.
pub const DEGENERATE_RANGE: f64 = 50.0;

/// `log10 JS`, floored at `1e-16` (the heat maps' scale).
fn log_js(x: f64) -> f64 {
    x.max(1e-16).log10()
}

/// The default instance's pass: every loss from π_ref and from the uniform policy.
struct DefaultPass {
    /// `default.csv`.
    table: Table,
    /// `JS(π_opt, π*)` per loss.
    final_js: Map<String, Value>,
    /// The summary's numbers per loss.
    per_loss: Map<String, Value>,
    /// Final logits per loss.
    finals: Map<String, Value>,
    /// Losses whose optimum from π_ref is π*.
    recovered: Vec<String>,
    /// Losses whose optima from π_ref and from uniform differ.
    unique_fail: Vec<String>,
    /// Losses whose optimum is off their closed form.
    closed_fail: Vec<String>,
    /// Losses whose optimum is at infinite logits.
    unbounded: Vec<String>,
}

/// The grid's pass: β × τ on `N = atlas_n`, one optimum per loss and cell from π_ref.
struct GridPass {
    /// `grid.csv`.
    table: Table,
    /// The column labels of the heat maps, one per (β, τ) cell.
    cols: Vec<String>,
    /// Per figure panel (JS to π*, to the DID^β target, to π_ref): objective × cell.
    z: [Array2<f64>; 3],
    /// The largest JS(π_opt, π*) of the sigmoid family where L-BFGS reached its optimum.
    sigmoid_worst: f64,
    /// Sigmoid cells where L-BFGS stalled short of π* with L(π*) ≤ L(π_opt).
    sigmoid_shortfalls: Vec<String>,
    /// Whether any sigmoid cell stalled so.
    any_shortfall: bool,
    /// Other losses' runs that ended with L(π*) below their end point: not an optimum.
    not_optima: Vec<String>,
    /// Per objective: the grid cells where it recovers π*.
    recovers: Vec<Vec<String>>,
}

/// Every loss on the default instance, from π_ref and from the uniform policy.
fn default_pass(
    inst: &Instance,
    objectives: &[(String, Objective)],
    cfg: &SynthConfig,
    pb: &ProgressBar,
) -> Result<DefaultPass, SynthError> {
    let mut table = Table::new(
        "default",
        &[
            "loss",
            "js_star",
            "js_did",
            "js_ref",
            "js_closed_form",
            "js_between_starts",
            "iterations",
            "stop",
            "logit_range",
            "grad_inf",
        ],
    );
    let mut final_js = Map::new();
    let mut per_loss = Map::new();
    let mut finals = Map::new();
    let mut recovered = Vec::new();
    let mut unique_fail = Vec::new();
    let mut closed_fail = Vec::new();
    let mut unbounded = Vec::new();
    for (name, o) in objectives {
        let a = optimum(inst, o, inst.pi_ref.log_probs().to_vec(), cfg)?;
        let b = optimum(inst, o, vec![0.0; cfg.n], cfg)?;
        pb.inc(1);
        let between = js(
            &Policy::from_logits(&a.logits)?,
            &Policy::from_logits(&b.logits)?,
        )?;
        let closed = match closed_form(inst, o)? {
            Some(q) => js(&Policy::from_logits(&a.logits)?, &q)?,
            None => f64::NAN,
        };
        if closed.is_finite() && closed > POPULATION_RECOVERED_JS {
            closed_fail.push(name.clone());
        }
        if a.js_star < POPULATION_RECOVERED_JS {
            recovered.push(name.clone());
        }
        if between > POPULATION_RECOVERED_JS {
            unique_fail.push(format!("{name} ({})", fmt(between)));
        }
        if a.logit_range > DEGENERATE_RANGE {
            unbounded.push(format!("{name} ({} nats)", fmt(a.logit_range)));
        }
        table.push(vec![
            Cell::from(name.as_str()),
            a.js_star.into(),
            a.js_did.into(),
            a.js_ref.into(),
            closed.into(),
            between.into(),
            a.iterations.into(),
            Cell::from(a.stop),
            a.logit_range.into(),
            a.grad_inf.into(),
        ]);
        final_js.insert(name.clone(), json!(a.js_star));
        per_loss.insert(
            name.clone(),
            json!({
                "js_star": a.js_star, "js_did": a.js_did, "js_ref": a.js_ref,
                "js_closed_form": if closed.is_finite() { json!(closed) } else { Value::Null },
                "js_between_starts": between, "stop": a.stop, "logit_range": a.logit_range,
            }),
        );
        finals.insert(
            name.clone(),
            json!({"logits": a.logits, "iterations": a.iterations, "stop": a.stop}),
        );
    }
    Ok(DefaultPass {
        table,
        final_js,
        per_loss,
        finals,
        recovered,
        unique_fail,
        closed_fail,
        unbounded,
    })
}

/// Every loss on every (β, τ) cell of the grid; each cell's instance is appended to
/// `instances`.
fn grid_pass(
    cfg: &SynthConfig,
    n_objectives: usize,
    instances: &mut Vec<InstanceRecord>,
    pb: &ProgressBar,
) -> Result<GridPass, SynthError> {
    let mut table = Table::new(
        "grid",
        &[
            "beta",
            "tau",
            "loss",
            "js_star",
            "js_did",
            "js_ref",
            "iterations",
            "stop",
        ],
    );
    let mut cols = Vec::new();
    let shape = (n_objectives, cfg.atlas_betas.len() * cfg.atlas_taus.len());
    let mut z = [(); 3].map(|_| Array2::<f64>::zeros(shape));
    let mut sigmoid_worst = 0.0f64;
    let mut sigmoid_shortfalls: Vec<String> = Vec::new();
    let mut any_shortfall = false;
    let mut not_optima: Vec<String> = Vec::new();
    let mut recovers: Vec<Vec<String>> = vec![Vec::new(); n_objectives];
    for &beta in &cfg.atlas_betas {
        for &tau in &cfg.atlas_taus {
            let col = cols.len();
            let cell = Instance::tempered(cfg.atlas_n, tau, beta, cfg.scale, cfg.seed)?;
            instances.push(cell.record(&format!("beta={beta} tau={tau}")));
            cols.push(format!("β={beta}|τ={tau}"));
            for (i, (name, o)) in atlas_objectives(beta)?.iter().enumerate() {
                let a = optimum(&cell, o, cell.pi_ref.log_probs().to_vec(), cfg)?;
                let at = format!("β={beta} τ={tau}");
                // Short of π*: is π* itself at least as good? Then the run stalled before the
                // minimum (the optimizer's shortfall: e.g. outcomes whose chosen and rejected
                // masses are both below the loss's float resolution barely move), which is no
                // evidence of a lower minimum elsewhere.
                let above_star =
                    a.js_star >= POPULATION_RECOVERED_JS && stalled_before(&cell, o, &a.logits)?;
                // Only for the losses whose minimizer is π* (the closed form) does that make
                // the cell a recovery; for the others the run simply ended above a point of
                // lower loss: no optimum, reported as such.
                let sigmoid = name == "sigmoid" || name == "sigmoid_norm";
                let shortfall = above_star && sigmoid;
                if sigmoid {
                    if shortfall {
                        sigmoid_shortfalls.push(format!("{name} at {at} (JS {})", fmt(a.js_star)));
                    } else {
                        sigmoid_worst = sigmoid_worst.max(a.js_star);
                    }
                } else if above_star {
                    not_optima.push(format!("{name} at {at}"));
                }
                any_shortfall |= shortfall;
                if a.js_star < POPULATION_RECOVERED_JS || shortfall {
                    recovers[i].push(at);
                }
                table.push(vec![
                    beta.into(),
                    tau.into(),
                    Cell::from(name.as_str()),
                    a.js_star.into(),
                    a.js_did.into(),
                    a.js_ref.into(),
                    a.iterations.into(),
                    Cell::from(a.stop),
                ]);
                z[0][[i, col]] = log_js(a.js_star);
                z[1][[i, col]] = log_js(a.js_did);
                z[2][[i, col]] = log_js(a.js_ref);
            }
            pb.inc(1);
        }
    }
    Ok(GridPass {
        table,
        cols,
        z,
        sigmoid_worst,
        sigmoid_shortfalls,
        any_shortfall,
        not_optima,
        recovers,
    })
}

/// The three heat maps of `atlas.png`: objective × (β, τ) cell.
fn atlas_figure(cfg: &SynthConfig, rows: &[String], g: &GridPass) -> Figure {
    let [z_star, z_did, z_ref] = &g.z;
    let heat = |title: &str, z: &Array2<f64>| CategoricalHeat {
        title: format!("{title} (N = {}, population optimum)", cfg.atlas_n),
        row_labels: rows.to_vec(),
        col_labels: g.cols.clone(),
        z: z.clone(),
        z_label: "log10 JS [nats]".into(),
        range: (-16.0, 0.0),
    };
    Figure::Categorical {
        name: "atlas".into(),
        panels: vec![
            heat("JS(π_opt, π*)", z_star),
            heat("JS(π_opt, DID^β target)", z_did),
            heat("JS(π_opt, π_ref)", z_ref),
        ],
    }
}

/// The verdicts on where π* is recovered: Theorem 3.4 on the grid, only the sigmoid family
/// everywhere, the closed forms where L-BFGS stops.
fn recovery_checks(
    cfg: &SynthConfig,
    rows: &[String],
    d: &DefaultPass,
    g: &GridPass,
) -> Vec<Check> {
    let cells = cfg.atlas_betas.len() * cfg.atlas_taus.len();
    let everywhere: Vec<String> = rows
        .iter()
        .zip(&g.recovers)
        .filter(|(n, r)| r.len() == cells && d.recovered.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    let somewhere: Vec<String> = rows
        .iter()
        .zip(&g.recovers)
        .filter(|(n, r)| !r.is_empty() && !everywhere.contains(n))
        .map(|(n, r)| format!("{n} at {}", r.join(", ")))
        .collect();
    vec![
        Check::new(
            "Theorem 3.4: DPO's sigmoid loss (and sigmoid_norm, equal at length 1) recovers π* \
             on every instance of the grid",
            if g.sigmoid_shortfalls.is_empty() {
                format!("largest JS(π_opt, π*) {}", fmt(g.sigmoid_worst))
            } else {
                format!(
                    "largest JS(π_opt, π*) {} where L-BFGS reached its optimum; stalled short \
                     of π* with L(π*) ≤ L(π_opt) (the optimizer's shortfall, no lower minimum): \
                     {}",
                    fmt(g.sigmoid_worst),
                    g.sigmoid_shortfalls.join(", ")
                )
            },
            Verdict::of(g.sigmoid_worst < POPULATION_RECOVERED_JS),
            "exact expected loss, L-BFGS from π_ref; a stalled run is checked against the loss \
             at π*",
        ),
        Check::new(
            "fixed_points: of the loss types, only the sigmoid loss has z*(p) = logit p, so only \
             it (and sigmoid_norm, the same at length 1) recovers π* on every instance",
            format!(
                "JS < 1e-8{} on every instance: {}; on some: {}",
                if g.any_shortfall {
                    " (or stalled short of π* with L(π*) ≤ L(π_opt))"
                } else {
                    ""
                },
                everywhere.join(", "),
                if somewhere.is_empty() {
                    "none".to_string()
                } else {
                    somewhere.join("; ")
                }
            ),
            Verdict::of(everywhere == ["sigmoid", "sigmoid_norm"]),
            "AOT has π* as a stationary point wherever π* is comonotone with π_ref (tempered \
             instances: its sorted coupling is then the identity and its gradient DPO's), but on \
             some instances a lower minimum elsewhere",
        ),
        Check::new(
            "fixed_points: the closed forms (sigmoid → π*, ipo → its linear system, sft → the \
             chosen distribution π_ref) are where L-BFGS stops",
            if d.closed_fail.is_empty() {
                "all within JS 1e-8".to_string()
            } else {
                format!("off: {}", d.closed_fail.join(", "))
            },
            Verdict::of(d.closed_fail.is_empty()),
            "default instance",
        ),
    ]
}

/// The reported findings: runs that ended short of an optimum, non-unique and degenerate
/// optima, how far the other losses move from π*.
fn reported_checks(
    objectives: &[(String, Objective)],
    d: &DefaultPass,
    g: &GridPass,
) -> Vec<Check> {
    vec![
        Check::new(
            "Grid runs of the other losses that ended above the loss at π* (so not at an \
             optimum)",
            if g.not_optima.is_empty() {
                "none".to_string()
            } else {
                g.not_optima.join(", ")
            },
            Verdict::Reported,
            "L-BFGS stalled or its line search failed on a non-smooth (hinge, AOT's sorted \
             coupling), non-convex (discopop) or unbounded (apo_zero) loss; these cells' JS \
             values are where the run stopped, not the loss's optimum",
        ),
        Check::new(
            "Which losses' optima are unique (same optimum from π_ref and from uniform)",
            if d.unique_fail.is_empty() {
                "all".to_string()
            } else {
                format!("differ: {}", d.unique_fail.join(", "))
            },
            Verdict::Reported,
            "a difference means several minimizers (a flat or non-convex loss) or none at \
             finite logits",
        ),
        Check::new(
            "Which losses' optimum is degenerate (at infinite logits: the policy's log-probability \
             range exceeds 50 nats)",
            if d.unbounded.is_empty() {
                "none".to_string()
            } else {
                d.unbounded.join(", ")
            },
            Verdict::Reported,
            "default instance; the loss keeps falling as the policy concentrates",
        ),
        Check::new(
            "Every loss but the sigmoid family moves away from π* (default instance)",
            format!(
                "smallest other JS(π_opt, π*) {}",
                fmt(objectives
                    .iter()
                    .zip(&d.table.rows)
                    .filter(|((n, _), _)| !d.recovered.contains(n))
                    .map(|(_, r)| match r[1] {
                        Cell::Num(x) => x,
                        _ => f64::NAN,
                    })
                    .fold(f64::INFINITY, f64::min))
            ),
            Verdict::Reported,
            &format!("bounded away means JS > {FAR_JS}"),
        ),
    ]
}

/// Run the experiment: the default instance, the grid, the figure, the verdicts.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let inst = Instance::tempered(cfg.n, cfg.tau, cfg.beta, cfg.scale, cfg.seed)?;
    let objectives = atlas_objectives(cfg.beta)?;
    let d = default_pass(&inst, &objectives, cfg, pb)?;
    let rows: Vec<String> = objectives.iter().map(|(n, _)| n.clone()).collect();
    let mut instances = vec![inst.record("default")];
    let g = grid_pass(cfg, rows.len(), &mut instances, pb)?;
    let figure = atlas_figure(cfg, &rows, &g);
    let mut checks = recovery_checks(cfg, &rows, &d, &g);
    checks.extend(reported_checks(&objectives, &d, &g));
    Ok(ExperimentOutput {
        name: "loss-atlas",
        title: "Where each loss's population optimum lies (π*, DID^β, π_ref)".into(),
        tables: vec![d.table, g.table],
        figures: vec![figure],
        instance: json!({ "instances": instances }),
        final_logits: Value::Object(d.finals),
        summary: json!({ "final_js": d.final_js, "default": d.per_loss, "recovers_pi_star": d.recovered }),
        checks,
        settings: cfg.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DPO's loss is lower at π* than at π_ref (where a run starts), so a run stopped at π_ref
    /// "stalled before" π*; IPO's minimizer is not π*, and at its closed-form optimum the loss
    /// is below the loss at π*, so a run ending there did not stall before π*.
    #[test]
    fn stalled_before_compares_with_the_loss_at_pi_star() {
        let inst = Instance::tempered(16, 0.4, 0.5, 1.0, 3).unwrap();
        let dpo = Objective::dpo(0.5).unwrap();
        assert!(stalled_before(&inst, &dpo, inst.pi_ref.log_probs()).unwrap());
        let ipo = atlas_objectives(0.5)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "ipo")
            .unwrap()
            .1;
        let q = closed_form(&inst, &ipo).unwrap().unwrap();
        assert!(js(&q, &inst.pi_star).unwrap() > POPULATION_RECOVERED_JS);
        assert!(!stalled_before(&inst, &ipo, q.log_probs()).unwrap());
    }
}
