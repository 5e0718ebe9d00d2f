//! The tenant's adapters: `POST /api/v1/adapters` (multipart upload), `GET /api/v1/adapters`,
//! `GET|DELETE /api/v1/adapters/{name}`.
//!
//! An upload never holds the weights in memory: the safetensors part streams into a bundle file
//! under `<data dir>/uploads/<random>/` while its SHA-256 is computed, the size limit is
//! enforced as bytes arrive (413), the finished bundle is memory-mapped for validation against
//! the base model (422 with the validator's precise reason), stored in the blob store under its
//! content address, and only then recorded, in one transaction that also enforces the tenant's
//! adapter quotas. Until that commit nothing is visible; the spool directory is removed however
//! the request ends, and a blob stored by an upload that dies before its commit is removed by
//! the registry's sweep.

use std::path::{Path, PathBuf};

use actix_multipart::Multipart;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use crate::api::adapter_registry::bundle_trailer;
use crate::api::auth::TenantContext;
use crate::api::error::ApiError;
use crate::api::state::ServiceState;
use crate::domain::AdapterName;
use crate::engine::lora::peft::LoraWeights;
use crate::store::{AdapterVersion, NewAdapterVersion, StoreError};

/// The multipart field (or file name) of the adapter's config.
pub const CONFIG_FIELD: &str = "adapter_config.json";
/// The multipart field (or file name) of the adapter's weights.
pub const WEIGHTS_FIELD: &str = "adapter_model.safetensors";
/// Largest accepted `adapter_config.json`.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Largest accepted `name` field.
const MAX_NAME_BYTES: usize = 256;
/// Room for multipart boundaries and headers on top of the files themselves.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// Registers the tenant's adapter routes (mounted under `/api/v1`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/adapters")
            .route(web::post().to(upload))
            .route(web::get().to(list)),
    )
    .service(
        web::resource("/adapters/{name}")
            .route(web::get().to(get))
            .route(web::delete().to(delete)),
    );
}

/// An adapter version as the API shows it.
#[derive(Debug, Serialize)]
pub struct AdapterView {
    pub name: String,
    pub version: u32,
    pub rank: u32,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub dtype: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub status: crate::store::AdapterStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<AdapterVersion> for AdapterView {
    fn from(v: AdapterVersion) -> Self {
        AdapterView {
            name: v.name.as_str().to_owned(),
            version: v.version,
            rank: v.rank,
            alpha: v.alpha,
            target_modules: v.target_modules,
            dtype: v.dtype,
            size_bytes: v.size_bytes,
            sha256: v.sha256,
            status: v.status,
            created_at: v.created_at,
        }
    }
}

/// The spool directory of one upload; removed when dropped, however the upload ended.
struct Spool {
    dir: PathBuf,
}

impl Spool {
    fn create(root: &Path) -> Result<Spool, ApiError> {
        let dir = root.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::internal(anyhow::anyhow!("creating spool dir {}: {e}", dir.display()))
        })?;
        Ok(Spool { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %self.dir.display(), "removing an upload spool failed");
        }
    }
}

/// Removes every spool left by a previous run (a crash mid-upload); call before serving.
pub fn clear_spools(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    std::fs::create_dir_all(root)
}

/// What the multipart body held, after streaming.
struct Received {
    name: String,
    config: Vec<u8>,
    weights_len: u64,
    bundle_path: PathBuf,
    bundle_len: u64,
    sha256: String,
}

fn multipart_error(error: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidRequest(format!("malformed multipart body: {error}"))
}

/// Which of the expected parts a field is, by field name or file name.
fn part_of(field: &actix_multipart::Field) -> Option<&'static str> {
    let disposition = field.content_disposition();
    let names = [
        disposition.and_then(|d| d.get_name()),
        disposition.and_then(|d| d.get_filename()),
    ];
    for candidate in names.into_iter().flatten() {
        match candidate {
            "name" => return Some("name"),
            CONFIG_FIELD => return Some(CONFIG_FIELD),
            WEIGHTS_FIELD => return Some(WEIGHTS_FIELD),
            _ => {}
        }
    }
    None
}

