//! `pt-host run`'s flags: MedicalGPT's `pretraining.py` and HF
//! `TrainingArguments` names, their consistency checked before any work,
//! and HF's spellings mapped onto ours.

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use pt_model::BlockWeights;
use pt_train::trainer::Interval;

use crate::args::parse_bool;
use crate::device::{DeviceArg, DtypeArg};
use crate::prepare::PrepareArgs;
use crate::quantize::QuantizationArgs;

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

/// `--eval_task_language`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TaskLanguageArg {
    Auto,
    En,
    Zh,
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

#[derive(clap::Args, Clone, Debug)]
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
    /// rsLoRA: scale the adapter by lora_alpha / √lora_rank (PEFT's
    /// `use_rslora`), which keeps high ranks learning.
    #[arg(long = "use_rslora", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output beside the LoRA direction (PEFT's
    /// `use_dora`).
    #[arg(long = "use_dora", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub use_dora: bool,
    /// LoRA+: train the B matrices (and DoRA's magnitudes) at this many times
    /// the learning rate (LLaMA-Factory's `loraplus_lr_ratio`; 16 is its
    /// suggestion).
    #[arg(long = "loraplus_lr_ratio", value_name = "RATIO")]
    pub loraplus_lr_ratio: Option<f64>,
    #[command(flatten)]
    pub quantization: QuantizationArgs,
    /// Continue from this PEFT adapter directory instead of a fresh adapter.
    #[arg(long = "peft_path", value_name = "DIR")]
    pub peft_path: Option<PathBuf>,
    /// Base modules trained whole beside the adapter, comma-separated (PEFT's
    /// modules_to_save): `embed_tokens,lm_head` (BLOOM: `word_embeddings`)
    /// trains the rows of tokens added to the tokenizer (extend-tokenizer).
    #[arg(
        long = "modules_to_save",
        value_name = "MODULES",
        value_delimiter = ','
    )]
    pub modules_to_save: Vec<String>,
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
    /// Multiple-choice benchmarks scored at every evaluation, as
    /// lm-evaluation-harness scores them: C-Eval/CMMLU/MMLU CSV directories
    /// or files, or JSONL; or FORMAT=PATH, read by the --plugin that reads
    /// FORMAT (comma-separated). Adds eval_<task>_acc.
    #[arg(long = "eval_tasks", value_delimiter = ',')]
    pub eval_tasks: Vec<PathBuf>,
    /// Answered dev examples before each benchmark question.
    #[arg(long = "eval_num_fewshot", default_value_t = 0)]
    pub eval_num_fewshot: usize,
    /// The benchmark prompt: en (MMLU's), zh (C-Eval's), or auto (zh when
    /// most questions are Chinese).
    #[arg(long = "eval_task_language", value_enum, default_value = "auto")]
    pub eval_task_language: TaskLanguageArg,
    /// Tokens a benchmark prompt may use (longer ones lose their start);
    /// default: the model config's max_position_embeddings (n_positions,
    /// seq_length), else 2048, as the harness reads it.
    #[arg(long = "eval_max_length")]
    pub eval_max_length: Option<usize>,
    /// `pt-host eval` only: also evaluate this model (the one trained from)
    /// and write a base-vs-trained report: every task's and subject's
    /// accuracy, the difference and its standard error, and perplexities
    /// (eval_report.json, eval_report.md, eval_report_<task>.png).
    #[arg(long = "base_model_name_or_path", value_name = "DIR|ID")]
    pub base_model_name_or_path: Option<PathBuf>,
    /// With --base_model_name_or_path: a general corpus (dir or file) whose
    /// perplexity before and after is the report's forgetting check, beside
    /// the domain corpus's (--validation_file_dir).
    #[arg(long = "general_file_dir", value_name = "DIR|FILE")]
    pub general_file_dir: Option<PathBuf>,
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
    /// `auto` (MedicalGPT's default) reads config.json's `model_type`; a
    /// family name (bloom, llama, mistral, qwen2, qwen3) must match it.
    #[arg(long = "model_type", default_value = "auto")]
    pub model_type: String,
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
pub fn report_ignored_flags(args: &RunArgs) {
    if args.ddp_find_unused_parameters.is_some() {
        eprintln!(
            "note: --ddp_find_unused_parameters is ignored: every trainable tensor receives a gradient"
        );
    }
}

