//! Linear layers as custom ops: a frozen weight (with an optional LoRA
//! adapter and its dropout) that gets no gradient, and a trainable weight
//! (full fine-tuning) whose gradients carry no graph.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::bf16::Bf16Weight;
use crate::custom_op::{TensorOp1, TensorOp2, TensorOp3, apply_op1, apply_op2, apply_op3};
use crate::nf4::Nf4Weight;
use crate::product::{add_product, matmul};

/// A linear layer's `[out, in]` weight: dense (frozen, or trainable in full
/// fine-tuning), NF4 (frozen, QLoRA's base), or bf16 multiplied in f32
/// (frozen, on the CPU).
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Nf4(Arc<Nf4Weight>),
    Bf16(Arc<Bf16Weight>),
}

impl LinearWeight {
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            LinearWeight::Dense(weight) => weight.dims2(),
            LinearWeight::Nf4(weight) => Ok(weight.shape),
            LinearWeight::Bf16(weight) => Ok(weight.shape),
        }
    }

    /// The weight's values in f32 on `device` (NF4: dequantised).
    pub fn to_f32(&self, device: &Device) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(weight) => weight.to_dtype(DType::F32)?.to_device(device),
            LinearWeight::Nf4(weight) => weight.dequantize(DType::F32, device),
            LinearWeight::Bf16(weight) => weight.to_dtype(DType::F32, device),
        }
    }

    /// The dtype of `x Wᵀ`: the weight's, or for NF4 and bf16 `x`'s
    /// (bitsandbytes computes in its compute dtype and casts the result back;
    /// a bf16 weight is multiplied in f32).
    fn output_dtype(&self, x: &Tensor) -> DType {
        match self {
            LinearWeight::Dense(weight) => weight.dtype(),
            LinearWeight::Nf4(_) | LinearWeight::Bf16(_) => x.dtype(),
        }
    }

    /// `x Wᵀ (+ bias)`; NF4 as bitsandbytes' `matmul_4bit`: `x`, the
    /// dequantised weight and the bias in the compute dtype.
    fn product(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(weight) => dense_product(x, weight, bias),
            LinearWeight::Nf4(weight) => {
                let dtype = weight.compute_dtype;
                let mut y = weight.matmul_transposed(&x.to_dtype(dtype)?)?;
                if let Some(bias) = bias {
                    y = y.broadcast_add(&bias.to_dtype(dtype)?)?;
                }
                y.to_dtype(x.dtype())
            }
            LinearWeight::Bf16(weight) => {
                let mut y = weight.matmul_transposed(x)?;
                if let Some(bias) = bias {
                    y = y.broadcast_add(&bias.to_dtype(DType::F32)?)?;
                }
                y.to_dtype(x.dtype())
            }
        }
    }

    /// `grad W`, the gradient of `x` (in `x`'s dtype for NF4 and bf16).
    fn input_gradient(&self, grad: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(weight) => matmul(grad, weight),
            LinearWeight::Nf4(weight) => weight
                .matmul(&grad.to_dtype(weight.compute_dtype)?)?
                .to_dtype(x.dtype()),
            LinearWeight::Bf16(weight) => weight.matmul(grad)?.to_dtype(x.dtype()),
        }
    }

    /// `total + grad W` in f32 (`total`: `[n, in]` in f32, no other
    /// tensor's storage); a dense f32 weight's product is added into `total`.
    fn add_input_gradient(&self, total: Tensor, grad: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(weight) if weight.dtype() == DType::F32 => {
                add_product(total, grad, weight)
            }
            _ => total + self.input_gradient(grad, x)?.to_dtype(DType::F32)?,
        }
    }
}

/// `x Wᵀ (+ bias)` (`x`: `[n, in]`). On the CPU in f32 gemm adds the product
/// into rows of the bias, instead of a pass over the product adding it.
pub(crate) fn dense_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(bias) if crate::fused::applies(bias) && !bias.track_op() => {
            let (bias, n) = (bias.to_vec1::<f32>()?, x.dim(0)?);
            let rows = Tensor::from_vec(repeated_rows(&bias, n), (n, bias.len()), &Device::Cpu)?;
            add_product(rows, x, &weight.t()?)
        }
        Some(bias) => matmul(x, &weight.t()?)?.broadcast_add(bias),
        None => matmul(x, &weight.t()?),
    }
}

