//! The wasm engine: configuration, the epoch ticker, and compiled-component caching.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::host::HostState;
use crate::{Error, Result, chain};

/// How often the engine's epoch advances: the granularity of call deadlines, and how often
/// a long-running guest yields to the async executor.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Bytes of a pool slot's memory, table and stack kept resident (reset in place) when the
/// slot is reused.
const KEEP_RESIDENT: usize = 512 * 1024;
/// Bytes of a pool slot's tables kept resident: tables are small (an entry is 8 bytes), and
/// what is kept is zeroed on every reuse, so a large figure costs a memset per instance.
const TABLE_KEEP_RESIDENT: usize = 16 * 1024;
/// Decommits batched into one flush.
const DECOMMIT_BATCH: usize = 16;
/// Address space the pool's memory slots may reserve, all together: a quarter of the
/// 128 TiB a 64-bit Linux process addresses, the rest left to everything else.
const SLOTS_ADDRESS_SPACE: u64 = 32 << 40;
/// The guard region wasmtime keeps after each memory slot on 64-bit hosts.
const MEMORY_GUARD: u64 = 32 << 20;
/// Memories per component instance that the pool keeps slots for.
const MEMORIES_PER_INSTANCE: u32 = 2;
/// A slot that holds any 32-bit memory: compiled code then checks no bounds, the guard
/// pages catch every access out of bounds. Also the largest `limits.memory_mib`.
pub const FULL_SLOT_MIB: u32 = 4096;
/// The smallest slot the pool sizes itself to: the default `limits.memory_mib`.
const SMALLEST_AUTO_SLOT_MIB: u32 = 128;

/// What a new instance does when the pool's slots are all taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PoolFull {
    /// It is created on demand, outside the pool: slower to create, as fast to call.
    #[default]
    Overflow,
    /// A request waits for a slot to be freed, up to its call timeout; pre-warming an
    /// idle instance does not wait.
    Queue,
    /// It is refused: a capacity error (`503 server_full`).
    Fail,
}

/// Memory mappings the pool adds per component instance: the guard page below each stack
/// splits the stacks' mapping at every stack.
const MAPPINGS_PER_INSTANCE: u64 = 2;
/// Memory mappings left to the rest of the process.
const MAPPINGS_KEPT: u64 = 16 * 1024;

/// Checks that a pool of `instances` fits in the kernel's `vm.max_map_count` (`max`, when
/// known): past it, creating the pool fails with a bare "cannot allocate memory".
fn check_map_count(instances: u32, max: Option<u64>) -> Result<()> {
    let needed = u64::from(instances) * MAPPINGS_PER_INSTANCE + MAPPINGS_KEPT;
    match max {
        Some(max) if needed > max => Err(Error::Engine(format!(
            "{instances} pool slots (--max-instances) need about {needed} memory mappings (a \
             guard page below each instance's stack), more than the kernel's \
             vm.max_map_count ({max}): raise it (`sysctl -w vm.max_map_count={}`) or lower \
             --max-instances",
            needed.next_power_of_two()
        ))),
        _ => Ok(()),
    }
}

