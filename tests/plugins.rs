//! The plugin runtime against real components: the example plugins built from
//! `plugins/` and the misbehaving `tests/guests/hostile`.

#[path = "bundles.rs"]
mod bundles;
mod common;
#[path = "languages.rs"]
mod languages;
#[path = "support/oci_registry.rs"]
mod oci_registry;
#[path = "registry.rs"]
mod registry;

use std::time::{Duration, Instant};

use common::{component, corpus_documents};
use pt_data::{CallFailure, DocRef, StepInstance, StepKind, StepOutput, Verdict};
use pt_plugin_host::{ComponentCache, LoadedPlugin, PluginLimits, PluginRuntime, Sample};
use pt_plugin_sdk::{Decision, Document, Edit, Plugin};

fn load(runtime: &PluginRuntime, name: &str, config: &str, limits: PluginLimits) -> LoadedPlugin {
    let mut plugin = runtime.load(&component(name), limits).unwrap();
    plugin.configure(config).unwrap();
    plugin
}

fn quick_limits() -> PluginLimits {
    PluginLimits {
        memory_bytes: 64 << 20,
        call_timeout: Duration::from_millis(300),
    }
}

fn docs<'a>(texts: &'a [(String, String)]) -> Vec<DocRef<'a>> {
    texts
        .iter()
        .map(|(s, t)| DocRef { source: s, text: t })
        .collect()
}

fn one(text: &str) -> Vec<(String, String)> {
    vec![("t.txt:1".to_string(), text.to_string())]
}

/// The component gives exactly what the same Rust code gives natively, on the
/// whole shipped corpus: the sandbox changes nothing but safety.
#[test]
fn medical_clean_component_matches_native_code_on_the_corpus() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(&runtime, "medical_clean", "{}", PluginLimits::default());
    assert_eq!(plugin.info.id, "medical_clean");
    let mut instance = plugin.instance(0).unwrap();
    let native = medical_clean::MedicalClean::configure("{}").unwrap();
    let corpus = corpus_documents();
    for chunk in corpus.chunks(256) {
        let StepOutput::Verdicts(mapped) =
            instance.apply(StepKind::Mapper, &docs(chunk), 0).unwrap()
        else {
            panic!()
        };
        let StepOutput::Verdicts(filtered) =
            instance.apply(StepKind::Filter, &docs(chunk), 0).unwrap()
        else {
            panic!()
        };
        for (((source, text), m), f) in chunk.iter().zip(mapped).zip(filtered) {
            let doc = Document {
                source: source.clone(),
                text: text.clone(),
            };
            let expected_map = match native.map(&doc) {
                Edit::Unchanged => Verdict::Keep,
                Edit::Replace(t) => Verdict::Replace(t),
                Edit::Drop(r) => Verdict::Drop(r),
                Edit::Error(e) => Verdict::Error(e),
            };
            let expected_filter = match native.filter(&doc) {
                Decision::Keep => Verdict::Keep,
                Decision::Drop(r) => Verdict::Drop(r),
                Decision::Error(e) => Verdict::Error(e),
            };
            assert_eq!(m, expected_map, "{source}");
            assert_eq!(f, expected_filter, "{source}");
        }
    }
}

#[test]
fn a_panic_traps_with_its_message_and_a_fresh_instance_works() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "hostile",
        r#"{"mode":"trap","marker":"BOOM"}"#,
        quick_limits(),
    );
    let mut instance = plugin.instance(0).unwrap();
    let err = instance
        .apply(StepKind::Filter, &docs(&one("BOOM\n")), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hostile plugin panicked on purpose"), "{err}");
    // The trapped instance is poisoned; a new one serves the next batch.
    let mut fresh = plugin.instance(0).unwrap();
    let ok = fresh
        .apply(StepKind::Filter, &docs(&one("fine\n")), 0)
        .unwrap();
    assert_eq!(ok, StepOutput::Verdicts(vec![Verdict::Keep]));
}

#[test]
fn an_endless_loop_is_stopped_at_the_deadline() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "hostile",
        r#"{"mode":"loop","marker":"LOOP"}"#,
        quick_limits(),
    );
    let mut instance = plugin.instance(0).unwrap();
    let started = Instant::now();
    let err = instance
        .apply(StepKind::Filter, &docs(&one("LOOP\n")), 0)
        .unwrap_err()
        .to_string();
    let elapsed = started.elapsed();
    assert!(
        err.contains("did not finish within the 300 ms deadline"),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}

