//! PEFT's LoRA adapters on any family's linear layers: the adapter config, PEFT's
//! initialisation, loading and saving its adapter directory, and merging
//! (`merge_and_unload`); beside them, base modules trained whole (PEFT's
//! `modules_to_save`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::layers::Lora;
use crate::linear::{LinearWeight, row_norms};
use crate::model::Model;
use crate::vocabulary::LM_HEAD;

/// PEFT's prefix of every adapter key.
const KEY_PREFIX: &str = "base_model.model.";

/// PEFT's key of a DoRA magnitude vector, after the layer's path.
const MAGNITUDE: &str = "lora_magnitude_vector";

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
    /// Base modules trained whole beside the adapters (`embed_tokens`, `lm_head`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
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
    /// The `adapter_config.json` of an adapter directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT adapter config", path.display()))
    }

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
        let config = AdapterConfig::read(dir)?;
        let config_path = dir.join("adapter_config.json");
        if config.peft_type != "LORA" {
            bail!(
                "{}: only LoRA adapters (with or without rsLoRA and DoRA) are supported, not peft_type {}",
                config_path.display(),
                config.peft_type
            );
        }
        let weights_path = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, self.device())
            .with_context(|| format!("{}: cannot load adapter weights", weights_path.display()))?;
        self.load_whole_modules(&mut tensors, &weights_path)?;
        let (r, scale) = (config.r, config.scale());
        let mut attached = 0;
        for (path, linear) in self.linears_mut() {
            if !targets_module(&config.target_modules, &path) {
                continue;
            }
            let mut take = |part: &str, shape: &[usize]| -> Result<Var> {
                let key = format!("{KEY_PREFIX}{path}.{part}");
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
            let (a, b) = (
                take("lora_A.weight", &[r, input])?,
                take("lora_B.weight", &[out, r])?,
            );
            let magnitude = match config.use_dora {
                true => Some(take(MAGNITUDE, &[out])?),
                false => None,
            };
            linear.lora = Some(Lora {
                a,
                b,
                scale,
                dropout: 0.0,
                magnitude,
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
        if let Some(modules) = &config.modules_to_save {
            self.train_modules(modules)?;
        }
        Ok(config)
    }

    /// Takes the whole-module weights out of an adapter's `tensors` into the
    /// base model: `modules_to_save`, and the embedding and LM head PEFT
    /// saves when the vocabulary was resized (the base grows to their rows
    /// first). PEFT's `original_module`/`modules_to_save` copies are left
    /// aside (the plain key is the trained one). A tied head must equal the
    /// embedding: pt-host keeps tied weights tied.
    fn load_whole_modules(
        &mut self,
        tensors: &mut HashMap<String, Tensor>,
        file: &Path,
    ) -> Result<()> {
        let whole_keys: Vec<String> = tensors
            .keys()
            .filter(|key| {
                key.strip_prefix(KEY_PREFIX).is_some_and(|name| {
                    ![".lora_", ".original_module.", ".modules_to_save."]
                        .iter()
                        .any(|part| name.contains(part))
                })
            })
            .cloned()
            .collect();
        let mut whole: HashMap<String, Tensor> = whole_keys
            .into_iter()
            .filter_map(|key| {
                let tensor = tensors.remove(&key)?;
                Some((key[KEY_PREFIX.len()..].to_string(), tensor))
            })
            .collect();
        let embedding = format!("{}.weight", self.embedding_module());
        if let Some(rows) = whole.get(&embedding).or(whole.get(LM_HEAD)) {
            self.resize_vocabulary(rows.dim(0)?)?;
        }
        if self.config().tie_word_embeddings
            && let Some(head) = whole.remove(LM_HEAD)
        {
            match whole.get(&embedding) {
                Some(input) => {
                    let difference = (head - input)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    if difference > 0.0 {
                        bail!(
                            "{}: the adapter's `lm_head` differs from its `{embedding}` (by up to {difference}), but this model ties them; \
                             pt-host keeps tied weights tied (PEFT's ensure_weight_tying=True): train such adapters with it",
                            file.display()
                        );
                    }
                }
                None => {
                    whole.insert(embedding.clone(), head);
                }
            }
        }
        let model_type = self.config().model_type.clone();
        for (name, tensor) in self.base_tensors_mut() {
            if let Some(loaded) = whole.remove(&name) {
                if loaded.dims() != tensor.dims() {
                    bail!(
                        "{}: `{KEY_PREFIX}{name}` has shape {:?}, this model's is {:?}",
                        file.display(),
                        loaded.dims(),
                        tensor.dims()
                    );
                }
                *tensor = loaded.to_dtype(tensor.dtype())?;
            }
        }
        if let Some(name) = whole.keys().next() {
            bail!(
                "{}: `{KEY_PREFIX}{name}` is not a weight of this {model_type} model",
                file.display()
            );
        }
        Ok(())
    }

    /// `modules_to_save` names as trained and recorded: each once, and on a
    /// tied model `lm_head` as the embedding it is.
    fn module_names(&self, names: &[String]) -> Vec<String> {
        let mut modules: Vec<String> = Vec::new();
        for name in names {
            let name = match (self.config().tie_word_embeddings, name.as_str()) {
                (true, "lm_head") => self.embedding_name().to_string(),
                _ => name.clone(),
            };
            if !modules.contains(&name) {
                modules.push(name);
            }
        }
        modules
    }

    /// Whether `modules_to_save` names the input embedding, so the rows of
    /// added tokens train.
    pub fn trains_embedding(&self, names: &[String]) -> bool {
        self.module_names(names)
            .iter()
            .any(|name| targets_module(std::slice::from_ref(name), self.embedding_module()))
    }

    /// Makes the base modules `names` trainable whole (PEFT's
    /// `modules_to_save`), matched by module path as `target_modules` are.
    /// Where the LM head is the embedding, naming either trains that one
    /// matrix (PEFT's `ensure_weight_tying`): tied weights stay tied, so the
    /// merged model is what transformers loads. Returns the names as the
    /// adapter config records them.
    pub fn train_modules(&mut self, names: &[String]) -> Result<Vec<String>> {
        let modules = self.module_names(names);
        let adapted: Vec<String> = self
            .linears_mut()
            .into_iter()
            .filter(|(_, linear)| linear.lora.is_some())
            .map(|(path, _)| path)
            .collect();
        let model_type = self.config().model_type.clone();
        let mut matched = vec![false; modules.len()];
        let mut trained = Vec::new();
        for (name, tensor) in self.base_tensors_mut() {
            let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
            let hits: Vec<usize> = (0..modules.len())
                .filter(|&i| targets_module(std::slice::from_ref(&modules[i]), module))
                .collect();
            if hits.is_empty() {
                continue;
            }
            if adapted.iter().any(|path| path == module) {
                bail!(
                    "modules_to_save `{module}` also has a LoRA adapter (target_modules): train it one way, not both"
                );
            }
            hits.into_iter().for_each(|i| matched[i] = true);
            let variable = Var::from_tensor(tensor)?;
            *tensor = variable.as_tensor().clone();
            trained.push((format!("{KEY_PREFIX}{name}"), variable));
        }
        if let Some(i) = matched.iter().position(|hit| !hit) {
            bail!(
                "modules_to_save `{}` matches no module of this {model_type} model (its embedding is `{}`, its LM head `lm_head`)",
                modules[i],
                self.embedding_name()
            );
        }
        self.trained_modules = trained;
        Ok(modules)
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
    /// model; with DoRA, each magnitude is the row norms of the weight (of
    /// `W + scale·BA`, which B = 0 makes `W`). `targets` are module names
    /// (`query_key_value`, `dense`, …).
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
            let magnitude = match config.use_dora {
                true => Some(Var::from_tensor(&row_norms(
                    &linear.weight.to_f32(&device)?,
                )?)?),
                false => None,
            };
            linear.lora = Some(Lora {
                a,
                b,
                scale,
                dropout,
                magnitude,
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
            "use_dora": config.use_dora,
            "modules_to_save": config.modules_to_save,
            "ensure_weight_tying": self.config().tie_word_embeddings && !self.trained_modules.is_empty(),
            "revision": null,
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(&peft_config)?,
        )?;
        let mut tensors: Vec<(String, Tensor)> = self
            .adapter_variables()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        let vocabulary = self.vocabulary_to_save(&tensors);
        tensors.extend(vocabulary);
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(name, t)| {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
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
        let dense: usize = self
            .base_tensors_mut()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let base = dense + self.compact_size().1;
        let adapter = self
            .adapter_variables()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        (base, adapter)
    }

    /// What an adapter directory holds: the LoRA variables and the modules
    /// trained whole, by PEFT key.
    pub fn adapter_variables(&mut self) -> Vec<(String, Var)> {
        let mut variables = self.lora_variables();
        variables.extend(self.trained_modules.iter().cloned());
        variables
    }

    /// The embedding and LM head an adapter saves beside its variables, as
    /// PEFT does: both when the vocabulary was resized (loading on a base
    /// resized by transformers then reproduces the rows this run added), and
    /// a tied head with a trained embedding (PEFT then computes with it
    /// whether or not it re-ties the head).
    fn vocabulary_to_save(&mut self, saved: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let resized = self.config().vocab_size != self.checkpoint_vocab_size;
        let embedding_key = format!("{KEY_PREFIX}{}.weight", self.embedding_module());
        let embedding_trained = self
            .trained_modules
            .iter()
            .any(|(k, _)| *k == embedding_key);
        let tied = self.config().tie_word_embeddings;
        if !(resized || tied && embedding_trained) {
            return Vec::new();
        }
        let head = self.arch.lm_head().clone();
        let embedding_name = &embedding_key[KEY_PREFIX.len()..];
        let input = self
            .base_tensors_mut()
            .into_iter()
            .find(|(name, _)| name == embedding_name)
            .map(|(_, t)| t.clone());
        [
            (embedding_key.clone(), input),
            (format!("{KEY_PREFIX}{LM_HEAD}"), Some(head)),
        ]
        .into_iter()
        .filter_map(|(key, tensor)| Some((key, tensor?)))
        .filter(|(key, _)| !saved.iter().any(|(name, _)| name == key))
        .collect()
    }

    /// The trainable LoRA variables (and DoRA magnitudes) with their PEFT key names.
    pub fn lora_variables(&mut self) -> Vec<(String, Var)> {
        let mut variables = Vec::new();
        for (path, linear) in self.linears_mut() {
            let Some(lora) = &linear.lora else { continue };
            let key = |part: &str| format!("{KEY_PREFIX}{path}.{part}");
            variables.push((key("lora_A.weight"), lora.a.clone()));
            variables.push((key("lora_B.weight"), lora.b.clone()));
            if let Some(magnitude) = &lora.magnitude {
                variables.push((key(MAGNITUDE), magnitude.clone()));
            }
        }
        variables
    }

    /// Folds every LoRA adapter into its base weight (`W + scale · B A`, in
    /// f32, rounded to the weight's dtype; with DoRA, each row of that then
    /// rescaled to its magnitude) and removes the adapters: PEFT's
    /// `merge_and_unload`. NF4 and CPU bf16 weights are widened to f32, with
    /// or without an adapter, so every weight can be saved. Returns how many
    /// layers had an adapter.
    pub fn merge_adapters(&mut self) -> Result<usize> {
        let device = self.device().clone();
        let mut merged = 0;
        for (_, linear) in self.linears_mut() {
            if linear.lora.is_none() && matches!(linear.weight, LinearWeight::Dense(_)) {
                continue;
            }
            let dtype = match &linear.weight {
                LinearWeight::Dense(weight) => weight.dtype(),
                LinearWeight::Nf4(_) | LinearWeight::Bf16(_) => DType::F32,
            };
            let mut weight = linear.weight.to_f32(&device)?;
            if let Some(lora) = linear.lora.take() {
                let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
                weight = (weight + delta)?;
                if let Some(magnitude) = &lora.magnitude {
                    let factor = (magnitude.as_tensor() / row_norms(&weight)?)?;
                    weight = weight.broadcast_mul(&factor.unsqueeze(1)?)?;
                }
                merged += 1;
            }
            linear.weight = LinearWeight::Dense(weight.to_dtype(dtype)?);
        }
        Ok(merged)
    }
}
