//! More than one process: the collectives data-parallel training needs, behind one small
//! trait ([`Collective`]) with an engine per transport — never a home-made one.
//!
//! - [`Single`]: one process (world size 1); every collective is the identity. What a run
//!   started without a launcher gets, with no MPI library loaded.
//! - `mpi::Mpi` (cargo feature `mpi`): rsmpi over the system's Open MPI or MPICH, for CPU
//!   processes on one machine or many, started by `mpirun -np N …`.
//!
//! The process's world is set once, by [`init`] at the binary's start (as
//! `torch.distributed.init_process_group` sets the default group), and read anywhere with
//! [`world`]. Tensors given to a collective are 1-D, contiguous, f32 or f64; the result has the
//! input's dtype and device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

#[cfg(feature = "mpi")]
pub mod mpi;

/// The collectives of data-parallel training, as MPI and NCCL define them. Every rank calls
/// the same collectives in the same order with tensors of the same length and dtype.
pub trait Collective: Send + Sync {
    /// This process's rank, `0 ≤ rank < world_size`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world_size(&self) -> usize;
    /// The engine's name as messages print it (`single`, `mpi`, `nccl`).
    fn engine(&self) -> &'static str;
    /// `Σ_ranks t`, elementwise, on every rank (MPI_Allreduce with MPI_SUM).
    ///
    /// # Errors
    /// A tensor that is not 1-D f32/f64; the engine's errors.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `r` gets block `r` of `Σ_ranks t`, where `t` (length `N·m`) is cut into `N` blocks
    /// of `m` (MPI_Reduce_scatter_block).
    ///
    /// # Errors
    /// A length not divisible by the world size; see [`Collective::all_reduce_sum`].
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The ranks' tensors (length `m` each) concatenated in rank order, on every rank
    /// (MPI_Allgather).
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`].
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s tensor on every rank (MPI_Bcast); the others pass one of the same length.
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`].
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// The engine's errors.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with exit status `code` (MPI_Abort): what a rank does after
    /// an error, so that no other rank waits forever in a collective.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        check_flat(t)?;
        Ok(t.clone())
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        check_flat(t)?;
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        check_flat(t)?;
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_flat(t)?;
        check_root(root, 1)?;
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A tensor a collective accepts: 1-D, f32 or f64.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the shape or dtype.
pub fn check_flat(t: &Tensor) -> Result<()> {
    if t.rank() != 1 {
        return Err(Error::InvalidArgument(format!(
            "a collective takes a 1-D tensor, not shape {:?}",
            t.dims()
        )));
    }
    if !matches!(t.dtype(), DType::F32 | DType::F64) {
        return Err(Error::InvalidArgument(format!(
            "a collective takes f32 or f64, not {:?}",
            t.dtype()
        )));
    }
    Ok(())
}

/// `root` names a rank of a world of `n`.
///
/// # Errors
/// [`Error::InvalidArgument`] when it does not.
pub fn check_root(root: usize, n: usize) -> Result<()> {
    if root >= n {
        return Err(Error::InvalidArgument(format!(
            "broadcast root {root} is not a rank of a world of {n}"
        )));
    }
    Ok(())
}

/// The launcher's world size, read from the variables mpirun (Open MPI: `OMPI_COMM_WORLD_SIZE`)
/// and MPICH's Hydra (`PMI_SIZE`) set; `None` when no launcher started the process.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Nanoseconds spent in collectives, for [`comm_seconds`].
static COMM_NANOS: AtomicU64 = AtomicU64::new(0);

/// Seconds this process has spent in its engine's collectives so far (waiting for the other
/// ranks, moving the data and its host copies): the communication share of a step that
/// `bench` reports. Zero in a world of one.
pub fn comm_seconds() -> f64 {
    COMM_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}

/// `f()`, its time added to [`comm_seconds`]; engines wrap each collective in it.
pub fn timed<T>(f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let out = f();
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    COMM_NANOS.fetch_add(ns, Ordering::Relaxed);
    out
}

/// The process's world: the one [`init`] set, [`Single`] before (or without) it.
pub fn world() -> &'static dyn Collective {
    match WORLD.get() {
        Some(w) => w.as_ref(),
        None => &Single,
    }
}

/// What [`init`] returns: kept alive to the end of `main`, it shuts the engine down when
/// dropped (MPI_Finalize).
pub struct Session {
    #[cfg(feature = "mpi")]
    _mpi: Option<::mpi::environment::Universe>,
}

impl Session {
    /// A session with no engine (one process).
    fn single() -> Self {
        Self {
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }
}

/// Sets the process's [`world`] from its launcher: under `mpirun -np N` (N > 1) the MPI
/// engine, with no launcher (or one process) [`Single`]. Call once, first thing in `main`.
///
/// # Errors
/// A launcher with more than one process and a binary built without the `mpi` feature; MPI
/// failing to start; a second call.
pub fn init() -> Result<Session> {
    let n = launcher_world_size().unwrap_or(1);
    if n <= 1 {
        return Ok(Session::single());
    }
    #[cfg(feature = "mpi")]
    {
        let (universe, engine) = mpi::Mpi::start()?;
        WORLD
            .set(Box::new(engine))
            .map_err(|_| Error::InvalidArgument("dist::init called twice".into()))?;
        Ok(Session {
            _mpi: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::InvalidArgument(format!(
        "started by an MPI launcher with {n} processes, but this binary was built without the \
         `mpi` feature: rebuild with `cargo build --release -p difinfo-trainer --features mpi`"
    )))
}
