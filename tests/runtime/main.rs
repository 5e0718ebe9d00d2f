//! The engine runtime end to end: continuous batching, paging, preemption, cancellation, the
//! adapter cache and tenant fairness, over a fake executor whose tokens depend on the whole
//! paged context (see `fake.rs`).

mod fake;
mod llama;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use punica::engine::lora::cache::{
    AdapterFiles, AdapterKey, AdapterLoadError, AdapterSource, CacheConfig, MemorySource,
};
use punica::engine::metrics::EngineMetrics;
use punica::engine::request::{
    ErrorCode, FinishReason, SamplingParams, StreamEvent, Usage, ValidRequest,
};
use punica::engine::{EngineConfig, EngineError, EngineHandle, RequestStream};
use uuid::Uuid;

use fake::{FakeModel, Letters, Probe};

struct Harness {
    engine: EngineHandle,
    metrics: EngineMetrics,
    source: Arc<MemorySource>,
    probe: Arc<Probe>,
}

fn adapter(n: u128) -> AdapterKey {
    AdapterKey {
        id: Uuid::from_u128(n),
        version: 1,
    }
}

/// Seed of adapter n in the fake model.
fn seed_of(n: u128) -> u64 {
    1000 + n as u64
}

fn harness(config: EngineConfig, kv_blocks: usize, delay: Duration, adapters: u128) -> Harness {
    harness_with_upload(config, kv_blocks, delay, adapters, Duration::ZERO)
}

/// [`harness`] over an executor whose adapter installs take `upload` to reach the device.
fn harness_with_upload(
    config: EngineConfig,
    kv_blocks: usize,
    delay: Duration,
    adapters: u128,
    upload: Duration,
) -> Harness {
    harness_with_fake(config, kv_blocks, delay, adapters, move |m| {
        m.with_upload(upload)
    })
}

/// [`harness`] over the fake executor as `setup` adjusts it.
fn harness_with_fake(
    config: EngineConfig,
    kv_blocks: usize,
    delay: Duration,
    adapters: u128,
    setup: impl FnOnce(FakeModel) -> FakeModel + Send + 'static,
) -> Harness {
    harness_with_fetch(config, kv_blocks, delay, adapters, Duration::ZERO, setup)
}

/// An adapter source whose fetches take `delay` (a remote blob store).
struct SlowSource {
    inner: Arc<MemorySource>,
    delay: Duration,
}

impl AdapterSource for SlowSource {
    fn fetch(&self, key: &AdapterKey) -> Result<AdapterFiles, AdapterLoadError> {
        std::thread::sleep(self.delay);
        self.inner.fetch(key)
    }
}

/// [`harness_with_fake`] over a source whose fetches take `fetch`.
fn harness_with_fetch(
    config: EngineConfig,
    kv_blocks: usize,
    delay: Duration,
    adapters: u128,
    fetch: Duration,
    setup: impl FnOnce(FakeModel) -> FakeModel + Send + 'static,
) -> Harness {
    let source = Arc::new(MemorySource::new());
    for n in 1..=adapters {
        source.insert(adapter(n), fake::adapter_files(seed_of(n)));
    }
    let slow = Arc::new(SlowSource {
        inner: Arc::clone(&source),
        delay: fetch,
    });
    let probe = Arc::new(Probe::default());
    let metrics = EngineMetrics::unregistered().unwrap();
    let engine = EngineHandle::start(
        config,
        {
            let probe = Arc::clone(&probe);
            let slots = config.cache.device_slots;
            move || Ok(setup(FakeModel::new(kv_blocks, slots, delay, probe)))
        },
        slow as _,
        fake::validator(),
        Arc::new(Letters),
        metrics.clone(),
    )
    .unwrap();
    Harness {
        engine,
        metrics,
        source,
        probe,
    }
}

fn config(max_running: usize, max_step_tokens: usize, slots: usize) -> EngineConfig {
    EngineConfig {
        max_running,
        max_step_tokens,
        max_queued: 1000,
        stream_capacity: 256,
        cache: CacheConfig {
            device_slots: slots,
            host_bytes: 1 << 20,
            loader_threads: 2,
        },
    }
}

