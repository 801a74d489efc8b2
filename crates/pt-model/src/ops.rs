//! Differentiable building blocks that candle 0.11 provides only as fused,
//! forward-only kernels.

use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor, bail,
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::fused::{self, AttentionBias};

/// Label of positions that carry no loss (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;

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

/// A LoRA adapter's part in a linear layer's forward pass: `scale · (drop(x)
/// Aᵀ) Bᵀ`, in f32 as PEFT computes it.
#[derive(Clone)]
pub struct LoraPass {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the adapter's input; the backward pass draws the mask
    /// again instead of keeping it.
    pub dropout: Option<Dropout>,
}

/// An inverted-dropout mask: probability `p`, drawn from `seed` as the
/// elements from `first_element` on of a larger input. A rank's share of a
/// data-parallel batch thus draws exactly the mask its rows would have had
/// in the whole batch.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
    pub first_element: usize,
}

/// Mask elements per random stream: element `e` is word `e % MASK_TASK` of
/// stream `e / MASK_TASK`, so the mask depends neither on the thread count
/// nor on where the input starts in the batch.
const MASK_TASK: usize = 1 << 16;

/// What [`FrozenLinear`] keeps of a [`LoraPass`]: A and B are the op's
/// inputs, so the op holds only the scale and the dropout.
#[derive(Clone, Copy)]
struct LoraSettings {
    scale: f64,
    dropout: Option<Dropout>,
}

impl LoraPass {
    fn settings(&self) -> LoraSettings {
        LoraSettings {
            scale: self.scale,
            dropout: self.dropout,
        }
    }
}

impl LoraSettings {
    /// The inverted-dropout mask for an input of `x`'s shape (0 or 1/keep),
    /// or `None` without dropout.
    fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(Dropout {
            p,
            seed,
            first_element,
        }) = self.dropout
        else {
            return Ok(None);
        };
        let keep = 1.0 - p;
        let threshold = (keep * u32::MAX as f64) as u32;
        let kept = (1.0 / keep) as f32;
        let mut mask = vec![0f32; x.elem_count()];
        // Pieces that each lie within one stream, drawn in parallel.
        let mut pieces = Vec::new();
        let (mut rest, mut at) = (mask.as_mut_slice(), first_element);
        while !rest.is_empty() {
            let length = (MASK_TASK - at % MASK_TASK).min(rest.len());
            let (piece, tail) = rest.split_at_mut(length);
            pieces.push((at, piece));
            (rest, at) = (tail, at + length);
        }
        pieces.into_par_iter().for_each(|(at, piece)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream((at / MASK_TASK) as u64);
            rng.set_word_pos((at % MASK_TASK) as u128);
            for m in piece {
                *m = if rng.random::<u32>() < threshold {
                    kept
                } else {
                    0.0
                };
            }
        });
        Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?))
    }
}

/// `x ⊙ mask`, or `x` without a mask.
fn masked(x: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        Some(mask) => x * mask,
        None => Ok(x),
    }
}

/// `x Wᵀ (+ bias) (+ LoRA)` for a frozen `W` `[out, in]` and `x` `[n, in]`.
/// As one op, its backward computes the gradients of `x` and of the
/// adapter only: candle's matmul backward would also compute `W`'s (for
/// BLOOM's tied LM head alone a `[vocab, hidden]` product per step) and
/// throw it away, and its graph would keep every intermediate tensor.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Scale and dropout of the adapter, whose A and B are the op's 2nd and 3rd inputs.
    lora: Option<LoraSettings>,
}

impl FrozenLinear {
    fn forward(&self, x: &Tensor, lora: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let mut y = x.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let (Some(pass), Some((a, b))) = (&self.lora, lora) {
            // The sum is rounded back to the base layer's dtype, as PEFT does;
            // the scale applies to the narrow `[n, r]` product.
            let x = x.to_dtype(DType::F32)?;
            let input = masked(x.clone(), pass.dropout_mask(&x)?.as_ref())?;
            let update = (input.matmul(&a.t()?)? * pass.scale)?.matmul(&b.t()?)?;
            y = (y.to_dtype(DType::F32)? + update)?.to_dtype(self.weight.dtype())?;
        }
        Ok(y)
    }

