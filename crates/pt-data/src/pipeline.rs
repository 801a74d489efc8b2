//! Documents through plugins and the tokenizer, in parallel.
//!
//! A split's documents are cut into fixed batches. Worker threads take batches
//! in turn; each worker owns one instance of every plugin and runs the whole
//! chain (mappers, filters, augmenters in plugin order) and then the tokenizer
//! on its batch. Results are reassembled in batch order, so the output does not
//! depend on the number of workers. A call that traps is retried on a fresh
//! instance with the batch halved until the failing document is found; the
//! error policy then fails the run or skips that document.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};

use crate::report::{Excluded, StepReport};
use crate::steps::{
    CallFailure, Derived, DocRef, StepInstance, StepKind, StepOutput, StepPlugin, Verdict,
    check_output,
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
}

/// A document going in: where it came from and its text.
#[derive(Clone, Copy, Debug)]
pub struct InputDoc<'a> {
    pub source: &'a str,
    pub text: &'a str,
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

struct WorkDoc {
    source: String,
    text: String,
}

struct BatchOutput {
    documents: Vec<Vec<u32>>,
    steps: Vec<StepReport>,
    excluded: Vec<Excluded>,
}

/// Runs `docs` through every plugin step (augmenters only when `augment`) and
/// the tokenizer. `progress` is told of each finished batch: (documents, bytes).
/// `first_batch`: where `docs` start in the split, in batches (a shard's
/// part), so that augmenters draw the seeds the whole split would give them.
pub fn run(
    docs: &[InputDoc<'_>],
    plugins: &[&dyn StepPlugin],
    augment: bool,
    tokenizer: &Tokenizer,
    options: &PipelineOptions,
    first_batch: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SplitOutput> {
    let steps: Vec<(usize, StepKind)> = plugins
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.steps().into_iter().map(move |k| (i, k)))
        .filter(|(_, kind)| augment || *kind != StepKind::Augmenter)
        .collect();
    let batches: Vec<&[InputDoc<'_>]> = docs.chunks(options.batch_size.max(1)).collect();
    let next = AtomicUsize::new(0);
    let cancelled = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel();
    let mut outputs: Vec<Option<BatchOutput>> = (0..batches.len()).map(|_| None).collect();
    let mut errors: BTreeMap<usize, anyhow::Error> = BTreeMap::new();

    std::thread::scope(|scope| {
        for _ in 0..options.workers.clamp(1, batches.len().max(1)) {
            let sender = sender.clone();
            let (next, cancelled, batches, steps) = (&next, &cancelled, &batches, &steps);
            scope.spawn(move || {
                let mut instances: Vec<Option<Box<dyn StepInstance>>> =
                    plugins.iter().map(|_| None).collect();
                while !cancelled.load(Ordering::Relaxed) {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(index) else {
                        break;
                    };
                    let context = BatchContext {
                        index: first_batch + index,
                        plugins,
                        steps,
                        tokenizer,
                        options,
                    };
                    let result = context.process(batch, &mut instances);
                    if result.is_err() {
                        cancelled.store(true, Ordering::Relaxed);
                    }
                    if sender.send((index, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        for (index, result) in receiver {
            match result {
                Ok(output) => {
                    let bytes = batches[index].iter().map(|d| d.text.len() as u64).sum();
                    progress(batches[index].len() as u64, bytes);
                    outputs[index] = Some(output);
                }
                Err(error) => {
                    errors.insert(index, error);
                }
            }
        }
    });
    // Several workers may fail at once; report the earliest batch's error so
    // that the message does not depend on scheduling.
    if let Some((_, error)) = errors.into_iter().next() {
        return Err(error);
    }

    let mut split = SplitOutput {
        steps: steps
            .iter()
            .map(|&(p, kind)| StepReport {
                plugin: plugins[p].name().to_string(),
                kind: Some(kind),
                ..StepReport::default()
            })
            .collect(),
        ..SplitOutput::default()
    };
    for output in outputs
        .into_iter()
        .map(|o| o.expect("every batch finished"))
    {
        split.documents.extend(output.documents);
        split.excluded.extend(output.excluded);
        for (total, part) in split.steps.iter_mut().zip(&output.steps) {
            total.merge(part);
        }
    }
    Ok(split)
}

/// SplitMix64 finaliser: independent augmenter seeds per step and batch.
fn derive_seed(seed: u64, step: usize, batch: usize) -> u64 {
    let mut z = seed ^ ((step as u64) << 48) ^ batch as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Results of one step over a batch after recovery: a verdict per document
/// (mappers and filters) or derived documents, plus the documents it failed on.
#[derive(Default)]
struct Recovered {
    verdicts: Vec<Verdict>,
    derived: Vec<Derived>,
    failed: BTreeMap<usize, String>,
}

struct BatchContext<'a> {
    index: usize,
    plugins: &'a [&'a dyn StepPlugin],
    steps: &'a [(usize, StepKind)],
    tokenizer: &'a Tokenizer,
    options: &'a PipelineOptions,
}

impl BatchContext<'_> {
    fn process(
        &self,
        batch: &[InputDoc<'_>],
        instances: &mut [Option<Box<dyn StepInstance>>],
    ) -> Result<BatchOutput> {
        let mut docs: Vec<WorkDoc> = batch
            .iter()
            .map(|d| WorkDoc {
                source: d.source.to_string(),
                text: d.text.to_string(),
            })
            .collect();
        let mut reports = Vec::with_capacity(self.steps.len());
        let mut excluded = Vec::new();
        for (step_index, &(plugin_index, kind)) in self.steps.iter().enumerate() {
            let plugin = self.plugins[plugin_index];
            let mut report = StepReport {
                plugin: plugin.name().to_string(),
                kind: Some(kind),
                ..StepReport::default()
            };
            report.input = docs.len() as u64;
            let started = Instant::now();
            let mut recovered = Recovered::default();
            if !docs.is_empty() {
                let seed = derive_seed(self.options.seed, step_index, self.index);
                recovered.verdicts = vec![Verdict::Keep; docs.len()];
                attempt(
                    &mut instances[plugin_index],
                    plugin,
                    kind,
                    &docs,
                    0,
                    seed,
                    &mut recovered,
                )?;
            }
            report.seconds = started.elapsed().as_secs_f64();
            for (&i, cause) in &recovered.failed {
                recovered.verdicts[i] = Verdict::Error(cause.clone());
            }
            docs = self.apply(plugin, kind, docs, recovered, &mut report, &mut excluded)?;
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
            steps: reports,
            excluded,
        })
    }

    fn apply(
        &self,
        plugin: &dyn StepPlugin,
        kind: StepKind,
        docs: Vec<WorkDoc>,
        recovered: Recovered,
        report: &mut StepReport,
        excluded: &mut Vec<Excluded>,
    ) -> Result<Vec<WorkDoc>> {
        let mut derived_by_parent: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for d in recovered.derived {
            derived_by_parent.entry(d.parent).or_default().push(d.text);
        }
        report.added = derived_by_parent.values().map(|v| v.len() as u64).sum();
        let mut verdicts = recovered.verdicts.into_iter();
        let mut kept = Vec::with_capacity(docs.len());
        for (i, mut doc) in docs.into_iter().enumerate() {
            let exclude = |reason: String, doc: WorkDoc| Excluded {
                source: doc.source,
                plugin: plugin.name().to_string(),
                kind: Some(kind),
                reason,
                text: doc.text,
            };
            match verdicts.next().unwrap_or(Verdict::Keep) {
                Verdict::Keep => report.kept += 1,
                Verdict::Replace(text) => {
                    report.kept += 1;
                    report.replaced += 1;
                    doc.text = text;
                }
                Verdict::Drop(reason) => {
                    report.dropped += 1;
                    *report.dropped_by_reason.entry(reason.clone()).or_default() += 1;
                    excluded.push(exclude(reason, doc));
                    continue;
                }
                Verdict::Error(cause) => {
                    if self.options.on_error == ErrorPolicy::Fail {
                        bail!(
                            "plugin `{}` ({}) failed on document {}: {cause}\n\
                             Fix the plugin or the document, or pass --on_plugin_error skip to skip such documents.",
                            plugin.name(),
                            kind_name(kind),
                            doc.source
                        );
                    }
                    report.errors += 1;
                    excluded.push(exclude(format!("error: {cause}"), doc));
                    continue;
                }
            }
            let children = derived_by_parent.remove(&(i as u32)).unwrap_or_default();
            let parent_source = doc.source.clone();
            kept.push(doc);
            for (n, text) in children.into_iter().enumerate() {
                kept.push(WorkDoc {
                    source: format!("{parent_source}+aug{}", n + 1),
                    text,
                });
            }
        }
        Ok(kept)
    }
}

fn kind_name(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Mapper => "mapper",
        StepKind::Filter => "filter",
        StepKind::Augmenter => "augmenter",
    }
}

/// Calls `plugin` on `docs` (which start at `offset` in the batch); on a failed
/// call, discards the instance and retries each half, down to single documents.
#[allow(clippy::too_many_arguments)]
fn attempt(
    slot: &mut Option<Box<dyn StepInstance>>,
    plugin: &dyn StepPlugin,
    kind: StepKind,
    docs: &[WorkDoc],
    offset: usize,
    seed: u64,
    out: &mut Recovered,
) -> Result<()> {
    let instance = match slot {
        Some(instance) => instance,
        None => slot.insert(plugin.instantiate()?),
    };
    let refs: Vec<DocRef<'_>> = docs
        .iter()
        .map(|d| DocRef {
            source: &d.source,
            text: &d.text,
        })
        .collect();
    let result = instance.apply(kind, &refs, seed).and_then(|output| {
        check_output(kind, &refs, &output)?;
        Ok(output)
    });
    match result {
        Ok(StepOutput::Verdicts(verdicts)) => {
            out.verdicts
                .splice(offset..offset + verdicts.len(), verdicts);
        }
        Ok(StepOutput::Derived(derived)) => {
            out.derived.extend(derived.into_iter().map(|d| Derived {
                parent: d.parent + offset as u32,
                ..d
            }));
        }
        Err(CallFailure(cause)) => {
            *slot = None;
            if docs.len() == 1 {
                out.failed.insert(offset, cause);
            } else {
                let middle = docs.len() / 2;
                attempt(slot, plugin, kind, &docs[..middle], offset, seed, out)?;
                attempt(
                    slot,
                    plugin,
                    kind,
                    &docs[middle..],
                    offset + middle,
                    seed,
                    out,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A native plugin: uppercases (mapper), drops texts containing "drop"
    /// (filter), panics-as-failure on "trap", reports an error on "bad",
    /// returns a short result list on "short", duplicates (augmenter).
    struct Fake {
        kinds: Vec<StepKind>,
        instances: AtomicU32,
    }

    struct FakeInstance;

    impl StepPlugin for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn steps(&self) -> Vec<StepKind> {
            self.kinds.clone()
        }
        fn instantiate(&self) -> Result<Box<dyn StepInstance>> {
            self.instances.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(FakeInstance))
        }
    }

    impl StepInstance for FakeInstance {
        fn apply(
            &mut self,
            kind: StepKind,
            docs: &[DocRef<'_>],
            seed: u64,
        ) -> Result<StepOutput, CallFailure> {
            if docs.iter().any(|d| d.text.contains("trap")) {
                return Err(CallFailure("wasm trap: unreachable".into()));
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
                                Verdict::Replace(d.text.to_uppercase())
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
                            text: format!("{}#{}", docs[i].text, seed % 2),
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
        assert_eq!(one.documents, two.documents);
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
                "plugin `fake` (mapper) failed on document c.txt:7: wasm trap: unreachable"
            ),
            "{err}"
        );
        // Batch 4..8 traps; halves and quarters each get a fresh instance: 1 + 3.
        assert_eq!(plugin.instances.load(Ordering::Relaxed), 4);
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
        assert!(skipped.excluded[0].reason.starts_with("error: wasm trap"));
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
