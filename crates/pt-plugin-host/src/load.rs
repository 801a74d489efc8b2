//! Loading: compile a component (or load it precompiled from the cache),
//! pre-link it, check that it is a `pt:plugin@0.1.0` plugin of the kinds it
//! declares, and validate its configuration once before any work starts.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use hmac::{Hmac, Mac};
use pt_data::text::{bounded, escape_controls};
use pt_data::{StepInstance, StepKind, StepPlugin};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine};

use crate::bindings::exports::pt::plugin0_1_0::{augmenter, filter, mapper, metric, plugin};
use crate::bindings::exports::pt::plugin0_2_0::tasks;
use crate::bindings::pt::plugin0_1_0::types::{Info, Kind};
use crate::limits::{PluginLimits, Ticker};
use crate::link::{self, DEFAULT_SEED, PluginState};
use crate::run::{Exports, MetricSession, PluginInstance};
use pt_data::steps::MESSAGE_BYTES;

/// Longest description and configuration schema kept from `describe`.
const DESCRIPTION_BYTES: usize = 512;
const SCHEMA_BYTES: usize = 64 * 1024;

/// Where compiled components are kept, and the key that vouches for them.
///
/// A compiled component is native code that wasmtime loads without checks,
/// so the cache directory must not be a way to run code: every artefact
/// carries an HMAC-SHA256 under a per-user secret (`key_file`, created
/// readable by its owner alone). A file this user's pt-host did not write —
/// planted, copied from another machine, or altered — fails the check and
/// is recompiled from the component.
#[derive(Clone, Debug)]
pub struct ComponentCache {
    pub dir: PathBuf,
    pub key_file: PathBuf,
}

type CacheMac = Hmac<Sha256>;
const MAC_BYTES: usize = 32;

impl ComponentCache {
    /// The secret, created on first use. `None` (no caching, with a warning)
    /// when it cannot be kept private.
    fn key(&self) -> Option<Vec<u8>> {
        match read_or_create_key(&self.key_file) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(
                    "{}: compiled plugins are not cached: {error:#}",
                    self.key_file.display()
                );
                None
            }
        }
    }
}

fn read_or_create_key(path: &Path) -> Result<Vec<u8>> {
    if !path.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness for a key: {e}"))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(hex::encode(key).as_bytes())?;
                file.sync_all()?;
            }
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "readable or writable by others (mode {:o}); `chmod 600` it",
                meta.mode() & 0o777
            );
        }
    }
    let text = std::fs::read_to_string(path)?;
    hex::decode(text.trim()).context("not a hex key")
}

fn cache_mac(key: &[u8], name: &str, code: &[u8]) -> CacheMac {
    let mut mac = CacheMac::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(name.as_bytes());
    mac.update(code);
    mac
}

/// The wasmtime engine, linker and component cache shared by all plugins.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache: Option<ComponentCache>,
    _ticker: Ticker,
}

