//! The measurements themselves, run inside the child process: training,
//! evaluation and generation steps on a random BLOOM, matmuls, all-reduces,
//! data preparation and plugin calls.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pt_data::Blocks;
use pt_model::nf4::Nf4Config;
use pt_model::{AdapterConfig, BlockWeights, Model};
use pt_train::evaluate::evaluate;
use pt_train::trainer::{Interval, StepProgress, Trainable, Trainer, TrainerCallback};
use pt_train::{AdamWConfig, SchedulerType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::device::DtypeArg;

use super::{BenchArgs, FrozenWeights, Measure, Measured, gradient_floats};

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

/// Starts this process's peak resident memory afresh from what it holds now
/// (Linux's `clear_refs` 5), with freed memory returned first.
fn reset_peak() -> Result<()> {
    crate::runtime::release_freed_memory();
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak memory count")
}

/// Random token blocks (ids above the special tokens), fixed by `seed`.
fn random_blocks(args: &BenchArgs, rows: usize, seed: u64) -> Blocks {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Blocks::new(
        args.block_size,
        (0..rows * args.block_size)
            .map(|_| rng.random_range(4..args.vocab_size as u32))
            .collect(),
        vec![args.block_size as u32; rows],
    )
}

/// Records when each optimizer step ends.
struct StepClock {
    ends: Vec<Instant>,
}

impl TrainerCallback for StepClock {
    fn on_step(&mut self, _: &StepProgress) {
        crate::runtime::lap();
        self.ends.push(Instant::now());
    }
    fn on_eval_batch(&mut self, _: usize, _: usize) {}
    fn on_log(&mut self, _: &Value) {}
    fn on_save(&mut self, _: &Path) {}
}

pub(super) fn measure_here(args: &BenchArgs, measure: Measure) -> Result<Measured> {
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
        Measure::Tokenize | Measure::TokenizeTokenizersCrate => (
            tokenize_rate(args, measure == Measure::TokenizeTokenizersCrate)?,
            None,
        ),
        Measure::Matmul => (matmul_rate(args)?, None),
        Measure::AllreduceLora | Measure::AllreduceFull => (
            allreduce_rate(gradient_floats(args, measure == Measure::AllreduceLora))?,
            None,
        ),
        Measure::Lora
        | Measure::Full
        | Measure::Eval
        | Measure::Generate
        | Measure::TasksLetters
        | Measure::TasksWords
        | Measure::TasksWordsUnshared => model_rate(args, measure)?,
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
    crate::init_model::write_random(args.arch, &args.shape(), dir.path(), 42)?;
    // The peak is what loading and measuring take, not writing the random model.
    reset_peak()?;
    let (device, dtype) = crate::device::select(args.device_map, DtypeArg::Auto, true, 0)?;
    // bf16 on CUDA is the default dtype; on the CPU it is held in bf16 and
    // multiplied in f32, as `run --frozen_weights bf16` holds it.
    let block_weights = match args.frozen_weights {
        FrozenWeights::Default => None,
        FrozenWeights::Bf16 => device.is_cpu().then_some(BlockWeights::Bf16),
        FrozenWeights::Nf4 => Some(BlockWeights::Nf4(Nf4Config {
            double_quant: true,
            compute_dtype: dtype,
        })),
    };
    let mut model = Model::load_with(dir.path(), &device, dtype, block_weights)?;
    crate::runtime::keep_freed_memory(measure == Measure::Full);
    model.gradient_checkpointing = args.gradient_checkpointing;
    let tokens_per_batch = (args.block_size * args.batch_size) as f64;
    let tokens_per_second = match measure {
        Measure::Lora | Measure::Full => {
            let trainable = if measure == Measure::Lora {
                let adapter = AdapterConfig {
                    peft_type: "LORA".into(),
                    r: 8,
                    lora_alpha: 16.0,
                    target_modules: model.lora_targets().iter().map(|t| t.to_string()).collect(),
                    use_rslora: false,
                    use_dora: false,
                    modules_to_save: None,
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
                dir.path().to_path_buf(),
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
            evaluate(&model, &warm, args.batch_size, None, &mut |_, _| {
                crate::runtime::lap()
            })?;
            let started = Instant::now();
            evaluate(&model, &blocks, args.batch_size, None, &mut |_, _| {
                crate::runtime::lap()
            })?;
            (blocks.len() * blocks.block_size()) as f64 / started.elapsed().as_secs_f64()
        }
        Measure::Generate => {
            let prompt = random_blocks(args, 1, 4).row(0)[..16].to_vec();
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
        Measure::TasksLetters | Measure::TasksWords | Measure::TasksWordsUnshared => {
            let answer_tokens = if measure == Measure::TasksLetters {
                1
            } else {
                8
            };
            // One token short of the window, each answer's input loses the
            // context's first token: no two share one.
            let window = args.block_size - usize::from(measure == Measure::TasksWordsUnshared);
            let questions = |rows: usize, seed: u64| {
                // Contexts as long as a block, less the answers' tokens.
                let blocks = random_blocks(args, rows, seed);
                (0..rows)
                    .map(|r| {
                        let row = blocks.row(r);
                        let context_len = args.block_size + 1 - answer_tokens;
                        pt_tasks::Request {
                            context: row[..context_len].to_vec(),
                            continuations: (0..4u32)
                                .map(|c| {
                                    (0..answer_tokens as u32).map(|t| 4 + 10 * c + t).collect()
                                })
                                .collect(),
                        }
                    })
                    .collect::<Vec<_>>()
            };
            let score = |requests: &[pt_tasks::Request]| {
                pt_tasks::log_likelihoods(&model, requests, window, args.batch_size, &mut |_, _| {})
            };
            score(&questions(args.batch_size, 3))?;
            let requests = questions((args.steps + 1) * args.batch_size, 2);
            let tokens: usize = requests
                .iter()
                .map(|r| r.context.len() + r.continuations.iter().map(Vec::len).sum::<usize>())
                .sum();
            let started = Instant::now();
            score(&requests)?;
            tokens as f64 / started.elapsed().as_secs_f64()
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

/// The corpus's documents as `prepare` reads them, with their sources.
fn corpus_documents(args: &BenchArgs) -> Result<Vec<(String, String)>> {
    let mut documents = Vec::new();
    for file in pt_data::corpus::discover(&args.train_file_dir)? {
        let read = pt_data::corpus::read_file(&file, &pt_data::ReadOptions::default())?;
        documents.extend(
            read.documents
                .into_iter()
                .map(|d| (format!("{}:{}", file.display(), d.line), d.text)),
        );
    }
    Ok(documents)
}

/// MB/s of one thread tokenizing the corpus's documents as a `prepare`
/// worker does (ids and EOS, prepare's word cache, cold at the start), with
/// pt-host's byte-level BPE or the tokenizers crate; best of three.
fn tokenize_rate(args: &BenchArgs, tokenizers_crate: bool) -> Result<f64> {
    let documents = corpus_documents(args)?;
    let bytes: usize = documents.iter().map(|(_, text)| text.len()).sum();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut tokenizer = pt_data::Tokenizer::from_dir(&args.tokenizer_name_or_path)?;
        if tokenizers_crate {
            tokenizer.use_tokenizers_crate();
        } else if !tokenizer.uses_byte_level_bpe() {
            bail!(
                "{}: pt-host leaves this tokenizer to the tokenizers crate (not a byte-level BPE shape it encodes)",
                args.tokenizer_name_or_path.display()
            );
        }
        tokenizer.cache_words(crate::prepare::CACHED_WORDS);
        let started = Instant::now();
        for (source, text) in &documents {
            tokenizer
                .encode_document(text)
                .with_context(|| format!("{source}: cannot tokenize"))?;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / 1e6 / best)
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
    let documents = corpus_documents(args)?;
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
        loraplus_lr_ratio: None,
    }
}
