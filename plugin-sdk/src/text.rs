//! Text helpers that cleaning and augmentation plugins share: CJK-aware word
//! splitting, character classes, and Gopher-style repetition statistics
//! (Rae et al. 2021, as data-juicer and datatrove compute them).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// CJK ideographs (unified, extensions A–F, compatibility), kana and hangul:
/// scripts where one character is roughly one word.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // hiragana, katakana
        | 0x3400..=0x4DBF    // extension A
        | 0x4E00..=0x9FFF    // unified ideographs
        | 0xAC00..=0xD7AF    // hangul syllables
        | 0xF900..=0xFAFF    // compatibility ideographs
        | 0x20000..=0x2FA1F) // extensions B–F, compatibility supplement
}

/// `new`, with a trailing `\n` exactly when `original` had one: `.txt` corpora
/// keep each line's newline, and packing depends on it.
pub fn with_trailing_newline_of(original: &str, new: String) -> String {
    let mut new = new.trim_end_matches('\n').to_string();
    if original.ends_with('\n') {
        new.push('\n');
    }
    new
}

/// Words for statistics and augmentation: every CJK character is a word, and
/// so is every run of other letters, digits, `'` and `-`. Punctuation and
/// whitespace separate words and are not words.
pub fn words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start: Option<usize> = None;
    for (i, c) in text.char_indices() {
        let in_word = !is_cjk(c) && (c.is_alphanumeric() || c == '\'' || c == '-');
        match (in_word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                words.push(&text[s..i]);
                start = None;
            }
            _ => {}
        }
        if is_cjk(c) {
            words.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

/// Share of letters (any script, CJK included) among non-whitespace characters;
/// 0 for an empty text.
pub fn letter_fraction(text: &str) -> f64 {
    let (mut letters, mut visible) = (0usize, 0usize);
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        visible += 1;
        if c.is_alphabetic() {
            letters += 1;
        }
    }
    if visible == 0 {
        0.0
    } else {
        letters as f64 / visible as f64
    }
}

/// Fraction of non-empty lines that repeat an earlier line, and the fraction of
/// characters in those repeats.
pub fn duplicate_line_fractions(text: &str) -> (f64, f64) {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return (0.0, 0.0);
    }
    let mut seen = HashSet::new();
    let (mut dup_lines, mut dup_chars, mut total_chars) = (0usize, 0usize, 0usize);
    for line in &lines {
        let chars = line.chars().count();
        total_chars += chars;
        if !seen.insert(*line) {
            dup_lines += 1;
            dup_chars += chars;
        }
    }
    (
        dup_lines as f64 / lines.len() as f64,
        dup_chars as f64 / total_chars as f64,
    )
}

/// A fast, non-cryptographic hasher (FxHash's multiply-rotate) for the
/// statistics below: SipHash dominated their cost.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.write_u64(u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.write_u64(u64::from_le_bytes(tail) ^ bytes.len() as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Gopher's n-gram repetition statistics of one text. Words become small
/// integers once (equal words, equal ids), so every n-gram is hashed as
/// integers rather than strings.
pub struct Ngrams {
    ids: Vec<u64>,
    chars: Vec<usize>,
    total_chars: usize,
}

impl Ngrams {
    pub fn new(words: &[&str]) -> Self {
        let mut index: FastMap<&str, u64> =
            FastMap::with_capacity_and_hasher(words.len(), Default::default());
        let ids = words.iter().map(|w| {
            let next = index.len() as u64;
            *index.entry(w).or_insert(next)
        });
        let ids = ids.collect();
        let chars: Vec<usize> = words.iter().map(|w| w.chars().count()).collect();
        let total_chars = chars.iter().sum();
        Self {
            ids,
            chars,
            total_chars,
        }
    }

    /// A 64-bit fingerprint of the n-gram starting at `i`.
    fn gram(&self, i: usize, n: usize) -> u64 {
        let mut h = FastHasher(0x9E37_79B9_7F4A_7C15);
        for &id in &self.ids[i..i + n] {
            h.write_u64(id);
        }
        // A final avalanche spreads the bits for the hash table.
        let z = h.0 ^ (h.0 >> 29);
        z.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (z >> 32)
    }

