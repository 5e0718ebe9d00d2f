//! HTTP surface. Each area is a module with a `configure(cfg)` function that registers its
//! routes; [`configure`] lists them all, so adding an area is one module and one line here.
//! Handlers get the shared [`AppState`] as `web::Data<AppState>`.

pub mod adapter_registry;
pub mod adapters;
pub mod admin;
pub mod auth;
pub mod error;
pub mod generate;
pub mod health;
pub mod metrics;
pub mod openai;
pub mod quota;
pub mod routes;
pub mod service;
pub mod state;
pub mod tenant_metrics;
pub mod usage;
pub mod ws;

use std::sync::Arc;

use actix_web::web;

use crate::blobs::BlobStore;
use crate::config::Settings;
use crate::startup::Readiness;
use crate::store::Store;

pub use metrics::Metrics;

/// What every handler may need; cloned into each worker (all fields are cheap handles).
#[derive(Clone, Debug)]
pub struct AppState {
    /// The validated configuration.
    pub settings: Arc<Settings>,
    /// The database (the only way to SQL).
    pub store: Store,
    /// Adapter files.
    pub blobs: BlobStore,
    /// Model state for `/readyz`; the model loader sets it.
    pub readiness: Readiness,
    /// Registry for every module's Prometheus collectors.
    pub metrics: Arc<Metrics>,
}

/// Registers every route of the service.
pub fn configure(cfg: &mut web::ServiceConfig) {
    health::configure(cfg);
    metrics::configure(cfg);
    routes::configure(cfg);
}
