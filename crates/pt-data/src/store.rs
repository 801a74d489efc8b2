//! The token store: a prepared split on disk as Megatron's indexed datasets
//! and nanoGPT's memmap keep one. `SPLIT.tokens` holds the blocks' ids, row
//! after row, as little-endian u16 when every id fits (vocabularies up to
//! 65,536) and u32 otherwise; `SPLIT.lengths` the real (unpadded) length of
//! each row as u32. Training maps both files: a block is a slice of the
//! map, so start-up time and memory do not grow with the corpus.
//! `store.json` describes the entry and is checked against the files when
//! it is opened.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use pt_fs::MappedFile;
use serde::{Deserialize, Serialize};

use crate::packing::{BlockSink, Blocks};

pub const HEADER: &str = "store.json";
const FORMAT: &str = "pt-host token store";
const VERSION: u32 = 1;

/// `store.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    /// Bytes per token id: 2 or 4.
    width: usize,
    block_size: usize,
    train_blocks: u64,
    validation_blocks: u64,
}

/// A corrupt or foreign entry: the user prepares again.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}; prepare again with --overwrite_cache", .path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub problem: String,
}

/// Bytes per id for a vocabulary of `vocab_size` ids.
pub fn width_for(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 { 2 } else { 4 }
}

fn files(dir: &Path, split: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{split}.tokens")),
        dir.join(format!("{split}.lengths")),
    )
}

/// Writes one split's blocks as they are packed.
pub struct StoreWriter {
    tokens: BufWriter<File>,
    lengths: BufWriter<File>,
    width: usize,
    bytes: Vec<u8>,
}

impl StoreWriter {
    pub fn create(dir: &Path, split: &str, width: usize) -> Result<Self> {
        let (tokens, lengths) = files(dir, split);
        Ok(Self {
            tokens: pt_fs::create_buffered(&tokens)?,
            lengths: pt_fs::create_buffered(&lengths)?,
            width,
            bytes: Vec::new(),
        })
    }

    pub fn finish(mut self) -> Result<()> {
        self.tokens.flush()?;
        self.lengths.flush()?;
        Ok(())
    }
}

impl BlockSink for StoreWriter {
    fn block(&mut self, ids: &[u32], real: usize) -> Result<()> {
        self.bytes.clear();
        match self.width {
            2 => ids.iter().for_each(|&id| {
                let id = u16::try_from(id).expect("the width fits the vocabulary");
                self.bytes.extend_from_slice(&id.to_le_bytes())
            }),
            _ => ids
                .iter()
                .for_each(|&id| self.bytes.extend_from_slice(&id.to_le_bytes())),
        }
        self.tokens.write_all(&self.bytes)?;
        self.lengths.write_all(&(real as u32).to_le_bytes())?;
        Ok(())
    }
}

/// Writes `store.json` once both splits are written.
pub fn write_header(
    dir: &Path,
    width: usize,
    block_size: usize,
    train_blocks: u64,
    validation_blocks: u64,
) -> Result<()> {
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        width,
        block_size,
        train_blocks,
        validation_blocks,
    };
    fs::write(dir.join(HEADER), serde_json::to_vec_pretty(&header)?)?;
    Ok(())
}

/// A split's mapped files.
pub(crate) struct StoredRows {
    tokens: MappedFile,
    lengths: MappedFile,
    width: usize,
}

impl std::fmt::Debug for StoredRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} mapped rows of {}-byte ids", self.len(), self.width)
    }
}

impl StoredRows {
    pub(crate) fn len(&self) -> usize {
        self.lengths.bytes().len() / 4
    }

    pub(crate) fn length(&self, i: usize) -> usize {
        let at = i * 4;
        u32::from_le_bytes(
            self.lengths.bytes()[at..at + 4]
                .try_into()
                .expect("4 bytes"),
        ) as usize
    }

    pub(crate) fn row(&self, i: usize, block_size: usize) -> Vec<u32> {
        let row_bytes = block_size * self.width;
        let bytes = &self.tokens.bytes()[i * row_bytes..(i + 1) * row_bytes];
        match self.width {
            2 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        }
    }
}

