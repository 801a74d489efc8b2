//! Multiple-choice tasks from the layouts benchmarks ship in: C-Eval, CMMLU
//! and MMLU CSV files (a directory of `SUBJECT_dev.csv`, `SUBJECT_val.csv`,
//! `SUBJECT_test.csv`, or `dev/`, `val/`, `test/` folders of `SUBJECT.csv`;
//! or one CSV) and a JSONL equivalent. Every problem is named by file and row.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One question with its choices and the index of the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// `FILE:ROW` (the CSV record's line, the JSONL line).
    pub source: String,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// A subject's few-shot examples and the questions it is scored on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subject {
    pub name: String,
    /// From the `dev` split, in file order.
    pub dev: Vec<Question>,
    /// From `test` where it has answers (MMLU, CMMLU), else `val` (C-Eval,
    /// whose test answers are not published), else the unsplit questions.
    pub scored: Vec<Question>,
}

/// Which prompt template a task is asked in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    /// MMLU's: `Answer:` and continuations ` A`, ` B`, …
    English,
    /// C-Eval's and CMMLU's: `答案：` and continuations `A`, `B`, …
    Chinese,
}

/// How a task's questions are asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prompts {
    /// In the harness's template of this language, after the subject's dev
    /// examples.
    Template(Language),
    /// As a task plugin wrote them: a question's `question` is its whole
    /// context and its `choices` are the continuations.
    Given,
}

/// A benchmark: its name (the file or directory's), prompts and subjects.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    pub prompts: Prompts,
    pub subjects: Vec<Subject>,
}

/// The split a file or record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Split {
    Dev,
    Val,
    Test,
    /// A file or record that names none: scored.
    Unsplit,
}

