//! `pt-host prepare`: the data half of a run, on its own.

use std::path::PathBuf;

use anyhow::{Result, bail};
use pt_data::{
    PipelineOptions, PluginReport, PrepareOptions, PreparePlugin, ReadOptions, Sharding, StepKind,
    Tokenizer, ValidationSplit,
};

use pt_data::dedup::Dedup;
use pt_data::text::escape_controls;

use crate::args::{default_cache_dir, parse_bool};
use crate::hub::{self, HubArgs};
use crate::plugins::{self, OnError, PluginArgs};
use crate::progress::PrepareProgress;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitModeArg {
    /// The first documents, in corpus order.
    First,
    /// A random choice seeded by --seed.
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum MixStrategyArg {
    /// Every block of every source once.
    Concat,
    /// Draw sources by weight until one runs out.
    InterleaveUnder,
    /// Draw sources by weight until every one ran out; smaller ones repeat.
    InterleaveOver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupArg {
    /// Keep every document.
    None,
    /// Drop documents equal to an earlier one (up to surrounding whitespace).
    Exact,
    /// Also drop near duplicates (Jaccard of 5-word shingles above about 0.7).
    Minhash,
}

#[derive(clap::Args, Clone, Debug)]
pub struct PrepareArgs {
    /// Model directory, or a hub id (bigscience/bloomz-560m) downloaded into the cache.
    #[arg(long = "model_name_or_path", value_name = "DIR|ID")]
    pub model_name_or_path: PathBuf,
    /// Tokenizer directory, when it differs from the model's.
    #[arg(long = "tokenizer_name_or_path", value_name = "DIR")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// Training corpus: .txt, .json and .jsonl files, searched recursively (or one such file).
    /// Several (`--train_file_dir domain/ general/`) are mixed: see --mix_weights.
    #[arg(long = "train_file_dir", value_name = "DIR|FILE", num_args = 1..)]
    pub train_file_dir: Vec<PathBuf>,
    /// Weights of the --train_file_dir sources, comma-separated (0.8,0.2):
    /// their shares of the training blocks (of tokens) under an interleave strategy.
    #[arg(long = "mix_weights", value_name = "W,W,..", value_delimiter = ',', num_args = 1..)]
    pub mix_weights: Vec<f64>,
    /// How several --train_file_dir sources combine (LLaMA-Factory's
    /// mix_strategy): concat (the default without --mix_weights),
    /// interleave_under (the default with them: draw by weight until a
    /// source runs out, no block repeats) or interleave_over (until every
    /// source ran out, smaller ones repeat).
    #[arg(long = "mix_strategy", value_enum)]
    pub mix_strategy: Option<MixStrategyArg>,
    /// Validation corpus (dir or file); without it, --validation_split_percentage of the training documents.
    #[arg(long = "validation_file_dir", value_name = "DIR|FILE")]
    pub validation_file_dir: Option<PathBuf>,
    /// Percent of the training documents (the first ones, as HF's `train[:N%]`) used for validation.
    #[arg(long = "validation_split_percentage", default_value_t = 1.0)]
    pub validation_split_percentage: f64,
    /// Which training documents --validation_split_percentage takes: the
    /// first ones (HF's train[:N%], MedicalGPT's), or a random choice seeded
    /// by --seed (for corpora whose first files are not like the rest).
    #[arg(long = "validation_split_mode", value_enum, default_value = "first")]
    pub validation_split_mode: SplitModeArg,
    /// Tokens per training block.
    #[arg(long = "block_size", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..))]
    pub block_size: u64,
    /// Concatenate documents and cut blocks (true), or one padded document per block (false).
    #[arg(long = "packing", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub packing: bool,
    /// Keep each .txt line's trailing newline.
    #[arg(long = "keep_linebreaks", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub keep_linebreaks: bool,
    /// JSON field (.json/.jsonl) or Parquet column holding the text.
    #[arg(
        long = "text_field",
        visible_alias = "text_column",
        default_value = "text"
    )]
    pub text_field: String,
    /// A record that cannot be read (invalid UTF-8, a NUL byte, malformed
    /// JSON, no text field, over --max_document_mb): stop naming file and
    /// line, or skip it, count it in data_report.json and list it in excluded.jsonl.
    #[arg(long = "on_bad_record", value_enum, default_value = "fail")]
    pub on_bad_record: OnError,
    /// Drop duplicate documents before the plugins, each listed in
    /// excluded.jsonl with the document it duplicates: none, exact (same
    /// text), or minhash (also near duplicates: MinHash LSH, 5-word
    /// shingles, 14 bands × 8 rows, as datatrove).
    #[arg(long = "dedup", value_enum, default_value = "none")]
    pub dedup: DedupArg,
    /// Memory for deduplication's keys, in MiB (about 360 bytes a document
    /// under minhash, 24 under exact); past it they are sorted in runs on
    /// disk in the cache directory. Never changes the result.
    #[arg(long = "dedup_memory_mb", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub dedup_memory_mb: u64,
    /// Largest document, in MiB; a larger record is a bad record.
    #[arg(long = "max_document_mb", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_document_mb: u64,
    /// Keep at most this many training blocks.
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    /// Keep at most this many validation blocks.
    #[arg(long = "max_eval_samples")]
    pub max_eval_samples: Option<usize>,
    /// Worker threads for plugins and tokenization (default: all cores); never changes the result.
    #[arg(long = "preprocessing_num_workers")]
    pub preprocessing_num_workers: Option<usize>,
    /// Where prepared datasets and compiled plugins are cached.
    #[arg(long = "cache_dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Rebuild the prepared dataset even if it is cached.
    #[arg(long = "overwrite_cache", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub overwrite_cache: bool,
    /// Where data_report.json and excluded.jsonl are written.
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Seed of augmenters' randomness.
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// No progress bars, only summary lines.
    #[arg(long = "disable_tqdm", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub disable_tqdm: bool,
    /// Prepare in this many shards (with --shard_index: one of them; alone:
    /// merge the prepared shards into the dataset). See docs/distributed.md.
    #[arg(long = "num_shards", value_parser = clap::value_parser!(u64).range(1..))]
    pub num_shards: Option<u64>,
    /// Which shard this process prepares (0-based; SLURM_ARRAY_TASK_ID,
    /// JOB_COMPLETION_INDEX), into the cache: no blocks until the merge.
    #[arg(long = "shard_index", requires = "num_shards")]
    pub shard_index: Option<u64>,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub hub: HubArgs,
}

