//! Fresh checkpoints with random weights, initialised as HF's
//! `_init_weights` does for every family: embedding and linear weights
//! ~ N(0, initializer_range²), biases 0, norm weights 1 (LayerNorm biases 0).

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

/// How a weight starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal,
    Ones,
    Zeros,
}

/// A weight to write: HF name, shape, initialisation.
pub type WeightSpec = (String, Vec<usize>, Init);

/// BLOOM's weights in checkpoint order (tied LM head).
pub fn bloom_weights(config: &Config) -> Vec<WeightSpec> {
    let h = config.hidden_size;
    let mut weights = vec![(
        "transformer.word_embeddings.weight".to_string(),
        vec![config.vocab_size, h],
        Init::Normal,
    )];
    let norm = |weights: &mut Vec<WeightSpec>, name: &str| {
        weights.push((format!("transformer.{name}.weight"), vec![h], Init::Ones));
        weights.push((format!("transformer.{name}.bias"), vec![h], Init::Zeros));
    };
    norm(&mut weights, "word_embeddings_layernorm");
    norm(&mut weights, "ln_f");
    for i in 0..config.n_layer {
        norm(&mut weights, &format!("h.{i}.input_layernorm"));
        norm(&mut weights, &format!("h.{i}.post_attention_layernorm"));
        for (name, input, output) in [
            ("self_attention.query_key_value", h, 3 * h),
            ("self_attention.dense", h, h),
            ("mlp.dense_h_to_4h", h, 4 * h),
            ("mlp.dense_4h_to_h", 4 * h, h),
        ] {
            let p = format!("transformer.h.{i}.{name}");
            weights.push((format!("{p}.weight"), vec![output, input], Init::Normal));
            weights.push((format!("{p}.bias"), vec![output], Init::Zeros));
        }
    }
    weights
}

/// A Llama-family model's weights in checkpoint order.
pub fn llama_weights(config: &crate::llama::Config) -> Vec<WeightSpec> {
    let (h, d, inter) = (
        config.hidden_size,
        config.head_dim(),
        config.intermediate_size,
    );
    let (heads, kv) = (config.num_attention_heads, config.kv_heads());
    let qwen2 = config.model_type == "qwen2";
    let mut weights = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
        Init::Normal,
    )];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: &str, shape: Vec<usize>, init: Init| {
            weights.push((format!("{p}.{name}"), shape, init));
        };
        push("input_layernorm.weight", vec![h], Init::Ones);
        for (name, output, input, bias) in [
            ("q_proj", heads * d, h, qwen2 || config.attention_bias),
            ("k_proj", kv * d, h, qwen2 || config.attention_bias),
            ("v_proj", kv * d, h, qwen2 || config.attention_bias),
            ("o_proj", h, heads * d, !qwen2 && config.attention_bias),
        ] {
            push(
                &format!("self_attn.{name}.weight"),
                vec![output, input],
                Init::Normal,
            );
            if bias {
                push(&format!("self_attn.{name}.bias"), vec![output], Init::Zeros);
            }
        }
        if config.model_type == "qwen3" {
            push("self_attn.q_norm.weight", vec![d], Init::Ones);
            push("self_attn.k_norm.weight", vec![d], Init::Ones);
        }
        push("post_attention_layernorm.weight", vec![h], Init::Ones);
        for (name, output, input) in [
            ("gate_proj", inter, h),
            ("up_proj", inter, h),
            ("down_proj", h, inter),
        ] {
            push(
                &format!("mlp.{name}.weight"),
                vec![output, input],
                Init::Normal,
            );
            if config.mlp_bias {
                push(&format!("mlp.{name}.bias"), vec![output], Init::Zeros);
            }
        }
    }
    weights.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
    if !config.tie_word_embeddings {
        weights.push((
            "lm_head.weight".to_string(),
            vec![config.vocab_size, h],
            Init::Normal,
        ));
    }
    weights
}

/// Writes `model.safetensors` with random `weights` (drawn in order),
/// `config.json` (`hf_config` with the initializer range, f32 dtype and the
/// special token ids) and `generation_config.json` into `dir`.
pub fn write_random_weights(
    dir: &Path,
    weights: &[WeightSpec],
    mut hf_config: serde_json::Value,
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
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape, init) in weights {
        let tensor = match init {
            Init::Normal => normal(shape)?,
            Init::Ones => Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?,
            Init::Zeros => Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?,
        };
        tensors.insert(name.clone(), tensor);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    for (key, value) in [
        ("initializer_range", serde_json::json!(initializer_range)),
        ("bos_token_id", 1.into()),
        ("eos_token_id", 2.into()),
        ("pad_token_id", 3.into()),
        ("use_cache", true.into()),
        ("dtype", "float32".into()),
    ] {
        hf_config[key] = value;
    }
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

/// BLOOM's `config.json` for `config` (tied LM head, no dropout).
pub fn bloom_hf_config(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "apply_residual_connection_post_layernorm": config.apply_residual_connection_post_layernorm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": true,
    })
}

/// A random BLOOM checkpoint for `config`.
pub fn write_random_model(
    dir: &Path,
    config: &Config,
    initializer_range: f64,
    seed: u64,
) -> Result<()> {
    let weights = bloom_weights(config);
    write_random_weights(
        dir,
        &weights,
        bloom_hf_config(config),
        initializer_range,
        seed,
    )
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
