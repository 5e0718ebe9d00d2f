//! The production [`Executor`]: the Llama forward pass over any [`Backend`], with the paged KV
//! cache and the LoRA slot tables it owns; plus the glue that makes validated PEFT adapters
//! entries of the adapter cache and the model's tokenizer the engine's detokenizer.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::engine::backend::cpu::CpuBackend;
use crate::engine::backend::cuda::{CudaBackend, CudaOptions};
use crate::engine::backend::{Backend, DType, Pick, RowSampling, StepMeta};
use crate::engine::lora::cache::{AdapterFiles, AdapterKey, HostAdapter, Validator};
use crate::engine::lora::peft::LoraWeights;
use crate::engine::model::config::{LlamaConfig, Projection};
use crate::engine::model::llama::{KvCache, Llama, LoraState, ModelError, StagedAdapter};
use crate::engine::model::tokenizer::{DecodeStream, Tokenizer};
use crate::engine::request::{Detokenizer, TextDecoder};
use crate::engine::{Executor, ExecutorError, StepOutput};

/// A Llama model on a backend, with its KV pool and adapter slots.
pub struct LlamaExecutor<B: Backend> {
    model: Llama<B>,
    kv: KvCache<B>,
    lora: LoraState<B>,
    picks: Vec<Pick>,
    logits: Vec<f32>,
    timing: StepTiming,
    /// The launched step's sampling rows (a buffer kept from step to step).
    sampling: Vec<RowSampling>,
    pending: Option<Pending<B>>,
}

/// A launched step: its logits on the device (`None` when no row samples), and its timing.
struct Pending<B: Backend> {
    logits: Option<B::Buf>,
    want_logits: bool,
    rows: usize,
    started: Instant,
    enqueued: Duration,
}

/// Where the host's time in a step goes: issuing the forward pass vs. the whole step (until the
/// sampled tokens are back), and the time between two steps (the runtime's bookkeeping and the
/// next step's metadata, while the device idles). Logged at debug level every
/// [`StepTiming::WINDOW`] steps: when issuing takes most of the step, the step is bound by
/// kernel launches, not by the device.
#[derive(Default)]
struct StepTiming {
    steps: u32,
    rows: usize,
    enqueue: Duration,
    total: Duration,
    between: Duration,
    last_end: Option<Instant>,
}

impl StepTiming {
    const WINDOW: u32 = 32;

    fn record(&mut self, rows: usize, started: Instant, enqueue: Duration) {
        let end = Instant::now();
        self.steps += 1;
        self.rows += rows;
        self.enqueue += enqueue;
        self.total += end - started;
        if let Some(last) = self.last_end {
            self.between += started.saturating_duration_since(last);
        }
        self.last_end = Some(end);
        if self.steps == Self::WINDOW {
            let n = f64::from(self.steps);
            tracing::debug!(
                steps = self.steps,
                mean_rows = self.rows as f64 / n,
                issue_ms = self.enqueue.as_secs_f64() * 1e3 / n,
                step_ms = self.total.as_secs_f64() * 1e3 / n,
                between_ms = self.between.as_secs_f64() * 1e3 / n,
                "step timing"
            );
            *self = StepTiming {
                last_end: Some(end),
                ..StepTiming::default()
            };
        }
    }
}

impl<B: Backend> LlamaExecutor<B> {
    /// Allocate `kv_blocks` KV blocks and `adapter_slots` empty adapter slots for `model`.
    pub fn new(
        model: Llama<B>,
        kv_blocks: usize,
        adapter_slots: usize,
    ) -> Result<Self, ModelError> {
        let kv = KvCache::new(model.backend().as_ref(), model.config(), kv_blocks)?;
        let mut lora = LoraState::new(model.config(), adapter_slots);
        lora.set_arena(model.arena_rows());
        Ok(Self {
            model,
            kv,
            lora,
            picks: Vec::new(),
            logits: Vec::new(),
            timing: StepTiming::default(),
            sampling: Vec::new(),
            pending: None,
        })
    }

    /// KV blocks that fit in `bytes` for `config` at `dtype`.
    pub fn kv_blocks_for_bytes(config: &LlamaConfig, dtype: DType, bytes: usize) -> usize {
        bytes / KvCache::<B>::bytes_per_block(config, dtype).max(1)
    }

    /// The model.
    pub fn model(&self) -> &Llama<B> {
        &self.model
    }
}

/// Device memory the KV pool leaves free for activations, cuBLAS workspaces and the adapter
/// tables (per step the activations of 512 rows of a 13B model take about 100 MiB).
pub const CUDA_RESERVE_BYTES: usize = 1 << 30;

/// The CUDA executor's LoRA arena holds this rank on every projection for each adapter slot
/// (an adapter of a higher rank takes the room of several; one that finds no room runs its
/// shrinks as kernels, see `engine::model::llama::LoraState`).
pub const ARENA_RANK: usize = 16;