/// `count` copies of `row`, one after another, written in parallel into
/// fresh memory (a zeroed vector would be written twice).
fn repeated_rows(row: &[f32], count: usize) -> Vec<f32> {
    let mut rows = Vec::with_capacity(count * row.len());
    rows.spare_capacity_mut()[..count * row.len()]
        .par_chunks_mut(row.len().max(1))
        .for_each(|copy| {
            for (value, &x) in copy.iter_mut().zip(row) {
                value.write(x);
            }
        });
    // SAFETY: the loop above wrote every one of these values.
    #[allow(unsafe_code)]
    unsafe {
        rows.set_len(count * row.len())
    };
    rows
}

/// A LoRA adapter's part in a linear layer's forward pass: `scale · (drop(x)
/// Aᵀ) Bᵀ`, in f32 as PEFT computes it; with a magnitude, DoRA's (see
/// [`dora_linear`]).
#[derive(Clone)]
pub struct LoraPass {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// DoRA's magnitude vector `[out]`.
    pub magnitude: Option<Tensor>,
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

/// Mask words a stream hands out at a time.
const WORDS_AT_ONCE: usize = 256;

/// What [`FrozenLinear`] keeps of a [`LoraPass`]: A and B are the op's
/// inputs, so the op holds only the scale and the dropout.
#[derive(Clone, Copy)]
pub(crate) struct LoraSettings {
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

impl Dropout {
    /// The mask of `count` input elements (0 or 1/keep), handed out a block
    /// at a time: `apply(first, masks, out)` writes the block's `out` from
    /// its `masks`, `first` being the index of its first element.
    fn draw(&self, count: usize, apply: impl Fn(usize, &[f32], &mut [f32]) + Sync) -> Vec<f32> {
        let keep = 1.0 - self.p;
        let threshold = (keep * u32::MAX as f64) as u32;
        let kept = (1.0 / keep) as f32;
        let mut out = vec![0f32; count];
        // Pieces that each lie within one stream, drawn in parallel.
        let mut pieces = Vec::new();
        let (mut rest, mut at) = (out.as_mut_slice(), self.first_element);
        while !rest.is_empty() {
            let length = (MASK_TASK - at % MASK_TASK).min(rest.len());
            let (piece, tail) = rest.split_at_mut(length);
            pieces.push((at, piece));
            (rest, at) = (tail, at + length);
        }
        pieces.into_par_iter().for_each(|(at, piece)| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream((at / MASK_TASK) as u64);
            rng.set_word_pos((at % MASK_TASK) as u128);
            // The stream's words drawn a block at a time (the same words, in
            // order, as one `random::<u32>()` each), so the loops vectorise.
            let (mut words, mut masks) = ([0u32; WORDS_AT_ONCE], [0f32; WORDS_AT_ONCE]);
            for (block, out) in piece.chunks_mut(WORDS_AT_ONCE).enumerate() {
                let (words, masks) = (&mut words[..out.len()], &mut masks[..out.len()]);
                rng.fill(words);
                for (mask, &word) in masks.iter_mut().zip(words.iter()) {
                    *mask = if word < threshold { kept } else { 0.0 };
                }
                apply(at - self.first_element + block * WORDS_AT_ONCE, masks, out);
            }
        });
        out
    }
}

impl LoraSettings {
    /// The inverted-dropout mask for an input of `x`'s shape (0 or 1/keep),
    /// or `None` without dropout.
    fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(dropout) = self.dropout else {
            return Ok(None);
        };
        let mask = dropout.draw(x.elem_count(), |_, masks, out| out.copy_from_slice(masks));
        Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?))
    }

    /// `x ⊙ mask` (`x` itself without dropout); on the CPU in f32, for an
    /// `x` without a graph, drawn and applied in one pass with no mask tensor.
    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let Some(dropout) = self.dropout else {
            return Ok(x.clone());
        };
        if !crate::fused::applies(x) || x.track_op() {
            let mask = self.dropout_mask(x)?.expect("dropout");
            return x * mask;
        }
        let dropped = crate::fused::with_values(x, |values| {
            dropout.draw(values.len(), |first, masks, out| {
                let values = &values[first..first + out.len()];
                for ((out, &x), &mask) in out.iter_mut().zip(values).zip(masks) {
                    *out = x * mask;
                }
            })
        })?;
        Tensor::from_vec(dropped, x.shape(), &Device::Cpu)
    }
}

/// `x Wᵀ (+ bias) (+ LoRA)` for a frozen `W` `[out, in]` and `x` `[n, in]`.
/// As one op, its backward computes the gradients of `x` and of the
/// adapter only: candle's matmul backward would also compute `W`'s (for
/// BLOOM's tied LM head alone a `[vocab, hidden]` product per step) and
/// throw it away, and its graph would keep every intermediate tensor.
pub(crate) struct FrozenLinear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Scale and dropout of the adapter, whose A and B are the op's 2nd and 3rd inputs.
    lora: Option<LoraSettings>,
}

