//! Section 3.5's real-data test (the paper's Figure 6): the expected reward of each policy's
//! samples under a reward model, against β, for the two reward forms — DPO's
//! `r = β log π/π_ref` and the reference-free `r = β log π`.
//!
//! If preferences encode the DID `q_{π*/π_ref}` (Theorem 3.3), DPO's form learns π* (Theorem
//! 3.4) and its policies score higher; if they encode π* directly, the reference-free form is
//! the optimal one (Theorem 2.1). The inputs are what the commands write: a `score` summary
//! (the mean reward of each label's samples with its 95 % interval) and, per policy, the
//! training run that made it (its `train_summary.json` gives β and the reward form).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use difinfo::font::{register_font, FONT};

use crate::diag::reward_summary::GroupSummary;
use crate::error::{Error, Result};

/// The mean reward of one label's samples: `E_{y∼π}[r(x, y)]` estimated over the held-out
/// prompts, with its 95 % interval.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedReward {
    /// The samples' label in the `score` summary.
    pub label: String,
    /// Scored samples.
    pub n: usize,
    /// The mean reward.
    pub mean: f64,
    /// The 95 % interval of the mean `(low, high)`.
    pub interval: (f64, f64),
}

/// The reward form a policy was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RewardForm {
    /// DPO: `r = β log π/π_ref`.
    LogRatio,
    /// Reference-free: `r = β log π`.
    ReferenceFree,
}

impl RewardForm {
    /// The legend's text.
    pub fn legend(self) -> &'static str {
        match self {
            RewardForm::LogRatio => "DPO: r = β log π/π_ref",
            RewardForm::ReferenceFree => "reference-free: r = β log π",
        }
    }
}

/// One policy of the figure: its training run's β and reward form, and its samples'
/// expected reward.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyPoint {
    /// β of the run.
    pub beta: f64,
    /// The run's reward form.
    pub form: RewardForm,
    /// The run's directory.
    pub run: PathBuf,
    /// The expected reward of its samples.
    pub reward: ExpectedReward,
}

/// The figure's data: the policies by form (sorted by β) and the starting policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Points per reward form, by increasing β.
    pub series: BTreeMap<RewardForm, Vec<PolicyPoint>>,
    /// The policy both forms start from (drawn as a dashed line with its interval).
    pub baseline: Option<ExpectedReward>,
}

fn bad(file: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}: {what}", file.display()))
}

fn read_json(file: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(file).map_err(|e| bad(file, e))?;
    serde_json::from_str(&text).map_err(|e| bad(file, format!("not JSON: {e}")))
}

fn number(file: &Path, v: &Value, field: &str) -> Result<f64> {
    v.get(field)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
        .ok_or_else(|| {
            bad(
                file,
                format!("field `{field}`: missing or not a finite number"),
            )
        })
}

/// The part of a `score` summary the figure reads: one [`GroupSummary`] per label.
#[derive(Deserialize)]
struct SummaryFile {
    labels: Vec<GroupSummary>,
}

/// The expected reward of every label of a `score` summary file: the mean over the label's
/// prompts of each prompt's mean reward, with its Student-t interval
/// ([`crate::diag::reward_summary`]).
///
/// # Errors
/// An unreadable file or one not in `score`'s summary format; a label of fewer than two
/// prompts (no interval).
pub fn read_summary(file: &Path) -> Result<BTreeMap<String, ExpectedReward>> {
    let v = read_json(file)?;
    let s: SummaryFile =
        serde_json::from_value(v).map_err(|e| bad(file, format!("not a `score` summary: {e}")))?;
    let mut out = BTreeMap::new();
    for g in s.labels {
        let p = g.prompts;
        let interval = match (p.ci_low, p.ci_high) {
            (Some(lo), Some(hi)) if lo.is_finite() && hi.is_finite() => (lo, hi),
            _ => {
                return Err(bad(
                    file,
                    format!(
                        "label `{}`: no interval (fewer than two prompts scored)",
                        g.label
                    ),
                ))
            }
        };
        let r = ExpectedReward {
            label: g.label.clone(),
            n: g.n,
            mean: p.mean,
            interval,
        };
        out.insert(g.label, r);
    }
    Ok(out)
}

/// β and the reward form of a training run, from its `train_summary.json`.
///
/// # Errors
/// A missing or unreadable summary; a run of another objective than the preference loss.
pub fn run_form(run: &Path) -> Result<(f64, RewardForm)> {
    let file = run.join("train_summary.json");
    let v = read_json(&file)?;
    let o = v
        .get("objective")
        .ok_or_else(|| bad(&file, "field `objective`: missing"))?;
    if o.get("objective").and_then(Value::as_str) != Some("dpo") {
        return Err(bad(
            &file,
            "not a preference run (objective `dpo`): Figure 6 compares DPO's reward forms",
        ));
    }
    let beta = number(&file, o, "beta")?;
    let form = match o.get("reference_free").and_then(Value::as_bool) {
        Some(true) => RewardForm::ReferenceFree,
        Some(false) => RewardForm::LogRatio,
        None => return Err(bad(&file, "field `objective.reference_free`: missing")),
    };
    Ok((beta, form))
}