impl PluginRuntime {
    /// `cache`: where compiled components are kept (`None`: no caching).
    pub fn new(cache: Option<ComponentCache>) -> Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.parallel_compilation(true);
        // Failures are classified from typed traps; a wasm backtrace would
        // only put the plugin's frames into the user's error message.
        config.wasm_backtrace_max_frames(None);
        let engine = Engine::new(&config)
            .map_err(|e| anyhow!("cannot start the WebAssembly engine: {e}"))?;
        let linker =
            link::linker(&engine).map_err(|e| anyhow!("cannot link the plugin interface: {e}"))?;
        let ticker = Ticker::start(engine.clone());
        Ok(Self {
            engine,
            linker,
            cache,
            _ticker: ticker,
        })
    }

    /// Compiles `bytes`, or loads the precompiled form from the cache. The
    /// name is the component's sha256 and the engine's compatibility hash,
    /// so a new wasmtime or different settings never load stale code; the
    /// content is trusted only under this user's MAC. Returns whether the
    /// cache was hit.
    fn compile(&self, path: &Path, bytes: &[u8], digest: &str) -> Result<(Component, bool)> {
        let compile = || {
            Component::new(&self.engine, bytes).map_err(|e| {
                anyhow!(
                    "{}: not a WebAssembly component: {e:#}\n\
                     Build plugins with `cargo build --target wasm32-wasip2` (or wrap a core module with `wasm-tools component new`).",
                    path.display()
                )
            })
        };
        let Some((cache, key)) = self
            .cache
            .as_ref()
            .and_then(|cache| Some((cache, cache.key()?)))
        else {
            return Ok((compile()?, false));
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let name = format!("{digest}-{:016x}.cwasm", hasher.finish());
        let cached = cache.dir.join("components").join(&name);
        if let Ok(stored) = std::fs::read(&cached) {
            let trusted = stored.len() > MAC_BYTES && {
                let (code, tag) = stored.split_at(stored.len() - MAC_BYTES);
                cache_mac(&key, &name, code).verify_slice(tag).is_ok()
            };
            if !trusted {
                tracing::warn!(
                    "{}: not written by this user's pt-host (its MAC does not verify); recompiling",
                    cached.display()
                );
            } else {
                let code = &stored[..stored.len() - MAC_BYTES];
                // SAFETY: `code` is what `Component::serialize` wrote for an
                // engine of this compatibility hash: its MAC under this
                // user's private key verified just above.
                match unsafe { Component::deserialize(&self.engine, code) } {
                    Ok(component) => return Ok((component, true)),
                    Err(e) => tracing::warn!(
                        "{}: unusable cached component, recompiling: {e}",
                        cached.display()
                    ),
                }
            }
        }
        let component = compile()?;
        let mut serialized = component
            .serialize()
            .map_err(|e| anyhow!("cannot serialise the compiled component: {e}"))?;
        let tag = cache_mac(&key, &name, &serialized).finalize().into_bytes();
        serialized.extend_from_slice(&tag);
        std::fs::create_dir_all(cached.parent().unwrap())
            .and_then(|()| {
                let temporary = cached.with_extension(format!("partial-{}", std::process::id()));
                std::fs::write(&temporary, serialized)?;
                std::fs::rename(&temporary, &cached)
            })
            .with_context(|| format!("{}: cannot write the component cache", cached.display()))?;
        Ok((component, false))
    }

    /// Loads the plugin at `path` and asks it who it is. Give it its
    /// configuration with [`LoadedPlugin::configure`] before use.
    pub fn load(&self, path: &Path, limits: PluginLimits) -> Result<LoadedPlugin> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read plugin", path.display()))?;
        self.load_bytes(path, &bytes, limits)
    }

    /// [`PluginRuntime::load`] for a component already in memory (from a
    /// bundle); `path` names it in messages.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        limits: PluginLimits,
    ) -> Result<LoadedPlugin> {
        let digest = hex::encode(Sha256::digest(bytes));
        let (component, from_cache) = self.compile(path, bytes, &digest)?;
        if let Some(built_for) = self.built_for(&component)
            && built_for != crate::INTERFACE_VERSION
        {
            bail!(
                "{}: built for interface pt:plugin@{built_for}; this pt-host implements pt:plugin@{} (and pt:plugin@{}, which adds task plugins to it). \
                 Rebuild the plugin against wit/since_v{} or wit/since_v{} (pt-plugin-sdk {}), or use a pt-host that implements pt:plugin@{built_for}.",
                path.display(),
                crate::INTERFACE_VERSION,
                crate::TASKS_INTERFACE_VERSION,
                crate::INTERFACE_VERSION,
                crate::TASKS_INTERFACE_VERSION,
                env!("CARGO_PKG_VERSION")
            );
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            anyhow!(
                "{}: the plugin imports something pt-host does not provide: {e:#}\n\
                 Plugins may import only `pt:plugin/host@{}` and WASI.",
                path.display(),
                crate::INTERFACE_VERSION
            )
        })?;
        let plugin_exports = plugin::GuestIndices::new(&pre).map_err(|e| {
            anyhow!(
                "{}: not a pt-host plugin for interface pt:plugin@{} ({e}).\n\
                 Rebuild it against wit/since_v{} (pt-plugin-sdk {}).",
                path.display(),
                crate::INTERFACE_VERSION,
                crate::INTERFACE_VERSION,
                env!("CARGO_PKG_VERSION")
            )
        })?;
        let file_stem = path
            .file_stem()
            .map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
        let mut loaded = LoadedPlugin {
            name: file_stem.into(),
            path: path.to_path_buf(),
            info: Info {
                id: String::new(),
                version: String::new(),
                description: String::new(),
                kinds: Vec::new(),
                config_schema: String::new(),
            },
            digest: format!("sha256:{digest}"),
            config: "{}".to_string(),
            limits,
            from_cache,
            exports: Exports {
                plugin: plugin_exports,
                filter: filter::GuestIndices::new(&pre).ok(),
                mapper: mapper::GuestIndices::new(&pre).ok(),
                augmenter: augmenter::GuestIndices::new(&pre).ok(),
                metric: metric::GuestIndices::new(&pre).ok(),
                tasks: tasks::GuestIndices::new(&pre).ok(),
            },
            task_formats: Vec::new(),
            pre,
        };
        let mut probe = loaded
            .instance_unconfigured(DEFAULT_SEED)
            .with_context(|| format!("plugin {}", path.display()))?;
        let info = probe
            .describe()
            .map_err(|e| anyhow!("plugin {}: describe failed: {e}", path.display()))?;
        loaded.info = checked_info(path, info)?;
        loaded.name = loaded.info.id.clone().into();
        let formats = probe
            .task_formats()
            .map_err(|e| anyhow!("plugin {}: formats failed: {e}", path.display()))?;
        loaded.task_formats = crate::tasks::checked_formats(&loaded.name, formats)?;
        for kind in &loaded.info.kinds {
            let exported = match kind {
                Kind::Filter => loaded.exports.filter.is_some(),
                Kind::Mapper => loaded.exports.mapper.is_some(),
                Kind::Augmenter => loaded.exports.augmenter.is_some(),
                Kind::Metric => loaded.exports.metric.is_some(),
            };
            if !exported {
                bail!(
                    "plugin `{}` ({}) declares kind {kind:?} but does not export pt:plugin/{}@{}",
                    loaded.name,
                    path.display(),
                    format!("{kind:?}").to_lowercase(),
                    crate::INTERFACE_VERSION
                );
            }
        }
        Ok(loaded)
    }
}

