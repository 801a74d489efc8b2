//! BLOOM (HF `BloomForCausalLM`): embedding LayerNorm, ALiBi attention with a
//! per-head fused QKV, GELU (tanh) MLP, final LayerNorm, LM head tied to the
//! embedding.

use std::path::Path;

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::attention::{merge_heads, packed_attention, split_heads};
use crate::fused::{self, AttentionBias};
use crate::hf_dir::{BlockWeights, Compact, Weights};
use crate::layers::{DropoutDraw, Linear, layer_dropout};
use crate::linear::LinearWeight;
use crate::model::{
    Architecture, DecoderBlock, KvCache, ModelConfig, Pass, block_linears, embed, run_blocks,
};
use crate::ops::{attention_probs, gelu, layer_norm};
use crate::product::matmul;

/// `config.json`, with the legacy key names of the original checkpoints.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let config: Config = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a BLOOM config", path.display()))?;
        if config.model_type.as_deref().is_some_and(|t| t != "bloom") {
            bail!(
                "{}: model_type is {:?}; pt-host trains BLOOM models",
                path.display(),
                config.model_type.unwrap()
            );
        }
        if config.n_head == 0 || !config.hidden_size.is_multiple_of(config.n_head) {
            bail!(
                "{}: hidden_size {} is not a multiple of n_head {}",
                path.display(),
                config.hidden_size,
                config.n_head
            );
        }
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }
}

