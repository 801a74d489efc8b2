//! Plumbing shared by the custom ops (fused kernels, frozen linear layers,
//! checkpointed blocks): a custom op's storage as a graph-free tensor and
//! back.

use candle_core::op::BackpropOp;
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail,
};

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

/// A one-input op written with candle's tensor ops and a backward of its
/// own; [`apply_op1`] runs it as one custom op on any device.
pub(crate) trait TensorOp1: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Called with a graph-free input.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The input's gradient from the output's `grad`.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// `op(x)` as one node of the graph.
pub(crate) fn apply_op1(op: impl TensorOp1, x: &Tensor) -> Result<Tensor> {
    graph_free_input(x)?.apply_op1_arc(Arc::new(Box::new(Op1(op))))
}

/// The one `CustomOp1` implementation behind [`apply_op1`].
struct Op1<T>(T);

impl<T: TensorOp1> CustomOp1 for Op1<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_output(
            &self
                .0
                .forward(&input_tensor(Storage::Cpu(storage.clone()), layout)?)?,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.0.forward(&cuda_input(storage, layout)?)?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.0.backward(x, grad)
    }
}

/// A two-input op written with candle's tensor ops and a backward of its
/// own; [`apply_op2`] runs it as one custom op on any device.
pub(crate) trait TensorOp2: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Called with graph-free inputs.
    fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// Both inputs' gradients from the output's `grad`.
    fn backward(&self, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]>;
}

/// `op(a, b)` as one node of the graph.
pub(crate) fn apply_op2(op: impl TensorOp2, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    graph_free_input(a)?.apply_op2_arc(&graph_free_input(b)?, Arc::new(Box::new(Op2(op))))
}

/// The one `CustomOp2` implementation behind [`apply_op2`].
struct Op2<T>(T);

impl<T: TensorOp2> CustomOp2 for Op2<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input =
            |storage: &CpuStorage, layout| input_tensor(Storage::Cpu(storage.clone()), layout);
        cpu_output(&self.0.forward(&input(s1, l1)?, &input(s2, l2)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.0.forward(&cuda_input(s1, l1)?, &cuda_input(s2, l2)?)?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.0.backward(a, b, grad)?;
        Ok((ga, gb))
    }
}

/// A three-input op written with candle's tensor ops and a backward of its
/// own; [`apply_op3`] runs it as one custom op on any device.
pub(crate) trait TensorOp3: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Called with graph-free inputs.
    fn forward(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor>;
    /// The three inputs' gradients from the output's `grad`.
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]>;
}

/// `op(a, b, c)` as one node of the graph.
pub(crate) fn apply_op3(op: impl TensorOp3, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    graph_free_input(a)?.apply_op3_arc(
        &graph_free_input(b)?,
        &graph_free_input(c)?,
        Arc::new(Box::new(Op3(op))),
    )
}

/// The one `CustomOp3` implementation behind [`apply_op3`].
struct Op3<T>(T);

impl<T: TensorOp3> CustomOp3 for Op3<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input =
            |storage: &CpuStorage, layout| input_tensor(Storage::Cpu(storage.clone()), layout);
        cpu_output(
            &self
                .0
                .forward(&input(s1, l1)?, &input(s2, l2)?, &input(s3, l3)?)?,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.0.forward(
            &cuda_input(s1, l1)?,
            &cuda_input(s2, l2)?,
            &cuda_input(s3, l3)?,
        )?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.0.backward(a, b, c, grad)?;
        Ok((ga, gb, gc))
    }
}
