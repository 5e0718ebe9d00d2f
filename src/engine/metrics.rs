//! The engine's Prometheus metrics: scheduler occupancy, batch shape, KV use, adapter cache
//! activity and step time. Registered into a registry handed in by the service (which serves
//! `/metrics`); tests and benches use unregistered metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// All engine metrics. Cloning is cheap (the metric handles are shared).
#[derive(Clone)]
pub struct EngineMetrics {
    /// Sequences holding a seat in the running set.
    pub running: IntGauge,
    /// Sequences waiting for a seat (new, preempted, or waiting for their adapter).
    pub waiting: IntGauge,
    /// Sequences in the last step's batch.
    pub batch_size: IntGauge,
    /// Tokens (rows) per step.
    pub step_tokens: Histogram,
    /// Seconds per step (schedule, forward, sampling, events).
    pub step_seconds: Histogram,
    /// Steps by how the device ran them (`issued`, `recorded`, `replayed`: CUDA graphs).
    pub steps: IntCounterVec,
    /// KV blocks owned by sequences.
    pub kv_blocks_used: IntGauge,
    /// KV blocks in the pool.
    pub kv_blocks_total: IntGauge,
    /// Preemptions (KV exhaustion or fair-share).
    pub preemptions: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Requests ended, by finish reason (`length`, `stop`, `cancelled`, `error`).
    pub finished: IntCounterVec,
    /// Requests whose adapter was on the device when they arrived.
    pub adapter_hits: IntCounter,
    /// Requests whose adapter was not on the device when they arrived.
    pub adapter_misses: IntCounter,
    /// Adapter fetches from the source (blob store).
    pub adapter_loads: IntCounter,
    /// Adapter fetches that failed (missing or invalid blob).
    pub adapter_load_failures: IntCounter,
    /// Adapters evicted, by tier (`device`, `host`).
    pub adapter_evictions: IntCounterVec,
    /// Seconds to fetch and validate an adapter.
    pub adapter_load_seconds: Histogram,
    /// Adapters resident in device slots.
    pub adapter_slots_used: IntGauge,
    /// Bytes of validated adapters in the host tier.
    pub adapter_host_bytes: IntGauge,
}

impl EngineMetrics {
    /// Metrics that are not exported (tests, benches).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Self::build()
    }

    /// Create the metrics and register them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        registry.register(Box::new(m.running.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        registry.register(Box::new(m.step_tokens.clone()))?;
        registry.register(Box::new(m.step_seconds.clone()))?;
        registry.register(Box::new(m.steps.clone()))?;
        registry.register(Box::new(m.kv_blocks_used.clone()))?;
        registry.register(Box::new(m.kv_blocks_total.clone()))?;
        registry.register(Box::new(m.preemptions.clone()))?;
        registry.register(Box::new(m.generated_tokens.clone()))?;
        registry.register(Box::new(m.finished.clone()))?;
        registry.register(Box::new(m.adapter_hits.clone()))?;
        registry.register(Box::new(m.adapter_misses.clone()))?;
        registry.register(Box::new(m.adapter_loads.clone()))?;
        registry.register(Box::new(m.adapter_load_failures.clone()))?;
        registry.register(Box::new(m.adapter_evictions.clone()))?;
        registry.register(Box::new(m.adapter_load_seconds.clone()))?;
        registry.register(Box::new(m.adapter_slots_used.clone()))?;
        registry.register(Box::new(m.adapter_host_bytes.clone()))?;
        Ok(m)
    }

    fn build() -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        Ok(Self {
            running: gauge("engine_running_sequences", "Sequences in the running set")?,
            waiting: gauge("engine_waiting_sequences", "Sequences waiting for a seat")?,
            batch_size: gauge("engine_batch_size", "Sequences in the last step")?,
            step_tokens: Histogram::with_opts(
                HistogramOpts::new("engine_step_tokens", "Tokens (rows) per step").buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                ]),
            )?,
            step_seconds: Histogram::with_opts(
                HistogramOpts::new("engine_step_seconds", "Seconds per engine step")
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            steps: IntCounterVec::new(
                Opts::new(
                    "engine_steps_total",
                    "Forward steps, by how the device ran them (issued op by op, or recorded \
                     into / replayed from a CUDA graph)",
                ),
                &["path"],
            )?,
            kv_blocks_used: gauge("engine_kv_blocks_used", "KV blocks in use")?,
            kv_blocks_total: gauge("engine_kv_blocks_total", "KV blocks in the pool")?,
            preemptions: counter("engine_preemptions_total", "Sequences preempted")?,
            generated_tokens: counter("engine_generated_tokens_total", "Tokens generated")?,
            finished: IntCounterVec::new(
                Opts::new("engine_requests_finished_total", "Requests ended"),
                &["reason"],
            )?,
            adapter_hits: counter(
                "adapter_cache_hits_total",
                "Requests whose adapter was resident on the device",
            )?,
            adapter_misses: counter(
                "adapter_cache_misses_total",
                "Requests whose adapter was not resident on the device",
            )?,
            adapter_loads: counter(
                "adapter_cache_loads_total",
                "Adapter fetches from the blob store",
            )?,
            adapter_load_failures: counter(
                "adapter_cache_load_failures_total",
                "Adapter fetches that failed",
            )?,
            adapter_evictions: IntCounterVec::new(
                Opts::new("adapter_cache_evictions_total", "Adapters evicted"),
                &["tier"],
            )?,
            adapter_load_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "adapter_cache_load_seconds",
                    "Seconds to fetch and validate an adapter",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
            adapter_slots_used: gauge(
                "adapter_cache_device_slots_used",
                "Adapters resident on the device",
            )?,
            adapter_host_bytes: gauge(
                "adapter_cache_host_bytes",
                "Bytes of adapters held in host memory",
            )?,
        })
    }
}