/// ALiBi slopes, one per head, as HF's `build_alibi_tensor` computes them.
pub fn alibi_slopes(n_head: usize) -> Vec<f32> {
    let closest = 1usize << n_head.ilog2();
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f64> = (1..=closest).map(|i| base.powi(i as i32)).collect();
    if closest != n_head {
        let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
        let extra = n_head - closest;
        slopes.extend((0..extra).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

#[derive(Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Clone)]
pub(crate) struct Block {
    input_layernorm: LayerNorm,
    query_key_value: Linear,
    attention_dense: Linear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

/// ALiBi `[b, heads, 1, keys]` and the additive mask `[b, 1, queries, keys]`.
type CompositeBias = (Tensor, Tensor);

/// What a block's forward needs besides its weights (cheap to clone).
#[derive(Clone)]
pub(crate) struct BlockContext {
    bias: Arc<AttentionBias>,
    /// ALiBi and mask as tensors, where the fused CPU kernel does not apply.
    composite_bias: Option<CompositeBias>,
    n_head: usize,
    post_ln: bool,
    dropout: Option<DropoutDraw>,
}

impl Block {
    /// The block's norms and linear layers with their module paths inside it.
    #[allow(clippy::type_complexity)]
    fn parts_mut(
        &mut self,
    ) -> (
        [(&'static str, &mut LayerNorm); 2],
        [(&'static str, &mut Linear); 4],
    ) {
        (
            [
                ("input_layernorm", &mut self.input_layernorm),
                (
                    "post_attention_layernorm",
                    &mut self.post_attention_layernorm,
                ),
            ],
            [
                ("self_attention.query_key_value", &mut self.query_key_value),
                ("self_attention.dense", &mut self.attention_dense),
                ("mlp.dense_h_to_4h", &mut self.dense_h_to_4h),
                ("mlp.dense_4h_to_h", &mut self.dense_4h_to_h),
            ],
        )
    }

    fn attention(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        [qkv_seed, dense_seed]: [Option<DropoutDraw>; 2],
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let qkv = self.query_key_value.forward(x, qkv_seed, track)?;
        if cache.is_none() && fused::applies(&qkv) {
            let merged = packed_attention(&qkv, ctx.n_head, &ctx.bias)?;
            return self.attention_dense.forward(&merged, dense_seed, track);
        }
        let [q, mut k, mut v] = split_heads(&qkv, ctx.n_head)?;
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let probs = attention_probs(
            &matmul(&q, &k.t()?)?,
            1.0 / (q.dim(3)? as f64).sqrt(),
            &ctx.bias,
            ctx.composite_bias.as_ref(),
        )?
        .to_dtype(v.dtype())?;
        let context = matmul(&probs, &v)?;
        self.attention_dense
            .forward(&merge_heads(&context)?, dense_seed, track)
    }
}

impl DecoderBlock for Block {
    type Context = BlockContext;

    fn apply(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let seed = |layer| layer_dropout(ctx.dropout, layer);
        let ln1 = self.input_layernorm.forward(x)?;
        let attended = (self.attention(&ln1, ctx, [seed(1), seed(2)], track, cache)?
            + if ctx.post_ln { &ln1 } else { x })?;
        let ln2 = self.post_attention_layernorm.forward(&attended)?;
        let up = gelu(&self.dense_h_to_4h.forward(&ln2, seed(3), track)?)?;
        let mlp = self.dense_4h_to_h.forward(&up, seed(4), track)?;
        mlp + if ctx.post_ln { &ln2 } else { &attended }
    }

    fn tensors(&self) -> Vec<Tensor> {
        let norms = [&self.input_layernorm, &self.post_attention_layernorm];
        let linears = [
            &self.query_key_value,
            &self.attention_dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ];
        norms
            .into_iter()
            .flat_map(|norm| [norm.weight.clone(), norm.bias.clone()])
            .chain(linears.into_iter().flat_map(Linear::tensors))
            .collect()
    }
}

pub struct Bloom {
    pub config: Config,
    word_embeddings: Tensor,
    embeddings_layernorm: LayerNorm,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    device: Device,
}

fn load_layer_norm(w: &mut Weights, prefix: &str, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.take(&format!("{prefix}.weight"), &[size])?,
        bias: w.take(&format!("{prefix}.bias"), &[size])?,
        eps,
    })
}

fn load_linear(w: &mut Weights, prefix: &str, input: usize, output: usize) -> Result<Linear> {
    Ok(Linear {
        weight: w.take_linear(&format!("{prefix}.weight"), output, input)?,
        bias: Some(w.take(&format!("{prefix}.bias"), &[output])?),
        lora: None,
    })
}

impl Bloom {
    /// Loads `config.json` and `model.safetensors` from an HF model directory
    /// onto `device`, with the base weights in `dtype` (f32, or bf16/f16 on
    /// CUDA). Keys may carry the `transformer.` prefix or not; the storage
    /// dtype is converted. LoRA weights, LayerNorm statistics, softmax and
    /// the loss stay in f32 whatever `dtype` is.
    /// The architecture and what the rest of pt-host needs to know of it.
    /// With `block_weights`, the blocks' linear weights are converted as they are read.
    pub(crate) fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        block_weights: Option<BlockWeights>,
    ) -> Result<(Self, ModelConfig)> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let compact = block_weights.map(|weights| Compact {
            weights,
            blocks: "h.",
        });
        let mut w = Weights::open(dir, device, dtype, "bloom", Some("transformer."), compact)?;
        let (h, eps) = (config.hidden_size, config.layer_norm_epsilon);
        let word_embeddings = w.take("word_embeddings.weight", &[config.vocab_size, h])?;
        let embeddings_layernorm = load_layer_norm(&mut w, "word_embeddings_layernorm", h, eps)?;
        let blocks = (0..config.n_layer)
            .map(|i| {
                let p = format!("h.{i}");
                Ok(Block {
                    input_layernorm: load_layer_norm(
                        &mut w,
                        &format!("{p}.input_layernorm"),
                        h,
                        eps,
                    )?,
                    query_key_value: load_linear(
                        &mut w,
                        &format!("{p}.self_attention.query_key_value"),
                        h,
                        3 * h,
                    )?,
                    attention_dense: load_linear(
                        &mut w,
                        &format!("{p}.self_attention.dense"),
                        h,
                        h,
                    )?,
                    post_attention_layernorm: load_layer_norm(
                        &mut w,
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    dense_h_to_4h: load_linear(
                        &mut w,
                        &format!("{p}.mlp.dense_h_to_4h"),
                        h,
                        4 * h,
                    )?,
                    dense_4h_to_h: load_linear(
                        &mut w,
                        &format!("{p}.mlp.dense_4h_to_h"),
                        4 * h,
                        h,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        let ln_f = load_layer_norm(&mut w, "ln_f", h, eps)?;
        let bloom = Self {
            word_embeddings,
            embeddings_layernorm,
            blocks,
            ln_f,
            device: device.clone(),
            config,
        };
        let summary = ModelConfig {
            model_type: "bloom".into(),
            vocab_size: bloom.config.vocab_size,
            hidden_size: h,
            tie_word_embeddings: true,
        };
        Ok((bloom, summary))
    }

    /// ALiBi and the causal + padding mask ([`AttentionBias::alibi`]),
    /// computed once per forward pass; as tensors too where the fused CPU
    /// kernel does not apply.
    fn attention_bias(
        &self,
        mask: &[Vec<u32>],
        q: usize,
    ) -> Result<(Arc<AttentionBias>, Option<CompositeBias>)> {
        let bias = Arc::new(AttentionBias::alibi(mask, q, self.config.n_head));
        let composite = match self.device.is_cpu() && self.word_embeddings.dtype() == DType::F32 {
            true => None,
            false => Some(bias.tensors(&self.device)?),
        };
        Ok((bias, composite))
    }
}

impl Architecture for Bloom {
    fn hidden_states(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        pass: &Pass<'_>,
    ) -> Result<Tensor> {
        let embedded = embed(&self.word_embeddings, input_ids)?;
        let hidden = self.embeddings_layernorm.forward(&embedded)?;
        let (bias, composite_bias) = self.attention_bias(mask, input_ids[0].len())?;
        let hidden = run_blocks(&self.blocks, hidden, pass, cache, |index| BlockContext {
            bias: bias.clone(),
            composite_bias: composite_bias.clone(),
            n_head: self.config.n_head,
            post_ln: self.config.apply_residual_connection_post_layernorm,
            dropout: pass.block_dropout(index),
        })?;
        Ok(self.ln_f.forward(&hidden)?)
    }

    /// Tied to the embedding.
    fn lm_head(&self) -> &Tensor {
        &self.word_embeddings
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        block_linears(&mut self.blocks, "transformer.h", |b| {
            b.parts_mut().1.into()
        })
    }

    fn base_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut tensors = vec![
            (
                "transformer.word_embeddings.weight".to_string(),
                &mut self.word_embeddings,
            ),
            (
                "transformer.word_embeddings_layernorm.weight".to_string(),
                &mut self.embeddings_layernorm.weight,
            ),
            (
                "transformer.word_embeddings_layernorm.bias".to_string(),
                &mut self.embeddings_layernorm.bias,
            ),
        ];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            let (norms, linears) = b.parts_mut();
            for (name, norm) in norms {
                tensors.push((format!("{p}.{name}.weight"), &mut norm.weight));
                tensors.push((format!("{p}.{name}.bias"), &mut norm.bias));
            }
            for (name, linear) in linears {
                // NF4 and bf16-held weights are not tensors; merging widens them.
                if let LinearWeight::Dense(weight) = &mut linear.weight {
                    tensors.push((format!("{p}.{name}.weight"), weight));
                }
                if let Some(bias) = &mut linear.bias {
                    tensors.push((format!("{p}.{name}.bias"), bias));
                }
            }
        }
        tensors.push(("transformer.ln_f.weight".to_string(), &mut self.ln_f.weight));
        tensors.push(("transformer.ln_f.bias".to_string(), &mut self.ln_f.bias));
        tensors
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        &LORA_TARGETS
    }

    fn embedding_module(&self) -> &'static str {
        "transformer.word_embeddings"
    }
}

/// The four linear layers PEFT can target in a BLOOM block, by module name.
pub const LORA_TARGETS: [&str; 4] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_as_hf_computes_them() {
        // 8 heads: base 2^-1, slopes 1/2, 1/4, ..., 1/256.
        let eight = alibi_slopes(8);
        assert_eq!(eight[0], 0.5);
        assert_eq!(eight[7], 1.0 / 256.0);
        // 6 heads: 4 from base 2^-2, then 2 from extra base 2^-1 with odd powers.
        let six = alibi_slopes(6);
        assert_eq!(six, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
    }
}
