//! HF model directories: weights by checkpoint name from `model.safetensors`
//! (with or without the `transformer.` prefix), and writing a directory as
//! `save_pretrained` does (weights, `config.json` with its dtype, the
//! generation config and tokenizer files).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// Weights by name, without the optional `transformer.` prefix, converted to
/// the compute dtype.
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    source: String,
    dtype: DType,
}

impl Weights {
    /// The tensors of `path` (`model.safetensors`) on `device`, to be taken
    /// by name and converted to `dtype`.
    pub(crate) fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let loaded = candle_core::safetensors::load(path, device)
            .with_context(|| format!("{}: cannot load weights", path.display()))?;
        let tensors = loaded
            .into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("transformer.")
                        .map(str::to_string)
                        .unwrap_or(k),
                    v,
                )
            })
            .collect();
        Ok(Self {
            tensors,
            source: path.display().to_string(),
            dtype,
        })
    }

    /// The tensor `name`, checked against the shape the config implies.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.tensors.remove(name).with_context(|| {
            format!(
                "{}: no weight `{name}` (is this a BLOOM checkpoint?)",
                self.source
            )
        })?;
        if tensor.dims() != shape {
            bail!(
                "{}: `{name}` has shape {:?}, config.json implies {shape:?}",
                self.source,
                tensor.dims()
            );
        }
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

fn copy_if_present(source: &Path, dir: &Path, file: &str) -> Result<()> {
    if source.join(file).is_file() {
        std::fs::copy(source.join(file), dir.join(file))
            .with_context(|| format!("{}: cannot copy {file}", dir.display()))?;
    }
    Ok(())
}

/// The tokenizer files of a model directory, copied next to saved weights as
/// HF's `save_pretrained` does.
pub fn copy_tokenizer_files(source: &Path, dir: &Path) -> Result<()> {
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        copy_if_present(source, dir, file)?;
    }
    Ok(())
}

/// Writes `tensors` (a model's, by checkpoint name) as an HF model directory: `model.safetensors`
/// in `dtype` (with the `transformer.` prefix, no `lm_head`: it is tied),
/// `config.json` (its dtype updated), the generation config and the
/// tokenizer files copied from `source`.
pub(crate) fn save_model(
    dir: &Path,
    tensors: Vec<(String, &Tensor)>,
    source: &Path,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.detach().to_dtype(dtype)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    let config_path = source.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config_path)
            .with_context(|| format!("{}: cannot read", config_path.display()))?,
    )
    .with_context(|| format!("{}: malformed JSON", config_path.display()))?;
    let name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    config["dtype"] = name.into();
    if config.get("torch_dtype").is_some() {
        config["torch_dtype"] = name.into();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("{}: cannot write config.json", dir.display()))?;
    copy_if_present(source, dir, "generation_config.json")?;
    copy_tokenizer_files(source, dir)
}
