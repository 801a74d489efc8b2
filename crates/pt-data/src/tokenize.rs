//! The tokenizer as packing needs it: ids without special tokens, and EOS.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

use crate::byte_bpe::ByteLevelBpe;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same ids as `inner` without special tokens, several times faster,
    /// for the byte-level BPE shapes it knows (`byte_bpe.rs`).
    byte_level: Option<ByteLevelBpe>,
    pub eos_id: u32,
    /// Padding for `--packing false`: the pad token, else EOS.
    pub pad_id: u32,
    /// sha256 of `tokenizer.json` and `tokenizer_config.json`, for the cache key.
    pub digest: String,
    /// `model_max_length` of `tokenizer_config.json`, when it is a real limit
    /// (HF writes 1e30 for "none").
    pub model_max_length: Option<usize>,
}

/// A model directory without a readable `tokenizer.json`.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read the tokenizer", .0.display())]
pub struct MissingTokenizer(pub std::path::PathBuf);

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory; EOS and pad tokens come
    /// from `tokenizer_config.json` when present, else `</s>` / `<pad>`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let json = std::fs::read(&json_path).context(MissingTokenizer(json_path.clone()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| anyhow!("{}: not a valid tokenizer: {e}", json_path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: malformed JSON", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let token_name = |key: &str, default: &str| -> String {
            match &config[key] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let eos = token_name("eos_token", "</s>");
        let eos_id = inner.token_to_id(&eos).ok_or_else(|| {
            anyhow!(
                "{}: the EOS token `{eos}` is not in the vocabulary",
                json_path.display()
            )
        })?;
        let pad_id = inner
            .token_to_id(&token_name("pad_token", "<pad>"))
            .unwrap_or(eos_id);
        let model_max_length = config["model_max_length"]
            .as_f64()
            .filter(|n| (1.0..1e12).contains(n))
            .map(|n| n as usize);
        let mut hasher = Sha256::new();
        hasher.update(&json);
        hasher.update(config.to_string());
        let byte_level = match serde_json::from_slice::<serde_json::Value>(&json)
            .map_err(|e| e.to_string())
            .and_then(|parsed| ByteLevelBpe::from_json(&parsed))
        {
            Err(why) => {
                tracing::debug!(
                    "{}: tokenized by the tokenizers crate: {why}",
                    json_path.display()
                );
                None
            }
            Ok(encoder) if agrees_on_probe(&encoder, &inner) => Some(encoder),
            Ok(_) => {
                tracing::warn!(
                    "{}: pt-host's byte-level BPE gives other ids than the tokenizers crate on its probe text, so the (slower) tokenizers crate tokenizes; please report this tokenizer.json",
                    json_path.display()
                );
                None
            }
        };
        Ok(Self {
            inner,
            byte_level,
            eos_id,
            pad_id,
            digest: hex::encode(hasher.finalize()),
            model_max_length,
        })
    }

    /// Leaves all encoding to the tokenizers crate (benchmarks and tests
    /// compare the two).
    pub fn use_tokenizers_crate(&mut self) {
        self.byte_level = None;
    }

    /// Whether ids without special tokens come from pt-host's byte-level
    /// BPE rather than the tokenizers crate.
    pub fn uses_byte_level_bpe(&self) -> bool {
        self.byte_level.is_some()
    }

    /// The HF tokenizer itself.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Text of token ids, special tokens (EOS between documents) left out.
    /// Lets each thread keep the BPE merges of up to `words` distinct words
    /// (a few hundred bytes each). The tokenizers crate keeps 10,000 and then
    /// stops adding: a corpus has many more, and merging a word again costs
    /// more than looking it up (preparation ran 1.5× faster with 50,000 per
    /// worker on the benchmark corpus; docs/performance.md). No effect on ids
    /// nor on other models.
    pub fn cache_words(&mut self, words: usize) {
        if let Some(encoder) = &mut self.byte_level {
            encoder.set_cache_words(words);
        }
        if let tokenizers::ModelWrapper::BPE(bpe) = self.inner.get_model() {
            let mut bpe = bpe.clone();
            bpe.resize_cache(words);
            self.inner.with_model(bpe);
        }
    }

    /// One more than the largest id the tokenizer can produce.
    pub fn id_bound(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode tokens: {e}"))
    }

    /// Token ids of `text`, without special tokens (a prompt).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, false)
    }

    /// Ids as HF's `tokenizer.encode(text)` gives them: with what the
    /// post-processor adds (a BOS for Llama; nothing for BLOOM or Qwen).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, true)
    }

    /// Offsets, which nothing here reads, are not computed: the same ids,
    /// faster.
    fn ids(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>> {
        if let (Some(encoder), false) = (&self.byte_level, special_tokens) {
            let mut ids = Vec::with_capacity(text.len() / 2);
            encoder.encode_into(text, &mut ids);
            return Ok(ids);
        }
        let encoding = self
            .inner
            .encode_fast(text, special_tokens)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of one document, without special tokens, ending with EOS.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }
}

