//! Plugins written in other languages, built by scripts/build-lang-plugins.sh:
//! each through the runtime (its results checked by hand) and through
//! `pt-host prepare`. (A module of the `plugins` test crate.)

use std::fs;
use std::time::Duration;

use pt_data::{DocRef, StepKind, StepOutput, StepPlugin, Verdict};
use pt_plugin_host::{LoadedPlugin, PluginLimits, PluginRuntime};

use crate::common::{PtHost, arg, assert_ok, component, fixture_model};

/// `pt-host prepare` of `corpus` with `--plugin plugin` and `extra` flags.
fn prepare(
    corpus: &std::path::Path,
    plugin: &std::path::Path,
    extra: &[&str],
    out: &std::path::Path,
    cache: &std::path::Path,
) -> std::process::Output {
    let model = fixture_model();
    PtHost::new(["prepare", "--model_name_or_path", arg(&model)])
        .args(["--train_file_dir", arg(corpus), "--plugin", arg(plugin)])
        .args(["--validation_split_percentage", "0", "--block_size", "8"])
        .arg("--disable_tqdm")
        .args(extra)
        .args(["--output_dir", arg(out), "--cache_dir", arg(cache)])
        .output()
}

/// A plugin loaded once (compiling an embedded interpreter takes seconds)
/// with a compilation cache that `pt-host prepare` shares.
struct Loaded {
    cache: tempfile::TempDir,
    _runtime: PluginRuntime,
    plugin: LoadedPlugin,
    name: &'static str,
}

impl Loaded {
    fn new(name: &'static str) -> Self {
        let cache = tempfile::tempdir().unwrap();
        // The cache `pt-host prepare --cache_dir` below uses, under the same user key.
        let runtime = PluginRuntime::new(Some(pt_plugin_host::ComponentCache {
            dir: cache.path().to_path_buf(),
            key_file: crate::common::component_cache_key(),
        }))
        .unwrap();
        // An interpreter's start-up runs inside instantiation.
        let limits = PluginLimits {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(60),
        };
        let plugin = runtime.load(&component(name), limits).unwrap();
        Self {
            cache,
            _runtime: runtime,
            plugin,
            name,
        }
    }

    /// The verdicts of `kind` on `texts`, from a fresh instance configured with `config`.
    fn verdicts(&mut self, config: &str, kind: StepKind, texts: &[&str]) -> Vec<Verdict> {
        self.plugin.configure(config).unwrap();
        let docs: Vec<DocRef<'_>> = texts
            .iter()
            .map(|t| DocRef {
                source: "t.txt:1",
                text: t,
            })
            .collect();
        match self
            .plugin
            .instantiate(0)
            .unwrap()
            .apply(kind, &docs, 0)
            .unwrap()
        {
            StepOutput::Verdicts(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// Asserts that `config`, holding the unknown `key`, is refused by name.
    fn assert_refuses_key(&mut self, config: &str, key: &str) {
        let error = self.plugin.configure(config).unwrap_err().to_string();
        assert!(
            error.contains("unknown key") && error.contains(key),
            "{error}"
        );
    }

    /// Asserts that `pt-host prepare` on `lines` reports `input` documents
    /// into the plugin's step and `replaced` of them replaced.
    fn assert_prepare_replaces(&self, lines: &str, input: u64, replaced: u64) {
        let step = self.prepare_report(lines);
        assert_eq!(step["plugin"], self.name);
        assert_eq!(
            (step["input"].as_u64(), step["replaced"].as_u64()),
            (Some(input), Some(replaced))
        );
    }

    /// `pt-host prepare` with the plugin on a small corpus: the data report's step line.
    fn prepare_report(&self, lines: &str) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        fs::create_dir_all(&corpus).unwrap();
        fs::write(corpus.join("a.txt"), lines).unwrap();
        let out = dir.path().join("out");
        let output = prepare(&corpus, &component(self.name), &[], &out, self.cache.path());
        assert_ok(&output);
        assert!(String::from_utf8_lossy(&output.stderr).contains("compiled code from cache"));
        let report: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("data_report.json")).unwrap()).unwrap();
        report["train"]["steps"][0].clone()
    }
}

