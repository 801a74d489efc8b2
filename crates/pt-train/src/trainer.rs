//! The training loop, readable top to bottom: HF Trainer semantics for steps,
//! accumulation, clipping, schedules, logging, evaluation and checkpoints.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use pt_data::Blocks;
use pt_dist::{Collective, Single};
use pt_model::loss::next_token_loss_sum;
use pt_model::ops::log_softmax_last_dim;
use pt_model::{AdapterConfig, Bloom};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::step::{MicroBatch, accumulate_gradients};
use crate::{AdamW, AdamWConfig, Schedule, SchedulerType, clip_scale, grad_norm};

/// When evaluation or saving happens (HF `IntervalStrategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    No,
    Steps,
    Epoch,
}

impl Interval {
    /// Whether the interval falls on the step just finished (`steps_done`,
    /// counted from 1): every `every` steps, or when `epoch_ends`.
    pub fn due(self, steps_done: usize, every: usize, epoch_ends: bool) -> bool {
        match self {
            Interval::Steps => every > 0 && steps_done.is_multiple_of(every),
            Interval::Epoch => epoch_ends,
            Interval::No => false,
        }
    }
}

/// The subset of HF `TrainingArguments` the loop reads.
#[derive(Clone, Debug)]
pub struct TrainingArguments {
    pub output_dir: PathBuf,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`.
    pub max_steps: usize,
    pub lr_scheduler_type: SchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub logging_strategy: Interval,
    pub logging_steps: usize,
    pub logging_first_step: bool,
    pub eval_strategy: Interval,
    /// Evaluate once before the first step (HF `eval_on_start`), to show where training starts.
    pub eval_on_start: bool,
    pub eval_steps: usize,
    pub save_strategy: Interval,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    /// Reshuffle the training blocks every epoch (seeded); false keeps file order.
    pub shuffle: bool,
}

/// One optimizer step, for progress displays.
#[derive(Clone, Debug)]
pub struct StepProgress {
    /// Steps done (this one included) and planned.
    pub step: usize,
    pub max_steps: usize,
    /// This step's loss and learning rate.
    pub loss: f64,
    pub learning_rate: f64,
    /// Training tokens per second since this run started.
    pub tokens_per_second: f64,
}

/// What the trainer reports back to the command line.
pub trait TrainerCallback {
    /// After every optimizer step.
    fn on_step(&mut self, progress: &StepProgress);
    /// After every evaluation batch: batches done and planned.
    fn on_eval_batch(&mut self, done: usize, total: usize);
    fn on_log(&mut self, entry: &Value);
    fn on_save(&mut self, checkpoint: &Path);
}

/// Evaluation results: `eval_loss` (mean over tokens), `perplexity`, `accuracy`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub eval_loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    pub eval_tokens: usize,
    /// Evaluation blocks.
    pub samples: usize,
    /// Custom metrics by name (without the `eval_` prefix).
    pub extra: Vec<(String, f64)>,
}

/// What a metric plugin sees of one evaluation block.
pub struct EvalSample {
    /// The block's real tokens.
    pub tokens: Vec<u32>,
    /// Greedy prediction at each position but the last: `predicted[t]` is the
    /// model's guess for `tokens[t + 1]`.
    pub predicted: Vec<u32>,
    /// Log-probability the model gave `tokens[t + 1]`.
    pub logprobs: Vec<f32>,
}

/// Receives evaluation samples (custom metrics, e.g. WebAssembly plugins).
pub trait MetricSink {
    fn add(&mut self, samples: &[EvalSample]) -> Result<()>;
    /// The metrics of the evaluation that just ended; the next one starts afresh.
    fn finish(&mut self) -> Result<Vec<(String, f64)>>;
}

/// Samples of a batch: per row, so that only one row's log-softmax
/// `[seq, vocab]` exists at a time.
fn samples(
    logits: &Tensor,
    predictions: &[Vec<u32>],
    batch: &MicroBatch,
) -> Result<Vec<EvalSample>> {
    let mut samples = Vec::with_capacity(predictions.len());
    for (row, predicted) in predictions.iter().enumerate() {
        let real = batch.attention_mask[row]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let tokens = batch.input_ids[row][..real].to_vec();
        let predicting = logits.get(row)?.narrow(0, 0, real.saturating_sub(1))?;
        let log_probs = log_softmax_last_dim(&predicting.to_dtype(DType::F32)?)?;
        let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
        let logprobs = log_probs
            .gather(&targets, 1)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        samples.push(EvalSample {
            predicted: predicted[..real.saturating_sub(1)].to_vec(),
            tokens,
            logprobs,
        });
    }
    Ok(samples)
}

/// Loss, perplexity and next-token accuracy over `blocks`, without dropout;
/// custom metrics from `sink` come back in `extra`. `on_batch(done, total)`
/// follows the batches, for progress displays.
pub fn evaluate<'s>(
    model: &Bloom,
    blocks: &Blocks,
    batch_size: usize,
    sink: Option<&mut (dyn MetricSink + 's)>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalMetrics> {
    evaluate_across(&Single, model, blocks, batch_size, sink, on_batch)
}

/// [`evaluate`] shared by the ranks of `collective`: each evaluates a
/// contiguous part of the blocks and the sums are added up, so every rank
/// gets the metrics of all blocks. Metric plugins need every sample in one
/// place: with a `sink`, rank 0 evaluates all blocks and the others wait.
pub fn evaluate_across<'s>(
    collective: &dyn Collective,
    model: &Bloom,
    blocks: &Blocks,
    batch_size: usize,
    mut sink: Option<&mut (dyn MetricSink + 's)>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalMetrics> {
    model.set_dropout(None);
    let (rank, world) = (collective.rank(), collective.world_size());
    let mine = match sink {
        Some(_) if rank == 0 => 0..blocks.len(),
        Some(_) => 0..0,
        None => rank * blocks.len() / world..(rank + 1) * blocks.len() / world,
    };
    let (mut loss_sum, mut tokens, mut correct) = (0f64, 0usize, 0usize);
    let rows: Vec<usize> = mine.collect();
    let batches = rows.chunks(batch_size.max(1));
    let total = batches.len();
    for (done, chunk) in batches.enumerate() {
        let batch = MicroBatch::from_rows(blocks, chunk);
        let logits = model.forward(&batch.input_ids, &batch.attention_mask)?;
        let (sum, count) = next_token_loss_sum(&logits, &batch.labels)?;
        loss_sum += sum.to_scalar::<f32>()? as f64;
        tokens += count;
        let predictions = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
        for (row, labels) in predictions.iter().zip(&batch.labels) {
            correct += (1..labels.len())
                .filter(|&t| labels[t] >= 0 && row[t - 1] as i64 == labels[t])
                .count();
        }
        if let Some(sink) = sink.as_deref_mut() {
            sink.add(&samples(&logits, &predictions, &batch)?)?;
        }
        on_batch(done + 1, total);
    }
    if collective.communicates() {
        let sums = collective
            .all_reduce_sum(&Tensor::new(
                &[loss_sum, tokens as f64, correct as f64],
                &Device::Cpu,
            )?)?
            .to_vec1::<f64>()?;
        (loss_sum, tokens, correct) = (sums[0], sums[1] as usize, sums[2] as usize);
    }
    if tokens == 0 {
        bail!("the evaluation set has no tokens to predict (is it empty? check data_report.json)");
    }
    let extra = match sink {
        Some(sink) if rank == 0 => sink.finish()?,
        _ => Vec::new(),
    };
    let eval_loss = loss_sum / tokens as f64;
    Ok(EvalMetrics {
        eval_loss,
        perplexity: eval_loss.exp(),
        accuracy: correct as f64 / tokens as f64,
        eval_tokens: tokens,
        samples: blocks.len(),
        extra,
    })
}

/// `trainer_state.json` as transformers writes it: exactly the keys of HF's
/// `TrainerState`, so that `TrainerState.load_from_json` (which takes no
/// others) reads it. What pt-host adds rides in `stateful_callbacks` as a
/// callback's state, which HF keeps and does not act on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub epoch: f64,
    pub global_step: usize,
    pub max_steps: usize,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub train_batch_size: usize,
    pub num_train_epochs: f64,
    #[serde(default)]
    pub num_input_tokens_seen: u64,
    /// HF's estimate: 6 × tokens × non-embedding parameters.
    #[serde(default)]
    pub total_flos: f64,
    pub log_history: Vec<Value>,
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_global_step: Option<usize>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    #[serde(default = "yes")]
    pub is_local_process_zero: bool,
    #[serde(default = "yes")]
    pub is_world_process_zero: bool,
    #[serde(default)]
    pub is_hyper_param_search: bool,
    #[serde(default)]
    pub trial_name: Option<String>,
    #[serde(default)]
    pub trial_params: Option<Value>,
    #[serde(default)]
    pub stateful_callbacks: StatefulCallbacks,
}

fn yes() -> bool {
    true
}

impl Default for TrainerState {
    fn default() -> Self {
        Self {
            epoch: 0.0,
            global_step: 0,
            max_steps: 0,
            logging_steps: 0,
            eval_steps: 0,
            save_steps: 0,
            train_batch_size: 0,
            num_train_epochs: 0.0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: StatefulCallbacks::default(),
        }
    }
}

/// HF's `stateful_callbacks`: callback name → `{"args", "attributes"}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatefulCallbacks {
    #[serde(rename = "PtHost", default)]
    pub pt_host: PtHostCallback,
    /// Other callbacks' states (an HF checkpoint's), kept as they were.
    #[serde(flatten)]
    pub others: serde_json::Map<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PtHostCallback {
    #[serde(default)]
    pub args: serde_json::Map<String, Value>,
    #[serde(default)]
    pub attributes: RunShape,
}

/// What a resume must keep to continue the data order and the schedule.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunShape {
    /// Training blocks the run was planned for; a resume with other data is refused.
    #[serde(default)]
    pub train_blocks: usize,
    /// Ranks that trained it (1: one process; 0: not recorded). A resume
    /// keeps `world_size × train_batch_size` and the accumulation steps.
    #[serde(default)]
    pub world_size: usize,
    #[serde(default)]
    pub gradient_accumulation_steps: usize,
}

impl TrainerState {
    /// Reads `trainer_state.json`, including pt-host's earlier layout that
    /// kept the run shape at the top level.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        let mut value: Value = serde_json::from_slice(bytes)?;
        if let Some(object) = value.as_object_mut()
            && object.contains_key("train_blocks")
        {
            let mut shape = serde_json::Map::new();
            for key in ["train_blocks", "world_size", "gradient_accumulation_steps"] {
                if let Some(v) = object.remove(key) {
                    shape.insert(key.into(), v);
                }
            }
            object.insert(
                "stateful_callbacks".into(),
                json!({ "PtHost": { "args": {}, "attributes": shape } }),
            );
        }
        serde_json::from_value(value)
    }

