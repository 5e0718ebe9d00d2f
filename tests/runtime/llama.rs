//! The engine over the real forward pass: the CPU backend and the tiny random Llama of the golden
//! fixtures, with synthetic PEFT adapters that go through the real validation path.

use std::path::PathBuf;
use std::sync::Arc;

use punica::engine::executor::{BackendCell, cpu_executor, peft_validator};
use punica::engine::lora::cache::{AdapterFiles, AdapterKey, CacheConfig, MemorySource};
use punica::engine::metrics::EngineMetrics;
use punica::engine::model::config::LlamaConfig;
use punica::engine::model::llama::Llama;
use punica::engine::request::{
    Detokenizer, ErrorCode, FinishReason, SamplingParams, StreamEvent, TextDecoder, ValidRequest,
};
use punica::engine::synthetic::random_adapter;
use punica::engine::{EngineConfig, EngineError, EngineHandle, RequestStream};
use uuid::Uuid;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/untied")
}

fn base_config() -> LlamaConfig {
    LlamaConfig::from_file(&model_dir().join("config.json")).unwrap()
}

/// Token ids as `<id>` text: the fixture model has no tokenizer.
struct IdText;

struct IdDecoder;

impl TextDecoder for IdDecoder {
    fn push(&mut self, token: u32) -> Result<Option<String>, String> {
        Ok(Some(format!("<{token}>")))
    }
}

impl Detokenizer for IdText {
    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(IdDecoder)
    }
}

fn key(n: u128) -> AdapterKey {
    AdapterKey {
        id: Uuid::from_u128(n),
        version: 1,
    }
}

struct Setup {
    engine: EngineHandle,
    metrics: EngineMetrics,
}

fn engine(source: &Arc<MemorySource>, max_running: usize, kv_blocks: usize, slots: usize) -> Setup {
    let metrics = EngineMetrics::unregistered().unwrap();
    let config = EngineConfig {
        max_running,
        max_step_tokens: 96,
        max_queued: 1000,
        stream_capacity: 256,
        cache: CacheConfig {
            device_slots: slots,
            host_bytes: 64 << 20,
            loader_threads: 2,
        },
    };
    let cell = BackendCell::default();
    let validator = peft_validator(base_config(), Arc::clone(&cell));
    let engine = EngineHandle::start(
        config,
        move || {
            cpu_executor(&cell, |b| Llama::load(b, &model_dir()), slots, kv_blocks)
                .map_err(EngineError::Startup)
        },
        Arc::clone(source) as _,
        validator,
        Arc::new(IdText),
        metrics.clone(),
    )
    .unwrap();
    Setup { engine, metrics }
}

/// 20 adapters of ranks 2..=8 on every projection, large enough to change greedy tokens.
fn adapters() -> Arc<MemorySource> {
    let config = base_config();
    let source = Arc::new(MemorySource::new());
    for n in 1..=20u128 {
        let rank = 2 + (n as usize % 7);
        source.insert(
            key(n),
            random_adapter(&config, rank, 0.5, n as u64).unwrap(),
        );
    }
    source
}

fn request(i: u32) -> ValidRequest {
    let adapter = (!i.is_multiple_of(7)).then(|| key(u128::from(i % 20) + 1));
    let len = 1 + (i * 5) % 23;
    ValidRequest {
        tenant: Uuid::from_u128(u128::from(i % 3)),
        request_id: Uuid::new_v4(),
        adapter,
        prompt: (0..len).map(|j| (i * 31 + j * 7) % 128).collect(),
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: 3 + (i as usize * 3) % 14,
            ..SamplingParams::default()
        },
    }
}

fn tokens_of(stream: &mut RequestStream) -> Result<Vec<u32>, StreamEvent> {
    let mut out = Vec::new();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            StreamEvent::Token { token_id, .. } => out.push(token_id),
            StreamEvent::Done {
                finish_reason: FinishReason::Length,
                ..
            } => return Ok(out),
            other => return Err(other),
        }
    }
    Err(StreamEvent::Error {
        code: ErrorCode::Internal,
        message: "stream ended without Done".into(),
    })
}

