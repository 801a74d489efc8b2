//! `pt-host plugin …`: keys, signed bundles, the local store, and a bundle's
//! own tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pt_bundle::{Bundle, Limits, Manifest};
use pt_data::text::escape_controls;
use pt_data::{DocRef, StepInstance, StepKind, StepPlugin, Verdict};
use pt_plugin_host::{LoadedPlugin, PluginLimits, PluginRuntime};
use serde::Deserialize;

use crate::plugins::{BundleDirs, RegistryArgs, verify_bundle};

/// The WIT the host implements, bundled with every plugin built against it.
const WIT: &str = include_str!("../../wit/since_v0.1.0/plugin.wit");
/// And, for a task plugin, the 0.2.0 addition it is built against.
const TASKS_WIT: &str = include_str!("../../wit/since_v0.2.0/tasks.wit");

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// Start a plugin project: a working `min_chars` filter with manifest, fixtures and build.sh.
    New {
        name: String,
        #[arg(long = "lang", value_enum, default_value = "rust")]
        lang: crate::scaffold::Lang,
        #[arg(long = "output_dir", value_name = "DIR", default_value = ".")]
        output_dir: PathBuf,
        /// Rust only: the pt-host plugin-sdk/ directory (default: next to this build's sources).
        #[arg(long = "sdk_path", value_name = "DIR")]
        sdk_path: Option<PathBuf>,
    },
    /// Make a signing key pair: NAME.key (secret) and NAME.pub (publish it).
    Keygen {
        #[arg(long = "name")]
        name: String,
        #[arg(long = "output_dir", value_name = "DIR", default_value = ".")]
        output_dir: PathBuf,
    },
    /// Bundle a component with its manifest (plugin.toml), WIT, README and fixtures.
    Pack {
        /// The built component.
        #[arg(long = "component", value_name = "WASM")]
        component: PathBuf,
        /// The plugin's source directory, holding plugin.toml.
        #[arg(long = "plugin_dir", value_name = "DIR")]
        plugin_dir: PathBuf,
        #[arg(long = "output_dir", value_name = "DIR", default_value = ".")]
        output_dir: PathBuf,
        /// Sign with this secret key right away.
        #[arg(long = "key", value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Sign (or re-sign) a bundle in place.
    Sign {
        bundle: PathBuf,
        #[arg(long = "key", value_name = "FILE")]
        key: PathBuf,
    },
    /// Check a bundle's signature against the trusted keys, its files against
    /// the manifest, and its interface against this pt-host.
    Verify {
        bundle: PathBuf,
        #[command(flatten)]
        dirs: BundleDirs,
    },
    /// Show a bundle's manifest, or a component's world: imports, exports, kinds.
    Inspect { path: PathBuf },
    /// Verify a bundle and add it to the local store (then `--plugin NAME@VERSION`).
    Install {
        bundle: PathBuf,
        #[command(flatten)]
        dirs: BundleDirs,
    },
    /// List installed bundles.
    List {
        #[command(flatten)]
        dirs: BundleDirs,
    },
    /// Remove an installed bundle (NAME or NAME@VERSION).
    Remove {
        reference: String,
        #[command(flatten)]
        dirs: BundleDirs,
    },
    /// Push a signed bundle to an OCI registry: the component as a Wasm OCI
    /// artifact, the bundle attached to it. Prints the digest that pins it.
    Publish {
        bundle: PathBuf,
        /// REGISTRY/REPOSITORY[:TAG]; the tag defaults to the bundle's version.
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Fetch a bundle from an OCI registry, verify it against the trusted keys
    /// and install it (then `--plugin NAME@VERSION` or the pinned reference).
    Pull {
        /// REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST.
        reference: String,
        #[command(flatten)]
        dirs: BundleDirs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Run a bundle's fixtures (verified first): each case's expected outcome.
    Test {
        bundle: PathBuf,
        #[command(flatten)]
        dirs: BundleDirs,
    },
}

/// `plugin.toml`: what the component cannot say about itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginToml {
    license: String,
    #[serde(default = "default_readme")]
    readme: String,
    /// JSON Lines of fixture cases, relative to the plugin directory.
    fixtures: Option<String>,
    #[serde(default)]
    limits: Limits,
}

fn default_readme() -> String {
    "README.md".into()
}

/// One fixture case: a document and what the plugin's mapper and filter
/// steps together make of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    text: String,
    expect: Expect,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Expect {
    Keep,
    Replace(String),
    Drop(String),
}

const FIXTURES: &str = "fixtures/cases.jsonl";

pub fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::New {
            name,
            lang,
            output_dir,
            sdk_path,
        } => {
            let project =
                crate::scaffold::new_plugin(lang, &name, &output_dir, sdk_path.as_deref())?;
            println!(
                "{}: build with ./build.sh, then `pt-host plugin pack --component {name}.wasm --plugin_dir {}`",
                project.display(),
                project.display()
            );
        }
        PluginCommand::Keygen { name, output_dir } => keygen(&name, &output_dir)?,
        PluginCommand::Pack {
            component,
            plugin_dir,
            output_dir,
            key,
        } => pack_command(&component, &plugin_dir, &output_dir, key.as_deref())?,
        PluginCommand::Sign { bundle: path, key } => {
            let mut bundle = Bundle::read(&path)?;
            bundle.sign(&pt_bundle::read_signing_key(&key)?);
            write_bundle(&bundle, &path)?;
            println!(
                "{}: signed by {}",
                path.display(),
                bundle.signer().unwrap_or_default()
            );
        }
        PluginCommand::Verify { bundle: path, dirs } => {
            let bundle = Bundle::read(&path)?;
            let verified = verify_bundle(&bundle, &dirs)?;
            println!(
                "{}: OK — {} {} for {}, signed by trusted key {}, {} files match the manifest",
                path.display(),
                bundle.manifest.id,
                bundle.manifest.version,
                bundle.manifest.interface,
                verified.signer,
                bundle.files().len()
            );
        }
        PluginCommand::Inspect { path } => inspect(&path)?,
        PluginCommand::Install { bundle: path, dirs } => {
            let bundle = Bundle::read(&path)?;
            verify_bundle(&bundle, &dirs)?;
            let installed = dirs.store().install(&bundle, None)?;
            println!(
                "installed {}@{} (sha256:{}); use it with --plugin {}@{}",
                installed.id, installed.version, installed.digest, installed.id, installed.version
            );
        }
        PluginCommand::List { dirs } => list(&dirs)?,
        PluginCommand::Remove { reference, dirs } => {
            let removed = dirs.store().remove(&reference)?;
            println!("removed {}@{}", removed.id, removed.version);
        }
        PluginCommand::Publish {
            bundle: path,
            reference,
            registry,
        } => {
            let bundle = Bundle::read(&path)?;
            // Only what its author signed goes out; trust is the puller's decision.
            let signer = bundle.check_integrity()?;
            let published = registry.client()?.publish(&bundle, &reference)?;
            println!(
                "published {} {} (signed by {signer}) as {}\npinned: {}",
                bundle.manifest.id, bundle.manifest.version, published.tagged, published.pinned
            );
        }
        PluginCommand::Pull {
            reference,
            dirs,
            registry,
        } => pull(&reference, &dirs, &registry)?,
        PluginCommand::Test { bundle: path, dirs } => {
            let bundle = Bundle::read(&path)?;
            verify_bundle(&bundle, &dirs)?;
            test_bundle(&bundle, &path)?;
        }
    }
    Ok(())
}

