//! What the pipeline needs from a plugin, independent of how it runs (a
//! WebAssembly component, or native code in tests).

use serde::{Deserialize, Serialize};

use crate::text::bounded;

/// The document-processing kinds, in the order a plugin's steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Mapper,
    Filter,
    /// Runs on training data only: augmenting validation data would bias evaluation.
    Augmenter,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Mapper => "mapper",
            StepKind::Filter => "filter",
            StepKind::Augmenter => "augmenter",
        }
    }
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

/// Longest drop reason kept: reasons are report keys, not messages.
pub const REASON_BYTES: usize = 120;
/// Longest error message a plugin reports for a document.
pub const MESSAGE_BYTES: usize = 1024;

impl Verdict {
    /// The verdict with its plugin-given text cut: a drop reason to
    /// [`REASON_BYTES`], an error message to [`MESSAGE_BYTES`]. Plugin answers
    /// pass through this where they enter the host, so no longer text is
    /// ever stored, counted or printed.
    pub fn bounded(self) -> Self {
        match self {
            Verdict::Drop(reason) => Verdict::Drop(bounded(reason, REASON_BYTES)),
            Verdict::Error(message) => Verdict::Error(bounded(message, MESSAGE_BYTES)),
            other => other,
        }
    }
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

/// Why a call into a plugin failed as a whole. The instance is discarded
/// and a fresh one made. Each variant says what happened in the plugin's
/// terms; what the user can do about it (which flag to raise) is the
/// binary's to add.
#[derive(Clone, Debug, PartialEq)]
pub enum CallFailure {
    /// The call ran past its wall-clock deadline.
    Deadline { millis: u64 },
    /// The instance asked for more linear memory than its cap.
    MemoryCap { mebibytes: u64 },
    /// The wasm stack overflowed.
    StackOverflow,
    /// Any other trap (a panic, `unreachable`, a bad access), with the tail of
    /// what the plugin wrote to stderr.
    Trap { trap: String, stderr: String },
    /// The plugin called `exit` instead of returning.
    Exit { code: i32, stderr: String },
    /// The plugin exhausted a runtime table (resource handles, instances,
    /// tables) that the sandbox bounds.
    ResourceLimit(String),
    /// An augmenter returned more derived documents than the per-call bound.
    TooManyDerived {
        returned: usize,
        documents: usize,
        per_document: usize,
    },
    /// An augmenter's derived documents passed the split's bound.
    DerivedPastLimit { limit: u64 },
    /// The plugin returned something its contract forbids.
    Contract(String),
}

impl CallFailure {
    /// Deadlines and the memory cap cost a full deadline (or a full heap) to
    /// hit: they are not worth finding document by document under `fail`.
    pub fn is_exhaustion(&self) -> bool {
        matches!(
            self,
            CallFailure::Deadline { .. } | CallFailure::MemoryCap { .. }
        )
    }
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with_stderr = |f: &mut std::fmt::Formatter<'_>, stderr: &str| {
            if stderr.is_empty() {
                Ok(())
            } else {
                write!(f, "; plugin stderr: {stderr}")
            }
        };
        match self {
            CallFailure::Deadline { millis } => write!(
                f,
                "did not finish within the {millis} ms deadline (an endless loop, or too much work per call)"
            ),
            CallFailure::MemoryCap { mebibytes } => {
                write!(f, "exceeded its memory limit of {mebibytes} MiB")
            }
            CallFailure::StackOverflow => write!(f, "stack overflow (recursion too deep)"),
            CallFailure::Trap { trap, stderr } => {
                write!(f, "trapped: {trap}")?;
                with_stderr(f, stderr)
            }
            CallFailure::Exit { code, stderr } => {
                write!(f, "called exit({code}) instead of returning")?;
                with_stderr(f, stderr)
            }
            CallFailure::ResourceLimit(what) => write!(f, "ran out of {what}"),
            CallFailure::TooManyDerived {
                returned,
                documents,
                per_document,
            } => write!(
                f,
                "returned {returned} derived documents for {documents} documents (the limit is {per_document} per document)"
            ),
            CallFailure::DerivedPastLimit { limit } => {
                write!(
                    f,
                    "derived more than the split's limit of {limit} documents"
                )
            }
            CallFailure::Contract(what) => write!(f, "{what}"),
        }
    }
}

/// A plugin failed on a document (or, for a deadline under `fail`, on a
/// batch starting at that document) and the error policy ends the run. A
/// typed error, so that the binary can add the flags that help.
#[derive(Clone, Debug)]
pub struct PluginError {
    pub plugin: String,
    pub kind: StepKind,
    /// `path:line` of the document, or of the first one of the batch.
    pub document: String,
    /// Documents in the failed call: 1 once bisection found the document.
    pub documents_in_call: usize,
    pub cause: PluginErrorCause,
}