pub fn run(mut args: PrepareArgs) -> Result<()> {
    let launch = pt_dist::Launch::from_env()?;
    if launch.world_size > 1 && args.shard_index.is_none() {
        bail!(
            "{} started {} copies of `pt-host prepare`, which would all prepare the same data into the same files: \
             pass --num_shards {} --shard_index <this rank> to split the work (then merge with --num_shards alone), \
             or run it once outside the launcher",
            launch.launcher.name(),
            launch.world_size,
            launch.world_size
        );
    }
    args.resolve_models()?;
    let tokenizer = Tokenizer::from_dir(args.tokenizer_dir())?;
    prepare_data(&args, tokenizer, true).map(|_| ())
}

impl PrepareArgs {
    /// Hub ids in --model_name_or_path / --tokenizer_name_or_path replaced
    /// by their downloaded directories.
    pub fn resolve_models(&mut self) -> Result<()> {
        let cache = self.cache_dir.as_deref();
        self.model_name_or_path = hub::resolve(
            &self.model_name_or_path,
            &self.hub,
            cache,
            self.disable_tqdm,
        )?;
        if let Some(tokenizer) = &self.tokenizer_name_or_path {
            self.tokenizer_name_or_path = Some(hub::resolve(
                tokenizer,
                &self.hub,
                cache,
                self.disable_tqdm,
            )?);
        }
        Ok(())
    }
}

