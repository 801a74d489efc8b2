//! BLOOM (HF `BloomForCausalLM`): embedding LayerNorm, ALiBi attention with a
//! per-head fused QKV, GELU (tanh) MLP, final LayerNorm, LM head tied to the
//! embedding.

use std::path::Path;

use anyhow::{Context, Result, bail};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::attention::{PackedAttention, merge_heads, packed_attention, split_heads};
use crate::custom_op::{
    GradientSlot, TensorOp1, TensorOp2, apply_op2, gradient_token, link_gradients,
};
use crate::fused::{self, AttentionBias};
use crate::hf_dir::{BlockWeights, Compact, Weights};
use crate::layers::{DropoutDraw, Linear, layer_dropout};
use crate::linear::{FrozenLinear, LinearWeight, dense_product, trained_linear_gradients};
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

    /// The input gradient at `x` `[n, h]` (CPU, f32) of a frozen norm.
    fn input_gradient(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        fused::layer_norm_input_gradient(x, &self.weight, self.eps, grad)
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

    fn as_one_op(&self, x: &Tensor, ctx: &BlockContext) -> candle_core::Result<Option<Tensor>> {
        if !fused::applies(x) || ctx.composite_bias.is_some() {
            return Ok(None);
        }
        let s = x.dim(1)?;
        // The trained tensors' gradients reach candle through a chain of
        // links from a token, which the op takes as its second input: that
        // makes the op a node of the graph even where `x` has none (the
        // first block).
        let mut token = None;
        let mut link = |pair: [Tensor; 2]| -> candle_core::Result<Linked> {
            let slot = GradientSlot::default();
            let start = match token.take() {
                Some(token) => token,
                None => gradient_token(x.device())?,
            };
            token = Some(link_gradients(&start, [&pair[0], &pair[1]], &slot)?);
            Ok(Linked {
                tensors: pair.map(|tensor| tensor.detach()),
                slot,
            })
        };
        let mut block_norm = |norm: &LayerNorm| -> candle_core::Result<_> {
            if !(norm.weight.is_variable() || norm.bias.is_variable()) {
                return Ok((norm.clone(), None));
            }
            let linked = link([norm.weight.clone(), norm.bias.clone()])?;
            let [weight, bias] = linked.tensors;
            let eps = norm.eps;
            Ok((LayerNorm { weight, bias, eps }, Some(linked.slot)))
        };
        let norms = [
            block_norm(&self.input_layernorm)?,
            block_norm(&self.post_attention_layernorm)?,
        ];
        let mut layers = Vec::with_capacity(4);
        for (number, linear) in (1..).zip([
            &self.query_key_value,
            &self.attention_dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ]) {
            let draw = layer_dropout(ctx.dropout, number);
            let layer = match (
                linear.trained(),
                linear.frozen(draw, s * linear.weight.dims2()?.1),
            ) {
                (Some(pair), _) => BlockLinear::Trained(link(pair)?),
                (None, Some((layer, adapter))) => {
                    BlockLinear::Frozen(layer, adapter.map(&mut link).transpose()?)
                }
                (None, None) => return Ok(None),
            };
            layers.push(layer);
        }
        let token = match token {
            Some(token) => token,
            None if x.track_op() => gradient_token(x.device())?,
            None => return Ok(None),
        };
        let op = BlockOp {
            norms,
            layers,
            attention: PackedAttention::new(ctx.n_head, &ctx.bias),
            post_ln: ctx.post_ln,
            saved: Mutex::new(None),
        };
        apply_op2(op, x, &token).map(Some)
    }
}

/// A block on the CPU in f32 as one op whose backward pass is written out
/// below, as the chain rule gives it from the forward in [`Block::apply`]:
/// LoRA training, evaluation with an adapter, and full fine-tuning. Through
/// candle's autograd each edge of the block's graph allocated a zeroed
/// gradient and added into it, and every intermediate tensor stayed alive
/// until the backward pass; here the backward keeps four of them and
/// recomputes the norms' outputs and GELU's. The trained tensors' gradients
/// (adapters, or in full fine-tuning the weights, biases and norms) go to
/// candle through [`link_gradients`].
struct BlockOp {
    /// Each norm with the slot of its weight's and bias's gradients where
    /// they train.
    norms: [(LayerNorm, Option<GradientSlot>); 2],
    /// qkv, dense, h→4h, 4h→h.
    layers: Vec<BlockLinear>,
    attention: PackedAttention,
    post_ln: bool,
    saved: Mutex<Option<SavedActivations>>,
}

/// A linear layer of a [`BlockOp`].
enum BlockLinear {
    /// A frozen base, with its adapter's A and B where it has one.
    Frozen(FrozenLinear, Option<Linked>),
    /// A trained weight and bias (full fine-tuning).
    Trained(Linked),
}

/// Two trained tensors of a [`BlockOp`] without their graph, and where
/// their gradients go.
struct Linked {
    tensors: [Tensor; 2],
    slot: GradientSlot,
}

