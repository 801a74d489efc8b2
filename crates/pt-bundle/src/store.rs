//! The local plugin store: installed bundles, content-addressed.
//!
//! `blobs/SHA256.ptplugin` holds each bundle once, named by the sha256 of its
//! bytes; `index.json` maps `id@version` to that digest. Installing writes
//! the blob first and the index last (both via temp + rename), so a crash
//! never leaves an index entry without its bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pt_fs::write_atomically;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Bundle;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub id: String,
    pub version: String,
    /// sha256 of the bundle's bytes.
    pub digest: String,
    pub description: String,
    pub signer: Option<String>,
    /// Where it came from when pulled from a registry: `REGISTRY/REPO@sha256:...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// Where the store keeps its bundles.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index(&self) -> Result<BTreeMap<String, Installed>> {
        let path = self.root.join("index.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: corrupt plugin index", path.display())),
            Err(_) => Ok(BTreeMap::new()),
        }
    }

    fn save_index(&self, index: &BTreeMap<String, Installed>) -> Result<()> {
        write_atomically(
            &self.root.join("index.json"),
            &serde_json::to_vec_pretty(index)?,
        )
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{digest}.ptplugin"))
    }

    /// Adds a bundle (already verified by the caller); replaces an earlier
    /// install of the same `id@version`. `origin` is the pinned registry
    /// reference it was pulled from, if any.
    pub fn install(&self, bundle: &Bundle, origin: Option<&str>) -> Result<Installed> {
        let bytes = bundle.to_bytes()?;
        let digest = hex::encode(Sha256::digest(&bytes));
        std::fs::create_dir_all(self.root.join("blobs"))
            .with_context(|| format!("{}: cannot create", self.root.display()))?;
        write_atomically(&self.blob(&digest), &bytes)?;
        let installed = Installed {
            id: bundle.manifest.id.clone(),
            version: bundle.manifest.version.clone(),
            digest,
            description: bundle.manifest.description.clone(),
            signer: bundle.signer(),
            origin: origin.map(str::to_string),
        };
        let mut index = self.index()?;
        index.insert(
            format!("{}@{}", installed.id, installed.version),
            installed.clone(),
        );
        self.save_index(&index)?;
        Ok(installed)
    }

    pub fn list(&self) -> Result<Vec<Installed>> {
        Ok(self.index()?.into_values().collect())
    }

    /// `id@version`, or `id` when one version is installed.
    pub fn find(&self, reference: &str) -> Result<Installed> {
        let index = self.index()?;
        if let Some(found) = index.get(reference) {
            return Ok(found.clone());
        }
        let versions: Vec<&Installed> = index.values().filter(|i| i.id == reference).collect();
        match versions.as_slice() {
            [one] => Ok((*one).clone()),
            [] => bail!(
                "plugin {reference} is not installed (pt-host plugin list shows what is; pt-host plugin install BUNDLE adds one)"
            ),
            many => bail!(
                "plugin {reference}: several versions installed ({}); name one as {reference}@VERSION",
                many.iter()
                    .map(|i| i.version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The bundle installed from the pinned registry reference `origin`, if any.
    pub fn find_origin(&self, origin: &str) -> Result<Option<Installed>> {
        Ok(self
            .index()?
            .into_values()
            .find(|i| i.origin.as_deref() == Some(origin)))
    }

    /// The installed bundle, re-read from its blob and checked against its digest.
    pub fn load(&self, reference: &str) -> Result<Bundle> {
        self.load_installed(&self.find(reference)?)
    }

    pub fn load_installed(&self, installed: &Installed) -> Result<Bundle> {
        let reference = format!("{}@{}", installed.id, installed.version);
        let path = self.blob(&installed.digest);
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        if hex::encode(Sha256::digest(&bytes)) != installed.digest {
            bail!(
                "{}: the installed bundle of {reference} was modified on disk; reinstall it",
                path.display()
            );
        }
        Bundle::from_bytes(&bytes, &path.display().to_string())
    }

    /// Removes `id@version` (or `id`); the blob goes when no entry uses it.
    pub fn remove(&self, reference: &str) -> Result<Installed> {
        let installed = self.find(reference)?;
        let mut index = self.index()?;
        index.remove(&format!("{}@{}", installed.id, installed.version));
        self.save_index(&index)?;
        if !index.values().any(|i| i.digest == installed.digest) {
            std::fs::remove_file(self.blob(&installed.digest)).ok();
        }
        Ok(installed)
    }
}
