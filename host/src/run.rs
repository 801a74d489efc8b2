//! `pt-host run`: prepare the data, then train a LoRA adapter and/or evaluate,
//! with the flags of MedicalGPT's `pretraining.py` and HF `TrainingArguments`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use pt_data::Tokenizer;
use pt_dist::{Backend, Collective, Launch};
use pt_model::{AdapterConfig, Bloom, LORA_TARGETS};
use pt_plugin_host::{Kind, LoadedPlugin, MetricSession, Sample};
use pt_train::evaluate::{EvalSample, MetricSink, eval_results, evaluate_across};
use pt_train::trainer::{
    Interval, StepProgress, Trainable, Trainer, TrainerCallback, TrainingArguments,
};
use pt_train::{AdamWConfig, SchedulerType};
use pt_train::{list_checkpoints, write_results};
use serde_json::{Value, json};

use crate::args::parse_bool;
use crate::device::{self, DeviceArg, DtypeArg};
use crate::prepare::{PrepareArgs, PreparedData, prepare_data};
use crate::progress::TrainProgress;
use crate::tensorboard::{self, EventWriter};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum SchedulerArg {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IntervalArg {
    No,
    Steps,
    Epoch,
}

impl From<IntervalArg> for Interval {
    fn from(value: IntervalArg) -> Self {
        match value {
            IntervalArg::No => Interval::No,
            IntervalArg::Steps => Interval::Steps,
            IntervalArg::Epoch => Interval::Epoch,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub data: PrepareArgs,
    /// Train (HF `do_train`).
    #[arg(long = "do_train", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub do_train: bool,
    /// Evaluate on the validation blocks (HF `do_eval`); alone, an eval-only run.
    #[arg(long = "do_eval", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub do_eval: bool,
    /// Train a LoRA adapter (true) or every weight of the model (false).
    #[arg(long = "use_peft", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub use_peft: bool,
    /// `all` or a comma-separated list of query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
    #[arg(long = "target_modules", default_value = "all")]
    pub target_modules: String,
    #[arg(long = "lora_rank", default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long = "lora_alpha", default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long = "lora_dropout", default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Continue from this PEFT adapter directory instead of a fresh adapter.
    #[arg(long = "peft_path", value_name = "DIR")]
    pub peft_path: Option<PathBuf>,
    #[arg(long = "per_device_train_batch_size", default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long = "per_device_eval_batch_size", default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long = "gradient_accumulation_steps", default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long = "learning_rate", default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long = "weight_decay", default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long = "adam_beta1", default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long = "adam_beta2", default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long = "adam_epsilon", default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long = "max_grad_norm", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// May be fractional (0.5 = half an epoch).
    #[arg(long = "num_train_epochs", default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// > 0: train exactly this many optimizer steps, overriding --num_train_epochs.
    #[arg(long = "max_steps", default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long = "lr_scheduler_type", value_enum, default_value = "linear")]
    pub lr_scheduler_type: SchedulerArg,
    #[arg(long = "warmup_ratio", default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long = "warmup_steps", default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long = "logging_strategy", value_enum, default_value = "steps")]
    pub logging_strategy: IntervalArg,
    #[arg(long = "logging_steps", default_value_t = 500)]
    pub logging_steps: usize,
    #[arg(long = "logging_first_step", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub logging_first_step: bool,
    /// When to evaluate during training (alias --evaluation_strategy).
    #[arg(
        long = "eval_strategy",
        alias = "evaluation_strategy",
        value_enum,
        default_value = "no"
    )]
    pub eval_strategy: IntervalArg,
    /// Defaults to --logging_steps, as in HF.
    #[arg(long = "eval_steps")]
    pub eval_steps: Option<usize>,
    #[arg(long = "save_strategy", value_enum, default_value = "steps")]
    pub save_strategy: IntervalArg,
    #[arg(long = "save_steps", default_value_t = 500)]
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the oldest are deleted).
    #[arg(long = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    /// A checkpoint directory, or `true` for the latest checkpoint-N in --output_dir.
    #[arg(long = "resume_from_checkpoint", value_name = "PATH|true")]
    pub resume_from_checkpoint: Option<String>,
    /// Reshuffle training blocks every epoch with --seed; false keeps file order.
    #[arg(long = "shuffle", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub shuffle: bool,
    /// Recompute each block's activations in the backward pass instead of
    /// keeping them: less memory, about one more forward pass of compute.
    #[arg(long = "gradient_checkpointing", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub gradient_checkpointing: bool,
    /// Precision of the base weights on CUDA (auto: bfloat16). CPU computes
    /// in float32; LoRA weights, norms, softmax, loss and optimizer state are
    /// float32 everywhere.
    #[arg(long = "torch_dtype", value_enum, default_value = "auto")]
    pub torch_dtype: DtypeArg,
    /// auto: CUDA when this build has it and a GPU is present, else CPU.
    #[arg(long = "device_map", value_enum, default_value = "auto")]
    pub device_map: DeviceArg,
    /// float32 matmuls on CUDA with TF32 tensor cores (faster, ~1e-3 relative error).
    #[arg(long = "tf32", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub tf32: bool,
    /// Must name the model's type when given (pt-host trains `bloom`).
    #[arg(long = "model_type")]
    pub model_type: Option<String>,
    /// Allow writing into a non-empty --output_dir (as in HF); otherwise refused.
    #[arg(long = "overwrite_output_dir", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub overwrite_output_dir: bool,
    /// Evaluate once before the first training step (HF `eval_on_start`).
    #[arg(long = "eval_on_start", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub eval_on_start: bool,
    /// MedicalGPT's meaning: true packs documents into blocks (group_texts;
    /// the default), false gives each document its own padded block (as
    /// --packing false).
    #[arg(long = "group_by_length", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub group_by_length: Option<bool>,
    /// HF's bf16 mixed precision: on CUDA the base weights compute in
    /// bfloat16 (--torch_dtype bfloat16); the CPU computes in float32.
    #[arg(long = "bf16", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub bf16: bool,
    /// HF's fp16 mixed precision: on CUDA float16 base weights (--torch_dtype
    /// float16); the CPU computes in float32.
    #[arg(long = "fp16", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub fp16: bool,
    /// Where logs go besides trainer_log.jsonl: `tensorboard` (event files
    /// in --logging_dir), `all` (the same), or `none`. Comma-separated or repeated.
    #[arg(long = "report_to", default_value = "none", value_delimiter = ',', value_parser = ["none", "all", "tensorboard"])]
    pub report_to: Vec<String>,
    /// Draw training_loss.png and training_eval_loss.png (smoothed) into
    /// --output_dir at the end of training, as LLaMA-Factory does.
    #[arg(long = "plot_loss", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub plot_loss: bool,
    /// TensorBoard's directory (default: OUTPUT_DIR/runs/MON-DD_HH-MM-SS_HOST, as HF).
    #[arg(long = "logging_dir", value_name = "DIR")]
    pub logging_dir: Option<PathBuf>,
    /// How the ranks of a data-parallel job (mpirun, srun, torchrun) sum
    /// gradients: nccl (GPUs) or mpi (CPUs). Default: nccl on CUDA, mpi on
    /// CPU, and none for one process (given, one process uses it too).
    #[arg(long = "ddp_backend", value_enum)]
    pub ddp_backend: Option<BackendArg>,
    /// Seconds a rank waits in a collective (the gradient sum, or for rank 0
    /// to prepare the data) before the job ends with an error.
    #[arg(long = "ddp_timeout", default_value_t = 1800)]
    pub ddp_timeout: u64,
    /// Accepted and ignored: every trainable tensor receives a gradient (checked each step).
    #[arg(long = "ddp_find_unused_parameters", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub ddp_find_unused_parameters: Option<bool>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BackendArg {
    Nccl,
    Mpi,
}

