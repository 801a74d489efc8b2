//! What a plugin can reach: the whole capability surface is decided here.
//!
//! WASI is linked because components built by ordinary toolchains import it,
//! but with an empty context: no preopened directories, no environment
//! variables, no arguments, no sockets or name lookups, an empty stdin, and
//! stdout/stderr captured into bounded buffers. The one host function is
//! `log`, bounded per call.
//!
//! Time and entropy are virtual, so that a plugin's output depends only on
//! its input, its configuration and the seed — what the dataset cache key
//! records. Clocks start at zero with each instance and advance a microsecond
//! per reading; waiting on a clock (a sleep) returns at once, moving virtual
//! time forward, so a plugin can never block the host in a call the deadline
//! cannot interrupt; randomness is a generator seeded per instance (the data
//! pipeline seeds it from the run seed, the plugin and the batch index).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, StoreContextMut};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::{DynPollable, Pollable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::{self, pt::plugin0_1_0::host::Level};
use crate::limits::InstanceLimiter;
use crate::output::CapturedOutput;
use pt_data::text::{bounded, escape_controls};

/// Bytes of stdout and of stderr kept per call.
const CAPTURED_BYTES: usize = 64 * 1024;
/// Log lines a plugin may send per call, and bytes per line.
const LOG_LINES_PER_CALL: u32 = 100;
const LOG_LINE_BYTES: usize = 2048;

/// Nanoseconds a clock reading advances virtual time.
const TICK_NANOS: u64 = 1_000;
/// The seed of instances made outside the data pipeline (probes, metrics).
pub(crate) const DEFAULT_SEED: u64 = 0x0070_742d_686f_7374; // "pt-host" in ASCII

/// Virtual time, in nanoseconds, shared by an instance's clocks.
#[derive(Clone, Default)]
struct VirtualTime(Arc<AtomicU64>);

impl VirtualTime {
    fn read(&self) -> u64 {
        self.0.fetch_add(TICK_NANOS, Ordering::Relaxed) + TICK_NANOS
    }

    fn advance(&self, nanos: u64) {
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl HostMonotonicClock for VirtualTime {
    fn resolution(&self) -> u64 {
        TICK_NANOS
    }

    fn now(&self) -> u64 {
        self.read()
    }
}

/// The wall clock: virtual time since 1970-01-01.
impl HostWallClock for VirtualTime {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(TICK_NANOS)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.read())
    }
}

/// A pollable that is ready at once: what a sleep returns here.
struct Elapsed;

impl Pollable for Elapsed {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(std::future::ready(()))
    }
}

/// The state of one plugin instance's store.
pub struct PluginState {
    plugin: Arc<str>,
    time: VirtualTime,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: InstanceLimiter,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
    log_lines_left: u32,
}

impl PluginState {
    pub(crate) fn new(plugin: Arc<str>, memory_bytes: usize, seed: u64) -> Self {
        let stdout = CapturedOutput::new(CAPTURED_BYTES);
        let stderr = CapturedOutput::new(CAPTURED_BYTES);
        let time = VirtualTime::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(time.clone())
            .monotonic_clock(time.clone())
            .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
            .insecure_random(rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1)))
            .insecure_random_seed(u128::from(seed))
            .build();
        Self {
            plugin,
            time,
            wasi,
            table: ResourceTable::new(),
            limits: InstanceLimiter::new(memory_bytes),
            stdout,
            stderr,
            log_lines_left: LOG_LINES_PER_CALL,
        }
    }

    /// Called before each call into the plugin.
    pub(crate) fn reset_log_budget(&mut self) {
        self.log_lines_left = LOG_LINES_PER_CALL;
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::pt::plugin0_1_0::types::Host for PluginState {}

impl bindings::pt::plugin0_1_0::host::Host for PluginState {
    fn log(&mut self, level: Level, message: String) {
        if self.log_lines_left == 0 {
            return;
        }
        self.log_lines_left -= 1;
        let message = bounded(message, LOG_LINE_BYTES);
        let message = escape_controls(&message, false);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, "{message}"),
        }
        if self.log_lines_left == 0 {
            tracing::warn!(target: "plugin", plugin, "log limit of {LOG_LINES_PER_CALL} lines per call reached; further lines dropped");
        }
    }
}

/// A sleep: virtual time moves on by `nanos`, and the pollable is ready now.
fn elapse(
    mut store: StoreContextMut<'_, PluginState>,
    nanos: u64,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    store.data().time.advance(nanos);
    let table = &mut store.data_mut().table;
    let elapsed = table.push(Elapsed)?;
    Ok((wasmtime_wasi::p2::subscribe(table, elapsed)?,))
}

/// The linker every plugin is instantiated with.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    // WASI's own sleeps wait in real time inside a host call, where the
    // deadline cannot interrupt them; these replace them.
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap("subscribe-duration", |store, (nanos,): (u64,)| {
        elapse(store, nanos)
    })?;
    clock.func_wrap("subscribe-instant", |store, (when,): (u64,)| {
        let now = store.data().time.0.load(Ordering::Relaxed);
        elapse(store, when.saturating_sub(now))
    })?;
    linker.allow_shadowing(false);
    bindings::AnyPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    Ok(linker)
}
