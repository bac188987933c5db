//! `entropy` — Section 4: the entropy of the DID and log-likelihood displacement (LLD).
//!
//! 1. `H(q_{π*/π_ref})`, `H(π_ref)`, `H(π*)` over a log grid of τ in [0.1, 10]
//!    (`entropy_vs_tau.csv`).
//! 2. DPO and DPO-PG trained on sampled pairs (`y_w ~ π_ref`, `y_l ~ π_l` of Eq. 1) on a
//!    reinforcing (`--tau`) and a smoothing (`--tau-smooth`) instance, tracking (`lld.csv`):
//!    `log π` at π_ref's top-1 outcome, the mean `log π` over π_ref's top 1 % (`⌈N/100⌉`
//!    outcomes), `E_{y~π_ref}[log π(y)] = −H(π_ref) − KL(π_ref ‖ π)`, the entropy of the learned
//!    DID `H(q_{π/π_ref})` and `JS(π, π*)`.
//!
//! The paper's claim is about the peaks: they rise when reinforcing and fall when smoothing. The
//! mean over `y ~ π_ref` falls at convergence in *both* cases: by Gibbs' inequality `π_ref`
//! maximizes `E_{y~π_ref}[log π(y)]`, so any `π ≠ π_ref` has a lower one (by `KL(π_ref ‖ π)`).

use indicatif::ProgressBar;
use serde_json::{json, Map, Value};

use crate::did::did;
use crate::entropy::{entropy, js, kl};
use crate::policy::Policy;

use super::instance::{sub_seed, Instance, InstanceRecord};
use super::objective::Preset;
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Panel, Series};
use super::train::{train, Mode, PromptTask, Trained};
use super::{fmt, log_grid, SynthConfig, SynthError};

/// What is tracked during training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tracked {
    /// `log π(y_top)`, `y_top = argmax π_ref`.
    pub logp_top1: f64,
    /// Mean of `log π(y)` over π_ref's top `⌈N/100⌉` outcomes.
    pub logp_top1pct: f64,
    /// `E_{y~π_ref}[log π(y)]`.
    pub mean_logp_ref: f64,
    /// `H(q_{π/π_ref})`.
    pub did_entropy: f64,
    /// `JS(π, π*)`.
    pub js_star: f64,
}

/// The indices of π_ref's top `k` outcomes (ties broken by index).
pub fn top_k(pi_ref: &Policy, k: usize) -> Vec<usize> {
    let lp = pi_ref.log_probs();
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx.truncate(k.max(1));
    idx
}

/// Measure [`Tracked`] for `π` on `inst`.
///
/// # Errors
/// Library errors.
pub fn track(pi: &Policy, inst: &Instance, top: &[usize]) -> Result<Tracked, SynthError> {
    let lp = pi.log_probs();
    Ok(Tracked {
        logp_top1: lp[top[0]],
        logp_top1pct: top.iter().map(|&y| lp[y]).sum::<f64>() / top.len() as f64,
        mean_logp_ref: -entropy(&inst.pi_ref) - kl(&inst.pi_ref, pi)?,
        did_entropy: entropy(&did(pi, &inst.pi_ref)?),
        js_star: js(pi, &inst.pi_star)?,
    })
}

/// Part 1: `H(π_ref)`, `H(q_{π*/π_ref})`, `H(π*)` over a log grid of τ: the table and its panel.
fn entropy_over_tau(cfg: &SynthConfig) -> Result<(Table, Panel), SynthError> {
    let mut ent = Table::new("entropy_vs_tau", &["tau", "h_ref", "h_did", "h_star"]);
    let (mut s_ref, mut s_did, mut s_star) = (Vec::new(), Vec::new(), Vec::new());
    for tau in log_grid(0.1, 10.0, cfg.grid_tau) {
        let inst = Instance::tempered(cfg.n, tau, cfg.beta, cfg.scale, cfg.seed)?;
        let h_ref = entropy(&inst.pi_ref);
        let h_did = entropy(&did(&inst.pi_star, &inst.pi_ref)?);
        let h_star = entropy(&inst.pi_star);
        ent.push(vec![tau.into(), h_ref.into(), h_did.into(), h_star.into()]);
        s_ref.push((tau, h_ref));
        s_did.push((tau, h_did));
        s_star.push((tau, h_star));
    }
    let panel = Panel {
        title: format!("Entropies over τ (N = {}, scale {})", cfg.n, cfg.scale),
        x_label: "τ (f* = f_ref/τ)".into(),
        y_label: "entropy [nats]".into(),
        log_x: true,
        log_y: false,
        series: vec![
            Series::line("H(π_ref)", 7, s_ref),
            Series::line("H(DID) = H(q_{π*/π_ref})", 3, s_did),
            Series::line("H(π*)", 0, s_star),
        ],
    };
    Ok((ent, panel))
}