fn keygen(name: &str, output_dir: &Path) -> Result<()> {
    let key = pt_bundle::generate_key()?;
    let (secret, public) = pt_bundle::write_key_pair(&key, output_dir, name)?;
    println!(
        "key {} written: {} (secret: keep it private) and {} (give it to users; they trust it by copying it into {})",
        pt_bundle::key_id(key.verifying_key().as_bytes()),
        secret.display(),
        public.display(),
        crate::args::default_trusted_keys().display()
    );
    Ok(())
}

/// `plugin pack`: the bundle, signed if a key is given, into `output_dir`.
fn pack_command(
    component: &Path,
    plugin_dir: &Path,
    output_dir: &Path,
    key: Option<&Path>,
) -> Result<()> {
    let mut bundle = pack(component, plugin_dir)?;
    if let Some(key) = key {
        bundle.sign(&pt_bundle::read_signing_key(key)?);
    }
    let path = output_dir.join(bundle.file_name());
    write_bundle(&bundle, &path)?;
    let signed = bundle
        .signer()
        .map_or("unsigned".into(), |k| format!("signed by {k}"));
    println!(
        "{} ({signed}, {} files)",
        path.display(),
        bundle.files().len()
    );
    Ok(())
}

fn list(dirs: &BundleDirs) -> Result<()> {
    let installed = dirs.store().list()?;
    if installed.is_empty() {
        println!("no plugins installed");
    }
    for i in installed {
        println!(
            "{}@{}  sha256:{}  signer {}  {}",
            i.id,
            i.version,
            &i.digest[..12],
            i.signer.unwrap_or_else(|| "-".into()),
            escape_controls(&i.description, false)
        );
    }
    Ok(())
}

