//! Write [pt-host](https://github.com/) plugins in Rust.
//!
//! A plugin is a type, an impl of [`Plugin`] and one [`register!`] line. The SDK
//! turns it into a WebAssembly component implementing the `pt:plugin@0.2.0`
//! interface (`wit/since_v0.2.0`: the frozen `0.1.0` kinds and task readers):
//! it parses the configuration, runs your per-document code over the batches
//! the host sends, and keeps plugin state between calls.
//!
//! ```
//! use pt_plugin_sdk::{Document, Edit, Decision, Kind, Plugin, register};
//! use serde::Deserialize;
//!
//! /// Drops short documents and trims trailing spaces from lines.
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! struct ShortFilter {
//!     min_chars: usize,
//! }
//!
//! impl Default for ShortFilter {
//!     fn default() -> Self {
//!         Self { min_chars: 20 }
//!     }
//! }
//!
//! impl Plugin for ShortFilter {
//!     const ID: &'static str = "short_filter";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "Drops documents shorter than min_chars";
//!     const KINDS: &'static [Kind] = &[Kind::Mapper, Kind::Filter];
//!
//!     fn configure(config: &str) -> Result<Self, String> {
//!         pt_plugin_sdk::parse_config(config)
//!     }
//!
//!     fn map(&self, doc: &Document) -> Edit {
//!         let trimmed: String = doc.text.lines().map(|l| l.trim_end()).collect::<Vec<_>>().join("\n");
//!         let trimmed = pt_plugin_sdk::text::with_trailing_newline_of(&doc.text, trimmed);
//!         Edit::replace_if_changed(&doc.text, trimmed)
//!     }
//!
//!     fn filter(&self, doc: &Document) -> Decision {
//!         if doc.text.trim().chars().count() < self.min_chars {
//!             return Decision::Drop("too_short".into());
//!         }
//!         Decision::Keep
//!     }
//! }
//!
//! register!(ShortFilter);
//! # fn main() {
//! #     let plugin = ShortFilter::configure(r#"{"min_chars": 5}"#).unwrap();
//! #     let doc = Document { source: "a.txt:1".into(), text: "tiny\n".into() };
//! #     assert!(matches!(plugin.filter(&doc), Decision::Drop(_)));
//! #     assert!(ShortFilter::configure(r#"{"min_char": 5}"#).err().unwrap().contains("min_char"));
//! # }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and pass the
//! `.wasm` file to `pt-host prepare --plugin`. On other targets `register!`
//! expands to nothing, so the same crate also builds natively for unit tests
//! and benchmarks.

extern crate self as pt_plugin_sdk;

pub mod rng;
pub mod text;

#[cfg(target_arch = "wasm32")]
mod adapter;

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub use adapter::Adapter;

pub use rng::Rng;

/// The generated `pt:plugin@0.2.0` bindings; the SDK's own types mirror them.
#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/since_v0.2.0",
        world: "any-plugin",
        // 0.1.0's interfaces come from the frozen folder (deps/).
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export_any_plugin",
        default_bindings_module: "pt_plugin_sdk::bindings",
        runtime_path: "pt_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub use wit_bindgen as __wit_bindgen;

/// What a plugin can be; see the WIT `kind` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Filter,
    Mapper,
    Augmenter,
    Metric,
}

/// One document of the corpus.
#[derive(Clone, Debug)]
pub struct Document {
    /// `path:line` it came from.
    pub source: String,
    pub text: String,
}

/// A filter's verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Keep,
    /// Drop, with a short machine-readable reason (`too_short`).
    Drop(String),
    /// This document could not be judged; the host's error policy applies.
    Error(String),
}

/// A mapper's result.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    Unchanged,
    Replace(String),
    Drop(String),
    Error(String),
}

impl Edit {
    /// `Replace(new)` when the text changed, `Unchanged` otherwise, so that
    /// unchanged text is not copied back across the sandbox boundary.
    pub fn replace_if_changed(old: &str, new: String) -> Edit {
        if new == old {
            Edit::Unchanged
        } else {
            Edit::Replace(new)
        }
    }
}

/// What a metric sees of one evaluation block; see the WIT `sample` record.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub reference: String,
    pub predicted: String,
    pub token_logprobs: Vec<f32>,
    pub continuation: Option<String>,
}

/// One reported number.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricValue {
    pub name: String,
    pub value: f64,
    pub higher_is_better: bool,
}

/// One multiple-choice question a task plugin reads from a record; see the
/// WIT `task-item`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskItem {
    /// Accuracy is reported per subject; empty: the task's name.
    pub subject: String,
    /// The whole prompt (few-shot examples included) up to the answer.
    pub context: String,
    /// The choices as the model would continue the context (at least two).
    pub continuations: Vec<String>,
    /// The index of the right continuation.
    pub gold: u32,
}

/// Accumulates evaluation samples for a metric plugin.
pub trait Accumulator {
    fn add(&mut self, sample: &Sample);
    fn compute(&self) -> Vec<MetricValue>;
}

/// Log levels of the host's `log` import.
#[derive(Clone, Copy, Debug)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Sends a line to the host's log, tagged with this plugin's id. Prefer this to
/// `println!`: the host keeps only a bounded amount of captured stdout.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use bindings::pt::plugin0_1_0::host::{Level as L, log};
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// A pt-host plugin. Implement the methods of the kinds listed in [`Plugin::KINDS`];
/// the others are never called.
pub trait Plugin: Sized + 'static {
    /// Machine name, used in reports and `--plugin_config ID=...`.
    const ID: &'static str;
    const VERSION: &'static str;
    const DESCRIPTION: &'static str;
    const KINDS: &'static [Kind];
    /// JSON Schema of the configuration object.
    const CONFIG_SCHEMA: &'static str = "{}";

    /// Builds the plugin from the user's JSON configuration (`{}` when none was
    /// given). Reject unknown keys and bad values with a message naming them;
    /// [`parse_config`] does this for a serde type.
    fn configure(config: &str) -> Result<Self, String>;

    fn filter(&self, _doc: &Document) -> Decision {
        Decision::Keep
    }

    fn map(&self, _doc: &Document) -> Edit {
        Edit::Unchanged
    }

    /// New texts derived from `doc`; all randomness must come from `rng`.
    fn augment(&self, _doc: &Document, _rng: &mut Rng) -> Vec<String> {
        Vec::new()
    }

    /// A fresh accumulator for one evaluation.
    fn new_accumulator(&self) -> Box<dyn Accumulator> {
        unreachable!("{} is not a metric plugin", Self::ID)
    }

    /// The task formats this plugin reads (`--eval_tasks FORMAT=FILE`);
    /// a task plugin lists them and implements [`Plugin::read_task_items`].
    const TASK_FORMATS: &'static [&'static str] = &[];

    /// The questions in one record (a line) of a task file in `format`: none
    /// for a line without one (a header), or why the record cannot be read.
    fn read_task_items(&self, format: &str, _record: &Document) -> Result<Vec<TaskItem>, String> {
        Err(format!("{} reads no task format {format}", Self::ID))
    }
}

/// Parses a JSON configuration into `T`, with a message that names the
/// offending key and position. Use `#[serde(deny_unknown_fields)]` on `T` so
/// that typos are caught, and `#[serde(default)]` so that `{}` works.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &str) -> Result<T, String> {
    let config = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as the component's
/// implementation of `pt:plugin@0.2.0`. Use it once per plugin crate.
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __PtPluginExports = $crate::Adapter<$plugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export_any_plugin!(__PtPluginExports with_types_in $crate::bindings);
    };
}
