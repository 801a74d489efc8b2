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

use crate::device::{DeviceArg, DtypeArg};
use pt_data::Blocks;
use pt_model::{AdapterConfig, Bloom, Config};
use pt_train::evaluate::evaluate;
use pt_train::trainer::{Interval, StepProgress, Trainable, Trainer, TrainerCallback};
use pt_train::{AdamWConfig, SchedulerType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One measurement, as a child process runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    /// LoRA training (r 8, alpha 16, dropout 0.05, all four linear layers).
    Lora,
    /// Full fine-tuning.
    Full,
    /// Evaluation forward passes.
    Eval,
    /// Greedy generation with the KV cache, one prompt.
    Generate,
    /// One f32 matrix product of the MLP's shape (`[tokens, h]·[h, 4h]`), GFLOP/s.
    Matmul,
    /// `prepare` of the corpus: read, tokenize, pack.
    Prepare,
    /// `prepare` with --plugin.
    PreparePlugin,
    /// The first of --plugin_pair alone over the corpus (a component).
    PluginWasm,
    /// The second of --plugin_pair alone (a native library).
    PluginNative,
    /// Summing the LoRA gradients of the bench shape over 2 ranks (mpirun
    /// on this machine, MPI backend), MB/s of gradient.
    AllreduceLora,
    /// The same with every weight's gradient (full fine-tuning).
    AllreduceFull,
}

impl Measure {
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("no skipped variants")
            .get_name()
            .to_string()
    }

    fn label(self, args: &BenchArgs) -> String {
        let file = |path: &Option<PathBuf>| {
            path.as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let pair = |i: usize| file(&args.plugin_pair.get(i).cloned());
        match self {
            Measure::Lora => "train tok/s (LoRA)".into(),
            Measure::Full => "train tok/s (full)".into(),
            Measure::Eval => "eval tok/s".into(),
            Measure::Generate => "generate tok/s".into(),
            Measure::Matmul => "matmul GFLOP/s".into(),
            Measure::Prepare => "prepare MB/s".into(),
            Measure::PreparePlugin => format!("prepare MB/s + {}", file(&args.plugin)),
            Measure::PluginWasm => format!("plugin MB/s {}", pair(0)),
            Measure::PluginNative => format!("plugin MB/s {}", pair(1)),
            Measure::AllreduceLora | Measure::AllreduceFull => format!(
                "all-reduce MB/s {} grads {:.2} MB",
                if self == Measure::AllreduceLora {
                    "LoRA"
                } else {
                    "full"
                },
                gradient_floats(args, self == Measure::AllreduceLora) as f64 * 4e-6
            ),
        }
    }

    /// Whether bench/torch_reference.py measures the same work.
    fn has_reference(self) -> bool {
        !matches!(
            self,
            Measure::Prepare | Measure::PreparePlugin | Measure::PluginWasm | Measure::PluginNative
        )
    }

    fn is_allreduce(self) -> bool {
        matches!(self, Measure::AllreduceLora | Measure::AllreduceFull)
    }
}

/// Trainable floats of the bench shape: LoRA r 8 on the four linear layers
/// (`r·(in + out)` each), or every weight of the (tied-head) model.
fn gradient_floats(args: &BenchArgs, lora: bool) -> usize {
    let h = args.hidden_size;
    let per_layer = if lora {
        8 * ((h + 3 * h) + (h + h) + 2 * (h + 4 * h))
    } else {
        12 * h * h + 13 * h
    };
    args.n_layer * per_layer + if lora { 0 } else { args.vocab_size * h + 4 * h }
}