/// Part 2's results: the LLD curves of DPO and DPO-PG on both instances.
struct Lld {
    /// `lld.csv`.
    table: Table,
    /// `log π(y_top)` over the steps.
    peak_panel: Panel,
    /// `E_{y~π_ref}[log π(y)]` over the steps.
    mean_panel: Panel,
    /// The two instances.
    records: Vec<InstanceRecord>,
    /// Final logits per run.
    finals: Map<String, Value>,
    /// The learned DID's final entropy, per case and objective.
    by_case: Map<String, Value>,
    /// End minus start of `log π(y_top)` per case; index 0: DPO, 1: DPO-PG.
    peak: [Map<String, Value>; 2],
    /// End minus start of the top-1 % mean per case.
    top_pct: [Map<String, Value>; 2],
    /// End minus start of `E_{y~π_ref}[log π(y)]` per case.
    mean: [Map<String, Value>; 2],
    /// The changes at convergence (`π = π*`) per case.
    predicted: Map<String, Value>,
    /// The exact `H(q_{π*/π_ref})` per case.
    exact_did: Map<String, Value>,
}

impl Lld {
    /// Empty table and panels.
    fn new() -> Self {
        let table = Table::new(
            "lld",
            &[
                "case",
                "objective",
                "step",
                "logp_top1",
                "logp_top1pct",
                "mean_logp_ref",
                "did_entropy",
                "js_star",
            ],
        );
        let panel = |title: &str, y_label: &str| Panel {
            title: title.into(),
            x_label: "RMSprop step".into(),
            y_label: y_label.into(),
            log_x: false,
            log_y: false,
            series: Vec::new(),
        };
        Lld {
            table,
            peak_panel: panel(
                "Log-likelihood at π_ref's top-1 outcome",
                "log π(y_top) − start",
            ),
            mean_panel: panel(
                "Mean log-likelihood of chosen responses",
                "E_{y~π_ref}[log π(y)] − start",
            ),
            records: Vec::new(),
            finals: Map::new(),
            by_case: Map::new(),
            peak: [Map::new(), Map::new()],
            top_pct: [Map::new(), Map::new()],
            mean: [Map::new(), Map::new()],
            predicted: Map::new(),
            exact_did: Map::new(),
        }
    }

    /// Records one run's curve (series color `k`); returns the learned DID's final entropy.
    fn add_run(
        &mut self,
        case: &str,
        obj: Preset,
        k: usize,
        curve: &[(usize, Tracked)],
        trained: &Trained,
    ) -> f64 {
        let start = curve[0].1;
        let end = curve.last().expect("observed").1;
        for (step, t) in curve {
            self.table.push(vec![
                Cell::from(case),
                Cell::from(obj.name()),
                (*step).into(),
                t.logp_top1.into(),
                t.logp_top1pct.into(),
                t.mean_logp_ref.into(),
                t.did_entropy.into(),
                t.js_star.into(),
            ]);
        }
        let label = format!("{case}, {obj}");
        self.peak_panel.series.push(Series::line(
            label.clone(),
            k,
            curve
                .iter()
                .map(|(s, t)| (*s as f64, t.logp_top1 - start.logp_top1))
                .collect(),
        ));
        self.mean_panel.series.push(Series::line(
            label,
            k,
            curve
                .iter()
                .map(|(s, t)| (*s as f64, t.mean_logp_ref - start.mean_logp_ref))
                .collect(),
        ));
        let oi = usize::from(obj == Preset::DpoPg);
        self.peak[oi].insert(case.into(), json!(end.logp_top1 - start.logp_top1));
        self.top_pct[oi].insert(case.into(), json!(end.logp_top1pct - start.logp_top1pct));
        self.mean[oi].insert(case.into(), json!(end.mean_logp_ref - start.mean_logp_ref));
        self.finals.insert(
            format!("sampled {case} {obj}"),
            json!({"logits": trained.logits[0], "steps": trained.steps, "final_js_star": end.js_star}),
        );
        end.did_entropy
    }
}