fn request(
    tenant: u128,
    adapter_n: Option<u128>,
    prompt: Vec<u32>,
    max_tokens: u32,
) -> ValidRequest {
    ValidRequest {
        tenant: Uuid::from_u128(tenant),
        request_id: Uuid::new_v4(),
        adapter: adapter_n.map(adapter),
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: max_tokens as usize,
            ..SamplingParams::default()
        },
    }
}

/// Everything a stream produced.
#[derive(Debug)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    end: StreamEvent,
}

fn drain(stream: &mut RequestStream) -> Outcome {
    drain_after(stream, 0)
}

/// Like [`drain`] for a stream whose first `already` tokens were read by the caller.
fn drain_after(stream: &mut RequestStream, already: usize) -> Outcome {
    let mut tokens = Vec::new();
    let mut text = String::new();
    loop {
        match stream.blocking_next() {
            Some(StreamEvent::Token {
                index,
                token_id,
                text: t,
                ..
            }) => {
                assert_eq!(
                    index as usize,
                    already + tokens.len(),
                    "token indices are consecutive"
                );
                tokens.push(token_id);
                text.push_str(&t);
            }
            Some(end) => {
                assert!(stream.blocking_next().is_none(), "nothing after the end");
                return Outcome { tokens, text, end };
            }
            None => panic!("stream ended without Done or Error"),
        }
    }
}

fn prompt_for(i: u32) -> Vec<u32> {
    let len = 1 + (i * 7) % 37;
    (0..len).map(|j| (i * 13 + j * 5) % 64).collect()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn hundred_concurrent_requests_over_twenty_adapters_match_their_solo_runs_with_four_slots() {
    let h = harness(config(32, 128, 4), 256, Duration::ZERO, 20);
    let mut streams = Vec::new();
    let mut expected = Vec::new();
    for i in 0..100u32 {
        // Every seventh request uses the base model; the rest spread over all 20 adapters.
        let adapter_n = (!i.is_multiple_of(7)).then_some(u128::from(i % 20) + 1);
        let prompt = prompt_for(i);
        let max_tokens = 4 + (i * 3) % 29;
        let seed = adapter_n.map_or(0, seed_of);
        expected.push(fake::reference(seed, &prompt, max_tokens as usize));
        let tenant = u128::from(i % 3);
        streams.push(
            h.engine
                .submit(request(tenant, adapter_n, prompt, max_tokens))
                .unwrap(),
        );
    }
    for (i, (stream, want)) in streams.iter_mut().zip(&expected).enumerate() {
        let out = drain(stream);
        assert_eq!(&out.tokens, want, "request {i} differs from its solo run");
        assert_eq!(out.text, fake::letters(want));
        assert_eq!(
            out.end,
            StreamEvent::Done {
                finish_reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: prompt_for(i as u32).len() as u32,
                    completion_tokens: want.len() as u32,
                }
            }
        );
    }
    assert!(
        h.probe.steps.load(Ordering::SeqCst) < 100 * 32,
        "requests were batched together"
    );
    assert!(h.probe.max_rows.load(Ordering::SeqCst) > 1);
    let evictions = h
        .metrics
        .adapter_evictions
        .with_label_values(&["device"])
        .get();
    assert!(
        evictions >= 16,
        "20 adapters through 4 slots evict at least 16 times"
    );
    assert!(h.metrics.adapter_loads.get() >= 20);
    assert_eq!(h.metrics.adapter_slots_used.get(), 4);
    wait_until("blocks freed", || h.metrics.kv_blocks_used.get() == 0);
}

