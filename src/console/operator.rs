//! Operator pages: the tenant list, creating tenants, and one tenant's detail page (quotas,
//! console users, API keys, usage). Every handler takes an [`OperatorSession`]: tenant users
//! get 404 here.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use time::OffsetDateTime;

use super::ConsoleState;
use super::chart::Chart;
use super::error::ConsoleError;
use super::parts::{self, KeyRow, QuotaView, UsageRow};
use super::session::OperatorSession;
use super::view::{self, Layout, Section, render, see_other};
use crate::domain::{ApiKeyId, Email, Password, Quotas, TenantId, TenantName};
use crate::store::StoreError;

/// One tenant on the list.
struct TenantRow {
    id: String,
    name: String,
    adapters: String,
    users: String,
    active_keys: String,
    tokens_24h: String,
    created: String,
}

#[derive(Template)]
#[template(path = "console/tenants.html")]
struct TenantsPage {
    layout: Layout,
    tenants: Vec<TenantRow>,
    error: Option<String>,
}

struct UserRow {
    email: String,
    created: String,
}

#[derive(Template)]
#[template(path = "console/tenant.html")]
struct TenantPage {
    layout: Layout,
    tenant_id: String,
    tenant_name: String,
    created: String,
    adapter_count: u64,
    quotas: Vec<QuotaView>,
    users: Vec<UserRow>,
    keys: Vec<KeyRow>,
    key_base: String,
    new_key: Option<String>,
    error: Option<String>,
    days: u32,
    chart: Chart,
    usage_rows: Vec<UsageRow>,
}

fn count(v: i64) -> String {
    view::count(u64::try_from(v).unwrap_or(0))
}

async fn tenants_page(
    state: &ConsoleState,
    session: &OperatorSession,
    error: Option<String>,
    status: StatusCode,
) -> Result<HttpResponse, ConsoleError> {
    let tenants = state
        .store
        .tenant_overview()
        .await?
        .into_iter()
        .map(|t| TenantRow {
            id: t.id.to_string(),
            name: t.name,
            adapters: count(t.adapters),
            users: count(t.users),
            active_keys: count(t.active_keys),
            tokens_24h: count(t.tokens_24h),
            created: view::datetime(t.created_at),
        })
        .collect();
    let page = TenantsPage {
        layout: Layout::for_session(&session.0, "Tenants", Section::Tenants),
        tenants,
        error,
    };
    render(&page, status)
}

/// `GET /console/tenants`.
pub async fn tenants(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
) -> Result<HttpResponse, ConsoleError> {
    tenants_page(&state, &session, None, StatusCode::OK).await
}