/// The kernel's `vm.max_map_count`, where there is one.
fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The memory of one pool slot, in MiB, for a pool of `instances` component instances:
/// `asked` when given, else the largest of 4096, 2048, ... 128 MiB whose slots all fit in
/// the address space kept for them. Slots of 4096 MiB hold any 32-bit memory without
/// bounds checks in compiled code; smaller ones let more slots fit, and compiled code
/// checks bounds itself. A version whose `limits.memory_mib` is larger than a slot runs
/// its instances outside the pool.
pub fn slot_memory_mib(instances: u32, asked: Option<u32>) -> Result<u32> {
    let fits = |mib: u32| {
        let slot = (u64::from(mib) << 20) + MEMORY_GUARD;
        u64::from(instances) * u64::from(MEMORIES_PER_INSTANCE) * slot <= SLOTS_ADDRESS_SPACE
    };
    match asked {
        Some(mib) if !(1..=FULL_SLOT_MIB).contains(&mib) => Err(Error::Engine(format!(
            "a pool slot's memory (--slot-memory-mib) is 1 to {FULL_SLOT_MIB} MiB, not {mib}"
        ))),
        Some(mib) if fits(mib) => Ok(mib),
        Some(mib) => Err(Error::Engine(format!(
            "{instances} pool slots (--max-instances) of {mib} MiB (--slot-memory-mib) need \
             more than the {} TiB of address space kept for them: lower either",
            SLOTS_ADDRESS_SPACE >> 40
        ))),
        None => std::iter::successors(Some(FULL_SLOT_MIB), |mib| Some(mib / 2))
            .take_while(|&mib| mib >= SMALLEST_AUTO_SLOT_MIB)
            .find(|&mib| fits(mib))
            .ok_or_else(|| {
                Error::Engine(format!(
                    "{instances} pool slots (--max-instances) do not fit in the {} TiB of \
                     address space kept for them even at {SMALLEST_AUTO_SLOT_MIB} MiB each: \
                     lower --max-instances, or set a smaller --slot-memory-mib",
                    SLOTS_ADDRESS_SPACE >> 40
                ))
            }),
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Directory for compiled components (`*.cwasm`); `None` compiles on every load. The
    /// runtime must be its only writer: it sweeps unfinished writes from it at start.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling instance allocator (fast instantiation from pre-reserved slots).
    /// `false` allocates each instance on demand.
    pub pooling: bool,
    /// Most component instances alive at once across all versions (pool slots).
    pub max_total_instances: u32,
    /// The memory of one pool slot, in MiB; `None` sizes slots from
    /// `max_total_instances` (see [`slot_memory_mib`]).
    pub slot_memory_mib: Option<u32>,
    /// Wasm stack of one call, in bytes.
    pub max_wasm_stack: usize,
    /// Guests past their first epoch tick (2 ms) that run at once, shared fairly among the
    /// processors' groups (tenants); 0 means one fewer than the cores (at least one), so
    /// that short calls always find a core.
    pub cpu_turns: usize,
    /// What a new instance does when the pool's slots are all taken.
    pub pool_full: PoolFull,
    /// Name compiled guest functions in `/tmp/perf-PID.map`, so that `perf` attributes
    /// samples in guest code to the guest's own functions.
    pub perf_map: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            pooling: true,
            max_total_instances: 1000,
            slot_memory_mib: None,
            max_wasm_stack: 512 * 1024,
            cpu_turns: 0,
            pool_full: PoolFull::Overflow,
            perf_map: false,
        }
    }
}

/// A compiled component and whether it came from the on-disk cache.
#[derive(Clone)]
pub struct LoadedComponent {
    pub(crate) component: Component,
    /// The key it was loaded under (its content digest; empty when not cached).
    pub(crate) key: Arc<str>,
    /// `true` when it was deserialised from the cache rather than compiled.
    pub from_cache: bool,
    /// Why a cached file was discarded (it failed its checksum or wasmtime's checks), when
    /// one was.
    pub discarded_cache: Option<String>,
}

/// The shared engine and linker; one per process.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<HostState>>,
    cache_dir: Option<PathBuf>,
    engine_key: String,
    pub(crate) ticker: Arc<Ticker>,
    pub(crate) fair: Arc<crate::fair::FairShare>,
    /// The instance pool's size; `None` when instances are allocated on demand.
    pool: Option<PoolSize>,
    /// What a new instance does when the pool is full.
    pub(crate) pool_full: PoolFull,
    /// Notified when a pooled instance is dropped, for calls that wait for a slot.
    pub(crate) slot_freed: Arc<tokio::sync::Notify>,
    /// Calls waiting for a pool slot now.
    pub(crate) slot_waiters: Arc<std::sync::atomic::AtomicU64>,
    /// Components loaded, by key (content digest): every version of the same component
    /// shares one copy of its compiled code.
    loaded: std::sync::Mutex<std::collections::HashMap<String, Component>>,
    /// The engine that instantiates on demand, outside the pool: when it is full (by
    /// policy), and for versions whose memory cap is larger than a slot.
    pub(crate) overflow: Option<Arc<Overflow>>,
}

/// The size of the instance pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSize {
    /// Slots per component instance (`max_total_instances`).
    pub(crate) instances: u32,
    /// The memory of one slot, in MiB.
    pub(crate) slot_mib: u32,
}