#[test]
fn python_zh_normalize_converts_and_runs_through_prepare() {
    let mut python = Loaded::new("zh_normalize");
    let got = python.verdicts(
        "{}",
        StepKind::Mapper,
        &[
            "醫生說發熱時應當檢查體溫。。\n",
            "「這樣」就好了！！\n",
            "普通的简体句子。\n",
        ],
    );
    assert_eq!(
        got,
        [
            Verdict::Replace("医生说发热时应当检查体温。\n".into()),
            Verdict::Replace("“这样”就好了！\n".into()),
            Verdict::Keep,
        ]
    );
    // Configuration is honoured and checked.
    let only_quotes = python.verdicts(
        r#"{"convert_traditional": false, "collapse_punctuation": false}"#,
        StepKind::Mapper,
        &["「醫」！！\n"],
    );
    assert_eq!(only_quotes, [Verdict::Replace("“醫”！！\n".into())]);
    python.assert_refuses_key(r#"{"simplify": true}"#, "simplify");
    python.assert_prepare_replaces("醫生說發熱。\n普通句子。\n「這樣」\n", 3, 2);
}

#[test]
fn javascript_markdown_strip_cleans_and_runs_through_prepare() {
    let mut js = Loaded::new("markdown_strip");
    let got = js.verdicts(
        "{}",
        StepKind::Mapper,
        &[
            "## 发热的**常见**原因\n",
            "- 见[指南](https://example.org/guide)与`附录`\n",
            "<p>Fever &amp; chills<br>and <!-- note -->cough</p>\n",
            "plain line\n",
        ],
    );
    assert_eq!(
        got,
        [
            Verdict::Replace("发热的常见原因\n".into()),
            Verdict::Replace("见指南与附录\n".into()),
            Verdict::Replace("Fever & chills\nand cough\n".into()),
            Verdict::Keep,
        ]
    );
    let html_only = js.verdicts(
        r#"{"markdown": false}"#,
        StepKind::Mapper,
        &["**<b>x</b>**\n"],
    );
    assert_eq!(html_only, [Verdict::Replace("**x**\n".into())]);
    js.assert_refuses_key(r#"{"tables": true}"#, "tables");
    js.assert_prepare_replaces("# 标题\n正文没有标记。\n<i>斜体</i>\n", 3, 2);
}

#[test]
fn c_length_filter_judges_and_runs_through_prepare() {
    let mut c = Loaded::new("length_filter_c");
    let repeated_lines = "第一行内容是这样的\n".repeat(3) + "另一行\n";
    let long = "字".repeat(30) + &"词".repeat(30);
    let got = c.verdicts(
        "{}",
        StepKind::Filter,
        &[
            "太短\n",
            "发热是传染病最常见的症状之一，患者应当及时就医。\n",
            "哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈\n",
            &repeated_lines,
            &long,
        ],
    );
    assert_eq!(
        got,
        [
            Verdict::Drop("too_short".into()),
            Verdict::Keep,
            Verdict::Drop("repeated_character".into()),
            Verdict::Drop("duplicate_lines".into()),
            Verdict::Keep,
        ]
    );
    // Spaces do not count; the limits are configurable.
    let configured = c.verdicts(
        r#"{"min_chars": 2, "max_chars": 50}"#,
        StepKind::Filter,
        &["太 短\n", &long],
    );
    assert_eq!(
        configured,
        [Verdict::Keep, Verdict::Drop("too_long".into())]
    );
    c.assert_refuses_key(r#"{"min_chars": 2, "bogus": 1}"#, "bogus");

    let step = c.prepare_report(
        "太短\n一段足够长的正常文本内容在这里。\n哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈\n",
    );
    assert_eq!(step["plugin"], "length_filter");
    assert_eq!(
        (step["input"].as_u64(), step["kept"].as_u64()),
        (Some(3), Some(1))
    );
}

/// length_filter's rules written four times — Rust, C, Python, JavaScript —
/// give the same verdict on every document of the shipped corpus.
#[test]
fn the_same_filter_in_four_languages_agrees_on_the_corpus() {
    let corpus = crate::common::corpus_documents();
    let texts: Vec<&str> = corpus.iter().map(|(_, t)| t.as_str()).collect();
    let verdicts = |name: &'static str| -> Vec<Verdict> {
        let mut loaded = Loaded::new(name);
        texts
            .chunks(256)
            .flat_map(|chunk| loaded.verdicts("{}", StepKind::Filter, chunk))
            .collect()
    };
    let rust = verdicts("length_filter");
    let dropped = rust.iter().filter(|v| **v != Verdict::Keep).count();
    assert!(
        dropped > 100 && dropped < corpus.len() / 2,
        "{dropped} dropped"
    );
    for other in ["length_filter_c", "length_filter_py", "length_filter_js"] {
        let theirs = verdicts(other);
        let first = rust.iter().zip(&theirs).position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "{other} differs from Rust at {}: {:?} vs {:?}",
            corpus[first.unwrap()].0,
            theirs[first.unwrap()],
            rust[first.unwrap()]
        );
    }
}

/// A component built against another interface version is refused at load
/// with what to rebuild against (the C filter built for `pt:plugin@0.3.0`).
#[test]
fn a_component_for_another_interface_version_is_refused() {
    let runtime = PluginRuntime::new(None).unwrap();
    let error = match runtime.load(&component("future_interface"), PluginLimits::default()) {
        Ok(_) => panic!("a pt:plugin@0.3.0 component loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("built for interface pt:plugin@0.3.0; this pt-host implements pt:plugin@0.1.0 (and pt:plugin@0.2.0, which adds task plugins to it). Rebuild the plugin against wit/since_v0.1.0 or wit/since_v0.2.0"),
        "{error}"
    );
}

/// The native library of pt-host's C ABI: refused without --allow_native,
/// and with it the same result as the Rust component of the same rules.
#[test]
fn a_native_plugin_needs_allow_native_and_matches_its_component() {
    let library = crate::common::native_library("length_filter_native");
    let lines =
        "太短\n一段足够长的正常文本内容在这里。\n哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈\n";
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    fs::create_dir_all(&corpus).unwrap();
    fs::write(corpus.join("a.txt"), lines).unwrap();
    let prepare = |plugin: &std::path::Path, extra: &[&str], out: &str| {
        prepare(
            &corpus,
            plugin,
            extra,
            &dir.path().join(out),
            &dir.path().join("cache"),
        )
    };
    let refused = prepare(&library, &[], "refused");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("runs unsandboxed") && message.contains("--allow_native"),
        "{message}"
    );
    let native = prepare(&library, &["--allow_native"], "native");
    assert_ok(&native);
    assert!(String::from_utf8_lossy(&native.stderr).contains("native plugin, NOT sandboxed"));
    let wasm = prepare(&component("length_filter"), &[], "wasm");
    assert_ok(&wasm);
    let step = |out: &str| -> serde_json::Value {
        let report: serde_json::Value = serde_json::from_slice(
            &fs::read(dir.path().join(out).join("data_report.json")).unwrap(),
        )
        .unwrap();
        let step = &report["train"]["steps"][0];
        serde_json::json!([step["plugin"], step["kept"], step["dropped_by_reason"]])
    };
    assert_eq!(step("native"), step("wasm"));
    assert_eq!(step("native")[1], 1);
    // Configuration errors come back through the ABI.
    let bad = prepare(
        &library,
        &[
            "--allow_native",
            "--plugin_config",
            "length_filter={\"bogus\": 1}",
        ],
        "bad",
    );
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(
        message.contains("rejected its configuration") && message.contains("bogus"),
        "{message}"
    );
    // A library that is not a plugin.
    let libm = std::path::Path::new("/lib/x86_64-linux-gnu/libm.so.6");
    if libm.is_file() {
        let copy = dir.path().join("libm.so");
        fs::copy(libm, &copy).unwrap();
        let not_plugin = prepare(&copy, &["--allow_native"], "libm");
        let message = String::from_utf8_lossy(&not_plugin.stderr);
        assert!(
            message.contains("no `pt_native_abi_version` (not a pt-host native plugin)"),
            "{message}"
        );
    }
}
