//! `pt-host prepare`: corpus files to cached training and validation blocks,
//! with `data_report.json` and `excluded.jsonl` in the output directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::corpus::{self, ReadOptions, SourceFile};
use crate::packing::{self, Blocks};
use crate::pipeline::{self, InputDoc, PipelineOptions};
use crate::report::{DataReport, Excluded, FileReport, PluginReport, SplitReport};
use crate::steps::StepPlugin;
use crate::tokenize::Tokenizer;

/// Bump when the cached dataset's layout or meaning changes.
const CACHE_FORMAT: u32 = 1;

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
/// Writes `data_report.json` and `excluded.jsonl` into `output_dir`.
pub fn prepare(
    options: &PrepareOptions,
    plugins: &[PreparePlugin<'_>],
    tokenizer: &Tokenizer,
    output_dir: &Path,
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
    };
    let key = hex::encode(Sha256::digest(serde_json::to_vec(&key)?));
    let entry = options.cache_dir.join("datasets").join(&key);

    fs::create_dir_all(output_dir)
        .with_context(|| format!("{}: cannot create output directory", output_dir.display()))?;
    if entry.join(REPORT).is_file() && !options.overwrite_cache {
        let mut prepared = load_entry(&entry)?;
        // The key fixes the components; where they were loaded from is this run's.
        prepared.report.plugins = plugins.iter().map(|p| p.report.clone()).collect();
        write_atomically(
            &output_dir.join(REPORT),
            &serde_json::to_vec_pretty(&prepared.report)?,
        )?;
        copy_atomically(&entry.join(EXCLUDED), &output_dir.join(EXCLUDED))?;
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
    let mut excluded: Vec<Excluded> = unreadable;
    let mut build = |split: &str,
                     docs: &[(String, String)],
                     augment: bool,
                     max: Option<usize>|
     -> Result<(Blocks, SplitReport)> {
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
            &|d, b| progress.advance(d, b),
        )?;
        progress.finish();
        let (mut blocks, tokens_dropped) = if options.packing {
            packing::pack(&output.documents, options.block_size)
        } else {
            packing::pad_each(&output.documents, options.block_size, tokenizer.pad_id)
        };
        let blocks_truncated = max.map_or(0, |n| blocks.truncate(n)) as u64;
        excluded.extend(output.excluded);
        let report = SplitReport {
            documents_read: docs.len() as u64,
            documents: output.documents.len() as u64,
            tokens: output.documents.iter().map(|d| d.len() as u64).sum(),
            blocks: blocks.len() as u64,
            tokens_dropped,
            blocks_truncated,
            steps: output.steps,
        };
        Ok((blocks, report))
    };
    let (validation, validation_report) = build(
        "validation",
        &validation_docs,
        false,
        options.max_eval_samples,
    )?;
    let (train, train_report) = build("train", &train_docs, true, options.max_train_samples)?;

    let report = DataReport {
        cache_key: key,
        cache_hit: false,
        block_size: options.block_size,
        packing: options.packing,
        files,
        plugins: plugins.iter().map(|p| p.report.clone()).collect(),
        train: train_report,
        validation: validation_report,
        seconds: started.elapsed().as_secs_f64(),
    };
    let prepared = Prepared {
        train,
        validation,
        report,
    };
    save_entry(&entry, &prepared, &excluded)?;
    write_atomically(
        &output_dir.join(REPORT),
        &serde_json::to_vec_pretty(&prepared.report)?,
    )?;
    copy_atomically(&entry.join(EXCLUDED), &output_dir.join(EXCLUDED))?;
    Ok(prepared)
}

pub const REPORT: &str = "data_report.json";
pub const EXCLUDED: &str = "excluded.jsonl";
const TRAIN: &str = "train.safetensors";
const VALIDATION: &str = "validation.safetensors";

/// Writes a cache entry into a temporary sibling directory and renames it into
/// place, so that a reader never sees half an entry.
fn save_entry(entry: &Path, prepared: &Prepared, excluded: &[Excluded]) -> Result<()> {
    let parent = entry.parent().expect("entry has a parent");
    fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create cache directory", parent.display()))?;
    // Removed on any error below; renamed into place on success.
    let staging_dir = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let staging = staging_dir.path();
    prepared.train.save(&staging.join(TRAIN))?;
    prepared.validation.save(&staging.join(VALIDATION))?;
    let mut lines = Vec::new();
    for record in excluded {
        serde_json::to_writer(&mut lines, record)?;
        lines.push(b'\n');
    }
    fs::write(staging.join(EXCLUDED), lines)?;
    let mut cached = prepared.report.clone();
    cached.cache_hit = true;
    fs::write(staging.join(REPORT), serde_json::to_vec_pretty(&cached)?)?;
    if entry.exists() {
        fs::remove_dir_all(entry)
            .with_context(|| format!("{}: cannot replace cache entry", entry.display()))?;
    }
    fs::rename(staging, entry)
        .with_context(|| format!("{}: cannot store cache entry", entry.display()))
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

/// Writes via a temporary file and rename: readers see the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("partial");
    let mut file = fs::File::create(&temporary)
        .with_context(|| format!("{}: cannot write", temporary.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path).with_context(|| format!("{}: cannot write", path.display()))
}

fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    write_atomically(
        to,
        &fs::read(from).with_context(|| format!("{}: cannot read", from.display()))?,
    )
}
