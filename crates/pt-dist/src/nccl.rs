//! The NCCL backend: one GPU per rank, sums on the device stream candle
//! computes on, so gradients never leave the GPU. The ranks exchange NCCL's
//! unique id through [`crate::rendezvous`].

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::DeviceRepr;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::{Collective, Launch, rendezvous, wait_until};

pub struct Nccl {
    comm: Comm,
    device: Device,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl Nccl {
    /// Joins the NCCL communicator of the job, on `device`'s stream.
    pub fn init(launch: &Launch, device: &Device, timeout: Duration) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(crate::DistError::NcclWithoutCuda.into());
        };
        let id = if launch.rank == 0 {
            Id::new().map_err(|e| anyhow!("NCCL cannot create a unique id: {e:?}"))?
        } else {
            Id::uninit([0; 128])
        };
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let shared = rendezvous::share(
            &launch.rendezvous_address()?,
            launch.rank,
            launch.world_size,
            &bytes,
            timeout,
        )?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (slot, byte) in internal.iter_mut().zip(&shared) {
            *slot = *byte as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            launch.rank,
            launch.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| {
            anyhow!(
                "NCCL cannot join rank {} of {}: {e:?}",
                launch.rank,
                launch.world_size
            )
        })?;
        Ok(Self {
            comm,
            device: device.clone(),
            rank: launch.rank,
            size: launch.world_size,
            timeout,
        })
    }
}

/// The sum over ranks as a candle op, so that it reads and writes candle's
/// own device buffers on its stream.
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor");
        };
        let output = match storage.dtype() {
            DType::F32 => self.sum::<f32>(storage, start..end)?,
            DType::F64 => self.sum::<f64>(storage, start..end)?,
            other => candle_core::bail!("NCCL all-reduce of {other:?}: pass f32 or f64"),
        };
        Ok((output, layout.shape().clone()))
    }
}

impl AllReduce<'_> {
    /// The sum over ranks of `storage[range]`, in a new device buffer.
    fn sum<T: NcclType + CudaDType + DeviceRepr>(
        &self,
        storage: &CudaStorage,
        range: std::ops::Range<usize>,
    ) -> candle_core::Result<CudaStorage> {
        let device = storage.device().clone();
        let input = storage.as_cuda_slice::<T>()?.slice(range);
        let mut output = unsafe { device.alloc::<T>(input.len()) }?;
        self.comm
            .all_reduce(&input, &mut output, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(output, device))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let on_gpu = tensor.to_device(&self.device)?.contiguous()?;
        let sum = on_gpu.apply_op1_no_bwd(&AllReduce { comm: &self.comm })?;
        // NCCL blocks its stream until every rank joins: wait for it with
        // the job's timeout instead of forever.
        let Device::Cuda(cuda) = &self.device else {
            unreachable!("checked in init")
        };
        let stream = cuda.cuda_stream();
        let event = stream
            .record_event(None)
            .context("NCCL all-reduce: cannot record a CUDA event")?;
        wait_until(self.timeout, "an NCCL all-reduce", || {
            Ok(event.is_complete())
        })?;
        Ok(sum.to_device(tensor.device())?)
    }

    fn abort(&self) {
        // Exiting tears the communicator down; the launcher ends the other
        // ranks when one exits with an error.
        std::process::exit(1);
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}
