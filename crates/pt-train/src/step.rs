//! One optimizer step's worth of gradients, accumulated over micro-batches as
//! the HF Trainer does: each micro-batch loss divided by the number of
//! micro-batches before backward, gradients summed.

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use pt_data::Blocks;
use pt_model::Bloom;

/// A micro-batch: token ids, attention mask and labels (`-100`: no loss).
pub struct MicroBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
}

impl MicroBatch {
    /// Rows of a block dataset: padding is masked and carries no label.
    pub fn from_rows(blocks: &Blocks, rows: &[usize]) -> Self {
        Self {
            input_ids: rows.iter().map(|&i| blocks.row(i).to_vec()).collect(),
            attention_mask: rows
                .iter()
                .map(|&i| {
                    (0..blocks.block_size)
                        .map(|p| u32::from(p < blocks.lengths[i] as usize))
                        .collect()
                })
                .collect(),
            labels: rows.iter().map(|&i| blocks.labels(i)).collect(),
        }
    }
}

/// Gradients of `variables` summed over `micro_batches`, and the mean of the
/// micro-batch losses (what HF logs as `loss`).
pub fn accumulate_gradients(
    model: &Bloom,
    variables: &[Var],
    micro_batches: &[MicroBatch],
) -> Result<(f64, Vec<Tensor>)> {
    let mut totals: Vec<Option<Tensor>> = vec![None; variables.len()];
    let mut loss_sum = 0f64;
    for batch in micro_batches {
        let (sum, count) =
            model.loss_sum(&batch.input_ids, &batch.attention_mask, &batch.labels)?;
        let loss = (sum / count.max(1) as f64)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let grads = (loss / micro_batches.len() as f64)?.backward()?;
        for (variable, total) in variables.iter().zip(&mut totals) {
            // Checkpointed blocks deliver their gradients beside the main pass.
            let grad = match (
                grads.get(variable.as_tensor()),
                model.take_recomputed_gradient(variable.as_tensor()),
            ) {
                (Some(main), Some(side)) => (main + side)?,
                (Some(main), None) => main.clone(),
                (None, Some(side)) => side,
                (None, None) => anyhow::bail!("a trainable tensor received no gradient"),
            };
            *total = Some(match total.take() {
                Some(t) => (t + grad)?,
                None => grad,
            });
        }
    }
    let grads = totals
        .into_iter()
        .map(|g| g.context("no micro-batches"))
        .collect::<Result<_>>()?;
    Ok((loss_sum / micro_batches.len() as f64, grads))
}