#[test]
fn a_request_cancelled_mid_stream_frees_its_blocks_and_others_continue() {
    let h = harness(config(8, 64, 2), 64, Duration::from_millis(2), 0);
    let mut long = h.engine.submit(request(1, None, vec![1; 40], 200)).unwrap();
    let mut other = h.engine.submit(request(2, None, vec![2; 5], 30)).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            long.blocking_next(),
            Some(StreamEvent::Token { .. })
        ));
    }
    assert!(h.metrics.kv_blocks_used.get() >= 3);
    long.cancel();
    let out = drain_after(&mut long, 3);
    match out.end {
        StreamEvent::Done {
            finish_reason: FinishReason::Cancelled,
            usage,
        } => {
            assert_eq!(usage.prompt_tokens, 40);
            assert!(usage.completion_tokens >= 3);
        }
        other => panic!("expected a cancelled Done, got {other:?}"),
    }
    let out = drain(&mut other);
    assert_eq!(out.tokens, fake::reference(0, &[2; 5], 30));
    wait_until("all blocks freed", || h.metrics.kv_blocks_used.get() == 0);
}

#[test]
fn dropping_a_stream_stops_its_sequence_within_a_step() {
    let h = harness(config(8, 64, 2), 64, Duration::from_millis(2), 0);
    let mut s = h.engine.submit(request(1, None, vec![3; 20], 200)).unwrap();
    assert!(matches!(s.blocking_next(), Some(StreamEvent::Token { .. })));
    drop(s);
    wait_until("blocks freed after drop", || {
        h.metrics.kv_blocks_used.get() == 0 && h.metrics.running.get() == 0
    });
    let steps_after = h.probe.steps.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        h.probe.steps.load(Ordering::SeqCst),
        steps_after,
        "the dropped sequence is no longer stepped"
    );
    assert_eq!(
        h.metrics.finished.with_label_values(&["cancelled"]).get(),
        1
    );
}

#[test]
fn a_kv_pool_too_small_for_all_running_sequences_forces_preemption_and_streams_stay_exact() {
    // 6 blocks = 96 tokens, 8 sequences that each grow to 20-50 tokens.
    let h = harness(config(8, 64, 4), 6, Duration::ZERO, 3);
    let mut streams = Vec::new();
    let mut expected = Vec::new();
    for i in 0..8u32 {
        let adapter_n = (i % 4 != 0).then_some(u128::from(i % 3) + 1);
        let prompt: Vec<u32> = (0..10 + i).map(|j| (i + j) % 64).collect();
        let max_tokens = 10 + 4 * i;
        expected.push(fake::reference(
            adapter_n.map_or(0, seed_of),
            &prompt,
            max_tokens as usize,
        ));
        streams.push(
            h.engine
                .submit(request(1, adapter_n, prompt, max_tokens))
                .unwrap(),
        );
    }
    for (i, (s, want)) in streams.iter_mut().zip(&expected).enumerate() {
        let out = drain(s);
        assert_eq!(&out.tokens, want, "request {i} lost or repeated tokens");
    }
    assert!(
        h.metrics.preemptions.get() > 0,
        "the pool was too small: someone was preempted"
    );
    wait_until("blocks freed", || h.metrics.kv_blocks_used.get() == 0);
}

#[test]
fn a_tenant_sending_fifty_requests_does_not_delay_another_tenants_single_request() {
    let h = harness(config(8, 64, 2), 512, Duration::from_millis(1), 0);
    let mut flood: Vec<RequestStream> = (0..50)
        .map(|i| {
            h.engine
                .submit(request(0xa, None, vec![i % 60; 8], 60))
                .unwrap()
        })
        .collect();
    // Let tenant a fill the running set.
    assert!(matches!(
        flood[0].blocking_next(),
        Some(StreamEvent::Token { .. })
    ));
    let marker = 63u32;
    let submitted_at = h.probe.steps.load(Ordering::SeqCst);
    let mut single = h
        .engine
        .submit(request(0xb, None, vec![marker; 8], 5))
        .unwrap();
    assert!(matches!(
        single.blocking_next(),
        Some(StreamEvent::Token { .. })
    ));
    let batches = h.probe.batches.lock().unwrap().clone();
    let first_seen = batches
        .iter()
        .find(|(_, toks)| toks.iter().filter(|&&t| t == marker).count() >= 8)
        .map(|(step, _)| *step)
        .expect("tenant b's prompt was prefilled");
    assert!(
        first_seen <= submitted_at + 3,
        "tenant b waited {} steps behind tenant a's 50 requests",
        first_seen - submitted_at
    );
    for s in flood.iter_mut().chain([&mut single]) {
        while s.blocking_next().is_some() {}
    }
}