/// Trains `obj` on sampled pairs of `inst`, tracking [`Tracked`] at every recorded step.
fn train_tracked(
    cfg: &SynthConfig,
    inst: &Instance,
    top: &[usize],
    case: &str,
    obj: Preset,
) -> Result<(Vec<(usize, Tracked)>, Trained), SynthError> {
    let task = PromptTask {
        objective: obj.objective(cfg.beta, cfg.beta_mismatch)?,
        reference: inst.pi_ref.clone(),
        chosen: inst.pi_ref.clone(),
        rejected: inst.pi_l.clone(),
    };
    let seed = sub_seed(cfg.seed, &format!("entropy {case} {obj}"));
    let mut curve: Vec<(usize, Tracked)> = Vec::new();
    let mut err = None;
    let trained = train(
        Mode::Sampled,
        &[task],
        vec![inst.pi_ref.log_probs().to_vec()],
        &cfg.train,
        seed,
        |step, logits| match Policy::from_logits(&logits[0])
            .map_err(SynthError::from)
            .and_then(|p| track(&p, inst, top))
        {
            Ok(t) => curve.push((step, t)),
            Err(e) => err = Some(e),
        },
    )?;
    match err {
        Some(e) => Err(e),
        None => Ok((curve, trained)),
    }
}

/// Part 2: DPO and DPO-PG on the reinforcing and the smoothing instance.
fn lld(cfg: &SynthConfig, top: &[usize], pb: &ProgressBar) -> Result<Lld, SynthError> {
    let mut out = Lld::new();
    let mut k = 0;
    for (case, tau) in [("reinforcing", cfg.tau), ("smoothing", cfg.tau_smooth)] {
        let inst = Instance::tempered(cfg.n, tau, cfg.beta, cfg.scale, cfg.seed)?;
        out.records.push(inst.record(case));
        out.exact_did.insert(
            case.into(),
            json!(entropy(&did(&inst.pi_star, &inst.pi_ref)?)),
        );
        let at_star = track(&inst.pi_star, &inst, top)?;
        let at_ref = track(&inst.pi_ref, &inst, top)?;
        out.predicted.insert(
            case.into(),
            json!({
                "peak_logp_change": at_star.logp_top1 - at_ref.logp_top1,
                "top1pct_logp_change": at_star.logp_top1pct - at_ref.logp_top1pct,
                "mean_logp_change": at_star.mean_logp_ref - at_ref.mean_logp_ref,
            }),
        );
        let mut case_did = Map::new();
        for obj in [Preset::Dpo, Preset::DpoPg] {
            let (curve, trained) = train_tracked(cfg, &inst, top, case, obj)?;
            pb.inc(1);
            let did_entropy = out.add_run(case, obj, k, &curve, &trained);
            k += 1;
            case_did.insert(obj.name().into(), json!(did_entropy));
        }
        out.by_case.insert(case.into(), Value::Object(case_did));
    }
    Ok(out)
}

