//! `pt-host eval --base_model_name_or_path BASE`: did continued pretraining
//! help? The base model and the trained one (the base with `--peft_path`, or
//! a merged or fully trained `--model_name_or_path`) are evaluated on the same
//! domain corpus, general corpus and benchmark tasks, each into its own
//! directory; one report then puts them side by side.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pt_dist::Launch;
use pt_tasks::{Difference, TaskComparison};
use serde::Serialize;
use serde_json::Value;

use crate::run_args::RunArgs;

/// A model's loss and perplexity on one corpus.
#[derive(Clone, Copy, Debug, Serialize)]
struct Perplexity {
    eval_loss: f64,
    perplexity: f64,
}

impl Perplexity {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("eval_results.json");
        let results: Value = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", path.display()))?;
        let number = |key: &str| {
            results[key]
                .as_f64()
                .with_context(|| format!("{}: no {key}", path.display()))
        };
        Ok(Self {
            eval_loss: number("eval_loss")?,
            perplexity: number("perplexity")?,
        })
    }
}

/// What one model's evaluation left in its directory.
#[derive(Debug, Serialize)]
struct Evaluation {
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<Perplexity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    general: Option<Perplexity>,
    #[serde(skip)]
    dir: PathBuf,
}

/// Base and trained perplexity on one corpus.
#[derive(Debug, Serialize)]
struct PerplexityChange {
    corpus: String,
    base: f64,
    trained: f64,
    /// `trained / base - 1`: below zero, the trained model predicts the corpus better.
    relative_change: f64,
}

impl PerplexityChange {
    fn new(corpus: &Path, base: Perplexity, trained: Perplexity) -> Self {
        Self {
            corpus: corpus.display().to_string(),
            base: base.perplexity,
            trained: trained.perplexity,
            relative_change: trained.perplexity / base.perplexity - 1.0,
        }
    }
}

/// `eval_report.json`.
#[derive(Debug, Serialize)]
struct Report {
    base: Evaluation,
    trained: Evaluation,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain_perplexity: Option<PerplexityChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    general_perplexity: Option<PerplexityChange>,
    tasks: Vec<TaskComparison>,
}

