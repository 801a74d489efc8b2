//! Loading: compile a component (or load it precompiled from the cache),
//! pre-link it, check that it is a `pt:plugin@0.1.0` plugin of the kinds it
//! declares, and validate its configuration once before any work starts.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine};

use crate::bindings::exports::pt::plugin::{augmenter, filter, mapper, metric, plugin};
use crate::bindings::pt::plugin::types::{Info, Kind};
use crate::link::{self, PluginState};
use crate::run::PluginInstance;

/// How often the deadline clock ticks; deadlines are rounded up to ticks.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Resource limits of each plugin instance.
#[derive(Clone, Copy, Debug)]
pub struct PluginLimits {
    /// Linear memory of the instance, all memories together.
    pub memory_bytes: usize,
    /// Wall-clock limit of one call (instantiation and configure included).
    pub call_timeout: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// Advances the engine's epoch every [`TICK`] until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-deadlines".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the deadline thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The wasmtime engine, linker and component cache shared by all plugins.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: Option<PathBuf>,
    _ticker: Ticker,
}

impl PluginRuntime {
    /// `cache_dir`: where compiled components are kept (`None`: no caching).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.parallel_compilation(true);
        let engine = Engine::new(&config)
            .map_err(|e| anyhow!("cannot start the WebAssembly engine: {e}"))?;
        let linker =
            link::linker(&engine).map_err(|e| anyhow!("cannot link the plugin interface: {e}"))?;
        let ticker = Ticker::start(engine.clone());
        Ok(Self {
            engine,
            linker,
            cache_dir,
            _ticker: ticker,
        })
    }

    /// Compiles `bytes`, or loads the precompiled form from the cache. The key
    /// is the component's sha256 and the engine's compatibility hash, so a new
    /// wasmtime or different settings never load stale code. Returns whether
    /// the cache was hit.
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
        let Some(dir) = &self.cache_dir else {
            return Ok((compile()?, false));
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let cached = dir
            .join("components")
            .join(format!("{digest}-{:016x}.cwasm", hasher.finish()));
        if cached.is_file() {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash, into the user's own
            // cache directory, under the component's content hash.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok((component, true)),
                Err(e) => tracing::warn!(
                    "{}: unusable cached component, recompiling: {e}",
                    cached.display()
                ),
            }
        }
        let component = compile()?;
        let serialized = component
            .serialize()
            .map_err(|e| anyhow!("cannot serialise the compiled component: {e}"))?;
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
                "{}: built for interface pt:plugin@{built_for}; this pt-host implements pt:plugin@{}. \
                 Rebuild the plugin against wit/since_v{} (pt-plugin-sdk {}), or use a pt-host that implements pt:plugin@{built_for}.",
                path.display(),
                crate::INTERFACE_VERSION,
                crate::INTERFACE_VERSION,
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
            },
            pre,
        };
        let mut probe = loaded
            .instance_unconfigured()
            .with_context(|| format!("plugin {}", path.display()))?;
        loaded.info = probe
            .describe()
            .map_err(|e| anyhow!("plugin {}: describe failed: {}", path.display(), e.0))?;
        loaded.name = loaded.info.id.clone().into();
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

pub(crate) struct Exports {
    pub plugin: plugin::GuestIndices,
    pub filter: Option<filter::GuestIndices>,
    pub mapper: Option<mapper::GuestIndices>,
    pub augmenter: Option<augmenter::GuestIndices>,
    pub metric: Option<metric::GuestIndices>,
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
}

impl LoadedPlugin {
    /// A fresh, configured instance.
    pub fn instance(&self) -> Result<PluginInstance> {
        let mut instance = self.instance_unconfigured()?;
        instance
            .configure(&self.config)
            .map_err(|e| anyhow!("plugin `{}`: {e}", self.name))?;
        Ok(instance)
    }

    /// Sets the JSON configuration every instance receives, after checking
    /// that the plugin accepts it (on a probe instance, before any work).
    pub fn configure(&mut self, config: &str) -> Result<()> {
        let mut probe = self
            .instance_unconfigured()
            .with_context(|| format!("plugin `{}`", self.name))?;
        probe
            .configure(config)
            .map_err(|e| anyhow!("plugin `{}` ({}): {e}", self.name, self.path.display()))?;
        self.config = config.to_string();
        Ok(())
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
