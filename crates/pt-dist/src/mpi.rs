//! The MPI backend: rsmpi over the system's MPI (Open MPI on Debian), for
//! CPU clusters and for testing data parallelism on one machine.

use std::time::Duration;

use anyhow::{Result, bail};
use candle_core::{CpuStorage, Device, Shape, Storage, Tensor, WithDType};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::{Collective, Launch, wait_until};

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Finalizes MPI when dropped, after the communicator.
    _universe: Universe,
}

impl Mpi {
    /// Initializes MPI and checks that it sees the job `launch` describes.
    pub fn init(launch: &Launch, timeout: Duration) -> Result<Self> {
        // Serialized: training runs on a worker thread of the host's pool,
        // not on the thread that started the process.
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            bail!("MPI was already initialized in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world_size) {
            return Err(crate::DistError::NotStartedByMpi {
                launcher: launch.launcher.name(),
                rank: launch.rank,
                ranks: launch.world_size,
                mpi_rank: rank,
                mpi_ranks: size,
            }
            .into());
        }
        Ok(Self {
            world,
            rank,
            size,
            timeout,
            _universe: universe,
        })
    }

    /// Sums `send` over ranks into `receive`, waiting at most the timeout;
    /// past it, reports and aborts the job (a collective cannot be left
    /// half-done).
    fn sum_into<T: Equivalence>(&self, send: &[T], receive: &mut [T]) {
        mpi::request::scope(|scope| {
            let mut pending = Some(self.world.immediate_all_reduce_into(
                scope,
                send,
                receive,
                SystemOperation::sum(),
            ));
            let waited = wait_until(self.timeout, "an MPI all-reduce", || {
                let request = pending.take().expect("pending until complete");
                match request.test() {
                    Ok(_) => Ok(true),
                    Err(request) => {
                        pending = Some(request);
                        Ok(false)
                    }
                }
            });
            if let Err(error) = waited {
                eprintln!("error: rank {}: {error:#}", self.rank);
                self.world.abort(1);
            }
        });
    }
}

impl Mpi {
    /// The sum over ranks of `values`, as a CPU tensor of `shape`.
    fn sum_to_tensor<T: Equivalence + WithDType>(
        &self,
        values: &[T],
        shape: &Shape,
    ) -> Result<Tensor> {
        let mut sum = vec![T::from_f64(0.0); values.len()];
        self.sum_into(values, &mut sum);
        Ok(Tensor::from_vec(sum, shape, &Device::Cpu)?)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let on_cpu = tensor.to_device(&Device::Cpu)?.contiguous()?;
        let (storage, layout) = on_cpu.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            unreachable!("moved to the CPU above")
        };
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        // MPI reads candle's buffer in place: no copy on the way out.
        let sum = match storage {
            CpuStorage::F32(values) => self.sum_to_tensor(&values[start..end], tensor.shape())?,
            CpuStorage::F64(values) => self.sum_to_tensor(&values[start..end], tensor.shape())?,
            _ => bail!(
                "all-reduce of {:?} tensors: pass f32 or f64",
                tensor.dtype()
            ),
        };
        Ok(sum.to_device(tensor.device())?)
    }

    fn abort(&self) {
        self.world.abort(1);
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }
}