/// Most page-locked host memory pinned at startup for staged adapters (pinning takes about
/// half a millisecond a MiB).
pub const MAX_STAGING_BYTES: usize = 4 << 30;

/// Page-locked memory pinned at startup for a host tier of `host_bytes`: its budget, up to
/// [`MAX_STAGING_BYTES`], and room for two adapters of `slot_bytes` at least.
pub fn staging_bytes(host_bytes: usize, slot_bytes: usize) -> usize {
    host_bytes.min(MAX_STAGING_BYTES).max(2 * slot_bytes)
}

/// Build an executor on the CUDA backend: `load` puts the model's weights on the GPU, then the
/// KV pool takes what is left of `memory_fraction` of the device's memory after `adapter_bytes`
/// (room for the adapter slots) and [`CUDA_RESERVE_BYTES`], capped at `max_kv_blocks`. The host
/// tier's memory (`host_bytes`, see [`staging_bytes`]) is pinned first.
#[allow(clippy::too_many_arguments)]
pub fn cuda_executor(
    cell: &BackendCell<CudaBackend>,
    load: impl FnOnce(Arc<CudaBackend>) -> Result<Llama<CudaBackend>, ModelError>,
    adapter_slots: usize,
    adapter_bytes: usize,
    host_bytes: usize,
    memory_fraction: f64,
    max_kv_blocks: Option<usize>,
) -> Result<LlamaExecutor<CudaBackend>, String> {
    let backend = Arc::new(CudaBackend::new(CudaOptions::default()).map_err(|e| e.to_string())?);
    backend.warm_up().map_err(|e| e.to_string())?;
    let _ = cell.set(Arc::clone(&backend));
    // The host tier's page-locked memory, so loads while serving need not pin memory.
    backend
        .reserve_staging(staging_bytes(
            host_bytes,
            adapter_bytes / adapter_slots.max(1),
        ))
        .map_err(|e| e.to_string())?;
    let mut model = load(Arc::clone(&backend)).map_err(|e| e.to_string())?;
    model
        .reserve_lora_arena(Llama::<CudaBackend>::arena_rows_for(
            adapter_slots,
            ARENA_RANK,
        ))
        .map_err(|e| e.to_string())?;
    let (free, total) = backend.memory_info().map_err(|e| e.to_string())?;
    let used = total - free;
    let budget = ((total as f64 * memory_fraction) as usize)
        .saturating_sub(used)
        .saturating_sub(adapter_bytes)
        .saturating_sub(CUDA_RESERVE_BYTES);
    let fit =
        LlamaExecutor::<CudaBackend>::kv_blocks_for_bytes(model.config(), backend.dtype(), budget);
    // One block more goes to the padding rows of decode steps (`KvCache::pad_block`).
    let fit = fit.saturating_sub(1);
    let blocks = max_kv_blocks.map_or(fit, |m| m.min(fit));
    if blocks == 0 {
        return Err(format!(
            "no room for a KV cache: {} of {} MiB in use after loading the model, fraction {memory_fraction}, {} MiB kept for adapters",
            used >> 20,
            total >> 20,
            adapter_bytes >> 20
        ));
    }
    tracing::info!(
        device = backend.device_name(),
        weights_mib = used >> 20,
        total_mib = total >> 20,
        kv_blocks = blocks,
        kv_mib = (blocks
            * KvCache::<CudaBackend>::bytes_per_block(model.config(), backend.dtype()))
            >> 20,
        "CUDA executor ready"
    );
    LlamaExecutor::new(model, blocks, adapter_slots).map_err(|e| e.to_string())
}

/// Build an executor on the CPU backend: `load` reads the model, the KV pool has `kv_blocks`
/// blocks (the CPU twin of [`cuda_executor`]).
pub fn cpu_executor(
    cell: &BackendCell<CpuBackend>,
    load: impl FnOnce(Arc<CpuBackend>) -> Result<Llama<CpuBackend>, ModelError>,
    adapter_slots: usize,
    kv_blocks: usize,
) -> Result<LlamaExecutor<CpuBackend>, String> {
    let backend = Arc::new(CpuBackend::new());
    let _ = cell.set(Arc::clone(&backend));
    let model = load(backend).map_err(|e| e.to_string())?;
    LlamaExecutor::new(model, kv_blocks, adapter_slots).map_err(|e| e.to_string())
}

/// Bytes of one adapter of `rank` on all seven projections of every layer of `config`, in
/// `dtype` (what a device slot holds).
pub fn adapter_bytes(config: &LlamaConfig, rank: usize, dtype: DType) -> usize {
    Projection::ALL
        .iter()
        .map(|&p| {
            let (h_in, h_out) = config.projection_dims(p);
            rank * (h_in + h_out)
        })
        .sum::<usize>()
        * config.num_hidden_layers
        * dtype.size()
}

