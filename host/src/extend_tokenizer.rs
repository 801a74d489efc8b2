//! `pt-host extend-tokenizer`: a model's tokenizer with domain tokens
//! learned from a corpus added (see `pt_data::domain_tokens`), and what they
//! save on that corpus. Training with `--tokenizer_name_or_path` on the result
//! and `--modules_to_save embed_tokens,lm_head` grows and trains the new rows.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use pt_data::corpus::read_documents;
use pt_data::domain_tokens::{DomainTokenOptions, extend_tokenizer, save_extended};
use pt_data::{ReadOptions, Tokenizer};

use crate::hub::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ExtendTokenizerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Take the base tokenizer from this directory instead of the model's.
    #[arg(long = "tokenizer_name_or_path", value_name = "DIR")]
    pub tokenizer_name_or_path: Option<PathBuf>,
    /// The domain corpus (.txt/.json/.jsonl, dir or file).
    #[arg(long = "train_file_dir", value_name = "DIR|FILE")]
    pub train_file_dir: PathBuf,
    /// Where the extended tokenizer and vocab_report.json are written.
    #[arg(long = "output_dir", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// At most this many tokens are added.
    #[arg(long = "num_new_tokens", default_value_t = 2000)]
    pub num_new_tokens: usize,
    /// A new token must be used at least this often in the corpus.
    #[arg(long = "min_frequency", default_value_t = 10)]
    pub min_frequency: u64,
    /// Longest CJK token, in characters (words of other scripts are taken whole).
    #[arg(long = "max_token_chars", default_value_t = 8)]
    pub max_token_chars: usize,
    /// Learn from at most this many MiB of text, the corpus's first files first.
    #[arg(long = "max_sample_mb", default_value_t = 100)]
    pub max_sample_mb: u64,
}

pub fn run(args: ExtendTokenizerArgs) -> Result<()> {
    if args.num_new_tokens == 0 || args.min_frequency == 0 || args.max_token_chars < 2 {
        bail!(
            "--num_new_tokens and --min_frequency must be at least 1, --max_token_chars at least 2"
        );
    }
    crate::args::require_new_output_dir(&args.output_dir)?;
    let base_dir = match &args.tokenizer_name_or_path {
        Some(dir) => dir.clone(),
        None => args.model.resolve()?,
    };
    let base = Tokenizer::from_dir(&base_dir)?;
    let (documents, files) = read_documents(
        &args.train_file_dir,
        &ReadOptions::default(),
        args.max_sample_mb << 20,
    )?;
    let bytes: usize = documents.iter().map(String::len).sum();
    eprintln!(
        "learning up to {} tokens from {:.1} MB ({} documents, {files} files) of {}",
        args.num_new_tokens,
        bytes as f64 / 1e6,
        documents.len(),
        args.train_file_dir.display()
    );
    let options = DomainTokenOptions {
        num_new_tokens: args.num_new_tokens,
        min_frequency: args.min_frequency,
        max_token_chars: args.max_token_chars,
    };
    let extension = extend_tokenizer(base.inner(), &documents, &options)?;
    save_extended(&extension, &base_dir, &args.output_dir)?;
    let report = args.output_dir.join("vocab_report.json");
    std::fs::write(&report, serde_json::to_vec_pretty(&extension)?)
        .with_context(|| format!("{}: cannot write", report.display()))?;
    let (before, after) = (extension.before, extension.after);
    println!(
        "added {} tokens (ids {}..{}) to the {} tokens of {}",
        extension.new_tokens.len(),
        extension.base_vocab_size,
        extension.base_vocab_size + extension.new_tokens.len(),
        extension.base_vocab_size,
        base_dir.display()
    );
    println!(
        "tokens per character on this text: {:.4} → {:.4} ({:+.1}%; {} → {} tokens)",
        before.tokens_per_character(),
        after.tokens_per_character(),
        100.0 * (after.tokens as f64 / before.tokens.max(1) as f64 - 1.0),
        before.tokens,
        after.tokens
    );
    let mut most_used = extension.new_tokens.clone();
    most_used.sort_by_key(|t| std::cmp::Reverse(t.uses));
    let shown: Vec<String> = most_used
        .iter()
        .take(12)
        .map(|t| format!("{:?} ×{} (was {} tokens)", t.token, t.uses, t.base_tokens))
        .collect();
    if !shown.is_empty() {
        println!("most used: {}", shown.join(", "));
    }
    println!(
        "wrote {} (tokenizer and vocab_report.json); train the new rows with --tokenizer_name_or_path {} --modules_to_save embed_tokens,lm_head (BLOOM: word_embeddings)",
        args.output_dir.display(),
        args.output_dir.display()
    );
    Ok(())
}
