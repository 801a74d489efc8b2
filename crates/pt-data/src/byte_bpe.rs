//! Byte-level BPE encoding for the tokenizer shapes of BLOOM, Qwen2/3,
//! Llama 3 and GPT-2, giving exactly the ids of the tokenizers crate
//! (`encode(text, add_special_tokens=false)`) at several times its speed.
//!
//! Where the time goes in the tokenizers crate: every piece of text is a
//! `NormalizedString` carrying an alignment pair per byte through the split,
//! the byte-to-character mapping and the model, and every token is a `Token`
//! with its own `String` and offsets. Packing reads ids only, so this encoder
//! works on `&str` slices and writes ids into one vector: the added tokens are
//! split out with Aho-Corasick, the text is normalised (nothing or NFC), split
//! with the `regex` crate (its lazy DFA rather than Oniguruma's backtracking),
//! and each piece's raw bytes are looked up in a per-thread word cache before
//! the merges run. The merge loop is the tokenizers crate's algorithm (a heap
//! of pairs by rank, then position), so ties break the same way.
//!
//! Any other shape — a normaliser or pre-tokenizer it does not know, BPE
//! dropout, byte fallback, truncation set in the file — returns `None`, and
//! the tokenizers crate does the work. `Tokenizer::from_dir` also checks this
//! encoder against the tokenizers crate on a probe text before using it.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use rustc_hash::FxHashMap;
use serde_json::Value;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// The pattern `ByteLevel { use_regex: true }` splits with (GPT-2's).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The lookahead every byte-level pattern ends with, which the `regex` crate
/// cannot run: a whitespace run, less its last character when a non-space
/// follows (so that the space starts the next word). It is rewritten as a
/// plain group and the back-off applied after the match (see `Splitter`).
const WHITESPACE_LOOKAHEAD: &str = r"\s+(?!\S)|\s+";

/// (left id, right id) → (rank, merged id).
type Merges = FxHashMap<(u32, u32), (u32, u32)>;

pub struct ByteLevelBpe {
    /// Added tokens matched in the raw text, then those matched in the
    /// normalised text (the tokenizers crate's two passes).
    raw_added: Option<AddedTokens>,
    normalized_added: Option<AddedTokens>,
    nfc: bool,
    splitter: Splitter,
    byte_ids: [u32; 256],
    merges: Merges,
    /// `ignore_merges` (Llama 3): a piece that is a whole vocabulary entry is
    /// that token, whatever the merges would make of it.
    whole_words: Option<FxHashMap<Box<[u8]>, u32>>,
    /// Which thread-local caches hold this encoder's words.
    instance: u64,
    cache_words: usize,
}

