//! Bringing up the service's side of the process: its shared state and metrics, the background
//! tasks (lease renewal, blob sweep, a clean upload spool), and the base model with the engine
//! that serves it, loaded off the async workers while the server already answers `/healthz`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::adapters::clear_spools;
use crate::api::state::{ModelRuntime, ServiceState};
use crate::api::tenant_metrics::ServiceMetrics;
use crate::blobs::BlobStore;
use crate::config::{DeviceChoice, Settings};
use crate::engine::backend::DType;
use crate::engine::backend::cpu::CpuBackend;
use crate::engine::backend::cuda::cuda_available;
use crate::engine::executor::{
    BackendCell, LlamaExecutor, adapter_bytes, cpu_executor, cuda_executor, peft_validator,
};
use crate::engine::metrics::EngineMetrics;
use crate::engine::model::config::LlamaConfig;
use crate::engine::model::llama::Llama;
use crate::engine::model::tokenizer::Tokenizer;
use crate::engine::{EngineConfig, EngineError, EngineHandle};
use crate::startup::{ModelState, Readiness};
use crate::store::Store;

/// KV-cache memory of the CPU engine.
pub const CPU_KV_BYTES: usize = 1 << 30;

/// The GPU keeps room for every adapter slot to hold an adapter of this rank on all seven
/// projections (the KV pool gets the rest of `gpu_memory_fraction`).
pub const CUDA_SLOT_RANK: usize = 64;

/// Why the service's side could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceStartError {
    #[error("service metrics setup failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot prepare the upload spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Builds the shared state, clears the upload spool of a previous run, starts the background
/// tasks and, when a model is configured, its loading. Call inside the runtime.
pub fn start(
    settings: &Settings,
    store: Store,
    blobs: BlobStore,
    registry: &prometheus::Registry,
    readiness: Readiness,
) -> Result<Arc<ServiceState>, ServiceStartError> {
    let metrics = ServiceMetrics::register(registry)?;
    let state = Arc::new(ServiceState::new(settings, store, blobs, metrics));
    clear_spools(state.upload_dir()).map_err(|source| ServiceStartError::Spool {
        path: state.upload_dir().to_owned(),
        source,
    })?;
    state.quotas.spawn_renewer();
    state.adapters.spawn_sweeper();
    if let Some(dir) = settings.model.clone() {
        let engine_metrics = EngineMetrics::register(registry)?;
        let state = state.clone();
        let device = settings.device;
        let memory_fraction = settings.gpu_memory_fraction;
        tokio::spawn(async move {
            let runtime = tokio::runtime::Handle::current();
            let source = state.adapters.source(runtime);
            let loaded = tokio::task::spawn_blocking(move || {
                load_model(&dir, device, memory_fraction, source, engine_metrics)
            })
            .await;
            match loaded {
                Ok(Ok(model)) => {
                    tracing::info!(model = %model.id, "model loaded; serving");
                    state.set_model(Arc::new(model));
                    readiness.set_model(ModelState::Loaded);
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "loading the model failed");
                    readiness.set_model(ModelState::Failed(error.to_string()));
                }
                Err(error) => {
                    tracing::error!(%error, "the model loader panicked");
                    readiness.set_model(ModelState::Failed(error.to_string()));
                }
            }
        });
    }
    Ok(state)
}

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("cannot read {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot load the tokenizer of {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("--device cuda: {0}")]
    NoCuda(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The base model's id: the model folder's name.
pub fn model_id(dir: &Path) -> String {
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned())
}

/// Loads the config, tokenizer and weights of `dir` and starts an engine on them (blocking).
pub fn load_model(
    dir: &Path,
    device: DeviceChoice,
    gpu_memory_fraction: f64,
    source: Arc<dyn crate::engine::lora::cache::AdapterSource>,
    metrics: EngineMetrics,
) -> Result<ModelRuntime, ModelLoadError> {
    let use_cuda = match device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda => {
            cuda_available().map_err(|e| ModelLoadError::NoCuda(e.to_string()))?;
            true
        }
        DeviceChoice::Auto => match cuda_available() {
            Ok(()) => {
                tracing::info!("--device auto: CUDA found, serving on the GPU");
                true
            }
            Err(e) => {
                tracing::info!(reason = %e, "--device auto: serving on the CPU backend");
                false
            }
        },
    };
    let config_path = dir.join("config.json");
    let config = LlamaConfig::from_file(&config_path).map_err(|e| ModelLoadError::Config {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    let tokenizer = Arc::new(
        Tokenizer::from_dir(dir).map_err(|e| ModelLoadError::Tokenizer {
            path: dir.to_owned(),
            message: e.to_string(),
        })?,
    );
    let engine_config = EngineConfig::default();
    let slots = engine_config.cache.device_slots;
    let model_dir = dir.to_owned();
    let engine = if use_cuda {
        let cell = BackendCell::default();
        let validator = peft_validator(config.clone(), Arc::clone(&cell));
        let adapters = slots * adapter_bytes(&config, CUDA_SLOT_RANK, DType::BF16);
        let host_bytes = engine_config.cache.host_bytes;
        let build = move || {
            cuda_executor(
                &cell,
                |b| Llama::load(b, &model_dir),
                slots,
                adapters,
                host_bytes,
                gpu_memory_fraction,
                None,
            )
            .map_err(|e| EngineError::Startup(format!("loading {}: {e}", model_dir.display())))
        };
        EngineHandle::start(
            engine_config,
            build,
            source,
            validator,
            tokenizer.clone(),
            metrics,
        )?
    } else {
        let kv_blocks =
            LlamaExecutor::<CpuBackend>::kv_blocks_for_bytes(&config, DType::F32, CPU_KV_BYTES);
        let cell = BackendCell::default();
        let validator = peft_validator(config.clone(), Arc::clone(&cell));
        let build = move || {
            cpu_executor(&cell, |b| Llama::load(b, &model_dir), slots, kv_blocks)
                .map_err(|e| EngineError::Startup(format!("loading {}: {e}", model_dir.display())))
        };
        EngineHandle::start(
            engine_config,
            build,
            source,
            validator,
            tokenizer.clone(),
            metrics,
        )?
    };
    Ok(ModelRuntime {
        id: model_id(dir),
        engine,
        tokenizer,
        config,
    })
}