#[test]
fn an_endless_loop_in_configure_is_a_load_error() {
    let runtime = PluginRuntime::new(None).unwrap();
    let mut plugin = runtime.load(&component("hostile"), quick_limits()).unwrap();
    let err = format!(
        "{:#}",
        plugin
            .configure(r#"{"mode":"loop_in_configure"}"#)
            .unwrap_err()
    );
    assert!(
        err.contains("hostile")
            && err.contains("configure did not finish within the 300 ms deadline"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        plugin.configure(r#"{"mode":"reject_config"}"#).unwrap_err()
    );
    assert!(
        err.contains("rejected its configuration") && err.contains("this configuration is refused"),
        "{err}"
    );
    let err = format!("{:#}", plugin.configure(r#"{"mood":"x"}"#).unwrap_err());
    assert!(err.contains("unknown field `mood`"), "{err}");
}

#[test]
fn a_memory_bomb_hits_the_cap() {
    let err = hostile_filter("memory_bomb", "EAT\n").unwrap_err();
    assert!(err.contains("exceeded its memory limit of 64 MiB"), "{err}");
}

#[test]
fn deep_recursion_is_stopped() {
    let err = hostile_filter("recurse", "DEEP\n").unwrap_err();
    assert!(
        err.contains("stack overflowed from deep recursion"),
        "{err}"
    );
}

/// The hostile filter's verdict on one document that holds its marker.
/// A fresh instance of the hostile guest in `mode`, with quick limits,
/// filtering one document `text` (it misbehaves on every document: its
/// marker is empty).
fn hostile_filter(mode: &str, text: &str) -> Result<StepOutput, String> {
    let runtime = PluginRuntime::new(None).unwrap();
    let config = format!(r#"{{"mode":"{mode}","marker":""}}"#);
    let plugin = load(&runtime, "hostile", &config, quick_limits());
    let mut instance = plugin.instance(0).unwrap();
    instance
        .apply(StepKind::Filter, &docs(&one(text)), 0)
        .map_err(|e| e.to_string())
}

fn hostile_verdict(mode: &str) -> Verdict {
    let Ok(StepOutput::Verdicts(mut v)) = hostile_filter(mode, "any\n") else {
        panic!("a filter answers with verdicts")
    };
    v.remove(0)
}

#[test]
fn files_and_environment_are_out_of_reach() {
    // The host process has both: the plugin must see neither.
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(std::env::var("HOME").is_ok());
    for (mode, expected) in [
        ("read_file", "read /etc/passwd: "),
        ("read_env", "env HOME: environment variable not found"),
    ] {
        match hostile_verdict(mode) {
            Verdict::Error(message) => assert!(message.starts_with(expected), "{message}"),
            other => panic!("{mode}: the plugin got through: {other:?}"),
        }
    }
}

/// Time and entropy are virtual: an hour's sleep returns at once with virtual
/// time moved on (a plugin cannot block the host where the deadline cannot
/// reach), the wall clock starts at 1970, randomness repeats from instance to
/// instance (outputs depend only on input, config and seed); sockets are refused.
#[test]
fn clocks_and_randomness_are_virtual_and_sockets_refused() {
    let verdict = hostile_verdict;
    let started = Instant::now();
    assert_eq!(verdict("sleep"), Verdict::Drop("slept 3600 s".into()));
    assert!(started.elapsed() < Duration::from_secs(10));
    let Verdict::Drop(clock) = verdict("clock") else {
        panic!("clock")
    };
    let micros: u64 = clock
        .trim_start_matches("wall clock ")
        .trim_end_matches(" µs")
        .parse()
        .unwrap();
    assert!(micros < 1_000_000, "{clock}: the real time leaked in");
    let random = verdict("random");
    assert!(matches!(&random, Verdict::Drop(r) if r.starts_with("random [")));
    assert_eq!(random, verdict("random"), "randomness repeats per instance");
    match verdict("socket") {
        Verdict::Error(message) => {
            assert!(message.starts_with("connect 127.0.0.1:9: "), "{message}")
        }
        other => panic!("the plugin got a socket: {other:?}"),
    }
}

#[test]
fn chatty_output_is_bounded_not_fatal() {
    let runtime = PluginRuntime::new(None).unwrap();
    let limits = PluginLimits {
        call_timeout: Duration::from_secs(20),
        ..quick_limits()
    };
    let plugin = load(
        &runtime,
        "hostile",
        r#"{"mode":"print","marker":""}"#,
        limits,
    );
    let out = plugin
        .instance(0)
        .unwrap()
        .apply(StepKind::Filter, &docs(&one("x\n")), 0)
        .unwrap();
    assert_eq!(out, StepOutput::Verdicts(vec![Verdict::Keep]));
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_log_import_reaches_the_host_log_bounded() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "hostile",
        r#"{"mode":"log_flood","marker":""}"#,
        quick_limits(),
    );
    let mut instance = plugin.instance(0).unwrap();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let out = instance
            .apply(StepKind::Filter, &docs(&one("x\n")), 0)
            .unwrap();
        assert_eq!(out, StepOutput::Verdicts(vec![Verdict::Keep]));
    });
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("plugin=\"hostile\"") && log.contains("log line 0"),
        "{log}"
    );
    assert!(
        log.contains("log line 98") && !log.contains("log line 99"),
        "100 lines a call, the long one first"
    );
    assert!(log.contains("log limit of 100 lines per call reached"));
    let longest = log.lines().map(str::len).max().unwrap();
    assert!(longest < 2_300, "lines are cut to 2 KiB: {longest}");
}

fn cache_in(dir: &std::path::Path) -> Option<ComponentCache> {
    Some(ComponentCache {
        dir: dir.join("cache"),
        key_file: dir.join("config/component-cache.key"),
    })
}

#[test]
fn compiled_components_are_cached_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let first = PluginRuntime::new(cache_in(dir.path())).unwrap();
    assert!(
        !first
            .load(&component("domain_terms"), PluginLimits::default())
            .unwrap()
            .from_cache
    );
    let second = PluginRuntime::new(cache_in(dir.path())).unwrap();
    let plugin = second
        .load(&component("domain_terms"), PluginLimits::default())
        .unwrap();
    assert!(plugin.from_cache);
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache/components"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.path().join("config/component-cache.key")).unwrap();
        assert_eq!(key.permissions().mode() & 0o077, 0, "the key is private");
    }
}

