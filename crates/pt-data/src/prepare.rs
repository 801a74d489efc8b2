//! `pt-host prepare`: corpus files to cached training and validation blocks,
//! with `data_report.json` and `excluded.jsonl` in the output directory.
//!
//! A large corpus can be prepared in shards (a SLURM array, a Kubernetes
//! indexed job): shard `i` of `n` cleans and tokenizes its contiguous share of
//! each split's plugin batches into the cache, and a merge concatenates the
//! shards in order and packs them — the very dataset, under the very cache
//! key, that one unsharded preparation builds.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cache::{
    self, DocumentWriter, ExcludedWriter, Prepared, ShardRecord, ShardSink, ShardSplit, Shards,
    Staging,
};
use crate::corpus::{self, ReadOptions};
use crate::dedup::{self, Dedup, Deduplicator, Duplicate, DuplicateCounts};
use crate::packing::{Blocks, Packed, Packer};
use crate::pipeline::{self, InputBatch, PipelineOptions, SplitSink, Stages};
use crate::report::{DataReport, DedupReport, Excluded, FileReport, PluginReport, SplitReport};
use crate::steps::StepPlugin;
use crate::store::{self, StoreWriter};
use crate::tokenize::Tokenizer;

/// Bump when the cached dataset's layout or meaning changes.
/// 2: plugin instances fresh per batch (results independent of workers),
/// bounded augmentation. 3: the token store (mapped u16/u32 files).
const CACHE_FORMAT: u32 = 3;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// `None` for evaluation alone (then `validation_dir` must be given).
    pub train_dir: Option<PathBuf>,
    pub validation_dir: Option<PathBuf>,
    /// Without a validation directory: this percent of the training
    /// documents becomes validation data (`validation_split` says which).
    pub validation_split_percentage: f64,
    /// Which training documents that percent is.
    pub validation_split: ValidationSplit,
    pub read: ReadOptions,
    pub block_size: usize,
    pub packing: bool,
    pub max_train_samples: Option<usize>,
    pub max_eval_samples: Option<usize>,
    pub pipeline: PipelineOptions,
    pub cache_dir: PathBuf,
    pub overwrite_cache: bool,
    /// Preparing a part of the corpus, or merging the parts (`None`: all at once).
    pub sharding: Option<Sharding>,
    /// Duplicates dropped before the plugins run.
    pub dedup: Dedup,
    /// Bytes deduplication may hold its keys in; the rest are sorted on disk.
    pub dedup_memory: usize,
}

/// Which training documents validate when there is no validation directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidationSplit {
    /// The first ones, in corpus order: HF's `train[:N%]`, MedicalGPT's split.
    #[default]
    First,
    /// A seeded random choice (`--seed`), for corpora whose first files
    /// are not like the rest (LLaMA-Factory's `val_size`).
    Random,
}

/// A preparation in parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Clean and tokenize shard `index` of `count` into the cache; no blocks yet.
    Part { index: usize, count: usize },
    /// Pack the `count` cached shards into the dataset.
    Merge { count: usize },
}

/// A plugin as `prepare` runs it, with what the report and cache key record.
pub struct PreparePlugin<'a> {
    pub plugin: &'a dyn StepPlugin,
    pub report: PluginReport,
}

/// Hooks for progress display.
pub trait Progress: Sync {
    /// A stage starts (`read`, which scans the corpus, then each split):
    /// its text bytes in all.
    fn start(&self, stage: &str, bytes: u64);
    fn advance(&self, documents: u64, bytes: u64);
    fn finish(&self);
}

impl Progress for () {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

/// What a user fixes by passing other options (the binary says which flags).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("no corpus: give a training or a validation directory")]
    NoCorpus,
    #[error("shard index {index} is not below the shard count {count}")]
    ShardOutOfRange { index: usize, count: usize },
}

