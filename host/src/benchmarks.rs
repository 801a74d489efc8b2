//! `--eval_tasks`: benchmark tasks scored at every evaluation, their
//! accuracies beside the loss (`eval_<task>_acc`) and every question's
//! scores in `OUTPUT_DIR/eval_tasks/`. A task is a file or directory in a
//! layout pt-tasks reads, or `FORMAT=PATH`: records a task plugin
//! (interface 0.2.0) turns into questions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pt_data::Tokenizer;
use pt_model::Model;
use pt_tasks::{Language, Question, Task, TaskOptions};

use crate::plugins::HostPlugin;
use crate::run_args::{RunArgs, TaskLanguageArg};

/// A `--eval_tasks` entry, read as far as it can be before the plugins load.
pub enum TaskSource {
    Read(Task),
    /// `FORMAT=PATH`, for the `--plugin` that reads FORMAT.
    Plugin {
        format: String,
        path: PathBuf,
    },
}

impl TaskSource {
    /// `FORMAT=PATH` when the text before `=` is a format name, else a path.
    fn parse(entry: &Path, language: Option<Language>, num_fewshot: usize) -> Result<Self> {
        let plugin_task = entry
            .to_str()
            .and_then(|text| text.split_once('='))
            .filter(|(format, _)| pt_plugin_host::tasks::is_format(format));
        if let Some((format, path)) = plugin_task {
            if !Path::new(path).exists() {
                bail!("{path}: no such task file or directory");
            }
            return Ok(TaskSource::Plugin {
                format: format.to_string(),
                path: PathBuf::from(path),
            });
        }
        let task = Task::load(entry, language)?;
        task.check_fewshot(num_fewshot)?;
        Ok(TaskSource::Read(task))
    }

    /// What its results are called: a file's or directory's name, or a
    /// plugin task's format.
    fn name(&self) -> &str {
        match self {
            TaskSource::Read(task) => &task.name,
            TaskSource::Plugin { format, .. } => format,
        }
    }

    /// The task, its records read by the loaded plugin that reads its format.
    fn into_task(self, plugins: &[HostPlugin], batch_size: usize) -> Result<Task> {
        let (format, path) = match self {
            TaskSource::Read(task) => return Ok(task),
            TaskSource::Plugin { format, path } => (format, path),
        };
        let spec = format!("--eval_tasks {format}={}", path.display());
        let reader = plugins
            .iter()
            .filter_map(HostPlugin::wasm)
            .find(|p| p.task_formats().contains(&format));
        let Some(plugin) = reader else {
            let known: Vec<String> = plugins
                .iter()
                .filter_map(HostPlugin::wasm)
                .flat_map(|p| p.task_formats().iter().map(|f| format!("{f} ({})", p.name)))
                .collect();
            bail!(
                "{spec}: no --plugin reads task format `{format}` (the loaded plugins read: {}); add the task plugin with --plugin",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        let records = pt_tasks::task_records(&path).with_context(|| spec.clone())?;
        let mut reader = plugin.task_reader(&format).with_context(|| spec.clone())?;
        let mut questions = Vec::new();
        for batch in records.chunks(batch_size.max(1)) {
            for item in reader.read(batch).with_context(|| spec.clone())? {
                let question = Question {
                    source: item.source,
                    question: item.context,
                    choices: item.continuations,
                    answer: item.gold,
                };
                questions.push((item.subject, question));
            }
        }
        let task = Task::given(format.clone(), questions).with_context(|| spec.clone())?;
        eprintln!(
            "task {}: {} questions from {} records of {} (plugin {}, format {format})",
            task.name,
            task.questions(),
            records.len(),
            path.display(),
            plugin.name
        );
        Ok(task)
    }
}

pub struct Benchmarks<'a> {
    tasks: Vec<Task>,
    tokenizer: &'a Tokenizer,
    options: TaskOptions,
    output_dir: PathBuf,
    show_bar: bool,
}

impl<'a> Benchmarks<'a> {
    /// The tasks `--eval_tasks` names, read and checked (before any data
    /// is prepared or model loaded; a plugin's, as far as it can be).
    pub fn read_tasks(args: &RunArgs) -> Result<Vec<TaskSource>> {
        let language = match args.eval_task_language {
            TaskLanguageArg::Auto => None,
            TaskLanguageArg::En => Some(Language::English),
            TaskLanguageArg::Zh => Some(Language::Chinese),
        };
        args.eval_tasks
            .iter()
            .map(|entry| TaskSource::parse(entry, language, args.eval_num_fewshot))
            .collect::<Result<Vec<_>>>()
            .and_then(|sources| {
                for (i, source) in sources.iter().enumerate() {
                    if sources[..i].iter().any(|s| s.name() == source.name()) {
                        bail!(
                            "two tasks are named `{}`: their results would overwrite each other (a task is named after its file or directory, a plugin task after its format)",
                            source.name()
                        );
                    }
                }
                Ok(sources)
            })
            .context("--eval_tasks")
    }

    /// The tasks ready to score with the model `args` names (resolved),
    /// plugin tasks read by the loaded `plugins`; `None` without any.
    pub fn new(
        sources: Vec<TaskSource>,
        args: &RunArgs,
        tokenizer: &'a Tokenizer,
        plugins: &[HostPlugin],
    ) -> Result<Option<Self>> {
        if sources.is_empty() {
            return Ok(None);
        }
        let batch_size = args.data.plugins.plugin_batch_size as usize;
        let tasks = sources
            .into_iter()
            .map(|source| source.into_task(plugins, batch_size))
            .collect::<Result<Vec<_>>>()?;
        if args.eval_num_fewshot > 0 {
            for task in tasks
                .iter()
                .filter(|t| t.prompts == pt_tasks::Prompts::Given)
            {
                eprintln!(
                    "note: task {}: its plugin writes whole prompts, so --eval_num_fewshot does not apply to it",
                    task.name
                );
            }
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
                    crate::runtime::lap();
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
