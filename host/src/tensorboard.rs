//! `--report_to tensorboard`: TensorBoard event files, as HF's
//! `TensorBoardCallback` writes them, so that `tensorboard --logdir
//! OUTPUT_DIR/runs` shows the same curves for pt-host and HF runs.
//!
//! The format is small enough to write directly: a file of TFRecords
//! (`u64` length, masked CRC32C of the length, the data, masked CRC32C of the
//! data), each an `Event` protobuf (tensorflow/core/util/event.proto) holding
//! a `Summary` of `simple_value` scalars (tensorflow/core/framework/summary.proto).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::Value;

/// TFRecord's CRC: CRC32C, rotated and offset so that a CRC of data holding
/// CRCs does not degenerate.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A protobuf field key: field number and wire type.
fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn length_delimited(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut out, 2, 0);
    varint(&mut out, step as u64);
    what(&mut out);
    out
}

/// `Summary { repeated Value value = 1 }`, `Value { tag = 1; simple_value = 2 }`.
fn summary(scalars: &[(String, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, value) in scalars {
        let mut entry = Vec::new();
        length_delimited(&mut entry, 1, tag.as_bytes());
        key(&mut entry, 2, 5);
        entry.extend_from_slice(&value.to_le_bytes());
        length_delimited(&mut out, 1, &entry);
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// HF's default `logging_dir`: `OUTPUT_DIR/runs/MON-DD_HH-MM-SS_HOST`.
pub fn default_logging_dir(output_dir: &Path) -> PathBuf {
    let stamp = chrono::Local::now().format("%b%d_%H-%M-%S");
    output_dir
        .join("runs")
        .join(format!("{stamp}_{}", hostname()))
}

/// One event file, flushed after every event so a live TensorBoard follows the run.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--logging_dir {}: cannot create", dir.display()))?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.0",
            now() as u64,
            hostname(),
            std::process::id()
        ));
        let file =
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        writer.write(&event(now(), 0, |out| {
            length_delimited(out, 3, b"brain.Event:2")
        }))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Scalars at `step`, as one event.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f32)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let summary = summary(scalars);
        self.write(&event(now(), step as i64, |out| {
            length_delimited(out, 5, &summary)
        }))
    }
}

/// The scalars of a trainer log entry under HF's tags: `eval_loss` →
/// `eval/loss`, `loss` → `train/loss`; `perplexity` (an evaluation's, named
/// as MedicalGPT does) → `eval/perplexity`; `step` is the event's step.
pub fn log_scalars(entry: &Value) -> Vec<(String, f32)> {
    let Some(fields) = entry.as_object() else {
        return Vec::new();
    };
    fields
        .iter()
        .filter(|(name, _)| name.as_str() != "step")
        .filter_map(|(name, value)| {
            let value = value.as_f64()?;
            let tag = match name.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None if name == "perplexity" => "eval/perplexity".into(),
                None => format!("train/{name}"),
            };
            Some((tag, value as f32))
        })
        .collect()
}

/// The data report's counts, as scalars at step 0 (`data/train_blocks`, ...).
pub fn data_scalars(report: &pt_data::DataReport) -> Vec<(String, f32)> {
    let mut scalars = Vec::new();
    for (split, counts) in [("train", &report.train), ("validation", &report.validation)] {
        for (name, value) in [
            ("documents_read", counts.documents_read),
            ("documents", counts.documents),
            ("tokens", counts.tokens),
            ("blocks", counts.blocks),
            ("tokens_dropped", counts.tokens_dropped),
        ] {
            scalars.push((format!("data/{split}_{name}"), value as f32));
        }
    }
    scalars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_published_values() {
        // The CRC-32C check value (RFC 3720, B.4), and TensorFlow's masking
        // of it (`((crc >> 15) | (crc << 17)) + 0xa282ead8`) worked by hand.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn protobuf_encoding_matches_hand_encoded_bytes() {
        // Value { tag: "a", simple_value: 1.0 } inside Summary.value (field 1).
        assert_eq!(
            summary(&[("a".into(), 1.0)]),
            [0x0a, 0x08, 0x0a, 0x01, b'a', 0x15, 0x00, 0x00, 0x80, 0x3f]
        );
        // Step 300 is the varint ac 02.
        let bytes = event(0.0, 300, |_| {});
        assert_eq!(bytes[..9], [0x09, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[9..], [0x10, 0xac, 0x02]);
    }

    #[test]
    fn log_entries_get_hf_tags() {
        let entry = serde_json::json!({"loss": 2.5, "learning_rate": 1e-4, "step": 10, "eval_loss": 3.0, "perplexity": 20.0, "note": "x"});
        let mut tags = log_scalars(&entry);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tags,
            vec![
                ("eval/loss".to_string(), 3.0),
                ("eval/perplexity".to_string(), 20.0),
                ("train/learning_rate".to_string(), 1e-4),
                ("train/loss".to_string(), 2.5)
            ]
        );
    }
}
