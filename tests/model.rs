//! BLOOM against HF transformers' own numbers on the bloom-tiny fixture
//! (f32, CPU): logits within 1e-4 absolute, loss within 1e-5 relative; the
//! bf16 compute path within bf16 rounding.

#[path = "support/bloom_tiny.rs"]
mod bloom_tiny;

use bloom_tiny::{expected, fixture, max_abs_diff, rows};
use candle_core::{DType, Device};
use pt_model::Bloom;
use pt_model::ops::next_token_loss_sum;

fn fixture_model(dtype: DType) -> Bloom {
    Bloom::load(&fixture().join("model"), &Device::Cpu, dtype).unwrap()
}

/// The largest logit difference from HF's at the probes' real tokens.
fn probe_logit_error(model: &Bloom) -> f32 {
    let expected = expected();
    let ids = rows(&expected["probe_input_ids"]);
    let mask = rows(&expected["probe_attention_mask"]);
    assert!(
        mask.iter().any(|r| r[0] == 0),
        "the probes include left padding"
    );
    let logits = model
        .forward(&ids, &mask)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let reference = expected["probe_logits"].to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in logits[b][t].iter().zip(&reference[b][t]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

/// Our mean loss over HF's validation blocks, and HF's.
fn validation_loss(model: &Bloom) -> (f64, f64) {
    let expected = expected();
    let blocks = rows(&expected["valid_blocks"]);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in blocks.chunks(16) {
        let mask: Vec<Vec<u32>> = chunk.iter().map(|r| vec![1; r.len()]).collect();
        let logits = model.forward(chunk, &mask).unwrap();
        let labels: Vec<Vec<i64>> = chunk
            .iter()
            .map(|r| r.iter().map(|&v| v as i64).collect())
            .collect();
        let (loss, n) = next_token_loss_sum(&logits, &labels).unwrap();
        sum += loss.to_scalar::<f32>().unwrap() as f64;
        count += n;
    }
    let hf = expected["valid_loss"].to_vec1::<f32>().unwrap()[0] as f64;
    (sum / count as f64, hf)
}

#[test]
fn logits_match_hf_on_left_padded_probes() {
    let worst = probe_logit_error(&fixture_model(DType::F32));
    assert!(worst < 1e-4, "largest logit difference at tokens: {worst}");
}

#[test]
fn validation_loss_matches_hf() {
    let (ours, hf) = validation_loss(&fixture_model(DType::F32));
    assert!(((ours - hf) / hf).abs() < 1e-5, "ours {ours}, HF {hf}");
}

/// The CUDA path's precision (bf16 base weights and hidden states; f32
/// LayerNorm statistics, softmax, LoRA and loss), run on the CPU: within
/// bf16's rounding of HF's f32 numbers, and finite on left-padded rows.
#[test]
fn bf16_compute_stays_within_rounding_of_hf() {
    let model = fixture_model(DType::BF16);
    assert_eq!(model.dtype(), DType::BF16);
    // bf16 keeps 8 significant bits: 2^-8 of the largest logit (5.05) is 0.02.
    let worst = probe_logit_error(&model);
    assert!(worst < 0.06, "largest logit difference: {worst}");
    // Rounding errors average out over ~2k tokens (measured: 4e-6 relative).
    let (ours, hf) = validation_loss(&model);
    assert!(((ours - hf) / hf).abs() < 1e-4, "ours {ours}, HF {hf}");
}

#[test]
fn wrong_checkpoints_are_refused_clearly() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 8, "n_head": 2, "n_layer": 1, "vocab_size": 10}"#,
    )
    .unwrap();
    let err = Bloom::load(&dir, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model_type is \"llama\"; pt-host trains BLOOM models"),
        "{err}"
    );
    // Shapes are checked against config.json.
    let config = std::fs::read_to_string(fixture().join("model/config.json"))
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 128");
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(
        fixture().join("model/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = Bloom::load(&dir, &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "`word_embeddings.weight` has shape [2000, 64], config.json implies [2000, 128]"
        ),
        "{err}"
    );
}

#[test]
fn adapters_that_target_nothing_or_miss_weights_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = std::fs::read_to_string(fixture().join("lora_init/adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        config
            .replace("\"query_key_value\"", "\"q_proj\"")
            .replace("\"dense\",", "")
            .replace("\"dense_h_to_4h\",", "")
            .replace("\"dense_4h_to_h\",", ""),
    )
    .unwrap();
    std::fs::copy(
        fixture().join("lora_init/adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut model = fixture_model(DType::F32);
    let err = model.load_adapter(dir).err().unwrap().to_string();
    assert!(
        err.contains("target_modules [\"q_proj\"] match no layer"),
        "{err}"
    );
}

/// Backward reaches every LoRA weight and computes nothing for the frozen
/// base, in f32 and with bf16 base weights (the f32 adapters still get f32
/// gradients).
#[test]
fn only_adapter_weights_get_gradients() {
    for dtype in [DType::F32, DType::BF16] {
        assert_only_adapters_get_gradients(fixture_model(dtype));
    }
}

fn assert_only_adapters_get_gradients(mut model: Bloom) {
    model.load_adapter(&fixture().join("lora_init")).unwrap();
    let blocks = rows(&expected()["valid_blocks"]);
    let batch = &blocks[..2];
    let mask: Vec<Vec<u32>> = batch.iter().map(|r| vec![1; r.len()]).collect();
    let labels: Vec<Vec<i64>> = batch
        .iter()
        .map(|r| r.iter().map(|&v| v as i64).collect())
        .collect();
    let (loss, _) = next_token_loss_sum(&model.forward(batch, &mask).unwrap(), &labels).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.lora_variables() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert!(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}: zero gradient"
        );
    }
    let frozen = model.base_tensors_mut();
    assert_eq!(frozen.len(), 3 + 2 * 12 + 2);
    let matrices_with_gradients = frozen
        .iter()
        .map(|(_, t)| &**t)
        .filter(|t| t.rank() == 2 && grads.get(t).is_some())
        .count();
    assert_eq!(
        matrices_with_gradients, 0,
        "no gradient is computed for frozen weight matrices"
    );
}

/// The original bigscience checkpoints: keys without `transformer.`, legacy
/// config names, half-precision storage.
#[test]
fn legacy_keys_and_half_precision_checkpoints_load() {
    let original = fixture_model(DType::F32);
    let tensors =
        candle_core::safetensors::load(fixture().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("model/config.json")).unwrap(),
    )
    .unwrap();
    let mut legacy = serde_json::Map::new();
    for (key, value) in config.as_object().unwrap() {
        let renamed = match key.as_str() {
            "hidden_size" => "n_embed",
            "n_head" => "num_attention_heads",
            "n_layer" => "num_hidden_layers",
            other => other,
        };
        legacy.insert(renamed.to_string(), value.clone());
    }
    let ids = rows(&expected()["probe_input_ids"]);
    let mask = rows(&expected()["probe_attention_mask"]);
    let reference = original.forward(&ids, &mask).unwrap();
    for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 0.5)] {
        let temp = tempfile::tempdir().unwrap();
        std::fs::write(
            temp.path().join("config.json"),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let stripped: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("transformer.").to_string(),
                    v.to_dtype(dtype).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&stripped, temp.path().join("model.safetensors")).unwrap();
        let model = Bloom::load(temp.path(), &Device::Cpu, DType::F32).unwrap();
        let logits = model.forward(&ids, &mask).unwrap();
        let diff = max_abs_diff(&logits, &reference);
        assert!(diff <= tolerance, "{dtype:?}: logits differ by {diff}");
    }
}
