//! Model download for `--model_name_or_path ORG/NAME`: from the Hugging Face
//! Hub (or a mirror through `HF_ENDPOINT`) or from ModelScope, into an
//! HF-style cache (`models--ORG--NAME/snapshots/COMMIT/FILE`, `refs/REVISION`)
//! that transformers reads too. Partial files resume, every file's size (and
//! sha256 where the hub gives one) is checked, and `HF_HUB_OFFLINE=1` uses the
//! cache alone.

#![forbid(unsafe_code)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Files a BLOOM model directory needs; the first three are required.
pub const MODEL_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
/// The files every model needs besides its weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// A sharded checkpoint's index: its `weight_map` names the shards.
pub const WEIGHT_INDEX: &str = "model.safetensors.index.json";

/// Attempts per file: a dropped connection resumes where it stopped.
const ATTEMPTS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hub {
    HuggingFace,
    ModelScope,
}

impl Hub {
    fn cache_prefix(self) -> &'static str {
        match self {
            Hub::HuggingFace => "models",
            Hub::ModelScope => "modelscope",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HubOptions {
    pub hub: Hub,
    /// Base URL, e.g. `https://huggingface.co` or a mirror.
    pub endpoint: String,
    /// Branch, tag or commit (`main` on the HF Hub, `master` on ModelScope by default).
    pub revision: String,
    /// Where `models--ORG--NAME` directories live.
    pub cache_dir: PathBuf,
    /// Use the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Bearer token for gated or private models (`HF_TOKEN`, `MODELSCOPE_API_TOKEN`).
    pub token: Option<String>,
}

impl HubOptions {
    /// Options from the environment as HF's and ModelScope's libraries read it:
    /// `USE_MODELSCOPE_HUB`, `HF_ENDPOINT` / `MODELSCOPE_ENDPOINT`,
    /// `HF_HUB_OFFLINE`, `HF_TOKEN`, and `HF_HUB_CACHE` / `HF_HOME` for the
    /// default cache. Arguments given explicitly win.
    pub fn from_env(
        hub: Option<Hub>,
        revision: Option<String>,
        cache_dir: Option<PathBuf>,
    ) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let truthy = |name: &str| {
            var(name).is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "True" | "yes"))
        };
        let hub = hub.unwrap_or(if truthy("USE_MODELSCOPE_HUB") {
            Hub::ModelScope
        } else {
            Hub::HuggingFace
        });
        let (endpoint, default_revision, token) = match hub {
            Hub::HuggingFace => (
                var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
                "main",
                var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            ),
            Hub::ModelScope => (
                var("MODELSCOPE_ENDPOINT").unwrap_or_else(|| "https://www.modelscope.cn".into()),
                "master",
                var("MODELSCOPE_API_TOKEN"),
            ),
        };
        let cache_dir = cache_dir.unwrap_or_else(|| {
            var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
                .or_else(|| var("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface/hub")))
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
                .unwrap_or_else(|| std::env::temp_dir().join("huggingface/hub"))
        });
        Self {
            hub,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            revision: revision.unwrap_or_else(|| default_revision.into()),
            cache_dir,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            token,
        }
    }
}

/// Reports download progress (a progress bar, or log lines).
pub trait DownloadProgress {
    /// A file starts (or resumes at `resumed` bytes of `total`).
    fn start(&self, file: &str, total: Option<u64>, resumed: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self, file: &str);
    /// A transient failure about to be retried.
    fn retry(&self, file: &str, error: &str);
}

