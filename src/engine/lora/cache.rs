//! The adapter cache: which LoRA adapters are resident in the device's slots, which are held
//! validated in host memory, and the background loader that fetches the rest from their source.
//!
//! Tiers: device slots (fixed count, LRU, pinned while a running sequence uses them) <- host
//! memory (validated adapters, LRU under a bytes budget) <- an [`AdapterSource`] (the blob store in
//! the service, a directory or memory in tests). Keys are `(adapter id, version)`, so a re-upload is
//! a different key and never changes the weights under a running request.
//!
//! The cache itself lives on the engine's owner thread and never blocks it: fetching and
//! validating run on loader threads, whose results are collected by [`AdapterCache::poll`]; the
//! device copy of a host-resident adapter is done by the owner through the `install` callback of
//! [`AdapterCache::ensure`]. A failed load is reported for its key only, so only the requests that
//! needed that adapter fail. Loads start through [`Loads`], which the engine's handles share, so
//! that a submission starts its adapter's fetch at once rather than at the owner's next step; the
//! cache starts the ones no submission did (a refetch after an eviction).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use crate::engine::metrics::EngineMetrics;

/// Identity of one immutable adapter version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    pub id: Uuid,
    pub version: u32,
}

impl fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.id, self.version)
    }
}

/// The two files of a Hugging Face PEFT LoRA adapter, as stored. Shared bytes: a source hands
/// out views of what it holds (a memory source, a fetched blob) without copying them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterFiles {
    /// `adapter_config.json`.
    pub config: Bytes,
    /// `adapter_model.safetensors`.
    pub weights: Bytes,
}

/// Why an adapter could not be made resident. Each fails only the requests that need its key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdapterLoadError {
    #[error("adapter {key} was not found in the adapter store")]
    NotFound { key: AdapterKey },
    #[error("adapter {key} could not be read from the adapter store: {reason}")]
    Unreadable { key: AdapterKey, reason: String },
    #[error("adapter {key} is invalid: {reason}")]
    Invalid { key: AdapterKey, reason: String },
    #[error("adapter {key} could not be copied to the device: {reason}")]
    Device { key: AdapterKey, reason: String },
    #[error("the adapter loader has stopped")]
    LoaderGone,
}

impl AdapterLoadError {
    /// The key this error is about, if any.
    pub fn key(&self) -> Option<AdapterKey> {
        match self {
            AdapterLoadError::NotFound { key }
            | AdapterLoadError::Unreadable { key, .. }
            | AdapterLoadError::Invalid { key, .. }
            | AdapterLoadError::Device { key, .. } => Some(*key),
            AdapterLoadError::LoaderGone => None,
        }
    }
}

/// Where adapter files come from. The service implements it over its blob store; it is called
/// on loader threads, never on the engine's step loop, so it may block.
pub trait AdapterSource: Send + Sync {
    fn fetch(&self, key: &AdapterKey) -> Result<AdapterFiles, AdapterLoadError>;
}

/// Adapters in a directory: `ROOT/<id>/<version>/adapter_config.json` and
/// `ROOT/<id>/<version>/adapter_model.safetensors`.
#[derive(Clone, Debug)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// A source over `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder of `key`.
    pub fn dir_of(&self, key: &AdapterKey) -> PathBuf {
        self.root
            .join(key.id.to_string())
            .join(key.version.to_string())
    }
}

impl AdapterSource for DirSource {
    fn fetch(&self, key: &AdapterKey) -> Result<AdapterFiles, AdapterLoadError> {
        let dir = self.dir_of(key);
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => AdapterLoadError::NotFound { key: *key },
                _ => AdapterLoadError::Unreadable {
                    key: *key,
                    reason: format!("{name}: {e}"),
                },
            })
        };
        Ok(AdapterFiles {
            config: read("adapter_config.json")?.into(),
            weights: read("adapter_model.safetensors")?.into(),
        })
    }
}

/// Adapters held in memory (tests, benches, a service without a blob store).
#[derive(Debug, Default)]
pub struct MemorySource {
    files: RwLock<HashMap<AdapterKey, AdapterFiles>>,
    fetches: std::sync::atomic::AtomicUsize,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace `key`'s files.
    pub fn insert(&self, key: AdapterKey, files: AdapterFiles) {
        if let Ok(mut map) = self.files.write() {
            map.insert(key, files);
        }
    }

