//! Corpus-level deduplication, a host stage: it needs every document, which
//! a per-batch plugin never sees. Exact duplicates by content hash; near
//! duplicates by MinHash with LSH banding, datatrove's parameters: 5-gram
//! shingles of words (each CJK character a word), 14 bands × 8 rows. The
//! first document of a group is kept, in corpus order; each later one is
//! dropped naming the kept document it duplicates.
//!
//! Two documents with Jaccard similarity `s` of their shingle sets share a
//! band with probability `1 − (1 − s⁸)¹⁴`: 0.5% at s = 0.5, 50% at s ≈ 0.72,
//! 99.6% at s = 0.9.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::sort::{Record, Sorter};

use crate::text::is_cjk;
use sha2::{Digest, Sha256};

/// Which duplicates are dropped (`--dedup`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    #[default]
    None,
    /// Documents equal up to surrounding whitespace.
    Exact,
    /// Exact duplicates, then near duplicates (MinHash + LSH).
    Minhash,
}

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;
/// LSH bands and MinHash values per band.
pub const BANDS: usize = 14;
pub const ROWS: usize = 8;

/// A dropped document and the kept one it duplicates (indices in the input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicate {
    pub index: usize,
    pub of: usize,
    /// Near (MinHash) rather than exact.
    pub near: bool,
}

/// Dropped documents per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateCounts {
    pub exact: u64,
    pub near: u64,
}

/// What a deduplication found.
#[derive(Debug, Default)]
pub struct Found {
    /// The dropped documents, in input order.
    pub duplicates: Vec<Duplicate>,
    /// Bytes of keys sorted on disk because they did not fit the budget.
    pub spilled_bytes: u64,
}

/// Finds the duplicates among documents given one at a time, in corpus
/// order, with memory bounded by a budget: each document's keys (its exact
/// digest and, under `minhash`, one key per band) go to an external sort
/// that spills sorted runs to disk past the budget. Sorted, documents that
/// share a key are adjacent, and only keys shared by two or more documents
/// are kept for the final pass, which decides in corpus order exactly as
/// comparing each document with every kept one before it would: an exact
/// copy is dropped naming the first document with its text; otherwise a
/// document sharing a band with a kept one is dropped naming the first such
/// band's kept document, and a document that is kept holds its bands.
pub struct Deduplicator {
    mode: Dedup,
    hashers: Permutations,
    memory: usize,
    documents: u32,
    keys: Sorter<KeyRecord>,
    /// The sorts' runs, removed when done.
    runs: tempfile::TempDir,
}

impl Deduplicator {
    /// `memory` bytes for the sorted keys in all; `spill_dir` takes the
    /// runs that do not fit.
    pub fn new(mode: Dedup, memory: usize, spill_dir: &Path) -> Result<Self> {
        let runs = tempfile::tempdir_in(spill_dir).with_context(|| {
            format!(
                "{}: cannot create a directory to sort in",
                spill_dir.display()
            )
        })?;
        Ok(Self {
            mode,
            hashers: Permutations::new(),
            memory,
            documents: 0,
            keys: Sorter::new(memory / 2, runs.path().join("keys")),
            runs,
        })
    }

    /// The next document.
    pub fn add(&mut self, text: &str) -> Result<()> {
        if self.mode == Dedup::None {
            return Ok(());
        }
        let document = self.documents;
        self.documents = document
            .checked_add(1)
            .context("deduplication counts documents in 32 bits: split the corpus")?;
        let digest = Sha256::digest(text.trim().as_bytes());
        let half = |range: std::ops::Range<usize>| {
            u64::from_le_bytes(digest[range].try_into().expect("8 bytes"))
        };
        self.keys.push(KeyRecord {
            group: EXACT,
            key: (half(0..8), half(8..16)),
            document,
        })?;
        if self.mode == Dedup::Minhash {
            for (band, key) in band_keys(&self.hashers.signature(text))
                .into_iter()
                .enumerate()
            {
                self.keys.push(KeyRecord {
                    group: band as u8 + 1,
                    key: (key, 0),
                    document,
                })?;
            }
        }
        Ok(())
    }