/// `ORG/NAME` (or `NAME`) that is not an existing local path.
pub fn looks_like_repo_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    !Path::new(name).exists()
        && (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A file of the repository as the hub lists it.
#[derive(Clone, Debug)]
struct RemoteFile {
    path: String,
    size: Option<u64>,
    sha256: Option<String>,
}

struct Listing {
    /// The commit the revision resolves to (the revision itself on ModelScope).
    commit: String,
    files: Vec<RemoteFile>,
}

/// The local directory of `repo_id`, downloading what the cache lacks.
pub fn fetch_model(
    repo_id: &str,
    options: &HubOptions,
    progress: &dyn DownloadProgress,
) -> Result<PathBuf> {
    let repo_dir = options.cache_dir.join(format!(
        "{}--{}",
        options.hub.cache_prefix(),
        repo_id.replace('/', "--")
    ));
    let cached = cached_snapshot(&repo_dir, &options.revision);
    if options.offline {
        return cached.with_context(|| {
            format!(
                "{repo_id} (revision {}) is not in the cache {} and HF_HUB_OFFLINE=1 forbids downloading it: run once online, or give a local directory",
                options.revision,
                options.cache_dir.display()
            )
        });
    }
    let agent = agent();
    let listing = match list_files(&agent, repo_id, options) {
        Ok(listing) => listing,
        Err(error) => match cached {
            Some(dir) => {
                progress.retry(repo_id, &format!("{error:#}; using the cached copy"));
                return Ok(dir);
            }
            None => return Err(error),
        },
    };
    let listed = |path: &str| listing.files.iter().find(|f| f.path == path);
    let single = listed("model.safetensors").is_some();
    let weights = if single {
        "model.safetensors"
    } else {
        WEIGHT_INDEX
    };
    let missing: Vec<&str> = REQUIRED
        .into_iter()
        .chain([weights])
        .filter(|f| listed(f).is_none())
        .collect();
    if !missing.is_empty() {
        let present: Vec<&str> = listing
            .files
            .iter()
            .map(|f| f.path.as_str())
            .take(20)
            .collect();
        let bin_only = listed("pytorch_model.bin").is_some() && !single;
        bail!(
            "{repo_id} has no {} (it has: {}): pt-host reads safetensors checkpoints (one file, or shards with \
             {WEIGHT_INDEX}) with a tokenizer.json{}",
            missing.join(", "),
            present.join(", "),
            if bin_only {
                "; convert pytorch_model.bin with transformers' save_pretrained(..., safe_serialization=True)"
            } else {
                ""
            }
        );
    }
    let snapshot = repo_dir.join("snapshots").join(&listing.commit);
    fs::create_dir_all(&snapshot)
        .with_context(|| format!("{}: cannot create", snapshot.display()))?;
    let fetch = |file: &RemoteFile| -> Result<()> {
        let destination = snapshot.join(&file.path);
        let complete =
            fs::metadata(&destination).is_ok_and(|m| file.size.is_none_or(|size| m.len() == size));
        if complete {
            return Ok(());
        }
        download(
            &agent,
            repo_id,
            &listing.commit,
            file,
            &destination,
            options,
            progress,
        )
    };
    // The index first: it names the shards, each then fetched (and verified) in turn.
    let mut wanted: Vec<&RemoteFile> = listing
        .files
        .iter()
        .filter(|f| {
            f.path == weights
                || (MODEL_FILES.contains(&f.path.as_str()) && !f.path.ends_with(".safetensors"))
        })
        .collect();
    wanted.sort_by_key(|f| f.path != weights);
    for file in wanted {
        fetch(file)?;
    }
    if !single {
        for shard in shard_names(&snapshot.join(WEIGHT_INDEX))? {
            let file = listed(&shard).with_context(|| {
                format!("{repo_id}: {WEIGHT_INDEX} names {shard}, which the hub does not list")
            })?;
            fetch(file)?;
        }
    }
    let refs = repo_dir.join("refs");
    fs::create_dir_all(&refs).with_context(|| format!("{}: cannot create", refs.display()))?;
    fs::write(refs.join(&options.revision), &listing.commit)
        .with_context(|| format!("{}: cannot write", refs.display()))?;
    Ok(snapshot)
}

/// The cached snapshot of `revision`, when it holds the required files and
/// every weight file.
fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    let weights = match snapshot.join("model.safetensors").is_file() {
        true => vec!["model.safetensors".to_string()],
        false => shard_names(&snapshot.join(WEIGHT_INDEX)).ok()?,
    };
    (REQUIRED.iter().all(|f| snapshot.join(f).is_file())
        && weights.iter().all(|f| snapshot.join(f).is_file()))
    .then_some(snapshot)
}

