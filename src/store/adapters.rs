//! Adapters (names in a tenant's namespace) and their immutable versions.
//!
//! Uploading an existing name adds a version; resolving a name gives its newest ready version,
//! so a request keeps the version it resolved even if a newer one lands meanwhile. Deleting an
//! adapter frees its name and marks its versions deleted; rows stay for the usage ledger.

use sqlx::FromRow;
use time::OffsetDateTime;

use super::{Store, StoreError, to_i64, to_u64};
use crate::domain::{AdapterId, AdapterName, AdapterVersionId, TenantId};

/// Lifecycle of a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterStatus {
    /// Servable.
    Ready,
    /// Its adapter was deleted; the blob may be gone.
    Deleted,
}

impl AdapterStatus {
    fn parse(s: &str) -> Result<AdapterStatus, StoreError> {
        match s {
            "ready" => Ok(AdapterStatus::Ready),
            "deleted" => Ok(AdapterStatus::Deleted),
            other => Err(StoreError::Corrupt(format!("adapter status `{other}`"))),
        }
    }
}

/// What an upload stores about a validated adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAdapterVersion {
    /// LoRA rank `r` (the largest one when `rank_pattern` varies it per module).
    pub rank: u32,
    /// `lora_alpha` from the adapter config.
    pub alpha: f64,
    pub target_modules: Vec<String>,
    /// Element type of the stored weights (`float16`, `bfloat16`, `float32`).
    pub dtype: String,
    pub size_bytes: u64,
    /// Hex SHA-256 of the stored blob.
    pub sha256: String,
    /// Where the blob store keeps the weights.
    pub blob_key: String,
}

/// One version of an adapter, with the adapter's name.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdapterVersion {
    pub id: AdapterVersionId,
    pub adapter_id: AdapterId,
    pub tenant_id: TenantId,
    pub name: AdapterName,
    /// 1 for the first upload of a name, then +1 per re-upload.
    pub version: u32,
    pub rank: u32,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub dtype: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub blob_key: String,
    pub status: AdapterStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(FromRow)]
struct VersionRow {
    id: AdapterVersionId,
    adapter_id: AdapterId,
    tenant_id: TenantId,
    name: String,
    version: i32,
    rank: i32,
    alpha: f64,
    target_modules: Vec<String>,
    dtype: String,
    size_bytes: i64,
    sha256: String,
    blob_key: String,
    status: String,
    created_at: OffsetDateTime,
}

impl TryFrom<VersionRow> for AdapterVersion {
    type Error = StoreError;
    fn try_from(r: VersionRow) -> Result<Self, StoreError> {
        Ok(AdapterVersion {
            id: r.id,
            adapter_id: r.adapter_id,
            tenant_id: r.tenant_id,
            name: AdapterName::parse(r.name).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            version: u32::try_from(r.version).unwrap_or(0),
            rank: u32::try_from(r.rank).unwrap_or(0),
            alpha: r.alpha,
            target_modules: r.target_modules,
            dtype: r.dtype,
            size_bytes: to_u64(r.size_bytes),
            sha256: r.sha256,
            blob_key: r.blob_key,
            status: AdapterStatus::parse(&r.status)?,
            created_at: r.created_at,
        })
    }
}

/// Version columns joined with the adapter's name (`v` = adapter_versions, `a` = adapters).
macro_rules! select_versions {
    ($($rest:literal)*) => {
        concat!(
            "SELECT v.id, v.adapter_id, v.tenant_id, a.name, v.version, v.rank, v.alpha, \
             v.target_modules, v.dtype, v.size_bytes, v.sha256, v.blob_key, v.status, v.created_at \
             FROM adapter_versions v JOIN adapters a ON a.id = v.adapter_id ",
            $($rest),*
        )
    };
}

fn convert(rows: Vec<VersionRow>) -> Result<Vec<AdapterVersion>, StoreError> {
    rows.into_iter().map(AdapterVersion::try_from).collect()
}

#[derive(FromRow)]
struct AdapterQuotaRow {
    max_adapters: Option<i64>,
    max_adapter_bytes: Option<i64>,
}

