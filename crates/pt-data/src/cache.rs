//! The prepared-dataset cache on disk: an entry (blocks, report,
//! exclusions) per cache key, and the shards of a preparation in parts, each
//! stored whole or not at all.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use pt_fs::{copy_atomically, write_atomically};

use crate::packing::Blocks;
use crate::pipeline::SplitOutput;
use crate::report::{DataReport, Excluded, StepReport};

/// The blocks and their report. A shard (`Sharding::Part`) has no blocks (packing
/// needs every shard); its report counts its documents and tokens.
pub struct Prepared {
    pub train: Blocks,
    pub validation: Blocks,
    pub report: DataReport,
}

/// What a user fixes by preparing again (the binary says how).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: corrupt cache entry", .0.display())]
    CorruptEntry(PathBuf),
    #[error("{}: corrupt shard", .0.display())]
    CorruptShard(PathBuf),
    #[error("shard {index} of {count} is not prepared ({} is missing)", path.display())]
    MissingShard {
        index: usize,
        count: usize,
        path: PathBuf,
    },
    #[error(
        "the shards read {read} {split} documents, the corpus has {expected}: they were prepared from other files"
    )]
    ShardsFromOtherFiles {
        read: u64,
        split: String,
        expected: usize,
    },
}

/// `data_report.json` and the entry's `excluded.jsonl` into `output_dir`, if given.
pub(crate) fn publish(entry: &Path, report: &DataReport, output_dir: Option<&Path>) -> Result<()> {
    if let Some(dir) = output_dir {
        write_atomically(
            &dir.join(REPORT),
            &crate::text::to_inert_json_pretty(report)?,
        )?;
        copy_atomically(&entry.join(EXCLUDED), &dir.join(EXCLUDED))?;
    }
    Ok(())
}

/// A shard's record of one split: what `pack` needs besides the tokens.
#[derive(Serialize, Deserialize)]
struct ShardSplit {
    documents_read: u64,
    steps: Vec<StepReport>,
    excluded: Vec<Excluded>,
}

/// A shard's cache directory: its report, and per split its record and
/// tokenized documents.
#[derive(Serialize, Deserialize)]
pub(crate) struct ShardRecord {
    pub(crate) report: DataReport,
    validation: ShardSplit,
    train: ShardSplit,
}

/// The shards' outputs, in shard order.
pub(crate) struct Shards {
    records: Vec<ShardRecord>,
    documents: Vec<[Vec<Vec<u32>>; 2]>,
}

pub(crate) const SHARD: &str = "shard.json";

pub(crate) fn save_shard(
    dir: &Path,
    report: &DataReport,
    validation: &SplitOutput,
    train: &SplitOutput,
) -> Result<()> {
    let record = ShardRecord {
        report: report.clone(),
        validation: ShardSplit {
            documents_read: report.validation.documents_read,
            steps: validation.steps.clone(),
            excluded: validation.excluded.clone(),
        },
        train: ShardSplit {
            documents_read: report.train.documents_read,
            steps: train.steps.clone(),
            excluded: train.excluded.clone(),
        },
    };
    store_directory(dir, |staging| {
        save_documents(&staging.join(VALIDATION), &validation.documents)?;
        save_documents(&staging.join(TRAIN), &train.documents)?;
        fs::write(staging.join(SHARD), serde_json::to_vec(&record)?)?;
        Ok(())
    })
}

pub(crate) fn load_shard(dir: &Path) -> Result<ShardRecord> {
    let path = dir.join(SHARD);
    serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .context(CacheError::CorruptShard(path))
}

pub(crate) fn load_shards(dir: &Path, count: usize) -> Result<Shards> {
    let mut shards = Shards {
        records: Vec::with_capacity(count),
        documents: Vec::with_capacity(count),
    };
    for index in 0..count {
        let shard = dir.join(format!("{index}-of-{count}"));
        if !shard.join(SHARD).is_file() {
            return Err(CacheError::MissingShard {
                index,
                count,
                path: shard,
            }
            .into());
        }
        shards.records.push(load_shard(&shard)?);
        shards.documents.push([
            load_documents(&shard.join(VALIDATION))?,
            load_documents(&shard.join(TRAIN))?,
        ]);
    }
    Ok(shards)
}

