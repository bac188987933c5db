//! What an experiment produces (tables, figures, JSON records, checks) and how it reaches the
//! disk (through [`super::files`]: a reader never sees half a file).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::files::{write_atomic, write_json};
use super::plot::Figure;
use super::SynthError;

/// One cell of a table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Cell {
    /// A label.
    Text(String),
    /// An integer (step, count).
    Int(i64),
    /// A float.
    Num(f64),
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::Text(s.to_string())
    }
}
impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::Text(s)
    }
}
impl From<f64> for Cell {
    fn from(x: f64) -> Self {
        Cell::Num(x)
    }
}
impl From<usize> for Cell {
    fn from(x: usize) -> Self {
        Cell::Int(x as i64)
    }
}
impl From<bool> for Cell {
    fn from(x: bool) -> Self {
        Cell::Int(i64::from(x))
    }
}

/// A series table, written as `<name>.csv`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// File stem.
    pub name: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows, each as long as the header.
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    /// An empty table with these columns.
    pub fn new(name: &str, header: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Append a row.
    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.header.len(), "row width of {}", self.name);
        self.rows.push(row);
    }

    /// CSV text (floats in Rust's shortest round-trip form; text quoted when needed).
    pub fn to_csv(&self) -> String {
        let mut s = self.header.join(",");
        s.push('\n');
        for row in &self.rows {
            let cells: Vec<String> = row
                .iter()
                .map(|c| match c {
                    Cell::Text(t) if t.contains([',', '"', '\n']) => {
                        format!("\"{}\"", t.replace('"', "\"\""))
                    }
                    Cell::Text(t) => t.clone(),
                    Cell::Int(i) => i.to_string(),
                    Cell::Num(x) => format!("{x:e}"),
                })
                .collect();
            let _ = writeln!(s, "{}", cells.join(","));
        }
        s
    }

    /// The table as JSON with every float rounded to 6 significant digits (for snapshots).
    pub fn rounded(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                Value::Array(
                    r.iter()
                        .map(|c| match c {
                            Cell::Num(x) => round6(*x),
                            other => serde_json::to_value(other).expect("cell"),
                        })
                        .collect(),
                )
            })
            .collect();
        serde_json::json!({ "name": self.name, "header": self.header, "rows": rows })
    }
}

/// Magnitudes below this are written as 0 in snapshots: a JS or a loss gradient computed in
/// `f64` over `N ≤ 10^3` outcomes has a rounding floor of about `N · 2^-53 ≈ 1e-13`, so the
/// digits below it change with any reordering of a sum and carry no information.
pub const SNAPSHOT_FLOOR: f64 = 1e-13;

/// `x` rounded to 6 significant digits, as a JSON number (`null` for NaN or ±∞, 0 below
/// [`SNAPSHOT_FLOOR`]).
pub fn round6(x: f64) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    if x.abs() < SNAPSHOT_FLOOR {
        return serde_json::json!(0.0);
    }
    let r: f64 = format!("{x:.5e}").parse().expect("float");
    serde_json::json!(r)
}

/// Every float of a JSON value rounded to 6 significant digits.
pub fn round_json(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => round6(n.as_f64().expect("f64")),
        Value::Array(a) => Value::Array(a.iter().map(round_json).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), round_json(v))).collect())
        }
        other => other.clone(),
    }
}

/// Whether a prediction of the paper held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It held.
    Held,
    /// It did not (the check's note says why).
    Failed,
    /// It held in part (the note says where).
    Partly,
    /// The paper makes no prediction; the number is reported.
    Reported,
}

impl Verdict {
    /// `Held` when `ok`, else `Failed`.
    pub fn of(ok: bool) -> Self {
        if ok {
            Verdict::Held
        } else {
            Verdict::Failed
        }
    }

    /// The word in `summary.md`.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::Failed => "**did not hold**",
            Verdict::Partly => "partly",
            Verdict::Reported => "reported (no prediction)",
        }
    }
}

/// One row of an experiment's table in `summary.md`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// The paper's prediction.
    pub prediction: String,
    /// What was measured.
    pub measured: String,
    /// Whether it held.
    pub verdict: Verdict,
    /// Why (especially where it did not hold).
    pub note: String,
}

impl Check {
    /// A row.
    pub fn new(prediction: &str, measured: String, verdict: Verdict, note: &str) -> Self {
        Self {
            prediction: prediction.to_string(),
            measured,
            verdict,
            note: note.to_string(),
        }
    }
}

/// Everything one experiment produces, before it is written.
#[derive(Debug, Clone)]
pub struct ExperimentOutput {
    /// The experiment's name (`did-fit`, …).
    pub name: &'static str,
    /// One-line description (the table heading in `summary.md`).
    pub title: String,
    /// Series tables (`<name>.csv`).
    pub tables: Vec<Table>,
    /// Figures (`<name>.png`, `<name>.svg`).
    pub figures: Vec<Figure>,
    /// `instance.json`.
    pub instance: Value,
    /// `final_logits.json`: the final learned logits of each run.
    pub final_logits: Value,
    /// This experiment's section of `summary.json`.
    pub summary: Value,
    /// This experiment's rows of `summary.md`.
    pub checks: Vec<Check>,
    /// The settings used (recorded in `result.json`).
    pub settings: Value,
}

impl ExperimentOutput {
    /// The data for a snapshot: tables, summary and verdicts, floats rounded to 6 digits and
    /// magnitudes below [`SNAPSHOT_FLOOR`] written as 0 (figures, instance and logits are derived
    /// from or feed into these, and are left out).
    pub fn snapshot(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "settings": round_json(&self.settings),
            "summary": round_json(&self.summary),
            "verdicts": self.checks.iter().map(|c| c.verdict).collect::<Vec<_>>(),
            "tables": self.tables.iter().map(Table::rounded).collect::<Vec<_>>(),
        })
    }

    /// Write everything under `dir/<name>/`; returns the paths written.
    ///
    /// # Errors
    /// [`SynthError::Io`], [`SynthError::Plot`].
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, SynthError> {
        let d = dir.join(self.name);
        fs::create_dir_all(&d).map_err(|e| SynthError::io(&d, e))?;
        let mut written = Vec::new();
        for t in &self.tables {
            let p = d.join(format!("{}.csv", t.name));
            write_atomic(&p, t.to_csv().as_bytes())?;
            written.push(p);
        }
        for f in &self.figures {
            written.extend(f.write(&d)?);
        }
        for (file, v) in [
            ("instance.json", &self.instance),
            ("final_logits.json", &self.final_logits),
        ] {
            let p = d.join(file);
            write_json(&p, v)?;
            written.push(p);
        }
        let p = d.join("result.json");
        write_json(
            &p,
            &serde_json::json!({
                "name": self.name,
                "title": self.title,
                "settings": self.settings,
                "summary": self.summary,
                "checks": self.checks,
            }),
        )?;
        written.push(p);
        Ok(written)
    }
}
