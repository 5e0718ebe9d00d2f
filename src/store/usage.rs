//! The usage ledger (one row per finished request) with its daily rollup, token-rate windows
//! and concurrent-stream leases. The last two are the quota state shared by all replicas.

use std::time::Duration;

use sqlx::FromRow;
use time::{Date, OffsetDateTime, UtcOffset};

use super::{Store, StoreError, opt_u64, to_i64, to_u64};
use crate::domain::{AdapterVersionId, StreamLeaseId, TenantId};

/// One finished request, as written to the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageRecord {
    pub tenant_id: TenantId,
    /// `None` for the base model.
    pub adapter_version_id: Option<AdapterVersionId>,
    pub request_id: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub started_at: OffsetDateTime,
    pub finished_at: OffsetDateTime,
    /// `length` | `stop` | `cancelled` | `error`.
    pub finish_reason: String,
}

/// Usage of one tenant on one UTC day for one adapter (`None` = base model).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UsageDay {
    pub day: Date,
    pub adapter: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(FromRow)]
struct UsageDayRow {
    day: Date,
    adapter: Option<String>,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

/// Tokens taken from a tenant's minute and day windows by [`Store::reserve_tokens`]; hand it
/// back to [`Store::settle_tokens`] with the real count when the request ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenReservation {
    pub tenant_id: TenantId,
    pub tokens: u64,
    pub minute_start: OffsetDateTime,
    pub day_start: OffsetDateTime,
}

#[derive(FromRow)]
struct RateLimits {
    tokens_per_minute: Option<i64>,
    tokens_per_day: Option<i64>,
}

fn window_starts(now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let utc = now.to_offset(UtcOffset::UTC);
    let day = utc.date().midnight().assume_utc();
    let minute =
        day + time::Duration::seconds(i64::from(utc.hour()) * 3600 + i64::from(utc.minute()) * 60);
    (minute, day)
}

fn seconds_until(end: OffsetDateTime, now: OffsetDateTime) -> u64 {
    u64::try_from((end - now).whole_seconds())
        .unwrap_or(0)
        .max(1)
}