/// Assembles the figure: each `(label, run)` pairs a label of the summary with the run that
/// made the policy; `baseline` names the starting policy's label.
///
/// # Errors
/// A label missing from the summary; see [`run_form`].
pub fn figure(
    summary: &Path,
    policies: &[(String, PathBuf)],
    baseline: Option<&str>,
) -> Result<Figure> {
    let rewards = read_summary(summary)?;
    let find = |label: &str| {
        rewards.get(label).cloned().ok_or_else(|| {
            let known: Vec<&str> = rewards.keys().map(String::as_str).collect();
            bad(
                summary,
                format!("no label `{label}` (labels: {})", known.join(", ")),
            )
        })
    };
    let mut series: BTreeMap<RewardForm, Vec<PolicyPoint>> = BTreeMap::new();
    for (label, run) in policies {
        let (beta, form) = run_form(run)?;
        series.entry(form).or_default().push(PolicyPoint {
            beta,
            form,
            run: run.clone(),
            reward: find(label)?,
        });
    }
    for pts in series.values_mut() {
        pts.sort_by(|a, b| a.beta.total_cmp(&b.beta));
    }
    let baseline = baseline.map(find).transpose()?;
    Ok(Figure { series, baseline })
}

const COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];

fn draw_err(out: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("cannot draw {}: {e}", out.display()))
}

/// Draws the figure into `out` (PNG, written to a temporary name and renamed): expected
/// reward against β on a log axis, one line with 95 % error bars per reward form, the
/// starting policy as a dashed line inside its shaded interval.
///
/// # Errors
/// No policy; a β ≤ 0; drawing and I/O errors.
pub fn plot(fig: &Figure, out: &Path) -> Result<()> {
    let pts: Vec<&PolicyPoint> = fig.series.values().flatten().collect();
    if pts.is_empty() {
        return Err(Error::InvalidArgument("no policy to draw".into()));
    }
    if let Some(p) = pts.iter().find(|p| p.beta <= 0.0) {
        return Err(bad(&p.run, format!("β = {} on a log axis", p.beta)));
    }
    let (b0, b1) = pts.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.beta), hi.max(p.beta))
    });
    let (x0, x1) = (b0 / 1.6, b1 * 1.6);
    // The βs drawn are the axis' ticks.
    let mut betas: Vec<f64> = pts.iter().map(|p| p.beta).collect();
    betas.sort_by(f64::total_cmp);
    betas.dedup();
    let ys = pts
        .iter()
        .flat_map(|p| [p.reward.interval.0, p.reward.interval.1])
        .chain(
            fig.baseline
                .iter()
                .flat_map(|b| [b.interval.0, b.interval.1]),
        );
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = 0.08 * (hi - lo).max(1e-9);
    let (y0, y1) = (lo - pad, hi + pad);
    register_font();
    let e = draw_err(out);
    crate::io::write_atomic(out, |tmp| {
        let root = BitMapBackend::new(&tmp, (720, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Expected reward of the policies' samples", (FONT, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale().with_key_points(betas.clone()), y0..y1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("β")
            .y_desc("mean reward (reward model)")
            .x_label_formatter(&|v| format!("{}", (v * 1e6).round() / 1e6))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .light_line_style(WHITE)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        if let Some(b) = &fig.baseline {
            let grey = RGBColor(120, 120, 120);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, b.interval.0), (x1, b.interval.1)],
                    grey.mix(0.15).filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
            chart
                .draw_series(DashedLineSeries::new(
                    [(x0, b.mean), (x1, b.mean)],
                    8,
                    5,
                    grey.stroke_width(2),
                ))
                .map_err(|x| e(x.to_string()))?
                .label(format!("{} (starting policy)", b.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
        }
        let forms = fig.series.len() as f64;
        for (k, (form, pts)) in fig.series.iter().enumerate() {
            let c = COLORS[k % COLORS.len()];
            // The forms side by side around each β (3 % apart), so their bars do not overlap.
            let dodge = 1.03f64.powf(k as f64 - (forms - 1.0) / 2.0);
            let x = |p: &PolicyPoint| p.beta * dodge;
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (x(p), p.reward.mean)),
                    c.stroke_width(2),
                ))
                .map_err(|x| e(x.to_string()))?
                .label(form.legend())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().flat_map(|p| {
                    // The 95 % interval: a vertical bar with caps a few per cent of β wide.
                    let (b, (lo, hi)) = (x(p), p.reward.interval);
                    let (l, r) = (b / 1.015, b * 1.015);
                    [
                        vec![(b, lo), (b, hi)],
                        vec![(l, lo), (r, lo)],
                        vec![(l, hi), (r, hi)],
                    ]
                    .map(|seg| PathElement::new(seg, c.stroke_width(2)))
                }))
                .map_err(|x| e(x.to_string()))?;
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((x(p), p.reward.mean), 4, c.filled())),
                )
                .map_err(|x| e(x.to_string()))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(x.to_string()))?;
        root.present().map_err(|x| e(x.to_string()))?;
        Ok(())
    })
}

/// The figure's numbers as a Markdown table (β, form, n, mean, interval), baseline first.
pub fn table(fig: &Figure) -> String {
    let mut s = String::from("| policy | reward form | β | n | mean reward | 95 % interval |\n");
    s.push_str("|---|---|---:|---:|---:|---|\n");
    let row = |s: &mut String, label: &str, form: &str, beta: &str, r: &ExpectedReward| {
        s.push_str(&format!(
            "| {label} | {form} | {beta} | {} | {:.4} | [{:.4}, {:.4}] |\n",
            r.n, r.mean, r.interval.0, r.interval.1
        ));
    };
    if let Some(b) = &fig.baseline {
        row(&mut s, &b.label, "starting policy", "–", b);
    }
    for pts in fig.series.values() {
        for p in pts {
            let form = match p.form {
                RewardForm::LogRatio => "β log π/π_ref",
                RewardForm::ReferenceFree => "β log π",
            };
            row(
                &mut s,
                &p.reward.label,
                form,
                &format!("{}", p.beta),
                &p.reward,
            );
        }
    }
    s
}
