//! The console's bridge to the service's adapter and key logic: uploads and deletes go through
//! the very handlers of `POST|DELETE /api/v1/adapters` (validation against the base model, blob
//! storage, quotas, cache eviction), with the session's tenant standing in for an API key.
//!
//! The upload form posts with `XMLHttpRequest` (for the progress bar) and gets the API's JSON
//! back, errors included, so the page can show the validator's reason inline. Without script the
//! browser posts the form itself and gets a page back.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Deserialize;

use super::ConsoleState;
use super::error::ConsoleError;
use super::session::TenantSession;
use super::tenant::adapters_page;
use super::view::see_other;
use crate::api::auth::TenantContext;
use crate::api::state::ServiceState;
use crate::domain::{AdapterName, ApiKeyId, TenantId};

/// The header the upload script sends the CSRF token in (a multipart body cannot carry extra
/// fields: the service accepts exactly `name` and the two files).
pub const CSRF_HEADER: &str = "x-csrf-token";

fn service(req: &HttpRequest) -> Result<web::Data<ServiceState>, ConsoleError> {
    req.app_data::<web::Data<ServiceState>>()
        .cloned()
        .ok_or_else(|| ConsoleError::Internal("the service state is not registered".into()))
}

/// The service's upload limit, when the service is mounted.
pub fn max_upload_bytes(req: &HttpRequest) -> Option<u64> {
    req.app_data::<web::Data<ServiceState>>()
        .map(|s| s.max_upload_bytes())
}

/// Whether adapter uploads can be taken (the service is mounted).
pub fn uploads_enabled(req: &HttpRequest) -> bool {
    req.app_data::<web::Data<ServiceState>>().is_some()
}

/// The base model's id for the playground's menu.
pub fn model_id(req: &HttpRequest) -> String {
    req.app_data::<web::Data<ServiceState>>()
        .map_or_else(|| "base model".to_owned(), |s| s.model_id().to_owned())
}

/// The tenant context the service's handlers expect, for a console session.
pub fn tenant_context(tenant: TenantId, tenant_name: &str) -> TenantContext {
    TenantContext {
        tenant_id: tenant,
        tenant_name: tenant_name.to_owned(),
        key_id: None,
    }
}

/// Deletes an adapter the way `DELETE /api/v1/adapters/{name}` does (blobs and caches too).
pub async fn delete_adapter(
    req: &HttpRequest,
    _state: &ConsoleState,
    tenant: TenantId,
    tenant_name: &str,
    name: &AdapterName,
) -> Result<(), ConsoleError> {
    let service = service(req)?;
    match crate::api::adapters::delete(
        tenant_context(tenant, tenant_name),
        service,
        web::Path::from(name.as_str().to_owned()),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status_code() == StatusCode::NOT_FOUND => Err(ConsoleError::NotFound),
        Err(e) => {
            e.log();
            Err(ConsoleError::Internal(e.public_message()))
        }
    }
}

/// Drops a revoked key from this replica's key cache at once.
pub fn forget_key(req: &HttpRequest, key: ApiKeyId) {
    if let Some(service) = req.app_data::<web::Data<ServiceState>>() {
        service.auth.forget_key(key);
    }
}

/// The no-script form puts the token in the query string (its body is the bare multipart).
#[derive(Deserialize)]
pub struct UploadQuery {
    #[serde(default)]
    csrf: Option<String>,
}

fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// `POST /console/adapters`: streams the multipart body into the service's upload.
pub async fn upload(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<ConsoleState>,
    session: TenantSession,
    query: web::Query<UploadQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let presented = req
        .headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.csrf.clone())
        .unwrap_or_default();
    let json = wants_json(&req);
    if let Err(refused) = session.session.check_csrf(&presented) {
        if json {
            return Ok(HttpResponse::Forbidden().json(serde_json::json!({
                "error": {"code": "forbidden", "message": "This page has expired: reload it and upload again."}
            })));
        }
        return Err(refused);
    }
    let service = service(&req)?;
    let tenant = tenant_context(session.tenant, &session.tenant_name);
    let result = crate::api::adapters::upload(tenant, service, req.clone(), payload).await;
    if json {
        return Ok(match result {
            Ok(response) => response,
            Err(error) => error.error_response(),
        });
    }
    match result {
        Ok(_) => Ok(see_other("/console/adapters")),
        Err(error) => {
            error.log();
            adapters_page(
                &state,
                &req,
                &session,
                Some(error.public_message()),
                error.status_code(),
            )
            .await
        }
    }
}
