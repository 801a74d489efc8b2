//! The Llama family (HF `LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): RMSNorm, grouped-query attention
//! with rotary position embeddings, SwiGLU MLP, an LM head tied to the
//! embedding or not. The families differ only in what the config says:
//! q/k/v biases (Qwen2), per-head q/k RMSNorm and an explicit `head_dim`
//! (Qwen3), RoPE scaling (Llama 3), a sliding window (Mistral).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use crate::fused::AttentionBias;
use crate::hf_dir::{BlockWeights, Compact, Weights};
use crate::layers::{DropoutDraw, Linear, layer_dropout};
use crate::linear::LinearWeight;
use crate::model::{
    Architecture, DecoderBlock, KvCache, ModelConfig, Pass, block_linears, embed, run_blocks,
};
use crate::ops::{attention_probs, rms_norm, softmax_last_dim, swiglu};
use crate::product::matmul;

/// RoPE as `config.json` gives it: transformers 5's `rope_parameters`, or
/// 4.x's `rope_scaling` beside `rope_theta`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// `config.json` of the Llama family, both dialects.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

fn silu() -> String {
    "silu".into()
}

/// How positions rotate queries and keys.
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    /// Positions divided by `factor`.
    Linear {
        theta: f64,
        factor: f64,
    },
    /// Llama 3.1's smoothed frequency scaling.
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let config: Config = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Llama-family config", path.display()))?;
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            bail!(
                "{}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}",
                path.display()
            );
        }
        if config.head_dim.is_none() && !config.hidden_size.is_multiple_of(heads) {
            bail!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {heads}",
                path.display(),
                config.hidden_size
            );
        }
        if config.hidden_act != "silu" {
            bail!(
                "{}: hidden_act `{}` is not supported (the Llama family uses silu)",
                path.display(),
                config.hidden_act
            );
        }
        if config.model_type == "qwen2" && config.use_sliding_window {
            bail!(
                "{}: Qwen2's per-layer sliding window (use_sliding_window) is not supported",
                path.display()
            );
        }
        config
            .rope()
            .with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Qwen3 defaults to 128; the others to `hidden_size / heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(match self.model_type.as_str() {
            "qwen3" => 128,
            _ => self.hidden_size / self.num_attention_heads,
        })
    }

    /// Qwen2's q/k/v projections always have a bias; elsewhere
    /// `attention_bias` says, for o as well.
    fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias
    }

    /// Per-head RMSNorm on queries and keys before RoPE.
    fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// Mistral's sliding window; the others attend to every earlier position.
    fn window(&self) -> Option<usize> {
        self.sliding_window.filter(|_| self.model_type == "mistral")
    }

    pub fn rope(&self) -> Result<Rope> {
        let parameters = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        let theta = parameters
            .rope_theta
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if parameters.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            bail!("partial_rotary_factor is not supported");
        }
        let need = |value: Option<f64>, name: &str| {
            value.with_context(|| format!("RoPE scaling needs `{name}`"))
        };
        Ok(match parameters.rope_type.as_deref().unwrap_or("default") {
            "default" => Rope::Default { theta },
            "linear" => Rope::Linear {
                theta,
                factor: need(parameters.factor, "factor")?,
            },
            "llama3" => Rope::Llama3 {
                theta,
                factor: need(parameters.factor, "factor")?,
                low_freq_factor: need(parameters.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(parameters.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: parameters
                    .original_max_position_embeddings
                    .context("RoPE scaling needs `original_max_position_embeddings`")?,
            },
            other => bail!(
                "rope_type `{other}` is not supported (pt-host computes default, linear and llama3)"
            ),
        })
    }
}

impl Rope {
    /// Inverse frequencies of a head of `dim`, in f32 as transformers computes them.
    pub fn inverse_frequencies(&self, dim: usize) -> Vec<f32> {
        let theta = match self {
            Rope::Default { theta } | Rope::Linear { theta, .. } | Rope::Llama3 { theta, .. } => {
                *theta as f32
            }
        };
        let base: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
            .collect();
        match *self {
            Rope::Default { .. } => base,
            Rope::Linear { factor, .. } => base.iter().map(|f| f / factor as f32).collect(),
            Rope::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
                ..
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old = original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            return scaled;
                        }
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    })
                    .collect()
            }
        }
    }
}

#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

#[derive(Clone)]
struct Block {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// What a block's forward needs besides its weights (cheap to clone).
#[derive(Clone)]
struct BlockContext {
    /// RoPE's angles at the queries' positions.
    rotation: Rotation,
    /// Who sees whom: the fused CPU kernel's causal and padding mask
    /// (without ALiBi), or the additive f32 mask `[b, 1, q, keys]` (with a
    /// sliding window, or off the CPU's f32 path).
    mask: AttentionMask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dropout: Option<DropoutDraw>,
}

/// RoPE's angles: `cos`, `sin` `[b, q, d/2]` for the fused CPU kernel, or
/// `[b, 1, q, d]` tensors in the hidden states' dtype.
#[derive(Clone)]
enum Rotation {
    Fused {
        cos: Arc<Vec<f32>>,
        sin: Arc<Vec<f32>>,
    },
    Tensors {
        cos: Tensor,
        sin: Tensor,
    },
}

impl Rotation {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Rotation::Fused { cos, sin } => crate::fused::rope_op(x, cos, sin),
            Rotation::Tensors { cos, sin } => {
                x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
            }
        }
    }
}

/// How a block's attention masks its scores.
#[derive(Clone)]
enum AttentionMask {
    /// BLOOM's fused softmax kernel, with zero ALiBi slopes.
    Fused(Arc<AttentionBias>),
    Additive(Tensor),
}

/// `x` `[b, heads, s, d]` with its halves rotated: `cat(-x₂, x₁)`.
fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Key/value heads repeated for the query heads that share them:
/// `[b, kv, t, d]` → `[b, kv · repeat, t, d]`.
fn repeat_kv(x: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
    if repeat == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, repeat, t, d))?
        .contiguous()?
        .reshape((b, kv * repeat, t, d))
}

impl Block {
    /// The block's norms and linear layers with their module paths inside it.
    #[allow(clippy::type_complexity)]
    fn parts_mut(
        &mut self,
    ) -> (
        Vec<(&'static str, &mut RmsNorm)>,
        [(&'static str, &mut Linear); 7],
    ) {
        let mut norms = vec![
            ("input_layernorm", &mut self.input_layernorm),
            (
                "post_attention_layernorm",
                &mut self.post_attention_layernorm,
            ),
        ];
        if let Some((q_norm, k_norm)) = &mut self.qk_norm {
            norms.extend([("self_attn.q_norm", q_norm), ("self_attn.k_norm", k_norm)]);
        }
        let linears = [
            ("self_attn.q_proj", &mut self.q_proj),
            ("self_attn.k_proj", &mut self.k_proj),
            ("self_attn.v_proj", &mut self.v_proj),
            ("self_attn.o_proj", &mut self.o_proj),
            ("mlp.gate_proj", &mut self.gate_proj),
            ("mlp.up_proj", &mut self.up_proj),
            ("mlp.down_proj", &mut self.down_proj),
        ];
        (norms, linears)
    }

    fn attention(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        seed: impl Fn(u64) -> Option<DropoutDraw>,
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let d = ctx.head_dim;
        let heads_of = |t: Tensor, n: usize| t.reshape((b, s, n, d));
        let mut q = heads_of(self.q_proj.forward(x, seed(1), track)?, ctx.heads)?;
        let mut k = heads_of(self.k_proj.forward(x, seed(2), track)?, ctx.kv_heads)?;
        let v = heads_of(self.v_proj.forward(x, seed(3), track)?, ctx.kv_heads)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = ctx.rotation.apply(&q.transpose(1, 2)?)?;
        let mut k = ctx.rotation.apply(&k.transpose(1, 2)?)?;
        let mut v = v.transpose(1, 2)?;
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let repeat = ctx.heads / ctx.kv_heads;
        let (k, v) = (repeat_kv(&k, repeat)?, repeat_kv(&v, repeat)?);
        let raw_scores = matmul(&q, &k.transpose(2, 3)?)?;
        let scale = 1.0 / (d as f64).sqrt();
        // Softmax in f32, as HF does, whatever the compute dtype.
        let probs = match &ctx.mask {
            AttentionMask::Fused(bias) => attention_probs(&raw_scores, scale, bias, None)?,
            AttentionMask::Additive(mask) => softmax_last_dim(
                &(raw_scores * scale)?
                    .to_dtype(DType::F32)?
                    .broadcast_add(mask)?,
            )?,
        }
        .to_dtype(v.dtype())?;
        let context = matmul(&probs, &v)?;
        let merged = context.transpose(1, 2)?.reshape((b, s, ctx.heads * d))?;
        self.o_proj.forward(&merged, seed(4), track)
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
        let normed = self.input_layernorm.forward(x)?;
        let attended = (x + self.attention(&normed, ctx, seed, track, cache)?)?;
        let normed = self.post_attention_layernorm.forward(&attended)?;
        let gate = self.gate_proj.forward(&normed, seed(5), track)?;
        let up = self.up_proj.forward(&normed, seed(6), track)?;
        let mlp = self
            .down_proj
            .forward(&swiglu(&gate, &up)?, seed(7), track)?;
        attended + mlp
    }

    fn tensors(&self) -> Vec<Tensor> {
        let mut norms = vec![&self.input_layernorm, &self.post_attention_layernorm];
        norms.extend(self.qk_norm.iter().flat_map(|(q, k)| [q, k]));
        let linears = [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        let weights = norms.into_iter().map(|norm| norm.weight.clone());
        weights
            .chain(linears.into_iter().flat_map(Linear::tensors))
            .collect()
    }
}

pub struct Llama {
    pub config: Config,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` where tied to the embedding.
    lm_head: Option<Tensor>,
    inverse_frequencies: Vec<f32>,
    device: Device,
}

