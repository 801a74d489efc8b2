//! How the process uses memory and cores: the allocator, when it gives freed
//! memory back to the kernel, and how long candle's worker threads spin.

// Training allocates and frees tensors of many megabytes per step; glibc hands
// those back to the kernel each time (mmap/munmap, page faults, TLB shootdowns:
// a third of a CPU step). mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the Rust bindings
/// lack it): milliseconds before freed pages go back to the kernel.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay while training, evaluating or generating: 10 s instead of
/// mimalloc's 1 s.
///
/// Those loops free and reallocate the same working set every layer, step or
/// batch, often more than a second apart at real shapes: mimalloc returned
/// the pages and the kernel zeroed them again on the next touch (20% of
/// evaluation's CPU time at Qwen2.5-0.5B's shape). Measured on an AMD EPYC
/// (Zen 4), 1 s → 10 s → never: Qwen2.5-0.5B-shape evaluation 100 → 125 →
/// 140 tok/s; bloomz-560m-shape full fine-tuning 27.5 → 31.8 → 37.5 tok/s at
/// 18405 → 18775 → 19113 MiB peak. Never purging keeps fragments that are
/// never reused, which put full fine-tuning's peak above PyTorch's.
const LOOP_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Called once the model is loaded, before the loops that train, evaluate or
/// generate: gives what loading freed back to the kernel, then lengthens the
/// purge delay ([`LOOP_PURGE_DELAY_MS`]). `MIMALLOC_PURGE_DELAY` in the
/// environment still decides, if set.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    release_freed_memory();
    // SAFETY: a plain call into the allocator, valid at any time from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, LOOP_PURGE_DELAY_MS);
    }
}

/// Returns the memory freed so far to the kernel now.
#[allow(unsafe_code)]
pub fn release_freed_memory() {
    // SAFETY: a plain call into the allocator, valid at any time from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// How many times candle's elementwise worker threads spin after finishing
/// an op before they sleep (candle's default: 25,000, about half a
/// millisecond). The command's rayon workers, which run the matrix products,
/// share the cores with them: on 2 cores the spinning took 9% of a LoRA
/// step's CPU samples. The bench's LoRA row, AMD EPYC Zen 4: 648 and 671
/// tok/s with candle's default, 695–744 over four runs with 2,000.
const CANDLE_SPIN_LIMIT: &str = "2000";

/// Called first in `main`, before any thread starts: sets candle's spin limit
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is already in the environment.
#[allow(unsafe_code)]
pub fn limit_spinning() {
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VARIABLE).is_none() {
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var(VARIABLE, CANDLE_SPIN_LIMIT) };
    }
}
