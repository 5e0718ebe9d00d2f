//! Admission against a tenant's quotas, held in Postgres so they hold across replicas: one
//! concurrent-stream lease and a token reservation (prompt + `max_tokens`) per generation.
//!
//! The [`Admission`] travels with the generation and is settled when it ends, however it ends:
//! the lease is released and the reservation is corrected to the tokens really used. Leases
//! expire unless renewed, so a crashed replica's streams stop counting after [`LEASE_TTL`]; the
//! [`QuotaGate`] renews the leases this process holds every [`LEASE_RENEW_EVERY`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use crate::api::error::ApiError;
use crate::domain::{StreamLeaseId, TenantId};
use crate::store::{Store, StoreError, TokenReservation};

/// How long a lease counts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// How often held leases are renewed.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(20);
/// What a client is told to wait after hitting the concurrency limit.
pub const CONCURRENCY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Maps store failures of quota and lookup queries to API errors.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict { what } => ApiError::Conflict(format!("{what} already exists")),
            StoreError::QuotaExceeded {
                quota: "max_concurrent_streams",
                limit,
                ..
            } => ApiError::RateLimited {
                message: format!(
                    "the tenant already runs its maximum of {limit} concurrent streams"
                ),
                retry_after: CONCURRENCY_RETRY_AFTER,
            },
            error @ StoreError::QuotaExceeded { .. } => ApiError::QuotaExceeded {
                message: error.to_string(),
                retry_after: None,
            },
            StoreError::RateLimited {
                window,
                limit,
                requested,
                ..
            } if requested > limit => ApiError::QuotaExceeded {
                message: format!(
                    "the request needs up to {requested} tokens (prompt + max_tokens), more than \
                     the tenant's limit of {limit} per {window}; lower max_tokens"
                ),
                retry_after: None,
            },
            error @ StoreError::RateLimited {
                window: "minute",
                retry_after_secs,
                ..
            } => ApiError::RateLimited {
                message: error.to_string(),
                retry_after: Duration::from_secs(retry_after_secs),
            },
            error @ StoreError::RateLimited {
                retry_after_secs, ..
            } => ApiError::QuotaExceeded {
                message: error.to_string(),
                retry_after: Some(Duration::from_secs(retry_after_secs)),
            },
            other => ApiError::internal(other),
        }
    }
}

struct Inner {
    store: Store,
    /// Leases this process holds, renewed in the background.
    held: Mutex<HashSet<StreamLeaseId>>,
}

/// Takes and gives back quota for generations.
#[derive(Clone)]
pub struct QuotaGate {
    inner: Arc<Inner>,
}

impl QuotaGate {
    /// A gate over `store`. Call [`QuotaGate::spawn_renewer`] once the runtime runs.
    pub fn new(store: Store) -> Self {
        QuotaGate {
            inner: Arc::new(Inner {
                store,
                held: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Renews the held leases every [`LEASE_RENEW_EVERY`] until the runtime stops.
    pub fn spawn_renewer(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(LEASE_RENEW_EVERY);
            loop {
                ticker.tick().await;
                let ids: Vec<StreamLeaseId> = match inner.held.lock() {
                    Ok(held) => held.iter().copied().collect(),
                    Err(_) => return,
                };
                if ids.is_empty() {
                    continue;
                }
                if let Err(error) = inner.store.renew_stream_leases(&ids, LEASE_TTL).await {
                    tracing::warn!(%error, leases = ids.len(), "renewing stream leases failed");
                }
            }
        })
    }

    /// Takes a concurrency permit and reserves `tokens` (prompt + the most the completion may
    /// use). Fails with 429 `rate_limited` / `quota_exceeded` (with Retry-After) and holds
    /// nothing when either does not fit.
    pub async fn admit(&self, tenant: TenantId, tokens: u64) -> Result<Admission, ApiError> {
        let lease = self
            .inner
            .store
            .acquire_stream_lease(tenant, LEASE_TTL)
            .await?;
        if let Ok(mut held) = self.inner.held.lock() {
            held.insert(lease);
        }
        let mut admission = Admission {
            inner: self.inner.clone(),
            tenant,
            lease: Some(lease),
            reservation: None,
        };
        let reservation = self
            .inner
            .store
            .reserve_tokens(tenant, tokens, OffsetDateTime::now_utc())
            .await?;
        admission.reservation = Some(reservation);
        Ok(admission)
    }

    /// Concurrency permits this process holds now (all tenants).
    pub fn held_leases(&self) -> usize {
        self.inner.held.lock().map(|held| held.len()).unwrap_or(0)
    }
}

/// A generation's permit and token reservation. Settle it with the tokens used; if it is
/// dropped unsettled (the generation never ran), the permit is released and the whole
/// reservation given back in the background.
pub struct Admission {
    inner: Arc<Inner>,
    tenant: TenantId,
    lease: Option<StreamLeaseId>,
    reservation: Option<TokenReservation>,
}

impl Admission {
    /// Releases the permit and corrects the reservation to `used` tokens.
    pub async fn settle(mut self, used: u64) {
        let lease = self.lease.take();
        let reservation = self.reservation.take();
        release(&self.inner, self.tenant, lease, reservation, used).await;
    }
}

async fn release(
    inner: &Inner,
    tenant: TenantId,
    lease: Option<StreamLeaseId>,
    reservation: Option<TokenReservation>,
    used: u64,
) {
    if let Some(lease) = lease {
        if let Ok(mut held) = inner.held.lock() {
            held.remove(&lease);
        }
        if let Err(error) = inner.store.release_stream_lease(tenant, lease).await {
            // The lease expires on its own after LEASE_TTL.
            tracing::warn!(%error, %tenant, "releasing a stream lease failed");
        }
    }
    if let Some(reservation) = reservation
        && let Err(error) = inner.store.settle_tokens(&reservation, used).await
    {
        tracing::warn!(%error, %tenant, "settling a token reservation failed");
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let lease = self.lease.take();
        let reservation = self.reservation.take();
        if lease.is_none() && reservation.is_none() {
            return;
        }
        let inner = self.inner.clone();
        let tenant = self.tenant;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { release(&inner, tenant, lease, reservation, 0).await });
            }
            // Without a runtime (process exit) the lease simply expires.
            Err(_) => {
                if let (Some(lease), Ok(mut held)) = (lease, inner.held.lock()) {
                    held.remove(&lease);
                }
            }
        }
    }
}
