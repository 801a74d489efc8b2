//! Documents through plugins and the tokenizer, in parallel.
//!
//! A split's documents are cut into fixed batches. Worker threads take batches
//! in turn and run the whole chain (mappers, filters, augmenters in plugin
//! order) and then the tokenizer on each. Every batch gets fresh plugin
//! instances seeded from (run seed, plugin, batch index), so a batch's result
//! is a function of the plugins, their configuration, the seed and the batch
//! alone — never of the worker count, nor of what an instance saw before —
//! and results are reassembled in batch order.
//!
//! A call that fails is retried on a fresh instance with the batch halved
//! until the failing document is found; the error policy then fails the run
//! or skips that document. Deadlines and the memory cap cost a whole deadline
//! each: under `fail` they end the run at once, naming the batch; under `skip`
//! a batch may spend [`deadline_budget`] of them before its undecided
//! documents are skipped unsearched.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use anyhow::{Result, anyhow};

use crate::report::{Excluded, StepReport};
use crate::steps::{
    CallFailure, Derived, DocRef, PluginError, PluginErrorCause, StepInstance, StepKind,
    StepOutput, StepPlugin, Verdict, check_output,
};
use crate::tokenize::Tokenizer;

/// What to do with a document a plugin fails on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Stop the run with an error naming plugin, document and cause.
    Fail,
    /// Count the document as an error, list it in `excluded.jsonl`, go on.
    Skip,
}

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub batch_size: usize,
    pub workers: usize,
    pub on_error: ErrorPolicy,
    /// Run seed; augmenters get a seed derived from it and the batch position.
    pub seed: u64,
    /// Derived documents one augmenter call may return per input document.
    pub max_derived_per_document: usize,
    /// Derived documents each augmenter may add to a split in all.
    pub max_derived_documents: u64,
}

/// A document going in: where it came from and its text.
#[derive(Clone, Copy, Debug)]
pub struct InputDoc<'a> {
    pub source: &'a str,
    pub text: &'a str,
}

/// A batch going in: its position in the split (which seeds its plugin
/// instances) and its documents, each `(source, text)`.
#[derive(Clone, Debug, Default)]
pub struct InputBatch {
    pub index: usize,
    pub documents: Vec<(String, String)>,
}

/// What a split turned into.
#[derive(Debug, Default)]
pub struct SplitOutput {
    /// Token ids of each surviving document, EOS-terminated, in order.
    pub documents: Vec<Vec<u32>>,
    /// One report per plugin step, in run order.
    pub steps: Vec<StepReport>,
    pub excluded: Vec<Excluded>,
}

/// Where a split's results go, in corpus order, as batches finish.
pub trait SplitSink {
    /// A surviving document's token ids, EOS-terminated.
    fn document(&mut self, tokens: Vec<u32>) -> Result<()>;
    fn excluded(&mut self, record: Excluded) -> Result<()>;
}

impl SplitSink for SplitOutput {
    fn document(&mut self, tokens: Vec<u32>) -> Result<()> {
        self.documents.push(tokens);
        Ok(())
    }

    fn excluded(&mut self, record: Excluded) -> Result<()> {
        self.excluded.push(record);
        Ok(())
    }
}

struct WorkDoc {
    source: String,
    text: String,
    /// The step whose augmenter derived this document, if one did.
    derived_by: Option<usize>,
}

struct BatchOutput {
    documents: Vec<Vec<u32>>,
    /// For each document, the augmenter step that derived it, and its source.
    derived_by: Vec<Option<(usize, String)>>,
    steps: Vec<StepReport>,
    excluded: Vec<Excluded>,
}

