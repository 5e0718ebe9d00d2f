//! Logging in and out.
//!
//! One form serves operators and tenant users (operators are looked up first). Every attempt
//! costs exactly one argon2id verification, run on the blocking pool: against the account's
//! hash, or against a dummy hash when the email is unknown, so the response time does not tell
//! whether an account exists. Failures are counted in Postgres per email and per client address;
//! past the limits further attempts are refused without checking the password until the window
//! has passed. The login form itself carries a double-submit CSRF token (cookie + field), so a
//! foreign page cannot sign a browser into an attacker's account.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::ConsoleState;
use super::error::ConsoleError;
use super::session::{
    self, LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL, Session, constant_time_eq, random_token,
    removal_cookie, secure_cookie, token_hash,
};
use super::view::{Layout, render, see_other};
use crate::domain::{Email, Password};
use crate::store::SessionPrincipal;

/// Failed logins per email within [`THROTTLE_WINDOW`] before that email is locked out.
pub const MAX_FAILURES_PER_EMAIL: u64 = 5;
/// Failed logins per client address within [`THROTTLE_WINDOW`] before it is locked out.
pub const MAX_FAILURES_PER_ADDRESS: u64 = 30;
/// How long failures count.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    layout: Layout,
    error: Option<String>,
    email: String,
    next: String,
}

/// Query of the login form: where to go afterwards.
#[derive(Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

/// Only console paths are acceptable redirect targets (no open redirect to another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/console/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/console/".to_owned(),
    }
}

fn login_page(
    req: &HttpRequest,
    status: StatusCode,
    error: Option<String>,
    email: String,
    next: String,
) -> Result<HttpResponse, ConsoleError> {
    // A fresh double-submit token per rendering of the form.
    let csrf = random_token();
    let page = LoginPage {
        layout: Layout::anonymous("Sign in", &csrf),
        error,
        email,
        next,
    };
    let mut response = render(&page, status)?;
    response
        .add_cookie(&secure_cookie(req, LOGIN_CSRF_COOKIE, csrf))
        .map_err(|e| ConsoleError::Internal(e.to_string()))?;
    Ok(response)
}

/// `GET /console/login`. A browser that is already signed in goes straight on.
pub async fn login_form(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    query: web::Query<LoginQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let next = safe_next(query.next.as_deref());
    if session::lookup(&state, &req).await?.is_some() {
        return Ok(see_other(&next));
    }
    login_page(&req, StatusCode::OK, None, String::new(), next)
}

/// The login form's fields.
#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

/// An account that may log in, with its stored hash.
enum Account {
    Operator(crate::domain::OperatorId),
    TenantUser(crate::domain::UserId, crate::domain::TenantId),
}

