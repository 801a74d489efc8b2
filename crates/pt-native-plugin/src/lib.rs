//! Native plugins: trusted shared libraries behind a small C ABI, for teams
//! that need native speed or native libraries. They are **not sandboxed** —
//! they run with the host's rights — so pt-host loads them only with
//! `--allow_native`. Mapper and filter steps only.
//!
//! ABI version 1 (`crates/pt-native-plugin/include/pt_native_plugin.h`):
//!
//! ```c
//! typedef struct { const uint8_t *ptr; size_t len; } pt_str;      // UTF-8, not NUL-terminated
//! typedef struct { uint32_t tag; pt_str text; } pt_verdict;        // 0 keep, 1 replace, 2 drop, 3 error
//! uint32_t pt_native_abi_version(void);                             // returns 1
//! pt_str   pt_native_describe(void);                                // static JSON: id, version, description, kinds, config_schema
//! void    *pt_native_new(pt_str config, pt_str *error);             // NULL and *error (valid until the next call) on rejection
//! int32_t  pt_native_apply(void *instance, uint32_t kind,           // kind: 0 mapper, 1 filter
//!                          const pt_str *docs, size_t n, pt_verdict *out);  // 0 ok; out strings valid until the next call
//! void     pt_native_free(void *instance);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use pt_data::{CallFailure, DocRef, StepInstance, StepKind, StepOutput, StepPlugin, Verdict};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The ABI version this host speaks.
pub const NATIVE_ABI_VERSION: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawStr {
    ptr: *const u8,
    len: usize,
}

impl RawStr {
    fn of(text: &str) -> Self {
        Self {
            ptr: text.as_ptr(),
            len: text.len(),
        }
    }

    /// # Safety
    /// `ptr..ptr+len` must be readable (the ABI's promise).
    unsafe fn to_string(self) -> Result<String, String> {
        if self.ptr.is_null() {
            return Ok(String::new());
        }
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        String::from_utf8(bytes.to_vec()).map_err(|_| "returned text that is not UTF-8".to_string())
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawVerdict {
    tag: u32,
    text: RawStr,
}

type AbiVersion = unsafe extern "C" fn() -> u32;
type Describe = unsafe extern "C" fn() -> RawStr;
type New = unsafe extern "C" fn(RawStr, *mut RawStr) -> *mut std::ffi::c_void;
type Apply =
    unsafe extern "C" fn(*mut std::ffi::c_void, u32, *const RawStr, usize, *mut RawVerdict) -> i32;
type Free = unsafe extern "C" fn(*mut std::ffi::c_void);

struct Symbols {
    new: New,
    apply: Apply,
    free: Free,
    /// Keeps the code the pointers point into loaded.
    _library: libloading::Library,
}

#[derive(Clone, Debug, Deserialize)]
pub struct NativeInfo {
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub kinds: Vec<String>,
    #[serde(default)]
    pub config_schema: serde_json::Value,
}

/// A loaded native plugin.
pub struct NativePlugin {
    pub info: NativeInfo,
    pub path: PathBuf,
    /// `sha256:` of the library file.
    pub digest: String,
    pub config: String,
    steps: Vec<StepKind>,
    symbols: Arc<Symbols>,
}

impl NativePlugin {
    /// Loads the library at `path`, checks its ABI version and asks who it is.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        // SAFETY: loading runs the library's initialisers; the user vouched
        // for it with --allow_native.
        let library = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("{}: not a loadable shared library", path.display()))?;
        // SAFETY: the symbol types are the ABI's; a library exporting these
        // names with other types breaks the ABI contract it opted into.
        let (version, describe, new, apply, free) = unsafe {
            let symbol = |name: &str| {
                anyhow!(
                    "{}: no `{name}` (not a pt-host native plugin)",
                    path.display()
                )
            };
            (
                *library
                    .get::<AbiVersion>(b"pt_native_abi_version")
                    .map_err(|_| symbol("pt_native_abi_version"))?,
                *library
                    .get::<Describe>(b"pt_native_describe")
                    .map_err(|_| symbol("pt_native_describe"))?,
                *library
                    .get::<New>(b"pt_native_new")
                    .map_err(|_| symbol("pt_native_new"))?,
                *library
                    .get::<Apply>(b"pt_native_apply")
                    .map_err(|_| symbol("pt_native_apply"))?,
                *library
                    .get::<Free>(b"pt_native_free")
                    .map_err(|_| symbol("pt_native_free"))?,
            )
        };
        let abi = unsafe { version() };
        if abi != NATIVE_ABI_VERSION {
            bail!(
                "{}: native plugin ABI version {abi}, this pt-host speaks version {NATIVE_ABI_VERSION}; rebuild the plugin against crates/pt-native-plugin/include/pt_native_plugin.h",
                path.display()
            );
        }
        let description = unsafe { describe().to_string() }
            .map_err(|e| anyhow!("{}: describe {e}", path.display()))?;
        let info: NativeInfo = serde_json::from_str(&description)
            .with_context(|| format!("{}: describe returned malformed JSON", path.display()))?;
        let mut steps = Vec::new();
        for kind in &info.kinds {
            steps.push(match kind.as_str() {
                "mapper" => StepKind::Mapper,
                "filter" => StepKind::Filter,
                other => bail!(
                    "{}: kind `{other}`: native plugins may be mappers and filters",
                    path.display()
                ),
            });
        }
        // Mappers run before filters, whatever order describe lists them in.
        steps.sort_by_key(|k| *k != StepKind::Mapper);
        Ok(Self {
            info,
            path: path.to_path_buf(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            config: "{}".into(),
            steps,
            symbols: Arc::new(Symbols {
                new,
                apply,
                free,
                _library: library,
            }),
        })
    }

    /// Checks `config` on a probe instance, then keeps it for every instance.
    pub fn configure(&mut self, config: &str) -> Result<()> {
        self.instance_with(config)
            .map_err(|e| anyhow!("plugin `{}` ({}): {e}", self.info.id, self.path.display()))?;
        self.config = config.to_string();
        Ok(())
    }

    fn instance_with(&self, config: &str) -> Result<NativeInstance, String> {
        let mut error = RawStr {
            ptr: std::ptr::null(),
            len: 0,
        };
        // SAFETY: per the ABI, `new` reads the config and may set `error`.
        let handle = unsafe { (self.symbols.new)(RawStr::of(config), &mut error) };
        if handle.is_null() {
            let message = unsafe { error.to_string() }.unwrap_or_else(|e| e);
            return Err(format!("rejected its configuration {config}: {message}"));
        }
        Ok(NativeInstance {
            handle,
            symbols: self.symbols.clone(),
        })
    }
}

struct NativeInstance {
    handle: *mut std::ffi::c_void,
    symbols: Arc<Symbols>,
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        // SAFETY: the handle came from `new` and is freed once.
        unsafe { (self.symbols.free)(self.handle) }
    }
}