impl Split {
    fn named(name: &str) -> Option<Split> {
        match name.to_ascii_lowercase().as_str() {
            "dev" | "train" => Some(Split::Dev),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// A question as read, before the splits are sorted out; `answer` is `None`
/// in an unlabelled file (C-Eval's test split).
struct Record {
    subject: String,
    split: Split,
    question: Question,
    labelled: bool,
}

impl Task {
    /// Reads a task from a CSV or JSONL file or a directory of them.
    /// `language`: the template; `None` picks Chinese when most questions
    /// contain Chinese characters.
    pub fn load(path: &Path, language: Option<Language>) -> Result<Task> {
        let files = files_under(path, |file| {
            matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("csv" | "jsonl")
            )
        })?;
        let mut records = Vec::new();
        for file in &files {
            let split = split_of(file);
            match file.extension().and_then(|e| e.to_str()) {
                Some("jsonl") => read_jsonl(file, split, &mut records)?,
                _ => read_csv(file, split, &mut records)?,
            }
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("task")
            .to_string();
        let subjects = sort_splits(records);
        if subjects.iter().all(|s| s.scored.is_empty()) {
            bail!(
                "{}: no question with an answer to score (a test or val split, or questions without a split)",
                path.display()
            );
        }
        let language = language.unwrap_or_else(|| detect_language(&subjects));
        Ok(Task {
            name,
            prompts: Prompts::Template(language),
            subjects,
        })
    }

    /// A task of questions whose prompts a plugin wrote (`(subject,
    /// question)`, an empty subject being the task's name), subjects in name
    /// order.
    pub fn given(name: String, questions: Vec<(String, Question)>) -> Result<Task> {
        if questions.is_empty() {
            bail!("task {name}: the plugin read no question");
        }
        let mut by_subject: BTreeMap<String, Vec<Question>> = BTreeMap::new();
        for (subject, question) in questions {
            let subject = if subject.is_empty() {
                name.clone()
            } else {
                subject
            };
            by_subject.entry(subject).or_default().push(question);
        }
        let subjects = by_subject
            .into_iter()
            .map(|(name, scored)| Subject {
                name,
                dev: Vec::new(),
                scored,
            })
            .collect();
        Ok(Task {
            name,
            prompts: Prompts::Given,
            subjects,
        })
    }

    /// Every scored subject has `num_fewshot` dev examples to show (given
    /// prompts hold their own).
    pub fn check_fewshot(&self, num_fewshot: usize) -> Result<()> {
        if self.prompts == Prompts::Given {
            return Ok(());
        }
        for subject in &self.subjects {
            if subject.dev.len() < num_fewshot && !subject.scored.is_empty() {
                bail!(
                    "task {}: subject {} has {} dev examples, fewer than --eval_num_fewshot {num_fewshot}",
                    self.name,
                    subject.name,
                    subject.dev.len(),
                );
            }
        }
        Ok(())
    }

    pub fn questions(&self) -> usize {
        self.subjects.iter().map(|s| s.scored.len()).sum()
    }
}

/// The records a task plugin reads: every non-empty line of the file, or of
/// each file under the directory (sorted, hidden ones skipped), with its
/// `path:line`.
pub fn task_records(path: &Path) -> Result<Vec<(String, String)>> {
    let files = files_under(path, |file| {
        !file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
    })?;
    let mut records = Vec::new();
    for file in files {
        let bytes = fs::read(&file).with_context(|| format!("{}: cannot read", file.display()))?;
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = std::str::from_utf8(line)
                .with_context(|| format!("{}:{}: not UTF-8", file.display(), i + 1))?;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if !line.trim().is_empty() {
                records.push((format!("{}:{}", file.display(), i + 1), line.to_string()));
            }
        }
    }
    Ok(records)
}

/// The task's files: the one given, or every one under a directory that
/// `accept`s, sorted.
fn files_under(path: &Path, accept: fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("{}: no such task file or directory", path.display());
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            fs::read_dir(&dir).with_context(|| format!("{}: cannot read", dir.display()))?
        {
            let entry = entry?.path();
            if entry.is_dir() {
                dirs.push(entry);
            } else if accept(&entry) {
                files.push(entry);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no task files", path.display());
    }
    Ok(files)
}

/// `SUBJECT_dev.csv`, or `dev/SUBJECT.csv`; else unsplit.
fn split_of(file: &Path) -> Split {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let by_suffix = stem.rsplit_once('_').and_then(|(_, s)| Split::named(s));
    let by_folder = || {
        file.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(Split::named)
    };
    by_suffix.or_else(by_folder).unwrap_or(Split::Unsplit)
}

/// The subject a file's questions belong to: its name less the split.
fn subject_of(file: &Path) -> Result<String> {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let subject = match stem.rsplit_once('_') {
        Some((subject, split)) if Split::named(split).is_some() => subject,
        _ => stem,
    };
    if subject.is_empty() {
        bail!(
            "{}: the file name gives no subject (name it SUBJECT_dev.csv, SUBJECT_val.csv or SUBJECT_test.csv)",
            file.display()
        );
    }
    Ok(subject.to_string())
}

/// `A`–`Z` (any case) as a choice index below `choices`.
fn letter_answer(text: &str, choices: usize) -> Option<usize> {
    let text = text.trim();
    let mut chars = text.chars();
    let (Some(letter), None) = (chars.next(), chars.next()) else {
        return None;
    };
    let index = (letter.to_ascii_uppercase() as u32).checked_sub('A' as u32)? as usize;
    (index < choices).then_some(index)
}

fn letters(choices: usize) -> String {
    let last = (b'A' + choices as u8 - 1) as char;
    format!("A–{last}")
}

/// The column layout of a CSV file: with a header naming `question`, the
/// choice letters and `answer` (any case; other columns such as `id` are
/// skipped), or MMLU's headerless `question,A,B,C,D,answer`.
struct Columns {
    question: usize,
    choices: Vec<usize>,
    answer: usize,
    header: bool,
}

impl Columns {
    fn of(file: &Path, first: &csv::StringRecord) -> Result<Columns> {
        let names: Vec<String> = first.iter().map(|n| n.trim().to_lowercase()).collect();
        let find = |name: &str| names.iter().position(|n| n == name);
        let Some(question) = find("question") else {
            if first.len() == 6 {
                return Ok(Columns {
                    question: 0,
                    choices: (1..5).collect(),
                    answer: 5,
                    header: false,
                });
            }
            bail!(
                "{}:1: no `question` column (a header `question,A,B,C,D,answer`, or six columns without one)",
                file.display()
            );
        };
        let mut choices = Vec::new();
        for letter in ["a", "b", "c", "d"] {
            match find(letter) {
                Some(column) => choices.push(column),
                None => bail!(
                    "{}:1: no `{}` column (found: {})",
                    file.display(),
                    letter.to_uppercase(),
                    names.join(", ")
                ),
            }
        }
        let Some(answer) = find("answer") else {
            bail!(
                "{}:1: no `answer` column (found: {})",
                file.display(),
                names.join(", ")
            );
        };
        Ok(Columns {
            question,
            choices,
            answer,
            header: true,
        })
    }
}

fn read_csv(file: &Path, split: Split, records: &mut Vec<Record>) -> Result<()> {
    let subject = subject_of(file)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let mut rows = reader.records();
    let Some(first) = rows.next() else {
        return Ok(());
    };
    let first = first.with_context(|| format!("{}:1: not a CSV record", file.display()))?;
    let columns = Columns::of(file, &first)?;
    let headerless = (!columns.header).then_some(Ok(first));
    let mut read = Vec::new();
    for row in headerless.into_iter().chain(rows) {
        let row = row.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow::anyhow!("{}:{line}: not a CSV record: {e}", file.display())
        })?;
        let line = row.position().map_or(0, |p| p.line());
        let source = format!("{}:{line}", file.display());
        let field = |column: usize| -> Result<String> {
            row.get(column)
                .map(str::to_string)
                .with_context(|| format!("{source}: {} fields, the header has more", row.len()))
        };
        let question = field(columns.question)?;
        let choices = columns
            .choices
            .iter()
            .map(|&c| field(c))
            .collect::<Result<Vec<_>>>()?;
        let answer = field(columns.answer)?;
        if question.trim().is_empty() {
            bail!("{source}: the question is empty");
        }
        read.push((source, question, choices, answer));
    }
    // A file whose answers are all empty is unlabelled (C-Eval's test split).
    let labelled = read
        .iter()
        .any(|(_, _, _, answer)| !answer.trim().is_empty());
    for (source, question, choices, answer) in read {
        let answer = match (labelled, letter_answer(&answer, choices.len())) {
            (false, _) => 0,
            (true, Some(index)) => index,
            (true, None) => bail!(
                "{source}: the answer {answer:?} is not one of {}",
                letters(choices.len())
            ),
        };
        records.push(Record {
            subject: subject.clone(),
            split,
            question: Question {
                source,
                question,
                choices,
                answer,
            },
            labelled,
        });
    }
    Ok(())
}

/// `{"question", "choices": [...], "answer": "B" | 1, "subject"}`, and an
/// optional `"split"` (`dev` for few-shot examples).
fn read_jsonl(file: &Path, split: Split, records: &mut Vec<Record>) -> Result<()> {
    let text =
        fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let file_subject = subject_of(file)?;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let source = format!("{}:{}", file.display(), index + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{source}: not a JSON object"))?;
        let text_field = |name: &str| -> Result<String> {
            match value.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!("{source}: `{name}` is not a string"),
                None => bail!("{source}: no `{name}` field"),
            }
        };
        let question = text_field("question")?;
        if question.trim().is_empty() {
            bail!("{source}: the question is empty");
        }
        let choices: Vec<String> = match value.get("choices") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|c| match c {
                    Value::String(s) => Ok(s.clone()),
                    _ => bail!("{source}: a choice is not a string"),
                })
                .collect::<Result<_>>()?,
            _ => bail!("{source}: no `choices` list"),
        };
        if !(2..=26).contains(&choices.len()) {
            bail!("{source}: {} choices (2 to 26 are scored)", choices.len());
        }
        let answer = match value.get("answer") {
            Some(Value::String(letter)) => letter_answer(letter, choices.len()),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| n as usize)
                .filter(|&n| n < choices.len()),
            _ => bail!("{source}: no `answer` (a letter or a choice index)"),
        };
        let Some(answer) = answer else {
            bail!(
                "{source}: the answer {} is not one of {} (or 0–{})",
                value["answer"],
                letters(choices.len()),
                choices.len() - 1
            );
        };
        let subject = match value.get("subject") {
            None => file_subject.clone(),
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(_) => bail!("{source}: the subject is empty"),
        };
        let split = match value.get("split").and_then(Value::as_str) {
            Some(name) => Split::named(name)
                .with_context(|| format!("{source}: split {name:?} is not dev, val or test"))?,
            None => split,
        };
        records.push(Record {
            subject,
            split,
            question: Question {
                source,
                question,
                choices,
                answer,
            },
            labelled: true,
        });
    }
    Ok(())
}

