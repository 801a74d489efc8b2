//! `pt-host prepare`: corpus files to cached training and validation blocks,
//! with `data_report.json` and `excluded.jsonl` in the output directory.
//!
//! A large corpus can be prepared in shards (a SLURM array, a Kubernetes
//! indexed job): shard `i` of `n` cleans and tokenizes its contiguous share of
//! each split's plugin batches into the cache, and a merge concatenates the
//! shards in order and packs them — the very dataset, under the very cache
//! key, that one unsharded preparation builds.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cache::{self, Prepared, Shards};
use crate::corpus::{self, ReadOptions, SourceFile};
use crate::dedup::{self, Dedup, DuplicateCounts};
use crate::packing::{self, Blocks};
use crate::pipeline::{self, InputDoc, PipelineOptions, SplitOutput};
use crate::report::{DataReport, DedupReport, Excluded, FileReport, PluginReport, SplitReport};
use crate::steps::StepPlugin;
use crate::tokenize::Tokenizer;

/// Bump when the cached dataset's layout or meaning changes.
/// 2: plugin instances fresh per batch (results independent of workers),
/// bounded augmentation.
const CACHE_FORMAT: u32 = 2;

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
    /// A split starts: its document and byte totals.
    fn start(&self, split: &str, documents: u64, bytes: u64);
    fn advance(&self, documents: u64, bytes: u64);
    fn finish(&self);
}

impl Progress for () {
    fn start(&self, _: &str, _: u64, _: u64) {}
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

/// The corpus files of both splits, read.
struct Corpus {
    train: Vec<SourceFile>,
    validation: Vec<SourceFile>,
}

/// A split's documents: `FILE:LINE` and text.
type Documents = Vec<(String, String)>;

impl Corpus {
    fn read(options: &PrepareOptions) -> Result<Self> {
        if options.train_dir.is_none() && options.validation_dir.is_none() {
            return Err(PrepareError::NoCorpus.into());
        }
        let read_dir = |dir: &Option<PathBuf>| -> Result<Vec<SourceFile>> {
            let Some(dir) = dir else {
                return Ok(Vec::new());
            };
            corpus::discover(dir)?
                .iter()
                .map(|path| corpus::read_file(path, &options.read))
                .collect()
        };
        Ok(Self {
            train: read_dir(&options.train_dir)?,
            validation: read_dir(&options.validation_dir)?,
        })
    }

    fn files(&self) -> impl Iterator<Item = (&SourceFile, &'static str)> {
        let train = self.train.iter().map(|f| (f, "train"));
        train.chain(self.validation.iter().map(|f| (f, "validation")))
    }

    fn file_reports(&self) -> Vec<FileReport> {
        self.files()
            .map(|(f, split)| FileReport {
                path: f.path.display().to_string(),
                split: split.into(),
                documents: f.documents.len() as u64,
                bytes: f.bytes,
                bad_records: f.bad_records.len() as u64,
            })
            .collect()
    }

    /// Records the reader skipped, listed with what plugins excluded.
    fn unreadable(&self) -> Vec<Excluded> {
        self.files()
            .flat_map(|(f, _)| {
                f.bad_records.iter().map(move |bad| Excluded {
                    source: format!("{}:{}", f.path.display(), bad.line),
                    plugin: "(reader)".into(),
                    kind: None,
                    reason: bad.reason.clone(),
                    text: String::new(),
                })
            })
            .collect()
    }