/// Everything that changes the prepared dataset goes into the cache key.
#[derive(Serialize)]
struct CacheKey<'a> {
    format: u32,
    train: Vec<(String, &'a str)>,
    validation: Vec<(String, &'a str)>,
    validation_split_percentage: Option<f64>,
    /// Absent (the key unchanged) for the first documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    validation_split: Option<ValidationSplit>,
    tokenizer: &'a str,
    plugins: Vec<(&'a str, &'a str, &'a str)>,
    keep_linebreaks: bool,
    text_field: &'a str,
    on_bad_record: pipeline::ErrorPolicy,
    max_document_bytes: usize,
    block_size: usize,
    packing: bool,
    max_train_samples: Option<usize>,
    max_eval_samples: Option<usize>,
    batch_size: usize,
    seed: u64,
    on_error: pipeline::ErrorPolicy,
    max_derived_per_document: usize,
    max_derived_documents: u64,
    /// Absent (the key unchanged) when nothing is deduplicated.
    #[serde(skip_serializing_if = "is_none")]
    dedup: Dedup,
}

fn is_none(dedup: &Dedup) -> bool {
    *dedup == Dedup::None
}

/// A corpus file, found and hashed (not read yet).
struct CorpusFile {
    path: PathBuf,
    bytes: u64,
    digest: String,
}

/// The corpus files of both splits.
struct Corpus {
    train: Vec<CorpusFile>,
    validation: Vec<CorpusFile>,
}

impl Corpus {
    fn discover(options: &PrepareOptions) -> Result<Self> {
        if options.train_dir.is_none() && options.validation_dir.is_none() {
            return Err(PrepareError::NoCorpus.into());
        }
        let files = |dir: &Option<PathBuf>| -> Result<Vec<CorpusFile>> {
            let Some(dir) = dir else {
                return Ok(Vec::new());
            };
            corpus::discover(dir)?
                .into_iter()
                .map(|path| {
                    let (bytes, digest) = corpus::file_digest(&path)?;
                    Ok(CorpusFile {
                        path,
                        bytes,
                        digest,
                    })
                })
                .collect()
        };
        Ok(Self {
            train: files(&options.train_dir)?,
            validation: files(&options.validation_dir)?,
        })
    }
}

fn relative_digests<'a>(dir: Option<&Path>, files: &'a [CorpusFile]) -> Vec<(String, &'a str)> {
    let Some(dir) = dir else {
        return Vec::new();
    };
    files
        .iter()
        .map(|f| {
            let path = f.path.strip_prefix(dir).unwrap_or(&f.path);
            (path.display().to_string(), f.digest.as_str())
        })
        .collect()
}

fn cache_key(
    options: &PrepareOptions,
    plugins: &[PreparePlugin<'_>],
    tokenizer: &Tokenizer,
    corpus: &Corpus,
) -> Result<String> {
    let key = CacheKey {
        format: CACHE_FORMAT,
        train: relative_digests(options.train_dir.as_deref(), &corpus.train),
        validation: relative_digests(options.validation_dir.as_deref(), &corpus.validation),
        validation_split_percentage: options
            .validation_dir
            .is_none()
            .then_some(options.validation_split_percentage),
        validation_split: (options.validation_dir.is_none()
            && options.validation_split == ValidationSplit::Random)
            .then_some(ValidationSplit::Random),
        tokenizer: &tokenizer.digest,
        plugins: plugins
            .iter()
            .map(|p| {
                let report = &p.report;
                (
                    report.name.as_str(),
                    report.digest.as_str(),
                    report.config.as_str(),
                )
            })
            .collect(),
        keep_linebreaks: options.read.keep_linebreaks,
        text_field: &options.read.text_field,
        on_bad_record: options.read.on_bad_record,
        max_document_bytes: options.read.max_document_bytes,
        block_size: options.block_size,
        packing: options.packing,
        max_train_samples: options.max_train_samples,
        max_eval_samples: options.max_eval_samples,
        batch_size: options.pipeline.batch_size,
        seed: options.pipeline.seed,
        on_error: options.pipeline.on_error,
        max_derived_per_document: options.pipeline.max_derived_per_document,
        max_derived_documents: options.pipeline.max_derived_documents,
        dedup: options.dedup,
    };
    Ok(hex::encode(Sha256::digest(serde_json::to_vec(&key)?)))
}

/// One directory's documents as the first pass over it found them.
#[derive(Default)]
struct Scanned {
    files: Vec<FileReport>,
    /// Records the reader skipped, listed with what plugins exclude.
    unreadable: Vec<Excluded>,
    /// Per document read, in corpus order: dropped as a duplicate.
    duplicate: Vec<bool>,
    /// Text bytes of each kept (not duplicate) document.
    kept_bytes: Vec<u32>,
    /// The dropped documents, to list.
    duplicates: Vec<Duplicate>,
    /// Text bytes read up to the last duplicate: what listing them reads.
    bytes_to_last_duplicate: u64,
    /// Deduplication keys sorted on disk.
    spilled_bytes: u64,
}

impl Scanned {
    /// The dropped documents per kind.
    fn counts(&self) -> DuplicateCounts {
        let near = self.duplicates.iter().filter(|d| d.near).count() as u64;
        DuplicateCounts {
            exact: self.duplicates.len() as u64 - near,
            near,
        }
    }
}

/// The first pass over a directory's files: counts every document, finds
/// the bad records (failing on the first one under `--on_bad_record fail`,
/// before any plugin runs) and the duplicates.
fn scan(
    files: &[CorpusFile],
    split: &str,
    options: &PrepareOptions,
    spill_dir: &Path,
    progress: &dyn Progress,
) -> Result<Scanned> {
    let mut scanned = Scanned::default();
    let mut deduplicator = (options.dedup != Dedup::None)
        .then(|| Deduplicator::new(options.dedup, options.dedup_memory, spill_dir))
        .transpose()?;
    let mut document_bytes: Vec<u32> = Vec::new();
    // Progress in steps of a megabyte, not per document.
    let (mut documents, mut bytes) = (0, 0);
    let mut advance = |document_bytes: u64, at_least: u64| {
        documents += u64::from(document_bytes > 0);
        bytes += document_bytes;
        if bytes >= at_least {
            progress.advance(documents, bytes);
            (documents, bytes) = (0, 0);
        }
    };
    for file in files {
        let path = file.path.display().to_string();
        let read = corpus::read_stream(&file.path, &options.read, &mut |document| {
            advance(document.text.len() as u64, 1 << 20);
            document_bytes.push(document.text.len() as u32);
            match &mut deduplicator {
                Some(deduplicator) => deduplicator.add(&document.text),
                None => Ok(()),
            }
        })?;
        scanned
            .unreadable
            .extend(read.bad_records.iter().map(|bad| Excluded {
                source: format!("{path}:{}", bad.line),
                plugin: "(reader)".into(),
                kind: None,
                reason: bad.reason.clone(),
                text: String::new(),
            }));
        advance(0, 0);
        scanned.files.push(FileReport {
            path,
            split: split.into(),
            documents: read.documents,
            bytes: file.bytes,
            bad_records: read.bad_records.len() as u64,
        });
    }
    let found = deduplicator
        .map(Deduplicator::finish)
        .transpose()?
        .unwrap_or_default();
    scanned.spilled_bytes = found.spilled_bytes;
    scanned.duplicate = vec![false; document_bytes.len()];
    for duplicate in &found.duplicates {
        scanned.duplicate[duplicate.index] = true;
    }
    if let Some(last) = found.duplicates.last() {
        scanned.bytes_to_last_duplicate = document_bytes[..=last.index]
            .iter()
            .map(|&b| b as u64)
            .sum();
    }
    scanned.kept_bytes = document_bytes
        .into_iter()
        .zip(&scanned.duplicate)
        .filter(|&(_, &duplicate)| !duplicate)
        .map(|(bytes, _)| bytes)
        .collect();
    scanned.duplicates = found.duplicates;
    Ok(scanned)
}

/// Lists each duplicate the scan dropped in `dropped`, with its text and
/// the place of the kept document it duplicates: a second reading of the
/// files, up to the last duplicate.
fn list_duplicates(
    files: &[CorpusFile],
    scanned: &Scanned,
    read: &ReadOptions,
    dropped: &mut ExcludedWriter,
    progress: &dyn Progress,
) -> Result<()> {
    let Some(last) = scanned.duplicates.last() else {
        return Ok(());
    };
    // Where each document a duplicate names was read: file and line.
    let mut originals: HashMap<usize, (usize, u32)> =
        scanned.duplicates.iter().map(|d| (d.of, (0, 0))).collect();
    let mut next = scanned.duplicates.iter().peekable();
    let (mut index, mut documents, mut bytes) = (0, 0, 0);
    for (number, file) in files.iter().enumerate() {
        let path = file.path.display().to_string();
        let result = corpus::read_stream(&file.path, read, &mut |document| {
            (documents, bytes) = (documents + 1, bytes + document.text.len() as u64);
            if bytes >= 1 << 20 {
                progress.advance(std::mem::take(&mut documents), std::mem::take(&mut bytes));
            }
            if let Some(place) = originals.get_mut(&index) {
                *place = (number, document.line);
            }
            if let Some(duplicate) = next.next_if(|d| d.index == index) {
                let kind = match duplicate.near {
                    true => "near duplicate (MinHash)",
                    false => "exact duplicate",
                };
                let (file, line) = originals[&duplicate.of];
                dropped.write(&Excluded {
                    source: format!("{path}:{}", document.line),
                    plugin: "(dedup)".into(),
                    kind: None,
                    reason: format!("{kind} of {}:{line}", files[file].path.display()),
                    text: document.text,
                })?;
            }
            index += 1;
            match index > last.index {
                true => Err(corpus::Enough.into()),
                false => Ok(()),
            }
        });
        match result {
            Err(e) if e.is::<corpus::Enough>() => break,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    progress.advance(documents, bytes);
    anyhow::ensure!(
        next.next().is_none(),
        "the corpus changed while being prepared; prepare again"
    );
    Ok(())
}

/// Which of a directory's kept documents (numbered from 0 in corpus order)
/// a split takes.
#[derive(Clone, Copy)]
enum Take<'a> {
    All,
    /// The first `n`.
    First(usize),
    /// All but the first `n`.
    AfterFirst(usize),
    /// Those marked `true` (validation) or `false` (training).
    Marked(&'a [bool], bool),
}

impl Take<'_> {
    fn takes(self, kept: usize) -> bool {
        match self {
            Take::All => true,
            Take::First(n) => kept < n,
            Take::AfterFirst(n) => kept >= n,
            Take::Marked(marks, mark) => marks[kept] == mark,
        }
    }
}

/// A split's documents: the files, the duplicates the scan found among
/// them, and which kept ones the split takes.
struct SplitSource<'a> {
    name: &'static str,
    files: &'a [CorpusFile],
    scanned: &'a Scanned,
    take: Take<'a>,
}

impl SplitSource<'_> {
    /// Documents and text bytes of the split, by position in it.
    fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        let take = self.take;
        self.scanned
            .kept_bytes
            .iter()
            .enumerate()
            .filter(move |&(kept, _)| take.takes(kept))
            .map(|(_, &bytes)| bytes as u64)
    }

    /// Reads the split's documents at `range` (positions in the split) into
    /// batches of `batch_size`, numbered by their place in the whole split.
    fn read_batches(
        &self,
        read: &ReadOptions,
        batch_size: usize,
        range: std::ops::Range<usize>,
        batches: &mpsc::SyncSender<Result<InputBatch>>,
    ) {
        use corpus::Enough;
        if range.is_empty() {
            return;
        }
        let mut batch = InputBatch {
            index: range.start / batch_size,
            documents: Vec::with_capacity(batch_size),
        };
        let (mut index, mut kept, mut position) = (0, 0, 0);
        let send = |batch: &mut InputBatch| -> Result<()> {
            let next = InputBatch {
                index: batch.index + 1,
                documents: Vec::with_capacity(batch_size),
            };
            batches
                .send(Ok(std::mem::replace(batch, next)))
                .map_err(|_| Enough.into())
        };
        let mut read_all = || -> Result<()> {
            for (file, scanned) in self.files.iter().zip(&self.scanned.files) {
                let path = file.path.display().to_string();
                let first = index;
                let result = corpus::read_stream(&file.path, read, &mut |document| {
                    let duplicate = self.scanned.duplicate.get(index).copied().unwrap_or(true);
                    index += 1;
                    if duplicate {
                        return Ok(());
                    }
                    kept += 1;
                    if !self.take.takes(kept - 1) {
                        return Ok(());
                    }
                    position += 1;
                    if position <= range.start {
                        return Ok(());
                    }
                    batch
                        .documents
                        .push((format!("{path}:{}", document.line), document.text));
                    if batch.documents.len() == batch_size {
                        send(&mut batch)?;
                    }
                    // The range is read: the rest of the corpus is not.
                    match position == range.end {
                        true => Err(Enough.into()),
                        false => Ok(()),
                    }
                });
                match result {
                    Err(e) if e.is::<Enough>() => return Ok(()),
                    Err(e) => return Err(e),
                    Ok(_) if (index - first) as u64 != scanned.documents => {
                        anyhow::bail!("{path}: changed while being prepared; prepare again")
                    }
                    Ok(_) => {}
                }
            }
            Ok(())
        };
        let result = read_all().and_then(|()| match batch.documents.is_empty() {
            true => Ok(()),
            false => send(&mut batch),
        });
        if let Err(error) = result
            && !error.is::<Enough>()
        {
            let _ = batches.send(Err(error));
        }
    }
}