/// Runs `docs` through every plugin step (augmenters only when `augment`)
/// and the tokenizer, all in memory: [`run_stream`] over `docs` cut into
/// batches, the first of them at `first_batch` in the split.
pub fn run(
    docs: &[InputDoc<'_>],
    plugins: &[&dyn StepPlugin],
    augment: bool,
    tokenizer: &Tokenizer,
    options: &PipelineOptions,
    first_batch: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SplitOutput> {
    let mut batches = docs
        .chunks(options.batch_size.max(1))
        .enumerate()
        .map(|(i, batch)| {
            Ok(InputBatch {
                index: first_batch + i,
                documents: batch
                    .iter()
                    .map(|d| (d.source.to_string(), d.text.to_string()))
                    .collect(),
            })
        });
    let mut output = SplitOutput::default();
    let stages = Stages::new(plugins, augment);
    output.steps = run_stream(
        &mut batches,
        &stages,
        tokenizer,
        options,
        progress,
        &mut output,
    )?;
    Ok(output)
}

/// The plugin steps a split runs, in order: every step of every plugin,
/// augmenters only when augmenting (training data).
pub struct Stages<'a> {
    plugins: &'a [&'a dyn StepPlugin],
    steps: Vec<(usize, StepKind)>,
}

impl<'a> Stages<'a> {
    pub fn new(plugins: &'a [&'a dyn StepPlugin], augment: bool) -> Self {
        let steps = plugins
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.steps().into_iter().map(move |k| (i, k)))
            .filter(|(_, kind)| augment || *kind != StepKind::Augmenter)
            .collect();
        Self { plugins, steps }
    }

    /// A zeroed report per step.
    fn reports(&self) -> Vec<StepReport> {
        self.steps
            .iter()
            .map(|&(p, kind)| StepReport {
                plugin: self.plugins[p].name().to_string(),
                kind: Some(kind),
                ..StepReport::default()
            })
            .collect()
    }
}