impl PluginRuntime {
    /// The version of `pt:plugin/plugin` the component exports, if any.
    fn built_for(&self, component: &Component) -> Option<String> {
        component
            .component_type()
            .exports(&self.engine)
            .find_map(|(name, _)| name.strip_prefix("pt:plugin/plugin@").map(str::to_string))
    }
}

/// `describe`'s answer, validated (id, version) and bounded (description,
/// schema), naming the file when it is refused.
fn checked_info(path: &Path, mut info: Info) -> Result<Info> {
    let shown = |text: &str| escape_controls(&bounded(text.to_string(), 80), false).into_owned();
    if !pt_bundle::is_plugin_id(&info.id) {
        bail!(
            "{}: the plugin's id `{}` is not an identifier ({})",
            path.display(),
            shown(&info.id),
            pt_bundle::PLUGIN_ID_GRAMMAR
        );
    }
    if !pt_bundle::is_plugin_version(&info.version) {
        bail!(
            "{}: plugin `{}` has version `{}`, which is not a version ({})",
            path.display(),
            info.id,
            shown(&info.version),
            pt_bundle::PLUGIN_ID_GRAMMAR
        );
    }
    info.description = bounded(info.description, DESCRIPTION_BYTES);
    info.config_schema = bounded(info.config_schema, SCHEMA_BYTES);
    Ok(info)
}

/// A compiled, validated plugin. Cheap to instantiate: one instance per worker
/// thread, and a fresh one after any trap.
pub struct LoadedPlugin {
    /// The plugin's id (from `describe`).
    pub name: Arc<str>,
    pub path: PathBuf,
    pub info: Info,
    /// `sha256:` of the component file.
    pub digest: String,
    /// The JSON configuration every instance receives.
    pub config: String,
    pub limits: PluginLimits,
    /// Whether the compiled code came from the cache.
    pub from_cache: bool,
    pub(crate) exports: Exports,
    pub(crate) pre: InstancePre<PluginState>,
    /// What `formats` listed (interface 0.2.0's task reader).
    pub(crate) task_formats: Vec<String>,
}

