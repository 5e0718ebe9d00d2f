//! `punica bench engine`: a synthetic multi-tenant workload driven straight into the engine.
//!
//! Adapter popularity follows Punica's workloads: `distinct` (every request its own adapter,
//! round-robin over the pool), `uniform` (adapters drawn uniformly from the pool), `skewed`
//! (Zipf with exponent 1.5 over the pool), `identical` (one adapter for all) and `none` (the base
//! model). Requests arrive as a Poisson process of the given rate (or all at once with rate 0);
//! the report gives output tokens per second and percentiles of time to first token and
//! inter-token latency.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::engine::backend::cuda::{CudaBackend, CudaOptions};
use crate::engine::backend::{Backend, BackendError, DType, StepPath};
use crate::engine::executor::{
    BackendCell, adapter_bytes, cpu_executor, cuda_executor, peft_validator,
};
use crate::engine::lora::cache::{AdapterKey, AdapterSource, CacheConfig, MemorySource};
use crate::engine::lora::peft::LoraWeights;
use crate::engine::metrics::EngineMetrics;
use crate::engine::model::config::{LlamaConfig, Projection};
use crate::engine::model::llama::{Llama, LoraState, ModelError, StagedAdapter};
use crate::engine::model::tokenizer::Tokenizer;
use crate::engine::request::{
    NoText, SamplingParams, SharedDetokenizer, StreamEvent, ValidRequest,
};
use crate::engine::synthetic::{SyntheticError, random_adapter};
use crate::engine::{EngineConfig, EngineError, EngineHandle};

/// Adapter popularity of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Distinct,
    Uniform,
    Skewed,
    Identical,
    None,
}

impl Workload {
    /// The workload's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Distinct => "distinct",
            Workload::Uniform => "uniform",
            Workload::Skewed => "skewed",
            Workload::Identical => "identical",
            Workload::None => "none",
        }
    }
}

/// A small deterministic RNG (the bench must be reproducible from its seed).
#[derive(Clone, Debug)]
pub struct BenchRng(u64);

impl BenchRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The adapter index (into a pool of `adapters`) of each of `requests` requests; `None` = base.
pub fn assign_adapters(
    workload: Workload,
    requests: usize,
    adapters: usize,
    rng: &mut BenchRng,
) -> Vec<Option<usize>> {
    let pool = adapters.max(1);
    match workload {
        Workload::None => vec![None; requests],
        Workload::Identical => vec![Some(0); requests],
        Workload::Distinct => (0..requests).map(|i| Some(i % pool)).collect(),
        Workload::Uniform => (0..requests).map(|_| Some(rng.below(pool))).collect(),
        Workload::Skewed => {
            // Zipf(1.5): P(k) proportional to 1 / (k+1)^1.5.
            let weights: Vec<f64> = (0..pool)
                .map(|k| 1.0 / ((k + 1) as f64).powf(1.5))
                .collect();
            let total: f64 = weights.iter().sum();
            (0..requests)
                .map(|_| {
                    let mut r = rng.next_f64() * total;
                    let mut pick = pool - 1;
                    for (k, w) in weights.iter().enumerate() {
                        if r < *w {
                            pick = k;
                            break;
                        }
                        r -= w;
                    }
                    Some(pick)
                })
                .collect()
        }
    }
}

/// Arrival offsets of `requests` requests at `rate` per second (Poisson); all zero for rate 0.
pub fn arrivals(requests: usize, rate: f64, rng: &mut BenchRng) -> Vec<Duration> {
    let mut t = 0.0f64;
    (0..requests)
        .map(|_| {
            if rate > 0.0 {
                t += -(1.0 - rng.next_f64()).ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

/// Timings of one request, as observed by its client.
#[derive(Clone, Debug, Default)]
pub struct RequestTiming {
    pub submitted: Option<Instant>,
    /// Arrival time of each token event.
    pub tokens: Vec<Instant>,
    pub failed: Option<String>,
}

/// The `p`-th percentile (0..=100) of sorted `values` (nearest rank); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of one bench run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub workload: Workload,
    pub distinct_adapters: usize,
    pub requests: usize,
    pub failed: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    /// Milliseconds: p50, p90, p99.
    pub ttft_ms: [f64; 3],
    pub itl_ms: [f64; 3],
    /// CPU seconds the whole process used during the run (all threads), where known: on a
    /// shared machine, tokens per CPU second is steadier than tokens per wall second.
    pub cpu_s: Option<f64>,
    /// Engine steps of the run by how the device ran them: issued op by op, recorded into a
    /// CUDA graph, replayed from one.
    pub steps: [u64; 3],
}

/// Summarise the timings of a run that took `wall` from first submit to last event.
pub fn summarise(
    workload: Workload,
    assigned: &[Option<usize>],
    timings: &[RequestTiming],
    wall: Duration,
) -> Summary {
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    let mut output_tokens = 0;
    let mut failed = 0;
    for t in timings {
        if t.failed.is_some() {
            failed += 1;
        }
        output_tokens += t.tokens.len();
        if let (Some(sub), Some(first)) = (t.submitted, t.tokens.first()) {
            ttft.push(first.duration_since(sub).as_secs_f64() * 1e3);
        }
        for w in t.tokens.windows(2) {
            itl.push(w[1].duration_since(w[0]).as_secs_f64() * 1e3);
        }
    }
    ttft.sort_unstable_by(f64::total_cmp);
    itl.sort_unstable_by(f64::total_cmp);
    let mut used: Vec<usize> = assigned.iter().flatten().copied().collect();
    used.sort_unstable();
    used.dedup();
    let wall_s = wall.as_secs_f64();
    let pct = |v: &[f64]| {
        [
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 99.0),
        ]
    };
    Summary {
        workload,
        distinct_adapters: used.len(),
        requests: timings.len(),
        failed,
        output_tokens,
        wall_s,
        tokens_per_s: if wall_s > 0.0 {
            output_tokens as f64 / wall_s
        } else {
            0.0
        },
        ttft_ms: pct(&ttft),
        itl_ms: pct(&itl),
        cpu_s: None,
        steps: [0; 3],
    }
}

/// Markdown table header matching [`Summary::row`].
pub fn table_header() -> String {
    "| workload | adapters used | requests | failed | output tokens | wall s | tokens/s | CPU s | tokens/CPU-s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".to_string()
}

impl Summary {
    /// One markdown table row.
    pub fn row(&self) -> String {
        let mut s = String::new();
        let (cpu, per_cpu) = match self.cpu_s {
            Some(c) if c > 0.0 => (
                format!("{c:.2}"),
                format!("{:.1}", self.output_tokens as f64 / c),
            ),
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {cpu} | {per_cpu} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            self.workload.name(),
            self.distinct_adapters,
            self.requests,
            self.failed,
            self.output_tokens,
            self.wall_s,
            self.tokens_per_s,
            self.ttft_ms[0],
            self.ttft_ms[1],
            self.ttft_ms[2],
            self.itl_ms[0],
            self.itl_ms[1],
            self.itl_ms[2],
        );
        s
    }

    /// Output tokens per CPU second, where CPU time is known.
    pub fn tokens_per_cpu_s(&self) -> Option<f64> {
        self.cpu_s
            .filter(|&c| c > 0.0)
            .map(|c| self.output_tokens as f64 / c)
    }
}

/// CPU seconds (user + system, all threads) this process has used, from `/proc/self/stat`.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports them in clock ticks of USER_HZ, which is 100 on every supported platform.
    Some((utime + stime) / 100.0)
}

/// How long the bench's prompts are: all `median` tokens (`sigma` 0), or log-normal around
/// `median` with shape `sigma` (Punica's traffic: prompts of varied length), cut to
/// 1..=[`Self::max`] so that one KV budget per sequence holds every draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PromptLengths {
    pub median: usize,
    pub sigma: f64,
}