#[test]
fn llama_hundred_concurrent_requests_over_twenty_adapters_match_their_solo_runs() {
    let source = adapters();
    let solo = engine(&source, 1, 64, 4);
    let expected: Vec<Vec<u32>> = (0..100)
        .map(|i| tokens_of(&mut solo.engine.submit(request(i)).unwrap()).unwrap())
        .collect();
    // The adapters change the model: the same prompt gives other tokens under most adapters.
    let base_vs_adapter = (0..100u32)
        .filter(|i| !i.is_multiple_of(7))
        .filter(|&i| {
            let mut r = request(i);
            r.adapter = None;
            tokens_of(&mut solo.engine.submit(r).unwrap()).unwrap() != expected[i as usize]
        })
        .count();
    assert!(
        base_vs_adapter > 40,
        "only {base_vs_adapter} adapter runs differ from the base"
    );

    let batched = engine(&source, 32, 256, 4);
    let mut streams: Vec<RequestStream> = (0..100)
        .map(|i| batched.engine.submit(request(i)).unwrap())
        .collect();
    for (i, s) in streams.iter_mut().enumerate() {
        assert_eq!(
            tokens_of(s).unwrap(),
            expected[i],
            "request {i} differs from its solo run"
        );
    }
    let evictions = batched
        .metrics
        .adapter_evictions
        .with_label_values(&["device"])
        .get();
    assert!(
        evictions >= 16,
        "20 adapters through 4 slots: {evictions} evictions"
    );
}

#[test]
fn llama_preemption_under_a_small_kv_pool_keeps_every_stream_exact() {
    let source = adapters();
    let solo = engine(&source, 1, 64, 4);
    let expected: Vec<Vec<u32>> = (0..12)
        .map(|i| tokens_of(&mut solo.engine.submit(request(i)).unwrap()).unwrap())
        .collect();
    // 5 blocks = 80 tokens for 12 sequences of up to 40 tokens.
    let tight = engine(&source, 12, 5, 4);
    let mut streams: Vec<RequestStream> = (0..12)
        .map(|i| tight.engine.submit(request(i)).unwrap())
        .collect();
    for (i, s) in streams.iter_mut().enumerate() {
        assert_eq!(tokens_of(s).unwrap(), expected[i], "request {i}");
    }
    assert!(tight.metrics.preemptions.get() > 0);
}

#[test]
fn llama_a_corrupt_adapter_blob_fails_only_its_requests_with_the_validation_reason() {
    let source = adapters();
    let config = base_config();
    let mut broken = random_adapter(&config, 4, 0.5, 99).unwrap();
    let cut = broken.weights.len() / 2;
    broken.weights.truncate(cut);
    source.insert(key(50), broken);
    source.insert(
        key(51),
        AdapterFiles {
            config: br#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#
                .to_vec()
                .into(),
            weights: random_adapter(&config, 4, 0.5, 98).unwrap().weights,
        },
    );
    let e = engine(&source, 8, 128, 2);
    let mut good: Vec<RequestStream> = (1..6)
        .map(|i| e.engine.submit(request(i)).unwrap())
        .collect();
    for bad_key in [key(50), key(51)] {
        let mut r = request(1);
        r.adapter = Some(bad_key);
        match tokens_of(&mut e.engine.submit(r).unwrap()) {
            Err(StreamEvent::Error { code, message }) => {
                assert_eq!(code, ErrorCode::InvalidAdapter);
                assert!(message.contains(&bad_key.to_string()), "{message}");
            }
            other => panic!("expected invalid_adapter, got {other:?}"),
        }
    }
    for s in &mut good {
        assert!(tokens_of(s).is_ok());
    }
}

#[test]
fn llama_handles_report_which_adapter_versions_are_resident_on_the_device() {
    let source = adapters();
    let setup = engine(&source, 8, 64, 2);
    assert!(
        !setup.engine.is_resident(&key(1)),
        "nothing is loaded before a request"
    );
    for n in [1u128, 2, 3] {
        let mut stream = setup
            .engine
            .submit(ValidRequest {
                adapter: Some(key(n)),
                ..request(1)
            })
            .unwrap();
        tokens_of(&mut stream).unwrap();
        assert!(
            setup.engine.is_resident(&key(n)),
            "adapter {n} serves its request from a slot"
        );
    }
    // Two slots: the least recently used of the three was evicted.
    assert!(!setup.engine.is_resident(&key(1)));
    assert!(setup.engine.is_resident(&key(2)));
    assert!(!setup.engine.is_resident(&AdapterKey {
        id: Uuid::from_u128(3),
        version: 2
    }));
}