fn pull(reference: &str, dirs: &BundleDirs, registry: &RegistryArgs) -> Result<()> {
    let (installed, _) = crate::plugins::pull_bundle(reference, dirs, registry)?;
    let origin = installed.origin.as_deref().unwrap_or_default();
    println!(
        "installed {}@{} from {origin} (signed by trusted key {}); use it with --plugin {}@{} or --plugin {origin}",
        installed.id,
        installed.version,
        installed.signer.as_deref().unwrap_or_default(),
        installed.id,
        installed.version,
    );
    Ok(())
}

fn write_bundle(bundle: &Bundle, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    pt_fs::write_atomically(path, &bundle.to_bytes()?)
}

/// Loads a component without a cache (tools, not runs).
fn load_component(path: &Path, bytes: &[u8]) -> Result<(PluginRuntime, LoadedPlugin)> {
    let runtime = PluginRuntime::new(None)?;
    let limits = PluginLimits {
        memory_bytes: 512 << 20,
        call_timeout: std::time::Duration::from_secs(30),
    };
    let loaded = runtime.load_bytes(path, bytes, limits)?;
    Ok((runtime, loaded))
}

fn pack(component: &Path, plugin_dir: &Path) -> Result<Bundle> {
    let toml_path = plugin_dir.join("plugin.toml");
    let text = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("{}: cannot read the plugin manifest", toml_path.display()))?;
    let toml: PluginToml =
        toml::from_str(&text).with_context(|| format!("{}: invalid", toml_path.display()))?;
    let wasm = std::fs::read(component)
        .with_context(|| format!("{}: cannot read the component", component.display()))?;
    // The component says who it is; the manifest records it.
    let (_runtime, loaded) = load_component(component, &wasm)?;
    let info = &loaded.info;
    let config_schema: serde_json::Value =
        serde_json::from_str(&info.config_schema).with_context(|| {
            format!(
                "{}: describe() returned a config schema that is not JSON",
                component.display()
            )
        })?;
    let mut files = BTreeMap::from([
        (pt_bundle::COMPONENT.to_string(), wasm),
        ("wit/plugin.wit".to_string(), WIT.as_bytes().to_vec()),
    ]);
    if !loaded.task_formats().is_empty() {
        files.insert("wit/tasks.wit".into(), TASKS_WIT.as_bytes().to_vec());
    }
    let readme = plugin_dir.join(&toml.readme);
    files.insert(
        "README.md".into(),
        std::fs::read(&readme).with_context(|| format!("{}: cannot read", readme.display()))?,
    );
    if let Some(fixtures) = &toml.fixtures {
        let path = plugin_dir.join(fixtures);
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        parse_cases(&bytes, &path.display().to_string())?;
        files.insert(FIXTURES.into(), bytes);
    }
    let manifest = Manifest {
        format: pt_bundle::FORMAT,
        id: info.id.clone(),
        version: info.version.clone(),
        // A task plugin needs a host with 0.2.0's task reader.
        interface: crate::plugins::host_interfaces()
            [usize::from(!loaded.task_formats().is_empty())]
        .clone(),
        kinds: info
            .kinds
            .iter()
            .map(|k| format!("{k:?}").to_lowercase())
            .collect(),
        description: info.description.clone(),
        license: toml.license,
        limits: toml.limits,
        config_schema,
        files: BTreeMap::new(),
    };
    Bundle::new(manifest, files)
}