struct AddedTokens {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

struct Splitter {
    regex: Regex,
    /// Group 1 is the rewritten `WHITESPACE_LOOKAHEAD`.
    whitespace_back_off: bool,
}

/// Words (raw bytes of a piece) to their ids, per thread: workers never wait
/// on each other, and the tokenizers crate's cache stops growing at 10,000.
struct WordCache {
    instance: u64,
    words: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

thread_local! {
    static WORD_CACHE: RefCell<WordCache> = RefCell::new(WordCache {
        instance: u64::MAX,
        words: FxHashMap::default(),
    });
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Words each thread keeps unless `set_cache_words` says otherwise (the
/// tokenizers crate's own default).
const DEFAULT_CACHE_WORDS: usize = 10_000;

/// Longer pieces are merged every time, as in the tokenizers crate: a
/// corpus of long unbroken runs must not fill memory with them.
const LONGEST_CACHED_PIECE: usize = 256;

impl ByteLevelBpe {
    /// The encoder for a parsed `tokenizer.json`, or why this shape is left
    /// to the tokenizers crate.
    pub fn from_json(json: &Value) -> Result<Self, String> {
        for key in ["truncation", "padding"] {
            if !json[key].is_null() {
                return Err(format!("`{key}` is set"));
            }
        }
        let nfc = match &json["normalizer"] {
            Value::Null => false,
            n if n["type"] == "NFC" => true,
            n => return Err(format!("normalizer {}", n["type"])),
        };
        let splitter = Splitter::from_pre_tokenizer(&json["pre_tokenizer"])?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(format!("model {}", model["type"]));
        }
        if !model["dropout"].is_null() || model["byte_fallback"] == true {
            return Err("BPE dropout or byte fallback".into());
        }
        for affix in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if model[affix].as_str().is_some_and(|s| !s.is_empty()) {
                return Err(format!("BPE `{affix}`"));
            }
        }
        let vocab: FxHashMap<&str, u32> = model["vocab"]
            .as_object()
            .ok_or("no BPE vocabulary")?
            .iter()
            .map(|(token, id)| Some((token.as_str(), u32::try_from(id.as_u64()?).ok()?)))
            .collect::<Option<_>>()
            .ok_or("a vocabulary id is not a number")?;
        let byte_chars = byte_chars();
        let mut byte_ids = [0u32; 256];
        for (byte, c) in byte_chars.iter().enumerate() {
            byte_ids[byte] = *vocab
                .get(c.to_string().as_str())
                .ok_or_else(|| format!("byte {byte:#04x} has no token"))?;
        }
        let merges = parse_merges(&model["merges"], &vocab)?;
        let whole_words = (model["ignore_merges"] == true).then(|| {
            let byte_of: FxHashMap<char, u8> = byte_chars
                .iter()
                .enumerate()
                .map(|(b, &c)| (c, b as u8))
                .collect();
            vocab
                .iter()
                .filter_map(|(token, &id)| {
                    let bytes: Option<Box<[u8]>> =
                        token.chars().map(|c| byte_of.get(&c).copied()).collect();
                    Some((bytes?, id))
                })
                .collect()
        });
        let (raw_added, normalized_added) = added_tokens(&json["added_tokens"], nfc)?;
        Ok(Self {
            raw_added,
            normalized_added,
            nfc,
            splitter,
            byte_ids,
            merges,
            whole_words,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            cache_words: DEFAULT_CACHE_WORDS,
        })
    }

    /// Words each thread keeps cached (cleared when full).
    pub fn set_cache_words(&mut self, words: usize) {
        self.cache_words = words.max(1);
    }

    /// The ids of `text`, appended to `ids`.
    pub fn encode_into(&self, text: &str, ids: &mut Vec<u32>) {
        WORD_CACHE.with_borrow_mut(|cache| {
            if cache.instance != self.instance {
                cache.instance = self.instance;
                cache.words.clear();
            }
            split_added(self.raw_added.as_ref(), text, ids, |segment, ids| {
                let normalized;
                let segment = if self.nfc && is_nfc_quick(segment.chars()) != IsNormalized::Yes {
                    normalized = segment.nfc().collect::<String>();
                    normalized.as_str()
                } else {
                    segment
                };
                split_added(
                    self.normalized_added.as_ref(),
                    segment,
                    ids,
                    |plain, ids| {
                        self.splitter
                            .for_each_piece(plain, |piece| self.encode_piece(piece, cache, ids));
                    },
                );
            });
        });
    }

    fn encode_piece(&self, piece: &[u8], cache: &mut WordCache, ids: &mut Vec<u32>) {
        if let Some(cached) = cache.words.get(piece) {
            ids.extend_from_slice(cached);
            return;
        }
        let start = ids.len();
        self.merge(piece, ids);
        if piece.len() > LONGEST_CACHED_PIECE {
            return;
        }
        if cache.words.len() >= self.cache_words {
            cache.words.clear();
        }
        cache.words.insert(piece.into(), ids[start..].into());
    }

    /// The tokenizers crate's `Word::merge_all` without dropout: the pair of
    /// lowest rank merges first, the leftmost among equal ranks.
    fn merge(&self, piece: &[u8], ids: &mut Vec<u32>) {
        if let Some(&id) = self.whole_words.as_ref().and_then(|w| w.get(piece)) {
            ids.push(id);
            return;
        }
        const NONE: usize = usize::MAX;
        // A symbol's id, its neighbours, and whether it was merged away.
        struct Symbol {
            id: u32,
            prev: usize,
            next: usize,
            gone: bool,
        }
        let n = piece.len();
        let mut symbols: Vec<Symbol> = piece
            .iter()
            .enumerate()
            .map(|(i, &b)| Symbol {
                id: self.byte_ids[b as usize],
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
                gone: false,
            })
            .collect();
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, pair)| {
                let &(rank, merged) = self.merges.get(&(pair[0].id, pair[1].id))?;
                Some(Reverse((rank, pos, merged)))
            })
            .collect();
        while let Some(Reverse((_, pos, merged))) = queue.pop() {
            let next = symbols[pos].next;
            if symbols[pos].gone || next == NONE {
                continue;
            }
            // Stale: one side has merged with something else since.
            let pair = (symbols[pos].id, symbols[next].id);
            if self.merges.get(&pair).map(|&(_, m)| m) != Some(merged) {
                continue;
            }
            let after = symbols[next].next;
            symbols[next].gone = true;
            symbols[pos].id = merged;
            symbols[pos].next = after;
            if after != NONE {
                symbols[after].prev = pos;
            }
            let prev = symbols[pos].prev;
            if prev != NONE
                && let Some(&(rank, m)) = self.merges.get(&(symbols[prev].id, merged))
            {
                queue.push(Reverse((rank, prev, m)));
            }
            if after != NONE
                && let Some(&(rank, m)) = self.merges.get(&(merged, symbols[after].id))
            {
                queue.push(Reverse((rank, pos, m)));
            }
        }
        ids.extend(symbols.iter().filter(|s| !s.gone).map(|s| s.id));
    }
}

