//! `pt-host bench`: training, evaluation, generation and data-preparation
//! throughput on a fixed random BLOOM, with PyTorch + PEFT measured on the same
//! work in the same run when torch is installed.
//!
//! Each measurement runs in its own child process (`--measure`), so the peak
//! memory it reports is that measurement's alone, as the reference script's is.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::device::DeviceArg;
use serde::{Deserialize, Serialize};

mod machine;
mod measure;
mod peak;
use machine::Machine;
use measure::measure_here;

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
    /// Benchmark questions scored as --eval_tasks scores them: block-long
    /// contexts, four one-token answers (MMLU's letters); tokens of context
    /// and answers per second, to set beside `eval`'s.
    TasksLetters,
    /// The same with four 8-token answers (a plugin task's words), which
    /// share their context's KV cache.
    TasksWords,
    /// The same answers each run after its own copy of the context (the
    /// window one token shorter, so that no context is shared): what the
    /// cache saves.
    TasksWordsUnshared,
    /// One f32 matrix product of the MLP's shape (`[tokens, h]·[h, 4h]`), GFLOP/s.
    Matmul,
    /// One thread tokenizing the corpus as a `prepare` worker does, with
    /// pt-host's byte-level BPE.
    Tokenize,
    /// The same with the tokenizers crate (HF's), which gives the same ids.
    TokenizeTokenizersCrate,
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
            Measure::TasksLetters => "benchmark tok/s (4 × 1-token answers)".into(),
            Measure::TasksWords => "benchmark tok/s (4 × 8-token answers)".into(),
            Measure::TasksWordsUnshared => "benchmark tok/s (the same, unshared)".into(),
            Measure::Matmul => "matmul GFLOP/s".into(),
            Measure::Tokenize => "tokenize MB/s, 1 thread".into(),
            Measure::TokenizeTokenizersCrate => "tokenize MB/s, tokenizers crate".into(),
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
            Measure::Tokenize
                | Measure::TokenizeTokenizersCrate
                | Measure::Prepare
                | Measure::PreparePlugin
                | Measure::PluginWasm
                | Measure::PluginNative
                | Measure::TasksLetters
                | Measure::TasksWords
                | Measure::TasksWordsUnshared
        )
    }

    fn is_allreduce(self) -> bool {
        matches!(self, Measure::AllreduceLora | Measure::AllreduceFull)
    }
}

impl BenchArgs {
    /// The random model's shape.
    fn shape(&self) -> crate::init_model::FamilyShape {
        crate::init_model::FamilyShape {
            hidden_size: self.hidden_size,
            layers: self.n_layer,
            heads: self.n_head,
            kv_heads: self.num_key_value_heads.unwrap_or(self.n_head),
            intermediate_size: self.intermediate_size.unwrap_or(4 * self.hidden_size),
            vocab_size: self.vocab_size,
            tied: self.tie_word_embeddings,
        }
    }
}

