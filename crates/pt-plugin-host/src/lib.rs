//! The sandboxed WebAssembly plugin runtime of pt-host.
//!
//! Plugins are components implementing `pt:plugin@0.1.0` (`wit/since_v0.1.0`),
//! and from 0.2.0 (`wit/since_v0.2.0`) optionally its task reader ([`tasks`]).
//! Native (unsandboxed) plugins are another crate, `pt-native-plugin`: this
//! one holds only the sandbox. The code is split as the work is: [`load`]
//! compiles (or fetches from the cache) and validates a component and owns
//! [`LoadedPlugin`], [`link`] decides what a plugin may touch
//! (nothing but a bounded log and captured output), [`limits`] bounds each
//! instance (one memory cap, a deadline per call), [`run`] owns instances: it
//! executes calls and turns traps into typed failures. Dependencies run one
//! way: `load` → `run` → `limits`, `link`.

mod bindings;
pub mod limits;
pub mod link;
pub mod load;
mod output;
pub mod run;
pub mod tasks;

pub use bindings::pt::plugin0_1_0::types::{Kind, MetricValue, Sample};
pub use limits::PluginLimits;
pub use load::{ComponentCache, LoadedPlugin, PluginRuntime};
pub use run::{MetricSession, PluginInstance};
pub use tasks::{TaskItem, TaskReader};

/// The version of the `plugin` interface (and of every kind but tasks) this
/// host implements.
pub const INTERFACE_VERSION: &str = "0.1.0";
/// The version that adds task plugins; a plugin built against it exports
/// 0.1.0's interfaces and `pt:plugin/tasks@0.2.0`.
pub const TASKS_INTERFACE_VERSION: &str = "0.2.0";
