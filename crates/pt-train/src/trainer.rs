//! The training loop, readable top to bottom: HF Trainer semantics for steps,
//! accumulation, clipping, schedules, logging, evaluation and checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use pt_data::Blocks;
use pt_dist::{Collective, Single};
use pt_model::{AdapterConfig, Model};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::evaluate::{MetricSink, eval_results, evaluate_across};
use crate::optim::parameters;
use crate::state::{RunShape, TrainerState};
use crate::step::{MicroBatch, accumulate_gradients};
use crate::{AdamW, AdamWConfig, Schedule, SchedulerType, TrainError, clip_scale, grad_norm};

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
    /// LoRA+ (LLaMA-Factory's `loraplus_lr_ratio`): B matrices and 1-D
    /// adapter weights (DoRA's magnitudes) learn this many times faster.
    pub loraplus_lr_ratio: Option<f64>,
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

/// What trains, and how its weights are saved.
pub enum Trainable {
    /// A LoRA adapter, saved in PEFT's format.
    Adapter(AdapterConfig),
    /// Every weight, saved as an HF model directory; `source` is the model
    /// directory whose config and tokenizer files are copied alongside.
    Full { source: PathBuf },
}

impl Trainable {
    pub(crate) fn weights_file(&self) -> &'static str {
        match self {
            Trainable::Adapter(_) => "adapter_model.safetensors",
            Trainable::Full { .. } => "model.safetensors",
        }
    }
}

/// What the loop counts over a run.
#[derive(Default)]
struct Tally {
    /// HF's `train_loss` is this run's mean step loss.
    run_loss: f64,
    /// Loss sum and steps since the last log entry.
    logged_loss: f64,
    logged_steps: usize,
    /// Tokens and blocks (HF's samples) trained by this run, over all ranks:
    /// the job's throughput.
    tokens: usize,
    samples: usize,
    /// Time spent assembling batches: the blocks are prepared and in memory,
    /// so this is all the loop ever waits for data.
    data_seconds: f64,
    /// Time spent summing gradients across ranks (waiting for the slowest included).
    allreduce_seconds: f64,
}

impl Tally {
    fn add_loss(&mut self, loss: f64) {
        self.run_loss += loss;
        self.logged_loss += loss;
        self.logged_steps += 1;
    }

    /// The mean loss since the last log entry; the next one starts afresh.
    fn take_logged_loss(&mut self) -> f64 {
        let mean = self.logged_loss / self.logged_steps as f64;
        (self.logged_loss, self.logged_steps) = (0.0, 0);
        mean
    }
}

pub struct Trainer<'a> {
    pub args: TrainingArguments,
    pub model: &'a mut Model,
    pub(crate) trainable: Trainable,
    pub(crate) base_model: String,
    /// Where the tokenizer files saved with the weights come from.
    pub(crate) tokenizer_dir: PathBuf,
    /// The trained variables by checkpoint name.
    pub(crate) named: Vec<(String, Var)>,
    pub(crate) optimizer: AdamW,
    pub state: TrainerState,
    /// The other ranks of a data-parallel job ([`Single`] alone).
    pub(crate) collective: &'a dyn Collective,
    /// HF's `floating_point_ops` per token: 6 × non-embedding parameters.
    flops_per_token: f64,
}

