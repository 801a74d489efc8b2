//! `pt-host plugin new`: a working plugin project in Rust, Python, JavaScript
//! or C — a `min_chars` filter with its manifest, fixtures and build script —
//! to start from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

const WIT: &str = include_str!("../../wit/since_v0.1.0/plugin.wit");
const COMMON: [(&str, &str); 3] = [
    ("plugin.toml", include_str!("../templates/plugin.toml")),
    (
        "fixtures/cases.jsonl",
        include_str!("../templates/cases.jsonl"),
    ),
    ("README.md", include_str!("../templates/README.md")),
];

fn files(lang: Lang) -> Vec<(&'static str, &'static str)> {
    match lang {
        Lang::Rust => vec![
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../templates/rust/lib.rs")),
            ("build.sh", include_str!("../templates/rust/build.sh")),
        ],
        Lang::Python => vec![
            ("app.py", include_str!("../templates/python/app.py")),
            ("build.sh", include_str!("../templates/python/build.sh")),
        ],
        Lang::Js => vec![
            ("plugin.js", include_str!("../templates/js/plugin.js")),
            ("build.sh", include_str!("../templates/js/build.sh")),
        ],
        Lang::C => vec![
            ("plugin.c", include_str!("../templates/c/plugin.c")),
            ("build.sh", include_str!("../templates/c/build.sh")),
        ],
    }
}

/// The Rust SDK next to the pt-host sources this binary was built from.
fn default_sdk() -> Option<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugin-sdk")
        .canonicalize()
        .ok()
}

/// Writes the project `dir/NAME`; returns its path.
pub fn new_plugin(lang: Lang, name: &str, dir: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        bail!(
            "plugin name `{name}`: use lowercase letters, digits and `_`, starting with a letter"
        );
    }
    let project = dir.join(name);
    if project.exists() {
        bail!(
            "{}: exists; choose another name or directory",
            project.display()
        );
    }
    let sdk = match (lang, sdk) {
        (Lang::Rust, Some(path)) => path.display().to_string(),
        (Lang::Rust, None) => default_sdk()
            .with_context(|| "pass --sdk_path: the path of pt-host's plugin-sdk/ directory")?
            .display()
            .to_string(),
        _ => String::new(),
    };
    let label = format!("{lang:?}").to_lowercase();
    let mut all = files(lang);
    all.extend(COMMON);
    all.push(("wit/plugin.wit", WIT));
    for (relative, template) in all {
        let path = project.join(relative);
        std::fs::create_dir_all(path.parent().expect("a parent"))
            .with_context(|| format!("{}: cannot create", project.display()))?;
        let text = template
            .replace("{{name}}", name)
            .replace("{{sdk}}", &sdk)
            .replace("{{lang}}", &label);
        std::fs::write(&path, text).with_context(|| format!("{}: cannot write", path.display()))?;
        #[cfg(unix)]
        if relative == "build.sh" {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(project)
}
