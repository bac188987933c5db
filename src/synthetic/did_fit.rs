//! `did-fit` — Fig. 1: fitting the reference-free reward `r = log π` on pairs `y_w ~ π_ref`,
//! `y_l ~ π_l` drives `π` to the normalized power of the DID,
//!
//! ```text
//! π → q_{π*/π_ref}^β / Σ q_{π*/π_ref}^β        (= q_{π_ref/π_l}, Theorem 3.3)
//! ```
//!
//! for a reinforcing (`--tau`) and a smoothing (`--tau-smooth`) instance and every β of
//! `--did-fit-betas`, in both modes. Writes `js.csv` (`mode, tau, beta, step, js`) and `js.png`.

use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

use crate::did::did;
use crate::entropy::js;
use crate::policy::Policy;
use crate::preference::preference_distribution;

use super::instance::{sub_seed, Instance};
use super::objective::Preset;
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Panel, Series};
use super::thresholds::{POPULATION_RECOVERED_JS, SAMPLED_RECOVERED_JS};
use super::train::{Mode, PromptTask};
use super::{fmt, run_js, x_axis, SynthConfig, SynthError};

/// `normalize(q_{π*/π_ref}^β)`: the DID from the library, raised to β in log space.
pub fn did_power(inst: &Instance) -> Result<Policy, SynthError> {
    let q = did(&inst.pi_star, &inst.pi_ref)?;
    let lp: Vec<f64> = q.log_probs().iter().map(|l| inst.beta * l).collect();
    Ok(Policy::from_logits(&lp)?)
}

