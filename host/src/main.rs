//! `pt-host`: continued pretraining of LLMs on domain corpora, extensible with
//! sandboxed WebAssembly plugins.

// Unsafe code only where the runtime is tuned (runtime.rs).
#![deny(unsafe_code)]

mod args;
mod bench;
mod benchmarks;
mod device;
mod extend_tokenizer;
mod generate;
mod hints;
mod hub;
mod init_model;
mod make_corpus;
mod merge;
mod plot;
mod plugin_cmd;
mod plugin_metrics;
mod plugins;
mod prepare;
mod progress;
mod quantize;
mod recipe;
mod report;
mod run;
mod run_args;
mod runtime;
mod scaffold;
mod tensorboard;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};

#[derive(Parser)]
#[command(name = "pt-host", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print the resolved configuration (recipe, command line, defaults; each
    /// value with its source) as a recipe, and exit.
    #[arg(long = "print_config", global = true)]
    print_config: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Clean, tokenize and pack a corpus into training and validation blocks.
    Prepare(Box<prepare::PrepareArgs>),
    /// Prepare the data, then train a LoRA adapter (--do_train) and/or evaluate (--do_eval).
    Run(Box<run_args::RunArgs>),
    /// Evaluate a model (+ --peft_path adapter) on --validation_file_dir (a dir or a file)
    /// and/or --eval_tasks benchmarks, no training: eval_loss, perplexity, accuracy, benchmark
    /// accuracies and metric plugins; with --base_model_name_or_path, a base-vs-trained report.
    /// Takes `run`'s flags.
    Eval(Box<run_args::RunArgs>),
    /// Fold a LoRA adapter into its base model: an HF model directory.
    Merge(merge::MergeArgs),
    /// Continue prompts with a model (+ adapter): greedy or sampled, streamed.
    Generate(Box<generate::GenerateArgs>),
    /// Plugins: new projects, signing keys, bundles and registries (new, keygen, pack, sign, verify, inspect, install, list, remove, publish, pull, test).
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
    /// Build a small model here: a BPE tokenizer trained on a corpus and random weights.
    #[command(name = "init-model")]
    InitModel(init_model::InitModelArgs),
    /// Add domain tokens learned from a corpus to a model's tokenizer (old ids unchanged),
    /// and report the tokens per character they save.
    #[command(name = "extend-tokenizer")]
    ExtendTokenizer(extend_tokenizer::ExtendTokenizerArgs),
    /// Make a corpus of any size from a small one: unique documents and a known share of exact
    /// and near duplicates (listed in duplicates.jsonl), for tests and benchmarks.
    #[command(name = "make-corpus")]
    MakeCorpus(make_corpus::MakeCorpusArgs),
    /// Throughput and peak memory of training, evaluation and generation on a
    /// random BLOOM, beside PyTorch + PEFT on the same work when torch is installed.
    Bench(Box<bench::BenchArgs>),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The command line, with a recipe file (`pt-host run recipe.yaml ...`) expanded.
fn parse_command_line() -> Result<Cli, ExitCode> {
    // A flag given twice (recipe, then an alias on the command line) keeps the last.
    let command = Cli::command().args_override_self(true);
    let (args, recipe) =
        recipe::expand(std::env::args_os().collect(), &command).map_err(|error| {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        })?;
    let matches = command
        .clone()
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.print_config {
        recipe::print(&matches, &command, recipe.as_ref());
        return Err(ExitCode::SUCCESS);
    }
    Ok(cli)
}

fn main() -> ExitCode {
    runtime::limit_spinning();
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging(cli.verbose);
    // The command runs on a worker of rayon's pool, where candle's matmuls
    // and the fused kernels run: the thread that calls them then works on
    // them, instead of a third thread competing for the cores with the
    // pool's workers.
    let result = rayon::ThreadPoolBuilder::new()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|pool| pool.install(|| dispatch(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", hints::explain(&error));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Prepare(args) => prepare::run(*args),
        Command::Run(args) => run::run(*args),
        Command::Eval(args) => run::eval(*args),
        Command::Merge(args) => merge::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::InitModel(args) => init_model::run(args),
        Command::ExtendTokenizer(args) => extend_tokenizer::run(args),
        Command::MakeCorpus(args) => make_corpus::run(args),
        Command::Plugin(command) => plugin_cmd::run(command),
        Command::Bench(args) => bench::run(*args),
    }
}
