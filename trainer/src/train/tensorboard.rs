//! TensorBoard event files, as transformers' `TensorBoardCallback` writes them through
//! PyTorch's `SummaryWriter` (`--report-to tensorboard`).
//!
//! Where: `<output_dir>/runs/<%b%d_%H-%M-%S>_<host>/events.out.tfevents.<secs>.<host>.<pid>.0`
//! ([`run_dir`], HF's `default_logdir` with the time in UTC). A resumed run starts a new
//! directory and file, as a new `SummaryWriter` does.
//!
//! What: first an `Event{file_version: "brain.Event:2"}`; then the run's options as the text
//! summary `args/text_summary` (HF's `add_text("args", args.to_json_string())`); then at each
//! logging step one `Event{wall_time, step, summary{value{tag, simple_value}}}` per metric,
//! tagged as HF's `rewrite_logs` names them (`train/loss`, `train/rewards/chosen`,
//! `train/learning_rate`, `train/grad_norm`, `train/epoch`, …: `train/` + the metrics.jsonl key;
//! `step` is the event's step, not a scalar). Only rank 0 writes, and the file is flushed after
//! each logging step, so a killed run's events survive.
//!
//! The framing is TFRecord's: for each record
//!
//! ```text
//! u64 length (little-endian) · u32 masked_crc32c(length bytes) · data · u32 masked_crc32c(data)
//! masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2³²),  c = CRC-32C(x)
//! ```
//!
//! with CRC-32C the Castagnoli CRC (polynomial 0x1EDC6F41, reflected; RFC 3720 §B.4) and the
//! data an `Event` protobuf, encoded here for the few fields written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// HF's `report_to`: where a run's logged metrics go besides metrics.jsonl and metrics.csv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ReportTo {
    /// Nowhere else (HF's default `"none"`).
    #[default]
    None,
    /// TensorBoard event files under `<output_dir>/runs/`.
    Tensorboard,
    /// Every integration this build has: TensorBoard.
    All,
}

impl ReportTo {
    /// Whether TensorBoard event files are written.
    pub fn tensorboard(self) -> bool {
        matches!(self, ReportTo::Tensorboard | ReportTo::All)
    }
}

/// The `file_version` of the first event, as TensorFlow and PyTorch write it.
pub const FILE_VERSION: &str = "brain.Event:2";

/// The event file of one run: records appended, flushed after each logging step.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it, named as PyTorch names one
    /// (`events.out.tfevents.<secs>.<host>.<pid>.0`), holding the `file_version` event.
    ///
    /// # Errors
    /// I/O errors naming the directory or file.
    pub fn create(dir: &Path, host: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = wall_time();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.0",
            now as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            path,
            file: std::io::BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar event per metric of a logged record at its `step` (the record's `step` key
    /// itself is not a scalar), tagged `train/<key>`; then the file is flushed.
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn scalars(&mut self, record: &[(String, f64)]) -> Result<()> {
        let step = record
            .iter()
            .find(|(k, _)| k == "step")
            .map_or(0, |(_, v)| *v as i64);
        let now = wall_time();
        for (k, v) in record.iter().filter(|(k, _)| k != "step") {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, format!("train/{k}").as_bytes());
            // PyTorch's add_scalar stores a float32 `simple_value`.
            put_float(&mut value, 2, *v as f32);
            self.summary_event(now, step, &value)?;
        }
        self.flush()
    }

    /// A text summary `<tag>/text_summary` at step 0, as PyTorch's `add_text` writes one (the
    /// `text` plugin, a one-element string tensor); then the file is flushed.
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn text(&mut self, tag: &str, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin);
        let mut dim = Vec::new();
        put_varint_field(&mut dim, 1, 1);
        let mut shape = Vec::new();
        put_bytes(&mut shape, 2, &dim);
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, DT_STRING);
        put_bytes(&mut tensor, 2, &shape);
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut value = Vec::new();
        put_bytes(&mut value, 1, format!("{tag}/text_summary").as_bytes());
        put_bytes(&mut value, 9, &metadata);
        put_bytes(&mut value, 8, &tensor);
        self.summary_event(wall_time(), 0, &value)?;
        self.flush()
    }

    /// `Event{wall_time, step, summary{value}}` with one encoded `Summary.Value`.
    fn summary_event(&mut self, wall_time: f64, step: i64, value: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, value);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time);
        if step != 0 {
            put_varint_field(&mut event, 2, step as u64);
        }
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Appends one TFRecord ([`frame`]).
    fn record(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame(data))
            .map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// TensorFlow's `DataType` code of strings (`DT_STRING`).
const DT_STRING: u64 = 7;

/// HF's default logging directory under `output_dir` at time `now`:
/// `runs/<%b%d_%H-%M-%S>_<host>` (`runs/Dec07_22-05-09_myhost`), the time in UTC.
pub fn run_dir(output_dir: &Path, now: SystemTime, host: &str) -> PathBuf {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (_, month, day) = civil_from_days(days);
    output_dir.join("runs").join(format!(
        "{}{day:02}_{:02}-{:02}-{:02}_{host}",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

/// The (year, month 1–12, day 1–31) of `days` since 1970-01-01 in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The machine's host name (Python's `socket.gethostname()`): the kernel's, else `$HOSTNAME`,
/// else `localhost`; characters other than ASCII letters, digits, `-` and `.` become `_`.
pub fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Seconds since the Unix epoch, as an event's `wall_time`.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One TFRecord: `u64 len · masked_crc32c(len) · data · masked_crc32c(data)`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC: `((c >> 15) | (c << 17)) + 0xa282ead8` (mod 2³²), `c` =
/// [`crc32c`]`(data)`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and final XOR
/// 0xFFFFFFFF), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `field` of wire type 0 (varint).
fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

/// Field `field` of wire type 1 (64-bit): a double.
fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(out, (u64::from(field) << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Field `field` of wire type 5 (32-bit): a float.
fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_varint(out, (u64::from(field) << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Field `field` of wire type 2 (length-delimited): bytes, a string or a message.
fn put_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720 §B.4's CRC-32C examples, and the check value of "123456789".
    #[test]
    fn crc32c_matches_rfc_3720_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&up), 0x46DD_794E);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&down), 0x113F_DB5C);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn run_dir_names_the_time_as_hf_default_logdir() {
        // 2026-12-07T22:05:09Z
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_796_681_109);
        let d = run_dir(Path::new("out"), t, "host");
        assert_eq!(d, Path::new("out/runs/Dec07_22-05-09_host"));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn varints_encode_as_protobuf() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