/// Takes `n` of `len` documents chosen by `seed` (those whose seeded hash
/// of their index is smallest): `true` for each one taken.
fn random_choice(len: usize, n: usize, seed: u64) -> Vec<bool> {
    let key = |i: usize| dedup::mix64(seed ^ dedup::mix64(i as u64));
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by_key(|&i| key(i));
    let mut chosen = vec![false; len];
    order.iter().take(n).for_each(|&i| chosen[i] = true);
    chosen
}

/// Where a preparation's result lives in the cache.
struct Place {
    /// The whole dataset's entry.
    entry: PathBuf,
    /// The directory of its shards.
    shards: PathBuf,
    /// This process's shard: index, count and directory.
    part: Option<(usize, usize, PathBuf)>,
}

impl Place {
    fn new(options: &PrepareOptions, key: &str) -> Result<Self> {
        let datasets = options.cache_dir.join("datasets");
        let shards = datasets.join(format!("{key}.shards"));
        let part = match options.sharding {
            Some(Sharding::Part { index, count }) => {
                if count == 0 || index >= count {
                    return Err(PrepareError::ShardOutOfRange { index, count }.into());
                }
                Some((index, count, shards.join(format!("{index}-of-{count}"))))
            }
            _ => None,
        };
        Ok(Self {
            entry: datasets.join(key),
            shards,
            part,
        })
    }