/// Trainable floats of the bench shape: LoRA r 8 on every linear layer of
/// a block (`r·(in + out)` each), or every weight of the model.
fn gradient_floats(args: &BenchArgs, lora: bool) -> usize {
    let (weights, _) = crate::init_model::family_model(args.arch, &args.shape())
        .expect("the bench's shape is a valid model");
    // LoRA adapts every matrix inside the blocks: their linear layers.
    let in_block = |name: &str| name.contains(".h.") || name.contains(".layers.");
    weights
        .iter()
        .filter(|(name, shape, _)| !lora || (shape.len() == 2 && in_block(name)))
        .map(|(_, shape, _)| match lora {
            true => 8 * (shape[0] + shape[1]),
            false => shape.iter().product(),
        })
        .sum()
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
pub enum FrozenWeights {
    Default,
    Bf16,
    Nf4,
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
    /// The random model's family (Qwen2.5-0.5B's shape: --arch qwen2
    /// --hidden_size 896 --n_layer 24 --n_head 14 --num_key_value_heads 2
    /// --intermediate_size 4864 --vocab_size 151936).
    #[arg(long = "arch", value_enum, default_value = "bloom")]
    pub arch: crate::init_model::Arch,
    /// Model width of the random model.
    #[arg(long = "hidden_size", default_value_t = 512)]
    pub hidden_size: usize,
    /// Blocks of the random model.
    #[arg(long = "n_layer", default_value_t = 8)]
    pub n_layer: usize,
    /// Attention heads.
    #[arg(long = "n_head", default_value_t = 8)]
    pub n_head: usize,
    /// Key/value heads of a Llama-family model (default: --n_head).
    #[arg(long = "num_key_value_heads")]
    pub num_key_value_heads: Option<usize>,
    /// MLP width of a Llama-family model (default: 4 × hidden).
    #[arg(long = "intermediate_size")]
    pub intermediate_size: Option<usize>,
    /// Whether a Llama-family model's LM head is the embedding.
    #[arg(long = "tie_word_embeddings", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = crate::args::parse_bool)]
    pub tie_word_embeddings: bool,
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
    /// The frozen base weights of the LoRA and eval measurements: the
    /// device's default (f32 on CPU, bf16 on CUDA), bf16 (on the CPU held in
    /// bf16 and multiplied in f32, as `run --frozen_weights bf16`), or NF4
    /// (QLoRA's 4 bits, double-quantised, dequantised to the default dtype).
    /// Only the default has a PyTorch reference here.
    #[arg(long = "frozen_weights", value_enum, default_value = "default")]
    pub frozen_weights: FrozenWeights,
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
    /// Also write the results as JSON (the machine, the shape, each
    /// measurement's rates and peaks), to keep or compare.
    #[arg(long = "json", value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Internal: run one measurement in this process and print it as JSON.
    #[arg(long = "measure", hide = true)]
    pub measure: Option<Measure>,
}

/// One row of the results: a measurement and its reference's.
#[derive(Debug, Serialize)]
struct Row {
    measure: String,
    label: String,
    pt_host: Measured,
    torch: Option<Measured>,
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
    let default_weights = args.frozen_weights == FrozenWeights::Default;
    let torch = match args.torch {
        TorchArg::Never => false,
        TorchArg::Always if !default_weights => bail!(
            "--frozen_weights {}: the PyTorch reference runs the default weights only; pass --torch never",
            frozen_weights_name(args.frozen_weights)
        ),
        TorchArg::Always => true,
        TorchArg::Auto => default_weights && torch_available(),
    };
    if torch && !args.torch_script.is_file() {
        bail!(
            "--torch_script {}: no such file (run from the repository root, pass --torch_script PATH, or --torch never)",
            args.torch_script.display()
        );
    }
    let measures = match (args.only.is_empty(), default_weights) {
        (true, true) => available_measures(&args),
        // Other frozen weights change LoRA training and evaluation only.
        (true, false) => vec![Measure::Lora, Measure::Eval],
        (false, _) => args.only.clone(),
    };
    for measure in &measures {
        let needs = match measure {
            Measure::PreparePlugin if args.plugin.is_none() => "--plugin PATH",
            Measure::PluginWasm | Measure::PluginNative if args.plugin_pair.is_empty() => {
                "--plugin_pair WASM,NATIVE"
            }
            Measure::Full if !default_weights => {
                "--frozen_weights default (full fine-tuning trains the weights themselves)"
            }
            m if m.is_allreduce() && !mpirun_available() => {
                "a pt-host built with --features mpi, and Open MPI's mpirun"
            }
            _ => continue,
        };
        bail!("--only {}: needs {needs}", measure.name());
    }
    let shape = args.shape();
    let family = match args.arch {
        crate::init_model::Arch::Bloom => "BLOOM".to_string(),
        arch => format!(
            "{} ({} KV heads, MLP {}, {} head)",
            crate::init_model::arch_name(arch),
            shape.kv_heads,
            shape.intermediate_size,
            if shape.tied { "tied" } else { "untied" }
        ),
    };
    println!(
        "bench: random {family} hidden {} × {} layers × {} heads, vocab {}, block {}, micro-batch {}, {}, {} CPU threads{}",
        args.hidden_size,
        args.n_layer,
        args.n_head,
        args.vocab_size,
        args.block_size,
        args.batch_size,
        match (args.device_map, args.frozen_weights) {
            (_, FrozenWeights::Nf4) => "NF4 frozen weights",
            (_, FrozenWeights::Bf16) => "bf16 frozen weights",
            (DeviceArg::Cuda, _) => "CUDA bf16",
            (DeviceArg::Cpu | DeviceArg::Auto, _) => "CPU f32",
        },
        candle_core::utils::get_num_threads(),
        if torch {
            "; torch = PyTorch + PEFT on the same work"
        } else {
            ""
        }
    );
    let machine = Machine::detect();
    println!("{}", machine.line());
    println!(
        "{:<40} {:>10} {:>9} {:>10} {:>9} {:>7} {:>8}",
        "measure", "pt-host", "peak MiB", "torch", "peak MiB", "speed×", "memory×"
    );
    let mut rows = Vec::new();
    let mut plugin_rates = Vec::new();
    let mut tokenize_rates = [None; 2];
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
        if let Some(slot) = [Measure::Tokenize, Measure::TokenizeTokenizersCrate]
            .iter()
            .position(|&m| m == measure)
        {
            tokenize_rates[slot] = Some(ours.rate);
        }
        if measure == Measure::Lora {
            data_share = ours.data_share;
        }
        rows.push(Row {
            measure: measure.name(),
            label: measure.label(&args),
            pt_host: ours,
            torch: reference,
        });
    }
    if let Some(path) = &args.json {
        let results = serde_json::json!({
            "machine": machine,
            "shape": shape_flags(&args),
            "device": device_name(args.device_map),
            "rows": rows,
        });
        pt_fs::write_atomically(path, &serde_json::to_vec_pretty(&results)?)?;
        println!("results in {}", path.display());
    }
    if let [wasm, native] = plugin_rates[..] {
        println!(
            "sandbox cost: the component runs at {:.2}× the native library's speed",
            wasm / native
        );
    }
    if let [Some(ours), Some(crate_rate)] = tokenize_rates {
        println!(
            "tokenization: pt-host's byte-level BPE runs at {:.2}× the tokenizers crate's speed (the same ids)",
            ours / crate_rate
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
        Measure::TasksLetters,
        Measure::TasksWords,
        Measure::TasksWordsUnshared,
        Measure::Generate,
        Measure::Matmul,
    ];
    let data = args.train_file_dir.exists() && args.tokenizer_name_or_path.exists();
    // pt-host's own encoder only where this tokenizer uses it.
    let byte_level = data
        && pt_data::Tokenizer::from_dir(&args.tokenizer_name_or_path)
            .is_ok_and(|t| t.uses_byte_level_bpe());
    if byte_level {
        measures.push(Measure::Tokenize);
    }
    if data {
        measures.extend([Measure::TokenizeTokenizersCrate, Measure::Prepare]);
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
    let shape = args.shape();
    let arch = clap::ValueEnum::to_possible_value(&args.arch)
        .expect("no skipped variants")
        .get_name()
        .to_string();
    let family = [
        ("--arch".to_string(), arch),
        ("--num_key_value_heads".into(), shape.kv_heads.to_string()),
        (
            "--intermediate_size".into(),
            shape.intermediate_size.to_string(),
        ),
        ("--tie_word_embeddings".into(), shape.tied.to_string()),
    ];
    family
        .into_iter()
        .flat_map(|(flag, value)| [flag, value])
        .chain(shape_numbers(args))
        .collect()
}

fn shape_numbers(args: &BenchArgs) -> Vec<String> {
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
        .args([
            "--frozen_weights",
            &frozen_weights_name(args.frozen_weights),
        ])
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

/// The flag value clap parses back into `weights`.
fn frozen_weights_name(weights: FrozenWeights) -> String {
    let value = clap::ValueEnum::to_possible_value(&weights).expect("every variant has a name");
    value.get_name().to_string()
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
