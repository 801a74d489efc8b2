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

/// Output text a step may return: this many times its input...
const OUTPUT_RATIO: usize = 100;
/// ...or this many bytes, whichever is larger.
const OUTPUT_ALLOWANCE: usize = 1 << 20;

/// Checks that a plugin returned what its contract promises, so the pipeline
/// can index results by document, and no more text than a cleaner or
/// augmenter plausibly makes (a runaway plugin would otherwise fill memory
/// and the dataset).
pub fn check_output(
    kind: StepKind,
    docs: &[DocRef<'_>],
    output: &StepOutput,
) -> Result<(), CallFailure> {
    let input: usize = docs.iter().map(|d| d.text.len()).sum();
    let produced: usize = match output {
        StepOutput::Verdicts(verdicts) => verdicts
            .iter()
            .map(|v| match v {
                Verdict::Replace(text) => text.len(),
                _ => 0,
            })
            .sum(),
        StepOutput::Derived(derived) => derived.iter().map(|d| d.text.len()).sum(),
    };
    let allowed = (input * OUTPUT_RATIO).max(OUTPUT_ALLOWANCE);
    if produced > allowed {
        return Err(CallFailure(format!(
            "returned {produced} bytes of text for {input} bytes of input (the limit is {OUTPUT_RATIO}× the input or {} MiB)",
            OUTPUT_ALLOWANCE >> 20
        )));
    }
    let docs = docs.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded_by_the_input_or_a_mebibyte() {
        let text = "x".repeat(20_000);
        let docs = [DocRef {
            source: "a.txt:1",
            text: &text,
        }];
        let replace =
            |bytes: usize| StepOutput::Verdicts(vec![Verdict::Replace("y".repeat(bytes))]);
        // 100× of 20 kB is 2 MB: at the limit passes, one byte over fails.
        assert!(check_output(StepKind::Mapper, &docs, &replace(2_000_000)).is_ok());
        let over = check_output(StepKind::Mapper, &docs, &replace(2_000_001)).unwrap_err();
        assert!(
            over.0
                .starts_with("returned 2000001 bytes of text for 20000 bytes of input")
        );
        // Small inputs may still produce up to 1 MiB (an augmenter's variants).
        let short = [DocRef {
            source: "a.txt:1",
            text: "hi",
        }];
        let derived = |bytes: usize| {
            StepOutput::Derived(vec![Derived {
                parent: 0,
                text: "z".repeat(bytes),
            }])
        };
        assert!(check_output(StepKind::Augmenter, &short, &derived(1 << 20)).is_ok());
        assert!(check_output(StepKind::Augmenter, &short, &derived((1 << 20) + 1)).is_err());
    }
}
