//! The data side of pt-host: corpus readers, the plugin pipeline, tokenization,
//! packing into blocks, and the prepared-dataset cache. Plugins come in as
//! [`StepPlugin`] trait objects, so this crate does not depend on the
//! WebAssembly runtime (and the training core that reads blocks does not
//! rebuild when the runtime changes).

#![forbid(unsafe_code)]

mod byte_bpe;
pub mod cache;
pub mod corpus;
pub mod dedup;
pub mod domain_tokens;
pub mod mix;
pub mod packing;
pub mod pipeline;
pub mod prepare;
pub mod report;
mod sort;
pub mod steps;
pub mod store;
pub mod text;
pub mod tokenize;

pub use cache::{CacheError, Prepared};
pub use corpus::{BadRecordError, ReadOptions, RecordProblem};
pub use packing::Blocks;
pub use pipeline::{ErrorPolicy, PipelineOptions};
pub use prepare::{
    PrepareError, PrepareOptions, PreparePlugin, Progress, Sharding, ValidationSplit, prepare,
};
pub use report::{DataReport, PluginReport};
pub use steps::{
    CallFailure, Derived, DocRef, PluginError, PluginErrorCause, StepInstance, StepKind,
    StepOutput, StepPlugin, Verdict,
};
pub use tokenize::{MissingTokenizer, Tokenizer};
