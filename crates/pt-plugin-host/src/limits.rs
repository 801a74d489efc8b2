//! What bounds a plugin instance: a wall-clock deadline per call (an epoch
//! ticker) and one memory cap for all of its linear memories together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Engine, ResourceLimiter};

/// How often the deadline clock ticks; deadlines are rounded up to ticks.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Core instances, memories and tables one plugin instance may create.
/// Python components (componentize-py) need many more than one.
const INSTANCES: usize = 64;
const MEMORIES: usize = 16;
const TABLES: usize = 64;
/// Elements of all tables together (function references, not handles).
const TABLE_ELEMENTS: usize = 1 << 20;

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

impl PluginLimits {
    /// The deadline of one call, in ticks of the epoch clock (one more than
    /// the timeout rounds up to, as the current tick is already under way).
    pub(crate) fn deadline_ticks(&self) -> u64 {
        self.call_timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1
    }
}

/// The error a refused memory growth traps with.
#[derive(Debug)]
pub(crate) struct MemoryCapReached;

impl std::fmt::Display for MemoryCapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memory cap reached")
    }
}

impl std::error::Error for MemoryCapReached {}

/// wasmtime's limiter for one instance. wasmtime's own `StoreLimits` caps
/// each memory separately (a component with sixteen memories would get
/// sixteen caps); this one counts every memory of the instance against one
/// cap, and remembers that the cap was hit.
pub(crate) struct InstanceLimiter {
    memory_cap: usize,
    memory_in_use: usize,
    table_elements: usize,
    pub(crate) memory_cap_hit: bool,
}

impl InstanceLimiter {
    pub(crate) fn new(memory_cap: usize) -> Self {
        Self {
            memory_cap,
            memory_in_use: 0,
            table_elements: 0,
            memory_cap_hit: false,
        }
    }
}

impl ResourceLimiter for InstanceLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_in_use - current.min(self.memory_in_use) + desired;
        if total > self.memory_cap {
            self.memory_cap_hit = true;
            // A trap rather than a failed `memory.grow`: guests abort on an
            // allocation failure anyway, and a trap says why.
            return Err(MemoryCapReached.into());
        }
        self.memory_in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_elements - current.min(self.table_elements) + desired;
        if total > TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        INSTANCES
    }

    fn memories(&self) -> usize {
        MEMORIES
    }

    fn tables(&self) -> usize {
        TABLES
    }
}

/// Advances the engine's epoch every [`TICK`] until dropped.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Instance, Module, Store};

    /// A core module with two memories; export `a` grows the first by 640
    /// pages (40 MiB), `b` the second. Written out in the binary format.
    const TWO_MEMORIES: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7f, // type: () -> i32
        0x03, 0x03, 0x02, 0x00, 0x00, // two functions of that type
        0x05, 0x05, 0x02, 0x00, 0x00, 0x00, 0x00, // two memories, 0 pages
        0x07, 0x09, 0x02, 0x01, b'a', 0x00, 0x00, 0x01, b'b', 0x00, 0x01, // exports
        0x0a, 0x11, 0x02, // code: two bodies of 7 bytes
        0x07, 0x00, 0x41, 0x80, 0x05, 0x40, 0x00, 0x0b, // memory.grow 0 by 640
        0x07, 0x00, 0x41, 0x80, 0x05, 0x40, 0x01, 0x0b, // memory.grow 1 by 640
    ];

    /// Two memories of one instance share one cap: each may grow alone, not
    /// both together (wasmtime's `StoreLimits` would allow both).
    #[test]
    fn all_memories_of_an_instance_count_against_one_cap() {
        let engine = Engine::default();
        let module = Module::new(&engine, TWO_MEMORIES).unwrap();
        let mut store = Store::new(&engine, InstanceLimiter::new(64 << 20));
        store.limiter(|limiter| limiter);
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let grow = |store: &mut Store<InstanceLimiter>, name: &str| {
            instance
                .get_typed_func::<(), i32>(&mut *store, name)
                .unwrap()
                .call(store, ())
        };
        assert_eq!(grow(&mut store, "a").unwrap(), 0, "40 MiB of 64 fit");
        assert!(!store.data().memory_cap_hit);
        let error = grow(&mut store, "b").unwrap_err();
        assert!(
            error.chain().any(|e| e.is::<MemoryCapReached>()),
            "{error:?}"
        );
        assert!(store.data().memory_cap_hit);
    }
}
