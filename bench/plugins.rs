//! `cargo bench -p pt-host --bench plugins`: what the sandbox costs.
//!
//! Prints medical_clean's throughput as a WebAssembly component and as the same
//! Rust code compiled natively (MB/s and their ratio), and the whole pipeline's
//! documents/s with and without the plugin, and one filter's rules
//! (length_filter) in native Rust and as Rust, C, Python and JavaScript
//! components. Needs the components built (`scripts/build-plugins.sh`,
//! `scripts/build-lang-plugins.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use pt_data::{
    DocRef, ErrorPolicy, PipelineOptions, StepInstance, StepKind, StepOutput, StepPlugin,
    Tokenizer, Verdict,
};
use pt_plugin_host::{PluginLimits, PluginRuntime};
use pt_plugin_sdk::{Document, Edit, Plugin};

const BATCH: usize = 64;

/// Runs `f` repeatedly for at least `budget`, returns the best seconds per run.
fn best_of(budget: Duration, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut best = f64::INFINITY;
    while started.elapsed() < budget || best.is_infinite() {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let docs = common::corpus_documents();
    let bytes: usize = docs.iter().map(|(_, t)| t.len()).sum();
    let mb = bytes as f64 / 1e6;
    let budget = Duration::from_secs(3);
    let rate = |label: &str, seconds: f64| {
        println!(
            "{label:<44} {:>10.1} {:>12.0}",
            mb / seconds,
            docs.len() as f64 / seconds
        );
    };
    println!(
        "corpus: {} documents, {mb:.2} MB (data/pretrain)",
        docs.len()
    );

    let runtime = PluginRuntime::new(None).unwrap();
    let mut plugin = runtime
        .load(&common::component("medical_clean"), PluginLimits::default())
        .unwrap();
    plugin.configure("{}").unwrap();
    let native = medical_clean::MedicalClean::configure("{}").unwrap();
    let native_s = best_of(budget, || native_medical_clean(&native, &docs));
    let mut instance = plugin.instance(0).unwrap();
    let component_s = best_of(budget, || component_medical_clean(&mut instance, &docs));
    let header = |title: &str| println!("{title:<44} {:>10} {:>12}", "MB/s", "documents/s");
    header("medical_clean (mapper + filter)");
    rate("native Rust, 1 thread", native_s);
    rate("WebAssembly component, 1 thread", component_s);
    println!("component / native ratio: {:.2}", native_s / component_s);

    let tokenizer = Tokenizer::from_dir(&common::fixture_model()).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let inputs: Vec<pt_data::pipeline::InputDoc<'_>> = docs
        .iter()
        .map(|(s, t)| pt_data::pipeline::InputDoc { source: s, text: t })
        .collect();
    let pipeline = |plugins: &[&dyn StepPlugin], workers: usize| {
        let options = PipelineOptions {
            batch_size: BATCH,
            workers,
            on_error: ErrorPolicy::Fail,
            seed: 0,
            max_derived_per_document: 16,
            max_derived_documents: u64::MAX,
        };
        best_of(budget, || {
            pt_data::pipeline::run(&inputs, plugins, true, &tokenizer, &options, 0, &|_, _| {})
                .unwrap();
        })
    };
    let tokenize_only = pipeline(&[], cores);
    let with_plugin_1 = pipeline(&[&plugin], 1);
    let with_plugin_n = pipeline(&[&plugin], cores);
    header("pipeline (plugins + tokenizer, bloom-tiny)");
    rate(&format!("tokenize only, {cores} workers"), tokenize_only);
    rate("medical_clean + tokenize, 1 worker", with_plugin_1);
    rate(
        &format!("medical_clean + tokenize, {cores} workers"),
        with_plugin_n,
    );
    println!(
        "scaling 1 -> {cores} workers: {:.2}x",
        with_plugin_1 / with_plugin_n
    );
    languages(&docs, mb, budget);
}

/// medical_clean's rules as native Rust over the corpus, one document at a time.
fn native_medical_clean(native: &medical_clean::MedicalClean, docs: &[(String, String)]) {
    for (source, text) in docs {
        let doc = Document {
            source: source.clone(),
            text: text.clone(),
        };
        let cleaned = match native.map(&doc) {
            Edit::Replace(t) => Document { text: t, ..doc },
            _ => doc,
        };
        std::hint::black_box(native.filter(&cleaned));
    }
}

/// medical_clean's component over the corpus in batches: map, then filter
/// the mapped texts.
fn component_medical_clean(instance: &mut dyn StepInstance, docs: &[(String, String)]) {
    for chunk in docs.chunks(BATCH) {
        let refs: Vec<DocRef<'_>> = chunk
            .iter()
            .map(|(s, t)| DocRef { source: s, text: t })
            .collect();
        let StepOutput::Verdicts(mapped) = instance.apply(StepKind::Mapper, &refs, 0).unwrap()
        else {
            unreachable!()
        };
        let texts: Vec<&str> = chunk
            .iter()
            .zip(&mapped)
            .map(|((_, t), v)| match v {
                Verdict::Replace(new) => new.as_str(),
                _ => t.as_str(),
            })
            .collect();
        let refs: Vec<DocRef<'_>> = chunk
            .iter()
            .zip(&texts)
            .map(|((s, _), t)| DocRef { source: s, text: t })
            .collect();
        std::hint::black_box(instance.apply(StepKind::Filter, &refs, 0).unwrap());
    }
}

/// length_filter, the same rules in every form, 1 thread, batches of BATCH.
fn languages(docs: &[(String, String)], mb: f64, budget: Duration) {
    let native = length_filter::LengthFilter::configure("{}").unwrap();
    let native_s = best_of(budget, || {
        for (source, text) in docs {
            let doc = Document {
                source: source.clone(),
                text: text.clone(),
            };
            std::hint::black_box(native.filter(&doc));
        }
    });
    println!(
        "{:<44} {:>10} {:>12}",
        "length_filter (same rules)", "MB/s", "vs native"
    );
    println!(
        "{:<44} {:>10.1} {:>12.2}",
        "native Rust (no sandbox)",
        mb / native_s,
        1.0
    );
    // target/release/deps/this-bench -> target/release/
    let library = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(2)
        .unwrap()
        .join("liblength_filter_native.so");
    let native_plugin = pt_native_plugin::NativePlugin::load(&library).unwrap();
    let mut plugins: Vec<(&str, Box<dyn StepPlugin>)> = vec![(
        "native library (--allow_native, C ABI)",
        Box::new(native_plugin),
    )];
    let runtime = PluginRuntime::new(None).unwrap();
    for (name, label) in [
        ("length_filter", "Rust component"),
        ("length_filter_c", "C component"),
        ("length_filter_py", "Python component (componentize-py)"),
        ("length_filter_js", "JavaScript component (componentize-js)"),
    ] {
        let limits = PluginLimits {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(60),
        };
        let mut plugin = runtime.load(&common::component(name), limits).unwrap();
        plugin.configure("{}").unwrap();
        plugins.push((label, Box::new(plugin)));
    }
    // The pipeline makes fresh instances for every batch (results must not
    // depend on what an instance saw before): its cost, beside one instance
    // reused for every batch.
    println!(
        "{:<44} {:>10} {:>12} {:>14} {:>10}",
        "", "", "", "fresh/batch MB/s", "cost"
    );
    for (label, plugin) in &plugins {
        let run = |fresh: bool| {
            let mut reused = plugin.instantiate(0).unwrap();
            best_of(budget, || {
                for (i, chunk) in docs.chunks(BATCH).enumerate() {
                    let refs: Vec<DocRef<'_>> = chunk
                        .iter()
                        .map(|(s, t)| DocRef { source: s, text: t })
                        .collect();
                    let mut made;
                    let instance = if fresh {
                        made = plugin.instantiate(i as u64).unwrap();
                        &mut made
                    } else {
                        &mut reused
                    };
                    std::hint::black_box(instance.apply(StepKind::Filter, &refs, 0).unwrap());
                }
            })
        };
        let (reused, fresh) = (run(false), run(true));
        println!(
            "{label:<44} {:>10.1} {:>12.2} {:>14.1} {:>9.0}%",
            mb / reused,
            native_s / reused,
            mb / fresh,
            100.0 * (fresh / reused - 1.0)
        );
    }
}
