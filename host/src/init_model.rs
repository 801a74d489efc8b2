//! `pt-host init-model`: a small model of any family built here, so the
//! quick start needs no download: a byte-level BPE tokenizer trained on the
//! corpus and random weights initialised as HF initialises them.

use std::path::PathBuf;

use anyhow::Result;
use pt_data::corpus::read_documents;
use pt_data::{ReadOptions, tokenize};
use pt_model::bloom::Config;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Preset {
    /// 4 layers, hidden 128, 4 heads, 4096 tokens: ~1.3M parameters; learns in minutes on a CPU.
    Tiny,
    /// 6 layers, hidden 256, 8 heads, 8192 tokens: ~6.8M parameters.
    Small,
}

/// The architecture of the model built.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Arch {
    Bloom,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

#[derive(clap::Args, Debug)]
pub struct InitModelArgs {
    #[arg(long = "preset", value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// The family: BLOOM (ALiBi, LayerNorm, GELU) or a Llama-family model
    /// (RoPE, RMSNorm, SwiGLU; grouped-query attention with half as many
    /// KV heads; Qwen2 with q/k/v biases, Qwen3 with q/k norms; Qwen tied
    /// heads, Llama and Mistral untied).
    #[arg(long = "arch", value_enum, default_value = "bloom")]
    pub arch: Arch,
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
    let (documents, files) =
        read_documents(&args.train_file_dir, &ReadOptions::default(), u64::MAX)?;
    let vocab_size = args.vocab_size.unwrap_or(default_vocab);
    let tokenizer = tokenize::train_tokenizer(&documents, vocab_size, &args.output_dir)?;
    // A small corpus may yield fewer merges than asked for.
    let vocab_size = tokenizer.vocab_size();
    let shape = FamilyShape {
        hidden_size,
        layers: n_layer,
        heads: n_head,
        kv_heads: n_head / 2,
        intermediate_size: 3 * hidden_size,
        vocab_size,
        tied: matches!(args.arch, Arch::Qwen2 | Arch::Qwen3),
    };
    let weights = write_random(args.arch, &shape, &args.output_dir, args.seed)?;
    let parameters: usize = weights
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum();
    println!(
        "{}: {} with {n_layer} layers, hidden {hidden_size}, {n_head} heads, {vocab_size} tokens ({} documents from {} files), {parameters} parameters",
        args.output_dir.display(),
        arch_name(args.arch),
        documents.len(),
        files
    );
    Ok(())
}

pub fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Bloom => "BLOOM",
        Arch::Llama => "Llama",
        Arch::Mistral => "Mistral",
        Arch::Qwen2 => "Qwen2",
        Arch::Qwen3 => "Qwen3",
    }
}

/// The shape of a Llama-family model.
pub struct FamilyShape {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tied: bool,
}

/// `config.json` of a Llama-family model of `shape` (transformers 5's
/// dialect): its `model_type`, architecture class and RoPE θ.
fn llama_family_config(
    (model_type, architecture, theta): (&str, &str, f64),
    shape: &FamilyShape,
) -> serde_json::Value {
    serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden_size / shape.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_parameters": { "rope_type": "default", "rope_theta": theta },
        "tie_word_embeddings": shape.tied,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "sliding_window": null,
        "use_sliding_window": false,
    })
}

/// The weights (names, shapes, initialisation) and `config.json` of a model
/// of `arch` and `shape` (BLOOM: hidden, layers, heads and vocabulary alone).
pub fn family_model(
    arch: Arch,
    shape: &FamilyShape,
) -> Result<(Vec<pt_model::init::WeightSpec>, serde_json::Value)> {
    let family = match arch {
        Arch::Bloom => {
            let config = Config {
                hidden_size: shape.hidden_size,
                n_head: shape.heads,
                n_layer: shape.layers,
                vocab_size: shape.vocab_size,
                layer_norm_epsilon: 1e-5,
                apply_residual_connection_post_layernorm: false,
                model_type: Some("bloom".into()),
            };
            let hf_config = pt_model::init::bloom_hf_config(&config);
            return Ok((pt_model::init::bloom_weights(&config), hf_config));
        }
        Arch::Llama => ("llama", "LlamaForCausalLM", 500_000.0),
        Arch::Mistral => ("mistral", "MistralForCausalLM", 1_000_000.0),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM", 1_000_000.0),
        Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM", 1_000_000.0),
    };
    let hf_config = llama_family_config(family, shape);
    let config: pt_model::llama::Config = serde_json::from_value(hf_config.clone())?;
    Ok((pt_model::init::llama_weights(&config), hf_config))
}

/// Writes a random model of `arch` and `shape` into `dir`; returns its
/// weights' names and shapes.
pub fn write_random(
    arch: Arch,
    shape: &FamilyShape,
    dir: &std::path::Path,
    seed: u64,
) -> Result<Vec<pt_model::init::WeightSpec>> {
    let (weights, hf_config) = family_model(arch, shape)?;
    pt_model::init::write_random_weights(dir, &weights, hf_config, 0.02, seed)?;
    Ok(weights)
}
