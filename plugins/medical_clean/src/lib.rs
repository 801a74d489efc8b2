//! `medical_clean`: cleans and filters Chinese and English medical text for
//! continued pretraining.
//!
//! As a mapper it normalises (NFKC, full-width to half-width, control and
//! zero-width characters, whitespace), strips HTML, and removes URLs, e-mail
//! addresses, phone numbers and Chinese resident ID numbers (PII). As a filter
//! it then drops documents that are too short, have too few letters, or repeat
//! themselves (Gopher's line and n-gram rules). Every drop carries a reason and
//! every threshold is configurable; see [`Config`].

use std::sync::LazyLock;

use pt_plugin_sdk::text::{self, with_trailing_newline_of};
use pt_plugin_sdk::{Decision, Document, Edit, Kind, Plugin, register};
use regex::Regex;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

/// Every threshold of the plugin; `{}` gives the defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unicode NFKC: full-width letters, digits and punctuation become
    /// half-width, ligatures and compatibility forms are unfolded.
    pub nfkc: bool,
    /// Keep full-width punctuation (，。：；！？（）…), which Chinese typography
    /// uses, instead of letting NFKC turn it into ASCII.
    pub keep_cjk_punctuation: bool,
    /// Remove HTML tags, comments, `<script>`/`<style>` blocks; decode entities.
    pub strip_html: bool,
    pub remove_urls: bool,
    pub remove_emails: bool,
    pub remove_phone_numbers: bool,
    /// Chinese resident ID numbers (18 digits with a valid check digit).
    pub remove_id_numbers: bool,
    /// What replaces removed URLs and PII ("" deletes them).
    pub placeholder: String,
    /// Minimum visible (non-whitespace) characters after cleaning.
    pub min_chars: usize,
    /// Minimum share of letters (CJK included) among visible characters.
    pub min_letter_fraction: f64,
    /// Repetition rules apply to documents of at least this many words (a CJK
    /// character is a word): short texts repeat by chance.
    pub repetition_min_words: usize,
    pub max_duplicate_line_fraction: f64,
    pub max_duplicate_line_char_fraction: f64,
    /// Gopher's top 2-, 3- and 4-gram character fractions.
    pub max_top_ngram_fraction: [f64; 3],
    /// Gopher's duplicate 5- to 10-gram character fractions.
    pub max_duplicate_ngram_fraction: [f64; 6],
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nfkc: true,
            keep_cjk_punctuation: true,
            strip_html: true,
            remove_urls: true,
            remove_emails: true,
            remove_phone_numbers: true,
            remove_id_numbers: true,
            placeholder: String::new(),
            min_chars: 10,
            min_letter_fraction: 0.4,
            repetition_min_words: 50,
            max_duplicate_line_fraction: 0.3,
            max_duplicate_line_char_fraction: 0.2,
            max_top_ngram_fraction: [0.20, 0.18, 0.16],
            max_duplicate_ngram_fraction: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        }
    }
}

impl Config {
    fn validate(self) -> Result<Self, String> {
        let fractions = [
            self.min_letter_fraction,
            self.max_duplicate_line_fraction,
            self.max_duplicate_line_char_fraction,
        ]
        .into_iter()
        .chain(self.max_top_ngram_fraction)
        .chain(self.max_duplicate_ngram_fraction);
        for f in fractions {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!(
                    "invalid configuration: fractions must lie in [0, 1], got {f}"
                ));
            }
        }
        Ok(self)
    }
}

static HTML_BLOCK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?is)<!--.*?-->|<\s*(script|style)\b[^>]*>.*?<\s*/\s*(script|style)\s*>").unwrap()
});
static HTML_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>").unwrap());
static HTML_ENTITY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]{2,6});").unwrap());
static URL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:(?:https?|ftp)://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&*+,;=%]+").unwrap()
});
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}").unwrap()
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:\+?86[- ]?)?1[3-9][0-9]{9}", // Chinese mobile
        r"|0[0-9]{2,3}-[0-9]{7,8}",       // Chinese landline with area code
        r"|\+[0-9]{1,3}[- ][0-9]{1,4}[- ][0-9]{3,4}[- ][0-9]{3,4}", // international
        r"|\(?[0-9]{3}\)?[- .][0-9]{3}[- .][0-9]{4}", // North American
    ))
    .unwrap()
});
static ID_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]").unwrap()
});

/// True when the match is not part of a longer run of digits: regex's `\b` does
/// not help in Chinese text, where 话13800138000 has no word boundary.
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
}

/// GB 11643 check digit of an 18-character resident ID.
fn valid_id_checksum(id: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = id.as_bytes();
    let sum: u32 = bytes[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| (b - b'0') as u32 * w)
        .sum();
    CHECK[(sum % 11) as usize] == bytes[17].to_ascii_uppercase()
}

fn replace_matches(
    text: &str,
    re: &Regex,
    placeholder: &str,
    accept: impl Fn(&str, usize, usize) -> bool,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for m in re.find_iter(text) {
        if accept(text, m.start(), m.end()) {
            out.push_str(&text[last..m.start()]);
            out.push_str(placeholder);
            last = m.end();
        }
    }
    out.push_str(&text[last..]);
    out
}

