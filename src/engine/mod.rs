//! The engine: model, backends, LoRA, scheduler, and the runtime that drives them. Never imports
//! sqlx or actix.
//!
//! [`EngineHandle::submit`] takes a [`ValidRequest`] and returns a [`RequestStream`] of
//! [`StreamEvent`]s. One owner thread (see `runtime`) holds the device, the scheduler and the
//! adapter cache and runs the step loop; handles and streams talk to it through channels only.
//! Dropping a stream (or calling [`RequestStream::cancel`]) stops its sequence and frees its KV
//! blocks within one step.

pub mod backend;
pub mod bench;
pub mod executor;
pub mod kv;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod request;
mod runtime;
pub mod sampling;
pub mod scheduler;
pub mod synthetic;

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, mpsc};
use std::task::{Context, Poll};

use crate::engine::backend::{Pick, RowSampling, StepMeta, StepPath};
use crate::engine::lora::cache::{
    AdapterKey, AdapterSource, CacheConfig, HostAdapter, Loads, Validator,
};
use crate::engine::metrics::EngineMetrics;
use crate::engine::request::{SharedDetokenizer, StreamEvent, ValidRequest};
use crate::engine::scheduler::SeqId;

/// What the runtime drives each step: a model with its KV pool and adapter slots on a device.
/// Built on the owner thread (device contexts may be bound to the thread that made them).
pub trait Executor {
    /// A validated adapter as held in host memory.
    type Adapter: HostAdapter;

    /// Logits per sampled row.
    fn vocab_size(&self) -> usize;
    /// Blocks of `BLOCK_SIZE` tokens in its KV pool.
    fn kv_blocks(&self) -> usize;
    /// Adapter slots on the device.
    fn adapter_slots(&self) -> usize;
    /// Copy `adapter` into device slot `slot`, replacing whatever was there. The copy may run
    /// on after this returns, beside the steps: see [`Executor::adapter_ready`]. It may be
    /// called while a step is in flight (between [`Executor::launch`] and
    /// [`Executor::finish`]): that step's adapters are pinned, so `slot` is none of theirs.
    fn install_adapter(&mut self, slot: u32, adapter: &Self::Adapter) -> Result<(), String>;
    /// Whether a step may use the adapter in `slot` now without holding up its other rows:
    /// its copy complete, or (the Llama executor) still in flight but waited for by that
    /// adapter's own work only, so its requests join the very step its copy starts beside.
    /// The runtime admits the adapter's requests only when this says yes.
    fn adapter_ready(&self, slot: u32) -> bool {
        let _ = slot;
        true
    }
    /// Start one step over `meta`'s batch that picks a token for each of `meta.logit_rows` as
    /// `sampling[i]` says (with `want_logits`, those rows' logits come back too), without
    /// waiting for it: the runtime streams the previous step's tokens meanwhile. At most one
    /// step is in flight: [`Executor::finish`] it before the next launch.
    fn launch(
        &mut self,
        meta: &StepMeta,
        sampling: &[RowSampling],
        want_logits: bool,
    ) -> Result<(), ExecutorError>;
    /// Whether the launched step is done, without waiting (so [`Executor::finish`] would not
    /// block on it). Executors whose launch does the work at once say yes.
    fn step_done(&self) -> bool {
        true
    }
    /// Wait for the launched step and hand back its picks.
    fn finish(&mut self) -> Result<StepOutput<'_>, ExecutorError>;
}

/// What one step hands back to the host ([`Executor::finish`]).
#[derive(Clone, Copy, Debug)]
pub struct StepOutput<'a> {
    /// One pick per logit row.
    pub picks: &'a [Pick],
    /// `[logit_rows, vocab]` f32 logits, when the step asked for them.
    pub logits: Option<&'a [f32]>,
    /// How the device ran the step (issued, or recorded / replayed as a CUDA graph).
    pub path: StepPath,
}

/// A failed step of an [`Executor`] (backend or model error), reported to the requests in it.
pub type ExecutorError = Box<dyn std::error::Error + Send + Sync>;

