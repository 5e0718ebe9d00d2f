//! `/healthz` (the process serves) and `/readyz` (the database answers and the model, if one is
//! configured, is loaded).

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::AppState;
use crate::startup::ModelState;

/// How long `/readyz` waits for the database.
const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Registers `/healthz` and `/readyz`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    database: &'static str,
    model: &'static str,
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let database = match tokio::time::timeout(DB_CHECK_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            "error"
        }
        Err(_) => {
            tracing::warn!("readiness: database check timed out");
            "timeout"
        }
    };
    let model_state = state.readiness.model();
    let model = model_state.label();
    let ready =
        database == "ok" && matches!(model_state, ModelState::NotConfigured | ModelState::Loaded);
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        database,
        model,
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
