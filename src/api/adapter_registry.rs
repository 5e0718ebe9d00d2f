//! Adapters between the API and the engine: name -> pinned version resolution, the stored
//! bundle format, the engine's [`AdapterSource`] over the blob store, and blob lifecycle.
//!
//! An adapter version is stored as one content-addressed blob, a *bundle*: the safetensors
//! weights, then `adapter_config.json`, then a 24-byte trailer (config length, weights length,
//! magic). Weights first lets an upload stream them straight into the bundle while the small
//! config waits in memory, whatever order the multipart fields come in.
//!
//! Deletion marks the adapter deleted at once (new requests get `adapter_not_found`); requests
//! already running keep their version to the end. A blob is removed only when no ready version
//! references it and no request of this process uses it: immediately if idle, else when its
//! last request ends. A periodic sweep removes blobs that lost their last reference in a crash
//! (or were stored by an upload that crashed before its commit) once they are older than
//! [`ORPHAN_GRACE`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::auth::TenantContext;
use crate::api::error::ApiError;
use crate::blobs::{BlobError, BlobStore};
use crate::domain::AdapterName;
use crate::engine::lora::cache::{AdapterFiles, AdapterKey, AdapterLoadError, AdapterSource};
use crate::store::{AdapterVersion, Store, StoreError};

/// Last bytes of every bundle.
pub const BUNDLE_MAGIC: &[u8; 8] = b"PUNLORA1";
/// Bytes of the bundle trailer: config length, weights length (u64 LE each), magic.
pub const BUNDLE_TRAILER: usize = 24;
/// How old an unreferenced blob must be before the sweep removes it (an upload on another
/// replica may have stored it and not committed yet).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);
/// How often the sweep runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// The trailer that closes a bundle whose parts have the given lengths.
pub fn bundle_trailer(config_len: u64, weights_len: u64) -> [u8; BUNDLE_TRAILER] {
    let mut trailer = [0u8; BUNDLE_TRAILER];
    trailer[..8].copy_from_slice(&config_len.to_le_bytes());
    trailer[8..16].copy_from_slice(&weights_len.to_le_bytes());
    trailer[16..].copy_from_slice(BUNDLE_MAGIC);
    trailer
}

/// Splits a bundle into (config, weights); `None` when it is not one.
pub fn split_bundle(bundle: &[u8]) -> Option<(&[u8], &[u8])> {
    let body_len = bundle.len().checked_sub(BUNDLE_TRAILER)?;
    let trailer = &bundle[body_len..];
    if &trailer[16..] != BUNDLE_MAGIC {
        return None;
    }
    let read = |range: std::ops::Range<usize>| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&trailer[range]);
        usize::try_from(u64::from_le_bytes(bytes)).ok()
    };
    let (config_len, weights_len) = (read(0..8)?, read(8..16)?);
    if config_len.checked_add(weights_len)? != body_len {
        return None;
    }
    Some((&bundle[weights_len..body_len], &bundle[..weights_len]))
}

/// The engine's cache key of a stored version.
pub fn adapter_key(version: &AdapterVersion) -> AdapterKey {
    AdapterKey {
        id: version.adapter_id.as_uuid(),
        version: version.version,
    }
}

#[derive(Default)]
struct Local {
    /// Cache key -> blob key of every version this process has resolved.
    locations: HashMap<AdapterKey, String>,
    /// Running requests per blob key.
    in_use: HashMap<String, usize>,
    /// Blobs of deleted adapters waiting for their last request to end.
    doomed: HashSet<String>,
}

struct Inner {
    store: Store,
    blobs: BlobStore,
    local: Mutex<Local>,
}

/// Resolves adapter names, tracks which blobs running requests use, and removes blobs nothing
/// references any more.
#[derive(Clone)]
pub struct AdapterRegistry {
    inner: Arc<Inner>,
}

/// A version pinned for one request: while it lives, the version's blob is not deleted.
pub struct PinnedAdapter {
    pub version: AdapterVersion,
    pub key: AdapterKey,
    registry: AdapterRegistry,
}

