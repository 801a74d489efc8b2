//! Text a plugin controls (ids, drop reasons, error messages, captured stderr)
//! is untrusted: it is bounded before it is stored, escaped before it reaches a
//! terminal, and JSON-escaped in full (C1 included) before it reaches a file.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters a terminal may act on rather than show: C0 and C1 controls,
/// DEL, and the bidirectional overrides that reorder what a reader sees.
fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every terminal hazard written as `\u{XX}`, so that ESC, BEL,
/// CSI, OSC or a bidi override print as inert text. With `keep_newlines`,
/// `\n` and `\t` stay (multi-line messages); without, they are escaped too
/// (one-line values such as a drop reason).
pub fn escape_controls(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let kept = |c: char| keep_newlines && (c == '\n' || c == '\t');
    escape_where(
        text,
        |c| is_hazard(c) && !kept(c),
        |out, c| write!(out, "\\u{{{:x}}}", c as u32),
    )
}

/// `text` with each character `escaped` selects written by `write`.
fn escape_where(
    text: &str,
    escaped: impl Fn(char) -> bool,
    write: impl Fn(&mut String, char) -> std::fmt::Result,
) -> Cow<'_, str> {
    if !text.chars().any(&escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            let _ = write(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` cut to at most `max_bytes` (on a character boundary), with `…`
/// marking a cut. A cut string is a new, small allocation: truncating in
/// place would keep the plugin's whole buffer alive.
pub fn bounded(text: String, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text;
    }
    let mut cut = max_bytes.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut kept = String::with_capacity(cut + '…'.len_utf8());
    kept.push_str(&text[..cut]);
    kept.push('…');
    kept
}

/// serde_json escapes only C0, `"` and `\\` in strings; this also writes
/// DEL, C1 and the bidi overrides as `\uXXXX`, so a JSON file shown in a
/// terminal is as inert as our own output — and still decodes to the exact
/// text. (Outside strings JSON is ASCII, and its only C0 characters are the
/// layout's newlines and indentation, which stay.)
fn inert(json: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8(json).expect("serde_json writes UTF-8");
    match escape_where(
        &text,
        |c| is_hazard(c) && !c.is_ascii_control(),
        |out, c| write!(out, "\\u{:04x}", c as u32),
    ) {
        Cow::Borrowed(_) => text.into_bytes(),
        Cow::Owned(escaped) => escaped.into_bytes(),
    }
}

/// `value` as one line of JSON with every terminal hazard escaped.
pub fn to_inert_json<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(value).map(inert)
}

/// [`to_inert_json`], pretty-printed.
pub fn to_inert_json_pretty<T: serde::Serialize + ?Sized>(
    value: &T,
) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map(inert)
}

/// Hangul, kana and Han characters: scripts written without spaces between
/// words.
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF
        | 0xF900..=0xFAFF | 0x20000..=0x2FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_hazards_are_escaped_and_plain_text_is_borrowed() {
        let hostile = "a\u{1b}[2J\u{7}b\u{9b}31m\u{202e}c\r\nd\te";
        assert_eq!(
            escape_controls(hostile, false),
            "a\\u{1b}[2J\\u{7}b\\u{9b}31m\\u{202e}c\\u{d}\\u{a}d\\u{9}e"
        );
        assert_eq!(
            escape_controls(hostile, true),
            "a\\u{1b}[2J\\u{7}b\\u{9b}31m\\u{202e}c\\u{d}\nd\te"
        );
        assert!(matches!(
            escape_controls("发热 fever: ok", false),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        assert_eq!(bounded("abc".into(), 3), "abc");
        let cut = bounded("发热发热".into(), 8);
        assert!(cut.len() <= 8, "{cut}");
        assert_eq!(cut, "发…");
        // The cut string does not hold on to the original's buffer.
        assert!(bounded("x".repeat(1 << 20), 120).capacity() <= 120);
    }

    #[test]
    fn json_escapes_c1_and_round_trips_exactly() {
        let text = "x\u{1b}]0;title\u{7}y\u{85}z\u{9b}\u{202e}发";
        let json = to_inert_json(&serde_json::json!({ "reason": text })).unwrap();
        let line = String::from_utf8(json).unwrap();
        assert!(line.chars().all(|c| !is_hazard(c)), "{line}");
        assert!(line.contains("\\u0085") && line.contains("\\u009b") && line.contains("\\u202e"));
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["reason"], text);
    }
}