/// Says plainly which accepted flags do nothing in this run.
fn report_ignored_flags(args: &RunArgs) {
    if args.ddp_find_unused_parameters.is_some() {
        eprintln!(
            "note: --ddp_find_unused_parameters is ignored: every trainable tensor receives a gradient"
        );
    }
}

/// The TensorBoard writer when `--report_to` asks for one.
fn tensorboard(args: &RunArgs) -> Result<Option<EventWriter>> {
    if !args
        .report_to
        .iter()
        .any(|r| r == "tensorboard" || r == "all")
    {
        return Ok(None);
    }
    let dir = args
        .logging_dir
        .clone()
        .unwrap_or_else(|| tensorboard::default_logging_dir(&args.data.output_dir));
    let writer = EventWriter::create(&dir)?;
    eprintln!(
        "tensorboard: {} (tensorboard --logdir {})",
        writer.path().display(),
        dir.display()
    );
    Ok(Some(writer))
}

/// HF refuses to train into a non-empty output directory unless told to
/// overwrite it (resuming is the exception).
fn check_output_dir(args: &RunArgs) -> Result<()> {
    let dir = &args.data.output_dir;
    let non_empty = dir
        .read_dir()
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if args.do_train
        && non_empty
        && !args.overwrite_output_dir
        && args.resume_from_checkpoint.is_none()
    {
        bail!(
            "--output_dir {} exists and is not empty: pass --overwrite_output_dir to train into it, or --resume_from_checkpoint to continue",
            dir.display()
        );
    }
    Ok(())
}