#[derive(Clone, Debug)]
pub enum PluginErrorCause {
    /// The call failed as a whole.
    Call(CallFailure),
    /// The plugin answered `error(message)` for the document.
    Reported(String),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (plugin, kind) = (&self.plugin, self.kind.name());
        if self.documents_in_call > 1 {
            write!(
                f,
                "plugin `{plugin}` ({kind}) failed on the batch of {} documents starting at {}: ",
                self.documents_in_call, self.document
            )?;
        } else {
            write!(
                f,
                "plugin `{plugin}` ({kind}) failed on document {}: ",
                self.document
            )?;
        }
        match &self.cause {
            PluginErrorCause::Call(failure) => write!(f, "{failure}"),
            PluginErrorCause::Reported(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// A loaded plugin: its name, the steps it runs, and fresh instances on demand.
pub trait StepPlugin: Send + Sync {
    fn name(&self) -> &str;
    /// The kinds this plugin runs, in order (mapper before filter before augmenter).
    fn steps(&self) -> Vec<StepKind>;
    /// A fresh, configured instance, made on the worker thread that will use
    /// it. `seed` seeds whatever the instance may observe besides its input
    /// (its random streams): the pipeline derives it from the run seed, the
    /// plugin and the batch index, so a batch's result never depends on
    /// which worker ran it or what that worker ran before.
    fn instantiate(&self, seed: u64) -> anyhow::Result<Box<dyn StepInstance>>;
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
/// can index results by document, and no more text, nor more derived
/// documents (`max_derived_per_document` per input document), than a cleaner
/// or augmenter plausibly makes: a runaway plugin would otherwise fill memory
/// and the dataset.
pub fn check_output(
    kind: StepKind,
    docs: &[DocRef<'_>],
    output: &StepOutput,
    max_derived_per_document: usize,
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
        return Err(CallFailure::Contract(format!(
            "returned {produced} bytes of text for {input} bytes of input (the limit is {OUTPUT_RATIO}× the input or {} MiB)",
            OUTPUT_ALLOWANCE >> 20
        )));
    }
    let docs = docs.len();
    if let StepOutput::Derived(derived) = output
        && derived.len() > docs.saturating_mul(max_derived_per_document)
    {
        return Err(CallFailure::TooManyDerived {
            returned: derived.len(),
            documents: docs,
            per_document: max_derived_per_document,
        });
    }
    match (kind, output) {
        (StepKind::Mapper | StepKind::Filter, StepOutput::Verdicts(v)) if v.len() != docs => Err(
            CallFailure::Contract(format!("returned {} results for {docs} documents", v.len())),
        ),
        (StepKind::Filter, StepOutput::Verdicts(v))
            if v.iter().any(|v| matches!(v, Verdict::Replace(_))) =>
        {
            Err(CallFailure::Contract(
                "a filter returned replacement text".into(),
            ))
        }
        (StepKind::Augmenter, StepOutput::Derived(d)) => {
            match d.iter().find(|d| d.parent as usize >= docs) {
                Some(bad) => Err(CallFailure::Contract(format!(
                    "derived document names parent {} of a batch of {docs}",
                    bad.parent
                ))),
                None => Ok(()),
            }
        }
        (StepKind::Mapper | StepKind::Filter, StepOutput::Verdicts(_)) => Ok(()),
        _ => Err(CallFailure::Contract(format!(
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
        assert!(check_output(StepKind::Mapper, &docs, &replace(2_000_000), 1).is_ok());
        let over = check_output(StepKind::Mapper, &docs, &replace(2_000_001), 1).unwrap_err();
        assert!(
            over.to_string()
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
        assert!(check_output(StepKind::Augmenter, &short, &derived(1 << 20), 1).is_ok());
        assert!(check_output(StepKind::Augmenter, &short, &derived((1 << 20) + 1), 1).is_err());
    }

    #[test]
    fn derived_documents_are_bounded_in_count() {
        let docs = [
            DocRef {
                source: "a.txt:1",
                text: "a",
            },
            DocRef {
                source: "a.txt:2",
                text: "b",
            },
        ];
        let derived = |n: usize| {
            StepOutput::Derived(
                (0..n)
                    .map(|i| Derived {
                        parent: (i % 2) as u32,
                        text: "x".into(),
                    })
                    .collect(),
            )
        };
        // 3 per document over 2 documents: 6 pass, 7 fail, however short the text.
        assert!(check_output(StepKind::Augmenter, &docs, &derived(6), 3).is_ok());
        let over = check_output(StepKind::Augmenter, &docs, &derived(7), 3).unwrap_err();
        assert_eq!(
            over.to_string(),
            "returned 7 derived documents for 2 documents (the limit is 3 per document)"
        );
    }
}
