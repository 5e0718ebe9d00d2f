//! The owner thread's step loop: commands in, scheduler -> [`StepMeta`] -> the executor launches
//! the step; while it runs, the previous step's picks go out as stream events; then this step's
//! picks come back to the scheduler. Everything that touches the device or the queue state
//! happens here, on one thread; the rest of the process reaches it only through channels.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use super::{Command, EngineError, Executor, Shared, Submission};
use crate::engine::backend::{BLOCK_SIZE, Pick, RowSampling, StepMeta};
use crate::engine::lora::cache::{
    AdapterCache, AdapterKey, AdapterLoadError, AdapterSource, Validator, Waker,
};
use crate::engine::metrics::EngineMetrics;
use crate::engine::request::{
    ErrorCode, FinishReason, SharedDetokenizer, StopText, StreamEvent, TextDecoder, Usage,
    ValidRequest,
};
use crate::engine::sampling::Sampler;
use crate::engine::scheduler::{Scheduler, SchedulerConfig, SeqId, StepPlan};

/// Engine-side state of one live request (the scheduler holds its tokens and KV).
struct Live {
    request_id: uuid::Uuid,
    tenant: uuid::Uuid,
    adapter: Option<AdapterKey>,
    events: tokio::sync::mpsc::Sender<StreamEvent>,
    sampler: Sampler,
    max_tokens: u32,
    logprobs: bool,
    prompt_tokens: u32,
    generated: u32,
    decoder: Box<dyn TextDecoder>,
    text: StopText,
}

/// Everything but the executor, so a forward's borrowed logits can be read while the rest is
/// updated.
struct State<W: crate::engine::lora::cache::HostAdapter> {
    shared: Arc<Shared>,
    scheduler: Scheduler,
    cache: AdapterCache<W>,
    live: HashMap<SeqId, Live>,
    detokenizer: SharedDetokenizer,
    metrics: EngineMetrics,
    vocab: usize,
    meta: StepMeta,
    plan: StepPlan,
    needs: Vec<AdapterKey>,
    closed: Vec<SeqId>,
    /// This step's sampling rows and their sequences (reused buffers).
    row_sampling: Vec<RowSampling>,
    row_ids: Vec<SeqId>,
    stopping: bool,
    /// Consecutive steps in which a loaded adapter found every device slot pinned.
    starved_steps: u32,
    /// Where the owner thread's time goes around the executor's steps.
    timing: HostTiming,
    /// The last step's picks, their sequences and (when a row asked) logits: streamed while
    /// the next step runs (see [`State::step`]).
    streaming: Vec<(SeqId, Pick, usize)>,
    streaming_logits: Option<Vec<f32>>,
    /// The cache generation last copied to `shared.resident`.
    published_generation: u64,
}

/// The owner thread's own time per step, by phase, logged at debug level every
/// [`HostTiming::WINDOW`] steps. The device idles from the end of one step until the next is
/// launched (housekeeping and the start of the launch phase); the streaming overlaps the step
/// (the executor's own `step timing` log covers the step itself).
#[derive(Default)]
struct HostTiming {
    steps: u32,
    /// Cancellations, adapter loads and residency.
    housekeeping: std::time::Duration,
    /// The scheduler's plan (the step's metadata), the rows' sampling parameters and the
    /// step's launch (the executor issuing it; the device starts on its first part meanwhile).
    launch: std::time::Duration,
    /// The previous step's picks turned into stream events (while this step runs).
    stream: std::time::Duration,
}

impl HostTiming {
    const WINDOW: u32 = 32;

    fn record(&mut self, housekeeping: Instant, launch: Instant, stream: Instant, end: Instant) {
        self.steps += 1;
        self.housekeeping += launch - housekeeping;
        self.launch += stream - launch;
        self.stream += end - stream;
        if self.steps == Self::WINDOW {
            let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / f64::from(self.steps);
            tracing::debug!(
                steps = self.steps,
                housekeeping_us = us(self.housekeeping),
                launch_us = us(self.launch),
                stream_us = us(self.stream),
                "host timing"
            );
            *self = HostTiming::default();
        }
    }
}

/// Steps an adapter may wait for a pinned-full set of device slots before new admissions onto
/// resident adapters are held back.
const SLOT_STARVATION_STEPS: u32 = 16;

/// How often a running step is checked while the runtime waits for adapter loads beside it
/// (`State::install_while_running`).
const STEP_POLL: Duration = Duration::from_micros(50);

