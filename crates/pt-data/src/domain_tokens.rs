//! Domain tokens for an existing tokenizer: the path MedicalGPT's users take
//! with `build_domain_tokenizer.py` + `merge_tokenizers.py`, in one step.
//!
//! Candidates are the pieces a BPE learns on the corpus's CJK text (where a
//! base vocabulary spends several tokens per word) and whole words elsewhere
//! (a piece of a Latin word would split words the base tokenizer already
//! handles). They are chosen greedily by the tokens they save under the base
//! tokenizer; an occurrence a chosen token already covers counts for no other
//! candidate, so `高血压` and `血压` are not both chosen for the same text.
//! Words are kept only if, as a group, they lower the corpus's token count.
//! Chosen tokens are added as ordinary (non-special) added tokens, as
//! `tokenizer.add_tokens` does: every old id keeps its meaning, new ids follow
//! the old ones. The result is then measured with the real tokenizer: tokens
//! the added-token matcher rarely picks are dropped, and the tokens-per-
//! character before and after are reported.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use aho_corasick::AhoCorasick;
use anyhow::{Context, Result, anyhow};
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::{AddedToken, Trainer};

use crate::text::is_cjk;

/// What to learn.
#[derive(Clone, Debug)]
pub struct DomainTokenOptions {
    /// At most this many tokens are added.
    pub num_new_tokens: usize,
    /// A token must be used at least this often in the corpus.
    pub min_frequency: u64,
    /// Longest CJK token, in characters.
    pub max_token_chars: usize,
}

/// One added token and how the corpus uses it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NewToken {
    pub token: String,
    pub id: u32,
    /// Times the extended tokenizer emits it on the corpus.
    pub uses: u64,
    /// Tokens the base tokenizer spends on it alone.
    pub base_tokens: usize,
}

/// Tokens spent on a text.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Cost {
    pub characters: u64,
    pub tokens: u64,
}

impl Cost {
    pub fn tokens_per_character(&self) -> f64 {
        self.tokens as f64 / self.characters.max(1) as f64
    }
}

/// A tokenizer extended with domain tokens, measured on the corpus.
#[derive(Debug, serde::Serialize)]
pub struct Extension {
    /// The base tokenizer's size: the first new id.
    pub base_vocab_size: usize,
    pub before: Cost,
    pub after: Cost,
    pub new_tokens: Vec<NewToken>,
    #[serde(skip)]
    pub tokenizer: tokenizers::Tokenizer,
}

/// Where a new token may come from: runs of CJK characters, and words of
/// other letters with the space before them (byte-level vocabularies hold
/// words that way). Digits, punctuation and whitespace never start one.
fn units(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    // (byte start, is CJK) of the unit being read.
    let mut open: Option<(usize, bool)> = None;
    let mut previous: Option<(usize, char)> = None;
    for (at, c) in text.char_indices() {
        let class = if is_cjk(c) {
            Some(true)
        } else if c.is_alphabetic() {
            Some(false)
        } else {
            None
        };
        if open.map(|(_, cjk)| Some(cjk)) != Some(class) {
            if let Some((start, _)) = open.take() {
                found.push(&text[start..at]);
            }
            open = class.map(|cjk| match previous {
                Some((space, ' ')) if !cjk => (space, cjk),
                _ => (at, cjk),
            });
        }
        previous = Some((at, c));
    }
    if let Some((start, _)) = open {
        found.push(&text[start..]);
    }
    found
}

fn starts_cjk(unit: &str) -> bool {
    unit.chars().next().is_some_and(is_cjk)
}

/// The base tokenizer's token count for `text` alone.
fn base_cost(base: &tokenizers::Tokenizer, text: &str) -> Result<usize> {
    // Inside text, after a line break: SentencePiece-style tokenizers
    // prepend `▁` to the start of the input only, which no occurrence in a
    // document pays for.
    let count = |text: &str| -> Result<usize> {
        Ok(base.encode(text, false).map_err(|e| anyhow!("{e}"))?.len())
    };
    Ok(count(&format!("\n{text}"))? - count("\n")?)
}

