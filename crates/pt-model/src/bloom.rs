//! BLOOM (HF `BloomForCausalLM`): embedding LayerNorm, ALiBi attention with a
//! per-head fused QKV, GELU (tanh) MLP, final LayerNorm, LM head tied to the
//! embedding.

use std::path::Path;

use anyhow::{Context, Result, bail};
use std::cell::Cell;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

use crate::checkpoint::{self, Recompute};
use crate::fused::AttentionBias;
use crate::hf_dir::{self, Weights};
use crate::linear::{Dropout, LoraPass, frozen_matmul, linear};
use crate::loss::{IGNORE_INDEX, lm_head_loss_sum};
use crate::ops::{attention_probs, gelu, layer_norm};

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

/// How a training micro-batch draws its dropout masks: from `seed`, as rows
/// `first_row..` of a larger batch draw them (a rank's share of a
/// data-parallel batch gets the masks its rows would get in one process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutDraw {
    pub seed: u64,
    pub first_row: usize,
}

/// A LoRA adapter on a linear layer, as PEFT defines it: `scale · B(A x)`.
#[derive(Clone)]
pub struct Lora {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
}

/// `y = x Wᵀ + b (+ LoRA)`, weights in HF's `[out, in]` layout.
#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) lora: Option<Lora>,
}

impl Linear {
    /// `dropout`: how this layer draws its mask while training (`None`:
    /// evaluation). `track`: false while a checkpointed block runs its
    /// forward without building a graph (its backward recomputes with
    /// `track` true).
    fn forward(
        &self,
        x: &Tensor,
        dropout: Option<DropoutDraw>,
        track: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let lora = self.lora.as_ref().map(|lora| {
            let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
            LoraPass {
                a: if track { a.clone() } else { a.detach() },
                b: if track { b.clone() } else { b.detach() },
                scale: lora.scale,
                dropout: dropout.filter(|_| lora.dropout > 0.0).map(|draw| Dropout {
                    p: lora.dropout,
                    seed: draw.seed,
                    first_element: draw.first_row * s * d,
                }),
            }
        });
        linear(
            &x.reshape((b * s, d))?,
            &self.weight,
            Some(&self.bias),
            lora,
        )?
        .reshape((b, s, self.weight.dim(0)?))
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

    /// `cache`: this block's keys and values of earlier positions, extended
    /// with `x`'s (generation).
    fn forward_with_cache(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        // Each linear layer draws its own dropout mask, so a recomputed block draws the same ones.
        let seed = |layer: u64| {
            ctx.dropout.map(|draw| DropoutDraw {
                seed: draw.seed ^ layer.wrapping_mul(0xD1B5_4A32_D192_ED03),
                ..draw
            })
        };
        let ln1 = self.input_layernorm.forward(x)?;
        let attended = (self.attention(&ln1, ctx, [seed(1), seed(2)], track, cache)?
            + if ctx.post_ln { &ln1 } else { x })?;
        let ln2 = self.post_attention_layernorm.forward(&attended)?;
        let up = gelu(&self.dense_h_to_4h.forward(&ln2, seed(3), track)?)?;
        let mlp = self.dense_4h_to_h.forward(&up, seed(4), track)?;
        mlp + if ctx.post_ln { &ln2 } else { &attended }
    }

    fn attention(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        [qkv_seed, dense_seed]: [Option<DropoutDraw>; 2],
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let head_dim = h / ctx.n_head;
        // The fused projection is laid out per head: [.., head, (q|k|v), head_dim].
        let qkv = self
            .query_key_value
            .forward(x, qkv_seed, track)?
            .reshape((b, s, ctx.n_head, 3, head_dim))?;
        let part = |i| -> candle_core::Result<Tensor> {
            qkv.narrow(3, i, 1)?
                .squeeze(3)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let probs = attention_probs(
            &q.matmul(&k.t()?)?,
            1.0 / (head_dim as f64).sqrt(),
            &ctx.bias,
            ctx.composite_bias.as_ref(),
        )?
        .to_dtype(v.dtype())?;
        let context = probs.matmul(&v)?;
        let merged = context.transpose(1, 2)?.reshape((b, s, h))?;
        self.attention_dense.forward(&merged, dense_seed, track)
    }
}

impl Recompute for Block {
    type Context = BlockContext;

    fn forward(&self, x: &Tensor, ctx: &BlockContext, track: bool) -> candle_core::Result<Tensor> {
        self.forward_with_cache(x, ctx, track, None)
    }

    /// The block's tensors that training updates (LoRA, or all in full fine-tuning).
    fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut tensors = Vec::new();
        for norm in [&self.input_layernorm, &self.post_attention_layernorm] {
            tensors.extend([norm.weight.clone(), norm.bias.clone()]);
        }
        for linear in [
            &self.query_key_value,
            &self.attention_dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ] {
            tensors.extend([linear.weight.clone(), linear.bias.clone()]);
            if let Some(lora) = &linear.lora {
                tensors.extend([lora.a.as_tensor().clone(), lora.b.as_tensor().clone()]);
            }
        }
        tensors.retain(Tensor::is_variable);
        tensors
    }
}

/// Keys and values of the positions seen so far, per block (generation).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

pub struct Bloom {
    pub config: Config,
    word_embeddings: Tensor,
    embeddings_layernorm: LayerNorm,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    pub(crate) device: Device,
    /// How the current micro-batch draws its dropout masks; `None` outside training.
    dropout: Cell<Option<DropoutDraw>>,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Gradients of trainable tensors inside checkpointed blocks, which the
    /// recomputation computes outside the main backward pass.
    recomputed_grads: checkpoint::SideGradients,
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
        weight: w.take(&format!("{prefix}.weight"), &[output, input])?,
        bias: w.take(&format!("{prefix}.bias"), &[output])?,
        lora: None,
    })
}

