//! Where and in which precision a run computes: `--device_map` and
//! `--torch_dtype` resolved against how pt-host was built and what the
//! machine has.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum DtypeArg {
    Float32,
    Bfloat16,
    Float16,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// The device and the dtype of the base weights. CPU computes in f32 (its
/// bf16 matmuls are widened per call and slower); CUDA computes in bf16
/// unless f32 or f16 is asked for. A request that cannot be honoured is
/// said, never silently changed. `gpu` is the CUDA device to use (a
/// data-parallel rank's local rank).
pub fn select(
    device_map: DeviceArg,
    torch_dtype: DtypeArg,
    tf32: bool,
    gpu: usize,
) -> Result<(Device, DType)> {
    let device = match device_map {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device_map cuda: this pt-host was built without CUDA; rebuild with `cargo build --release --features cuda` (needs nvcc) or use --device_map cpu"
                );
            }
            Device::new_cuda(gpu).with_context(|| format!(
                "--device_map cuda: CUDA device {gpu} is not usable (check nvidia-smi, that each rank has a GPU, and that the CUDA runtime libraries are on LD_LIBRARY_PATH)",
            ))?
        }
        DeviceArg::Auto => match candle_core::utils::cuda_is_available() {
            false => Device::Cpu,
            // A rank past the first GPU must not quietly train on the CPU
            // while its peers train on GPUs.
            true if gpu > 0 => Device::new_cuda(gpu).with_context(|| {
                format!(
                    "CUDA device {gpu} (this rank's local rank) is not usable: are there fewer GPUs than ranks on this machine? (nvidia-smi)"
                )
            })?,
            true => Device::new_cuda(gpu).unwrap_or_else(|e| {
                eprintln!("note: CUDA device {gpu} is not usable ({e}); training on CPU");
                Device::Cpu
            }),
        },
    };
    if device.is_cpu() {
        if matches!(torch_dtype, DtypeArg::Bfloat16 | DtypeArg::Float16) {
            eprintln!(
                "note: computing on CPU in float32 (--torch_dtype {torch_dtype:?} applies to CUDA)"
            );
        }
        return Ok((device, DType::F32));
    }
    let dtype = match torch_dtype {
        DtypeArg::Float32 => {
            // Hopper and Ampere run f32 matmuls on tensor cores with TF32 inputs.
            candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
            DType::F32
        }
        DtypeArg::Float16 => {
            eprintln!(
                "note: float16 base weights; pt-host does no loss scaling, bfloat16 is safer for training"
            );
            DType::F16
        }
        DtypeArg::Bfloat16 | DtypeArg::Auto => DType::BF16,
    };
    Ok((device, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_computes_in_f32() {
        for dtype in [
            DtypeArg::Float32,
            DtypeArg::Bfloat16,
            DtypeArg::Float16,
            DtypeArg::Auto,
        ] {
            let (device, chosen) = select(DeviceArg::Cpu, dtype, false, 0).unwrap();
            assert!(device.is_cpu());
            assert_eq!(chosen, DType::F32);
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_refused_with_how_to_build_it() {
        let err = select(DeviceArg::Cuda, DtypeArg::Auto, false, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
        // auto falls back to the CPU.
        assert!(
            select(DeviceArg::Auto, DtypeArg::Bfloat16, false, 0)
                .unwrap()
                .0
                .is_cpu()
        );
    }
}