/// `POST /console/login`.
pub async fn login(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    form: web::Form<LoginForm>,
) -> Result<HttpResponse, ConsoleError> {
    let form = form.into_inner();
    let next = safe_next(form.next.as_deref());
    let cookie_token = req
        .cookie(LOGIN_CSRF_COOKIE)
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    if form.csrf.is_empty() || !constant_time_eq(form.csrf.as_bytes(), cookie_token.as_bytes()) {
        return Err(ConsoleError::Csrf);
    }
    let typed_email = form.email.trim().to_owned();
    let email = Email::parse(&typed_email).ok();
    let address = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned());
    let email_key = format!("email:{}", email.as_ref().map_or("-", |e| e.as_str()));
    let address_key = format!("ip:{address}");

    let store = &state.store;
    let email_failures = store
        .recent_login_failures(&email_key, THROTTLE_WINDOW)
        .await?;
    let address_failures = store
        .recent_login_failures(&address_key, THROTTLE_WINDOW)
        .await?;
    if email_failures >= MAX_FAILURES_PER_EMAIL || address_failures >= MAX_FAILURES_PER_ADDRESS {
        let key = if email_failures >= MAX_FAILURES_PER_EMAIL {
            &email_key
        } else {
            &address_key
        };
        let wait = store.login_retry_after(key, THROTTLE_WINDOW).await?;
        tracing::warn!(email = %typed_email, %address, "console login throttled");
        return login_page(
            &req,
            StatusCode::TOO_MANY_REQUESTS,
            Some(format!(
                "Too many failed sign-in attempts. Try again in {} minute(s).",
                wait.div_ceil(60).max(1)
            )),
            typed_email,
            next,
        );
    }

    // Both tables are always asked, so the queries cost the same whoever the email belongs to.
    let account: Option<(Account, String)> = match &email {
        Some(email) => {
            let (operator, user) = tokio::try_join!(
                store.operator_credentials(email),
                store.tenant_user_credentials(email)
            )?;
            match (operator, user) {
                (Some((op, hash)), _) => Some((Account::Operator(op.id), hash)),
                (None, Some((user, hash))) => {
                    Some((Account::TenantUser(user.id, user.tenant_id), hash))
                }
                (None, None) => None,
            }
        }
        None => None,
    };
    let password = form.password;
    let stored_hash = account.as_ref().map(|(_, h)| h.clone());
    let verifier = state.clone();
    let verified = web::block(move || {
        let dummy = verifier.dummy_hash();
        let hash = stored_hash.as_deref().unwrap_or(dummy);
        // A password outside the accepted length is still checked against a hash (and fails),
        // so its timing matches a normal failure.
        match Password::parse(password) {
            Ok(p) => p.verify(hash) && stored_hash.is_some(),
            Err(_) => {
                let _ = Password::parse("x".repeat(16)).map(|p| p.verify(hash));
                false
            }
        }
    })
    .await?;

    let account = match (verified, account) {
        (true, Some((account, _))) => account,
        _ => {
            store
                .record_login_failure(&[email_key, address_key])
                .await?;
            tracing::info!(email = %typed_email, %address, "console login failed");
            return login_page(
                &req,
                StatusCode::UNAUTHORIZED,
                Some("The email or password is not correct.".to_owned()),
                typed_email,
                next,
            );
        }
    };
    store.clear_login_failures(&email_key).await?;
    // Logins are rare next to page views: a good moment to drop expired sessions and stale
    // failure rows, with no background task to run.
    let pruned = store.prune_console_state(THROTTLE_WINDOW).await?;
    if pruned > 0 {
        tracing::debug!(pruned, "expired console sessions removed");
    }

    let principal = match account {
        Account::Operator(id) => SessionPrincipal::Operator(id),
        Account::TenantUser(user, tenant) => SessionPrincipal::TenantUser { user, tenant },
    };
    // A new token at every login: a token planted before login is never promoted.
    let token = random_token();
    let csrf = random_token();
    store
        .create_console_session(&token_hash(&token), principal, &csrf, SESSION_TTL)
        .await?;
    tracing::info!(email = %typed_email, "console login");
    let next = match (principal, next.as_str()) {
        (SessionPrincipal::Operator(_), "/console/") => "/console/tenants".to_owned(),
        (SessionPrincipal::TenantUser { .. }, "/console/") => "/console/adapters".to_owned(),
        _ => next,
    };
    let mut response = see_other(&next);
    let mut cookie = secure_cookie(&req, SESSION_COOKIE, token);
    cookie.set_max_age(actix_web::cookie::time::Duration::seconds(
        i64::try_from(SESSION_TTL.as_secs()).unwrap_or(i64::MAX),
    ));
    response
        .add_cookie(&cookie)
        .and_then(|()| response.add_cookie(&removal_cookie(&req, LOGIN_CSRF_COOKIE)))
        .map_err(|e| ConsoleError::Internal(e.to_string()))?;
    Ok(response)
}

/// A form carrying only its CSRF token.
#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// `POST /console/logout`: ends the session everywhere (the row is gone) and drops the cookie.
pub async fn logout(
    req: HttpRequest,
    state: web::Data<ConsoleState>,
    session: Session,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, ConsoleError> {
    session.check_csrf(&form.csrf)?;
    state
        .store
        .delete_console_session(&session.token_hash)
        .await?;
    let mut response = see_other("/console/login");
    response
        .add_cookie(&removal_cookie(&req, SESSION_COOKIE))
        .map_err(|e| ConsoleError::Internal(e.to_string()))?;
    Ok(response)
}

/// `GET /console/`: the home of whoever is signed in.
pub async fn home(session: Session) -> HttpResponse {
    if session.is_operator() {
        see_other("/console/tenants")
    } else {
        see_other("/console/adapters")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_redirect_targets() {
        assert_eq!(safe_next(Some("/console/keys")), "/console/keys");
        assert_eq!(safe_next(Some("https://evil.example/")), "/console/");
        assert_eq!(safe_next(Some("//evil.example/console/")), "/console/");
        assert_eq!(safe_next(Some("/console/\\evil")), "/console/");
        assert_eq!(safe_next(None), "/console/");
    }
}