/// Added tokens are matched in the normalized text; a normalizer that
/// prepends to the input (the legacy SentencePiece layout: `Prepend("▁")`)
/// would prepend to each added token too, so that they match only where a
/// word starts a text. Such a tokenizer is refused with the fix.
fn check_added_tokens_can_match(base: &tokenizers::Tokenizer) -> Result<()> {
    use tokenizers::{NormalizedString, Normalizer};
    let Some(normalizer) = base.get_normalizer() else {
        return Ok(());
    };
    let mut probe = NormalizedString::from("a");
    normalizer
        .normalize(&mut probe)
        .map_err(|e| anyhow!("the tokenizer's normalizer fails: {e}"))?;
    if probe.get().len() > 1 && probe.get().ends_with('a') {
        anyhow::bail!(
            "this tokenizer's normalizer prepends {:?} to every input (the legacy SentencePiece layout of Llama 2 / Mistral v0.1 tokenizer.json), \
             so added tokens could match only at the start of a text. Convert it to the Metaspace pre-tokenizer with prepend_scheme \"first\" \
             (transformers: AutoTokenizer.from_pretrained(DIR, legacy=False, from_slow=True).save_pretrained(NEW_DIR)) and extend that",
            &probe.get()[..probe.get().len() - 1]
        );
    }
    Ok(())
}

/// The pieces a BPE trained on the CJK units merges, in merge order.
fn cjk_pieces(
    documents: &[String],
    counts: &[(&str, u64)],
    options: &DomainTokenOptions,
) -> Result<Vec<String>> {
    let mut alphabet: Vec<char> = counts
        .iter()
        .filter(|(unit, _)| starts_cjk(unit))
        .flat_map(|(unit, _)| unit.chars())
        .collect();
    alphabet.sort_unstable();
    alphabet.dedup();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(alphabet.len() + 4 * options.num_new_tokens)
        .min_frequency(options.min_frequency)
        .max_token_length(Some(options.max_token_chars))
        .show_progress(false)
        .build();
    trainer
        .feed(documents.iter(), |text| {
            Ok(units(text)
                .into_iter()
                .filter(|unit| starts_cjk(unit))
                .map(String::from)
                .collect())
        })
        .map_err(|e| anyhow!("cannot count the corpus's words: {e}"))?;
    let mut bpe = BPE::default();
    trainer
        .train(&mut bpe)
        .map_err(|e| anyhow!("cannot learn the corpus's pieces: {e}"))?;
    let mut pieces: Vec<(String, u32)> = bpe.get_vocab().into_iter().collect();
    pieces.sort_by_key(|(_, id)| *id);
    Ok(pieces
        .into_iter()
        .map(|(piece, _)| piece)
        .filter(|piece| piece.chars().count() >= 2)
        .collect())
}

/// Where a candidate occurs (unit index, byte offset) and the tokens it
/// saves there.
struct Occurrence {
    unit: u32,
    start: u32,
    saving: i64,
}

struct Candidate {
    token: String,
    occurrences: Vec<Occurrence>,
}

/// The base tokenizer's token counts, remembered.
struct BaseCost<'a> {
    base: &'a tokenizers::Tokenizer,
    known: HashMap<String, i64>,
}

impl BaseCost<'_> {
    fn of(&mut self, text: &str) -> Result<i64> {
        if text.is_empty() {
            return Ok(0);
        }
        if let Some(&cost) = self.known.get(text) {
            return Ok(cost);
        }
        let cost = base_cost(self.base, text)? as i64;
        self.known.insert(text.to_string(), cost);
        Ok(cost)
    }
}