/// Whether this pt-host can run the all-reduce measurements here.
fn mpirun_available() -> bool {
    cfg!(feature = "mpi")
        && Command::new("mpirun")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TorchArg {
    /// Run the reference when python3 imports torch, transformers and peft.
    Auto,
    /// Run it; fail without torch.
    Always,
    /// Measure pt-host only.
    Never,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model width of the random BLOOM.
    #[arg(long = "hidden_size", default_value_t = 512)]
    pub hidden_size: usize,
    /// Blocks of the random BLOOM.
    #[arg(long = "n_layer", default_value_t = 8)]
    pub n_layer: usize,
    /// Attention heads.
    #[arg(long = "n_head", default_value_t = 8)]
    pub n_head: usize,
    /// Vocabulary size (the LM head's width).
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
    /// Where the model measurements run: cpu (f32), or cuda (bf16 base
    /// weights, f32 adapters, optimizer, softmax, LayerNorm and loss; the
    /// reference runs on the same GPU).
    #[arg(long = "device_map", value_enum, default_value = "cpu")]
    pub device_map: DeviceArg,
    /// Recompute each block's activations in the backward pass (training measurements).
    #[arg(long = "gradient_checkpointing", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = crate::args::parse_bool)]
    pub gradient_checkpointing: bool,
    /// Measurements to run (default: all those whose inputs exist).
    #[arg(long = "only", value_delimiter = ',')]
    pub only: Vec<Measure>,
    /// Also measure how LoRA training scales with block size, batch and depth.
    #[arg(long = "scaling", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = crate::args::parse_bool)]
    pub scaling: bool,
    /// Corpus of the `prepare` measurements.
    #[arg(long = "train_file_dir", default_value = "data/pretrain")]
    pub train_file_dir: PathBuf,
    /// Tokenizer of the `prepare` measurements.
    #[arg(
        long = "tokenizer_name_or_path",
        default_value = "tests/fixtures/bloom-tiny/model"
    )]
    pub tokenizer_name_or_path: PathBuf,
    /// A plugin for `prepare` with a plugin (e.g. medical_clean.wasm).
    #[arg(long = "plugin")]
    pub plugin: Option<PathBuf>,
    /// The same plugin as a component and as a native library
    /// (`length_filter.wasm,liblength_filter_native.so`): the sandbox's cost.
    #[arg(
        long = "plugin_pair",
        value_delimiter = ',',
        value_name = "WASM,NATIVE"
    )]
    pub plugin_pair: Vec<PathBuf>,
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
    /// Tokens (or MB) per second.
    rate: f64,
    peak_mib: f64,
    /// Training: the share of step time spent assembling batches.
    #[serde(default)]
    data_share: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !matches!(args.plugin_pair.len(), 0 | 2) {
        bail!("--plugin_pair takes two plugins: WASM,NATIVE");
    }
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
    if torch && !args.torch_script.is_file() {
        bail!(
            "--torch_script {}: no such file (run from the repository root, pass --torch_script PATH, or --torch never)",
            args.torch_script.display()
        );
    }
    let measures = if args.only.is_empty() {
        available_measures(&args)
    } else {
        args.only.clone()
    };
    for measure in &measures {
        let needs = match measure {
            Measure::PreparePlugin if args.plugin.is_none() => "--plugin PATH",
            Measure::PluginWasm | Measure::PluginNative if args.plugin_pair.is_empty() => {
                "--plugin_pair WASM,NATIVE"
            }
            m if m.is_allreduce() && !mpirun_available() => {
                "a pt-host built with --features mpi, and Open MPI's mpirun"
            }
            _ => continue,
        };
        bail!("--only {}: needs {needs}", measure.name());
    }
    println!(
        "bench: random BLOOM hidden {} × {} layers × {} heads, vocab {}, block {}, micro-batch {}, {}, {} CPU threads{}",
        args.hidden_size,
        args.n_layer,
        args.n_head,
        args.vocab_size,
        args.block_size,
        args.batch_size,
        match args.device_map {
            DeviceArg::Cuda => "CUDA bf16",
            DeviceArg::Cpu | DeviceArg::Auto => "CPU f32",
        },
        candle_core::utils::get_num_threads(),
        if torch {
            "; torch = PyTorch + PEFT on the same work"
        } else {
            ""
        }
    );
    println!(
        "{:<40} {:>10} {:>9} {:>10} {:>9} {:>7} {:>8}",
        "measure", "pt-host", "peak MiB", "torch", "peak MiB", "speed×", "memory×"
    );
    let mut plugin_rates = Vec::new();
    let mut data_share = None;
    for measure in measures {
        let ours = measure_in_child(&args, measure, &[])?;
        let reference = match torch && measure.has_reference() {
            true => Some(torch_reference(&args, measure)?),
            false => None,
        };
        print_row(&measure.label(&args), &ours, reference.as_ref());
        if matches!(measure, Measure::PluginWasm | Measure::PluginNative) {
            plugin_rates.push(ours.rate);
        }
        if measure == Measure::Lora {
            data_share = ours.data_share;
        }
    }
    if let [wasm, native] = plugin_rates[..] {
        println!(
            "sandbox cost: the component runs at {:.2}× the native library's speed",
            wasm / native
        );
    }
    if let Some(share) = data_share {
        println!(
            "data: the training loop spent {:.4}% of its time assembling batches",
            share * 100.0
        );
    }
    if args.scaling {
        scaling_table(&args)?;
    }
    Ok(())
}

