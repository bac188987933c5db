//! `difinfo-train`: command-line front end of difinfo-trainer. It parses the command line and
//! dispatches to the subcommand's module in [`difinfo_trainer::commands`]; an error is printed
//! at the exit.

use std::process::ExitCode;

use clap::Parser;

use difinfo_trainer::commands::{self, Command};
use difinfo_trainer::dist;

#[derive(Parser)]
#[command(
    name = "difinfo-train",
    version,
    about = "Hugging Face checkpoints, TRL-exact tokenization and log-probs on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Keeps freed memory in the process for reuse (glibc): candle allocates a fresh buffer for
/// every op's output, and with glibc's defaults each buffer above the dynamic mmap threshold is
/// a fresh `mmap` (page faults on first touch, `munmap` on drop) and the heap top is trimmed
/// back to the kernel after every large free. A training step allocates the same sizes step
/// after step, so raising both thresholds turns that into reuse (~10 % of a step's time on the
/// bench). Skipped when `GLIBC_TUNABLES` is set, so the environment can still choose.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Ignores SIGXFSZ: past a file-size limit (`ulimit -f`) a write then fails with EFBIG, which
/// the writer reports naming the output, instead of the signal killing the process with no
/// message (and a temporary file left behind).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn ignore_sigxfsz() {
    // SAFETY: sets the disposition of one signal to SIG_IGN before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn ignore_sigxfsz() {}

/// Runs candle's element-wise CPU ops on the calling thread unless `CANDLE_NUM_THREADS` says
/// otherwise. candle splits element-wise ops over a spin-barrier pool of its own, beside the
/// rayon pool that runs matmuls and the fused kernels: on a machine with few cores (or shared
/// with other work) its barrier threads and rayon's workers take turns on the same cores and
/// the main thread spins at the barrier (a fifth of a bench step's cycles on 2 cores, with
/// `CANDLE_NUM_THREADS=1` 25–50 % more tokens/s under load). Matmuls keep all threads
/// (`RAYON_NUM_THREADS`).
fn tune_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any other thread exists and before candle reads the variable.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    tune_malloc();
    ignore_sigxfsz();
    tune_candle_threads();
    let matches =
        commands::shared::negative_numbers_as_values(<Cli as clap::CommandFactory>::command())
            .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    // Under a launcher (`mpirun -np N`), the process's world; dropped at the end of `main`
    // (MPI_Finalize).
    let _session = match dist::init() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = commands::run(cli.command, &sub);
    let world = dist::world();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if world.world_size() > 1 => {
            // The other ranks may wait in a collective: end them all (MPI_Abort).
            eprintln!(
                "error (rank {} of {}): {e}",
                world.rank(),
                world.world_size()
            );
            world.abort(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