/// The flags' own consistency, before any work.
pub fn check_flags(args: &RunArgs) -> Result<()> {
    if args.data.shard_index.is_some() {
        bail!(
            "--shard_index prepares one shard: use `pt-host prepare` for that; `run --num_shards N` merges the prepared shards"
        );
    }
    if !args.do_train && !args.do_eval {
        bail!("nothing to do: pass --do_train and/or --do_eval");
    }
    if args.base_model_name_or_path.is_some() {
        bail!(
            "--base_model_name_or_path compares a trained model with its base: it is pt-host eval's (evaluate after training)"
        );
    }
    if args.general_file_dir.is_some() {
        bail!(
            "--general_file_dir is the forgetting check of pt-host eval --base_model_name_or_path BASE"
        );
    }
    if args.do_train && args.data.train_file_dir.is_empty() {
        bail!("--do_train needs a training corpus: pass --train_file_dir DIR");
    }
    if !args.use_peft && args.peft_path.is_some() {
        bail!("--peft_path continues a LoRA adapter: it needs --use_peft true");
    }
    if !args.use_peft && (args.use_rslora || args.use_dora || args.loraplus_lr_ratio.is_some()) {
        bail!(
            "--use_rslora, --use_dora and --loraplus_lr_ratio shape a LoRA adapter: they need --use_peft true"
        );
    }
    // Validated as on the CPU, where either way of holding the base applies.
    match args.quantization.block_weights(&Device::Cpu, DType::F32)? {
        Some(BlockWeights::Nf4(config)) if !args.use_peft => bail!(
            "--load_in_4bit holds the base in 4 bits ({}) for LoRA on top: it needs --use_peft true",
            if config.double_quant {
                "NF4, double quantisation"
            } else {
                "NF4"
            }
        ),
        Some(BlockWeights::Bf16) if !args.use_peft && args.do_train => bail!(
            "--frozen_weights bf16 holds a frozen base in bf16 for LoRA on top: it needs --use_peft true (full fine-tuning trains every weight in float32)"
        ),
        _ => {}
    }
    if args.peft_path.is_some() && (args.use_rslora || args.use_dora) {
        bail!(
            "--use_rslora and --use_dora set up a new adapter; a --peft_path adapter's adapter_config.json says whether it uses them"
        );
    }
    if let Some(ratio) = args.loraplus_lr_ratio
        && !(ratio.is_finite() && ratio > 0.0)
    {
        bail!(
            "--loraplus_lr_ratio must be a positive number (LLaMA-Factory suggests 16), got {ratio}"
        );
    }
    if !args.modules_to_save.is_empty() && (!args.use_peft || args.peft_path.is_some()) {
        bail!(
            "--modules_to_save goes with a new adapter: full fine-tuning (--use_peft false) trains every module, \
             and a --peft_path adapter's adapter_config.json names its own"
        );
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
    Ok(())
}

/// HF's precision and MedicalGPT's grouping flags, in pt-host's terms.
pub fn apply_hf_flags(args: &mut RunArgs) {
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

/// `--target_modules` as module names of a model whose linear layers are
/// `known` (`all`: every one, as PEFT and MedicalGPT resolve it).
pub fn target_modules(spec: &str, known: &[&str], model_type: &str) -> Result<Vec<String>> {
    if spec.trim() == "all" {
        return Ok(known.iter().map(|s| s.to_string()).collect());
    }
    let modules: Vec<String> = spec
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(unknown) = modules.iter().find(|m| !known.contains(&m.as_str())) {
        bail!(
            "--target_modules: `{unknown}` is not a linear layer of a {model_type} model (use all, or some of {})",
            known.join(", ")
        );
    }
    Ok(modules)
}