/// The owner thread's body.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<E, F>(
    shared: Arc<Shared>,
    build: F,
    source: Arc<dyn AdapterSource>,
    validate: Validator<E::Adapter>,
    waker: Waker,
    detokenizer: SharedDetokenizer,
    metrics: EngineMetrics,
    commands: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<(), EngineError>>,
) where
    E: Executor,
    F: FnOnce() -> Result<E, EngineError>,
{
    let config = shared.config;
    let mut exec = match build() {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if exec.adapter_slots() < config.cache.device_slots {
        let _ = ready.send(Err(EngineError::Startup(format!(
            "the executor has {} adapter slots, the cache wants {}",
            exec.adapter_slots(),
            config.cache.device_slots
        ))));
        return;
    }
    let cache = match AdapterCache::new(config.cache, source, validate, waker, metrics.clone()) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Startup(format!(
                "cannot start adapter loaders: {e}"
            ))));
            return;
        }
    };
    // Set once, before any handle can submit (`ready` is not sent yet).
    let _ = shared.loads.set(Arc::clone(cache.loads()));
    let scheduler = Scheduler::new(SchedulerConfig {
        max_running: config.max_running,
        max_step_tokens: config.max_step_tokens,
        num_kv_blocks: exec.kv_blocks(),
    });
    shared
        .capacity_tokens
        .store(exec.kv_blocks() * BLOCK_SIZE, Ordering::Relaxed);
    shared
        .vocab_size
        .store(exec.vocab_size(), Ordering::Relaxed);
    metrics.kv_blocks_total.set(exec.kv_blocks() as i64);
    let mut state = State {
        shared,
        scheduler,
        cache,
        live: HashMap::new(),
        detokenizer,
        metrics,
        vocab: exec.vocab_size(),
        meta: StepMeta::default(),
        plan: StepPlan::default(),
        needs: Vec::new(),
        closed: Vec::new(),
        row_sampling: Vec::new(),
        row_ids: Vec::new(),
        stopping: false,
        starved_steps: 0,
        timing: HostTiming::default(),
        streaming: Vec::new(),
        streaming_logits: None,
        published_generation: 0,
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    tracing::info!(
        kv_blocks = exec.kv_blocks(),
        adapter_slots = config.cache.device_slots,
        "engine started"
    );

    let mut busy = false;
    loop {
        // Wait for work only when the last step did nothing: otherwise just drain the queue.
        if !busy {
            match commands.recv() {
                Ok(cmd) => state.handle(cmd),
                Err(_) => break,
            }
        }
        while let Ok(cmd) = commands.try_recv() {
            state.handle(cmd);
        }
        if state.stopping {
            break;
        }
        busy = state.step(&mut exec);
    }
    state.stream_picks();
    state.fail_all(ErrorCode::Internal, "the engine has stopped");
    tracing::info!("engine stopped");
}

