//! Gradient checkpointing: a block runs forward without keeping its
//! activations (no graph is built), and its backward recomputes the block
//! with a graph to get the gradients. candle has no such mechanism; a custom
//! op per block provides it. The op can hand back only its input's gradient,
//! so the gradients of the block's trainable tensors go to a side store that
//! the trainer merges with the main backward's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

use crate::bloom::{Block, BlockContext};
use crate::ops::{cpu_output, graph_free_input, input_tensor};

/// Gradients computed during recomputation, by tensor.
#[derive(Clone, Default)]
pub struct SideGradients(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl SideGradients {
    fn add(&self, tensor: &Tensor, grad: Tensor) -> Result<()> {
        let mut map = self.0.lock().expect("side gradients lock");
        let sum = match map.remove(&tensor.id()) {
            Some(previous) => (previous + grad)?,
            None => grad,
        };
        map.insert(tensor.id(), sum);
        Ok(())
    }

    pub fn take(&self, tensor: &Tensor) -> Option<Tensor> {
        self.0
            .lock()
            .expect("side gradients lock")
            .remove(&tensor.id())
    }
}

struct CheckpointedBlock {
    block: Block,
    context: BlockContext,
    side: SideGradients,
}

impl CustomOp1 for CheckpointedBlock {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input_tensor(Storage::Cpu(storage.clone()), layout)?;
        cpu_output(&self.block.forward(&x, &self.context, false)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let x = crate::ops::cuda_input(storage, layout)?;
        crate::ops::cuda_output(&self.block.forward(&x, &self.context, false)?)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.block.forward(x.as_tensor(), &self.context, true)?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        for tensor in self.block.trainable_tensors() {
            if let Some(grad) = grads.get(&tensor) {
                self.side.add(&tensor, grad.clone())?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// The block applied to `x` with recomputation in the backward pass.
pub(crate) fn checkpointed(
    block: &Block,
    x: &Tensor,
    context: BlockContext,
    side: &SideGradients,
) -> Result<Tensor> {
    let op = CheckpointedBlock {
        block: block.clone(),
        context,
        side: side.clone(),
    };
    graph_free_input(x)?.apply_op1(op)
}