/// Text that exercises what tells tokenizers apart: runs of spaces before
/// words and at the end, newlines, tabs, CJK and its punctuation, contractions
/// in both cases, digits, decomposed accents (NFC), emoji, special tokens.
const PROBE: &str = "Fever  is   common.\n\n\tTHEY'RE here, it's 3.14159 km² \u{3000}发热是传染病最常见的症状之一。\
    （病因）：cafe\u{301} ﬁ ſ'S Ⅻ ١٢٣ 😀!!  \r\n</s><s>x<pad> <unk>  ";

/// The byte-level encoder is used only where it gives the tokenizers
/// crate's ids on `PROBE`: a difference is a pt-host bug worth a report, and
/// the crate's ids are never silently replaced by different ones.
fn agrees_on_probe(encoder: &ByteLevelBpe, reference: &tokenizers::Tokenizer) -> bool {
    let mut ids = Vec::new();
    encoder.encode_into(PROBE, &mut ids);
    reference
        .encode_fast(PROBE, false)
        .is_ok_and(|expected| expected.get_ids() == ids)
}

/// BLOOM's special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];

/// Trains a byte-level BPE tokenizer shaped like BLOOM's (its split regex,
/// byte-level pre-tokenizer and decoder, `<unk> <s> </s> <pad>` = 0..3) on
/// `documents`, and writes `tokenizer.json`, `tokenizer_config.json` and
/// `special_tokens_map.json` into `dir`.
pub fn train_tokenizer(documents: &[String], vocab_size: usize, dir: &Path) -> Result<Tokenizer> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainer};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior};

    let minimum = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
    if vocab_size <= minimum {
        anyhow::bail!("a byte-level vocabulary needs more than {minimum} tokens, got {vocab_size}");
    }
    let model = BPE::builder()
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    let split = Split::new(
        SplitPattern::Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+".into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, documents.iter())
        .map_err(|e| anyhow!("cannot train the tokenizer: {e}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let json_path = dir.join("tokenizer.json");
    tokenizer
        .save(&json_path, false)
        .map_err(|e| anyhow!("{}: cannot write: {e}", json_path.display()))?;
    let special = serde_json::json!({
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
    });
    let mut config = special.clone();
    config["tokenizer_class"] = "PreTrainedTokenizerFast".into();
    config["padding_side"] = "left".into();
    config["model_max_length"] = 1_000_000_000.into();
    for (file, value) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special),
    ] {
        std::fs::write(dir.join(file), serde_json::to_vec_pretty(&value)?)
            .with_context(|| format!("{}: cannot write", dir.join(file).display()))?;
    }
    Tokenizer::from_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_tokenizer_round_trips_text_and_keeps_bloom_special_ids() {
        let documents: Vec<String> = (0..200)
            .map(|i| format!("发热是传染病最常见的症状之一 {i}. Fever is the most common sign.\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = train_tokenizer(&documents, 400, dir.path()).unwrap();
        assert_eq!(tokenizer.eos_id, 2);
        assert_eq!(tokenizer.pad_id, 3);
        let text = "发热是传染病的症状. Fever, again!\n";
        let ids = tokenizer.encode_document(text).unwrap();
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        // Merges were learnt: a frequent phrase takes fewer tokens than bytes.
        let common = tokenizer.encode_document("传染病最常见的症状").unwrap();
        assert!(common.len() < "传染病最常见的症状".len() / 3, "{common:?}");
    }
}