fn decode_entity(entity: &str) -> Option<char> {
    match entity {
        "nbsp" => Some(' '),
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => {
            let number = entity.strip_prefix('#')?;
            let code = match number.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => number.parse().ok()?,
            };
            char::from_u32(code)
        }
    }
}

fn strip_html(text: &str) -> String {
    let text = HTML_BLOCK.replace_all(text, " ");
    let text = HTML_TAG.replace_all(&text, " ");
    HTML_ENTITY
        .replace_all(&text, |caps: &regex::Captures| {
            match decode_entity(&caps[1]) {
                Some(c) => c.to_string(),
                None => caps[0].to_string(),
            }
        })
        .into_owned()
}

/// The full-width punctuation block (U+FF01–FF0F, FF1A–FF20, FF3B–FF40, FF5B–FF65).
fn is_fullwidth_punctuation(c: char) -> bool {
    matches!(c, '\u{FF01}'..='\u{FF0F}' | '\u{FF1A}'..='\u{FF20}' | '\u{FF3B}'..='\u{FF40}' | '\u{FF5B}'..='\u{FF65}')
}

/// NFKC, optionally leaving full-width punctuation alone.
fn nfkc(text: &str, keep_cjk_punctuation: bool) -> String {
    use unicode_normalization::{IsNormalized, is_nfkc_quick};
    let normalise = |segment: &str, out: &mut String| {
        if is_nfkc_quick(segment.chars()) == IsNormalized::Yes {
            out.push_str(segment);
        } else {
            out.extend(segment.nfkc());
        }
    };
    let mut out = String::with_capacity(text.len());
    if !keep_cjk_punctuation {
        normalise(text, &mut out);
        return out;
    }
    let mut rest = text;
    while let Some(at) = rest.find(is_fullwidth_punctuation) {
        normalise(&rest[..at], &mut out);
        let c = rest[at..].chars().next().expect("found a character");
        out.push(c);
        rest = &rest[at + c.len_utf8()..];
    }
    normalise(rest, &mut out);
    out
}

fn is_invisible(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(
            c,
            '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
        )
}

/// Collapses whitespace runs to one space, trims each line, drops blank lines.
fn normalise_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split('\n') {
        let mut pending_space = false;
        let start = out.len();
        for c in line.chars() {
            if c.is_whitespace() {
                pending_space = out.len() > start;
            } else {
                if pending_space {
                    out.push(' ');
                    pending_space = false;
                }
                out.push(c);
            }
        }
        if out.len() > start {
            out.push('\n');
        }
    }
    out
}

pub struct MedicalClean {
    config: Config,
}

impl MedicalClean {
    /// The cleaned text, without regard to the original's trailing newline.
    fn clean(&self, input: &str) -> String {
        let c = &self.config;
        let mut text = if c.strip_html && (input.contains('<') || input.contains('&')) {
            strip_html(input)
        } else {
            input.to_string()
        };
        if c.nfkc && !text.is_ascii() {
            text = nfkc(&text, c.keep_cjk_punctuation);
        }
        if text.chars().any(is_invisible) {
            text = text.chars().filter(|&c| !is_invisible(c)).collect();
        }
        if c.remove_urls && (text.contains("://") || text.contains("www.") || text.contains("WWW."))
        {
            text = replace_matches(&text, &URL, &c.placeholder, |_, _, _| true);
        }
        if c.remove_emails && text.contains('@') {
            text = replace_matches(&text, &EMAIL, &c.placeholder, |_, _, _| true);
        }
        let digits = text.bytes().filter(u8::is_ascii_digit).count();
        if c.remove_id_numbers && digits >= 18 {
            text = replace_matches(&text, &ID_NUMBER, &c.placeholder, |t, s, e| {
                stands_alone(t, s, e) && valid_id_checksum(&t[s..e])
            });
        }
        if c.remove_phone_numbers && digits >= 10 {
            text = replace_matches(&text, &PHONE, &c.placeholder, stands_alone);
        }
        normalise_whitespace(&text)
    }

    fn judge(&self, text: &str) -> Result<(), String> {
        let c = &self.config;
        let visible = text.chars().filter(|ch| !ch.is_whitespace()).count();
        if visible < c.min_chars {
            return Err("too_short".into());
        }
        if text::letter_fraction(text) < c.min_letter_fraction {
            return Err("low_letter_fraction".into());
        }
        let words = text::words(text);
        if words.len() < c.repetition_min_words {
            return Ok(());
        }
        let (dup_lines, dup_line_chars) = text::duplicate_line_fractions(text);
        if dup_lines > c.max_duplicate_line_fraction {
            return Err("duplicate_lines".into());
        }
        if dup_line_chars > c.max_duplicate_line_char_fraction {
            return Err("duplicate_line_chars".into());
        }
        let ngrams = text::Ngrams::new(&words);
        for (n, max) in (2..=4).zip(c.max_top_ngram_fraction) {
            if ngrams.top_fraction(n) > max {
                return Err(format!("top_{n}gram"));
            }
        }
        for (n, max) in (5..=10).zip(c.max_duplicate_ngram_fraction) {
            if ngrams.duplicate_fraction(n) > max {
                return Err(format!("duplicate_{n}gram"));
            }
        }
        Ok(())
    }
}