/// The cache directory is not a way to run native code: a compiled
/// artefact this user's pt-host did not write (planted in a shared
/// `--cache_dir`, copied from another user, or altered) fails its MAC and is
/// recompiled from the component, never loaded.
#[test]
fn a_planted_or_altered_compiled_component_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    PluginRuntime::new(cache_in(dir.path()))
        .unwrap()
        .load(&component("medical_clean"), PluginLimits::default())
        .unwrap();
    let cached = std::fs::read_dir(dir.path().join("cache/components"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let loads_from_cache = |key_dir: &std::path::Path| {
        let cache = ComponentCache {
            dir: dir.path().join("cache"),
            key_file: key_dir.join("component-cache.key"),
        };
        PluginRuntime::new(Some(cache))
            .unwrap()
            .load(&component("medical_clean"), PluginLimits::default())
            .unwrap()
            .from_cache
    };
    let original = std::fs::read(&cached).unwrap();
    // Another user's key (an attacker who wrote a valid artefact for theirs).
    let other = tempfile::tempdir().unwrap();
    assert!(
        !loads_from_cache(other.path()),
        "another key's artefact was loaded"
    );
    // The recompiled artefact now carries the other key; restore ours and alter one byte.
    let mut altered = original.clone();
    altered[original.len() / 2] ^= 0x40;
    std::fs::write(&cached, &altered).unwrap();
    assert!(
        !loads_from_cache(&dir.path().join("config")),
        "an altered artefact was loaded"
    );
    // What the miss wrote back verifies again.
    assert!(loads_from_cache(&dir.path().join("config")));
}

/// Failures are typed from wasmtime's traps: a plugin calling `exit`, or
/// creating resource handles until the runtime refuses, says so in one line
/// with no wasm backtrace.
#[test]
fn exit_and_handle_exhaustion_are_typed_failures() {
    let runtime = PluginRuntime::new(None).unwrap();
    let fail = |mode: &str| {
        let plugin = load(
            &runtime,
            "hostile",
            &format!(r#"{{"mode":"{mode}","marker":""}}"#),
            PluginLimits {
                call_timeout: Duration::from_secs(20),
                ..quick_limits()
            },
        );
        plugin
            .instance(0)
            .unwrap()
            .apply(StepKind::Filter, &docs(&one("x\n")), 0)
            .unwrap_err()
    };
    let exit = fail("exit");
    assert!(
        matches!(exit, CallFailure::Exit { code: 1, .. }),
        "{exit:?}"
    );
    let handles = fail("handles");
    match &handles {
        CallFailure::ResourceLimit(what) => {
            assert!(what.contains("cannot allocate another handle"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    for failure in [exit, handles] {
        let text = failure.to_string();
        assert!(
            !text.contains("wasm backtrace") && !text.contains('\n'),
            "{text}"
        );
    }
}

/// A drop reason or an error message of any length is cut where it enters
/// the host.
#[test]
fn plugin_strings_are_cut_where_they_enter_the_host() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "hostile",
        r#"{"mode":"huge_reason","marker":""}"#,
        quick_limits(),
    );
    let out = plugin
        .instance(0)
        .unwrap()
        .apply(StepKind::Filter, &docs(&one("x\n")), 0)
        .unwrap();
    let StepOutput::Verdicts(verdicts) = out else {
        panic!()
    };
    let Verdict::Drop(reason) = &verdicts[0] else {
        panic!("{verdicts:?}")
    };
    assert!(
        reason.len() <= 120 && reason.ends_with('…'),
        "{}",
        reason.len()
    );
}

#[test]
fn files_that_are_not_plugins_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = PluginRuntime::new(None).unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap(); // an empty core module
    let err = format!(
        "{:#}",
        runtime.load(&junk, PluginLimits::default()).err().unwrap()
    );
    assert!(
        err.contains("junk.wasm: not a WebAssembly component"),
        "{err}"
    );
    let text = dir.path().join("text.wasm");
    std::fs::write(&text, b"hello").unwrap();
    let err = format!(
        "{:#}",
        runtime.load(&text, PluginLimits::default()).err().unwrap()
    );
    assert!(
        err.contains("text.wasm: not a WebAssembly component"),
        "{err}"
    );
}

#[test]
fn domain_terms_metric_accumulates_across_batches() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "domain_terms",
        r#"{"terms":["fever","发热"]}"#,
        PluginLimits::default(),
    );
    let mut session = plugin.metric_session().unwrap();
    let sample = |r: &str, p: &str| Sample {
        reference: r.into(),
        predicted: p.into(),
        token_logprobs: vec![-0.5],
        continuation: None,
    };
    session
        .add_batch(&[sample("Fever and fever; 发热", "a fever, 发热发热")])
        .unwrap();
    session
        .add_batch(&[sample("no terms here", "fever")])
        .unwrap();
    let values: Vec<(String, f64)> = session
        .compute()
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.value))
        .collect();
    assert_eq!(values[0], ("term_recall".to_string(), 2.0 / 3.0));
    assert_eq!(values[1], ("term_precision".to_string(), 0.5));
    assert_eq!(values[2], ("term_occurrences".to_string(), 3.0));
    // A filter is not a metric.
    let filter = load(&runtime, "medical_clean", "{}", PluginLimits::default());
    assert!(
        filter
            .metric_session()
            .err()
            .unwrap()
            .to_string()
            .contains("not a metric plugin")
    );
}

