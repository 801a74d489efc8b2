//! `pt-host make-corpus`: a corpus of any size made from a small one, for
//! tests and benchmarks of preparation and deduplication. Documents are
//! random runs of the source's distinct sentences, so they are unique (no
//! two near each other), and a known share of them are exact or near copies
//! of earlier ones; `duplicates.jsonl` lists which, the answer a
//! deduplicator is scored against.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use pt_data::ReadOptions;
use pt_data::corpus::read_documents;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(clap::Args, Debug)]
pub struct MakeCorpusArgs {
    /// The corpus sentences are drawn from (.txt/.json/.jsonl, dir or file).
    #[arg(long = "train_file_dir", value_name = "DIR|FILE")]
    pub train_file_dir: PathBuf,
    /// Where `corpus/part-NNNNN.jsonl` and `duplicates.jsonl` are written (new or empty).
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Size of the corpus, in MB (10^6 bytes) of JSON lines.
    #[arg(long = "size_mb", default_value_t = 100.0)]
    pub size_mb: f64,
    /// Share of documents that are exact copies of an earlier one.
    #[arg(long = "exact_duplicates", default_value_t = 0.05)]
    pub exact_duplicates: f64,
    /// Share of documents that are near copies of an earlier one (about 1 word in 100 replaced).
    #[arg(long = "near_duplicates", default_value_t = 0.05)]
    pub near_duplicates: f64,
    /// Largest file, in MB.
    #[arg(long = "file_mb", default_value_t = 256)]
    pub file_mb: u64,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
}

/// Earlier documents a copy may be made of: a uniform sample of all of them
/// (reservoir sampling), so copies reach across the corpus in bounded memory.
const RESERVOIR: usize = 10_000;

/// Sentences end at these (kept with the sentence).
const SENTENCE_ENDS: [char; 6] = ['。', '！', '？', '.', '!', '?'];

/// The distinct sentences of `documents`, in first-seen order.
fn sentences(documents: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for document in documents {
        let mut start = 0;
        for (at, c) in document.char_indices() {
            if SENTENCE_ENDS.contains(&c) || c == '\n' {
                let end = at + c.len_utf8();
                let sentence = document[start..end].trim();
                if sentence.chars().count() >= 8 && seen.insert(sentence.to_string()) {
                    found.push(sentence.to_string());
                }
                start = end;
            }
        }
    }
    found
}

/// `text` with about one word in 100 (one CJK character in 100) replaced by
/// another from `pool`: a near copy, Jaccard similarity of its 5-word
/// shingles about 0.9.
fn near_copy(text: &str, pool: &[String], rng: &mut ChaCha8Rng) -> String {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for c in text.chars() {
        if c.is_alphanumeric() && rng.random_bool(0.01) {
            let donor = &pool[rng.random_range(0..pool.len())];
            out.push(donor.chars().find(|d| d.is_alphanumeric()).unwrap_or('〇'));
            changed = true;
        } else {
            out.push(c);
        }
    }
    if !changed {
        out.push_str(" 〇");
    }
    out
}

pub fn run(args: MakeCorpusArgs) -> Result<()> {
    let shares = args.exact_duplicates + args.near_duplicates;
    if args.exact_duplicates < 0.0 || args.near_duplicates < 0.0 || shares >= 1.0 {
        bail!("--exact_duplicates and --near_duplicates must be ≥ 0 and sum to less than 1");
    }
    if args.size_mb.is_nan() || args.size_mb <= 0.0 || args.file_mb == 0 {
        bail!("--size_mb and --file_mb must be positive");
    }
    crate::args::require_new_output_dir(&args.output_dir)?;
    let (documents, _) = read_documents(&args.train_file_dir, &ReadOptions::default(), u64::MAX)?;
    let pool = sentences(&documents);
    if pool.len() < 100 {
        bail!(
            "{}: {} distinct sentences; at least 100 are needed for unique documents",
            args.train_file_dir.display(),
            pool.len()
        );
    }
    let corpus_dir = args.output_dir.join("corpus");
    std::fs::create_dir_all(&corpus_dir)
        .with_context(|| format!("{}: cannot create", corpus_dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let target = (args.size_mb * 1e6) as u64;
    let mut truth = Vec::new();
    // (file, line, text) of a sample of the unique documents written.
    let mut earlier: Vec<(String, usize, String)> = Vec::new();
    let (mut unique, mut total, mut part, mut line) = (0usize, 0u64, 0usize, 0usize);
    let mut file_bytes = 0u64;
    let mut file: Option<std::io::BufWriter<std::fs::File>> = None;
    while total < target {
        if file.is_none() || file_bytes >= args.file_mb * 1_000_000 {
            if let Some(mut full) = file.take() {
                full.flush()?;
            }
            let path = corpus_dir.join(format!("part-{part:05}.jsonl"));
            file = Some(std::io::BufWriter::new(
                std::fs::File::create(&path)
                    .with_context(|| format!("{}: cannot create", path.display()))?,
            ));
            part += 1;
            line = 0;
            file_bytes = 0;
        }
        let name = format!("part-{:05}.jsonl", part - 1);
        line += 1;
        let roll: f64 = rng.random();
        let original = (!earlier.is_empty() && roll < shares)
            .then(|| earlier[rng.random_range(0..earlier.len())].clone());
        let text = match original {
            Some((of_file, of_line, text)) => {
                let (copy, kind) = if roll < args.exact_duplicates {
                    (text, "exact")
                } else {
                    (near_copy(&text, &pool, &mut rng), "near")
                };
                truth.push(serde_json::json!({
                    "source": format!("{name}:{line}"),
                    "duplicate_of": format!("{of_file}:{of_line}"),
                    "kind": kind,
                }));
                copy
            }
            None => {
                let sentences = rng.random_range(3..=12);
                let text: String = (0..sentences)
                    .map(|_| pool[rng.random_range(0..pool.len())].as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                unique += 1;
                let entry = (name.clone(), line, text.clone());
                if earlier.len() < RESERVOIR {
                    earlier.push(entry);
                } else if let Some(slot) = earlier.get_mut(rng.random_range(0..unique)) {
                    *slot = entry;
                }
                text
            }
        };
        let record = serde_json::to_vec(&serde_json::json!({ "text": text }))?;
        let out = file.as_mut().expect("a file is open");
        out.write_all(&record)?;
        out.write_all(b"\n")?;
        total += record.len() as u64 + 1;
        file_bytes += record.len() as u64 + 1;
    }
    if let Some(mut last) = file.take() {
        last.flush()?;
    }
    let mut lines = Vec::new();
    for entry in &truth {
        lines.extend(serde_json::to_vec(entry)?);
        lines.push(b'\n');
    }
    std::fs::write(args.output_dir.join("duplicates.jsonl"), lines)?;
    println!(
        "{}: {:.1} MB in {part} files, {} unique documents, {} exact and {} near copies (duplicates.jsonl)",
        corpus_dir.display(),
        total as f64 / 1e6,
        unique,
        truth.iter().filter(|t| t["kind"] == "exact").count(),
        truth.iter().filter(|t| t["kind"] == "near").count(),
    );
    Ok(())
}
