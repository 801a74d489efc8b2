//! Running: one store per instance, every call under the instance's memory cap
//! and a wall-clock deadline; traps become [`CallFailure`]s that say what
//! happened (deadline, memory, stack, panic message from stderr).

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use pt_data::steps::MESSAGE_BYTES;
use pt_data::text::{bounded, escape_controls};
use pt_data::{CallFailure, Derived, DocRef, StepInstance, StepKind, StepOutput, Verdict};
use wasmtime::Store;
use wasmtime::component::{InstancePre, ResourceAny, ResourceTableError};

use crate::bindings::exports::pt::plugin0_1_0::{augmenter, filter, mapper, metric, plugin};
use crate::bindings::exports::pt::plugin0_2_0::tasks::{self, TaskItem};
use crate::bindings::pt::plugin0_1_0::types::{
    Decision, Document, Edit, Info, Kind, MetricValue, Sample,
};
use crate::limits::PluginLimits;
use crate::link::PluginState;

/// Characters of a trapping plugin's stderr quoted in the error.
const STDERR_CHARS: usize = 600;
/// Values one metric plugin may return from one evaluation.
pub const METRIC_VALUES: usize = 32;
/// Longest metric name (it becomes a JSON key and a TensorBoard tag).
pub const METRIC_NAME_BYTES: usize = 64;

/// One instance of a plugin with its own store. Not shared between threads.
pub struct PluginInstance {
    name: Arc<str>,
    limits: PluginLimits,
    store: Store<PluginState>,
    plugin: plugin::Guest,
    filter: Option<filter::Guest>,
    mapper: Option<mapper::Guest>,
    augmenter: Option<augmenter::Guest>,
    metric: Option<metric::Guest>,
    tasks: Option<tasks::Guest>,
}

/// The tail of what the plugin wrote to stderr, minus a Rust guest's hint
/// about RUST_BACKTRACE (which cannot be acted on inside the sandbox).
fn stderr_tail(store: &Store<PluginState>) -> String {
    let (stderr, _) = store.data().stderr.take();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let text = lines.join("\n");
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(STDERR_CHARS);
    text.chars().skip(skip).collect()
}

/// What a failed call means, from wasmtime's typed errors and the limiter's
/// flag (never from the text of a backtrace, which is switched off).
fn classify(
    store: &mut Store<PluginState>,
    limits: &PluginLimits,
    error: &wasmtime::Error,
) -> CallFailure {
    let stderr = stderr_tail(store);
    if store.data().limits.memory_cap_hit {
        return CallFailure::MemoryCap {
            mebibytes: (limits.memory_bytes >> 20) as u64,
        };
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return CallFailure::Exit {
            code: exit.0,
            stderr,
        };
    }
    if let Some(table) = error
        .chain()
        .find_map(|e| e.downcast_ref::<ResourceTableError>())
    {
        return CallFailure::ResourceLimit(format!("resource handles ({table})"));
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallFailure::Deadline {
            millis: limits.call_timeout.as_millis() as u64,
        },
        Some(wasmtime::Trap::StackOverflow) => CallFailure::StackOverflow,
        // Languages like Rust and C keep their stack in linear memory: deep
        // recursion runs off its start and shows up as a bad access.
        Some(wasmtime::Trap::MemoryOutOfBounds) => CallFailure::Trap {
            trap: "out-of-bounds memory access (a bug in the plugin, or its stack overflowed from deep recursion)".into(),
            stderr,
        },
        Some(trap) => CallFailure::Trap {
            trap: trap.to_string(),
            stderr,
        },
        None => {
            let message = bounded(error.to_string(), MESSAGE_BYTES);
            // wasmtime raises these limits as untyped errors: its handle
            // cap, the limiter's instance/memory/table counts, copy fuel.
            let runtime_limits = [
                "cannot allocate another handle",
                "resource limit exceeded",
                "too much data is being copied",
            ];
            if runtime_limits.iter().any(|l| message.contains(l)) {
                CallFailure::ResourceLimit(message)
            } else {
                CallFailure::Trap {
                    trap: message,
                    stderr,
                }
            }
        }
    }
}

/// Runs `f` under the deadline; logs captured output; classifies failures.
fn guarded<R>(
    store: &mut Store<PluginState>,
    name: &str,
    limits: &PluginLimits,
    f: impl FnOnce(&mut Store<PluginState>) -> wasmtime::Result<R>,
) -> Result<R, CallFailure> {
    store.set_epoch_deadline(limits.deadline_ticks());
    store.data_mut().reset_log_budget();
    let result = f(store);
    let (stdout, discarded) = store.data().stdout.take();
    if !stdout.is_empty() {
        let stdout = escape_controls(stdout.trim_end(), true);
        tracing::debug!(target: "plugin", plugin = name, discarded, "stdout: {stdout}");
    }
    match result {
        Ok(value) => {
            let (stderr, _) = store.data().stderr.take();
            if !stderr.is_empty() {
                let stderr = escape_controls(stderr.trim_end(), true);
                tracing::debug!(target: "plugin", plugin = name, "stderr: {stderr}");
            }
            Ok(value)
        }
        Err(error) => Err(classify(store, limits, &error)),
    }
}