    pub fn shape(&self) -> &RunShape {
        &self.stateful_callbacks.pt_host.attributes
    }
}

/// What trains, and how its weights are saved.
pub enum Trainable {
    /// A LoRA adapter, saved in PEFT's format.
    Adapter(AdapterConfig),
    /// Every weight, saved as an HF model directory; `source` is the model
    /// directory whose config and tokenizer files are copied alongside.
    Full { source: PathBuf },
}

impl Trainable {
    fn weights_file(&self) -> &'static str {
        match self {
            Trainable::Adapter(_) => "adapter_model.safetensors",
            Trainable::Full { .. } => "model.safetensors",
        }
    }
}

/// HF's weight-decay groups: everything but biases and LayerNorm parameters.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("layernorm") || name.contains("ln_f"))
}

pub struct Trainer<'a> {
    pub args: TrainingArguments,
    pub model: &'a mut Bloom,
    trainable: Trainable,
    base_model: String,
    /// The trained variables by checkpoint name.
    named: Vec<(String, Var)>,
    optimizer: AdamW,
    pub state: TrainerState,
    /// The other ranks of a data-parallel job ([`Single`] alone).
    collective: &'a dyn Collective,
    /// HF's `floating_point_ops` per token: 6 × non-embedding parameters.
    flops_per_token: f64,
}

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

