//! Tenant API keys: stored as SHA-256 hash + public prefix; looked up by prefix.

use sqlx::FromRow;
use time::OffsetDateTime;

use super::{Store, StoreError, map_unique};
use crate::domain::{ApiKey, ApiKeyHash, ApiKeyId, TenantId};

/// An API key as listed (never the secret).
#[derive(Clone, Debug, PartialEq, serde::Serialize, FromRow)]
pub struct ApiKeyInfo {
    pub id: ApiKeyId,
    pub tenant_id: TenantId,
    pub prefix: String,
    pub label: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// The result of a successful key check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthenticatedKey {
    pub key_id: ApiKeyId,
    pub tenant_id: TenantId,
}

#[derive(FromRow)]
struct KeyLookup {
    id: ApiKeyId,
    tenant_id: TenantId,
    hash: Vec<u8>,
}

/// Longest accepted key label.
pub const MAX_LABEL_LEN: usize = 200;

impl Store {
    /// Creates a key for a tenant and returns it; the secret exists only in this return value.
    /// `NotFound` when the tenant does not exist.
    pub async fn create_api_key(
        &self,
        tenant: TenantId,
        label: &str,
    ) -> Result<(ApiKeyInfo, ApiKey), StoreError> {
        let label: String = label.chars().take(MAX_LABEL_LEN).collect();
        // Prefixes carry 60 random bits; a collision is astronomically rare but costs only a retry.
        for _ in 0..3 {
            let key = ApiKey::generate();
            let res: Result<Option<ApiKeyInfo>, _> = sqlx::query_as(
                "INSERT INTO api_keys (id, tenant_id, prefix, hash, label) \
                 SELECT $1, t.id, $3, $4, $5 FROM tenants t WHERE t.id = $2 \
                 RETURNING id, tenant_id, prefix, label, created_at, last_used_at, revoked_at",
            )
            .bind(ApiKeyId::new())
            .bind(tenant)
            .bind(key.prefix())
            .bind(&key.hash().0[..])
            .bind(&label)
            .fetch_optional(&self.pool)
            .await;
            match res {
                Ok(Some(info)) => return Ok((info, key)),
                Ok(None) => return Err(StoreError::NotFound { what: "tenant" }),
                Err(e) => match map_unique(e, "api key") {
                    StoreError::Conflict { .. } => continue,
                    other => return Err(other),
                },
            }
        }
        Err(StoreError::Conflict { what: "api key" })
    }

    /// A tenant's keys, newest first, revoked ones included.
    pub async fn list_api_keys(&self, tenant: TenantId) -> Result<Vec<ApiKeyInfo>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, tenant_id, prefix, label, created_at, last_used_at, revoked_at \
             FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, prefix",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes one of a tenant's keys (idempotent). `NotFound` when it is not that tenant's.
    pub async fn revoke_api_key(&self, tenant: TenantId, key: ApiKeyId) -> Result<(), StoreError> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(key)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound { what: "api key" });
        }
        Ok(())
    }

    /// Resolves a presented key to its tenant; `None` for unknown, wrong or revoked keys.
    /// Updates `last_used_at` at most once a minute per key to keep writes off the hot path.
    pub async fn authenticate_api_key(
        &self,
        key: &ApiKey,
    ) -> Result<Option<AuthenticatedKey>, StoreError> {
        let row: Option<KeyLookup> = sqlx::query_as(
            "SELECT id, tenant_id, hash FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL",
        )
        .bind(key.prefix())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let stored = ApiKeyHash::from_slice(&row.hash)
            .ok_or_else(|| StoreError::Corrupt(format!("api key {} hash length", row.id)))?;
        if !stored.matches(&key.hash()) {
            return Ok(None);
        }
        sqlx::query(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1 \
             AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        )
        .bind(row.id)
        .execute(&self.pool)
        .await?;
        Ok(Some(AuthenticatedKey {
            key_id: row.id,
            tenant_id: row.tenant_id,
        }))
    }
}
