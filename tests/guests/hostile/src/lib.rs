//! A filter that misbehaves on request, to prove that pt-host contains it.
//! `{"mode": M, "marker": S}`: documents containing the marker trigger mode M.

// Off wasm, `register!` expands to nothing and the plugin is unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use pt_plugin_sdk::{Decision, Document, Edit, Kind, Plugin, register};
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
    const KINDS: &'static [Kind] = &[Kind::Mapper, Kind::Filter];

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

    /// The mapper misbehaves in one mode only: output far larger than the input.
    fn map(&self, doc: &Document) -> Edit {
        if self.config.mode == "amplify" && doc.text.contains(&self.config.marker) {
            Edit::Replace(doc.text.repeat(1000))
        } else {
            Edit::Unchanged
        }
    }

    fn filter(&self, doc: &Document) -> Decision {
        if !doc.text.contains(&self.config.marker) {
            return Decision::Keep;
        }
        match self.config.mode.as_str() {
            "amplify" => Decision::Keep,
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
            other => Decision::Error(format!("unknown mode {other}")),
        }
    }
}

#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 64]);
    recurse(frame[0] + 1) + frame[63]
}

register!(Hostile);