/// A second engine, with the on-demand allocator, for the instances the pool cannot hold
/// (it is full, or their memory cap is larger than its slots). Its compiled code is the
/// pooled engine's (the same settings but the allocator, so the same artefacts), copied
/// once per component at its first instance there.
pub(crate) struct Overflow {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    /// The components copied to this engine, by key.
    components: std::sync::Mutex<std::collections::HashMap<Arc<str>, Component>>,
    /// Instances alive on this engine.
    live: Arc<std::sync::atomic::AtomicU64>,
    /// Instances created on this engine since start.
    created: std::sync::atomic::AtomicU64,
}

/// Counts an overflow instance as alive until it is dropped.
pub(crate) struct OverflowInstance(Arc<std::sync::atomic::AtomicU64>);

impl Drop for OverflowInstance {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Overflow {
    /// `component` on this engine: a copy of its compiled code, made once per key.
    pub(crate) fn component(&self, key: &Arc<str>, component: &Component) -> Result<Component> {
        let mut components = self.components.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(copy) = components.get(key) {
            return Ok(copy.clone());
        }
        let bytes = component
            .serialize()
            .map_err(|e| Error::Engine(chain(&e)))?;
        // SAFETY: the bytes are `Component::serialize` of the pooled engine, whose settings
        // are this engine's but for the instance allocator, which compiled code does not
        // depend on; wasmtime checks the compatibility header as well.
        let copy = unsafe { Component::deserialize(&self.engine, &bytes) }
            .map_err(|e| Error::Engine(chain(&e)))?;
        if !key.is_empty() {
            components.insert(key.clone(), copy.clone());
        }
        Ok(copy)
    }

    /// Counts a new instance; it is alive until the guard is dropped.
    pub(crate) fn count(&self) -> OverflowInstance {
        self.live.fetch_add(1, Ordering::Relaxed);
        self.created.fetch_add(1, Ordering::Relaxed);
        OverflowInstance(self.live.clone())
    }
}

/// Instances created outside the pool (see [`PoolFull::Overflow`] and [`slot_memory_mib`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverflowStats {
    /// Alive now.
    pub live: u64,
    /// Created since start.
    pub created: u64,
}

/// One kind of slot of the engine's instance pool, and how many are in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSlots {
    /// `component_instances`, `core_instances`, `memories`, `tables` or `stacks`.
    pub kind: &'static str,
    /// Slots in use now.
    pub used: u64,
    /// Slots in all (`wasp serve --max-instances` sizes every kind).
    pub total: u64,
}