impl FrozenLinear {
    /// The layer of `weight` (frozen) and `bias`, with `lora`'s scale and
    /// dropout where it has an adapter; `None` for DoRA, whose magnitude
    /// this op does not differentiate.
    pub(crate) fn new(
        weight: &LinearWeight,
        bias: Option<&Tensor>,
        lora: Option<&LoraPass>,
    ) -> Option<Self> {
        lora.is_none_or(|pass| pass.magnitude.is_none())
            .then(|| Self {
                weight: weight.clone(),
                bias: bias.cloned(),
                lora: lora.map(LoraPass::settings),
            })
    }

    /// `x Wᵀ (+ bias) (+ the adapter of A and B)`, `x` `[n, in]`.
    pub(crate) fn forward(&self, x: &Tensor, lora: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let y = self.weight.product(x, self.bias.as_ref())?;
        let (Some(pass), Some((a, b))) = (&self.lora, lora) else {
            return Ok(y);
        };
        // The sum is rounded back to the base layer's dtype, as PEFT does;
        // the scale applies to the narrow `[n, r]` product.
        let dtype = y.dtype();
        let down = (matmul(&pass.drop(&x.to_dtype(DType::F32)?)?, &a.t()?)? * pass.scale)?;
        add_product(y.to_dtype(DType::F32)?, &down, &b.t()?)?.to_dtype(dtype)
    }

    /// Gradients of `x` and, with an adapter, of its A and B.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        lora: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        // Detached: a gradient that carried a graph would keep every tensor
        // it was computed from alive until the whole backward pass ends.
        let (x, grad) = (x.detach(), grad.detach());
        let (Some(pass), Some((a, b))) = (&self.lora, lora) else {
            return Ok((self.weight.input_gradient(&grad, &x)?, None));
        };
        let (a, b) = (&a.detach(), &b.detach());
        let grad32 = grad.to_dtype(DType::F32)?;
        // One draw of the mask for both products it enters.
        let mask = pass.dropout_mask(&x)?;
        let masked = |t: Tensor| match &mask {
            Some(mask) => t * mask,
            None => Ok(t),
        };
        let input = masked(x.to_dtype(DType::F32)?)?;
        let grad_b = matmul(&grad32.t()?, &(matmul(&input, &a.t()?)? * pass.scale)?)?;
        let grad_down = (matmul(&grad32, b)? * pass.scale)?;
        let grad_a = matmul(&grad_down.t()?, &input)?;
        let through_adapter = masked(matmul(&grad_down, a)?)?;
        let grad_x = self
            .weight
            .add_input_gradient(through_adapter, &grad, &x)?
            .to_dtype(x.dtype())?;
        Ok((grad_x, Some((grad_a, grad_b))))
    }
}

/// Without an adapter.
impl TensorOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FrozenLinear::forward(self, x, None)
    }

    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(FrozenLinear::backward(self, x, None, grad)?.0))
    }
}

/// With an adapter, whose A and B are the op's second and third inputs.
impl TensorOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-lora"
    }

    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        FrozenLinear::forward(self, x, Some((a, b)))
    }

    fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let (grad_x, grad_lora) = FrozenLinear::backward(self, x, Some((a, b)), grad)?;
        let (grad_a, grad_b) = grad_lora.expect("an adapter's gradients");
        Ok([Some(grad_x), Some(grad_a), Some(grad_b)])
    }
}

/// `x Wᵀ + bias` with a trainable `W` (full fine-tuning) as one op whose
/// backward hands out detached gradients: through candle's ops each weight
/// gradient would carry its graph, keeping the layer's activations alive
/// until the whole backward pass ends.
struct TrainableLinear;

impl TensorOp3 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear"
    }

    fn forward(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        dense_product(x, weight, Some(bias))
    }

    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let [grad_x, grad_weight] = trained_linear_gradients(x, weight, grad)?;
        Ok([
            Some(grad_x),
            Some(grad_weight),
            Some(crate::fused::column_sums(grad)?),
        ])
    }
}

/// The gradients of `x` `[n, in]` and of a trained weight `W` `[out, in]`
/// from `grad` `[n, out]`, detached.
pub(crate) fn trained_linear_gradients(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
) -> Result<[Tensor; 2]> {
    let (x, weight, grad) = (x.detach(), weight.detach(), grad.detach());
    Ok([matmul(&grad, &weight)?, matmul(&grad.t()?, &x)?])
}

