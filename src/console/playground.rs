//! The playground page. The page itself only lists the tenant's adapters; generation runs in
//! the browser over `/v1/stream`, which accepts the console session cookie (see
//! [`super::session::stream_tenant`]).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::ConsoleState;
use super::error::ConsoleError;
use super::session::TenantSession;
use super::upload;
use super::view::{Layout, Section, render};

#[derive(Template)]
#[template(path = "console/playground.html")]
struct PlaygroundPage {
    layout: Layout,
    tenant_name: String,
    model_id: String,
    adapters: Vec<String>,
    selected: Option<String>,
}

/// Query of the playground: an adapter to preselect.
#[derive(Deserialize)]
pub struct PlaygroundQuery {
    #[serde(default)]
    adapter: Option<String>,
}

/// `GET /console/playground`.
pub async fn page(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    session: TenantSession,
    query: web::Query<PlaygroundQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let adapters: Vec<String> = state
        .store
        .list_adapters(session.tenant)
        .await?
        .into_iter()
        .map(|a| a.name.as_str().to_owned())
        .collect();
    let selected = query
        .adapter
        .clone()
        .filter(|a| adapters.iter().any(|n| n == a));
    let page = PlaygroundPage {
        layout: Layout::for_session(&session.session, "Playground", Section::Playground),
        tenant_name: session.tenant_name.clone(),
        model_id: upload::model_id(&req),
        adapters,
        selected,
    };
    render(&page, StatusCode::OK)
}
