//! The training curves of `metrics.jsonl` in one PNG (`difinfo-train plot RUN_DIR`), one panel
//! per quantity against the step: loss; rewards/margins; rewards/accuracies; logps/chosen and
//! logps/rejected; grad_norm; learning_rate (panels without data, e.g. rewards for SFT, are
//! left out). Text uses the DejaVu Sans font shipped in the repository.

use std::path::Path;

use plotters::prelude::*;

use crate::train::metrics::MetricsLog;

use difinfo::font::{register_font, FONT};

/// The panels: title and the metric names drawn in it.
pub const PANELS: [(&str, &[&str]); 6] = [
    ("loss", &["loss"]),
    ("rewards/margins", &["rewards/margins"]),
    ("rewards/accuracies", &["rewards/accuracies"]),
    ("log-probs", &["logps/chosen", "logps/rejected"]),
    ("grad_norm", &["grad_norm"]),
    ("learning_rate", &["learning_rate"]),
];

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

type Curve = (String, Vec<(f64, f64)>);

/// The curves of each non-empty panel, read from `run_dir/metrics.jsonl`.
///
/// # Errors
/// A missing or unreadable metrics file; no record.
pub fn panels(run_dir: &Path) -> crate::Result<Vec<(String, Vec<Curve>)>> {
    let recs = MetricsLog::new(run_dir).read()?;
    if recs.is_empty() {
        return Err(crate::Error::InvalidArgument(format!(
            "{}: no metrics logged yet",
            run_dir.join("metrics.jsonl").display()
        )));
    }
    let mut out = Vec::new();
    for (title, keys) in PANELS {
        let mut curves = Vec::new();
        for k in keys {
            let pts: Vec<(f64, f64)> = recs
                .iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*k)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            if !pts.is_empty() {
                curves.push(((*k).to_string(), pts));
            }
        }
        if !curves.is_empty() {
            out.push((title.to_string(), curves));
        }
    }
    Ok(out)
}

fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5 * lo.abs().max(1e-12)
    };
    (lo - pad, hi + pad)
}

/// A drawing error as a sentence about `out` (the file the user named): plotters' error
/// chain reduced to its cause (an I/O error's own message).
fn draw_err<E: std::error::Error + 'static>(out: &Path) -> impl Fn(E) -> crate::Error + '_ {
    move |e| {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        crate::Error::InvalidArgument(format!("cannot draw {}: {cause}", out.display()))
    }
}

/// Draws the panels of `run_dir` into `out` (a PNG, written to a temporary name and renamed).
///
/// # Errors
/// See [`panels`]; drawing and I/O errors.
pub fn plot(run_dir: &Path, out: &Path) -> crate::Result<usize> {
    register_font();
    let ps = panels(run_dir)?;
    let cols = 3usize.min(ps.len());
    let rows = ps.len().div_ceil(cols);
    let (w, h) = (560u32, 380u32);
    crate::io::write_atomic(out, |tmp| {
        {
            let root =
                BitMapBackend::new(&tmp, (w * cols as u32, h * rows as u32)).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err(out))?;
            let areas = root.split_evenly((rows, cols));
            for ((title, curves), area) in ps.iter().zip(areas) {
                let (x0, x1) = range(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
                let (y0, y1) = range(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
                let mut chart = ChartBuilder::on(&area)
                    .caption(title, (FONT, 22))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(64)
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(draw_err(out))?;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .light_line_style(WHITE)
                    .label_style((FONT, 13))
                    .axis_desc_style((FONT, 14))
                    .y_label_formatter(&|v| {
                        if v.abs() >= 1e4 || (v.abs() < 1e-2 && *v != 0.0) {
                            format!("{v:.1e}")
                        } else {
                            format!("{v:.3}")
                        }
                    })
                    .draw()
                    .map_err(draw_err(out))?;
                for (i, (name, pts)) in curves.iter().enumerate() {
                    let c = COLORS[i % COLORS.len()];
                    let s = chart
                        .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                        .map_err(draw_err(out))?;
                    s.label(name.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                    if pts.len() <= 40 {
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, c.filled())))
                            .map_err(draw_err(out))?;
                    }
                }
                if curves.len() > 1 {
                    chart
                        .configure_series_labels()
                        .position(SeriesLabelPosition::UpperRight)
                        .label_font((FONT, 13))
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(draw_err(out))?;
                }
            }
            root.present().map_err(draw_err(out))?;
        }
        Ok(())
    })?;
    Ok(ps.len())
}
