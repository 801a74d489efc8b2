//! `--eval_tasks`: benchmark tasks scored at every evaluation, their
//! accuracies beside the loss (`eval_<task>_acc`) and every question's
//! scores in `OUTPUT_DIR/eval_tasks/`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pt_data::Tokenizer;
use pt_model::Model;
use pt_tasks::{Language, Task, TaskOptions};

use crate::run_args::{RunArgs, TaskLanguageArg};

pub struct Benchmarks<'a> {
    tasks: Vec<Task>,
    tokenizer: &'a Tokenizer,
    options: TaskOptions,
    output_dir: PathBuf,
    show_bar: bool,
}

impl<'a> Benchmarks<'a> {
    /// The tasks `--eval_tasks` names, read and checked (before any data
    /// is prepared or model loaded).
    pub fn read_tasks(args: &RunArgs) -> Result<Vec<Task>> {
        let language = match args.eval_task_language {
            TaskLanguageArg::Auto => None,
            TaskLanguageArg::En => Some(Language::English),
            TaskLanguageArg::Zh => Some(Language::Chinese),
        };
        args.eval_tasks
            .iter()
            .map(|path| {
                let task = Task::load(path, language)?;
                task.check_fewshot(args.eval_num_fewshot)?;
                Ok(task)
            })
            .collect::<Result<Vec<_>>>()
            .context("--eval_tasks")
    }

    /// The tasks ready to score with the model `args` names (resolved);
    /// `None` without any.
    pub fn new(tasks: Vec<Task>, args: &RunArgs, tokenizer: &'a Tokenizer) -> Result<Option<Self>> {
        if tasks.is_empty() {
            return Ok(None);
        }
        let max_length = match args.eval_max_length {
            Some(length) => length,
            None => pt_tasks::max_length(&args.data.model_name_or_path)?,
        };
        Ok(Some(Self {
            tasks,
            tokenizer,
            options: TaskOptions {
                num_fewshot: args.eval_num_fewshot,
                batch_size: args.per_device_eval_batch_size,
                max_length,
            },
            output_dir: args.data.output_dir.join("eval_tasks"),
            show_bar: !args.data.disable_tqdm
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }))
    }

    /// Scores every task: `<task>_acc`, `_acc_macro`, `_acc_norm`.
    pub fn score(&self, model: &Model) -> Result<Vec<(String, f64)>> {
        let mut metrics = Vec::new();
        for task in &self.tasks {
            let started = Instant::now();
            let bar = match self.show_bar {
                true => ProgressBar::new(0),
                false => ProgressBar::hidden(),
            };
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches (eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(task.name.clone());
            let results = pt_tasks::evaluate(
                task,
                model,
                self.tokenizer,
                self.options,
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )?;
            bar.finish_and_clear();
            results.write(&self.output_dir)?;
            eprintln!(
                "task {}: {} questions, {}-shot, acc {:.4} (macro {:.4}) in {:.1} s; each question in {}/{}.jsonl",
                task.name,
                task.questions(),
                self.options.num_fewshot,
                results.acc,
                results.acc_macro,
                started.elapsed().as_secs_f64(),
                self.output_dir.display(),
                task.name
            );
            metrics.extend(results.metrics());
        }
        Ok(metrics)
    }
}
