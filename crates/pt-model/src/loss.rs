//! Cross-entropy losses: over given logits, and through the LM head a chunk
//! of rows at a time so that `[tokens, vocab]` logits never exist whole.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use crate::fused;
use crate::ops::log_softmax_last_dim;
use crate::product::{add_product, matmul};

/// Label of positions that carry no loss (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;
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
/// Evaluation's chunks, and training's when the LM head trains: 256 MiB of
/// f32 logits. Each chunk of a trainable head adds a `[vocab, h]` product to
/// its gradient (1 GB at bloomz-560m), so fewer chunks pass over that
/// memory fewer times.
const EVAL_CHUNK_ELEMENTS: usize = 1 << 26;

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
    let elements = match weight.track_op() {
        true => EVAL_CHUNK_ELEMENTS,
        false => LOSS_CHUNK_ELEMENTS,
    };
    let rows = (elements / weight.dim(0)?).max(LOSS_CHUNK_MIN_ROWS);
    loss_sum_in_chunks(hidden, weight, targets, rows, None)
}

/// Evaluation's [`lm_head_loss_sum`]: no gradients, and each row's arg-max
/// token as well, both computed a chunk of rows at a time, so that the
/// `[n, vocab]` logits never exist whole (2 GB at bloomz-560m's 4 × 512).
/// `alongside`: how many such evaluations run at once (threads evaluating
/// their own rows), which share the chunks' memory.
pub fn lm_head_loss_sum_and_predictions(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[Option<u32>],
    alongside: usize,
) -> Result<(f64, usize, Vec<u32>)> {
    let mut predictions = Vec::with_capacity(targets.len());
    // Larger chunks than training's: each chunk reads the whole LM head
    // (1 GB at bloomz-560m), and no gradient is kept beside the logits.
    let elements = EVAL_CHUNK_ELEMENTS / alongside.max(1);
    let rows = (elements / weight.dim(0)?).max(LOSS_CHUNK_MIN_ROWS);
    let (loss, count) = loss_sum_in_chunks(
        &hidden.detach(),
        &weight.detach(),
        targets,
        rows,
        Some(&mut predictions),
    )?;
    Ok((loss.to_scalar::<f32>()? as f64, count, predictions))
}

/// [`lm_head_loss_sum`], `rows` rows of logits at a time; with
/// `predictions`, each row's arg-max is appended to it.
fn loss_sum_in_chunks(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[Option<u32>],
    rows: usize,
    mut predictions: Option<&mut Vec<u32>>,
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
        if chunk_targets.iter().all(Option::is_none) && predictions.is_none() {
            if grad_hidden {
                hidden_grads.push(Tensor::zeros((len, h), hidden.dtype(), device)?);
            }
            continue;
        }
        let inputs = hidden_values.narrow(0, start, len)?;
        let logits = matmul(&inputs, &weight_values.t()?)?.to_dtype(DType::F32)?;
        let into_gradient = grad_hidden || grad_weight;
        let grad_logits = if fused::applies(&logits) {
            let rows = fused::cross_entropy_rows(&logits, chunk_targets, into_gradient)?;
            loss_sum += rows.iter().map(|&(loss, _)| f64::from(loss)).sum::<f64>();
            if let Some(predictions) = predictions.as_deref_mut() {
                predictions.extend(rows.iter().map(|&(_, argmax)| argmax));
            }
            into_gradient.then_some(logits)
        } else {
            if let Some(predictions) = predictions.as_deref_mut() {
                predictions.extend(logits.argmax(1)?.to_vec1::<u32>()?);
            }
            let (loss, grad) = composite_cross_entropy(&logits, chunk_targets, into_gradient)?;
            loss_sum += loss;
            grad
        };
        let Some(grad_logits) = grad_logits else {
            continue;
        };
        let grad_logits = grad_logits.to_dtype(weight.dtype())?;
        if grad_hidden {
            hidden_grads.push(matmul(&grad_logits, &weight_values)?);
        }
        if grad_weight {
            weight_grad = Some(match weight_grad {
                Some(total) => add_product(total, &grad_logits.t()?, &inputs)?,
                None => matmul(&grad_logits.t()?, &inputs)?,
            });
        }
    }
    let count = targets.iter().filter(|t| t.is_some()).count();
    let mut loss = Tensor::new(loss_sum as f32, device)?;
    if grad_hidden {
        let grad = Tensor::cat(&hidden_grads, 0)?.to_dtype(hidden.dtype())?;
        loss = (loss + hidden.apply_op1(PrecomputedGradient::new(grad))?)?;
    }
    if let Some(grad) = weight_grad {
        loss = (loss + weight.apply_op1(PrecomputedGradient::new(grad))?)?;
    }
    Ok((loss, count))
}

/// The composite ops' version of the fused kernel's work (CUDA): the sum
/// of the `[rows, vocab]` f32 logits' cross-entropies against `targets`, and
/// when `into_gradient` the loss's gradient, `softmax − one-hot` (zero on
/// rows without a target).
fn composite_cross_entropy(
    logits: &Tensor,
    targets: &[Option<u32>],
    into_gradient: bool,
) -> Result<(f64, Option<Tensor>)> {
    let (rows, device) = (targets.len(), logits.device());
    let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
    let exp = shifted.exp()?;
    let sums = exp.sum_keepdim(1)?;
    let index: Vec<u32> = targets.iter().map(|t| t.unwrap_or(0)).collect();
    let index = Tensor::from_vec(index, (rows, 1), device)?;
    let counted: Vec<f32> = targets
        .iter()
        .map(|t| f32::from(t.is_some() as u8))
        .collect();
    let counted = Tensor::from_vec(counted, (rows, 1), device)?;
    let losses = (sums.log()? - shifted.gather(&index, 1)?)?.mul(&counted)?;
    let loss = f64::from(losses.sum_all()?.to_scalar::<f32>()?);
    if !into_gradient {
        return Ok((loss, None));
    }
    let grad = exp
        .broadcast_div(&sums)?
        .scatter_add(&index, &counted.neg()?, 1)?
        .broadcast_mul(&counted)?;
    Ok((loss, Some(grad)))
}

