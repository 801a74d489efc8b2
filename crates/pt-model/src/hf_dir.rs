//! HF model directories: weights by checkpoint name from `model.safetensors`
//! (with or without the `transformer.` prefix; bitsandbytes' 4-bit weights
//! as it saves them), and writing a directory as `save_pretrained` does
//! (weights, `config.json` with its dtype, the generation config and
//! tokenizer files).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::bf16::Bf16Weight;
use crate::linear::LinearWeight;
use crate::nf4::{self, BlockScales, Nf4Config, Nf4Weight};

/// Weights by name, converted to the compute dtype; with NF4 or bf16
/// storage, the decoder blocks' matrices converted as they are read.
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Linear weights held otherwise than as a dense tensor.
    compact: HashMap<String, LinearWeight>,
    source: String,
    model_type: &'static str,
}

/// How the decoder blocks' linear weights are held, where not in the run's
/// dtype: the embedding and LM head stay there, as transformers leaves them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BlockWeights {
    /// QLoRA's base: 4-bit NF4, multiplied in the compute dtype.
    Nf4(Nf4Config),
    /// bf16 on the CPU, multiplied in f32 (see [`crate::bf16`]).
    Bf16,
}

/// Which weights are converted as they are read: every matrix whose name
/// starts with `blocks` (a decoder block's; their only 2-D weights are the
/// linear layers').
#[derive(Clone, Copy)]
pub(crate) struct Compact<'a> {
    pub weights: BlockWeights,
    pub blocks: &'a str,
}

/// The converter a checkpoint in PyTorch's pickle format needs.
const CONVERT_BIN: &str = "python3 -c \"import sys, transformers as t; \
t.AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])\" DIR";

impl Weights {
    /// The weights of the HF model directory `dir`: `model.safetensors`, or
    /// the shards `model.safetensors.index.json` lists, read one shard at a
    /// time (peak memory: the model plus one shard), on `device` in `dtype`.
    /// Keys lose `strip` where they carry it (BLOOM checkpoints come both
    /// with and without `transformer.`).
    pub(crate) fn open(
        dir: &Path,
        device: &Device,
        dtype: DType,
        model_type: &'static str,
        strip: Option<&str>,
        compact: Option<Compact>,
    ) -> Result<Self> {
        if compact.is_some_and(|c| c.weights == BlockWeights::Bf16) && !device.is_cpu() {
            bail!("bf16-held weights are multiplied on the CPU; on a GPU load the model in bf16");
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else if dir.join("pytorch_model.bin").is_file() {
            bail!(
                "{}: only pytorch_model.bin, which pt-host does not read (a pickle can run code); \
                 convert it to safetensors with: {CONVERT_BIN}",
                dir.display()
            );
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let (mut tensors, mut compacted) = (HashMap::new(), HashMap::new());
        let mut saved_4bit = HashMap::new();
        for file in &files {
            read_safetensors(file, device, |name, tensor| {
                let name = match strip.and_then(|p| name.strip_prefix(p)) {
                    Some(stripped) => stripped.to_string(),
                    None => name,
                };
                if is_bitsandbytes_part(&name, &tensor) {
                    saved_4bit.insert(name, tensor);
                    return Ok(());
                }
                let tensor = tensor.to_dtype(dtype)?;
                match compact {
                    // One matrix at a time: the dense model never exists.
                    Some(c) if tensor.rank() == 2 && name.starts_with(c.blocks) => {
                        let weight = match c.weights {
                            BlockWeights::Nf4(config) => {
                                LinearWeight::Nf4(Arc::new(Nf4Weight::quantize(&tensor, config)?))
                            }
                            BlockWeights::Bf16 => {
                                LinearWeight::Bf16(Arc::new(Bf16Weight::new(&tensor)?))
                            }
                        };
                        compacted.insert(name, weight);
                    }
                    _ => {
                        tensors.insert(name, tensor);
                    }
                }
                Ok(())
            })
            .with_context(|| format!("{}: cannot load weights", file.display()))?;
        }
        let source = match files.as_slice() {
            [one] => one.display().to_string(),
            _ => index.display().to_string(),
        };
        if !saved_4bit.is_empty() {
            let compute_dtype = match compact.map(|c| c.weights) {
                Some(BlockWeights::Nf4(config)) => config.compute_dtype,
                Some(BlockWeights::Bf16) => bail!(
                    "{source}: its linear weights are saved in 4 bits (bitsandbytes NF4), so they cannot be held in bf16; \
                     load it as saved (without bf16-held weights)"
                ),
                None => saved_compute_dtype(dir)?,
            };
            let weights = assemble_4bit(saved_4bit, compute_dtype)
                .with_context(|| format!("{source}: cannot read its 4-bit weights"))?;
            compacted.extend(
                weights
                    .into_iter()
                    .map(|(name, weight)| (name, LinearWeight::Nf4(Arc::new(weight)))),
            );
        }
        Ok(Self {
            tensors,
            compact: compacted,
            source,
            model_type,
        })
    }

    /// A linear layer's weight `name` `[output, input]`, NF4 or bf16 where it
    /// was converted as it was read.
    pub(crate) fn take_linear(
        &mut self,
        name: &str,
        output: usize,
        input: usize,
    ) -> Result<LinearWeight> {
        match self.compact.remove(name) {
            Some(weight) if weight.dims2()? == (output, input) => Ok(weight),
            Some(weight) => bail!(
                "{}: `{name}` has shape {:?}, config.json implies {:?}",
                self.source,
                weight.dims2()?,
                (output, input)
            ),
            None => Ok(LinearWeight::Dense(self.take(name, &[output, input])?)),
        }
    }

    /// The tensor `name`, checked against the shape the config implies.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.tensors.remove(name).with_context(|| {
            format!(
                "{}: no weight `{name}` (is this a {} checkpoint?)",
                self.source, self.model_type
            )
        })?;
        if tensor.dims() != shape {
            bail!(
                "{}: `{name}` has shape {:?}, config.json implies {shape:?}",
                self.source,
                tensor.dims()
            );
        }
        Ok(tensor)
    }
}

