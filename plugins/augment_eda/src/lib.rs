//! `augment_eda`: EDA-style text augmentation (Wei & Zou 2019) for Chinese and
//! English: synonym replacement, random insertion, random swap and random
//! deletion. Chinese text is segmented by forward maximum matching against the
//! synonym table (other CJK characters are single tokens). Each input document
//! yields `num_aug` new ones; all randomness comes from the host's seed.

use std::collections::HashMap;

use pt_plugin_sdk::text::{is_cjk, with_trailing_newline_of};
use pt_plugin_sdk::{Document, Kind, Plugin, Rng, register};
use serde::Deserialize;

const BUNDLED_SYNONYMS: &str = include_str!("../data/synonyms.txt");

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Synonym,
    Insert,
    Swap,
    Delete,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// New documents per input document.
    pub num_aug: usize,
    /// Share of words replaced by a synonym / receiving an inserted synonym / swapped.
    pub alpha_sr: f64,
    pub alpha_ri: f64,
    pub alpha_rs: f64,
    /// Probability that each word is deleted.
    pub p_rd: f64,
    /// Documents with fewer words are not augmented.
    pub min_words: usize,
    /// Operations to use, cycled through for successive augmentations.
    pub operations: Vec<Operation>,
    /// More synonym groups, added to the bundled table.
    pub extra_synonyms: Vec<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            num_aug: 1,
            alpha_sr: 0.1,
            alpha_ri: 0.1,
            alpha_rs: 0.1,
            p_rd: 0.1,
            min_words: 5,
            operations: vec![
                Operation::Synonym,
                Operation::Insert,
                Operation::Swap,
                Operation::Delete,
            ],
            extra_synonyms: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    /// Whitespace and punctuation: kept in place, never chosen by an operation.
    Separator(String),
}

pub struct AugmentEda {
    config: Config,
    synonyms: HashMap<String, Vec<String>>,
    /// Longest dictionary entry in characters, for maximum matching.
    longest_entry: usize,
}

impl AugmentEda {
    fn tokenize(&self, text: &str) -> Vec<Token> {
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if is_cjk(c) {
                let longest = (1..=self.longest_entry.min(chars.len() - i))
                    .rev()
                    .find(|&n| {
                        n == 1
                            || self
                                .synonyms
                                .contains_key(&chars[i..i + n].iter().collect::<String>())
                    })
                    .unwrap_or(1);
                tokens.push(Token::Word(chars[i..i + longest].iter().collect()));
                i += longest;
            } else {
                let is_word = |c: char| c.is_alphanumeric() && !is_cjk(c);
                let kind = is_word(c);
                let start = i;
                while i < chars.len() && !is_cjk(chars[i]) && is_word(chars[i]) == kind {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                tokens.push(if kind {
                    Token::Word(s)
                } else {
                    Token::Separator(s)
                });
            }
        }
        tokens
    }

    fn synonym_of(&self, word: &str, rng: &mut Rng) -> Option<String> {
        let options = self.synonyms.get(&word.to_lowercase())?;
        Some(options[rng.below(options.len())].clone())
    }

    fn apply(&self, op: Operation, mut tokens: Vec<Token>, rng: &mut Rng) -> Vec<Token> {
        let word_positions = |tokens: &[Token]| -> Vec<usize> {
            (0..tokens.len())
                .filter(|&i| matches!(tokens[i], Token::Word(_)))
                .collect()
        };
        let words = word_positions(&tokens);
        let count = |alpha: f64| ((alpha * words.len() as f64).round() as usize).max(1);
        match op {
            Operation::Synonym => {
                let mut candidates: Vec<usize> =
                    words.iter().copied().filter(|&i| matches!(&tokens[i], Token::Word(w) if self.synonyms.contains_key(&w.to_lowercase()))).collect();
                for _ in 0..count(self.config.alpha_sr).min(candidates.len()) {
                    let pick = candidates.swap_remove(rng.below(candidates.len()));
                    if let Token::Word(w) = &tokens[pick] {
                        let replacement = self.synonym_of(w, rng).expect("candidate has synonyms");
                        tokens[pick] = Token::Word(replacement);
                    }
                }
            }
            Operation::Insert => {
                for _ in 0..count(self.config.alpha_ri) {
                    let with_synonyms: Vec<String> = word_positions(&tokens)
                        .into_iter()
                        .filter_map(|i| match &tokens[i] {
                            Token::Word(w) => self.synonym_of(w, rng),
                            Token::Separator(_) => None,
                        })
                        .collect();
                    if with_synonyms.is_empty() {
                        break;
                    }
                    let word = with_synonyms[rng.below(with_synonyms.len())].clone();
                    let positions = word_positions(&tokens);
                    let at = positions[rng.below(positions.len())];
                    // Latin words need a space; CJK words join their neighbours.
                    if word.chars().all(is_cjk) {
                        tokens.insert(at, Token::Word(word));
                    } else {
                        tokens.splice(at..at, [Token::Word(word), Token::Separator(" ".into())]);
                    }
                }
            }
            Operation::Swap => {
                for _ in 0..count(self.config.alpha_rs) {
                    let (a, b) = (words[rng.below(words.len())], words[rng.below(words.len())]);
                    tokens.swap(a, b);
                }
            }
            Operation::Delete => {
                let keep: Vec<bool> = words
                    .iter()
                    .map(|_| !rng.chance(self.config.p_rd))
                    .collect();
                let survivor = if keep.iter().any(|k| *k) {
                    None
                } else {
                    Some(words[rng.below(words.len())])
                };
                let deleted: Vec<usize> = words
                    .iter()
                    .zip(&keep)
                    .filter(|(i, k)| !**k && Some(**i) != survivor)
                    .map(|(i, _)| *i)
                    .collect();
                for i in deleted.into_iter().rev() {
                    tokens.remove(i);
                }
            }
        }
        tokens
    }
}