impl<W: crate::engine::lora::cache::HostAdapter> State<W> {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(sub) => self.admit(*sub),
            Command::Cancel(id) => {
                if self.live.contains_key(&id) {
                    self.end(
                        id,
                        StreamEvent::Done {
                            finish_reason: FinishReason::Cancelled,
                            usage: Usage::default(),
                        },
                    );
                }
            }
            Command::Wake => {}
            Command::Shutdown => self.stopping = true,
        }
    }

    fn admit(&mut self, sub: Submission) {
        let Submission {
            id,
            request,
            events,
        } = sub;
        let ValidRequest {
            tenant,
            request_id,
            adapter,
            prompt,
            sampling,
        } = request;
        let max_tokens = u32::try_from(sampling.max_tokens).unwrap_or(u32::MAX);
        let logprobs = sampling.logprobs.is_some();
        let stop_strings = sampling.stop.clone();
        let prompt_tokens = prompt.len() as u32;
        let max_len = prompt.len().saturating_add(sampling.max_tokens);
        if let Err(e) = self.scheduler.add(id, tenant, adapter, prompt, max_len) {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = events.try_send(StreamEvent::Error {
                code: ErrorCode::InvalidRequest,
                message: e.to_string(),
            });
            return;
        }
        if let Some(key) = &adapter {
            self.cache.note_request(key);
        }
        tracing::debug!(%tenant, request = %request_id, seq = id, "request queued");
        self.live.insert(
            id,
            Live {
                request_id,
                tenant,
                adapter,
                events,
                sampler: Sampler::new(sampling, request_id.as_u64_pair().0),
                max_tokens,
                logprobs,
                prompt_tokens,
                generated: 0,
                decoder: self.detokenizer.decoder(),
                text: StopText::new(&stop_strings),
            },
        );
    }

    /// Take `id` out of the scheduler (its KV freed) and release its adapter pin; nothing when
    /// it left already.
    fn leave_batch(&mut self, id: SeqId) {
        if let Some(removed) = self.scheduler.remove(id)
            && removed.was_running
            && let Some(key) = &removed.adapter
        {
            self.cache.unpin(key);
        }
    }

    /// End request `id` with `last` (Done or Error), free its KV and its adapter pin.
    fn end(&mut self, id: SeqId, last: StreamEvent) {
        self.leave_batch(id);
        let Some(live) = self.live.remove(&id) else {
            return;
        };
        let reason = match &last {
            StreamEvent::Done { finish_reason, .. } => finish_reason.as_str(),
            _ => "error",
        };
        self.metrics.finished.with_label_values(&[reason]).inc();
        tracing::debug!(tenant = %live.tenant, request = %live.request_id, seq = id, reason, "request ended");
        let last = match last {
            StreamEvent::Done { finish_reason, .. } => StreamEvent::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens: live.prompt_tokens,
                    completion_tokens: live.generated,
                },
            },
            other => other,
        };
        // A full or closed channel means the client is gone or not reading: nothing to tell it.
        let _ = live.events.try_send(last);
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
    }

    fn fail(&mut self, id: SeqId, code: ErrorCode, message: String) {
        self.end(id, StreamEvent::Error { code, message });
    }

    fn fail_all(&mut self, code: ErrorCode, message: &str) {
        let ids: Vec<SeqId> = self.live.keys().copied().collect();
        for id in ids {
            self.fail(id, code, message.to_string());
        }
    }

    fn fail_adapter(&mut self, err: &AdapterLoadError) {
        let code = match err {
            AdapterLoadError::NotFound { .. } => ErrorCode::AdapterNotFound,
            AdapterLoadError::Invalid { .. } => ErrorCode::InvalidAdapter,
            _ => ErrorCode::Internal,
        };
        let ids = match err.key() {
            Some(key) => self.scheduler.waiting_for(key),
            // The loader is gone: nothing waiting for an adapter can ever run.
            None => self
                .live
                .iter()
                .filter(|(_, l)| l.adapter.is_some())
                .map(|(&id, _)| id)
                .filter(|id| self.scheduler.contains(*id))
                .collect(),
        };
        for id in ids {
            self.fail(id, code, err.to_string());
        }
    }

    /// One engine step. Returns whether anything ran.
    fn step<E: Executor<Adapter = W>>(&mut self, exec: &mut E) -> bool {
        let started = Instant::now();

        // Clients that went away.
        self.closed.clear();
        self.closed.extend(
            self.live
                .iter()
                .filter(|(_, l)| l.events.is_closed())
                .map(|(&id, _)| id),
        );
        for i in 0..self.closed.len() {
            let id = self.closed[i];
            self.end(
                id,
                StreamEvent::Done {
                    finish_reason: FinishReason::Cancelled,
                    usage: Usage::default(),
                },
            );
        }

        self.tend_adapters(exec);
        // Time-sliced swapping: an adapter that waits too long for a slot held by pinned
        // adapters stops new admissions onto those, so their slots drain.
        if self.cache.slot_starved(&self.needs) {
            self.starved_steps += 1;
        } else {
            self.starved_steps = 0;
        }
        self.scheduler
            .set_admit_adapters(self.starved_steps < SLOT_STARVATION_STEPS);

        // An adapter counts as resident once the executor says a step may use it
        // (`Executor::adapter_ready`: for the Llama executor, once installed, its copy awaited
        // by its own rows' work): until then its requests wait and the batch runs on without
        // it. `held` notes that one was turned away, so the loop comes back for it (no command
        // wakes the loop when a copy is done).
        let cache = &self.cache;
        let held = std::cell::Cell::new(false);
        let ready = |k: &AdapterKey| {
            let slot = cache.slot_of(k)?;
            let ready = exec.adapter_ready(slot);
            held.set(held.get() || !ready);
            ready.then_some(slot)
        };
        let scheduling = Instant::now();
        let scheduled = self
            .scheduler
            .schedule(ready, &mut self.meta, &mut self.plan);
        for i in 0..self.plan.admitted.len() {
            let id = self.plan.admitted[i];
            if let Some(key) = self.live.get(&id).and_then(|l| l.adapter) {
                self.cache.pin(&key);
            }
        }
        for i in 0..self.plan.preempted.len() {
            let id = self.plan.preempted[i];
            if let Some(key) = self.live.get(&id).and_then(|l| l.adapter) {
                self.cache.unpin(&key);
            }
        }
        self.metrics
            .preemptions
            .inc_by(self.plan.preempted.len() as u64);
        if !scheduled {
            // The last step's tokens still go out (they may end the last sequences).
            self.stream_picks();
            self.update_gauges();
            // Nothing ran, but a request waits for a copy in flight: busy, so the loop does not
            // sleep on the command queue. (Asking the executor again here instead could find
            // the copy done just after the scheduler turned the request away, and sleep.)
            return held.get();
        }

        // Each sampling sequence's row: its parameters and its RNG's next draw.
        self.row_sampling.clear();
        self.row_ids.clear();
        let mut want_logits = false;
        for seq in self.plan.seqs.iter().filter(|s| s.samples) {
            let rs = match self.live.get_mut(&seq.id) {
                Some(live) => {
                    want_logits |= live.sampler.wants_logits();
                    live.sampler.row_sampling()
                }
                None => RowSampling::GREEDY,
            };
            self.row_sampling.push(rs);
            self.row_ids.push(seq.id);
        }
        let launched = exec.launch(&self.meta, &self.row_sampling, want_logits);
        // The last step's tokens go out while this one runs.
        let streaming = Instant::now();
        self.stream_picks();
        if launched.is_ok() {
            self.install_while_running(exec);
        }
        let streamed = Instant::now();
        let out = match launched.and_then(|()| exec.finish()) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                let ids: Vec<SeqId> = self.plan.seqs.iter().map(|s| s.id).collect();
                for id in ids {
                    self.fail(id, ErrorCode::Internal, format!("forward pass failed: {e}"));
                }
                self.update_gauges();
                return true;
            }
        };
        self.streaming_logits = out.logits.map(|l| l.to_vec());
        for row in 0..self.row_ids.len() {
            let id = self.row_ids[row];
            let Some(&pick) = out.picks.get(row) else {
                self.fail(
                    id,
                    ErrorCode::Internal,
                    format!("executor returned no token for row {row}"),
                );
                continue;
            };
            self.take_pick(id, pick, row);
        }

        self.metrics
            .steps
            .with_label_values(&[out.path.name()])
            .inc();
        self.metrics.batch_size.set(self.plan.seqs.len() as i64);
        self.metrics.step_tokens.observe(self.meta.rows() as f64);
        self.metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        self.update_gauges();
        self.timing.record(started, scheduling, streaming, streamed);
        true
    }

    /// Adapters: collect finished loads, install what fits, start loads for what is missing.
    fn tend_adapters<E: Executor<Adapter = W>>(&mut self, exec: &mut E) {
        for err in self.cache.poll() {
            self.fail_adapter(&err);
        }
        self.scheduler.waiting_adapters(&mut self.needs);
        let mut install = |slot: u32, adapter: &W| exec.install_adapter(slot, adapter);
        for err in self.cache.ensure(&self.needs, &mut install) {
            self.fail_adapter(&err);
        }
        self.publish_residency();
    }

    /// While the launched step runs, and only while loads are in flight: a load that
    /// finishes now is installed at once (its copy is ordered after the step, its requests
    /// join the next one) rather than when the next step starts, up to a step later. The
    /// step is polled every [`STEP_POLL`], which is all this may add to it.
    fn install_while_running<E: Executor<Adapter = W>>(&mut self, exec: &mut E) {
        while self.cache.any_loading() && !exec.step_done() {
            if self.cache.wait_load(STEP_POLL) {
                self.tend_adapters(exec);
            }
        }
    }

    /// A step's pick for `id` (from its sampling row `row`): the scheduler gets the token at
    /// once, so the next step can extend the sequence, unless the token ends it (a stop token
    /// or the length limit), then it leaves the batch. Streaming it waits for
    /// [`Self::stream_picks`], while the next step runs; a stop text found then ends the
    /// sequence after that step, whose row for it is dropped.
    fn take_pick(&mut self, id: SeqId, pick: Pick, row: usize) {
        let Some(live) = self.live.get(&id) else {
            // Ended while its step ran (a stop text, a client gone): the row is dropped.
            return;
        };
        let ends = live.sampler.params().stop_token_ids.contains(&pick.token)
            || live.generated + 1 >= live.max_tokens;
        if ends {
            self.leave_batch(id);
        } else if let Err(e) = self.scheduler.append_token(id, pick.token) {
            self.fail(id, ErrorCode::Internal, e.to_string());
            return;
        }
        self.streaming.push((id, pick, row));
    }

    /// Stream the last step's picks (see [`Self::take_pick`]).
    fn stream_picks(&mut self) {
        let mut picks = std::mem::take(&mut self.streaming);
        let logits = self.streaming_logits.take();
        let vocab = self.vocab;
        for &(id, pick, row) in &picks {
            let l = logits
                .as_deref()
                .and_then(|l| l.get(row * vocab..(row + 1) * vocab));
            self.on_pick(id, pick, l);
        }
        // The buffer is kept for the next step's picks.
        picks.clear();
        self.streaming = picks;
    }

    /// Copy the cache's resident set to the handles when it changed since the last copy.
    fn publish_residency(&mut self) {
        let generation = self.cache.generation();
        if generation == self.published_generation {
            return;
        }
        if let Ok(mut set) = self.shared.resident.write() {
            set.clear();
            set.extend(self.cache.resident_keys());
            self.published_generation = generation;
        }
    }

    fn update_gauges(&self) {
        self.metrics
            .running
            .set(self.scheduler.num_running() as i64);
        self.metrics
            .waiting
            .set(self.scheduler.num_waiting() as i64);
        self.metrics
            .kv_blocks_used
            .set(self.scheduler.kv_blocks_used() as i64);
    }

    /// Stream the token picked for `id` (with its row's logits when it asked for logprobs).
    fn on_pick(&mut self, id: SeqId, pick: Pick, logits: Option<&[f32]>) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let sampled = live.sampler.finish(pick, logits);
        let token = sampled.token;
        let logprob = live.logprobs.then_some(sampled.logprob);
        live.generated += 1;
        self.metrics.generated_tokens.inc();
        let index = live.generated - 1;

        let mut finish = None;
        let text = if live.sampler.params().stop_token_ids.contains(&token) {
            finish = Some(FinishReason::Stop);
            match live.decoder.finish() {
                Ok(rest) => {
                    let (mut out, _) = live.text.push(&rest.unwrap_or_default());
                    out.push_str(&live.text.flush());
                    out
                }
                Err(e) => {
                    self.fail(id, ErrorCode::Internal, format!("detokenizer: {e}"));
                    return;
                }
            }
        } else {
            let piece = match live.decoder.push(token) {
                Ok(p) => p.unwrap_or_default(),
                Err(e) => {
                    self.fail(id, ErrorCode::Internal, format!("detokenizer: {e}"));
                    return;
                }
            };
            let (mut out, hit) = live.text.push(&piece);
            if hit {
                finish = Some(FinishReason::Stop);
            } else if live.generated >= live.max_tokens {
                finish = Some(FinishReason::Length);
                let rest = match live.decoder.finish() {
                    Ok(rest) => rest.unwrap_or_default(),
                    Err(e) => {
                        self.fail(id, ErrorCode::Internal, format!("detokenizer: {e}"));
                        return;
                    }
                };
                let (more, hit) = live.text.push(&rest);
                out.push_str(&more);
                if hit {
                    finish = Some(FinishReason::Stop);
                } else {
                    out.push_str(&live.text.flush());
                }
            }
            out
        };
        if finish.is_none() && live.events.capacity() < 2 {
            // Keep the last buffer slot for the error: a slow reader must not grow memory.
            self.fail(
                id,
                ErrorCode::Overloaded,
                "the client is not reading its stream fast enough".into(),
            );
            return;
        }
        let event = StreamEvent::Token {
            index,
            token_id: token,
            text,
            logprob,
            top_logprobs: sampled.top_logprobs,
        };
        match live.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => {
                self.end(
                    id,
                    StreamEvent::Done {
                        finish_reason: FinishReason::Cancelled,
                        usage: Usage::default(),
                    },
                );
                return;
            }
            Err(TrySendError::Full(_)) => {
                self.fail(
                    id,
                    ErrorCode::Overloaded,
                    "the client is not reading its stream fast enough".into(),
                );
                return;
            }
        }
        // The scheduler has the token already (see `take_pick`).
        if let Some(finish_reason) = finish {
            self.end(
                id,
                StreamEvent::Done {
                    finish_reason,
                    usage: Usage::default(),
                },
            );
        }
    }
}
