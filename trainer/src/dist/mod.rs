//! More than one process: the collectives data-parallel training needs, behind one small
//! trait ([`Collective`]) with an engine per transport — never a home-made one.
//!
//! - [`Single`]: one process (world size 1); every collective is the identity. What a run
//!   started without a launcher gets, with no MPI library loaded.
//! - `mpi::Mpi` (cargo feature `mpi`): rsmpi over the system's Open MPI or MPICH, for CPU
//!   processes on one machine or many, started by `mpirun -np N …`.
//! - `nccl::Nccl` (cargo feature `nccl`): NCCL through cudarc, one process per GPU, started
//!   by `mpirun` (the unique id over MPI, with the `mpi` feature) or with torchrun's variables
//!   (the id through a file); see [`Launch`].
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
#[cfg(feature = "nccl")]
pub mod nccl;

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

/// The engine a launched job uses (`DIFINFO_DIST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// MPI (`mpi::Mpi`, feature `mpi`): collectives through host memory.
    Mpi,
    /// NCCL on one GPU per rank.
    Nccl,
}

/// What the launcher's variables say about this process, read by [`Launch::from_env`]:
///
/// - `DIFINFO_DIST=mpi|nccl` picks the engine; unset, MPI under an MPI launcher
///   (`OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`), NCCL under torchrun's variables (`WORLD_SIZE`; only
///   in a build with the `nccl` feature: other builds ignore them, as before);
/// - rank and world size: `OMPI_COMM_WORLD_RANK`/`_SIZE` (Open MPI), `PMI_RANK`/`PMI_SIZE`
///   (MPICH), else torchrun's `RANK`/`WORLD_SIZE`;
/// - the GPU (NCCL): the local rank, `OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID` or
///   torchrun's `LOCAL_RANK`, else the rank; `--device cuda` then means `cuda:<local rank>`.
///
/// torchrun's `MASTER_ADDR` and `MASTER_PORT` are not used: NCCL's unique id carries rank 0's
/// address, and it reaches the other ranks over MPI or through `DIFINFO_NCCL_ID_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The engine.
    pub engine: Engine,
    /// Whether `DIFINFO_DIST` named it (a world of one then still starts it).
    pub explicit: bool,
    /// Whether an MPI launcher started the process.
    pub mpi_launcher: bool,
    /// This process's rank (0 without a launcher).
    pub rank: usize,
    /// The number of processes (1 without a launcher).
    pub world_size: usize,
    /// The GPU of this rank on its machine (NCCL; the rank itself under MPI, which picks no
    /// GPU).
    pub local_rank: usize,
}

impl Launch {
    /// Reads the variables through `var` (`std::env::var` in [`init`]).
    ///
    /// # Errors
    /// An unknown `DIFINFO_DIST`; a variable that is not a number; a rank outside the world.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |keys: &[&str]| -> Result<Option<usize>> {
            for k in keys {
                if let Some(v) = var(k) {
                    return v.trim().parse().map(Some).map_err(|_| {
                        Error::InvalidArgument(format!("{k}={v}: not a non-negative integer"))
                    });
                }
            }
            Ok(None)
        };
        let mpi_world = num(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])?;
        // torchrun's variables are read only where NCCL may use them: other builds ignore
        // them, as before (another tool's malformed WORLD_SIZE is not our error).
        let dist = var("DIFINFO_DIST");
        let dist = dist.as_deref().map(str::trim);
        let torch_world = if cfg!(feature = "nccl") || dist == Some("nccl") {
            num(&["WORLD_SIZE"])?
        } else {
            None
        };
        let (engine, explicit) = match dist {
            None | Some("") => {
                let nccl = mpi_world.is_none() && torch_world.is_some() && cfg!(feature = "nccl");
                (if nccl { Engine::Nccl } else { Engine::Mpi }, false)
            }
            Some("mpi") => (Engine::Mpi, true),
            Some("nccl") => (Engine::Nccl, true),
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "DIFINFO_DIST={other}: expected mpi or nccl"
                )))
            }
        };
        let mpi_launcher = mpi_world.is_some();
        let world_size = match engine {
            Engine::Mpi => mpi_world,
            Engine::Nccl => mpi_world.or(torch_world),
        }
        .unwrap_or(1)
        .max(1);
        let rank = if mpi_launcher {
            num(&["OMPI_COMM_WORLD_RANK", "PMI_RANK"])?
        } else if engine == Engine::Nccl {
            num(&["RANK"])?
        } else {
            None
        };
        let rank = match rank {
            Some(r) => r,
            None if world_size == 1 || engine == Engine::Mpi => 0,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "a world of {world_size} processes but no rank: set RANK (torchrun sets it)"
                )))
            }
        };
        if rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is not a rank of a world of {world_size}"
            )));
        }
        // Only the NCCL engine picks a GPU (and so reads torchrun's LOCAL_RANK).
        let local_rank = match engine {
            Engine::Nccl => num(&[
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "LOCAL_RANK",
            ])?
            .unwrap_or(rank),
            Engine::Mpi => rank,
        };
        Ok(Self {
            engine,
            explicit,
            mpi_launcher,
            rank,
            world_size,
            local_rank,
        })
    }
}

/// The GPU of this rank when the NCCL engine runs, for `--device cuda`; set by [`init`].
static LOCAL_GPU: OnceLock<usize> = OnceLock::new();

/// The ordinal `--device cuda` names: the rank's GPU under the NCCL engine, else 0.
pub fn default_cuda_ordinal() -> usize {
    LOCAL_GPU.get().copied().unwrap_or(0)
}