#[test]
fn augmenter_is_seeded_and_names_parents() {
    let runtime = PluginRuntime::new(None).unwrap();
    let plugin = load(
        &runtime,
        "augment_eda",
        r#"{"num_aug":2}"#,
        PluginLimits::default(),
    );
    let texts = vec![
        (
            "a.txt:1".to_string(),
            "The patient had a severe fever and a bad cough for three days.\n".to_string(),
        ),
        ("a.txt:2".to_string(), "短\n".to_string()),
        (
            "a.txt:3".to_string(),
            "患者出现发热、咳嗽等症状，医生建议立即治疗并检查。\n".to_string(),
        ),
    ];
    let mut instance = plugin.instance(0).unwrap();
    let first = instance
        .apply(StepKind::Augmenter, &docs(&texts), 7)
        .unwrap();
    assert_eq!(
        first,
        instance
            .apply(StepKind::Augmenter, &docs(&texts), 7)
            .unwrap()
    );
    assert_ne!(
        first,
        instance
            .apply(StepKind::Augmenter, &docs(&texts), 8)
            .unwrap()
    );
    let StepOutput::Derived(derived) = first else {
        panic!()
    };
    let parents: Vec<u32> = derived.iter().map(|d| d.parent).collect();
    assert_eq!(parents, [0, 0, 2, 2]);
    assert!(derived.iter().all(|d| d.text.ends_with('\n')));
}