    /// Where this process's result goes.
    fn target(&self) -> &Path {
        self.part.as_ref().map_or(&self.entry, |(_, _, dir)| dir)
    }

    /// The result of an earlier preparation with the same key, if stored.
    fn cached(
        &self,
        plugins: &[PreparePlugin<'_>],
        output_dir: Option<&Path>,
    ) -> Result<Option<Prepared>> {
        if let Some((_, _, shard)) = &self.part {
            if !shard.join(cache::SHARD).is_file() {
                return Ok(None);
            }
            let mut report = cache::load_shard(shard)?.report;
            report.cache_hit = true;
            return Ok(Some(Prepared::counted_only(report)));
        }
        if !self.entry.join(cache::REPORT).is_file() {
            return Ok(None);
        }
        let mut prepared = cache::load_entry(&self.entry)?;
        // The key fixes the components; where they were loaded from is this run's.
        prepared.report.plugins = plugins.iter().map(|p| p.report.clone()).collect();
        cache::publish(&self.entry, &prepared.report, output_dir)?;
        Ok(Some(prepared))
    }
}

impl Prepared {
    /// A shard's result: counts, no blocks.
    fn counted_only(report: DataReport) -> Self {
        Self {
            train: Blocks::default(),
            validation: Blocks::default(),
            report,
        }
    }
}

/// Where a split's tokenized documents go: packed into the token store, or
/// (a shard) kept as documents for the merge to pack.
enum Tokens {
    Packed(Packer<StoreWriter>),
    Documents(DocumentWriter),
}

/// A split's results as they come: counted, tokens on, exclusions listed.
struct SplitFiles {
    tokens: Tokens,
    documents: u64,
    token_count: u64,
    excluded: ExcludedWriter,
}

impl SplitFiles {
    fn push(&mut self, document: &[u32]) -> Result<()> {
        self.documents += 1;
        self.token_count += document.len() as u64;
        match &mut self.tokens {
            Tokens::Packed(packer) => packer.push(document),
            Tokens::Documents(writer) => writer.push(document),
        }
    }

