//! `--load_in_4bit` and bitsandbytes' 4-bit flags (QLoRA): the base model's
//! linear weights held in NF4, as MedicalGPT (`--load_in_4bit --qlora`) and
//! LLaMA-Factory (`quantization_bit: 4`) users ask for them; or, with
//! `--frozen_weights bf16`, held in bf16 on the CPU.

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use pt_model::nf4::Nf4Config;
use pt_model::{BlockWeights, Model};

use crate::args::parse_bool;
use crate::device::DtypeArg;

#[derive(clap::Args, Debug, Clone)]
pub struct QuantizationArgs {
    /// Hold the base model's linear weights in 4 bits (bitsandbytes' NF4),
    /// with LoRA on top in f32 (QLoRA).
    #[arg(long = "load_in_4bit", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub load_in_4bit: bool,
    /// MedicalGPT's QLoRA switch: 4 bits, NF4, double quantisation.
    #[arg(long = "qlora", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub qlora: bool,
    /// LLaMA-Factory's `quantization_bit`: 4 is --qlora (its defaults: NF4,
    /// double quantisation).
    #[arg(long = "quantization_bit", value_name = "BITS")]
    pub quantization_bit: Option<u8>,
    /// bitsandbytes' 4-bit data type; pt-host has nf4 (QLoRA's).
    #[arg(long = "bnb_4bit_quant_type", default_value = "nf4")]
    pub bnb_4bit_quant_type: String,
    /// Quantise the block maxima too (8 bits per block instead of 32).
    #[arg(long = "bnb_4bit_use_double_quant", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype 4-bit weights are dequantised to and multiplied in (auto:
    /// the run's, float32 on CPU and bfloat16 on CUDA).
    #[arg(long = "bnb_4bit_compute_dtype", value_enum, default_value = "auto")]
    pub bnb_4bit_compute_dtype: DtypeArg,
    /// How the frozen base's linear weights are held on the CPU: float32, or
    /// bf16 (half the memory, multiplied in float32 at about float32's speed;
    /// the weights rounded to bf16). CUDA holds them in the run's dtype.
    #[arg(long = "frozen_weights", value_enum, default_value = "float32")]
    pub frozen_weights: FrozenWeightsArg,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum FrozenWeightsArg {
    Float32,
    Bf16,
}

impl QuantizationArgs {
    /// The NF4 settings asked for, if any; `run_dtype` is what `auto` means.
    pub fn config(&self, run_dtype: DType) -> Result<Option<Nf4Config>> {
        let llama_factory = match self.quantization_bit {
            None => false,
            Some(4) => true,
            Some(bits) => bail!(
                "--quantization_bit {bits}: pt-host quantises to 4 bits (NF4) only; drop the flag to train on the full-precision base"
            ),
        };
        let qlora = self.qlora || llama_factory;
        if !(self.load_in_4bit || qlora) {
            return Ok(None);
        }
        if self.bnb_4bit_quant_type != "nf4" {
            bail!(
                "--bnb_4bit_quant_type {}: pt-host quantises to nf4 only (QLoRA's; fp4 is bitsandbytes' older type)",
                self.bnb_4bit_quant_type
            );
        }
        Ok(Some(Nf4Config {
            double_quant: self.bnb_4bit_use_double_quant || qlora,
            compute_dtype: match self.bnb_4bit_compute_dtype {
                DtypeArg::Float32 => DType::F32,
                DtypeArg::Bfloat16 => DType::BF16,
                DtypeArg::Float16 => DType::F16,
                DtypeArg::Auto => run_dtype,
            },
        }))
    }

    /// How the decoder blocks' linear weights are to be held on `device`,
    /// if not in the run's dtype.
    pub fn block_weights(&self, device: &Device, run_dtype: DType) -> Result<Option<BlockWeights>> {
        let nf4 = self.config(run_dtype)?;
        match (self.frozen_weights, nf4) {
            (FrozenWeightsArg::Float32, nf4) => Ok(nf4.map(BlockWeights::Nf4)),
            (FrozenWeightsArg::Bf16, Some(_)) => bail!(
                "--frozen_weights bf16 and --load_in_4bit (or --qlora, --quantization_bit) each say how the base is held: choose one"
            ),
            (FrozenWeightsArg::Bf16, None) if device.is_cpu() => Ok(Some(BlockWeights::Bf16)),
            (FrozenWeightsArg::Bf16, None) => {
                eprintln!(
                    "note: --frozen_weights bf16 applies to the CPU; on CUDA the base is held in {run_dtype:?}"
                );
                Ok(None)
            }
        }
    }

    /// Loads `dir` with the linear weights quantised or held in bf16 if
    /// asked, saying so (when `say`) with what it saved.
    pub fn load(&self, dir: &Path, device: &Device, dtype: DType, say: bool) -> Result<Model> {
        let block_weights = self.block_weights(device, dtype)?;
        let mut model = Model::load_with(dir, device, dtype, block_weights)?;
        if say && model.has_compact_weights() {
            let how = match block_weights {
                Some(BlockWeights::Nf4(config)) => format!(
                    "4-bit NF4 base ({}double quantisation, {:?} compute)",
                    if config.double_quant { "" } else { "no " },
                    config.compute_dtype
                ),
                Some(BlockWeights::Bf16) => "bf16 base (multiplied in F32)".to_string(),
                None => "4-bit NF4 base (as the checkpoint holds it)".to_string(),
            };
            let (bytes, elements) = model.compact_size();
            eprintln!(
                "{how}: linear weights {:.1} MB, {:.1} MB in {dtype:?}",
                bytes as f64 / 1e6,
                (elements * dtype.size_in_bytes()) as f64 / 1e6
            );
        }
        Ok(model)
    }
}
