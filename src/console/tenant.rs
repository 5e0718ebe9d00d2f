//! Tenant pages: adapters (list, detail with versions, delete with confirmation), API keys
//! (create, shown once; revoke), usage with quotas. Every query is scoped by the session's
//! tenant, so another tenant's adapter name or key id is simply not found (404).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use time::OffsetDateTime;

use super::ConsoleState;
use super::chart::Chart;
use super::error::ConsoleError;
use super::operator::{CreateKeyForm, RevokeForm};
use super::parts::{self, KeyRow, QuotaView, UsageRow};
use super::session::TenantSession;
use super::upload;
use super::view::{self, Layout, Section, render, see_other};
use crate::domain::{AdapterName, ApiKeyId};
use crate::store::{AdapterVersion, StoreError};

/// One adapter on the list.
pub struct AdapterRow {
    pub name: String,
    pub version: u32,
    pub rank: u32,
    pub targets: String,
    pub size: String,
    pub status: &'static str,
    pub last_used: String,
    pub resident: &'static str,
    pub resident_class: &'static str,
}

fn status_label(v: &AdapterVersion) -> &'static str {
    match v.status {
        crate::store::AdapterStatus::Ready => "ready",
        crate::store::AdapterStatus::Deleted => "deleted",
    }
}

fn residency(state: &ConsoleState, v: &AdapterVersion) -> (&'static str, &'static str) {
    match state.is_resident(v) {
        Some(true) => ("resident", "ok"),
        Some(false) => ("not loaded", "muted"),
        None => ("unknown", "muted"),
    }
}

#[derive(Template)]
#[template(path = "console/adapters.html")]
struct AdaptersPage {
    layout: Layout,
    adapters: Vec<AdapterRow>,
    upload_error: Option<String>,
    max_upload: String,
    uploads_enabled: bool,
}

/// Renders the adapter list with the upload form (and an upload error from a no-script post).
pub async fn adapters_page(
    state: &ConsoleState,
    req: &HttpRequest,
    session: &TenantSession,
    upload_error: Option<String>,
    status: StatusCode,
) -> Result<HttpResponse, ConsoleError> {
    let store = &state.store;
    let versions = store.list_adapters(session.tenant).await?;
    let last_used = store.adapters_last_used(session.tenant).await?;
    let now = OffsetDateTime::now_utc();
    let adapters = versions
        .iter()
        .map(|v| {
            let (resident, resident_class) = residency(state, v);
            AdapterRow {
                name: v.name.as_str().to_owned(),
                version: v.version,
                rank: v.rank,
                targets: v.target_modules.join(", "),
                size: view::bytes(v.size_bytes),
                status: status_label(v),
                last_used: last_used
                    .get(&v.adapter_id)
                    .map_or_else(|| "never".to_owned(), |t| view::ago(*t, now)),
                resident,
                resident_class,
            }
        })
        .collect();
    let page = AdaptersPage {
        layout: Layout::for_session(&session.session, "Adapters", Section::Adapters),
        adapters,
        upload_error,
        uploads_enabled: upload::uploads_enabled(req),
        max_upload: upload::max_upload_bytes(req)
            .map_or_else(|| "set by the server".to_owned(), view::bytes),
    };
    render(&page, status)
}

/// `GET /console/adapters`.
pub async fn adapters(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    session: TenantSession,
) -> Result<HttpResponse, ConsoleError> {
    adapters_page(&state, &req, &session, None, StatusCode::OK).await
}

/// One version on the detail page.
struct VersionRow {
    version: u32,
    rank: u32,
    alpha: String,
    targets: String,
    dtype: String,
    size: String,
    sha256: String,
    sha256_short: String,
    created: String,
}

fn version_row(v: &AdapterVersion) -> VersionRow {
    VersionRow {
        version: v.version,
        rank: v.rank,
        alpha: format!("{}", v.alpha),
        targets: v.target_modules.join(", "),
        dtype: v.dtype.clone(),
        size: view::bytes(v.size_bytes),
        sha256: v.sha256.clone(),
        sha256_short: v.sha256.chars().take(12).collect(),
        created: view::datetime(v.created_at),
    }
}

#[derive(Template)]
#[template(path = "console/adapter.html")]
struct AdapterPage {
    layout: Layout,
    name: String,
    current: VersionRow,
    versions: Vec<VersionRow>,
    last_used: String,
    resident: &'static str,
}

/// An adapter name from the URL; one that cannot be a name cannot be the tenant's adapter.
fn path_name(raw: &str) -> Result<AdapterName, ConsoleError> {
    AdapterName::parse(raw).map_err(|_| ConsoleError::NotFound)
}

/// `GET /console/adapters/{name}`.
pub async fn adapter(
    state: web::Data<ConsoleState>,
    session: TenantSession,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    let name = path_name(&path)?;
    let store = &state.store;
    let current = store.get_adapter(session.tenant, &name).await?;
    let versions = store.list_adapter_versions(session.tenant, &name).await?;
    let last_used = store.adapters_last_used(session.tenant).await?;
    let page = AdapterPage {
        layout: Layout::for_session(
            &session.session,
            &format!("Adapter {}", name.as_str()),
            Section::Adapters,
        ),
        name: name.as_str().to_owned(),
        last_used: last_used.get(&current.adapter_id).map_or_else(
            || "never".to_owned(),
            |t| view::ago(*t, OffsetDateTime::now_utc()),
        ),
        resident: residency(&state, &current).0,
        current: version_row(&current),
        versions: versions.iter().map(version_row).collect(),
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "console/adapter_delete.html")]
struct DeletePage {
    layout: Layout,
    name: String,
    version_count: usize,
}

