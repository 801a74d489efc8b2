//! `pt-host bench`: training, evaluation, generation and data-preparation
//! throughput on a fixed random BLOOM, with PyTorch + PEFT measured on the same
//! work in the same run when torch is installed.
//!
//! Each measurement runs in its own child process (`--measure`), so the peak
//! memory it reports is that measurement's alone, as the reference script's is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use pt_data::Blocks;
use pt_model::{AdapterConfig, Bloom, Config};
use pt_train::trainer::{Interval, StepProgress, Trainable, Trainer, TrainerCallback, evaluate};
use pt_train::{AdamWConfig, SchedulerType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One measurement, as a child process runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// LoRA training (r 8, alpha 16, dropout 0.05, all four linear layers).
    Lora,
    /// Full fine-tuning.
    Full,
    /// Evaluation forward passes.
    Eval,
    /// Greedy generation with the KV cache, one prompt.
    Generate,
}

impl Measure {
    fn name(self) -> &'static str {
        match self {
            Measure::Lora => "lora",
            Measure::Full => "full",
            Measure::Eval => "eval",
            Measure::Generate => "generate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TorchArg {
    /// Run the reference when python3 imports torch, transformers and peft.
    Auto,
    Always,
    Never,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model width of the random BLOOM.
    #[arg(long = "hidden_size", default_value_t = 512)]
    pub hidden_size: usize,
    #[arg(long = "n_layer", default_value_t = 8)]
    pub n_layer: usize,
    #[arg(long = "n_head", default_value_t = 8)]
    pub n_head: usize,
    #[arg(long = "vocab_size", default_value_t = 16384)]
    pub vocab_size: usize,
    /// Tokens per block.
    #[arg(long = "block_size", default_value_t = 256)]
    pub block_size: usize,
    /// Blocks per micro-batch.
    #[arg(long = "batch_size", default_value_t = 4)]
    pub batch_size: usize,
    /// Timed training steps (or evaluation batches) per measurement, after one warm-up.
    #[arg(long = "steps", default_value_t = 3)]
    pub steps: usize,
    /// New tokens per generation measurement.
    #[arg(long = "new_tokens", default_value_t = 64)]
    pub new_tokens: usize,
    /// Measurements to run (default: all).
    #[arg(long = "only", value_delimiter = ',')]
    pub only: Vec<Measure>,
    /// PyTorch + PEFT reference (bench/torch_reference.py) on the same work.
    #[arg(long = "torch", value_enum, default_value = "auto")]
    pub torch: TorchArg,
    /// The reference script.
    #[arg(long = "torch_script", default_value = "bench/torch_reference.py")]
    pub torch_script: PathBuf,
    /// Internal: run one measurement in this process and print it as JSON.
    #[arg(long = "measure", hide = true)]
    pub measure: Option<Measure>,
}

/// What one measurement printed.
#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    tokens_per_second: f64,
    peak_mib: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(measure) = args.measure {
        let measured = measure_here(&args, measure)?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let torch = match args.torch {
        TorchArg::Never => false,
        TorchArg::Always => true,
        TorchArg::Auto => torch_available(),
    };
    let measures = if args.only.is_empty() {
        vec![
            Measure::Lora,
            Measure::Full,
            Measure::Eval,
            Measure::Generate,
        ]
    } else {
        args.only.clone()
    };
    println!(
        "bench shape: random BLOOM hidden {} × {} layers × {} heads, vocab {}, block {}, micro-batch {}, f32, {} threads",
        args.hidden_size,
        args.n_layer,
        args.n_head,
        args.vocab_size,
        args.block_size,
        args.batch_size,
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<22} {:>12} {:>10} {:>12} {:>10} {:>8} {:>8}",
        "measure", "pt-host/s", "peak MiB", "torch/s", "peak MiB", "speed×", "memory×"
    );
    for measure in measures {
        let ours = measure_in_child(&args, measure)?;
        let reference = if torch {
            Some(torch_reference(&args, measure)?)
        } else {
            None
        };
        print_row(measure, &ours, reference.as_ref());
    }
    Ok(())
}

