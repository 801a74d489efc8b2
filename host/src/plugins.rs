//! `--plugin` and friends: loading, configuring and limiting plugins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pt_native_plugin::NativePlugin;
use pt_plugin_host::{ComponentCache, LoadedPlugin, PluginLimits, PluginRuntime};

use crate::args::parse_key_value;

/// `--on_plugin_error` and `--on_bad_record`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OnError {
    /// Stop with an error naming the file and line (and plugin) and the cause.
    Fail,
    /// Skip the document, count it, and list it in excluded.jsonl.
    Skip,
}

impl From<OnError> for pt_data::ErrorPolicy {
    fn from(value: OnError) -> Self {
        match value {
            OnError::Fail => pt_data::ErrorPolicy::Fail,
            OnError::Skip => pt_data::ErrorPolicy::Skip,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct PluginArgs {
    /// A plugin, run in the sandbox: a component (.wasm), a signed bundle
    /// (.ptplugin, verified against --trusted_keys), an installed bundle
    /// (NAME or NAME@VERSION), or a bundle in an OCI registry
    /// (REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST; a tag is pinned to
    /// its digest when the run starts). Repeat for several; they run in the order given.
    #[arg(long = "plugin", value_name = "PATH|NAME@VERSION|OCI-REF")]
    pub plugins: Vec<PathBuf>,
    #[command(flatten)]
    pub dirs: BundleDirs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// A plugin's JSON configuration: `NAME={"key":value}` or `NAME=@file.json`,
    /// NAME being the plugin's id or file name without `.wasm`.
    #[arg(long = "plugin_config", value_name = "NAME=JSON", value_parser = parse_key_value)]
    pub plugin_configs: Vec<(String, String)>,
    /// What to do with a document a plugin fails on (trap, deadline, memory
    /// limit, or an error it reports).
    #[arg(long = "on_plugin_error", value_enum, default_value = "fail")]
    pub on_plugin_error: OnError,
    /// Wall-clock limit of one plugin call, in milliseconds.
    #[arg(long = "plugin_timeout_ms", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_timeout_ms: u64,
    /// Also load native plugins (.so/.dylib/.dll). They are NOT sandboxed:
    /// they run with pt-host's rights (files, network, memory). Trusted code only.
    #[arg(long = "allow_native", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = crate::args::parse_bool)]
    pub allow_native: bool,
    /// Memory limit of each plugin instance, in MiB.
    #[arg(long = "plugin_memory_mb", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub plugin_memory_mb: u64,
    /// Documents per plugin call.
    #[arg(long = "plugin_batch_size", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub plugin_batch_size: u64,
    /// Derived documents an augmenter may return per input document in one
    /// call; more is a plugin error (--on_plugin_error decides).
    #[arg(long = "max_derived_per_document", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_derived_per_document: u64,
    /// Derived documents each augmenter may add to the training data in all
    /// (per shard when sharded); past it, the run fails, or with
    /// --on_plugin_error skip the rest are discarded and counted.
    #[arg(long = "max_derived_documents", default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_derived_documents: u64,
}

/// Where trusted keys and installed bundles live.
#[derive(clap::Args, Debug, Clone)]
pub struct BundleDirs {
    /// Directory of trusted authors' public keys (*.pub) for signed bundles
    /// (default: ~/.config/pt-host/trusted_keys).
    #[arg(long = "trusted_keys", value_name = "DIR", env = "PT_TRUSTED_KEYS")]
    pub trusted_keys: Option<PathBuf>,
    /// Where installed bundles are kept (default: ~/.local/share/pt-host/plugins).
    #[arg(long = "plugin_store", value_name = "DIR", env = "PT_PLUGIN_STORE")]
    pub plugin_store: Option<PathBuf>,
}

/// How to reach OCI registries.
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// A registry reached over plain HTTP rather than HTTPS (a private one
    /// without TLS); repeat or separate with commas. Loopback registries
    /// always use HTTP. Credentials come from PT_REGISTRY_USERNAME and
    /// PT_REGISTRY_PASSWORD, or from `docker login` (~/.docker/config.json).
    #[arg(
        long = "plain_http_registry",
        value_name = "HOST:PORT",
        env = "PT_PLAIN_HTTP_REGISTRIES",
        value_delimiter = ','
    )]
    pub plain_http: Vec<String>,
}

impl RegistryArgs {
    pub fn client(&self) -> Result<pt_registry::Registry> {
        pt_registry::Registry::new(self.plain_http.clone())
    }
}

/// Pulls the bundle at `reference`, verifies it against the trusted keys and
/// this host's interfaces, and installs it with its pinned origin.
pub fn pull_bundle(
    reference: &str,
    dirs: &BundleDirs,
    registry: &RegistryArgs,
) -> Result<(pt_bundle::Installed, pt_bundle::Bundle)> {
    let pulled = registry.client()?.pull(reference)?;
    verify_bundle(&pulled.bundle, dirs)
        .with_context(|| format!("pulled from {}", pulled.pinned))?;
    let installed = dirs.store().install(&pulled.bundle, Some(&pulled.pinned))?;
    Ok((installed, pulled.bundle))
}

