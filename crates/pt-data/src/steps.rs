//! What the pipeline needs from a plugin, independent of how it runs (a
//! WebAssembly component, or native code in tests).

use serde::{Deserialize, Serialize};

/// The document-processing kinds, in the order a plugin's steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Mapper,
    Filter,
    /// Runs on training data only: augmenting validation data would bias evaluation.
    Augmenter,
}

/// A document passed to a plugin.
#[derive(Clone, Copy, Debug)]
pub struct DocRef<'a> {
    /// `path:line`.
    pub source: &'a str,
    pub text: &'a str,
}

/// A plugin's answer for one document (mappers and filters).
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Keep,
    Replace(String),
    Drop(String),
    /// The plugin could not process this document; `--on_plugin_error` decides.
    Error(String),
}

/// A new document from an augmenter.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    /// Index of the parent in the batch.
    pub parent: u32,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    Verdicts(Vec<Verdict>),
    Derived(Vec<Derived>),
}

/// A call that failed as a whole: a trap (panic, deadline, memory limit) or a
/// broken contract. The instance is discarded and a fresh one made.
#[derive(Clone, Debug, PartialEq)]
pub struct CallFailure(pub String);

/// A loaded plugin: its name, the steps it runs, and fresh instances on demand.
pub trait StepPlugin: Send + Sync {
    fn name(&self) -> &str;
    /// The kinds this plugin runs, in order (mapper before filter before augmenter).
    fn steps(&self) -> Vec<StepKind>;
    /// A configured instance, made on the worker thread that will use it.
    fn instantiate(&self) -> anyhow::Result<Box<dyn StepInstance>>;
}

/// One instance of a plugin, owned by one worker thread.
pub trait StepInstance {
    /// Runs one step over a batch. `seed` matters to augmenters only.
    fn apply(
        &mut self,
        kind: StepKind,
        docs: &[DocRef<'_>],
        seed: u64,
    ) -> Result<StepOutput, CallFailure>;
}

/// Checks that a plugin returned what its contract promises, so the pipeline
/// can index results by document.
pub fn check_output(kind: StepKind, docs: usize, output: &StepOutput) -> Result<(), CallFailure> {
    match (kind, output) {
        (StepKind::Mapper | StepKind::Filter, StepOutput::Verdicts(v)) if v.len() != docs => Err(
            CallFailure(format!("returned {} results for {docs} documents", v.len())),
        ),
        (StepKind::Filter, StepOutput::Verdicts(v))
            if v.iter().any(|v| matches!(v, Verdict::Replace(_))) =>
        {
            Err(CallFailure("a filter returned replacement text".into()))
        }
        (StepKind::Augmenter, StepOutput::Derived(d)) => {
            match d.iter().find(|d| d.parent as usize >= docs) {
                Some(bad) => Err(CallFailure(format!(
                    "derived document names parent {} of a batch of {docs}",
                    bad.parent
                ))),
                None => Ok(()),
            }
        }
        (StepKind::Mapper | StepKind::Filter, StepOutput::Verdicts(_)) => Ok(()),
        _ => Err(CallFailure(format!(
            "returned the wrong kind of result for a {kind:?} step"
        ))),
    }
}