/// The export indices of a pre-linked component: what an instance binds.
pub(crate) struct Exports {
    pub plugin: plugin::GuestIndices,
    pub filter: Option<filter::GuestIndices>,
    pub mapper: Option<mapper::GuestIndices>,
    pub augmenter: Option<augmenter::GuestIndices>,
    pub metric: Option<metric::GuestIndices>,
    /// Interface 0.2.0's task reader, which is not a `kind`: `formats` says
    /// whether it is real.
    pub tasks: Option<tasks::GuestIndices>,
}

impl PluginInstance {
    /// Instantiates `pre` in a store of its own, without calling `configure`;
    /// `seed` seeds its randomness. Binds the exports of `kinds` (all it has
    /// when `kinds` is empty: the probe that asks who the plugin is).
    pub(crate) fn new(
        pre: &InstancePre<PluginState>,
        exports: &Exports,
        name: Arc<str>,
        limits: PluginLimits,
        kinds: &[Kind],
        seed: u64,
    ) -> Result<Self> {
        let mut store = Store::new(
            pre.engine(),
            PluginState::new(name.clone(), limits.memory_bytes, seed),
        );
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        // Instantiation runs guest start-up code: the deadline applies to it too.
        store.set_epoch_deadline(limits.deadline_ticks());
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| anyhow!("instantiation {}", classify(&mut store, &limits, &e)))?;
        let exported = |kind| kinds.is_empty() || kinds.contains(&kind);
        let bind_error = |e: wasmtime::Error| anyhow!("cannot bind exports: {e:#}");
        macro_rules! bind {
            ($indices:expr, $kind:expr) => {
                $indices
                    .as_ref()
                    .filter(|_| exported($kind))
                    .map(|indices| indices.load(&mut store, &instance))
                    .transpose()
                    .map_err(bind_error)?
            };
        }
        Ok(PluginInstance {
            plugin: exports
                .plugin
                .load(&mut store, &instance)
                .map_err(bind_error)?,
            filter: bind!(exports.filter, Kind::Filter),
            mapper: bind!(exports.mapper, Kind::Mapper),
            augmenter: bind!(exports.augmenter, Kind::Augmenter),
            metric: bind!(exports.metric, Kind::Metric),
            tasks: exports
                .tasks
                .as_ref()
                .map(|indices| indices.load(&mut store, &instance))
                .transpose()
                .map_err(bind_error)?,
            name,
            limits,
            store,
        })
    }

    pub(crate) fn describe(&mut self) -> Result<Info, CallFailure> {
        let plugin = &self.plugin;
        guarded(&mut self.store, &self.name, &self.limits, |s| {
            plugin.call_describe(s)
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The task formats a 0.2.0 plugin reads (none without the export).
    pub(crate) fn task_formats(&mut self) -> Result<Vec<String>, CallFailure> {
        let Some(tasks) = &self.tasks else {
            return Ok(Vec::new());
        };
        guarded(&mut self.store, &self.name, &self.limits, |s| {
            tasks.call_formats(s)
        })
    }

    /// One `read-items` call: each record's items, or why it cannot be read.
    #[allow(clippy::type_complexity)]
    pub(crate) fn read_task_items(
        &mut self,
        format: &str,
        records: &[Document],
    ) -> Result<Vec<Result<Vec<TaskItem>, String>>, CallFailure> {
        let tasks = self.tasks.as_ref().ok_or_else(|| {
            CallFailure::Contract(format!("plugin `{}` has no tasks export", self.name))
        })?;
        guarded(&mut self.store, &self.name, &self.limits, |s| {
            tasks.call_read_items(s, format, records)
        })
    }

    pub(crate) fn configure(&mut self, config: &str) -> Result<(), String> {
        let plugin = &self.plugin;
        match guarded(&mut self.store, &self.name, &self.limits, |s| {
            plugin.call_configure(s, config)
        }) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(format!("rejected its configuration {config}: {message}")),
            Err(failure) => Err(format!("configure {failure}")),
        }
    }
}

fn missing(plugin: &str, kind: StepKind) -> CallFailure {
    CallFailure::Contract(format!("plugin `{plugin}` has no {kind:?} export"))
}

impl StepInstance for PluginInstance {
    fn apply(
        &mut self,
        kind: StepKind,
        docs: &[DocRef<'_>],
        seed: u64,
    ) -> Result<StepOutput, CallFailure> {
        let docs: Vec<Document> = docs
            .iter()
            .map(|d| Document {
                source: d.source.into(),
                text: d.text.into(),
            })
            .collect();
        let (store, name, limits) = (&mut self.store, &*self.name, &self.limits);
        match kind {
            StepKind::Filter => {
                let filter = self.filter.as_ref().ok_or_else(|| missing(name, kind))?;
                let decisions =
                    guarded(store, name, limits, |s| filter.call_filter_batch(s, &docs))?;
                Ok(StepOutput::Verdicts(
                    decisions
                        .into_iter()
                        .map(|d| match d {
                            Decision::Keep => Verdict::Keep,
                            Decision::Drop(reason) => Verdict::Drop(reason).bounded(),
                            Decision::Error(message) => Verdict::Error(message).bounded(),
                        })
                        .collect(),
                ))
            }
            StepKind::Mapper => {
                let mapper = self.mapper.as_ref().ok_or_else(|| missing(name, kind))?;
                let edits = guarded(store, name, limits, |s| mapper.call_map_batch(s, &docs))?;
                Ok(StepOutput::Verdicts(
                    edits
                        .into_iter()
                        .map(|e| match e {
                            Edit::Unchanged => Verdict::Keep,
                            Edit::Replace(text) => Verdict::Replace(text),
                            Edit::Drop(reason) => Verdict::Drop(reason).bounded(),
                            Edit::Error(message) => Verdict::Error(message).bounded(),
                        })
                        .collect(),
                ))
            }
            StepKind::Augmenter => {
                let augmenter = self.augmenter.as_ref().ok_or_else(|| missing(name, kind))?;
                let derived = guarded(store, name, limits, |s| {
                    augmenter.call_augment_batch(s, &docs, seed)
                })?;
                Ok(StepOutput::Derived(
                    derived
                        .into_iter()
                        .map(|d| Derived {
                            parent: d.parent,
                            text: d.text,
                        })
                        .collect(),
                ))
            }
        }
    }
}

/// One evaluation's accumulator inside a metric plugin.
pub struct MetricSession {
    instance: PluginInstance,
    accumulator: ResourceAny,
}

impl MetricSession {
    /// A new accumulator in `instance`, a metric plugin's.
    pub(crate) fn new(mut instance: PluginInstance) -> Result<Self> {
        let metric = instance
            .metric
            .clone()
            .ok_or_else(|| anyhow!("plugin `{}` has no metric export", instance.name))?;
        let accumulator = guarded(&mut instance.store, &instance.name, &instance.limits, |s| {
            metric.accumulator().call_constructor(s)
        })
        .map_err(|e| anyhow!("plugin `{}`: creating the accumulator {e}", instance.name))?;
        Ok(Self {
            instance,
            accumulator,
        })
    }

    pub fn add_batch(&mut self, samples: &[Sample]) -> Result<()> {
        self.call("add-batch", |metric, store, accumulator| {
            metric
                .accumulator()
                .call_add_batch(store, accumulator, samples)
        })
    }

    /// The metric values, each name checked: at most [`METRIC_VALUES`]
    /// values, names of letters, digits and `_` (at most
    /// [`METRIC_NAME_BYTES`]). Names across plugins are the caller's to check.
    pub fn compute(&mut self) -> Result<Vec<MetricValue>> {
        let values = self.call("compute", |metric, store, accumulator| {
            metric.accumulator().call_compute(store, accumulator)
        })?;
        let plugin = &self.instance.name;
        if values.len() > METRIC_VALUES {
            bail!(
                "metric plugin `{plugin}` returned {} values; the limit is {METRIC_VALUES}",
                values.len()
            );
        }
        for value in &values {
            let name = &value.name;
            let valid = name.len() <= METRIC_NAME_BYTES
                && name.starts_with(|c: char| c.is_ascii_alphabetic())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!(
                    "metric plugin `{plugin}` returned a metric named `{}`: names are 1–{METRIC_NAME_BYTES} letters, digits and `_`, starting with a letter",
                    escape_controls(&bounded(name.clone(), 80), false)
                );
            }
        }
        Ok(values)
    }

    /// Calls the accumulator under the instance's limits.
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&metric::Guest, &mut Store<PluginState>, ResourceAny) -> wasmtime::Result<R>,
    ) -> Result<R> {
        let i = &mut self.instance;
        let metric = i
            .metric
            .as_ref()
            .expect("metric session has a metric export");
        let accumulator = self.accumulator;
        guarded(&mut i.store, &i.name, &i.limits, |store| {
            f(metric, store, accumulator)
        })
        .map_err(|e| anyhow!("metric plugin `{}` failed in {what}: {e}", i.name))
    }
}