/// Evaluates the base and the trained model and writes the report into
/// `--output_dir` (each model's own outputs under `base/` and `trained/`).
pub fn eval_and_compare(args: RunArgs) -> Result<()> {
    let Some(base_model) = args.base_model_name_or_path.clone() else {
        bail!("a comparison needs --base_model_name_or_path");
    };
    if Launch::from_env()?.world_size > 1 {
        bail!(
            "--base_model_name_or_path: the comparison runs in one process; start pt-host eval without a launcher"
        );
    }
    let output_dir = args.data.output_dir.clone();
    let domain = args.data.validation_file_dir.clone();
    let general = args.general_file_dir.clone();

    let mut trained = args;
    trained.base_model_name_or_path = None;
    trained.general_file_dir = None;
    let mut base = trained.clone();
    base.data.model_name_or_path = base_model;
    // The base is read with its own tokenizer and without the adapter.
    base.data.tokenizer_name_or_path = None;
    base.peft_path = None;
    base.use_peft = false;
    let trained_name = match &trained.peft_path {
        Some(adapter) => format!(
            "{} + {}",
            trained.data.model_name_or_path.display(),
            adapter.display()
        ),
        None => trained.data.model_name_or_path.display().to_string(),
    };
    let base_name = base.data.model_name_or_path.display().to_string();

    let mut evaluations = Vec::new();
    for (label, name, mut model_args) in [
        ("base", base_name, base),
        ("trained", trained_name, trained),
    ] {
        let dir = output_dir.join(label);
        eprintln!("== {label} model: {name}");
        model_args.data.output_dir = dir.clone();
        let general_args = general.as_ref().map(|corpus| {
            let mut general_args = model_args.clone();
            general_args.data.validation_file_dir = Some(corpus.clone());
            general_args.data.output_dir = dir.join("general");
            general_args.eval_tasks.clear();
            general_args
        });
        crate::run::eval(model_args)?;
        if let Some(general_args) = general_args {
            eprintln!("== {label} model on the general corpus");
            crate::run::eval(general_args)?;
        }
        evaluations.push(Evaluation {
            model: name,
            domain: domain
                .is_some()
                .then(|| Perplexity::read(&dir))
                .transpose()?,
            general: general
                .is_some()
                .then(|| Perplexity::read(&dir.join("general")))
                .transpose()?,
            dir,
        });
    }
    let trained = evaluations.pop().expect("two evaluations");
    let base = evaluations.pop().expect("two evaluations");
    let report = Report {
        domain_perplexity: match (&domain, base.domain, trained.domain) {
            (Some(corpus), Some(b), Some(t)) => Some(PerplexityChange::new(corpus, b, t)),
            _ => None,
        },
        general_perplexity: match (&general, base.general, trained.general) {
            (Some(corpus), Some(b), Some(t)) => Some(PerplexityChange::new(corpus, b, t)),
            _ => None,
        },
        tasks: compare_tasks(&base.dir, &trained.dir)?,
        base,
        trained,
    };
    let table = report.table();
    println!("{table}");
    pt_fs::write_atomically(&output_dir.join("eval_report.md"), table.as_bytes())?;
    pt_fs::write_atomically(
        &output_dir.join("eval_report.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    for task in &report.tasks {
        let path = output_dir.join(format!("eval_report_{}.png", task.task));
        crate::plot::plot_comparison(&path, task)?;
        eprintln!("plotted {}", path.display());
    }
    eprintln!(
        "report in {}",
        output_dir.join("eval_report.json").display()
    );
    Ok(())
}

/// Every task both evaluations scored (`eval_tasks/<task>.jsonl`), compared.
fn compare_tasks(base_dir: &Path, trained_dir: &Path) -> Result<Vec<TaskComparison>> {
    let tasks_dir = base_dir.join("eval_tasks");
    let mut names: Vec<String> = match fs::read_dir(&tasks_dir) {
        Ok(entries) => entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                (path.extension()? == "jsonl")
                    .then(|| path.file_stem()?.to_str().map(String::from))?
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
        .iter()
        .map(|task| {
            let file = format!("eval_tasks/{task}.jsonl");
            let base = pt_tasks::read_scored(&base_dir.join(&file))?;
            let trained = pt_tasks::read_scored(&trained_dir.join(&file))?;
            pt_tasks::compare(task, &base, &trained)
        })
        .collect()
}

impl Report {
    /// The report as a Markdown table (also what the terminal shows).
    fn table(&self) -> String {
        let mut table = String::new();
        let _ = writeln!(
            table,
            "base: {}\ntrained: {}\n",
            self.base.model, self.trained.model
        );
        table.push_str("| | base | trained | difference |\n|---|---:|---:|---:|\n");
        let perplexities = [
            ("domain", self.domain_perplexity.as_ref()),
            ("general", self.general_perplexity.as_ref()),
        ];
        for (kind, change) in perplexities {
            if let Some(change) = change {
                let _ = writeln!(
                    table,
                    "| {kind} perplexity ({}) | {:.3} | {:.3} | {:+.1}% |",
                    change.corpus,
                    change.base,
                    change.trained,
                    100.0 * change.relative_change
                );
            }
        }
        for task in &self.tasks {
            let row = |table: &mut String, label: &str, d: &Difference| {
                let _ = writeln!(
                    table,
                    "| {label} ({} q) | {:.4} ± {:.4} | {:.4} ± {:.4} | {:+.4} ± {:.4} |",
                    d.questions,
                    d.base_acc,
                    d.base_acc_stderr,
                    d.trained_acc,
                    d.trained_acc_stderr,
                    d.difference,
                    d.difference_stderr
                );
            };
            row(&mut table, &format!("{} acc", task.task), &task.overall);
            let _ = writeln!(
                table,
                "| {} acc_macro ({} subjects) | {:.4} | {:.4} | {:+.4} ± {:.4} |",
                task.task,
                task.subjects.len(),
                task.base_acc_macro,
                task.trained_acc_macro,
                task.difference_macro,
                task.difference_macro_stderr
            );
            for subject in &task.subjects {
                row(&mut table, &format!("  {}", subject.subject), subject);
            }
        }
        table
    }
}
