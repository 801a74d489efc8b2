//! A task plugin (interface 0.2.0): MedQA's JSONL, which pt-host does not
//! read itself, as multiple-choice items.
//!
//! Each line is a question in MedQA's own layout (`{"question", "options":
//! {"A": …}, "answer_idx": "C", "meta_info": "step1"}`) or the Hugging Face
//! one lm-evaluation-harness's `medqa_4options` reads (`{"sent1", "ending0"…,
//! "label": 2}`). Two formats:
//! - `medqa`: the harness's prompt, `Question: …\nA. …\nB. …\nAnswer:`,
//!   scored on the letters ` A`, ` B`, …;
//! - `medqa_text`: the question alone, `Question: …\nAnswer:`, scored on the
//!   options' own words (multi-token continuations, as `acc_norm` tasks are).

// Off wasm, `register!` expands to nothing and the plugin is unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use pt_plugin_sdk::{Document, Kind, Plugin, TaskItem, register};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MedqaTasks {}

/// One question read from either layout.
#[derive(Debug, PartialEq)]
struct Question {
    text: String,
    options: Vec<String>,
    answer: usize,
    subject: String,
}

fn string(record: &Value, key: &str) -> Result<String, String> {
    match record.get(key) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("`{key}` is not a string: {other}")),
        None => Err(format!("no `{key}`")),
    }
}

/// MedQA's layout: `options` an object keyed by letter, `answer_idx` one of them.
fn medqa_layout(record: &Value) -> Result<Question, String> {
    let Some(Value::Object(options)) = record.get("options") else {
        return Err("`options` is not an object of lettered options".into());
    };
    let mut letters: Vec<&String> = options.keys().collect();
    letters.sort();
    let texts = letters
        .iter()
        .map(|letter| match &options[letter.as_str()] {
            Value::String(text) => Ok(text.clone()),
            other => Err(format!("option {letter} is not a string: {other}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answer_idx = string(record, "answer_idx")?;
    let answer = letters
        .iter()
        .position(|letter| **letter == answer_idx)
        .ok_or_else(|| format!("answer_idx `{answer_idx}` names no option"))?;
    Ok(Question {
        text: string(record, "question")?,
        options: texts,
        answer,
        subject: record
            .get("meta_info")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// The Hugging Face layout: `sent1`, `ending0`…, `label` an index.
fn hf_layout(record: &Value) -> Result<Question, String> {
    let options: Vec<String> = (0..)
        .map_while(|i| record.get(format!("ending{i}")))
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or("an `ending` is not a string")?;
    let answer = record
        .get("label")
        .and_then(Value::as_u64)
        .ok_or("no `label` index")? as usize;
    if answer >= options.len() {
        return Err(format!("label {answer} of {} endings", options.len()));
    }
    Ok(Question {
        text: string(record, "sent1")?,
        options,
        answer,
        subject: String::new(),
    })
}

fn question(line: &str) -> Result<Question, String> {
    let record: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if record.get("sent1").is_some() {
        hf_layout(&record)
    } else {
        medqa_layout(&record)
    }
}

impl Plugin for MedqaTasks {
    const ID: &'static str = "medqa_tasks";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str =
        "Reads MedQA JSONL (MedQA's or Hugging Face's layout) as benchmark tasks";
    const KINDS: &'static [Kind] = &[];
    const TASK_FORMATS: &'static [&'static str] = &["medqa", "medqa_text"];

    fn configure(config: &str) -> Result<Self, String> {
        pt_plugin_sdk::parse_config(config)
    }

    fn read_task_items(&self, format: &str, record: &Document) -> Result<Vec<TaskItem>, String> {
        if record.text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let q = question(&record.text)?;
        if q.options.len() < 2 {
            return Err(format!("{} options; a question needs two", q.options.len()));
        }
        let (context, continuations) = match format {
            "medqa" => {
                let mut context = format!("Question: {}\n", q.text);
                for (i, option) in q.options.iter().enumerate() {
                    context.push_str(&format!("{}. {option}\n", (b'A' + i as u8) as char));
                }
                context.push_str("Answer:");
                let letters = (0..q.options.len())
                    .map(|i| format!(" {}", (b'A' + i as u8) as char))
                    .collect();
                (context, letters)
            }
            _ => (
                format!("Question: {}\nAnswer:", q.text),
                q.options.iter().map(|o| format!(" {}", o.trim())).collect(),
            ),
        };
        Ok(vec![TaskItem {
            subject: q.subject,
            context,
            continuations,
            gold: q.answer as u32,
        }])
    }
}

register!(MedqaTasks);

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: &str, line: &str) -> Result<Vec<TaskItem>, String> {
        let record = Document {
            source: "t.jsonl:1".into(),
            text: line.into(),
        };
        MedqaTasks::default().read_task_items(format, &record)
    }

    #[test]
    fn both_layouts_give_the_harness_prompt() {
        let medqa = r#"{"question": "Which organ makes insulin?", "options": {"A": "Liver", "B": "Pancreas", "C": "Spleen", "D": "Kidney"}, "answer_idx": "B", "meta_info": "step1"}"#;
        let hf = r#"{"sent1": "Which organ makes insulin?", "ending0": "Liver", "ending1": "Pancreas", "ending2": "Spleen", "ending3": "Kidney", "label": 1}"#;
        let expected = "Question: Which organ makes insulin?\nA. Liver\nB. Pancreas\nC. Spleen\nD. Kidney\nAnswer:";
        for (line, subject) in [(medqa, "step1"), (hf, "")] {
            let items = read("medqa", line).unwrap();
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].context, expected);
            assert_eq!(items[0].continuations, [" A", " B", " C", " D"]);
            assert_eq!((items[0].gold, items[0].subject.as_str()), (1, subject));
        }
        let words = read("medqa_text", medqa).unwrap();
        assert_eq!(
            words[0].context,
            "Question: Which organ makes insulin?\nAnswer:"
        );
        assert_eq!(
            words[0].continuations,
            [" Liver", " Pancreas", " Spleen", " Kidney"]
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        for (line, expected) in [
            ("{", "not JSON"),
            (
                r#"{"question": "q", "options": ["a", "b"], "answer_idx": "A"}"#,
                "`options` is not an object",
            ),
            (
                r#"{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "E"}"#,
                "answer_idx `E` names no option",
            ),
            (
                r#"{"sent1": "q", "ending0": "a", "ending1": "b", "label": 2}"#,
                "label 2 of 2 endings",
            ),
        ] {
            let error = read("medqa", line).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
        assert!(read("medqa", "  ").unwrap().is_empty());
    }
}
