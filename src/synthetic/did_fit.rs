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

use super::instance::{sub_seed, Instance, InstanceRecord};
use super::objective::Preset;
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Panel, Series};
use super::thresholds::{POPULATION_RECOVERED_JS, SAMPLED_RECOVERED_JS};
use super::train::{Mode, PromptTask, Trained};
use super::{fmt, mode_panel, run_js, x_axis, SynthConfig, SynthError};

/// `normalize(q_{π*/π_ref}^β)`: the DID from the library, raised to β in log space.
pub fn did_power(inst: &Instance) -> Result<Policy, SynthError> {
    let q = did(&inst.pi_star, &inst.pi_ref)?;
    let lp: Vec<f64> = q.log_probs().iter().map(|l| inst.beta * l).collect();
    Ok(Policy::from_logits(&lp)?)
}

/// Every run's curve and the worst finals, over τ × β × mode.
struct Fits {
    /// `js.csv`.
    table: Table,
    /// The instances.
    instances: Vec<InstanceRecord>,
    /// Final logits per run.
    finals: Map<String, Value>,
    /// Final JS per mode and instance.
    final_js: Map<String, Value>,
    /// One panel per mode.
    panels: Vec<Panel>,
    /// Sampled runs still falling at the end.
    slow: Vec<String>,
    /// Sampled runs that passed close to the target, then drifted away.
    drifted: Vec<String>,
    /// The largest final JS in population mode.
    max_pop: f64,
    /// The largest final JS in sampled mode.
    max_sampled: f64,
    /// The largest initial JS.
    max_start: f64,
    /// The largest JS between the data's preference distribution and the target.
    power_law_js: f64,
}

impl Fits {
    /// Empty table and one empty panel per mode.
    fn new() -> Self {
        let panels = Mode::ALL
            .iter()
            .map(|&m| {
                mode_panel(
                    format!("Fig. 1, {} mode: r = log π fits DID^β", m.name()),
                    m,
                    "1 + L-BFGS iteration",
                    "JS(π, DID^β normalized) [nats]",
                )
            })
            .collect();
        Fits {
            table: Table::new("js", &["mode", "tau", "beta", "step", "js"]),
            instances: Vec::new(),
            finals: Map::new(),
            final_js: Map::new(),
            panels,
            slow: Vec::new(),
            drifted: Vec::new(),
            max_pop: 0.0,
            max_sampled: 0.0,
            max_start: 0.0,
            power_law_js: 0.0,
        }
    }

    /// Records one run of `mode` (the `mi`-th) on the instance `(τ, β)` named `label`, series
    /// color `k`.
    fn add_run(
        &mut self,
        (mi, mode): (usize, Mode),
        (tau, beta): (f64, f64),
        label: &str,
        k: usize,
        curve: &[(usize, f64)],
        trained: &Trained,
    ) {
        for &(step, v) in curve {
            self.table.push(vec![
                Cell::from(mode.name()),
                tau.into(),
                beta.into(),
                step.into(),
                v.into(),
            ]);
        }
        let last = curve.last().map_or(f64::NAN, |c| c.1);
        self.max_start = self.max_start.max(curve[0].1);
        if mode == Mode::Sampled && (last.is_nan() || last >= SAMPLED_RECOVERED_JS) {
            let min = curve.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
            if last > 2.0 * min {
                self.drifted
                    .push(format!("{label} (min {}, final {})", fmt(min), fmt(last)));
            } else {
                self.slow.push(format!("{label} ({})", fmt(last)));
            }
        }
        match mode {
            Mode::Population => self.max_pop = self.max_pop.max(last),
            Mode::Sampled => self.max_sampled = self.max_sampled.max(last),
        }
        self.final_js
            .entry(mode.name())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(label.to_string(), json!(last));
        self.finals.insert(
            format!("{} {label}", mode.name()),
            json!({"logits": trained.logits[0], "steps": trained.steps, "stop": trained.stop}),
        );
        self.panels[mi].series.push(Series::line(
            format!("τ={tau} β={beta}"),
            k,
            curve.iter().map(|&(s, v)| (x_axis(mode, s), v)).collect(),
        ));
    }
}