impl<'a> Trainer<'a> {
    /// A trainer of the model's LoRA variables, or of every weight.
    pub fn new(
        args: TrainingArguments,
        model: &'a mut Model,
        trainable: Trainable,
        base_model: String,
        tokenizer_dir: PathBuf,
    ) -> Result<Self> {
        let named = match &trainable {
            Trainable::Adapter(_) => model.adapter_variables(),
            Trainable::Full { .. } => model.make_base_trainable()?,
        };
        let optimizer = AdamW::new(parameters(&named, args.loraplus_lr_ratio), args.adamw)?;
        let (base, adapter) = model.parameter_counts();
        let parameters = base + adapter;
        let embedding = model.config().embedding_parameters();
        let flops_per_token = 6.0 * parameters.saturating_sub(embedding) as f64;
        Ok(Self {
            args,
            model,
            trainable,
            base_model,
            tokenizer_dir,
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
            return Err(TrainError::NoTrainingBlocks.into());
        }
        let a = self.args.clone();
        let (steps_per_epoch, max_steps) = self.plan(train, eval)?;
        let schedule = Schedule {
            kind: a.lr_scheduler_type,
            peak_lr: a.learning_rate,
            warmup_steps: Schedule::warmup(a.warmup_steps, a.warmup_ratio, max_steps),
            total_steps: max_steps,
        };
        let started = Instant::now();
        let first_step = self.state.global_step;
        let mut tally = Tally::default();
        if let (true, 0, Some(eval)) = (a.eval_on_start, first_step, eval) {
            self.evaluate_and_record(eval, metrics.as_deref_mut(), callback)?;
        }
        let variables: Vec<Var> = self.named.iter().map(|(_, v)| v.clone()).collect();
        // The block order of the epoch in progress, computed once per epoch.
        let mut epoch_order: (Option<usize>, Vec<usize>) = (None, Vec::new());
        for step in first_step..max_steps {
            let epoch = step / steps_per_epoch;
            if epoch_order.0 != Some(epoch) {
                epoch_order = (Some(epoch), self.epoch_order(epoch, train.len()));
            }
            let assembling = Instant::now();
            let micro_batches =
                self.micro_batches(train, &epoch_order.1, step % steps_per_epoch, &mut tally);
            tally.data_seconds += assembling.elapsed().as_secs_f64();

            let dropout_seed = a
                .seed
                .wrapping_add(step as u64)
                .wrapping_mul(0x2545_F491_4F6C_DD1D);
            let (loss, grads) =
                accumulate_gradients(self.model, &variables, &micro_batches, Some(dropout_seed))?;
            let summing = Instant::now();
            let (loss, grads) = self.sum_over_ranks(loss, grads)?;
            tally.allreduce_seconds += summing.elapsed().as_secs_f64();
            if !loss.is_finite() {
                return Err(TrainError::LossNotFinite {
                    loss,
                    step: step + 1,
                }
                .into());
            }
            let grad_norm = grad_norm(&grads)?;
            let clip = clip_scale(grad_norm, a.max_grad_norm);
            self.optimizer.apply(&grads, schedule.lr(step), clip)?;
            self.state.global_step = step + 1;
            self.state.epoch = self.state.global_step as f64 / steps_per_epoch as f64;
            tally.add_loss(loss);
            let tokens_per_second = tally.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
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
                    "loss": tally.take_logged_loss(),
                    "grad_norm": grad_norm,
                    "learning_rate": schedule.lr(step),
                    "epoch": self.state.epoch,
                    "step": self.state.global_step,
                    "tokens_per_second": tokens_per_second,
                });
                self.record(entry, callback);
            }
            let eval_now = a
                .eval_strategy
                .due(step + 1, a.eval_steps, end_of_epoch || done);
            if let (true, Some(eval)) = (eval_now, eval) {
                self.evaluate_and_record(eval, metrics.as_deref_mut(), callback)?;
            }
            if a.save_strategy.due(step + 1, a.save_steps, end_of_epoch) {
                let path = self.save_checkpoint()?;
                callback.on_save(&path);
            }
        }
        Ok(self.summary(&tally, started, max_steps - first_step))
    }

    /// The micro-batches of the step at `in_epoch` within its epoch's block
    /// `order`: this rank's rows of each, counted into `tally`.
    fn micro_batches(
        &mut self,
        train: &Blocks,
        order: &[usize],
        in_epoch: usize,
        tally: &mut Tally,
    ) -> Vec<MicroBatch> {
        let (rank, per_rank) = (
            self.collective.rank(),
            self.args.per_device_train_batch_size,
        );
        let global_batch = self.global_batch_size();
        let micro_per_epoch = train.len().div_ceil(global_batch);
        let accumulation = self.args.gradient_accumulation_steps;
        let first = in_epoch * accumulation;
        let last = (first + accumulation).min(micro_per_epoch);
        (first..last)
            .map(|m| {
                let rows = &order[m * global_batch..((m + 1) * global_batch).min(order.len())];
                let tokens = rows.len() * train.block_size();
                tally.tokens += tokens;
                tally.samples += rows.len();
                self.state.num_input_tokens_seen += tokens as u64;
                self.state.total_flos += self.flops_per_token * tokens as f64;
                let start = (rank * per_rank).min(rows.len());
                let share = start..(start + per_rank).min(rows.len());
                MicroBatch::share_of(train, rows, share)
            })
            .collect()
    }

    /// HF's `train_results.json` values, and pt-host's timings.
    fn summary(&self, tally: &Tally, started: Instant, steps: usize) -> Value {
        let seconds = started.elapsed().as_secs_f64();
        json!({
            "train_runtime": seconds,
            "train_samples_per_second": tally.samples as f64 / seconds.max(1e-9),
            "train_steps_per_second": steps as f64 / seconds.max(1e-9),
            "total_flos": self.state.total_flos,
            "epoch": self.state.epoch,
            "step": self.state.global_step,
            "train_loss": tally.run_loss / steps.max(1) as f64,
            "train_data_seconds": tally.data_seconds,
            "train_allreduce_seconds": tally.allreduce_seconds,
            "world_size": self.collective.world_size(),
        })
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
}
