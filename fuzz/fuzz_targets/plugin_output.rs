//! What a plugin may return for a batch, checked against its contract: any
//! shape of output is accepted or refused, never a panic, and whatever is
//! accepted can be indexed by document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pt_data::steps::{Derived, DocRef, StepKind, StepOutput, Verdict, check_output};

fuzz_target!(|input: (u8, u8, Vec<String>, Vec<(u8, String)>, Vec<(u32, String)>)| {
    let (kind, max_derived, texts, verdicts, derived) = input;
    let max_derived = usize::from(max_derived % 8);
    let docs: Vec<DocRef<'_>> = texts
        .iter()
        .map(|t| DocRef { source: "fuzz:1", text: t })
        .collect();
    let kind = [StepKind::Mapper, StepKind::Filter, StepKind::Augmenter][usize::from(kind % 3)];
    let outputs = [
        StepOutput::Verdicts(
            verdicts
                .into_iter()
                .map(|(tag, text)| match tag % 4 {
                    0 => Verdict::Keep,
                    1 => Verdict::Replace(text),
                    2 => Verdict::Drop(text),
                    _ => Verdict::Error(text),
                })
                .collect(),
        ),
        StepOutput::Derived(
            derived
                .into_iter()
                .map(|(parent, text)| Derived { parent, text })
                .collect(),
        ),
    ];
    for output in &outputs {
        if check_output(kind, &docs, output, max_derived).is_ok() {
            match output {
                StepOutput::Verdicts(v) => assert_eq!(v.len(), docs.len()),
                StepOutput::Derived(d) => {
                    assert!(d.iter().all(|d| (d.parent as usize) < docs.len()));
                    assert!(d.len() <= docs.len() * max_derived);
                }
            }
        }
    }
});
