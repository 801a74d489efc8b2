//! The tokenizer as packing needs it: ids without special tokens, and EOS.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_id: u32,
    /// Padding for `--packing false`: the pad token, else EOS.
    pub pad_id: u32,
    /// sha256 of `tokenizer.json` and `tokenizer_config.json`, for the cache key.
    pub digest: String,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory; EOS and pad tokens come
    /// from `tokenizer_config.json` when present, else `</s>` / `<pad>`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let json = std::fs::read(&json_path).with_context(|| {
            format!("{}: cannot read the tokenizer; --model_name_or_path (or --tokenizer_name_or_path) must be a directory holding tokenizer.json", json_path.display())
        })?;
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
        let mut hasher = Sha256::new();
        hasher.update(&json);
        hasher.update(config.to_string());
        Ok(Self {
            inner,
            eos_id,
            pad_id,
            digest: hex::encode(hasher.finalize()),
        })
    }

    /// Text of token ids, special tokens (EOS between documents) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode tokens: {e}"))
    }

    /// Token ids of one document, without special tokens, ending with EOS.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| anyhow!("{e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }
}