/// The seven linear layers PEFT can target in a block (MedicalGPT's `all`).
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Llama {
    /// Loads `config.json` and the safetensors weights (one file or shards)
    /// of an HF model directory.
    /// With `block_weights`, the blocks' linear weights are converted as they are read.
    pub(crate) fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        block_weights: Option<BlockWeights>,
    ) -> Result<(Self, ModelConfig)> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let model_type = match config.model_type.as_str() {
            "llama" => "llama",
            "mistral" => "mistral",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            other => bail!("model_type `{other}` is not in the Llama family"),
        };
        let compact = block_weights.map(|weights| Compact {
            weights,
            blocks: "model.layers.",
        });
        let mut w = Weights::open(dir, device, dtype, model_type, None, compact)?;
        let (h, eps, d) = (config.hidden_size, config.rms_norm_eps, config.head_dim());
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let inter = config.intermediate_size;
        let norm = |w: &mut Weights, name: &str, size: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.take(&format!("{name}.weight"), &[size])?,
                eps,
            })
        };
        let linear = |w: &mut Weights, name: &str, input: usize, output: usize, bias: bool| {
            Ok::<_, anyhow::Error>(Linear {
                weight: w.take_linear(&format!("{name}.weight"), output, input)?,
                bias: match bias {
                    true => Some(w.take(&format!("{name}.bias"), &[output])?),
                    false => None,
                },
                lora: None,
            })
        };
        let embed_tokens = w.take("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let (qkv_bias, o_bias, mlp_bias) = (config.qkv_bias(), config.o_bias(), config.mlp_bias);
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    input_layernorm: norm(&mut w, &format!("{p}.input_layernorm"), h)?,
                    q_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.q_proj"),
                        h,
                        heads * d,
                        qkv_bias,
                    )?,
                    k_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.k_proj"),
                        h,
                        kv * d,
                        qkv_bias,
                    )?,
                    v_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.v_proj"),
                        h,
                        kv * d,
                        qkv_bias,
                    )?,
                    o_proj: linear(
                        &mut w,
                        &format!("{p}.self_attn.o_proj"),
                        heads * d,
                        h,
                        o_bias,
                    )?,
                    qk_norm: match config.qk_norm() {
                        true => Some((
                            norm(&mut w, &format!("{p}.self_attn.q_norm"), d)?,
                            norm(&mut w, &format!("{p}.self_attn.k_norm"), d)?,
                        )),
                        false => None,
                    },
                    post_attention_layernorm: norm(
                        &mut w,
                        &format!("{p}.post_attention_layernorm"),
                        h,
                    )?,
                    gate_proj: linear(&mut w, &format!("{p}.mlp.gate_proj"), h, inter, mlp_bias)?,
                    up_proj: linear(&mut w, &format!("{p}.mlp.up_proj"), h, inter, mlp_bias)?,
                    down_proj: linear(&mut w, &format!("{p}.mlp.down_proj"), inter, h, mlp_bias)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = norm(&mut w, "model.norm", h)?;
        // A tied checkpoint may still carry the head; the embedding serves.
        let lm_head = match config.tie_word_embeddings {
            false => Some(w.take("lm_head.weight", &[config.vocab_size, h])?),
            true => None,
        };
        let summary = ModelConfig {
            model_type: model_type.into(),
            vocab_size: config.vocab_size,
            hidden_size: h,
            tie_word_embeddings: lm_head.is_none(),
        };
        let llama = Self {
            inverse_frequencies: config.rope()?.inverse_frequencies(d),
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            device: device.clone(),
        };
        Ok((llama, summary))
    }

    /// RoPE's cos and sin `[b, 1, q, head_dim]` at the positions of the
    /// batch's last `q` columns (a position counts real tokens before it, so
    /// left padding does not shift it), and the additive mask `[b, 1, q,
    /// keys]`: a query sees real keys at or before it (and within the window).
    fn positions_and_mask(
        &self,
        mask: &[Vec<u32>],
        q: usize,
        dtype: DType,
    ) -> Result<(Rotation, AttentionMask)> {
        let (b, keys) = (mask.len(), mask[0].len());
        let half = self.inverse_frequencies.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(b * q * half),
            Vec::with_capacity(b * q * half),
        );
        let window = self.config.window();
        let cpu_f32 = self.device.is_cpu() && dtype == DType::F32;
        let fused = window.is_none() && cpu_f32;
        let mut additive = Vec::with_capacity(if fused { 0 } else { b * q * keys });
        for row in mask {
            let mut position = Vec::with_capacity(keys);
            let mut seen = 0usize;
            for &m in row {
                seen += m as usize;
                position.push(if m == 1 { seen - 1 } else { 0 });
            }
            for (query, &p) in position.iter().enumerate().skip(keys - q) {
                let p = p as f32;
                for f in &self.inverse_frequencies {
                    let angle = p * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
                if fused {
                    continue;
                }
                additive.extend((0..keys).map(|key| {
                    let visible =
                        key <= query && row[key] == 1 && window.is_none_or(|w| query - key < w);
                    if visible { 0.0 } else { f32::MIN }
                }));
            }
        }
        let device = &self.device;
        let rotation = match cpu_f32 {
            true => Rotation::Fused {
                cos: Arc::new(cos),
                sin: Arc::new(sin),
            },
            false => {
                // Both halves of a head share each angle.
                let angles = |half_values: Vec<f32>| -> Result<Tensor> {
                    let halves = Tensor::from_vec(half_values, (b, 1, q, half), device)?;
                    Ok(Tensor::cat(&[&halves, &halves], 3)?.to_dtype(dtype)?)
                };
                Rotation::Tensors {
                    cos: angles(cos)?,
                    sin: angles(sin)?,
                }
            }
        };
        let mask = match fused {
            true => AttentionMask::Fused(Arc::new(AttentionBias {
                batch: b,
                keys,
                queries: q,
                slopes: vec![0.0; self.config.num_attention_heads],
                positions: vec![0.0; b * keys],
                real: mask.iter().flatten().map(|&m| m == 1).collect(),
            })),
            false => AttentionMask::Additive(Tensor::from_vec(additive, (b, 1, q, keys), device)?),
        };
        Ok((rotation, mask))
    }
}

