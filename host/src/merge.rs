//! `pt-host merge`: a LoRA adapter folded into its base model, written as an
//! HF model directory that transformers loads unchanged.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};

use crate::device::DtypeArg;
use crate::hub::ModelArgs;
use crate::quantize::QuantizationArgs;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// PEFT LoRA adapter directory to merge.
    #[arg(long = "peft_path", value_name = "DIR")]
    pub peft_path: PathBuf,
    /// Where the merged model is written (must not exist or be empty).
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Storage dtype of the merged weights (auto: the base model's config dtype, else float32).
    #[arg(long = "dtype", value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// The base as the adapter was trained on it (a QLoRA adapter on the
    /// NF4 base): quantised, then dequantised into the merged weights.
    #[command(flatten)]
    pub quantization: QuantizationArgs,
    /// Larger weights are written in shards of at most this size with
    /// model.safetensors.index.json, as save_pretrained does (5GB, 500MiB, …).
    #[arg(long = "max_shard_size", default_value = "5GB", value_parser = pt_model::hf_dir::parse_shard_size)]
    pub max_shard_size: u64,
}

pub fn run(args: MergeArgs) -> Result<()> {
    crate::args::require_new_output_dir(&args.output_dir)?;
    let model_dir = args.model.resolve()?;
    let dtype = match args.dtype {
        DtypeArg::Float32 => DType::F32,
        DtypeArg::Bfloat16 => DType::BF16,
        DtypeArg::Float16 => DType::F16,
        DtypeArg::Auto => config_dtype(&model_dir),
    };
    // Merged in f32 on the CPU: exact sums, whatever the storage dtype.
    let mut model = args
        .quantization
        .load(&model_dir, &Device::Cpu, DType::F32, true)?;
    let adapter = model.load_adapter(&args.peft_path)?;
    let merged = model.merge_adapters()?;
    model.save_model(&args.output_dir, &model_dir, dtype, args.max_shard_size)?;
    let tokenizer_dir = crate::prepare::tokenizer_with_adapter(&model_dir, Some(&args.peft_path));
    pt_model::hf_dir::copy_tokenizer_files(tokenizer_dir, &args.output_dir)?;
    println!(
        "merged {} (r {}, alpha {}) into {merged} layers of {}: {} ({dtype:?})",
        args.peft_path.display(),
        adapter.r,
        adapter.lora_alpha,
        model_dir.display(),
        args.output_dir.display()
    );
    Ok(())
}

/// The dtype `config.json` declares (`dtype` or the older `torch_dtype`).
fn config_dtype(model_dir: &std::path::Path) -> DType {
    let config: serde_json::Value = std::fs::read(model_dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let declared = config["dtype"].as_str().or(config["torch_dtype"].as_str());
    match declared {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}
