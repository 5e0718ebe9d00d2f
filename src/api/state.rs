//! What the tenant-facing routes share: the store and blobs, key resolution, the quota gate,
//! the adapter registry, the service metrics and — once it has loaded — the model runtime
//! (engine, tokenizer, base config). Registered as `web::Data<ServiceState>`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use time::OffsetDateTime;

use crate::api::adapter_registry::AdapterRegistry;
use crate::api::auth::Authenticator;
use crate::api::error::ApiError;
use crate::api::quota::QuotaGate;
use crate::api::tenant_metrics::ServiceMetrics;
use crate::blobs::BlobStore;
use crate::config::{Secret, Settings};
use crate::engine::EngineHandle;
use crate::engine::model::config::LlamaConfig;
use crate::engine::model::tokenizer::Tokenizer;
use crate::store::Store;

/// Default `max_tokens` of WebSocket and chat requests that give none.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// The loaded base model and the engine serving it.
pub struct ModelRuntime {
    /// The id clients use as `model` for the base model (the model folder's name).
    pub id: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The base model's shape, which uploaded adapters are validated against.
    pub config: LlamaConfig,
}

impl ModelRuntime {
    /// Tokens one request (prompt + completion) may span: the KV pool and the model's context.
    pub fn context_tokens(&self) -> usize {
        let capacity = self.engine.capacity_tokens();
        match self.config.max_position_embeddings {
            0 => capacity,
            positions => capacity.min(positions),
        }
    }
}

/// Shared state of the service routes.
pub struct ServiceState {
    pub store: Store,
    pub blobs: BlobStore,
    pub auth: Authenticator,
    pub quotas: QuotaGate,
    pub adapters: AdapterRegistry,
    pub metrics: ServiceMetrics,
    model: OnceLock<Arc<ModelRuntime>>,
    /// The base model's id, known from the settings before the model has loaded.
    model_id: String,
    admin_token: Option<Secret<String>>,
    max_upload_bytes: u64,
    upload_dir: PathBuf,
    started_at: OffsetDateTime,
}

impl ServiceState {
    /// State over the given store and blobs; the model arrives later through
    /// [`ServiceState::set_model`].
    pub fn new(
        settings: &Settings,
        store: Store,
        blobs: BlobStore,
        metrics: ServiceMetrics,
    ) -> ServiceState {
        let model_id = settings
            .model
            .as_ref()
            .and_then(|dir| dir.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "none".to_owned());
        ServiceState {
            auth: Authenticator::new(store.clone()),
            quotas: QuotaGate::new(store.clone()),
            adapters: AdapterRegistry::new(store.clone(), blobs.clone()),
            store,
            blobs,
            metrics,
            model: OnceLock::new(),
            model_id,
            admin_token: settings.admin_token.clone(),
            max_upload_bytes: settings.max_upload_bytes,
            upload_dir: settings.data_dir.join("uploads"),
            started_at: OffsetDateTime::now_utc(),
        }
    }

    /// Publishes the loaded model; only the first call has an effect.
    pub fn set_model(&self, model: Arc<ModelRuntime>) {
        let _ = self.model.set(model);
    }

    /// The model runtime, or `overloaded` while it loads (or when none is configured).
    pub fn model(&self) -> Result<Arc<ModelRuntime>, ApiError> {
        self.model.get().cloned().ok_or_else(|| {
            ApiError::Overloaded(
                "no model is loaded yet; retry when /readyz answers 200 (start the service with \
                 --model DIR to serve one)"
                    .into(),
            )
        })
    }

    /// The id clients use as `model` for the base model.
    pub fn model_id(&self) -> &str {
        self.model.get().map_or(&self.model_id, |m| &m.id)
    }

    /// The operator token, when the admin API is enabled.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_ref().map(|t| t.expose().as_str())
    }

    /// Largest accepted adapter upload, in bytes.
    pub fn max_upload_bytes(&self) -> u64 {
        self.max_upload_bytes
    }

    /// Where uploads are spooled before they are validated and stored.
    pub fn upload_dir(&self) -> &std::path::Path {
        &self.upload_dir
    }

    /// When this process started (the `created` of the base model in `/v1/models`).
    pub fn started_at(&self) -> OffsetDateTime {
        self.started_at
    }
}
