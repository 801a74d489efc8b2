//! Benchmark evaluation: multiple-choice tasks (C-Eval, CMMLU, MMLU and
//! their like) scored by log-likelihood exactly as lm-evaluation-harness
//! scores them, so that a continued-pretraining run reports whether the
//! model knows more of its domain, in numbers that tool would give.

#![forbid(unsafe_code)]

mod compare;
mod prompt;
mod read;
mod score;

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use pt_data::Tokenizer;
use pt_model::Model;
use serde::{Deserialize, Serialize};

pub use compare::{Difference, TaskComparison, compare, read_scored};
pub use prompt::{context, continuations};
pub use read::{Language, Prompts, Question, Subject, Task, task_records};
pub use score::{Request, log_likelihoods};

/// One scored question, as `eval_tasks/<task>.jsonl` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scored {
    pub source: String,
    pub subject: String,
    /// Each choice's log-likelihood.
    pub scores: Vec<f64>,
    /// The arg-max (the first of equal ones).
    pub prediction: usize,
    /// The arg-max of the scores over the choices' lengths in characters.
    pub prediction_norm: usize,
    pub answer: usize,
}

/// A subject's accuracy.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectAccuracy {
    pub subject: String,
    pub questions: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// A task's results: per question, per subject, and overall.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResults {
    pub task: String,
    pub num_fewshot: usize,
    /// Over all questions (micro average).
    pub acc: f64,
    /// The mean of the subjects' accuracies (macro average).
    pub acc_macro: f64,
    pub acc_norm: f64,
    pub subjects: Vec<SubjectAccuracy>,
    #[serde(skip)]
    pub questions: Vec<Scored>,
}

/// How tasks are asked and batched.
#[derive(Clone, Copy, Debug)]
pub struct TaskOptions {
    /// Answered dev examples before each question (the first ones of its subject).
    pub num_fewshot: usize,
    /// Rows per forward pass.
    pub batch_size: usize,
    /// The model's window: longer inputs lose their first tokens.
    pub max_length: usize,
}

/// The model's window as lm-evaluation-harness reads it: `config.json`'s
/// `n_positions`, `max_position_embeddings` or `n_ctx`, else BLOOM's
/// `seq_length`, else 2048.
pub fn max_length(model_dir: &Path) -> Result<usize> {
    let path = model_dir.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    Ok([
        "n_positions",
        "max_position_embeddings",
        "n_ctx",
        "seq_length",
    ]
    .iter()
    .find_map(|key| config.get(key).and_then(serde_json::Value::as_u64))
    .map_or(2048, |n| n as usize))
}

fn arg_max(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Scores every question of `task` with `model`.
pub fn evaluate(
    task: &Task,
    model: &Model,
    tokenizer: &Tokenizer,
    options: TaskOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResults> {
    task.check_fewshot(options.num_fewshot)?;
    let mut requests = Vec::with_capacity(task.questions());
    let mut asked: Vec<(&str, &Question, Vec<String>)> = Vec::with_capacity(task.questions());
    for subject in &task.subjects {
        let shots = &subject.dev[..options.num_fewshot.min(subject.dev.len())];
        for question in &subject.scored {
            let (context, continuations) = match task.prompts {
                Prompts::Template(language) => (
                    context(language, &subject.name, shots, question),
                    continuations(language, question.choices.len()),
                ),
                Prompts::Given => (question.question.clone(), question.choices.clone()),
            };
            let request = Request::encode(tokenizer, &context, &continuations)
                .with_context(|| question.source.clone())?;
            requests.push(request);
            asked.push((&subject.name, question, continuations));
        }
    }
    let scores = log_likelihoods(
        model,
        &requests,
        options.max_length,
        options.batch_size,
        progress,
    )?;
    let questions: Vec<Scored> = asked
        .iter()
        .zip(scores)
        .map(|((subject, question, continuations), scores)| {
            // The harness's acc_norm: each score over its choice's length
            // in characters (without the space that joins it to the context).
            let lengths: Vec<f64> = continuations
                .iter()
                .map(|c| c.trim_start().chars().count().max(1) as f64)
                .collect();
            Scored {
                source: question.source.clone(),
                subject: subject.to_string(),
                prediction: arg_max(scores.iter().copied()),
                prediction_norm: arg_max(scores.iter().zip(&lengths).map(|(s, l)| s / l)),
                answer: question.answer,
                scores,
            }
        })
        .collect();
    Ok(summarize(task, options.num_fewshot, questions))
}

fn summarize(task: &Task, num_fewshot: usize, questions: Vec<Scored>) -> TaskResults {
    let share = |qs: &[&Scored], norm: bool| {
        let right = qs
            .iter()
            .filter(|q| {
                q.answer
                    == if norm {
                        q.prediction_norm
                    } else {
                        q.prediction
                    }
            })
            .count();
        right as f64 / qs.len().max(1) as f64
    };
    let subjects: Vec<SubjectAccuracy> = task
        .subjects
        .iter()
        .filter(|s| !s.scored.is_empty())
        .map(|s| {
            let qs: Vec<&Scored> = questions.iter().filter(|q| q.subject == s.name).collect();
            SubjectAccuracy {
                subject: s.name.clone(),
                questions: qs.len(),
                acc: share(&qs, false),
                acc_norm: share(&qs, true),
            }
        })
        .collect();
    let all: Vec<&Scored> = questions.iter().collect();
    TaskResults {
        task: task.name.clone(),
        num_fewshot,
        acc: share(&all, false),
        acc_macro: subjects.iter().map(|s| s.acc).sum::<f64>() / subjects.len().max(1) as f64,
        acc_norm: share(&all, true),
        subjects,
        questions,
    }
}

impl TaskResults {
    /// `<task>_acc`, `<task>_acc_macro`, `<task>_acc_norm` (the caller
    /// prefixes `eval_`).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            (format!("{}_acc", self.task), self.acc),
            (format!("{}_acc_macro", self.task), self.acc_macro),
            (format!("{}_acc_norm", self.task), self.acc_norm),
        ]
    }

    /// `dir/<task>.jsonl` (every question's scores, prediction and answer)
    /// and `dir/<task>.json` (the accuracies).
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut lines = Vec::new();
        for question in &self.questions {
            serde_json::to_writer(&mut lines, question)?;
            lines.write_all(b"\n")?;
        }
        pt_fs::write_atomically(&dir.join(format!("{}.jsonl", self.task)), &lines)?;
        let summary = serde_json::to_vec_pretty(self)?;
        pt_fs::write_atomically(&dir.join(format!("{}.json", self.task)), &summary)?;
        Ok(())
    }
}
