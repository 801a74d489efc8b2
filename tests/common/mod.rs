//! Shared by the integration tests: where the fixtures and the plugin
//! components (built by `scripts/build-plugins.sh`) are.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture_model() -> PathBuf {
    repo().join("tests/fixtures/bloom-tiny/model")
}

/// A plugin component: `$PT_PLUGINS_DIR/NAME.wasm`, else next to this test
/// binary's target directory (`target/wasm32-wasip2/release`).
pub fn component(name: &str) -> PathBuf {
    let dir = std::env::var_os("PT_PLUGINS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/debug/deps/this-test -> target
            let exe = std::env::current_exe().unwrap();
            exe.ancestors()
                .nth(3)
                .unwrap()
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first with scripts/build-plugins.sh",
        path.display()
    );
    path
}

/// A native plugin library built by `scripts/build-plugins.sh`
/// (`target/release/libNAME.so`).
pub fn native_library(name: &str) -> PathBuf {
    // target/debug/deps/this-test -> target/release/
    let library = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .join(format!("release/lib{name}.so"));
    assert!(
        library.is_file(),
        "{} missing: run scripts/build-plugins.sh",
        library.display()
    );
    library
}

/// Corpus lines as the pipeline reads them (non-empty lines, with `\n`).
pub fn corpus_documents() -> Vec<(String, String)> {
    let mut docs = Vec::new();
    for path in pt_data::corpus::discover(&repo().join("data/pretrain")).unwrap() {
        let file = pt_data::corpus::read_file(&path, &pt_data::ReadOptions::default()).unwrap();
        for d in file.documents {
            docs.push((format!("{}:{}", path.display(), d.line), d.text));
        }
    }
    docs
}

/// Asserts the command succeeded, showing its stderr if not.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether python3 with torch, transformers and peft is installed; when not,
/// prints that `test` was skipped — or, under `PT_REQUIRE_PYTHON` (which
/// `scripts/test.sh` sets after installing them), fails.
pub fn python_has(test: &str) -> bool {
    let available = Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("PT_REQUIRE_PYTHON").is_none(),
            "{test}: PT_REQUIRE_PYTHON is set but python3 cannot import torch, transformers and peft"
        );
        eprintln!("SKIPPED {test}: python3 with torch, transformers and peft is not installed");
    }
    available
}

/// HF transformers' (+ PEFT's) mean loss of `model_dir` (+ `adapter`) over
/// the fixture's validation blocks (`tests/python/hf_eval.py`).
pub fn hf_eval_loss(model_dir: &Path, adapter: Option<&Path>) -> f64 {
    let mut command = Command::new("python3");
    command.arg(repo().join("tests/python/hf_eval.py")).args([
        model_dir,
        &repo().join("tests/fixtures/bloom-tiny/expected.safetensors"),
    ]);
    command.args(adapter);
    let output = command.output().unwrap();
    assert_ok(&output);
    let result: serde_json::Value = serde_json::from_slice(output.stdout.trim_ascii()).unwrap();
    result["eval_loss"].as_f64().unwrap()
}

/// The key pt-host vouches for its compiled-plugin cache with, where the
/// binary looks for it (`$XDG_CONFIG_HOME/pt-host`, else `~/.config/pt-host`).
pub fn component_cache_key() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".config"))
        .join("pt-host/component-cache.key")
}