/// The training and validation blocks of the store in `dir`, mapped, after
/// checking the files against `store.json`.
pub fn open(dir: &Path) -> Result<(Blocks, Blocks)> {
    let path = dir.join(HEADER);
    let corrupt = |problem: String| StoreError {
        path: path.clone(),
        problem,
    };
    let header: Header = fs::read(&path)
        .map_err(|e| corrupt(format!("cannot read ({e})")))
        .and_then(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(format!("not a token store header ({e})")))
        })?;
    if header.format != FORMAT || header.version != VERSION || ![2, 4].contains(&header.width) {
        return Err(corrupt(format!(
            "a {} version {} store with {}-byte ids, this pt-host reads `{FORMAT}` version {VERSION}",
            header.format, header.version, header.width
        ))
        .into());
    }
    let split = |name: &str, blocks: u64| -> Result<Blocks> {
        let (tokens, lengths) = files(dir, name);
        let rows = StoredRows {
            tokens: MappedFile::open(&tokens)?,
            lengths: MappedFile::open(&lengths)?,
            width: header.width,
        };
        let expected = blocks as usize * header.block_size * header.width;
        if rows.tokens.bytes().len() != expected || rows.len() as u64 != blocks {
            return Err(corrupt(format!(
                "{name}: {} bytes of ids and {} of lengths, the header says {blocks} blocks of {} ({expected} and {})",
                rows.tokens.bytes().len(),
                rows.lengths.bytes().len(),
                header.block_size,
                blocks * 4
            ))
            .into());
        }
        if let Some(i) = (0..rows.len()).find(|&i| rows.length(i) > header.block_size) {
            return Err(corrupt(format!("{name}: block {i} is longer than the block size")).into());
        }
        Ok(Blocks::stored(header.block_size, rows))
    };
    Ok((
        split("train", header.train_blocks)?,
        split("validation", header.validation_blocks)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packing::Packer;

    /// `documents` packed into a store in `dir` as the training split, with
    /// an empty validation split.
    fn write_store(dir: &Path, documents: &[Vec<u32>], width: usize, pad: Option<u32>) -> u64 {
        let writer = StoreWriter::create(dir, "train", width).unwrap();
        let mut packer = Packer::new(writer, 4, pad, None);
        documents.iter().for_each(|d| packer.push(d).unwrap());
        let (writer, packed) = packer.finish();
        writer.finish().unwrap();
        StoreWriter::create(dir, "validation", width)
            .unwrap()
            .finish()
            .unwrap();
        write_header(dir, width, 4, packed.blocks, 0).unwrap();
        packed.blocks
    }

    #[test]
    fn stored_blocks_read_back_as_packed_in_memory_at_either_width() {
        let documents = vec![vec![1, 2, 3], vec![65_535, 5], vec![6, 7, 8, 9, 10]];
        for (width, pad) in [(2, None), (4, None), (2, Some(0))] {
            let dir = tempfile::tempdir().unwrap();
            write_store(dir.path(), &documents, width, pad);
            let (train, validation) = open(dir.path()).unwrap();
            let expected = match pad {
                None => crate::packing::pack(&documents, 4).0,
                Some(pad) => crate::packing::pad_each(&documents, 4, pad).0,
            };
            assert!(train.is_mapped() && validation.is_empty());
            assert_eq!(train, expected, "width {width}");
            let bytes = fs::metadata(dir.path().join("train.tokens")).unwrap().len();
            assert_eq!(bytes, (expected.len() * 4 * width) as u64);
        }
        assert_eq!((width_for(65_536), width_for(65_537)), (2, 4));
    }

    #[test]
    fn a_store_that_does_not_match_its_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path(), &[(1..=12).collect()], 2, None);
        let tokens = dir.path().join("train.tokens");
        let bytes = fs::read(&tokens).unwrap();
        fs::write(&tokens, &bytes[..bytes.len() - 2]).unwrap();
        let error = open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(
                "train: 22 bytes of ids and 12 of lengths, the header says 3 blocks of 4"
            ) && error.contains("prepare again with --overwrite_cache"),
            "{error}"
        );
        fs::write(dir.path().join(HEADER), b"{\"format\": \"something else\"}").unwrap();
        let error = open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not a token store header"), "{error}");
    }
}