    /// The duplicates among the documents added.
    pub fn finish(self) -> Result<Found> {
        let mut spilled_bytes = self.keys.spilled_bytes();
        // Pass 1, in key order: each shared key's documents, as memberships
        // of a numbered bucket (or, for the exact digest, as copies).
        let mut members = Sorter::new(self.memory / 2, self.runs.path().join("members"));
        let mut buckets: u32 = 0;
        let mut previous: Option<KeyRecord> = None;
        let mut first = 0;
        for record in self.keys.sorted()? {
            let record = record.context("cannot read deduplication keys back")?;
            let same = previous
                .as_ref()
                .is_some_and(|p| (p.group, p.key) == (record.group, record.key));
            if !same {
                first = record.document;
            } else if record.group == EXACT {
                members.push(Member {
                    document: record.document,
                    group: EXACT,
                    value: first,
                })?;
            } else {
                if previous.as_ref().is_some_and(|p| p.document == first) {
                    buckets += 1;
                    members.push(Member {
                        document: first,
                        group: record.group,
                        value: buckets - 1,
                    })?;
                }
                members.push(Member {
                    document: record.document,
                    group: record.group,
                    value: buckets - 1,
                })?;
            }
            previous = Some(record);
        }
        spilled_bytes += members.spilled_bytes();
        // Pass 2, in document order: the decisions.
        let mut holders = vec![NO_HOLDER; buckets as usize];
        let mut duplicates = Vec::new();
        let mut decide = |document: u32, groups: &[Member]| {
            let duplicate = match groups.first() {
                Some(copy) if copy.group == EXACT => Some((copy.value, false)),
                _ => groups
                    .iter()
                    .map(|m| holders[m.value as usize])
                    .find(|&holder| holder != NO_HOLDER)
                    .map(|holder| (holder, true)),
            };
            match duplicate {
                Some((of, near)) => duplicates.push(Duplicate {
                    index: document as usize,
                    of: of as usize,
                    near,
                }),
                None => groups
                    .iter()
                    .for_each(|m| holders[m.value as usize] = document),
            }
        };
        let mut groups: Vec<Member> = Vec::with_capacity(BANDS + 1);
        for member in members.sorted()? {
            let member = member.context("cannot read deduplication keys back")?;
            if groups
                .first()
                .is_some_and(|g| g.document != member.document)
            {
                decide(groups[0].document, &groups);
                groups.clear();
            }
            groups.push(member);
        }
        if let Some(last) = groups.first() {
            decide(last.document, &groups);
        }
        Ok(Found {
            duplicates,
            spilled_bytes,
        })
    }
}

/// The group of the exact digest; bands are 1 to `BANDS`.
const EXACT: u8 = 0;
/// A bucket no kept document holds yet.
const NO_HOLDER: u32 = u32::MAX;

/// One key of a document, sorted by key then document.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct KeyRecord {
    group: u8,
    key: (u64, u64),
    document: u32,
}

impl Record for KeyRecord {
    const BYTES: usize = 21;

    fn encode(&self, bytes: &mut [u8]) {
        bytes[0] = self.group;
        bytes[1..9].copy_from_slice(&self.key.0.to_le_bytes());
        bytes[9..17].copy_from_slice(&self.key.1.to_le_bytes());
        bytes[17..21].copy_from_slice(&self.document.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        Self {
            group: bytes[0],
            key: (u64_at(1), u64_at(9)),
            document: u32::from_le_bytes(bytes[17..21].try_into().expect("4")),
        }
    }
}

/// A document's place among those sharing a key, sorted by document then
/// group: a copy of document `value` (the exact group), or a member of
/// band bucket `value`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Member {
    document: u32,
    group: u8,
    value: u32,
}

impl Record for Member {
    const BYTES: usize = 9;

