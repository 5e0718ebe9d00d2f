//! The console's tables: server-side sessions (keyed by the hash of the cookie token) and the
//! failed-login throttle, plus the read-only summaries the console pages show (tenant overview,
//! when each adapter was last used).

use std::collections::HashMap;
use std::time::Duration;

use sqlx::FromRow;
use time::OffsetDateTime;

use super::{Store, StoreError, to_u64};
use crate::domain::{AdapterId, OperatorId, TenantId, UserId};

/// Who a console session belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPrincipal {
    /// A service operator.
    Operator(OperatorId),
    /// A tenant's user; the tenant scopes everything the session can see.
    TenantUser { user: UserId, tenant: TenantId },
}

/// A live session as the console needs it on every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSession {
    pub principal: SessionPrincipal,
    /// The account's email (for the page header).
    pub email: String,
    /// The tenant's name for tenant users.
    pub tenant_name: Option<String>,
    /// The synchronizer token every form of this session must echo.
    pub csrf_token: String,
    pub expires_at: OffsetDateTime,
}

#[derive(FromRow)]
struct SessionRow {
    operator_id: Option<OperatorId>,
    user_id: Option<UserId>,
    tenant_id: Option<TenantId>,
    email: Option<String>,
    tenant_name: Option<String>,
    csrf_token: String,
    expires_at: OffsetDateTime,
    stale: bool,
}

/// One tenant's row on the operator's tenant list.
#[derive(Clone, Debug, PartialEq, Eq, FromRow)]
pub struct TenantOverview {
    pub id: TenantId,
    pub name: String,
    pub created_at: OffsetDateTime,
    pub adapters: i64,
    pub users: i64,
    pub active_keys: i64,
    /// Prompt + completion tokens over the last 24 hours.
    pub tokens_24h: i64,
}

#[derive(FromRow)]
struct LastUsedRow {
    adapter_id: AdapterId,
    last_used: OffsetDateTime,
}