/// Run the experiment.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let mut table = Table::new("js", &["mode", "tau", "beta", "step", "js"]);
    let mut instances = Vec::new();
    let mut finals = Map::new();
    let mut final_js: Map<String, Value> = Map::new();
    let mut panels: Vec<Panel> = Mode::ALL
        .iter()
        .map(|m| Panel {
            title: format!("Fig. 1, {} mode: r = log π fits DID^β", m.name()),
            x_label: match m {
                Mode::Population => "1 + L-BFGS iteration".into(),
                Mode::Sampled => "RMSprop step".into(),
            },
            y_label: "JS(π, DID^β normalized) [nats]".into(),
            log_x: *m == Mode::Population,
            log_y: true,
            series: Vec::new(),
        })
        .collect();
    let (mut slow, mut drifted) = (Vec::<String>::new(), Vec::<String>::new());
    let (mut max_pop, mut max_sampled, mut max_start, mut power_law_js) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut k = 0;
    for tau in [cfg.tau, cfg.tau_smooth] {
        for &beta in &cfg.did_fit_betas {
            let inst = Instance::tempered(cfg.n, tau, beta, cfg.scale, cfg.seed)?;
            let label = format!("tau={tau} beta={beta}");
            instances.push(inst.record(&label));
            let target = did_power(&inst)?;
            // Theorem 3.3 on this instance: the data's preference distribution is the target.
            power_law_js = power_law_js.max(js(
                &preference_distribution(&inst.pi_ref, &inst.pi_l)?,
                &target,
            )?);
            for (mi, mode) in Mode::ALL.into_iter().enumerate() {
                let task = PromptTask {
                    objective: Preset::RefFree1.objective(beta, cfg.beta_mismatch)?,
                    reference: inst.pi_ref.clone(),
                    chosen: inst.pi_ref.clone(),
                    rejected: inst.pi_l.clone(),
                };
                let seed = sub_seed(cfg.seed, &format!("did-fit {label} {}", mode.name()));
                let (curve, trained) = run_js(mode, task, &inst.pi_ref, &cfg.train, seed, &target)?;
                pb.inc(1);
                for &(step, v) in &curve {
                    table.push(vec![
                        Cell::from(mode.name()),
                        tau.into(),
                        beta.into(),
                        step.into(),
                        v.into(),
                    ]);
                }
                let last = curve.last().map_or(f64::NAN, |c| c.1);
                max_start = max_start.max(curve[0].1);
                if mode == Mode::Sampled && (last.is_nan() || last >= SAMPLED_RECOVERED_JS) {
                    let min = curve.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
                    if last > 2.0 * min {
                        drifted.push(format!("{label} (min {}, final {})", fmt(min), fmt(last)));
                    } else {
                        slow.push(format!("{label} ({})", fmt(last)));
                    }
                }
                match mode {
                    Mode::Population => max_pop = max_pop.max(last),
                    Mode::Sampled => max_sampled = max_sampled.max(last),
                }
                final_js
                    .entry(mode.name())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("object")
                    .insert(label.clone(), json!(last));
                finals.insert(
                    format!("{} {label}", mode.name()),
                    json!({"logits": trained.logits[0], "steps": trained.steps, "stop": trained.stop}),
                );
                panels[mi].series.push(Series::line(
                    format!("τ={tau} β={beta}"),
                    k,
                    curve.iter().map(|&(s, v)| (x_axis(mode, s), v)).collect(),
                ));
            }
            k += 1;
        }
    }
    let runs = 2 * cfg.did_fit_betas.len();
    let short = slow.len() + drifted.len();
    let mut why = Vec::new();
    if short == 0 {
        why.push("the remaining JS is the constant-learning-rate noise floor".to_string());
    }
    if !slow.is_empty() {
        why.push(format!(
            "still falling at the end ({}): with a large β the target DID^β puts its mass where \
             the pairs are rare, so the sampled fit needs more steps",
            slow.join(", ")
        ));
    }
    if !drifted.is_empty() {
        why.push(format!(
            "passed close to the target, then drifted away ({}): for outcomes that are almost \
             never rejected the gradient is many small pushes and a few large pulls, and \
             RMSprop's per-coordinate normalization (α = {}) makes its step closer to sign(g) \
             than to g, so its fixed point is not the loss minimum; --rms-alpha 0.9999 (longer \
             memory) removed the drift in our runs",
            drifted.join(", "),
            cfg.train.alpha
        ));
    }
    if short > 0 {
        why.push("the population fit is exact for every run".into());
    }
    let summary = json!({
        "final_js_max": max_sampled,
        "final_js_max_population": max_pop,
        "initial_js_max": max_start,
        "final_js": final_js,
        "power_law_js_max": power_law_js,
    });
    let checks = vec![
        Check::new(
            "Theorem 3.3: the data's preference distribution q_{π_ref/π_l} equals DID^β normalized",
            format!("max JS = {}", fmt(power_law_js)),
            Verdict::of(power_law_js < POPULATION_RECOVERED_JS),
            "exact on the instance (π_l from Eq. 1)",
        ),
        Check::new(
            "Fig. 1: fitting r = log π gives π → DID^β (JS → 0), τ < 1 and τ > 1, every β (population)",
            format!("max final JS = {}", fmt(max_pop)),
            Verdict::of(max_pop < POPULATION_RECOVERED_JS),
            "exact expected loss minimized by L-BFGS",
        ),
        Check::new(
            "Fig. 1, sampled pairs (RMSprop, constant LR)",
            format!(
                "max final JS = {} (max initial {}); {} of {runs} runs above {}",
                fmt(max_sampled),
                fmt(max_start),
                short,
                SAMPLED_RECOVERED_JS,
            ),
            if short == 0 {
                Verdict::Held
            } else if short * 2 < runs {
                Verdict::Partly
            } else {
                Verdict::Failed
            },
            &why.join("; "),
        ),
    ];
    Ok(ExperimentOutput {
        name: "did-fit",
        title: "Fig. 1: r = log π learns the normalized DID^β".into(),
        tables: vec![table],
        figures: vec![Figure::Lines {
            name: "js".into(),
            panels,
        }],
        instance: json!({ "instances": instances }),
        final_logits: Value::Object(finals),
        summary,
        checks,
        settings: cfg.to_json(),
    })
}
