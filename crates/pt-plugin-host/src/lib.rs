//! The sandboxed WebAssembly plugin runtime of pt-host.
//!
//! Plugins are components implementing `pt:plugin@0.1.0` (`wit/since_v0.1.0`).
//! The code is split as the work is: [`load`] compiles (or fetches from the
//! cache) and validates a component, [`link`] decides what a plugin may touch
//! (nothing but a bounded log and captured output), [`limits`] bounds each
//! instance (one memory cap, a deadline per call), [`run`] executes calls and
//! turns traps into typed failures.

mod bindings;
pub mod limits;
pub mod link;
pub mod load;
pub mod native;
mod output;
pub mod run;

pub use bindings::pt::plugin::types::{Kind, MetricValue, Sample};
pub use limits::PluginLimits;
pub use load::{ComponentCache, LoadedPlugin, PluginRuntime};
pub use native::NativePlugin;
pub use run::{MetricSession, PluginInstance};

/// The interface version this host implements.
pub const INTERFACE_VERSION: &str = "0.1.0";
