//! Gradient checkpointing: a block runs forward without keeping its
//! activations (no graph is built), and its backward recomputes the block
//! with a graph to get the gradients. candle has no such mechanism; a custom
//! op per block provides it. The op can hand back only its input's gradient,
//! so the gradients of the block's trainable tensors go to a side store,
//! merged into the main backward's by [`SideGradients::backward`].
//!
//! Any architecture's block can be checkpointed: it only has to implement
//! [`Recompute`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

use crate::custom_op::{TensorOp1, apply_op1};

/// What checkpointing needs of a block: its forward pass, run with or
/// without a graph, and the trainable tensors it uses.
pub(crate) trait Recompute: Clone + Send + Sync + 'static {
    /// What the forward needs besides the input and the weights (masks,
    /// dropout draws); cheap to clone.
    type Context: Clone + Send + Sync + 'static;

    /// `track`: false while the block runs without a graph.
    fn forward(&self, x: &Tensor, context: &Self::Context, track: bool) -> Result<Tensor>;

    fn trainable_tensors(&self) -> Vec<Tensor>;
}

/// Gradients computed during recomputation, by tensor.
#[derive(Clone, Default)]
pub(crate) struct SideGradients(Arc<Mutex<HashMap<TensorId, (Tensor, Tensor)>>>);

impl SideGradients {
    fn add(&self, tensor: &Tensor, grad: Tensor) -> Result<()> {
        let mut map = self.0.lock().expect("side gradients lock");
        let sum = match map.remove(&tensor.id()) {
            Some((_, previous)) => (previous + grad)?,
            None => grad,
        };
        map.insert(tensor.id(), (tensor.clone(), sum));
        Ok(())
    }

    /// `loss.backward()` with the gradients that checkpointed blocks computed
    /// on the way added in (and taken out of the store).
    pub(crate) fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let side = std::mem::take(&mut *self.0.lock().expect("side gradients lock"));
        for (tensor, grad) in side.into_values() {
            let total = match grads.remove(&tensor) {
                Some(main) => (main + grad)?,
                None => grad,
            };
            grads.insert(&tensor, total);
        }
        Ok(grads)
    }
}

struct CheckpointedBlock<B: Recompute> {
    block: B,
    context: B::Context,
    side: SideGradients,
}

impl<B: Recompute> TensorOp1 for CheckpointedBlock<B> {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block.forward(x, &self.context, false)
    }

    fn backward(&self, arg: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
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

/// `block` applied to `x` with recomputation in the backward pass; the
/// gradients of its trainable tensors go to `side`.
pub(crate) fn checkpointed<B: Recompute>(
    block: &B,
    x: &Tensor,
    context: B::Context,
    side: &SideGradients,
) -> Result<Tensor> {
    let op = CheckpointedBlock {
        block: block.clone(),
        context,
        side: side.clone(),
    };
    apply_op1(op, x)
}
