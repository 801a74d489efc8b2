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
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use pt_fs::{copy_atomically, write_atomically};

use crate::corpus::{self, ReadOptions, SourceFile};
use crate::packing::{self, Blocks};
use crate::pipeline::{self, InputDoc, PipelineOptions, SplitOutput};
use crate::report::{DataReport, Excluded, FileReport, PluginReport, SplitReport, StepReport};
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
    /// Without a validation directory: the first this-many percent of the
    /// training documents become validation data (HF's `train[:N%]`).
    pub validation_split_percentage: f64,
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

/// The blocks and their report. A [`Sharding::Part`] has no blocks (packing
/// needs every shard); its report counts its documents and tokens.
pub struct Prepared {
    pub train: Blocks,
    pub validation: Blocks,
    pub report: DataReport,
}

/// Everything that changes the prepared dataset goes into the cache key.
#[derive(Serialize)]
struct CacheKey<'a> {
    format: u32,
    train: Vec<(String, &'a str)>,
    validation: Vec<(String, &'a str)>,
    validation_split_percentage: Option<f64>,
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
}

fn read_dir(dir: &Path, options: &ReadOptions) -> Result<Vec<SourceFile>> {
    corpus::discover(dir)?
        .iter()
        .map(|path| corpus::read_file(path, options))
        .collect()
}

fn relative_digests<'a>(dir: &Path, files: &'a [SourceFile]) -> Vec<(String, &'a str)> {
    files
        .iter()
        .map(|f| {
            (
                f.path
                    .strip_prefix(dir)
                    .unwrap_or(&f.path)
                    .display()
                    .to_string(),
                f.digest.as_str(),
            )
        })
        .collect()
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
    let train_files = match &options.train_dir {
        Some(dir) => read_dir(dir, &options.read)?,
        None if options.validation_dir.is_none() => {
            anyhow::bail!(
                "give a training corpus (--train_file_dir) or a validation corpus (--validation_file_dir)"
            )
        }
        None => Vec::new(),
    };
    let validation_files = match &options.validation_dir {
        Some(dir) => read_dir(dir, &options.read)?,
        None => Vec::new(),
    };
    let key = CacheKey {
        format: CACHE_FORMAT,
        train: options
            .train_dir
            .as_ref()
            .map_or_else(Vec::new, |d| relative_digests(d, &train_files)),
        validation: options
            .validation_dir
            .as_ref()
            .map_or_else(Vec::new, |d| relative_digests(d, &validation_files)),
        validation_split_percentage: options
            .validation_dir
            .is_none()
            .then_some(options.validation_split_percentage),
        tokenizer: &tokenizer.digest,
        plugins: plugins
            .iter()
            .map(|p| {
                (
                    p.report.name.as_str(),
                    p.report.digest.as_str(),
                    p.report.config.as_str(),
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
    };
    let key = hex::encode(Sha256::digest(serde_json::to_vec(&key)?));
    let entry = options.cache_dir.join("datasets").join(&key);
    let shards = options
        .cache_dir
        .join("datasets")
        .join(format!("{key}.shards"));
    let part = match options.sharding {
        Some(Sharding::Part { index, count }) => {
            if count == 0 || index >= count {
                anyhow::bail!("--shard_index {index} is not below --num_shards {count}");
            }
            Some((index, count, shards.join(format!("{index}-of-{count}"))))
        }
        _ => None,
    };

    if let Some(dir) = output_dir {
        fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
    }
    let cached = match &part {
        Some((_, _, shard)) => shard.join(SHARD).is_file(),
        None => entry.join(REPORT).is_file(),
    };
    if cached && !options.overwrite_cache {
        if let Some((_, _, shard)) = &part {
            let mut report = load_shard(shard)?.report;
            report.cache_hit = true;
            return Ok(Prepared {
                train: Blocks::default(),
                validation: Blocks::default(),
                report,
            });
        }
        let mut prepared = load_entry(&entry)?;
        // The key fixes the components; where they were loaded from is this run's.
        prepared.report.plugins = plugins.iter().map(|p| p.report.clone()).collect();
        publish(&entry, &prepared.report, output_dir)?;
        return Ok(prepared);
    }

    let files: Vec<FileReport> = train_files
        .iter()
        .map(|f| (f, "train"))
        .chain(validation_files.iter().map(|f| (f, "validation")))
        .map(|(f, split)| FileReport {
            path: f.path.display().to_string(),
            split: split.into(),
            documents: f.documents.len() as u64,
            bytes: f.bytes,
            bad_records: f.bad_records.len() as u64,
        })
        .collect();
    let sources = |files: &[SourceFile]| -> Vec<(String, String)> {
        files
            .iter()
            .flat_map(|f| {
                f.documents
                    .iter()
                    .map(move |d| (format!("{}:{}", f.path.display(), d.line), d.text.clone()))
            })
            .collect()
    };
    // Records the reader skipped, listed with what plugins excluded.
    let unreadable: Vec<Excluded> = train_files
        .iter()
        .chain(&validation_files)
        .flat_map(|f| {
            f.bad_records.iter().map(move |bad| Excluded {
                source: format!("{}:{}", f.path.display(), bad.line),
                plugin: "(reader)".into(),
                kind: None,
                reason: bad.reason.clone(),
                text: String::new(),
            })
        })
        .collect();
    let mut train_docs = sources(&train_files);
    drop(train_files);
    let validation_docs = if options.validation_dir.is_some() {
        sources(&validation_files)
    } else {
        let n = (train_docs.len() as f64 * options.validation_split_percentage / 100.0)
            .round_ties_even() as usize;
        train_docs.drain(..n.min(train_docs.len())).collect()
    };
    drop(validation_files);

    let step_plugins: Vec<&dyn StepPlugin> = plugins.iter().map(|p| p.plugin).collect();
    let batch_size = options.pipeline.batch_size.max(1);
    let merged = match options.sharding {
        Some(Sharding::Merge { count }) => Some(load_shards(&shards, count)?),
        _ => None,
    };
    // A split's documents after plugins and tokenization: this shard's
    // part, the shards' outputs joined, or the whole split.
    let process =
        |split: &str, docs: &[(String, String)], augment: bool| -> Result<(u64, SplitOutput)> {
            if let Some(merged) = &merged {
                return join_split(merged, split, docs.len());
            }
            let batches = docs.len().div_ceil(batch_size);
            let (first_batch, docs) = match &part {
                Some((index, count, _)) => {
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
            progress.start(
                split,
                inputs.len() as u64,
                inputs.iter().map(|d| d.text.len() as u64).sum(),
            );
            let output = pipeline::run(
                &inputs,
                &step_plugins,
                augment,
                tokenizer,
                &options.pipeline,
                first_batch,
                &|d, b| progress.advance(d, b),
            )?;
            progress.finish();
            Ok((docs.len() as u64, output))
        };
    let (validation_read, validation_output) = process("validation", &validation_docs, false)?;
    let (train_read, train_output) = process("train", &train_docs, true)?;

    // A split's counts before packing: all a shard's report has.
    let counted = |read: u64, output: &SplitOutput| SplitReport {
        documents_read: read,
        documents: output.documents.len() as u64,
        tokens: output.documents.iter().map(|d| d.len() as u64).sum(),
        steps: output.steps.clone(),
        ..SplitReport::default()
    };
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
    };
    if let Some((index, count, shard)) = &part {
        let report = report(
            counted(train_read, &train_output),
            counted(validation_read, &validation_output),
            Some(format!("{index} of {count}")),
        );
        save_shard(shard, &report, &validation_output, &train_output)?;
        return Ok(Prepared {
            train: Blocks::default(),
            validation: Blocks::default(),
            report,
        });
    }

    let mut excluded: Vec<Excluded> = unreadable;
    let mut pack = |read: u64, output: SplitOutput, max: Option<usize>| -> (Blocks, SplitReport) {
        let (mut blocks, tokens_dropped) = if options.packing {
            packing::pack(&output.documents, options.block_size)
        } else {
            packing::pad_each(&output.documents, options.block_size, tokenizer.pad_id)
        };
        let blocks_truncated = max.map_or(0, |n| blocks.truncate(n)) as u64;
        let report = SplitReport {
            blocks: blocks.len() as u64,
            tokens_dropped,
            blocks_truncated,
            ..counted(read, &output)
        };
        excluded.extend(output.excluded);
        (blocks, report)
    };
    let (validation, validation_report) =
        pack(validation_read, validation_output, options.max_eval_samples);
    let (train, train_report) = pack(train_read, train_output, options.max_train_samples);

    let report = report(train_report, validation_report, None);
    let prepared = Prepared {
        train,
        validation,
        report,
    };
    save_entry(&entry, &prepared, &excluded)?;
    publish(&entry, &prepared.report, output_dir)?;
    Ok(prepared)
}

/// `data_report.json` and the entry's `excluded.jsonl` into `output_dir`, if given.
fn publish(entry: &Path, report: &DataReport, output_dir: Option<&Path>) -> Result<()> {
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
struct ShardRecord {
    report: DataReport,
    validation: ShardSplit,
    train: ShardSplit,
}

/// The shards' outputs, in shard order.
struct Shards {
    records: Vec<ShardRecord>,
    documents: Vec<[Vec<Vec<u32>>; 2]>,
}

const SHARD: &str = "shard.json";

fn save_shard(
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

fn load_shard(dir: &Path) -> Result<ShardRecord> {
    let path = dir.join(SHARD);
    serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| {
        format!(
            "{}: corrupt shard; prepare this shard again with --overwrite_cache",
            path.display()
        )
    })
}

fn load_shards(dir: &Path, count: usize) -> Result<Shards> {
    let mut shards = Shards {
        records: Vec::with_capacity(count),
        documents: Vec::with_capacity(count),
    };
    for index in 0..count {
        let shard = dir.join(format!("{index}-of-{count}"));
        if !shard.join(SHARD).is_file() {
            anyhow::bail!(
                "shard {index} of {count} is not prepared ({} is missing): run `pt-host prepare` with the same flags and \
                 --num_shards {count} --shard_index {index}, then merge again",
                shard.display()
            );
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
fn join_split(shards: &Shards, split: &str, expected: usize) -> Result<(u64, SplitOutput)> {
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
        anyhow::bail!(
            "the shards read {read} {split} documents, the corpus has {expected}: they were prepared from other files; \
             prepare them again with --overwrite_cache"
        );
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
    let corrupt = || format!("{}: corrupt shard documents", path.display());
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
fn save_entry(entry: &Path, prepared: &Prepared, excluded: &[Excluded]) -> Result<()> {
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

fn load_entry(entry: &Path) -> Result<Prepared> {
    let report: DataReport =
        serde_json::from_slice(&fs::read(entry.join(REPORT))?).with_context(|| {
            format!(
                "{}: corrupt cache entry; rerun with --overwrite_cache",
                entry.display()
            )
        })?;
    Ok(Prepared {
        train: Blocks::load(&entry.join(TRAIN))?,
        validation: Blocks::load(&entry.join(VALIDATION))?,
        report,
    })
}
