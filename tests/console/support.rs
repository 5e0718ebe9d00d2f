//! Console test support: the service with an operator account, tenant users, and an HTTP client
//! that logs in like a browser (login CSRF cookie, session cookie) without following redirects.

#![allow(dead_code)]

use punica::domain::{AdapterName, Email, Password, TenantName};
use punica::store::{NewAdapterVersion, Store};
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;

use crate::browser::Page;
use crate::helpers::{TestApp, spawn_app};
use crate::service_helpers::{Service, spawn_service};

pub const OPERATOR_EMAIL: &str = "ops@example.com";
pub const OPERATOR_PASSWORD: &str = "operator-password-1";
pub const USER_PASSWORD: &str = "tenant-password-1";

/// The app with one operator account; with the tiny model when the test needs the service's
/// model-backed routes (uploads, streaming).
pub struct Console {
    inner: Inner,
}

enum Inner {
    Plain(TestApp),
    Model(Service),
}

impl std::ops::Deref for Console {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        match &self.inner {
            Inner::Plain(app) => app,
            Inner::Model(service) => service,
        }
    }
}

impl Console {
    /// The service helpers (uploads with an API key, sockets); only with the model.
    pub fn service(&self) -> &Service {
        match &self.inner {
            Inner::Model(service) => service,
            Inner::Plain(_) => panic!("this test needs spawn_console_with_model()"),
        }
    }
}

async fn hash(password: &str) -> String {
    let password = Password::parse(password).expect("test password is valid");
    tokio::task::spawn_blocking(move || password.hash().expect("hash"))
        .await
        .expect("hashing task")
}

async fn with_operator(inner: Inner) -> Console {
    let console = Console { inner };
    let email = Email::parse(OPERATOR_EMAIL).expect("email");
    console
        .store
        .create_operator(&email, &hash(OPERATOR_PASSWORD).await)
        .await
        .expect("create operator");
    console
}

/// Starts the app (no model) and creates the operator.
pub async fn spawn_console() -> Console {
    with_operator(Inner::Plain(spawn_app().await)).await
}

/// Starts the app serving the tiny model and creates the operator.
pub async fn spawn_console_with_model() -> Console {
    with_operator(Inner::Model(spawn_service().await)).await
}

/// Records an adapter version in the store directly (metadata only: pages that list, show and
/// delete adapters need no weights).
pub async fn insert_adapter(store: &Store, tenant_id: &str, name: &str, rank: u32) {
    let new = NewAdapterVersion {
        rank,
        alpha: f64::from(2 * rank),
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        dtype: "float32".into(),
        size_bytes: 4096 * u64::from(rank),
        sha256: format!("{:064x}", rank),
        blob_key: format!("test/{name}/{rank}"),
    };
    store
        .create_adapter_version(
            tenant_id.parse().expect("tenant id"),
            &AdapterName::parse(name).expect("adapter name"),
            &new,
        )
        .await
        .expect("insert adapter version");
}

/// A tenant with one console user, created directly in the store.
pub struct TenantUser {
    pub tenant_id: String,
    pub tenant_name: String,
    pub email: String,
}

/// Creates tenant `name` with user `<name>@example.com` (password [`USER_PASSWORD`]).
pub async fn tenant_with_user(store: &Store, name: &str) -> TenantUser {
    let tenant = store
        .create_tenant(
            &TenantName::parse(name).expect("tenant name"),
            &punica::domain::Quotas::UNLIMITED,
        )
        .await
        .expect("create tenant");
    let email = format!("{name}@example.com");
    store
        .create_tenant_user(
            tenant.id,
            &Email::parse(&email).expect("email"),
            &hash(USER_PASSWORD).await,
        )
        .await
        .expect("create user");
    TenantUser {
        tenant_id: tenant.id.to_string(),
        tenant_name: name.to_owned(),
        email,
    }
}

/// The value of cookie `name` among a response's `Set-Cookie` headers.
pub fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// The value part of a `Set-Cookie` header (`name=value; ...` -> `value`).
pub fn cookie_value(header: &str) -> String {
    header
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

/// The content of `<meta name="csrf-token">` or of the first hidden `csrf` input.
pub fn csrf_of(html: &str) -> String {
    for marker in [r#"name="csrf-token" content=""#, r#"name="csrf" value=""#] {
        if let Some(start) = html.find(marker) {
            let rest = &html[start + marker.len()..];
            if let Some(end) = rest.find('"') {
                return rest[..end].to_owned();
            }
        }
    }
    panic!("no CSRF token in the page");
}

/// An `application/x-www-form-urlencoded` body (reqwest's `form` feature is not enabled).
pub fn form_body(fields: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Adds a form body to a request.
pub trait FormBody {
    /// Sends `fields` as a urlencoded form.
    fn form_fields(self, fields: &[(&str, &str)]) -> Self;
}

impl FormBody for reqwest::RequestBuilder {
    fn form_fields(self, fields: &[(&str, &str)]) -> Self {
        self.header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form_body(fields))
    }
}

/// A client that keeps one session cookie and never follows redirects.
pub struct HttpSession {
    pub client: reqwest::Client,
    pub base: String,
    pub cookie: String,
}

/// A client without redirects.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("http client")
}

/// The login form's double-submit token and its cookie.
pub async fn login_form(base: &str) -> (String, String) {
    let client = plain_client();
    let response = client
        .get(format!("{base}/console/login"))
        .send()
        .await
        .expect("login form");
    assert_eq!(response.status(), 200);
    let cookie = set_cookie(&response, "punica_login_csrf").expect("login csrf cookie");
    let html = response.text().await.expect("login html");
    (csrf_of(&html), cookie_value(&cookie))
}

/// Posts the login form; returns the raw response.
pub async fn post_login(base: &str, email: &str, password: &str) -> reqwest::Response {
    let (csrf, cookie) = login_form(base).await;
    plain_client()
        .post(format!("{base}/console/login"))
        .header(COOKIE, format!("punica_login_csrf={cookie}"))
        .form_fields(&[
            ("email", email),
            ("password", password),
            ("csrf", &csrf),
            ("next", ""),
        ])
        .send()
        .await
        .expect("login post")
}

impl HttpSession {
    /// Logs in and keeps the session cookie.
    pub async fn login(base: &str, email: &str, password: &str) -> HttpSession {
        let response = post_login(base, email, password).await;
        assert_eq!(response.status(), 303, "login of {email} failed");
        let cookie = set_cookie(&response, "punica_session").expect("session cookie");
        HttpSession {
            client: plain_client(),
            base: base.to_owned(),
            cookie: cookie_value(&cookie),
        }
    }

    /// GET with the session.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header(COOKIE, format!("punica_session={}", self.cookie))
            .send()
            .await
            .expect("console GET")
    }

    /// The CSRF token of the page at `path`.
    pub async fn csrf(&self, path: &str) -> String {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        csrf_of(&response.text().await.expect("page"))
    }

    /// POSTs a form with the session.
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header(COOKIE, format!("punica_session={}", self.cookie))
            .form_fields(form)
            .send()
            .await
            .expect("console POST")
    }
}

/// Where a redirect points.
pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Logs in through the browser's login form and waits for the landing page.
pub async fn browser_login(page: &Page, base: &str, email: &str, password: &str) {
    page.goto(&format!("{base}/console/login")).await;
    page.fill("#email", email).await;
    page.fill("#password", password).await;
    page.click("button[type=submit]").await;
    page.find("header .whoami").await;
}