/// Limits of the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences holding KV at once.
    pub max_running: usize,
    /// Rows (decode tokens + prefill chunk tokens) per step.
    pub max_step_tokens: usize,
    /// Requests queued or running before `submit` answers overloaded.
    pub max_queued: usize,
    /// Events buffered per stream; a client that lets it fill is cut off (overloaded).
    pub stream_capacity: usize,
    /// Adapter cache tiers.
    pub cache: CacheConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 64,
            max_step_tokens: 512,
            max_queued: 4096,
            stream_capacity: 512,
            cache: CacheConfig {
                device_slots: 16,
                host_bytes: 1 << 30,
                loader_threads: 2,
            },
        }
    }
}

/// Errors of the engine's boundary (starting it, submitting to it).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine failed to start: {0}")]
    Startup(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("engine overloaded: {queued} requests queued (limit {limit})")]
    Overloaded { queued: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request of {tokens} tokens exceeds the engine's capacity of {capacity} tokens")]
    TooLong { tokens: usize, capacity: usize },
}

/// Messages from handles, streams and loader threads to the owner thread.
enum Command {
    Submit(Box<Submission>),
    Cancel(SeqId),
    /// A loader finished; look at the adapter cache.
    Wake,
    Shutdown,
}

struct Submission {
    id: SeqId,
    request: ValidRequest,
    events: tokio::sync::mpsc::Sender<StreamEvent>,
}

/// State shared by the handles and the owner thread.
struct Shared {
    next_id: AtomicU64,
    /// Requests submitted and not yet ended.
    queued: AtomicUsize,
    /// Live `EngineHandle` clones; the last one to go stops the engine.
    handles: AtomicUsize,
    config: EngineConfig,
    /// Adapters resident on the device, as last published by the owner thread.
    resident: RwLock<HashSet<AdapterKey>>,
    /// Tokens one sequence may reach: the KV pool. Set by the owner thread at startup.
    capacity_tokens: AtomicUsize,
    /// Set by the owner thread at startup.
    vocab_size: AtomicUsize,
    /// The adapter cache's load queue, so that `submit` starts a missing adapter's load without
    /// waiting for the owner's next step. Set by the owner thread at startup.
    loads: OnceLock<Arc<Loads>>,
}

/// A cloneable handle to a running engine.
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Clone for EngineHandle {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::SeqCst);
        Self {
            commands: self.commands.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The owner may already be gone; nothing else to do then.
            let _ = self.commands.send(Command::Shutdown);
        }
    }
}