/// One split of the shards joined in order: documents, step counts and
/// exclusions as one unsharded run has them. `expected` documents must
/// have been read in all, or the shards came from other files.
pub(crate) fn join_split(
    shards: &Shards,
    split: &str,
    expected: usize,
) -> Result<(u64, SplitOutput)> {
    let slot = usize::from(split == "train");
    let mut read = 0;
    let mut output = SplitOutput::default();
    for (record, documents) in shards.records.iter().zip(&shards.documents) {
        let part = if slot == 1 {
            &record.train
        } else {
            &record.validation
        };
        read += part.documents_read;
        output.documents.extend(documents[slot].iter().cloned());
        output.excluded.extend(part.excluded.iter().cloned());
        if output.steps.is_empty() {
            output.steps = part
                .steps
                .iter()
                .map(|s| StepReport {
                    plugin: s.plugin.clone(),
                    kind: s.kind,
                    ..StepReport::default()
                })
                .collect();
        }
        for (total, step) in output.steps.iter_mut().zip(&part.steps) {
            total.merge(step);
        }
    }
    if read != expected as u64 {
        return Err(CacheError::ShardsFromOtherFiles {
            read,
            split: split.into(),
            expected,
        }
        .into());
    }
    Ok((read, output))
}

/// Token ids of documents: `tokens` u32 (all, concatenated) and `lengths` u64.
fn save_documents(path: &Path, documents: &[Vec<u32>]) -> Result<()> {
    let tokens: Vec<u8> = documents
        .iter()
        .flatten()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let lengths: Vec<u8> = documents
        .iter()
        .flat_map(|d| (d.len() as u64).to_le_bytes())
        .collect();
    let tensors = [
        (
            "tokens",
            TensorView::new(Dtype::U32, vec![tokens.len() / 4], &tokens)?,
        ),
        (
            "lengths",
            TensorView::new(Dtype::U64, vec![documents.len()], &lengths)?,
        ),
    ];
    safetensors::serialize_to_file(tensors, None, path)
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn load_documents(path: &Path) -> Result<Vec<Vec<u32>>> {
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let corrupt = || CacheError::CorruptShard(path.to_path_buf());
    let tensors = SafeTensors::deserialize(&bytes).with_context(corrupt)?;
    let tokens = tensors.tensor("tokens").with_context(corrupt)?;
    let lengths = tensors.tensor("lengths").with_context(corrupt)?;
    let mut tokens = tokens
        .data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
    let documents: Vec<Vec<u32>> = lengths
        .data()
        .chunks_exact(8)
        .map(|c| {
            let n = u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize;
            tokens.by_ref().take(n).collect()
        })
        .collect();
    if tokens.next().is_some() {
        anyhow::bail!(corrupt());
    }
    Ok(documents)
}

pub const REPORT: &str = "data_report.json";
pub const EXCLUDED: &str = "excluded.jsonl";
const TRAIN: &str = "train.safetensors";
const VALIDATION: &str = "validation.safetensors";

/// Writes a cache entry.
pub(crate) fn save_entry(entry: &Path, prepared: &Prepared, excluded: &[Excluded]) -> Result<()> {
    store_directory(entry, |staging| {
        prepared.train.save(&staging.join(TRAIN))?;
        prepared.validation.save(&staging.join(VALIDATION))?;
        let mut lines = Vec::new();
        for record in excluded {
            lines.extend(crate::text::to_inert_json(record)?);
            lines.push(b'\n');
        }
        fs::write(staging.join(EXCLUDED), lines)?;
        let mut cached = prepared.report.clone();
        cached.cache_hit = true;
        fs::write(
            staging.join(REPORT),
            crate::text::to_inert_json_pretty(&cached)?,
        )?;
        Ok(())
    })
}

/// Fills a temporary sibling of `dir` with `fill` and renames it into place,
/// so that a reader never sees half a directory. Another process storing
/// the same directory meanwhile (ranks of one job) is not an error: the
/// contents are the same.
fn store_directory(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().expect("a cache directory has a parent");
    fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create cache directory", parent.display()))?;
    // Removed on any error below; renamed into place on success.
    let staging_dir = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    fill(staging_dir.path())?;
    if dir.exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot replace cache entry", dir.display()))?;
    }
    match fs::rename(staging_dir.path(), dir) {
        Err(_) if dir.is_dir() => Ok(()),
        stored => stored.with_context(|| format!("{}: cannot store cache entry", dir.display())),
    }
}

pub(crate) fn load_entry(entry: &Path) -> Result<Prepared> {
    let report: DataReport = serde_json::from_slice(&fs::read(entry.join(REPORT))?)
        .context(CacheError::CorruptEntry(entry.to_path_buf()))?;
    Ok(Prepared {
        train: Blocks::load(&entry.join(TRAIN))?,
        validation: Blocks::load(&entry.join(VALIDATION))?,
        report,
    })
}
