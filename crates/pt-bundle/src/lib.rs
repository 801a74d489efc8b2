//! Plugin bundles: what a plugin author publishes and a run loads.
//!
//! A `.ptplugin` file is a tar archive (fixed order, times and modes, so the
//! same inputs give the same bytes) holding `manifest.json`, an optional
//! `signature.json`, and the bundled files under `files/`: the component
//! (`plugin.wasm`), its WIT, README and test fixtures. The manifest lists the
//! sha256 of every file; the signature is ed25519 over the manifest's exact
//! bytes. So one signature covers everything, and a changed byte anywhere is
//! found: in a file (its hash), in the manifest (the signature), or in the
//! signature itself.

#![forbid(unsafe_code)]

mod keys;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use anyhow::{Context, Result, bail};
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use keys::{KeyExists, TrustedKeys, generate_key, key_id, read_signing_key, write_key_pair};
pub use store::{Installed, Store};

/// Version of the bundle layout itself.
pub const FORMAT: u32 = 1;
/// The component inside every bundle.
pub const COMPONENT: &str = "plugin.wasm";
const MANIFEST: &str = "manifest.json";
const SIGNATURE: &str = "signature.json";
const FILES_DIR: &str = "files/";
/// Bundles larger than this are refused before they are read into memory.
pub const MAX_BUNDLE_BYTES: u64 = 512 << 20;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory the plugin asks for, in MiB (`--plugin_memory_mb` still caps it).
    pub memory_mb: Option<u64>,
    /// Per-call deadline the plugin asks for, in ms.
    pub timeout_ms: Option<u64>,
}

/// What a plugin id and version may be, said to whoever gave another.
pub const PLUGIN_ID_GRAMMAR: &str = "ids are 1–64 ASCII letters, digits, `_`, `-` or `.`, starting with a letter or digit; versions 1–32 of those or `+`";

/// A plugin id: it names store entries, files, `--plugin_config NAME=…` and
/// `NAME@VERSION`, and is printed, so nothing a terminal or a path would act on.
pub fn is_plugin_id(text: &str) -> bool {
    is_identifier(text, 64, "_-.")
}

/// A plugin version (`1.2.0`, `0.3.0+build.5`).
pub fn is_plugin_version(text: &str) -> bool {
    is_identifier(text, 32, "_-.+")
}

fn is_identifier(text: &str, max: usize, punctuation: &str) -> bool {
    (1..=max).contains(&text.len())
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || punctuation.contains(c))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub version: String,
    /// The WIT package the component was built against, e.g. `pt:plugin@0.1.0`.
    pub interface: String,
    pub kinds: Vec<String>,
    pub description: String,
    pub license: String,
    #[serde(default)]
    pub limits: Limits,
    pub config_schema: serde_json::Value,
    /// Every bundled file: path → `sha256:HEX`.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SignatureFile {
    algorithm: String,
    public_key: String,
    signature: String,
}

/// A bundle in memory. Reading one checks only its structure; [`Bundle::verify`]
/// checks hashes, signature and interface.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Option<SignatureFile>,
    files: BTreeMap<String, Vec<u8>>,
}

/// What verification established.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Key id of the trusted key that signed it.
    pub signer: String,
    /// sha256 of the component.
    pub component_digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether a plugin built against WIT package `plugin` (`pt:plugin@X.Y.Z`)
/// runs on a host that implements `host`: the same package, and semver
/// compatible (same major; for 0.x the same minor), with the host's minor
/// at least the plugin's.
pub fn interface_compatible(plugin: &str, host: &str) -> bool {
    let split = |s: &str| -> Option<(String, [u64; 3])> {
        let (package, version) = s.split_once('@')?;
        let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
        Some((
            package.to_string(),
            [parts.next()??, parts.next()??, parts.next()??],
        ))
    };
    match (split(plugin), split(host)) {
        (Some((p, [pmaj, pmin, _])), Some((h, [hmaj, hmin, _]))) => {
            p == h
                && pmaj == hmaj
                && if pmaj == 0 {
                    pmin == hmin
                } else {
                    hmin >= pmin
                }
        }
        _ => false,
    }
}