/// A term of value zero whose backward hands its input a gradient computed
/// in the forward pass (times the loss's own gradient). Unlike
/// `(t · g).sum() − its detached copy`, it keeps no `[vocab, h]` product
/// alive until the backward pass and broadcasts no `[vocab, h]` ones in it:
/// 2 GB less at bloomz-560m's peak when the embedding trains. The gradient
/// is handed over once and then dropped rather than held with the graph.
struct PrecomputedGradient(Mutex<Option<Tensor>>);

impl PrecomputedGradient {
    fn new(grad: Tensor) -> Self {
        Self(Mutex::new(Some(grad)))
    }
}

impl CustomOp1 for PrecomputedGradient {
    fn name(&self) -> &'static str {
        "precomputed-gradient"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let device = candle_core::Device::Cuda(storage.device().clone());
        crate::custom_op::cuda_output(&Tensor::zeros((), DType::F32, &device)?)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(precomputed) = self.0.lock().expect("not poisoned").take() else {
            bail!("the chunked loss's backward pass ran twice");
        };
        Ok(Some(
            precomputed.broadcast_mul(&grad.to_dtype(precomputed.dtype())?)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_ignores_labels_and_shifts() {
        // Uniform logits over 4 classes: every counted token costs ln 4.
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let (sum, count) = next_token_loss_sum(&logits, &[vec![0, 1, IGNORE_INDEX]]).unwrap();
        assert_eq!(count, 1);
        assert!((sum.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn the_fused_cross_entropy_is_the_composite_ops_one() {
        use crate::fused::tests::{max_difference, random};
        // A vocabulary that leaves a partial lane group; a row with a tie for
        // the maximum, one far from zero, one without a target.
        let (rows, vocab) = (6, 1003);
        let mut values = (random(&[rows, vocab], 5) * 6.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        values[vocab + 10] = 30.0;
        values[vocab + 500] = 30.0;
        values[2 * vocab..3 * vocab]
            .iter_mut()
            .for_each(|x| *x += 1e4);
        let targets = [Some(3), Some(10), Some(1002), None, Some(0), Some(777)];
        let logits = Tensor::from_vec(values, (rows, vocab), &Device::Cpu).unwrap();
        let argmax = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(argmax[1], 10, "the first of two maxima");
        for into_gradient in [false, true] {
            let (expected, expected_grad) =
                composite_cross_entropy(&logits, &targets, into_gradient).unwrap();
            let fused_logits = logits.copy().unwrap();
            let fused_rows =
                fused::cross_entropy_rows(&fused_logits, &targets, into_gradient).unwrap();
            let loss: f64 = fused_rows.iter().map(|&(l, _)| f64::from(l)).sum();
            assert!(
                (loss - expected).abs() < 1e-6 * expected,
                "{loss} vs {expected}"
            );
            assert_eq!(fused_rows[3].0, 0.0, "no target, no loss");
            let fused_argmax: Vec<u32> = fused_rows.iter().map(|&(_, a)| a).collect();
            assert_eq!(fused_argmax, argmax);
            match expected_grad {
                Some(grad) => {
                    let difference = max_difference(&fused_logits, &grad);
                    assert!(difference < 1e-6, "{difference}");
                    let row = fused_logits.get(3).unwrap().abs().unwrap();
                    assert_eq!(row.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                }
                None => assert_eq!(max_difference(&fused_logits, &logits), 0.0),
            }
        }
        let error = fused::cross_entropy_rows(&logits, &[Some(1003); 6], false).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("target 1003 is outside the vocabulary (1003)"),
            "{message}"
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
            loss_sum_in_chunks(hidden.as_tensor(), weight.as_tensor(), &targets, 64, None).unwrap();
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
        // Scaled as a mean or gradient accumulation scales it: the attached
        // gradients are multiplied by the loss's own gradient.
        let (grads, full_grads) = (
            chunked.affine(0.25, 0.0).unwrap().backward().unwrap(),
            full.affine(0.25, 0.0).unwrap().backward().unwrap(),
        );
        for var in [&hidden, &weight] {
            let (g, f) = (
                grads.get(var.as_tensor()).unwrap(),
                full_grads.get(var.as_tensor()).unwrap(),
            );
            assert!(max_difference(g, f) < 1e-5, "{}", max_difference(g, f));
        }
        // Evaluation's version: the same loss, no graph, and every row's
        // arg-max as the full logits give it (chunks of 64 rows here too,
        // the trailing row without a target included).
        let mut predictions = Vec::new();
        let (evaluated, eval_count) = loss_sum_in_chunks(
            &hidden.as_tensor().detach(),
            &weight.as_tensor().detach(),
            &targets,
            64,
            Some(&mut predictions),
        )
        .unwrap();
        assert_eq!(eval_count, full_count);
        assert_eq!(evaluated.to_scalar::<f32>().unwrap(), a);
        assert!(!evaluated.track_op());
        let expected = logits
            .squeeze(0)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(predictions, expected);
    }
}