/// Token ids index the embedding: a tokenizer with more tokens than the model
/// has rows would fail mid-training, so it is refused before any work.
pub fn check_vocabulary(tokenizer: &Tokenizer, tokenizer_dir: &Path, model: &Bloom) -> Result<()> {
    let (tokens, rows) = (tokenizer.vocab_size(), model.config.vocab_size);
    if tokens > rows {
        bail!(
            "the tokenizer in {} has {tokens} tokens, but the model's embedding has {rows} rows (vocab_size in config.json): use the model's own tokenizer (--tokenizer_name_or_path)",
            tokenizer_dir.display()
        );
    }
    Ok(())
}

fn target_modules(spec: &str) -> Result<Vec<String>> {
    if spec.trim() == "all" {
        return Ok(LORA_TARGETS.iter().map(|s| s.to_string()).collect());
    }
    let modules: Vec<String> = spec
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(unknown) = modules.iter().find(|m| !LORA_TARGETS.contains(&m.as_str())) {
        bail!(
            "--target_modules: `{unknown}` is not a BLOOM linear layer (use all, or some of {})",
            LORA_TARGETS.join(", ")
        );
    }
    Ok(modules)
}

fn checkpoint_to_resume(spec: &str, output_dir: &Path) -> Result<PathBuf> {
    match spec.to_ascii_lowercase().as_str() {
        "true" => list_checkpoints(output_dir)?
            .pop()
            .map(|(_, path)| path)
            .with_context(|| {
                format!(
                    "--resume_from_checkpoint true: no checkpoint-N in {}",
                    output_dir.display()
                )
            }),
        _ => Ok(PathBuf::from(spec)),
    }
}

/// Prints HF-style log lines, shows progress and writes TensorBoard events.
struct Console {
    progress: TrainProgress,
    log: Vec<u8>,
    tensorboard: Option<EventWriter>,
    /// The other ranks of a data-parallel job say nothing; rank 0 speaks.
    quiet: bool,
}

impl Console {
    /// A write error (a full disk) is reported once and ends the events, not the run.
    fn scalars(&mut self, step: u64, scalars: &[(String, f32)]) {
        if let Some(writer) = &mut self.tensorboard
            && let Err(error) = writer.scalars(step, scalars)
        {
            self.progress
                .suspend(|| eprintln!("warning: TensorBoard events stop here: {error:#}"));
            self.tensorboard = None;
        }
    }
}

impl TrainerCallback for Console {
    fn on_step(&mut self, progress: &StepProgress) {
        self.progress.step(progress);
    }

    fn on_eval_batch(&mut self, done: usize, total: usize) {
        self.progress.eval_batch(done, total);
    }

    fn on_log(&mut self, entry: &Value) {
        if self.quiet {
            return;
        }
        self.progress.suspend(|| println!("{entry}"));
        serde_json::to_writer(&mut self.log, entry).expect("JSON to memory");
        self.log.push(b'\n');
        let step = entry["step"].as_u64().unwrap_or(0);
        self.scalars(step, &tensorboard::log_scalars(entry));
    }