/// The default measurements: the model ones, and the data ones whose inputs exist.
fn available_measures(args: &BenchArgs) -> Vec<Measure> {
    let mut measures = vec![
        Measure::Lora,
        Measure::Full,
        Measure::Eval,
        Measure::Generate,
        Measure::Matmul,
    ];
    let data = args.train_file_dir.exists() && args.tokenizer_name_or_path.exists();
    if data {
        measures.push(Measure::Prepare);
    }
    if data && args.plugin.as_ref().is_some_and(|p| p.exists()) {
        measures.push(Measure::PreparePlugin);
    }
    if args.train_file_dir.exists()
        && args.plugin_pair.iter().all(|p| p.exists())
        && args.plugin_pair.len() == 2
    {
        measures.extend([Measure::PluginWasm, Measure::PluginNative]);
    }
    if mpirun_available() {
        measures.extend([Measure::AllreduceLora, Measure::AllreduceFull]);
    }
    measures
}

/// LoRA training throughput and peak memory as the block size, micro-batch
/// and depth vary around the bench shape, one at a time.
fn scaling_table(args: &BenchArgs) -> Result<()> {
    println!("\nLoRA training scaling (one dimension varied from the bench shape)");
    println!(
        "{:<22} {:>10} {:>9} {:>16}",
        "shape", "tok/s", "peak MiB", "MiB per 1k tok"
    );
    let variations: [(&str, usize, [usize; 3]); 3] = [
        ("--block_size", args.block_size, [128, 256, 512]),
        ("--batch_size", args.batch_size, [1, 4, 8]),
        ("--n_layer", args.n_layer, [4, 8, 16]),
    ];
    for (flag, base, values) in variations {
        for value in values {
            let measured = measure_in_child(
                args,
                Measure::Lora,
                &[
                    flag.to_string(),
                    value.to_string(),
                    "--steps".into(),
                    "2".into(),
                ],
            )?;
            let tokens = match flag {
                "--block_size" => value * args.batch_size,
                "--batch_size" => args.block_size * value,
                _ => args.block_size * args.batch_size,
            };
            let marker = if value == base { " (bench)" } else { "" };
            println!(
                "{:<22} {:>10.0} {:>9.0} {:>16.1}",
                format!("{}={value}{marker}", flag.trim_start_matches("--")),
                measured.rate,
                measured.peak_mib,
                measured.peak_mib / tokens as f64 * 1000.0
            );
        }
    }
    Ok(())
}