fn render(tokens: &[Token]) -> String {
    let joined: String = tokens
        .iter()
        .map(|t| match t {
            Token::Word(s) | Token::Separator(s) => s.as_str(),
        })
        .collect();
    // Deletions leave doubled spaces between Latin words.
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        if !(c == ' ' && out.ends_with(' ')) {
            out.push(c);
        }
    }
    out
}

impl Plugin for AugmentEda {
    const ID: &'static str = "augment_eda";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "EDA augmentation for Chinese and English: synonym replacement, insertion, swap, deletion; seeded";
    const KINDS: &'static [Kind] = &[Kind::Augmenter];
    const CONFIG_SCHEMA: &'static str = include_str!("../config.schema.json");

    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = pt_plugin_sdk::parse_config(config)?;
        for p in [
            config.alpha_sr,
            config.alpha_ri,
            config.alpha_rs,
            config.p_rd,
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "invalid configuration: alpha_* and p_rd must lie in [0, 1], got {p}"
                ));
            }
        }
        if config.operations.is_empty() {
            return Err("invalid configuration: `operations` is empty".into());
        }
        let groups = BUNDLED_SYNONYMS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .chain(config.extra_synonyms.iter().cloned());
        let mut synonyms: HashMap<String, Vec<String>> = HashMap::new();
        for group in groups.filter(|g| g.len() > 1) {
            for word in &group {
                let others = group.iter().filter(|w| *w != word).cloned();
                synonyms
                    .entry(word.to_lowercase())
                    .or_default()
                    .extend(others);
            }
        }
        let longest_entry = synonyms
            .keys()
            .map(|w| w.chars().count())
            .max()
            .unwrap_or(1);
        Ok(Self {
            config,
            synonyms,
            longest_entry,
        })
    }

    fn augment(&self, doc: &Document, rng: &mut Rng) -> Vec<String> {
        let tokens = self.tokenize(&doc.text);
        let words = tokens
            .iter()
            .filter(|t| matches!(t, Token::Word(_)))
            .count();
        if words < self.config.min_words {
            return Vec::new();
        }
        let ops = &self.config.operations;
        (0..self.config.num_aug)
            .map(|i| {
                with_trailing_newline_of(
                    &doc.text,
                    render(&self.apply(ops[i % ops.len()], tokens.clone(), rng)),
                )
            })
            .filter(|text| text != &doc.text)
            .collect()
    }
}

register!(AugmentEda);

#[cfg(test)]
mod tests {
    use super::*;

    fn eda(config: &str) -> AugmentEda {
        AugmentEda::configure(config).unwrap()
    }

    fn doc(text: &str) -> Document {
        Document {
            source: "t.txt:1".into(),
            text: text.into(),
        }
    }

    #[test]
    fn chinese_is_segmented_by_the_synonym_table() {
        let tokens = eda("{}").tokenize("患者发热，医生检查。");
        let words: Vec<_> = tokens
            .iter()
            .filter_map(|t| {
                if let Token::Word(w) = t {
                    Some(w.as_str())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(words, ["患者", "发热", "医生", "检查"]);
    }

    #[test]
    fn synonym_replacement_uses_the_table_and_keeps_the_newline() {
        let p = eda(r#"{"operations": ["synonym"], "alpha_sr": 1.0, "min_words": 1}"#);
        let out = p.augment(&doc("患者发热，医生检查。\n"), &mut Rng::new(1));
        assert_eq!(out.len(), 1);
        let text = &out[0];
        assert!(text.ends_with('\n'));
        assert!(
            !text.contains("患者")
                && !text.contains("发热")
                && !text.contains("医生")
                && !text.contains("检查"),
            "{text}"
        );
        assert!(["病人", "病患"].iter().any(|w| text.contains(w)), "{text}");
    }

    #[test]
    fn same_seed_same_augmentations_and_num_aug_counts() {
        let p = eda(r#"{"num_aug": 4}"#);
        let d = doc(
            "The patient had a severe fever and a bad cough for three days before treatment began.\n",
        );
        let a = p.augment(&d, &mut Rng::new(9));
        assert_eq!(a, p.augment(&d, &mut Rng::new(9)));
        assert_eq!(a.len(), 4);
        assert_ne!(a, p.augment(&d, &mut Rng::new(10)));
    }

    #[test]
    fn deletion_and_swap_keep_the_word_multiset_plausible() {
        let d = doc("one two three four five six seven eight nine ten\n");
        let swapped =
            eda(r#"{"operations": ["swap"], "alpha_rs": 0.3}"#).augment(&d, &mut Rng::new(3));
        let mut a: Vec<_> = swapped[0].split_whitespace().collect();
        let mut b: Vec<_> = d.text.split_whitespace().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        let deleted =
            eda(r#"{"operations": ["delete"], "p_rd": 0.5}"#).augment(&d, &mut Rng::new(3));
        let n = deleted[0].split_whitespace().count();
        assert!((1..10).contains(&n), "{deleted:?}");
    }

    #[test]
    fn short_documents_are_not_augmented_and_bad_config_is_named() {
        assert!(
            eda("{}")
                .augment(&doc("too short\n"), &mut Rng::new(1))
                .is_empty()
        );
        assert!(
            AugmentEda::configure(r#"{"p_rd": 3}"#)
                .err()
                .unwrap()
                .contains("p_rd")
        );
        assert!(
            AugmentEda::configure(r#"{"operations": ["rotate"]}"#)
                .err()
                .unwrap()
                .contains("rotate")
        );
    }
}