    /// Gradients of `x` and, with an adapter, of its A and B.
    fn backward(
        &self,
        x: &Tensor,
        lora: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        // Detached: a gradient that carried a graph would keep every tensor
        // it was computed from alive until the whole backward pass ends.
        let (x, grad) = (x.detach(), grad.detach());
        let base = grad.matmul(&self.weight)?;
        let (Some(pass), Some((a, b))) = (&self.lora, lora) else {
            return Ok((base, None));
        };
        let (a, b) = (&a.detach(), &b.detach());
        let grad = grad.to_dtype(DType::F32)?;
        let x32 = x.to_dtype(DType::F32)?;
        let mask = pass.dropout_mask(&x32)?;
        let input = masked(x32, mask.as_ref())?;
        let grad_b = grad.t()?.matmul(&(input.matmul(&a.t()?)? * pass.scale)?)?;
        let grad_down = (grad.matmul(b)? * pass.scale)?;
        let grad_a = grad_down.t()?.matmul(&input)?;
        let grad_x = (base.to_dtype(DType::F32)? + masked(grad_down.matmul(a)?, mask.as_ref())?)?
            .to_dtype(x.dtype())?;
        Ok((grad_x, Some((grad_a, grad_b))))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_output(&self.forward(&input_tensor(Storage::Cpu(storage.clone()), layout)?, None)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_output(&self.forward(&cuda_input(storage, layout)?, None)?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, grad)?.0))
    }
}

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = input_tensor(Storage::Cpu(xs.clone()), xl)?;
        let a = input_tensor(Storage::Cpu(a_s.clone()), al)?;
        let b = input_tensor(Storage::Cpu(bs.clone()), bl)?;
        cpu_output(&self.forward(&x, Some((&a, &b)))?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (x, a, b) = (
            cuda_input(xs, xl)?,
            cuda_input(a_s, al)?,
            cuda_input(bs, bl)?,
        );
        cuda_output(&self.forward(&x, Some((&a, &b)))?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_lora) = self.backward(x, Some((a, b)), grad)?;
        let (grad_a, grad_b) = grad_lora.expect("an adapter's gradients");
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

/// `x Wᵀ + bias` with a trainable `W` (full fine-tuning) as one op whose
/// backward hands out detached gradients: through candle's ops each weight
/// gradient would carry its graph, keeping the layer's activations alive
/// until the whole backward pass ends.
struct TrainableLinear;

impl TrainableLinear {
    fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        x.matmul(&weight.t()?)?.broadcast_add(bias)
    }
}

impl CustomOp3 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = input_tensor(Storage::Cpu(xs.clone()), xl)?;
        let w = input_tensor(Storage::Cpu(ws.clone()), wl)?;
        let b = input_tensor(Storage::Cpu(bs.clone()), bl)?;
        cpu_output(&Self::forward(&x, &w, &b)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (x, w, b) = (
            cuda_input(xs, xl)?,
            cuda_input(ws, wl)?,
            cuda_input(bs, bl)?,
        );
        cuda_output(&Self::forward(&x, &w, &b)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, weight, grad) = (x.detach(), weight.detach(), grad.detach());
        Ok((
            Some(grad.matmul(&weight)?),
            Some(grad.t()?.matmul(&x)?),
            Some(grad.sum(0)?),
        ))
    }
}

/// `x Wᵀ (+ bias) (+ LoRA)` (`x`: `[n, in]`, `W`: `[out, in]`). A frozen `W`
/// gets no gradient (see [`FrozenLinear`]); a trainable one (full
/// fine-tuning) gets it from [`TrainableLinear`].
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LoraPass>,
) -> Result<Tensor> {
    let op = FrozenLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
        lora: lora.as_ref().map(LoraPass::settings),
    };
    let adapter = lora.as_ref().map(|l| (&l.a, &l.b));
    let tracked = x.track_op() || adapter.is_some_and(|(a, b)| a.track_op() || b.track_op());
    if let (true, Some(bias), None) = (weight.is_variable(), bias, &lora) {
        return graph_free_input(x)?.apply_op3_arc(
            &graph_free_input(weight)?,
            &graph_free_input(bias)?,
            Arc::new(Box::new(TrainableLinear)),
        );
    }
    if weight.is_variable() || !tracked {
        return op.forward(x, adapter);
    }
    let x = graph_free_input(x)?;
    match lora {
        None => x.apply_op1_arc(Arc::new(Box::new(op))),
        Some(pass) => x.apply_op3_arc(
            &graph_free_input(&pass.a)?,
            &graph_free_input(&pass.b)?,
            Arc::new(Box::new(op)),
        ),
    }
}

/// `x · Wᵀ` (`x`: `[n, in]`, `W`: `[out, in]`), computing no gradient for `W`
/// unless it is a trainable variable (full fine-tuning).
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    linear(x, weight, None, None)
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

