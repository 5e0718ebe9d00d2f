//! Console test support: the service with an operator account, tenant users, and an HTTP client
//! that logs in like a browser (login CSRF cookie, session cookie) without following redirects.

#![allow(dead_code)]

use punica::domain::{Email, Password, TenantName};
use punica::store::Store;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;

use crate::browser::Page;
use crate::service_helpers::{Service, spawn_service};

pub const OPERATOR_EMAIL: &str = "ops@example.com";
pub const OPERATOR_PASSWORD: &str = "operator-password-1";
pub const USER_PASSWORD: &str = "tenant-password-1";

/// The service with the tiny model and one operator account.
pub struct Console {
    pub service: Service,
}

impl std::ops::Deref for Console {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

async fn hash(password: &str) -> String {
    let password = Password::parse(password).expect("test password is valid");
    tokio::task::spawn_blocking(move || password.hash().expect("hash"))
        .await
        .expect("hashing task")
}

/// Starts the service and creates the operator.
pub async fn spawn_console() -> Console {
    let service = spawn_service().await;
    let email = Email::parse(OPERATOR_EMAIL).expect("email");
    service
        .store
        .create_operator(&email, &hash(OPERATOR_PASSWORD).await)
        .await
        .expect("create operator");
    Console { service }
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
        .form(&[
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
            .form(form)
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
