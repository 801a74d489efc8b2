//! `--model_name_or_path` as HF users give it: a local directory, or a hub
//! id (`bigscience/bloomz-560m`) downloaded into the cache first.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use pt_hub::{Hub, HubOptions};

use crate::progress::DownloadProgress;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum HubArg {
    Huggingface,
    Modelscope,
}

#[derive(clap::Args, Debug, Clone)]
pub struct HubArgs {
    /// Where hub ids come from (default: huggingface; USE_MODELSCOPE_HUB=1
    /// selects modelscope). HF_ENDPOINT sets a mirror, HF_HUB_OFFLINE=1 uses
    /// the cache alone, HF_TOKEN authenticates.
    #[arg(long = "hub", value_enum)]
    pub hub: Option<HubArg>,
    /// Branch, tag or commit of a hub model (main on HF, master on ModelScope).
    #[arg(long = "model_revision")]
    pub model_revision: Option<String>,
}

/// A model for the commands that need no corpus (`generate`, `merge`): a
/// directory or a hub id, and where hub models are cached.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Model directory, or a hub id downloaded into the cache.
    #[arg(long = "model_name_or_path", value_name = "DIR|ID")]
    pub model_name_or_path: PathBuf,
    /// Where hub models are cached (default: HF's cache).
    #[arg(long = "cache_dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArgs,
}

impl ModelArgs {
    /// The model's local directory (downloading a hub id first).
    pub fn resolve(&self) -> Result<PathBuf> {
        resolve(
            &self.model_name_or_path,
            &self.hub,
            self.cache_dir.as_deref(),
            false,
        )
    }
}

/// The local directory of `model`: itself when it exists, else the cached
/// download of the hub id. Models cache under `cache_dir` when given (as
/// HF's `cache_dir`), else in HF's own cache (`HF_HUB_CACHE`, `HF_HOME/hub`,
/// `~/.cache/huggingface/hub`).
pub fn resolve(
    model: &Path,
    args: &HubArgs,
    cache_dir: Option<&Path>,
    disable_tqdm: bool,
) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let name = model.to_string_lossy();
    if !pt_hub::looks_like_repo_id(&name) {
        bail!(
            "{}: no such model directory (give a directory with config.json, model.safetensors and tokenizer.json, or a hub id such as bigscience/bloomz-560m)",
            model.display()
        );
    }
    let hub = args.hub.map(|h| match h {
        HubArg::Huggingface => Hub::HuggingFace,
        HubArg::Modelscope => Hub::ModelScope,
    });
    let options = HubOptions::from_env(
        hub,
        args.model_revision.clone(),
        cache_dir.map(Path::to_path_buf),
    );
    let progress = DownloadProgress::new(disable_tqdm);
    let dir = pt_hub::fetch_model(&name, &options, &progress)?;
    eprintln!("model {name}: {}", dir.display());
    Ok(dir)
}
