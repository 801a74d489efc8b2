//! The tiny fixtures (`tests/fixtures/FAMILY-tiny`): HF's checkpoints and
//! the numbers transformers + PEFT computed on them. bloom-tiny is the
//! default; the `_of` functions take a family.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// Every family with a tiny fixture, BLOOM first.
pub const FAMILIES: [&str; 5] = ["bloom", "llama", "mistral", "qwen2", "qwen3"];

/// `tests/fixtures/bloom-tiny`, found from whichever crate runs the test.
pub fn fixture() -> PathBuf {
    fixture_of("bloom")
}

/// `tests/fixtures/FAMILY-tiny`.
pub fn fixture_of(family: &str) -> PathBuf {
    let name = format!("tests/fixtures/{family}-tiny");
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(&name))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| panic!("{name} above the crate"))
}

/// Where the parity tests compute: the CPU, or the GPU with
/// `PT_TEST_DEVICE=cuda` (a `--features cuda` build; `bench/gpu_check.sh`).
pub fn test_device() -> Device {
    match std::env::var("PT_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("PT_TEST_DEVICE=cuda: no usable CUDA device"),
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("PT_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// `expected.safetensors`: probes, their logits, validation blocks and loss.
pub fn expected() -> HashMap<String, Tensor> {
    expected_of("bloom")
}

pub fn expected_of(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_of(family).join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// An i64 matrix as rows of token ids.
pub fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

/// A fixture text file packed as the pipeline packs it (a document per line
/// with its `\n`, EOS appended, concatenated, cut into `block_size` blocks).
pub fn packed(file: &str, block_size: usize) -> pt_data::Blocks {
    packed_of("bloom", file, block_size)
}

pub fn packed_of(family: &str, file: &str, block_size: usize) -> pt_data::Blocks {
    let dir = fixture_of(family);
    let tokenizer = pt_data::Tokenizer::from_dir(&dir.join("model")).unwrap();
    let file =
        pt_data::corpus::read_file(&dir.join(file), &pt_data::ReadOptions::default()).unwrap();
    let docs: Vec<Vec<u32>> = file
        .documents
        .iter()
        .map(|d| tokenizer.encode_document(&d.text).unwrap())
        .collect();
    pt_data::packing::pack(&docs, block_size).0
}

/// `trajectory.json`: HF + PEFT's six LoRA steps.
pub fn trajectory() -> serde_json::Value {
    trajectory_of("bloom")
}

pub fn trajectory_of(family: &str) -> serde_json::Value {
    let path = fixture_of(family).join("trajectory.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The largest absolute elementwise difference of two tensors (a NaN on
/// one side counts as infinite).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    pt_model::fused::max_abs_difference(a, b).unwrap()
}
