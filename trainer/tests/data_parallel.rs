//! Data parallelism over MPI (issue 22, item 6): `difinfo-train` under `mpirun -np 2` against
//! one process.
//!
//! - 2 ranks × per-device batch 2 equal 1 rank × batch 4 (accumulation 2, 3 steps, f64): every
//!   logged metric but the timing and the last checkpoint's weights, to [`TOL`] relative, for
//!   DPO (sigmoid), DPO-PG, SFT, the combined loss `sigmoid,bco_pair` and LoRA. The data has 7
//!   examples, so each epoch ends on a short micro-batch of 3 in which rank 1 takes one example.
//! - A 2-rank checkpoint resumes under 1 rank and a 1-rank checkpoint under 2 ranks, ending as
//!   the uninterrupted run; another global batch is refused.
//! - SIGKILL to one rank ends the job in bounded time naming the rank, leaves only complete
//!   checkpoints, and `--resume` finishes the run.
//! - Commands other than `sft`, `dpo` and `bench` refuse to run on two processes.
//!
//! Needs Open MPI's `mpirun` on the PATH (`trainer/scripts/install_mpi.sh`). Every rank runs
//! one rayon thread (`RAYON_NUM_THREADS=1`): CI's machine has two cores.
#![cfg(feature = "mpi")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use difinfo_trainer::train::checkpoint::verify_checksums;

const BIN: &str = env!("CARGO_BIN_EXE_difinfo-train");

/// Relative tolerance of the 2-rank/1-rank comparisons. The two runs differ only in the order
/// of floating-point sums (gradients summed over ranks, metrics weighted by each rank's
/// share); in f64 that is ~1e-14, so 1e-6 fails on any real difference (an example seen twice
/// or missed, a gradient not all-reduced, a rank's loss weighted wrongly) and on nothing else.
const TOL: f64 = 1e-6;

/// The longest a job may take to end after one of its ranks is killed.
const KILL_BOUND: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Echoes a finished command and its output to the test's captured stderr.
fn echo(what: &str, args: &[&str], o: &Output) {
    eprintln!(
        "$ {what} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `mpirun … -np 2 difinfo-train ARGS`, one rayon thread per rank, as a command to run or spawn.
fn mpirun_command(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        "2",
        BIN,
    ])
    .args(args)
    .env("RAYON_NUM_THREADS", "1");
    c
}

/// `difinfo-train ARGS` on two ranks.
fn two(args: &[&str]) -> Output {
    let o = mpirun_command(args).output().unwrap_or_else(|e| {
        panic!("mpirun: {e}; install Open MPI (trainer/scripts/install_mpi.sh)")
    });
    echo("mpirun -np 2 difinfo-train", args, &o);
    o
}

/// `difinfo-train ARGS` as one process (no launcher: world size 1).
fn one(args: &[&str]) -> Output {
    let o = Command::new(BIN).args(args).output().unwrap();
    echo("difinfo-train", args, &o);
    o
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The first 7 pairs of `tests/fixtures/hh_implicit.jsonl` (implicit prompts) in `dir`.
fn prefs(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hh_implicit.jsonl");
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 7, "the fixture has {} pairs", lines.len());
    let out = dir.join("prefs7.jsonl");
    std::fs::write(&out, lines[..7].join("\n") + "\n").unwrap();
    out
}

/// SFT records (`prompt`, `completion`) from the pairs' chosen dialogues: the prompt up to and
/// with the last `Assistant:`, the completion the rest.
fn sft_data(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(prefs(dir)).unwrap();
    let mut s = String::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let chosen = v["chosen"].as_str().unwrap();
        let cut = chosen.rfind("\n\nAssistant:").unwrap() + "\n\nAssistant:".len();
        let (p, c) = chosen.split_at(cut);
        s.push_str(&serde_json::json!({"prompt": p, "completion": c}).to_string());
        s.push('\n');
    }
    let out = dir.join("sft7.jsonl");
    std::fs::write(&out, s).unwrap();
    out
}

use common::metrics_without_timing as metrics;

/// Two values agree: `|a − b| ≤ TOL · max(|a|, |b|) + 1e-12` (the absolute term for values
/// that are zero in exact arithmetic).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * a.abs().max(b.abs()) + 1e-12
}

