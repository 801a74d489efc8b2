//! How the process uses memory and cores: the allocator, when it gives freed
//! memory back to the kernel, and how long candle's worker threads spin.

use std::sync::Mutex;
use std::time::Instant;

// Training allocates and frees tensors of many megabytes per step; glibc hands
// those back to the kernel each time (mmap/munmap, page faults, TLB shootdowns:
// a third of a CPU step). mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the Rust bindings
/// lack it): milliseconds before freed pages go back to the kernel.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The least purge delay while training, evaluating or generating: 10 s
/// instead of mimalloc's 1 s; [`lap`] lengthens it to twice the longest
/// step or evaluation batch.
///
/// mimalloc 3 (what `libmimalloc-sys` builds) reads the delay as a period,
/// not an age: the first free after a purge starts the clock, and when it
/// runs out every page free at that moment goes back to the kernel, however
/// recently it was freed. Those loops free and reallocate the same working
/// set every layer, step or batch, so each purge returns pages the next
/// layer or step touches again, and the kernel zeroes them then (20% of
/// evaluation's CPU time at Qwen2.5-0.5B's shape with 1 s). A longer
/// period means fewer such purges. Never purging (`MIMALLOC_PURGE_DELAY=-1`)
/// gained too little to keep, measured on an Intel Xeon: that shape's
/// evaluation 116–133 → 103–175 tok/s over six alternated pairs (medians
/// 130 and 136) at a 19–29% higher peak (2403–2422 → 2860–3099 MiB). Measured on an AMD EPYC (Zen 4), 1 s →
/// 10 s → never: Qwen2.5-0.5B-shape evaluation 100 → 125 → 140 tok/s.
/// Its LoRA steps take 10–15 s: on an Intel Xeon, 10 s → twice the step
/// took them from 33.1–34.3 to 39.1–41.3 tok/s. Never purging at all keeps
/// fragments that are never reused (bloomz-560m's full fine-tuning: 18775
/// MiB with 10 s, 19113 never).
const LOOP_PURGE_DELAY_MS: i64 = 10_000;

/// The purge delay in force ([`LOOP_PURGE_DELAY_MS`] or longer), and when
/// the current lap started; unused while `MIMALLOC_PURGE_DELAY` decides.
static PACE: Mutex<Option<Pace>> = Mutex::new(None);

struct Pace {
    delay_ms: i64,
    lap_started: Instant,
}

/// Called once the model is loaded, before the loops that train, evaluate or
/// generate: gives what loading freed back to the kernel, then lengthens the
/// purge delay ([`LOOP_PURGE_DELAY_MS`]) and, unless `full_fine_tuning`,
/// starts timing laps ([`lap`]). `MIMALLOC_PURGE_DELAY` in the environment
/// still decides, if set.
///
/// Full fine-tuning keeps 10 s: its weights, gradients and AdamW moments put
/// its peak near PyTorch's, and keeping a step's freed pages until the next
/// put it above (bloomz-560m's shape: Intel Xeon 19082 vs PyTorch's 19013
/// MiB; Zen 4, never purging, 19113 vs 18827).
pub fn keep_freed_memory(full_fine_tuning: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    release_freed_memory();
    set_purge_delay(LOOP_PURGE_DELAY_MS);
    *PACE.lock().expect("the pace lock") = (!full_fine_tuning).then(|| Pace {
        delay_ms: LOOP_PURGE_DELAY_MS,
        lap_started: Instant::now(),
    });
}

/// Called at the end of every training step and evaluation batch: sets the
/// purge period to twice the longest lap so far, so that a step longer than
/// the least delay (real shapes: 10–60 s on a CPU) sees at most one purge
/// in two.
pub fn lap() {
    let mut pace = PACE.lock().expect("the pace lock");
    if let Some(delay_ms) = pace.as_mut().and_then(|pace| pace.lap(Instant::now())) {
        set_purge_delay(delay_ms);
    }
}

impl Pace {
    /// Ends the current lap at `now`; the longer delay it calls for, if any.
    fn lap(&mut self, now: Instant) -> Option<i64> {
        let lap_ms = now.duration_since(self.lap_started).as_millis() as i64;
        self.lap_started = now;
        (2 * lap_ms > self.delay_ms).then(|| {
            self.delay_ms = 2 * lap_ms;
            self.delay_ms
        })
    }
}

#[allow(unsafe_code)]
fn set_purge_delay(milliseconds: i64) {
    // SAFETY: a plain call into the allocator, valid at any time from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, milliseconds as std::ffi::c_long);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_purge_delay_grows_to_twice_the_longest_lap_and_never_shrinks() {
        let start = Instant::now();
        let mut pace = Pace {
            delay_ms: LOOP_PURGE_DELAY_MS,
            lap_started: start,
        };
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // Laps of 1 s and 5 s fit in the least delay.
        assert_eq!(pace.lap(at(1)), None);
        assert_eq!(pace.lap(at(6)), None);
        // A 30 s step (bloomz-560m's shape on 2 cores) keeps pages 60 s.
        assert_eq!(pace.lap(at(36)), Some(60_000));
        // Shorter laps after it (evaluation batches) leave it there.
        assert_eq!(pace.lap(at(40)), None);
        assert_eq!(pace.delay_ms, 60_000);
        assert_eq!(pace.lap(at(80)), Some(80_000));
    }
}
