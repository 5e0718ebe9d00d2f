//! The service's route table: the operator and tenant REST API under `/api/v1`, token streaming
//! and the OpenAI-compatible API under `/v1`. Extractor failures (bad JSON, query strings, paths)
//! answer in the API's error format, unknown routes with `not_found`, and every error is counted
//! per tenant and code.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpMessage, HttpRequest, web};

use crate::api::auth::TenantContext;
use crate::api::error::ApiError;
use crate::api::state::ServiceState;
use crate::api::{adapters, admin, openai, usage, ws};

/// Largest JSON body (a long prompt or chat), in bytes.
pub const MAX_JSON_BYTES: usize = 4 << 20;

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_JSON_BYTES)
        .error_handler(|error, _req| {
            let message = match &error {
                actix_web::error::JsonPayloadError::Overflow { limit }
                | actix_web::error::JsonPayloadError::OverflowKnownLength { limit, .. } => {
                    format!("the JSON body is larger than {limit} bytes")
                }
                other => format!("invalid JSON body: {other}"),
            };
            ApiError::InvalidRequest(message).into()
        })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|error, _req| {
        ApiError::InvalidRequest(format!("invalid query string: {error}")).into()
    })
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|_error, _req| ApiError::NotFound("no such resource".into()).into())
}

async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Counts every failed call by tenant (when the caller authenticated) and error code.
async fn count_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<ServiceState>>().cloned();
    let response = next.call(req).await?;
    if let (Some(state), Some(error)) = (state, response.response().error())
        && let Some(api_error) = error.as_error::<ApiError>()
    {
        let tenant = response
            .request()
            .extensions()
            .get::<TenantContext>()
            .cloned();
        state
            .metrics
            .record_error(tenant.as_ref(), api_error.code());
    }
    Ok(response)
}

/// Registers every service route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .app_data(json_config())
            .app_data(query_config())
            .app_data(path_config())
            .wrap(from_fn(count_errors))
            .configure(admin::configure)
            .configure(adapters::configure)
            .route("/usage", web::get().to(usage::usage))
            .default_service(web::to(not_found)),
    )
    .service(
        web::scope("/v1")
            .app_data(json_config())
            .wrap(from_fn(count_errors))
            .route("/stream", web::get().to(ws::stream))
            .route("/completions", web::post().to(openai::completions))
            .route(
                "/chat/completions",
                web::post().to(openai::chat_completions),
            )
            .route("/models", web::get().to(openai::models))
            .default_service(web::to(not_found)),
    );
}