#[test]
fn a_corrupt_adapter_fails_its_requests_with_a_clear_error_while_the_rest_proceed() {
    let h = harness(config(16, 64, 2), 128, Duration::ZERO, 2);
    let corrupt = adapter(66);
    h.source.insert(
        corrupt,
        AdapterFiles {
            config: b"{not json".to_vec().into(),
            weights: Vec::new().into(),
        },
    );
    let mut good: Vec<RequestStream> = (0..4)
        .map(|i| {
            h.engine
                .submit(request(1, Some(1 + i % 2), vec![5, 6, 7], 12))
                .unwrap()
        })
        .collect();
    let mut bad: Vec<RequestStream> = (0..3)
        .map(|_| {
            h.engine
                .submit(request(2, Some(66), vec![5, 6, 7], 12))
                .unwrap()
        })
        .collect();
    let mut missing = h.engine.submit(request(2, Some(77), vec![1], 3)).unwrap();
    for s in &mut bad {
        match drain(s).end {
            StreamEvent::Error { code, message } => {
                assert_eq!(code, ErrorCode::InvalidAdapter);
                assert!(message.contains("not a fake config"), "{message}");
                assert!(message.contains(&corrupt.to_string()), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    match drain(&mut missing).end {
        StreamEvent::Error { code, .. } => assert_eq!(code, ErrorCode::AdapterNotFound),
        other => panic!("expected adapter_not_found, got {other:?}"),
    }
    for (i, s) in good.iter_mut().enumerate() {
        let n = 1 + (i as u128) % 2;
        assert_eq!(drain(s).tokens, fake::reference(seed_of(n), &[5, 6, 7], 12));
    }
    // One failed load per adapter, or one more for each request that reached the engine
    // after its adapter's load had already failed (a new request tries again).
    let failures = h.metrics.adapter_load_failures.get();
    assert!((2..=4).contains(&failures), "{failures} failed loads");
}

#[test]
fn stop_ids_and_stop_strings_end_the_stream_with_the_text_cut_before_the_stop() {
    let h = harness(config(8, 64, 2), 64, Duration::ZERO, 0);
    let prompt = vec![9, 9, 9];
    let full = fake::reference(0, &prompt, 30);
    let text = fake::letters(&full);

    // A stop string taken from the middle of the known output.
    let stop = text[10..13].to_string();
    let cut = text.find(&stop).unwrap();
    let mut r = request(1, None, prompt.clone(), 30);
    r.sampling.stop = vec![stop.clone()];
    let out = drain(&mut h.engine.submit(r).unwrap());
    assert_eq!(out.text, text[..cut]);
    // Up to the token that completes the stop text (one letter a token), counted as such: the
    // row the next step had already computed for the sequence is dropped, not streamed.
    let streamed = cut + stop.len();
    assert_eq!(out.tokens, full[..streamed]);
    assert!(matches!(
        out.end,
        StreamEvent::Done {
            finish_reason: FinishReason::Stop,
            usage,
        } if usage.completion_tokens as usize == streamed
    ));

    // A stop id: the stream ends at its first occurrence.
    let stop_id = full[7];
    let first = full.iter().position(|&t| t == stop_id).unwrap();
    let mut r = request(1, None, prompt, 30);
    r.sampling.stop_token_ids = vec![stop_id];
    let out = drain(&mut h.engine.submit(r).unwrap());
    assert_eq!(out.tokens, full[..=first]);
    assert_eq!(out.text, fake::letters(&full[..first]));
    assert!(matches!(
        out.end,
        StreamEvent::Done {
            finish_reason: FinishReason::Stop,
            usage,
        } if usage.completion_tokens as usize == first + 1
    ));
}

#[test]
fn submissions_that_can_never_run_are_refused_at_once() {
    let h = harness(config(8, 64, 2), 4, Duration::ZERO, 0);
    assert!(matches!(
        h.engine.submit(request(1, None, vec![1; 60], 10)),
        Err(EngineError::TooLong {
            tokens: 70,
            capacity: 64
        })
    ));
    assert!(matches!(
        h.engine.submit(request(1, None, vec![], 10)),
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(matches!(
        h.engine.submit(request(1, None, vec![1000], 10)),
        Err(EngineError::InvalidRequest(_))
    ));
}

#[test]
fn shutting_the_engine_down_ends_every_live_stream_with_an_error() {
    let h = harness(config(8, 64, 2), 64, Duration::from_millis(5), 0);
    let mut s = h.engine.submit(request(1, None, vec![1; 4], 500)).unwrap();
    h.engine.shutdown();
    let out = drain(&mut s);
    assert!(matches!(
        out.end,
        StreamEvent::Error {
            code: ErrorCode::Internal,
            ..
        }
    ));
    wait_until("submit refused", || {
        matches!(
            h.engine.submit(request(1, None, vec![1], 1)),
            Err(EngineError::Stopped)
        )
    });
}

/// Drain `stream` on a thread of its own, failing after `limit` instead of hanging.
fn drain_within(mut stream: RequestStream, limit: Duration) -> (Outcome, Vec<Instant>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut tokens = Vec::new();
        let end = loop {
            match stream.blocking_next() {
                Some(StreamEvent::Token { token_id, .. }) => {
                    times.push(Instant::now());
                    tokens.push(token_id);
                }
                Some(end) => break end,
                None => panic!("stream ended without Done or Error"),
            }
        };
        let _ = tx.send((
            Outcome {
                tokens,
                text: String::new(),
                end,
            },
            times,
        ));
    });
    rx.recv_timeout(limit)
        .expect("the stream did not finish in time")
}

/// The step in which a prompt of `prompt` (a run of tokens no other request has) was first
/// fed, and that step's rows.
fn first_step_with(probe: &Probe, prompt: &[u32]) -> (usize, usize) {
    let batches = probe.batches.lock().unwrap();
    batches
        .iter()
        .find(|(_, toks)| toks.windows(prompt.len()).any(|w| w == prompt))
        .map(|(step, toks)| (*step, toks.len()))
        .expect("the prompt was fed")
}

#[test]
fn a_request_joins_the_step_its_adapters_copy_starts_beside_while_the_others_keep_decoding() {
    let upload = Duration::from_millis(60);
    let h = harness_with_upload(config(8, 64, 2), 256, Duration::from_millis(2), 1, upload);
    let base_prompt = vec![3, 4, 5];
    let mut base = h
        .engine
        .submit(request(1, None, base_prompt.clone(), 120))
        .unwrap();
    let mut first = Vec::new();
    for _ in 0..3 {
        match base.blocking_next() {
            Some(StreamEvent::Token { token_id, .. }) => first.push(token_id),
            other => panic!("{other:?}"),
        }
    }
    let submitted = Instant::now();
    let cold_prompt = vec![60, 61, 62, 63, 60];
    let cold = h
        .engine
        .submit(request(2, Some(1), cold_prompt.clone(), 5))
        .unwrap();
    let cold = std::thread::spawn(move || drain_within(cold, Duration::from_secs(20)));
    let (rest, _) = drain_within(base, Duration::from_secs(20));
    let (cold, cold_times) = cold.join().unwrap();
    assert_eq!(cold.tokens, fake::reference(seed_of(1), &cold_prompt, 5));
    assert!(
        matches!(cold.end, StreamEvent::Done { .. }),
        "{:?}",
        cold.end
    );
    first.extend(&rest.tokens);
    assert_eq!(first, fake::reference(0, &base_prompt, 120));
    assert_eq!(h.probe.early_uses.load(Ordering::SeqCst), 0);
    // Installed at a step's start, the request ran in that very step, beside the base row.
    let installs = h.probe.installs.lock().unwrap().clone();
    assert_eq!(installs.len(), 1);
    let (step, rows) = first_step_with(&h.probe, &cold_prompt);
    assert_eq!(step, installs[0].1, "the request waited for a later step");
    assert_eq!(
        rows,
        cold_prompt.len() + 1,
        "the base request decoded in it"
    );
    // That step waited for the copy; the steps after it found it done.
    assert_eq!(h.probe.copy_waits.load(Ordering::SeqCst), 1);
    assert!(cold_times[0] - submitted >= upload);
}

#[test]
fn a_load_that_finishes_while_a_step_runs_is_installed_then_and_its_request_runs_next() {
    // Steps of 120 ms; the fetch takes 200 ms, so it ends while a step runs, after the engine
    // took the request in. The install happens then, not at the next step's start.
    let step = Duration::from_millis(120);
    let h = harness_with_fetch(
        config(8, 64, 2),
        256,
        step,
        1,
        Duration::from_millis(200),
        |m| m,
    );
    let mut base = h.engine.submit(request(1, None, vec![3, 4], 12)).unwrap();
    assert!(matches!(
        base.blocking_next(),
        Some(StreamEvent::Token { .. })
    ));
    let prompt = vec![50, 51, 52];
    let cold = h
        .engine
        .submit(request(2, Some(1), prompt.clone(), 3))
        .unwrap();
    let (out, _) = drain_within(cold, Duration::from_secs(20));
    assert_eq!(out.tokens, fake::reference(seed_of(1), &prompt, 3));
    drain_after(&mut base, 1);
    assert_eq!(h.probe.installs_in_flight.load(Ordering::SeqCst), 1);
    let installs = h.probe.installs.lock().unwrap().clone();
    assert_eq!(installs.len(), 1);
    assert_eq!(
        first_step_with(&h.probe, &prompt).0,
        installs[0].1,
        "the request ran in the step after the one its install came in"
    );
    assert_eq!(h.probe.early_uses.load(Ordering::SeqCst), 0);
}

#[test]
fn an_idle_engine_runs_a_request_in_the_step_that_starts_its_adapters_copy() {
    let upload = Duration::from_millis(40);
    let h = harness_with_upload(config(8, 64, 2), 256, Duration::ZERO, 1, upload);
    let submitted = Instant::now();
    let stream = h
        .engine
        .submit(request(1, Some(1), vec![9, 9, 9], 4))
        .unwrap();
    let (out, times) = drain_within(stream, Duration::from_secs(10));
    assert_eq!(out.tokens, fake::reference(seed_of(1), &[9, 9, 9], 4));
    assert!(
        times[0] - submitted >= upload,
        "its first use waited for the copy"
    );
    let installs = h.probe.installs.lock().unwrap().clone();
    assert_eq!(installs, vec![(0, 0)], "installed before the first step");
    assert_eq!(first_step_with(&h.probe, &[9, 9, 9]).0, 0);
    assert_eq!(h.probe.copy_waits.load(Ordering::SeqCst), 1);
    assert_eq!(h.probe.early_uses.load(Ordering::SeqCst), 0);
}

#[test]
fn a_copy_that_completes_while_its_request_is_turned_away_does_not_stall_the_engine() {
    // An executor that cannot wait for a copy: the first readiness query after the install
    // says "not yet", every later one "done". The engine must come back for the request rather
    // than sleep on its command queue.
    let h = harness_with_fake(config(8, 64, 2), 256, Duration::ZERO, 1, |m| {
        m.with_upload_polls(1)
    });
    let stream = h.engine.submit(request(1, Some(1), vec![4, 2], 3)).unwrap();
    let (out, _) = drain_within(stream, Duration::from_secs(10));
    assert_eq!(out.tokens, fake::reference(seed_of(1), &[4, 2], 3));
    assert_eq!(h.probe.early_uses.load(Ordering::SeqCst), 0);
}

#[test]
fn a_submission_starts_its_adapters_load_without_waiting_for_the_engines_next_step() {
    let step = Duration::from_millis(300);
    let h = harness(config(8, 64, 2), 256, step, 1);
    let mut base = h.engine.submit(request(1, None, vec![3, 4], 3)).unwrap();
    assert!(matches!(
        base.blocking_next(),
        Some(StreamEvent::Token { .. })
    ));
    // The token went out at the start of the next step, which now sleeps in the executor.
    std::thread::sleep(Duration::from_millis(30));
    let steps = h.probe.steps.load(Ordering::SeqCst);
    let cold = h.engine.submit(request(2, Some(1), vec![7, 8], 2)).unwrap();
    wait_until("the adapter fetched", || h.source.fetches() == 1);
    assert_eq!(
        h.probe.steps.load(Ordering::SeqCst),
        steps,
        "the fetch began within the step that was running when the request came"
    );
    let (out, _) = drain_within(cold, Duration::from_secs(20));
    assert_eq!(out.tokens, fake::reference(seed_of(1), &[7, 8], 2));
    drain_after(&mut base, 1);
    assert_eq!(h.metrics.adapter_loads.get(), 1);
}

#[test]
fn many_submissions_for_one_cold_adapter_fetch_it_once() {
    let h = harness(config(16, 64, 2), 256, Duration::from_millis(1), 1);
    let streams: Vec<RequestStream> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let engine = &h.engine;
                scope.spawn(move || {
                    (0..8)
                        .map(|i| {
                            engine
                                .submit(request(t, Some(1), vec![t as u32, i], 3))
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    for mut s in streams {
        assert!(matches!(drain(&mut s).end, StreamEvent::Done { .. }));
    }
    assert_eq!(h.source.fetches(), 1);
    assert_eq!(h.metrics.adapter_loads.get(), 1);
}

#[test]
fn a_cold_adapter_gets_a_slot_even_while_a_hot_adapter_keeps_every_slot_busy() {
    let h = harness(config(4, 64, 1), 256, Duration::from_millis(1), 2);
    let mut hot: Vec<RequestStream> = (0..30)
        .map(|i| {
            h.engine
                .submit(request(1, Some(1), vec![i, i + 1], 12 + i % 7))
                .unwrap()
        })
        .collect();
    assert!(matches!(
        hot[0].blocking_next(),
        Some(StreamEvent::Token { .. })
    ));
    let mut cold = h.engine.submit(request(1, Some(2), vec![7, 8], 5)).unwrap();
    let out = drain(&mut cold);
    assert_eq!(out.tokens, fake::reference(seed_of(2), &[7, 8], 5));
    assert!(
        h.metrics.waiting.get() > 10,
        "the cold adapter ran long before the hot adapter's backlog was done: waiting {} running {} steps {}",
        h.metrics.waiting.get(),
        h.metrics.running.get(),
        h.probe.steps.load(Ordering::SeqCst)
    );
    for s in &mut hot {
        while s.blocking_next().is_some() {}
    }
}

#[test]
fn the_bench_driver_counts_every_token_of_every_workload() {
    use punica::engine::bench::{PromptLengths, Traffic, Workload, drive};
    let h = harness(config(8, 64, 4), 256, Duration::ZERO, 4);
    let keys: Vec<AdapterKey> = (1..=4).map(adapter).collect();
    for workload in [
        Workload::Distinct,
        Workload::Uniform,
        Workload::Skewed,
        Workload::Identical,
        Workload::None,
    ] {
        let traffic = Traffic::generate(
            workload,
            12,
            4,
            PromptLengths::fixed(6),
            5,
            fake::VOCAB,
            500.0,
            7,
        );
        let s = drive(&h.engine, &traffic, &keys).unwrap();
        assert_eq!(s.failed, 0, "{workload:?}");
        assert_eq!(s.output_tokens, 60, "{workload:?}");
        assert!(s.tokens_per_s > 0.0);
        let expect_adapters = match workload {
            Workload::Distinct => 4,
            Workload::Identical => 1,
            Workload::None => 0,
            _ => s.distinct_adapters,
        };
        assert_eq!(s.distinct_adapters, expect_adapters, "{workload:?}");
    }
}