/// Without a bias (the Llama family's layers).
impl TensorOp2 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear-no-bias"
    }

    fn forward(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        matmul(x, &weight.t()?)
    }

    fn backward(&self, x: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        Ok(trained_linear_gradients(x, weight, grad)?.map(Some))
    }
}

/// `x Wᵀ (+ bias) (+ LoRA)` (`x`: `[n, in]`, `W`: `[out, in]`). A frozen `W`
/// gets no gradient (see [`FrozenLinear`]); a trainable one (full
/// fine-tuning) gets it from [`TrainableLinear`].
pub fn linear(
    x: &Tensor,
    weight: &LinearWeight,
    bias: Option<&Tensor>,
    lora: Option<LoraPass>,
) -> Result<Tensor> {
    let Some(op) = FrozenLinear::new(weight, bias, lora.as_ref()) else {
        let pass = lora
            .as_ref()
            .expect("only an adapter makes a layer no FrozenLinear");
        return dora_linear(x, weight, bias, pass);
    };
    let adapter = lora.as_ref().map(|l| (&l.a, &l.b));
    let tracked = x.track_op() || adapter.is_some_and(|(a, b)| a.track_op() || b.track_op());
    let trainable = match weight {
        LinearWeight::Dense(weight) if weight.is_variable() => Some(weight),
        _ => None,
    };
    if let (Some(weight), None) = (trainable, &lora) {
        return match bias {
            Some(bias) => apply_op3(TrainableLinear, x, weight, bias),
            None => apply_op2(TrainableLinear, x, weight),
        };
    }
    if trainable.is_some() || !tracked {
        return op.forward(x, adapter);
    }
    match lora {
        None => apply_op1(op, x),
        Some(pass) => apply_op3(op, x, &pass.a, &pass.b),
    }
}