/// Logit elements computed at once by [`lm_head_loss_sum`] (16 MiB in f32)...
const LOSS_CHUNK_ELEMENTS: usize = 1 << 22;
/// ...but at least this many rows, so that each chunk's matmul stays efficient.
const LOSS_CHUNK_MIN_ROWS: usize = 64;

/// Sum of cross-entropies of the final hidden states `[n, h]` through the LM
/// head `weight` `[vocab, h]` (BLOOM's tied embedding): row `i` predicts
/// `targets[i]` (`None`: no loss). Returns the sum (f32 scalar) and the number
/// of counted rows.
///
/// The logits exist a chunk of rows at a time: this computes each chunk's
/// gradient (softmax − one-hot, times `weight`) on the way and attaches the
/// gradients of `hidden`, and of `weight` when it trains, to the result with
/// a term whose value is zero. The backward pass never sees `[n, vocab]`
/// logits, which for bloomz-560m at 4 × 512 tokens would be 2 GB, kept.
pub fn lm_head_loss_sum(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[Option<u32>],
) -> Result<(Tensor, usize)> {
    let rows = (LOSS_CHUNK_ELEMENTS / weight.dim(0)?).max(LOSS_CHUNK_MIN_ROWS);
    loss_sum_in_chunks(hidden, weight, targets, rows)
}