    /// How many fetches were answered (found or not).
    pub fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AdapterSource for MemorySource {
    fn fetch(&self, key: &AdapterKey) -> Result<AdapterFiles, AdapterLoadError> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let map = self
            .files
            .read()
            .map_err(|_| AdapterLoadError::Unreadable {
                key: *key,
                reason: "memory source lock poisoned".into(),
            })?;
        // A clone shares the bytes.
        map.get(key)
            .cloned()
            .ok_or(AdapterLoadError::NotFound { key: *key })
    }
}

/// A validated adapter held in host memory.
pub trait HostAdapter: Send + Sync + 'static {
    /// Bytes it occupies in host memory (counted against the host tier's budget).
    fn host_bytes(&self) -> usize;
}

/// Turns fetched files into a validated adapter (PEFT parsing against the base model); runs on
/// loader threads. The error string is the precise reason, shown to the requester.
pub type Validator<W> = Arc<dyn Fn(&AdapterKey, AdapterFiles) -> Result<W, String> + Send + Sync>;

/// Called by a loader thread after it finished a load, to wake the owner thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Sizes of the cache tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Adapters resident on the device at once.
    pub device_slots: usize,
    /// Bytes of validated adapters kept in host memory.
    pub host_bytes: usize,
    /// Loader threads (concurrent fetches).
    pub loader_threads: usize,
}

#[derive(Debug, Default)]
struct Slot {
    key: Option<AdapterKey>,
    pins: usize,
    last_used: u64,
}

struct HostEntry<W> {
    adapter: Arc<W>,
    bytes: usize,
    last_used: u64,
}

struct LoadDone<W> {
    key: AdapterKey,
    result: Result<W, AdapterLoadError>,
    elapsed: Duration,
}

/// The loaders' job queue and the keys they fetch or have delivered, shared by the cache (on the
/// owner thread) and the engine's handles: whoever sees a key first starts its load, and no key
/// is fetched twice at once or while the cache holds it.
pub struct Loads {
    jobs: mpsc::Sender<AdapterKey>,
    index: Mutex<LoadIndex>,
    metrics: EngineMetrics,
}

#[derive(Default)]
struct LoadIndex {
    /// Fetches in flight.
    loading: HashSet<AdapterKey>,
    /// Fetched keys the cache still holds, in host memory or on the device.
    held: HashSet<AdapterKey>,
}

impl Loads {
    /// Start fetching `key` unless it is being fetched or is held already. Returns whether this
    /// call started it; `LoaderGone` when the loader threads have stopped.
    pub fn start(&self, key: &AdapterKey) -> Result<bool, AdapterLoadError> {
        let mut index = self.index();
        if index.loading.contains(key) || index.held.contains(key) {
            return Ok(false);
        }
        // Sent under the lock: the owner cannot collect the result before `loading` has the key.
        self.jobs
            .send(*key)
            .map_err(|_| AdapterLoadError::LoaderGone)?;
        index.loading.insert(*key);
        self.metrics.adapter_loads.inc();
        Ok(true)
    }

    /// Whether a fetch of `key` is in flight.
    pub fn is_loading(&self, key: &AdapterKey) -> bool {
        self.index().loading.contains(key)
    }