/// PEFT's DoRA on a frozen `W`: with `m` the magnitude, `n` the row norms of
/// `W + scale·BA` (a constant to the backward pass, as the DoRA paper's §4.3
/// and PEFT treat it) and `x'` the adapter's dropped-out input,
/// `x Wᵀ + (m/n − 1) ⊙ x' Wᵀ + (m/n) ⊙ scale·x' Aᵀ Bᵀ (+ bias)`. Without
/// dropout that is `(m/n) ⊙ x (W + scale·BA)ᵀ + bias`: the adapted weight
/// rescaled to the magnitude row by row. Computed in f32 and rounded to `W`'s
/// dtype, as [`FrozenLinear`] does; candle's ops differentiate the adapter.
fn dora_linear(
    x: &Tensor,
    weight: &LinearWeight,
    bias: Option<&Tensor>,
    pass: &LoraPass,
) -> Result<Tensor> {
    let magnitude = pass.magnitude.as_ref().expect("a DoRA adapter");
    let (a, b) = (&pass.a, &pass.b);
    let x32 = x.to_dtype(DType::F32)?;
    let mask = pass.settings().dropout_mask(&x32)?;
    let base = linear(x, weight, None, None)?.to_dtype(DType::F32)?;
    let (dropped, base_dropped) = match &mask {
        Some(mask) => {
            let dropped = (&x32 * mask)?;
            let product = linear(&dropped.to_dtype(x.dtype())?, weight, None, None)?;
            (dropped, product.to_dtype(DType::F32)?)
        }
        None => (x32, base.clone()),
    };
    let update = (dropped.matmul(&a.t()?)? * pass.scale)?.matmul(&b.t()?)?;
    let adapted = (weight.to_f32(x.device())? + (b.detach().matmul(&a.detach())? * pass.scale)?)?;
    let factor = (magnitude / row_norms(&adapted)?)?.unsqueeze(0)?;
    let mut y =
        (base + base_dropped.broadcast_mul(&(&factor - 1.0)?)? + update.broadcast_mul(&factor)?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    y.to_dtype(weight.output_dtype(x))
}

/// The L2 norm of each row of `weight` `[out, in]`, in f32: DoRA's weight
/// norms (PEFT's "column-wise" norms, of its `[in, out]` view).
pub(crate) fn row_norms(weight: &Tensor) -> Result<Tensor> {
    weight.to_dtype(DType::F32)?.sqr()?.sum(1)?.sqrt()
}

/// `x · Wᵀ` (`x`: `[n, in]`, `W`: `[out, in]`), computing no gradient for `W`
/// unless it is a trainable variable (full fine-tuning).
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    linear(x, &LinearWeight::Dense(weight.clone()), None, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_mask_is_one_draw_per_element_of_its_stream() {
        let dropout = Dropout {
            p: 0.3,
            seed: 5,
            first_element: MASK_TASK - 300,
        };
        // Across a stream boundary, with a partial block at each end.
        let mask = dropout.draw(1000, |_, masks, out| out.copy_from_slice(masks));
        let word_of = |element: usize| {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            rng.set_stream((element / MASK_TASK) as u64);
            rng.set_word_pos((element % MASK_TASK) as u128);
            rng.random::<u32>()
        };
        let threshold = (0.7 * u32::MAX as f64) as u32;
        for (e, &m) in mask.iter().enumerate() {
            let kept = word_of(MASK_TASK - 300 + e) < threshold;
            assert_eq!(
                m,
                if kept { (1.0 / 0.7f64) as f32 } else { 0.0 },
                "element {e}"
            );
        }
        let values: Vec<f32> = (0..1000).map(|e| e as f32).collect();
        let dropped = LoraSettings {
            scale: 1.0,
            dropout: Some(dropout),
        }
        .drop(&Tensor::new(values.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
        let dropped: Vec<f32> = dropped.to_vec1().unwrap();
        assert!((0..1000).all(|e| dropped[e] == e as f32 * mask[e]));
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
            magnitude: None,
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
            |t| {
                let dense = LinearWeight::Dense(weight.clone());
                linear(&t[0], &dense, Some(&bias), Some(pass(&t[1], &t[2]))).unwrap()
            },
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

    /// DoRA as PEFT's `DoraLinearLayer.forward` writes it, dropout included:
    /// `x Wᵀ + b + (m/n − 1)·(x' Wᵀ) + (m/n)·scale·(x' Aᵀ Bᵀ)`, with `n`
    /// the row norms of `W + scale·BA` held constant; values and the
    /// gradients of x, A, B and m.
    #[test]
    fn dora_linear_with_dropout_is_pefts_formula() {
        use crate::fused::tests::{assert_same_function, random};
        let (weight, bias) = (random(&[24, 40], 41), random(&[24], 42));
        let dropout = Dropout {
            p: 0.3,
            seed: 5,
            first_element: 0,
        };
        let pass = |t: &[Tensor]| LoraPass {
            a: t[1].clone(),
            b: t[2].clone(),
            magnitude: Some(t[3].clone()),
            scale: 1.5,
            dropout: Some(dropout),
        };
        let magnitude = (row_norms(&weight).unwrap() + random(&[24], 46).abs().unwrap()).unwrap();
        let inputs = [
            random(&[70, 40], 43),
            random(&[4, 40], 44),
            random(&[24, 4], 45),
            magnitude,
        ];
        assert_same_function(
            &inputs,
            |t| {
                linear(
                    &t[0],
                    &LinearWeight::Dense(weight.clone()),
                    Some(&bias),
                    Some(pass(t)),
                )
                .unwrap()
            },
            |t| {
                let (x, a, b, m) = (&t[0], &t[1], &t[2], &t[3]);
                let mask = pass(t).settings().dropout_mask(x).unwrap().unwrap();
                let dropped = (x * mask).unwrap();
                let w_t = weight.t().unwrap();
                let delta = (b.matmul(a).unwrap() * 1.5).unwrap().detach();
                let n = (&weight + delta)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum(1)
                    .unwrap()
                    .sqrt()
                    .unwrap();
                let ratio = (m / n).unwrap().unsqueeze(0).unwrap();
                let base = x.matmul(&w_t).unwrap().broadcast_add(&bias).unwrap();
                let base_dropped = dropped.matmul(&w_t).unwrap();
                let lora = (dropped
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap()))
                .unwrap()
                    * 1.5;
                let rescaled = base_dropped
                    .broadcast_mul(&(&ratio - 1.0).unwrap())
                    .unwrap();
                ((base + rescaled).unwrap() + lora.unwrap().broadcast_mul(&ratio).unwrap()).unwrap()
            },
            1e-4,
        );
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
            |t| linear(&t[0], &LinearWeight::Dense(t[1].clone()), Some(&t[2]), None).unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            1e-5,
        );
        // Without a bias, as the Llama family's layers are.
        assert_same_function(
            &inputs[..2],
            |t| linear(&t[0], &LinearWeight::Dense(t[1].clone()), None, None).unwrap(),
            |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
            1e-5,
        );
    }
}