impl PromptLengths {
    /// Every prompt `len` tokens (at least one).
    pub fn fixed(len: usize) -> Self {
        Self {
            median: len,
            sigma: 0.0,
        }
    }

    fn varied(&self) -> bool {
        self.sigma > 0.0
    }

    /// The median, at least one token.
    fn median(&self) -> usize {
        self.median.max(1)
    }

    /// The longest prompt drawn: the median when fixed, four times it when varied.
    pub fn max(&self) -> usize {
        if self.varied() {
            self.median() * 4
        } else {
            self.median()
        }
    }

    /// One prompt's length.
    pub fn draw(&self, rng: &mut BenchRng) -> usize {
        if !self.varied() {
            return self.median();
        }
        let len = ((self.median() as f64).ln() + self.sigma * rng.normal()).exp();
        (len.round() as usize).clamp(1, self.max())
    }

    /// The mean length (log-normal: `median * exp(sigma^2 / 2)`, before the cut).
    pub fn mean(&self) -> f64 {
        self.median() as f64 * (self.sigma * self.sigma / 2.0).exp()
    }

    /// For reports: "64" or "log-normal, median 64, sigma 0.8, 1..256".
    pub fn describe(&self) -> String {
        if self.varied() {
            format!(
                "log-normal, median {}, sigma {}, 1..{}",
                self.median(),
                self.sigma,
                self.max()
            )
        } else {
            self.median().to_string()
        }
    }
}

/// One workload's traffic: what each request asks for and when it arrives.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub workload: Workload,
    /// Adapter index per request (`None` = base model).
    pub adapters: Vec<Option<usize>>,
    pub arrivals: Vec<Duration>,
    pub prompts: Vec<Vec<u32>>,
    pub max_tokens: u32,
}

impl Traffic {
    /// Requests of random tokens below `vocab` (lengths drawn from `prompt_lens`),
    /// `max_tokens` each, with adapters and arrivals drawn for `workload`.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        workload: Workload,
        requests: usize,
        adapters: usize,
        prompt_lens: PromptLengths,
        max_tokens: u32,
        vocab: usize,
        rate: f64,
        seed: u64,
    ) -> Self {
        let mut rng = BenchRng::new(seed);
        let assigned = assign_adapters(workload, requests, adapters, &mut rng);
        let arrivals = arrivals(requests, rate, &mut rng);
        let prompts = (0..requests)
            .map(|_| {
                let len = prompt_lens.draw(&mut rng);
                (0..len).map(|_| rng.below(vocab.max(1)) as u32).collect()
            })
            .collect();
        Self {
            workload,
            adapters: assigned,
            arrivals,
            prompts,
            max_tokens,
        }
    }
}

/// Submit `traffic` to `engine` at its arrival times (adapter index i is `keys[i]`), read every
/// stream on its own thread, and summarise. Greedy, no stop conditions: every request produces
/// exactly `max_tokens` tokens unless it fails.
pub fn drive(
    engine: &EngineHandle,
    traffic: &Traffic,
    keys: &[AdapterKey],
) -> Result<Summary, EngineError> {
    let start = Instant::now();
    let timings = drive_timings(engine, traffic, keys)?;
    Ok(summarise(
        traffic.workload,
        &traffic.adapters,
        &timings,
        start.elapsed(),
    ))
}

