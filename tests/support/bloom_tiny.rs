//! The bloom-tiny fixture: HF's checkpoint and the numbers it computed.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bloom-tiny")
}

/// `expected.safetensors`: probes, their logits, validation blocks and loss.
pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// An i64 matrix as rows of token ids.
pub fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

/// `train.txt` packed into 32-token blocks, as the trajectory was trained.
pub fn train_blocks() -> Vec<Vec<u32>> {
    let tokenizer = pt_data::Tokenizer::from_dir(&fixture().join("model")).unwrap();
    let file = pt_data::corpus::read_file(
        &fixture().join("train.txt"),
        &pt_data::ReadOptions::default(),
    )
    .unwrap();
    let docs: Vec<Vec<u32>> = file
        .documents
        .iter()
        .map(|d| tokenizer.encode_document(&d.text).unwrap())
        .collect();
    let (blocks, _) = pt_data::packing::pack(&docs, 32);
    (0..blocks.len()).map(|i| blocks.row(i).to_vec()).collect()
}

/// `trajectory.json`: HF + PEFT's six LoRA steps.
pub fn trajectory() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("trajectory.json")).unwrap())
        .unwrap()
}