    fn on_save(&mut self, checkpoint: &Path) {
        if self.quiet {
            return;
        }
        self.progress
            .suspend(|| eprintln!("saved {}", checkpoint.display()));
    }
}

/// `pt-host eval`: `run --do_eval` without training.
pub fn eval(mut args: RunArgs) -> Result<()> {
    if args.do_train {
        bail!("pt-host eval does not train: use pt-host run --do_train");
    }
    if args.data.validation_file_dir.is_none() {
        bail!("pt-host eval needs --validation_file_dir (a directory or a .txt/.json/.jsonl file)");
    }
    args.do_eval = true;
    run(args)
}

pub fn run(mut args: RunArgs) -> Result<()> {
    check_flags(&args)?;
    apply_hf_flags(&mut args);
    // One process, or one rank of a job its launcher describes.
    let launch = Launch::from_env()?;
    let (device, dtype) = device::select(
        args.device_map,
        args.torch_dtype,
        args.tf32,
        launch.local_rank,
    )?;
    let backend = args.ddp_backend.map(|backend| match backend {
        BackendArg::Nccl => Backend::Nccl,
        BackendArg::Mpi => Backend::Mpi,
    });
    let timeout = Duration::from_secs(args.ddp_timeout.max(1));
    let collective = pt_dist::connect(&launch, backend, &device, timeout)?;
    if (collective.world_size() > 1 || backend.is_some()) && collective.is_main() {
        let ranks = collective.world_size();
        eprintln!(
            "data parallel: {ranks} rank{} ({}, {}), {} × {} blocks per micro-batch",
            if ranks == 1 { "" } else { "s" },
            launch.launcher.name(),
            collective.backend(),
            collective.world_size(),
            args.per_device_train_batch_size
        );
    }
    let result = run_rank(&mut args, &*collective, device, dtype);
    if let (Err(error), true) = (&result, collective.world_size() > 1) {
        // The other ranks would wait for this one until --ddp_timeout.
        eprintln!(
            "error: rank {}: {}",
            collective.rank(),
            crate::hints::explain(error)
        );
        collective.abort();
    }
    result
}

/// The flags' own consistency, before any work.
fn check_flags(args: &RunArgs) -> Result<()> {
    if args.data.shard_index.is_some() {
        bail!(
            "--shard_index prepares one shard: use `pt-host prepare` for that; `run --num_shards N` merges the prepared shards"
        );
    }
    if !args.do_train && !args.do_eval {
        bail!("nothing to do: pass --do_train and/or --do_eval");
    }
    if args.do_train && args.data.train_file_dir.is_none() {
        bail!("--do_train needs a training corpus: pass --train_file_dir DIR");
    }
    if !args.use_peft && args.peft_path.is_some() {
        bail!("--peft_path continues a LoRA adapter: it needs --use_peft true");
    }
    for (flag, value) in [
        (
            "--per_device_train_batch_size",
            args.per_device_train_batch_size,
        ),
        (
            "--per_device_eval_batch_size",
            args.per_device_eval_batch_size,
        ),
        (
            "--gradient_accumulation_steps",
            args.gradient_accumulation_steps,
        ),
        ("--lora_rank", args.lora_rank),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!(
            "--lora_dropout must be in [0, 1), got {}",
            args.lora_dropout
        );
    }
    // As HF's TrainingArguments and PEFT's LoraConfig refuse them, before any data work.
    if !(0.0..=1.0).contains(&args.warmup_ratio) {
        bail!(
            "--warmup_ratio must be in [0, 1] (a fraction of the training steps), got {}",
            args.warmup_ratio
        );
    }
    for (flag, value) in [
        ("--lora_alpha", args.lora_alpha),
        ("--learning_rate", args.learning_rate),
        ("--weight_decay", args.weight_decay),
        ("--max_grad_norm", args.max_grad_norm),
        ("--num_train_epochs", args.num_train_epochs),
    ] {
        if !value.is_finite() || value < 0.0 {
            bail!("{flag} must be a finite number ≥ 0, got {value}");
        }
    }
    if args.lora_alpha == 0.0 {
        bail!("--lora_alpha must be positive (the adapter's scale is lora_alpha / lora_rank)");
    }
    if args.bf16 && args.fp16 {
        bail!("--bf16 and --fp16 exclude each other (as in HF): pick one");
    }
    target_modules(&args.target_modules)?;
    Ok(())
}