impl LoadedPlugin {
    /// A fresh, configured instance whose randomness starts from `seed`.
    pub fn instance(&self, seed: u64) -> Result<PluginInstance> {
        let mut instance = self.instance_unconfigured(seed)?;
        instance
            .configure(&self.config)
            .map_err(|e| anyhow!("plugin `{}`: {}", self.name, bounded(e, MESSAGE_BYTES)))?;
        Ok(instance)
    }

    /// Sets the JSON configuration every instance receives, after checking
    /// that the plugin accepts it (on a probe instance, before any work).
    pub fn configure(&mut self, config: &str) -> Result<()> {
        let mut probe = self
            .instance_unconfigured(DEFAULT_SEED)
            .with_context(|| format!("plugin `{}`", self.name))?;
        probe.configure(config).map_err(|e| {
            anyhow!(
                "plugin `{}` ({}): {}",
                self.name,
                self.path.display(),
                bounded(e, MESSAGE_BYTES)
            )
        })?;
        self.config = config.to_string();
        Ok(())
    }

    /// Instantiates without calling `configure`; `seed` seeds its randomness.
    pub(crate) fn instance_unconfigured(&self, seed: u64) -> Result<PluginInstance> {
        PluginInstance::new(
            &self.pre,
            &self.exports,
            self.name.clone(),
            self.limits,
            &self.info.kinds,
            seed,
        )
    }

    /// A fresh instance holding a new metric accumulator.
    pub fn metric_session(&self) -> Result<MetricSession> {
        if !self.has_kind(Kind::Metric) {
            bail!(
                "plugin `{}` is not a metric plugin (its kinds: {:?})",
                self.name,
                self.info.kinds
            );
        }
        MetricSession::new(self.instance(DEFAULT_SEED)?)
    }

    pub fn has_kind(&self, kind: Kind) -> bool {
        self.info.kinds.contains(&kind)
    }

    /// The names the component imports and exports (for `pt-host plugin inspect`).
    pub fn imports_and_exports(&self) -> (Vec<String>, Vec<String>) {
        let component = self.pre.component();
        let (kind, engine) = (component.component_type(), component.engine());
        let imports = kind.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports = kind.exports(engine).map(|(n, _)| n.to_string()).collect();
        (imports, exports)
    }
}

impl StepPlugin for LoadedPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn steps(&self) -> Vec<StepKind> {
        [
            (Kind::Mapper, StepKind::Mapper),
            (Kind::Filter, StepKind::Filter),
            (Kind::Augmenter, StepKind::Augmenter),
        ]
        .into_iter()
        .filter(|(kind, _)| self.has_kind(*kind))
        .map(|(_, step)| step)
        .collect()
    }

    fn instantiate(&self, seed: u64) -> Result<Box<dyn StepInstance>> {
        Ok(Box::new(self.instance(seed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, version: &str, description: String) -> Info {
        Info {
            id: id.into(),
            version: version.into(),
            description,
            kinds: vec![Kind::Filter],
            config_schema: String::new(),
        }
    }

    #[test]
    fn ids_and_versions_are_identifiers() {
        let path = Path::new("evil.wasm");
        let ok = checked_info(
            path,
            info("zh_normalize-2.py", "1.2.0+build.5", "x".repeat(10_000)),
        )
        .unwrap();
        assert_eq!(ok.description.len(), DESCRIPTION_BYTES);
        for (id, version, expected) in [
            (
                "red\u{1b}[31m",
                "1.0.0",
                "evil.wasm: the plugin's id `red\\u{1b}[31m` is not an identifier",
            ),
            ("", "1.0.0", "the plugin's id `` is not an identifier"),
            ("a/b", "1.0.0", "id `a/b`"),
            ("name@1", "1.0.0", "id `name@1`"),
            (
                "ok",
                "1.0 beta",
                "plugin `ok` has version `1.0 beta`, which is not a version",
            ),
        ] {
            let error = checked_info(path, info(id, version, String::new())).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        // A huge id is refused with a bounded message.
        let error = checked_info(path, info(&"i".repeat(1 << 20), "1", String::new())).unwrap_err();
        assert!(error.to_string().len() < 400);
    }
}