fn unit(measure: Measure) -> &'static str {
    match measure {
        Measure::Lora => "train tok/s (LoRA)",
        Measure::Full => "train tok/s (full)",
        Measure::Eval => "eval tok/s",
        Measure::Generate => "generate tok/s",
    }
}

fn print_row(measure: Measure, ours: &Measured, reference: Option<&Measured>) {
    let (theirs, peak, speed, memory) = match reference {
        Some(r) => (
            format!("{:.0}", r.tokens_per_second),
            format!("{:.0}", r.peak_mib),
            format!("{:.2}", ours.tokens_per_second / r.tokens_per_second),
            format!("{:.2}", ours.peak_mib / r.peak_mib),
        ),
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
    };
    println!(
        "{:<22} {:>12.0} {:>10.0} {:>12} {:>10} {:>8} {:>8}",
        unit(measure),
        ours.tokens_per_second,
        ours.peak_mib,
        theirs,
        peak,
        speed,
        memory
    );
}

/// The shape flags, for a child process or the reference script.
fn shape_flags(args: &BenchArgs) -> Vec<String> {
    [
        ("--hidden_size", args.hidden_size),
        ("--n_layer", args.n_layer),
        ("--n_head", args.n_head),
        ("--vocab_size", args.vocab_size),
        ("--block_size", args.block_size),
        ("--batch_size", args.batch_size),
        ("--steps", args.steps),
        ("--new_tokens", args.new_tokens),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
    .collect()
}

fn measure_in_child(args: &BenchArgs, measure: Measure) -> Result<Measured> {
    let exe = std::env::current_exe().context("cannot find the pt-host executable")?;
    let mut command = Command::new(exe);
    command
        .args(["bench", "--measure", measure.name()])
        .args(shape_flags(args));
    last_json_line(command, &format!("bench --measure {}", measure.name()))
}

fn torch_available() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn torch_reference(args: &BenchArgs, measure: Measure) -> Result<Measured> {
    if !args.torch_script.is_file() {
        bail!(
            "{}: no reference script (run from the repository root, or pass --torch_script / --torch never)",
            args.torch_script.display()
        );
    }
    // The script names its flags after HF's BloomConfig.
    let flags = shape_flags(args);
    let mut command = Command::new("python3");
    command
        .arg(&args.torch_script)
        .args(["--mode", measure.name()])
        .args(flags);
    last_json_line(
        command,
        &format!("{} --mode {}", args.torch_script.display(), measure.name()),
    )
}

/// Runs `command` and parses the last line of its stdout.
fn last_json_line(mut command: Command, what: &str) -> Result<Measured> {
    let output = command
        .output()
        .with_context(|| format!("{what}: cannot start"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what}: unexpected output {line:?}"))
}

/// This process's peak resident memory (VmHWM), in MiB.
fn peak_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib / 1024.0)
}

/// Random token blocks (ids above the special tokens), fixed by `seed`.
fn random_blocks(args: &BenchArgs, rows: usize, seed: u64) -> Blocks {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Blocks {
        block_size: args.block_size,
        input_ids: (0..rows * args.block_size)
            .map(|_| rng.random_range(4..args.vocab_size as u32))
            .collect(),
        lengths: vec![args.block_size as u32; rows],
    }
}

/// Records when each optimizer step ends.
struct StepClock {
    ends: Vec<Instant>,
}

impl TrainerCallback for StepClock {
    fn on_step(&mut self, _: &StepProgress) {
        self.ends.push(Instant::now());
    }
    fn on_eval_batch(&mut self, _: usize, _: usize) {}
    fn on_log(&mut self, _: &Value) {}
    fn on_save(&mut self, _: &Path) {}
}