/// HF's precision and MedicalGPT's grouping flags, in pt-host's terms.
fn apply_hf_flags(args: &mut RunArgs) {
    if let DtypeArg::Auto = args.torch_dtype {
        if args.bf16 {
            args.torch_dtype = DtypeArg::Bfloat16;
        } else if args.fp16 {
            args.torch_dtype = DtypeArg::Float16;
        }
    }
    if args.group_by_length == Some(false) && args.data.packing {
        eprintln!(
            "note: --group_by_length false: one padded block per document, as MedicalGPT's pretraining.py (= --packing false; padding is masked out of the loss)"
        );
        args.data.packing = false;
    }
}

/// The run on this rank (the only one, alone): model and data, what
/// trains, training, evaluation, outputs.
fn run_rank(
    args: &mut RunArgs,
    collective: &dyn Collective,
    device: Device,
    dtype: DType,
) -> Result<()> {
    let main = collective.is_main();
    // Adapters name the base model as the user did (a hub id stays one).
    let base_model_name = args.data.model_name_or_path.display().to_string();
    let (mut model, data) = load_model_and_data(args, collective, device, dtype)?;
    let prepared = &data.prepared;
    model.gradient_checkpointing = args.gradient_checkpointing;
    if args.gradient_checkpointing && main {
        eprintln!("gradient checkpointing: block activations are recomputed in the backward pass");
    }
    let trainable = attach_trainable(args, &mut model, main)?;
    let output_dir = args.data.output_dir.clone();
    let mut trainer = Trainer::new(
        training_arguments(args),
        &mut model,
        trainable,
        base_model_name,
    )?
    .across(collective);
    let mut console = Console {
        progress: TrainProgress::new(args.data.disable_tqdm || !main),
        log: Vec::new(),
        tensorboard: if main { tensorboard(args)? } else { None },
        quiet: !main,
    };
    console.scalars(0, &tensorboard::data_scalars(&prepared.report));
    let mut all_results = json!({});
    if args.do_train {
        let summary = train(args, &mut trainer, &data, &mut console)?;
        merge(&mut all_results, &summary);
    }
    if args.do_eval {
        let results = evaluate(args, collective, &trainer, &data, &mut console)?;
        merge(&mut all_results, &results);
    }
    console.progress.finish();
    if !main {
        return Ok(());
    }
    write_results(&output_dir, "all_results.json", &all_results)?;
    pt_fs::write_atomically(&output_dir.join("trainer_log.jsonl"), &console.log)?;
    eprintln!("outputs in {}", output_dir.display());
    Ok(())
}

/// The model, checked against `--model_type` and the tokenizer, and the
/// prepared data. Rank 0 downloads the model and prepares the data first
/// (HF's `main_process_first`); the others then find both in the cache.
fn load_model_and_data(
    args: &mut RunArgs,
    collective: &dyn Collective,
    device: Device,
    dtype: DType,
) -> Result<(Bloom, PreparedData)> {
    let main = collective.is_main();
    if main {
        report_ignored_flags(args);
        check_output_dir(args)?;
    } else {
        collective.barrier()?;
    }
    args.data.resolve_models()?;
    // The model first: a wrong model fails before any data work.
    let model_dir = &args.data.model_name_or_path;
    let model = Bloom::load(model_dir, &device, dtype)?;
    if let Some(model_type) = &args.model_type {
        let actual = model.config.model_type.as_deref().unwrap_or("bloom");
        if model_type != actual {
            bail!(
                "--model_type {model_type}, but {} is a `{actual}` model",
                model_dir.display()
            );
        }
    }
    let tokenizer = Tokenizer::from_dir(args.data.tokenizer_dir())?;
    check_vocabulary(&tokenizer, args.data.tokenizer_dir(), &model)?;
    let data = prepare_data(&args.data, tokenizer, main)?;
    if main {
        collective.barrier()?;
    }
    if args.do_eval && data.prepared.validation.is_empty() {
        bail!(
            "--do_eval: there are no validation blocks (data_report.json has the counts); give --validation_file_dir, \
             raise --validation_split_percentage or --max_eval_samples, or lower --block_size"
        );
    }
    Ok((model, data))
}

