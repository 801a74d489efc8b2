//! Differentiable building blocks that candle 0.11 provides only as fused,
//! forward-only kernels.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor, bail};

/// Label of positions that carry no loss (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// LayerNorm over the last dimension, from differentiable ops. Computed in
/// f32 whatever the input's dtype (as PyTorch's bf16 kernel accumulates in
/// f32), returned in the input's dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normalized
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// Softmax over the last dimension. The row maximum is subtracted for
/// stability; it is detached because softmax is shift-invariant.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

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

/// `x · Wᵀ` for a frozen `W` `[out, in]`: the backward pass computes the
/// gradient of `x` only. candle's matmul backward would also compute `W`'s
/// gradient — for BLOOM's tied LM head alone a `[vocab, hidden]` product per
/// step — and throw it away.
struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_output(&self.forward(&input_tensor(Storage::Cpu(storage.clone()), layout)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.forward(&cuda_input(storage, layout)?)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// `x · Wᵀ` (`x`: `[n, in]`, `W`: `[out, in]`), computing no gradient for `W`
/// unless it is a trainable variable (full fine-tuning).
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.track_op() || weight.is_variable() {
        return x.matmul(&weight.t()?);
    }
    graph_free_input(x)?.apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul {
        weight: weight.clone(),
    })))
}

/// Next-token cross-entropy: logits `[b, s, v]` predict `labels[:, 1:]` from
/// positions `..s-1`; labels equal to [`IGNORE_INDEX`] do not count. Returns
/// the sum of the losses (f32 scalar) and the number of counted tokens.
pub fn next_token_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    let shifted = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate() {
        for (t, &label) in row.iter().enumerate().skip(1) {
            if label != IGNORE_INDEX {
                rows.push((i * (s - 1) + t - 1) as u32);
                targets.push(label as u32);
            }
        }
    }
    let count = rows.len();
    let device = logits.device();
    let picked = shifted.index_select(&Tensor::new(rows, device)?, 0)?;
    let log_probs = log_softmax_last_dim(&picked.to_dtype(DType::F32)?)?;
    let targets = Tensor::new(targets, device)?.unsqueeze(1)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?.sum_all()?;
    Ok((nll, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_and_softmax_match_hand_computation() {
        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu).unwrap();
        let ones = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        // mean 3, variance (4+1+0+9)/4 = 3.5
        let y: Vec<f32> = layer_norm(&x, &ones, &zeros, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected: Vec<f32> = [-2f32, -1., 0., 3.]
            .iter()
            .map(|v| v / 3.5f32.sqrt())
            .collect();
        for (a, b) in y.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6);
        }
        let p: Vec<f32> = softmax_last_dim(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let z: f32 = [1f32, 2., 3., 6.].iter().map(|v| v.exp()).sum();
        assert!((p[3] - 6f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn gradients_flow_through_layer_norm_and_softmax() {
        let x = candle_core::Var::new(&[[0.5f32, -1., 2.]], &Device::Cpu).unwrap();
        let w = candle_core::Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let b = candle_core::Var::new(&[0f32, 0., 0.], &Device::Cpu).unwrap();
        let y = softmax_last_dim(
            &layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap(),
        )
        .unwrap();
        let loss = y.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for v in [&x, &w, &b] {
            let g: Vec<f32> = grads
                .get(v.as_tensor())
                .expect("a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(g.iter().any(|g| g.abs() > 1e-6), "{g:?}");
        }
    }

    #[test]
    fn loss_ignores_labels_and_shifts() {
        // Uniform logits over 4 classes: every counted token costs ln 4.
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let (sum, count) = next_token_loss_sum(&logits, &[vec![0, 1, IGNORE_INDEX]]).unwrap();
        assert_eq!(count, 1);
        assert!((sum.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
    }
}