fn measure_here(args: &BenchArgs, measure: Measure) -> Result<Measured> {
    let dir = tempfile::tempdir()?;
    let config: Config = serde_json::from_value(serde_json::json!({
        "hidden_size": args.hidden_size,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "vocab_size": args.vocab_size,
    }))?;
    pt_model::init::write_random_model(dir.path(), &config, 0.02, 42)?;
    let mut model = Bloom::load(dir.path(), &Device::Cpu, DType::F32)?;
    let tokens_per_batch = (args.block_size * args.batch_size) as f64;
    let tokens_per_second = match measure {
        Measure::Lora | Measure::Full => {
            let trainable = if measure == Measure::Lora {
                let adapter = AdapterConfig {
                    peft_type: "LORA".into(),
                    r: 8,
                    lora_alpha: 16.0,
                    target_modules: pt_model::bloom::LORA_TARGETS.map(String::from).to_vec(),
                    use_rslora: false,
                    use_dora: false,
                };
                model.add_lora(&adapter, 0.05, 42)?;
                Trainable::Adapter(adapter)
            } else {
                Trainable::Full {
                    source: dir.path().to_path_buf(),
                }
            };
            let steps = args.steps + 1;
            let blocks = random_blocks(args, steps * args.batch_size, 1);
            let mut trainer = Trainer::new(
                training_arguments(args, dir.path(), steps),
                &mut model,
                trainable,
                dir.path().display().to_string(),
            )?;
            let mut clock = StepClock { ends: Vec::new() };
            trainer.train(&blocks, None, None, &mut clock)?;
            // The first step is the warm-up: allocations and optimizer state.
            let timed = clock.ends[steps - 1] - clock.ends[0];
            tokens_per_batch * args.steps as f64 / timed.as_secs_f64()
        }
        Measure::Eval => {
            let blocks = random_blocks(args, (args.steps + 1) * args.batch_size, 2);
            let warm = random_blocks(args, args.batch_size, 3);
            evaluate(&model, &warm, args.batch_size, None, &mut |_, _| {})?;
            let started = Instant::now();
            evaluate(&model, &blocks, args.batch_size, None, &mut |_, _| {})?;
            blocks.input_ids.len() as f64 / started.elapsed().as_secs_f64()
        }
        Measure::Generate => {
            let prompt = random_blocks(args, 1, 4).input_ids[..16].to_vec();
            let config = pt_model::generate::GenerationConfig {
                max_new_tokens: args.new_tokens,
                do_sample: false,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 0,
                // No early stop: every run generates exactly `new_tokens`.
                eos_id: u32::MAX,
                pad_id: 3,
            };
            let prompts = [prompt];
            pt_model::generate::generate(&model, &prompts, &config, &mut |_, _| Ok(()))?;
            let started = Instant::now();
            pt_model::generate::generate(&model, &prompts, &config, &mut |_, _| Ok(()))?;
            args.new_tokens as f64 / started.elapsed().as_secs_f64()
        }
    };
    Ok(Measured {
        tokens_per_second,
        peak_mib: peak_mib()?,
    })
}

/// The bench recipe: AdamW lr 2e-4, no weight decay, clipping at 1, constant
/// schedule, nothing logged, evaluated or saved.
fn training_arguments(
    args: &BenchArgs,
    output_dir: &Path,
    steps: usize,
) -> pt_train::trainer::TrainingArguments {
    pt_train::trainer::TrainingArguments {
        output_dir: output_dir.to_path_buf(),
        per_device_train_batch_size: args.batch_size,
        per_device_eval_batch_size: args.batch_size,
        gradient_accumulation_steps: 1,
        learning_rate: 2e-4,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        num_train_epochs: 1.0,
        max_steps: steps,
        lr_scheduler_type: SchedulerType::Constant,
        warmup_ratio: 0.0,
        warmup_steps: 0,
        logging_strategy: Interval::No,
        logging_steps: 0,
        logging_first_step: false,
        eval_strategy: Interval::No,
        eval_on_start: false,
        eval_steps: 0,
        save_strategy: Interval::No,
        save_steps: 0,
        save_total_limit: None,
        seed: 42,
        shuffle: false,
    }
}