/// `|a − b| / max(|a|, |b|)` (0 for two zeros).
fn rel(a: f64, b: f64) -> f64 {
    let m = a.abs().max(b.abs());
    if m == 0.0 {
        0.0
    } else {
        (a - b).abs() / m
    }
}

/// One logged value of two runs: its name, step, and the runs' values.
type Pair = (String, String, f64, f64);

/// Every numeric value the two runs logged, side by side, after asserting the same records
/// with the same names (and equal non-numeric values).
fn metric_pairs(a: &Path, b: &Path) -> Vec<Pair> {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "metrics records of {a:?} and {b:?}");
    assert!(!ma.is_empty());
    let mut out = Vec::new();
    for (ra, rb) in ma.iter().zip(&mb) {
        let ka: Vec<&String> = ra.keys().collect();
        let kb: Vec<&String> = rb.keys().collect();
        assert_eq!(ka, kb, "metric names");
        for (k, va) in ra {
            match (va.as_f64(), rb[k].as_f64()) {
                (Some(x), Some(y)) => out.push((k.clone(), ra["step"].to_string(), x, y)),
                _ => assert_eq!(va, &rb[k], "{k}"),
            }
        }
    }
    out
}

/// Asserts every logged value of run `a` [`close`] to run `b`'s; returns the largest relative
/// difference.
fn assert_metrics_equal(a: &Path, b: &Path) -> f64 {
    let mut worst = 0f64;
    for (k, step, x, y) in metric_pairs(a, b) {
        assert!(
            close(x, y),
            "{k} at step {step}: {x} ({a:?}) vs {y} ({b:?}), relative {:.2e}",
            rel(x, y)
        );
        worst = worst.max(rel(x, y));
    }
    worst
}

/// The weights file of a checkpoint: the LoRA adapter when there is one, else the model.
fn weights_file(ckpt: &Path) -> PathBuf {
    let adapter = ckpt.join("adapter_model.safetensors");
    if adapter.exists() {
        adapter
    } else {
        ckpt.join("model.safetensors")
    }
}