impl Bundle {
    /// A new, unsigned bundle of `files` (which must include [`COMPONENT`]);
    /// the manifest's file list is computed here.
    pub fn new(mut manifest: Manifest, files: BTreeMap<String, Vec<u8>>) -> Result<Self> {
        if !files.contains_key(COMPONENT) {
            bail!("a bundle needs its component as `{COMPONENT}`");
        }
        for path in files.keys() {
            check_path(path)?;
        }
        manifest.format = FORMAT;
        manifest.files = files
            .iter()
            .map(|(path, bytes)| (path.clone(), format!("sha256:{}", sha256(bytes))))
            .collect();
        let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
        Ok(Self {
            manifest,
            manifest_bytes,
            signature: None,
            files,
        })
    }

    /// `ID-VERSION.ptplugin`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.ptplugin", self.manifest.id, self.manifest.version)
    }

    pub fn component(&self) -> &[u8] {
        &self.files[COMPONENT]
    }

    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }

    /// The exact manifest bytes the signature covers.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// Key id of the signer, if signed.
    pub fn signer(&self) -> Option<String> {
        self.signature
            .as_ref()
            .and_then(|s| hex::decode(&s.public_key).ok())
            .map(|k| key_id(&k))
    }

    /// Signs the manifest (replacing an earlier signature).
    pub fn sign(&mut self, key: &ed25519_dalek::SigningKey) {
        let signature = key.sign(&self.manifest_bytes);
        self.signature = Some(SignatureFile {
            algorithm: "ed25519".into(),
            public_key: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(signature.to_bytes()),
        });
    }

    /// The public key the signature names.
    fn signing_key(&self) -> Result<[u8; 32]> {
        let name = self.file_name();
        let Some(signature) = &self.signature else {
            bail!(
                "{name}: not signed; sign it with `pt-host plugin sign` (or load the .wasm directly)"
            )
        };
        if signature.algorithm != "ed25519" {
            bail!(
                "{name}: unknown signature algorithm `{}`",
                signature.algorithm
            );
        }
        hex::decode(&signature.public_key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .with_context(|| format!("{name}: malformed public key in {SIGNATURE}"))
    }

    /// Checks the signature against the key it names, and every file against
    /// the signed manifest (no file missing, none unlisted); returns the
    /// signer's key id. Whether that key is trusted is [`Bundle::verify`]'s part.
    pub fn check_integrity(&self) -> Result<String> {
        let name = self.file_name();
        let public = self.signing_key()?;
        let signer = key_id(&public);
        let key = VerifyingKey::from_bytes(&public)
            .with_context(|| format!("{name}: malformed public key in {SIGNATURE}"))?;
        let signature = self.signature.as_ref().expect("signing_key checked it");
        let bytes = hex::decode(&signature.signature)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .with_context(|| format!("{name}: malformed signature in {SIGNATURE}"))?;
        key.verify(&self.manifest_bytes, &Signature::from_bytes(&bytes))
            .map_err(|_| {
                anyhow::anyhow!(
                    "{name}: the signature does not match the manifest (the manifest was changed after signing, or the signature was not made by key {signer})"
                )
            })?;
        let listed: BTreeSet<&String> = self.manifest.files.keys().collect();
        let present: BTreeSet<&String> = self.files.keys().collect();
        if let Some(extra) = present.difference(&listed).next() {
            bail!("{name}: `{extra}` is in the bundle but not in the signed manifest");
        }
        if let Some(missing) = listed.difference(&present).next() {
            bail!("{name}: `{missing}` is listed in the manifest but missing");
        }
        for (path, bytes) in &self.files {
            let actual = format!("sha256:{}", sha256(bytes));
            if self.manifest.files[path] != actual {
                bail!(
                    "{name}: `{path}` has {actual}, the signed manifest says {} (the file was changed after signing)",
                    self.manifest.files[path]
                );
            }
        }
        Ok(signer)
    }

    /// Checks, in order: a signature by a trusted key over the manifest, every
    /// file against its listed hash (and no unlisted file), and that the
    /// interface is one of `host_interfaces`.
    pub fn verify(&self, trusted: &TrustedKeys, host_interfaces: &[&str]) -> Result<Verified> {
        let name = self.file_name();
        let public = self.signing_key()?;
        if trusted.get(&public).is_none() {
            bail!(
                "{name}: signed by key {}, which is not trusted; if you trust its author, put their .pub file in {}",
                key_id(&public),
                trusted.describe()
            )
        }
        let signer = self.check_integrity()?;
        if !host_interfaces
            .iter()
            .any(|host| interface_compatible(&self.manifest.interface, host))
        {
            bail!(
                "{name}: built for interface {}, this pt-host implements {}; rebuild the plugin against one of those (wit/since_v*/ in the pt-host repository), or use a pt-host release that implements {}",
                self.manifest.interface,
                host_interfaces.join(", "),
                self.manifest.interface
            );
        }
        Ok(Verified {
            signer,
            component_digest: sha256(self.component()),
        })
    }

    /// The archive bytes: deterministic for the same contents.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, bytes: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, path, bytes)
                .with_context(|| format!("cannot archive {path}"))
        };
        add(MANIFEST, &self.manifest_bytes)?;
        if let Some(signature) = &self.signature {
            add(SIGNATURE, &serde_json::to_vec_pretty(signature)?)?;
        }
        for (path, bytes) in &self.files {
            add(&format!("{FILES_DIR}{path}"), bytes)?;
        }
        Ok(builder.into_inner()?)
    }

    /// Parses a bundle; `source` names it in errors. Only the layout is
    /// checked here (regular files, safe paths, no duplicates).
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let mut archive = tar::Archive::new(bytes);
        let (mut manifest_bytes, mut signature, mut files) = (None, None, BTreeMap::new());
        for entry in archive
            .entries()
            .with_context(|| format!("{source}: not a plugin bundle (not a tar archive)"))?
        {
            let mut entry = entry.with_context(|| format!("{source}: corrupt plugin bundle"))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                bail!("{source}: bundles hold regular files only");
            }
            let path = entry
                .path()
                .with_context(|| format!("{source}: a file name is not valid"))?
                .to_string_lossy()
                .into_owned();
            let mut contents = Vec::new();
            entry
                .read_to_end(&mut contents)
                .with_context(|| format!("{source}: cannot read `{path}`"))?;
            let duplicate = match path.as_str() {
                MANIFEST => manifest_bytes.replace(contents).is_some(),
                SIGNATURE => signature
                    .replace(
                        serde_json::from_slice::<SignatureFile>(&contents)
                            .with_context(|| format!("{source}: {SIGNATURE} is malformed"))?,
                    )
                    .is_some(),
                _ => match path.strip_prefix(FILES_DIR) {
                    Some(inner) => {
                        check_path(inner).with_context(|| format!("{source}: unsafe path"))?;
                        files.insert(inner.to_string(), contents).is_some()
                    }
                    None => bail!("{source}: unexpected entry `{path}`"),
                },
            };
            if duplicate {
                bail!("{source}: `{path}` appears twice");
            }
        }
        let manifest_bytes = manifest_bytes
            .with_context(|| format!("{source}: no {MANIFEST} (not a plugin bundle)"))?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .with_context(|| format!("{source}: {MANIFEST} is malformed"))?;
        if manifest.format != FORMAT {
            bail!(
                "{source}: bundle format {}, this pt-host reads format {FORMAT}",
                manifest.format
            );
        }
        if !files.contains_key(COMPONENT) {
            bail!("{source}: no `{COMPONENT}` in the bundle");
        }
        if !is_plugin_id(&manifest.id) || !is_plugin_version(&manifest.version) {
            bail!(
                "{source}: {MANIFEST} names plugin `{}` version `{}`: {PLUGIN_ID_GRAMMAR}",
                manifest.id.escape_debug(),
                manifest.version.escape_debug()
            );
        }
        Ok(Self {
            manifest,
            manifest_bytes,
            signature,
            files,
        })
    }

    /// Reads a `.ptplugin` file.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("{}: cannot read", path.display()))?
            .len();
        if size > MAX_BUNDLE_BYTES {
            bail!(
                "{}: {size} bytes is too large for a plugin bundle",
                path.display()
            );
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }
}

/// Relative, `/`-separated, no `..`, `.` or empty parts.
fn check_path(path: &str) -> Result<()> {
    if path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        bail!("`{path}` is not a safe relative path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_versions_follow_semver() {
        let host = "pt:plugin@0.1.0";
        assert!(interface_compatible("pt:plugin@0.1.0", host));
        assert!(interface_compatible("pt:plugin@0.1.3", host));
        assert!(!interface_compatible("pt:plugin@0.2.0", host));
        assert!(!interface_compatible("other:plugin@0.1.0", host));
        assert!(interface_compatible("pt:plugin@1.1.0", "pt:plugin@1.2.0"));
        assert!(!interface_compatible("pt:plugin@1.3.0", "pt:plugin@1.2.0"));
        assert!(!interface_compatible("garbage", host));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a\\b"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(check_path("wit/plugin.wit").is_ok());
    }
}
