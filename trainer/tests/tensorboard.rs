//! `--report-to tensorboard` end to end: a `dpo` run's event files parsed back here (TFRecord
//! framing, both masked CRC-32Cs, the `Event` protobuf fields) and every scalar checked
//! against metrics.jsonl; a resumed run writes a second file. The same check through the
//! `tensorboard` package's own reader is `trainer/scripts/check_tensorboard.py`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{difinfo_train as run, tiny_model};
use difinfo_trainer::train::tensorboard::masked_crc32c;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One decoded event: wall time, step, and its content.
#[derive(Debug)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    /// `(tag, simple_value)` of a scalar summary; `(tag, text)` of a text one.
    scalars: Vec<(String, f32)>,
    texts: Vec<(String, String)>,
}

/// A protobuf field: number and value (varint, fixed 64 or 32 bits, or bytes).
enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

fn fields(b: &[u8]) -> Vec<(u64, Wire<'_>)> {
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let key = varint(b, &mut i);
        let w = match key & 7 {
            0 => Wire::Varint(varint(b, &mut i)),
            1 => {
                i += 8;
                Wire::Fixed64(b[i - 8..i].try_into().unwrap())
            }
            5 => {
                i += 4;
                Wire::Fixed32(b[i - 4..i].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                Wire::Bytes(&b[i - n..i])
            }
            t => panic!("wire type {t}"),
        };
        out.push((key >> 3, w));
    }
    out
}

fn bytes<'a>(f: &[(u64, Wire<'a>)], n: u64) -> Vec<&'a [u8]> {
    f.iter()
        .filter_map(|(k, w)| match w {
            Wire::Bytes(b) if *k == n => Some(*b),
            _ => None,
        })
        .collect()
}

fn decode(data: &[u8]) -> Event {
    let f = fields(data);
    let mut e = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
        texts: Vec::new(),
    };
    for (k, w) in &f {
        match (k, w) {
            (1, Wire::Fixed64(b)) => e.wall_time = f64::from_le_bytes(*b),
            (2, Wire::Varint(v)) => e.step = *v as i64,
            (3, Wire::Bytes(b)) => e.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
            _ => {}
        }
    }
    for summary in bytes(&f, 5) {
        for value in bytes(&fields(summary), 1) {
            let v = fields(value);
            let tag = String::from_utf8(bytes(&v, 1)[0].to_vec()).unwrap();
            for (k, w) in &v {
                if let (2, Wire::Fixed32(b)) = (k, w) {
                    e.scalars.push((tag.clone(), f32::from_le_bytes(*b)));
                }
            }
            if let Some(tensor) = bytes(&v, 8).first() {
                let t = fields(tensor);
                let plugin = fields(bytes(&fields(bytes(&v, 9)[0]), 1)[0]);
                assert_eq!(bytes(&plugin, 1)[0], b"text");
                assert!(t
                    .iter()
                    .any(|(k, w)| *k == 1 && matches!(w, Wire::Varint(7))));
                let text = String::from_utf8(bytes(&t, 8)[0].to_vec()).unwrap();
                e.texts.push((tag.clone(), text));
            }
        }
    }
    e
}

/// The events of a file, each record's framing and both CRCs checked.
fn read_events(path: &Path) -> Vec<Event> {
    let b = std::fs::read(path).unwrap();
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let len_bytes = &b[i..i + 8];
        let n = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(len_bytes), "length CRC at byte {i}");
        let data = &b[i + 12..i + 12 + n];
        let crc = u32::from_le_bytes(b[i + 12 + n..i + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(data), "data CRC at byte {i}");
        out.push(decode(data));
        i += 16 + n;
    }
    out
}

/// The event files under `run/runs/*/`, sorted by name.
fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(run.join("runs")).unwrap() {
        let d = d.unwrap().path();
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            if f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .contains("tfevents")
            {
                v.push(f);
            }
        }
    }
    v.sort();
    v
}

/// Each step's `train/<key>` scalars of all the run's event files.
type Scalars = BTreeMap<i64, BTreeMap<String, f32>>;

fn check_file(path: &Path, scalars: &mut Scalars) {
    let events = read_events(path);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].wall_time > 1.5e9);
    let (tag, args) = &events[1].texts[0];
    assert_eq!(tag, "args/text_summary");
    let args: serde_json::Value = serde_json::from_str(args).unwrap();
    assert_eq!(args["report_to"], "tensorboard");
    for e in &events[2..] {
        assert!(e.texts.is_empty() && e.file_version.is_none());
        for (t, v) in &e.scalars {
            scalars.entry(e.step).or_default().insert(t.clone(), *v);
        }
    }
}

/// metrics.jsonl's records as TensorBoard holds them: `train/<key>` at `step`, f32.
fn expected(run: &Path) -> Scalars {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = Scalars::new();
    for l in text.lines() {
        let r: serde_json::Map<String, serde_json::Value> = serde_json::from_str(l).unwrap();
        let step = r["step"].as_i64().unwrap();
        let m = out.entry(step).or_default();
        for (k, v) in r.iter().filter(|(k, _)| *k != "step") {
            m.insert(
                format!("train/{k}"),
                v.as_f64().map_or(f32::NAN, |x| x as f32),
            );
        }
    }
    out
}

fn dpo(model: &Path, dir: &Path, steps: &str) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl");
    let o = run(&[
        "dpo",
        "--model",
        s(model),
        "--data",
        s(&data),
        "--output-dir",
        s(dir),
        "--max-steps",
        steps,
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--save-steps",
        "3",
        "--max-length",
        "96",
        "--report-to",
        "tensorboard",
    ]);
    assert!(o.status.success());
}

#[test]
fn event_files_hold_every_logged_metric_and_resume_adds_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("dpo");
    dpo(&model, &dir, "3");
    let files = event_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let mut got = Scalars::new();
    check_file(&files[0], &mut got);
    let want = expected(&dir);
    assert_eq!(want.len(), 3);
    for key in ["train/loss", "train/rewards/chosen", "train/learning_rate"] {
        assert!(want[&1].contains_key(key), "{key}");
    }
    assert_eq!(got, want);

    let o = run(&["dpo", "--resume", s(&dir), "--max-steps", "5"]);
    assert!(o.status.success());
    let files = event_files(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let mut got = Scalars::new();
    for f in &files {
        check_file(f, &mut got);
    }
    let want = expected(&dir);
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    // Timing aside (tokens/s differs run to run), the events equal metrics.jsonl.
    let strip = |m: Scalars| -> Scalars {
        m.into_iter()
            .map(|(k, mut v)| {
                v.remove("train/tokens_per_second");
                (k, v)
            })
            .collect()
    };
    assert_eq!(strip(got), strip(want));
}

#[test]
fn report_to_none_writes_no_event_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dir = tmp.path().join("sft");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl");
    let o = run(&[
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output-dir",
        s(&dir),
        "--max-steps",
        "1",
        "--max-length",
        "96",
    ]);
    assert!(o.status.success());
    assert!(dir.join("metrics.jsonl").exists());
    assert!(!dir.join("runs").exists());
}
