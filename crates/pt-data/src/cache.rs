//! The prepared-dataset cache on disk: an entry per cache key (the token
//! store, `data_report.json`, `excluded.jsonl`), and the shards of a
//! preparation in parts. Both are filled in a staging directory as the
//! preparation streams, and renamed into place whole.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use pt_fs::{copy_atomically, create_buffered, write_atomically};

use crate::packing::Blocks;
use crate::report::{DataReport, Excluded, StepReport};
use crate::store;

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
        expected: u64,
    },
}

pub const REPORT: &str = "data_report.json";
pub const EXCLUDED: &str = "excluded.jsonl";
pub(crate) const SHARD: &str = "shard.json";

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

/// A cache directory being filled: a temporary sibling of its final place,
/// removed on any error, renamed into place by [`Staging::commit`] so that
/// a reader never sees half a directory.
pub(crate) struct Staging {
    dir: tempfile::TempDir,
    target: PathBuf,
}

impl Staging {
    pub(crate) fn new(target: &Path) -> Result<Self> {
        let parent = target.parent().expect("a cache directory has a parent");
        fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create cache directory", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
        Ok(Self {
            dir,
            target: target.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the directory into place. Another process storing the same
    /// directory meanwhile (ranks of one job) is not an error: the contents
    /// are the same.
    pub(crate) fn commit(self) -> Result<()> {
        let target = &self.target;
        if target.exists() {
            fs::remove_dir_all(target)
                .with_context(|| format!("{}: cannot replace cache entry", target.display()))?;
        }
        match fs::rename(self.dir.path(), target) {
            Err(_) if target.is_dir() => Ok(()),
            stored => {
                // Renamed: nothing is left to remove.
                let _ = self.dir.keep();
                stored.with_context(|| format!("{}: cannot store cache entry", target.display()))
            }
        }
    }
}

/// `excluded.jsonl` lines, written as records come.
pub(crate) struct ExcludedWriter(BufWriter<File>);

impl ExcludedWriter {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        Ok(Self(create_buffered(path)?))
    }

    pub(crate) fn write(&mut self, record: &Excluded) -> Result<()> {
        self.0.write_all(&crate::text::to_inert_json(record)?)?;
        self.0.write_all(b"\n")?;
        Ok(())
    }

    /// Appends the lines of the file `part`.
    pub(crate) fn append(&mut self, part: &Path) -> Result<()> {
        let mut file =
            File::open(part).with_context(|| format!("{}: cannot read", part.display()))?;
        std::io::copy(&mut file, &mut self.0)?;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        Ok(self.0.flush()?)
    }
}

/// The name of a split's plugin exclusions while a preparation runs.
pub(crate) fn excluded_part(dir: &Path, split: &str) -> PathBuf {
    dir.join(format!("excluded-{split}.jsonl"))
}

/// Documents' token ids as a shard keeps them for the merge:
/// `SPLIT.documents` (u32, concatenated) and `SPLIT.document_lengths` (u64).
pub(crate) struct DocumentWriter {
    tokens: BufWriter<File>,
    lengths: BufWriter<File>,
}

fn document_files(dir: &Path, split: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{split}.documents")),
        dir.join(format!("{split}.document_lengths")),
    )
}

impl DocumentWriter {
    pub(crate) fn create(dir: &Path, split: &str) -> Result<Self> {
        let (tokens, lengths) = document_files(dir, split);
        Ok(Self {
            tokens: create_buffered(&tokens)?,
            lengths: create_buffered(&lengths)?,
        })
    }

    pub(crate) fn push(&mut self, document: &[u32]) -> Result<()> {
        for id in document {
            self.tokens.write_all(&id.to_le_bytes())?;
        }
        self.lengths
            .write_all(&(document.len() as u64).to_le_bytes())?;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        self.tokens.flush()?;
        self.lengths.flush()?;
        Ok(())
    }
}

/// Streams the documents a shard kept for `split` into `each`.
fn read_documents(
    dir: &Path,
    split: &str,
    each: &mut dyn FnMut(&[u32]) -> Result<()>,
) -> Result<()> {
    let (tokens, lengths) = document_files(dir, split);
    let open = |path: &Path| -> Result<BufReader<File>> {
        Ok(BufReader::with_capacity(
            1 << 20,
            File::open(path).with_context(|| format!("{}: cannot read", path.display()))?,
        ))
    };
    let corrupt = || CacheError::CorruptShard(dir.to_path_buf());
    let (mut tokens, mut lengths) = (open(&tokens)?, open(&lengths)?);
    let (mut length, mut bytes, mut document) = ([0u8; 8], Vec::new(), Vec::new());
    loop {
        match lengths.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        bytes.resize(u64::from_le_bytes(length) as usize * 4, 0);
        tokens.read_exact(&mut bytes).with_context(corrupt)?;
        document.clear();
        document.extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
        each(&document)?;
    }
    if tokens.read(&mut [0])? != 0 {
        anyhow::bail!(corrupt());
    }
    Ok(())
}

/// A shard's record of one split: what the merge needs besides the documents.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct ShardSplit {
    pub(crate) documents_read: u64,
    pub(crate) steps: Vec<StepReport>,
}

