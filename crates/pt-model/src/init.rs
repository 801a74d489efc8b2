//! A fresh BLOOM checkpoint with random weights, initialised as HF's
//! `BloomPreTrainedModel._init_weights` does: embedding and linear weights
//! ~ N(0, initializer_range²), biases 0, LayerNorm weight 1 and bias 0.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::bloom::Config;

/// Values per parallel task of the initialisation.
const INIT_TASK: usize = 1 << 16;

/// Writes `config.json`, `generation_config.json` and `model.safetensors`
/// (HF key names, tied LM head) for `config` into `dir`.
pub fn write_random_model(
    dir: &Path,
    config: &Config,
    initializer_range: f64,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // One ChaCha stream in tensor order, each value from two u64 draws (four
    // 32-bit words). Tasks seek to their first value's word, so the values
    // are those of a sequential pass, computed in parallel.
    let mut drawn = 0u128;
    let mut normal = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut values = vec![0f32; n];
        let first_word = drawn;
        values
            .par_chunks_mut(INIT_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_word_pos(first_word + 4 * (task * INIT_TASK) as u128);
                for value in chunk {
                    // Box–Muller: two uniforms give one standard normal.
                    let u: f64 = 1.0 - rng.random::<f64>();
                    let v: f64 = rng.random();
                    *value = (initializer_range
                        * (-2.0 * u.ln()).sqrt()
                        * (std::f64::consts::TAU * v).cos()) as f32;
                }
            });
        drawn += 4 * n as u128;
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let constant = |shape: &[usize], value: f64| -> Result<Tensor> {
        Ok((Tensor::ones(shape, DType::F32, &Device::Cpu)? * value)?)
    };
    let h = config.hidden_size;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "transformer.word_embeddings.weight".into(),
        normal(&[config.vocab_size, h])?,
    );
    let norm = |tensors: &mut HashMap<String, Tensor>, name: &str| -> Result<()> {
        tensors.insert(format!("transformer.{name}.weight"), constant(&[h], 1.0)?);
        tensors.insert(format!("transformer.{name}.bias"), constant(&[h], 0.0)?);
        Ok(())
    };
    norm(&mut tensors, "word_embeddings_layernorm")?;
    norm(&mut tensors, "ln_f")?;
    for i in 0..config.n_layer {
        norm(&mut tensors, &format!("h.{i}.input_layernorm"))?;
        norm(&mut tensors, &format!("h.{i}.post_attention_layernorm"))?;
        for (name, input, output) in [
            ("self_attention.query_key_value", h, 3 * h),
            ("self_attention.dense", h, h),
            ("mlp.dense_h_to_4h", h, 4 * h),
            ("mlp.dense_4h_to_h", 4 * h, h),
        ] {
            tensors.insert(
                format!("transformer.h.{i}.{name}.weight"),
                normal(&[output, input])?,
            );
            tensors.insert(
                format!("transformer.h.{i}.{name}.bias"),
                constant(&[output], 0.0)?,
            );
        }
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    let hf_config = serde_json::json!({
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": config.vocab_size,
        "hidden_size": h,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": initializer_range,
        "apply_residual_connection_post_layernorm": config.apply_residual_connection_post_layernorm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": true,
        "use_cache": true,
        "dtype": "float32",
    });
    let generation = serde_json::json!({
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "use_cache": true,
    });
    for (file, value) in [
        ("config.json", hf_config),
        ("generation_config.json", generation),
    ] {
        std::fs::write(dir.join(file), serde_json::to_vec_pretty(&value)?)
            .with_context(|| format!("{}: cannot write", dir.join(file).display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel draw equals one sequential ChaCha stream in tensor order,
    /// across task boundaries and from one tensor to the next.
    #[test]
    fn parallel_initialisation_equals_one_sequential_stream() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "n_head": 2, "n_layer": 1, "vocab_size": 5000,
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &config, 0.02, 7).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut next = || {
            let u: f64 = 1.0 - rng.random::<f64>();
            let v: f64 = rng.random();
            (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        // 80000 embedding values span two tasks; the QKV weight comes next.
        let expected: Vec<f32> = (0..5000 * 16 + 48 * 16).map(|_| next()).collect();
        let embedding: Vec<f32> = tensors["transformer.word_embeddings.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let qkv: Vec<f32> = tensors["transformer.h.0.self_attention.query_key_value.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(embedding, expected[..5000 * 16]);
        assert_eq!(qkv, expected[5000 * 16..]);
    }
}
