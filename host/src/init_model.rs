//! `pt-host init-model`: a small BLOOM built here, so the quick start needs
//! no download: a byte-level BPE tokenizer trained on the corpus and random
//! weights initialised as HF initialises them.

use std::path::PathBuf;

use anyhow::{Result, bail};
use pt_data::corpus::{discover, read_file};
use pt_data::{ReadOptions, tokenize};
use pt_model::bloom::Config;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Preset {
    /// 4 layers, hidden 128, 4 heads, 4096 tokens: ~1.3M parameters; learns in minutes on a CPU.
    Tiny,
    /// 6 layers, hidden 256, 8 heads, 8192 tokens: ~6.8M parameters.
    Small,
}

#[derive(clap::Args, Debug)]
pub struct InitModelArgs {
    #[arg(long = "preset", value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Corpus the tokenizer is trained on (.txt/.json/.jsonl, dir or file).
    #[arg(long = "train_file_dir", value_name = "DIR|FILE")]
    pub train_file_dir: PathBuf,
    /// Where the HF model directory is written.
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Vocabulary size (default: the preset's).
    #[arg(long = "vocab_size")]
    pub vocab_size: Option<usize>,
    /// Seed of the random weights.
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
}

pub fn run(args: InitModelArgs) -> Result<()> {
    let (hidden_size, n_layer, n_head, default_vocab) = match args.preset {
        Preset::Tiny => (128, 4, 4, 4096),
        Preset::Small => (256, 6, 8, 8192),
    };
    let files = discover(&args.train_file_dir)?;
    let mut documents = Vec::new();
    for file in &files {
        documents.extend(
            read_file(file, &ReadOptions::default())?
                .documents
                .into_iter()
                .map(|d| d.text),
        );
    }
    if documents.is_empty() {
        bail!(
            "{}: no documents to train a tokenizer on",
            args.train_file_dir.display()
        );
    }
    let vocab_size = args.vocab_size.unwrap_or(default_vocab);
    let tokenizer = tokenize::train_tokenizer(&documents, vocab_size, &args.output_dir)?;
    let config = Config {
        hidden_size,
        n_head,
        n_layer,
        // A small corpus may yield fewer merges than asked for.
        vocab_size: tokenizer.vocab_size(),
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        model_type: Some("bloom".into()),
    };
    pt_model::init::write_random_model(&args.output_dir, &config, 0.02, args.seed)?;
    let parameters = config.vocab_size * hidden_size
        + n_layer * (12 * hidden_size * hidden_size + 13 * hidden_size)
        + 4 * hidden_size;
    println!(
        "{}: BLOOM with {n_layer} layers, hidden {hidden_size}, {n_head} heads, {} tokens ({} documents from {} files), {parameters} parameters",
        args.output_dir.display(),
        config.vocab_size,
        documents.len(),
        files.len()
    );
    Ok(())
}
