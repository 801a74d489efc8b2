//! A causal language model of any supported family: what training,
//! evaluation and generation need of it, written once. Each family's file
//! (`bloom.rs`, `llama.rs`) is its architecture alone, behind
//! [`Architecture`]; `load` picks it from `config.json`'s `model_type`.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint::{self, Recompute, SideGradients};
use crate::hf_dir;
use crate::hf_dir::BlockWeights;
use crate::layers::{DropoutDraw, Linear};
use crate::linear::{LinearWeight, frozen_matmul};
use crate::loss::{IGNORE_INDEX, lm_head_loss_sum, lm_head_loss_sum_and_predictions};
use crate::thread_groups::in_thread_groups;

/// What the rest of pt-host needs to know of any family's configuration.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `config.json`'s `model_type` (`bloom`, `llama`, `qwen2`, …).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The LM head is the input embedding.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Weights of the embedding and of an untied LM head: HF's FLOP count
    /// leaves them out.
    pub fn embedding_parameters(&self) -> usize {
        let matrices = if self.tie_word_embeddings { 1 } else { 2 };
        self.vocab_size * self.hidden_size * matrices
    }
}

/// The families pt-host trains, by `model_type`.
pub const MODEL_TYPES: [&str; 5] = ["bloom", "llama", "mistral", "qwen2", "qwen3"];

/// Keys and values of the positions seen so far, per block (generation,
/// and continuations scored after a shared context).
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// A cache of the batch rows `rows` (a row may repeat): one context's
    /// keys and values for each of its continuations.
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let Some(device) = self.layers.iter().flatten().map(|(k, _)| k.device()).next() else {
            return Ok(KvCache::default());
        };
        let rows = Tensor::from_vec(rows.to_vec(), rows.len(), device)?;
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .as_ref()
                    .map(|(k, v)| {
                        let select = |t: &Tensor| t.contiguous()?.index_select(&rows, 0);
                        Ok((select(k)?, select(v)?))
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache { layers })
    }
}

/// How one forward pass runs besides its inputs.
pub(crate) struct Pass<'a> {
    /// The micro-batch's dropout masks; `None` outside training.
    pub dropout: Option<DropoutDraw>,
    /// Whether the pass builds a graph for the adapters' gradients: false
    /// where no gradient is ever taken (evaluation, generation), so that
    /// no block keeps its activations for a backward pass.
    pub track: bool,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
    /// Where checkpointed blocks leave their trainable tensors' gradients.
    pub side: &'a SideGradients,
}

impl Pass<'_> {
    /// Block `index`'s dropout masks.
    pub(crate) fn block_dropout(&self, index: usize) -> Option<DropoutDraw> {
        self.dropout
            .map(|draw| draw.part(index as u64 + 1, 0x9E37_79B9_7F4A_7C15))
    }
}

/// A decoder block of any family: its forward pass (with or without a
/// graph, with a KV cache in generation) and its trainable tensors. Every
/// block is thereby checkpointable ([`Recompute`]).
pub(crate) trait DecoderBlock: Clone + Send + Sync + 'static {
    /// What the forward needs besides the input and the weights (masks,
    /// positions, dropout draws); cheap to clone.
    type Context: Clone + Send + Sync + 'static;

    /// `track`: false while the block runs without a graph (checkpointing,
    /// evaluation, generation);
    /// `cache`: this block's keys and values of earlier positions, extended
    /// with `x`'s.
    fn apply(
        &self,
        x: &Tensor,
        context: &Self::Context,
        track: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor>;

    /// The block's tensors: norms' and linear layers' (with adapters).
    fn tensors(&self) -> Vec<Tensor>;

    /// The block applied to `x` as one op with a backward pass of its own,
    /// where the block supports that for `x` (BLOOM's, on the CPU in f32,
    /// with a frozen base); `None` where it does not.
    fn as_one_op(
        &self,
        _x: &Tensor,
        _context: &Self::Context,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

impl<B: DecoderBlock> Recompute for B {
    type Context = B::Context;

    fn forward(
        &self,
        x: &Tensor,
        context: &B::Context,
        track: bool,
    ) -> candle_core::Result<Tensor> {
        self.apply(x, context, track, None)
    }

    fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut tensors = self.tensors();
        tensors.retain(Tensor::is_variable);
        tensors
    }
}

/// `hidden` through `blocks` in order, block `i` with `context(i)`: each
/// checkpointed where the pass asks for it (and a graph is being built),
/// extending `cache` where there is one.
pub(crate) fn run_blocks<B: DecoderBlock>(
    blocks: &[B],
    mut hidden: Tensor,
    pass: &Pass<'_>,
    mut cache: Option<&mut KvCache>,
    context: impl Fn(usize) -> B::Context,
) -> Result<Tensor> {
    if let Some(cache) = cache.as_deref_mut()
        && cache.layers.is_empty()
    {
        cache.layers = vec![None; blocks.len()];
    }
    for (index, block) in blocks.iter().enumerate() {
        let context = context(index);
        let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[index]);
        let as_one_op = if pass.track && !pass.checkpointing && layer_cache.is_none() {
            block.as_one_op(&hidden, &context)?
        } else {
            None
        };
        hidden = match as_one_op {
            Some(output) => output,
            None if pass.track && pass.checkpointing && hidden.track_op() => {
                checkpoint::checkpointed(block, &hidden, context, pass.side)?
            }
            None => block.apply(&hidden, &context, pass.track, layer_cache)?,
        };
    }
    Ok(hidden)
}

