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

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

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

/// Documents seen so far, one at a time in corpus order: what a streaming
/// preparation keeps. About 40 bytes a document for `exact`, and 14 bucket
/// entries (about 450 bytes) more for each kept one under `minhash`.
pub struct Deduplicator {
    mode: Dedup,
    hashers: Permutations,
    exact: HashMap<[u8; 16], usize>,
    buckets: HashMap<(u8, u64), usize>,
}

impl Deduplicator {
    pub fn new(mode: Dedup) -> Self {
        Self {
            mode,
            hashers: Permutations::new(),
            exact: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Document `index` (its position in the input): the kept one it
    /// duplicates, if any; otherwise it is kept and remembered.
    pub fn check(&mut self, index: usize, text: &str) -> Option<Duplicate> {
        if self.mode == Dedup::None {
            return None;
        }
        let digest: [u8; 16] = Sha256::digest(text.trim().as_bytes())[..16]
            .try_into()
            .expect("16 bytes");
        if let Some(&of) = self.exact.get(&digest) {
            return Some(Duplicate {
                index,
                of,
                near: false,
            });
        }
        self.exact.insert(digest, index);
        if self.mode != Dedup::Minhash {
            return None;
        }
        let bands = band_keys(&self.hashers.signature(text));
        if let Some(&of) = bands
            .iter()
            .enumerate()
            .find_map(|(band, key)| self.buckets.get(&(band as u8, *key)))
        {
            return Some(Duplicate {
                index,
                of,
                near: true,
            });
        }
        for (band, key) in bands.into_iter().enumerate() {
            self.buckets.insert((band as u8, key), index);
        }
        None
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

    /// The duplicates among `texts` under `mode`, in input order.
    fn find_duplicates<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        mode: Dedup,
    ) -> Vec<Duplicate> {
        let mut seen = Deduplicator::new(mode);
        texts
            .into_iter()
            .enumerate()
            .filter_map(|(index, text)| seen.check(index, text))
            .collect()
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