/// `shard.json`: a shard's report, and per split its record.
#[derive(Serialize, Deserialize)]
pub(crate) struct ShardRecord {
    pub(crate) report: DataReport,
    pub(crate) validation: ShardSplit,
    pub(crate) train: ShardSplit,
}

pub(crate) fn save_shard(dir: &Path, record: &ShardRecord) -> Result<()> {
    fs::write(dir.join(SHARD), serde_json::to_vec(record)?)?;
    Ok(())
}

pub(crate) fn load_shard(dir: &Path) -> Result<ShardRecord> {
    let path = dir.join(SHARD);
    serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .context(CacheError::CorruptShard(path))
}

/// Where the merge puts a split's documents and exclusions.
pub(crate) trait ShardSink {
    fn document(&mut self, tokens: &[u32]) -> Result<()>;
    /// The `excluded.jsonl` lines in the file `part`.
    fn excluded_from(&mut self, part: &Path) -> Result<()>;
}

/// The shards of a preparation in parts, in shard order.
pub(crate) struct Shards {
    dirs: Vec<PathBuf>,
    records: Vec<ShardRecord>,
}

pub(crate) fn load_shards(dir: &Path, count: usize) -> Result<Shards> {
    let mut shards = Shards {
        dirs: Vec::with_capacity(count),
        records: Vec::with_capacity(count),
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
        shards.dirs.push(shard);
    }
    Ok(shards)
}

impl Shards {
    /// One split of the shards joined in order, as one unsharded run makes
    /// it: each document into `each`, the exclusions onto `excluded`; returns
    /// the steps' totals. `expected` documents must have been read in all,
    /// or the shards came from other files.
    pub(crate) fn join_split(
        &self,
        split: &str,
        expected: u64,
        sink: &mut dyn ShardSink,
    ) -> Result<Vec<StepReport>> {
        let part = |record: &ShardRecord| match split {
            "train" => record.train.clone(),
            _ => record.validation.clone(),
        };
        let read: u64 = self.records.iter().map(|r| part(r).documents_read).sum();
        if read != expected {
            return Err(CacheError::ShardsFromOtherFiles {
                read,
                split: split.into(),
                expected,
            }
            .into());
        }
        let mut steps: Vec<StepReport> = Vec::new();
        for (dir, record) in self.dirs.iter().zip(&self.records) {
            read_documents(dir, split, &mut |document| sink.document(document))?;
            sink.excluded_from(&excluded_part(dir, split))?;
            let part = part(record);
            if steps.is_empty() {
                steps = part
                    .steps
                    .iter()
                    .map(|s| StepReport {
                        plugin: s.plugin.clone(),
                        kind: s.kind,
                        ..StepReport::default()
                    })
                    .collect();
            }
            for (total, step) in steps.iter_mut().zip(&part.steps) {
                total.merge(step);
            }
        }
        Ok(steps)
    }
}

/// The report (as a later run finds it: a cache hit) into the staging
/// directory of an entry.
pub(crate) fn save_report(dir: &Path, report: &DataReport) -> Result<()> {
    let mut cached = report.clone();
    cached.cache_hit = true;
    fs::write(
        dir.join(REPORT),
        crate::text::to_inert_json_pretty(&cached)?,
    )?;
    Ok(())
}

/// An entry's blocks, mapped, and its report.
pub(crate) fn load_entry(entry: &Path) -> Result<Prepared> {
    let report: DataReport = serde_json::from_slice(&fs::read(entry.join(REPORT))?)
        .context(CacheError::CorruptEntry(entry.to_path_buf()))?;
    let (train, validation) = store::open(entry)?;
    Ok(Prepared {
        train,
        validation,
        report,
    })
}
