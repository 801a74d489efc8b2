//! Running: one store per instance, every call under the instance's memory cap
//! and a wall-clock deadline; traps become [`CallFailure`]s that say what
//! happened (deadline, memory, stack, panic message from stderr).

use std::sync::Arc;

use anyhow::{Result, anyhow};
use pt_data::{
    CallFailure, Derived, DocRef, StepInstance, StepKind, StepOutput, StepPlugin, Verdict,
};
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use crate::bindings::exports::pt::plugin::{augmenter, filter, mapper, metric, plugin};
use crate::bindings::pt::plugin::types::{
    Decision, Document, Edit, Info, Kind, MetricValue, Sample,
};
use crate::link::PluginState;
use crate::load::{LoadedPlugin, PluginLimits, TICK};

/// Longest drop reason kept: reasons are report keys, not messages.
const REASON_BYTES: usize = 120;

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
}

fn deadline_ticks(limits: &PluginLimits) -> u64 {
    limits.call_timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1
}

/// Says why a call failed, in the user's terms.
fn describe_failure(
    store: &mut Store<PluginState>,
    limits: &PluginLimits,
    error: &wasmtime::Error,
) -> String {
    let debug = format!("{error:?}");
    let mut cause = match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!(
            "did not finish within the {} ms deadline (an endless loop, or too much work per call: \
             raise --plugin_timeout_ms or lower --plugin_batch_size)",
            limits.call_timeout.as_millis()
        ),
        Some(wasmtime::Trap::StackOverflow) => "stack overflow (recursion too deep)".to_string(),
        // Languages like Rust and C keep their stack in linear memory: deep
        // recursion runs off its start and shows up as a bad access.
        Some(wasmtime::Trap::MemoryOutOfBounds) => {
            "out-of-bounds memory access (a bug in the plugin, or its stack overflowed from deep recursion)".to_string()
        }
        _ if debug.contains("forcing trap when growing memory") => format!(
            "exceeded its memory limit of {} MiB (raise --plugin_memory_mb if the plugin legitimately needs more)",
            limits.memory_bytes >> 20
        ),
        Some(trap) => format!("trapped: {trap}"),
        None => format!("failed: {error:#}"),
    };
    let (stderr, _) = store.data().stderr.take();
    // A Rust guest's hint about RUST_BACKTRACE cannot be acted on inside the sandbox.
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let stderr = stderr.join("\n");
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let tail: String = stderr
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        cause.push_str(&format!("; plugin stderr: {tail}"));
    }
    cause
}

/// Runs `f` under the deadline; logs captured output; describes failures.
fn guarded<R>(
    store: &mut Store<PluginState>,
    name: &str,
    limits: &PluginLimits,
    f: impl FnOnce(&mut Store<PluginState>) -> wasmtime::Result<R>,
) -> Result<R, CallFailure> {
    store.set_epoch_deadline(deadline_ticks(limits));
    store.data_mut().reset_log_budget();
    let result = f(store);
    let (stdout, discarded) = store.data().stdout.take();
    if !stdout.is_empty() {
        tracing::debug!(target: "plugin", plugin = name, discarded, "stdout: {}", stdout.trim_end());
    }
    match result {
        Ok(value) => {
            let (stderr, _) = store.data().stderr.take();
            if !stderr.is_empty() {
                tracing::debug!(target: "plugin", plugin = name, "stderr: {}", stderr.trim_end());
            }
            Ok(value)
        }
        Err(error) => Err(CallFailure(describe_failure(store, limits, &error))),
    }
}