/// The prepared blocks, with the tokenizer and plugins that made them (metric
/// plugins among them serve evaluation).
pub struct PreparedData {
    pub prepared: pt_data::Prepared,
    pub tokenizer: Tokenizer,
    pub plugins: Vec<plugins::HostPlugin>,
    /// Keeps the plugins' engine and deadline clock alive.
    _runtime: pt_plugin_host::PluginRuntime,
}

/// The adapter's tokenizer where it has one (an extended vocabulary travels
/// with the adapter that trained it), else the model's.
pub fn tokenizer_with_adapter<'a>(
    model_dir: &'a std::path::Path,
    adapter: Option<&'a std::path::Path>,
) -> &'a std::path::Path {
    adapter
        .filter(|dir| dir.join("tokenizer.json").is_file())
        .unwrap_or(model_dir)
}

impl PrepareArgs {
    /// Where the tokenizer is: --tokenizer_name_or_path, else the model's directory.
    pub fn tokenizer_dir(&self) -> &std::path::Path {
        self.tokenizer_name_or_path
            .as_ref()
            .unwrap_or(&self.model_name_or_path)
    }
}

/// Distinct words whose BPE merges the tokenizing workers keep, together:
/// about 100 MB for Chinese-heavy text, whatever the worker count.
pub const CACHED_WORDS: usize = 100_000;

/// Reads, cleans, tokenizes with `tokenizer` and packs (or loads from the
/// cache), prints the summary, and returns the blocks: the data half of
/// `prepare` and `run`. `main`: false for the other ranks of a
/// data-parallel job, which load what rank 0 prepared without a word.
pub fn prepare_data(
    args: &PrepareArgs,
    mut tokenizer: Tokenizer,
    main: bool,
) -> Result<PreparedData> {
    if !(0.0..100.0).contains(&args.validation_split_percentage) {
        bail!(
            "--validation_split_percentage must be in [0, 100), got {}",
            args.validation_split_percentage
        );
    }
    let workers = args
        .preprocessing_num_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 0 {
        bail!("--preprocessing_num_workers must be at least 1");
    }
    // The tokenizers crate's own 10,000 per thread at least.
    tokenizer.cache_words((CACHED_WORDS / workers).max(10_000));
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    // As MedicalGPT: blocks longer than the tokenizer's model_max_length are
    // capped to it, with a warning (BLOOM's ALiBi has no position table).
    let block_size = match tokenizer.model_max_length {
        Some(limit) if args.block_size as usize > limit => {
            eprintln!(
                "warning: --block_size {} is longer than the tokenizer's model_max_length {limit} (tokenizer_config.json); using {limit}",
                args.block_size
            );
            limit
        }
        _ => args.block_size as usize,
    };
    let (runtime, loaded) = plugins::load(&args.plugins, &cache_dir)?;
    let plugins: Vec<PreparePlugin<'_>> = loaded
        .iter()
        .map(|p| PreparePlugin {
            plugin: p.steps(),
            report: PluginReport {
                name: p.name().to_string(),
                version: p.version().to_string(),
                digest: p.digest().to_string(),
                config: p.config().to_string(),
                source: p.source(),
            },
        })
        .collect();
    let options = PrepareOptions {
        train_dir: args.train_file_dir.first().cloned(),
        validation_dir: args.validation_file_dir.clone(),
        validation_split_percentage: args.validation_split_percentage,
        validation_split: match args.validation_split_mode {
            SplitModeArg::First => ValidationSplit::First,
            SplitModeArg::Random => ValidationSplit::Random,
        },
        read: ReadOptions {
            keep_linebreaks: args.keep_linebreaks,
            text_field: args.text_field.clone(),
            on_bad_record: args.on_bad_record.into(),
            max_document_bytes: (args.max_document_mb as usize) << 20,
        },
        block_size,
        packing: args.packing,
        max_train_samples: args.max_train_samples,
        max_eval_samples: args.max_eval_samples,
        pipeline: PipelineOptions {
            batch_size: args.plugins.plugin_batch_size as usize,
            workers,
            on_error: args.plugins.on_plugin_error.into(),
            seed: args.seed,
            max_derived_per_document: args.plugins.max_derived_per_document as usize,
            max_derived_documents: args.plugins.max_derived_documents,
        },
        cache_dir,
        // Rank 0 has rebuilt it.
        overwrite_cache: args.overwrite_cache && main,
        sharding: match (args.num_shards, args.shard_index) {
            (Some(count), Some(index)) => Some(Sharding::Part {
                index: index as usize,
                count: count as usize,
            }),
            (Some(count), None) => Some(Sharding::Merge {
                count: count as usize,
            }),
            _ => None,
        },
        dedup: match args.dedup {
            DedupArg::None => Dedup::None,
            DedupArg::Exact => Dedup::Exact,
            DedupArg::Minhash => Dedup::Minhash,
        },
        dedup_memory: (args.dedup_memory_mb << 20) as usize,
    };
    if args.train_file_dir.len() < 2 && !args.mix_weights.is_empty() {
        bail!(
            "--mix_weights weighs several --train_file_dir sources, and {} given: pass one directory per source (--train_file_dir domain/ general/ --mix_weights 0.8,0.2)",
            match args.train_file_dir.len() {
                0 => "none is",
                _ => "one is",
            }
        );
    }
    let progress = PrepareProgress::new(args.disable_tqdm);
    let progress: &dyn pt_data::Progress = if main { &progress } else { &() };
    let prepared = if args.train_file_dir.len() > 1 {
        prepare_mix(args, &options, &plugins, &tokenizer, main, progress)?
    } else {
        let prepared = pt_data::prepare(
            &options,
            &plugins,
            &tokenizer,
            main.then_some(args.output_dir.as_path()),
            progress,
        )?;
        if main {
            print_summary(&prepared.report, Some(&args.output_dir));
        }
        prepared
    };
    drop(plugins);
    Ok(PreparedData {
        prepared,
        tokenizer,
        plugins: loaded,
        _runtime: runtime,
    })
}