impl Drop for PinnedAdapter {
    fn drop(&mut self) {
        self.registry.unpin(&self.version.blob_key);
    }
}

impl AdapterRegistry {
    /// A registry over the store and blobs.
    pub fn new(store: Store, blobs: BlobStore) -> Self {
        AdapterRegistry {
            inner: Arc::new(Inner {
                store,
                blobs,
                local: Mutex::new(Local::default()),
            }),
        }
    }

    /// Resolves `name` in the caller's tenant to its newest ready version and pins it.
    pub async fn resolve(
        &self,
        tenant: &TenantContext,
        name: &str,
    ) -> Result<PinnedAdapter, ApiError> {
        let not_found = || ApiError::AdapterNotFound {
            name: name.to_owned(),
        };
        let parsed = AdapterName::parse(name).map_err(|_| not_found())?;
        let version = match self
            .inner
            .store
            .get_adapter(tenant.tenant_id, &parsed)
            .await
        {
            Ok(version) => version,
            Err(StoreError::NotFound { .. }) => return Err(not_found()),
            Err(other) => return Err(other.into()),
        };
        let key = adapter_key(&version);
        if let Ok(mut local) = self.inner.local.lock() {
            local.locations.insert(key, version.blob_key.clone());
            *local.in_use.entry(version.blob_key.clone()).or_default() += 1;
        }
        Ok(PinnedAdapter {
            version,
            key,
            registry: self.clone(),
        })
    }

