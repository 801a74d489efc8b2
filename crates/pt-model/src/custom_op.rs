//! Plumbing shared by the custom ops (fused kernels, frozen linear layers,
//! checkpointed blocks): a custom op's storage as a graph-free tensor and
//! back.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor, bail};

/// A custom op's input as a tensor without a graph. The op's caller passes a
/// contiguous tensor starting at offset 0 (see [`graph_free_input`]), so the
/// storage read from the start holds exactly the input.
pub(crate) fn input_tensor(storage: Storage, layout: &Layout) -> Result<Tensor> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        bail!("custom op input must be contiguous from offset 0");
    }
    Ok(Tensor::from_storage(
        storage,
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// `x` as a custom op needs it: contiguous from offset 0 (copied if not).
pub(crate) fn graph_free_input(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        x.copy()
    }
}

/// The storage of a custom op's result, with its shape.
fn output_storage(y: &Tensor) -> Result<(Storage, Shape)> {
    let y = graph_free_input(y)?;
    let (guard, layout) = y.storage_and_layout();
    Ok((guard.try_clone(layout)?, y.shape().clone()))
}

/// A custom op's CPU result.
pub(crate) fn cpu_output(y: &Tensor) -> Result<(CpuStorage, Shape)> {
    match output_storage(y)? {
        (Storage::Cpu(storage), shape) => Ok((storage, shape)),
        _ => bail!("custom op: CPU input gave a result on another device"),
    }
}

/// A custom op's CUDA input as a tensor (a device-side copy).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_input(storage: &candle_core::CudaStorage, layout: &Layout) -> Result<Tensor> {
    use candle_core::backend::BackendStorage;
    input_tensor(Storage::Cuda(storage.try_clone(layout)?), layout)
}

/// A custom op's CUDA result.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_output(y: &Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    match output_storage(y)? {
        (Storage::Cuda(storage), shape) => Ok((storage, shape)),
        _ => bail!("custom op: CUDA input gave a result on another device"),
    }
}

/// A three-input custom op's CPU forward: `forward` of the inputs as tensors.
pub(crate) fn cpu_forward3(
    [(s0, l0), (s1, l1), (s2, l2)]: [(&CpuStorage, &Layout); 3],
    forward: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let input = |storage: &CpuStorage, layout| input_tensor(Storage::Cpu(storage.clone()), layout);
    cpu_output(&forward(&input(s0, l0)?, &input(s1, l1)?, &input(s2, l2)?)?)
}

/// [`cpu_forward3`] on CUDA.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_forward3(
    [(s0, l0), (s1, l1), (s2, l2)]: [(&candle_core::CudaStorage, &Layout); 3],
    forward: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    cuda_output(&forward(
        &cuda_input(s0, l0)?,
        &cuda_input(s1, l1)?,
        &cuda_input(s2, l2)?,
    )?)
}
