//! Documents into fixed-size training blocks, as MedicalGPT and LLaMA-Factory
//! pack them: a [`Packer`] takes documents one at a time and hands finished
//! blocks to a [`BlockSink`] (memory, or the token store on disk).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use anyhow::Result;

use crate::store::StoredRows;

/// Label of positions that carry no loss (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// A block dataset: `len()` rows of `block_size` token ids. Row `i` holds
/// `length(i)` real tokens followed by padding. In memory, or mapped from
/// the token store (then memory does not grow with the corpus).
#[derive(Clone, Debug, Default)]
pub struct Blocks {
    block_size: usize,
    rows: Rows,
    /// Named parts (row ranges), when the blocks join several sources.
    sources: Vec<(String, Range<usize>)>,
}

#[derive(Clone, Debug)]
enum Rows {
    Owned {
        input_ids: Vec<u32>,
        lengths: Vec<u32>,
    },
    Stored(Arc<StoredRows>),
    /// Rows picked from other block sets: (part, row) per row.
    Picked {
        parts: Arc<Vec<Blocks>>,
        picks: Arc<Vec<(u32, u32)>>,
    },
}

impl Default for Rows {
    fn default() -> Self {
        Rows::Owned {
            input_ids: Vec::new(),
            lengths: Vec::new(),
        }
    }
}

impl Blocks {
    /// Blocks in memory: `input_ids` holds `lengths.len()` rows of `block_size`.
    pub fn new(block_size: usize, input_ids: Vec<u32>, lengths: Vec<u32>) -> Self {
        assert_eq!(input_ids.len(), lengths.len() * block_size, "whole rows");
        Self {
            block_size,
            rows: Rows::Owned { input_ids, lengths },
            sources: Vec::new(),
        }
    }

    pub(crate) fn stored(block_size: usize, rows: StoredRows) -> Self {
        Self {
            block_size,
            rows: Rows::Stored(Arc::new(rows)),
            sources: Vec::new(),
        }
    }

    /// Row `picks[i].1` of `parts[picks[i].0]` as row `i`. The parts share
    /// one block size.
    pub(crate) fn picked(parts: Vec<Blocks>, picks: Vec<(u32, u32)>) -> Self {
        let block_size = parts.iter().map(|p| p.block_size).max().unwrap_or(0);
        assert!(
            parts
                .iter()
                .all(|p| p.is_empty() || p.block_size == block_size),
            "one block size"
        );
        Self {
            block_size,
            rows: Rows::Picked {
                parts: Arc::new(parts),
                picks: Arc::new(picks),
            },
            sources: Vec::new(),
        }
    }

    /// The named parts one after another, each a source of
    /// [`Blocks::sources`] (evaluation reports each one's loss).
    pub fn named(parts: Vec<(String, Blocks)>) -> Self {
        let mut sources = Vec::new();
        let mut picks = Vec::new();
        for (part, (name, blocks)) in parts.iter().enumerate() {
            sources.push((name.clone(), picks.len()..picks.len() + blocks.len()));
            picks.extend((0..blocks.len() as u32).map(|row| (part as u32, row)));
        }
        let parts = parts.into_iter().map(|(_, blocks)| blocks).collect();
        Self {
            sources,
            ..Self::picked(parts, picks)
        }
    }

    /// The named parts and their rows; empty for a single source.
    pub fn sources(&self) -> &[(String, Range<usize>)] {
        &self.sources
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Owned { lengths, .. } => lengths.len(),
            Rows::Stored(rows) => rows.len(),
            Rows::Picked { picks, .. } => picks.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the rows are read from the token store's mapped files.
    pub fn is_mapped(&self) -> bool {
        match &self.rows {
            Rows::Owned { .. } => false,
            Rows::Stored(_) => true,
            Rows::Picked { parts, .. } => parts.iter().all(Blocks::is_mapped),
        }
    }

    pub fn row(&self, i: usize) -> Cow<'_, [u32]> {
        match &self.rows {
            Rows::Owned { input_ids, .. } => {
                Cow::Borrowed(&input_ids[i * self.block_size..(i + 1) * self.block_size])
            }
            Rows::Stored(rows) => Cow::Owned(rows.row(i, self.block_size)),
            Rows::Picked { parts, picks } => {
                let (part, row) = picks[i];
                Cow::Owned(parts[part as usize].row(row as usize).into_owned())
            }
        }
    }

    /// Real (not padding) tokens of row `i`.
    pub fn length(&self, i: usize) -> usize {
        match &self.rows {
            Rows::Owned { lengths, .. } => lengths[i] as usize,
            Rows::Stored(rows) => rows.length(i),
            Rows::Picked { parts, picks } => {
                let (part, row) = picks[i];
                parts[part as usize].length(row as usize)
            }
        }
    }

    /// Training labels of row `i`: the ids, with padding ignored.
    pub fn labels(&self, i: usize) -> Vec<i64> {
        let real = self.length(i);
        self.row(i)
            .iter()
            .enumerate()
            .map(|(p, &id)| if p < real { id as i64 } else { IGNORE_INDEX })
            .collect()
    }
}

/// Equal rows and lengths, wherever they are held.
impl PartialEq for Blocks {
    fn eq(&self, other: &Self) -> bool {
        self.block_size == other.block_size
            && self.len() == other.len()
            && (0..self.len())
                .all(|i| self.length(i) == other.length(i) && self.row(i) == other.row(i))
    }
}

/// Where finished blocks go.
pub trait BlockSink {
    /// A block of `block_size` ids, the first `real` of them not padding.
    fn block(&mut self, ids: &[u32], real: usize) -> Result<()>;
}