/// Stops the epoch thread when the runtime and every processor made from it are gone
/// (processors hold a clone, so their deadlines keep working after the runtime is dropped).
pub(crate) struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Configures the engine, links WASI and the wasp host imports, and starts the epoch
    /// ticker thread.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack);
        if config.perf_map {
            wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let size = match config.pooling {
            true => Some(PoolSize {
                instances: config.max_total_instances,
                slot_mib: slot_memory_mib(config.max_total_instances, config.slot_memory_mib)?,
            }),
            false => None,
        };
        if let Some(size) = size {
            check_map_count(size.instances, max_map_count())?;
        }
        if let Some(size) = size.filter(|s| s.slot_mib < FULL_SLOT_MIB) {
            // Slots smaller than a 32-bit memory: compiled code checks bounds itself.
            wasm.memory_reservation(u64::from(size.slot_mib) << 20);
        }
        // The same settings with the on-demand allocator, for instances outside the pool.
        let on_demand = wasm.clone();
        if let Some(size) = size {
            let n = size.instances;
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n * 4)
                .total_memories(n * 2)
                .total_tables(n * 4)
                .total_stacks(n)
                .max_memories_per_component(4)
                .max_tables_per_component(16)
                .max_core_instances_per_component(32)
                .max_memory_size((size.slot_mib as usize) << 20)
                // Returning a slot to the pool resets what the instance dirtied. With the
                // kernel's PAGEMAP_SCAN, only dirty pages within the keep-resident sizes
                // are copied back from the image; the rest is decommitted. Instances touch
                // little memory, so this replaces most madvise calls and the page faults
                // that follow them.
                .pagemap_scan(wasmtime::Enabled::Auto)
                .linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(TABLE_KEEP_RESIDENT)
                .async_stack_keep_resident(KEEP_RESIDENT)
                .decommit_batch_size(DECOMMIT_BATCH);
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&wasm).map_err(|e| Error::Engine(chain(&e)))?;
        let linker = link(&engine)?;
        let overflow = if config.pooling {
            let engine = Engine::new(&on_demand).map_err(|e| Error::Engine(chain(&e)))?;
            Some(Arc::new(Overflow {
                linker: link(&engine)?,
                engine,
                components: std::sync::Mutex::default(),
                live: Arc::default(),
                created: std::sync::atomic::AtomicU64::new(0),
            }))
        } else {
            None
        };

        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());

        if let Some(dir) = &config.cache_dir {
            let err = |source| Error::Cache {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            // Writes a crash interrupted (the directory's owner is the only writer).
            let swept = wasp_core::files::sweep_temporaries(dir).map_err(err)?;
            if swept > 0 {
                tracing::info!(dir = %dir.display(), swept, "removed unfinished cache writes");
            }
        }

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let mut ticked = vec![engine.clone()];
        ticked.extend(overflow.as_ref().map(|o| o.engine.clone()));
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("wasp-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for engine in &ticked {
                        engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| Error::Engine(format!("cannot start the epoch thread: {e}")))?;

        Ok(Self {
            engine,
            linker: Arc::new(linker),
            overflow,
            cache_dir: config.cache_dir,
            engine_key,
            ticker: Arc::new(Ticker(ticker_stop)),
            pool: size,
            pool_full: config.pool_full,
            slot_freed: Arc::default(),
            slot_waiters: Arc::default(),
            loaded: std::sync::Mutex::default(),
            fair: crate::fair::FairShare::new(match config.cpu_turns {
                // One core stays free of long runs, for the short calls.
                0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)),
                n => n,
            }),
        })
    }

    /// How full the instance pool is, by kind of slot; empty when instances are allocated
    /// on demand (`--no-pooling`).
    pub fn pool_slots(&self) -> Vec<PoolSlots> {
        let (Some(size), Some(metrics)) = (self.pool, self.engine.pooling_allocator_metrics())
        else {
            return Vec::new();
        };
        let n = u64::from(size.instances);
        let count = |c: usize| u64::try_from(c).unwrap_or(u64::MAX);
        // The totals are those `new` gives the pooling allocator.
        vec![
            PoolSlots {
                kind: "component_instances",
                used: metrics.component_instances(),
                total: n,
            },
            PoolSlots {
                kind: "core_instances",
                used: metrics.core_instances(),
                total: n * 4,
            },
            PoolSlots {
                kind: "memories",
                used: count(metrics.memories()),
                total: n * 2,
            },
            PoolSlots {
                kind: "tables",
                used: count(metrics.tables()),
                total: n * 4,
            },
            PoolSlots {
                kind: "stacks",
                used: count(metrics.stacks()),
                total: n,
            },
        ]
    }

    /// The memory of one pool slot, in MiB: the largest `limits.memory_mib` whose
    /// instances the pool holds; `None` without a pool.
    pub fn slot_memory_mib(&self) -> Option<u32> {
        self.pool.map(|size| size.slot_mib)
    }

    /// Calls waiting for a slot of the full pool now ([`PoolFull::Queue`]).
    pub fn slot_waiters(&self) -> u64 {
        self.slot_waiters.load(Ordering::Relaxed)
    }

    /// Instances created on demand, outside the pool (it was full, or their memory cap
    /// is larger than its slots); `None` without a pool.
    pub fn overflow_stats(&self) -> Option<OverflowStats> {
        self.overflow.as_ref().map(|o| OverflowStats {
            live: o.live.load(Ordering::Relaxed),
            created: o.created.load(Ordering::Relaxed),
        })
    }

    /// Sets a group's (a tenant's) weight in the sharing of the cores among long-running
    /// guests: a group of weight 2 gets twice the turns of one of weight 1 while both have
    /// guests waiting (1 unless set; at most 1000).
    pub fn set_cpu_weight(&self, group: &str, weight: u32) {
        self.fair.set_weight(group, weight);
    }

    /// The compiled form an earlier [`load_component`](Self::load_component) cached under
    /// `key`, when there is an intact one. A file that fails its check (checksum, or
    /// wasmtime's own) is removed and the reason returned as `Err`.
    fn load_cached(&self, key: &str) -> std::result::Result<Option<LoadedComponent>, String> {
        let Some(path) = self.cache_path(key) else {
            return Ok(None);
        };
        let reason = match read_cached(&path) {
            Ok(None) => return Ok(None),
            // SAFETY: the payload behind the header is exactly what `Component::serialize`
            // of an engine with the same compatibility hash (it is in the file name)
            // wrote: its checksum matched the header's.
            Ok(Some(verified)) => {
                match unsafe { Component::deserialize(&self.engine, &verified[CACHE_HEADER..]) } {
                    Ok(component) => {
                        return Ok(Some(LoadedComponent {
                            component,
                            key: key.into(),
                            from_cache: true,
                            discarded_cache: None,
                        }));
                    }
                    Err(e) => format!("{e:#}"),
                }
            }
            Err(reason) => reason,
        };
        tracing::warn!(
            path = %path.display(),
            "discarding a compiled component that failed its check ({reason}); compiling it again"
        );
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), "cannot remove it: {e}");
        }
        Err(reason)
    }

    /// Compiles `wasm` (CPU-heavy: call from a blocking thread), or loads the compiled
    /// form that an earlier call cached under `key` (the component's content digest).
    ///
    /// A cached file is used only when its checksum matches its bytes: wasmtime checks a
    /// compiled artefact's header and trusts the rest, so a torn write or bit rot in its
    /// code would crash the process on the first call. A file that fails the check is
    /// removed, and the component compiled and cached again. Failing to write the cache
    /// is not an error: the component is served, compiled again at the next start.
    pub fn load_component(&self, key: &str, wasm: &[u8]) -> Result<LoadedComponent> {
        if let Some(loaded) = self.loaded_component(key) {
            return Ok(loaded);
        }
        let discarded = match self.load_cached(key) {
            Ok(Some(loaded)) => {
                self.keep_loaded(key, &loaded.component);
                return Ok(loaded);
            }
            Ok(None) => None,
            Err(reason) => Some(reason),
        };
        let cached = self.cache_path(key);
        let component =
            Component::new(&self.engine, wasm).map_err(|e| Error::Compile(chain(&e)))?;
        if let Some(path) = &cached {
            match component.serialize() {
                Ok(bytes) => {
                    if let Err(e) = write_cached(path, &bytes) {
                        tracing::warn!(
                            path = %path.display(),
                            "cannot cache the compiled component (it will be compiled again \
                             at the next start): {e}"
                        );
                    }
                }
                Err(e) => tracing::warn!("cannot serialise a compiled component: {e:#}"),
            }
        }
        self.keep_loaded(key, &component);
        Ok(LoadedComponent {
            component,
            key: key.into(),
            from_cache: false,
            discarded_cache: discarded,
        })
    }

    /// The component loaded earlier under `key`, if it is still in memory: no bytes to
    /// read, check or compile.
    pub fn loaded_component(&self, key: &str) -> Option<LoadedComponent> {
        let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.get(key).map(|component| LoadedComponent {
            component: component.clone(),
            key: key.into(),
            from_cache: true,
            discarded_cache: None,
        })
    }

    fn keep_loaded(&self, key: &str, component: &Component) {
        if key.is_empty() {
            return;
        }
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), component.clone());
    }

    /// Distinct components in memory.
    pub fn loaded_components(&self) -> usize {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forgets loaded components whose key `keep` refuses (those no version uses any
    /// more); their code is freed once the last processor made from them is gone.
    pub fn retain_components(&self, keep: impl Fn(&str) -> bool) {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| keep(key));
        if let Some(overflow) = &self.overflow {
            overflow
                .components
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|key, _| keep(key));
        }
    }

    fn cache_path(&self, key: &str) -> Option<PathBuf> {
        let safe = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        match &self.cache_dir {
            Some(dir) if safe && !key.is_empty() => {
                Some(dir.join(format!("{key}-{}.cwasm", self.engine_key)))
            }
            _ => None,
        }
    }
}