/// `max |a − b| / max |a|` for each tensor of two checkpoints' weights (by name), after
/// asserting the same names and shapes.
fn weight_diffs(a: &Path, b: &Path) -> Vec<(String, f64)> {
    let load = |p: &Path| -> BTreeMap<String, Tensor> {
        let f = weights_file(p);
        candle_core::safetensors::load(&f, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{f:?}: {e}"))
            .into_iter()
            .collect()
    };
    let (wa, wb) = (load(a), load(b));
    assert_eq!(
        wa.keys().collect::<Vec<_>>(),
        wb.keys().collect::<Vec<_>>(),
        "tensor names of {a:?} and {b:?}"
    );
    wa.iter()
        .map(|(name, ta)| {
            let tb = &wb[name];
            assert_eq!(ta.dims(), tb.dims(), "{name}");
            let (ta, tb) = (
                ta.to_dtype(DType::F64).unwrap(),
                tb.to_dtype(DType::F64).unwrap(),
            );
            let diff = common::max_abs(&(&ta - &tb).unwrap());
            let scale = common::max_abs(&ta);
            let e = if diff == 0.0 { 0.0 } else { diff / scale };
            (name.clone(), e)
        })
        .collect()
}

/// Asserts every tensor of checkpoint `a` within [`TOL`] (relative to its largest value) of
/// checkpoint `b`'s; returns the largest relative difference.
fn assert_weights_equal(a: &Path, b: &Path) -> f64 {
    let mut worst = 0f64;
    for (name, e) in weight_diffs(a, b) {
        assert!(e <= TOL, "{name}: {a:?} vs {b:?}, relative {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

/// The largest relative change of any tensor between two checkpoints.
fn max_weight_change(a: &Path, b: &Path) -> f64 {
    weight_diffs(a, b)
        .into_iter()
        .map(|(_, e)| e)
        .fold(0.0, f64::max)
}

/// Sequences of at most 128 tokens, prompts cut to their last 64: all 7 pairs are kept (whole
/// prompts at 128 tokens would drop 3, and 4 examples make one global micro-batch that any
/// split over the ranks covers).
const LENGTHS: &[&str] = &[
    "--max-length",
    "128",
    "--max-prompt-length",
    "64",
    "--truncation-mode",
    "keep-end",
];

/// The options of the equivalence runs: 3 steps of 2 accumulated micro-batches, f64 weights.
const EQUIVALENCE: &[&str] = &[
    "--max-steps",
    "3",
    "--learning-rate",
    "1e-3",
    "--logging-steps",
    "1",
    "--seed",
    "3",
    "--gradient-accumulation-steps",
    "2",
    "--dtype",
    "f64",
];

/// Asserts that a run kept all 7 examples of the data (its output says so).
fn kept_all(o: &Output) {
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("7 records, 7 kept"),
        "not all 7 examples kept:\n{text}"
    );
}

/// `COMMAND` (`extra` options) on one process with per-device batch `one_batch` into
/// `dir/one`, and on two ranks with per-device batch 2 into `dir/two`, saving every step.
fn run_pair(dir: &Path, command: &str, data: &Path, extra: &[&str], one_batch: &str) {
    let model = common::tiny_model(dir);
    let args = |batch: &str, out: &Path| -> Vec<String> {
        [command, "--model", s(&model), "--data", s(data)]
            .into_iter()
            .chain(EQUIVALENCE.iter().copied())
            .chain(LENGTHS.iter().copied())
            .chain(extra.iter().copied())
            .chain([
                "--save-steps",
                "1",
                "--per-device-train-batch-size",
                batch,
                "--output-dir",
                s(out),
            ])
            .map(String::from)
            .collect()
    };
    kept_all(&ok(one(&strs(&args(one_batch, &dir.join("one"))))));
    kept_all(&ok(two(&strs(&args("2", &dir.join("two"))))));
}

/// `COMMAND` on one process with batch 4 and on two ranks with batch 2 (each with `extra`
/// options): asserts that training moved the weights, that the 2-rank run logged one record a
/// step (only rank 0 writes), and equal metrics and final weights; prints the largest
/// differences.
fn one_rank_equals_two(command: &str, data_of: fn(&Path) -> PathBuf, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_of(tmp.path());
    run_pair(tmp.path(), command, &data, extra, "4");
    let (d1, d2) = (tmp.path().join("one"), tmp.path().join("two"));

    // Equal weights say nothing about weights that did not move.
    let moved = max_weight_change(&d1.join("checkpoint-1"), &d1.join("checkpoint-3"));
    assert!(
        moved > 1e3 * TOL,
        "steps 1 to 3 changed the weights by {moved:.2e}"
    );
    let steps: Vec<u64> = metrics(&d2)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        [1, 2, 3],
        "one metrics record a step, from rank 0 only"
    );
    let m = assert_metrics_equal(&d1, &d2);
    let w = assert_weights_equal(&d1.join("checkpoint-3"), &d2.join("checkpoint-3"));
    println!(
        "{command} {extra:?}: metrics within {m:.2e}, weights within {w:.2e} (relative); \
         steps 1 to 3 moved the weights by {moved:.2e}"
    );
}

#[test]
fn dpo_sigmoid_two_ranks_equal_one_with_twice_the_batch() {
    one_rank_equals_two("dpo", prefs, &[]);
}

#[test]
fn dpo_pg_two_ranks_project_the_global_gradients() {
    one_rank_equals_two("dpo", prefs, &["--objective", "dpo-pg"]);
}

#[test]
fn sft_two_ranks_equal_one_with_twice_the_batch() {
    one_rank_equals_two("sft", sft_data, &[]);
}

#[test]
fn combined_loss_two_ranks_equal_one_with_twice_the_batch() {
    one_rank_equals_two(
        "dpo",
        prefs,
        &["--loss-type", "sigmoid,bco_pair", "--loss-weights", "1,0.5"],
    );
}

#[test]
fn lora_two_ranks_equal_one_with_twice_the_batch() {
    one_rank_equals_two("dpo", prefs, &["--use-peft", "--lora-dropout", "0"]);
}

/// The comparison tells runs apart: 2 ranks × 2 against 1 rank × 2 (half the global batch)
/// differ beyond [`TOL`] in the metrics and the weights.
#[test]
fn another_global_batch_is_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prefs(tmp.path());
    run_pair(tmp.path(), "dpo", &data, &[], "2");
    let (d1, d2) = (tmp.path().join("one"), tmp.path().join("two"));
    let apart: Vec<String> = metric_pairs(&d1, &d2)
        .into_iter()
        .filter(|(_, _, x, y)| !close(*x, *y))
        .map(|(k, step, _, _)| format!("{k}@{step}"))
        .collect();
    assert!(apart.iter().any(|k| k.starts_with("loss@")), "{apart:?}");
    let w = max_weight_change(&d1.join("checkpoint-3"), &d2.join("checkpoint-3"));
    assert!(w > TOL, "weights within {w:.2e}");
    println!(
        "1 × 2 vs 2 × 2: {} values apart, weights apart by {w:.2e}",
        apart.len()
    );
}

/// A fresh DPO run of `steps` steps saving every 2, constant schedule (a shorter run has the
/// schedule of a longer one), with per-device batch `batch`.
fn resume_args(model: &Path, data: &Path, out: &Path, steps: &str, batch: &str) -> Vec<String> {
    [
        "dpo",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output-dir",
        s(out),
        "--max-steps",
        steps,
        "--per-device-train-batch-size",
        batch,
        "--save-steps",
        "2",
        "--lr-scheduler-type",
        "constant",
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--seed",
        "3",
        "--dtype",
        "f64",
    ]
    .iter()
    .chain(LENGTHS)
    .map(|x| x.to_string())
    .collect()
}

/// A temporary directory with the tiny model and the 7 pairs in it: `(dir, model, data)`.
fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path());
    let data = prefs(tmp.path());
    (tmp, model, data)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn checkpoints_resume_under_another_world_size() {
    let (tmp, model, data) = fixture();
    let straight = tmp.path().join("straight");
    ok(one(&strs(&resume_args(&model, &data, &straight, "4", "4"))));

    type Launch = fn(&[&str]) -> Output;
    // Written by 2 ranks × 2 and resumed by 1 process × 4, and the reverse.
    let ways: [(&str, Launch, &str, Launch, &str); 2] = [
        ("from-two", two, "2", one, "4"),
        ("from-one", one, "4", two, "2"),
    ];
    for (name, first, first_batch, then, then_batch) in ways {
        let run = tmp.path().join(name);
        ok(first(&strs(&resume_args(
            &model,
            &data,
            &run,
            "2",
            first_batch,
        ))));
        ok(then(&[
            "dpo",
            "--resume",
            s(&run),
            "--max-steps",
            "4",
            "--per-device-train-batch-size",
            then_batch,
        ]));
        let m = assert_metrics_equal(&straight, &run);
        let w = assert_weights_equal(&straight.join("checkpoint-4"), &run.join("checkpoint-4"));
        println!("{name}: metrics within {m:.2e}, weights within {w:.2e}");
    }
}