impl BlockSink for Blocks {
    fn block(&mut self, ids: &[u32], real: usize) -> Result<()> {
        let Rows::Owned { input_ids, lengths } = &mut self.rows else {
            unreachable!("stored blocks are read-only");
        };
        input_ids.extend_from_slice(ids);
        lengths.push(real as u32);
        Ok(())
    }
}

/// What packing a split made and left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    /// Blocks handed to the sink.
    pub blocks: u64,
    /// Tokens not in any block: the packing remainder, or truncated tails.
    pub tokens_dropped: u64,
    /// Blocks past the `max_blocks` limit, not handed on.
    pub blocks_truncated: u64,
}

/// Documents in, blocks out. Packing concatenates the documents in order
/// and cuts `block_size` blocks, the remainder dropped; without packing each
/// document is a block of its own, truncated or padded with `pad_id`.
pub struct Packer<S> {
    sink: S,
    block_size: usize,
    /// `None` packs; `Some(pad_id)` pads each document.
    pad_id: Option<u32>,
    max_blocks: Option<usize>,
    pending: Vec<u32>,
    made: u64,
    packed: Packed,
}

impl<S: BlockSink> Packer<S> {
    pub fn new(sink: S, block_size: usize, pad_id: Option<u32>, max_blocks: Option<usize>) -> Self {
        Self {
            sink,
            block_size,
            pad_id,
            max_blocks,
            pending: Vec::with_capacity(block_size),
            made: 0,
            packed: Packed::default(),
        }
    }

    pub fn push(&mut self, mut document: &[u32]) -> Result<()> {
        let size = self.block_size;
        if let Some(pad_id) = self.pad_id {
            let real = document.len().min(size);
            self.packed.tokens_dropped += (document.len() - real) as u64;
            self.pending.clear();
            self.pending.extend_from_slice(&document[..real]);
            self.pending.resize(size, pad_id);
            let block = std::mem::take(&mut self.pending);
            self.emit(&block, real)?;
            self.pending = block;
            return Ok(());
        }
        if !self.pending.is_empty() {
            let take = (size - self.pending.len()).min(document.len());
            self.pending.extend_from_slice(&document[..take]);
            document = &document[take..];
            if self.pending.len() < size {
                return Ok(());
            }
            let block = std::mem::take(&mut self.pending);
            self.emit(&block, size)?;
            self.pending = block;
            self.pending.clear();
        }
        let mut blocks = document.chunks_exact(size);
        for block in blocks.by_ref() {
            self.emit(block, size)?;
        }
        self.pending.extend_from_slice(blocks.remainder());
        Ok(())
    }

    fn emit(&mut self, block: &[u32], real: usize) -> Result<()> {
        self.made += 1;
        if self.max_blocks.is_some_and(|max| self.made > max as u64) {
            self.packed.blocks_truncated += 1;
            return Ok(());
        }
        self.packed.blocks += 1;
        self.sink.block(block, real)
    }

    /// The sink, and what was made.
    pub fn finish(mut self) -> (S, Packed) {
        if self.pad_id.is_none() {
            self.packed.tokens_dropped += self.pending.len() as u64;
        }
        (self.sink, self.packed)
    }
}

/// `documents` packed in memory; also the count of tokens dropped.
pub fn pack(documents: &[Vec<u32>], block_size: usize) -> (Blocks, u64) {
    in_memory(documents, block_size, None)
}

/// One document per block in memory, truncated to `block_size` or padded
/// with `pad_id`; also the count of tokens cut off by truncation.
pub fn pad_each(documents: &[Vec<u32>], block_size: usize, pad_id: u32) -> (Blocks, u64) {
    in_memory(documents, block_size, Some(pad_id))
}

fn in_memory(documents: &[Vec<u32>], block_size: usize, pad_id: Option<u32>) -> (Blocks, u64) {
    let empty = Blocks::new(block_size, Vec::new(), Vec::new());
    let mut packer = Packer::new(empty, block_size, pad_id, None);
    for document in documents {
        packer.push(document).expect("memory takes every block");
    }
    let (blocks, packed) = packer.finish();
    (blocks, packed.tokens_dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_concatenates_and_drops_the_remainder() {
        let (blocks, dropped) = pack(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]], 4);
        assert_eq!(
            blocks,
            Blocks::new(4, vec![1, 2, 3, 4, 5, 6, 7, 8], vec![4, 4])
        );
        assert_eq!((blocks.len(), dropped), (2, 1));
        assert_eq!(blocks.labels(1), [5, 6, 7, 8]);
        // A document longer than several blocks, after a partial one.
        let (blocks, dropped) = pack(&[vec![1], (2..12).collect(), vec![]], 3);
        assert_eq!(*blocks.row(2), [7, 8, 9]);
        assert_eq!((blocks.len(), dropped), (3, 2));
    }

    #[test]
    fn padding_marks_labels_ignored_and_truncates() {
        let (blocks, cut) = pad_each(&[vec![1, 2], vec![3, 4, 5, 6, 7]], 4, 0);
        assert_eq!(
            blocks,
            Blocks::new(4, vec![1, 2, 0, 0, 3, 4, 5, 6], vec![2, 4])
        );
        assert_eq!(blocks.labels(0), [1, 2, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(cut, 1);
    }

    #[test]
    fn blocks_past_the_limit_are_counted_not_kept() {
        let empty = Blocks::new(2, Vec::new(), Vec::new());
        let mut packer = Packer::new(empty, 2, None, Some(2));
        packer.push(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
        let (blocks, packed) = packer.finish();
        assert_eq!(*blocks.row(1), [3, 4]);
        assert_eq!(
            packed,
            Packed {
                blocks: 2,
                tokens_dropped: 1,
                blocks_truncated: 1
            }
        );
    }
}
