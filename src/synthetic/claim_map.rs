//! `claim-map` — where Claim 4.1 holds. Over a log grid of τ × logit scale `s` (both in
//! [0.1, 10]; τ = 1 is left out, the claim says nothing there) on the tempered instance
//! `f_ref = s z`, `f* = f_ref/τ`:
//!
//! ```text
//! Δ(τ, s) = H(q_{π*/π_ref}) − H(π_ref)
//! holds   ⇔  (τ < 1 and Δ < 0)  or  (τ > 1 and Δ > 0)
//! ```
//!
//! In this model `q ∝ π_ref^{e}` with `e = (1 − τ)/τ`, so `q = softmax(e s z)`: for a symmetric
//! `z` its entropy is below `H(π_ref)` about when `|e| > 1`. Smoothing has `|e| = 1 − 1/τ < 1`
//! (the claim holds); reinforcing has `e > 1` only for `τ < 1/2`: for `1/2 < τ < 1` the DID is
//! *flatter* than `π_ref` and the claim fails. `grid.csv` has every cell, `by_n.csv` the holds
//! fraction for each `N` of `--grid-n` (same grids, scale as the grid), `map.png` the heat map.

use indicatif::ProgressBar;
use ndarray::Array2;
use serde_json::{json, Value};

use crate::did::did;
use crate::entropy::entropy;

use super::instance::{standard_logits, Instance};
use super::output::{Cell, Check, ExperimentOutput, Table, Verdict};
use super::plot::{Figure, Heat};
use super::{fmt, log_grid, SynthConfig, SynthError};

/// `Δ = H(q_{π*/π_ref}) − H(π_ref)` and whether Claim 4.1 holds, on one instance.
///
/// # Errors
/// Library errors.
pub fn claim_cell(z: &[f64], tau: f64, scale: f64, seed: u64) -> Result<(f64, bool), SynthError> {
    let inst = Instance::from_standard_logits(z, tau, 1.0, scale, seed)?;
    let d = entropy(&did(&inst.pi_star, &inst.pi_ref)?) - entropy(&inst.pi_ref);
    Ok((d, if tau < 1.0 { d < 0.0 } else { d > 0.0 }))
}

fn taus(k: usize) -> Vec<f64> {
    log_grid(0.1, 10.0, k)
        .into_iter()
        .filter(|&t| (t - 1.0).abs() > 1e-9)
        .collect()
}

/// The map over scale × τ on `N = --n`.
struct ClaimMap {
    /// `grid.csv`.
    grid: Table,
    /// `Δ` per cell: rows scale s, columns τ (the heat map's y and x).
    zs: Array2<f64>,
    /// The cells where the claim fails.
    marks: Array2<bool>,
    /// Counts: [τ < 1/2, 1/2 < τ < 1, τ > 1] × (holds, total).
    bands: [(usize, usize); 3],
}

impl ClaimMap {
    /// `(cells where the claim holds, cells)`.
    fn held(&self) -> (usize, usize) {
        (self.bands.iter().map(|b| b.0).sum(), self.grid.rows.len())
    }
}

/// Claim 4.1 on every cell of scale `ss` × τ `ts`.
fn claim_map(
    z: &[f64],
    ts: &[f64],
    ss: &[f64],
    seed: u64,
    pb: &ProgressBar,
) -> Result<ClaimMap, SynthError> {
    let mut grid = Table::new("grid", &["tau", "scale", "delta_entropy", "holds"]);
    let mut zs = Array2::<f64>::zeros((ss.len(), ts.len()));
    let mut marks = Array2::from_elem((ss.len(), ts.len()), false);
    let mut bands = [(0usize, 0usize); 3];
    for (iy, &s) in ss.iter().enumerate() {
        for (ix, &t) in ts.iter().enumerate() {
            let (d, holds) = claim_cell(z, t, s, seed)?;
            grid.push(vec![t.into(), s.into(), d.into(), holds.into()]);
            zs[[iy, ix]] = d;
            marks[[iy, ix]] = !holds;
            let b = if t < 0.5 {
                0
            } else if t < 1.0 {
                1
            } else {
                2
            };
            bands[b].0 += usize::from(holds);
            bands[b].1 += 1;
        }
        pb.inc(1);
    }
    Ok(ClaimMap {
        grid,
        zs,
        marks,
        bands,
    })
}

/// The fraction of the cells where the claim holds, for every `N` of `--grid-n`.
fn by_n(
    cfg: &SynthConfig,
    ts: &[f64],
    ss: &[f64],
    pb: &ProgressBar,
) -> Result<(Table, serde_json::Map<String, Value>), SynthError> {
    let mut by_n = Table::new("by_n", &["N", "holds_fraction"]);
    let mut by_n_json = serde_json::Map::new();
    for &n in &cfg.grid_n {
        let zn = standard_logits(n, cfg.seed);
        let mut h = 0usize;
        for &s in ss {
            for &t in ts {
                h += usize::from(claim_cell(&zn, t, s, cfg.seed)?.1);
            }
        }
        let f = h as f64 / (ss.len() * ts.len()) as f64;
        by_n.push(vec![n.into(), f.into()]);
        by_n_json.insert(n.to_string(), json!(f));
        pb.inc(1);
    }
    Ok((by_n, by_n_json))
}