    /// The training and validation documents, duplicates dropped (each
    /// split on its own; a validation share is carved from the deduplicated
    /// training documents): without a validation directory, the first
    /// percent of the training documents validate. Also the dropped
    /// documents, listed, and their counts.
    fn into_documents(
        self,
        options: &PrepareOptions,
    ) -> (Documents, Documents, Vec<Excluded>, Option<DedupReport>) {
        let documents = |files: Vec<SourceFile>| -> Documents {
            files
                .into_iter()
                .flat_map(|f| {
                    let path = f.path.display().to_string();
                    f.documents
                        .into_iter()
                        .map(move |d| (format!("{path}:{}", d.line), d.text))
                })
                .collect()
        };
        let mut excluded = Vec::new();
        let mut train = documents(self.train);
        let train_duplicates = drop_duplicates(&mut train, options.dedup, &mut excluded);
        let (validation, validation_duplicates) = if options.validation_dir.is_some() {
            let mut validation = documents(self.validation);
            let dropped = drop_duplicates(&mut validation, options.dedup, &mut excluded);
            (validation, dropped)
        } else {
            let n = (train.len() as f64 * options.validation_split_percentage / 100.0)
                .round_ties_even() as usize;
            let validation = match options.validation_split {
                ValidationSplit::First => train.drain(..n.min(train.len())).collect(),
                ValidationSplit::Random => take_random(&mut train, n, options.pipeline.seed),
            };
            (validation, DuplicateCounts::default())
        };
        let report = (options.dedup != Dedup::None).then_some(DedupReport {
            mode: options.dedup,
            train: train_duplicates,
            validation: validation_duplicates,
        });
        (train, validation, excluded, report)
    }
}

/// Takes `n` of `documents` chosen by `seed` (those whose seeded hash of
/// their index is smallest), both parts kept in corpus order.
fn take_random(documents: &mut Documents, n: usize, seed: u64) -> Documents {
    let key = |i: usize| dedup::mix64(seed ^ dedup::mix64(i as u64));
    let mut order: Vec<usize> = (0..documents.len()).collect();
    order.sort_by_key(|&i| key(i));
    let mut chosen = vec![false; documents.len()];
    order.iter().take(n).for_each(|&i| chosen[i] = true);
    take_marked(documents, &chosen)
}

/// Moves the documents `marked` out of `documents`, both in corpus order.
fn take_marked(documents: &mut Documents, marked: &[bool]) -> Documents {
    let (mut taken, mut kept) = (Vec::new(), Vec::new());
    for (document, &mark) in std::mem::take(documents).into_iter().zip(marked) {
        match mark {
            true => taken.push(document),
            false => kept.push(document),
        }
    }
    *documents = kept;
    taken
}

/// Removes the duplicates among `documents` under `mode`, listing each with
/// the document it duplicates.
fn drop_duplicates(
    documents: &mut Documents,
    mode: Dedup,
    excluded: &mut Vec<Excluded>,
) -> DuplicateCounts {
    let duplicates = dedup::find_duplicates(documents.iter().map(|(_, text)| text.as_str()), mode);
    let mut counts = DuplicateCounts::default();
    let mut dropped = vec![false; documents.len()];
    for duplicate in &duplicates {
        let (source, text) = &documents[duplicate.index];
        let (kind, count) = match duplicate.near {
            true => ("near duplicate (MinHash)", &mut counts.near),
            false => ("exact duplicate", &mut counts.exact),
        };
        *count += 1;
        dropped[duplicate.index] = true;
        excluded.push(Excluded {
            source: source.clone(),
            plugin: "(dedup)".into(),
            kind: None,
            reason: format!("{kind} of {}", documents[duplicate.of].0),
            text: text.clone(),
        });
    }
    take_marked(documents, &dropped);
    counts
}

fn relative_digests<'a>(dir: Option<&Path>, files: &'a [SourceFile]) -> Vec<(String, &'a str)> {
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

/// Runs the plugins and the tokenizer over a split: the whole split, this
/// shard's part of it, or (merging) the shards' outputs joined.
struct SplitRunner<'a> {
    plugins: Vec<&'a dyn StepPlugin>,
    tokenizer: &'a Tokenizer,
    options: &'a PipelineOptions,
    part: Option<(usize, usize)>,
    merged: Option<Shards>,
    progress: &'a dyn Progress,
}

impl SplitRunner<'_> {
    /// Documents read and the split's output.
    fn run(
        &self,
        split: &str,
        docs: &[(String, String)],
        augment: bool,
    ) -> Result<(u64, SplitOutput)> {
        if let Some(merged) = &self.merged {
            return cache::join_split(merged, split, docs.len());
        }
        let batch_size = self.options.batch_size.max(1);
        let batches = docs.len().div_ceil(batch_size);
        let (first_batch, docs) = match self.part {
            Some((index, count)) => {
                let (first, last) = (index * batches / count, (index + 1) * batches / count);
                let range = first * batch_size..(last * batch_size).min(docs.len());
                (first, &docs[range])
            }
            None => (0, docs),
        };
        let inputs: Vec<InputDoc<'_>> = docs
            .iter()
            .map(|(s, t)| InputDoc { source: s, text: t })
            .collect();
        let bytes = inputs.iter().map(|d| d.text.len() as u64).sum();
        self.progress.start(split, inputs.len() as u64, bytes);
        let output = pipeline::run(
            &inputs,
            &self.plugins,
            augment,
            self.tokenizer,
            self.options,
            first_batch,
            &|d, b| self.progress.advance(d, b),
        )?;
        self.progress.finish();
        Ok((docs.len() as u64, output))
    }
}

