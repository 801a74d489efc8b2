//! length_filter in Rust: the rules of `plugins/length_filter_c`, so the
//! benchmark compares languages on the same logic (and users get a Rust
//! version). Drops `too_short`, `too_long`, `repeated_character` and
//! `duplicate_lines` documents.

use std::collections::{HashMap, HashSet};

use pt_plugin_sdk::{Decision, Document, Kind, Plugin, register};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LengthFilter {
    min_chars: f64,
    max_chars: f64,
    max_char_fraction: f64,
    max_duplicate_line_fraction: f64,
}

impl Default for LengthFilter {
    fn default() -> Self {
        Self {
            min_chars: 10.0,
            max_chars: 100_000.0,
            max_char_fraction: 0.5,
            max_duplicate_line_fraction: 0.3,
        }
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{3000}' | '\u{a0}')
}

impl LengthFilter {
    pub fn judge(&self, text: &str) -> Option<&'static str> {
        let mut counts: HashMap<char, usize> = HashMap::new();
        let (mut chars, mut top) = (0usize, 0usize);
        for c in text.chars().filter(|c| !is_space(*c)) {
            chars += 1;
            let n = counts.entry(c).or_default();
            *n += 1;
            top = top.max(*n);
        }
        if (chars as f64) < self.min_chars {
            return Some("too_short");
        }
        if chars as f64 > self.max_chars {
            return Some("too_long");
        }
        if chars >= 20 && top as f64 > self.max_char_fraction * chars as f64 {
            return Some("repeated_character");
        }
        let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
        let distinct: HashSet<&str> = lines.iter().copied().collect();
        let duplicates = lines.len() - distinct.len();
        if lines.len() >= 3
            && duplicates as f64 > self.max_duplicate_line_fraction * lines.len() as f64
        {
            return Some("duplicate_lines");
        }
        None
    }
}

impl Plugin for LengthFilter {
    const ID: &'static str = "length_filter";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "Drops too short, too long, one-character and duplicate-line documents (Rust)";
    const KINDS: &'static [Kind] = &[Kind::Filter];

    fn configure(config: &str) -> Result<Self, String> {
        pt_plugin_sdk::parse_config(config)
    }

    fn filter(&self, doc: &Document) -> Decision {
        match self.judge(&doc.text) {
            Some(reason) => Decision::Drop(reason.into()),
            None => Decision::Keep,
        }
    }
}

register!(LengthFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_plugins_fixture_cases() {
        let filter = LengthFilter::default();
        assert_eq!(filter.judge("太短\n"), Some("too_short"));
        assert_eq!(
            filter.judge("发热是传染病最常见的症状之一，患者应当及时就医。\n"),
            None
        );
        assert_eq!(filter.judge(&"哈".repeat(23)), Some("repeated_character"));
        let lines = "第一行内容是这样的\n".repeat(3) + "另一行\n";
        assert_eq!(filter.judge(&lines), Some("duplicate_lines"));
        assert_eq!(filter.judge(&"字".repeat(100_001)), Some("too_long"));
    }
}