fn short(mut reason: String) -> String {
    if reason.len() > REASON_BYTES {
        let mut cut = REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

impl LoadedPlugin {
    /// Instantiates without calling `configure`.
    pub(crate) fn instance_unconfigured(&self) -> Result<PluginInstance> {
        let mut store = Store::new(
            self.pre.engine(),
            PluginState::new(self.name.clone(), self.limits.memory_bytes),
        );
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        // Instantiation runs guest start-up code: the deadline applies to it too.
        store.set_epoch_deadline(deadline_ticks(&self.limits));
        let instance = self.pre.instantiate(&mut store).map_err(|e| {
            anyhow!(
                "instantiation {}",
                describe_failure(&mut store, &self.limits, &e)
            )
        })?;
        // The probe instance binds every export it has: kinds are not known yet.
        let exported = |kind| self.info.kinds.is_empty() || self.has_kind(kind);
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
        let e = &self.exports;
        Ok(PluginInstance {
            name: self.name.clone(),
            limits: self.limits,
            plugin: e.plugin.load(&mut store, &instance).map_err(bind_error)?,
            filter: bind!(e.filter, Kind::Filter),
            mapper: bind!(e.mapper, Kind::Mapper),
            augmenter: bind!(e.augmenter, Kind::Augmenter),
            metric: bind!(e.metric, Kind::Metric),
            store,
        })
    }

    /// A fresh instance holding a new metric accumulator.
    pub fn metric_session(&self) -> Result<MetricSession> {
        if !self.has_kind(Kind::Metric) {
            return Err(anyhow!(
                "plugin `{}` is not a metric plugin (its kinds: {:?})",
                self.name,
                self.info.kinds
            ));
        }
        let mut instance = self.instance()?;
        let metric = instance
            .metric
            .clone()
            .expect("metric kind checked at load");
        let accumulator = guarded(&mut instance.store, &self.name, &self.limits, |s| {
            metric.accumulator().call_constructor(s)
        })
        .map_err(|e| anyhow!("plugin `{}`: creating the accumulator {}", self.name, e.0))?;
        Ok(MetricSession {
            instance,
            accumulator,
        })
    }
}

impl PluginInstance {
    pub(crate) fn describe(&mut self) -> Result<Info, CallFailure> {
        let plugin = &self.plugin;
        guarded(&mut self.store, &self.name, &self.limits, |s| {
            plugin.call_describe(s)
        })
    }

    pub(crate) fn configure(&mut self, config: &str) -> Result<(), String> {
        let plugin = &self.plugin;
        match guarded(&mut self.store, &self.name, &self.limits, |s| {
            plugin.call_configure(s, config)
        }) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(format!("rejected its configuration {config}: {message}")),
            Err(CallFailure(cause)) => Err(format!("configure {cause}")),
        }
    }
}

fn missing(plugin: &str, kind: StepKind) -> CallFailure {
    CallFailure(format!("plugin `{plugin}` has no {kind:?} export"))
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
                            Decision::Drop(reason) => Verdict::Drop(short(reason)),
                            Decision::Error(message) => Verdict::Error(message),
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
                            Edit::Drop(reason) => Verdict::Drop(short(reason)),
                            Edit::Error(message) => Verdict::Error(message),
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

impl StepPlugin for LoadedPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn steps(&self) -> Vec<StepKind> {
        [
            (Kind::Mapper, StepKind::Mapper),
            (Kind::Filter, StepKind::Filter),
            (Kind::Augmenter, StepKind::Augmenter),
        ]
        .into_iter()
        .filter(|(kind, _)| self.has_kind(*kind))
        .map(|(_, step)| step)
        .collect()
    }

    fn instantiate(&self) -> Result<Box<dyn StepInstance>> {
        Ok(Box::new(self.instance()?))
    }
}

/// One evaluation's accumulator inside a metric plugin.
pub struct MetricSession {
    instance: PluginInstance,
    accumulator: ResourceAny,
}

impl MetricSession {
    pub fn add_batch(&mut self, samples: &[Sample]) -> Result<()> {
        self.call("add-batch", |metric, store, accumulator| {
            metric
                .accumulator()
                .call_add_batch(store, accumulator, samples)
        })
    }

    pub fn compute(&mut self) -> Result<Vec<MetricValue>> {
        self.call("compute", |metric, store, accumulator| {
            metric.accumulator().call_compute(store, accumulator)
        })
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
        .map_err(|e| anyhow!("metric plugin `{}` failed in {what}: {}", i.name, e.0))
    }
}
