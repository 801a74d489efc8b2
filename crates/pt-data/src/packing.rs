//! Documents into fixed-size training blocks, as MedicalGPT and LLaMA-Factory
//! pack them, and the blocks to and from safetensors files.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Label of positions that carry no loss (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// A block dataset: `len()` rows of `block_size` token ids. Row `i` holds
/// `lengths[i]` real tokens followed by padding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blocks {
    pub block_size: usize,
    pub input_ids: Vec<u32>,
    pub lengths: Vec<u32>,
}

impl Blocks {
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.block_size..(i + 1) * self.block_size]
    }

    /// Training labels of row `i`: the ids, with padding ignored.
    pub fn labels(&self, i: usize) -> Vec<i64> {
        let real = self.lengths[i] as usize;
        self.row(i)
            .iter()
            .enumerate()
            .map(|(p, &id)| if p < real { id as i64 } else { IGNORE_INDEX })
            .collect()
    }

    /// Keeps the first `n` blocks; returns how many were removed.
    pub fn truncate(&mut self, n: usize) -> usize {
        let removed = self.len().saturating_sub(n);
        self.lengths.truncate(n);
        self.input_ids.truncate(n * self.block_size);
        removed
    }

    /// Writes `input_ids` [n, block_size] and `lengths` [n], both u32.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ids = bytes_of(&self.input_ids);
        let lengths = bytes_of(&self.lengths);
        let tensors = [
            (
                "input_ids",
                TensorView::new(Dtype::U32, vec![self.len(), self.block_size], &ids)?,
            ),
            (
                "lengths",
                TensorView::new(Dtype::U32, vec![self.len()], &lengths)?,
            ),
        ];
        let metadata: HashMap<String, String> =
            [("format".to_string(), "pt-host blocks v1".to_string())].into();
        safetensors::serialize_to_file(tensors, Some(metadata), path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let ids = tensors
            .tensor("input_ids")
            .with_context(|| format!("{}: no input_ids", path.display()))?;
        let lengths = tensors
            .tensor("lengths")
            .with_context(|| format!("{}: no lengths", path.display()))?;
        if ids.dtype() != Dtype::U32 || lengths.dtype() != Dtype::U32 || ids.shape().len() != 2 {
            bail!("{}: unexpected tensor types or shapes", path.display());
        }
        Ok(Self {
            block_size: ids.shape()[1],
            input_ids: u32s_of(ids.data()),
            lengths: u32s_of(lengths.data()),
        })
    }
}

fn bytes_of(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u32s_of(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Concatenates the documents in order and cuts `block_size` blocks; the
/// remainder is dropped. Returns the blocks and the dropped token count.
pub fn pack(documents: &[Vec<u32>], block_size: usize) -> (Blocks, u64) {
    let total: usize = documents.iter().map(Vec::len).sum();
    let n = total / block_size;
    let mut input_ids: Vec<u32> = documents
        .iter()
        .flatten()
        .copied()
        .take(n * block_size)
        .collect();
    input_ids.shrink_to_fit();
    (
        Blocks {
            block_size,
            input_ids,
            lengths: vec![block_size as u32; n],
        },
        (total - n * block_size) as u64,
    )
}

/// One document per block, truncated to `block_size` or padded with `pad_id`.
/// Returns the blocks and the count of tokens cut off by truncation.
pub fn pad_each(documents: &[Vec<u32>], block_size: usize, pad_id: u32) -> (Blocks, u64) {
    let mut blocks = Blocks {
        block_size,
        ..Blocks::default()
    };
    let mut cut = 0;
    for doc in documents {
        let real = doc.len().min(block_size);
        cut += (doc.len() - real) as u64;
        blocks.input_ids.extend(&doc[..real]);
        blocks
            .input_ids
            .extend(std::iter::repeat_n(pad_id, block_size - real));
        blocks.lengths.push(real as u32);
    }
    (blocks, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_concatenates_and_drops_the_remainder() {
        let (blocks, dropped) = pack(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]], 4);
        assert_eq!(blocks.input_ids, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!((blocks.len(), dropped), (2, 1));
        assert_eq!(blocks.labels(1), [5, 6, 7, 8]);
    }

    #[test]
    fn padding_marks_labels_ignored_and_truncates() {
        let (blocks, cut) = pad_each(&[vec![1, 2], vec![3, 4, 5, 6, 7]], 4, 0);
        assert_eq!(blocks.input_ids, [1, 2, 0, 0, 3, 4, 5, 6]);
        assert_eq!(blocks.labels(0), [1, 2, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(cut, 1);
    }

    #[test]
    fn blocks_round_trip_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let (mut blocks, _) = pad_each(&[vec![1, 2], vec![3, 4, 5]], 3, 9);
        blocks.save(&dir.path().join("b.safetensors")).unwrap();
        assert_eq!(
            Blocks::load(&dir.path().join("b.safetensors")).unwrap(),
            blocks
        );
        assert_eq!(blocks.truncate(1), 1);
        assert_eq!(blocks.row(0), [1, 2, 9]);
    }
}
