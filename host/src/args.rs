//! Flag conventions of HF `TrainingArguments` and MedicalGPT's scripts, so that
//! their users' command lines work unchanged.

/// HF booleans: `--flag`, `--flag True`, `--flag false`, `--flag 1`.
pub fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" => Ok(true),
        "false" | "0" | "no" | "n" => Ok(false),
        _ => Err(format!("expected true or false, got `{value}`")),
    }
}

/// `NAME=VALUE` of `--plugin_config`.
pub fn parse_key_value(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((name, rest)) if !name.is_empty() => Ok((name.to_string(), rest.to_string())),
        _ => Err(format!(
            "expected NAME=JSON (e.g. medical_clean='{{\"min_chars\":20}}'), got `{value}`"
        )),
    }
}

/// `$XDG_VAR/pt-host`, else `~/FALLBACK/pt-host` (XDG base directories).
fn user_dir(xdg_var: &str, fallback: &str) -> std::path::PathBuf {
    let base = std::env::var_os(xdg_var)
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(fallback))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("pt-host")
}

/// The user's cache directory for pt-host: `$XDG_CACHE_HOME/pt-host` or `~/.cache/pt-host`.
pub fn default_cache_dir() -> std::path::PathBuf {
    user_dir("XDG_CACHE_HOME", ".cache")
}

/// Keys of plugin authors the user trusts: `~/.config/pt-host/trusted_keys`.
pub fn default_trusted_keys() -> std::path::PathBuf {
    user_dir("XDG_CONFIG_HOME", ".config").join("trusted_keys")
}

/// The secret that vouches for compiled plugins in the cache:
/// `~/.config/pt-host/component-cache.key` (created private on first use).
pub fn component_cache_key() -> std::path::PathBuf {
    user_dir("XDG_CONFIG_HOME", ".config").join("component-cache.key")
}

/// Installed plugin bundles: `~/.local/share/pt-host/plugins`.
pub fn default_plugin_store() -> std::path::PathBuf {
    user_dir("XDG_DATA_HOME", ".local/share").join("plugins")
}

/// Commands that write a whole directory (merge, extend-tokenizer) never mix
/// their files with an earlier result's.
pub fn require_new_output_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        anyhow::bail!(
            "--output_dir {} exists and is not empty: choose a new directory",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_booleans_and_key_values() {
        assert_eq!(parse_bool("True"), Ok(true));
        assert_eq!(parse_bool("false"), Ok(false));
        assert!(parse_bool("maybe").unwrap_err().contains("maybe"));
        assert_eq!(
            parse_key_value("a={\"x\":1}"),
            Ok(("a".into(), "{\"x\":1}".into()))
        );
        assert!(parse_key_value("={}").is_err());
    }
}