/// Subjects in name order, each with its dev examples and the labelled
/// split it is scored on.
fn sort_splits(records: Vec<Record>) -> Vec<Subject> {
    let mut by_subject: BTreeMap<String, BTreeMap<Split, Vec<Question>>> = BTreeMap::new();
    for record in records.into_iter().filter(|r| r.labelled) {
        by_subject
            .entry(record.subject)
            .or_default()
            .entry(record.split)
            .or_default()
            .push(record.question);
    }
    by_subject
        .into_iter()
        .map(|(name, mut splits)| {
            let dev = splits.remove(&Split::Dev).unwrap_or_default();
            let scored = [Split::Test, Split::Val, Split::Unsplit]
                .iter()
                .find_map(|split| splits.remove(split))
                .unwrap_or_default();
            Subject { name, dev, scored }
        })
        .collect()
}

/// Chinese when most scored questions contain a Han character.
fn detect_language(subjects: &[Subject]) -> Language {
    let questions: Vec<&Question> = subjects.iter().flat_map(|s| &s.scored).collect();
    let chinese = questions
        .iter()
        .filter(|q| {
            q.question
                .chars()
                .any(|c| matches!(c as u32, 0x4E00..=0x9FFF))
        })
        .count();
    match 2 * chinese > questions.len() {
        true => Language::Chinese,
        false => Language::English,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn error(path: &Path) -> String {
        format!("{:#}", Task::load(path, None).unwrap_err())
    }

    /// MMLU's headerless files, C-Eval's folders with an unpublished test
    /// split, CMMLU's `dev/`/`test/` folders of `SUBJECT.csv`, and JSONL.
    #[test]
    fn the_layouts_benchmarks_ship_in_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mmlu = dir.path().join("mmlu");
        write(&mmlu, "dev/anatomy_dev.csv", "Q1?,a,b,c,d,B\n");
        write(&mmlu, "val/anatomy_val.csv", "Q2?,a,b,c,d,C\n");
        write(
            &mmlu,
            "test/anatomy_test.csv",
            "\"Q3,\nmore\",a,b,c,d,d\nQ4?,a,b,c,d,A\n",
        );
        let task = Task::load(&mmlu, None).unwrap();
        assert_eq!(
            (task.name.as_str(), task.prompts),
            ("mmlu", Prompts::Template(Language::English))
        );
        let anatomy = &task.subjects[0];
        assert_eq!(anatomy.name, "anatomy");
        assert_eq!(anatomy.dev[0].answer, 1);
        let scored: Vec<(&str, usize)> = anatomy
            .scored
            .iter()
            .map(|q| (q.question.as_str(), q.answer))
            .collect();
        assert_eq!(scored, [("Q3,\nmore", 3), ("Q4?", 0)]);
        assert!(anatomy.scored[1].source.ends_with("anatomy_test.csv:3"));

        let ceval = dir.path().join("ceval");
        let header = "id,question,A,B,C,D,answer\n";
        write(
            &ceval,
            "dev/law_dev.csv",
            &format!("{header}0,法律问一,甲,乙,丙,丁,A\n"),
        );
        write(
            &ceval,
            "val/law_val.csv",
            &format!("{header}0,法律问二,甲,乙,丙,丁,D\n"),
        );
        write(
            &ceval,
            "test/law_test.csv",
            &format!("{header}0,法律问三,甲,乙,丙,丁,\n"),
        );
        let task = Task::load(&ceval, None).unwrap();
        assert_eq!(task.prompts, Prompts::Template(Language::Chinese));
        assert_eq!(task.subjects[0].scored[0].question, "法律问二");

        let cmmlu = dir.path().join("cmmlu");
        let header = ",Question,A,B,C,D,Answer\n";
        write(
            &cmmlu,
            "dev/agronomy.csv",
            &format!("{header}0,农学一,甲,乙,丙,丁,B\n"),
        );
        write(
            &cmmlu,
            "test/agronomy.csv",
            &format!("{header}0,农学二,甲,乙,丙,丁,C\n"),
        );
        let task = Task::load(&cmmlu, None).unwrap();
        assert_eq!(task.subjects[0].name, "agronomy");
        assert_eq!(
            (
                task.subjects[0].dev.len(),
                task.subjects[0].scored[0].answer
            ),
            (1, 2)
        );

        let jsonl = write(
            dir.path(),
            "mine.jsonl",
            "{\"question\": \"q?\", \"choices\": [\"x\", \"y\", \"z\"], \"answer\": 2, \"subject\": \"s\", \"split\": \"dev\"}\n\
             {\"question\": \"r?\", \"choices\": [\"x\", \"y\"], \"answer\": \"b\", \"subject\": \"s\"}\n",
        );
        let task = Task::load(&jsonl, Some(Language::Chinese)).unwrap();
        let s = &task.subjects[0];
        assert_eq!(
            (
                s.dev[0].answer,
                s.scored[0].answer,
                s.scored[0].choices.len()
            ),
            (2, 1, 2)
        );
    }

    /// A missing column, an answer outside A–D, an empty subject and a short
    /// row are refused naming the file and row.
    #[test]
    fn bad_task_files_are_named_with_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let header = "question,A,B,C,D,answer\n";
        for (name, text, expected) in [
            (
                "a/x_test.csv",
                "question,A,B,C,answer\nq,1,2,3,A\n".to_string(),
                "x_test.csv:1: no `D` column",
            ),
            (
                "b/x_test.csv",
                format!("{header}q,1,2,3,4,A\nr,1,2,3,4,E\n"),
                "x_test.csv:3: the answer \"E\" is not one of A–D",
            ),
            (
                "c.jsonl",
                r#"{"question": "q", "choices": ["1", "2"], "answer": 0, "subject": " "}"#
                    .to_string(),
                "c.jsonl:1: the subject is empty",
            ),
            (
                "d.jsonl",
                "\n{\"question\": \"q\", \"choices\": [\"1\", \"2\"], \"answer\": 2}\n".to_string(),
                "d.jsonl:2: the answer 2 is not one of A–B",
            ),
            (
                "e/x_test.csv",
                format!("{header}q,1,2\n"),
                "x_test.csv:2: 3 fields",
            ),
        ] {
            let said = error(&write(dir.path(), name, &text));
            assert!(said.contains(expected), "{name}: {said}");
        }
    }
}