impl<B: Backend> Executor for LlamaExecutor<B> {
    type Adapter = StagedAdapter<B>;

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn kv_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    fn adapter_slots(&self) -> usize {
        self.lora.num_slots()
    }

    fn install_adapter(&mut self, slot: u32, adapter: &StagedAdapter<B>) -> Result<(), String> {
        let backend = Arc::clone(self.model.backend());
        self.lora
            .load_staged(backend.as_ref(), slot as usize, adapter)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// As soon as it is installed: a step that uses it while its copy runs waits for the copy
    /// of each layer in that layer's LoRA work only (see `Backend::wait_upload`).
    fn adapter_ready(&self, slot: u32) -> bool {
        self.lora.is_occupied(slot as usize)
    }

    fn launch(
        &mut self,
        meta: &StepMeta,
        sampling: &[RowSampling],
        want_logits: bool,
    ) -> Result<(), ExecutorError> {
        if self.pending.is_some() {
            return Err("a step is already in flight".to_string().into());
        }
        if sampling.len() != meta.logit_rows.len() {
            return Err(format!(
                "{} sampling rows for {} logit rows",
                sampling.len(),
                meta.logit_rows.len()
            )
            .into());
        }
        // Adapters copied in since their last step join the arena (once each).
        if self.model.arena_rows().iter().any(|&r| r > 0) {
            for (_, _, slot) in meta.segments.iter() {
                if !self.lora.in_arena(slot as usize) {
                    self.model.place_in_arena(&mut self.lora, slot as usize)?;
                }
            }
        }
        let started = Instant::now();
        let logits = self.model.forward_device(meta, &mut self.kv, &self.lora)?;
        self.sampling.clear();
        self.sampling.extend_from_slice(sampling);
        self.pending = Some(Pending {
            logits,
            want_logits,
            rows: meta.rows(),
            started,
            enqueued: started.elapsed(),
        });
        Ok(())
    }

    fn step_done(&self) -> bool {
        self.model.backend().step_done()
    }

    fn finish(&mut self) -> Result<StepOutput<'_>, ExecutorError> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| "no step in flight".to_string())?;
        self.picks.clear();
        self.logits.clear();
        if let Some(logits) = &p.logits {
            let b = self.model.backend();
            let vocab = self.model.config().vocab_size;
            b.sample(logits, vocab, &self.sampling, &mut self.picks)?;
            if p.want_logits {
                self.logits = b.download(logits)?;
                // A padded decode step has the padding rows' logits after the real ones.
                self.logits.truncate(self.sampling.len() * vocab);
            }
            self.timing.record(p.rows, p.started, p.enqueued);
        }
        Ok(StepOutput {
            picks: &self.picks,
            logits: p.want_logits.then_some(self.logits.as_slice()),
            path: self.model.backend().last_step_path(),
        })
    }
}

impl<B: Backend> HostAdapter for StagedAdapter<B> {
    fn host_bytes(&self) -> usize {
        self.bytes()
    }
}

/// The backend an engine's executor runs on, set by the executor's builder once it exists, so
/// that the adapter loaders can stage adapters for it.
pub type BackendCell<B> = Arc<OnceLock<Arc<B>>>;

/// Validates fetched PEFT files against the base model and stages them for the backend in
/// `cell` (runs on the adapter loader threads).
pub fn peft_validator<B: Backend>(
    base: LlamaConfig,
    cell: BackendCell<B>,
) -> Validator<StagedAdapter<B>> {
    Arc::new(move |key: &AdapterKey, files: AdapterFiles| {
        let started = std::time::Instant::now();
        let weights = LoraWeights::from_shared(&files.config, &files.weights, &base)
            .map_err(|e| e.to_string())?;
        let validated = started.elapsed();
        let backend = cell
            .get()
            .ok_or_else(|| "the engine's device is not ready".to_string())?;
        let staged = StagedAdapter::stage(backend.as_ref(), &weights).map_err(|e| e.to_string());
        tracing::debug!(
            adapter = %key.id,
            validate_ms = validated.as_secs_f64() * 1e3,
            stage_ms = (started.elapsed() - validated).as_secs_f64() * 1e3,
            blob_bytes = files.weights.len(),
            "adapter validated and staged"
        );
        staged
    })
}

impl TextDecoder for DecodeStream {
    fn push(&mut self, token: u32) -> Result<Option<String>, String> {
        DecodeStream::push(self, token).map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<Option<String>, String> {
        DecodeStream::finish(self).map_err(|e| e.to_string())
    }
}

impl Detokenizer for Tokenizer {
    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(self.decode_stream(true))
    }
}