/// What trains: a loaded or new LoRA adapter, or every weight; its size
/// reported as PEFT's `print_trainable_parameters` does.
fn attach_trainable(args: &RunArgs, model: &mut Bloom, main: bool) -> Result<Trainable> {
    let trainable = match (&args.peft_path, args.use_peft) {
        (Some(path), _) => {
            let config = model.load_adapter(path)?;
            model.set_lora_dropout(args.lora_dropout);
            Trainable::Adapter(config)
        }
        (None, true) => {
            let config = AdapterConfig {
                peft_type: "LORA".into(),
                r: args.lora_rank,
                lora_alpha: args.lora_alpha,
                target_modules: target_modules(&args.target_modules)?,
                use_rslora: false,
                use_dora: false,
            };
            model.add_lora(&config, args.lora_dropout, args.data.seed)?;
            Trainable::Adapter(config)
        }
        (None, false) => Trainable::Full {
            source: args.data.model_name_or_path.clone(),
        },
    };
    let (base, adapter) = model.parameter_counts();
    let trained = match trainable {
        Trainable::Full { .. } => base,
        Trainable::Adapter(_) => adapter,
    };
    if main {
        eprintln!(
            "trainable params: {trained} || all params: {} || trainable%: {:.4}",
            base + adapter,
            100.0 * trained as f64 / (base + adapter) as f64
        );
    }
    Ok(trainable)
}

fn training_arguments(args: &RunArgs) -> TrainingArguments {
    TrainingArguments {
        output_dir: args.data.output_dir.clone(),
        per_device_train_batch_size: args.per_device_train_batch_size,
        per_device_eval_batch_size: args.per_device_eval_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        learning_rate: args.learning_rate,
        adamw: AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
        max_grad_norm: args.max_grad_norm,
        num_train_epochs: args.num_train_epochs,
        max_steps: args.max_steps.max(0) as usize,
        lr_scheduler_type: match args.lr_scheduler_type {
            SchedulerArg::Linear => SchedulerType::Linear,
            SchedulerArg::Cosine => SchedulerType::Cosine,
            SchedulerArg::Constant => SchedulerType::Constant,
            SchedulerArg::ConstantWithWarmup => SchedulerType::ConstantWithWarmup,
        },
        warmup_ratio: args.warmup_ratio,
        warmup_steps: args.warmup_steps,
        logging_strategy: args.logging_strategy.into(),
        logging_steps: args.logging_steps,
        logging_first_step: args.logging_first_step,
        eval_strategy: if args.do_eval {
            args.eval_strategy.into()
        } else {
            Interval::No
        },
        eval_steps: args.eval_steps.unwrap_or(args.logging_steps),
        eval_on_start: args.do_eval && args.eval_on_start,
        save_strategy: args.save_strategy.into(),
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        seed: args.data.seed,
        shuffle: args.shuffle,
    }
}

/// `--do_train`: resumes if asked, trains, writes the final outputs and
/// `train_results.json`; returns the training summary.
fn train(
    args: &RunArgs,
    trainer: &mut Trainer<'_>,
    data: &PreparedData,
    console: &mut Console,
) -> Result<Value> {
    let main = !console.quiet;
    let output_dir = &args.data.output_dir;
    if let Some(spec) = &args.resume_from_checkpoint {
        let checkpoint = checkpoint_to_resume(spec, output_dir)?;
        trainer.resume(&checkpoint).with_context(|| {
            format!(
                "--resume_from_checkpoint: cannot resume from {} (name an earlier checkpoint-N directory instead)",
                checkpoint.display()
            )
        })?;
        if main {
            eprintln!(
                "resumed from {} at step {}",
                checkpoint.display(),
                trainer.state.global_step
            );
        }
    }
    let prepared = &data.prepared;
    let eval = (args.do_eval && !prepared.validation.is_empty()).then_some(&prepared.validation);
    let mut metrics = PluginMetrics::new(data);
    let summary = trainer.train(&prepared.train, eval, metrics.as_sink(), console)?;
    trainer.save_final()?;
    if args.plot_loss && main {
        for plot in crate::plot::plot_loss(output_dir, &trainer.state.log_history)? {
            eprintln!("plotted {}", plot.display());
        }
    }
    if main {
        write_results(output_dir, "train_results.json", &summary)?;
    }
    Ok(summary)
}