fn print_row(label: &str, ours: &Measured, reference: Option<&Measured>) {
    let (theirs, peak, speed, memory) = match reference {
        Some(r) => (
            format!("{:.0}", r.rate),
            format!("{:.0}", r.peak_mib),
            format!("{:.2}", ours.rate / r.rate),
            format!("{:.2}", ours.peak_mib / r.peak_mib),
        ),
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
    };
    let rate = if ours.rate >= 100.0 {
        format!("{:.0}", ours.rate)
    } else {
        format!("{:.2}", ours.rate)
    };
    println!(
        "{label:<40} {rate:>10} {:>9.0} {theirs:>10} {peak:>9} {speed:>7} {memory:>8}",
        ours.peak_mib
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

/// Runs `measure` in a child process; `overrides` replace shape flags.
fn measure_in_child(args: &BenchArgs, measure: Measure, overrides: &[String]) -> Result<Measured> {
    let exe = std::env::current_exe().context("cannot find the pt-host executable")?;
    let mut command = if measure.is_allreduce() {
        // Two ranks on loopback; each prints its measurement, the last line is read.
        let mut mpirun = Command::new("mpirun");
        mpirun
            .args(["-n", "2", "--oversubscribe", "--mca", "btl", "self,tcp"])
            .args(["--mca", "btl_tcp_if_include", "lo"])
            // Open MPI refuses root without these; the ranks only talk to each other here.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg(exe);
        mpirun
    } else {
        Command::new(exe)
    };
    command
        .args(["bench", "--measure", &measure.name()])
        .args(shape_flags(args))
        .arg("--train_file_dir")
        .arg(&args.train_file_dir)
        .arg("--tokenizer_name_or_path")
        .arg(&args.tokenizer_name_or_path)
        .args(["--device_map", device_name(args.device_map)])
        .arg(format!(
            "--gradient_checkpointing={}",
            args.gradient_checkpointing
        ))
        .args(overrides);
    if let Some(plugin) = &args.plugin {
        command.arg("--plugin").arg(plugin);
    }
    if let [wasm, native] = &args.plugin_pair[..] {
        let mut pair = wasm.as_os_str().to_owned();
        pair.push(",");
        pair.push(native);
        command.arg("--plugin_pair").arg(pair);
    }
    last_json_line(command, &format!("bench --measure {}", measure.name()))
}

fn device_name(device: DeviceArg) -> &'static str {
    match device {
        DeviceArg::Cuda => "cuda",
        DeviceArg::Cpu | DeviceArg::Auto => "cpu",
    }
}

fn torch_available() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn torch_reference(args: &BenchArgs, measure: Measure) -> Result<Measured> {
    // The script names its flags after HF's BloomConfig.
    let flags = shape_flags(args);
    let mut command = Command::new("python3");
    command
        .arg(&args.torch_script)
        .args(["--mode", &measure.name()])
        .args(flags)
        .args([
            "--allreduce_floats",
            &gradient_floats(args, measure == Measure::AllreduceLora).to_string(),
        ])
        .args(["--device", device_name(args.device_map)]);
    if args.gradient_checkpointing {
        command.arg("--gradient_checkpointing");
    }
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
    let (rate, data_share) = match measure {
        Measure::Prepare => (prepare_rate(args, None)?, None),
        Measure::PreparePlugin => (prepare_rate(args, args.plugin.as_deref())?, None),
        Measure::PluginWasm | Measure::PluginNative => {
            let index = usize::from(measure == Measure::PluginNative);
            let path = args
                .plugin_pair
                .get(index)
                .context("--plugin_pair WASM,NATIVE is needed")?;
            (plugin_rate(args, path)?, None)
        }
        Measure::Matmul => (matmul_rate(args)?, None),
        Measure::AllreduceLora | Measure::AllreduceFull => (
            allreduce_rate(gradient_floats(args, measure == Measure::AllreduceLora))?,
            None,
        ),
        Measure::Lora | Measure::Full | Measure::Eval | Measure::Generate => {
            model_rate(args, measure)?
        }
    };
    Ok(Measured {
        rate,
        peak_mib: peak_mib()?,
        data_share,
    })
}

/// MB/s of `floats` f32 summed over the ranks that mpirun started, as the
/// trainer sums a step's gradients (best of 10, after a warm-up).
fn allreduce_rate(floats: usize) -> Result<f64> {
    let launch = pt_dist::Launch::from_env()?;
    if launch.world_size < 2 {
        bail!("the all-reduce measurements run under mpirun -n 2 (pt-host bench starts it)");
    }
    let device = candle_core::Device::Cpu;
    let timeout = std::time::Duration::from_secs(600);
    let collective = pt_dist::connect(&launch, Some(pt_dist::Backend::Mpi), &device, timeout)?;
    let gradients = candle_core::Tensor::ones(floats, candle_core::DType::F32, &device)?;
    let sum = collective.all_reduce_sum(&gradients)?;
    // Every rank added its ones.
    let expected = collective.world_size() as f32;
    if sum.max(0)?.to_scalar::<f32>()? != expected || sum.min(0)?.to_scalar::<f32>()? != expected {
        bail!("the all-reduce returned a wrong sum");
    }
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let started = Instant::now();
        collective.all_reduce_sum(&gradients)?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(floats as f64 * 4e-6 / best)
}

/// Tokens/s of a model measurement, and for training the share of time
/// spent assembling batches.
fn model_rate(args: &BenchArgs, measure: Measure) -> Result<(f64, Option<f64>)> {
    let mut data_share = None;
    let dir = tempfile::tempdir()?;
    let config: Config = serde_json::from_value(serde_json::json!({
        "hidden_size": args.hidden_size,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "vocab_size": args.vocab_size,
    }))?;
    pt_model::init::write_random_model(dir.path(), &config, 0.02, 42)?;
    let (device, dtype) = crate::device::select(args.device_map, DtypeArg::Auto, true, 0)?;
    let mut model = Bloom::load(dir.path(), &device, dtype)?;
    model.gradient_checkpointing = args.gradient_checkpointing;
    let tokens_per_batch = (args.block_size * args.batch_size) as f64;
    let tokens_per_second = match measure {
        Measure::Lora | Measure::Full => {
            let trainable = if measure == Measure::Lora {
                let adapter = AdapterConfig {
                    peft_type: "LORA".into(),
                    r: 8,
                    lora_alpha: 16.0,
                    target_modules: pt_model::LORA_TARGETS.map(String::from).to_vec(),
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
            let summary = trainer.train(&blocks, None, None, &mut clock)?;
            data_share = Some(
                summary["train_data_seconds"].as_f64().unwrap_or(0.0)
                    / summary["train_runtime"].as_f64().unwrap_or(1.0),
            );
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
        _ => bail!("{measure:?} is not a model measurement"),
    };
    Ok((tokens_per_second, data_share))
}

/// GFLOP/s of `[block·batch, h]·[h, 4h]` in the compute dtype, best of ten after a warm-up.
fn matmul_rate(args: &BenchArgs) -> Result<f64> {
    let (device, dtype) = crate::device::select(args.device_map, DtypeArg::Auto, true, 0)?;
    let (n, h) = (args.block_size * args.batch_size, args.hidden_size);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut random = |rows: usize, cols: usize| -> Result<candle_core::Tensor> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Ok(candle_core::Tensor::from_vec(values, (rows, cols), &device)?.to_dtype(dtype)?)
    };
    let (x, w) = (random(n, h)?, random(h, 4 * h)?);
    x.matmul(&w)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let started = Instant::now();
        std::hint::black_box(x.matmul(&w)?);
        device.synchronize()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * h * 4 * h) as f64 / best / 1e9)
}

#[derive(clap::Parser)]
struct PrepareCommand {
    #[command(flatten)]
    args: crate::prepare::PrepareArgs,
}

#[derive(clap::Parser)]
struct PluginCommand {
    #[command(flatten)]
    plugins: crate::plugins::PluginArgs,
}

fn corpus_bytes(args: &BenchArgs) -> Result<u64> {
    let mut bytes = 0;
    for path in pt_data::corpus::discover(&args.train_file_dir)? {
        bytes += std::fs::metadata(&path)?.len();
    }
    Ok(bytes)
}

/// MB/s of a whole `prepare` (read, plugins, tokenize, pack; the dataset
/// cache bypassed, the compiled plugin cached), best of two after a warm-up.
fn prepare_rate(args: &BenchArgs, plugin: Option<&Path>) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut argv: Vec<std::ffi::OsString> = vec!["prepare".into()];
    for (flag, value) in [
        (
            "--model_name_or_path",
            args.tokenizer_name_or_path.as_os_str(),
        ),
        ("--train_file_dir", args.train_file_dir.as_os_str()),
        ("--output_dir", dir.path().join("out").as_os_str()),
        ("--cache_dir", dir.path().join("cache").as_os_str()),
    ] {
        argv.extend([flag.into(), value.to_owned()]);
    }
    argv.extend(["--overwrite_cache".into(), "--disable_tqdm".into()]);
    if let Some(plugin) = plugin {
        argv.extend(["--plugin".into(), plugin.as_os_str().to_owned()]);
    }
    let prepare = <PrepareCommand as clap::Parser>::try_parse_from(argv)?.args;
    let mut best = f64::INFINITY;
    for run in 0..3 {
        let tokenizer = pt_data::Tokenizer::from_dir(prepare.tokenizer_dir())?;
        let started = Instant::now();
        crate::prepare::prepare_data(&prepare, tokenizer, true)?;
        if run > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    Ok(corpus_bytes(args)? as f64 / 1e6 / best)
}

/// MB/s of one plugin's steps alone over the corpus documents, in batches
/// as `prepare` sends them, best of three.
fn plugin_rate(args: &BenchArgs, path: &Path) -> Result<f64> {
    let cache = tempfile::tempdir()?;
    let argv = [
        "plugin".as_ref(),
        "--plugin".as_ref(),
        path.as_os_str(),
        "--allow_native".as_ref(),
    ];
    let parsed = <PluginCommand as clap::Parser>::try_parse_from(argv)?;
    let (_runtime, loaded) = crate::plugins::load(&parsed.plugins, cache.path())?;
    let steps = loaded[0].steps();
    let mut instance = steps.instantiate(0)?;
    let mut documents = Vec::new();
    for file in pt_data::corpus::discover(&args.train_file_dir)? {
        let read = pt_data::corpus::read_file(&file, &pt_data::ReadOptions::default())?;
        documents.extend(
            read.documents
                .into_iter()
                .map(|d| (format!("{}:{}", file.display(), d.line), d.text)),
        );
    }
    let bytes: usize = documents.iter().map(|(_, text)| text.len()).sum();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        for batch in documents.chunks(64) {
            let refs: Vec<pt_data::DocRef<'_>> = batch
                .iter()
                .map(|(source, text)| pt_data::DocRef { source, text })
                .collect();
            for kind in steps.steps() {
                instance
                    .apply(kind, &refs, 0)
                    .map_err(|failure| anyhow::anyhow!("{}: {}", path.display(), failure))?;
            }
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / 1e6 / best)
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
