//! Growing a model's vocabulary for a tokenizer with added tokens, as
//! transformers' `resize_token_embeddings(len(tokenizer))` does.

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

use crate::model::Model;

/// The LM head's checkpoint name in every family.
pub const LM_HEAD: &str = "lm_head.weight";

impl Model {
    /// Grows the embedding (and an untied LM head) to `rows`. New rows are
    /// the mean of the old ones, transformers' `mean_resizing`: a new token
    /// starts where the average token is, so its logit does not dominate the
    /// softmax before it is trained (transformers samples around that mean
    /// with covariance 1e-9·Σ; the mean itself is that distribution's
    /// centre, and makes the resize reproducible). Growing only: ids the
    /// tokenizer does not use are never dropped.
    pub fn resize_vocabulary(&mut self, rows: usize) -> Result<()> {
        let old = self.config.vocab_size;
        if rows <= old {
            return Ok(());
        }
        let embedding = format!("{}.weight", self.embedding_module());
        for (name, tensor) in self.base_tensors_mut() {
            if name != embedding && name != LM_HEAD {
                continue;
            }
            if tensor.is_variable() {
                bail!(
                    "`{name}` is already being trained: resize the vocabulary before training starts"
                );
            }
            *tensor = grown_with_mean(tensor, rows)?;
        }
        self.config.vocab_size = rows;
        Ok(())
    }

    /// Rows the checkpoint's embedding had before any resize.
    pub fn checkpoint_vocab_size(&self) -> usize {
        self.checkpoint_vocab_size
    }
}

/// `matrix` (`[n, h]`) with `rows - n` rows equal to the mean of its rows
/// appended, computed in f32 and stored in the matrix's dtype.
fn grown_with_mean(matrix: &Tensor, rows: usize) -> Result<Tensor> {
    let (old, hidden) = matrix.dims2()?;
    let mean = matrix.to_dtype(DType::F32)?.mean_keepdim(0)?;
    let added = mean
        .broadcast_as((rows - old, hidden))?
        .to_dtype(matrix.dtype())?;
    Ok(Tensor::cat(&[matrix, &added], 0)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn new_rows_are_the_mean_of_the_old_rows() {
        let matrix = Tensor::new(&[[1f32, -2.0], [3.0, 4.0], [5.0, 1.0]], &Device::Cpu).unwrap();
        let grown = grown_with_mean(&matrix, 5).unwrap();
        assert_eq!(
            grown.to_vec2::<f32>().unwrap(),
            [[1.0, -2.0], [3.0, 4.0], [5.0, 1.0], [3.0, 1.0], [3.0, 1.0]]
        );
    }
}