    /// A poisoned lock still holds a consistent index: every update is a single set operation.
    fn index(&self) -> MutexGuard<'_, LoadIndex> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The adapter cache (see the module docs).
pub struct AdapterCache<W: HostAdapter> {
    config: CacheConfig,
    slots: Vec<Slot>,
    resident: HashMap<AdapterKey, u32>,
    /// Bumped whenever `resident` changes, so observers copy it only then.
    generation: u64,
    host: HashMap<AdapterKey, HostEntry<W>>,
    host_bytes: usize,
    loads: Arc<Loads>,
    tick: u64,
    done: mpsc::Receiver<LoadDone<W>>,
    /// Loads received by [`Self::wait_load`], for the next [`Self::poll`].
    arrived: Vec<LoadDone<W>>,
    metrics: EngineMetrics,
}

impl<W: HostAdapter> AdapterCache<W> {
    /// A cache with empty tiers and `config.loader_threads` loader threads over `source`.
    pub fn new(
        config: CacheConfig,
        source: Arc<dyn AdapterSource>,
        validate: Validator<W>,
        wake: Waker,
        metrics: EngineMetrics,
    ) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<AdapterKey>();
        let (done_tx, done) = mpsc::channel::<LoadDone<W>>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..config.loader_threads.max(1) {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let source = Arc::clone(&source);
            let validate = Arc::clone(&validate);
            let wake = Arc::clone(&wake);
            std::thread::Builder::new()
                .name(format!("punica-adapter-loader-{i}"))
                .spawn(move || loader_loop(&job_rx, &done_tx, &*source, &*validate, &*wake))?;
        }
        metrics.adapter_slots_used.set(0);
        metrics.adapter_host_bytes.set(0);
        Ok(Self {
            config,
            slots: (0..config.device_slots).map(|_| Slot::default()).collect(),
            resident: HashMap::new(),
            generation: 0,
            host: HashMap::new(),
            host_bytes: 0,
            loads: Arc::new(Loads {
                jobs,
                index: Mutex::new(LoadIndex::default()),
                metrics: metrics.clone(),
            }),
            tick: 0,
            done,
            arrived: Vec::new(),
            metrics,
        })
    }

