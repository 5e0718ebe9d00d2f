//! Who is calling: the operator (bearer `PUNICA_ADMIN_TOKEN`) or a tenant (bearer API key).
//!
//! API keys resolve through the store (prefix index, then a constant-time hash compare) and
//! are cached briefly by key hash, so a busy client costs one query per [`KEY_CACHE_TTL`]. A
//! revoked key or deleted tenant is dropped from this replica's cache at once; other replicas
//! stop accepting it within the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};

use crate::api::error::ApiError;
use crate::api::state::ServiceState;
use crate::domain::{ApiKey, ApiKeyId, TenantId};
use crate::store::Store;

/// How long a resolved key is trusted without asking the database again.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most keys held in the cache; beyond it the cache starts over (a cold cache only costs
/// queries).
pub const KEY_CACHE_CAPACITY: usize = 10_000;

/// An authenticated tenant caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantContext {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    /// The API key used; `None` for a console session (the playground, console uploads).
    pub key_id: Option<ApiKeyId>,
}

/// The `Authorization: Bearer ...` token of a request, if any.
pub fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Resolves API keys to tenants, with a short-lived cache.
pub struct Authenticator {
    store: Store,
    cache: Mutex<HashMap<[u8; 32], (TenantContext, Instant)>>,
}

impl Authenticator {
    /// A resolver over `store` with an empty cache.
    pub fn new(store: Store) -> Self {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant a presented key belongs to; `unauthorized` for anything else.
    pub async fn authenticate(&self, presented: &str) -> Result<TenantContext, ApiError> {
        let unauthorized = || ApiError::Unauthorized("invalid API key".into());
        let key = ApiKey::parse(presented).map_err(|_| unauthorized())?;
        let hash = key.hash().0;
        if let Some(hit) = self.cached(&hash) {
            return Ok(hit);
        }
        let found = self
            .store
            .authenticate_api_key(&key)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(unauthorized)?;
        let tenant = match self.store.get_tenant(found.tenant_id).await {
            Ok(tenant) => tenant,
            Err(crate::store::StoreError::NotFound { .. }) => return Err(unauthorized()),
            Err(other) => return Err(ApiError::internal(other)),
        };
        let context = TenantContext {
            tenant_id: found.tenant_id,
            tenant_name: tenant.name.as_str().to_owned(),
            key_id: Some(found.key_id),
        };
        self.remember(hash, context.clone());
        Ok(context)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<TenantContext> {
        let cache = self.cache.lock().ok()?;
        let (context, at) = cache.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| context.clone())
    }

    fn remember(&self, hash: [u8; 32], context: TenantContext) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= KEY_CACHE_CAPACITY {
                cache.retain(|_, (_, at)| at.elapsed() < KEY_CACHE_TTL);
                if cache.len() >= KEY_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(hash, (context, Instant::now()));
        }
    }

    /// Forgets a revoked key at once.
    pub fn forget_key(&self, key_id: ApiKeyId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, (context, _)| context.key_id != Some(key_id));
        }
    }

    /// Forgets every key of a deleted tenant at once.
    pub fn forget_tenant(&self, tenant_id: TenantId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, (context, _)| context.tenant_id != tenant_id);
        }
    }
}

fn state_of(req: &HttpRequest) -> Result<web::Data<ServiceState>, ApiError> {
    req.app_data::<web::Data<ServiceState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("service state is not registered")))
}

impl FromRequest for TenantContext {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state_of(&req)?;
            let token = bearer_token(&req).ok_or_else(|| {
                ApiError::Unauthorized("missing `Authorization: Bearer <api key>` header".into())
            })?;
            let tenant = state.auth.authenticate(&token).await?;
            // Metrics and logs downstream label errors with the tenant.
            req.extensions_mut().insert(tenant.clone());
            Ok(tenant)
        })
    }
}

/// Proof that the caller presented the operator token.
#[derive(Clone, Copy, Debug)]
pub struct Operator;

/// Compares two secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        std::future::ready((|| {
            let state = state_of(req)?;
            let Some(expected) = state.admin_token() else {
                return Err(ApiError::Unauthorized(
                    "the admin API is disabled: start the service with PUNICA_ADMIN_TOKEN".into(),
                ));
            };
            let presented = bearer_token(req).ok_or_else(|| {
                ApiError::Unauthorized(
                    "missing `Authorization: Bearer <admin token>` header".into(),
                )
            })?;
            if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
                Ok(Operator)
            } else {
                Err(ApiError::Unauthorized("invalid admin token".into()))
            }
        })())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_trimmed() {
        let req = TestRequest::default()
            .insert_header((header::AUTHORIZATION, "bearer  abc "))
            .to_http_request();
        assert_eq!(bearer_token(&req).as_deref(), Some("abc"));
        let basic = TestRequest::default()
            .insert_header((header::AUTHORIZATION, "Basic abc"))
            .to_http_request();
        assert_eq!(bearer_token(&basic), None);
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
    }
}
