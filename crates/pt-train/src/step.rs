//! One optimizer step's worth of gradients, accumulated over micro-batches as
//! the HF Trainer does: each micro-batch loss divided by the number of
//! micro-batches before backward, gradients summed. Under data parallelism
//! each rank computes its share of every micro-batch, scaled so that the sum
//! over ranks is what one process computes on the whole micro-batch.

use std::ops::Range;

use anyhow::Result;
use candle_core::{Tensor, Var};
use pt_data::Blocks;
use pt_model::{DropoutDraw, Model};

/// A micro-batch, or one rank's share of one: token ids, attention mask and
/// labels (`-100`: no loss).
pub struct MicroBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Tokens with a loss in the whole micro-batch (every rank's share): the
    /// mean loss divides by it.
    pub loss_tokens: usize,
    /// Where this share's rows start in the whole micro-batch.
    pub first_row: usize,
}

/// Positions with a loss in `rows`: every real token but a row's first
/// (nothing predicts it); padding has no label.
fn loss_tokens(blocks: &Blocks, rows: &[usize]) -> usize {
    rows.iter()
        .map(|&i| blocks.length(i).saturating_sub(1))
        .sum()
}

impl MicroBatch {
    /// Rows of a block dataset, as one whole micro-batch.
    pub fn from_rows(blocks: &Blocks, rows: &[usize]) -> Self {
        Self::share_of(blocks, rows, 0..rows.len())
    }

    /// The rows `mine` of the micro-batch `rows`: one rank's share.
    pub fn share_of(blocks: &Blocks, rows: &[usize], mine: Range<usize>) -> Self {
        let loss_tokens = loss_tokens(blocks, rows);
        let first_row = mine.start;
        let rows = &rows[mine];
        Self {
            input_ids: rows.iter().map(|&i| blocks.row(i).to_vec()).collect(),
            attention_mask: rows
                .iter()
                .map(|&i| {
                    (0..blocks.block_size())
                        .map(|p| u32::from(p < blocks.length(i)))
                        .collect()
                })
                .collect(),
            labels: rows.iter().map(|&i| blocks.labels(i)).collect(),
            loss_tokens,
            first_row,
        }
    }
}

/// Micro-batch `index`'s dropout seed within a step: each draws its own masks.
fn micro_batch_seed(step_seed: u64, index: usize) -> u64 {
    step_seed ^ (index as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)
}

/// Gradients of `variables` summed over `micro_batches`, and the mean of the
/// micro-batch losses (what HF logs as `loss`); of shares, this rank's part
/// of both. With `dropout_seed`, the model trains with dropout (seeded per
/// micro-batch); without, it computes deterministically.
pub fn accumulate_gradients(
    model: &Model,
    variables: &[Var],
    micro_batches: &[MicroBatch],
    dropout_seed: Option<u64>,
) -> Result<(f64, Vec<Tensor>)> {
    let mut totals: Vec<Option<Tensor>> = vec![None; variables.len()];
    let mut loss_sum = 0f64;
    for (index, batch) in micro_batches.iter().enumerate() {
        // The last step of an epoch may leave a rank without rows.
        if batch.input_ids.is_empty() {
            continue;
        }
        model.set_dropout(dropout_seed.map(|seed| DropoutDraw {
            seed: micro_batch_seed(seed, index),
            first_row: batch.first_row,
        }));
        let (sum, _) = model.loss_sum(&batch.input_ids, &batch.attention_mask, &batch.labels)?;
        let loss = (sum / batch.loss_tokens.max(1) as f64)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let grads = model.backward(&(loss / micro_batches.len() as f64)?)?;
        for (variable, total) in variables.iter().zip(&mut totals) {
            let Some(grad) = grads.get(variable.as_tensor()).cloned() else {
                anyhow::bail!("a trainable tensor received no gradient");
            };
            *total = Some(match total.take() {
                Some(t) => (t + grad)?,
                None => grad,
            });
        }
    }
    model.set_dropout(None);
    anyhow::ensure!(!micro_batches.is_empty(), "no micro-batches");
    let grads = totals
        .into_iter()
        .zip(variables)
        .map(|(total, variable)| match total {
            Some(total) => Ok(total),
            None => Ok(variable.zeros_like()?),
        })
        .collect::<Result<_>>()?;
    Ok((loss_sum / micro_batches.len() as f64, grads))
}