/// A name per training source for `eval_<name>_loss`: its directory's (or
/// file's stem), as an identifier, unique.
fn source_names(dirs: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for dir in dirs {
        let stem = dir
            .file_stem()
            .map(ToOwned::to_owned)
            .or_else(|| dir.canonicalize().ok()?.file_name().map(ToOwned::to_owned))
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base: String = stem
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { '_' })
            .collect();
        let base = if base.is_empty() {
            "source".into()
        } else {
            base
        };
        let mut name = base.clone();
        let mut n = 1;
        while names.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        names.push(name);
    }
    names
}

/// Several training sources: each prepared on its own (its own cache entry
/// and report), then mixed; each source's validation share stays apart, so
/// that evaluation reports each one's loss.
fn prepare_mix(
    args: &PrepareArgs,
    options: &PrepareOptions,
    plugins: &[PreparePlugin<'_>],
    tokenizer: &Tokenizer,
    main: bool,
    progress: &dyn pt_data::Progress,
) -> Result<pt_data::Prepared> {
    use pt_data::mix::MixStrategy;
    let dirs = &args.train_file_dir;
    let weights = match args.mix_weights.as_slice() {
        [] => vec![1.0; dirs.len()],
        weights if weights.len() != dirs.len() => bail!(
            "--mix_weights has {} weights for {} --train_file_dir sources; give one per source",
            weights.len(),
            dirs.len()
        ),
        weights if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) => {
            bail!("--mix_weights must be positive numbers, got {weights:?}")
        }
        weights => weights.to_vec(),
    };
    let strategy = match (args.mix_strategy, args.mix_weights.is_empty()) {
        (Some(MixStrategyArg::Concat), _) | (None, true) => MixStrategy::Concat,
        (Some(MixStrategyArg::InterleaveOver), _) => MixStrategy::InterleaveOver,
        (Some(MixStrategyArg::InterleaveUnder), _) | (None, false) => MixStrategy::InterleaveUnder,
    };
    let names = source_names(dirs);
    // A --validation_file_dir validates every source: prepared once, on its own.
    let shared_validation = args.validation_file_dir.is_some();
    let mut sources = Vec::with_capacity(dirs.len());
    for (name, dir) in names.iter().zip(dirs) {
        if main {
            println!("source {name}: {}", dir.display());
        }
        let options = PrepareOptions {
            train_dir: Some(dir.clone()),
            validation_dir: None,
            validation_split_percentage: match shared_validation {
                true => 0.0,
                false => options.validation_split_percentage,
            },
            ..options.clone()
        };
        let prepared = pt_data::prepare(&options, plugins, tokenizer, None, progress)?;
        if main {
            print_summary(&prepared.report, None);
        }
        sources.push(prepared);
    }
    let held_out = match shared_validation {
        true => {
            if main {
                println!("validation for every source:");
            }
            let options = PrepareOptions {
                train_dir: None,
                ..options.clone()
            };
            let prepared = pt_data::prepare(&options, plugins, tokenizer, None, progress)?;
            if main {
                print_summary(&prepared.report, None);
            }
            Some(prepared)
        }
        false => None,
    };
    let validation = match &held_out {
        Some(held_out) => held_out.validation.clone(),
        None => pt_data::Blocks::named(
            names
                .iter()
                .cloned()
                .zip(sources.iter().map(|s| s.validation.clone()))
                .collect(),
        ),
    };
    let reports: Vec<pt_data::DataReport> = sources.iter().map(|s| s.report.clone()).collect();
    let (train, drawn) = pt_data::mix::mix(
        sources.into_iter().map(|s| s.train).collect(),
        &weights,
        strategy,
        args.seed,
    );
    let total_weight: f64 = weights.iter().sum();
    let mixed: Vec<pt_data::report::MixSource> = names
        .iter()
        .zip(dirs)
        .zip(reports)
        .zip(weights.iter().zip(&drawn))
        .map(
            |(((name, dir), report), (weight, drawn))| pt_data::report::MixSource {
                name: name.clone(),
                train_file_dir: dir.display().to_string(),
                weight: weight / total_weight,
                blocks_available: drawn.available,
                blocks_drawn: drawn.drawn,
                share: drawn.drawn as f64 / train.len().max(1) as f64,
                report,
            },
        )
        .collect();
    let mut report = pt_data::DataReport::of_mix(strategy, args.seed, mixed);
    // The cache entries the mix was made of.
    let mut entries: Vec<String> = report.cache_key.split('+').map(String::from).collect();
    if let Some(held_out) = &held_out {
        report.validation = held_out.report.validation.clone();
        report.files.extend(held_out.report.files.iter().cloned());
        if let (Some(total), Some(own)) = (&mut report.dedup, &held_out.report.dedup) {
            total.validation = own.validation;
        }
        entries.push(held_out.report.cache_key.clone());
        report.cache_key = entries.join("+");
    }
    if main && report.shard.is_none() {
        print_mix(&report, strategy);
        write_mix_outputs(&report, &entries, &options.cache_dir, &args.output_dir)?;
    }
    Ok(pt_data::Prepared {
        train,
        validation,
        report,
    })
}

