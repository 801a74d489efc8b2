//! Text helpers that cleaning and augmentation plugins share: CJK-aware word
//! splitting, character classes, and Gopher-style repetition statistics
//! (Rae et al. 2021, as data-juicer and datatrove compute them).

use std::collections::{HashMap, HashSet};

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
    if visible == 0 { 0.0 } else { letters as f64 / visible as f64 }
}

/// Fraction of non-empty lines that repeat an earlier line, and the fraction of
/// characters in those repeats.
pub fn duplicate_line_fractions(text: &str) -> (f64, f64) {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
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
    (dup_lines as f64 / lines.len() as f64, dup_chars as f64 / total_chars as f64)
}

fn char_len(words: &[&str]) -> usize {
    words.iter().map(|w| w.chars().count()).sum()
}

/// Gopher's "top n-gram" statistic: the characters covered by the most frequent
/// n-gram (counted with its repeats) over all word characters; 0 when no
/// n-gram occurs twice.
pub fn top_ngram_char_fraction(words: &[&str], n: usize) -> f64 {
    let total = char_len(words);
    if n == 0 || words.len() < n || total == 0 {
        return 0.0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, count)| *count > 1)
        .map(|(gram, count)| char_len(gram) * count)
        .max()
        .map_or(0.0, |chars| chars as f64 / total as f64)
}

/// Gopher's "duplicate n-gram" statistic: the characters in n-grams that repeat
/// an earlier n-gram, each word counted at most once, over all word characters.
pub fn duplicate_ngram_char_fraction(words: &[&str], n: usize) -> f64 {
    let total = char_len(words);
    if n == 0 || words.len() < n || total == 0 {
        return 0.0;
    }
    let mut seen = HashSet::new();
    let mut counted = vec![false; words.len()];
    for (i, gram) in words.windows(n).enumerate() {
        if !seen.insert(gram) {
            counted[i..i + n].iter_mut().for_each(|c| *c = true);
        }
    }
    let dup: usize = words.iter().zip(&counted).filter(|(_, c)| **c).map(|(w, _)| w.chars().count()).sum();
    dup as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_cjk_per_character_and_latin_per_run() {
        assert_eq!(words("患者发热39°C, fever's high!"), ["患", "者", "发", "热", "39", "C", "fever's", "high"]);
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
        let w = words("a b a b a b c");
        // 2-gram "a b" occurs 3 times: 2 chars each, 6 of 7 word characters.
        assert!((top_ngram_char_fraction(&w, 2) - 6.0 / 7.0).abs() < 1e-12);
        // 2-grams repeating an earlier one: "a b"@2, "b a"@3, "a b"@4 -> words 2..=5 -> 4 of 7.
        assert!((duplicate_ngram_char_fraction(&w, 2) - 4.0 / 7.0).abs() < 1e-12);
        assert_eq!(top_ngram_char_fraction(&words("x y z"), 2), 0.0);
    }
}