/// [`drive`], returning every request's timings.
pub fn drive_timings(
    engine: &EngineHandle,
    traffic: &Traffic,
    keys: &[AdapterKey],
) -> Result<Vec<RequestTiming>, EngineError> {
    let start = Instant::now();
    let mut readers = Vec::with_capacity(traffic.prompts.len());
    for (i, prompt) in traffic.prompts.iter().enumerate() {
        let due = start + traffic.arrivals[i];
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let adapter = traffic.adapters[i].and_then(|a| keys.get(a).copied());
        let submitted = Instant::now();
        let mut stream = engine.submit(ValidRequest {
            tenant: Uuid::from_u128(1 + (i % 4) as u128),
            request_id: Uuid::new_v4(),
            adapter,
            prompt: prompt.clone(),
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: traffic.max_tokens as usize,
                ..SamplingParams::default()
            },
        })?;
        readers.push(std::thread::spawn(move || {
            let mut timing = RequestTiming {
                submitted: Some(submitted),
                ..RequestTiming::default()
            };
            while let Some(event) = stream.blocking_next() {
                match event {
                    StreamEvent::Token { .. } => timing.tokens.push(Instant::now()),
                    StreamEvent::Error { message, .. } => timing.failed = Some(message),
                    StreamEvent::Done { .. } => {}
                }
            }
            timing
        }));
    }
    Ok(readers
        .into_iter()
        .map(|r| {
            r.join().unwrap_or_else(|_| RequestTiming {
                failed: Some("reader thread panicked".into()),
                ..RequestTiming::default()
            })
        })
        .collect())
}

/// Device to run `bench engine` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

/// Arguments of `punica bench engine`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchEngineArgs {
    /// Hugging Face style model folder (config.json, *.safetensors).
    #[arg(
        long,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub model: Option<PathBuf>,
    /// Instead of a model folder: random weights of these shapes, generated on the device
    /// (`llama-7b` or `llama-13b`, Llama-2's shapes).
    #[arg(long)]
    pub synthetic: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: BenchDevice,
    /// Workloads to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "distinct,uniform,skewed,identical"
    )]
    pub workload: Vec<Workload>,
    /// Adapters in the pool (random, for the model's shapes).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// LoRA rank of every adapter (all seven projections of every layer).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Prompt tokens per request (the median with `--prompt-sigma`).
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Draw prompt lengths from a log-normal distribution of this shape around
    /// `--prompt-len` (cut to 1..4x it); 0: every prompt `--prompt-len` tokens.
    #[arg(long, default_value_t = 0.0, value_parser = parse_sigma)]
    pub prompt_sigma: f64,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Requests per second (Poisson arrivals); 0 submits them all at once.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// Rows per step (decodes + prefill chunks).
    #[arg(long, default_value_t = 256)]
    pub max_step_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also append the report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Share of the GPU's memory the engine may use (CUDA only).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// Also measure a request whose adapter is in neither the GPU nor the host tier, submitted
    /// while `max_running - 1` other requests decode.
    #[arg(long)]
    pub cold_adapter: bool,
    /// With `--cold-adapter`: how many such requests (each with an adapter of its own, each
    /// after a request whose adapter is resident), 1 to 50; the report gives their median and
    /// range.
    #[arg(long, default_value_t = 5, value_parser = parse_probes)]
    pub cold_probes: usize,
}

/// `--cold-probes`: 1 to 50.
fn parse_probes(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=50).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not between 1 and 50"))
    }
}

/// `--prompt-sigma`: finite, 0 to 3.
fn parse_sigma(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (0.0..=3.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 3"))
    }
}

impl BenchEngineArgs {
    /// The prompts' lengths.
    pub fn prompt_lens(&self) -> PromptLengths {
        PromptLengths {
            median: self.prompt_len,
            sigma: self.prompt_sigma,
        }
    }

    /// The model's name in reports.
    fn model_name(&self) -> String {
        match (&self.synthetic, &self.model) {
            (Some(name), _) => format!("synthetic {name} (random weights)"),
            (None, Some(dir)) => dir.display().to_string(),
            (None, None) => "no model".to_string(),
        }
    }

    fn config(&self) -> Result<LlamaConfig, BenchError> {
        match (&self.synthetic, &self.model) {
            (Some(name), _) => LlamaConfig::synthetic(name).ok_or_else(|| {
                BenchError::Model(format!(
                    "unknown synthetic model {name:?} (llama-7b or llama-13b)"
                ))
            }),
            (None, Some(dir)) => LlamaConfig::from_file(&dir.join("config.json"))
                .map_err(|e| BenchError::Model(e.to_string())),
            (None, None) => Err(BenchError::Model(
                "give --model DIR or --synthetic NAME".into(),
            )),
        }
    }

    /// Load the model (or generate it) on `backend`.
    fn load<B: Backend>(&self, backend: Arc<B>) -> Result<Llama<B>, ModelError> {
        match (&self.synthetic, &self.model) {
            (Some(name), _) => {
                let config = LlamaConfig::synthetic(name).ok_or_else(|| {
                    ModelError::Backend(BackendError::Shape(format!(
                        "unknown synthetic model {name:?}"
                    )))
                })?;
                Llama::random(backend, config, self.seed as u32)
            }
            (None, Some(dir)) => Llama::load(backend, dir),
            (None, None) => Err(ModelError::Backend(BackendError::Shape(
                "no model given".into(),
            ))),
        }
    }
}