/// Sets the process's [`world`] from its launcher ([`Launch`]): under `mpirun -np N` (N > 1)
/// the MPI engine, under torchrun's variables or `DIFINFO_DIST=nccl` the NCCL engine, with no
/// launcher (or one process) [`Single`]. Call once, first thing in `main`.
///
/// # Errors
/// A launcher with more than one process and a binary built without the engine's feature;
/// the engine failing to start; a second call.
pub fn init() -> Result<Session> {
    let launch = Launch::from_env(|k| std::env::var(k).ok())?;
    match launch.engine {
        Engine::Nccl if launch.world_size > 1 || launch.explicit => start_nccl(&launch),
        Engine::Nccl => Ok(Session::single()),
        Engine::Mpi => start_mpi(launch.world_size),
    }
}

/// Sets the process's [`world`] once (an engine's start).
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn set_world(engine: Box<dyn Collective>) -> Result<()> {
    WORLD
        .set(engine)
        .map_err(|_| Error::InvalidArgument("dist::init called twice".into()))
}

fn start_mpi(n: usize) -> Result<Session> {
    if n <= 1 {
        return Ok(Session::single());
    }
    #[cfg(feature = "mpi")]
    {
        let (universe, engine) = mpi::Mpi::start()?;
        set_world(Box::new(engine))?;
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

/// The NCCL engine: the unique id over MPI when an MPI launcher started a job of several
/// ranks and the binary has the `mpi` feature, else through `DIFINFO_NCCL_ID_FILE` (needed
/// only for more than one rank).
#[cfg(feature = "nccl")]
fn start_nccl(l: &Launch) -> Result<Session> {
    #[cfg(feature = "mpi")]
    if l.mpi_launcher && l.world_size > 1 {
        let (universe, m) = mpi::Mpi::start()?;
        let engine = nccl::Nccl::start(m.rank(), m.world_size(), l.local_rank, |id| {
            m.broadcast_bytes(id, 0)
        })?;
        LOCAL_GPU.get_or_init(|| engine.gpu());
        set_world(Box::new(engine))?;
        return Ok(Session {
            _mpi: Some(universe),
        });
    }
    let file = std::env::var_os("DIFINFO_NCCL_ID_FILE").map(std::path::PathBuf::from);
    let engine = nccl::Nccl::start(l.rank, l.world_size, l.local_rank, |id| {
        match (&file, l.world_size) {
            (_, 1) => Ok(()),
            (Some(f), _) => nccl::exchange_through_file(f, l.rank, id),
            (None, n) => Err(Error::InvalidArgument(format!(
                "the NCCL engine with {n} ranks and no MPI launcher needs DIFINFO_NCCL_ID_FILE: \
                 a path (absent at the start) in a directory every rank sees"
            ))),
        }
    })?;
    if let (Some(f), 0, true) = (&file, l.rank, l.world_size > 1) {
        // Every rank has joined the communicator: the id is read everywhere.
        let _ = std::fs::remove_file(f);
    }
    LOCAL_GPU.get_or_init(|| engine.gpu());
    set_world(Box::new(engine))?;
    Ok(Session::single())
}

#[cfg(not(feature = "nccl"))]
fn start_nccl(l: &Launch) -> Result<Session> {
    Err(Error::InvalidArgument(format!(
        "the NCCL engine (DIFINFO_DIST=nccl or torchrun's variables, a world of {}) needs a \
         binary built with the `nccl` feature: `cargo build --release -p difinfo-trainer \
         --features nccl` (CUDA; add `mpi` to launch with mpirun)",
        l.world_size
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::from_env(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_string())
        })
    }

    #[test]
    fn no_launcher_is_a_world_of_one() {
        let l = launch(&[]).unwrap();
        assert_eq!(
            (l.engine, l.explicit, l.rank, l.world_size),
            (Engine::Mpi, false, 0, 1)
        );
    }

    #[test]
    fn mpirun_defaults_to_mpi_and_nccl_takes_its_local_rank() {
        let v = [
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ];
        let l = launch(&v).unwrap();
        assert_eq!((l.engine, l.world_size, l.rank), (Engine::Mpi, 4, 3));
        let mut v = v.to_vec();
        v.push(("DIFINFO_DIST", "nccl"));
        let l = launch(&v).unwrap();
        assert_eq!(
            (l.engine, l.rank, l.local_rank, l.mpi_launcher),
            (Engine::Nccl, 3, 1, true)
        );
    }

    #[test]
    fn torchrun_variables_pick_nccl_only_in_an_nccl_build() {
        let v = [("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")];
        let l = launch(&v).unwrap();
        if cfg!(feature = "nccl") {
            assert_eq!(
                (l.engine, l.world_size, l.rank, l.local_rank),
                (Engine::Nccl, 2, 1, 1)
            );
        } else {
            // As before the NCCL engine existed: torchrun's variables are not a launcher, and
            // another tool's values, malformed or not, are not read.
            assert_eq!((l.engine, l.world_size), (Engine::Mpi, 1));
            assert!(launch(&[("WORLD_SIZE", "x"), ("LOCAL_RANK", "y")]).is_ok());
        }
    }

    #[test]
    fn bad_variables_are_refused() {
        assert!(launch(&[("DIFINFO_DIST", "gloo")]).is_err());
        assert!(launch(&[("DIFINFO_DIST", "nccl"), ("WORLD_SIZE", "2")]).is_err());
        assert!(launch(&[("DIFINFO_DIST", "nccl"), ("WORLD_SIZE", "2"), ("RANK", "2")]).is_err());
        assert!(launch(&[("OMPI_COMM_WORLD_SIZE", "two")]).is_err());
    }
}
