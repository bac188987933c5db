//! Figures: line panels (linear or log axes, labeled, with a legend) and a heat map with a
//! color bar, each rendered to PNG and SVG with the bundled DejaVu Sans font.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

pub use crate::font::{register_font, FONT};

use super::files::{temp_path, write_atomic};
use super::SynthError;

/// One curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
    /// Palette index (the same index, the same color, across panels).
    pub color: usize,
    /// Draw markers instead of a line.
    pub markers: bool,
}

impl Series {
    /// A line.
    pub fn line(label: impl Into<String>, color: usize, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            color,
            markers: false,
        }
    }
}

/// One chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis (non-positive values are clamped to the smallest positive one shown).
    pub log_y: bool,
    /// Curves.
    pub series: Vec<Series>,
}

/// A heat map `z[[i_y, i_x]]` over a grid `xs × ys`, with cells marked where `mark` is true.
#[derive(Debug, Clone, PartialEq)]
pub struct Heat {
    /// Caption.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Color-bar label.
    pub z_label: String,
    /// Grid x values (increasing, positive: the axis is logarithmic).
    pub xs: Vec<f64>,
    /// Grid y values (increasing, positive: the axis is logarithmic).
    pub ys: Vec<f64>,
    /// Values `z[[i_y, i_x]]`: shape `ys.len() × xs.len()`.
    pub z: Array2<f64>,
    /// Marked cells, the same shape.
    pub mark: Array2<bool>,
    /// Legend entry for the mark.
    pub mark_label: String,
}

/// A heat map over categories: `z[[row, column]]`, each cell colored on a sequential scale and
/// labeled with its value.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoricalHeat {
    /// Caption.
    pub title: String,
    /// One label per row (top to bottom).
    pub row_labels: Vec<String>,
    /// One label per column (`|` breaks a label into lines).
    pub col_labels: Vec<String>,
    /// Values: shape `row_labels.len() × col_labels.len()`.
    pub z: Array2<f64>,
    /// Color-bar label.
    pub z_label: String,
    /// The value range of the color scale (values outside are clamped).
    pub range: (f64, f64),
}

/// A figure, written as `<name>.png` and `<name>.svg`.
#[derive(Debug, Clone, PartialEq)]
pub enum Figure {
    /// Panels side by side.
    Lines {
        /// File stem.
        name: String,
        /// Panels, left to right.
        panels: Vec<Panel>,
    },
    /// A heat map.
    Heat {
        /// File stem.
        name: String,
        /// The map.
        heat: Box<Heat>,
    },
    /// Categorical heat maps, stacked top to bottom.
    Categorical {
        /// File stem.
        name: String,
        /// The maps.
        panels: Vec<CategoricalHeat>,
    },
}

/// Categorical heat maps: row-label column, cell size, color-bar column, heights of the
/// caption and of the column labels.
const CAT_LABEL_W: u32 = 190;
const CAT_CELL_W: u32 = 58;
const CAT_CELL_H: u32 = 24;
const CAT_BAR_W: u32 = 120;
const CAT_TOP: u32 = 40;
const CAT_BOTTOM: u32 = 48;

const PANEL_W: u32 = 960;
/// Width of the legend column right of each chart.
const LEGEND_W: u32 = 210;
const PANEL_H: u32 = 560;