/// What a 4-bit weight saved by bitsandbytes adds to `X.weight` (its packed
/// codes, u8) under names of its own.
const SAVED_4BIT_SUFFIXES: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// The quant state's key: `X.weight` + this + the quantisation type.
const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// Whether `name` is part of a 4-bit weight as bitsandbytes saves it.
fn is_bitsandbytes_part(name: &str, tensor: &Tensor) -> bool {
    tensor.dtype() == DType::U8
        || name.contains(QUANT_STATE)
        || SAVED_4BIT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The compute dtype a 4-bit checkpoint names (`quantization_config`'s
/// `bnb_4bit_compute_dtype`; transformers' default is f32).
fn saved_compute_dtype(dir: &Path) -> Result<DType> {
    let path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let named = &config["quantization_config"]["bnb_4bit_compute_dtype"];
    Ok(match named.as_str() {
        None | Some("float32") => DType::F32,
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        Some(other) => bail!(
            "{}: bnb_4bit_compute_dtype `{other}` is not float32, bfloat16 or float16",
            path.display()
        ),
    })
}

/// bitsandbytes' quant state of one weight (`QuantState.as_dict`).
#[derive(serde::Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    shape: (usize, usize),
    nested_blocksize: Option<usize>,
    nested_offset: Option<f32>,
}

/// The NF4 weights among the tensors of a bitsandbytes 4-bit checkpoint
/// (transformers' `save_pretrained` of a model loaded in 4 bits), by
/// weight name.
fn assemble_4bit(
    mut parts: HashMap<String, Tensor>,
    compute_dtype: DType,
) -> Result<HashMap<String, Nf4Weight>> {
    // In name order, so that an error names the same weight every time.
    let mut states: Vec<String> = parts
        .keys()
        .filter(|k| k.contains(QUANT_STATE))
        .cloned()
        .collect();
    states.sort();
    let mut weights = HashMap::new();
    for state_key in states {
        let (name, kind) = state_key
            .split_once(QUANT_STATE)
            .expect("a quant state key");
        let name = name.to_string();
        if kind != "nf4" {
            bail!(
                "`{name}` is bitsandbytes {}; pt-host reads NF4 4-bit checkpoints only (save the model unquantised, or in NF4)",
                kind.to_uppercase()
            );
        }
        let mut take = |suffix: &str| {
            parts
                .remove(&format!("{name}{suffix}"))
                .with_context(|| {
                    format!("`{name}{suffix}` is missing: the checkpoint is incomplete; download or save it again")
                })
        };
        let state = take(&state_key[name.len()..])?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let state: QuantState = serde_json::from_slice(&state)
            .with_context(|| format!("`{state_key}` is not a bitsandbytes quant state"))?;
        if state.quant_type != "nf4" || state.blocksize != nf4::BLOCK {
            bail!(
                "`{name}`: {} in blocks of {}; pt-host reads NF4 in blocks of {}",
                state.quant_type,
                state.blocksize,
                nf4::BLOCK
            );
        }
        let code_map = take(".quant_map")?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if code_map != nf4::NF4_CODE {
            bail!("`{name}.quant_map` is not the NF4 code book");
        }
        let (out, inner) = state.shape;
        let blocks = (out * inner).div_ceil(nf4::BLOCK);
        let codes = take("")?.flatten_all()?.to_vec1::<u8>()?;
        if codes.len() != (out * inner).div_ceil(2) {
            bail!(
                "`{name}` holds {} bytes, its quant state's shape {:?} needs {}",
                codes.len(),
                state.shape,
                (out * inner).div_ceil(2)
            );
        }
        let absmax = take(".absmax")?;
        let scales = match state.nested_offset {
            None => BlockScales::Plain(absmax.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            Some(offset) => {
                if state.nested_blocksize != Some(nf4::NESTED_BLOCK) {
                    bail!(
                        "`{name}`: nested blocks of {:?}; pt-host reads {}",
                        state.nested_blocksize,
                        nf4::NESTED_BLOCK
                    );
                }
                let codes = absmax.to_vec1::<u8>()?;
                let absmax = take(".nested_absmax")?.to_vec1::<f32>()?;
                let map = take(".nested_quant_map")?.to_vec1::<f32>()?;
                if codes.len() != blocks || absmax.len() != blocks.div_ceil(nf4::NESTED_BLOCK) {
                    bail!("`{name}`: its nested maxima do not cover {blocks} blocks");
                }
                match map.as_slice() == nf4::dynamic_map() {
                    true => BlockScales::Nested {
                        codes,
                        absmax,
                        offset,
                    },
                    // Another map (saved elsewhere, rounded otherwise): its values.
                    false => BlockScales::Plain(nf4::nested_maxima(&codes, &absmax, offset, &map)),
                }
            }
        };
        if let BlockScales::Plain(maxima) = &scales
            && maxima.len() != blocks
        {
            bail!(
                "`{name}`: {} block maxima for {blocks} blocks",
                maxima.len()
            );
        }
        let weight = Nf4Weight::new(state.shape, codes, scales, compute_dtype);
        weights.insert(name, weight);
    }
    if let Some(stray) = parts.keys().next() {
        bail!(
            "`{stray}` belongs to no 4-bit weight (no quant state names it): pt-host reads u8 tensors only as parts of bitsandbytes NF4 weights"
        );
    }
    Ok(weights)
}

/// Hands each tensor of the safetensors file `path` to `each`, in file order,
/// reading one tensor's bytes at a time. candle's loader maps the whole file,
/// and a mapping's touched pages count in the process's memory until it is
/// unmapped: loading a model peaked at twice its size.
fn read_safetensors(
    path: &Path,
    device: &Device,
    mut each: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    use candle_core::safetensors::Load;
    use std::io::Read;
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut header_len = [0u8; 8];
    file.read_exact(&mut header_len)
        .context("too short for a safetensors header")?;
    let header_len = u64::from_le_bytes(header_len);
    // safetensors' own limit on a header.
    if header_len > 100_000_000 {
        bail!("a safetensors header of {header_len} bytes: not a safetensors file");
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .context("the safetensors header is cut short")?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).context("the safetensors header is invalid")?;
    let expected = 8 + header_len + metadata.data_len() as u64;
    let actual = std::fs::metadata(path)?.len();
    if actual != expected {
        bail!(
            "{actual} bytes where its header describes {expected}: the file is cut short or damaged; download or save it again"
        );
    }
    // Names in offset order: the reads go through the file once, forwards.
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).expect("offset_keys names its tensors");
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        file.read_exact(&mut bytes)?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .with_context(|| format!("tensor `{name}`"))?;
        let tensor = view
            .load(device)
            .with_context(|| format!("tensor `{name}`"))?;
        each(name, tensor)?;
    }
    Ok(())
}

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// `tensors` in `dtype` as `model.safetensors`, or, above `max_shard_bytes`,
/// as `model-0000i-of-0000n.safetensors` shards in checkpoint order with
/// `model.safetensors.index.json`, as `save_pretrained` writes them.
fn save_weights(
    dir: &Path,
    tensors: Vec<(String, &Tensor)>,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let (mut shard_bytes, mut total_bytes) = (0u64, 0u64);
    for (name, tensor) in tensors {
        let tensor = tensor.detach().to_dtype(dtype)?;
        let bytes = (tensor.elem_count() * dtype.size_in_bytes()) as u64;
        let current = shards.last().expect("a shard");
        if !current.is_empty() && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total_bytes += bytes;
        shards.last_mut().expect("a shard").push((name, tensor));
    }
    let write = |file: &str, shard: Vec<(String, Tensor)>| -> Result<()> {
        let path = dir.join(file);
        let map: HashMap<String, Tensor> = shard.into_iter().collect();
        candle_core::safetensors::save(&map, &path)
            .with_context(|| format!("{}: cannot write", path.display()))
    };
    if shards.len() == 1 {
        return write("model.safetensors", shards.pop().expect("one shard"));
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (index, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", index + 1);
        for (name, _) in &shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
        write(&file, shard)?;
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total_bytes },
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&index)?)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// `save_pretrained`'s `max_shard_size`: `5GB` (10⁹ bytes), `500MiB` (2³⁰),
/// `200KB`, or a number of bytes.
pub fn parse_shard_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("`{text}` is not a size like 5GB or 500MiB"))?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        _ => bail!("`{text}` is not a size like 5GB or 500MiB"),
    };
    Ok((number * scale) as u64)
}

