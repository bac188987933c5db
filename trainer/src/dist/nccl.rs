//! The NCCL engine (cargo feature `nccl`): one process per GPU, the collectives run by NVIDIA's
//! NCCL through cudarc's bindings (`cudarc::nccl`, re-exported by candle), on the stream candle
//! computes on.
//!
//! The communicator is created by `ncclCommInitRank` from a unique id that rank 0 makes
//! (`ncclGetUniqueId`: it carries rank 0's bootstrap address, so torchrun's `MASTER_ADDR` and
//! `MASTER_PORT` are not used) and that must reach every rank before: [`super::init`] passes it
//! over MPI when an MPI launcher started the job and the binary has the `mpi` feature (as NCCL's
//! own examples do), else through a file in a directory every rank sees
//! ([`exchange_through_file`], `DIFINFO_NCCL_ID_FILE`).
//!
//! Tensors on the rank's GPU are reduced in place of a copy: the input's `CudaSlice` is read by
//! NCCL and the result is a new `CudaSlice` wrapped as a tensor on the input's device. CPU
//! tensors (metrics, counts) travel to the GPU and back. 1-D f32/f64 only ([`check_flat`]).
//! Nothing of this has run on a GPU yet: it compiles and links against NCCL 2.32.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, DeviceLocation, Storage, Tensor};

use super::{check_flat, check_root, timed, Collective};
use crate::error::{Error, Result};

/// The bytes of an NCCL unique id (`ncclUniqueId`, `NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// How long a rank other than 0 waits for rank 0's id file before giving up.
pub const ID_FILE_TIMEOUT: Duration = Duration::from_secs(300);

/// One NCCL communicator over the job's ranks, one GPU per rank.
pub struct Nccl {
    /// `None` once [`Collective::abort`] has aborted it. The lock also keeps two threads from
    /// calling NCCL on the communicator at once.
    comm: Mutex<Option<Comm>>,
    /// The rank's GPU, where CPU tensors are reduced.
    device: Device,
    gpu: usize,
    rank: usize,
    size: usize,
}

// SAFETY: `Comm` holds NCCL's raw communicator pointer, which NCCL allows any thread to use as
// long as no two calls on it overlap: every use goes through the mutex, with the GPU's context
// made current on the calling thread first.
unsafe impl Send for Nccl {}
// SAFETY: see `Send`.
unsafe impl Sync for Nccl {}

/// The collective a call launches.
#[derive(Debug, Clone, Copy)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast(i32),
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::InvalidArgument(format!("NCCL {what} failed: {e:?}"))
}

impl Nccl {
    /// Creates rank `rank`'s communicator of a world of `size` on GPU `gpu`. Rank 0 makes the
    /// unique id; `exchange` gets its bytes (filled on rank 0) and must leave rank 0's bytes
    /// in it on every rank.
    ///
    /// # Errors
    /// No such GPU; the id exchange's errors; `ncclCommInitRank` failing (a rank that never
    /// joins makes the others wait: NCCL has no timeout here).
    pub fn start(
        rank: usize,
        size: usize,
        gpu: usize,
        exchange: impl FnOnce(&mut [u8; ID_BYTES]) -> Result<()>,
    ) -> Result<Self> {
        if rank >= size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is not a rank of a world of {size}"
            )));
        }
        let device = Device::new_cuda(gpu)?;
        let stream = device.as_cuda_device()?.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_error("binding the GPU's context", e))?;
        let mut bytes = [0u8; ID_BYTES];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e.0))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        exchange(&mut bytes)?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream, rank, size, id)
            .map_err(|e| nccl_error("ncclCommInitRank", e.0))?;
        Ok(Self {
            comm: Mutex::new(Some(comm)),
            device,
            gpu,
            rank,
            size,
        })
    }

    /// The GPU this rank runs on (`cuda:N`).
    pub fn gpu(&self) -> usize {
        self.gpu
    }

    /// `op` on `t` (1-D f32/f64, on this rank's GPU or the CPU), the result of length `out_len`
    /// on `t`'s device.
    fn call(&self, t: &Tensor, out_len: usize, op: Op) -> Result<Tensor> {
        check_flat(t)?;
        timed(|| match t.device() {
            Device::Cpu => {
                let on_gpu = t.to_device(&self.device)?;
                Ok(self.on_gpu(&on_gpu, out_len, op)?.to_device(&Device::Cpu)?)
            }
            _ => self.on_gpu(t, out_len, op),
        })
    }

    fn on_gpu(&self, t: &Tensor, out_len: usize, op: Op) -> Result<Tensor> {
        match t.device().location() {
            DeviceLocation::Cuda { gpu_id } if gpu_id == self.gpu => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                    "the NCCL engine of rank {} runs on cuda:{}, not on {other:?}: run with \
                     --device cuda (the rank's GPU)",
                    self.rank, self.gpu
                )))
            }
        }
        match t.dtype() {
            DType::F32 => self.typed::<f32>(t, out_len, op),
            _ => self.typed::<f64>(t, out_len, op),
        }
    }

    fn typed<T>(&self, t: &Tensor, out_len: usize, op: Op) -> Result<Tensor>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(Error::InvalidArgument(
                "the NCCL engine takes CUDA tensors".into(),
            ));
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            Error::InvalidArgument("a collective takes a contiguous tensor".into())
        })?;
        let src = cuda.as_cuda_slice::<T>()?.slice(start..end);
        let dev = cuda.device.clone();
        let mut dst = dev.alloc_zeros::<T>(out_len)?;
        {
            let guard = self
                .comm
                .lock()
                .map_err(|_| Error::InvalidArgument("the NCCL communicator is poisoned".into()))?;
            let comm = guard.as_ref().ok_or_else(|| {
                Error::InvalidArgument("the NCCL communicator was aborted".into())
            })?;
            comm.context()
                .bind_to_thread()
                .map_err(|e| nccl_error("binding the GPU's context", e))?;
            launch(comm, op, &src, &mut dst).map_err(|e| nccl_error(&format!("{op:?}"), e))?;
        }
        drop(storage);
        let out = CudaStorage::wrap_cuda_slice(dst, dev);
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            out_len,
            BackpropOp::none(),
            false,
        ))
    }
}

