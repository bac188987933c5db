//! Criterion benchmark of the float hot paths, single thread, `f64`:
//!
//! | path | call | elements |
//! |---|---|---|
//! | `did` | `did::did(π, π_ref)` (log-space normalized ratio, allocates the result) | `N` outcomes |
//! | `entropy` | `entropy::entropy(π)` | `N` outcomes |
//! | `js` | `entropy::js(p, q)` | `N` outcomes |
//! | `log_softmax` | `Policy::from_logits(f)` (allocates the result) | `N` outcomes |
//! | `population_loss` | `population::population_loss` (sigmoid/DPO, log-ratio reward), value + gradient (dual numbers through the one loss text) | `N²` pair terms |
//!
//! at `N = 10^3, 10^5, 10^7` (population loss: `N = 10^3, 10^4`, see below). Criterion prints
//! its own throughput (elements/s); at the end this harness prints a plain summary table with the
//! **median** elements/s over criterion's measured samples, which `bench/README.md` compares to
//! the numpy + scipy script `bench/numpy_hot_paths.py`.
//!
//! The population loss is the *exact* double sum `Σ_a Σ_b w_a v_b ℓ(r_a − r_b)` and its
//! gradient: `N²` pair terms, each needing one `exp` and one `log1p`. At `N = 10^7` that is
//! `10^14` terms, days of single-thread time at the measured rate (the summary prints the
//! extrapolation), so it is benchmarked at `N = 10^3` and `10^4` only. For the DPO (sigmoid)
//! shape no exact sub-quadratic form exists; hinge and IPO would admit `O(N log N)` and `O(N)`
//! rewrites, but the library keeps one exact double sum for every shape.
//!
//! Run: `CARGO_TARGET_DIR=target-bench cargo bench --bench hot_paths` (a few minutes; criterion's
//! `--sample-size`, `--measurement-time`, `--warm-up-time` and a name filter work as usual).

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use difinfo::did::did;
use difinfo::entropy::{entropy, js};
use difinfo::objective::Objective;
use difinfo::population::population_loss;
use difinfo::Policy;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

const SIZES: [usize; 3] = [1_000, 100_000, 10_000_000];
const LOSS_SIZES: [usize; 2] = [1_000, 10_000];
const SAMPLE_SIZE: usize = 10;

/// Logits `3 · z`, `z ~ N(0, 1)`, from a fixed seed.
fn logits(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            3.0 * z
        })
        .collect()
}

fn policy(n: usize, seed: u64) -> Policy {
    Policy::from_logits(&logits(n, seed)).expect("finite logits")
}

/// One benchmark's measured samples: `(iterations, wall time, thread CPU seconds)` per
/// criterion sample.
struct Record {
    path: &'static str,
    n: usize,
    elements: u64,
    samples: Vec<(u64, Duration, f64)>,
}

/// CPU time of the calling thread in seconds (`CLOCK_THREAD_CPUTIME_ID`): unlike wall time it
/// does not count the time the scheduler gives to other processes, so it stays meaningful on a
/// shared, loaded machine. NaN where unavailable.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_time() -> f64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec (64-bit Linux layout).
    if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_time() -> f64 {
    f64::NAN
}

struct Recorder {
    records: RefCell<Vec<Record>>,
}

impl Recorder {
    /// Benchmark `f` under `group`/`n` with criterion, keeping every sample it takes.
    fn bench<O>(
        &self,
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        path: &'static str,
        n: usize,
        elements: u64,
        mut f: impl FnMut() -> O,
    ) {
        group.throughput(Throughput::Elements(elements));
        let mut samples = Vec::new();
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let cpu = thread_cpu_time();
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(f());
                }
                let t = start.elapsed();
                samples.push((iters, t, thread_cpu_time() - cpu));
                t
            })
        });
        if !samples.is_empty() {
            self.records.borrow_mut().push(Record {
                path,
                n,
                elements,
                samples,
            });
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let k = xs.len();
    if k % 2 == 1 {
        xs[k / 2]
    } else {
        0.5 * (xs[k / 2 - 1] + xs[k / 2])
    }
}

fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
) {
    group.sample_size(SAMPLE_SIZE);
    group.warm_up_time(Duration::from_millis(if n >= 1_000_000 {
        500
    } else {
        1000
    }));
    group.measurement_time(Duration::from_secs(2));
    // Flat sampling: every sample runs the same number of iterations, so the median of the
    // per-iteration times is a plain median (as in the numpy script).
    group.sampling_mode(SamplingMode::Flat);
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .configure_from_args();
    let rec = Recorder {
        records: RefCell::new(Vec::new()),
    };

    for &n in &SIZES {
        let pi = policy(n, 1);
        let pi_ref = policy(n, 2);
        let f = logits(n, 3);

        let mut g = c.benchmark_group("did");
        configure(&mut g, n);
        rec.bench(&mut g, "did", n, n as u64, || did(&pi, &pi_ref).unwrap());
        g.finish();

        let mut g = c.benchmark_group("entropy");
        configure(&mut g, n);
        rec.bench(&mut g, "entropy", n, n as u64, || entropy(&pi));
        g.finish();

        let mut g = c.benchmark_group("js");
        configure(&mut g, n);
        rec.bench(&mut g, "js", n, n as u64, || js(&pi, &pi_ref).unwrap());
        g.finish();

        let mut g = c.benchmark_group("log_softmax");
        configure(&mut g, n);
        rec.bench(&mut g, "log_softmax", n, n as u64, || {
            Policy::from_logits(&f).unwrap()
        });
        g.finish();
    }

    for &n in &LOSS_SIZES {
        let chosen = policy(n, 4);
        let rejected = policy(n, 5);
        let reference = policy(n, 6);
        let dpo = Objective::dpo(0.1).unwrap();
        let f = logits(n, 7);
        let mut g = c.benchmark_group("population_loss");
        configure(&mut g, n);
        rec.bench(&mut g, "population_loss", n, (n * n) as u64, || {
            population_loss(&f, &chosen, &rejected, Some(&reference), &dpo).unwrap()
        });
        g.finish();
    }

    c.final_summary();
    summary(&rec.records.borrow());
}

fn summary(records: &[Record]) {
    if records.is_empty() {
        return;
    }
    println!();
    println!(
        "summary: median over criterion's samples, single thread, f64; SIMD level {}",
        std::env::var("DIFINFO_SIMD").unwrap_or_else(|_| "auto".into())
    );
    println!("(elements/s from wall time; last column from thread CPU time, which excludes time");
    println!(" the scheduler gave to other processes)");
    println!(
        "{:<16} {:>6} {:>8} {:>12} {:>14} {:>16}",
        "path", "N", "samples", "median wall", "elements/s", "(CPU time)"
    );
    let mut loss_rate = None;
    for r in records {
        // Criterion's warm-up also calls the routine; the measured samples are the last ones.
        let k = r.samples.len().min(SAMPLE_SIZE);
        let last = &r.samples[r.samples.len() - k..];
        let wall = median(
            last.iter()
                .map(|(iters, t, _)| t.as_secs_f64() / *iters as f64)
                .collect(),
        );
        let cpu = median(last.iter().map(|(iters, _, c)| c / *iters as f64).collect());
        let rate = r.elements as f64 / wall;
        let cpu_rate = r.elements as f64 / cpu;
        let unit = if r.path == "population_loss" {
            // The faster of the two rates (CPU time when the machine is loaded): a lower bound
            // on the time N = 10^7 would take.
            loss_rate = Some((r.n, if cpu_rate > rate { cpu_rate } else { rate }));
            " pair terms/s"
        } else {
            ""
        };
        println!(
            "{:<16} {:>6} {:>8} {:>10.3}ms {:>12.1} M {:>12.1} M{unit}",
            r.path,
            fmt_n(r.n),
            k,
            wall * 1e3,
            rate / 1e6,
            cpu_rate / 1e6,
        );
    }
    if let Some((n, rate)) = loss_rate {
        let big = 1e7f64;
        let secs = big * big / rate;
        println!(
            "population_loss N = 10^7 not run: the exact double sum has N² = 1e14 pair terms; \
             at the N = {} rate that is {:.0} s ≈ {:.0} days single-thread.",
            fmt_n(n),
            secs,
            secs / 86_400.0
        );
    }
}

fn fmt_n(n: usize) -> String {
    let mut e = 0;
    let mut m = n;
    while m >= 10 && m % 10 == 0 {
        m /= 10;
        e += 1;
    }
    if m == 1 {
        format!("10^{e}")
    } else {
        n.to_string()
    }
}