impl<'a> Trainer<'a> {
    /// A trainer of the model's LoRA variables, or of every weight.
    pub fn new(
        args: TrainingArguments,
        model: &'a mut Bloom,
        trainable: Trainable,
        base_model: String,
    ) -> Result<Self> {
        let named = match &trainable {
            Trainable::Adapter(_) => model.lora_variables(),
            Trainable::Full { .. } => model.make_base_trainable()?,
        };
        let groups = named
            .iter()
            .map(|(name, v)| (v.clone(), decays(name)))
            .collect();
        let optimizer = AdamW::new(groups, args.adamw)?;
        let base: usize = model
            .base_tensors_mut()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let adapter: usize = model
            .lora_variables()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let parameters = base + adapter;
        let embedding = model.config.vocab_size * model.config.hidden_size;
        let flops_per_token = 6.0 * parameters.saturating_sub(embedding) as f64;
        Ok(Self {
            args,
            model,
            trainable,
            base_model,
            named,
            optimizer,
            state: TrainerState::default(),
            collective: &Single,
            flops_per_token,
        })
    }

    /// Trains as one rank of `collective`'s job: each rank computes its
    /// share of every micro-batch of `world_size × per_device_train_batch_size`
    /// blocks, gradients are summed across ranks before every optimizer
    /// step, and only rank 0 writes checkpoints and outputs.
    pub fn across(mut self, collective: &'a dyn Collective) -> Self {
        self.collective = collective;
        self
    }

