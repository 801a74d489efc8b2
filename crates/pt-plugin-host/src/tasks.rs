//! Task plugins (interface 0.2.0): a task file's records, turned by a plugin
//! into multiple-choice items, each checked before the host scores it.

use anyhow::{Result, anyhow, bail};
use pt_data::steps::MESSAGE_BYTES;
use pt_data::text::{bounded, escape_controls};

use crate::bindings::pt::plugin0_1_0::types::Document;
use crate::link::DEFAULT_SEED;
use crate::load::LoadedPlugin;
use crate::run::PluginInstance;

/// Formats one plugin may list, and the longest name.
pub const TASK_FORMATS: usize = 16;
const FORMAT_BYTES: usize = 64;
/// Items one record may give, and continuations one item may have.
pub const ITEMS_PER_RECORD: usize = 1024;
pub const CONTINUATIONS: usize = 64;

/// One multiple-choice question a plugin read, checked: a context, at least
/// two continuations, the right one among them.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskItem {
    /// The record it came from, `path:line`.
    pub source: String,
    /// Empty when the plugin gave none.
    pub subject: String,
    pub context: String,
    pub continuations: Vec<String>,
    pub gold: usize,
}

/// A format name: lowercase letters, digits, `_` and `-`.
pub fn is_format(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= FORMAT_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `formats`' answer, checked when the plugin is loaded.
pub(crate) fn checked_formats(plugin: &str, formats: Vec<String>) -> Result<Vec<String>> {
    if formats.len() > TASK_FORMATS {
        bail!(
            "task plugin `{plugin}` lists {} formats; the limit is {TASK_FORMATS}",
            formats.len()
        );
    }
    for format in &formats {
        if !is_format(format) {
            bail!(
                "task plugin `{plugin}` lists the format `{}`: formats are 1–{FORMAT_BYTES} lowercase letters, digits, `_` and `-`",
                escape_controls(&bounded(format.clone(), 80), false)
            );
        }
    }
    Ok(formats)
}

/// Reads one task file's records through a task plugin's instance.
pub struct TaskReader {
    instance: PluginInstance,
    format: String,
}

impl LoadedPlugin {
    /// The task formats the plugin reads (empty: it reads none).
    pub fn task_formats(&self) -> &[String] {
        &self.task_formats
    }

    /// A configured instance that reads `format`, one of [`Self::task_formats`].
    pub fn task_reader(&self, format: &str) -> Result<TaskReader> {
        if !self.task_formats.iter().any(|f| f == format) {
            bail!(
                "plugin `{}` does not read task format `{format}` (it reads: {})",
                self.name,
                self.task_formats.join(", ")
            );
        }
        Ok(TaskReader {
            instance: self.instance(DEFAULT_SEED)?,
            format: format.to_string(),
        })
    }
}

impl TaskReader {
    /// The items of `records` (`(path:line, text)`), in order, each checked;
    /// a record the plugin cannot read, or a bad item, is an error naming the
    /// record's source.
    pub fn read(&mut self, records: &[(String, String)]) -> Result<Vec<TaskItem>> {
        let Some((first, last)) = records.first().zip(records.last()) else {
            return Ok(Vec::new());
        };
        let plugin = self.instance.name().to_string();
        let documents: Vec<Document> = records
            .iter()
            .map(|(source, text)| Document {
                source: source.clone(),
                text: text.clone(),
            })
            .collect();
        let results = self
            .instance
            .read_task_items(&self.format, &documents)
            .map_err(|failure| {
                anyhow!(
                    "task plugin `{plugin}` failed on {} to {}: {failure}",
                    first.0,
                    last.0
                )
            })?;
        if results.len() != records.len() {
            bail!(
                "task plugin `{plugin}` returned {} results for {} records ({} to {}): one per record is the contract",
                results.len(),
                records.len(),
                first.0,
                last.0
            );
        }
        let mut items = Vec::new();
        for ((source, _), result) in records.iter().zip(results) {
            let given = result.map_err(|message| {
                anyhow!(
                    "{source}: task plugin `{plugin}` cannot read this record: {}",
                    escape_controls(&bounded(message, MESSAGE_BYTES), false)
                )
            })?;
            if given.len() > ITEMS_PER_RECORD {
                bail!(
                    "{source}: task plugin `{plugin}` gave {} items for one record; the limit is {ITEMS_PER_RECORD}",
                    given.len()
                );
            }
            for item in given {
                let choices = item.continuations.len();
                let problem = if item.context.is_empty() {
                    Some("an empty context".to_string())
                } else if !(2..=CONTINUATIONS).contains(&choices) {
                    Some(format!(
                        "{choices} continuations (an item has 2 to {CONTINUATIONS})"
                    ))
                } else if item.gold as usize >= choices {
                    Some(format!(
                        "gold {} of {choices} continuations (indices start at 0)",
                        item.gold
                    ))
                } else if item.continuations.iter().any(String::is_empty) {
                    Some("an empty continuation".to_string())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    bail!("{source}: task plugin `{plugin}` gave an item with {problem}");
                }
                items.push(TaskItem {
                    source: source.clone(),
                    subject: item.subject,
                    context: item.context,
                    continuations: item.continuations,
                    gold: item.gold as usize,
                });
            }
        }
        Ok(items)
    }
}