/// What the forward pass keeps for the backward.
struct SavedActivations {
    qkv: Tensor,
    context: Tensor,
    attended: Tensor,
    up: Tensor,
}

impl BlockOp {
    /// Linear layer `index` applied to `x` `[n, in]`, without a graph.
    fn linear(&self, index: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.layers[index] {
            BlockLinear::Frozen(layer, adapter) => {
                layer.forward(x, adapter.as_ref().map(|adapter| adapter.pair()))
            }
            BlockLinear::Trained(Linked {
                tensors: [weight, bias],
                ..
            }) => dense_product(x, weight, Some(bias)),
        }
    }

    /// The input gradient of linear layer `index` at input `x`; its trained
    /// tensors' gradients go to their slot.
    fn linear_backward(
        &self,
        index: usize,
        x: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match &self.layers[index] {
            BlockLinear::Frozen(layer, adapter) => {
                let pair = adapter.as_ref().map(|adapter| adapter.pair());
                let (grad_x, grad_adapter) = layer.backward(x, pair, grad)?;
                if let (Some(adapter), Some((grad_a, grad_b))) = (adapter, grad_adapter) {
                    adapter.slot.fill([grad_a, grad_b]);
                }
                Ok(grad_x)
            }
            BlockLinear::Trained(Linked {
                tensors: [weight, _],
                slot,
            }) => {
                let [grad_x, grad_weight] = trained_linear_gradients(x, weight, grad)?;
                slot.fill([grad_weight, fused::column_sums(grad)?]);
                Ok(grad_x)
            }
        }
    }

    /// The input gradient of norm `index` at input `x` `[n, h]`; a trained
    /// norm's weight and bias gradients go to its slot.
    fn norm_backward(
        &self,
        index: usize,
        x: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (norm, slot) = &self.norms[index];
        let Some(slot) = slot else {
            return norm.input_gradient(x, grad);
        };
        let [grad_x, grad_weight, grad_bias] =
            fused::layer_norm_gradients(x, &norm.weight, norm.eps, grad)?;
        slot.fill([grad_weight, grad_bias]);
        Ok(grad_x)
    }
}

impl Linked {
    fn pair(&self) -> (&Tensor, &Tensor) {
        (&self.tensors[0], &self.tensors[1])
    }
}