/// The tensors of a safetensors file by name, in f64.
fn tensors(f: &Path) -> BTreeMap<String, Vec<f64>> {
    candle_core::safetensors::load(f, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{f:?}: {e}"))
        .into_iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (k, v.to_vec1::<f64>().unwrap())
        })
        .collect()
}

/// ZeRO stage 1 takes stage 0's steps bit for bit: the gradient norm and DPO-PG's inner
/// products are sums of the same per-variable values in the same order, the sharded update is
/// the same arithmetic, and the checkpoint gathers the whole optimizer state (so the files of
/// any world size resume it). Asserted exactly, for AdamW with DPO and RMSprop with DPO-PG.
#[test]
fn zero_stage_1_takes_the_steps_of_stage_0() {
    for extra in [
        &["--optim", "adamw"][..],
        &["--objective", "dpo-pg", "--optim", "rmsprop"],
    ] {
        let (tmp, model, data) = fixture();
        let run = |stage: &str| -> PathBuf {
            let out = tmp.path().join(format!("zero{stage}"));
            let args: Vec<&str> = ["dpo", "--model", s(&model), "--data", s(&data)]
                .into_iter()
                .chain(EQUIVALENCE.iter().copied())
                .chain(LENGTHS.iter().copied())
                .chain(extra.iter().copied())
                .chain(["--per-device-train-batch-size", "2", "--zero-stage", stage])
                // 1 MiB buckets: the 4 MiB of gradients take several (the default 25 MiB, one).
                .chain(["--ddp-bucket-cap-mb", "1"])
                .chain(["--output-dir", s(&out)])
                .collect();
            kept_all(&ok(two(&args)));
            out
        };
        let (z0, z1) = (run("0"), run("1"));
        for (k, step, x, y) in metric_pairs(&z0, &z1) {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "{extra:?}: {k} at step {step}: {x} vs {y}"
            );
        }
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let (a, b) = (
                tensors(&z0.join("checkpoint-3").join(file)),
                tensors(&z1.join("checkpoint-3").join(file)),
            );
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (name, va) in &a {
                assert!(va == &b[name], "{extra:?}: {file}: `{name}` differs");
            }
        }
        println!("{extra:?}: ZeRO-1 equals stage 0 bit for bit (metrics, weights, optimizer)");
    }
}

