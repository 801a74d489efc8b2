//! Bridges a [`Plugin`] to the generated `pt:plugin@0.2.0` exports: batches in,
//! per-document results out, the configured plugin kept between calls.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::exports::pt::plugin0_1_0::{augmenter, filter, mapper, metric, plugin};
use crate::bindings::exports::pt::plugin0_2_0::tasks;
use crate::bindings::pt::plugin0_1_0::types as wit;
use crate::{Accumulator, Decision, Document, Edit, Kind, Plugin, Rng, Sample};

thread_local! {
    /// The configured plugin. Components are single-threaded, and `configure`
    /// runs once per instance before any batch.
    static CONFIGURED: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn with_plugin<P: Plugin, R>(f: impl FnOnce(&P) -> R) -> R {
    CONFIGURED.with(|cell| {
        let state = cell.borrow();
        let plugin = state
            .as_ref()
            .and_then(|p| p.downcast_ref::<P>())
            .expect("the host calls configure before any batch");
        f(plugin)
    })
}

fn document(doc: wit::Document) -> Document {
    Document {
        source: doc.source,
        text: doc.text,
    }
}

#[doc(hidden)]
pub struct Adapter<P>(PhantomData<P>);

impl<P: Plugin> plugin::Guest for Adapter<P> {
    fn describe() -> wit::Info {
        let kinds = P::KINDS
            .iter()
            .map(|k| match k {
                Kind::Filter => wit::Kind::Filter,
                Kind::Mapper => wit::Kind::Mapper,
                Kind::Augmenter => wit::Kind::Augmenter,
                Kind::Metric => wit::Kind::Metric,
            })
            .collect();
        wit::Info {
            id: P::ID.into(),
            version: P::VERSION.into(),
            description: P::DESCRIPTION.into(),
            kinds,
            config_schema: P::CONFIG_SCHEMA.into(),
        }
    }

    fn configure(config: String) -> Result<(), String> {
        let plugin = P::configure(&config)?;
        CONFIGURED.with(|cell| *cell.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }
}

impl<P: Plugin> filter::Guest for Adapter<P> {
    fn filter_batch(docs: Vec<wit::Document>) -> Vec<wit::Decision> {
        with_plugin(|p: &P| {
            docs.into_iter()
                .map(|doc| match p.filter(&document(doc)) {
                    Decision::Keep => wit::Decision::Keep,
                    Decision::Drop(reason) => wit::Decision::Drop(reason),
                    Decision::Error(message) => wit::Decision::Error(message),
                })
                .collect()
        })
    }
}

impl<P: Plugin> mapper::Guest for Adapter<P> {
    fn map_batch(docs: Vec<wit::Document>) -> Vec<wit::Edit> {
        with_plugin(|p: &P| {
            docs.into_iter()
                .map(|doc| match p.map(&document(doc)) {
                    Edit::Unchanged => wit::Edit::Unchanged,
                    Edit::Replace(text) => wit::Edit::Replace(text),
                    Edit::Drop(reason) => wit::Edit::Drop(reason),
                    Edit::Error(message) => wit::Edit::Error(message),
                })
                .collect()
        })
    }
}

impl<P: Plugin> augmenter::Guest for Adapter<P> {
    fn augment_batch(docs: Vec<wit::Document>, seed: u64) -> Vec<wit::DerivedDocument> {
        with_plugin(|p: &P| {
            let mut derived = Vec::new();
            for (index, doc) in docs.into_iter().enumerate() {
                // One stream per document: a document's augmentations do not
                // depend on which other documents share its batch.
                let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for text in p.augment(&document(doc), &mut rng) {
                    derived.push(wit::DerivedDocument {
                        parent: index as u32,
                        text,
                    });
                }
            }
            derived
        })
    }
}

#[doc(hidden)]
pub struct AccumulatorAdapter<P> {
    inner: RefCell<Box<dyn Accumulator>>,
    _plugin: PhantomData<P>,
}

impl<P: Plugin> metric::GuestAccumulator for AccumulatorAdapter<P> {
    fn new() -> Self {
        Self {
            inner: RefCell::new(with_plugin(|p: &P| p.new_accumulator())),
            _plugin: PhantomData,
        }
    }

    fn add_batch(&self, samples: Vec<wit::Sample>) {
        let mut inner = self.inner.borrow_mut();
        for s in samples {
            inner.add(&Sample {
                reference: s.reference,
                predicted: s.predicted,
                token_logprobs: s.token_logprobs,
                continuation: s.continuation,
            });
        }
    }

    fn compute(&self) -> Vec<wit::MetricValue> {
        self.inner
            .borrow()
            .compute()
            .into_iter()
            .map(|m| wit::MetricValue {
                name: m.name,
                value: m.value,
                higher_is_better: m.higher_is_better,
            })
            .collect()
    }
}

impl<P: Plugin> metric::Guest for Adapter<P> {
    type Accumulator = AccumulatorAdapter<P>;
}

impl<P: Plugin> tasks::Guest for Adapter<P> {
    fn formats() -> Vec<String> {
        P::TASK_FORMATS.iter().map(|f| f.to_string()).collect()
    }

    fn read_items(
        format: String,
        records: Vec<wit::Document>,
    ) -> Vec<Result<Vec<tasks::TaskItem>, String>> {
        with_plugin(|p: &P| {
            records
                .into_iter()
                .map(|record| {
                    let items = p.read_task_items(&format, &document(record))?;
                    Ok(items
                        .into_iter()
                        .map(|item| tasks::TaskItem {
                            subject: item.subject,
                            context: item.context,
                            continuations: item.continuations,
                            gold: item.gold,
                        })
                        .collect())
                })
                .collect()
        })
    }
}