fn print_mix(report: &pt_data::DataReport, strategy: pt_data::mix::MixStrategy) {
    let mix = report.mix.as_ref().expect("a mix");
    let parts: Vec<String> = mix
        .sources
        .iter()
        .map(|s| {
            format!(
                "{} {}/{} blocks ({:.1}%, weight {:.2})",
                s.name,
                s.blocks_drawn,
                s.blocks_available,
                100.0 * s.share,
                s.weight
            )
        })
        .collect();
    let strategy = serde_json::to_value(strategy).expect("a name");
    println!(
        "mix ({}, seed {}): {} training blocks: {}",
        strategy.as_str().unwrap_or_default(),
        mix.seed,
        report.train.blocks,
        parts.join(", ")
    );
}

/// A mix's `data_report.json` and `excluded.jsonl` (the sources', one
/// after another) in `output_dir`.
fn write_mix_outputs(
    report: &pt_data::DataReport,
    entries: &[String],
    cache_dir: &std::path::Path,
    output_dir: &std::path::Path,
) -> Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("{}: cannot create output directory", output_dir.display()))?;
    let mut excluded = Vec::new();
    for key in entries {
        let path = cache_dir
            .join("datasets")
            .join(key)
            .join(pt_data::cache::EXCLUDED);
        excluded.extend(
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
        );
    }
    pt_fs::write_atomically(&output_dir.join(pt_data::cache::EXCLUDED), &excluded)?;
    pt_fs::write_atomically(
        &output_dir.join(pt_data::cache::REPORT),
        &pt_data::text::to_inert_json_pretty(report)?,
    )?;
    println!(
        "report: {}  excluded: {}",
        output_dir.join(pt_data::cache::REPORT).display(),
        output_dir.join(pt_data::cache::EXCLUDED).display()
    );
    Ok(())
}

