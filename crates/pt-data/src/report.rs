//! `data_report.json` and `excluded.jsonl`: what happened to every document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::steps::StepKind;

/// Distinct drop reasons counted per step; the rest are counted together, so
/// a plugin inventing a reason per document cannot grow the report.
pub const DISTINCT_REASONS: usize = 64;
/// Where reasons past [`DISTINCT_REASONS`] are counted.
pub const OTHER_REASONS: &str = "(other reasons)";

/// Counts of one plugin step on one split. Invariant:
/// `kept + dropped + errors == input`; augmenters add `added` documents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub plugin: String,
    pub kind: Option<StepKind>,
    pub input: u64,
    pub kept: u64,
    /// Of the kept documents, how many a mapper rewrote.
    pub replaced: u64,
    pub dropped: u64,
    pub dropped_by_reason: BTreeMap<String, u64>,
    /// Documents the plugin failed on (reported errors and traps), skipped
    /// under `--on_plugin_error skip`.
    pub errors: u64,
    /// Documents an augmenter created.
    pub added: u64,
    /// Of those, empty (or blank) ones, dropped rather than packed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub derived_empty: u64,
    /// Derived documents discarded past the split's limit (`skip` policy).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub derived_over_limit: u64,
    /// Time spent in the plugin, summed over worker threads.
    pub seconds: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StepReport {
    /// Counts `n` documents dropped for `reason`. Past
    /// [`DISTINCT_REASONS`] distinct reasons, new ones count as [`OTHER_REASONS`].
    pub(crate) fn count_drop(&mut self, reason: &str, n: u64) {
        self.dropped += n;
        let key = if self.dropped_by_reason.contains_key(reason)
            || self.dropped_by_reason.len() < DISTINCT_REASONS
        {
            reason
        } else {
            OTHER_REASONS
        };
        *self.dropped_by_reason.entry(key.to_string()).or_default() += n;
    }

    pub(crate) fn merge(&mut self, other: &StepReport) {
        self.input += other.input;
        self.kept += other.kept;
        self.replaced += other.replaced;
        for (reason, n) in &other.dropped_by_reason {
            self.count_drop(reason, *n);
        }
        self.errors += other.errors;
        self.added += other.added;
        self.derived_empty += other.derived_empty;
        self.derived_over_limit += other.derived_over_limit;
        self.seconds += other.seconds;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Documents read for this split.
    pub documents_read: u64,
    /// Documents left after every plugin (augmented ones included).
    pub documents: u64,
    /// Tokens of those documents, EOS included.
    pub tokens: u64,
    pub blocks: u64,
    /// Tokens not in any block: the packing remainder, or truncated tails.
    pub tokens_dropped: u64,
    /// Blocks removed by `--max_train_samples` / `--max_eval_samples`.
    pub blocks_truncated: u64,
    pub steps: Vec<StepReport>,
}

impl SplitReport {
    /// Adds another source's counts of the same split and plugins.
    fn add(&mut self, other: &SplitReport) {
        self.documents_read += other.documents_read;
        self.documents += other.documents;
        self.tokens += other.tokens;
        self.blocks += other.blocks;
        self.tokens_dropped += other.tokens_dropped;
        self.blocks_truncated += other.blocks_truncated;
        if self.steps.is_empty() {
            self.steps = other.steps.clone();
        } else {
            for (total, step) in self.steps.iter_mut().zip(&other.steps) {
                total.merge(step);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileReport {
    pub path: String,
    pub split: String,
    pub documents: u64,
    pub bytes: u64,
    /// Records skipped under `--on_bad_record skip` (listed in excluded.jsonl).
    #[serde(default)]
    pub bad_records: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginReport {
    pub name: String,
    pub version: String,
    /// `sha256:` of the component.
    pub digest: String,
    pub config: String,
    /// Where it was loaded from: a file, an installed `id@version`, or a
    /// registry reference pinned by digest (`REGISTRY/REPO@sha256:...`).
    #[serde(default)]
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// The dataset cache entry this run used, and whether it already existed.
    pub cache_key: String,
    pub cache_hit: bool,
    pub block_size: usize,
    pub packing: bool,
    pub files: Vec<FileReport>,
    pub plugins: Vec<PluginReport>,
    pub train: SplitReport,
    pub validation: SplitReport,
    /// Wall-clock seconds of the run that built the dataset.
    pub seconds: f64,
    /// `i of n` for one shard of a sharded preparation (no blocks yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Duplicates dropped before the plugins (`--dedup`), per split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupReport>,
    /// Several training sources mixed: how, and each source's own report
    /// (the counts above are their sums; `train.blocks` is the mix's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<MixReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixReport {
    pub strategy: crate::mix::MixStrategy,
    pub seed: u64,
    pub sources: Vec<MixSource>,
}

/// One source of a mix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixSource {
    /// Its name in `eval_<name>_loss`.
    pub name: String,
    pub train_file_dir: String,
    /// Its weight, as a share of all weights.
    pub weight: f64,
    /// Its training blocks, and how many the mix drew (repeats counted).
    pub blocks_available: u64,
    pub blocks_drawn: u64,
    /// Share of the mix's blocks it gave.
    pub share: f64,
    pub report: DataReport,
}

impl DataReport {
    /// The report of a mix: its sources' counts added up, `train.blocks`
    /// the mix's, and each source's report under `mix`.
    pub fn of_mix(strategy: crate::mix::MixStrategy, seed: u64, sources: Vec<MixSource>) -> Self {
        let first = &sources.first().expect("a mix has sources").report;
        let mut total = DataReport {
            cache_key: sources
                .iter()
                .map(|s| s.report.cache_key.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            cache_hit: sources.iter().all(|s| s.report.cache_hit),
            files: Vec::new(),
            train: SplitReport::default(),
            validation: SplitReport::default(),
            seconds: 0.0,
            dedup: None,
            mix: None,
            ..first.clone()
        };
        for source in &sources {
            let report = &source.report;
            total.files.extend(report.files.iter().cloned());
            total.train.add(&report.train);
            total.validation.add(&report.validation);
            total.seconds += report.seconds;
            if let Some(dedup) = &report.dedup {
                let sum = total.dedup.get_or_insert(DedupReport {
                    mode: dedup.mode,
                    train: Default::default(),
                    validation: Default::default(),
                    spilled_bytes: 0,
                });
                sum.train.exact += dedup.train.exact;
                sum.train.near += dedup.train.near;
                sum.validation.exact += dedup.validation.exact;
                sum.validation.near += dedup.validation.near;
                sum.spilled_bytes += dedup.spilled_bytes;
            }
        }
        total.train.blocks = sources.iter().map(|s| s.blocks_drawn).sum();
        total.mix = Some(MixReport {
            strategy,
            seed,
            sources,
        });
        total
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DedupReport {
    pub mode: crate::dedup::Dedup,
    pub train: crate::dedup::DuplicateCounts,
    pub validation: crate::dedup::DuplicateCounts,
    /// Bytes of keys sorted on disk because they did not fit
    /// `--dedup_memory_mb` (absent when they did).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spilled_bytes: u64,
}

/// One line of `excluded.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    /// `path:line` of the document (`+augN` for derived ones).
    pub source: String,
    /// The plugin that dropped it; `(reader)` for a record that could not be read.
    pub plugin: String,
    /// The plugin's step (none for the reader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<StepKind>,
    /// The plugin's drop reason, `error: …` for a document it failed on, or
    /// why the reader could not read the record.
    pub reason: String,
    pub text: String,
}