impl Splitter {
    fn from_pre_tokenizer(pre: &Value) -> Result<Self, String> {
        let byte_level = |step: &Value, use_regex: bool| -> Result<(), String> {
            if step["type"] != "ByteLevel" {
                return Err(format!("pre-tokenizer {}", step["type"]));
            }
            if step["add_prefix_space"] == true {
                return Err("ByteLevel `add_prefix_space`".into());
            }
            if step["use_regex"].as_bool().unwrap_or(true) != use_regex {
                return Err("ByteLevel `use_regex` after a Split".into());
            }
            Ok(())
        };
        let pattern = match pre["type"].as_str() {
            Some("ByteLevel") => {
                byte_level(pre, true)?;
                GPT2_PATTERN.to_string()
            }
            Some("Sequence") => {
                let [split, last] = pre["pretokenizers"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                else {
                    return Err("a pre-tokenizer sequence other than Split, ByteLevel".into());
                };
                byte_level(last, false)?;
                if split["type"] != "Split"
                    || split["behavior"] != "Isolated"
                    || split["invert"] == true
                {
                    return Err("a pre-tokenizer sequence other than Split, ByteLevel".into());
                }
                match (
                    split["pattern"]["Regex"].as_str(),
                    split["pattern"]["String"].as_str(),
                ) {
                    (Some(regex), _) => regex.to_string(),
                    (None, Some(literal)) => regex::escape(literal),
                    _ => return Err("a Split without a pattern".into()),
                }
            }
            _ => return Err(format!("pre-tokenizer {}", pre["type"])),
        };
        let whitespace_back_off = pattern.ends_with(WHITESPACE_LOOKAHEAD);
        let pattern = match pattern.strip_suffix(WHITESPACE_LOOKAHEAD) {
            Some(head) => format!(r"{head}(\s+)"),
            None => pattern,
        };
        let regex = Regex::new(&pattern).map_err(|_| format!("split pattern `{pattern}`"))?;
        if regex.is_match("") {
            return Err(format!("split pattern `{pattern}` matches nothing"));
        }
        Ok(Self {
            regex,
            whitespace_back_off,
        })
    }

    /// `Split { behavior: Isolated }`: every match is a piece, and so is
    /// the text between two matches.
    fn for_each_piece(&self, text: &str, mut piece: impl FnMut(&[u8])) {
        let mut at = 0;
        let mut groups = self.regex.capture_locations();
        while at < text.len() {
            let found = if self.whitespace_back_off {
                self.regex
                    .captures_read_at(&mut groups, text, at)
                    .map(|m| (m.start(), back_off(text, m.end(), groups.get(1))))
            } else {
                self.regex.find_at(text, at).map(|m| (m.start(), m.end()))
            };
            let Some((start, end)) = found else { break };
            if start > at {
                piece(&text.as_bytes()[at..start]);
            }
            piece(&text.as_bytes()[start..end]);
            at = end;
        }
        if at < text.len() {
            piece(&text.as_bytes()[at..]);
        }
    }
}

/// The end `\s+(?!\S)|\s+` gives where the rewritten `(\s+)` matched
/// (`run`): a run of two or more before a non-space gives back its last
/// character. The run is maximal, so anything after it is a non-space.
fn back_off(text: &str, end: usize, run: Option<(usize, usize)>) -> usize {
    let Some((run_start, run_end)) = run.filter(|&(_, run_end)| run_end < text.len()) else {
        return end;
    };
    let mut chars = text[run_start..run_end].chars();
    match (chars.next_back(), chars.next()) {
        (Some(last), Some(_)) => run_end - last.len_utf8(),
        _ => end,
    }
}

/// Calls `plain` on the text between added tokens and pushes their ids.
fn split_added(
    added: Option<&AddedTokens>,
    text: &str,
    ids: &mut Vec<u32>,
    mut plain: impl FnMut(&str, &mut Vec<u32>),
) {
    let Some(added) = added else {
        return plain(text, ids);
    };
    let mut at = 0;
    for found in added.matcher.find_iter(text) {
        if found.start() > at {
            plain(&text[at..found.start()], ids);
        }
        ids.push(added.ids[found.pattern().as_usize()]);
        at = found.end();
    }
    if at < text.len() {
        plain(&text[at..], ids);
    }
}

/// The added tokens as the tokenizers crate's `AddedVocabulary` splits
/// them: the longest match leftmost, `normalized: false` ones in the raw
/// text first. Stripping and single-word matching are not supported.
fn added_tokens(
    tokens: &Value,
    nfc: bool,
) -> Result<(Option<AddedTokens>, Option<AddedTokens>), String> {
    let mut raw = (Vec::new(), Vec::new());
    let mut normalized = (Vec::new(), Vec::new());
    for token in tokens.as_array().map(Vec::as_slice).unwrap_or_default() {
        let content = token["content"]
            .as_str()
            .ok_or("an added token without content")?;
        let id = token["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or("an added token without an id")?;
        if ["lstrip", "rstrip", "single_word"]
            .iter()
            .any(|&k| token[k] == true)
        {
            return Err(format!(
                "added token `{content}` strips or matches single words"
            ));
        }
        if content.is_empty() {
            continue;
        }
        let pass = if token["normalized"] == true {
            if nfc && content.nfc().collect::<String>() != content {
                return Err(format!("added token `{content}` changes under NFC"));
            }
            &mut normalized
        } else {
            &mut raw
        };
        pass.0.push(content.to_string());
        pass.1.push(id);
    }
    let build = |(contents, ids): (Vec<String>, Vec<u32>)| -> Result<_, String> {
        if contents.is_empty() {
            return Ok(None);
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&contents)
            .map_err(|e| e.to_string())?;
        Ok(Some(AddedTokens { matcher, ids }))
    };
    Ok((build(raw)?, build(normalized)?))
}

fn parse_merges(merges: &Value, vocab: &FxHashMap<&str, u32>) -> Result<Merges, String> {
    let list = merges.as_array().ok_or("no BPE merges")?;
    let mut parsed = FxHashMap::default();
    parsed.reserve(list.len());
    for (rank, merge) in list.iter().enumerate() {
        let (left, right) = match merge {
            Value::String(s) => s.split_once(' ').ok_or_else(|| format!("merge `{s}`"))?,
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(l), Value::String(r)] => (l.as_str(), r.as_str()),
                _ => return Err(format!("merge {merge}")),
            },
            _ => return Err(format!("merge {merge}")),
        };
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| format!("merge token `{token}` is not in the vocabulary"))
        };
        let merged = id(&format!("{left}{right}"))?;
        // A repeated merge keeps its last rank, as in the tokenizers crate.
        parsed.insert((id(left)?, id(right)?), (rank as u32, merged));
    }
    Ok(parsed)
}