    fn encode(&self, bytes: &mut [u8]) {
        bytes[0..4].copy_from_slice(&self.document.to_le_bytes());
        bytes[4] = self.group;
        bytes[5..9].copy_from_slice(&self.value.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        Self {
            document: u32_at(0),
            group: bytes[4],
            value: u32_at(5),
        }
    }
}

/// The text's words, lowercased, punctuation and spacing ignored (datatrove's
/// `simplify_text` before shingling).
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            words.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// FNV-1a: a fixed, portable 64-bit hash (the dedup result must not change
/// with the toolchain, as `std`'s hasher may).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's output function: a fixed, well-mixed 64-bit hash of `x`
/// (successive `x` a Weyl sequence make splitmix64's stream).
pub(crate) fn mix64(x: u64) -> u64 {
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Mersenne prime 2⁶¹ − 1 of the universal hash family.
const PRIME: u64 = (1 << 61) - 1;

/// `BANDS × ROWS` hash functions `h(x) = (a·x + b) mod p`, from a fixed seed.
struct Permutations {
    coefficients: Vec<(u64, u64)>,
}

impl Permutations {
    fn new() -> Self {
        let mut state: u64 = 0x5EED_0FDE_D00B;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            mix64(state)
        };
        let coefficients = (0..BANDS * ROWS)
            .map(|_| (next() % (PRIME - 1) + 1, next() % PRIME))
            .collect();
        Self { coefficients }
    }

    /// The MinHash signature of the text's shingles (a text shorter than a
    /// shingle is one shingle).
    fn signature(&self, text: &str) -> Vec<u64> {
        let words = words(text);
        let width = SHINGLE_WORDS.min(words.len()).max(1);
        let mut signature = vec![u64::MAX; self.coefficients.len()];
        for shingle in words.windows(width) {
            let x = fnv1a(shingle.iter().flat_map(|w| w.bytes().chain([0x1F]))) % PRIME;
            for (slot, &(a, b)) in signature.iter_mut().zip(&self.coefficients) {
                let h = ((a as u128 * x as u128 + b as u128) % PRIME as u128) as u64;
                *slot = (*slot).min(h);
            }
        }
        signature
    }
}

/// One key per band of the signature.
fn band_keys(signature: &[u64]) -> Vec<u64> {
    signature
        .chunks(ROWS)
        .map(|rows| fnv1a(rows.iter().flat_map(|r| r.to_le_bytes())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What deduplicating `texts` under `mode` within `memory` bytes finds.
    fn find<'a>(texts: impl IntoIterator<Item = &'a str>, mode: Dedup, memory: usize) -> Found {
        let spill = tempfile::tempdir().unwrap();
        let mut deduplicator = Deduplicator::new(mode, memory, spill.path()).unwrap();
        for text in texts {
            deduplicator.add(text).unwrap();
        }
        deduplicator.finish().unwrap()
    }

    fn find_duplicates<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        mode: Dedup,
    ) -> Vec<Duplicate> {
        find(texts, mode, 1 << 20).duplicates
    }

    /// The definition, pair by pair: each document against every earlier
    /// one (exact) and every earlier kept one (near), bands in order.
    fn compared_pairwise(texts: &[String]) -> Vec<Duplicate> {
        let hashers = Permutations::new();
        let bands: Vec<Vec<u64>> = texts
            .iter()
            .map(|t| band_keys(&hashers.signature(t)))
            .collect();
        let mut kept: Vec<usize> = Vec::new();
        let mut duplicates = Vec::new();
        for index in 0..texts.len() {
            let exact = (0..index).find(|&i| texts[i].trim() == texts[index].trim());
            let near = || {
                (0..BANDS).find_map(|band| {
                    kept.iter()
                        .copied()
                        .find(|&i| bands[i][band] == bands[index][band])
                })
            };
            match exact
                .map(|of| (of, false))
                .or_else(|| near().map(|of| (of, true)))
            {
                Some((of, near)) => duplicates.push(Duplicate { index, of, near }),
                None => kept.push(index),
            }
        }
        duplicates
    }

    /// Documents with exact copies (some with other surrounding spacing)
    /// and chains of near copies, each a few words further from the first.
    fn corpus_with_copies() -> Vec<String> {
        let word = |seed: u64| format!("w{}", mix64(seed) % 5000);
        let mut texts = Vec::new();
        for doc in 0..60u64 {
            let mut words: Vec<String> = (0..120).map(|i| word(doc * 1000 + i)).collect();
            texts.push(words.join(" "));
            for step in 0..4u64 {
                for edit in 0..3 {
                    let at = (mix64(doc * 77 + step * 7 + edit) % 120) as usize;
                    words[at] = word(doc * 1000 + 500 + step * 10 + edit);
                }
                texts.push(words.join(" "));
            }
            if doc % 3 == 0 {
                texts.push(format!("  {}\n", texts[texts.len() - 5]));
            }
        }
        texts
    }

    /// The sorted keys decide as the pairwise definition does, whether they
    /// fit in memory or are sorted in runs on disk, among them a kept
    /// document that shares a band only with an earlier dropped one.
    #[test]
    fn spilled_keys_find_what_comparing_every_pair_finds() {
        let texts = corpus_with_copies();
        let expected = compared_pairwise(&texts);
        let exact = expected.iter().filter(|d| !d.near).count();
        assert!(exact >= 20 && expected.len() - exact >= 100, "{expected:?}");
        let hashers = Permutations::new();
        let bands: Vec<Vec<u64>> = texts
            .iter()
            .map(|t| band_keys(&hashers.signature(t)))
            .collect();
        let dropped: Vec<usize> = expected.iter().map(|d| d.index).collect();
        let kept_beside_a_dropped_one = (0..texts.len()).any(|j| {
            !dropped.contains(&j)
                && dropped
                    .iter()
                    .any(|&i| i < j && (0..BANDS).any(|b| bands[i][b] == bands[j][b]))
        });
        assert!(kept_beside_a_dropped_one);
        let in_memory = find(texts.iter().map(String::as_str), Dedup::Minhash, 1 << 20);
        assert_eq!(in_memory.duplicates, expected);
        assert_eq!(in_memory.spilled_bytes, 0);
        let spilled = find(texts.iter().map(String::as_str), Dedup::Minhash, 4096);
        assert_eq!(spilled.duplicates.len(), expected.len());
        assert_eq!(spilled.duplicates, expected);
        // Every key went to disk (21 bytes each), then the shared ones.
        let keys = texts.len() as u64 * (1 + BANDS as u64) * 21;
        assert!(spilled.spilled_bytes > keys, "{}", spilled.spilled_bytes);
    }

    #[test]
    fn exact_duplicates_ignore_surrounding_whitespace_only() {
        let texts = ["a b c\n", "a b c", " a  b c", "a b c \n"];
        let found = find_duplicates(texts, Dedup::Exact);
        let pairs: Vec<(usize, usize)> = found.iter().map(|d| (d.index, d.of)).collect();
        assert_eq!(pairs, [(1, 0), (3, 0)]);
        assert!(find_duplicates(texts, Dedup::None).is_empty());
    }

    #[test]
    fn near_duplicates_are_found_and_different_texts_kept() {
        let base: String = (0..200).map(|i| format!("word{i} ")).collect();
        let edited = base.replace("word100 ", "changed ");
        let other: String = (0..200).map(|i| format!("other{i} ")).collect();
        let chinese =
            "传染病是指由病原微生物感染人体后产生的有传染性、在一定条件下可造成流行的疾病。";
        let chinese_edit = chinese.replace("一定", "某些");
        let texts = [
            base.as_str(),
            other.as_str(),
            &edited,
            chinese,
            &chinese_edit,
        ];
        let found = find_duplicates(texts, Dedup::Minhash);
        let pairs: Vec<(usize, usize, bool)> =
            found.iter().map(|d| (d.index, d.of, d.near)).collect();
        assert_eq!(pairs, [(2, 0, true), (4, 3, true)]);
        assert!(find_duplicates(texts, Dedup::Exact).is_empty());
    }
}
