//! The MPI engine (cargo feature `mpi`): rsmpi over the system's Open MPI or MPICH, one
//! process per rank, started by `mpirun -np N` (`--hostfile` for several machines).
//!
//! Tensors travel through host memory (`to_vec1`, then `Tensor::from_vec` on the input's
//! device); sums use MPI's built-in `MPI_SUM`, which every rank receives bit-identical. MPI
//! runs with `MPI_THREAD_FUNNELED`: only the thread that started it calls it (candle's and
//! rayon's worker threads never do), and a call from another thread is an error.

use std::thread::ThreadId;

use candle_core::{DType, Tensor, WithDType};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use super::{check_flat, check_root, timed, Collective};
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD` and the thread allowed to use it.
pub struct Mpi {
    comm: SimpleCommunicator,
    thread: ThreadId,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is a handle to MPI_COMM_WORLD, valid until MPI_Finalize (the
// `Universe` that `Session` holds outlives every use); every method first checks that it runs
// on the thread that initialized MPI (MPI_THREAD_FUNNELED), so no two threads call MPI.
unsafe impl Send for Mpi {}
// SAFETY: see `Send`.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initializes MPI (`MPI_THREAD_FUNNELED`) on the calling thread.
    ///
    /// # Errors
    /// MPI already initialized, or not offering the threading level.
    pub fn start() -> Result<(Universe, Self)> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::InvalidArgument("MPI was already initialized".into()))?;
        if level < Threading::Funneled {
            return Err(Error::InvalidArgument(format!(
                "the MPI library offers threading level {level:?}; difinfo-train needs Funneled"
            )));
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Ok((
            universe,
            Self {
                comm,
                thread: std::thread::current().id(),
                rank,
                size,
            },
        ))
    }

    /// Rank `root`'s bytes in `buf` on every rank (MPI_Bcast): how the NCCL engine's unique
    /// id reaches the ranks under mpirun.
    ///
    /// # Errors
    /// A call from another thread than MPI's; a root outside the world.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_thread()?;
        check_root(root, self.size)?;
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn check_thread(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            return Err(Error::InvalidArgument(
                "MPI called from a thread other than the one that started it".into(),
            ));
        }
        Ok(())
    }

    /// `f(send, receive)` on the tensor's values as `T`, with a receive buffer of `out_len`.
    fn on_host<T, F>(&self, t: &Tensor, out_len: usize, f: F) -> Result<Tensor>
    where
        T: WithDType + Equivalence + Default,
        F: FnOnce(&[T], &mut [T]),
    {
        let send = t.to_vec1::<T>()?;
        let mut recv = vec![T::default(); out_len];
        f(&send, &mut recv);
        Ok(Tensor::from_vec(recv, out_len, t.device())?)
    }

    /// [`Mpi::on_host`] in the tensor's dtype (f32 or f64), after the checks every collective
    /// makes.
    fn call(
        &self,
        t: &Tensor,
        out_len: usize,
        f32op: impl FnOnce(&[f32], &mut [f32]),
        f64op: impl FnOnce(&[f64], &mut [f64]),
    ) -> Result<Tensor> {
        self.check_thread()?;
        check_flat(t)?;
        timed(|| match t.dtype() {
            DType::F32 => self.on_host(t, out_len, f32op),
            _ => self.on_host(t, out_len, f64op),
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let c = &self.comm;
        self.call(
            t,
            t.elem_count(),
            |s, r| c.all_reduce_into(s, r, SystemOperation::sum()),
            |s, r| c.all_reduce_into(s, r, SystemOperation::sum()),
        )
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        if n % self.size != 0 {
            return Err(Error::InvalidArgument(format!(
                "reduce-scatter of {n} values over {} ranks: not a multiple",
                self.size
            )));
        }
        let c = &self.comm;
        self.call(
            t,
            n / self.size,
            |s, r| c.reduce_scatter_block_into(s, r, SystemOperation::sum()),
            |s, r| c.reduce_scatter_block_into(s, r, SystemOperation::sum()),
        )
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let c = &self.comm;
        self.call(
            t,
            t.elem_count() * self.size,
            |s, r| c.all_gather_into(s, r),
            |s, r| c.all_gather_into(s, r),
        )
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_root(root, self.size)?;
        let c = &self.comm;
        let root = root as i32;
        self.call(
            t,
            t.elem_count(),
            |s, r| {
                r.copy_from_slice(s);
                c.process_at_rank(root).broadcast_into(r);
            },
            |s, r| {
                r.copy_from_slice(s);
                c.process_at_rank(root).broadcast_into(r);
            },
        )
    }
    fn barrier(&self) -> Result<()> {
        self.check_thread()?;
        timed(|| self.comm.barrier());
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}