    /// Flushes the files: what packing made (nothing for a shard).
    fn finish(self) -> Result<Packed> {
        self.excluded.finish()?;
        match self.tokens {
            Tokens::Packed(packer) => {
                let (writer, packed) = packer.finish();
                writer.finish()?;
                Ok(packed)
            }
            Tokens::Documents(writer) => writer.finish().map(|()| Packed::default()),
        }
    }
}

impl ShardSink for SplitFiles {
    fn document(&mut self, tokens: &[u32]) -> Result<()> {
        self.push(tokens)
    }

    fn excluded_from(&mut self, part: &Path) -> Result<()> {
        self.excluded.append(part)
    }
}

impl SplitSink for SplitFiles {
    fn document(&mut self, tokens: Vec<u32>) -> Result<()> {
        self.push(&tokens)
    }

    fn excluded(&mut self, record: Excluded) -> Result<()> {
        self.excluded.write(&record)
    }
}

/// Runs the plugins and the tokenizer over a split: the whole split, this
/// shard's part of it, or (merging) the shards' outputs joined.
struct SplitRunner<'a> {
    plugins: Vec<&'a dyn StepPlugin>,
    tokenizer: &'a Tokenizer,
    options: &'a PrepareOptions,
    part: Option<(usize, usize)>,
    merged: Option<Shards>,
    progress: &'a dyn Progress,
    staging: &'a Path,
    /// Bytes per id in the token store.
    width: usize,
}

