//! Differentiable building blocks that candle 0.11 provides only as fused,
//! forward-only kernels: LayerNorm, GELU, softmax and the attention softmax.
//! Fused on the CPU (`fused`), from candle's differentiable ops elsewhere.

use std::sync::Arc;

use candle_core::{D, DType, Result, Tensor};

use crate::fused::{self, AttentionBias};

/// LayerNorm over the last dimension. Computed in f32 whatever the input's
/// dtype (as PyTorch's bf16 kernel accumulates in f32), returned in the
/// input's dtype. Fused on the CPU.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::applies(x) && fused::applies(weight) && fused::applies(bias) {
        return fused::layer_norm_op(x, weight, bias, eps);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] from candle's differentiable ops.
pub(crate) fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
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

/// RMSNorm over the last dimension as HF's Llama/Qwen `RMSNorm` computes it:
/// statistics in f32, the normalised input rounded back to its dtype, then
/// scaled by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::applies(x) && fused::applies(weight) {
        return fused::rms_norm_op(x, weight, eps);
    }
    rms_norm_composite(x, weight, eps)
}

/// [`rms_norm`] from candle's differentiable ops.
pub(crate) fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normalized = x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    normalized.to_dtype(dtype)?.broadcast_mul(weight)
}

/// SwiGLU: `silu(gate) ⊙ up`. Fused on the CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused::applies(gate) && fused::applies(up) {
        return fused::swiglu_op(gate, up);
    }
    swiglu_composite(gate, up)
}

/// [`swiglu`] from candle's differentiable ops.
pub(crate) fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// BLOOM's GELU (tanh approximation). Fused on the CPU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused::applies(x) {
        return fused::gelu_op(x);
    }
    x.gelu()
}

/// Attention probabilities `[b, heads, q, keys]` from raw `q·kᵀ` scores:
/// `softmax(scores · scale + ALiBi + mask)` in f32, as HF computes them
/// (its mask's f32::MIN would round to -inf in bf16 and turn fully padded
/// rows into NaN). Fused on the CPU; elsewhere from `composite`, the bias's
/// tensors ([`AttentionBias::tensors`]).
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    bias: &Arc<AttentionBias>,
    composite: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    if fused::applies(scores) {
        return fused::attention_softmax_op(scores, scale, bias);
    }
    attention_probs_composite(scores, scale, bias, composite)
}

/// [`attention_probs`] from candle's differentiable ops.
pub(crate) fn attention_probs_composite(
    scores: &Tensor,
    scale: f64,
    bias: &AttentionBias,
    composite: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let (alibi, additive) = match composite {
        Some(tensors) => tensors.clone(),
        None => bias.tensors(scores.device())?,
    };
    softmax_last_dim(
        &(scores * scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(&alibi)?
            .broadcast_add(&additive)?,
    )
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
}
