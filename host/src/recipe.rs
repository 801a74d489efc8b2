//! Run configurations in files: `pt-host run recipe.yaml [--flag value ...]`.
//!
//! A recipe's keys are the flag names (`learning_rate: 2.0e-4`), as in
//! LLaMA-Factory's YAML files; YAML, TOML and JSON all work. The file becomes
//! flags placed before the command line's, and a flag given on the command
//! line replaces the file's value (lists included). `--print_config` shows the
//! resolved configuration, each value with where it came from, in a form that
//! is itself a recipe.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use serde_json::Value;

/// Subcommands that take a recipe as their first argument.
const TAKES_RECIPE: [&str; 6] = ["run", "eval", "prepare", "generate", "merge", "init-model"];

/// The recipe a command line named, and which flags the command line itself gave.
pub struct Recipe {
    pub path: PathBuf,
    /// Flags (long names) set by the file.
    from_file: BTreeSet<String>,
}

fn is_recipe(arg: &OsString) -> bool {
    let path = Path::new(arg);
    path.extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "toml" || e == "json")
        && !arg.to_string_lossy().starts_with('-')
}

fn parse(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("recipe {}: cannot read", path.display()))?;
    let value: Value = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml::from_str(&text).map_err(anyhow::Error::from),
        Some("json") => serde_json::from_str(&text).map_err(anyhow::Error::from),
        _ => serde_saphyr::from_str(&text).map_err(anyhow::Error::from),
    }
    .with_context(|| format!("recipe {}: not valid", path.display()))?;
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(serde_json::Map::new()),
        _ => bail!(
            "recipe {}: expected `flag_name: value` lines at the top level",
            path.display()
        ),
    }
}

/// `--key value` arguments for one recipe entry.
fn flag_values(key: &str, value: &Value) -> Result<Vec<String>> {
    Ok(match value {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Bool(_) | Value::Number(_) => vec![value.to_string()],
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Bool(_) | Value::Number(_) => Ok(item.to_string()),
                _ => bail!("`{key}`: list items must be strings, numbers or booleans"),
            })
            .collect::<Result<_>>()?,
        // plugin_config: {medical_clean: {min_chars: 20}} → NAME=JSON per entry.
        Value::Object(entries) => entries
            .iter()
            .map(|(name, config)| format!("{name}={config}"))
            .collect(),
    })
}

/// The long flag names the command line sets (`--name` and `--name=value`).
fn command_line_flags(args: &[OsString]) -> BTreeSet<String> {
    args.iter()
        .filter_map(|a| a.to_str()?.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// Expands `pt-host SUBCOMMAND RECIPE [args]` into flags; other command lines
/// pass through unchanged.
pub fn expand(
    args: Vec<OsString>,
    command: &clap::Command,
) -> Result<(Vec<OsString>, Option<Recipe>)> {
    let Some(position) = args
        .iter()
        .position(|a| a.to_str().is_some_and(|a| TAKES_RECIPE.contains(&a)))
    else {
        return Ok((args, None));
    };
    if !args.get(position + 1).is_some_and(is_recipe) {
        return Ok((args, None));
    }
    let subcommand_name = args[position].to_str().expect("matched as str").to_string();
    let path = PathBuf::from(&args[position + 1]);
    let subcommand = command
        .find_subcommand(&subcommand_name)
        .expect("TAKES_RECIPE names subcommands");
    let rest = &args[position + 2..];
    let given = command_line_flags(rest);
    let mut expanded: Vec<OsString> = args[..=position].to_vec();
    let mut from_file = BTreeSet::new();
    for (key, value) in parse(&path)? {
        let Some(arg) = subcommand.get_arguments().find(|a| {
            a.get_long() == Some(key.as_str())
                || a.get_all_aliases()
                    .is_some_and(|aliases| aliases.contains(&key.as_str()))
        }) else {
            bail!(
                "recipe {}: `{key}` is not a flag of `pt-host {subcommand_name}` (pt-host {subcommand_name} --help lists them)",
                path.display()
            );
        };
        let long = arg.get_long().expect("found by long name").to_string();
        let aliases = arg.get_all_aliases().unwrap_or_default();
        if given.contains(&long) || aliases.iter().any(|a| given.contains(*a)) {
            continue;
        }
        let values =
            flag_values(&key, &value).with_context(|| format!("recipe {}", path.display()))?;
        for value in values {
            expanded.push(format!("--{long}").into());
            expanded.push(value.into());
        }
        from_file.insert(long);
    }
    expanded.extend(rest.iter().cloned());
    Ok((expanded, Some(Recipe { path, from_file })))
}

/// A raw flag value as YAML: numbers and booleans bare, the rest quoted.
fn yaml_scalar(value: &str) -> String {
    let bare = value.parse::<f64>().is_ok_and(f64::is_finite) || matches!(value, "true" | "false");
    if bare {
        value.to_string()
    } else {
        Value::String(value.to_string()).to_string()
    }
}

/// `--print_config`: every flag of the subcommand with a value, as YAML, each
/// with its source (command line, recipe, environment or default).
pub fn print(matches: &clap::ArgMatches, command: &clap::Command, recipe: Option<&Recipe>) {
    // The innermost subcommand (`plugin pull` is two deep).
    let (mut command, mut matches, mut names) = (command, matches, Vec::new());
    while let Some((name, inner)) = matches.subcommand() {
        command = command.find_subcommand(name).expect("parsed subcommand");
        matches = inner;
        names.push(name);
    }
    println!("# pt-host {}: resolved configuration", names.join(" "));
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let (Some(long), Some(values)) = (arg.get_long(), matches.get_raw(id)) else {
            continue;
        };
        if long == "print_config" {
            continue;
        }
        let values: Vec<String> = values.map(|v| yaml_scalar(&v.to_string_lossy())).collect();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => match recipe {
                Some(r) if r.from_file.contains(long) => r.path.display().to_string(),
                _ => "command line".into(),
            },
            Some(ValueSource::EnvVariable) => format!(
                "environment {}",
                arg.get_env()
                    .map(|e| e.to_string_lossy())
                    .unwrap_or_default()
            ),
            _ => "default".into(),
        };
        let shown = match values.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        println!("{long}: {shown}  # {source}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_scalars_round_trip_through_the_parser() {
        for raw in ["2e-4", "true", "bigscience/bloomz-560m", "a: b", "8"] {
            let line = format!("k: {}", yaml_scalar(raw));
            let parsed: Value = serde_saphyr::from_str(&line).unwrap();
            let back = match &parsed["k"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(back.parse::<f64>().ok(), raw.parse::<f64>().ok(), "{raw}");
            if raw.parse::<f64>().is_err() {
                assert_eq!(back, raw);
            }
        }
    }
}
