//! The admin console under `/console/`: server-rendered pages (askama templates in
//! `templates/console/`) with a small stylesheet and script (`static/`, compiled in), for
//! operators (tenants, quotas, users, keys, usage) and tenant users (adapters with upload,
//! versions and delete; API keys; usage and quotas; a streaming playground).
//!
//! Owns: sessions and CSRF ([`session`]), login and its throttle ([`auth`]), the pages, the
//! upload proxy onto the service's upload logic, and the usage chart. SQL lives in
//! `store::console`; adapter validation and storage in `api::adapters`.
//!
//! Mounted with [`configure`]; the playground's WebSocket reuses `/v1/stream`, which resolves the
//! session cookie through [`session::stream_tenant`].

pub mod assets;
pub mod auth;
pub mod chart;
pub mod error;
pub mod operator;
pub mod parts;
pub mod playground;
pub mod session;
pub mod tenant;
pub mod upload;
pub mod view;

use std::sync::{Arc, OnceLock};

use actix_web::http::header;
use actix_web::middleware::DefaultHeaders;
use actix_web::web;

pub use error::ConsoleError;
pub use session::{StreamTenant, stream_tenant};

use crate::domain::Password;
use crate::store::{AdapterVersion, Store};

/// Tells the console whether an adapter version is loaded on the device right now.
pub trait AdapterResidency: Send + Sync {
    /// `Some(true)` when resident on the device, `Some(false)` when not, `None` when the engine
    /// cannot tell (the page then says "unknown").
    fn is_resident(&self, adapter: &AdapterVersion) -> Option<bool>;
}

/// Residency as the service's engine reports it: unknown until a model is loaded.
pub struct EngineResidency(pub Arc<crate::api::state::ServiceState>);

impl AdapterResidency for EngineResidency {
    fn is_resident(&self, adapter: &AdapterVersion) -> Option<bool> {
        let model = self.0.model().ok()?;
        Some(
            model
                .engine
                .is_resident(&crate::api::adapter_registry::adapter_key(adapter)),
        )
    }
}

/// What the console's handlers share. Registered by [`configure`] as `web::Data<ConsoleState>`.
pub struct ConsoleState {
    pub(crate) store: Store,
    residency: Arc<dyn AdapterResidency>,
    dummy_hash: OnceLock<String>,
}

/// A valid argon2id PHC string for a password nobody has, used when the hash computation itself
/// fails (it does not with the default parameters).
const FALLBACK_DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
     Qm9ndXNoYXNoQm9ndXNoYXNoQm9ndXNoYXNoQm9ndXM";

impl ConsoleState {
    /// State over `store`, asking `residency` which adapters are on the device.
    pub fn new(store: Store, residency: Arc<dyn AdapterResidency>) -> ConsoleState {
        ConsoleState {
            store,
            residency,
            dummy_hash: OnceLock::new(),
        }
    }

    /// The hash unknown emails are verified against (same parameters as real ones, so the
    /// work is the same). CPU-heavy the first time: call from a blocking task.
    pub fn dummy_hash(&self) -> &str {
        self.dummy_hash.get_or_init(|| {
            Password::parse(random_dummy_password())
                .ok()
                .and_then(|p| p.hash().ok())
                .unwrap_or_else(|| FALLBACK_DUMMY_HASH.to_owned())
        })
    }

    /// Whether an adapter version is resident on the device (`None`: unknown).
    pub fn is_resident(&self, adapter: &AdapterVersion) -> Option<bool> {
        self.residency.is_resident(adapter)
    }
}

fn random_dummy_password() -> String {
    session::random_token()
}

fn form_config() -> web::FormConfig {
    web::FormConfig::default()
        .limit(64 * 1024)
        .error_handler(|e, _req| ConsoleError::BadRequest(format!("unreadable form: {e}")).into())
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|_e, _req| ConsoleError::NotFound.into())
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|e, _req| ConsoleError::BadRequest(format!("bad query: {e}")).into())
}

async fn not_found() -> Result<actix_web::HttpResponse, ConsoleError> {
    Err(ConsoleError::NotFound)
}

/// Security headers of every console response. Pages are not cached (they carry CSRF tokens and
/// sometimes a freshly created key); scripts, styles, sockets and forms stay on this origin.
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::REFERRER_POLICY, "same-origin"))
        .add((header::CACHE_CONTROL, "no-store"))
}

/// Mounts the console under `/console`. Startup adds it with
/// `.configure(console::configure(console_state.clone()))`.
pub fn configure(state: web::Data<ConsoleState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state.clone()).service(
            web::scope("/console")
                .app_data(state)
                .app_data(form_config())
                .app_data(path_config())
                .app_data(query_config())
                .wrap(security_headers())
                .route("", web::get().to(auth::home))
                .route("/", web::get().to(auth::home))
                .route("/static/{name}", web::get().to(assets::serve))
                .route("/login", web::get().to(auth::login_form))
                .route("/login", web::post().to(auth::login))
                .route("/logout", web::post().to(auth::logout))
                .route("/tenants", web::get().to(operator::tenants))
                .route("/tenants", web::post().to(operator::create_tenant))
                .route("/tenants/{id}", web::get().to(operator::tenant))
                .route("/tenants/{id}/quotas", web::post().to(operator::set_quotas))
                .route("/tenants/{id}/users", web::post().to(operator::create_user))
                .route("/tenants/{id}/keys", web::post().to(operator::create_key))
                .route(
                    "/tenants/{id}/keys/{key}/revoke",
                    web::post().to(operator::revoke_key),
                )
                .route("/adapters", web::get().to(tenant::adapters))
                .route("/adapters", web::post().to(upload::upload))
                .route("/adapters/{name}", web::get().to(tenant::adapter))
                .route(
                    "/adapters/{name}/delete",
                    web::get().to(tenant::confirm_delete),
                )
                .route("/adapters/{name}/delete", web::post().to(tenant::delete))
                .route("/keys", web::get().to(tenant::keys))
                .route("/keys", web::post().to(tenant::create_key))
                .route("/keys/{id}/revoke", web::post().to(tenant::revoke_key))
                .route("/usage", web::get().to(tenant::usage))
                .route("/playground", web::get().to(playground::page))
                .default_service(web::to(not_found)),
        );
    }
}