/// Enqueues `op` (sums for the reductions) on the communicator's stream.
fn launch<T: NcclType>(
    comm: &Comm,
    op: Op,
    src: &CudaView<'_, T>,
    dst: &mut CudaSlice<T>,
) -> std::result::Result<(), impl std::fmt::Debug> {
    match op {
        Op::AllReduce => comm.all_reduce(src, dst, &ReduceOp::Sum),
        Op::ReduceScatter => comm.reduce_scatter(src, dst, &ReduceOp::Sum),
        Op::AllGather => comm.all_gather(src, dst),
        Op::Broadcast(root) => comm.broadcast(Some(src), dst, root),
    }
    .map(|_| ())
    .map_err(|e| e.0)
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.call(t, t.elem_count(), Op::AllReduce)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        if n % self.size != 0 {
            return Err(Error::InvalidArgument(format!(
                "reduce-scatter of {n} values over {} ranks: not a multiple",
                self.size
            )));
        }
        self.call(t, n / self.size, Op::ReduceScatter)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.call(t, t.elem_count() * self.size, Op::AllGather)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_root(root, self.size)?;
        let root = i32::try_from(root).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.call(t, t.elem_count(), Op::Broadcast(root))
    }
    /// An all-reduce of one value, then a wait for the GPU's stream: every rank has reached
    /// the barrier and its earlier work on the GPU is done.
    fn barrier(&self) -> Result<()> {
        let one = Tensor::zeros(1, DType::F32, &self.device)?;
        let out = self.all_reduce_sum(&one)?;
        timed(|| out.device().synchronize())?;
        Ok(())
    }
    /// `ncclCommAbort` (the other ranks' pending collectives fail instead of waiting), then
    /// the process ends; the launcher (mpirun, torchrun) ends the other ranks on a non-zero
    /// exit.
    fn abort(&self, code: i32) -> ! {
        if let Ok(mut guard) = self.comm.try_lock() {
            if let Some(comm) = guard.take() {
                // cudarc's `Drop for Comm` calls ncclCommAbort (and panics on its error).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(comm)));
            }
        }
        std::process::exit(code)
    }
}

/// The id exchange through a file (no MPI): rank 0 writes `bytes` to `path` atomically (a
/// temporary file renamed); the others wait for it (up to [`ID_FILE_TIMEOUT`]) and read it.
/// The path must not exist when the job starts (rank 0 refuses a stale one) and must be seen
/// by every rank (a shared directory across machines); [`super::init`] removes it once every
/// rank has joined the communicator.
///
/// # Errors
/// A stale file (rank 0); I/O errors; the timeout; a file of another size.
pub fn exchange_through_file(path: &Path, rank: usize, bytes: &mut [u8; ID_BYTES]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if rank == 0 {
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{}: the NCCL id file exists already (a previous job's?); remove it or name a \
                 fresh path in DIFINFO_NCCL_ID_FILE",
                path.display()
            )));
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes[..]).map_err(io)?;
        return std::fs::rename(&tmp, path).map_err(io);
    }
    let t0 = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(b) if b.len() == ID_BYTES => {
                bytes.copy_from_slice(&b);
                return Ok(());
            }
            Ok(b) => {
                return Err(Error::InvalidArgument(format!(
                    "{}: {} bytes, not an NCCL id ({ID_BYTES})",
                    path.display(),
                    b.len()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        if t0.elapsed() > ID_FILE_TIMEOUT {
            return Err(Error::InvalidArgument(format!(
                "{}: rank 0 wrote no NCCL id within {} s",
                path.display(),
                ID_FILE_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
