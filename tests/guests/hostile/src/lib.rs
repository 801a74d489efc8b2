//! A plugin that misbehaves on request, to prove that pt-host contains it.
//! `{"mode": M, "marker": S}`: documents containing the marker trigger mode M
//! (in the filter, or for `amplify`/`stateful` the mapper, for `augment_*`
//! the augmenter).

// Off wasm, `register!` expands to nothing and the plugin is unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use pt_plugin_sdk::{Decision, Document, Edit, Kind, Plugin, TaskItem};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Config {
    mode: String,
    marker: String,
}

struct Hostile {
    config: Config,
}

impl Plugin for Hostile {
    const ID: &'static str = "hostile";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "Misbehaves on request (tests only)";
    const KINDS: &'static [Kind] = &[Kind::Mapper, Kind::Filter, Kind::Augmenter, Kind::Metric];

    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = pt_plugin_sdk::parse_config(config)?;
        match config.mode.as_str() {
            "loop_in_configure" => loop {
                std::hint::black_box(&config);
            },
            "reject_config" => Err("mode reject_config: this configuration is refused".into()),
            _ => Ok(Self { config }),
        }
    }

    /// The mapper misbehaves in two modes: output far larger than the input
    /// (`amplify`), and output that depends on what the instance did before
    /// and on its randomness and clock (`stateful`): a call counter kept
    /// across calls, random bytes, the virtual time.
    fn map(&self, doc: &Document) -> Edit {
        if !doc.text.contains(&self.config.marker) {
            return Edit::Unchanged;
        }
        match self.config.mode.as_str() {
            "amplify" => Edit::Replace(doc.text.repeat(1000)),
            "stateful" => {
                static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut random = [0u8; 4];
                let _ = getrandom::fill(&mut random);
                let clock = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_micros();
                Edit::Replace(format!(
                    "{} [call {call} random {random:02x?} clock {clock}]\n",
                    doc.text.trim_end()
                ))
            }
            _ => Edit::Unchanged,
        }
    }

    const TASK_FORMATS: &'static [&'static str] = &["hostile"];

    /// Task items: a fair two-choice question per record, and on records
    /// containing the marker a trap (`task_trap`), an endless loop
    /// (`task_loop`), a refusal (`task_refuse`), a gold index past the
    /// continuations (`task_gold`), one continuation (`task_one_choice`) or
    /// far too many items (`task_flood`).
    fn read_task_items(&self, _format: &str, record: &Document) -> Result<Vec<TaskItem>, String> {
        let item = |continuations: usize, gold: u32| TaskItem {
            subject: "hostile".into(),
            context: format!("Q: {}\nA:", record.text.trim()),
            continuations: (0..continuations).map(|i| format!(" {i}")).collect(),
            gold,
        };
        if !record.text.contains(&self.config.marker) {
            return Ok(vec![item(2, 0)]);
        }
        match self.config.mode.as_str() {
            "task_trap" => panic!("hostile task reader panicked on purpose"),
            "task_loop" => loop {
                std::hint::black_box(record);
            },
            "task_refuse" => Err("this record is refused on purpose".into()),
            "task_gold" => Ok(vec![item(4, 4)]),
            "task_one_choice" => Ok(vec![item(1, 0)]),
            "task_flood" => Ok(vec![item(2, 0); 5000]),
            _ => Ok(vec![item(2, 0)]),
        }
    }

    /// Derived documents on request: far too many (`augment_flood`), or
    /// empty ones (`augment_empty`).
    fn augment(&self, doc: &Document, _rng: &mut pt_plugin_sdk::Rng) -> Vec<String> {
        if !doc.text.contains(&self.config.marker) {
            return Vec::new();
        }
        match self.config.mode.as_str() {
            "augment_flood" => vec!["a copy\n".to_string(); 1000],
            "augment_empty" => vec![String::new(), " \n".to_string(), "kept\n".to_string()],
            _ => Vec::new(),
        }
    }

    fn filter(&self, doc: &Document) -> Decision {
        if !doc.text.contains(&self.config.marker) {
            return Decision::Keep;
        }
        match self.config.mode.as_str() {
            // Modes of the other exports.
            "amplify" | "miscount" | "stateful" | "augment_flood" | "augment_empty" => {
                Decision::Keep
            }
            mode if mode.starts_with("metric_") || mode.starts_with("task_") => Decision::Keep,
            "sleep" => {
                let started = std::time::Instant::now();
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Decision::Drop(format!("slept {} s", started.elapsed().as_secs()))
            }
            "clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Decision::Drop(format!("wall clock {} µs", now.as_micros()))
            }
            "random" => {
                let mut bytes = [0u8; 8];
                match getrandom::fill(&mut bytes) {
                    Ok(()) => Decision::Drop(format!("random {bytes:02x?}")),
                    Err(e) => Decision::Error(format!("random: {e}")),
                }
            }
            "socket" => match std::net::TcpStream::connect("127.0.0.1:9") {
                Ok(_) => Decision::Drop("connected to 127.0.0.1:9".into()),
                Err(e) => Decision::Error(format!("connect 127.0.0.1:9: {e}")),
            },
            "trap" => panic!("hostile plugin panicked on purpose"),
            "loop" => loop {
                std::hint::black_box(doc);
            },
            "memory_bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recurse" => Decision::Drop(format!("depth {}", recurse(doc.text.len() as u64))),
            "read_file" => match std::fs::read_to_string("/etc/passwd") {
                Ok(contents) => Decision::Drop(format!("read /etc/passwd: {contents}")),
                Err(e) => Decision::Error(format!("read /etc/passwd: {e}")),
            },
            "read_env" => match std::env::var("HOME") {
                Ok(home) => Decision::Drop(format!("HOME={home}")),
                Err(e) => Decision::Error(format!("env HOME: {e}")),
            },
            "print" => {
                for _ in 0..100_000 {
                    println!("a chatty plugin line that the host must keep bounded");
                }
                Decision::Keep
            }
            "log_flood" => {
                pt_plugin_sdk::log(pt_plugin_sdk::Level::Warn, &"x".repeat(10_000));
                for i in 0..1000 {
                    pt_plugin_sdk::log(pt_plugin_sdk::Level::Info, &format!("log line {i}"));
                }
                Decision::Keep
            }
            "report_error" => Decision::Error("cannot judge this document".into()),
            // Terminal control sequences in what the host prints: clear the
            // screen, retitle the window (OSC), ring the bell, a C1 CSI, a
            // bidi override; in a drop reason and in an error message.
            "escape_reason" => Decision::Drop(TERMINAL_ATTACK.into()),
            "escape_error" => Decision::Error(TERMINAL_ATTACK.into()),
            "huge_reason" => Decision::Drop("r".repeat(10 << 20)),
            "unique_reasons" => {
                Decision::Drop(format!("reason {}", doc.text.len() * 7919 % 100_003))
            }
            "exit" => std::process::exit(3),
            "handles" => exhaust_handles(),
            other => Decision::Error(format!("unknown mode {other}")),
        }
    }
}