/// A linker for `engine` with WASI and the wasp host imports.
fn link(engine: &Engine) -> Result<Linker<HostState>> {
    let mut linker = Linker::<HostState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| Error::Engine(chain(&e)))?;
    crate::bindings::Full::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
        &mut linker,
        |state| state,
    )
    .map_err(|e| Error::Engine(chain(&e)))?;
    Ok(linker)
}

/// First bytes of a compiled-component file: wasp's own header, version 2 (version 1
/// files, with a SHA-256, are discarded and compiled again).
const CACHE_MAGIC: &[u8; 8] = b"WASPCW\x00\x02";
/// The header: magic, then the CRC-32 of the payload (wasmtime's serialised component),
/// little-endian. The check guards against torn writes and bit rot, not forgery (the
/// directory's owner is its only writer), and a CRC reads tens of megabytes of a Python
/// component's compiled code in milliseconds where SHA-256 took tens.
const CACHE_HEADER: usize = CACHE_MAGIC.len() + 4;

/// Writes a compiled component behind wasp's header, atomically and durably.
fn write_cached(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let checksum = crc32fast::hash(payload).to_le_bytes();
    wasp_core::files::write_atomic_with(path, |file| {
        file.write_all(CACHE_MAGIC)?;
        file.write_all(&checksum)?;
        file.write_all(payload)
    })
}

