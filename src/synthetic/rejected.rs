//! `rejected` — Theorem L.1: DPO recovers `π*` when the rejected responses come from the ideal
//! distribution of Eq. 1, and only then. Four choices of `π_l`, DPO with `--beta`, both modes:
//!
//! | choice | `π_l` | DPO's population optimum |
//! |---|---|---|
//! | `ideal` | `π_ref^{1+β} π*^{−β}` (Eq. 1) | `π*` |
//! | `reference` | `π_ref` | `π_ref` (the data carry no preference) |
//! | `uniform` | `1/N` | `π ∝ π_ref^{1+1/β}` |
//! | `contrast` | Eq. 1 with `κβ` (`--contrast κ`, default 4): rejected far below π* | `π ∝ π_ref^{1−κ} π*^{κ}` |
//!
//! Writes `js.csv` (`mode, choice, step, js`) and `js.png`.

use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

use crate::policy::Policy;
use crate::rejected::ideal_rejected;

use super::instance::{sub_seed, Instance};
use super::objective::Preset;
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Series};
use super::thresholds::{FAR_JS, POPULATION_RECOVERED_JS, SAMPLED_RECOVERED_JS};
use super::train::{Mode, PromptTask};
use super::{fmt, mode_panel, run_js, x_axis, SynthConfig, SynthError};

/// The four choices, in table order.
pub const CHOICES: [&str; 4] = ["ideal", "reference", "uniform", "contrast"];

/// The rejected distribution of a choice.
///
/// # Errors
/// Library errors; [`SynthError::Setting`] for an unknown choice.
pub fn rejected_for(choice: &str, inst: &Instance, contrast: f64) -> Result<Policy, SynthError> {
    Ok(match choice {
        "ideal" => inst.pi_l.clone(),
        "reference" => inst.pi_ref.clone(),
        "uniform" => Policy::uniform(inst.n)?,
        "contrast" => ideal_rejected(&inst.pi_ref, &inst.pi_star, contrast * inst.beta)?,
        other => {
            return Err(SynthError::Setting {
                name: "choice",
                value: other.into(),
                reason: format!("expected one of {}", CHOICES.join(", ")),
            })
        }
    })
}

/// Run the experiment.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let base = Instance::tempered(cfg.n, cfg.tau, cfg.beta, cfg.scale, cfg.seed)?;
    let mut table = Table::new("js", &["mode", "choice", "step", "js"]);
    let mut finals = Map::new();
    let mut final_js: Map<String, Value> = Map::new();
    let mut final_sampled: Map<String, Value> = Map::new();
    let mut records = Vec::new();
    let mut panels = Vec::new();
    for mode in Mode::ALL {
        let mut panel = mode_panel(
            format!("DPO by rejected distribution, {} mode", mode.name()),
            mode,
            "1 + L-BFGS iteration",
            "JS(π, π*) [nats]",
        );
        for (k, choice) in CHOICES.into_iter().enumerate() {
            let inst = base.with_rejected(rejected_for(choice, &base, cfg.contrast)?)?;
            if mode == Mode::Population {
                records.push(inst.record(choice));
            }
            let task = PromptTask {
                objective: Preset::Dpo.objective(cfg.beta, cfg.beta_mismatch)?,
                reference: inst.pi_ref.clone(),
                chosen: inst.pi_ref.clone(),
                rejected: inst.pi_l.clone(),
            };
            let seed = sub_seed(cfg.seed, &format!("rejected {choice} {}", mode.name()));
            let (curve, trained) =
                run_js(mode, task, &inst.pi_ref, &cfg.train, seed, &inst.pi_star)?;
            pb.inc(1);
            for &(step, v) in &curve {
                table.push(vec![
                    Cell::from(mode.name()),
                    Cell::from(choice),
                    step.into(),
                    v.into(),
                ]);
            }
            let last = json!(curve.last().map_or(f64::NAN, |c| c.1));
            match mode {
                Mode::Population => final_js.insert(choice.into(), last),
                Mode::Sampled => final_sampled.insert(choice.into(), last),
            };
            finals.insert(
                format!("{} {choice}", mode.name()),
                json!({"logits": trained.logits[0], "steps": trained.steps, "stop": trained.stop}),
            );
            panel.series.push(Series::line(
                choice,
                k,
                curve.iter().map(|&(s, v)| (x_axis(mode, s), v)).collect(),
            ));
        }
        panels.push(panel);
    }
    let f = |m: &Map<String, Value>, c: &str| m[c].as_f64().unwrap_or(f64::NAN);
    let others_pop = CHOICES[1..]
        .iter()
        .map(|c| f(&final_js, c))
        .fold(f64::INFINITY, f64::min);
    let others_s = CHOICES[1..]
        .iter()
        .map(|c| f(&final_sampled, c))
        .fold(f64::INFINITY, f64::min);
    let list = |m: &Map<String, Value>| {
        CHOICES
            .iter()
            .map(|c| format!("{c} {}", fmt(f(m, c))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let checks = vec![
        Check::new(
            "Theorem L.1: DPO on π_l of Eq. 1 recovers π* (population)",
            format!("JS = {}", fmt(f(&final_js, "ideal"))),
            Verdict::of(f(&final_js, "ideal") < POPULATION_RECOVERED_JS),
            "exact expected loss, L-BFGS",
        ),
        Check::new(
            "Theorem L.1 (uniqueness): π_l = π_ref, uniform, strong contrast do not (population)",
            list(&final_js),
            Verdict::of(others_pop > FAR_JS),
            "bounded away from π* means JS > 1e-2",
        ),
        Check::new(
            "The same with sampled pairs",
            list(&final_sampled),
            Verdict::of(f(&final_sampled, "ideal") < SAMPLED_RECOVERED_JS && others_s > FAR_JS),
            "RMSprop at a constant LR keeps a small noise floor",
        ),
    ];
    Ok(ExperimentOutput {
        name: "rejected",
        title: "Theorem L.1: the ideal rejected distribution (Eq. 1) against other choices".into(),
        tables: vec![table],
        figures: vec![Figure::Lines {
            name: "js".into(),
            panels,
        }],
        instance: json!({ "instances": records, "contrast_beta": cfg.contrast * cfg.beta }),
        final_logits: Value::Object(finals),
        summary: json!({ "final_js": final_js, "final_js_sampled": final_sampled }),
        checks,
        settings: cfg.to_json(),
    })
}
