//! Tenants and their quotas.

use sqlx::FromRow;
use time::OffsetDateTime;

use super::{Store, StoreError, map_unique, opt_u64, to_i64};
use crate::domain::{Quotas, TenantId, TenantName};

/// A tenant with its limits.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: TenantName,
    pub quotas: Quotas,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(FromRow)]
struct TenantRow {
    id: TenantId,
    name: String,
    created_at: OffsetDateTime,
    max_adapters: Option<i64>,
    max_adapter_bytes: Option<i64>,
    max_concurrent_streams: Option<i64>,
    tokens_per_minute: Option<i64>,
    tokens_per_day: Option<i64>,
}

/// The tenant columns in `TenantRow` order, as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, name, created_at, max_adapters, max_adapter_bytes, \
         max_concurrent_streams, tokens_per_minute, tokens_per_day"
    };
}

impl TryFrom<TenantRow> for Tenant {
    type Error = StoreError;
    fn try_from(r: TenantRow) -> Result<Tenant, StoreError> {
        Ok(Tenant {
            id: r.id,
            name: TenantName::parse(r.name).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            quotas: Quotas {
                max_adapters: opt_u64(r.max_adapters),
                max_adapter_bytes: opt_u64(r.max_adapter_bytes),
                max_concurrent_streams: opt_u64(r.max_concurrent_streams),
                tokens_per_minute: opt_u64(r.tokens_per_minute),
                tokens_per_day: opt_u64(r.tokens_per_day),
            },
            created_at: r.created_at,
        })
    }
}

fn quota_arg(v: Option<u64>) -> Option<i64> {
    v.map(to_i64)
}

impl Store {
    /// Creates a tenant. `Conflict` when the name is taken.
    pub async fn create_tenant(
        &self,
        name: &TenantName,
        quotas: &Quotas,
    ) -> Result<Tenant, StoreError> {
        let row: TenantRow = sqlx::query_as(
            "INSERT INTO tenants (id, name, max_adapters, max_adapter_bytes, \
             max_concurrent_streams, tokens_per_minute, tokens_per_day) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             RETURNING id, name, created_at, max_adapters, max_adapter_bytes, \
             max_concurrent_streams, tokens_per_minute, tokens_per_day",
        )
        .bind(TenantId::new())
        .bind(name.as_str())
        .bind(quota_arg(quotas.max_adapters))
        .bind(quota_arg(quotas.max_adapter_bytes))
        .bind(quota_arg(quotas.max_concurrent_streams))
        .bind(quota_arg(quotas.tokens_per_minute))
        .bind(quota_arg(quotas.tokens_per_day))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_unique(e, "tenant"))?;
        row.try_into()
    }

    /// One tenant by id.
    pub async fn get_tenant(&self, id: TenantId) -> Result<Tenant, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(StoreError::NotFound { what: "tenant" })?
            .try_into()
    }

    /// One tenant by name.
    pub async fn get_tenant_by_name(&self, name: &TenantName) -> Result<Tenant, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM tenants WHERE name = $1"
        ))
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(StoreError::NotFound { what: "tenant" })?
            .try_into()
    }

    /// Every tenant, oldest first.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows: Vec<TenantRow> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM tenants ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Tenant::try_from).collect()
    }

    /// Renames a tenant. `Conflict` when the new name is taken.
    pub async fn rename_tenant(
        &self,
        id: TenantId,
        name: &TenantName,
    ) -> Result<Tenant, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(concat!(
            "UPDATE tenants SET name = $2 WHERE id = $1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id)
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_unique(e, "tenant"))?;
        row.ok_or(StoreError::NotFound { what: "tenant" })?
            .try_into()
    }

    /// Replaces all of a tenant's quotas (`None` = unlimited).
    pub async fn set_quotas(&self, id: TenantId, quotas: &Quotas) -> Result<Tenant, StoreError> {
        let row: Option<TenantRow> = sqlx::query_as(concat!(
            "UPDATE tenants SET max_adapters = $2, max_adapter_bytes = $3, \
             max_concurrent_streams = $4, tokens_per_minute = $5, tokens_per_day = $6 \
             WHERE id = $1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id)
        .bind(quota_arg(quotas.max_adapters))
        .bind(quota_arg(quotas.max_adapter_bytes))
        .bind(quota_arg(quotas.max_concurrent_streams))
        .bind(quota_arg(quotas.tokens_per_minute))
        .bind(quota_arg(quotas.tokens_per_day))
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(StoreError::NotFound { what: "tenant" })?
            .try_into()
    }

    /// Deletes a tenant and, by cascade, its users, keys, adapters, usage, windows and leases.
    /// Returns the blob keys its adapter versions referenced, so the caller can delete blobs no
    /// other tenant still uses (see [`Store::blob_in_use`]).
    pub async fn delete_tenant(&self, id: TenantId) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let blobs: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT blob_key FROM adapter_versions WHERE tenant_id = $1",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound { what: "tenant" });
        }
        tx.commit().await?;
        Ok(blobs)
    }
}