/// Why `bench engine` failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read the model config: {0}")]
    Model(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Synthetic(#[from] SyntheticError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot write {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
}

/// Run every requested workload on a fresh engine and return the markdown report.
pub fn run(args: &BenchEngineArgs) -> Result<String, BenchError> {
    let config = args.config()?;
    let source = Arc::new(MemorySource::new());
    let keys: Vec<AdapterKey> = (0..args.adapters.max(1))
        .map(|i| AdapterKey {
            id: Uuid::from_u128(i as u128 + 1),
            version: 1,
        })
        .collect();
    for (i, key) in keys.iter().enumerate() {
        source.insert(
            *key,
            random_adapter(&config, args.rank, 0.01, args.seed + i as u64)?,
        );
    }
    let detokenizer: SharedDetokenizer = match args.model.as_deref().map(Tokenizer::from_dir) {
        Some(Ok(t)) => Arc::new(t),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no tokenizer: the bench streams token ids without text");
            Arc::new(NoText)
        }
        None => Arc::new(NoText),
    };
    let mut summaries = Vec::new();
    for &workload in &args.workload {
        tracing::info!(workload = workload.name(), "bench workload starting");
        let summary = run_workload(args, &config, &source, &keys, &detokenizer, workload)?;
        tracing::info!(
            workload = workload.name(),
            tokens_per_s = summary.tokens_per_s,
            "bench workload done"
        );
        summaries.push(summary);
    }
    let mut report = report(args, &config, &summaries);
    if args.cold_adapter {
        report.push_str(&cold_adapter_report(
            args,
            &config,
            &source,
            &keys,
            &detokenizer,
        )?);
    }
    if args.device == BenchDevice::Cuda {
        report.push_str(&adapter_load_report(args, &config)?);
    }
    if let Some(path) = &args.output {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(report.as_bytes()))
            .map_err(|source| BenchError::Output {
                path: path.display().to_string(),
                source,
            })?;
    }
    Ok(report)
}

/// An engine for `args` with `slots` adapter slots, its KV pool sized for `max_running`
/// sequences of the prompt plus `max_tokens`, and its (unregistered) metrics.
fn start_engine(
    args: &BenchEngineArgs,
    config: &LlamaConfig,
    source: &Arc<MemorySource>,
    detokenizer: &SharedDetokenizer,
    slots: usize,
    max_tokens: u32,
) -> Result<(EngineHandle, EngineMetrics), BenchError> {
    let metrics = EngineMetrics::unregistered()?;
    let per_seq = crate::engine::kv::blocks_for(args.prompt_lens().max() + max_tokens as usize);
    let kv_blocks = per_seq * args.max_running + 1;
    let engine_config = EngineConfig {
        max_running: args.max_running,
        max_step_tokens: args.max_step_tokens,
        max_queued: args.requests + slots + 1,
        stream_capacity: max_tokens as usize + 8,
        cache: CacheConfig {
            device_slots: slots,
            host_bytes: 64 << 30,
            loader_threads: 4,
        },
    };
    let source = Arc::clone(source) as Arc<dyn AdapterSource>;
    let engine = match args.device {
        BenchDevice::Cpu => {
            let args = args.clone();
            let cell = BackendCell::default();
            let validator = peft_validator(config.clone(), Arc::clone(&cell));
            EngineHandle::start(
                engine_config,
                move || {
                    cpu_executor(&cell, |b| args.load(b), slots, kv_blocks)
                        .map_err(EngineError::Startup)
                },
                source,
                validator,
                Arc::clone(detokenizer),
                metrics.clone(),
            )?
        }
        BenchDevice::Cuda => {
            let args = args.clone();
            let reserve = slots * adapter_bytes(config, args.rank, DType::BF16);
            let host_bytes = engine_config.cache.host_bytes;
            let cell = BackendCell::default();
            let validator = peft_validator(config.clone(), Arc::clone(&cell));
            EngineHandle::start(
                engine_config,
                move || {
                    cuda_executor(
                        &cell,
                        |b| args.load(b),
                        slots,
                        reserve,
                        host_bytes,
                        args.gpu_memory_fraction,
                        Some(kv_blocks),
                    )
                    .map_err(EngineError::Startup)
                },
                source,
                validator,
                Arc::clone(detokenizer),
                metrics.clone(),
            )?
        }
    };
    Ok((engine, metrics))
}

fn run_workload(
    args: &BenchEngineArgs,
    config: &LlamaConfig,
    source: &Arc<MemorySource>,
    keys: &[AdapterKey],
    detokenizer: &SharedDetokenizer,
    workload: Workload,
) -> Result<Summary, BenchError> {
    let (engine, metrics) = start_engine(
        args,
        config,
        source,
        detokenizer,
        keys.len(),
        args.max_tokens,
    )?;
    let traffic = Traffic::generate(
        workload,
        args.requests,
        keys.len(),
        args.prompt_lens(),
        args.max_tokens,
        config.vocab_size,
        args.rate,
        args.seed,
    );
    warm_up(&engine, &traffic, keys)?;
    let steps = || {
        [StepPath::Issued, StepPath::Recorded, StepPath::Replayed]
            .map(|p| metrics.steps.with_label_values(&[p.name()]).get())
    };
    let (cpu_before, steps_before) = (process_cpu_seconds(), steps());
    let mut summary = drive(&engine, &traffic, keys)?;
    summary.cpu_s = cpu_before.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    summary.steps = std::array::from_fn(|i| steps()[i] - steps_before[i]);
    Ok(summary)
}

/// Make `traffic`'s adapters resident and the engine warm (its kernels loaded, its buffers
/// grown), so a run measures the steady state: see [`warm_traffic`].
fn warm_up(
    engine: &EngineHandle,
    traffic: &Traffic,
    keys: &[AdapterKey],
) -> Result<(), BenchError> {
    drive(engine, &warm_traffic(traffic), keys)?;
    Ok(())
}

/// The warm-up of `traffic`: a one-token request with each adapter it uses, or one with no
/// adapter when it uses none (so the no-LoRA baseline does not pay the engine's first steps).
fn warm_traffic(traffic: &Traffic) -> Traffic {
    let mut used: Vec<usize> = traffic.adapters.iter().flatten().copied().collect();
    used.sort_unstable();
    used.dedup();
    let adapters: Vec<Option<usize>> = if used.is_empty() {
        vec![None]
    } else {
        used.iter().map(|&a| Some(a)).collect()
    };
    Traffic {
        workload: traffic.workload,
        arrivals: vec![Duration::ZERO; adapters.len()],
        prompts: vec![vec![0]; adapters.len()],
        adapters,
        max_tokens: 1,
    }
}