/// Streams the multipart body: weights into the bundle file (hashing as they pass), config and
/// name into memory (both small and capped).
async fn receive(
    mut multipart: Multipart,
    spool: &Spool,
    limit: u64,
) -> Result<Received, ApiError> {
    let too_large = || ApiError::PayloadTooLarge { limit };
    let bundle_path = spool.path("bundle");
    let mut bundle = tokio::fs::File::create(&bundle_path)
        .await
        .map_err(ApiError::internal)?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut name: Option<String> = None;
    let mut config: Option<Vec<u8>> = None;
    let mut weights_len: Option<u64> = None;
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(multipart_error)?;
        let Some(part) = part_of(&field) else {
            let label = field
                .content_disposition()
                .and_then(|d| d.get_name())
                .unwrap_or("")
                .to_owned();
            return Err(ApiError::InvalidRequest(format!(
                "unexpected form field '{label}': send `name`, `{CONFIG_FIELD}` and `{WEIGHTS_FIELD}`"
            )));
        };
        let seen = match part {
            "name" => name.is_some(),
            CONFIG_FIELD => config.is_some(),
            _ => weights_len.is_some(),
        };
        if seen {
            return Err(ApiError::InvalidRequest(format!(
                "the form field '{part}' appears twice"
            )));
        }
        let mut small = Vec::new();
        let mut written: u64 = 0;
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(multipart_error)?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large());
            }
            match part {
                WEIGHTS_FIELD => {
                    hasher.update(&chunk);
                    bundle.write_all(&chunk).await.map_err(ApiError::internal)?;
                    written += chunk.len() as u64;
                }
                _ => {
                    let cap = if part == "name" {
                        MAX_NAME_BYTES
                    } else {
                        MAX_CONFIG_BYTES
                    };
                    if small.len() + chunk.len() > cap {
                        return Err(ApiError::InvalidRequest(format!(
                            "the form field '{part}' is larger than {cap} bytes"
                        )));
                    }
                    small.extend_from_slice(&chunk);
                }
            }
        }
        match part {
            "name" => {
                name = Some(String::from_utf8(small).map_err(|_| {
                    ApiError::InvalidRequest("the `name` field is not UTF-8".into())
                })?);
            }
            CONFIG_FIELD => config = Some(small),
            _ => weights_len = Some(written),
        }
    }
    let missing = |field: &str| ApiError::InvalidRequest(format!("missing form field '{field}'"));
    let name = name.ok_or_else(|| missing("name"))?;
    let config = config.ok_or_else(|| missing(CONFIG_FIELD))?;
    let weights_len = weights_len.ok_or_else(|| missing(WEIGHTS_FIELD))?;
    let trailer = bundle_trailer(config.len() as u64, weights_len);
    hasher.update(&config);
    hasher.update(trailer);
    bundle
        .write_all(&config)
        .await
        .map_err(ApiError::internal)?;
    bundle
        .write_all(&trailer)
        .await
        .map_err(ApiError::internal)?;
    bundle.flush().await.map_err(ApiError::internal)?;
    Ok(Received {
        name: name.trim().to_owned(),
        bundle_len: weights_len + config.len() as u64 + trailer.len() as u64,
        config,
        weights_len,
        bundle_path,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// What validation learnt about an adapter.
struct Validated {
    rank: u32,
    alpha: f64,
    target_modules: Vec<String>,
    dtype: String,
}

/// The element type of the tensors in a safetensors file (`float16`, `bfloat16`, `float32`).
fn weights_dtype(weights: &[u8]) -> String {
    let dtype = safetensors::SafeTensors::read_metadata(weights)
        .ok()
        .and_then(|(_, metadata)| metadata.tensors().values().next().map(|info| info.dtype));
    match dtype {
        Some(safetensors::Dtype::F16) => "float16".into(),
        Some(safetensors::Dtype::BF16) => "bfloat16".into(),
        Some(safetensors::Dtype::F32) => "float32".into(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => "unknown".into(),
    }
}

/// Validates the spooled adapter against the base model (on a blocking thread: it reads every
/// value of every tensor).
fn validate(
    config: &[u8],
    weights: &[u8],
    base: &crate::engine::model::config::LlamaConfig,
) -> Result<Validated, ApiError> {
    let lora = LoraWeights::from_bytes(config, weights, base)
        .map_err(|e| ApiError::InvalidAdapter(e.to_string()))?;
    let adapter_config = lora.config();
    Ok(Validated {
        rank: u32::try_from(adapter_config.r).unwrap_or(u32::MAX),
        alpha: adapter_config.lora_alpha,
        target_modules: lora
            .projections()
            .into_iter()
            .map(|p| p.module_name().to_owned())
            .collect(),
        dtype: weights_dtype(weights),
    })
}

/// `POST /api/v1/adapters`.
pub async fn upload(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let limit = state.max_upload_bytes();
    if let Some(length) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit.saturating_add(MULTIPART_OVERHEAD)
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let model = state.model()?;
    let multipart = Multipart::new(req.headers(), payload);
    let spool = Spool::create(state.upload_dir())?;
    let received = receive(multipart, &spool, limit).await?;
    let name = AdapterName::parse(received.name.as_str())
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    if name.as_str() == model.id {
        return Err(ApiError::InvalidRequest(format!(
            "'{}' is the base model's id; choose another adapter name",
            model.id
        )));
    }

    // Validate from a read-only map of the spooled bundle: no copy on the heap.
    let file = std::fs::File::open(&received.bundle_path).map_err(ApiError::internal)?;
    // SAFETY: the spool file is private to this request (a fresh random directory) and is not
    // written again after `receive`, so the mapping cannot change underneath.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(ApiError::internal)?;
    let map = std::sync::Arc::new(map);
    let weights_len = usize::try_from(received.weights_len).map_err(ApiError::internal)?;
    let validated = {
        let map = map.clone();
        let config = received.config.clone();
        let base = model.config.clone();
        web::block(move || validate(&config, &map[..weights_len], &base))
            .await
            .map_err(ApiError::internal)??
    };

    let stored = state
        .blobs
        .put(bytes::Bytes::from_owner(ArcMap(map)))
        .await
        .map_err(ApiError::internal)?;
    if stored.sha256 != received.sha256 || stored.size_bytes != received.bundle_len {
        return Err(ApiError::internal(anyhow::anyhow!(
            "the stored blob ({} bytes, {}) differs from the streamed upload ({} bytes, {})",
            stored.size_bytes,
            stored.sha256,
            received.bundle_len,
            received.sha256
        )));
    }
    let new = NewAdapterVersion {
        rank: validated.rank,
        alpha: validated.alpha,
        target_modules: validated.target_modules,
        dtype: validated.dtype,
        size_bytes: stored.size_bytes,
        sha256: stored.sha256.clone(),
        blob_key: stored.key.clone(),
    };
    let version = match state
        .store
        .create_adapter_version(tenant.tenant_id, &name, &new)
        .await
    {
        Ok(version) => version,
        Err(error) => {
            // Nothing references the blob unless identical bytes are already in use.
            state.adapters.forget_blobs(&[stored.key]).await;
            return Err(match error {
                StoreError::QuotaExceeded {
                    quota,
                    limit,
                    current,
                    requested,
                } => ApiError::QuotaExceeded {
                    message: format!(
                        "quota {quota} exceeded: limit {limit}, in use {current}, this upload {requested}"
                    ),
                    retry_after: None,
                },
                other => other.into(),
            });
        }
    };
    // A concurrent delete of identical bytes may have removed the blob between put and commit:
    // look again under the blob's lock, which deletes also hold (so none can follow this look).
    let lock = state.store.lock_blob(&stored.key).await?;
    if !state.blobs.exists(&stored.key).await.unwrap_or(false) {
        state
            .blobs
            .put(bytes::Bytes::from_owner(ArcMap(std::sync::Arc::new(
                // SAFETY: as above; the spool file is still private and unchanged.
                unsafe { memmap2::Mmap::map(&file) }.map_err(ApiError::internal)?,
            ))))
            .await
            .map_err(ApiError::internal)?;
    }
    lock.release().await?;
    drop(spool);
    state.metrics.upload_accepted(&tenant);
    tracing::info!(
        tenant = %tenant.tenant_id,
        adapter = version.name.as_str(),
        version = version.version,
        bytes = version.size_bytes,
        "adapter uploaded"
    );
    Ok(HttpResponse::Created().json(AdapterView::from(version)))
}

/// A shared memory map as the owner of a `Bytes`.
struct ArcMap(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for ArcMap {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

#[derive(Serialize)]
struct AdapterList {
    adapters: Vec<AdapterView>,
}

/// `GET /api/v1/adapters`.
async fn list(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
) -> Result<HttpResponse, ApiError> {
    let adapters = state.store.list_adapters(tenant.tenant_id).await?;
    Ok(HttpResponse::Ok().json(AdapterList {
        adapters: adapters.into_iter().map(AdapterView::from).collect(),
    }))
}

fn path_name(raw: &str) -> Result<AdapterName, ApiError> {
    AdapterName::parse(raw).map_err(|_| ApiError::AdapterNotFound {
        name: raw.chars().take(80).collect(),
    })
}

fn not_found(name: &AdapterName) -> impl Fn(StoreError) -> ApiError + '_ {
    move |error| match error {
        StoreError::NotFound { .. } => ApiError::AdapterNotFound {
            name: name.as_str().to_owned(),
        },
        other => other.into(),
    }
}

/// One adapter with all its versions.
#[derive(Serialize)]
struct AdapterDetail {
    #[serde(flatten)]
    latest: AdapterView,
    versions: Vec<AdapterView>,
}

/// `GET /api/v1/adapters/{name}`: the newest ready version, plus every version.
async fn get(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = path_name(&path)?;
    let latest = state
        .store
        .get_adapter(tenant.tenant_id, &name)
        .await
        .map_err(not_found(&name))?;
    let versions = state
        .store
        .list_adapter_versions(tenant.tenant_id, &name)
        .await
        .map_err(not_found(&name))?;
    Ok(HttpResponse::Ok().json(AdapterDetail {
        latest: latest.into(),
        versions: versions.into_iter().map(AdapterView::from).collect(),
    }))
}

/// `DELETE /api/v1/adapters/{name}`: gone for new requests at once; running ones finish on
/// their version, whose blob goes when they end.
pub async fn delete(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = path_name(&path)?;
    let versions = state
        .store
        .delete_adapter(tenant.tenant_id, &name)
        .await
        .map_err(not_found(&name))?;
    let mut blob_keys: Vec<String> = versions.into_iter().map(|v| v.blob_key).collect();
    blob_keys.sort();
    blob_keys.dedup();
    state.adapters.forget_blobs(&blob_keys).await;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spools_are_removed_when_dropped() {
        let root = std::env::temp_dir().join(format!("punica-spool-{}", uuid::Uuid::new_v4()));
        let spool = Spool::create(&root).unwrap();
        std::fs::write(spool.path("bundle"), b"partial").unwrap();
        let dir = spool.dir.clone();
        drop(spool);
        assert!(!dir.exists());
        clear_spools(&root).unwrap();
        assert!(root.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_dtype_of_a_safetensors_file_is_read_from_its_header() {
        let data = vec![0u8; 8];
        let tensor =
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2, 2], &data)
                .unwrap();
        let bytes = safetensors::serialize([("a", tensor)], None).unwrap();
        assert_eq!(weights_dtype(&bytes), "bfloat16");
        assert_eq!(weights_dtype(b"garbage"), "unknown");
    }
}
