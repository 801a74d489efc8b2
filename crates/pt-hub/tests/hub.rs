//! Model download against a hub on loopback that answers as the HF Hub and
//! ModelScope do: the files arrive intact, the cache serves repeats and
//! offline runs, a dropped connection resumes, a wrong checksum is refused.

#[path = "../../../tests/support/fake_hub.rs"]
mod fake_hub;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use fake_hub::{COMMIT, FakeHub};
use pt_hub::{DownloadProgress, Hub, HubOptions, fetch_model};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bloom-tiny/model")
}

/// What the downloader reported.
#[derive(Default)]
struct Recorded {
    finished: RefCell<Vec<String>>,
    retries: RefCell<Vec<String>>,
    resumed_at: RefCell<Vec<u64>>,
}

impl DownloadProgress for Recorded {
    fn start(&self, _file: &str, _total: Option<u64>, resumed: u64) {
        self.resumed_at.borrow_mut().push(resumed);
    }
    fn advance(&self, _bytes: u64) {}
    fn finish(&self, file: &str) {
        self.finished.borrow_mut().push(file.to_string());
    }
    fn retry(&self, file: &str, error: &str) {
        self.retries.borrow_mut().push(format!("{file}: {error}"));
    }
}

fn options(hub: Hub, endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        hub,
        endpoint: endpoint.to_string(),
        revision: match hub {
            Hub::HuggingFace => "main".into(),
            Hub::ModelScope => "master".into(),
        },
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
    }
}

fn assert_same_files(dir: &Path) {
    let files = [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "tokenizer_config.json",
    ];
    assert_files_equal(dir, &fixture_model(), &files);
}