/// Reads a compiled component and checks it: `Ok(None)` when there is none, `Err` with the
/// reason when it is not intact, else the whole file, whose payload (from `CACHE_HEADER`
/// on) matched its checksum.
fn read_cached(path: &Path) -> std::result::Result<Option<Vec<u8>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    if bytes.len() < CACHE_HEADER || &bytes[..CACHE_MAGIC.len()] != CACHE_MAGIC {
        return Err("it has no wasp header (truncated, or not written by wasp)".into());
    }
    let payload = &bytes[CACHE_HEADER..];
    if crc32fast::hash(payload).to_le_bytes()[..] != bytes[CACHE_MAGIC.len()..CACHE_HEADER] {
        return Err("its checksum does not match its bytes".into());
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cached_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.cwasm");
        assert_eq!(read_cached(&path), Ok(None));
        write_cached(&path, b"payload bytes").unwrap();
        assert_eq!(
            &read_cached(&path).unwrap().unwrap()[CACHE_HEADER..],
            b"payload bytes"
        );

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_cached(&path).unwrap_err().contains("checksum"));

        std::fs::write(&path, &bytes[..CACHE_HEADER - 2]).unwrap();
        assert!(read_cached(&path).unwrap_err().contains("header"));
    }

    #[test]
    fn pool_slots_shrink_to_fit_the_address_space_kept_for_them() {
        let auto = |n| slot_memory_mib(n, None).unwrap();
        assert_eq!(auto(1000), FULL_SLOT_MIB);
        assert_eq!(auto(3900), FULL_SLOT_MIB);
        assert_eq!(auto(5000), 2048);
        assert_eq!(auto(40_000), 256);
        assert_eq!(auto(100_000), 128);
        let too_many = slot_memory_mib(200_000, None).unwrap_err().to_string();
        assert!(too_many.contains("--max-instances"), "{too_many}");
        // What the operator asks for, when it fits.
        assert_eq!(slot_memory_mib(40_000, Some(64)).unwrap(), 64);
        let too_large = slot_memory_mib(40_000, Some(4096)).unwrap_err().to_string();
        assert!(too_large.contains("--slot-memory-mib"), "{too_large}");
        assert!(slot_memory_mib(10, Some(0)).is_err());
        assert!(slot_memory_mib(10, Some(8192)).is_err());
    }

    #[test]
    fn a_pool_past_the_kernels_mapping_limit_is_refused_with_what_to_raise() {
        assert!(check_map_count(1000, Some(65_530)).is_ok());
        assert!(check_map_count(16_000, Some(65_530)).is_ok());
        assert!(check_map_count(1_000_000, None).is_ok());
        let refused = check_map_count(40_000, Some(65_530))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("vm.max_map_count"), "{refused}");
        assert!(refused.contains("--max-instances"), "{refused}");
    }
}
