//! A fresh BLOOM checkpoint with random weights, initialised as HF's
//! `BloomPreTrainedModel._init_weights` does: embedding and linear weights
//! ~ N(0, initializer_range²), biases 0, LayerNorm weight 1 and bias 0.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Config;

/// Writes `config.json`, `generation_config.json` and `model.safetensors`
/// (HF key names, tied LM head) for `config` into `dir`.
pub fn write_random_model(
    dir: &Path,
    config: &Config,
    initializer_range: f64,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // Box–Muller: two uniforms give one standard normal.
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let u: f64 = 1.0 - rng.random::<f64>();
                let v: f64 = rng.random();
                (initializer_range * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos())
                    as f32
            })
            .collect();
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