fn color(i: usize) -> RGBColor {
    // Tableau 10: distinguishable, print-friendly.
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

fn perr<E: std::fmt::Debug>(e: E) -> SynthError {
    SynthError::Plot(format!("{e:?}"))
}

impl Figure {
    fn name(&self) -> &str {
        match self {
            Figure::Lines { name, .. }
            | Figure::Heat { name, .. }
            | Figure::Categorical { name, .. } => name,
        }
    }

    fn size(&self) -> (u32, u32) {
        match self {
            Figure::Lines { panels, .. } => (PANEL_W * panels.len().max(1) as u32, PANEL_H),
            Figure::Heat { .. } => (900, 640),
            Figure::Categorical { panels, .. } => {
                let cols = panels.iter().map(|p| p.col_labels.len()).max().unwrap_or(1) as u32;
                let w = CAT_LABEL_W + cols * CAT_CELL_W + CAT_BAR_W;
                let h: u32 = panels
                    .iter()
                    .map(|p| CAT_TOP + CAT_BOTTOM + p.row_labels.len() as u32 * CAT_CELL_H)
                    .sum();
                (w.max(640), h.max(200))
            }
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), SynthError> {
        root.fill(&WHITE).map_err(perr)?;
        match self {
            Figure::Lines { panels, .. } => {
                let areas = root.split_evenly((1, panels.len().max(1)));
                for (a, p) in areas.iter().zip(panels) {
                    draw_panel(a, p)?;
                }
            }
            Figure::Heat { heat, .. } => draw_heat(&root, heat)?,
            Figure::Categorical { panels, .. } => {
                let mut rest = root.clone();
                for p in panels {
                    let h = CAT_TOP + CAT_BOTTOM + p.row_labels.len() as u32 * CAT_CELL_H;
                    let (top, bottom) = rest.split_vertically(h);
                    draw_categorical(&top, p)?;
                    rest = bottom;
                }
            }
        }
        root.present().map_err(perr)
    }

    /// Render to `dir/<name>.png` and `dir/<name>.svg` (each through a temporary file).
    ///
    /// # Errors
    /// [`SynthError::Plot`], [`SynthError::Io`].
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, SynthError> {
        register_font();
        let size = self.size();
        let png = dir.join(format!("{}.png", self.name()));
        let tmp = temp_path(&png);
        self.draw(BitMapBackend::new(&tmp, size).into_drawing_area())?;
        std::fs::rename(&tmp, &png).map_err(|e| SynthError::io(&png, e))?;
        let svg = dir.join(format!("{}.svg", self.name()));
        let mut s = String::new();
        self.draw(SVGBackend::with_string(&mut s, size).into_drawing_area())?;
        write_atomic(&svg, s.as_bytes())?;
        Ok(vec![png, svg])
    }
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1e-3, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        if hi <= lo {
            (lo / 2.0, hi * 2.0)
        } else {
            let r = (hi / lo).powf(0.04);
            (lo / r, hi * r)
        }
    } else if hi <= lo {
        (lo - 0.5 - lo.abs() * 0.1, hi + 0.5 + hi.abs() * 0.1)
    } else {
        let m = (hi - lo) * 0.04;
        (lo - m, hi + m)
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
) -> Result<(), SynthError> {
    let xs = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0));
    let ys = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1));
    let (x0, x1) = bounds(xs, p.log_x);
    let (y0, y1) = bounds(ys, p.log_y);
    let w = area.dim_in_pixel().0;
    let (plot, legend) = area.split_horizontally(w.saturating_sub(LEGEND_W));
    match (p.log_x, p.log_y) {
        (false, false) => chart(&plot, p, x0..x1, y0..y1, y0)?,
        (true, false) => chart(&plot, p, (x0..x1).log_scale(), y0..y1, y0)?,
        (false, true) => chart(&plot, p, x0..x1, (y0..y1).log_scale(), y0)?,
        (true, true) => chart(&plot, p, (x0..x1).log_scale(), (y0..y1).log_scale(), y0)?,
    }
    // The legend, in its own column so that it never hides a curve.
    for (i, s) in p.series.iter().enumerate() {
        let y = 56 + 24 * i as i32;
        let col = color(s.color);
        if s.markers {
            legend
                .draw(&Circle::new((18, y), 4, col.filled()))
                .map_err(perr)?;
        } else {
            legend
                .draw(&PathElement::new(
                    vec![(4, y), (30, y)],
                    col.stroke_width(3),
                ))
                .map_err(perr)?;
        }
        legend
            .draw(&Text::new(
                s.label.clone(),
                (38, y - 8),
                (FONT, 14).into_font().color(&BLACK),
            ))
            .map_err(perr)?;
    }
    Ok(())
}