/// Clears the screen, sets the window title, rings the bell, a C1 CSI, a
/// right-to-left override.
const TERMINAL_ATTACK: &str = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31mred\u{202e}txt.exe";

/// Creates resource handles until the runtime refuses.
#[cfg(target_arch = "wasm32")]
fn exhaust_handles() -> Decision {
    loop {
        std::mem::forget(exports::new_handle());
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn exhaust_handles() -> Decision {
    Decision::Keep
}

#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 64]);
    recurse(frame[0] + 1) + frame[63]
}

// Not `register!`: the SDK always answers once per document, so the exports
// are wrapped to break that contract in mode `miscount` (one verdict too many
// when a document has the marker) and `task_miscount` (one result too few).
#[cfg(target_arch = "wasm32")]
mod exports {
    use std::cell::Cell;

    use pt_plugin_sdk::Adapter;
    use pt_plugin_sdk::bindings::exports::pt::plugin0_1_0::{
        augmenter, filter, mapper, metric, plugin,
    };
    use pt_plugin_sdk::bindings::exports::pt::plugin0_2_0::tasks;
    use pt_plugin_sdk::bindings::pt::plugin0_1_0::types as wit;

    use super::{Config, Hostile};

    type Inner = Adapter<Hostile>;

    thread_local! {
        static MISCOUNT: Cell<bool> = const { Cell::new(false) };
        static MARKER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        static MODE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }

    pub struct Exports;

    impl plugin::Guest for Exports {
        /// Built with `--features evil_id` (as `hostile_evil_id.wasm`), it
        /// names itself with terminal escape sequences.
        fn describe() -> wit::Info {
            let mut info = <Inner as plugin::Guest>::describe();
            if cfg!(feature = "evil_id") {
                info.id = "hostile\u{1b}]0;pwned\u{7}\u{9b}2J".into();
                info.description = super::TERMINAL_ATTACK.repeat(1000);
            }
            info
        }

        fn configure(config: String) -> Result<(), String> {
            let parsed: Config = pt_plugin_sdk::parse_config(&config)?;
            MISCOUNT.with(|m| m.set(parsed.mode == "miscount"));
            MARKER.with(|m| *m.borrow_mut() = parsed.marker);
            MODE.with(|m| *m.borrow_mut() = parsed.mode);
            <Inner as plugin::Guest>::configure(config)
        }
    }

    impl filter::Guest for Exports {
        fn filter_batch(docs: Vec<wit::Document>) -> Vec<wit::Decision> {
            let marked = MARKER.with(|m| docs.iter().any(|d| d.text.contains(&*m.borrow())));
            let mut decisions = <Inner as filter::Guest>::filter_batch(docs);
            if MISCOUNT.with(Cell::get) && marked {
                decisions.push(wit::Decision::Keep);
            }
            decisions
        }
    }

    impl mapper::Guest for Exports {
        fn map_batch(docs: Vec<wit::Document>) -> Vec<wit::Edit> {
            <Inner as mapper::Guest>::map_batch(docs)
        }
    }

    impl augmenter::Guest for Exports {
        fn augment_batch(docs: Vec<wit::Document>, seed: u64) -> Vec<wit::DerivedDocument> {
            <Inner as augmenter::Guest>::augment_batch(docs, seed)
        }
    }

    /// A metric that returns what its mode asks: a host-owned name
    /// (`metric_reserved`), a name with terminal escapes (`metric_escape`),
    /// far too many values (`metric_flood`), nothing otherwise.
    pub struct NoMetric;

    /// A fresh handle in the component's resource table (never dropped by the caller).
    pub fn new_handle() -> metric::Accumulator {
        metric::Accumulator::new(NoMetric)
    }

    impl metric::GuestAccumulator for NoMetric {
        fn new() -> Self {
            NoMetric
        }

        fn add_batch(&self, _samples: Vec<wit::Sample>) {}

        fn compute(&self) -> Vec<wit::MetricValue> {
            let value = |name: &str| wit::MetricValue {
                name: name.to_string(),
                value: 1.0,
                higher_is_better: true,
            };
            match MODE.with(|m| m.borrow().clone()).as_str() {
                "metric_reserved" => vec![value("loss")],
                "metric_escape" => vec![value("score\u{1b}[2J")],
                "metric_flood" => (0..100_000).map(|i| value(&format!("m{i}"))).collect(),
                _ => Vec::new(),
            }
        }
    }

    impl metric::Guest for Exports {
        type Accumulator = NoMetric;
    }

    /// Breaks the task reader's contract in mode `task_miscount`: a batch
    /// with the marker gets one result fewer than it has records.
    impl tasks::Guest for Exports {
        fn formats() -> Vec<String> {
            <Inner as tasks::Guest>::formats()
        }

        fn read_items(
            format: String,
            records: Vec<wit::Document>,
        ) -> Vec<Result<Vec<tasks::TaskItem>, String>> {
            let marked = MARKER.with(|m| records.iter().any(|d| d.text.contains(&*m.borrow())));
            let mut results = <Inner as tasks::Guest>::read_items(format, records);
            if marked && MODE.with(|m| *m.borrow() == "task_miscount") {
                results.pop();
            }
            results
        }
    }

    pt_plugin_sdk::bindings::export_any_plugin!(Exports with_types_in pt_plugin_sdk::bindings);
}