/// The verdicts: Claim 4.1 on both instances, the peaks' and the mean's displacement, DPO-PG's
/// learned DID entropy.
fn checks(cfg: &SynthConfig, l: &Lld, h_ref: f64, did_dpo: f64, did_pg: f64) -> Vec<Check> {
    let g = |m: &Map<String, Value>, k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    let (pr, ps) = (g(&l.peak[0], "reinforcing"), g(&l.peak[0], "smoothing"));
    let (mr, ms) = (g(&l.mean[0], "reinforcing"), g(&l.mean[0], "smoothing"));
    let (hr, hs) = (g(&l.exact_did, "reinforcing"), g(&l.exact_did, "smoothing"));
    vec![
        Check::new(
            "Claim 4.1 on the two instances: H(DID) < H(π_ref) when reinforcing, > when smoothing",
            format!(
                "H(π_ref) = {}; H(DID) = {} (τ = {}), {} (τ = {})",
                fmt(h_ref),
                fmt(hr),
                cfg.tau,
                fmt(hs),
                cfg.tau_smooth
            ),
            Verdict::of(hr < h_ref && hs > h_ref),
            "exact; over τ it fails for 1/2 < τ < 1 (see claim-map)",
        ),
        Check::new(
            "Reinforcing: DPO raises log π at π_ref's peak",
            format!(
                "top-1 change {}, top-1 % change {}",
                fmt(pr),
                fmt(g(&l.top_pct[0], "reinforcing"))
            ),
            Verdict::of(pr > 0.0),
            "sampled DPO, end minus start",
        ),
        Check::new(
            "Smoothing: DPO lowers log π at π_ref's peak (LLD at the peaks)",
            format!(
                "top-1 change {}, top-1 % change {}",
                fmt(ps),
                fmt(g(&l.top_pct[0], "smoothing"))
            ),
            Verdict::of(ps < 0.0),
            "sampled DPO, end minus start",
        ),
        Check::new(
            "LLD (E_{y~π_ref}[log π(y)] falls) goes with smoothing",
            format!(
                "mean change: smoothing {}, reinforcing {}",
                fmt(ms),
                fmt(mr)
            ),
            if ms < 0.0 && mr >= 0.0 {
                Verdict::Held
            } else if ms < 0.0 {
                Verdict::Partly
            } else {
                Verdict::Failed
            },
            "the mean falls in both cases, as it must: by Gibbs' inequality π_ref maximizes \
             E_{y~π_ref}[log π(y)], so every π ≠ π_ref lowers it (by KL(π_ref ‖ π)); the \
             paper's direction shows only at the peaks",
        ),
        Check::new(
            "Entropy of the DID learned by DPO-PG beside DPO's (reinforcing instance)",
            format!(
                "DPO {}, DPO-PG {}, exact H(q_{{π*/π_ref}}) {}, H(π_ref) {}",
                fmt(did_dpo),
                fmt(did_pg),
                fmt(hr),
                fmt(h_ref)
            ),
            Verdict::Reported,
            "Appendix H makes no prediction about it",
        ),
    ]
}

/// Run the experiment: entropies over τ, then the LLD runs.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let (ent, entropy_panel) = entropy_over_tau(cfg)?;
    let top_count = cfg.n.div_ceil(100);
    let reference = Instance::tempered(cfg.n, cfg.tau, cfg.beta, cfg.scale, cfg.seed)?;
    let top = top_k(&reference.pi_ref, top_count);
    let l = lld(cfg, &top, pb)?;
    let h_ref = entropy(&reference.pi_ref);
    let did_dpo = l.by_case["reinforcing"]["dpo"].as_f64().unwrap_or(f64::NAN);
    let did_pg = l.by_case["reinforcing"]["dpo-pg"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let checks = checks(cfg, &l, h_ref, did_dpo, did_pg);
    let summary = json!({
        "peak_logp_change": l.peak[0],
        "top1pct_logp_change": l.top_pct[0],
        "mean_logp_change": l.mean[0],
        "dpo-pg": {
            "peak_logp_change": l.peak[1],
            "top1pct_logp_change": l.top_pct[1],
            "mean_logp_change": l.mean[1],
        },
        "did_entropy": { "dpo": did_dpo, "dpo-pg": did_pg },
        "did_entropy_by_case": l.by_case,
        "exact_did_entropy": l.exact_did,
        "reference_entropy": h_ref,
        "predicted_at_convergence": l.predicted,
        "top_count": top_count,
    });
    Ok(ExperimentOutput {
        name: "entropy",
        title: "Section 4: entropy of the DID and log-likelihood displacement".into(),
        tables: vec![ent, l.table],
        figures: vec![Figure::Lines {
            name: "entropy".into(),
            panels: vec![entropy_panel, l.peak_panel, l.mean_panel],
        }],
        instance: json!({ "instances": l.records, "top_outcomes": top }),
        final_logits: Value::Object(l.finals),
        summary,
        checks,
        settings: cfg.to_json(),
    })
}
