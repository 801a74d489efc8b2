//! Any bytes, read as each corpus format under both bad-record policies:
//! never a panic; skipped records and documents account for the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pt_data::corpus::{ReadOptions, read_file};
use pt_data::ErrorPolicy;

fuzz_target!(|bytes: &[u8]| {
    // The reader streams files: the input is one, under each format's name.
    let dir = std::env::temp_dir().join(format!("pt-fuzz-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["corpus.txt", "corpus.jsonl", "corpus.json", "corpus.txt.gz", "corpus.jsonl.zst"] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        for on_bad_record in [ErrorPolicy::Fail, ErrorPolicy::Skip] {
            let options = ReadOptions {
                on_bad_record,
                max_document_bytes: 64,
                ..ReadOptions::default()
            };
            let Ok(file) = read_file(&path, &options) else {
                // Fail stops at a bad record; either policy stops at corrupt compression.
                let compressed = name.ends_with(".gz") || name.ends_with(".zst");
                assert!(on_bad_record == ErrorPolicy::Fail || compressed);
                continue;
            };
            let (documents, bad) = (file.documents, file.bad_records);
            if on_bad_record == ErrorPolicy::Fail {
                assert!(bad.is_empty());
            }
            let compressed = name.ends_with(".gz") || name.ends_with(".zst");
            let lines = bytes.split(|&b| b == b'\n').count() as u32;
            for d in &documents {
                assert!(!d.text.is_empty() && d.text.len() <= 64);
                assert!(compressed || (1..=lines).contains(&d.line));
            }
        }
    }
});