    /// Blocks per micro-batch over all ranks.
    fn global_batch_size(&self) -> usize {
        self.args.per_device_train_batch_size * self.collective.world_size()
    }

    /// The adapter or the full model, into `dir`.
    fn save_weights(&mut self, dir: &Path) -> Result<()> {
        match &self.trainable {
            Trainable::Adapter(config) => self.model.save_adapter(dir, config, &self.base_model),
            Trainable::Full { source } => {
                let dtype = self.model.dtype();
                self.model.save_model(dir, source, dtype)
            }
        }
    }

    fn steps_per_epoch(&self, train_blocks: usize) -> usize {
        let micro_batches = train_blocks.div_ceil(self.global_batch_size());
        micro_batches
            .div_ceil(self.args.gradient_accumulation_steps)
            .max(1)
    }

    /// Block order of `epoch`: seeded per epoch, so resuming needs only the step.
    fn epoch_order(&self, epoch: usize, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.args.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.args.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
            ));
        }
        order
    }

    /// Trains on `train`, evaluating on `eval` per the strategy. Starts from
    /// the state loaded by [`Trainer::resume`], if any.
    pub fn train(
        &mut self,
        train: &Blocks,
        eval: Option<&Blocks>,
        mut metrics: Option<&mut dyn MetricSink>,
        callback: &mut dyn TrainerCallback,
    ) -> Result<Value> {
        if train.is_empty() {
            bail!(
                "no training blocks: the corpus is smaller than one block (lower --block_size or add data)"
            );
        }
        let a = self.args.clone();
        let (steps_per_epoch, max_steps) = self.plan(train, eval)?;
        let (world, rank) = (self.collective.world_size(), self.collective.rank());
        let schedule = Schedule {
            kind: a.lr_scheduler_type,
            peak_lr: a.learning_rate,
            warmup_steps: Schedule::warmup(a.warmup_steps, a.warmup_ratio, max_steps),
            total_steps: max_steps,
        };
        let global_batch = self.global_batch_size();
        let micro_per_epoch = train.len().div_ceil(global_batch);
        // This rank's rows of every micro-batch.
        let share = |rows: usize| {
            let start = (rank * a.per_device_train_batch_size).min(rows);
            start..(start + a.per_device_train_batch_size).min(rows)
        };
        let started = Instant::now();
        let first_step = self.state.global_step;
        // HF's `train_loss`: the mean step loss of this run.
        let mut run_loss = 0f64;
        let (mut logged_loss, mut logged_steps, mut logged_tokens) = (0f64, 0usize, 0usize);
        // Blocks trained by this run, over all ranks (HF's samples).
        let mut samples = 0usize;
        // Time the loop spends assembling batches: the blocks are prepared
        // and in memory, so this is all it ever waits for data.
        let mut data_seconds = 0f64;
        // Time spent summing gradients across ranks (waiting for the slowest included).
        let mut allreduce_seconds = 0f64;

        if let (true, 0, Some(eval)) = (a.eval_on_start, first_step, eval) {
            self.evaluate_and_record(eval, metrics.as_deref_mut(), callback)?;
        }
        let variables: Vec<Var> = self.named.iter().map(|(_, v)| v.clone()).collect();
        // The block order of the epoch in progress, computed once per epoch.
        let mut epoch_order: (Option<usize>, Vec<usize>) = (None, Vec::new());
        for step in self.state.global_step..max_steps {
            // This step's micro-batches: a slice of its epoch's order.
            let epoch = step / steps_per_epoch;
            let in_epoch = step % steps_per_epoch;
            if epoch_order.0 != Some(epoch) {
                epoch_order = (Some(epoch), self.epoch_order(epoch, train.len()));
            }
            let order = &epoch_order.1;
            let assembling = Instant::now();
            let first = in_epoch * a.gradient_accumulation_steps;
            let last = (first + a.gradient_accumulation_steps).min(micro_per_epoch);
            let micro_batches: Vec<MicroBatch> = (first..last)
                .map(|m| {
                    let rows = &order[m * global_batch..((m + 1) * global_batch).min(order.len())];
                    // The job's throughput: every rank's tokens.
                    logged_tokens += rows.len() * train.block_size;
                    samples += rows.len();
                    let tokens = (rows.len() * train.block_size) as u64;
                    self.state.num_input_tokens_seen += tokens;
                    self.state.total_flos += self.flops_per_token * tokens as f64;
                    MicroBatch::share_of(train, rows, share(rows.len()))
                })
                .collect();
            data_seconds += assembling.elapsed().as_secs_f64();

            let dropout_seed = a
                .seed
                .wrapping_add(step as u64)
                .wrapping_mul(0x2545_F491_4F6C_DD1D);
            let (loss, grads) =
                accumulate_gradients(self.model, &variables, &micro_batches, Some(dropout_seed))?;
            let summing = Instant::now();
            let (loss, grads) = self.sum_over_ranks(loss, grads)?;
            allreduce_seconds += summing.elapsed().as_secs_f64();
            if !loss.is_finite() {
                bail!(
                    "loss is {loss} at step {}: stopping (the last checkpoint is intact); lower --learning_rate",
                    step + 1
                );
            }
            let grad_norm = grad_norm(&grads)?;
            let clip = clip_scale(grad_norm, a.max_grad_norm);
            self.optimizer.apply(&grads, schedule.lr(step), clip)?;
            self.state.global_step = step + 1;
            self.state.epoch = self.state.global_step as f64 / steps_per_epoch as f64;
            logged_loss += loss;
            logged_steps += 1;
            run_loss += loss;
            let tokens_per_second =
                logged_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            callback.on_step(&StepProgress {
                step: self.state.global_step,
                max_steps,
                loss,
                learning_rate: schedule.lr(step),
                tokens_per_second,
            });

            let done = step + 1 == max_steps;
            let end_of_epoch = (step + 1) % steps_per_epoch == 0;
            // HF logs and evaluates at the last step of an epoch-wise run
            // even when it ends mid-epoch, but saves at whole epochs only.
            let log_now = a
                .logging_strategy
                .due(step + 1, a.logging_steps, end_of_epoch || done)
                || (a.logging_first_step && step == 0);
            if log_now {
                let entry = json!({
                    "loss": logged_loss / logged_steps as f64,
                    "grad_norm": grad_norm,
                    "learning_rate": schedule.lr(step),
                    "epoch": self.state.epoch,
                    "step": self.state.global_step,
                    "tokens_per_second": tokens_per_second,
                });
                self.record(entry, callback);
                (logged_loss, logged_steps) = (0.0, 0);
            }
            let eval_now = a
                .eval_strategy
                .due(step + 1, a.eval_steps, end_of_epoch || done);
            if let (true, Some(eval)) = (eval_now, eval) {
                self.evaluate_and_record(eval, metrics.as_deref_mut(), callback)?;
            }
            let save_now = a.save_strategy.due(step + 1, a.save_steps, end_of_epoch);
            if save_now {
                let path = self.save_checkpoint()?;
                callback.on_save(&path);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let summary = json!({
            "train_runtime": seconds,
            "train_samples_per_second": samples as f64 / seconds.max(1e-9),
            "train_steps_per_second": (max_steps - first_step) as f64 / seconds.max(1e-9),
            "total_flos": self.state.total_flos,
            "epoch": self.state.epoch,
            "step": self.state.global_step,
            "train_loss": run_loss / (max_steps - first_step).max(1) as f64,
            "train_data_seconds": data_seconds,
            "train_allreduce_seconds": allreduce_seconds,
            "world_size": world,
        });
        Ok(summary)
    }

    /// Before the first step: the run's length (steps per epoch, steps in
    /// all), agreed on by every rank and consistent with a resumed
    /// checkpoint, recorded in the trainer state.
    fn plan(&mut self, train: &Blocks, eval: Option<&Blocks>) -> Result<(usize, usize)> {
        let a = &self.args;
        let steps_per_epoch = self.steps_per_epoch(train.len());
        let max_steps = if a.max_steps > 0 {
            a.max_steps
        } else {
            (a.num_train_epochs * steps_per_epoch as f64)
                .ceil()
                .max(1.0) as usize
        };
        let world = self.collective.world_size();
        if world > 1 {
            // Ranks that planned different work would pair unrelated
            // collectives: compare the plan before the first step.
            for (what, value) in [
                ("the number of training blocks", train.len()),
                (
                    "the number of validation blocks",
                    eval.map_or(0, Blocks::len),
                ),
                ("the number of steps", max_steps),
                ("the step to resume from", self.state.global_step),
            ] {
                self.collective.check_agreement(what, value as u64)?;
            }
        }
        if self.state.global_step > 0 {
            self.check_resumable(train.len())?;
        }
        self.state.max_steps = max_steps;
        self.state.num_train_epochs = a.num_train_epochs;
        self.state.logging_steps = a.logging_steps;
        self.state.eval_steps = a.eval_steps;
        self.state.save_steps = a.save_steps;
        self.state.train_batch_size = a.per_device_train_batch_size;
        self.state.is_world_process_zero = self.collective.is_main();
        self.state.stateful_callbacks.pt_host.attributes = RunShape {
            train_blocks: train.len(),
            world_size: world,
            gradient_accumulation_steps: a.gradient_accumulation_steps,
        };
        Ok((steps_per_epoch, max_steps))
    }

    /// The step's loss and gradients summed over the ranks (unchanged alone):
    /// one all-reduce of every gradient and the loss, packed flat.
    fn sum_over_ranks(&self, loss: f64, grads: Vec<Tensor>) -> Result<(f64, Vec<Tensor>)> {
        if !self.collective.communicates() {
            return Ok((loss, grads));
        }
        let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
        let mut parts = grads
            .iter()
            .map(|g| g.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        parts.push(Tensor::new(&[loss as f32], &device)?);
        let sum = self.collective.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
        let mut offset = 0;
        let mut summed = Vec::with_capacity(grads.len());
        for grad in &grads {
            let n = grad.elem_count();
            summed.push(
                sum.narrow(0, offset, n)?
                    .reshape(grad.shape())?
                    .to_dtype(grad.dtype())?,
            );
            offset += n;
        }
        let loss = sum.narrow(0, offset, 1)?.to_vec1::<f32>()?[0] as f64;
        Ok((loss, summed))
    }

    /// A resumed run must continue the checkpoint's data order and
    /// schedule: the same blocks, blocks per micro-batch over all ranks,
    /// and accumulation steps. Another world size is fine when
    /// `ranks × per_device_train_batch_size` stays the same.
    fn check_resumable(&self, train_blocks: usize) -> Result<()> {
        let (state, shape) = (&self.state, self.state.shape());
        if shape.train_blocks != train_blocks {
            bail!(
                "the checkpoint was trained on {} blocks, this run has {train_blocks}: resume with the same data and --block_size",
                shape.train_blocks,
            );
        }
        let (world, batch) = (
            self.collective.world_size(),
            self.args.per_device_train_batch_size,
        );
        let saved_world = shape.world_size.max(1);
        let saved_batch = saved_world * state.train_batch_size;
        if saved_batch != world * batch {
            bail!(
                "the checkpoint was trained by {saved_world} rank(s) × {} blocks per micro-batch, this run has \
                 {world} × {batch}: the data order and the schedule would not continue. Resume with ranks × \
                 --per_device_train_batch_size = {saved_batch} (e.g. {saved_world} × {})",
                state.train_batch_size,
                state.train_batch_size,
            );
        }
        let accumulation = shape.gradient_accumulation_steps;
        if accumulation != 0 && accumulation != self.args.gradient_accumulation_steps {
            bail!(
                "the checkpoint was trained with --gradient_accumulation_steps {accumulation}, this run has {}: resume with {accumulation}",
                self.args.gradient_accumulation_steps
            );
        }
        Ok(())
    }

    /// Evaluates on `eval` and logs the result at the current step.
    fn evaluate_and_record<'s>(
        &mut self,
        eval: &Blocks,
        metrics: Option<&mut (dyn MetricSink + 's)>,
        callback: &mut dyn TrainerCallback,
    ) -> Result<()> {
        let results = evaluate_across(
            self.collective,
            self.model,
            eval,
            self.args.per_device_eval_batch_size,
            metrics,
            &mut |done, total| callback.on_eval_batch(done, total),
        )?;
        let entry = eval_results(&results, self.state.epoch, Some(self.state.global_step));
        self.record(entry, callback);
        Ok(())
    }

    fn record(&mut self, entry: Value, callback: &mut dyn TrainerCallback) {
        callback.on_log(&entry);
        self.state.log_history.push(entry);
    }

    /// Writes `checkpoint-N/` (adapter, optimizer state, trainer state) into a
    /// staging directory and renames it into place: never half-written. Then
    /// deletes the oldest checkpoints beyond `save_total_limit`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = &self.args.output_dir.clone();
        let name = format!("checkpoint-{}", self.state.global_step);
        // Every rank holds the same weights and optimizer state: rank 0 writes them.
        if !self.collective.is_main() {
            return Ok(out.join(name));
        }
        fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
        let staging = out.join(format!(".{name}.partial"));
        let target = out.join(&name);
        let written = self.write_checkpoint(&staging, &target);
        if let Err(error) = written {
            // The earlier checkpoints are untouched; a resume picks the last one.
            fs::remove_dir_all(&staging).ok();
            return Err(error.context(format!(
                "{}: cannot write the checkpoint (the earlier checkpoints are intact; --resume_from_checkpoint true continues from the last)",
                target.display()
            )));
        }
        if let Some(limit) = self.args.save_total_limit {
            let mut checkpoints = list_checkpoints(out)?;
            while checkpoints.len() > limit.max(1) {
                let (_, oldest) = checkpoints.remove(0);
                fs::remove_dir_all(&oldest)
                    .with_context(|| format!("{}: cannot delete", oldest.display()))?;
            }
        }
        Ok(target)
    }

    /// The checkpoint's files into `staging`, then `staging` renamed to `target`.
    fn write_checkpoint(&mut self, staging: &Path, target: &Path) -> Result<()> {
        if staging.exists() {
            fs::remove_dir_all(staging)?;
        }
        self.save_weights(staging)?;
        self.optimizer.save(&staging.join(OPTIMIZER))?;
        let state = staging.join(STATE);
        fs::write(&state, serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("{}: cannot write", state.display()))?;
        pt_fs::sync_directory(staging)?;
        if target.exists() {
            fs::remove_dir_all(target)?;
        }
        fs::rename(staging, target)?;
        pt_fs::sync_directory(target.parent().unwrap_or(Path::new(".")))
    }

    /// Restores weights, optimizer and trainer state from `checkpoint-N/`.
    pub fn resume(&mut self, checkpoint: &Path) -> Result<()> {
        let state_path = checkpoint.join(STATE);
        let state =
            TrainerState::from_json(&fs::read(&state_path).with_context(|| {
                format!("{}: not a checkpoint (no {STATE})", checkpoint.display())
            })?)
            .with_context(|| format!("{}: corrupt trainer state", state_path.display()))?;
        let file = checkpoint.join(self.trainable.weights_file());
        let weights = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("{}: corrupt or missing weights", file.display()))?;
        for (name, variable) in &self.named {
            let tensor = weights
                .get(name)
                .with_context(|| format!("{}: no `{name}`", file.display()))?;
            variable.set(
                &tensor
                    .to_device(variable.device())?
                    .to_dtype(variable.dtype())?,
            )?;
        }
        self.optimizer.load(&checkpoint.join(OPTIMIZER))?;
        self.state = state;
        Ok(())
    }

    /// The final outputs: the adapter or model in `output_dir`, tokenizer
    /// files and `trainer_state.json`. Written into a staging directory, then
    /// each file renamed into place: a reader never sees a half-written file.
    pub fn save_final(&mut self) -> Result<()> {
        if !self.collective.is_main() {
            return Ok(());
        }
        let dir = self.args.output_dir.clone();
        let staging = dir.join(".final.partial");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        self.save_weights(&staging)?;
        pt_model::hf_dir::copy_tokenizer_files(Path::new(&self.base_model), &staging)?;
        fs::write(staging.join(STATE), serde_json::to_vec_pretty(&self.state)?)?;
        pt_fs::sync_directory(&staging)?;
        for entry in fs::read_dir(&staging)? {
            let path = entry?.path();
            let target = dir.join(path.file_name().expect("a file name"));
            fs::rename(&path, &target)
                .with_context(|| format!("{}: cannot write", target.display()))?;
        }
        fs::remove_dir(&staging)?;
        pt_fs::sync_directory(&dir)
    }
}

/// `checkpoint-N` directories of `dir`, oldest (smallest N) first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    if !dir.is_dir() {
        return Ok(found);
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `name` into `dir` as pretty JSON (HF's `*_results.json`).
pub fn write_results(dir: &Path, name: &str, value: &Value) -> Result<()> {
    fs::create_dir_all(dir)?;
    pt_fs::write_atomically(&dir.join(name), &serde_json::to_vec_pretty(value)?)
}

/// Evaluation results as HF names them (`eval_loss`, …; custom metrics as
/// `eval_NAME`), for the log history and `eval_results.json`.
pub fn eval_results(metrics: &EvalMetrics, epoch: f64, step: Option<usize>) -> Value {
    let mut results = json!({
        "eval_loss": metrics.eval_loss,
        "perplexity": metrics.perplexity,
        "eval_accuracy": metrics.accuracy,
        "eval_tokens": metrics.eval_tokens,
        "eval_samples": metrics.samples,
        "epoch": epoch,
    });
    for (name, value) in &metrics.extra {
        results[format!("eval_{name}")] = json!(value);
    }
    if let Some(step) = step {
        results["step"] = json!(step);
    }
    results
}