/// `holds / total`, NaN for an empty band.
fn frac(b: (usize, usize)) -> f64 {
    if b.1 == 0 {
        f64::NAN
    } else {
        b.0 as f64 / b.1 as f64
    }
}

/// The verdicts: Claim 4.1 over the map by band of τ, and across N.
fn checks(m: &ClaimMap, by_n: &Table, by_n_json: &serde_json::Map<String, Value>) -> Vec<Check> {
    let (held, cells) = m.held();
    let bands = m.bands;
    let smooth_fail_scale = m
        .grid
        .rows
        .iter()
        .filter_map(|r| match (&r[0], &r[1], &r[3]) {
            (Cell::Num(t), Cell::Num(s), Cell::Int(0)) if *t > 1.0 => Some(*s),
            _ => None,
        })
        .reduce(f64::min);
    let holds_fraction = held as f64 / cells as f64;
    vec![
        Check::new(
            "Claim 4.1: reinforcing (τ < 1) ⇒ H(DID) < H(π_ref); smoothing (τ > 1) ⇒ H(DID) > H(π_ref)",
            format!(
                "holds in {} of {} cells: τ < 1/2 {}, 1/2 < τ < 1 {}, τ > 1 {}",
                fmt(holds_fraction),
                cells,
                fmt(frac(bands[0])),
                fmt(frac(bands[1])),
                fmt(frac(bands[2]))
            ),
            if held == cells {
                Verdict::Held
            } else {
                Verdict::Partly
            },
            &format!(
                "the claim is qualitative; in the tempered model q ∝ π_ref^{{(1−τ)/τ}}, which is \
                 flatter than π_ref for 1/2 < τ < 1: there a reinforcing π* has a high-entropy \
                 DID.{}",
                match smooth_fail_scale {
                    Some(s) => format!(
                        " For τ > 1 it fails only at logit scale ≥ {} with large τ: there \
                         q ≈ π_ref^{{−(1−1/τ)}} concentrates on π_ref's lowest outcomes, and with \
                         finite N the lower tail of z can be more extreme than the upper one",
                        fmt(s)
                    ),
                    None => String::new(),
                }
            ),
        ),
        Check::new(
            "… across N",
            by_n.rows
                .iter()
                .map(|r| match (&r[0], &r[1]) {
                    (Cell::Int(n), Cell::Num(f)) => format!("N={n}: {}", fmt(*f)),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
                .join(", "),
            if by_n_json.values().all(|v| v.as_f64() == Some(1.0)) {
                Verdict::Held
            } else {
                Verdict::Partly
            },
            "the failing band 1/2 < τ < 1 does not shrink with N",
        ),
    ]
}

/// Run the experiment.
///
/// # Errors
/// Library errors.
pub fn run(cfg: &SynthConfig, pb: &ProgressBar) -> Result<ExperimentOutput, SynthError> {
    let ts = taus(cfg.grid_tau);
    let ss = log_grid(0.1, 10.0, cfg.grid_scale);
    let z = standard_logits(cfg.n, cfg.seed);
    let m = claim_map(&z, &ts, &ss, cfg.seed, pb)?;
    let (by_n, by_n_json) = by_n(cfg, &ts, &ss, pb)?;
    let (held, cells) = m.held();
    let summary = json!({
        "holds_fraction": held as f64 / cells as f64,
        "holds_fraction_by_band": {
            "tau_below_half": frac(m.bands[0]),
            "tau_half_to_one": frac(m.bands[1]),
            "tau_above_one": frac(m.bands[2]),
        },
        "holds_fraction_by_n": by_n_json.clone(),
        "cells": cells,
    });
    let checks = checks(&m, &by_n, &by_n_json);
    Ok(ExperimentOutput {
        name: "claim-map",
        title: "Claim 4.1 over τ × logit scale: where H(DID) − H(π_ref) has the claimed sign"
            .into(),
        tables: vec![m.grid, by_n],
        figures: vec![Figure::Heat {
            name: "map".into(),
            heat: Box::new(Heat {
                title: format!("Claim 4.1: H(q_{{π*/π_ref}}) − H(π_ref), N = {}", cfg.n),
                x_label: "τ (f* = f_ref/τ; τ < 1 reinforcing)".into(),
                y_label: "logit scale s (f_ref = s·z)".into(),
                z_label: "H(DID) − H(π_ref) [nats]".into(),
                xs: ts,
                ys: ss,
                z: m.zs,
                mark: m.marks,
                mark_label: "claim fails".into(),
            }),
        }],
        instance: json!({
            "N": cfg.n, "seed": cfg.seed, "standard_logits_z": z,
            "note": "each cell: f_ref = scale·z, f* = f_ref/τ (β does not enter)",
        }),
        final_logits: Value::Object(serde_json::Map::new()),
        summary,
        checks,
        settings: cfg.to_json(),
    })
}