impl BundleDirs {
    pub fn trusted_keys_dir(&self) -> PathBuf {
        self.trusted_keys
            .clone()
            .unwrap_or_else(crate::args::default_trusted_keys)
    }

    pub fn trusted(&self) -> Result<pt_bundle::TrustedKeys> {
        pt_bundle::TrustedKeys::load_dir(&self.trusted_keys_dir())
    }

    pub fn store(&self) -> pt_bundle::Store {
        pt_bundle::Store::new(
            &self
                .plugin_store
                .clone()
                .unwrap_or_else(crate::args::default_plugin_store),
        )
    }
}

impl PluginArgs {
    pub fn limits(&self) -> PluginLimits {
        PluginLimits {
            memory_bytes: (self.plugin_memory_mb as usize) << 20,
            call_timeout: Duration::from_millis(self.plugin_timeout_ms),
        }
    }
}

/// A loaded `--plugin`: a sandboxed component, or a native library. A run
/// holds a handful, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum HostPlugin {
    Wasm(LoadedPlugin),
    Native(NativePlugin),
}

impl HostPlugin {
    pub fn name(&self) -> &str {
        match self {
            HostPlugin::Wasm(p) => &p.name,
            HostPlugin::Native(p) => &p.info.id,
        }
    }

    pub fn version(&self) -> &str {
        match self {
            HostPlugin::Wasm(p) => &p.info.version,
            HostPlugin::Native(p) => &p.info.version,
        }
    }

    pub fn digest(&self) -> &str {
        match self {
            HostPlugin::Wasm(p) => &p.digest,
            HostPlugin::Native(p) => &p.digest,
        }
    }

    /// What `--plugin` resolved to: a file, an installed bundle, or a pinned registry reference.
    pub fn source(&self) -> String {
        self.path().display().to_string()
    }

    pub fn config(&self) -> &str {
        match self {
            HostPlugin::Wasm(p) => &p.config,
            HostPlugin::Native(p) => &p.config,
        }
    }

    fn path(&self) -> &Path {
        match self {
            HostPlugin::Wasm(p) => &p.path,
            HostPlugin::Native(p) => &p.path,
        }
    }

    fn configure(&mut self, config: &str) -> Result<()> {
        match self {
            HostPlugin::Wasm(p) => p.configure(config),
            HostPlugin::Native(p) => p.configure(config),
        }
    }

    /// The document steps, for the data pipeline.
    pub fn steps(&self) -> &dyn pt_data::StepPlugin {
        match self {
            HostPlugin::Wasm(p) => p,
            HostPlugin::Native(p) => p,
        }
    }

    /// The component, for metric plugins (native plugins have no metrics).
    pub fn wasm(&self) -> Option<&LoadedPlugin> {
        match self {
            HostPlugin::Wasm(p) => Some(p),
            HostPlugin::Native(_) => None,
        }
    }
}

/// Interfaces this host implements, as bundle manifests name them: 0.1.0,
/// and 0.2.0 (0.1.0 with task plugins).
pub fn host_interfaces() -> [String; 2] {
    [
        pt_plugin_host::INTERFACE_VERSION,
        pt_plugin_host::TASKS_INTERFACE_VERSION,
    ]
    .map(|version| format!("pt:plugin@{version}"))
}

/// Verifies `bundle` against the trusted keys and this host's interfaces.
pub fn verify_bundle(bundle: &pt_bundle::Bundle, dirs: &BundleDirs) -> Result<pt_bundle::Verified> {
    let interfaces = host_interfaces();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    bundle.verify(&dirs.trusted()?, &interfaces)
}

/// A bundle verified against the trusted keys: its component, loaded.
pub fn load_bundle(
    runtime: &PluginRuntime,
    bundle: &pt_bundle::Bundle,
    source: &Path,
    args: &PluginArgs,
) -> Result<LoadedPlugin> {
    verify_bundle(bundle, &args.dirs)?;
    runtime.load_bytes(source, bundle.component(), args.limits())
}

/// `--plugin`: a .wasm component, a .ptplugin bundle, an installed bundle,
/// or (with --allow_native) a native library.
fn load_one(runtime: &PluginRuntime, reference: &Path, args: &PluginArgs) -> Result<HostPlugin> {
    if reference
        .extension()
        .is_some_and(|e| e == "so" || e == "dylib" || e == "dll")
    {
        if !args.allow_native {
            bail!(
                "--plugin {}: a native library runs unsandboxed, with all of pt-host's rights; pass --allow_native if you trust it",
                reference.display()
            );
        }
        eprintln!(
            "warning: --plugin {}: native plugin, NOT sandboxed",
            reference.display()
        );
        return NativePlugin::load(reference).map(HostPlugin::Native);
    }
    load_wasm(runtime, reference, args).map(HostPlugin::Wasm)
}