impl SplitRunner<'_> {
    /// The split's counts (blocks too, unless this is a shard).
    fn run(&self, source: &SplitSource<'_>, max_blocks: Option<usize>) -> Result<SplitReport> {
        let split = source.name;
        let excluded = ExcludedWriter::create(&cache::excluded_part(self.staging, split))?;
        let tokens = match self.part {
            Some(_) => Tokens::Documents(DocumentWriter::create(self.staging, split)?),
            None => Tokens::Packed(Packer::new(
                StoreWriter::create(self.staging, split, self.width)?,
                self.options.block_size,
                (!self.options.packing).then_some(self.tokenizer.pad_id),
                max_blocks,
            )),
        };
        let mut files = SplitFiles {
            tokens,
            documents: 0,
            token_count: 0,
            excluded,
        };
        let documents = source.sizes().count();
        let (read, steps) = match &self.merged {
            Some(shards) => {
                let steps = shards.join_split(split, documents as u64, &mut files)?;
                (documents as u64, steps)
            }
            None => self.tokenize(source, documents, &mut files)?,
        };
        let report = SplitReport {
            documents_read: read,
            documents: files.documents,
            tokens: files.token_count,
            steps,
            ..SplitReport::default()
        };
        let packed = files.finish()?;
        Ok(SplitReport {
            blocks: packed.blocks,
            tokens_dropped: packed.tokens_dropped,
            blocks_truncated: packed.blocks_truncated,
            ..report
        })
    }

    /// Reads the split's documents (this shard's share of them) on one
    /// thread and runs them through the pipeline: documents read, and the
    /// steps' reports.
    fn tokenize(
        &self,
        source: &SplitSource<'_>,
        documents: usize,
        files: &mut SplitFiles,
    ) -> Result<(u64, Vec<crate::report::StepReport>)> {
        let batch_size = self.options.pipeline.batch_size.max(1);
        let batches = documents.div_ceil(batch_size);
        let range = match self.part {
            Some((index, count)) => {
                let (first, last) = (index * batches / count, (index + 1) * batches / count);
                first * batch_size..(last * batch_size).min(documents)
            }
            None => 0..documents,
        };
        let bytes = source.sizes().skip(range.start).take(range.len()).sum();
        self.progress.start(source.name, bytes);
        let stages = Stages::new(&self.plugins, source.name == "train");
        let steps = std::thread::scope(|scope| {
            let (sender, receiver) = mpsc::sync_channel(2);
            let reader_range = range.clone();
            scope.spawn(move || {
                source.read_batches(&self.options.read, batch_size, reader_range, &sender)
            });
            pipeline::run_stream(
                &mut receiver.into_iter(),
                &stages,
                self.tokenizer,
                &self.options.pipeline,
                &|d, b| self.progress.advance(d, b),
                files,
            )
        })?;
        self.progress.finish();
        Ok((range.len() as u64, steps))
    }
}