/// One request of `traffic`'s first prompt with adapter `adapter`, one token.
fn probe(traffic: &Traffic, adapter: usize) -> Traffic {
    Traffic {
        workload: traffic.workload,
        adapters: vec![Some(adapter)],
        arrivals: vec![Duration::ZERO],
        prompts: traffic.prompts.iter().take(1).cloned().collect(),
        max_tokens: 1,
    }
}

/// Requests whose adapter is in neither the GPU nor the host tier (`--cold-probes` of them,
/// one after another, each with an adapter of its own), submitted while `max_running - 1`
/// requests with resident adapters decode: their time to first token next to that of a request
/// whose adapter is resident (one prefill among the decodes, just before each), and the
/// decoding requests' inter-token latency while they wait.
fn cold_adapter_report(
    args: &BenchEngineArgs,
    config: &LlamaConfig,
    source: &Arc<MemorySource>,
    keys: &[AdapterKey],
    detokenizer: &SharedDetokenizer,
) -> Result<String, BenchError> {
    let probes = args.cold_probes.max(1);
    let mut all = keys.to_vec();
    let cold0 = all.len();
    for i in cold0..cold0 + probes {
        let key = AdapterKey {
            id: Uuid::from_u128(i as u128 + 1),
            version: 1,
        };
        source.insert(
            key,
            random_adapter(config, args.rank, 0.01, args.seed + i as u64)?,
        );
        all.push(key);
    }
    // Long enough to outlast the probes (about 0.1 s a pair on the H200 at 7B).
    let long = args
        .max_tokens
        .saturating_mul(4)
        .max(8)
        .saturating_mul(probes.div_ceil(5) as u32);
    let (engine, metrics) = start_engine(args, config, source, detokenizer, all.len(), long)?;
    let background = Traffic::generate(
        Workload::Distinct,
        args.max_running.saturating_sub(1).max(1),
        keys.len(),
        args.prompt_lens(),
        long,
        config.vocab_size,
        0.0,
        args.seed + 1,
    );
    warm_up(&engine, &background, keys)?;
    type Timings = Result<Vec<RequestTiming>, EngineError>;
    let base = metrics.generated_tokens.get();
    let (pairs, bg) = std::thread::scope(|scope| {
        let bg = scope.spawn(|| drive_timings(&engine, &background, keys));
        // Past the background's prefill (as many tokens as requests and none waiting, or a
        // minute at most): it is decoding when the probes arrive.
        let want = base + background.prompts.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while (metrics.generated_tokens.get() < want || metrics.waiting.get() > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut pairs: Vec<(Timings, Timings, f64)> = Vec::with_capacity(probes);
        for i in 0..probes {
            let warm = drive_timings(&engine, &probe(&background, 0), &all);
            let loaded = metrics.adapter_load_seconds.get_sample_sum();
            let cold = drive_timings(&engine, &probe(&background, cold0 + i), &all);
            // The cold adapter's own load on a loader thread (fetch, validate, stage).
            let load_ms = (metrics.adapter_load_seconds.get_sample_sum() - loaded) * 1e3;
            pairs.push((warm, cold, load_ms));
        }
        let bg = bg
            .join()
            .unwrap_or_else(|_| Err(EngineError::Startup("background thread panicked".into())));
        (pairs, bg)
    });
    let bg = bg?;
    let mut runs = Vec::with_capacity(pairs.len());
    for (warm, cold, load_ms) in pairs {
        runs.push((warm?, cold?, load_ms));
    }
    let ttft = |t: &[RequestTiming]| -> Option<(Instant, f64)> {
        let t = t.first()?;
        let (sub, first) = (t.submitted?, *t.tokens.first()?);
        Some((sub, first.duration_since(sub).as_secs_f64() * 1e3))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### A request whose adapter is not resident, while {} requests decode\n",
        background.prompts.len()
    );
    let failed: Vec<&String> = runs
        .iter()
        .flat_map(|(w, c, _)| w.iter().chain(c))
        .chain(&bg)
        .filter_map(|t| t.failed.as_ref())
        .collect();
    if let Some(first) = failed.first() {
        let _ = writeln!(s, "{} requests failed, the first: {first}", failed.len());
        return Ok(s);
    }
    let (mut warm, mut cold, mut load, mut diff, mut waits) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (w, c, load_ms) in &runs {
        let (Some((_, w)), Some((sub, c))) = (ttft(w), ttft(c)) else {
            let _ = writeln!(s, "a probe request produced no token");
            return Ok(s);
        };
        warm.push(w);
        cold.push(c);
        load.push(*load_ms);
        diff.push(c - w);
        waits.push((sub, sub + Duration::from_secs_f64(c / 1e3)));
    }
    let cell = |v: &mut Vec<f64>| -> String {
        v.sort_unstable_by(f64::total_cmp);
        let (lo, hi) = (v[0], v[v.len() - 1]);
        format!("{:.1} ({lo:.1}..{hi:.1})", percentile(v, 50.0))
    };
    let _ = writeln!(
        s,
        "| request | time to first token ms: median (min..max) of {probes} |\n|---|---|\n| adapter resident (one prefill among the decodes) | {} |\n| adapter in no tier (fetch, validate, stage, copy to a slot, prefill) | {} |\n| difference (the load) | {} |\n| of which on the loader thread (fetch, validate, stage) | {} |",
        cell(&mut warm),
        cell(&mut cold),
        cell(&mut diff),
        cell(&mut load)
    );
    // The decoding requests' token gaps while a cold request waited.
    let mut during = Vec::new();
    let mut all_gaps = Vec::new();
    for t in &bg {
        for w in t.tokens.windows(2) {
            let gap = w[1].duration_since(w[0]).as_secs_f64() * 1e3;
            all_gaps.push(gap);
            if waits.iter().any(|&(start, end)| w[1] > start && w[0] < end) {
                during.push(gap);
            }
        }
    }
    during.sort_unstable_by(f64::total_cmp);
    all_gaps.sort_unstable_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "\nThe decoding requests meanwhile: {} tokens, inter-token latency p50 {:.1} ms, max {:.1} ms (over their whole run: p50 {:.1} ms).",
        during.len(),
        percentile(&during, 50.0),
        during.last().copied().unwrap_or(0.0),
        percentile(&all_gaps, 50.0)
    );
    // Whether the batch still decoded when the last cold request got its token.
    let last_bg = bg.iter().filter_map(|t| t.tokens.last()).max();
    if let (Some(&last_bg), Some(&(_, last_wait))) = (last_bg, waits.last())
        && last_bg < last_wait
    {
        let _ = writeln!(
            s,
            "The decoding requests finished before the last cold request's first token: raise --max-tokens for a batch that outlasts the probes."
        );
    }
    Ok(s)
}