    fn unpin(&self, blob_key: &str) {
        let Ok(mut local) = self.inner.local.lock() else {
            return;
        };
        let idle = match local.in_use.get_mut(blob_key) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => true,
        };
        if idle {
            local.in_use.remove(blob_key);
            if local.doomed.remove(blob_key) {
                let registry = self.clone();
                let key = blob_key.to_owned();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { registry.delete_if_unreferenced(&key).await });
                }
            }
        }
    }

    /// Removes the blobs of deleted adapter versions that nothing references any more; blobs a
    /// running request of this process uses go when that request ends.
    pub async fn forget_blobs(&self, blob_keys: &[String]) {
        for key in blob_keys {
            let busy = self
                .inner
                .local
                .lock()
                .map(|mut local| {
                    let busy = local.in_use.get(key).is_some_and(|n| *n > 0);
                    if busy {
                        local.doomed.insert(key.clone());
                    }
                    busy
                })
                .unwrap_or(true);
            if !busy {
                self.delete_if_unreferenced(key).await;
            }
        }
    }

    /// Deletes a blob unless a ready version references it (another tenant may have uploaded
    /// the same bytes) or a local request uses it.
    async fn delete_if_unreferenced(&self, key: &str) {
        let locally_used = self
            .inner
            .local
            .lock()
            .map(|local| local.in_use.get(key).is_some_and(|n| *n > 0))
            .unwrap_or(true);
        if locally_used {
            return;
        }
        match self.delete_under_lock(key).await {
            Ok(true) => tracing::info!(blob = key, "deleted unreferenced adapter blob"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, blob = key, "deleting an unreferenced blob failed")
            }
        }
    }

    /// Under the blob's cluster-wide lock: delete it when no ready version references it.
    /// Returns whether it was deleted.
    async fn delete_under_lock(&self, key: &str) -> Result<bool, String> {
        let mut lock = self
            .inner
            .store
            .lock_blob(key)
            .await
            .map_err(|e| e.to_string())?;
        let unused = !lock.in_use().await.map_err(|e| e.to_string())?;
        if unused {
            self.inner
                .blobs
                .delete(key)
                .await
                .map_err(|e| e.to_string())?;
        }
        lock.release().await.map_err(|e| e.to_string())?;
        Ok(unused)
    }

    /// One sweep: removes blobs older than [`ORPHAN_GRACE`] that no ready version references.
    /// Returns how many went.
    pub async fn sweep_orphans(&self) -> Result<usize, BlobError> {
        let cutoff = time::OffsetDateTime::now_utc() - ORPHAN_GRACE;
        let mut removed = 0;
        for (key, modified) in self.inner.blobs.list().await? {
            if modified > cutoff {
                continue;
            }
            let locally_used = self
                .inner
                .local
                .lock()
                .map(|local| local.in_use.contains_key(&key))
                .unwrap_or(true);
            if locally_used {
                continue;
            }
            match self.delete_under_lock(&key).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, blob = key, "blob sweep stopped");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "swept orphaned adapter blobs");
        }
        Ok(removed)
    }

    /// Runs [`AdapterRegistry::sweep_orphans`] now and every [`SWEEP_EVERY`].
    pub fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SWEEP_EVERY);
            loop {
                ticker.tick().await;
                if let Err(error) = registry.sweep_orphans().await {
                    tracing::warn!(%error, "adapter blob sweep failed");
                }
            }
        })
    }

    /// The engine's view of the blob store. Its `fetch` runs on the engine's loader threads and
    /// blocks them on `runtime`.
    pub fn source(&self, runtime: tokio::runtime::Handle) -> Arc<dyn AdapterSource> {
        Arc::new(BlobSource {
            registry: self.clone(),
            runtime,
        })
    }

    fn location(&self, key: &AdapterKey) -> Option<String> {
        self.inner
            .local
            .lock()
            .ok()
            .and_then(|local| local.locations.get(key).cloned())
    }

    /// Running requests of this process that use a blob (diagnostics).
    pub fn requests_using(&self, blob_key: &str) -> usize {
        self.inner
            .local
            .lock()
            .map(|local| local.in_use.get(blob_key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

struct BlobSource {
    registry: AdapterRegistry,
    runtime: tokio::runtime::Handle,
}

impl AdapterSource for BlobSource {
    fn fetch(&self, key: &AdapterKey) -> Result<AdapterFiles, AdapterLoadError> {
        // Every request resolves (and so locates) its version before the engine sees it.
        let blob_key = self
            .registry
            .location(key)
            .ok_or(AdapterLoadError::NotFound { key: *key })?;
        let bytes = self
            .runtime
            .block_on(self.registry.inner.blobs.get(&blob_key))
            .map_err(|error| match error {
                BlobError::NotFound { .. } => AdapterLoadError::NotFound { key: *key },
                BlobError::Corrupt { .. } => AdapterLoadError::Invalid {
                    key: *key,
                    reason: error.to_string(),
                },
                other => AdapterLoadError::Unreadable {
                    key: *key,
                    reason: other.to_string(),
                },
            })?;
        let (config, weights) = split_bundle(&bytes).ok_or_else(|| AdapterLoadError::Invalid {
            key: *key,
            reason: format!("blob {blob_key} is not an adapter bundle"),
        })?;
        // Views of the fetched blob, not copies of it.
        Ok(AdapterFiles {
            config: bytes.slice_ref(config),
            weights: bytes.slice_ref(weights),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &[u8], weights: &[u8]) -> Vec<u8> {
        let mut out = weights.to_vec();
        out.extend_from_slice(config);
        out.extend_from_slice(&bundle_trailer(config.len() as u64, weights.len() as u64));
        out
    }

    #[test]
    fn a_bundle_splits_back_into_its_two_files() {
        let b = bundle(br#"{"r": 8}"#, b"safetensors bytes");
        let (config, weights) = split_bundle(&b).unwrap();
        assert_eq!(config, br#"{"r": 8}"#);
        assert_eq!(weights, b"safetensors bytes");
    }

    #[test]
    fn truncated_or_foreign_bytes_are_not_a_bundle() {
        let b = bundle(b"{}", b"weights");
        assert!(split_bundle(&b[1..]).is_none());
        assert!(split_bundle(&b[..b.len() - 1]).is_none());
        assert!(split_bundle(b"short").is_none());
        let mut wrong_lengths = b.clone();
        let n = wrong_lengths.len();
        wrong_lengths[n - BUNDLE_TRAILER] ^= 1;
        assert!(split_bundle(&wrong_lengths).is_none());
    }
}