fn print_summary(report: &pt_data::DataReport, output_dir: Option<&std::path::Path>) {
    let cache = if report.cache_hit {
        "cache hit"
    } else {
        "built"
    };
    match &report.shard {
        Some(shard) => println!(
            "dataset {} shard {shard} ({cache}; blocks are cut when the shards are merged)",
            &report.cache_key[..16]
        ),
        None => println!("dataset {} ({cache})", &report.cache_key[..16]),
    }
    for (name, split) in [("train", &report.train), ("validation", &report.validation)] {
        println!(
            "{name}: {} documents read, {} after plugins, {} tokens, {} blocks of {}",
            split.documents_read, split.documents, split.tokens, split.blocks, report.block_size
        );
        let bad: u64 = report
            .files
            .iter()
            .filter(|f| f.split == name)
            .map(|f| f.bad_records)
            .sum();
        if bad > 0 {
            println!(
                "  {bad} unreadable records skipped (--on_bad_record skip; listed in excluded.jsonl)"
            );
        }
        if let Some(dedup) = &report.dedup {
            let counts = if name == "train" {
                dedup.train
            } else {
                dedup.validation
            };
            println!(
                "  duplicates dropped before the plugins (--dedup): {} exact, {} near (listed in excluded.jsonl)",
                counts.exact, counts.near
            );
            if dedup.spilled_bytes > 0 && name == "train" {
                println!(
                    "  deduplication sorted {:.1} MB of keys on disk (past --dedup_memory_mb)",
                    dedup.spilled_bytes as f64 / 1e6
                );
            }
        }
        for step in &split.steps {
            let reasons: Vec<String> = step
                .dropped_by_reason
                .iter()
                .map(|(r, n)| format!("{} {n}", escape_controls(r, false)))
                .collect();
            let mut line = format!("  {} ", step.plugin);
            match step.kind {
                Some(StepKind::Mapper) => {
                    line += &format!(
                        "mapper: {} in, {} kept ({} rewritten)",
                        step.input, step.kept, step.replaced
                    )
                }
                Some(StepKind::Filter) => {
                    line += &format!("filter: {} in, {} kept", step.input, step.kept)
                }
                Some(StepKind::Augmenter) => {
                    line += &format!("augmenter: {} in, {} added", step.input, step.added);
                    if step.derived_empty > 0 {
                        line += &format!(" ({} empty, dropped)", step.derived_empty);
                    }
                    if step.derived_over_limit > 0 {
                        line += &format!(
                            ", {} past --max_derived_documents discarded",
                            step.derived_over_limit
                        );
                    }
                }
                None => line += &format!("{} in, {} kept", step.input, step.kept),
            }
            line += &format!(", {} dropped", step.dropped);
            if !reasons.is_empty() {
                line += &format!(" ({})", reasons.join(", "));
            }
            line += &format!(", {} errors, {:.2} s", step.errors, step.seconds);
            println!("{line}");
        }
    }
    if let Some(output_dir) = output_dir.filter(|_| report.shard.is_none()) {
        println!(
            "report: {}  excluded: {}",
            output_dir.join(pt_data::cache::REPORT).display(),
            output_dir.join(pt_data::cache::EXCLUDED).display()
        );
    }
}