impl Store {
    /// Stores a new version of `name` for `tenant` (creating the adapter when the name is new),
    /// enforcing `max_adapters` and `max_adapter_bytes` atomically: the tenant row is locked for
    /// the transaction, so concurrent uploads on any replica are serialised per tenant.
    ///
    /// `max_adapter_bytes` counts the newest ready version of each live adapter (what the tenant
    /// serves); the version being replaced does not count against its successor.
    pub async fn create_adapter_version(
        &self,
        tenant: TenantId,
        name: &AdapterName,
        new: &NewAdapterVersion,
    ) -> Result<AdapterVersion, StoreError> {
        let mut tx = self.pool.begin().await?;
        let quotas: Option<AdapterQuotaRow> = sqlx::query_as(
            "SELECT max_adapters, max_adapter_bytes FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let quotas = quotas.ok_or(StoreError::NotFound { what: "tenant" })?;

        let existing: Option<AdapterId> = sqlx::query_scalar(
            "SELECT id FROM adapters WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL",
        )
        .bind(tenant)
        .bind(name.as_str())
        .fetch_optional(&mut *tx)
        .await?;

        if existing.is_none()
            && let Some(limit) = quotas.max_adapters
        {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM adapters WHERE tenant_id = $1 AND deleted_at IS NULL",
            )
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
            if live >= limit {
                return Err(StoreError::QuotaExceeded {
                    quota: "max_adapters",
                    limit: to_u64(limit),
                    current: to_u64(live),
                    requested: 1,
                });
            }
        }

        if let Some(limit) = quotas.max_adapter_bytes {
            let others: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(latest.size_bytes), 0)::bigint FROM adapters a \
                 CROSS JOIN LATERAL (SELECT size_bytes FROM adapter_versions \
                     WHERE adapter_id = a.id AND status = 'ready' \
                     ORDER BY version DESC LIMIT 1) latest \
                 WHERE a.tenant_id = $1 AND a.deleted_at IS NULL \
                 AND a.id IS DISTINCT FROM $2",
            )
            .bind(tenant)
            .bind(existing)
            .fetch_one(&mut *tx)
            .await?;
            if to_u64(others).saturating_add(new.size_bytes) > to_u64(limit) {
                return Err(StoreError::QuotaExceeded {
                    quota: "max_adapter_bytes",
                    limit: to_u64(limit),
                    current: to_u64(others),
                    requested: new.size_bytes,
                });
            }
        }

        let adapter_id =
            match existing {
                Some(id) => id,
                None => sqlx::query_scalar(
                    "INSERT INTO adapters (id, tenant_id, name) VALUES ($1, $2, $3) RETURNING id",
                )
                .bind(AdapterId::new())
                .bind(tenant)
                .bind(name.as_str())
                .fetch_one(&mut *tx)
                .await?,
            };

        let version_id: AdapterVersionId = sqlx::query_scalar(
            "INSERT INTO adapter_versions (id, adapter_id, tenant_id, version, rank, alpha, \
             target_modules, dtype, size_bytes, sha256, blob_key, status) \
             SELECT $1, $2, $3, coalesce(max(version), 0) + 1, $4, $5, $6, $7, $8, $9, $10, 'ready' \
             FROM adapter_versions WHERE adapter_id = $2 \
             RETURNING id",
        )
        .bind(AdapterVersionId::new())
        .bind(adapter_id)
        .bind(tenant)
        .bind(i32::try_from(new.rank).unwrap_or(i32::MAX))
        .bind(new.alpha)
        .bind(&new.target_modules)
        .bind(&new.dtype)
        .bind(to_i64(new.size_bytes))
        .bind(&new.sha256)
        .bind(&new.blob_key)
        .fetch_one(&mut *tx)
        .await?;

        let row: VersionRow = sqlx::query_as(select_versions!("WHERE v.id = $1"))
            .bind(version_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        row.try_into()
    }

    /// The newest ready version of each of the tenant's live adapters, by name.
    pub async fn list_adapters(&self, tenant: TenantId) -> Result<Vec<AdapterVersion>, StoreError> {
        let rows: Vec<VersionRow> = sqlx::query_as(select_versions!(
            "WHERE a.tenant_id = $1 AND a.deleted_at IS NULL AND v.status = 'ready' "
            "ORDER BY a.name, v.version DESC"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        // Rows come newest first per name; keep the first of each.
        let mut out: Vec<AdapterVersion> = Vec::new();
        for v in convert(rows)? {
            if out.last().is_none_or(|last| last.name != v.name) {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Resolves a name in the tenant's namespace to its newest ready version.
    pub async fn get_adapter(
        &self,
        tenant: TenantId,
        name: &AdapterName,
    ) -> Result<AdapterVersion, StoreError> {
        let row: Option<VersionRow> = sqlx::query_as(select_versions!(
            "WHERE a.tenant_id = $1 AND a.name = $2 AND a.deleted_at IS NULL "
            "AND v.status = 'ready' ORDER BY v.version DESC LIMIT 1"
        ))
        .bind(tenant)
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(StoreError::NotFound { what: "adapter" })?
            .try_into()
    }

    /// Every version of a live adapter, newest first.
    pub async fn list_adapter_versions(
        &self,
        tenant: TenantId,
        name: &AdapterName,
    ) -> Result<Vec<AdapterVersion>, StoreError> {
        let rows: Vec<VersionRow> = sqlx::query_as(select_versions!(
            "WHERE a.tenant_id = $1 AND a.name = $2 AND a.deleted_at IS NULL "
            "ORDER BY v.version DESC"
        ))
        .bind(tenant)
        .bind(name.as_str())
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Err(StoreError::NotFound { what: "adapter" });
        }
        convert(rows)
    }

    /// One version by id, whatever its status (the engine loads by version id).
    pub async fn get_adapter_version(
        &self,
        tenant: TenantId,
        id: AdapterVersionId,
    ) -> Result<AdapterVersion, StoreError> {
        let row: Option<VersionRow> =
            sqlx::query_as(select_versions!("WHERE v.tenant_id = $1 AND v.id = $2"))
                .bind(tenant)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.ok_or(StoreError::NotFound {
            what: "adapter version",
        })?
        .try_into()
    }

    /// Deletes a live adapter: frees its name and marks its versions deleted. Returns those
    /// versions so the caller can drop cached weights and unreferenced blobs.
    pub async fn delete_adapter(
        &self,
        tenant: TenantId,
        name: &AdapterName,
    ) -> Result<Vec<AdapterVersion>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<AdapterId> = sqlx::query_scalar(
            "UPDATE adapters SET deleted_at = now() \
             WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL RETURNING id",
        )
        .bind(tenant)
        .bind(name.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let id = id.ok_or(StoreError::NotFound { what: "adapter" })?;
        sqlx::query(
            "UPDATE adapter_versions SET status = 'deleted' WHERE tenant_id = $1 AND adapter_id = $2",
        )
        .bind(tenant)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<VersionRow> = sqlx::query_as(select_versions!(
            "WHERE v.tenant_id = $1 AND v.adapter_id = $2 ORDER BY v.version DESC"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        convert(rows)
    }

    /// Take the cluster-wide lock of `blob_key` (a transaction-scoped advisory lock, so every
    /// replica sees it and a dropped holder releases it). Deleting a blob ("no ready version
    /// references it" + delete) and re-storing it after an upload's commit ("is it there" +
    /// put) each hold it, so a delete can never remove bytes a version committed meanwhile.
    pub async fn lock_blob(&self, blob_key: &str) -> Result<BlobLock, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('punica-blob:' || $1))")
            .bind(blob_key)
            .execute(&mut *tx)
            .await?;
        Ok(BlobLock {
            tx,
            key: blob_key.to_owned(),
        })
    }

    /// Whether any ready version (of any tenant: blobs are content-addressed and shared) still
    /// references `blob_key`.
    pub async fn blob_in_use(&self, blob_key: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(BLOB_IN_USE)
            .bind(blob_key)
            .fetch_one(&self.pool)
            .await?)
    }
}

/// Whether a ready version references blob `$1`.
const BLOB_IN_USE: &str =
    "SELECT EXISTS (SELECT 1 FROM adapter_versions WHERE blob_key = $1 AND status = 'ready')";

/// The held lock of one blob key (see [`Store::lock_blob`]); released by [`BlobLock::release`]
/// or when dropped.
pub struct BlobLock {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    key: String,
}

impl BlobLock {
    /// Whether a ready version references the locked blob, read under the lock.
    pub async fn in_use(&mut self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(BLOB_IN_USE)
            .bind(&self.key)
            .fetch_one(&mut *self.tx)
            .await?)
    }

    /// Release the lock.
    pub async fn release(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
