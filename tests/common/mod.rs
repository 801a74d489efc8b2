//! Shared by the integration tests: the one way they run `pt-host`
//! ([`PtHost`]), and where the fixtures and the plugin components (built by
//! `scripts/build-plugins.sh`) are.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `pt-host` command line, run and checked (as ripgrep's `TestCommand`):
/// `PtHost::new(["prepare", …]).env(…).succeeds()`, or
/// `.fails_with("what the message must say")`.
pub struct PtHost(Command);

impl PtHost {
    pub fn new<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pt-host"));
        command.args(args);
        Self(command)
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.0.args(args);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.0.env_remove(key);
        self
    }

    /// The command itself, for what the builder does not cover.
    pub fn command(&mut self) -> &mut Command {
        &mut self.0
    }

    pub fn output(mut self) -> Output {
        self.0.output().unwrap()
    }

    /// Runs, asserting success (showing stderr if not).
    pub fn succeeds(self) -> Output {
        let output = self.output();
        assert_ok(&output);
        output
    }

    /// Runs, asserting a failure that a user can read: an error exit,
    /// `expected` in the message, no panic or backtrace, a message rather
    /// than a dump.
    /// Returns the message.
    pub fn fails_with(self, expected: &str) -> String {
        let shown = format!("{:?}", self.0);
        let output = self.output();
        let message = stderr(&output);
        // 1: pt-host's error, 2: a usage error; a panic exits with 101, a crash by a signal.
        assert!(
            matches!(output.status.code(), Some(1 | 2)),
            "{shown}: {:?}, not an error exit: {message}",
            output.status
        );
        assert!(
            message.contains(expected),
            "{shown}: {expected:?} not in {message}"
        );
        assert!(
            !message.contains("panicked") && !message.contains("RUST_BACKTRACE"),
            "{shown}: {message}"
        );
        assert!(
            message.lines().count() <= 12,
            "{shown}: a message, not a dump: {message}"
        );
        message
    }
}

/// `pt-host ARGS`, run.
pub fn pt_host<S: AsRef<OsStr>>(args: &[S]) -> Output {
    PtHost::new(args).output()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A JSON file, parsed (the path named if it cannot be read).
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Command-line words: `words("--do_train --max_steps 4")`.
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// A path as a command-line argument.
pub fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

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
        .args(["-c", "import torch, transformers, peft, bitsandbytes"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("PT_REQUIRE_PYTHON").is_none(),
            "{test}: PT_REQUIRE_PYTHON is set but python3 cannot import torch, transformers, peft and bitsandbytes"
        );
        eprintln!(
            "SKIPPED {test}: python3 with torch, transformers, peft and bitsandbytes is not installed"
        );
    }
    available
}

/// HF transformers' (+ PEFT's) mean loss of `model_dir` (+ `adapter`) over
/// the fixture's validation blocks (`tests/python/hf_eval.py`).
pub fn hf_eval_loss(model_dir: &Path, adapter: Option<&Path>) -> f64 {
    hf_eval_loss_with(model_dir, adapter, &[])
}

/// [`hf_eval_loss`] with more of hf_eval.py's options (`--load_in_4bit`).
pub fn hf_eval_loss_with(model_dir: &Path, adapter: Option<&Path>, options: &[&str]) -> f64 {
    let mut command = Command::new("python3");
    command.arg(repo().join("tests/python/hf_eval.py")).args([
        model_dir,
        &repo().join("tests/fixtures/bloom-tiny/expected.safetensors"),
    ]);
    command.args(adapter).args(options);
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