/// `files` of `dir` are byte for byte those of `source`.
fn assert_files_equal(dir: &Path, source: &Path, files: &[&str]) {
    for file in files {
        assert_eq!(
            std::fs::read(dir.join(file)).unwrap(),
            std::fs::read(source.join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn downloads_from_the_hf_hub_then_serves_repeats_and_offline_runs_from_the_cache() {
    let hub = FakeHub::start("bigscience/bloom-tiny", &fixture_model());
    let cache = tempfile::tempdir().unwrap();
    let progress = Recorded::default();
    let dir = fetch_model(
        "bigscience/bloom-tiny",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &progress,
    )
    .unwrap();
    // The HF cache layout, which transformers reads too.
    assert_eq!(
        dir,
        cache
            .path()
            .join(format!("models--bigscience--bloom-tiny/snapshots/{COMMIT}"))
    );
    assert_eq!(
        std::fs::read_to_string(
            cache
                .path()
                .join("models--bigscience--bloom-tiny/refs/main")
        )
        .unwrap(),
        COMMIT
    );
    assert_same_files(&dir);
    assert!(
        progress
            .finished
            .borrow()
            .contains(&"model.safetensors".to_string())
    );
    let downloads = hub.downloads().len();

    // Again: the listing is fetched, no file is.
    let again = fetch_model(
        "bigscience/bloom-tiny",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &Recorded::default(),
    )
    .unwrap();
    assert_eq!(again, dir);
    assert_eq!(hub.downloads().len(), downloads);

    // Offline: the cache alone, with no request at all.
    let requests = hub.state.lock().unwrap().requests.len();
    let offline = HubOptions {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        ..options(Hub::HuggingFace, &hub.url, cache.path())
    };
    assert_eq!(
        fetch_model("bigscience/bloom-tiny", &offline, &Recorded::default()).unwrap(),
        dir
    );
    assert_eq!(hub.state.lock().unwrap().requests.len(), requests);
    let empty = tempfile::tempdir().unwrap();
    let missing = fetch_model(
        "bigscience/bloom-tiny",
        &HubOptions {
            cache_dir: empty.path().to_path_buf(),
            ..offline
        },
        &Recorded::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("is not in the cache") && missing.contains("HF_HUB_OFFLINE=1"),
        "{missing}"
    );

    // The hub unreachable but the model cached: the cached copy, said out loud.
    let unreachable = Recorded::default();
    let down = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        ..options(Hub::HuggingFace, &hub.url, cache.path())
    };
    assert_eq!(
        fetch_model("bigscience/bloom-tiny", &down, &unreachable).unwrap(),
        dir
    );
    assert!(unreachable.retries.borrow()[0].contains("using the cached copy"));
}

#[test]
fn downloads_from_modelscope() {
    let hub = FakeHub::start("AI-ModelScope/bloom-tiny", &fixture_model());
    let cache = tempfile::tempdir().unwrap();
    let dir = fetch_model(
        "AI-ModelScope/bloom-tiny",
        &options(Hub::ModelScope, &hub.url, cache.path()),
        &Recorded::default(),
    )
    .unwrap();
    assert_eq!(
        dir,
        cache
            .path()
            .join("modelscope--AI-ModelScope--bloom-tiny/snapshots/master")
    );
    assert_same_files(&dir);
    assert!(
        hub.downloads()
            .iter()
            .all(|(target, _)| target.contains("Revision=master&FilePath="))
    );
}

#[test]
fn a_dropped_connection_resumes_where_it_stopped() {
    let hub = FakeHub::start("org/tiny", &fixture_model());
    hub.state
        .lock()
        .unwrap()
        .drop_once
        .insert("model.safetensors".into());
    let cache = tempfile::tempdir().unwrap();
    let progress = Recorded::default();
    let dir = fetch_model(
        "org/tiny",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &progress,
    )
    .unwrap();
    assert_same_files(&dir);
    assert_eq!(
        progress.retries.borrow().len(),
        1,
        "{:?}",
        progress.retries.borrow()
    );
    let size = std::fs::metadata(fixture_model().join("model.safetensors"))
        .unwrap()
        .len();
    // The second request asked for the rest only.
    let ranges: Vec<Option<String>> = hub
        .downloads()
        .into_iter()
        .filter(|(target, _)| target.ends_with("model.safetensors"))
        .map(|(_, range)| range)
        .collect();
    assert_eq!(ranges, [None, Some(format!("bytes={}-", size / 2))]);
    assert!(progress.resumed_at.borrow().contains(&(size / 2)));
}

#[test]
fn a_wrong_checksum_is_refused_and_nothing_is_left_behind() {
    let hub = FakeHub::start("org/tiny", &fixture_model());
    hub.state
        .lock()
        .unwrap()
        .corrupt
        .insert("model.safetensors".into());
    let cache = tempfile::tempdir().unwrap();
    let error = fetch_model(
        "org/tiny",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &Recorded::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("model.safetensors: sha256") && error.contains("the download was deleted"),
        "{error}"
    );
    let snapshot = cache
        .path()
        .join(format!("models--org--tiny/snapshots/{COMMIT}"));
    assert!(!snapshot.join("model.safetensors").exists());
    assert!(!snapshot.join("model.safetensors.incomplete").exists());
    assert!(
        !cache.path().join("models--org--tiny/refs/main").exists(),
        "no ref to a broken snapshot"
    );
}

#[test]
fn unknown_models_and_unsupported_checkpoints_are_named() {
    let hub = FakeHub::start("org/tiny", &fixture_model());
    let cache = tempfile::tempdir().unwrap();
    let error = fetch_model(
        "org/nothing",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &Recorded::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("HTTP 404: no model org/nothing"), "{error}");
    hub.state
        .lock()
        .unwrap()
        .repos
        .get_mut("org/tiny")
        .unwrap()
        .remove("model.safetensors");
    let error = fetch_model(
        "org/tiny",
        &options(Hub::HuggingFace, &hub.url, cache.path()),
        &Recorded::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("org/tiny has no model.safetensors"),
        "{error}"
    );
}

/// A sharded checkpoint (Qwen2's fixture: bf16 in two shards): the index
/// first, then every shard it names, each verified; a dropped shard
/// resumes; the cached copy counts only with every shard present.
#[test]
fn sharded_checkpoints_download_index_then_shards() {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-tiny/model");
    let hub = FakeHub::start("Qwen/qwen2-tiny", &model);
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    hub.state
        .lock()
        .unwrap()
        .drop_once
        .insert(shards[1].to_string());
    let cache = tempfile::tempdir().unwrap();
    let progress = Recorded::default();
    let options = options(Hub::HuggingFace, &hub.url, cache.path());
    let dir = fetch_model("Qwen/qwen2-tiny", &options, &progress).unwrap();
    let index = "model.safetensors.index.json";
    let files = [index, shards[0], shards[1], "config.json", "tokenizer.json"];
    assert_files_equal(&dir, &model, &files);
    let finished = progress.finished.borrow();
    let at = |file: &str| finished.iter().position(|f| f == file).unwrap();
    assert!(at("model.safetensors.index.json") < at(shards[0]));
    assert!(
        progress.resumed_at.borrow().iter().any(|&r| r > 0),
        "the dropped shard resumed"
    );
    // A shard lost from the cache: offline, the snapshot no longer counts.
    std::fs::remove_file(dir.join(shards[1])).unwrap();
    let offline = HubOptions {
        offline: true,
        ..options.clone()
    };
    assert!(fetch_model("Qwen/qwen2-tiny", &offline, &Recorded::default()).is_err());
    // Online, only the missing shard is fetched again.
    let before = hub.downloads().len();
    fetch_model("Qwen/qwen2-tiny", &options, &Recorded::default()).unwrap();
    let again: Vec<String> = hub.downloads()[before..]
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].ends_with(shards[1]), "{again:?}");
}

/// A repository the loader could not read is refused before any download,
/// saying what it has and, for a pickle checkpoint, how to convert it; an
/// index naming a shard the hub does not list is refused by name.
#[test]
fn unreadable_repositories_are_refused_saying_what_to_do() {
    let pickled = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture_model().join(file), pickled.path().join(file)).unwrap();
    }
    std::fs::write(pickled.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let hub = FakeHub::start("org/pickled", pickled.path());
    let cache = tempfile::tempdir().unwrap();
    let options = options(Hub::HuggingFace, &hub.url, cache.path());
    let err = format!(
        "{:#}",
        fetch_model("org/pickled", &options, &Recorded::default()).unwrap_err()
    );
    assert!(
        err.contains("org/pickled has no model.safetensors.index.json")
            && err.contains("convert pytorch_model.bin"),
        "{err}"
    );
    assert!(hub.downloads().is_empty(), "nothing was downloaded");

    std::fs::remove_file(pickled.path().join("pytorch_model.bin")).unwrap();
    let index = r#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#;
    std::fs::write(pickled.path().join("model.safetensors.index.json"), index).unwrap();
    let hub = FakeHub::start("org/unlisted", pickled.path());
    let options = HubOptions {
        endpoint: hub.url.clone(),
        ..options
    };
    let err = format!(
        "{:#}",
        fetch_model("org/unlisted", &options, &Recorded::default()).unwrap_err()
    );
    assert!(
        err.contains("names model-00001-of-00001.safetensors, which the hub does not list"),
        "{err}"
    );
}