/// What each of a batch's `b × s` positions predicts: position `t` of a row
/// its label `t + 1` (`None` past the row, or where the label is ignored).
fn next_token_targets(labels: &[Vec<i64>], s: usize) -> Vec<Option<u32>> {
    labels
        .iter()
        .flat_map(|row| {
            (1..=s).map(move |t| {
                row.get(t)
                    .filter(|&&label| label != IGNORE_INDEX)
                    .map(|&label| label as u32)
            })
        })
        .collect()
}

/// Rows `input_ids` (`[b][s]`) of the embedding `table`: `[b, s, h]`.
pub(crate) fn embed(table: &Tensor, input_ids: &[Vec<u32>]) -> Result<Tensor> {
    let (b, s) = (input_ids.len(), input_ids[0].len());
    let ids = Tensor::from_vec(input_ids.concat(), (b * s,), table.device())?;
    Ok(table
        .index_select(&ids, 0)?
        .reshape((b, s, table.dim(1)?))?)
}

/// Each block's linear layers with their PEFT module paths:
/// `{prefix}.{index}.{name}`.
pub(crate) fn block_linears<'a, B>(
    blocks: &'a mut [B],
    prefix: &str,
    linears: impl Fn(&'a mut B) -> Vec<(&'static str, &'a mut Linear)>,
) -> Vec<(String, &'a mut Linear)> {
    let mut all = Vec::new();
    for (index, block) in blocks.iter_mut().enumerate() {
        for (name, linear) in linears(block) {
            all.push((format!("{prefix}.{index}.{name}"), linear));
        }
    }
    all
}

/// One family's architecture: its layers and their forward pass.
pub(crate) trait Architecture: Send + Sync {
    /// The hidden states after the final norm, `[b, n, h]`, of `input_ids`
    /// `[b, n]`, which are the batch's last `n` positions of `mask` (1 for
    /// tokens, 0 for left or right padding).
    fn hidden_states(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        pass: &Pass<'_>,
    ) -> Result<Tensor>;

    /// The LM head `[vocab, h]` (the embedding, where tied).
    fn lm_head(&self) -> &Tensor;

    /// Every linear layer with its PEFT module path.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Every base tensor with its HF checkpoint name, in checkpoint order.
    fn base_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// The module names PEFT and MedicalGPT target for `--target_modules all`.
    fn lora_targets(&self) -> &'static [&'static str];

    /// The input embedding's module path (`model.embed_tokens`); an untied
    /// LM head is `lm_head` in every family.
    fn embedding_module(&self) -> &'static str;
}

pub struct Model {
    pub(crate) arch: Box<dyn Architecture>,
    pub(crate) config: ModelConfig,
    device: Device,
    /// How the current micro-batch draws its dropout masks; `None` outside training.
    dropout: Mutex<Option<DropoutDraw>>,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Gradients of trainable tensors inside checkpointed blocks, which the
    /// recomputation computes outside the main backward pass.
    recomputed_grads: SideGradients,
    /// Base modules trained whole beside the adapters (PEFT's
    /// `modules_to_save`), by adapter key.
    pub(crate) trained_modules: Vec<(String, Var)>,
    /// Rows of the checkpoint's embedding: the vocabulary before any resize.
    pub(crate) checkpoint_vocab_size: usize,
}

/// `config.json`'s `model_type`, or why there is none.
pub fn model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON model config", path.display()))?;
    // The original BLOOM checkpoints predate the key.
    Ok(config["model_type"].as_str().unwrap_or("bloom").to_string())
}