fn chart<DB, X, Y>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
    x: X,
    y: Y,
    y_floor: f64,
) -> Result<(), SynthError>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut c = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(x, y)
        .map_err(perr)?;
    c.configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .y_label_formatter(&|v| fmt_tick(*v, p.log_y))
        .x_label_formatter(&|v| fmt_tick(*v, p.log_x))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(perr)?;
    for s in &p.series {
        let col = color(s.color);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|q| q.0.is_finite() && q.1.is_finite())
            .map(|&(a, b)| (a, if p.log_y { b.max(y_floor) } else { b }))
            .collect();
        if s.markers || pts.len() == 1 {
            c.draw_series(pts.iter().map(|&q| Circle::new(q, 4, col.filled())))
                .map_err(perr)?;
        } else {
            c.draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(perr)?;
        }
    }
    Ok(())
}

fn fmt_tick(v: f64, log: bool) -> String {
    let a = v.abs();
    if v == 0.0 || (!log && a < 1e-9) {
        "0".into()
    } else if !log && (1e4..1e7).contains(&a) {
        format!("{v:.0}")
    } else if !(1e-3..1e4).contains(&a) {
        // Three significant digits in scientific notation, trailing zeros dropped.
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = if m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.')
        } else {
            m
        };
        format!("{m}e{e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Diverging blue–white–red for `t ∈ [−1, 1]`.
fn diverging(t: f64) -> RGBColor {
    let t = t.clamp(-1.0, 1.0);
    let (r, g, b) = if t < 0.0 {
        let s = -t;
        (1.0 - 0.8 * s, 1.0 - 0.6 * s, 1.0 - 0.1 * s)
    } else {
        (1.0 - 0.1 * t, 1.0 - 0.75 * t, 1.0 - 0.8 * t)
    };
    RGBColor((r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8)
}

fn edges(v: &[f64]) -> Vec<f64> {
    // Geometric midpoints (the axes are logarithmic).
    let mut e = Vec::with_capacity(v.len() + 1);
    let n = v.len();
    let r0 = if n > 1 { (v[1] / v[0]).sqrt() } else { 2.0 };
    e.push(v[0] / r0);
    for i in 1..n {
        e.push((v[i - 1] * v[i]).sqrt());
    }
    let r1 = if n > 1 {
        (v[n - 1] / v[n - 2]).sqrt()
    } else {
        2.0
    };
    e.push(v[n - 1] * r1);
    e
}

/// A sequential dark-blue → green → yellow scale (viridis-like) for `t ∈ [0, 1]`.
fn sequential(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f) as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn draw_categorical<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &CategoricalHeat,
) -> Result<(), SynthError> {
    let (lo, hi) = h.range;
    let scale = |v: f64| (v - lo) / (hi - lo);
    let text = |s: &str, x: i32, y: i32, size: u32, c: &RGBColor| {
        area.draw(&Text::new(
            s.to_string(),
            (x, y),
            (FONT, size).into_font().color(c),
        ))
        .map_err(perr)
    };
    text(&h.title, 12, 10, 18, &BLACK)?;
    let (x0, y0) = (CAT_LABEL_W as i32, CAT_TOP as i32);
    let (cw, ch) = (CAT_CELL_W as i32, CAT_CELL_H as i32);
    for (r, label) in h.row_labels.iter().enumerate() {
        text(label, 8, y0 + r as i32 * ch + 5, 13, &BLACK)?;
    }
    for (c, label) in h.col_labels.iter().enumerate() {
        for (k, line) in label.split('|').enumerate() {
            text(
                line,
                x0 + c as i32 * cw + 4,
                y0 + h.row_labels.len() as i32 * ch + 4 + 15 * k as i32,
                12,
                &BLACK,
            )?;
        }
    }
    for ((r, c), &v) in h.z.indexed_iter() {
        {
            let (x, y) = (x0 + c as i32 * cw, y0 + r as i32 * ch);
            let t = scale(v);
            area.draw(&Rectangle::new(
                [(x, y), (x + cw - 1, y + ch - 1)],
                sequential(t).filled(),
            ))
            .map_err(perr)?;
            let ink = if t > 0.6 { BLACK } else { WHITE };
            let s = if v.is_finite() {
                format!("{v:.1}")
            } else {
                "—".into()
            };
            text(&s, x + 12, y + 5, 12, &ink)?;
        }
    }
    // Color bar.
    let bx = x0 + h.col_labels.len() as i32 * cw + 24;
    let rows = h.row_labels.len() as i32 * ch;
    let steps = 64;
    for i in 0..steps {
        let t0 = i as f64 / steps as f64;
        let yb = y0 + rows - (t0 * rows as f64) as i32;
        let yt = y0 + rows - ((t0 + 1.0 / steps as f64) * rows as f64) as i32;
        area.draw(&Rectangle::new(
            [(bx, yt), (bx + 18, yb)],
            sequential(t0 + 0.5 / steps as f64).filled(),
        ))
        .map_err(perr)?;
    }
    text(&format!("{hi:.0}"), bx + 22, y0 - 4, 12, &BLACK)?;
    text(&format!("{lo:.0}"), bx + 22, y0 + rows - 10, 12, &BLACK)?;
    text(&h.z_label, bx - 10, y0 + rows + 8, 12, &BLACK)?;
    Ok(())
}

fn draw_heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    h: &Heat,
) -> Result<(), SynthError> {
    let (main, bar) = root.split_horizontally(root.dim_in_pixel().0 - 130);
    let (ex, ey) = (edges(&h.xs), edges(&h.ys));
    let vmax =
        h.z.iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(1e-12);
    let mut c = ChartBuilder::on(&main)
        .caption(&h.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (ex[0]..ex[ex.len() - 1]).log_scale(),
            (ey[0]..ey[ey.len() - 1]).log_scale(),
        )
        .map_err(perr)?;
    c.configure_mesh()
        .disable_mesh()
        .x_desc(h.x_label.as_str())
        .y_desc(h.y_label.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&|v| fmt_tick(*v, true))
        .y_label_formatter(&|v| fmt_tick(*v, true))
        .draw()
        .map_err(perr)?;
    let mut cells = Vec::new();
    for ((iy, ix), &v) in h.z.indexed_iter() {
        cells.push(Rectangle::new(
            [(ex[ix], ey[iy]), (ex[ix + 1], ey[iy + 1])],
            diverging(v / vmax).filled(),
        ));
    }
    c.draw_series(cells).map_err(perr)?;
    let mut marks = Vec::new();
    for ((iy, ix), &m) in h.mark.indexed_iter() {
        if m {
            marks.push((h.xs[ix], h.ys[iy]));
        }
    }
    c.draw_series(
        marks
            .into_iter()
            .map(|q| Cross::new(q, 4, BLACK.stroke_width(1))),
    )
    .map_err(perr)?
    .label(h.mark_label.as_str())
    .legend(|(x, y)| Cross::new((x + 10, y), 4, BLACK.stroke_width(1)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.5))
        .draw()
        .map_err(perr)?;
    // Color bar.
    let mut b = ChartBuilder::on(&bar)
        .margin_top(44)
        .margin_bottom(60)
        .margin_right(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..1.0, -vmax..vmax)
        .map_err(perr)?;
    b.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(h.z_label.as_str())
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(perr)?;
    let steps = 100;
    b.draw_series((0..steps).map(|i| {
        let a = -vmax + 2.0 * vmax * i as f64 / steps as f64;
        let z = -vmax + 2.0 * vmax * (i + 1) as f64 / steps as f64;
        Rectangle::new(
            [(0.0, a), (1.0, z)],
            diverging((a + z) / 2.0 / vmax).filled(),
        )
    }))
    .map_err(perr)?;
    Ok(())
}
