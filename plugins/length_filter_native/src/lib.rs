//! length_filter as a native plugin: the Rust rules of `plugins/length_filter`
//! behind pt-host's native C ABI (`crates/pt-native-plugin/include/pt_native_plugin.h`, version 1).
//! Loaded only with `--allow_native`: native code is not sandboxed.

use std::ffi::c_void;

use length_filter::LengthFilter;
use pt_plugin_sdk::Plugin;

#[repr(C)]
pub struct PtStr {
    ptr: *const u8,
    len: usize,
}

impl PtStr {
    fn of(text: &'static str) -> Self {
        Self {
            ptr: text.as_ptr(),
            len: text.len(),
        }
    }
}

#[repr(C)]
pub struct PtVerdict {
    tag: u32,
    text: PtStr,
}

const KEEP: u32 = 0;
const DROP: u32 = 2;
const FILTER: u32 = 1;

const DESCRIBE: &str = r#"{"id": "length_filter", "version": "0.1.0", "description": "Drops too short, too long, one-character and duplicate-line documents (native)", "kinds": ["filter"], "config_schema": {}}"#;

/// The last configuration error, kept for the caller to read.
static mut ERROR: String = String::new();

#[unsafe(no_mangle)]
pub extern "C" fn pt_native_abi_version() -> u32 {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn pt_native_describe() -> PtStr {
    PtStr::of(DESCRIBE)
}

/// # Safety
/// `config` must point to `len` readable bytes; `error` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pt_native_new(config: PtStr, error: *mut PtStr) -> *mut c_void {
    let bytes = unsafe { std::slice::from_raw_parts(config.ptr, config.len) };
    let result = std::str::from_utf8(bytes)
        .map_err(|e| e.to_string())
        .and_then(LengthFilter::configure);
    match result {
        Ok(filter) => Box::into_raw(Box::new(filter)).cast(),
        Err(message) => {
            // SAFETY: pt-host calls `new` from one thread while loading.
            unsafe {
                ERROR = message;
                let stored = &*std::ptr::addr_of!(ERROR);
                *error = PtStr {
                    ptr: stored.as_ptr(),
                    len: stored.len(),
                };
            }
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// `instance` from `pt_native_new`; `docs` and `out` hold `n` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pt_native_apply(
    instance: *mut c_void,
    kind: u32,
    docs: *const PtStr,
    n: usize,
    out: *mut PtVerdict,
) -> i32 {
    if kind != FILTER {
        return 1;
    }
    let filter = unsafe { &*instance.cast::<LengthFilter>() };
    let docs = unsafe { std::slice::from_raw_parts(docs, n) };
    let out = unsafe { std::slice::from_raw_parts_mut(out, n) };
    for (doc, verdict) in docs.iter().zip(out) {
        let bytes = unsafe { std::slice::from_raw_parts(doc.ptr, doc.len) };
        let text = String::from_utf8_lossy(bytes);
        *verdict = match filter.judge(&text) {
            // Reasons are 'static: valid for as long as pt-host needs them.
            Some(reason) => PtVerdict {
                tag: DROP,
                text: PtStr::of(reason),
            },
            None => PtVerdict {
                tag: KEEP,
                text: PtStr::of(""),
            },
        };
    }
    0
}

/// # Safety
/// `instance` from `pt_native_new`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pt_native_free(instance: *mut c_void) {
    drop(unsafe { Box::from_raw(instance.cast::<LengthFilter>()) });
}