fn load_wasm(runtime: &PluginRuntime, reference: &Path, args: &PluginArgs) -> Result<LoadedPlugin> {
    let text = reference.to_string_lossy();
    if !reference.exists() && pt_registry::looks_like_reference(&text) {
        return load_from_registry(runtime, &text, args)
            .with_context(|| format!("--plugin {text}"));
    }
    if reference.extension().is_some_and(|e| e == "ptplugin") {
        let bundle = pt_bundle::Bundle::read(reference)
            .with_context(|| format!("--plugin {}", reference.display()))?;
        return load_bundle(runtime, &bundle, reference, args)
            .with_context(|| format!("--plugin {}", reference.display()));
    }
    if reference.is_file() {
        return runtime.load(reference, args.limits());
    }
    // Not a file: a bare NAME, NAME@VERSION or NAME.wasm is an installed
    // bundle (the design's `--plugin medical_clean.wasm` from any directory).
    let name = reference.to_string_lossy();
    if name.contains('/') {
        bail!(
            "--plugin {name}: no such file (give a .wasm component, a .ptplugin bundle, or an installed NAME@VERSION)"
        );
    }
    let id = name.strip_suffix(".wasm").unwrap_or(&name);
    let store = args.dirs.store();
    let bundle = store.load(id).with_context(|| {
        format!(
            "--plugin {name}: no such file here, and no bundle `{id}` in the plugin store ({}).\n\
             The example plugins install with scripts/install-plugins.sh (scripts/quickstart.sh runs it); \
             yours with `pt-host plugin install BUNDLE`; or give the component's path, \
             e.g. target/wasm32-wasip2/release/{id}.wasm after scripts/build-plugins.sh",
            store.root().display()
        )
    })?;
    let installed = format!("{}@{}", bundle.manifest.id, bundle.manifest.version);
    load_bundle(runtime, &bundle, Path::new(&installed), args)
        .with_context(|| format!("--plugin {name}"))
}

/// A registry bundle: from the store when this digest was pulled before
/// (no network needed), else pulled, verified and installed. Tags are
/// resolved now, so the run uses one fixed digest throughout.
fn load_from_registry(
    runtime: &PluginRuntime,
    reference: &str,
    args: &PluginArgs,
) -> Result<LoadedPlugin> {
    let store = args.dirs.store();
    let cached = match pt_registry::pinned(reference)? {
        Some(pinned) => store.find_origin(&pinned)?,
        None => None,
    };
    let (installed, bundle) = match cached {
        Some(installed) => {
            let bundle = store.load_installed(&installed)?;
            (installed, bundle)
        }
        None => pull_bundle(reference, &args.dirs, &args.registry)?,
    };
    let origin = installed
        .origin
        .expect("registry installs record their origin");
    load_bundle(runtime, &bundle, Path::new(&origin), args)
}

/// The configuration text of `--plugin_config NAME=...`, as canonical JSON.
fn config_json(name: &str, value: &str) -> Result<String> {
    let text = match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--plugin_config {name}: cannot read {path}"))?,
        None => value.to_string(),
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--plugin_config {name}: invalid JSON `{text}`"))?;
    if !json.is_object() {
        bail!("--plugin_config {name}: expected a JSON object, got `{text}`");
    }
    Ok(json.to_string())
}

/// Loads and configures every `--plugin`, in order. Compiled components are
/// cached in `cache_dir/components`, vouched for by the user's key
/// (`~/.config/pt-host/component-cache.key`).
pub fn load(args: &PluginArgs, cache_dir: &Path) -> Result<(PluginRuntime, Vec<HostPlugin>)> {
    let runtime = PluginRuntime::new(Some(ComponentCache {
        dir: cache_dir.to_path_buf(),
        key_file: crate::args::component_cache_key(),
    }))?;
    let mut loaded = Vec::new();
    for reference in &args.plugins {
        loaded.push(load_one(&runtime, reference, args)?);
    }
    for (name, _) in &args.plugin_configs {
        let known = loaded
            .iter()
            .any(|p| p.name() == name || p.path().file_stem().is_some_and(|s| s == name.as_str()));
        if !known {
            let names: Vec<&str> = loaded.iter().map(HostPlugin::name).collect();
            bail!(
                "--plugin_config {name}: no plugin of that name is loaded (loaded: {})",
                names.join(", ")
            );
        }
    }
    for plugin in &mut loaded {
        let stem = plugin
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let given = args
            .plugin_configs
            .iter()
            .rev()
            .find(|(name, _)| name == plugin.name() || *name == stem);
        let config = match given {
            Some((name, value)) => config_json(name, value)?,
            None => "{}".to_string(),
        };
        plugin.configure(&config)?;
        let how = match &plugin {
            HostPlugin::Wasm(p) if p.from_cache => "compiled code from cache",
            HostPlugin::Wasm(_) => "compiled",
            HostPlugin::Native(_) => "native, unsandboxed",
        };
        eprintln!(
            "plugin {} {} ({}; {how}) from {}",
            plugin.name(),
            plugin.version(),
            &plugin.digest()[..19],
            plugin.source()
        );
    }
    Ok((runtime, loaded))
}
