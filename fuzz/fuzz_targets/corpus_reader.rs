//! Any bytes, read as each corpus format under both bad-record policies:
//! never a panic; skipped records and documents account for the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pt_data::corpus::{ReadOptions, parse};
use pt_data::ErrorPolicy;

fuzz_target!(|bytes: &[u8]| {
    for name in ["corpus.txt", "corpus.jsonl", "corpus.json"] {
        for on_bad_record in [ErrorPolicy::Fail, ErrorPolicy::Skip] {
            let options = ReadOptions {
                on_bad_record,
                max_document_bytes: 64,
                ..ReadOptions::default()
            };
            let Ok((documents, bad)) = parse(Path::new(name), bytes, &options) else {
                assert_eq!(on_bad_record, ErrorPolicy::Fail, "skip never fails a file");
                continue;
            };
            if on_bad_record == ErrorPolicy::Fail {
                assert!(bad.is_empty());
            }
            let lines = bytes.split(|&b| b == b'\n').count() as u32;
            for d in &documents {
                assert!(!d.text.is_empty() && d.text.len() <= 64);
                assert!((1..=lines).contains(&d.line));
            }
        }
    }
});