/// A split's counts before packing: all a shard's report has.
fn counted(read: u64, output: &SplitOutput) -> SplitReport {
    SplitReport {
        documents_read: read,
        documents: output.documents.len() as u64,
        tokens: output.documents.iter().map(|d| d.len() as u64).sum(),
        steps: output.steps.clone(),
        ..SplitReport::default()
    }
}

/// A split's documents packed (or padded) into blocks, at most `max`.
fn pack(
    options: &PrepareOptions,
    pad_id: u32,
    (read, output): &(u64, SplitOutput),
    max: Option<usize>,
) -> (Blocks, SplitReport) {
    let (mut blocks, tokens_dropped) = if options.packing {
        packing::pack(&output.documents, options.block_size)
    } else {
        packing::pad_each(&output.documents, options.block_size, pad_id)
    };
    let blocks_truncated = max.map_or(0, |n| blocks.truncate(n)) as u64;
    let report = SplitReport {
        blocks: blocks.len() as u64,
        tokens_dropped,
        blocks_truncated,
        ..counted(*read, output)
    };
    (blocks, report)
}

/// Reads, cleans, tokenizes and packs, or loads the same result from the cache.
/// Writes `data_report.json` and `excluded.jsonl` into `output_dir`, if given
/// (a shard writes its report into the cache instead).
pub fn prepare(
    options: &PrepareOptions,
    plugins: &[PreparePlugin<'_>],
    tokenizer: &Tokenizer,
    output_dir: Option<&Path>,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let started = Instant::now();
    let corpus = Corpus::read(options)?;
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

    let files = corpus.file_reports();
    let mut excluded = corpus.unreadable();
    let (train_docs, validation_docs, duplicates, dedup) = corpus.into_documents(options);
    excluded.extend(duplicates);
    let runner = SplitRunner {
        plugins: plugins.iter().map(|p| p.plugin).collect(),
        tokenizer,
        options: &options.pipeline,
        part: place.part.as_ref().map(|&(index, count, _)| (index, count)),
        merged: match options.sharding {
            Some(Sharding::Merge { count }) => Some(cache::load_shards(&place.shards, count)?),
            _ => None,
        },
        progress,
    };
    let validation = runner.run("validation", &validation_docs, false)?;
    let train = runner.run("train", &train_docs, true)?;

    let report = |train: SplitReport, validation: SplitReport, shard: Option<String>| DataReport {
        cache_key: key.clone(),
        cache_hit: false,
        block_size: options.block_size,
        packing: options.packing,
        files: files.clone(),
        plugins: plugins.iter().map(|p| p.report.clone()).collect(),
        train,
        validation,
        seconds: started.elapsed().as_secs_f64(),
        shard,
        dedup: dedup.clone(),
    };
    if let Some((index, count, shard)) = &place.part {
        let report = report(
            counted(train.0, &train.1),
            counted(validation.0, &validation.1),
            Some(format!("{index} of {count}")),
        );
        cache::save_shard(shard, &report, &validation.1, &train.1)?;
        return Ok(Prepared::counted_only(report));
    }

    let pad_id = tokenizer.pad_id;
    let (validation_blocks, validation_report) =
        pack(options, pad_id, &validation, options.max_eval_samples);
    let (train_blocks, train_report) = pack(options, pad_id, &train, options.max_train_samples);
    excluded.extend(validation.1.excluded);
    excluded.extend(train.1.excluded);
    let prepared = Prepared {
        train: train_blocks,
        validation: validation_blocks,
        report: report(train_report, validation_report, None),
    };
    cache::save_entry(&place.entry, &prepared, &excluded)?;
    cache::publish(&place.entry, &prepared.report, output_dir)?;
    Ok(prepared)
}
