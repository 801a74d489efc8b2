//! Plumbing shared by the custom ops (fused kernels, frozen linear layers,
//! checkpointed blocks): ops written with tensor ops as candle custom ops.
//! An op holds its inputs without a graph and computes its forward pass
//! from them; candle's storage arguments would have to be copied into
//! tensors first (a whole layer input per linear layer).

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail,
};

/// `x` contiguous from offset 0 (copied if not): what the ops' forward
/// passes take, and what [`output_storage`] reads whole.
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
    /// Called with a graph-free, contiguous input.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The input's gradient from the output's `grad`.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// `op(x)` as one node of the graph.
pub(crate) fn apply_op1(op: impl TensorOp1, x: &Tensor) -> Result<Tensor> {
    let x = graph_free_input(x)?;
    let inputs = [x.detach()];
    x.apply_op1_arc(Arc::new(Box::new(Op1(op, inputs))))
}

/// The one `CustomOp1` implementation behind [`apply_op1`], holding its
/// input without a graph (see the module's note).
struct Op1<T>(T, [Tensor; 1]);

impl<T: TensorOp1> CustomOp1 for Op1<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_output(&self.0.forward(&self.1[0])?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.0.forward(&self.1[0])?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.0.backward(x, grad)
    }
}

/// A two-input op written with candle's tensor ops and a backward of its
/// own; [`apply_op2`] runs it as one custom op on any device.
pub(crate) trait TensorOp2: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Called with graph-free, contiguous inputs.
    fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// Both inputs' gradients from the output's `grad`.
    fn backward(&self, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]>;
}

/// `op(a, b)` as one node of the graph.
pub(crate) fn apply_op2(op: impl TensorOp2, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (graph_free_input(a)?, graph_free_input(b)?);
    let inputs = [a.detach(), b.detach()];
    a.apply_op2_arc(&b, Arc::new(Box::new(Op2(op, inputs))))
}

/// The one `CustomOp2` implementation behind [`apply_op2`], holding its
/// inputs without a graph (see the module's note).
struct Op2<T>(T, [Tensor; 2]);

impl<T: TensorOp2> CustomOp2 for Op2<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [a, b] = &self.1;
        cpu_output(&self.0.forward(a, b)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [a, b] = &self.1;
        cuda_output(&self.0.forward(a, b)?)
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
    /// Called with graph-free, contiguous inputs.
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
    let (a, b, c) = (
        graph_free_input(a)?,
        graph_free_input(b)?,
        graph_free_input(c)?,
    );
    let inputs = [a.detach(), b.detach(), c.detach()];
    a.apply_op3_arc(&b, &c, Arc::new(Box::new(Op3(op, inputs))))
}

/// The one `CustomOp3` implementation behind [`apply_op3`], holding its
/// inputs without a graph (see the module's note).
struct Op3<T>(T, [Tensor; 3]);

impl<T: TensorOp3> CustomOp3 for Op3<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [a, b, c] = &self.1;
        cpu_output(&self.0.forward(a, b, c)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [a, b, c] = &self.1;
        cuda_output(&self.0.forward(a, b, c)?)
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

/// Where an op that computes the gradients of tensors other than its inputs
/// (a block's adapters) leaves a pair of them for [`link_gradients`].
#[derive(Clone, Default)]
pub(crate) struct GradientSlot(Arc<Mutex<Option<[Tensor; 2]>>>);

impl GradientSlot {
    pub(crate) fn fill(&self, grads: [Tensor; 2]) {
        *self.0.lock().expect("not poisoned") = Some(grads);
    }
}

/// A one-element tensor: the start of a chain of [`link_gradients`], and
/// the gradient an op hands back for the chain's end.
pub(crate) fn gradient_token(device: &candle_core::Device) -> Result<Tensor> {
    Tensor::zeros(1, candle_core::DType::F32, device)
}

/// `token` (a one-element tensor) passed on through an op whose other
/// inputs are `pair`: its backward hands out the gradients `slot` holds by
/// then. An op that takes the link's output as an input is thereby upstream
/// of it, so candle's backward pass runs that op's backward first, and
/// `loss.backward()` carries the pair's gradients like any others.
pub(crate) fn link_gradients(
    token: &Tensor,
    pair: [&Tensor; 2],
    slot: &GradientSlot,
) -> Result<Tensor> {
    apply_op3(GradientLink(slot.clone()), token, pair[0], pair[1])
}

struct GradientLink(GradientSlot);

impl TensorOp3 for GradientLink {
    fn name(&self) -> &'static str {
        "gradient-link"
    }

    fn forward(&self, token: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        Ok(token.clone())
    }

    fn backward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let Some([first, second]) = (self.0).0.lock().expect("not poisoned").take() else {
            bail!("gradient-link: the op downstream of it left no gradients");
        };
        Ok([Some(grad.clone()), Some(first), Some(second)])
    }
}