impl EngineHandle {
    /// Start an engine: spawn the owner thread, build the executor there with `build`, and
    /// start the adapter loaders over `source` (validating fetched files with `validate`).
    pub fn start<E, F>(
        config: EngineConfig,
        build: F,
        source: Arc<dyn AdapterSource>,
        validate: Validator<E::Adapter>,
        detokenizer: SharedDetokenizer,
        metrics: EngineMetrics,
    ) -> Result<Self, EngineError>
    where
        E: Executor + 'static,
        F: FnOnce() -> Result<E, EngineError> + Send + 'static,
    {
        if config.max_running == 0 || config.max_step_tokens == 0 || config.stream_capacity < 2 {
            return Err(EngineError::Startup(format!(
                "max_running ({}) and max_step_tokens ({}) must be positive and stream_capacity \
                 ({}) at least 2",
                config.max_running, config.max_step_tokens, config.stream_capacity
            )));
        }
        let (commands, command_rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            queued: AtomicUsize::new(0),
            handles: AtomicUsize::new(1),
            config,
            capacity_tokens: AtomicUsize::new(0),
            vocab_size: AtomicUsize::new(0),
            resident: RwLock::new(HashSet::new()),
            loads: OnceLock::new(),
        });
        let owner_shared = Arc::clone(&shared);
        let wake_tx = commands.clone();
        let waker: lora::cache::Waker = Arc::new(move || {
            let _ = wake_tx.send(Command::Wake);
        });
        std::thread::Builder::new()
            .name("punica-engine".into())
            .spawn(move || {
                runtime::run(
                    owner_shared,
                    build,
                    source,
                    validate,
                    waker,
                    detokenizer,
                    metrics,
                    command_rx,
                    ready_tx,
                )
            })
            .map_err(|e| EngineError::Startup(format!("cannot spawn the engine thread: {e}")))?;
        ready_rx.recv().map_err(|_| {
            EngineError::Startup("the engine thread exited during startup".into())
        })??;
        Ok(Self { commands, shared })
    }

    /// Whether the adapter version `key` occupies a device slot now (as of the last step).
    pub fn is_resident(&self, key: &AdapterKey) -> bool {
        self.shared
            .resident
            .read()
            .map(|set| set.contains(key))
            .unwrap_or(false)
    }

    /// Queue a request; its events arrive on the returned stream.
    pub fn submit(&self, request: ValidRequest) -> Result<RequestStream, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt has no tokens".into(),
            ));
        }
        request
            .sampling
            .validate()
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let vocab = self.shared.vocab_size.load(Ordering::Relaxed);
        if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let tokens = request
            .prompt
            .len()
            .saturating_add(request.sampling.max_tokens);
        let capacity = self.capacity_tokens();
        if tokens > capacity {
            return Err(EngineError::TooLong { tokens, capacity });
        }
        let limit = self.shared.config.max_queued;
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= limit {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded { queued, limit });
        }
        // The fetch runs while the request travels to the owner thread and waits for its next
        // step. A loader that is gone is reported to the request by the owner, which tries too.
        if let (Some(key), Some(loads)) = (&request.adapter, self.shared.loads.get()) {
            let _ = loads.start(key);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tokio::sync::mpsc::channel(self.shared.config.stream_capacity);
        let submission = Submission {
            id,
            request,
            events,
        };
        if self
            .commands
            .send(Command::Submit(Box::new(submission)))
            .is_err()
        {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream {
            id,
            rx,
            commands: self.commands.clone(),
            ended: false,
        })
    }

    /// Cancel request `id` (as returned by [`RequestStream::id`]); its stream ends with
    /// `Done { finish_reason: cancelled }`.
    pub fn cancel(&self, id: SeqId) -> Result<(), EngineError> {
        self.commands
            .send(Command::Cancel(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// Tokens one request (prompt + max_tokens) may reach.
    pub fn capacity_tokens(&self) -> usize {
        self.shared.capacity_tokens.load(Ordering::Relaxed)
    }

    /// Stop the engine: live requests end with an error, later submits fail.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// The events of one request. Ends after `Done` or `Error`. Dropping it cancels the request.
pub struct RequestStream {
    id: SeqId,
    rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    commands: mpsc::Sender<Command>,
    ended: bool,
}

impl RequestStream {
    /// The engine's id of this request.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event, or `None` after the last one (or if the engine stopped).
    pub async fn next_event(&mut self) -> Option<StreamEvent> {
        let ev = self.rx.recv().await;
        self.observe(&ev);
        ev
    }

    /// Blocking twin of [`next_event`](Self::next_event), for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<StreamEvent> {
        let ev = self.rx.blocking_recv();
        self.observe(&ev);
        ev
    }

    /// Ask the engine to stop this request; the stream then ends with `Done { cancelled }`.
    pub fn cancel(&self) {
        if !self.ended {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }

    fn observe(&mut self, ev: &Option<StreamEvent>) {
        if matches!(
            ev,
            None | Some(StreamEvent::Done { .. } | StreamEvent::Error { .. })
        ) {
            self.ended = true;
        }
    }
}

impl futures_util::Stream for RequestStream {
    type Item = StreamEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(ev) = &polled {
            self.observe(ev);
        }
        polled
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // The owner also notices the closed channel on its next step; the message makes the
        // release immediate when it is idle-waiting on its command queue.
        if !self.ended {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}