fn report(args: &BenchEngineArgs, config: &LlamaConfig, summaries: &[Summary]) -> String {
    let mut s = String::new();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let rev = env!("PUNICA_GIT_REV");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "## bench engine: {} ({} layers, hidden {})\n",
        args.model_name(),
        config.num_hidden_layers,
        config.hidden_size
    );
    let _ = writeln!(
        s,
        "- date {date}, git {rev}, device {:?}, {cpu} ({threads} threads)",
        args.device
    );
    let _ = writeln!(
        s,
        "- {} requests, prompt {} tokens, {} new tokens each (greedy), rate {} req/s, {} adapters of rank {} on q,k,v,o,gate,up,down, max_running {}, max_step_tokens {}\n",
        args.requests,
        args.prompt_lens().describe(),
        args.max_tokens,
        args.rate,
        args.adapters,
        args.rank,
        args.max_running,
        args.max_step_tokens
    );
    let _ = writeln!(s, "{}", table_header());
    for summary in summaries {
        let _ = writeln!(s, "{}", summary.row());
    }
    let _ = writeln!(
        s,
        "\nEngine steps issued op by op / recorded into a CUDA graph / replayed from one: {}",
        summaries
            .iter()
            .map(|x| format!(
                "{} {} / {} / {}",
                x.workload.name(),
                x.steps[0],
                x.steps[1],
                x.steps[2]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let tps = |w: Workload| {
        summaries
            .iter()
            .find(|x| x.workload == w)
            .map(|x| x.tokens_per_s)
    };
    // Multiply-adds per token: base projections + LM head, and the LoRA shrink + expand.
    let (mut base, mut lora) = (config.vocab_size * config.hidden_size, 0usize);
    for p in Projection::ALL {
        let (h_in, h_out) = config.projection_dims(p);
        base += config.num_hidden_layers * h_in * h_out;
        lora += config.num_hidden_layers * args.rank * (h_in + h_out);
    }
    let _ = writeln!(
        s,
        "\nLoRA multiply-adds per token: {:.1}% of the base model's ({lora} vs {base}).",
        100.0 * lora as f64 / base.max(1) as f64
    );
    if let (Some(n), Some(i)) = (tps(Workload::None), tps(Workload::Identical))
        && n > 0.0
    {
        let _ = writeln!(s, "identical / none (base model) throughput: {:.3}", i / n);
    }
    let per_cpu = |w: Workload| {
        summaries
            .iter()
            .find(|x| x.workload == w)
            .and_then(Summary::tokens_per_cpu_s)
    };
    if let (Some(d), Some(i)) = (per_cpu(Workload::Distinct), per_cpu(Workload::Identical)) {
        let _ = writeln!(
            s,
            "distinct / identical tokens per CPU second: {:.3}",
            d / i
        );
    }
    if let (Some(d), Some(i)) = (tps(Workload::Distinct), tps(Workload::Identical))
        && i > 0.0
    {
        let _ = writeln!(s, "distinct / identical throughput: {:.3}", d / i);
    }
    if args.device == BenchDevice::Cuda {
        s.push_str(&roofline(args, config, summaries));
    }
    s.push('\n');
    s
}

/// Time loading one adapter of the bench's rank: blob -> validated host copy (parse, checks,
/// scale folding), then host -> GPU as the engine installs it into a slot (copy and slot
/// tables): the median of 3 loads (the first one included) and of 5 installs after a warm-up
/// install; and the first load alone.
fn adapter_load_report(args: &BenchEngineArgs, config: &LlamaConfig) -> Result<String, BenchError> {
    let dev = |e: BackendError| BenchError::Model(format!("CUDA: {e}"));
    let files = random_adapter(config, args.rank, 0.01, args.seed + 7777)?;
    let blob_bytes = files.weights.len();
    let backend = CudaBackend::new(CudaOptions::default()).map_err(dev)?;
    // Per load: blob -> validated f32 copy, that -> staged, and the whole (the copy dropped).
    // The previous load's staging goes first, so later loads reuse its page-locked buffer as a
    // serving process's loads reuse those of evicted adapters; the first load pins fresh memory.
    let (mut parse_ms, mut stage_ms, mut validate_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut staged = None;
    for _ in 0..3 {
        drop(staged.take());
        let t = Instant::now();
        let weights = LoraWeights::from_shared(&files.config, &files.weights, config)
            .map_err(|e| BenchError::Model(e.to_string()))?;
        let parsed = t.elapsed();
        staged = Some(StagedAdapter::stage(&backend, &weights).map_err(dev)?);
        let staged_at = t.elapsed();
        drop(weights);
        parse_ms.push(parsed.as_secs_f64() * 1e3);
        stage_ms.push((staged_at - parsed).as_secs_f64() * 1e3);
        validate_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let staged = staged.ok_or_else(|| BenchError::Model("no adapter".into()))?;
    let mut lora = LoraState::new(config, 4);
    let mut install_ms = Vec::new();
    for i in 0..6 {
        backend.synchronize().map_err(dev)?;
        let t = Instant::now();
        lora.load_staged(&backend, i % 4, &staged)
            .map_err(|e| BenchError::Model(e.to_string()))?;
        backend.synchronize().map_err(dev)?;
        if i > 0 {
            install_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    // The first load also pays for fresh host memory (page faults, a new page-locked
    // buffer), as a cold adapter's load in a serving process does.
    let first_ms = validate_ms.first().copied().unwrap_or(0.0);
    let median = |mut ms: Vec<f64>| {
        ms.sort_unstable_by(f64::total_cmp);
        ms[ms.len() / 2]
    };
    let device_bytes = adapter_bytes(config, args.rank, backend.dtype());
    let (v, h) = (median(validate_ms), median(install_ms));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Adapter load, rank {} on all seven projections ({:.1} MiB on the device, blob {:.1} MiB)\n",
        args.rank,
        device_bytes as f64 / (1 << 20) as f64,
        blob_bytes as f64 / (1 << 20) as f64
    );
    let _ = writeln!(
        s,
        "| step | median ms |\n|---|---|\n| blob -> validated, staged in page-locked memory (loader thread) | {v:.2} |\n| of which: blob -> validated f32 copy (parse, checks, scale folding) | {:.2} |\n| of which: f32 copy -> staged (conversion into page-locked memory) | {:.2} |\n| staged -> GPU slot (one copy on the copy stream + slot tables, until the copy is done) | {h:.2} |\n| blob -> GPU | {:.2} |\n| blob -> staged, the process's first load (fresh host memory) | {first_ms:.2} |",
        median(parse_ms),
        median(stage_ms),
        v + h
    );
    Ok(s)
}

/// Copy bandwidth of the H200 that ANCHORS.md section 3 uses for the floor, bytes/s.
pub const H200_BANDWIDTH: f64 = 4.19e12;

/// Decode tokens/s of Hugging Face transformers + PEFT on the same GPU (ANCHORS.md section 2:
/// 7B shapes, batch 32, prompt 64, 64 new tokens, r=16 on all seven projections).
fn hf_peft_anchor(workload: Workload) -> f64 {
    match workload {
        Workload::None => 416.0,
        Workload::Identical => 658.0,
        Workload::Skewed | Workload::Uniform => 99.5,
        Workload::Distinct => 26.0,
    }
}

/// Bytes one decode step must read at `batch` sequences of `context` tokens with `adapters`
/// distinct adapters of `rank` resident in the batch (bf16 weights, KV and adapters).
pub fn decode_step_bytes(
    config: &LlamaConfig,
    batch: usize,
    context: usize,
    adapters: usize,
    rank: usize,
) -> f64 {
    let mut params = 2 * config.vocab_size * config.hidden_size;
    for p in Projection::ALL {
        let (h_in, h_out) = config.projection_dims(p);
        params += config.num_hidden_layers * h_in * h_out;
    }
    let kv = batch * context * 2 * config.num_hidden_layers * config.kv_dim();
    let lora = adapters * adapter_bytes(config, rank, DType::BF16) / 2;
    2.0 * (params + kv + lora) as f64
}

/// The decode step against the memory floor, per workload.
fn roofline(args: &BenchEngineArgs, config: &LlamaConfig, summaries: &[Summary]) -> String {
    let mut s = String::new();
    let batch = args.max_running.min(args.requests).max(1);
    // Mean context over the decode phase.
    let context = args.prompt_lens().mean().round() as usize + args.max_tokens as usize / 2;
    let is_anchor_setup = args.synthetic.as_deref() == Some("llama-7b")
        && batch == 32
        && args.prompt_lens() == PromptLengths::fixed(64)
        && args.max_tokens == 64
        && args.rank == 16;
    let _ = writeln!(
        s,
        "\nDecode step vs the memory floor (batch {batch}, mean context {context}, {:.2} TB/s):\n",
        H200_BANDWIDTH / 1e12
    );
    let _ = writeln!(
        s,
        "| workload | ms/step (ITL p50) | decode tokens/s (batch / step) | floor ms | step / floor |{}",
        if is_anchor_setup {
            " HF+PEFT tokens/s | ours / HF+PEFT |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|{}",
        if is_anchor_setup { "---|---|" } else { "" }
    );
    for x in summaries {
        let adapters = if x.workload == Workload::None {
            0
        } else {
            x.distinct_adapters.min(batch)
        };
        let floor_ms =
            decode_step_bytes(config, batch, context, adapters, args.rank) / H200_BANDWIDTH * 1e3;
        let step_ms = x.itl_ms[0];
        let tps = if step_ms > 0.0 {
            batch as f64 * 1e3 / step_ms
        } else {
            0.0
        };
        let _ = write!(
            s,
            "| {} | {step_ms:.2} | {tps:.0} | {floor_ms:.2} | {:.2} |",
            x.workload.name(),
            step_ms / floor_ms
        );
        if is_anchor_setup {
            let anchor = hf_peft_anchor(x.workload);
            let _ = write!(s, " {anchor} | {:.0}x |", tps / anchor);
        }
        s.push('\n');
    }
    let step = |w: Workload| {
        summaries
            .iter()
            .find(|x| x.workload == w)
            .map(|x| x.itl_ms[0])
    };
    if let (Some(d), Some(i)) = (step(Workload::Distinct), step(Workload::Identical))
        && d > 0.0
    {
        let _ = writeln!(s, "\ndistinct / identical decode throughput: {:.3}", i / d);
    }
    if let (Some(d), Some(n)) = (step(Workload::Distinct), step(Workload::None))
        && d > 0.0
    {
        let _ = writeln!(s, "distinct / no-LoRA decode throughput: {:.3}", n / d);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_normal_prompt_lengths_center_on_the_median_within_the_cut() {
        let lens = PromptLengths {
            median: 64,
            sigma: 0.8,
        };
        let mut rng = BenchRng::new(11);
        let mut draws: Vec<usize> = (0..4001).map(|_| lens.draw(&mut rng)).collect();
        assert!(draws.iter().all(|&l| (1..=256).contains(&l)));
        draws.sort_unstable();
        let median = draws[2000];
        assert!((56..=72).contains(&median), "median {median}");
        // Varied: a quarter of the prompts are shorter than 64 * exp(-0.8 * 0.674) = 37.
        assert!(
            draws[1000] < 45 && draws[3000] > 90,
            "{} {}",
            draws[1000],
            draws[3000]
        );
        // The same seed draws the same lengths, another seed others; fixed lengths never vary.
        let run = |seed| {
            let mut r = BenchRng::new(seed);
            (0..50).map(|_| lens.draw(&mut r)).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let fixed = PromptLengths::fixed(64);
        assert!((0..100).all(|_| fixed.draw(&mut rng) == 64));
        assert_eq!((fixed.max(), lens.max()), (64, 256));
        assert_eq!(fixed.describe(), "64");
        assert_eq!(lens.describe(), "log-normal, median 64, sigma 0.8, 1..256");
    }

    #[test]
    fn the_warm_up_uses_every_adapter_once_and_warms_the_baseline_too() {
        let traffic = |adapters: Vec<Option<usize>>| Traffic {
            workload: Workload::Skewed,
            arrivals: vec![Duration::from_millis(5); adapters.len()],
            prompts: vec![vec![1, 2, 3]; adapters.len()],
            adapters,
            max_tokens: 64,
        };
        let w = warm_traffic(&traffic(vec![Some(2), None, Some(0), Some(2)]));
        assert_eq!(w.adapters, vec![Some(0), Some(2)]);
        assert_eq!(w.prompts, vec![vec![0], vec![0]]);
        assert_eq!(w.arrivals, vec![Duration::ZERO; 2]);
        assert_eq!(w.max_tokens, 1);
        let w = warm_traffic(&traffic(vec![None; 5]));
        assert_eq!((w.adapters, w.prompts.len()), (vec![None], 1));
    }

    #[test]
    fn workloads_spread_requests_over_adapters_as_punica_defines_them() {
        let mut rng = BenchRng::new(1);
        let d = assign_adapters(Workload::Distinct, 16, 8, &mut rng);
        assert_eq!(d.iter().flatten().filter(|&&a| a == 3).count(), 2);
        let i = assign_adapters(Workload::Identical, 16, 8, &mut rng);
        assert!(i.iter().all(|a| *a == Some(0)));
        assert!(
            assign_adapters(Workload::None, 4, 8, &mut rng)
                .iter()
                .all(Option::is_none)
        );
        let s = assign_adapters(Workload::Skewed, 2000, 8, &mut rng);
        let zeros = s.iter().filter(|a| **a == Some(0)).count();
        let sevens = s.iter().filter(|a| **a == Some(7)).count();
        assert!(
            zeros > 4 * sevens,
            "Zipf favours the first adapter: {zeros} vs {sevens}"
        );
        let u = assign_adapters(Workload::Uniform, 2000, 8, &mut rng);
        for k in 0..8 {
            let n = u.iter().filter(|a| **a == Some(k)).count();
            assert!((150..350).contains(&n), "adapter {k} drawn {n} times");
        }
    }

    #[test]
    fn poisson_arrivals_have_the_requested_mean_rate() {
        let mut rng = BenchRng::new(3);
        let a = arrivals(4000, 20.0, &mut rng);
        let last = a.last().unwrap().as_secs_f64();
        assert!(
            (180.0..220.0).contains(&last),
            "4000 arrivals at 20/s took {last} s"
        );
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!(arrivals(5, 0.0, &mut rng).iter().all(Duration::is_zero));
    }

    #[test]
    fn process_cpu_time_is_read_and_grows_with_work() {
        let before = process_cpu_seconds().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while process_cpu_seconds().unwrap() - before < 0.05 {
            assert!(
                Instant::now() < deadline,
                "50 ms of spinning never showed up"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn a_summary_counts_tokens_latencies_and_adapters() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let timings = vec![
            RequestTiming {
                submitted: Some(t0),
                tokens: vec![ms(100), ms(110), ms(130)],
                failed: None,
            },
            RequestTiming {
                submitted: Some(ms(10)),
                tokens: vec![],
                failed: Some("boom".into()),
            },
        ];
        let s = summarise(
            Workload::Uniform,
            &[Some(1), Some(1)],
            &timings,
            Duration::from_secs(1),
        );
        assert_eq!(s.output_tokens, 3);
        assert_eq!(s.failed, 1);
        assert_eq!(s.distinct_adapters, 1);
        assert!((s.tokens_per_s - 3.0).abs() < 1e-9);
        assert!((s.ttft_ms[0] - 100.0).abs() < 1e-6);
        assert!((s.itl_ms[2] - 20.0).abs() < 1e-6);
        assert!(
            s.row()
                .starts_with("| uniform | 1 | 2 | 1 | 3 | 1.00 | 3.0 | - | - |")
        );
    }
}