/// The shard files a safetensors index names, each once: plain file names
/// in the same directory (a name with a path is refused).
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text =
        fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a safetensors index", index.display()))?;
    let map = parsed["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<String> = Vec::new();
    for shard in map.values() {
        let name = shard
            .as_str()
            .filter(|n| {
                n.ends_with(".safetensors") && !n.contains(['/', '\\']) && !n.starts_with('.')
            })
            .with_context(|| format!("{}: bad shard name {shard}", index.display()))?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .user_agent(concat!("pt-host/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn get(
    agent: &ureq::Agent,
    url: &str,
    options: &HubOptions,
    range_from: u64,
) -> Result<ureq::http::Response<ureq::Body>> {
    let mut request = agent.get(url);
    if let Some(token) = &options.token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    if range_from > 0 {
        request = request.header("Range", &format!("bytes={range_from}-"));
    }
    request
        .call()
        .with_context(|| HubError::Unreachable { url: url.into() })
}

/// A hub that cannot be reached or has no such model; the binary says which
/// flags choose another.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: cannot connect (offline? behind a firewall?)")]
    Unreachable { url: String },
    #[error("{url}: HTTP 404: no model {repo_id} at this revision on this hub")]
    NotFound { url: String, repo_id: String },
}

fn check_status(url: &str, status: u16, repo_id: &str) -> Result<()> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => bail!(
            "{url}: HTTP {status}: {repo_id} is gated or private; set HF_TOKEN (or MODELSCOPE_API_TOKEN)"
        ),
        404 => Err(HubError::NotFound {
            url: url.into(),
            repo_id: repo_id.into(),
        }
        .into()),
        _ => bail!("{url}: HTTP {status}"),
    }
}