impl Model {
    /// Loads an HF model directory (`config.json`, safetensors weights) onto
    /// `device`, the base weights in `dtype` (f32, or bf16/f16 on CUDA).
    /// LoRA weights, norm statistics, softmax and the loss stay in f32.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(dir, device, dtype, None)
    }

    /// [`Model::load`], with the decoder blocks' linear weights held as
    /// `block_weights` says (QLoRA's NF4 base, or bf16 on the CPU), each
    /// converted as it is read, so the dense model never exists (the
    /// embedding and LM head stay in `dtype`, as transformers leaves them).
    pub fn load_with(
        dir: &Path,
        device: &Device,
        dtype: DType,
        block_weights: Option<BlockWeights>,
    ) -> Result<Self> {
        let (arch, config): (Box<dyn Architecture>, ModelConfig) = match model_type(dir)?.as_str() {
            "bloom" => {
                let (bloom, config) = crate::bloom::Bloom::load(dir, device, dtype, block_weights)?;
                (Box::new(bloom), config)
            }
            "llama" | "mistral" | "qwen2" | "qwen3" => {
                let (llama, config) = crate::llama::Llama::load(dir, device, dtype, block_weights)?;
                (Box::new(llama), config)
            }
            other => bail!(
                "{}: model_type `{other}` is not one pt-host trains (it trains {})",
                dir.join("config.json").display(),
                MODEL_TYPES.join(", ")
            ),
        };
        Ok(Self {
            arch,
            checkpoint_vocab_size: config.vocab_size,
            config,
            device: device.clone(),
            dropout: Mutex::new(None),
            gradient_checkpointing: false,
            recomputed_grads: SideGradients::default(),
            trained_modules: Vec::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The input embedding's module path (`transformer.word_embeddings`,
    /// `model.embed_tokens`).
    pub fn embedding_module(&self) -> &'static str {
        self.arch.embedding_module()
    }

    /// The embedding's module name (`word_embeddings`, `embed_tokens`), as
    /// `--modules_to_save` takes it.
    pub fn embedding_name(&self) -> &'static str {
        let path = self.embedding_module();
        path.rsplit('.').next().unwrap_or(path)
    }

    /// The dtype of the base weights and hidden states.
    pub fn dtype(&self) -> DType {
        self.arch.lm_head().dtype()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The module names `--target_modules all` stands for in this family.
    pub fn lora_targets(&self) -> &'static [&'static str] {
        self.arch.lora_targets()
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.arch.linears_mut()
    }

    /// Training mode with dropout masks drawn as `draw` says (`Some`), or
    /// evaluation mode without dropout (`None`).
    pub fn set_dropout(&self, draw: Option<DropoutDraw>) {
        *self.dropout.lock().expect("not poisoned") = draw;
    }

    /// Gradients of `loss` by tensor, those that checkpointed blocks
    /// computed while recomputing included.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.recomputed_grads.backward(loss)
    }

    /// `track`: see [`Pass::track`].
    fn hidden_states(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        track: bool,
    ) -> Result<Tensor> {
        let pass = Pass {
            dropout: *self.dropout.lock().expect("not poisoned"),
            track,
            checkpointing: self.gradient_checkpointing,
            side: &self.recomputed_grads,
        };
        self.arch.hidden_states(input_ids, mask, cache, &pass)
    }

    /// Logits `[b, s, vocab]` of a batch of token ids with its attention mask.
    pub fn forward(&self, input_ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        let config = self.config();
        let hidden = self
            .hidden_states(input_ids, mask, None, true)?
            .reshape((b * s, config.hidden_size))?;
        Ok(frozen_matmul(&hidden, self.arch.lm_head())?.reshape((b, s, config.vocab_size))?)
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
            .hidden_states(input_ids, mask, None, true)?
            .reshape((b * s, self.config().hidden_size))?;
        let targets = next_token_targets(labels, s);
        Ok(lm_head_loss_sum(&hidden, self.arch.lm_head(), &targets)?)
    }

    /// An evaluation batch without its `[b, s, vocab]` logits: the sum of
    /// next-token cross-entropies and the tokens counted (`labels` as in
    /// [`Model::loss_sum`]), and the arg-max token at every position
    /// (`[b][s]`), the LM head applied a chunk of rows at a time.
    pub fn eval_loss_sum_and_predictions(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        labels: &[Vec<i64>],
    ) -> Result<(f64, usize, Vec<Vec<u32>>)> {
        if !self.device().is_cpu() {
            return self.eval_rows(input_ids, mask, labels, 1);
        }
        // The rows need nothing from one another: on the CPU each group of
        // threads evaluates its own.
        let groups = in_thread_groups(input_ids.len(), |rows, groups| {
            let (ids, mask, labels) =
                (&input_ids[rows.clone()], &mask[rows.clone()], &labels[rows]);
            self.eval_rows(ids, mask, labels, groups)
        })?;
        let (mut loss_sum, mut count, mut predictions) = (0.0, 0, Vec::new());
        for (group_loss, group_count, group_predictions) in groups {
            loss_sum += group_loss;
            count += group_count;
            predictions.extend(group_predictions);
        }
        Ok((loss_sum, count, predictions))
    }

    /// [`Model::eval_loss_sum_and_predictions`] of rows evaluated together,
    /// beside `alongside - 1` other such evaluations.
    fn eval_rows(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        labels: &[Vec<i64>],
        alongside: usize,
    ) -> Result<(f64, usize, Vec<Vec<u32>>)> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        // No gradient is taken: without a graph, an adapter's blocks keep
        // none of their activations.
        let hidden = self
            .hidden_states(input_ids, mask, None, false)?
            .reshape((b * s, self.config().hidden_size))?;
        let targets = next_token_targets(labels, s);
        let (loss_sum, count, predictions) =
            lm_head_loss_sum_and_predictions(&hidden, self.arch.lm_head(), &targets, alongside)?;
        let predictions = predictions.chunks(s).map(<[u32]>::to_vec).collect();
        Ok((loss_sum, count, predictions))
    }

    /// Log-probabilities `[n, vocab]` (f32) of the next token at each of
    /// `positions` (row, position) of a batch: scoring continuations
    /// without the logits of every position.
    pub fn next_token_log_probs(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        positions: &[(usize, usize)],
    ) -> Result<Tensor> {
        self.log_probs_at(input_ids, mask, None, positions)
    }

    /// [`Model::next_token_log_probs`] of `new_ids` appended to what `cache`
    /// holds (which it then holds too); `mask` covers the cached and the new
    /// positions, `positions` index the new ones.
    pub fn next_token_log_probs_cached(
        &self,
        new_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: &mut KvCache,
        positions: &[(usize, usize)],
    ) -> Result<Tensor> {
        self.log_probs_at(new_ids, mask, Some(cache), positions)
    }

    fn log_probs_at(
        &self,
        input_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        positions: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (b, s) = (input_ids.len(), input_ids[0].len());
        let hidden = self
            .hidden_states(input_ids, mask, cache, true)?
            .reshape((b * s, self.config().hidden_size))?;
        let rows: Vec<u32> = positions.iter().map(|&(r, p)| (r * s + p) as u32).collect();
        let rows = Tensor::from_vec(rows, positions.len(), hidden.device())?;
        let logits = frozen_matmul(&hidden.index_select(&rows, 0)?, self.arch.lm_head())?;
        Ok(crate::ops::log_softmax_last_dim(
            &logits.to_dtype(DType::F32)?,
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
        let hidden = self.hidden_states(new_ids, mask, Some(cache), false)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        Ok(frozen_matmul(&last, self.arch.lm_head())?)
    }

    /// Every base-model tensor with its HF checkpoint name, in checkpoint
    /// order; NF4 and bf16-held weights are not among them.
    pub fn base_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.arch.base_tensors_mut()
    }

    /// The bytes and elements of the linear weights held in NF4 or bf16
    /// rather than as tensors ([`BlockWeights`]; none without).
    pub fn compact_size(&mut self) -> (usize, usize) {
        self.linears_mut()
            .iter()
            .filter_map(|(_, linear)| match &linear.weight {
                LinearWeight::Nf4(weight) => {
                    Some((weight.size_in_bytes(), weight.shape.0 * weight.shape.1))
                }
                LinearWeight::Bf16(weight) => {
                    Some((weight.size_in_bytes(), weight.shape.0 * weight.shape.1))
                }
                LinearWeight::Dense(_) => None,
            })
            .fold((0, 0), |(bytes, elements), (b, e)| {
                (bytes + b, elements + e)
            })
    }

    /// Whether any linear weight is held in NF4 or bf16 (frozen).
    pub fn has_compact_weights(&mut self) -> bool {
        self.compact_size().1 > 0
    }

    /// Full fine-tuning: every base tensor becomes a trainable variable.
    /// Returns them by HF name.
    pub fn make_base_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        if self.has_compact_weights() {
            bail!("an NF4 (4-bit) or bf16-held base trains through LoRA adapters only, not whole");
        }
        self.base_tensors_mut()
            .into_iter()
            .map(|(name, tensor)| {
                let variable = Var::from_tensor(tensor)?;
                *tensor = variable.as_tensor().clone();
                Ok((name, variable))
            })
            .collect()
    }

    /// Writes the base weights as an HF model directory in `dtype` (sharded
    /// above `max_shard_bytes`), with `source`'s config (dtype and vocabulary
    /// size updated) and generation config; tokenizer files are the caller's.
    pub fn save_model(
        &mut self,
        dir: &Path,
        source: &Path,
        dtype: DType,
        max_shard_bytes: u64,
    ) -> Result<()> {
        if self.has_compact_weights() {
            bail!("NF4 and bf16-held weights are saved merged: merge_adapters widens them");
        }
        let vocab_size = self.config.vocab_size;
        let tensors = self
            .base_tensors_mut()
            .into_iter()
            .map(|(name, t)| (name, &*t))
            .collect();
        hf_dir::save_model(dir, tensors, source, dtype, vocab_size, max_shard_bytes)
    }
}