impl Bloom {
    /// Loads `config.json` and `model.safetensors` from an HF model directory
    /// onto `device`, with the base weights in `dtype` (f32, or bf16/f16 on
    /// CUDA). Keys may carry the `transformer.` prefix or not; the storage
    /// dtype is converted. LoRA weights, LayerNorm statistics, softmax and
    /// the loss stay in f32 whatever `dtype` is.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let mut w = Weights::open(&dir.join("model.safetensors"), device, dtype)?;
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
        Ok(Self {
            config,
            word_embeddings,
            embeddings_layernorm,
            blocks,
            ln_f,
            device: device.clone(),
            dropout: Cell::new(None),
            gradient_checkpointing: false,
            recomputed_grads: Default::default(),
        })
    }

    /// The dtype of the base weights and hidden states.
    pub fn dtype(&self) -> DType {
        self.word_embeddings.dtype()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every linear layer with its PEFT module path (`transformer.h.0.self_attention.dense`).
    pub(crate) fn linears_mut(&mut self) -> impl Iterator<Item = (String, &mut Linear)> {
        self.blocks.iter_mut().enumerate().flat_map(|(i, b)| {
            b.parts_mut()
                .1
                .map(|(name, linear)| (format!("transformer.h.{i}.{name}"), linear))
        })
    }

    /// Training mode with dropout masks drawn as `draw` says (`Some`), or
    /// evaluation mode without dropout (`None`).
    pub fn set_dropout(&self, draw: Option<DropoutDraw>) {
        self.dropout.set(draw);
    }

    /// Gradients of `loss` by tensor, those that checkpointed blocks
    /// computed while recomputing included.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.recomputed_grads.backward(loss)
    }

    /// ALiBi and the causal + padding mask of a left- or right-padded batch
    /// (`mask`: 1 for tokens, 0 for pads) whose last `q` positions are the
    /// queries, computed once per forward pass; as tensors too where the
    /// fused CPU kernel does not apply.
    fn attention_bias(
        &self,
        mask: &[Vec<u32>],
        q: usize,
    ) -> Result<(Arc<AttentionBias>, Option<CompositeBias>)> {
        let (b, s) = (mask.len(), mask[0].len());
        let mut positions = Vec::with_capacity(b * s);
        for row in mask {
            // Positions count tokens only, so left padding does not shift them.
            let mut seen = 0f32;
            positions.extend(row.iter().map(|&m| {
                seen += m as f32;
                if m == 1 { seen - 1.0 } else { 0.0 }
            }));
        }
        let bias = Arc::new(AttentionBias {
            batch: b,
            keys: s,
            queries: q,
            slopes: alibi_slopes(self.config.n_head),
            positions,
            real: mask.iter().flatten().map(|&m| m == 1).collect(),
        });
        let composite = match self.device.is_cpu() && self.dtype() == DType::F32 {
            true => None,
            false => Some(bias.tensors(&self.device)?),
        };
        Ok((bias, composite))
    }

    /// Logits `[b, s, vocab]` of a batch of token ids with its attention mask.
    pub fn forward(&self, input_ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        let hidden = self.hidden_states(input_ids, mask, None)?;
        self.lm_head(&hidden.reshape((b * s, self.config.hidden_size))?)?
            .reshape((b, s, self.config.vocab_size))
            .map_err(Into::into)
    }

    /// The training loss of a batch: the sum of next-token cross-entropies
    /// (`labels[i][t]` is predicted from position `t - 1`; `-100`: no loss)
    /// and the number of counted tokens. The logits are never materialised
    /// whole (see [`lm_head_loss_sum`]).
    pub fn loss_sum(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        labels: &[Vec<i64>],
    ) -> Result<(Tensor, usize)> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        let hidden = self
            .hidden_states(input_ids, mask, None)?
            .reshape((b * s, self.config.hidden_size))?;
        let targets: Vec<Option<u32>> = labels
            .iter()
            .flat_map(|row| {
                (1..=s).map(move |t| {
                    row.get(t)
                        .filter(|&&label| label != IGNORE_INDEX)
                        .map(|&label| label as u32)
                })
            })
            .collect();
        Ok(lm_head_loss_sum(
            &self.ln_f.forward(&hidden)?,
            &self.word_embeddings,
            &targets,
        )?)
    }

    /// Generation: logits `[b, vocab]` of the last position after appending
    /// `new_ids` (`[b, n]`) to what `cache` holds. `mask` covers the cached
    /// and the new positions (`[b, cached + n]`).
    pub fn forward_cached(
        &self,
        new_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.blocks.len()];
        }
        let hidden = self.hidden_states(new_ids, mask, Some(cache))?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        self.lm_head(&last)
    }

    /// Final LayerNorm and the LM head, tied to the (frozen) embedding: `[n, h]` → `[n, vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(frozen_matmul(
            &self.ln_f.forward(hidden)?,
            &self.word_embeddings,
        )?)
    }

    /// The last block's output `[b, n, h]` for `input_ids` `[b, n]`, the
    /// batch's last `n` positions of `mask`.
    fn hidden_states(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        let ids = Tensor::from_vec(input_ids.concat(), (b * s,), &self.device)?;
        let embedded =
            self.word_embeddings
                .index_select(&ids, 0)?
                .reshape((b, s, self.config.hidden_size))?;
        let mut hidden = self.embeddings_layernorm.forward(&embedded)?;
        let (bias, composite_bias) = self.attention_bias(mask, s)?;
        let draw = self.dropout.get();
        for (index, block) in self.blocks.iter().enumerate() {
            let context = BlockContext {
                bias: bias.clone(),
                composite_bias: composite_bias.clone(),
                n_head: self.config.n_head,
                post_ln: self.config.apply_residual_connection_post_layernorm,
                // Each block draws its own masks, so a recomputed block draws the same ones.
                dropout: draw.map(|draw| DropoutDraw {
                    seed: draw.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..draw
                }),
            };
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[index]);
            hidden = if self.gradient_checkpointing && hidden.track_op() {
                checkpoint::checkpointed(block, &hidden, context, &self.recomputed_grads)?
            } else {
                block.forward_with_cache(&hidden, &context, true, layer_cache)?
            };
        }
        Ok(hidden)
    }

    /// Every base-model tensor with its HF checkpoint name, in checkpoint order.
    pub fn base_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
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
                tensors.push((format!("{p}.{name}.weight"), &mut linear.weight));
                tensors.push((format!("{p}.{name}.bias"), &mut linear.bias));
            }
        }
        tensors.push(("transformer.ln_f.weight".to_string(), &mut self.ln_f.weight));
        tensors.push(("transformer.ln_f.bias".to_string(), &mut self.ln_f.bias));
        tensors
    }

    /// Full fine-tuning: every base tensor becomes a trainable variable.
    /// Returns them by HF name.
    pub fn make_base_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        self.base_tensors_mut()
            .into_iter()
            .map(|(name, tensor)| {
                let variable = Var::from_tensor(tensor)?;
                *tensor = variable.as_tensor().clone();
                Ok((name, variable))
            })
            .collect()
    }

    /// Writes the base weights as an HF model directory in `dtype`, with
    /// `source`'s config (dtype updated), generation config and tokenizer files.
    pub fn save_model(&mut self, dir: &Path, source: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .base_tensors_mut()
            .into_iter()
            .map(|(name, t)| (name, &*t))
            .collect();
        hf_dir::save_model(dir, tensors, source, dtype)
    }
}

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