/// `GET /console/adapters/{name}/delete`: the confirmation page.
pub async fn confirm_delete(
    state: web::Data<ConsoleState>,
    session: TenantSession,
    path: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    let name = path_name(&path)?;
    let versions = state
        .store
        .list_adapter_versions(session.tenant, &name)
        .await?;
    let page = DeletePage {
        layout: Layout::for_session(
            &session.session,
            &format!("Delete {}", name.as_str()),
            Section::Adapters,
        ),
        name: name.as_str().to_owned(),
        version_count: versions.len(),
    };
    render(&page, StatusCode::OK)
}

/// `POST /console/adapters/{name}/delete`.
pub async fn delete(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    session: TenantSession,
    path: web::Path<String>,
    form: web::Form<RevokeForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.session.check_csrf(&form.csrf)?;
    let name = path_name(&path)?;
    upload::delete_adapter(&req, &state, session.tenant, &session.tenant_name, &name).await?;
    tracing::info!(tenant = %session.tenant, adapter = name.as_str(), "adapter deleted in the console");
    Ok(see_other("/console/adapters"))
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage {
    layout: Layout,
    tenant_name: String,
    keys: Vec<KeyRow>,
    key_base: &'static str,
    new_key: Option<String>,
}

async fn keys_page(
    state: &ConsoleState,
    session: &TenantSession,
    new_key: Option<String>,
    notice: Option<String>,
    status: StatusCode,
) -> Result<HttpResponse, ConsoleError> {
    let keys = parts::key_rows(state.store.list_api_keys(session.tenant).await?);
    let page = KeysPage {
        layout: Layout::for_session(&session.session, "API keys", Section::Keys)
            .with_notice(notice),
        tenant_name: session.tenant_name.clone(),
        keys,
        key_base: "/console/keys",
        new_key,
    };
    render(&page, status)
}

/// Query of pages that show a message after a redirect.
#[derive(Deserialize)]
pub struct DoneQuery {
    #[serde(default)]
    done: Option<String>,
}

/// `GET /console/keys`.
pub async fn keys(
    state: web::Data<ConsoleState>,
    session: TenantSession,
    query: web::Query<DoneQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let notice = (query.done.as_deref() == Some("revoked"))
        .then(|| "Key revoked. It stops working at once.".to_owned());
    keys_page(&state, &session, None, notice, StatusCode::OK).await
}

/// `POST /console/keys`: shows the new key once.
pub async fn create_key(
    state: web::Data<ConsoleState>,
    session: TenantSession,
    form: web::Form<CreateKeyForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.session.check_csrf(&form.csrf)?;
    let label = form.label.trim();
    let label = if label.is_empty() { "console" } else { label };
    let (_, key) = state.store.create_api_key(session.tenant, label).await?;
    keys_page(
        &state,
        &session,
        Some(key.expose().to_owned()),
        None,
        StatusCode::CREATED,
    )
    .await
}

/// `POST /console/keys/{id}/revoke`: another tenant's key id is not found.
pub async fn revoke_key(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    session: TenantSession,
    path: web::Path<ApiKeyId>,
    form: web::Form<RevokeForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.session.check_csrf(&form.csrf)?;
    let key = path.into_inner();
    match state.store.revoke_api_key(session.tenant, key).await {
        Ok(()) => {}
        Err(StoreError::NotFound { .. }) => return Err(ConsoleError::NotFound),
        Err(e) => return Err(e.into()),
    }
    upload::forget_key(&req, key);
    Ok(see_other("/console/keys?done=revoked"))
}

#[derive(Template)]
#[template(path = "console/usage.html")]
struct UsagePage {
    layout: Layout,
    quotas: Vec<QuotaView>,
    days: u32,
    periods: [u32; 3],
    chart: Chart,
    usage_rows: Vec<UsageRow>,
}

/// Query of the usage page.
#[derive(Deserialize)]
pub struct UsageQuery {
    #[serde(default)]
    days: Option<u32>,
}

/// `GET /console/usage`: quotas with what is used, and tokens per day per adapter.
pub async fn usage(
    state: web::Data<ConsoleState>,
    session: TenantSession,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let store = &state.store;
    let tenant = store.get_tenant(session.tenant).await?;
    let used = parts::quota_use(store, session.tenant).await?;
    let days = parts::period(query.days);
    let (chart, usage_rows) = parts::usage(store, session.tenant, days).await?;
    let page = UsagePage {
        layout: Layout::for_session(&session.session, "Usage and quotas", Section::Usage),
        quotas: parts::quota_views(&tenant.quotas, &used),
        days,
        periods: parts::PERIODS,
        chart,
        usage_rows,
    };
    render(&page, StatusCode::OK)
}