/// [`lm_head_loss_sum`], `rows` rows of logits at a time.
fn loss_sum_in_chunks(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[Option<u32>],
    rows: usize,
) -> Result<(Tensor, usize)> {
    let (n, h) = hidden.dims2()?;
    let device = hidden.device();
    let (grad_hidden, grad_weight) = (hidden.track_op(), weight.track_op());
    let (hidden_values, weight_values) = (hidden.detach(), weight.detach());
    let rows = rows.clamp(1, n.max(1));
    let mut loss_sum = 0f64;
    let mut hidden_grads = Vec::new();
    let mut weight_grad: Option<Tensor> = None;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let chunk_targets = &targets[start..start + len];
        if chunk_targets.iter().all(Option::is_none) {
            if grad_hidden {
                hidden_grads.push(Tensor::zeros((len, h), hidden.dtype(), device)?);
            }
            continue;
        }
        let inputs = hidden_values.narrow(0, start, len)?;
        let logits = inputs.matmul(&weight_values.t()?)?.to_dtype(DType::F32)?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
        let exp = shifted.exp()?;
        let sums = exp.sum_keepdim(1)?;
        let index: Vec<u32> = chunk_targets.iter().map(|t| t.unwrap_or(0)).collect();
        let index = Tensor::from_vec(index, (len, 1), device)?;
        let counted: Vec<f32> = chunk_targets
            .iter()
            .map(|t| f32::from(t.is_some() as u8))
            .collect();
        let counted = Tensor::from_vec(counted, (len, 1), device)?;
        let losses = (sums.log()? - shifted.gather(&index, 1)?)?.mul(&counted)?;
        loss_sum += losses.sum_all()?.to_scalar::<f32>()? as f64;
        if !(grad_hidden || grad_weight) {
            continue;
        }
        // d loss / d logits = softmax − one-hot, on counted rows only.
        let grad_logits = exp
            .broadcast_div(&sums)?
            .scatter_add(&index, &counted.neg()?, 1)?
            .broadcast_mul(&counted)?
            .to_dtype(weight.dtype())?;
        if grad_hidden {
            hidden_grads.push(grad_logits.matmul(&weight_values)?);
        }
        if grad_weight {
            let grad = grad_logits.t()?.matmul(&inputs)?;
            weight_grad = Some(match weight_grad {
                Some(total) => (total + grad)?,
                None => grad,
            });
        }
    }
    let count = targets.iter().filter(|t| t.is_some()).count();
    let mut loss = Tensor::new(loss_sum as f32, device)?;
    // `t − t.detach()` is zero, and its gradient is `t`'s: each term hands
    // its tensor the gradient computed above.
    let mut attach = |tensor: &Tensor, grad: Tensor| -> Result<()> {
        let term = (tensor * grad.to_dtype(tensor.dtype())?)?
            .sum_all()?
            .to_dtype(DType::F32)?;
        loss = (&loss + (&term - term.detach())?)?;
        Ok(())
    };
    if grad_hidden {
        attach(hidden, Tensor::cat(&hidden_grads, 0)?)?;
    }
    if let Some(grad) = weight_grad {
        attach(weight, grad)?;
    }
    Ok((loss, count))
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

    #[test]
    fn a_share_of_a_batch_draws_its_rows_of_the_whole_batchs_mask() {
        let settings = |first_element| LoraSettings {
            scale: 1.0,
            dropout: Some(Dropout {
                p: 0.1,
                seed: 99,
                first_element,
            }),
        };
        let mask = |rows: usize, first_row: usize| -> Vec<f32> {
            let x = Tensor::zeros((rows, 1000), DType::F32, &Device::Cpu).unwrap();
            settings(first_row * 1000)
                .dropout_mask(&x)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // 200 rows span several streams; the split at row 77 is not aligned to one.
        let whole = mask(200, 0);
        let (head, tail) = (mask(77, 0), mask(123, 77));
        assert_eq!(whole[..77_000], head[..]);
        assert_eq!(whole[77_000..], tail[..]);
        assert_ne!(head[..1000], tail[..1000]);
    }

    #[test]
    fn frozen_linear_with_lora_and_dropout_equals_the_composite() {
        use crate::fused::tests::{assert_same_function, random};
        let (weight, bias) = (random(&[24, 40], 11), random(&[24], 12));
        let pass = |a: &Tensor, b: &Tensor| LoraPass {
            a: a.clone(),
            b: b.clone(),
            scale: 2.0,
            dropout: Some(Dropout {
                p: 0.3,
                seed: 7,
                first_element: 0,
            }),
        };
        let inputs = [
            random(&[70, 40], 13),
            random(&[4, 40], 14),
            random(&[24, 4], 15),
        ];
        assert_same_function(
            &inputs,
            |t| linear(&t[0], &weight, Some(&bias), Some(pass(&t[1], &t[2]))).unwrap(),
            |t| {
                let lora = pass(&t[1], &t[2]);
                let mask = lora.settings().dropout_mask(&t[0]).unwrap().unwrap();
                let kept = mask
                    .ne(0f32)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .mean_all()
                    .unwrap();
                // About 70% kept, so the mask is a real dropout mask.
                assert!((kept.to_scalar::<f32>().unwrap() - 0.7).abs() < 0.05);
                let base = t[0]
                    .matmul(&weight.t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                let update = (&t[0] * &mask).unwrap().matmul(&t[1].t().unwrap()).unwrap();
                (base + (update.matmul(&t[2].t().unwrap()).unwrap() * 2.0).unwrap()).unwrap()
            },
            1e-4,
        );
    }

    #[test]
    fn chunked_lm_head_loss_equals_the_loss_of_full_logits() {
        use crate::fused::tests::{max_difference, random};
        use candle_core::Var;
        // 150 rows in 3 chunks (64, 64, 22 rows).
        let (n, h, vocab) = (150, 16, 2048);
        let hidden = Var::from_tensor(&random(&[n, h], 21)).unwrap();
        let weight = Var::from_tensor(&random(&[vocab, h], 22)).unwrap();
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    (i * 13) % vocab as i64
                }
            })
            .collect();
        let targets: Vec<Option<u32>> = (1..=n)
            .map(|t| {
                labels
                    .get(t)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .map(|&l| l as u32)
            })
            .collect();
        let (chunked, count) =
            loss_sum_in_chunks(hidden.as_tensor(), weight.as_tensor(), &targets, 64).unwrap();
        let logits = hidden
            .as_tensor()
            .matmul(&weight.as_tensor().t().unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (full, full_count) = next_token_loss_sum(&logits, &[labels]).unwrap();
        assert_eq!(count, full_count);
        let (a, b) = (
            chunked.to_scalar::<f32>().unwrap(),
            full.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let (grads, full_grads) = (chunked.backward().unwrap(), full.backward().unwrap());
        for var in [&hidden, &weight] {
            let (g, f) = (
                grads.get(var.as_tensor()).unwrap(),
                full_grads.get(var.as_tensor()).unwrap(),
            );
            assert!(max_difference(g, f) < 1e-5, "{}", max_difference(g, f));
        }
    }

    #[test]
    fn trainable_linear_equals_candles_ops() {
        use crate::fused::tests::{assert_same_function, random};
        let inputs = [
            random(&[70, 40], 31),
            random(&[24, 40], 32),
            random(&[24], 33),
        ];
        assert_same_function(
            &inputs,
            |t| linear(&t[0], &t[1], Some(&t[2]), None).unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            1e-5,
        );
    }
}