impl StepInstance for NativeInstance {
    fn apply(
        &mut self,
        kind: StepKind,
        docs: &[DocRef<'_>],
        _seed: u64,
    ) -> Result<StepOutput, CallFailure> {
        let code = match kind {
            StepKind::Mapper => 0,
            StepKind::Filter => 1,
            StepKind::Augmenter => {
                return Err(CallFailure::Contract(
                    "native plugins cannot augment".into(),
                ));
            }
        };
        let inputs: Vec<RawStr> = docs.iter().map(|d| RawStr::of(d.text)).collect();
        let mut out = vec![
            RawVerdict {
                tag: 0,
                text: RawStr {
                    ptr: std::ptr::null(),
                    len: 0
                }
            };
            docs.len()
        ];
        // SAFETY: `inputs` and `out` hold `docs.len()` elements each, as the ABI says.
        let status = unsafe {
            (self.symbols.apply)(
                self.handle,
                code,
                inputs.as_ptr(),
                inputs.len(),
                out.as_mut_ptr(),
            )
        };
        if status != 0 {
            return Err(CallFailure::Contract(format!(
                "native call failed with status {status}"
            )));
        }
        let verdicts = out
            .into_iter()
            .map(|v| {
                let text = || unsafe { v.text.to_string() }.map_err(CallFailure::Contract);
                Ok(match v.tag {
                    0 => Verdict::Keep,
                    1 => Verdict::Replace(text()?),
                    2 => Verdict::Drop(text()?).bounded(),
                    3 => Verdict::Error(text()?).bounded(),
                    other => {
                        return Err(CallFailure::Contract(format!(
                            "unknown verdict tag {other}"
                        )));
                    }
                })
            })
            .collect::<Result<Vec<_>, CallFailure>>()?;
        let output = StepOutput::Verdicts(verdicts);
        // Mappers and filters derive nothing: the per-document bound is moot.
        pt_data::steps::check_output(kind, docs, &output, 0)?;
        Ok(output)
    }
}

impl StepPlugin for NativePlugin {
    fn name(&self) -> &str {
        &self.info.id
    }

    fn steps(&self) -> Vec<StepKind> {
        self.steps.clone()
    }

    /// Native code sees no host-seeded randomness: `seed` is unused.
    fn instantiate(&self, _seed: u64) -> Result<Box<dyn StepInstance>> {
        Ok(Box::new(
            self.instance_with(&self.config)
                .map_err(|e| anyhow!("plugin `{}`: {e}", self.info.id))?,
        ))
    }
}