impl TensorOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "bloom-block"
    }

    fn forward(&self, x: &Tensor, _anchor: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let rows = |t: &Tensor| t.reshape((b * s, ()));
        let ln1 = self.norms[0].0.forward(x)?;
        let qkv = self.linear(0, &rows(&ln1)?)?.reshape((b, s, ()))?;
        let context = self.attention.forward(&qkv)?;
        let attention = self.linear(1, &rows(&context)?)?.reshape((b, s, h))?;
        let attended = (attention + if self.post_ln { &ln1 } else { x })?;
        let ln2 = self.norms[1].0.forward(&attended)?;
        let up = self.linear(2, &rows(&ln2)?)?;
        let mlp = self.linear(3, &gelu(&up)?)?.reshape((b, s, h))?;
        let output = (mlp + if self.post_ln { &ln2 } else { &attended })?;
        *self.saved.lock().expect("not poisoned") = Some(SavedActivations {
            qkv,
            context,
            attended,
            up,
        });
        Ok(output)
    }

    fn backward(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let Some(saved) = self.saved.lock().expect("not poisoned").take() else {
            candle_core::bail!("bloom-block: a backward pass without its forward");
        };
        let (b, s, h) = x.dims3()?;
        let rows = |t: &Tensor| t.reshape((b * s, ()));
        let grad = rows(grad)?;
        // The MLP and its residual.
        let ln2 = self.norms[1].0.forward(&saved.attended)?;
        let grad_activated = self.linear_backward(3, &gelu(&saved.up)?, &grad)?;
        let grad_up = fused::gelu_gradient(&saved.up, &grad_activated)?;
        let mut grad_ln2 = self.linear_backward(2, &rows(&ln2)?, &grad_up)?;
        if self.post_ln {
            grad_ln2 = (grad_ln2 + &grad)?;
        }
        let mut grad_attended = self.norm_backward(1, &rows(&saved.attended)?, &grad_ln2)?;
        if !self.post_ln {
            grad_attended = (grad_attended + &grad)?;
        }
        // The attention and its residual.
        let grad_context = self.linear_backward(1, &rows(&saved.context)?, &grad_attended)?;
        let grad_qkv = self
            .attention
            .backward(&saved.qkv, &grad_context.reshape((b, s, h))?)?
            .expect("the attention's input gradient");
        let ln1 = self.norms[0].0.forward(x)?;
        let mut grad_ln1 = self.linear_backward(0, &rows(&ln1)?, &rows(&grad_qkv)?)?;
        if self.post_ln {
            grad_ln1 = (grad_ln1 + &grad_attended)?;
        }
        let mut grad_x = self.norm_backward(0, &rows(x)?, &grad_ln1)?;
        if !self.post_ln {
            grad_x = (grad_x + grad_attended)?;
        }
        Ok([
            Some(grad_x.reshape((b, s, h))?),
            Some(gradient_token(x.device())?),
        ])
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
    use crate::fused::tests::{max_difference, random};
    use crate::layers::Lora;
    use candle_core::Var;

    /// A block of hidden size 16, 2 heads, with adapters (rank 4, dropout
    /// 0.1) on the linear layers numbered in `adapted` (1: qkv … 4: 4h→h),
    /// trained weights and biases (full fine-tuning) on those in `trained`,
    /// and trained norms where `norms_train`.
    fn block_with(adapted: &[usize], trained: &[usize], norms_train: bool) -> Block {
        let h = 16;
        let variable = |t: Tensor, trains: bool| match trains {
            true => Var::from_tensor(&t).unwrap().as_tensor().clone(),
            false => t,
        };
        let norm = |seed| LayerNorm {
            weight: variable(random(&[h], seed).affine(0.2, 1.0).unwrap(), norms_train),
            bias: variable(random(&[h], seed + 1), norms_train),
            eps: 1e-5,
        };
        let linear = |number: usize, input: usize, output: usize| {
            let trains = trained.contains(&number);
            let weight = (random(&[output, input], number as u64) * 0.3).unwrap();
            Linear {
                weight: LinearWeight::Dense(variable(weight, trains)),
                bias: Some(variable(random(&[output], 10 + number as u64), trains)),
                lora: adapted.contains(&number).then(|| Lora {
                    a: Var::from_tensor(&random(&[4, input], 20 + number as u64)).unwrap(),
                    b: Var::from_tensor(&random(&[output, 4], 30 + number as u64)).unwrap(),
                    scale: 2.0,
                    dropout: 0.1,
                    magnitude: None,
                }),
            }
        };
        Block {
            input_layernorm: norm(40),
            query_key_value: linear(1, h, 3 * h),
            attention_dense: linear(2, h, h),
            post_attention_layernorm: norm(42),
            dense_h_to_4h: linear(3, h, 4 * h),
            dense_4h_to_h: linear(4, 4 * h, h),
        }
    }

    #[test]
    fn the_block_as_one_op_is_the_composite_block_with_its_gradients() {
        // A left-padded row and an unpadded one, 5 positions.
        let mask = [vec![0, 1, 1, 1, 1], vec![1; 5]];
        let all = &[1, 2, 3, 4][..];
        for (adapted, trained, norms_train, post_ln, x_tracked) in [
            (all, &[][..], false, false, true),
            (all, &[], false, true, true),
            // The first block: no graph on x, adapters on two layers only.
            (&[2, 4], &[], false, false, false),
            // No adapter at all: x's gradient alone.
            (&[], &[], false, false, true),
            // Full fine-tuning, and the first block of it.
            (&[], all, true, false, true),
            (&[], all, true, true, false),
            // Adapters beside trained layers and norms.
            (&[1], &[3], true, false, true),
        ] {
            let block = block_with(adapted, trained, norms_train);
            let ctx = BlockContext {
                bias: Arc::new(AttentionBias::alibi(&mask, 5, 2)),
                composite_bias: None,
                n_head: 2,
                post_ln,
                dropout: Some(DropoutDraw {
                    seed: 7,
                    first_row: 1,
                }),
            };
            let x = Var::from_tensor(&random(&[2, 5, 16], 50)).unwrap();
            let x = match x_tracked {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let one_op = block
                .as_one_op(&x, &ctx)
                .unwrap()
                .expect("the block as one op");
            let composite = block.apply(&x, &ctx, true, None).unwrap();
            let case = format!(
                "adapters {adapted:?}, trained {trained:?}, norms {norms_train}, post_ln {post_ln}"
            );
            assert!(max_difference(&one_op, &composite) < 1e-5, "{case}");
            let weights = random(one_op.dims(), 60);
            let gradients = |y: &Tensor| {
                (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (ours, theirs) = (gradients(&one_op), gradients(&composite));
            let mut checked = block.tensors();
            checked.retain(Tensor::is_variable);
            let norms = if norms_train { 2 } else { 0 };
            assert_eq!(
                checked.len(),
                2 * (adapted.len() + trained.len() + norms),
                "{case}"
            );
            if x_tracked {
                checked.push(x.clone());
            }
            for tensor in &checked {
                let theirs = theirs.get(tensor).expect("the composite's gradient");
                let ours = ours
                    .get(tensor)
                    .unwrap_or_else(|| panic!("{case}: no gradient"));
                let scale = max_difference(theirs, &theirs.zeros_like().unwrap());
                assert!(scale > 0.0, "{case}");
                let difference = max_difference(ours, theirs) / scale;
                assert!(difference < 1e-5, "{case}: {difference}");
            }
        }
    }

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