/// `--do_eval`: the final evaluation, printed and in `eval_results.json`.
fn evaluate(
    args: &RunArgs,
    collective: &dyn Collective,
    trainer: &Trainer<'_>,
    data: &PreparedData,
    console: &mut Console,
) -> Result<Value> {
    let mut metrics = PluginMetrics::new(data);
    let evaluation = evaluate_across(
        collective,
        trainer.model,
        &data.prepared.validation,
        args.per_device_eval_batch_size,
        metrics.as_sink(),
        &mut |done, total| console.progress.eval_batch(done, total),
    )?;
    let results = eval_results(&evaluation, trainer.state.epoch, None);
    if !console.quiet {
        println!("{results}");
        console.scalars(
            trainer.state.global_step as u64,
            &tensorboard::log_scalars(&results),
        );
        write_results(&args.data.output_dir, "eval_results.json", &results)?;
    }
    Ok(results)
}

/// Metric names a plugin may not use: written as `eval_NAME` they would
/// overwrite (or be mistaken for) the host's own evaluation keys.
const RESERVED_METRIC_NAMES: &[&str] = &[
    "loss",
    "accuracy",
    "perplexity",
    "samples",
    "tokens",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "epoch",
    "step",
];

/// The metric plugins among `--plugin`, fed the evaluation's samples: one
/// accumulator per plugin per evaluation.
struct PluginMetrics<'a> {
    plugins: Vec<&'a LoadedPlugin>,
    tokenizer: &'a Tokenizer,
    sessions: Vec<MetricSession>,
}

impl<'a> PluginMetrics<'a> {
    fn new(data: &'a PreparedData) -> Self {
        let plugins = data
            .plugins
            .iter()
            .filter_map(|p| p.wasm())
            .filter(|p| p.has_kind(Kind::Metric))
            .collect();
        Self {
            plugins,
            tokenizer: &data.tokenizer,
            sessions: Vec::new(),
        }
    }

    fn as_sink(&mut self) -> Option<&mut dyn MetricSink> {
        if self.plugins.is_empty() {
            None
        } else {
            Some(self)
        }
    }
}

impl MetricSink for PluginMetrics<'_> {
    fn add(&mut self, samples: &[EvalSample]) -> Result<()> {
        if self.sessions.is_empty() {
            self.sessions = self
                .plugins
                .iter()
                .map(|p| p.metric_session())
                .collect::<Result<_>>()?;
        }
        let samples: Vec<Sample> = samples
            .iter()
            .map(|s| {
                Ok(Sample {
                    reference: self.tokenizer.decode(&s.tokens)?,
                    predicted: self.tokenizer.decode(&s.predicted)?,
                    token_logprobs: s.logprobs.clone(),
                    continuation: None,
                })
            })
            .collect::<Result<_>>()?;
        for session in &mut self.sessions {
            session.add_batch(&samples)?;
        }
        Ok(())
    }

    /// Every plugin's values, each to be written as `eval_NAME`: a name that
    /// would overwrite a host-owned key, or one another plugin already gave,
    /// is refused with the plugin's name.
    fn finish(&mut self) -> Result<Vec<(String, f64)>> {
        let mut values: Vec<(String, f64)> = Vec::new();
        for (plugin, mut session) in self.plugins.iter().zip(std::mem::take(&mut self.sessions)) {
            for metric in session.compute()? {
                if RESERVED_METRIC_NAMES.contains(&metric.name.as_str()) {
                    bail!(
                        "metric plugin `{}` returned metric `{}`, which is pt-host's own (reserved: {}); rename it in the plugin",
                        plugin.name,
                        metric.name,
                        RESERVED_METRIC_NAMES.join(", ")
                    );
                }
                if values.iter().any(|(name, _)| *name == metric.name) {
                    bail!(
                        "metric plugin `{}` returned metric `{}` more than once (or another metric plugin did too)",
                        plugin.name,
                        metric.name
                    );
                }
                values.push((metric.name, metric.value));
            }
        }
        Ok(values)
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}