impl Plugin for MedicalClean {
    const ID: &'static str = "medical_clean";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "Normalises Chinese/English medical text, removes HTML, URLs and PII, drops short, letter-poor and repetitive documents";
    const KINDS: &'static [Kind] = &[Kind::Mapper, Kind::Filter];
    const CONFIG_SCHEMA: &'static str = include_str!("../config.schema.json");

    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = pt_plugin_sdk::parse_config(config)?;
        Ok(Self {
            config: config.validate()?,
        })
    }

    fn map(&self, doc: &Document) -> Edit {
        let cleaned = self.clean(&doc.text);
        if cleaned.trim().is_empty() {
            return Edit::Drop("empty_after_cleaning".into());
        }
        Edit::replace_if_changed(&doc.text, with_trailing_newline_of(&doc.text, cleaned))
    }

    fn filter(&self, doc: &Document) -> Decision {
        match self.judge(&doc.text) {
            Ok(()) => Decision::Keep,
            Err(reason) => Decision::Drop(reason),
        }
    }
}

register!(MedicalClean);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(config: &str) -> MedicalClean {
        MedicalClean::configure(config).unwrap()
    }

    fn doc(text: &str) -> Document {
        Document {
            source: "t.txt:1".into(),
            text: text.into(),
        }
    }

    fn mapped(p: &MedicalClean, text: &str) -> String {
        match p.map(&doc(text)) {
            Edit::Unchanged => text.to_string(),
            Edit::Replace(t) => t,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn full_width_and_whitespace_are_normalised_keeping_the_newline() {
        let p = plugin("{}");
        assert_eq!(
            mapped(&p, "ＡＢＣ１２３\u{3000}\u{3000}患者  发热\t\u{200B}三天\n"),
            "ABC123 患者 发热 三天\n"
        );
        assert_eq!(p.map(&doc("already clean text\n")), Edit::Unchanged);
        // Chinese punctuation stays unless asked otherwise.
        assert_eq!(p.map(&doc("发热，咳嗽（三天）。\n")), Edit::Unchanged);
        let ascii = plugin(r#"{"keep_cjk_punctuation": false}"#);
        assert_eq!(
            mapped(&ascii, "发热，咳嗽（三天）。\n"),
            "发热,咳嗽(三天)。\n"
        );
    }

    #[test]
    fn html_urls_emails_phones_and_ids_are_removed() {
        let p = plugin(r#"{"placeholder": "<PII>"}"#);
        let text = "<p>联系&amp;咨询：<b>王医生</b></p>电话13812345678，邮箱 wang.yi@hosp.cn 见 https://example.org/a?b=1 身份证11010519491231002X 编号123456789012345678901\n";
        assert_eq!(
            mapped(&p, text),
            "联系&咨询： 王医生 电话<PII>，邮箱 <PII> 见 <PII> 身份证<PII> 编号123456789012345678901\n"
        );
    }

    #[test]
    fn id_numbers_need_a_valid_check_digit() {
        assert!(valid_id_checksum("11010519491231002X"));
        assert!(!valid_id_checksum("110105194912310021"));
    }

    #[test]
    fn filters_name_their_reason() {
        let p = plugin("{}");
        assert_eq!(p.filter(&doc("短句\n")), Decision::Drop("too_short".into()));
        assert_eq!(
            p.filter(&doc("12345 67890 ++++ ----\n")),
            Decision::Drop("low_letter_fraction".into())
        );
        let repeated = "发热咳嗽请就医。".repeat(10);
        assert_eq!(
            p.filter(&doc(&repeated)),
            Decision::Drop("top_2gram".into())
        );
        let prose = "Infectious diseases are caused by pathogenic microorganisms such as bacteria, viruses, parasites or fungi; \
                     the diseases can be spread, directly or indirectly, from one person to another, and their control depends \
                     on surveillance, vaccination, sanitation and the prompt treatment of every identified case in a community.";
        assert_eq!(p.filter(&doc(prose)), Decision::Keep);
    }

    #[test]
    fn empty_after_cleaning_is_dropped() {
        assert_eq!(
            plugin("{}").map(&doc("<br/> \u{200B}\n")),
            Edit::Drop("empty_after_cleaning".into())
        );
    }

    #[test]
    fn bad_configuration_is_rejected_with_the_key() {
        let err = MedicalClean::configure(r#"{"min_char": 3}"#).err().unwrap();
        assert!(err.contains("min_char"), "{err}");
        let err = MedicalClean::configure(r#"{"min_letter_fraction": 2}"#)
            .err()
            .unwrap();
        assert!(err.contains("[0, 1]"), "{err}");
    }
}
