//! `pt-host generate`: continuations of prompts from a model (+ adapter),
//! streamed to the terminal as they are produced.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use pt_data::Tokenizer;
use pt_model::generate::{GenerationConfig, generate};

use crate::args::parse_bool;
use crate::device::{self, DeviceArg, DtypeArg};
use crate::hub::ModelArgs;
use crate::prepare::tokenizer_with_adapter;
use crate::quantize::QuantizationArgs;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT LoRA adapter to apply.
    #[arg(long = "peft_path", value_name = "DIR")]
    pub peft_path: Option<PathBuf>,
    /// A prompt; repeat for a batch.
    #[arg(long = "prompt")]
    pub prompt: Vec<String>,
    /// A file with one prompt per non-empty line (added after --prompt).
    #[arg(long = "prompt_file", value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    #[arg(long = "max_new_tokens", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sample (true) or take the most likely token (false, greedy), as HF's `do_sample`.
    #[arg(long = "do_sample", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub do_sample: bool,
    #[arg(long = "temperature", default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long = "top_k", default_value_t = 50)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities sum to p.
    #[arg(long = "top_p", default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalty on tokens already in the text (1: none; 1.1–1.3 curbs loops).
    #[arg(long = "repetition_penalty", default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    #[arg(long = "torch_dtype", value_enum, default_value = "auto")]
    pub torch_dtype: DtypeArg,
    #[arg(long = "device_map", value_enum, default_value = "auto")]
    pub device_map: DeviceArg,
    #[command(flatten)]
    pub quantization: QuantizationArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut prompts = args.prompt.clone();
    if let Some(file) = &args.prompt_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--prompt_file {}: cannot read", file.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        bail!("nothing to continue: pass --prompt TEXT (repeatable) or --prompt_file FILE");
    }
    if args.do_sample && (args.temperature <= 0.0 || !(0.0..=1.0).contains(&args.top_p)) {
        bail!("--do_sample needs --temperature > 0 and --top_p in (0, 1]");
    }
    if args.repetition_penalty <= 0.0 {
        bail!("--repetition_penalty must be positive");
    }
    let (device, dtype) = device::select(args.device_map, args.torch_dtype, true, 0)?;
    let model_dir = args.model.resolve()?;
    let mut model = args.quantization.load(&model_dir, &device, dtype, true)?;
    if let Some(adapter) = &args.peft_path {
        model.load_adapter(adapter)?;
    }
    let tokenizer_dir = tokenizer_with_adapter(&model_dir, args.peft_path.as_deref());
    let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
    crate::run::fit_vocabulary(&tokenizer, tokenizer_dir, &mut model, false, true)?;
    crate::runtime::keep_freed_memory(false);
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = tokenizer.encode(p)?;
            if ids.is_empty() {
                bail!("prompt {} is empty after tokenization", i + 1);
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        eos_id: tokenizer.eos_id,
        pad_id: tokenizer.pad_id,
    };
    let mut printer = Printer {
        tokenizer: &tokenizer,
        prompts: &prompts,
        generated: vec![Vec::new(); prompts.len()],
        printed: 0,
    };
    if prompts.len() == 1 {
        print!("{}", prompts[0]);
    }
    let outputs = generate(&model, &ids, &config, &mut |row, token| {
        printer.on_token(row, token)
    })?;
    if prompts.len() == 1 {
        printer.print_stream(true)?;
        println!();
    } else {
        // Rows that ran to --max_new_tokens without EOS.
        for (row, tokens) in outputs.iter().enumerate() {
            if tokens.last() != Some(&tokenizer.eos_id) {
                printer.print_row(row)?;
            }
        }
    }
    Ok(())
}

/// Streams one prompt's text as tokens come; prints each row of a batch when it ends.
struct Printer<'a> {
    tokenizer: &'a Tokenizer,
    prompts: &'a [String],
    generated: Vec<Vec<u32>>,
    /// Characters of the single prompt's continuation already printed.
    printed: usize,
}

impl Printer<'_> {
    fn on_token(&mut self, row: usize, token: u32) -> Result<()> {
        self.generated[row].push(token);
        if self.prompts.len() > 1 {
            if token == self.tokenizer.eos_id {
                self.print_row(row)?;
            }
            return Ok(());
        }
        // A byte-level token may end inside a character: wait for the rest.
        self.print_stream(false)
    }

    /// Prints the single prompt's continuation not printed yet; unless
    /// `to_end`, holds back a trailing incomplete character.
    fn print_stream(&mut self, to_end: bool) -> Result<()> {
        let text = self.tokenizer.decode(&self.generated[0])?;
        if !to_end && text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        let new: String = text.chars().skip(self.printed).collect();
        self.printed += new.chars().count();
        print!("{new}");
        std::io::stdout().flush().ok();
        Ok(())
    }

    fn print_row(&self, row: usize) -> Result<()> {
        let text = self.tokenizer.decode(&self.generated[row])?;
        println!("[{}] {}{}", row + 1, self.prompts[row], text);
        Ok(())
    }
}