/// Runs `batches` through `stages` and the tokenizer on `options.workers`
/// threads, handing results to `sink` in batch order. At most a few batches
/// per worker are in memory at once, whatever the split's size. `progress`
/// is told of each finished batch: (documents, bytes). Returns the steps'
/// reports; the first failing batch's error (in batch order, so that the
/// message does not depend on scheduling) ends the run.
pub fn run_stream(
    batches: &mut dyn Iterator<Item = Result<InputBatch>>,
    stages: &Stages<'_>,
    tokenizer: &Tokenizer,
    options: &PipelineOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    sink: &mut dyn SplitSink,
) -> Result<Vec<StepReport>> {
    let workers = options.workers.max(1);
    let window = 2 * workers + 2;
    let cancelled = AtomicBool::new(false);
    let (work_sender, work) = mpsc::channel::<(usize, InputBatch)>();
    let work = Mutex::new(work);
    let (result_sender, results) = mpsc::channel();
    let mut ordered = Ordered {
        reports: stages.reports(),
        derived_kept: vec![0; stages.steps.len()],
        options,
        sink,
    };
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let sender = result_sender.clone();
            let (work, cancelled) = (&work, &cancelled);
            scope.spawn(move || {
                loop {
                    let next = work.lock().expect("no worker panics").recv();
                    let Ok((sequence, batch)) = next else {
                        break;
                    };
                    let result = match cancelled.load(Ordering::Relaxed) {
                        true => Err(anyhow!("cancelled")),
                        false => BatchContext {
                            index: batch.index,
                            plugins: stages.plugins,
                            steps: &stages.steps,
                            tokenizer,
                            options,
                        }
                        .process(batch.documents),
                    };
                    if sender.send((sequence, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(result_sender);
        // Reads batches while fewer than `window` are unfinished, and hands
        // finished ones on in order.
        let mut feed = || -> Result<()> {
            let (mut sent, mut emitted, mut exhausted) = (0, 0, false);
            let mut sizes = BTreeMap::new();
            let mut finished = BTreeMap::new();
            loop {
                while !exhausted && sent - emitted < window && !cancelled.load(Ordering::Relaxed) {
                    match batches.next() {
                        Some(batch) => {
                            let batch = batch?;
                            let bytes = batch.documents.iter().map(|(_, t)| t.len() as u64).sum();
                            sizes.insert(sent, (batch.documents.len() as u64, bytes));
                            work_sender
                                .send((sent, batch))
                                .expect("workers wait for work");
                            sent += 1;
                        }
                        None => exhausted = true,
                    }
                }
                if emitted == sent {
                    return Ok(());
                }
                let (sequence, result): (usize, Result<BatchOutput>) = results
                    .recv()
                    .expect("a worker holds a sender while work is unfinished");
                if result.is_err() {
                    cancelled.store(true, Ordering::Relaxed);
                } else {
                    let (documents, bytes) = sizes[&sequence];
                    progress(documents, bytes);
                }
                finished.insert(sequence, result);
                while let Some(result) = finished.remove(&emitted) {
                    ordered.emit(result?)?;
                    emitted += 1;
                }
            }
        };
        let fed = feed();
        if fed.is_err() {
            cancelled.store(true, Ordering::Relaxed);
        }
        drop(work_sender);
        fed
    })?;
    Ok(ordered.reports)
}

/// Batch results joined in order: step totals, and the augmenters' split
/// limit counted in corpus order.
struct Ordered<'a> {
    reports: Vec<StepReport>,
    /// Derived documents each step has added so far, against the split's limit.
    derived_kept: Vec<u64>,
    options: &'a PipelineOptions,
    sink: &'a mut dyn SplitSink,
}

impl Ordered<'_> {
    fn emit(&mut self, output: BatchOutput) -> Result<()> {
        for (document, derived_by) in output.documents.into_iter().zip(output.derived_by) {
            if let Some((step, source)) = derived_by {
                let report = &mut self.reports[step];
                if self.derived_kept[step] >= self.options.max_derived_documents {
                    if self.options.on_error == ErrorPolicy::Fail {
                        return Err(PluginError {
                            plugin: report.plugin.clone(),
                            kind: StepKind::Augmenter,
                            document: source,
                            documents_in_call: 1,
                            cause: PluginErrorCause::Call(CallFailure::DerivedPastLimit {
                                limit: self.options.max_derived_documents,
                            }),
                        }
                        .into());
                    }
                    report.derived_over_limit += 1;
                    continue;
                }
                self.derived_kept[step] += 1;
            }
            self.sink.document(document)?;
        }
        for record in output.excluded {
            self.sink.excluded(record)?;
        }
        for (total, part) in self.reports.iter_mut().zip(&output.steps) {
            total.merge(part);
        }
        Ok(())
    }
}

/// SplitMix64 finaliser: independent seeds per step (or plugin) and batch.
fn derive_seed(seed: u64, step: usize, batch: usize) -> u64 {
    crate::dedup::mix64(seed ^ ((step as u64) << 48) ^ batch as u64)
}

/// The seed of plugin `plugin`'s instances for `batch`: apart from the
/// augmenters' per-call seeds, which [`derive_seed`] gives from the run seed.
fn instance_seed(seed: u64, plugin: usize, batch: usize) -> u64 {
    derive_seed(derive_seed(seed, 0xFFFF, 0), plugin, batch)
}

/// Deadline-class failures (deadline, memory cap) one batch step may spend
/// under `skip` before its undecided documents are skipped unsearched: enough
/// to bisect a batch of `documents` down to one slow document.
pub fn deadline_budget(documents: usize) -> usize {
    documents.max(1).next_power_of_two().trailing_zeros() as usize + 2
}

/// Results of one step over a batch after recovery: a verdict per document
/// (mappers and filters) or derived documents, plus the documents it failed on.
#[derive(Default)]
struct Recovered {
    verdicts: Vec<Verdict>,
    derived: Vec<Derived>,
    failed: BTreeMap<usize, CallFailure>,
}

struct BatchContext<'a> {
    index: usize,
    plugins: &'a [&'a dyn StepPlugin],
    steps: &'a [(usize, StepKind)],
    tokenizer: &'a Tokenizer,
    options: &'a PipelineOptions,
}