/// How often `last_seen_at` is written for an active session (keeps writes off every click).
const TOUCH_EVERY_SECS: i64 = 60;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    /// Stores a new session under `token_hash` (SHA-256 of the cookie token), valid for `ttl`.
    pub async fn create_console_session(
        &self,
        token_hash: &[u8; 32],
        principal: SessionPrincipal,
        csrf_token: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (operator, user, tenant) = match principal {
            SessionPrincipal::Operator(id) => (Some(id), None, None),
            SessionPrincipal::TenantUser { user, tenant } => (None, Some(user), Some(tenant)),
        };
        sqlx::query(
            "INSERT INTO console_sessions (token_hash, operator_id, user_id, tenant_id, csrf_token, \
             expires_at) VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
        )
        .bind(&token_hash[..])
        .bind(operator)
        .bind(user)
        .bind(tenant)
        .bind(csrf_token)
        .bind(secs(ttl))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The live session for `token_hash`: not expired and seen within `idle`. Refreshes its
    /// last-seen time (at most once a minute). `None` for unknown, expired or idle sessions, and
    /// for sessions whose account has been deleted (the cascade removed them).
    pub async fn console_session(
        &self,
        token_hash: &[u8; 32],
        idle: Duration,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        let row: Option<SessionRow> = sqlx::query_as(
            "SELECT s.operator_id, s.user_id, s.tenant_id, coalesce(o.email, u.email) AS email, \
             t.name AS tenant_name, s.csrf_token, s.expires_at, \
             s.last_seen_at < now() - make_interval(secs => $3) AS stale \
             FROM console_sessions s \
             LEFT JOIN operators o ON o.id = s.operator_id \
             LEFT JOIN tenant_users u ON u.id = s.user_id \
             LEFT JOIN tenants t ON t.id = s.tenant_id \
             WHERE s.token_hash = $1 AND s.expires_at > now() \
             AND s.last_seen_at > now() - make_interval(secs => $2)",
        )
        .bind(&token_hash[..])
        .bind(secs(idle))
        .bind(TOUCH_EVERY_SECS as f64)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let principal = match (row.operator_id, row.user_id, row.tenant_id) {
            (Some(op), None, None) => SessionPrincipal::Operator(op),
            (None, Some(user), Some(tenant)) => SessionPrincipal::TenantUser { user, tenant },
            _ => return Err(StoreError::Corrupt("console session principal".into())),
        };
        if row.stale {
            sqlx::query("UPDATE console_sessions SET last_seen_at = now() WHERE token_hash = $1")
                .bind(&token_hash[..])
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(ConsoleSession {
            principal,
            email: row.email.unwrap_or_default(),
            tenant_name: row.tenant_name,
            csrf_token: row.csrf_token,
            expires_at: row.expires_at,
        }))
    }

    /// Ends a session (logout). Idempotent.
    pub async fn delete_console_session(&self, token_hash: &[u8; 32]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
            .bind(&token_hash[..])
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes expired sessions and login failures older than `failure_window`; returns how
    /// many sessions went.
    pub async fn prune_console_state(&self, failure_window: Duration) -> Result<u64, StoreError> {
        let sessions = sqlx::query("DELETE FROM console_sessions WHERE expires_at <= now()")
            .execute(&self.pool)
            .await?
            .rows_affected();
        sqlx::query(
            "DELETE FROM console_login_failures WHERE failed_at < now() - make_interval(secs => $1)",
        )
        .bind(secs(failure_window))
        .execute(&self.pool)
        .await?;
        Ok(sessions)
    }

    /// Failed logins recorded under `key` within `window`.
    pub async fn recent_login_failures(
        &self,
        key: &str,
        window: Duration,
    ) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM console_login_failures \
             WHERE key = $1 AND failed_at > now() - make_interval(secs => $2)",
        )
        .bind(key)
        .bind(secs(window))
        .fetch_one(&self.pool)
        .await?;
        Ok(to_u64(n))
    }

    /// Seconds until the oldest of the failures under `key` within `window` leaves the window.
    pub async fn login_retry_after(&self, key: &str, window: Duration) -> Result<u64, StoreError> {
        let secs_left: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(failed_at) + make_interval(secs => $2) - now())::float8 \
             FROM console_login_failures \
             WHERE key = $1 AND failed_at > now() - make_interval(secs => $2)",
        )
        .bind(key)
        .bind(secs(window))
        .fetch_one(&self.pool)
        .await?;
        Ok(secs_left.map_or(0, |s| s.max(1.0).ceil() as u64))
    }

    /// Records one failed login under each of `keys`.
    pub async fn record_login_failure(&self, keys: &[String]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO console_login_failures (key) SELECT unnest($1::text[])")
            .bind(keys)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets the failures under `key` (after a successful login).
    pub async fn clear_login_failures(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_login_failures WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every tenant with counts of its live adapters, users, unrevoked keys and last-24h tokens.
    pub async fn tenant_overview(&self) -> Result<Vec<TenantOverview>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT t.id, t.name, t.created_at, \
             (SELECT count(*) FROM adapters a WHERE a.tenant_id = t.id AND a.deleted_at IS NULL) \
                 AS adapters, \
             (SELECT count(*) FROM tenant_users u WHERE u.tenant_id = t.id) AS users, \
             (SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.revoked_at IS NULL) \
                 AS active_keys, \
             (SELECT coalesce(sum(e.prompt_tokens + e.completion_tokens), 0)::bigint \
                 FROM usage_events e WHERE e.tenant_id = t.id \
                 AND e.finished_at > now() - interval '24 hours') AS tokens_24h \
             FROM tenants t ORDER BY t.name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// When each of the tenant's adapters last finished a request (any version).
    pub async fn adapters_last_used(
        &self,
        tenant: TenantId,
    ) -> Result<HashMap<AdapterId, OffsetDateTime>, StoreError> {
        let rows: Vec<LastUsedRow> = sqlx::query_as(
            "SELECT v.adapter_id, max(e.finished_at) AS last_used \
             FROM usage_events e JOIN adapter_versions v ON v.id = e.adapter_version_id \
             WHERE e.tenant_id = $1 GROUP BY v.adapter_id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.adapter_id, r.last_used))
            .collect())
    }
}