    /// A counter that changes whenever the set of device-resident adapters changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The adapters resident on the device now.
    pub fn resident_keys(&self) -> impl Iterator<Item = AdapterKey> + '_ {
        self.resident.keys().copied()
    }

    /// The device slot holding `key`, if resident.
    pub fn slot_of(&self, key: &AdapterKey) -> Option<u32> {
        self.resident.get(key).copied()
    }

    /// Adapters resident on the device.
    pub fn slots_used(&self) -> usize {
        self.resident.len()
    }

    /// Bytes held by the host tier.
    pub fn host_bytes(&self) -> usize {
        self.host_bytes
    }

    /// The load queue, to share with whoever may start loads (see [`Loads`]).
    pub fn loads(&self) -> &Arc<Loads> {
        &self.loads
    }

    /// Whether a fetch of `key` is in flight.
    pub fn is_loading(&self, key: &AdapterKey) -> bool {
        self.loads.is_loading(key)
    }

    /// Whether any fetch is in flight.
    pub fn any_loading(&self) -> bool {
        !self.loads.index().loading.is_empty()
    }

    /// `key` left the host tier or the device: forget it unless the other still holds it, so
    /// that the next request for it fetches it again.
    fn forget_unless_held(&self, key: &AdapterKey) {
        if !self.host.contains_key(key) && !self.resident.contains_key(key) {
            self.loads.index().held.remove(key);
        }
    }

    /// Whether `key` is held in host memory.
    pub fn in_host(&self, key: &AdapterKey) -> bool {
        self.host.contains_key(key)
    }

    /// Count a request for `key` as a hit (resident on the device) or a miss.
    pub fn note_request(&self, key: &AdapterKey) {
        if self.resident.contains_key(key) {
            self.metrics.adapter_hits.inc();
        } else {
            self.metrics.adapter_misses.inc();
        }
    }

    /// Pin `key`'s slot for one running sequence. Returns false if it is not resident.
    pub fn pin(&mut self, key: &AdapterKey) -> bool {
        let Some(&slot) = self.resident.get(key) else {
            return false;
        };
        self.tick += 1;
        let s = &mut self.slots[slot as usize];
        s.pins += 1;
        s.last_used = self.tick;
        true
    }

    /// Release one pin of `key`'s slot.
    pub fn unpin(&mut self, key: &AdapterKey) {
        if let Some(&slot) = self.resident.get(key) {
            let s = &mut self.slots[slot as usize];
            s.pins = s.pins.saturating_sub(1);
        }
    }

    /// Pins held on `key`'s slot (0 when not resident).
    pub fn pins(&self, key: &AdapterKey) -> usize {
        self.resident
            .get(key)
            .map_or(0, |&slot| self.slots[slot as usize].pins)
    }

    /// Wait up to `timeout` for a load to finish (collected by the next [`Self::poll`]).
    /// Returns whether one did.
    pub fn wait_load(&mut self, timeout: std::time::Duration) -> bool {
        match self.done.recv_timeout(timeout) {
            Ok(done) => {
                self.arrived.push(done);
                true
            }
            Err(_) => false,
        }
    }

    /// Collect finished loads into the host tier. Returns the keys that failed to load.
    pub fn poll(&mut self) -> Vec<AdapterLoadError> {
        let mut failed = Vec::new();
        let mut arrived = std::mem::take(&mut self.arrived);
        arrived.extend(std::iter::from_fn(|| self.done.try_recv().ok()));
        for done in arrived.drain(..) {
            {
                let mut index = self.loads.index();
                index.loading.remove(&done.key);
                if done.result.is_ok() {
                    index.held.insert(done.key);
                }
            }
            self.metrics
                .adapter_load_seconds
                .observe(done.elapsed.as_secs_f64());
            match done.result {
                Ok(adapter) => {
                    tracing::info!(adapter = %done.key, ms = done.elapsed.as_millis() as u64, "adapter loaded");
                    self.tick += 1;
                    let bytes = adapter.host_bytes();
                    if let Some(old) = self.host.insert(
                        done.key,
                        HostEntry {
                            adapter: Arc::new(adapter),
                            bytes,
                            last_used: self.tick,
                        },
                    ) {
                        self.host_bytes -= old.bytes;
                    }
                    self.host_bytes += bytes;
                }
                Err(e) => {
                    tracing::warn!(adapter = %done.key, error = %e, "adapter load failed");
                    self.metrics.adapter_load_failures.inc();
                    failed.push(e);
                }
            }
        }
        self.arrived = arrived;
        self.metrics.adapter_host_bytes.set(self.host_bytes as i64);
        failed
    }

    /// Work towards making every key of `needs` (oldest need first) resident: install what the
    /// host tier holds into free or least-recently-used unpinned slots (through `install`, which
    /// copies the adapter into the given device slot), and start loads for the rest. Keys that
    /// find no slot (every slot pinned) simply wait. Returns the keys whose install failed.
    pub fn ensure(
        &mut self,
        needs: &[AdapterKey],
        install: &mut dyn FnMut(u32, &W) -> Result<(), String>,
    ) -> Vec<AdapterLoadError> {
        let mut failed = Vec::new();
        for key in needs {
            if let Some(&slot) = self.resident.get(key) {
                self.tick += 1;
                self.slots[slot as usize].last_used = self.tick;
                continue;
            }
            if let Some(entry) = self.host.get(key) {
                let adapter = Arc::clone(&entry.adapter);
                let Some(slot) = self.free_slot() else {
                    continue;
                };
                if let Some(old) = self.slots[slot as usize].key.take() {
                    self.resident.remove(&old);
                    self.forget_unless_held(&old);
                    self.generation += 1;
                    self.metrics
                        .adapter_evictions
                        .with_label_values(&["device"])
                        .inc();
                    tracing::debug!(adapter = %old, slot, "adapter evicted from device");
                }
                match install(slot, &adapter) {
                    Ok(()) => {
                        self.tick += 1;
                        let s = &mut self.slots[slot as usize];
                        s.key = Some(*key);
                        s.pins = 0;
                        s.last_used = self.tick;
                        self.resident.insert(*key, slot);
                        self.generation += 1;
                        if let Some(e) = self.host.get_mut(key) {
                            e.last_used = self.tick;
                        }
                    }
                    Err(reason) => {
                        failed.push(AdapterLoadError::Device { key: *key, reason });
                    }
                }
                continue;
            }
            // Usually a submission started it already; then this finds it loading.
            if let Err(e) = self.loads.start(key) {
                failed.push(e);
            }
        }
        self.trim_host(needs);
        self.metrics
            .adapter_slots_used
            .set(self.resident.len() as i64);
        self.metrics.adapter_host_bytes.set(self.host_bytes as i64);
        failed
    }

    /// Whether some key of `needs` is validated in host memory but finds no device slot
    /// because every slot is pinned.
    pub fn slot_starved(&self, needs: &[AdapterKey]) -> bool {
        needs
            .iter()
            .any(|k| self.host.contains_key(k) && !self.resident.contains_key(k))
            && self.free_slot().is_none()
    }

    /// A free slot, else the least recently used unpinned one.
    fn free_slot(&self) -> Option<u32> {
        if let Some(i) = self.slots.iter().position(|s| s.key.is_none()) {
            return Some(i as u32);
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pins == 0)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i as u32)
    }

    /// Evict least-recently-used host entries above the budget, keeping those still waiting for
    /// a device slot (dropping them would only force a refetch).
    fn trim_host(&mut self, needs: &[AdapterKey]) {
        while self.host_bytes > self.config.host_bytes {
            let victim = self
                .host
                .iter()
                .filter(|(k, _)| !needs.contains(k) || self.resident.contains_key(k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            let Some(victim) = victim else {
                break;
            };
            if let Some(e) = self.host.remove(&victim) {
                self.forget_unless_held(&victim);
                self.host_bytes -= e.bytes;
                self.metrics
                    .adapter_evictions
                    .with_label_values(&["host"])
                    .inc();
            }
        }
    }

    /// The configured tier sizes.
    pub fn config(&self) -> CacheConfig {
        self.config
    }
}

fn loader_loop<W>(
    jobs: &Mutex<mpsc::Receiver<AdapterKey>>,
    done: &mpsc::Sender<LoadDone<W>>,
    source: &dyn AdapterSource,
    validate: &(dyn Fn(&AdapterKey, AdapterFiles) -> Result<W, String> + Send + Sync),
    wake: &(dyn Fn() + Send + Sync),
) {
    loop {
        let key = {
            let Ok(rx) = jobs.lock() else {
                return;
            };
            match rx.recv() {
                Ok(key) => key,
                // The cache was dropped: nothing more to load.
                Err(_) => return,
            }
        };
        let started = Instant::now();
        let result = source.fetch(&key).and_then(|files| {
            validate(&key, files).map_err(|reason| AdapterLoadError::Invalid { key, reason })
        });
        let msg = LoadDone {
            key,
            result,
            elapsed: started.elapsed(),
        };
        if done.send(msg).is_err() {
            return;
        }
        wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<u8>);

    impl HostAdapter for Fake {
        fn host_bytes(&self) -> usize {
            self.0.len()
        }
    }

    fn key(n: u128) -> AdapterKey {
        AdapterKey {
            id: Uuid::from_u128(n),
            version: 1,
        }
    }

    fn files(bytes: usize) -> AdapterFiles {
        AdapterFiles {
            config: Bytes::from_static(b"{}"),
            weights: vec![7; bytes].into(),
        }
    }

    fn cache(slots: usize, host_bytes: usize, source: Arc<MemorySource>) -> AdapterCache<Fake> {
        let validate: Validator<Fake> = Arc::new(|_, f: AdapterFiles| {
            if f.config == b"corrupt"[..] {
                Err("adapter_config.json is not JSON".into())
            } else {
                Ok(Fake(f.weights.to_vec()))
            }
        });
        AdapterCache::new(
            CacheConfig {
                device_slots: slots,
                host_bytes,
                loader_threads: 2,
            },
            source,
            validate,
            Arc::new(|| {}),
            EngineMetrics::unregistered().unwrap(),
        )
        .unwrap()
    }

    /// Drive `poll` + `ensure` until no load is in flight and every key is resident, failed, or
    /// held in host memory waiting for a slot. Records the slots installed into.
    fn settle(
        c: &mut AdapterCache<Fake>,
        needs: &[AdapterKey],
        installs: &mut Vec<u32>,
    ) -> Vec<AdapterLoadError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut failed: Vec<AdapterLoadError> = Vec::new();
        loop {
            failed.extend(c.poll());
            let live: Vec<AdapterKey> = needs
                .iter()
                .filter(|k| !failed.iter().any(|e| e.key() == Some(**k)))
                .copied()
                .collect();
            let mut install = |slot: u32, _: &Fake| {
                installs.push(slot);
                Ok(())
            };
            failed.extend(c.ensure(&live, &mut install));
            let settled =
                !c.any_loading() && live.iter().all(|k| c.slot_of(k).is_some() || c.in_host(k));
            if settled {
                return failed;
            }
            assert!(Instant::now() < deadline, "cache did not settle");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_missing_adapter_is_loaded_in_the_background_and_installed_in_a_free_slot() {
        let src = Arc::new(MemorySource::new());
        src.insert(key(1), files(10));
        let mut c = cache(2, 1000, Arc::clone(&src));
        assert_eq!(c.slot_of(&key(1)), None);
        let mut installs = Vec::new();
        let failed = settle(&mut c, &[key(1)], &mut installs);
        assert!(failed.is_empty());
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(installs, vec![0]);
        assert_eq!(src.fetches(), 1);
        assert_eq!(c.host_bytes(), 10);
    }

    #[test]
    fn a_load_received_by_waiting_is_collected_by_the_next_poll() {
        let src = Arc::new(MemorySource::new());
        src.insert(key(1), files(10));
        let mut c = cache(1, 1000, Arc::clone(&src));
        assert!(
            !c.wait_load(Duration::from_millis(1)),
            "nothing in flight, nothing arrives"
        );
        let mut installs = Vec::new();
        let mut install = |slot: u32, _: &Fake| {
            installs.push(slot);
            Ok(())
        };
        assert!(c.ensure(&[key(1)], &mut install).is_empty());
        assert!(c.any_loading());
        assert!(c.wait_load(Duration::from_secs(10)), "the load arrives");
        // Received, not collected yet: still in flight until `poll`.
        assert!(!c.in_host(&key(1)));
        assert!(c.poll().is_empty());
        assert!(c.in_host(&key(1)) && !c.any_loading());
        assert!(c.ensure(&[key(1)], &mut install).is_empty());
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(installs, vec![0]);
    }

    #[test]
    fn the_least_recently_used_unpinned_slot_is_evicted_and_pinned_slots_never_are() {
        let src = Arc::new(MemorySource::new());
        for k in 1..=3 {
            src.insert(key(k), files(10));
        }
        let mut c = cache(2, 1000, Arc::clone(&src));
        let mut installs = Vec::new();
        settle(&mut c, &[key(1)], &mut installs);
        settle(&mut c, &[key(2)], &mut installs);
        assert!(
            c.pin(&key(1)),
            "key 1 is the least recently used, but pinned"
        );
        settle(&mut c, &[key(3)], &mut installs);
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(c.slot_of(&key(2)), None, "unpinned key 2 was evicted");
        assert_eq!(c.slot_of(&key(3)), Some(1));
        assert_eq!(
            c.metrics
                .adapter_evictions
                .with_label_values(&["device"])
                .get(),
            1
        );
    }

    #[test]
    fn when_every_slot_is_pinned_a_new_adapter_waits_in_host_memory_until_one_is_released() {
        let src = Arc::new(MemorySource::new());
        for k in 1..=2 {
            src.insert(key(k), files(10));
        }
        let mut c = cache(1, 1000, Arc::clone(&src));
        let mut installs = Vec::new();
        settle(&mut c, &[key(1)], &mut installs);
        assert!(c.pin(&key(1)));
        settle(&mut c, &[key(2)], &mut installs);
        assert_eq!(c.slot_of(&key(2)), None);
        assert!(c.in_host(&key(2)));
        assert!(c.slot_starved(&[key(2)]));
        assert_eq!(c.slot_of(&key(1)), Some(0));
        c.unpin(&key(1));
        settle(&mut c, &[key(2)], &mut installs);
        assert_eq!(c.slot_of(&key(2)), Some(0));
        assert_eq!(src.fetches(), 2, "no refetch: key 2 came from host memory");
    }

    #[test]
    fn the_host_tier_keeps_within_its_byte_budget_and_reloads_from_the_source() {
        let src = Arc::new(MemorySource::new());
        for k in 1..=3 {
            src.insert(key(k), files(100));
        }
        let mut c = cache(1, 250, Arc::clone(&src));
        let mut installs = Vec::new();
        for k in 1..=3 {
            settle(&mut c, &[key(k)], &mut installs);
            assert!(c.host_bytes() <= 250);
        }
        assert!(!c.in_host(&key(1)), "the oldest host entry went first");
        settle(&mut c, &[key(1)], &mut installs);
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(src.fetches(), 4);
        assert!(
            c.metrics
                .adapter_evictions
                .with_label_values(&["host"])
                .get()
                >= 1
        );
    }

    #[test]
    fn a_corrupt_or_missing_adapter_fails_only_its_own_key() {
        let src = Arc::new(MemorySource::new());
        src.insert(key(1), files(10));
        src.insert(
            key(2),
            AdapterFiles {
                config: Bytes::from_static(b"corrupt"),
                weights: Bytes::new(),
            },
        );
        let mut c = cache(4, 1000, Arc::clone(&src));
        let mut installs = Vec::new();
        let failed = settle(&mut c, &[key(1), key(2), key(3)], &mut installs);
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(failed.len(), 2);
        assert!(failed.contains(&AdapterLoadError::Invalid {
            key: key(2),
            reason: "adapter_config.json is not JSON".into()
        }));
        assert!(failed.contains(&AdapterLoadError::NotFound { key: key(3) }));
        assert_eq!(c.metrics.adapter_load_failures.get(), 2);
    }

    #[test]
    fn a_new_version_is_a_different_adapter() {
        let src = Arc::new(MemorySource::new());
        let v1 = key(1);
        let v2 = AdapterKey { version: 2, ..v1 };
        src.insert(v1, files(10));
        src.insert(v2, files(20));
        let mut c = cache(2, 1000, Arc::clone(&src));
        let mut installs = Vec::new();
        settle(&mut c, &[v1, v2], &mut installs);
        assert_ne!(c.slot_of(&v1), c.slot_of(&v2));
        assert!(c.slot_of(&v1).is_some() && c.slot_of(&v2).is_some());
    }

    #[test]
    fn a_load_started_from_outside_is_not_started_again_until_the_cache_lets_the_adapter_go() {
        let src = Arc::new(MemorySource::new());
        for k in 1..=2 {
            src.insert(key(k), files(10));
        }
        let mut c = cache(1, 1000, Arc::clone(&src));
        let loads = Arc::clone(c.loads());
        assert_eq!(loads.start(&key(1)), Ok(true));
        assert_eq!(loads.start(&key(1)), Ok(false), "in flight");
        let mut installs = Vec::new();
        settle(&mut c, &[key(1)], &mut installs);
        assert_eq!(c.slot_of(&key(1)), Some(0));
        assert_eq!(loads.start(&key(1)), Ok(false), "resident");
        assert_eq!(src.fetches(), 1);
        assert_eq!(c.metrics.adapter_loads.get(), 1);

        // Key 2 takes the only slot; key 1 stays in host memory until the budget drops it.
        settle(&mut c, &[key(2)], &mut installs);
        assert_eq!(c.slot_of(&key(1)), None);
        assert_eq!(loads.start(&key(1)), Ok(false), "still in host memory");
        c.config.host_bytes = 10;
        c.trim_host(&[key(2)]);
        assert!(!c.in_host(&key(1)));
        assert_eq!(loads.start(&key(1)), Ok(true), "gone from every tier");
        assert_eq!(c.metrics.adapter_loads.get(), 3);
    }

    #[test]
    fn a_failed_load_can_be_started_again() {
        let src = Arc::new(MemorySource::new());
        let mut c = cache(1, 1000, Arc::clone(&src));
        let loads = Arc::clone(c.loads());
        assert_eq!(loads.start(&key(1)), Ok(true));
        let failed = settle(&mut c, &[key(1)], &mut Vec::new());
        assert_eq!(failed, vec![AdapterLoadError::NotFound { key: key(1) }]);
        src.insert(key(1), files(10));
        assert_eq!(loads.start(&key(1)), Ok(true));
        settle(&mut c, &[key(1)], &mut Vec::new());
        assert_eq!(c.slot_of(&key(1)), Some(0));
    }

    #[test]
    fn a_directory_source_reads_the_two_peft_files() {
        let dir = tempfile::tempdir().unwrap();
        let src = DirSource::new(dir.path());
        let k = key(9);
        assert_eq!(src.fetch(&k), Err(AdapterLoadError::NotFound { key: k }));
        let d = src.dir_of(&k);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), b"{\"r\": 8}").unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), b"xyz").unwrap();
        let f = src.fetch(&k).unwrap();
        assert_eq!(f.config, b"{\"r\": 8}"[..]);
        assert_eq!(f.weights, b"xyz"[..]);
    }
}
