//! Two models' answers to the same questions, side by side: accuracy, the
//! difference and its standard error, per task and per subject.
//!
//! Standard errors are lm-evaluation-harness's (`acc_stderr`: the sample
//! standard deviation of the per-question scores over √n). The difference's
//! is the paired one, from the per-question differences: both models answer
//! the same questions, so what varies between questions cancels, and the
//! error is smaller than treating the two accuracies as independent.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::Scored;

/// The mean of `values` and its standard error (sample standard deviation
/// over √n; 0 below two values).
pub fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

/// One group of questions (a subject, or the whole task) answered by both.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub subject: String,
    pub questions: usize,
    pub base_acc: f64,
    pub base_acc_stderr: f64,
    pub trained_acc: f64,
    pub trained_acc_stderr: f64,
    /// `trained_acc - base_acc`.
    pub difference: f64,
    pub difference_stderr: f64,
}

impl Difference {
    fn of(subject: &str, pairs: &[(&Scored, &Scored)]) -> Self {
        let right = |q: &Scored| f64::from(u8::from(q.prediction == q.answer));
        let base: Vec<f64> = pairs.iter().map(|(b, _)| right(b)).collect();
        let trained: Vec<f64> = pairs.iter().map(|(_, t)| right(t)).collect();
        let differences: Vec<f64> = trained.iter().zip(&base).map(|(t, b)| t - b).collect();
        let (base_acc, base_acc_stderr) = mean_and_stderr(&base);
        let (trained_acc, trained_acc_stderr) = mean_and_stderr(&trained);
        let (difference, difference_stderr) = mean_and_stderr(&differences);
        Self {
            subject: subject.to_string(),
            questions: pairs.len(),
            base_acc,
            base_acc_stderr,
            trained_acc,
            trained_acc_stderr,
            difference,
            difference_stderr,
        }
    }
}

/// A task's comparison: over all questions (micro), the mean over subjects
/// (macro) and each subject.
#[derive(Clone, Debug, Serialize)]
pub struct TaskComparison {
    pub task: String,
    pub overall: Difference,
    pub base_acc_macro: f64,
    pub trained_acc_macro: f64,
    pub difference_macro: f64,
    /// The subjects' paired errors combined: √(Σ se²) / subjects.
    pub difference_macro_stderr: f64,
    pub subjects: Vec<Difference>,
}

/// Compares two evaluations of `task` (each question's result, in the
/// order asked); they must have asked the same questions.
pub fn compare(task: &str, base: &[Scored], trained: &[Scored]) -> Result<TaskComparison> {
    if base.len() != trained.len() {
        bail!(
            "task {task}: the base model answered {} questions and the trained one {}: evaluate both on the same task files",
            base.len(),
            trained.len()
        );
    }
    let pairs: Vec<(&Scored, &Scored)> = base.iter().zip(trained).collect();
    if let Some((b, t)) = pairs
        .iter()
        .find(|(b, t)| b.source != t.source || b.answer != t.answer || b.subject != t.subject)
    {
        bail!(
            "task {task}: the two evaluations asked different questions ({} against {}): evaluate both on the same task files",
            b.source,
            t.source
        );
    }
    let mut subjects: Vec<&str> = Vec::new();
    for (question, _) in &pairs {
        if !subjects.contains(&question.subject.as_str()) {
            subjects.push(&question.subject);
        }
    }
    let subjects: Vec<Difference> = subjects
        .into_iter()
        .map(|subject| {
            let of_subject: Vec<_> = pairs
                .iter()
                .filter(|(q, _)| q.subject == subject)
                .copied()
                .collect();
            Difference::of(subject, &of_subject)
        })
        .collect();
    let count = subjects.len().max(1) as f64;
    let macro_mean =
        |value: fn(&Difference) -> f64| subjects.iter().map(value).sum::<f64>() / count;
    Ok(TaskComparison {
        task: task.to_string(),
        overall: Difference::of("all", &pairs),
        base_acc_macro: macro_mean(|d| d.base_acc),
        trained_acc_macro: macro_mean(|d| d.trained_acc),
        difference_macro: macro_mean(|d| d.difference),
        difference_macro_stderr: subjects
            .iter()
            .map(|d| d.difference_stderr.powi(2))
            .sum::<f64>()
            .sqrt()
            / count,
        subjects,
    })
}

/// Every question of an `eval_tasks/<task>.jsonl` file.
pub fn read_scored(path: &Path) -> Result<Vec<Scored>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a scored question", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(subject: &str, prediction: usize, answer: usize) -> Scored {
        Scored {
            source: format!("{subject}.csv:{prediction}{answer}"),
            subject: subject.into(),
            scores: vec![0.0; 4],
            prediction,
            prediction_norm: prediction,
            answer,
        }
    }

    #[test]
    fn differences_and_their_paired_errors_are_computed_by_hand() {
        // Subject a: base right on 1 of 4, trained on 3 of 4 (it fixes two,
        // breaks none). Subject b: base right on 2 of 2, trained on 1.
        let base = [
            scored("a", 0, 0),
            scored("a", 1, 0),
            scored("a", 1, 0),
            scored("a", 1, 0),
            scored("b", 2, 2),
            scored("b", 3, 3),
        ];
        let mut trained = base.clone();
        trained[1].prediction = 0;
        trained[2].prediction = 0;
        trained[5].prediction = 0;
        let comparison = compare("t", &base, &trained).unwrap();

        let a = &comparison.subjects[0];
        assert_eq!((a.subject.as_str(), a.questions), ("a", 4));
        assert_eq!((a.base_acc, a.trained_acc, a.difference), (0.25, 0.75, 0.5));
        // Base scores 1,0,0,0: sample variance 0.25 → se √(0.25/4) = 0.25.
        assert!((a.base_acc_stderr - 0.25).abs() < 1e-12);
        // Differences 0,1,1,0: mean 0.5, sample variance 1/3 → se √(1/12).
        assert!((a.difference_stderr - (1.0f64 / 12.0).sqrt()).abs() < 1e-12);

        let b = &comparison.subjects[1];
        assert_eq!((b.base_acc, b.trained_acc, b.difference), (1.0, 0.5, -0.5));
        // Differences 0,-1: sample variance 0.5 → se √(0.5/2) = 0.5.
        assert!((b.difference_stderr - 0.5).abs() < 1e-12);

        let all = &comparison.overall;
        assert_eq!(all.questions, 6);
        assert!((all.base_acc - 0.5).abs() < 1e-12);
        assert!((all.trained_acc - 4.0 / 6.0).abs() < 1e-12);
        // Differences 0,1,1,0,0,-1: mean 1/6, Σ(d-mean)² = 17/6, /5 → 17/30; se √(17/180).
        assert!((all.difference_stderr - (17.0f64 / 180.0).sqrt()).abs() < 1e-12);

        assert!((comparison.difference_macro - 0.0).abs() < 1e-12);
        let combined = (1.0 / 12.0 + 0.25f64).sqrt() / 2.0;
        assert!((comparison.difference_macro_stderr - combined).abs() < 1e-12);
    }

    #[test]
    fn evaluations_of_different_questions_are_refused() {
        let base = [scored("a", 0, 0), scored("a", 1, 1)];
        let error = compare("t", &base, &base[..1]).unwrap_err().to_string();
        assert!(
            error.contains("answered 2 questions and the trained one 1"),
            "{error}"
        );
        let mut other = base.clone();
        other[1].answer = 2;
        let error = compare("t", &base, &other).unwrap_err().to_string();
        assert!(error.contains("asked different questions"), "{error}");
    }
}