/// Up to `options.num_new_tokens` tokens for `documents`, best first.
pub fn learn_domain_tokens(
    base: &tokenizers::Tokenizer,
    documents: &[String],
    options: &DomainTokenOptions,
) -> Result<Vec<String>> {
    let mut counted: HashMap<&str, u64> = HashMap::new();
    for document in documents {
        for unit in units(document) {
            *counted.entry(unit).or_default() += 1;
        }
    }
    // Sorted: the choice must not depend on hash order.
    let mut counts: Vec<(&str, u64)> = counted.into_iter().collect();
    counts.sort_unstable();
    let words = counts
        .iter()
        .filter(|(unit, count)| {
            !starts_cjk(unit) && *count >= options.min_frequency && unit.trim().chars().count() >= 2
        })
        .map(|(unit, _)| unit.to_string());
    let mut texts: Vec<String> = cjk_pieces(documents, &counts, options)?
        .into_iter()
        .chain(words)
        .collect();
    texts.sort_unstable();
    texts.dedup();
    let mut cost = BaseCost {
        base,
        known: HashMap::new(),
    };
    let mut candidates = Vec::new();
    for token in texts {
        if cost.of(&token)? >= 2 {
            candidates.push(Candidate {
                token,
                occurrences: Vec::new(),
            });
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let matcher = AhoCorasick::new(candidates.iter().map(|c| &c.token))?;
    for (index, (unit, _)) in counts.iter().enumerate() {
        for found in matcher.find_overlapping_iter(unit) {
            let candidate = &mut candidates[found.pattern().as_usize()];
            // In a CJK run, the token's own cost less one (a byte-level
            // vocabulary rarely merges across its characters). In a word,
            // exactly: a token matching inside a longer word splits it, and
            // may cost more than it saves.
            let saving = if starts_cjk(unit) {
                cost.of(&candidate.token)? - 1
            } else {
                let (before, after) = (&unit[..found.start()], &unit[found.end()..]);
                cost.of(unit)? - cost.of(before)? - 1 - cost.of(after)?
            };
            candidate.occurrences.push(Occurrence {
                unit: index as u32,
                start: found.start() as u32,
                saving,
            });
        }
    }
    Ok(choose(&candidates, &counts, options))
}

/// Lazy greedy choice: the candidate saving the most tokens on occurrences
/// no chosen token covers yet, until `num_new_tokens` are chosen. Savings
/// only shrink as tokens are chosen, so a stale queue entry is an upper
/// bound and is re-scored when it comes up.
fn choose(
    candidates: &[Candidate],
    counts: &[(&str, u64)],
    options: &DomainTokenOptions,
) -> Vec<String> {
    let mut claimed: Vec<Vec<bool>> = counts.iter().map(|(u, _)| vec![false; u.len()]).collect();
    let free = |claimed: &Vec<Vec<bool>>, at: &Occurrence, len: usize| {
        let start = at.start as usize;
        !claimed[at.unit as usize][start..start + len].contains(&true)
    };
    // (uses, tokens saved) on free occurrences.
    let score = |claimed: &Vec<Vec<bool>>, candidate: &Candidate| -> (u64, i64) {
        candidate
            .occurrences
            .iter()
            .filter(|at| free(claimed, at, candidate.token.len()))
            .map(|at| {
                let count = counts[at.unit as usize].1;
                (count, count as i64 * at.saving)
            })
            .fold((0, 0), |(u, s), (count, saved)| (u + count, s + saved))
    };
    let mut queue: BinaryHeap<(i64, Reverse<usize>)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (score(&claimed, c).1, Reverse(i)))
        .filter(|(saved, _)| *saved > 0)
        .collect();
    let mut chosen = Vec::new();
    while let Some((saved, Reverse(i))) = queue.pop() {
        let candidate = &candidates[i];
        let (uses, now) = score(&claimed, candidate);
        if now < saved {
            if now > 0 {
                queue.push((now, Reverse(i)));
            }
            continue;
        }
        if uses < options.min_frequency {
            continue;
        }
        for at in &candidate.occurrences {
            if free(&claimed, at, candidate.token.len()) {
                let start = at.start as usize;
                claimed[at.unit as usize][start..start + candidate.token.len()].fill(true);
            }
        }
        chosen.push(candidate.token.clone());
        if chosen.len() == options.num_new_tokens {
            break;
        }
    }
    chosen
}

/// Tokens (and characters) `tokenizer` spends on `documents`, with each
/// id's count at or above `first_counted`.
fn measure(
    tokenizer: &tokenizers::Tokenizer,
    documents: &[String],
    first_counted: u32,
) -> Result<(Cost, HashMap<u32, u64>)> {
    let mut cost = Cost::default();
    let mut uses: HashMap<u32, u64> = HashMap::new();
    // In batches: an encoding holds far more than its ids.
    for batch in documents.chunks(1024) {
        let encodings = tokenizer
            .encode_batch(batch.iter().map(String::as_str).collect(), false)
            .map_err(|e| anyhow!("cannot tokenize the corpus: {e}"))?;
        for (document, encoding) in batch.iter().zip(&encodings) {
            cost.characters += document.chars().count() as u64;
            cost.tokens += encoding.len() as u64;
            for &id in encoding.get_ids() {
                if id >= first_counted {
                    *uses.entry(id).or_default() += 1;
                }
            }
        }
    }
    Ok((cost, uses))
}

/// `base` with `tokens` added as ordinary tokens.
fn added(base: &tokenizers::Tokenizer, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let mut extended = base.clone();
    extended
        .add_tokens(tokens.iter().map(|t| AddedToken::from(t.clone(), false)))
        .map_err(|e| anyhow!("cannot add tokens: {e}"))?;
    Ok(extended)
}

/// `base` with those of `tokens` added that encode alone to their own id
/// and decode back to themselves.
fn with_tokens(base: &tokenizers::Tokenizer, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let extended = added(base, tokens)?;
    let round_trips = |token: &String| -> bool {
        let Some(id) = extended.token_to_id(token) else {
            return false;
        };
        let encoded = extended.encode(token.as_str(), false);
        encoded.is_ok_and(|e| e.get_ids() == [id])
            && extended.decode(&[id], false).is_ok_and(|d| d == *token)
    };
    let kept: Vec<String> = tokens.iter().filter(|t| round_trips(t)).cloned().collect();
    if kept.len() == tokens.len() {
        return Ok(extended);
    }
    added(base, &kept)
}

/// Learns domain tokens on `documents` and adds them to `base`: tokens the
/// extended tokenizer uses fewer than `min_frequency` times on the corpus
/// (a longer added token took their place) are dropped, and the cost of the
/// corpus before and after is measured.
pub fn extend_tokenizer(
    base: &tokenizers::Tokenizer,
    documents: &[String],
    options: &DomainTokenOptions,
) -> Result<Extension> {
    check_added_tokens_can_match(base)?;
    let base_vocab_size = base.get_vocab_size(true);
    let first_new = base_vocab_size as u32;
    let (before, _) = measure(base, documents, u32::MAX)?;
    let learned = learn_domain_tokens(base, documents, options)?;
    // Words of other scripts can break merges the cost model does not see
    // (SentencePiece vocabularies merge across `▁`): they are kept only if,
    // added after the CJK tokens, they lower the corpus's token count.
    let (cjk, words): (Vec<String>, Vec<String>) =
        learned.into_iter().partition(|token| starts_cjk(token));
    let mut tokenizer = with_tokens(base, &cjk)?;
    let (mut after, mut uses) = measure(&tokenizer, documents, first_new)?;
    if !words.is_empty() {
        let with_words = with_tokens(base, &[cjk, words].concat())?;
        let (cost, used) = measure(&with_words, documents, first_new)?;
        if cost.tokens < after.tokens {
            (tokenizer, after, uses) = (with_words, cost, used);
        }
    }
    let used: Vec<String> = (first_new..tokenizer.get_vocab_size(true) as u32)
        .filter(|id| uses.get(id).copied().unwrap_or(0) >= options.min_frequency)
        .filter_map(|id| tokenizer.id_to_token(id))
        .collect();
    if used.len() < tokenizer.get_vocab_size(true) - base_vocab_size {
        tokenizer = with_tokens(base, &used)?;
        (after, uses) = measure(&tokenizer, documents, first_new)?;
    }
    let new_tokens = (first_new..tokenizer.get_vocab_size(true) as u32)
        .filter_map(|id| tokenizer.id_to_token(id).map(|token| (id, token)))
        .map(|(id, token)| {
            Ok(NewToken {
                base_tokens: base_cost(base, &token)?,
                uses: uses.get(&id).copied().unwrap_or(0),
                token,
                id,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Extension {
        base_vocab_size,
        before,
        after,
        new_tokens,
        tokenizer,
    })
}

/// Writes the extended tokenizer as a tokenizer directory transformers
/// loads: `tokenizer.json`, `tokenizer_config.json` (with the new tokens in
/// `added_tokens_decoder`, as `save_pretrained` writes them) and
/// `special_tokens_map.json` from `base_dir`.
pub fn save_extended(extension: &Extension, base_dir: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let json_path = dir.join("tokenizer.json");
    extension
        .tokenizer
        .save(&json_path, true)
        .map_err(|e| anyhow!("{}: cannot write: {e}", json_path.display()))?;
    let config_path = base_dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = match std::fs::read(&config_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: malformed JSON", config_path.display()))?,
        Err(_) => serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"}),
    };
    if let Some(decoder) = config
        .get_mut("added_tokens_decoder")
        .and_then(|d| d.as_object_mut())
    {
        for token in &extension.new_tokens {
            decoder.insert(
                token.id.to_string(),
                serde_json::json!({
                    "content": token.token, "lstrip": false, "normalized": true,
                    "rstrip": false, "single_word": false, "special": false,
                }),
            );
        }
    }
    let written = dir.join("tokenizer_config.json");
    std::fs::write(&written, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("{}: cannot write", written.display()))?;
    let special = base_dir.join("special_tokens_map.json");
    if special.is_file() {
        std::fs::copy(&special, dir.join("special_tokens_map.json"))
            .with_context(|| format!("{}: cannot copy", special.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small byte-level base vocabulary that has seen none of the domain's words.
    fn base_tokenizer() -> tokenizers::Tokenizer {
        let general: Vec<String> = (0..50)
            .map(|i| format!("The weather is fine today {i}. 今天天气很好。\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        crate::tokenize::train_tokenizer(&general, 300, dir.path())
            .unwrap()
            .inner()
            .clone()
    }

    fn domain_corpus() -> Vec<String> {
        let mut documents = Vec::new();
        for i in 0..60 {
            documents.push(format!("高血压患者 take metformin daily ({i}).\n"));
        }
        // Below --min_frequency: never a token.
        for _ in 0..5 {
            documents.push("罕见甲乙丙丁\n".to_string());
        }
        documents
    }

    #[test]
    fn domain_tokens_extend_without_moving_old_ids_and_save_tokens() {
        let base = base_tokenizer();
        let corpus = domain_corpus();
        let options = DomainTokenOptions {
            num_new_tokens: 50,
            min_frequency: 10,
            max_token_chars: 8,
        };
        let extension = extend_tokenizer(&base, &corpus, &options).unwrap();
        let extended = &extension.tokenizer;
        for (token, id) in base.get_vocab(true) {
            assert_eq!(extended.token_to_id(&token), Some(id), "{token}");
        }
        let tokens: Vec<&str> = extension
            .new_tokens
            .iter()
            .map(|t| t.token.as_str())
            .collect();
        for (offset, token) in extension.new_tokens.iter().enumerate() {
            assert_eq!(token.id as usize, base.get_vocab_size(true) + offset);
            assert!(token.uses >= 10 && token.base_tokens >= 2, "{token:?}");
        }
        // The whole run is one token; its parts, covered by it, are not chosen.
        assert!(tokens.contains(&"高血压患者"), "{tokens:?}");
        assert!(!tokens.contains(&"血压"), "{tokens:?}");
        assert!(tokens.contains(&" metformin"), "{tokens:?}");
        assert!(!tokens.iter().any(|t| t.contains('甲')), "{tokens:?}");
        let text = "高血压患者 take metformin daily.\n";
        let ids = extended.encode(text, false).unwrap();
        assert_eq!(extended.decode(ids.get_ids(), false).unwrap(), text);
        assert!(ids.len() < base.encode(text, false).unwrap().len());
        let (before, after) = (extension.before, extension.after);
        assert_eq!(before.characters, after.characters);
        assert!(after.tokens * 2 < before.tokens, "{before:?} → {after:?}");
        let again = learn_domain_tokens(&base, &corpus, &options).unwrap();
        assert_eq!(
            learn_domain_tokens(&base, &corpus, &options).unwrap(),
            again
        );
    }

    /// A SentencePiece-style tokenizer (Metaspace, byte fallback), as the
    /// Llama 2 and Mistral tokenizer.json files are; `legacy` puts the `▁`
    /// in a `Prepend` normalizer as their old files do.
    fn sentencepiece_tokenizer(legacy: bool) -> tokenizers::Tokenizer {
        use tokenizers::decoders::sequence::Sequence as Decoders;
        use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::normalizers::{prepend::Prepend, replace::Replace};
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        let model = BPE::builder().byte_fallback(true).build().unwrap();
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        if legacy {
            tokenizer
                .with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
                    Prepend::new("▁".into()).into(),
                    Replace::new(" ", "▁").unwrap().into(),
                ])))
                .unwrap();
        } else {
            tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
            tokenizer.with_decoder(Some(Decoders::new(vec![
                Metaspace::new('▁', PrependScheme::First, false).into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ])));
        }
        let bytes: Vec<AddedToken> = (0..=255u8)
            .map(|b| AddedToken::from(format!("<0x{b:02X}>"), true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(400)
            .special_tokens(bytes)
            .show_progress(false)
            .build()
            .into();
        let general: Vec<String> = (0..50)
            .map(|i| format!("The weather is fine {i}."))
            .collect();
        tokenizer.train(&mut trainer, general.iter()).unwrap();
        tokenizer
    }

    #[test]
    fn sentencepiece_tokenizers_extend_and_legacy_ones_are_refused_with_the_fix() {
        let options = DomainTokenOptions {
            num_new_tokens: 20,
            min_frequency: 10,
            max_token_chars: 8,
        };
        let corpus = domain_corpus();
        let extension =
            extend_tokenizer(&sentencepiece_tokenizer(false), &corpus, &options).unwrap();
        let tokens: Vec<&str> = extension
            .new_tokens
            .iter()
            .map(|t| t.token.as_str())
            .collect();
        assert!(tokens.contains(&"高血压患者"), "{tokens:?}");
        assert!(extension.after.tokens * 2 < extension.before.tokens);
        let text = "The 高血压患者 take metformin.";
        let ids = extension.tokenizer.encode(text, false).unwrap();
        assert_eq!(
            extension.tokenizer.decode(ids.get_ids(), false).unwrap(),
            text
        );
        let error =
            extend_tokenizer(&sentencepiece_tokenizer(true), &corpus, &options).unwrap_err();
        assert!(format!("{error}").contains("prepends \"▁\""), "{error}");
    }

    #[test]
    fn units_are_cjk_runs_and_words_with_their_space() {
        assert_eq!(
            units("高血压患者, take aspirin 2次/日。Hypertension"),
            [
                "高血压患者",
                " take",
                " aspirin",
                "次",
                "日",
                "Hypertension"
            ]
        );
        assert_eq!(units("  x"), [" x"]);
    }
}
