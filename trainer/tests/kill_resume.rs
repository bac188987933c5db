//! A training run killed with SIGKILL at random moments, and resumed each time, ends with the
//! metrics and weights of an uninterrupted run (issue 11). The kill moments come from a seeded
//! RNG: a delay drawn in `[0, 0.6 T)` (T the uninterrupted run's wall time), or the moment a
//! checkpoint is being written (its `.checkpoint-N.tmp` directory exists). Whatever moment a
//! kill lands, the next start resumes from the last complete checkpoint (or starts afresh,
//! with `--overwrite-output-dir`, when none was written) and the assertion holds; only how
//! many kills land mid-write varies, and it is printed, not asserted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::init::{arch_config, init_checkpoint, ModelSize, BUILTIN_CORPUS};
use difinfo_trainer::train::checkpoint::latest_checkpoint;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_difinfo-train");
/// Kills before the run is let finish.
const KILLS: usize = 8;
const STEPS: &str = "14";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

use common::metrics_without_timing as metrics;

fn fresh_args(model: &Path, run: &Path) -> Vec<String> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/example_prefs.jsonl");
    [
        "dpo",
        "--model",
        s(model),
        "--data",
        s(&data),
        "--output-dir",
        s(run),
        "--max-steps",
        STEPS,
        // 9 steps an epoch: a new data order after step 9.
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "cosine",
        "--warmup-steps",
        "2",
        // Logging every 2 steps and saving every 3: checkpoints hold pending metric sums.
        "--logging-steps",
        "2",
        "--save-steps",
        "3",
        "--max-length",
        "96",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn mid_write(run: &Path) -> bool {
    std::fs::read_dir(run).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".checkpoint-") && n.ends_with(".tmp")
        })
    })
}

#[test]
fn sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_checkpoint(
        &model,
        arch_config(ModelSize::Tiny, Architecture::Llama),
        BUILTIN_CORPUS,
        0,
    )
    .unwrap();
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let o = Command::new(BIN)
        .args(fresh_args(&model, &reference))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let whole = t0.elapsed();

    let run: PathBuf = tmp.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut kills, mut during_write, mut starts) = (0, 0, 0);
    loop {
        let args = match latest_checkpoint(&run).unwrap() {
            Some(_) => vec!["dpo".to_string(), "--resume".into(), s(&run).into()],
            None => {
                let mut a = fresh_args(&model, &run);
                a.push("--overwrite-output-dir".into());
                a
            }
        };
        starts += 1;
        let mut child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if kills == KILLS {
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            break;
        }
        let at_write = rng.gen_bool(0.5);
        let delay = whole.mul_f64(rng.gen_range(0.0..0.6));
        let start = Instant::now();
        let finished = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            let due = if at_write {
                mid_write(&run) || start.elapsed() > whole * 4
            } else {
                start.elapsed() >= delay
            };
            if due {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        match finished {
            Some(st) => {
                let o = child.wait_with_output().unwrap();
                assert!(st.success(), "{}", String::from_utf8_lossy(&o.stderr));
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL on Unix
                child.wait().unwrap();
                kills += 1;
                if mid_write(&run) {
                    during_write += 1;
                }
            }
        }
    }
    eprintln!(
        "{kills} SIGKILLs ({during_write} during a checkpoint write) over {starts} starts; \
         uninterrupted run {:.2} s",
        whole.as_secs_f64()
    );
    assert_eq!(metrics(&run), metrics(&reference));
    let last = format!("checkpoint-{STEPS}/model.safetensors");
    assert!(
        std::fs::read(run.join(&last)).unwrap() == std::fs::read(reference.join(&last)).unwrap(),
        "final weights differ"
    );
}