#[test]
fn resume_with_another_global_batch_is_refused() {
    let (tmp, model, data) = fixture();
    let run = tmp.path().join("run");
    ok(one(&strs(&resume_args(&model, &data, &run, "2", "4"))));
    // 2 ranks × 4 = 8 examples per micro-batch where the checkpoint's run took 4.
    let o = two(&[
        "dpo",
        "--resume",
        s(&run),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "4",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("per-device batch × world size") && err.contains("4 × 2 = 8"),
        "{err}"
    );
}

/// The process ids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The MPI rank of process `pid` (`OMPI_COMM_WORLD_RANK` in its environment), if readable.
fn mpi_rank(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        std::str::from_utf8(kv)
            .ok()?
            .strip_prefix("OMPI_COMM_WORLD_RANK=")?
            .parse()
            .ok()
    })
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    let (tmp, model, data) = fixture();
    let run = tmp.path().join("run");
    let steps = "40";
    let args = [
        "dpo",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output-dir",
        s(&run),
        "--max-steps",
        steps,
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ]
    .into_iter()
    .chain(LENGTHS.iter().copied())
    .collect::<Vec<_>>();
    let log = tmp.path().join("killed.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut job = mpirun_command(&args)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("mpirun: {e}; install Open MPI (trainer/scripts/install_mpi.sh)")
        });

    // Wait for the first checkpoints, then SIGKILL rank 1.
    let started = Instant::now();
    while !run.join("checkpoint-2").exists() {
        if let Some(st) = job.try_wait().unwrap() {
            panic!(
                "the job ended ({st}) before checkpoint-2:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint-2 after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ranks: Vec<(u32, Option<usize>)> = children(job.id())
        .into_iter()
        .map(|p| (p, mpi_rank(p)))
        .collect();
    let victim = ranks
        .iter()
        .find(|(_, r)| *r == Some(1))
        .map(|&(p, _)| p)
        .unwrap_or_else(|| panic!("no rank 1 among mpirun's children {ranks:?}"));
    // SAFETY: kill(2) on a process id of this job; no memory is involved.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = job.try_wait().unwrap() {
            break st;
        }
        if killed.elapsed() > KILL_BOUND {
            let _ = job.kill();
            panic!("the job still runs {KILL_BOUND:?} after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = killed.elapsed();
    let out = std::fs::read_to_string(&log).unwrap();
    eprintln!("{out}");
    println!(
        "rank 1 killed: mpirun ended ({status}) {:.2} s later",
        took.as_secs_f64()
    );
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    assert!(
        out.contains("rank 1") && out.to_lowercase().contains("signal 9"),
        "no message naming the killed rank:\n{out}"
    );

    // Every checkpoint left is complete: its files match its checksums and it lists them all.
    let mut left = Vec::new();
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") {
            assert!(
                verify_checksums(&e.path()).unwrap_or_else(|err| panic!("{name}: {err}")),
                "{name} has no checksums"
            );
            left.push(name);
        }
    }
    left.sort();
    println!("complete checkpoints left: {left:?}");
    assert!(left.iter().any(|n| n == "checkpoint-2"), "{left:?}");
    assert!(
        !left.iter().any(|n| n == &format!("checkpoint-{steps}")),
        "the job finished before the kill: {left:?}"
    );

    // The run resumes on 2 ranks from its latest checkpoint and ends at the last step.
    ok(two(&["dpo", "--resume", s(&run)]));
    let last = metrics(&run).last().cloned().unwrap();
    assert_eq!(last["step"].to_string(), steps);
    assert!(verify_checksums(&run.join(format!("checkpoint-{steps}"))).unwrap());
}

#[test]
fn other_commands_refuse_two_ranks() {
    let (tmp, model, data) = fixture();
    let o = two(&[
        "logps",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("logps.jsonl")),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("only `sft`, `dpo`, `reward` and `bench` run on more than one process"),
        "{err}"
    );
    assert!(!tmp.path().join("logps.jsonl").exists());
}
