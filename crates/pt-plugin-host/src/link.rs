//! What a plugin can reach: the whole capability surface is decided here.
//!
//! WASI is linked because components built by ordinary toolchains import it,
//! but with an empty context: no preopened directories, no environment
//! variables, no arguments, no sockets or name lookups, an empty stdin, and
//! stdout/stderr captured into bounded buffers. The one host function is
//! `log`, bounded per call.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::{self, pt::plugin::host::Level};
use crate::output::CapturedOutput;

/// Bytes of stdout and of stderr kept per call.
const CAPTURED_BYTES: usize = 64 * 1024;
/// Log lines a plugin may send per call, and bytes per line.
const LOG_LINES_PER_CALL: u32 = 100;
const LOG_LINE_BYTES: usize = 2048;

/// The state of one plugin instance's store.
pub struct PluginState {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
    log_lines_left: u32,
}

impl PluginState {
    pub(crate) fn new(plugin: Arc<str>, memory_bytes: usize) -> Self {
        let stdout = CapturedOutput::new(CAPTURED_BYTES);
        let stderr = CapturedOutput::new(CAPTURED_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        // Python components create many core instances, memories and tables.
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
            .instances(64)
            .memories(16)
            .tables(64)
            .trap_on_grow_failure(true)
            .build();
        Self {
            plugin,
            wasi,
            table: ResourceTable::new(),
            limits,
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

impl bindings::pt::plugin::types::Host for PluginState {}

impl bindings::pt::plugin::host::Host for PluginState {
    fn log(&mut self, level: Level, mut message: String) {
        if self.log_lines_left == 0 {
            return;
        }
        self.log_lines_left -= 1;
        if message.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
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

/// The linker every plugin is instantiated with.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    bindings::AnyPlugin::add_to_linker::<PluginState, HasSelf<PluginState>>(
        &mut linker,
        |state| state,
    )?;
    Ok(linker)
}
