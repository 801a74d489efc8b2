//! Signing keys and the set of keys a user trusts.
//!
//! A key pair is two files: `NAME.key` (the secret, hex; keep it private)
//! and `NAME.pub` (`ed25519 HEX NAME`; publish it). Trusting an author means
//! putting their `.pub` file into the trusted-keys directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// A short, stable name of a public key: the first 16 hex digits of its sha256.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(Sha256::digest(public_key))[..16].to_string()
}

/// A fresh key from the operating system's randomness.
pub fn generate_key() -> Result<SigningKey> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// A key pair of that name is already in the directory (never overwritten).
#[derive(Debug, thiserror::Error)]
#[error("{}: a key named {name} exists", dir.display())]
pub struct KeyExists {
    pub dir: PathBuf,
    pub name: String,
}

/// Writes `DIR/NAME.key` (owner-only where the platform allows) and
/// `DIR/NAME.pub`; refuses to overwrite a key.
pub fn write_key_pair(key: &SigningKey, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (secret, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    if secret.exists() || public.exists() {
        return Err(KeyExists {
            dir: dir.to_path_buf(),
            name: name.into(),
        }
        .into());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    options
        .open(&secret)
        .and_then(|mut f| writeln!(f, "{}", hex::encode(key.to_bytes())))
        .with_context(|| format!("{}: cannot write", secret.display()))?;
    std::fs::write(
        &public,
        format!(
            "ed25519 {} {name}\n",
            hex::encode(key.verifying_key().as_bytes())
        ),
    )
    .with_context(|| format!("{}: cannot write", public.display()))?;
    Ok((secret, public))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the signing key", path.display()))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "{}: not a pt-host secret key (made by `pt-host plugin keygen`)",
                path.display()
            )
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut parts = text.split_whitespace();
    let (Some("ed25519"), Some(hex_key)) = (parts.next(), parts.next()) else {
        bail!(
            "{}: not a public key (expected `ed25519 HEX NAME`)",
            path.display()
        )
    };
    let bytes = hex::decode(hex_key)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| format!("{}: malformed public key", path.display()))?;
    VerifyingKey::from_bytes(&bytes)
        .with_context(|| format!("{}: invalid public key", path.display()))
}

/// The public keys whose signatures a run accepts.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    /// Where they came from, for messages.
    source: String,
}

impl TrustedKeys {
    /// Every `*.pub` in `dir` (a missing directory trusts nobody).
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut keys = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            {
                keys.push(read_public_key(path)?);
            }
        }
        Ok(Self {
            keys,
            source: dir.display().to_string(),
        })
    }

    pub fn get(&self, public_key: &[u8; 32]) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.as_bytes() == public_key)
    }

    pub fn describe(&self) -> &str {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