/// Reads, cleans, tokenizes and packs, or loads the same result from the cache.
/// Writes `data_report.json` and `excluded.jsonl` into `output_dir`, if given
/// (a shard writes its report into the cache instead).
///
/// The corpus is streamed, twice: a first pass counts the documents and
/// finds bad records and duplicates; the second runs each split's documents
/// through the plugins and the tokenizer a few batches at a time, straight
/// into the token store. Memory holds a few bytes per document and the
/// batches in flight, not the corpus.
pub fn prepare(
    options: &PrepareOptions,
    plugins: &[PreparePlugin<'_>],
    tokenizer: &Tokenizer,
    output_dir: Option<&Path>,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let started = Instant::now();
    let corpus = Corpus::discover(options)?;
    let key = cache_key(options, plugins, tokenizer, &corpus)?;
    let place = Place::new(options, &key)?;
    if let Some(dir) = output_dir {
        fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
    }
    if !options.overwrite_cache
        && let Some(prepared) = place.cached(plugins, output_dir)?
    {
        return Ok(prepared);
    }

    let staging = Staging::new(place.target())?;
    let corpus_bytes = corpus
        .train
        .iter()
        .chain(&corpus.validation)
        .map(|f| f.bytes)
        .sum();
    progress.start("read", corpus_bytes);
    let train_scan = scan(&corpus.train, "train", options, staging.path(), progress)?;
    let validation_scan = scan(
        &corpus.validation,
        "validation",
        options,
        staging.path(),
        progress,
    )?;
    progress.finish();
    // A shard leaves this to the merge, which finds the duplicates again
    // over the whole corpus.
    let dedup_part = staging.path().join("excluded-dedup.jsonl");
    if place.part.is_none() {
        let mut dropped = ExcludedWriter::create(&dedup_part)?;
        let scans = [
            (&corpus.train, &train_scan),
            (&corpus.validation, &validation_scan),
        ];
        if scans.iter().any(|(_, s)| !s.duplicates.is_empty()) {
            let bytes = scans.iter().map(|(_, s)| s.bytes_to_last_duplicate).sum();
            progress.start("duplicates", bytes);
            for (files, scanned) in scans {
                list_duplicates(files, scanned, &options.read, &mut dropped, progress)?;
            }
            progress.finish();
        }
        dropped.finish()?;
    }

    // Without a validation directory, a share of the (deduplicated)
    // training documents validates.
    let kept = train_scan.kept_bytes.len();
    let share =
        (kept as f64 * options.validation_split_percentage / 100.0).round_ties_even() as usize;
    let chosen = match options.validation_split {
        ValidationSplit::Random if options.validation_dir.is_none() => {
            random_choice(kept, share, options.pipeline.seed)
        }
        _ => Vec::new(),
    };
    let (train_take, validation_source) = match (&options.validation_dir, options.validation_split)
    {
        (Some(_), _) => (
            Take::All,
            SplitSource {
                name: "validation",
                files: &corpus.validation,
                scanned: &validation_scan,
                take: Take::All,
            },
        ),
        (None, split) => {
            let (train, validation) = match split {
                ValidationSplit::First => (Take::AfterFirst(share), Take::First(share)),
                ValidationSplit::Random => {
                    (Take::Marked(&chosen, false), Take::Marked(&chosen, true))
                }
            };
            let source = SplitSource {
                name: "validation",
                files: &corpus.train,
                scanned: &train_scan,
                take: validation,
            };
            (train, source)
        }
    };
    let train_source = SplitSource {
        name: "train",
        files: &corpus.train,
        scanned: &train_scan,
        take: train_take,
    };

    let width = store::width_for(tokenizer.id_bound().max(tokenizer.pad_id as usize + 1));
    let runner = SplitRunner {
        plugins: plugins.iter().map(|p| p.plugin).collect(),
        tokenizer,
        options,
        part: place.part.as_ref().map(|&(index, count, _)| (index, count)),
        merged: match options.sharding {
            Some(Sharding::Merge { count }) => Some(cache::load_shards(&place.shards, count)?),
            _ => None,
        },
        progress,
        staging: staging.path(),
        width,
    };
    let validation = runner.run(&validation_source, options.max_eval_samples)?;
    let train = runner.run(&train_source, options.max_train_samples)?;

    let report = DataReport {
        cache_key: key.clone(),
        cache_hit: false,
        block_size: options.block_size,
        packing: options.packing,
        files: [&train_scan.files[..], &validation_scan.files[..]].concat(),
        plugins: plugins.iter().map(|p| p.report.clone()).collect(),
        train,
        validation,
        seconds: started.elapsed().as_secs_f64(),
        shard: None,
        dedup: (options.dedup != Dedup::None).then_some(DedupReport {
            mode: options.dedup,
            train: train_scan.counts(),
            validation: validation_scan.counts(),
            spilled_bytes: train_scan.spilled_bytes + validation_scan.spilled_bytes,
        }),
        mix: None,
    };
    if let Some((index, count, _)) = &place.part {
        let steps = |split: &SplitReport| ShardSplit {
            documents_read: split.documents_read,
            steps: split.steps.clone(),
        };
        let report = DataReport {
            shard: Some(format!("{index} of {count}")),
            ..report
        };
        let record = ShardRecord {
            validation: steps(&report.validation),
            train: steps(&report.train),
            report,
        };
        cache::save_shard(staging.path(), &record)?;
        staging.commit()?;
        return Ok(Prepared::counted_only(record.report));
    }

    // excluded.jsonl: unreadable records, duplicates, then what the plugins
    // excluded from validation and from training.
    let mut excluded = ExcludedWriter::create(&staging.path().join(cache::EXCLUDED))?;
    for record in train_scan
        .unreadable
        .iter()
        .chain(&validation_scan.unreadable)
    {
        excluded.write(record)?;
    }
    let parts = [
        dedup_part,
        cache::excluded_part(staging.path(), "validation"),
        cache::excluded_part(staging.path(), "train"),
    ];
    for part in &parts {
        excluded.append(part)?;
        fs::remove_file(part)?;
    }
    excluded.finish()?;
    store::write_header(
        staging.path(),
        width,
        options.block_size,
        report.train.blocks,
        report.validation.blocks,
    )?;
    cache::save_report(staging.path(), &report)?;
    staging.commit()?;
    cache::publish(&place.entry, &report, output_dir)?;
    let (train, validation) = store::open(&place.entry)?;
    Ok(Prepared {
        train,
        validation,
        report,
    })
}