/// Fits `r = log π` on every instance `(τ, β)` in both modes.
fn fits(cfg: &SynthConfig, pb: &ProgressBar) -> Result<Fits, SynthError> {
    let mut f = Fits::new();
    let mut k = 0;
    for tau in [cfg.tau, cfg.tau_smooth] {
        for &beta in &cfg.did_fit_betas {
            let inst = Instance::tempered(cfg.n, tau, beta, cfg.scale, cfg.seed)?;
            let label = format!("tau={tau} beta={beta}");
            f.instances.push(inst.record(&label));
            let target = did_power(&inst)?;
            // Theorem 3.3 on this instance: the data's preference distribution is the target.
            f.power_law_js = f.power_law_js.max(js(
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
                f.add_run((mi, mode), (tau, beta), &label, k, &curve, &trained);
            }
            k += 1;
        }
    }
    Ok(f)
}

/// Why the sampled runs stopped where they did (the sampled check's note).
fn why(cfg: &SynthConfig, f: &Fits) -> Vec<String> {
    let short = f.slow.len() + f.drifted.len();
    let mut why = Vec::new();
    if short == 0 {
        why.push("the remaining JS is the constant-learning-rate noise floor".to_string());
    }
    if !f.slow.is_empty() {
        why.push(format!(
            "still falling at the end ({}): with a large β the target DID^β puts its mass where \
             the pairs are rare, so the sampled fit needs more steps",
            f.slow.join(", ")
        ));
    }
    if !f.drifted.is_empty() {
        why.push(format!(
            "passed close to the target, then drifted away ({}): for outcomes that are almost \
             never rejected the gradient is many small pushes and a few large pulls, and \
             RMSprop's per-coordinate normalization (α = {}) makes its step closer to sign(g) \
             than to g, so its fixed point is not the loss minimum; --rms-alpha 0.9999 (longer \
             memory) removed the drift in our runs",
            f.drifted.join(", "),
            cfg.train.alpha
        ));
    }
    if short > 0 {
        why.push("the population fit is exact for every run".into());
    }
    why
}

/// The verdicts: Theorem 3.3 exactly, Fig. 1 in population and in sampled mode.
fn checks(cfg: &SynthConfig, f: &Fits) -> Vec<Check> {
    let runs = 2 * cfg.did_fit_betas.len();
    let short = f.slow.len() + f.drifted.len();
    vec![
        Check::new(
            "Theorem 3.3: the data's preference distribution q_{π_ref/π_l} equals DID^β normalized",
            format!("max JS = {}", fmt(f.power_law_js)),
            Verdict::of(f.power_law_js < POPULATION_RECOVERED_JS),
            "exact on the instance (π_l from Eq. 1)",
        ),
        Check::new(
            "Fig. 1: fitting r = log π gives π → DID^β (JS → 0), τ < 1 and τ > 1, every β (population)",
            format!("max final JS = {}", fmt(f.max_pop)),
            Verdict::of(f.max_pop < POPULATION_RECOVERED_JS),
            "exact expected loss minimized by L-BFGS",
        ),
        Check::new(
            "Fig. 1, sampled pairs (RMSprop, constant LR)",
            format!(
                "max final JS = {} (max initial {}); {} of {runs} runs above {}",
                fmt(f.max_sampled),
                fmt(f.max_start),
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
            &why(cfg, f).join("; "),
        ),
    ]
}

/// Run the experiment.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let f = fits(cfg, pb)?;
    let summary = json!({
        "final_js_max": f.max_sampled,
        "final_js_max_population": f.max_pop,
        "initial_js_max": f.max_start,
        "final_js": f.final_js,
        "power_law_js_max": f.power_law_js,
    });
    let checks = checks(cfg, &f);
    Ok(ExperimentOutput {
        name: "did-fit",
        title: "Fig. 1: r = log π learns the normalized DID^β".into(),
        tables: vec![f.table],
        figures: vec![Figure::Lines {
            name: "js".into(),
            panels: f.panels,
        }],
        instance: json!({ "instances": f.instances }),
        final_logits: Value::Object(f.finals),
        summary,
        checks,
        settings: cfg.to_json(),
    })
}
