//! `pt-host run`: prepare the data, then train a LoRA adapter and/or evaluate,
//! with the flags of MedicalGPT's `pretraining.py` and HF `TrainingArguments`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use pt_data::Tokenizer;
use pt_dist::{Backend, Collective, Launch};
use pt_model::{AdapterConfig, Model};
use pt_train::evaluate::{eval_results, evaluate_across};
use pt_train::trainer::{
    Interval, StepProgress, Trainable, Trainer, TrainerCallback, TrainingArguments,
};
use pt_train::{AdamWConfig, SchedulerType};
use pt_train::{list_checkpoints, write_results};
use serde_json::{Value, json};

use crate::benchmarks::Benchmarks;
use crate::device;
use crate::plugin_metrics::PluginMetrics;
use crate::prepare::{PreparedData, prepare_data, tokenizer_with_adapter};
use crate::progress::TrainProgress;
use crate::run_args::{
    BackendArg, RunArgs, SchedulerArg, apply_hf_flags, check_flags, report_ignored_flags,
    target_modules,
};
use crate::tensorboard::{self, EventWriter};

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
/// has rows (tokens added by extend-tokenizer) grows the vocabulary where
/// `grow` says the new rows train, and is refused before any work otherwise.
pub fn fit_vocabulary(
    tokenizer: &Tokenizer,
    tokenizer_dir: &Path,
    model: &mut Model,
    grow: bool,
    main: bool,
) -> Result<()> {
    let (tokens, rows) = (tokenizer.vocab_size(), model.config().vocab_size);
    if tokens <= rows {
        return Ok(());
    }
    if !grow {
        bail!(
            "the tokenizer in {} has {tokens} tokens, but the model's embedding has {rows} rows (vocab_size in config.json): \
             use the model's own tokenizer (--tokenizer_name_or_path), or train the added tokens' rows \
             (--modules_to_save {},lm_head, or --use_peft false)",
            tokenizer_dir.display(),
            model.embedding_name()
        );
    }
    model.resize_vocabulary(tokens)?;
    if main {
        eprintln!(
            "vocabulary: {rows} → {tokens} rows for the tokens {} adds (new rows: the mean of the old ones, as transformers' resize_token_embeddings)",
            tokenizer_dir.display()
        );
    }
    Ok(())
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
        crate::runtime::lap();
        self.progress.step(progress);
    }

    fn on_eval_batch(&mut self, done: usize, total: usize) {
        crate::runtime::lap();
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
    args.do_eval = true;
    if args.base_model_name_or_path.is_some() {
        return crate::report::eval_and_compare(args);
    }
    match (&args.data.validation_file_dir, args.eval_tasks.is_empty()) {
        (Some(_), _) => run(args),
        (None, false) => evaluate_tasks_only(args),
        (None, true) => bail!(
            "pt-host eval needs --validation_file_dir (a directory or a .txt/.json/.jsonl file), --eval_tasks, or both"
        ),
    }
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
    let tasks = Benchmarks::read_tasks(args)?;
    let (mut model, trainable, data) = load_model_and_data(args, collective, device, dtype)?;
    let prepared = &data.prepared;
    model.gradient_checkpointing = args.gradient_checkpointing;
    if args.gradient_checkpointing && main {
        eprintln!("gradient checkpointing: block activations are recomputed in the backward pass");
    }
    let output_dir = args.data.output_dir.clone();
    let mut trainer = Trainer::new(
        training_arguments(args),
        &mut model,
        trainable,
        base_model_name,
        args.data.tokenizer_dir().to_path_buf(),
    )?
    .across(collective);
    let mut console = Console {
        progress: TrainProgress::new(args.data.disable_tqdm || !main),
        log: Vec::new(),
        tensorboard: if main { tensorboard(args)? } else { None },
        quiet: !main,
    };
    console.scalars(0, &tensorboard::data_scalars(&prepared.report));
    let benchmarks = Benchmarks::new(tasks, args, &data.tokenizer, &data.plugins)?;
    let mut all_results = json!({});
    if args.do_train {
        let summary = train(args, &mut trainer, &data, benchmarks.as_ref(), &mut console)?;
        merge(&mut all_results, &summary);
    }
    if args.do_eval {
        let results = evaluate(
            args,
            collective,
            &trainer,
            &data,
            benchmarks.as_ref(),
            &mut console,
        )?;
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

/// The model, checked against `--model_type` and fitted to the tokenizer,
/// what trains, and the prepared data. Rank 0 downloads the model and
/// prepares the data first (HF's `main_process_first`); the others then find
/// both in the cache.
fn load_model_and_data(
    args: &mut RunArgs,
    collective: &dyn Collective,
    device: Device,
    dtype: DType,
) -> Result<(Model, Trainable, PreparedData)> {
    let main = collective.is_main();
    if main {
        report_ignored_flags(args);
        check_output_dir(args)?;
    } else {
        collective.barrier()?;
    }
    // The model first: a wrong model fails before any data work.
    let (model, trainable, tokenizer) = load_model(args, device, dtype, main)?;
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
    Ok((model, trainable, data))
}

/// The model (hub ids resolved), checked against `--model_type`, with what
/// trains attached, and its tokenizer (an adapter's, where it brings one).
fn load_model(
    args: &mut RunArgs,
    device: Device,
    dtype: DType,
    main: bool,
) -> Result<(Model, Trainable, Tokenizer)> {
    args.data.resolve_models()?;
    // An adapter saved with an extended tokenizer is read with it.
    if args.data.tokenizer_name_or_path.is_none() {
        let model_dir = &args.data.model_name_or_path;
        let dir = tokenizer_with_adapter(model_dir, args.peft_path.as_deref()).to_path_buf();
        args.data.tokenizer_name_or_path = Some(dir);
    }
    let model_dir = &args.data.model_name_or_path;
    let mut model = args.quantization.load(model_dir, &device, dtype, main)?;
    let actual = &model.config().model_type;
    if args.model_type != "auto" && &args.model_type != actual {
        bail!(
            "--model_type {}, but {} is a `{actual}` model (--model_type auto reads config.json)",
            args.model_type,
            model_dir.display()
        );
    }
    let tokenizer = Tokenizer::from_dir(args.data.tokenizer_dir())?;
    let trainable = attach_trainable(args, &mut model, &tokenizer, main)?;
    crate::runtime::keep_freed_memory(matches!(trainable, Trainable::Full { .. }));
    Ok((model, trainable, tokenizer))
}

/// `pt-host eval --eval_tasks ...` without a corpus: the benchmarks alone,
/// in `eval_results.json` and `eval_tasks/`.
fn evaluate_tasks_only(mut args: RunArgs) -> Result<()> {
    check_flags(&args)?;
    apply_hf_flags(&mut args);
    if Launch::from_env()?.world_size > 1 {
        bail!(
            "pt-host eval without --validation_file_dir scores the benchmarks in one process; start it without a launcher"
        );
    }
    let (device, dtype) = device::select(args.device_map, args.torch_dtype, args.tf32, 0)?;
    let tasks = Benchmarks::read_tasks(&args)?;
    report_ignored_flags(&args);
    let (model, _, tokenizer) = load_model(&mut args, device, dtype, true)?;
    let cache_dir = args
        .data
        .cache_dir
        .clone()
        .unwrap_or_else(crate::args::default_cache_dir);
    let (_runtime, plugins) = crate::plugins::load(&args.data.plugins, &cache_dir)?;
    let benchmarks = Benchmarks::new(tasks, &args, &tokenizer, &plugins)?
        .context("pt-host eval needs --validation_file_dir, --eval_tasks or both")?;
    let mut results = json!({});
    for (name, value) in benchmarks.score(&model)? {
        results[format!("eval_{name}")] = json!(value);
    }
    println!("{results}");
    let output_dir = &args.data.output_dir;
    write_results(output_dir, "eval_results.json", &results)?;
    write_results(output_dir, "all_results.json", &results)?;
    eprintln!("outputs in {}", output_dir.display());
    Ok(())
}

/// What trains: a loaded or new LoRA adapter (with any modules trained
/// whole), or every weight; the vocabulary grown to the tokenizer's where
/// its new rows train. Its size reported as PEFT's
/// `print_trainable_parameters` does.
fn attach_trainable(
    args: &RunArgs,
    model: &mut Model,
    tokenizer: &Tokenizer,
    main: bool,
) -> Result<Trainable> {
    let tokenizer_dir = args.data.tokenizer_dir();
    let trainable = match (&args.peft_path, args.use_peft) {
        (Some(path), _) => {
            // The adapter brings its own vocabulary rows, if it grew them.
            let config = model.load_adapter(path)?;
            fit_vocabulary(tokenizer, tokenizer_dir, model, false, main)?;
            model.set_lora_dropout(args.lora_dropout);
            Trainable::Adapter(config)
        }
        (None, true) => {
            let grow = model.trains_embedding(&args.modules_to_save);
            fit_vocabulary(tokenizer, tokenizer_dir, model, grow, main)?;
            let mut config = AdapterConfig {
                peft_type: "LORA".into(),
                r: args.lora_rank,
                lora_alpha: args.lora_alpha,
                target_modules: target_modules(
                    &args.target_modules,
                    model.lora_targets(),
                    &model.config().model_type,
                )?,
                use_rslora: args.use_rslora,
                use_dora: args.use_dora,
                modules_to_save: None,
            };
            model.add_lora(&config, args.lora_dropout, args.data.seed)?;
            if !args.modules_to_save.is_empty() {
                config.modules_to_save = Some(model.train_modules(&args.modules_to_save)?);
            }
            Trainable::Adapter(config)
        }
        (None, false) => {
            fit_vocabulary(tokenizer, tokenizer_dir, model, true, main)?;
            Trainable::Full {
                source: args.data.model_name_or_path.clone(),
            }
        }
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
        loraplus_lr_ratio: args.loraplus_lr_ratio,
    }
}

/// `--do_train`: resumes if asked, trains, writes the final outputs and
/// `train_results.json`; returns the training summary.
fn train(
    args: &RunArgs,
    trainer: &mut Trainer<'_>,
    data: &PreparedData,
    benchmarks: Option<&Benchmarks<'_>>,
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
    let mut metrics = PluginMetrics::new(data, benchmarks);
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
    benchmarks: Option<&Benchmarks<'_>>,
    console: &mut Console,
) -> Result<Value> {
    let mut metrics = PluginMetrics::new(data, benchmarks);
    let evaluation = evaluate_across(
        collective,
        trainer.model,
        &data.prepared.validation,
        args.per_device_eval_batch_size,
        metrics.as_sink(),
        &mut |done, total| console.on_eval_batch(done, total),
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

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}