impl BatchContext<'_> {
    fn process(&self, batch: Vec<(String, String)>) -> Result<BatchOutput> {
        let mut docs: Vec<WorkDoc> = batch
            .into_iter()
            .map(|(source, text)| WorkDoc {
                source,
                text,
                derived_by: None,
            })
            .collect();
        // One instance per plugin for this batch alone, made on first use.
        let mut instances: Vec<Option<Box<dyn StepInstance>>> =
            self.plugins.iter().map(|_| None).collect();
        let mut reports = Vec::with_capacity(self.steps.len());
        let mut excluded = Vec::new();
        for (step_index, &(plugin_index, kind)) in self.steps.iter().enumerate() {
            let mut report = StepReport {
                plugin: self.plugins[plugin_index].name().to_string(),
                kind: Some(kind),
                ..StepReport::default()
            };
            report.input = docs.len() as u64;
            let started = Instant::now();
            let mut recovered = Recovered::default();
            if !docs.is_empty() {
                recovered.verdicts = vec![Verdict::Keep; docs.len()];
                let mut call = Call {
                    slot: &mut instances[plugin_index],
                    plugin: self.plugins[plugin_index],
                    kind,
                    instance_seed: instance_seed(self.options.seed, plugin_index, self.index),
                    seed: derive_seed(self.options.seed, step_index, self.index),
                    options: self.options,
                    deadlines_left: deadline_budget(docs.len()),
                    exhausted: None,
                    out: &mut recovered,
                };
                call.attempt(&docs, 0)?;
            }
            report.seconds = started.elapsed().as_secs_f64();
            docs = self.apply(step_index, docs, recovered, &mut report, &mut excluded)?;
            reports.push(report);
        }
        let documents = docs
            .iter()
            .map(|d| {
                self.tokenizer
                    .encode_document(&d.text)
                    .map_err(|e| anyhow!("{}: cannot tokenize: {e}", d.source))
            })
            .collect::<Result<_>>()?;
        Ok(BatchOutput {
            documents,
            derived_by: docs
                .iter()
                .map(|d| d.derived_by.map(|step| (step, d.source.clone())))
                .collect(),
            steps: reports,
            excluded,
        })
    }

    fn apply(
        &self,
        step_index: usize,
        docs: Vec<WorkDoc>,
        recovered: Recovered,
        report: &mut StepReport,
        excluded: &mut Vec<Excluded>,
    ) -> Result<Vec<WorkDoc>> {
        let (plugin_index, kind) = self.steps[step_index];
        let plugin = self.plugins[plugin_index].name();
        let mut derived_by_parent: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for d in recovered.derived {
            report.added += 1;
            if d.text.trim().is_empty() {
                report.derived_empty += 1;
            } else {
                derived_by_parent.entry(d.parent).or_default().push(d.text);
            }
        }
        let mut failed = recovered.failed;
        let mut kept = Vec::with_capacity(docs.len());
        for (i, (mut doc, verdict)) in docs.into_iter().zip(recovered.verdicts).enumerate() {
            let verdict = match failed.remove(&i) {
                Some(failure) => Err(PluginErrorCause::Call(failure)),
                None => Ok(verdict),
            };
            let exclude = |reason: String, doc: WorkDoc| Excluded {
                source: doc.source,
                plugin: plugin.to_string(),
                kind: Some(kind),
                reason,
                text: doc.text,
            };
            let cause = match verdict {
                Ok(Verdict::Keep) => None,
                Ok(Verdict::Replace(text)) => {
                    report.replaced += 1;
                    doc.text = text;
                    None
                }
                Ok(Verdict::Drop(reason)) => {
                    report.count_drop(&reason, 1);
                    excluded.push(exclude(reason, doc));
                    continue;
                }
                Ok(Verdict::Error(message)) => Some(PluginErrorCause::Reported(message)),
                Err(cause) => Some(cause),
            };
            if let Some(cause) = cause {
                if self.options.on_error == ErrorPolicy::Fail {
                    return Err(PluginError {
                        plugin: plugin.to_string(),
                        kind,
                        document: doc.source,
                        documents_in_call: 1,
                        cause,
                    }
                    .into());
                }
                report.errors += 1;
                let message = match cause {
                    PluginErrorCause::Call(failure) => failure.to_string(),
                    PluginErrorCause::Reported(message) => message,
                };
                excluded.push(exclude(format!("error: {message}"), doc));
                continue;
            }
            report.kept += 1;
            let children = derived_by_parent.remove(&(i as u32)).unwrap_or_default();
            let parent_source = doc.source.clone();
            kept.push(doc);
            for (n, text) in children.into_iter().enumerate() {
                kept.push(WorkDoc {
                    source: format!("{parent_source}+aug{}", n + 1),
                    text,
                    derived_by: Some(step_index),
                });
            }
        }
        Ok(kept)
    }
}