fn parse_cases(bytes: &[u8], source: &str) -> Result<Vec<Case>> {
    let text = std::str::from_utf8(bytes).with_context(|| format!("{source}: not UTF-8"))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{source}:{}: expected {{\"text\": …, \"expect\": \"keep\" | {{\"replace\": …}} | {{\"drop\": REASON}}}}",
                    i + 1
                )
            })
        })
        .collect()
}

fn inspect(path: &Path) -> Result<()> {
    let (label, wasm, bundle) = if path.extension().is_some_and(|e| e == "ptplugin") {
        let bundle = Bundle::read(path)?;
        (
            path.to_path_buf(),
            bundle.component().to_vec(),
            Some(bundle),
        )
    } else {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        (path.to_path_buf(), bytes, None)
    };
    if let Some(bundle) = &bundle {
        println!(
            "manifest:\n{}",
            escape_controls(&String::from_utf8_lossy(bundle.manifest_bytes()), true)
        );
        println!(
            "signature: {}",
            bundle
                .signer()
                .map_or("none (unsigned)".into(), |k| format!("ed25519 key {k}"))
        );
    }
    let (_runtime, loaded) = load_component(&label, &wasm)?;
    let (imports, exports) = loaded.imports_and_exports();
    println!("imports:");
    for name in imports {
        println!("  {name}");
    }
    println!("exports:");
    for name in exports {
        println!("  {name}");
    }
    println!(
        "plugin: {} {} — {}\nkinds: {:?}",
        loaded.info.id,
        loaded.info.version,
        escape_controls(&loaded.info.description, false),
        loaded.info.kinds
    );
    Ok(())
}

/// Runs every fixture case through the plugin's mapper and filter steps.
fn test_bundle(bundle: &Bundle, path: &Path) -> Result<()> {
    let Some(bytes) = bundle.files().get(FIXTURES) else {
        bail!("{}: the bundle has no {FIXTURES} to test", path.display());
    };
    let cases = parse_cases(bytes, FIXTURES)?;
    let (_runtime, mut loaded) = load_component(path, bundle.component())?;
    loaded.configure("{}")?;
    let mut instance = loaded.instantiate(0)?;
    let steps: Vec<StepKind> = loaded
        .steps()
        .into_iter()
        .filter(|k| *k != StepKind::Augmenter)
        .collect();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let outcome = outcome(instance.as_mut(), &steps, &case.text)
            .with_context(|| format!("{FIXTURES} case {}", i + 1))?;
        if outcome != case.expect {
            failures.push(format!(
                "case {}: expected {:?}, got {outcome:?}",
                i + 1,
                case.expect
            ));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{}: {} of {} fixture cases failed:\n  {}",
            path.display(),
            failures.len(),
            cases.len(),
            failures.join("\n  ")
        );
    }
    println!("{}: {} fixture cases passed", path.display(), cases.len());
    Ok(())
}

fn outcome(instance: &mut dyn StepInstance, steps: &[StepKind], text: &str) -> Result<Expect> {
    let mut current = text.to_string();
    for &kind in steps {
        let docs = [DocRef {
            source: "fixture",
            text: &current,
        }];
        let output = instance
            .apply(kind, &docs, 0)
            .map_err(|e| anyhow::anyhow!("{kind:?} call failed: {}", e))?;
        let pt_data::StepOutput::Verdicts(verdicts) = output else {
            bail!("{kind:?} returned no verdicts");
        };
        match verdicts.into_iter().next() {
            Some(Verdict::Keep) => {}
            Some(Verdict::Replace(text)) => current = text,
            Some(Verdict::Drop(reason)) => return Ok(Expect::Drop(reason)),
            Some(Verdict::Error(message)) => bail!("{kind:?} reported an error: {message}"),
            None => bail!("{kind:?} returned no verdict"),
        }
    }
    Ok(if current == text {
        Expect::Keep
    } else {
        Expect::Replace(current)
    })
}
