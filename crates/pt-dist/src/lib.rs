//! Data-parallel training across processes: which rank this process is (as
//! mpirun, srun or torchrun said), and a small [`Collective`] trait with two
//! real backends — MPI (rsmpi over the system's Open MPI, for CPU clusters)
//! and NCCL (cudarc, for GPUs). The trainer needs only a sum over ranks.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

mod error;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub use error::DistError;
pub use launch::{Launch, Launcher};

/// Collective operations over the ranks of one training job. Every rank
/// must call them in the same order; a call that does not complete within
/// the job's timeout ends the job rather than hanging it.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of `tensor` (f32 or f64) over all ranks,
    /// returned to every rank on `tensor`'s device.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;
    /// Ends every rank of the job after an unrecoverable error on this one,
    /// so that the others do not wait for it until their timeout.
    fn abort(&self);
    /// The backend's name, for messages.
    fn backend(&self) -> &'static str;

    /// Whether collectives are real: false for [`Single`] alone, whose sums
    /// are skipped (one process with an explicit backend still runs them,
    /// which proves the backend on one GPU).
    fn communicates(&self) -> bool {
        self.backend() != Single.backend()
    }

    /// Whether this rank writes the job's outputs (logs, checkpoints, results).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)
            .map(|_| ())
    }

    /// Fails unless every rank passes the same `value`: `what` names it in
    /// the error, e.g. the number of training blocks each rank prepared.
    fn check_agreement(&self, what: &str, value: u64) -> Result<()> {
        // An all-gather by sum: each rank fills its own slot (exact in f64 below 2^53).
        let mut slots = vec![0f64; self.world_size()];
        slots[self.rank()] = value as f64;
        let values = self
            .all_reduce_sum(&Tensor::new(slots.as_slice(), &Device::Cpu)?)?
            .to_vec1::<f64>()?;
        if values.iter().any(|&v| v != value as f64) {
            let listed: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(rank, v)| format!("rank {rank}: {v}"))
                .collect();
            return Err(DistError::Disagreement {
                what: what.into(),
                values: listed.join(", "),
            }
            .into());
        }
        Ok(())
    }
}

/// One process: sums are the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }
    fn abort(&self) {}
    fn backend(&self) -> &'static str {
        "none"
    }
}

/// The communication backend (HF `--ddp_backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Mpi,
    Nccl,
}

impl Backend {
    /// NCCL for GPUs, MPI for CPUs: what each is made for.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Mpi
        }
    }
}

/// Joins the job `launch` describes over `backend`, by default the one
/// made for `device`; one process alone needs none, unless a backend is
/// asked for (one rank over NCCL proves the GPU path on one GPU). `device`
/// is this rank's (NCCL communicates on its stream).
pub fn connect(
    launch: &Launch,
    backend: Option<Backend>,
    device: &Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    match backend {
        None if launch.world_size == 1 => Ok(Box::new(Single)),
        None => connect_to(launch, Backend::for_device(device), device, timeout),
        Some(backend) => connect_to(launch, backend, device, timeout),
    }
}

fn connect_to(
    launch: &Launch,
    backend: Backend,
    device: &Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    match backend {
        Backend::Mpi => connect_mpi(launch, device, timeout),
        Backend::Nccl => connect_nccl(launch, device, timeout),
    }
}

#[cfg(feature = "mpi")]
fn connect_mpi(launch: &Launch, _: &Device, timeout: Duration) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi::Mpi::init(launch, timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(launch: &Launch, _: &Device, _: Duration) -> Result<Box<dyn Collective>> {
    Err(DistError::BuiltWithoutMpi {
        launcher: launch.launcher.name(),
        ranks: launch.world_size,
    }
    .into())
}

#[cfg(feature = "nccl")]
fn connect_nccl(
    launch: &Launch,
    device: &Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl::Nccl::init(launch, device, timeout)?))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(launch: &Launch, _: &Device, _: Duration) -> Result<Box<dyn Collective>> {
    Err(DistError::BuiltWithoutNccl {
        launcher: launch.launcher.name(),
        ranks: launch.world_size,
    }
    .into())
}

/// Polls `done` until it says true or `timeout` passes: how the backends
/// bound a collective's wait. Spins briefly (a peer is usually close
/// behind), then sleeps, so a waiting rank leaves the cores to the others.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub(crate) fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let started = Instant::now();
    let mut polls = 0u32;
    while !done()? {
        if started.elapsed() > timeout {
            return Err(DistError::Timeout {
                message: format!(
                    "{what} did not complete within {} s: another rank stopped or is far behind \
                     (its error is in its own log)",
                    timeout.as_secs()
                ),
                seconds: timeout.as_secs(),
            }
            .into());
        }
        polls += 1;
        if polls < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0 of two, whose peer passes `other`: enough to check the
    /// agreement rule without a launcher.
    struct Pair {
        other: f64,
    }

    impl Collective for Pair {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
            let mut sum = tensor.to_vec1::<f64>()?;
            sum[1] += self.other;
            Ok(Tensor::new(sum.as_slice(), &Device::Cpu)?)
        }
        fn abort(&self) {}
        fn backend(&self) -> &'static str {
            "test"
        }
    }

    #[test]
    fn agreement_holds_only_for_equal_values() {
        Pair { other: 2532.0 }
            .check_agreement("training blocks", 2532)
            .unwrap();
        let err = Pair { other: 2531.0 }
            .check_agreement("training blocks", 2532)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("training blocks (rank 0: 2532, rank 1: 2531)"),
            "{err}"
        );
        // Large counts stay exact.
        let tokens = 4_000_000_000_123u64;
        Pair {
            other: tokens as f64,
        }
        .check_agreement("tokens", tokens)
        .unwrap();
        assert!(
            Pair {
                other: (tokens + 1) as f64
            }
            .check_agreement("tokens", tokens)
            .is_err()
        );
    }

    #[test]
    fn a_wait_that_never_completes_ends_with_a_timeout_error() {
        let err = wait_until(Duration::from_secs(1), "all-reduce", || Ok(false)).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref(),
                Some(DistError::Timeout { seconds: 1, message }) if message.starts_with("all-reduce did not complete")
            ),
            "{err}"
        );
        let mut calls = 0;
        wait_until(Duration::from_secs(5), "all-reduce", || {
            calls += 1;
            Ok(calls == 3)
        })
        .unwrap();
    }
}