    /// The "top n-gram" statistic: the characters covered by the most
    /// frequent n-gram (counted with its repeats) over all word characters;
    /// 0 when no n-gram occurs twice.
    pub fn top_fraction(&self, n: usize) -> f64 {
        let w = self;
        if n == 0 || w.ids.len() < n || w.total_chars == 0 {
            return 0.0;
        }
        // Fingerprint -> (count, first position).
        let mut counts: FastMap<u64, (usize, usize)> =
            FastMap::with_capacity_and_hasher(w.ids.len(), Default::default());
        for i in 0..=w.ids.len() - n {
            counts.entry(w.gram(i, n)).or_insert((0, i)).0 += 1;
        }
        counts
            .values()
            .filter(|(count, _)| *count > 1)
            .map(|&(count, first)| w.chars[first..first + n].iter().sum::<usize>() * count)
            .max()
            .map_or(0.0, |chars| chars as f64 / w.total_chars as f64)
    }

    /// The "duplicate n-gram" statistic: the characters in n-grams that
    /// repeat an earlier n-gram, each word counted at most once, over all
    /// word characters.
    pub fn duplicate_fraction(&self, n: usize) -> f64 {
        let w = self;
        if n == 0 || w.ids.len() < n || w.total_chars == 0 {
            return 0.0;
        }
        let mut seen: HashSet<u64, BuildHasherDefault<FastHasher>> =
            HashSet::with_capacity_and_hasher(w.ids.len(), Default::default());
        let mut counted = vec![false; w.ids.len()];
        for i in 0..=w.ids.len() - n {
            if !seen.insert(w.gram(i, n)) {
                counted[i..i + n].iter_mut().for_each(|c| *c = true);
            }
        }
        let dup: usize = w
            .chars
            .iter()
            .zip(&counted)
            .filter(|(_, c)| **c)
            .map(|(n, _)| n)
            .sum();
        dup as f64 / w.total_chars as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_cjk_per_character_and_latin_per_run() {
        assert_eq!(
            words("患者发热39°C, fever's high!"),
            ["患", "者", "发", "热", "39", "C", "fever's", "high"]
        );
        assert!(words(" ，。 ").is_empty());
    }

    #[test]
    fn trailing_newline_follows_the_original() {
        assert_eq!(with_trailing_newline_of("a\n", "b".into()), "b\n");
        assert_eq!(with_trailing_newline_of("a", "b\n\n".into()), "b");
    }

    #[test]
    fn letter_fraction_counts_cjk_as_letters() {
        assert_eq!(letter_fraction("发热 ab 12"), 4.0 / 6.0);
        assert_eq!(letter_fraction("   "), 0.0);
    }

    #[test]
    fn duplicate_lines_hand_computed() {
        // lines: "ab", "cd", "ab", "ab" -> 2 of 4 repeat; 4 of 8 chars.
        assert_eq!(duplicate_line_fractions("ab\ncd\nab\nab\n"), (0.5, 0.5));
    }

    #[test]
    fn ngram_statistics_hand_computed() {
        let w = Ngrams::new(&words("a b a b a b c"));
        // 2-gram "a b" occurs 3 times: 2 chars each, 6 of 7 word characters.
        assert!((w.top_fraction(2) - 6.0 / 7.0).abs() < 1e-12);
        // 2-grams repeating an earlier one: "a b"@2, "b a"@3, "a b"@4 -> words 2..=5 -> 4 of 7.
        assert!((w.duplicate_fraction(2) - 4.0 / 7.0).abs() < 1e-12);
        assert_eq!(Ngrams::new(&words("x y z")).top_fraction(2), 0.0);
        // Multi-character words count their characters: "ab cd ab cd" -> "ab cd" x2 = 8 of 8.
        assert_eq!(Ngrams::new(&words("ab cd ab cd")).top_fraction(2), 1.0);
    }
}
