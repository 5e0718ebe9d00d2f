//! The operator's REST API under `/api/v1/tenants` (bearer `PUNICA_ADMIN_TOKEN`): tenants,
//! their quotas, API keys and console users, plus a tenant's usage.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::auth::Operator;
use crate::api::error::ApiError;
use crate::api::state::ServiceState;
use crate::api::usage::{UsageQuery, usage_report};
use crate::domain::{ApiKeyId, Email, Password, Quotas, TenantId, TenantName};
use crate::store::{ApiKeyInfo, StoreError, Tenant};

/// Longest API key label.
pub const MAX_LABEL_LEN: usize = 200;

/// Registers the operator routes (mounted under `/api/v1`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/tenants")
            .route(web::post().to(create_tenant))
            .route(web::get().to(list_tenants)),
    )
    .service(
        web::resource("/tenants/{id}")
            .route(web::get().to(get_tenant))
            .route(web::patch().to(patch_tenant))
            .route(web::delete().to(delete_tenant)),
    )
    .service(web::resource("/tenants/{id}/quotas").route(web::put().to(put_quotas)))
    .service(
        web::resource("/tenants/{id}/api-keys")
            .route(web::post().to(create_api_key))
            .route(web::get().to(list_api_keys)),
    )
    .service(
        web::resource("/tenants/{id}/api-keys/{key_id}").route(web::delete().to(revoke_api_key)),
    )
    .service(
        web::resource("/tenants/{id}/users")
            .route(web::post().to(create_user))
            .route(web::get().to(list_users)),
    )
    .service(web::resource("/tenants/{id}/usage").route(web::get().to(tenant_usage)));
}

/// A tenant id from the path; anything that is not one names no tenant.
fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound("tenant not found".into()))
}

fn name(raw: String) -> Result<TenantName, ApiError> {
    TenantName::parse(raw).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

fn checked(quotas: Quotas) -> Result<Quotas, ApiError> {
    quotas
        .validate()
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    Ok(quotas)
}

/// `POST /api/v1/tenants` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
    #[serde(default)]
    pub quotas: Option<Quotas>,
}

async fn create_tenant(
    _: Operator,
    state: web::Data<ServiceState>,
    body: web::Json<CreateTenant>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let name = name(body.name)?;
    let quotas = checked(body.quotas.unwrap_or(Quotas::UNLIMITED))?;
    let tenant = state
        .store
        .create_tenant(&name, &quotas)
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                ApiError::Conflict(format!("a tenant named '{}' exists", name.as_str()))
            }
            other => other.into(),
        })?;
    Ok(HttpResponse::Created().json(tenant))
}

#[derive(Serialize)]
struct TenantList {
    tenants: Vec<Tenant>,
}

async fn list_tenants(
    _: Operator,
    state: web::Data<ServiceState>,
) -> Result<HttpResponse, ApiError> {
    let tenants = state.store.list_tenants().await?;
    Ok(HttpResponse::Ok().json(TenantList { tenants }))
}

async fn get_tenant(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    Ok(HttpResponse::Ok().json(state.store.get_tenant(id).await?))
}

/// `PATCH /api/v1/tenants/{id}` body: a new name and/or quota changes. Quota fields present
/// are set (`null` = unlimited); absent ones stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub quotas: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Applies the keys of a partial quota object onto `current`.
fn merge_quotas(
    current: Quotas,
    patch: serde_json::Map<String, serde_json::Value>,
) -> Result<Quotas, ApiError> {
    let mut merged = serde_json::to_value(current).map_err(ApiError::internal)?;
    if let Some(object) = merged.as_object_mut() {
        for (key, value) in patch {
            object.insert(key, value);
        }
    }
    let quotas: Quotas = serde_json::from_value(merged)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid quotas: {e}")))?;
    checked(quotas)
}

async fn patch_tenant(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
    body: web::Json<PatchTenant>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let body = body.into_inner();
    let mut tenant = state.store.get_tenant(id).await?;
    if let Some(new_name) = body.name {
        let new_name = name(new_name)?;
        tenant = state
            .store
            .rename_tenant(id, &new_name)
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => {
                    ApiError::Conflict(format!("a tenant named '{}' exists", new_name.as_str()))
                }
                other => other.into(),
            })?;
        // Cached keys carry the tenant's name (metrics labels, /v1/models owner).
        state.auth.forget_tenant(id);
    }
    if let Some(patch) = body.quotas {
        let quotas = merge_quotas(tenant.quotas, patch)?;
        tenant = state.store.set_quotas(id, &quotas).await?;
    }
    Ok(HttpResponse::Ok().json(tenant))
}