fn list_files(agent: &ureq::Agent, repo_id: &str, options: &HubOptions) -> Result<Listing> {
    let url = match options.hub {
        Hub::HuggingFace => format!(
            "{}/api/models/{repo_id}/revision/{}?blobs=true",
            options.endpoint, options.revision
        ),
        Hub::ModelScope => format!(
            "{}/api/v1/models/{repo_id}/repo/files?Revision={}&Recursive=true",
            options.endpoint, options.revision
        ),
    };
    let response = get(agent, &url, options, 0)?;
    check_status(&url, response.status().as_u16(), repo_id)?;
    let mut text = String::new();
    response
        .into_body()
        .into_reader()
        .take(64 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("{url}: cannot read the file list"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{url}: the file list is not JSON"))?;
    let listing = match options.hub {
        Hub::HuggingFace => Listing {
            commit: json["sha"]
                .as_str()
                .unwrap_or(&options.revision)
                .to_string(),
            files: json["siblings"]
                .as_array()
                .with_context(|| format!("{url}: no `siblings` in the answer"))?
                .iter()
                .filter_map(|s| {
                    Some(RemoteFile {
                        path: s["rfilename"].as_str()?.to_string(),
                        size: s["lfs"]["size"].as_u64().or(s["size"].as_u64()),
                        sha256: s["lfs"]["sha256"].as_str().map(str::to_lowercase),
                    })
                })
                .collect(),
        },
        Hub::ModelScope => Listing {
            commit: options.revision.clone(),
            files: json["Data"]["Files"]
                .as_array()
                .with_context(|| format!("{url}: no `Data.Files` in the answer"))?
                .iter()
                .filter(|f| f["Type"].as_str() != Some("tree"))
                .filter_map(|f| {
                    Some(RemoteFile {
                        path: f["Path"].as_str()?.to_string(),
                        size: f["Size"].as_u64(),
                        sha256: f["Sha256"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .map(str::to_lowercase),
                    })
                })
                .collect(),
        },
    };
    Ok(listing)
}

fn file_url(repo_id: &str, commit: &str, path: &str, options: &HubOptions) -> String {
    match options.hub {
        Hub::HuggingFace => format!("{}/{repo_id}/resolve/{commit}/{path}", options.endpoint),
        Hub::ModelScope => format!(
            "{}/api/v1/models/{repo_id}/repo?Revision={commit}&FilePath={path}",
            options.endpoint
        ),
    }
}

/// Downloads into `DEST.incomplete`, resuming what an earlier attempt (or
/// run) left there, checks size and sha256, then renames into place.
fn download(
    agent: &ureq::Agent,
    repo_id: &str,
    commit: &str,
    file: &RemoteFile,
    destination: &Path,
    options: &HubOptions,
    progress: &dyn DownloadProgress,
) -> Result<()> {
    let url = file_url(repo_id, commit, &file.path, options);
    let partial = destination.with_file_name(format!("{}.incomplete", file.path));
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        match fetch_once(agent, &url, file, &partial, options, repo_id, progress) {
            Ok(()) => {
                last_error = None;
                break;
            }
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Transient(error)) => {
                if attempt < ATTEMPTS {
                    progress.retry(&file.path, &format!("{error:#}"));
                }
                last_error = Some(error);
            }
        }
    }
    if let Some(error) = last_error {
        return Err(error.context(format!(
            "{}: download failed after {ATTEMPTS} attempts; rerun to resume from {}",
            file.path,
            partial.display()
        )));
    }
    verify(file, &partial, &url)?;
    fs::rename(&partial, destination)
        .with_context(|| format!("{}: cannot move into place", destination.display()))?;
    progress.finish(&file.path);
    Ok(())
}

enum Failure {
    /// Worth retrying: the connection dropped or timed out.
    Transient(anyhow::Error),
    Fatal(anyhow::Error),
}

fn fetch_once(
    agent: &ureq::Agent,
    url: &str,
    file: &RemoteFile,
    partial: &Path,
    options: &HubOptions,
    repo_id: &str,
    progress: &dyn DownloadProgress,
) -> std::result::Result<(), Failure> {
    let have = fs::metadata(partial).map_or(0, |m| m.len());
    if file.size.is_some_and(|size| have == size) {
        return Ok(());
    }
    let response = get(agent, url, options, have).map_err(Failure::Transient)?;
    let status = response.status().as_u16();
    check_status(url, status, repo_id).map_err(Failure::Fatal)?;
    // 206: the server resumes; 200: it sends everything again.
    let resumed = if status == 206 { have } else { 0 };
    let mut out = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed > 0)
        .truncate(resumed == 0)
        .open(partial)
        .with_context(|| format!("{}: cannot write", partial.display()))
        .map_err(Failure::Fatal)?;
    progress.start(&file.path, file.size, resumed);
    let mut body = response.into_body().into_reader();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Failure::Transient(
                    anyhow::Error::new(e).context(format!("{url}: connection lost")),
                ));
            }
        };
        out.write_all(&buffer[..n])
            .with_context(|| format!("{}: cannot write", partial.display()))
            .map_err(Failure::Fatal)?;
        progress.advance(n as u64);
    }
    out.flush()
        .with_context(|| format!("{}: cannot write", partial.display()))
        .map_err(Failure::Fatal)?;
    let got = fs::metadata(partial).map_or(0, |m| m.len());
    match file.size {
        Some(size) if got < size => Err(Failure::Transient(anyhow::anyhow!(
            "{url}: connection closed after {got} of {size} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Size and sha256 against the hub's listing; a mismatching file is deleted.
fn verify(file: &RemoteFile, partial: &Path, url: &str) -> Result<()> {
    let size = fs::metadata(partial)
        .with_context(|| format!("{}: cannot read", partial.display()))?
        .len();
    let mismatch = |what: String| -> Result<()> {
        fs::remove_file(partial).ok();
        bail!(
            "{}: {what}; the download was deleted, rerun to fetch it again ({url})",
            file.path
        )
    };
    if let Some(expected) = file.size
        && size != expected
    {
        return mismatch(format!("{size} bytes, the hub lists {expected}"));
    }
    if let Some(expected) = &file.sha256 {
        let mut hasher = Sha256::new();
        let mut reader = fs::File::open(partial)
            .with_context(|| format!("{}: cannot read", partial.display()))?;
        std::io::copy(&mut reader, &mut hasher)
            .with_context(|| format!("{}: cannot read", partial.display()))?;
        let actual = hex::encode(hasher.finalize());
        if &actual != expected {
            return mismatch(format!(
                "sha256 {actual}, the hub lists {expected} (corrupted download or tampered mirror)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(looks_like_repo_id("bigscience/bloomz-560m"));
        assert!(looks_like_repo_id("AI-ModelScope/bloomz-560m"));
        assert!(looks_like_repo_id("gpt2"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }
}
