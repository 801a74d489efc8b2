//! PEFT's LoRA adapters on any family's linear layers: the adapter config, PEFT's
//! initialisation, loading and saving its adapter directory, and merging
//! (`merge_and_unload`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::layers::Lora;
use crate::model::Model;

/// What pt-host reads of a PEFT `adapter_config.json`; other keys are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// PEFT's matching: a target names a module exactly or is a suffix after a dot.
fn targets_module(targets: &[String], path: &str) -> bool {
    targets
        .iter()
        .any(|t| path == t || path.ends_with(&format!(".{t}")))
}

impl AdapterConfig {
    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

impl Model {
    /// Loads a PEFT LoRA adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) onto the model, as trainable variables.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<AdapterConfig> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read", config_path.display()))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT adapter config", config_path.display()))?;
        if config.peft_type != "LORA" || config.use_dora {
            bail!(
                "{}: only plain LoRA adapters are supported (peft_type {}, use_dora {})",
                config_path.display(),
                config.peft_type,
                config.use_dora
            );
        }
        let weights_path = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, self.device())
            .with_context(|| format!("{}: cannot load adapter weights", weights_path.display()))?;
        let (r, scale) = (config.r, config.scale());
        let mut attached = 0;
        for (path, linear) in self.linears_mut() {
            if !targets_module(&config.target_modules, &path) {
                continue;
            }
            let mut take = |part: &str, shape: [usize; 2]| -> Result<Var> {
                let key = format!("base_model.model.{path}.{part}.weight");
                let tensor = tensors
                    .remove(&key)
                    .with_context(|| format!("{}: no `{key}`", weights_path.display()))?;
                if tensor.dims() != shape {
                    bail!(
                        "{}: `{key}` has shape {:?}, expected {shape:?}",
                        weights_path.display(),
                        tensor.dims()
                    );
                }
                Ok(Var::from_tensor(&tensor.to_dtype(DType::F32)?)?)
            };
            let (out, input) = linear.weight.dims2()?;
            let (a, b) = (take("lora_A", [r, input])?, take("lora_B", [out, r])?);
            linear.lora = Some(Lora {
                a,
                b,
                scale,
                dropout: 0.0,
            });
            attached += 1;
        }
        if attached == 0 {
            bail!(
                "{}: target_modules {:?} match no layer (this {} model has {:?})",
                config_path.display(),
                config.target_modules,
                self.config().model_type,
                self.lora_targets()
            );
        }
        Ok(config)
    }

    /// Sets the dropout probability of every LoRA adapter.
    pub fn set_lora_dropout(&mut self, p: f64) {
        for (_, linear) in self.linears_mut() {
            if let Some(lora) = &mut linear.lora {
                lora.dropout = p;
            }
        }
    }

    /// Adds fresh LoRA adapters as PEFT initialises them: A ~ U(±1/√in)
    /// (Kaiming-uniform with a = √5), B = 0, so training starts from the base
    /// model. `targets` are module names (`query_key_value`, `dense`, …).
    pub fn add_lora(&mut self, config: &AdapterConfig, dropout: f64, seed: u64) -> Result<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (r, scale, device) = (config.r, config.scale(), self.device().clone());
        let mut attached = 0;
        for (path, linear) in self.linears_mut() {
            if !targets_module(&config.target_modules, &path) {
                continue;
            }
            let (out, input) = linear.weight.dims2()?;
            let bound = 1.0 / (input as f64).sqrt();
            let a: Vec<f32> = (0..r * input)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, input), &device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, &device)?)?;
            linear.lora = Some(Lora {
                a,
                b,
                scale,
                dropout,
            });
            attached += 1;
        }
        if attached == 0 {
            bail!(
                "target_modules {:?} match no layer (this {} model has {:?})",
                config.target_modules,
                self.config().model_type,
                self.lora_targets()
            );
        }
        Ok(attached)
    }

    /// Writes a PEFT adapter directory: `adapter_config.json` and
    /// `adapter_model.safetensors` (metadata `format: pt`), which PEFT's
    /// `PeftModel.from_pretrained` loads.
    pub fn save_adapter(
        &mut self,
        dir: &Path,
        config: &AdapterConfig,
        base_model: &str,
    ) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let dropout = self
            .linears_mut()
            .into_iter()
            .find_map(|(_, l)| l.lora.as_ref().map(|l| l.dropout))
            .unwrap_or(0.0);
        let peft_config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": dropout,
            "target_modules": config.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "base_model_name_or_path": base_model,
            "use_rslora": config.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "revision": null,
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(&peft_config)?,
        )?;
        let variables = self.lora_variables();
        let tensors: Vec<(String, Tensor)> = variables
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(name, t)| {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((
                    name.clone(),
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.dims().to_vec(),
                ))
            })
            .collect::<Result<_>>()?;
        let views = data
            .iter()
            .map(|(name, bytes, shape)| {
                Ok((
                    name.as_str(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytes,
                    )?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join("adapter_model.safetensors");
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// Elements of the base model's tensors and of its LoRA adapters (PEFT's
    /// `print_trainable_parameters` counts).
    pub fn parameter_counts(&mut self) -> (usize, usize) {
        let base = self
            .base_tensors_mut()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let adapter = self
            .lora_variables()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        (base, adapter)
    }

    /// The trainable LoRA variables with their PEFT key names.
    pub fn lora_variables(&mut self) -> Vec<(String, Var)> {
        self.linears_mut()
            .into_iter()
            .filter_map(|(path, linear)| {
                linear
                    .lora
                    .as_ref()
                    .map(|l| (path, l.a.clone(), l.b.clone()))
            })
            .flat_map(|(path, a, b)| {
                [
                    (format!("base_model.model.{path}.lora_A.weight"), a),
                    (format!("base_model.model.{path}.lora_B.weight"), b),
                ]
            })
            .collect()
    }

    /// Folds every LoRA adapter into its base weight (`W + scale · B A`, in
    /// f32, rounded to the weight's dtype) and removes the adapters: PEFT's
    /// `merge_and_unload`. Returns how many layers were merged.
    pub fn merge_adapters(&mut self) -> Result<usize> {
        let mut merged = 0;
        for (_, linear) in self.linears_mut() {
            if let Some(lora) = linear.lora.take() {
                let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
                let dtype = linear.weight.dtype();
                linear.weight = (linear.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
                merged += 1;
            }
        }
        Ok(merged)
    }
}