impl Store {
    /// Appends one request to the ledger. `NotFound` when the tenant does not exist or the
    /// adapter version is not that tenant's.
    pub async fn record_usage(&self, r: &UsageRecord) -> Result<(), StoreError> {
        let n = sqlx::query(
            "INSERT INTO usage_events (tenant_id, adapter_version_id, request_id, prompt_tokens, \
             completion_tokens, started_at, finished_at, finish_reason) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE EXISTS (SELECT 1 FROM tenants WHERE id = $1) \
             AND ($2::uuid IS NULL OR EXISTS \
                 (SELECT 1 FROM adapter_versions WHERE id = $2 AND tenant_id = $1))",
        )
        .bind(r.tenant_id)
        .bind(r.adapter_version_id)
        .bind(&r.request_id)
        .bind(i32::try_from(r.prompt_tokens).unwrap_or(i32::MAX))
        .bind(i32::try_from(r.completion_tokens).unwrap_or(i32::MAX))
        .bind(r.started_at)
        .bind(r.finished_at)
        .bind(&r.finish_reason)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "tenant or adapter version",
            });
        }
        Ok(())
    }

    /// Requests and tokens per UTC day and adapter for `from..=to` (by finish time), ordered
    /// by day then adapter name, the base model (`None`) first.
    pub async fn usage_daily(
        &self,
        tenant: TenantId,
        from: Date,
        to: Date,
    ) -> Result<Vec<UsageDay>, StoreError> {
        let rows: Vec<UsageDayRow> = sqlx::query_as(
            "SELECT (u.finished_at AT TIME ZONE 'UTC')::date AS day, a.name AS adapter, \
             count(*)::bigint AS requests, \
             coalesce(sum(u.prompt_tokens), 0)::bigint AS prompt_tokens, \
             coalesce(sum(u.completion_tokens), 0)::bigint AS completion_tokens \
             FROM usage_events u \
             LEFT JOIN adapter_versions v ON v.id = u.adapter_version_id \
             LEFT JOIN adapters a ON a.id = v.adapter_id \
             WHERE u.tenant_id = $1 \
             AND u.finished_at >= ($2::date)::timestamp AT TIME ZONE 'UTC' \
             AND u.finished_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC' \
             GROUP BY 1, 2 ORDER BY 1, 2 NULLS FIRST",
        )
        .bind(tenant)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| UsageDay {
                day: r.day,
                adapter: r.adapter,
                requests: to_u64(r.requests),
                prompt_tokens: to_u64(r.prompt_tokens),
                completion_tokens: to_u64(r.completion_tokens),
            })
            .collect())
    }

    /// Takes `tokens` from the tenant's current minute and day windows, or fails with
    /// `RateLimited` and takes nothing. Each window is one conditional `UPDATE ... RETURNING`
    /// inside one transaction, so concurrent callers on any replica never overshoot a limit.
    pub async fn reserve_tokens(
        &self,
        tenant: TenantId,
        tokens: u64,
        now: OffsetDateTime,
    ) -> Result<TokenReservation, StoreError> {
        let (minute_start, day_start) = window_starts(now);
        let mut tx = self.pool.begin().await?;
        let limits: Option<RateLimits> =
            sqlx::query_as("SELECT tokens_per_minute, tokens_per_day FROM tenants WHERE id = $1")
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let limits = limits.ok_or(StoreError::NotFound { what: "tenant" })?;
        for (kind, start, limit, length) in [
            (
                "minute",
                minute_start,
                limits.tokens_per_minute,
                time::Duration::MINUTE,
            ),
            ("day", day_start, limits.tokens_per_day, time::Duration::DAY),
        ] {
            sqlx::query(
                "INSERT INTO token_windows (tenant_id, kind, window_start, tokens) \
                 VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(kind)
            .bind(start)
            .execute(&mut *tx)
            .await?;
            let after: Option<i64> = sqlx::query_scalar(
                "UPDATE token_windows SET tokens = tokens + $4 \
                 WHERE tenant_id = $1 AND kind = $2 AND window_start = $3 \
                 AND ($5::bigint IS NULL OR tokens + $4 <= $5) RETURNING tokens",
            )
            .bind(tenant)
            .bind(kind)
            .bind(start)
            .bind(to_i64(tokens))
            .bind(limit)
            .fetch_optional(&mut *tx)
            .await?;
            if after.is_none() {
                let used: i64 = sqlx::query_scalar(
                    "SELECT tokens FROM token_windows \
                     WHERE tenant_id = $1 AND kind = $2 AND window_start = $3",
                )
                .bind(tenant)
                .bind(kind)
                .bind(start)
                .fetch_one(&mut *tx)
                .await?;
                tx.rollback().await?;
                return Err(StoreError::RateLimited {
                    window: kind,
                    limit: opt_u64(limit).unwrap_or(u64::MAX),
                    used: to_u64(used),
                    requested: tokens,
                    retry_after_secs: seconds_until(start + length, now),
                });
            }
        }
        tx.commit().await?;
        Ok(TokenReservation {
            tenant_id: tenant,
            tokens,
            minute_start,
            day_start,
        })
    }

    /// Corrects a reservation to the tokens really used: gives back the unused part, or adds the
    /// excess (unconditionally: the work is already done).
    pub async fn settle_tokens(
        &self,
        reservation: &TokenReservation,
        used: u64,
    ) -> Result<(), StoreError> {
        let delta = to_i64(used) - to_i64(reservation.tokens);
        if delta == 0 {
            return Ok(());
        }
        sqlx::query(
            "UPDATE token_windows SET tokens = greatest(tokens + $4, 0) \
             WHERE tenant_id = $1 AND ((kind = 'minute' AND window_start = $2) \
                 OR (kind = 'day' AND window_start = $3))",
        )
        .bind(reservation.tenant_id)
        .bind(reservation.minute_start)
        .bind(reservation.day_start)
        .bind(delta)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Tokens counted in the tenant's current (minute, day) windows.
    pub async fn tokens_used(
        &self,
        tenant: TenantId,
        now: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let (minute_start, day_start) = window_starts(now);
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, tokens FROM token_windows WHERE tenant_id = $1 \
             AND ((kind = 'minute' AND window_start = $2) OR (kind = 'day' AND window_start = $3))",
        )
        .bind(tenant)
        .bind(minute_start)
        .bind(day_start)
        .fetch_all(&self.pool)
        .await?;
        let get = |k: &str| {
            rows.iter()
                .find(|(kind, _)| kind == k)
                .map_or(0, |(_, t)| to_u64(*t))
        };
        Ok((get("minute"), get("day")))
    }

    /// Deletes windows that can no longer matter (minute windows older than an hour, day
    /// windows older than two days). Returns how many rows went.
    pub async fn prune_token_windows(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM token_windows WHERE \
             (kind = 'minute' AND window_start < $1 - interval '1 hour') \
             OR (kind = 'day' AND window_start < $1 - interval '2 days')",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Takes one concurrent-stream permit for the tenant, valid for `ttl` unless renewed.
    /// `QuotaExceeded` when `max_concurrent_streams` live leases exist. The tenant row is locked
    /// for the check, so the limit holds across replicas.
    pub async fn acquire_stream_lease(
        &self,
        tenant: TenantId,
        ttl: Duration,
    ) -> Result<StreamLeaseId, StoreError> {
        let mut tx = self.pool.begin().await?;
        let limit: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT max_concurrent_streams FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let limit = limit.ok_or(StoreError::NotFound { what: "tenant" })?;
        sqlx::query("DELETE FROM stream_leases WHERE tenant_id = $1 AND expires_at <= now()")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        if let Some(limit) = limit {
            let live: i64 =
                sqlx::query_scalar("SELECT count(*) FROM stream_leases WHERE tenant_id = $1")
                    .bind(tenant)
                    .fetch_one(&mut *tx)
                    .await?;
            if live >= limit {
                return Err(StoreError::QuotaExceeded {
                    quota: "max_concurrent_streams",
                    limit: to_u64(limit),
                    current: to_u64(live),
                    requested: 1,
                });
            }
        }
        let id = StreamLeaseId::new();
        sqlx::query(
            "INSERT INTO stream_leases (id, tenant_id, expires_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3))",
        )
        .bind(id)
        .bind(tenant)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Extends a lease still held (heartbeat of a long stream). `false` when the lease is gone:
    /// it expired and was reclaimed, so the stream no longer holds a permit.
    pub async fn renew_stream_lease(
        &self,
        tenant: TenantId,
        id: StreamLeaseId,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE stream_leases SET expires_at = now() + make_interval(secs => $3) \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(id)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Gives a permit back (idempotent).
    pub async fn release_stream_lease(
        &self,
        tenant: TenantId,
        id: StreamLeaseId,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM stream_leases WHERE tenant_id = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Streams the tenant holds now (unexpired leases).
    pub async fn active_streams(&self, tenant: TenantId) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM stream_leases WHERE tenant_id = $1 AND expires_at > now()",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(to_u64(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn windows_start_at_the_utc_minute_and_day() {
        let (m, d) = window_starts(datetime!(2026-11-28 17:42:31.5 +02:00));
        assert_eq!(m, datetime!(2026-11-28 15:42:00 UTC));
        assert_eq!(d, datetime!(2026-11-28 00:00:00 UTC));
    }
}