/// The create-tenant form.
#[derive(Deserialize)]
pub struct CreateTenantForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// `POST /console/tenants`.
pub async fn create_tenant(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    form: web::Form<CreateTenantForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.0.check_csrf(&form.csrf)?;
    let name = match TenantName::parse(form.name.trim()) {
        Ok(name) => name,
        Err(e) => {
            return tenants_page(
                &state,
                &session,
                Some(e.to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        }
    };
    match state.store.create_tenant(&name, &Quotas::UNLIMITED).await {
        Ok(tenant) => {
            tracing::info!(tenant = %tenant.id, name = name.as_str(), "tenant created in the console");
            Ok(see_other(&format!("/console/tenants/{}", tenant.id)))
        }
        Err(StoreError::Conflict { .. }) => {
            tenants_page(
                &state,
                &session,
                Some(format!(
                    "A tenant named '{}' already exists.",
                    name.as_str()
                )),
                StatusCode::CONFLICT,
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

/// What the detail page shows besides the tenant itself.
#[derive(Default)]
struct Extras {
    new_key: Option<String>,
    error: Option<String>,
    notice: Option<String>,
}

async fn tenant_page(
    state: &ConsoleState,
    session: &OperatorSession,
    id: TenantId,
    extras: Extras,
    status: StatusCode,
) -> Result<HttpResponse, ConsoleError> {
    let store = &state.store;
    let tenant = store.get_tenant(id).await?;
    let used = parts::quota_use(store, id).await?;
    let users = store
        .list_tenant_users(id)
        .await?
        .into_iter()
        .map(|u| UserRow {
            email: u.email.to_string(),
            created: view::datetime(u.created_at),
        })
        .collect();
    let keys = parts::key_rows(store.list_api_keys(id).await?);
    let days = parts::DEFAULT_DAYS;
    let (chart, usage_rows) = parts::usage(store, id, days).await?;
    let page = TenantPage {
        layout: Layout::for_session(
            &session.0,
            &format!("Tenant {}", tenant.name.as_str()),
            Section::Tenants,
        )
        .with_notice(extras.notice),
        tenant_id: id.to_string(),
        tenant_name: tenant.name.as_str().to_owned(),
        created: view::datetime(tenant.created_at),
        adapter_count: used.adapters,
        quotas: parts::quota_views(&tenant.quotas, &used),
        users,
        keys,
        key_base: format!("/console/tenants/{id}/keys"),
        new_key: extras.new_key,
        error: extras.error,
        days,
        chart,
        usage_rows,
    };
    render(&page, status)
}

/// Query of the detail page: which success message to show after a redirect.
#[derive(Deserialize)]
pub struct DoneQuery {
    #[serde(default)]
    done: Option<String>,
}

fn notice_of(done: Option<&str>) -> Option<String> {
    let text = match done? {
        "quotas" => "Quotas saved.",
        "user" => "User created. They can sign in at /console/login.",
        "revoked" => "Key revoked. It stops working at once.",
        _ => return None,
    };
    Some(text.to_owned())
}

/// `GET /console/tenants/{id}`.
pub async fn tenant(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    path: web::Path<TenantId>,
    query: web::Query<DoneQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let extras = Extras {
        notice: notice_of(query.done.as_deref()),
        ..Extras::default()
    };
    tenant_page(&state, &session, path.into_inner(), extras, StatusCode::OK).await
}

/// The quota form: each field empty (unlimited) or a whole number.
#[derive(Deserialize)]
pub struct QuotaForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    max_adapters: String,
    #[serde(default)]
    max_adapter_bytes: String,
    #[serde(default)]
    max_concurrent_streams: String,
    #[serde(default)]
    tokens_per_minute: String,
    #[serde(default)]
    tokens_per_day: String,
}

fn parse_limit(name: &str, value: &str) -> Result<Option<u64>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse::<u64>()
        .map(Some)
        .map_err(|_| format!("{name} must be a whole number of 0 or more, or empty for unlimited"))
}

impl QuotaForm {
    fn quotas(&self) -> Result<Quotas, String> {
        let quotas = Quotas {
            max_adapters: parse_limit("max_adapters", &self.max_adapters)?,
            max_adapter_bytes: parse_limit("max_adapter_bytes", &self.max_adapter_bytes)?,
            max_concurrent_streams: parse_limit(
                "max_concurrent_streams",
                &self.max_concurrent_streams,
            )?,
            tokens_per_minute: parse_limit("tokens_per_minute", &self.tokens_per_minute)?,
            tokens_per_day: parse_limit("tokens_per_day", &self.tokens_per_day)?,
        };
        quotas.validate().map_err(|e| e.to_string())?;
        Ok(quotas)
    }
}

/// `POST /console/tenants/{id}/quotas`.
pub async fn set_quotas(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    path: web::Path<TenantId>,
    form: web::Form<QuotaForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.0.check_csrf(&form.csrf)?;
    let id = path.into_inner();
    match form.quotas() {
        Ok(quotas) => {
            state.store.set_quotas(id, &quotas).await?;
            Ok(see_other(&format!("/console/tenants/{id}?done=quotas")))
        }
        Err(error) => {
            let extras = Extras {
                error: Some(error),
                ..Extras::default()
            };
            tenant_page(
                &state,
                &session,
                id,
                extras,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

/// The create-user form.
#[derive(Deserialize)]
pub struct CreateUserForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

/// `POST /console/tenants/{id}/users`: the password is hashed (argon2id) on the blocking pool.
pub async fn create_user(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    path: web::Path<TenantId>,
    form: web::Form<CreateUserForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.0.check_csrf(&form.csrf)?;
    let id = path.into_inner();
    let form = form.into_inner();
    let invalid = |error: String| Extras {
        error: Some(error),
        ..Extras::default()
    };
    let parsed =
        Email::parse(&form.email).and_then(|e| Password::parse(form.password).map(|p| (e, p)));
    let (email, password) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            return tenant_page(
                &state,
                &session,
                id,
                invalid(e.to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        }
    };
    let hash = web::block(move || password.hash())
        .await?
        .map_err(|e| ConsoleError::Internal(e.to_string()))?;
    match state.store.create_tenant_user(id, &email, &hash).await {
        Ok(_) => Ok(see_other(&format!("/console/tenants/{id}?done=user"))),
        Err(StoreError::Conflict { .. }) => {
            tenant_page(
                &state,
                &session,
                id,
                invalid(format!("A user with the email {email} already exists.")),
                StatusCode::CONFLICT,
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

/// The create-key form.
#[derive(Deserialize)]
pub struct CreateKeyForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub label: String,
}

/// `POST /console/tenants/{id}/keys`: the page shows the new key once.
pub async fn create_key(
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    path: web::Path<TenantId>,
    form: web::Form<CreateKeyForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.0.check_csrf(&form.csrf)?;
    let id = path.into_inner();
    let label = form.label.trim();
    let label = if label.is_empty() { "console" } else { label };
    let (_, key) = state.store.create_api_key(id, label).await?;
    let extras = Extras {
        new_key: Some(key.expose().to_owned()),
        ..Extras::default()
    };
    tenant_page(&state, &session, id, extras, StatusCode::CREATED).await
}

/// The revoke button's form.
#[derive(Deserialize)]
pub struct RevokeForm {
    #[serde(default)]
    pub csrf: String,
}

/// `POST /console/tenants/{id}/keys/{key}/revoke`.
pub async fn revoke_key(
    req: actix_web::HttpRequest,
    state: web::Data<ConsoleState>,
    session: OperatorSession,
    path: web::Path<(TenantId, ApiKeyId)>,
    form: web::Form<RevokeForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.0.check_csrf(&form.csrf)?;
    let (tenant, key) = path.into_inner();
    state.store.revoke_api_key(tenant, key).await?;
    super::upload::forget_key(&req, key);
    tracing::info!(%tenant, %key, at = %OffsetDateTime::now_utc(), "api key revoked in the console");
    Ok(see_other(&format!(
        "/console/tenants/{tenant}?done=revoked"
    )))
}