async fn delete_tenant(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let blob_keys = state.store.delete_tenant(id).await?;
    state.auth.forget_tenant(id);
    state.adapters.forget_blobs(&blob_keys).await;
    Ok(HttpResponse::NoContent().finish())
}

async fn put_quotas(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
    body: web::Json<Quotas>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let quotas = checked(body.into_inner())?;
    let tenant = state.store.set_quotas(id, &quotas).await?;
    Ok(HttpResponse::Ok().json(tenant))
}

/// `POST /api/v1/tenants/{id}/api-keys` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[serde(default)]
    pub label: String,
}

/// A new key: the only time its secret is shown.
#[derive(Serialize)]
struct CreatedKey {
    id: ApiKeyId,
    key: String,
    prefix: String,
    label: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

async fn create_api_key(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
    body: Option<web::Json<CreateApiKey>>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let label = body.map(|b| b.into_inner().label).unwrap_or_default();
    if label.chars().count() > MAX_LABEL_LEN {
        return Err(ApiError::InvalidRequest(format!(
            "`label` may have at most {} characters",
            MAX_LABEL_LEN
        )));
    }
    let (info, key) = state.store.create_api_key(id, &label).await?;
    Ok(HttpResponse::Created().json(CreatedKey {
        id: info.id,
        key: key.expose().to_owned(),
        prefix: info.prefix,
        label: info.label,
        created_at: info.created_at,
    }))
}

#[derive(Serialize)]
struct KeyList {
    api_keys: Vec<ApiKeyInfo>,
}

async fn list_api_keys(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    // Distinguish "no keys" from "no tenant".
    state.store.get_tenant(id).await?;
    let api_keys = state.store.list_api_keys(id).await?;
    Ok(HttpResponse::Ok().json(KeyList { api_keys }))
}

async fn revoke_api_key(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, key) = path.into_inner();
    let tenant = tenant_id(&tenant)?;
    let key: ApiKeyId = key
        .parse()
        .map_err(|_| ApiError::NotFound("api key not found".into()))?;
    state.store.revoke_api_key(tenant, key).await?;
    state.auth.forget_key(key);
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/tenants/{id}/users` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub email: String,
    pub password: String,
}

async fn create_user(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
    body: web::Json<CreateUser>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let body = body.into_inner();
    let email = Email::parse(&body.email).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let password =
        Password::parse(body.password).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    // argon2id is deliberately slow: keep it off the async workers.
    let hash = web::block(move || password.hash())
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(anyhow::anyhow!("hashing a password: {e}")))?;
    let user = state
        .store
        .create_tenant_user(id, &email, &hash)
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => {
                ApiError::Conflict(format!("a user with email '{}' exists", email.as_str()))
            }
            other => other.into(),
        })?;
    Ok(HttpResponse::Created().json(user))
}

async fn list_users(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    state.store.get_tenant(id).await?;
    let users = state.store.list_tenant_users(id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "users": users })))
}

async fn tenant_usage(
    _: Operator,
    state: web::Data<ServiceState>,
    path: web::Path<String>,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    state.store.get_tenant(id).await?;
    Ok(HttpResponse::Ok().json(usage_report(&state.store, id, query.into_inner()).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_patch_changes_only_the_fields_it_names() {
        let current = Quotas {
            max_adapters: Some(3),
            tokens_per_day: Some(1000),
            ..Quotas::UNLIMITED
        };
        let patch = serde_json::json!({"tokens_per_day": null, "tokens_per_minute": 50});
        let merged = merge_quotas(current, patch.as_object().unwrap().clone()).unwrap();
        assert_eq!(merged.max_adapters, Some(3));
        assert_eq!(merged.tokens_per_day, None);
        assert_eq!(merged.tokens_per_minute, Some(50));
    }

    #[test]
    fn a_quota_patch_with_an_unknown_field_is_refused() {
        let patch = serde_json::json!({"max_adaptors": 1});
        assert!(matches!(
            merge_quotas(Quotas::UNLIMITED, patch.as_object().unwrap().clone()),
            Err(ApiError::InvalidRequest(_))
        ));
    }
}