/// GPT-2's printable stand-ins for the 256 byte values, which byte-level
/// vocabularies are written in.
fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut unprintable = 0;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[byte as usize] = if printable {
            char::from(byte)
        } else {
            unprintable += 1;
            char::from_u32(255 + unprintable).expect("below the surrogates")
        };
    }
    chars
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::json;

    use crate::tokenize::Tokenizer;

    const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Every document of the shipped corpus, each whole file, and texts
    /// built to catch the splitting rules out: whitespace runs of every
    /// length before words, punctuation and line ends, and tokens written
    /// into the text.
    fn texts() -> Vec<String> {
        let mut texts = Vec::new();
        for file in crate::corpus::discover(&repo().join("data/pretrain")).unwrap() {
            let read = crate::corpus::read_file(&file, &Default::default()).unwrap();
            texts.extend(read.documents.into_iter().map(|d| d.text));
            texts.push(std::fs::read_to_string(&file).unwrap());
        }
        for spaces in [
            "",
            " ",
            "  ",
            "   ",
            "\t",
            " \t ",
            "\u{3000}\u{3000}",
            "\n",
            " \n ",
            "\r\n\r\n  ",
        ] {
            for next in ["word", "发热", "!", "12345", "'S", "", "\n", " x"] {
                texts.push(format!("a{spaces}{next}"));
                texts.push(format!("{spaces}{next}{spaces}"));
            }
        }
        texts.push("x</s>y<s></s><pad><|im_start|>user\n医学<|im_end|> 医学医学".into());
        texts.push("e\u{301}\u{323} Å ﬃ ǅ ẛ\u{323} 한국어".into());
        texts
    }

    fn variant(
        name: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> (tempfile::TempDir, String) {
        let fixture = repo().join("tests/fixtures/bloom-tiny/model");
        let dir = tempfile::tempdir().unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("tokenizer.json")).unwrap())
                .unwrap();
        edit(&mut json);
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        std::fs::copy(
            fixture.join("tokenizer_config.json"),
            dir.path().join("tokenizer_config.json"),
        )
        .unwrap();
        (dir, name.to_string())
    }

    fn split_then_byte_level(pattern: &str) -> serde_json::Value {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]})
    }

    fn add_tokens(json: &mut serde_json::Value, tokens: &[(&str, bool)]) {
        let added = json["added_tokens"].as_array_mut().unwrap();
        // After the fixture's 2000 tokens.
        for (id, &(content, normalized)) in (2000..).zip(tokens) {
            added.push(json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": normalized, "special": !normalized}));
        }
    }

    #[test]
    fn byte_level_bpe_gives_the_tokenizers_crate_ids() {
        let variants = [
            variant("BLOOM", |_| {}),
            variant("GPT-2", |json| {
                json["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": false,
                    "trim_offsets": true, "use_regex": true});
            }),
            variant("Qwen2", |json| {
                json["normalizer"] = json!({"type": "NFC"});
                json["pre_tokenizer"] = split_then_byte_level(QWEN2_PATTERN);
                add_tokens(
                    json,
                    &[
                        ("<|im_start|>", false),
                        ("<|im_end|>", false),
                        ("医学", true),
                    ],
                );
            }),
            variant("Llama 3", |json| {
                json["pre_tokenizer"] = split_then_byte_level(LLAMA3_PATTERN);
                json["model"]["ignore_merges"] = json!(true);
            }),
        ];
        let texts = texts();
        for (dir, name) in &variants {
            let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
            assert!(tokenizer.uses_byte_level_bpe(), "{name}");
            let mut compared = 0;
            for text in &texts {
                let expected = tokenizer.inner().encode_fast(text.as_str(), false).unwrap();
                assert_eq!(
                    tokenizer.encode(text).unwrap(),
                    expected.get_ids(),
                    "{name}: {text:?}"
                );
                compared += expected.get_ids().len();
            }
            assert!(compared > 1_000_000, "{name}: {compared} ids");
        }
    }

    #[test]
    fn other_tokenizer_shapes_are_left_to_the_tokenizers_crate() {
        let variants = [
            variant("Metaspace", |json| {
                json["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁",
                    "prepend_scheme": "always", "split": true});
            }),
            variant("byte fallback", |json| {
                json["model"]["byte_fallback"] = json!(true)
            }),
            variant("NFKC", |json| json["normalizer"] = json!({"type": "NFKC"})),
            variant("prefix space", |json| {
                json["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = json!(true);
            }),
            variant("stripped added token", |json| {
                json["added_tokens"][2]["lstrip"] = json!(true);
            }),
        ];
        for (dir, name) in &variants {
            let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
            assert!(!tokenizer.uses_byte_level_bpe(), "{name}");
            let text = "发热是 common  </s>";
            let expected = tokenizer.inner().encode_fast(text, false).unwrap();
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                expected.get_ids(),
                "{name}"
            );
        }
    }
}
