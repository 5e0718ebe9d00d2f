//! HTTP surface: operator and tenant REST, WebSocket token streaming, the OpenAI-compatible
//! routes, quotas, usage and per-tenant metrics. `routes::configure` registers the service's
//! routes; handlers share a `web::Data<ServiceState>`.

pub mod adapter_registry;
pub mod adapters;
pub mod admin;
pub mod auth;
pub mod error;
pub mod generate;
pub mod openai;
pub mod quota;
pub mod routes;
pub mod state;
pub mod tenant_metrics;
pub mod usage;
pub mod ws;