/// The shard files an index names, each once, in the index's order.
fn shard_files(index: &Path) -> Result<Vec<std::path::PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a safetensors index", index.display()))?;
    let map = parsed["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let dir = index.parent().expect("a file in a directory");
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for shard in map.values() {
        let name = shard
            .as_str()
            .filter(|n| {
                n.ends_with(".safetensors") && !n.contains(['/', '\\']) && !n.starts_with('.')
            })
            .with_context(|| format!("{}: bad shard name {shard}", index.display()))?;
        let path = dir.join(name);
        if !files.contains(&path) {
            if !path.is_file() {
                bail!("{}: shard {name} is missing", index.display());
            }
            files.push(path);
        }
    }
    Ok(files)
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

/// Writes `tensors` (a model's, by checkpoint name) as an HF model directory:
/// the weights in `dtype`, `config.json` (its dtype and `vocab_size` updated:
/// a resized vocabulary is the saved model's) and the generation config
/// copied from `source`.
pub(crate) fn save_model(
    dir: &Path,
    tensors: Vec<(String, &Tensor)>,
    source: &Path,
    dtype: DType,
    vocab_size: usize,
    max_shard_bytes: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    save_weights(dir, tensors, dtype, max_shard_bytes)?;
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
    config["vocab_size"] = vocab_size.into();
    if config.get("torch_dtype").is_some() {
        config["torch_dtype"] = name.into();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("{}: cannot write config.json", dir.display()))?;
    copy_if_present(source, dir, "generation_config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes two tensors of different dtypes, as a checkpoint may hold.
    fn write_checkpoint(path: &Path) {
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.25], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let tensors = HashMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        candle_core::safetensors::save(&tensors, path).unwrap();
    }

    /// The parts bitsandbytes saves for `w.weight`, from our own
    /// quantisation (plain maxima) of a 4 × 40 weight (160 values: a
    /// partial last block).
    fn saved_4bit_parts(blocksize: usize) -> (HashMap<String, Tensor>, Nf4Weight) {
        let values = Tensor::arange(-80f32, 80., &Device::Cpu)
            .unwrap()
            .reshape((4, 40))
            .unwrap();
        let config = Nf4Config {
            double_quant: false,
            compute_dtype: DType::F32,
        };
        let weight = Nf4Weight::quantize(&values, config).unwrap();
        let BlockScales::Plain(absmax) = &weight.scales else {
            unreachable!("no double quantisation")
        };
        let state = format!(
            r#"{{"quant_type": "nf4", "blocksize": {blocksize}, "dtype": "float32", "shape": [4, 40]}}"#
        );
        let cpu = &Device::Cpu;
        let codes = weight.codes.clone();
        let parts = HashMap::from([
            (
                "w.weight".to_string(),
                Tensor::from_vec(codes, (80, 1), cpu).unwrap(),
            ),
            (
                "w.weight.absmax".to_string(),
                Tensor::new(absmax.as_slice(), cpu).unwrap(),
            ),
            (
                "w.weight.quant_map".to_string(),
                Tensor::new(&nf4::NF4_CODE, cpu).unwrap(),
            ),
            (
                "w.weight.quant_state.bitsandbytes__nf4".to_string(),
                Tensor::new(state.as_bytes(), cpu).unwrap(),
            ),
        ]);
        (parts, weight)
    }

    #[test]
    fn saved_4bit_weights_assemble_or_are_refused_saying_which_part() {
        let (parts, weight) = saved_4bit_parts(nf4::BLOCK);
        let assembled = assemble_4bit(parts, DType::F32).unwrap();
        assert_eq!(
            assembled["w.weight"].dequantize_f32(),
            weight.dequantize_f32()
        );
        let refusal = |parts| format!("{:#}", assemble_4bit(parts, DType::F32).unwrap_err());
        let (mut parts, _) = saved_4bit_parts(nf4::BLOCK);
        parts.remove("w.weight.absmax");
        assert_eq!(
            refusal(parts),
            "`w.weight.absmax` is missing: the checkpoint is incomplete; download or save it again"
        );
        let (mut parts, _) = saved_4bit_parts(nf4::BLOCK);
        let stray = Tensor::new(&[1u8, 2], &Device::Cpu).unwrap();
        parts.insert("v.weight".to_string(), stray);
        assert_eq!(
            refusal(parts),
            "`v.weight` belongs to no 4-bit weight (no quant state names it): pt-host reads u8 tensors only as parts of bitsandbytes NF4 weights"
        );
        let (parts, _) = saved_4bit_parts(128);
        assert_eq!(
            refusal(parts),
            "`w.weight`: nf4 in blocks of 128; pt-host reads NF4 in blocks of 64"
        );
    }

    #[test]
    fn a_4bit_checkpoint_is_not_silently_held_in_another_form() {
        let dir = tempfile::tempdir().unwrap();
        let (parts, _) = saved_4bit_parts(nf4::BLOCK);
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&parts, &path).unwrap();
        let open = |weights| {
            let compact = Compact {
                weights,
                blocks: "w",
            };
            Weights::open(
                dir.path(),
                &Device::Cpu,
                DType::F32,
                "t",
                None,
                Some(compact),
            )
        };
        let error = open(BlockWeights::Bf16).err().unwrap();
        assert_eq!(
            format!("{error:#}"),
            format!(
                "{}: its linear weights are saved in 4 bits (bitsandbytes NF4), so they cannot be held in bf16; \
                 load it as saved (without bf16-held weights)",
                path.display()
            )
        );
        let config = Nf4Config {
            double_quant: true,
            compute_dtype: DType::F32,
        };
        let loaded = open(BlockWeights::Nf4(config)).unwrap();
        assert!(matches!(loaded.compact["w.weight"], LinearWeight::Nf4(_)));
    }

    #[test]
    fn reads_every_tensor_with_its_dtype_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_checkpoint(&path);
        let mut read = Vec::new();
        read_safetensors(&path, &Device::Cpu, |name, tensor| {
            read.push((name, tensor));
            Ok(())
        })
        .unwrap();
        read.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(read[0].0, "a");
        assert_eq!(
            read[0].1.to_vec2::<f32>().unwrap(),
            [[0., 1., 2.], [3., 4., 5.]]
        );
        assert_eq!(read[1].0, "b");
        assert_eq!(read[1].1.dtype(), DType::BF16);
        let b: Vec<f32> = read[1].1.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        assert_eq!(b, [1.5, -2.25]);
    }

    #[test]
    fn a_cut_short_file_is_an_error_not_a_partial_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_checkpoint(&path);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let error = read_safetensors(&path, &Device::Cpu, |_, _| Ok(())).unwrap_err();
        assert!(format!("{error:#}").contains("cut short"), "{error:#}");
        std::fs::write(&path, &bytes[..5]).unwrap();
        let error = read_safetensors(&path, &Device::Cpu, |_, _| Ok(())).unwrap_err();
        assert!(format!("{error:#}").contains("too short"), "{error:#}");
    }
}