impl Architecture for Llama {
    fn hidden_states(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        pass: &Pass<'_>,
    ) -> Result<Tensor> {
        let hidden = embed(&self.embed_tokens, input_ids)?;
        let (rotation, attention_mask) =
            self.positions_and_mask(mask, input_ids[0].len(), hidden.dtype())?;
        let hidden = run_blocks(&self.blocks, hidden, pass, cache, |index| BlockContext {
            rotation: rotation.clone(),
            mask: attention_mask.clone(),
            heads: self.config.num_attention_heads,
            kv_heads: self.config.kv_heads(),
            head_dim: self.config.head_dim(),
            dropout: pass.block_dropout(index),
        })?;
        Ok(self.norm.forward(&hidden)?)
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        block_linears(&mut self.blocks, "model.layers", |b| b.parts_mut().1.into())
    }

    fn base_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_string(),
            &mut self.embed_tokens,
        )];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let (norms, linears) = b.parts_mut();
            for (name, norm) in norms {
                tensors.push((format!("{p}.{name}.weight"), &mut norm.weight));
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
        tensors.push(("model.norm.weight".to_string(), &mut self.norm.weight));
        if let Some(head) = &mut self.lm_head {
            tensors.push(("lm_head.weight".to_string(), head));
        }
        tensors
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        &LORA_TARGETS
    }

    fn embedding_module(&self) -> &'static str {
        "model.embed_tokens"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's scaling as transformers' `_compute_llama3_parameters`
    /// defines it: high frequencies kept, low ones divided by the factor,
    /// the band between interpolated (Llama 3.1's settings).
    #[test]
    fn llama3_rope_scales_low_frequencies_only() {
        let rope = Rope::Llama3 {
            theta: 500_000.0,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = Rope::Default { theta: 500_000.0 }.inverse_frequencies(128);
        let scaled = rope.inverse_frequencies(128);
        assert_eq!(scaled[0], plain[0], "the highest frequency is kept");
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-12,
            "the lowest is divided"
        );
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        let between = (0..plain.len())
            .find(|&i| wavelen(plain[i]) >= 8192.0 / 4.0 && wavelen(plain[i]) <= 8192.0)
            .expect("a frequency in the smoothed band");
        assert!(scaled[between] < plain[between] && scaled[between] > plain[between] / 8.0);
    }
}