/// One step's calls over a batch, with what bisection needs.
struct Call<'a> {
    slot: &'a mut Option<Box<dyn StepInstance>>,
    plugin: &'a dyn StepPlugin,
    kind: StepKind,
    instance_seed: u64,
    /// The augmenter's seed argument.
    seed: u64,
    options: &'a PipelineOptions,
    /// Deadline-class failures this batch step may still spend under `skip`.
    deadlines_left: usize,
    /// The deadline-class failure that spent the budget, once it is spent.
    exhausted: Option<CallFailure>,
    out: &'a mut Recovered,
}

impl Call<'_> {
    /// Calls the plugin on `docs` (which start at `offset` in the batch); on
    /// a failed call, discards the instance and retries each half, down to
    /// single documents.
    fn attempt(&mut self, docs: &[WorkDoc], offset: usize) -> Result<()> {
        if let Some(failure) = &self.exhausted {
            // Out of budget: the rest of the batch is skipped unsearched.
            for i in offset..offset + docs.len() {
                self.out.failed.insert(i, failure.clone());
            }
            return Ok(());
        }
        let instance = match self.slot {
            Some(instance) => instance,
            None => self
                .slot
                .insert(self.plugin.instantiate(self.instance_seed)?),
        };
        let refs: Vec<DocRef<'_>> = docs
            .iter()
            .map(|d| DocRef {
                source: &d.source,
                text: &d.text,
            })
            .collect();
        let result = instance
            .apply(self.kind, &refs, self.seed)
            .and_then(|output| {
                check_output(
                    self.kind,
                    &refs,
                    &output,
                    self.options.max_derived_per_document,
                )?;
                Ok(output)
            });
        let failure = match result {
            Ok(StepOutput::Verdicts(verdicts)) => {
                self.out
                    .verdicts
                    .splice(offset..offset + verdicts.len(), verdicts);
                return Ok(());
            }
            Ok(StepOutput::Derived(derived)) => {
                self.out
                    .derived
                    .extend(derived.into_iter().map(|d| Derived {
                        parent: d.parent + offset as u32,
                        ..d
                    }));
                return Ok(());
            }
            Err(failure) => failure,
        };
        *self.slot = None;
        if failure.is_exhaustion() {
            if self.options.on_error == ErrorPolicy::Fail {
                return Err(PluginError {
                    plugin: self.plugin.name().to_string(),
                    kind: self.kind,
                    document: docs[0].source.clone(),
                    documents_in_call: docs.len(),
                    cause: PluginErrorCause::Call(failure),
                }
                .into());
            }
            self.deadlines_left = self.deadlines_left.saturating_sub(1);
            if self.deadlines_left == 0 {
                self.exhausted = Some(failure);
                return self.attempt(docs, offset);
            }
        }
        if docs.len() == 1 {
            self.out.failed.insert(offset, failure);
            return Ok(());
        }
        let middle = docs.len() / 2;
        self.attempt(&docs[..middle], offset)?;
        self.attempt(&docs[middle..], offset + middle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{DISTINCT_REASONS, OTHER_REASONS};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    /// A native plugin: uppercases (mapper), drops texts containing "drop"
    /// (filter), panics-as-failure on "trap", times out on "slow", reports an
    /// error on "bad", returns a short result list on "short", duplicates
    /// (augmenter; an empty copy on "empty"). Its instances count their calls
    /// and tag output with that count and their seed: state that must not
    /// leak between batches.
    struct Fake {
        kinds: Vec<StepKind>,
        instances: AtomicU32,
        calls: Arc<AtomicU32>,
    }

    struct FakeInstance {
        seed: u64,
        calls_so_far: u32,
        calls: Arc<AtomicU32>,
    }

    impl StepPlugin for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn steps(&self) -> Vec<StepKind> {
            self.kinds.clone()
        }
        fn instantiate(&self, seed: u64) -> Result<Box<dyn StepInstance>> {
            self.instances.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(FakeInstance {
                seed,
                calls_so_far: 0,
                calls: self.calls.clone(),
            }))
        }
    }

    impl StepInstance for FakeInstance {
        fn apply(
            &mut self,
            kind: StepKind,
            docs: &[DocRef<'_>],
            seed: u64,
        ) -> Result<StepOutput, CallFailure> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.calls_so_far += 1;
            if docs.iter().any(|d| d.text.contains("trap")) {
                return Err(CallFailure::Trap {
                    trap: "wasm `unreachable` instruction executed".into(),
                    stderr: String::new(),
                });
            }
            if docs.iter().any(|d| d.text.contains("slow")) {
                return Err(CallFailure::Deadline { millis: 300 });
            }
            if docs.iter().any(|d| d.text.contains("short")) {
                return Ok(StepOutput::Verdicts(vec![]));
            }
            Ok(match kind {
                StepKind::Mapper => StepOutput::Verdicts(
                    docs.iter()
                        .map(|d| {
                            if d.text.contains("bad") {
                                Verdict::Error("cannot".into())
                            } else {
                                Verdict::Replace(format!(
                                    "{} {} {}",
                                    d.text.to_uppercase(),
                                    self.calls_so_far,
                                    self.seed % 1000
                                ))
                            }
                        })
                        .collect(),
                ),
                StepKind::Filter => StepOutput::Verdicts(
                    docs.iter()
                        .map(|d| {
                            if d.text.contains("DROP") {
                                Verdict::Drop("dropword".into())
                            } else {
                                Verdict::Keep
                            }
                        })
                        .collect(),
                ),
                StepKind::Augmenter => StepOutput::Derived(
                    (0..docs.len())
                        .map(|i| Derived {
                            parent: i as u32,
                            text: if docs[i].text.contains("empty") {
                                " \n".into()
                            } else {
                                format!("{}#{}", docs[i].text, seed % 2)
                            },
                        })
                        .collect(),
                ),
            })
        }
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/bloom-tiny/model"),
        )
        .unwrap()
    }

    fn options(workers: usize, on_error: ErrorPolicy) -> PipelineOptions {
        PipelineOptions {
            batch_size: 4,
            workers,
            on_error,
            seed: 42,
            max_derived_per_document: 4,
            max_derived_documents: u64::MAX,
        }
    }

    fn inputs(texts: &[String]) -> Vec<(String, String)> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("c.txt:{}", i + 1), t.clone()))
            .collect()
    }

    fn run_texts(
        texts: &[String],
        plugin: &Fake,
        augment: bool,
        opts: &PipelineOptions,
    ) -> Result<SplitOutput> {
        let owned = inputs(texts);
        let docs: Vec<InputDoc<'_>> = owned
            .iter()
            .map(|(s, t)| InputDoc { source: s, text: t })
            .collect();
        run(
            &docs,
            &[plugin as &dyn StepPlugin],
            augment,
            &tokenizer(),
            opts,
            0,
            &|_, _| {},
        )
    }

    fn fake(kinds: &[StepKind]) -> Fake {
        Fake {
            kinds: kinds.to_vec(),
            instances: AtomicU32::new(0),
            calls: Arc::new(AtomicU32::new(0)),
        }
    }

    #[test]
    fn counts_hold_and_workers_do_not_change_the_result() {
        let texts: Vec<String> = (0..37)
            .map(|i| {
                if i % 5 == 0 {
                    format!("drop {i}\n")
                } else {
                    format!("keep {i}\n")
                }
            })
            .collect();
        let plugin = fake(&[StepKind::Mapper, StepKind::Filter, StepKind::Augmenter]);
        let one = run_texts(&texts, &plugin, true, &options(1, ErrorPolicy::Fail)).unwrap();
        let two = run_texts(&texts, &plugin, true, &options(2, ErrorPolicy::Fail)).unwrap();
        let three = run_texts(&texts, &plugin, true, &options(3, ErrorPolicy::Fail)).unwrap();
        // The fake's output carries its per-instance call count and seed.
        assert_eq!(one.documents, two.documents);
        assert_eq!(one.documents, three.documents);
        let [mapper, filter, augmenter] = &one.steps[..] else {
            panic!()
        };
        assert_eq!((mapper.input, mapper.kept, mapper.replaced), (37, 37, 37));
        assert_eq!((filter.input, filter.kept, filter.dropped), (37, 29, 8));
        assert_eq!(filter.dropped_by_reason["dropword"], 8);
        assert_eq!(
            (augmenter.input, augmenter.kept, augmenter.added),
            (29, 29, 29)
        );
        // Every batch got fresh instances: each mapper call was its instance's first.
        let tokenizer = tokenizer();
        for document in &one.documents {
            let text = tokenizer.decode(document).unwrap();
            assert!(text.contains("\n 1 "), "{text:?}");
        }
        assert_eq!(one.documents.len(), 58);
        assert_eq!(one.excluded.len(), 8);
        assert_eq!(one.excluded[0].source, "c.txt:1");
        // Without augmentation (validation), the augmenter step does not run.
        let val = run_texts(&texts, &plugin, false, &options(2, ErrorPolicy::Fail)).unwrap();
        assert_eq!(val.steps.len(), 2);
        assert_eq!(val.documents.len(), 29);
    }

    #[test]
    fn a_trapping_document_is_found_by_bisection() {
        let mut texts: Vec<String> = (0..8).map(|i| format!("doc {i}\n")).collect();
        texts[6] = "this will trap\n".into();
        let plugin = fake(&[StepKind::Mapper]);
        let err = run_texts(&texts, &plugin, false, &options(1, ErrorPolicy::Fail))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "plugin `fake` (mapper) failed on document c.txt:7: trapped: wasm `unreachable` instruction executed"
            ),
            "{err}"
        );
        // Batch 0..4 gets one instance; batch 4..8 traps, and its halves and
        // quarters each get a fresh one: 1 + 1 + 3.
        assert_eq!(plugin.instances.load(Ordering::Relaxed), 5);
        let skipped = run_texts(
            &texts,
            &fake(&[StepKind::Mapper]),
            false,
            &options(1, ErrorPolicy::Skip),
        )
        .unwrap();
        assert_eq!(skipped.steps[0].errors, 1);
        assert_eq!(skipped.steps[0].kept, 7);
        assert_eq!(skipped.excluded[0].source, "c.txt:7");
        assert!(
            skipped.excluded[0]
                .reason
                .starts_with("error: trapped: wasm")
        );
    }

    #[test]
    fn a_deadline_ends_a_fail_run_at_once_and_is_bisected_within_budget_under_skip() {
        let mut texts: Vec<String> = (0..16).map(|i| format!("doc {i}\n")).collect();
        texts[13] = "slow one\n".into();
        let plugin = fake(&[StepKind::Filter]);
        let mut opts = options(1, ErrorPolicy::Fail);
        opts.batch_size = 16;
        let err = run_texts(&texts, &plugin, false, &opts).unwrap_err();
        let failure = err
            .downcast_ref::<PluginError>()
            .expect("a typed plugin error");
        assert_eq!(
            (failure.document.as_str(), failure.documents_in_call),
            ("c.txt:1", 16)
        );
        assert!(
            err.to_string().starts_with(
                "plugin `fake` (filter) failed on the batch of 16 documents starting at c.txt:1: did not finish within the 300 ms deadline"
            ),
            "{err}"
        );
        assert_eq!(
            plugin.calls.load(Ordering::Relaxed),
            1,
            "no bisection under fail"
        );

        // Under skip, one slow document costs one deadline per level: 16, 8, 4, 2, 1.
        let plugin = fake(&[StepKind::Filter]);
        opts.on_error = ErrorPolicy::Skip;
        let out = run_texts(&texts, &plugin, false, &opts).unwrap();
        assert_eq!(out.steps[0].errors, 1);
        assert_eq!(out.excluded[0].source, "c.txt:14");
        assert_eq!(deadline_budget(16), 6);
        // Every document slow: the budget (6 deadlines) ends the search, and
        // the batch's documents are skipped without one call each.
        let slow: Vec<String> = (0..16).map(|i| format!("slow {i}\n")).collect();
        let plugin = fake(&[StepKind::Filter]);
        let out = run_texts(&slow, &plugin, false, &opts).unwrap();
        assert_eq!(out.steps[0].errors, 16);
        assert_eq!(plugin.calls.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn empty_derived_documents_are_dropped_and_derived_ones_bounded_per_split() {
        let texts: Vec<String> = vec!["a\n".into(), "empty\n".into(), "b\n".into()];
        let plugin = fake(&[StepKind::Augmenter]);
        let out = run_texts(&texts, &plugin, true, &options(1, ErrorPolicy::Fail)).unwrap();
        assert_eq!((out.steps[0].added, out.steps[0].derived_empty), (3, 1));
        assert_eq!(out.documents.len(), 5);
        let mut opts = options(1, ErrorPolicy::Skip);
        opts.max_derived_documents = 1;
        let out = run_texts(&texts, &plugin, true, &opts).unwrap();
        assert_eq!(out.documents.len(), 4);
        assert_eq!(out.steps[0].derived_over_limit, 1);
        opts.on_error = ErrorPolicy::Fail;
        let err = run_texts(&texts, &plugin, true, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(augmenter)")
                && err.contains("derived more than the split's limit of 1 documents"),
            "{err}"
        );
    }

    #[test]
    fn distinct_drop_reasons_are_bounded() {
        let mut report = StepReport::default();
        for i in 0..1000 {
            report.count_drop(&format!("reason {i}"), 1);
        }
        assert_eq!(report.dropped, 1000);
        assert_eq!(report.dropped_by_reason.len(), DISTINCT_REASONS + 1);
        assert_eq!(
            report.dropped_by_reason[OTHER_REASONS],
            1000 - DISTINCT_REASONS as u64
        );
    }

    #[test]
    fn reported_errors_and_broken_contracts_follow_the_policy() {
        let texts: Vec<String> = vec![
            "ok\n".into(),
            "bad\n".into(),
            "short\n".into(),
            "ok\n".into(),
        ];
        let plugin = fake(&[StepKind::Mapper]);
        let out = run_texts(&texts, &plugin, false, &options(1, ErrorPolicy::Skip)).unwrap();
        let reasons: Vec<_> = out
            .excluded
            .iter()
            .map(|e| (e.source.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("c.txt:2", "error: cannot"),
                ("c.txt:3", "error: returned 0 results for 1 documents")
            ]
        );
        assert_eq!(
            out.steps[0].kept + out.steps[0].dropped + out.steps[0].errors,
            out.steps[0].input
        );
        let err = run_texts(&texts, &plugin, false, &options(1, ErrorPolicy::Fail))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.txt:2: cannot"), "{err}");
    }

    #[test]
    fn documents_are_tokenized_with_eos() {
        let plugin = fake(&[]);
        let out = run_texts(
            &["hello world\n".to_string()],
            &plugin,
            false,
            &options(1, ErrorPolicy::Fail),
        )
        .unwrap();
        let eos = tokenizer().eos_id;
        assert_eq!(out.documents[0].last(), Some(&eos));
        assert!(out.documents[0].len() > 1);
    }
}
