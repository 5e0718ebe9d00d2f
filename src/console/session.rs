//! Console sessions: a random 256-bit token in an HttpOnly, SameSite=Strict cookie (Secure when
//! the request came over TLS, directly or through a proxy that says `X-Forwarded-Proto: https`),
//! and a row in Postgres keyed by the token's SHA-256.
//!
//! Why server-side rows rather than signed cookies: logout and account deletion end a session at
//! once on every replica, the CSRF synchronizer token lives next to the session it belongs to,
//! and there is no signing key to distribute or rotate. The cost is one indexed lookup per page.
//!
//! The cookie's path is `/` because the playground's WebSocket (`/v1/stream`) authenticates with
//! it too ([`stream_tenant`]); that path checks the `Origin` header, since browsers send cookies
//! on cross-origin WebSocket handshakes from the same site.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::http::{Method, header};
use actix_web::{FromRequest, HttpRequest, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::ConsoleState;
use super::error::ConsoleError;
use crate::domain::TenantId;
use crate::store::{ConsoleSession, SessionPrincipal};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "punica_session";
/// Name of the pre-login CSRF cookie (double-submit token of the login form).
pub const LOGIN_CSRF_COOKIE: &str = "punica_login_csrf";
/// Absolute lifetime of a session.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// A session unused for this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(2 * 3600);

/// A fresh random token: 32 bytes, base64url (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes[..]);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database stores for a cookie token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the browser reached us over TLS (directly, or as a proxy in front of us says).
pub fn is_https(req: &HttpRequest) -> bool {
    let forwarded = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("https")
        });
    forwarded || req.connection_info().scheme() == "https"
}

/// A cookie with the console's security attributes.
pub fn secure_cookie<'a>(req: &HttpRequest, name: &'a str, value: String) -> Cookie<'a> {
    Cookie::build(name, value)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(is_https(req))
        .finish()
}

/// A cookie that deletes `name` in the browser.
pub fn removal_cookie<'a>(req: &HttpRequest, name: &'a str) -> Cookie<'a> {
    let mut cookie = secure_cookie(req, name, String::new());
    cookie.make_removal();
    cookie
}

/// A signed-in console user.
#[derive(Clone, Debug)]
pub struct Session {
    pub token_hash: [u8; 32],
    pub inner: ConsoleSession,
}

impl Session {
    /// Whether an operator is signed in.
    pub fn is_operator(&self) -> bool {
        matches!(self.inner.principal, SessionPrincipal::Operator(_))
    }

    /// The tenant of a tenant user's session.
    pub fn tenant(&self) -> Option<TenantId> {
        match self.inner.principal {
            SessionPrincipal::TenantUser { tenant, .. } => Some(tenant),
            SessionPrincipal::Operator(_) => None,
        }
    }

    /// Refuses a state-changing request whose token is not this session's.
    pub fn check_csrf(&self, presented: &str) -> Result<(), ConsoleError> {
        if !presented.is_empty()
            && constant_time_eq(presented.as_bytes(), self.inner.csrf_token.as_bytes())
        {
            Ok(())
        } else {
            Err(ConsoleError::Csrf)
        }
    }
}

fn state_of(req: &HttpRequest) -> Result<web::Data<ConsoleState>, ConsoleError> {
    req.app_data::<web::Data<ConsoleState>>()
        .cloned()
        .ok_or_else(|| ConsoleError::Internal("console state is not registered".into()))
}

/// The session a request's cookie names, if it is live.
pub async fn lookup(
    state: &ConsoleState,
    req: &HttpRequest,
) -> Result<Option<Session>, ConsoleError> {
    let Some(cookie) = req.cookie(SESSION_COOKIE) else {
        return Ok(None);
    };
    let hash = token_hash(cookie.value());
    Ok(state
        .store
        .console_session(&hash, SESSION_IDLE)
        .await?
        .map(|inner| Session {
            token_hash: hash,
            inner,
        }))
}

/// Where to come back to after logging in: the page asked for (GETs only).
fn next_of(req: &HttpRequest) -> String {
    if req.method() == Method::GET {
        match req.uri().path_and_query() {
            Some(pq) => pq.as_str().to_owned(),
            None => "/console/".to_owned(),
        }
    } else {
        "/console/".to_owned()
    }
}

impl FromRequest for Session {
    type Error = ConsoleError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state_of(&req)?;
            lookup(&state, &req)
                .await?
                .ok_or_else(|| ConsoleError::LoginRequired {
                    next: next_of(&req),
                })
        })
    }
}

/// A signed-in operator. Tenant users get 404 on operator pages.
#[derive(Clone, Debug)]
pub struct OperatorSession(pub Session);

impl FromRequest for OperatorSession {
    type Error = ConsoleError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let session = Session::from_request(req, payload);
        Box::pin(async move {
            let session = session.await?;
            if session.is_operator() {
                Ok(OperatorSession(session))
            } else {
                Err(ConsoleError::NotFound)
            }
        })
    }
}

/// A signed-in tenant user, with the tenant that scopes every query of the request.
#[derive(Clone, Debug)]
pub struct TenantSession {
    pub session: Session,
    pub tenant: TenantId,
    pub tenant_name: String,
}

impl FromRequest for TenantSession {
    type Error = ConsoleError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let session = Session::from_request(req, payload);
        Box::pin(async move {
            let session = session.await?;
            let tenant = session.tenant().ok_or(ConsoleError::NotFound)?;
            let tenant_name = session.inner.tenant_name.clone().unwrap_or_default();
            Ok(TenantSession {
                session,
                tenant,
                tenant_name,
            })
        })
    }
}

/// The tenant a browser's WebSocket handshake acts for, from its console session cookie.
///
/// `Ok(None)` when there is no cookie, the session is not live, or it is an operator's (who has
/// no tenant to generate for). A handshake whose `Origin` is not this server's is refused even
/// with a valid cookie: that is another page (perhaps on the same site) trying to ride the
/// user's session.
pub async fn stream_tenant(req: &HttpRequest) -> Result<Option<StreamTenant>, ConsoleError> {
    if req.cookie(SESSION_COOKIE).is_none() {
        return Ok(None);
    }
    if !same_origin(req) {
        return Ok(None);
    }
    let state = match req.app_data::<web::Data<ConsoleState>>() {
        Some(state) => state.clone(),
        None => return Ok(None),
    };
    let Some(session) = lookup(&state, req).await? else {
        return Ok(None);
    };
    Ok(match session.inner.principal {
        SessionPrincipal::TenantUser { user, tenant } => Some(StreamTenant {
            tenant_id: tenant,
            tenant_name: session.inner.tenant_name.unwrap_or_default(),
            user_id: user,
        }),
        SessionPrincipal::Operator(_) => None,
    })
}

/// A tenant resolved from a console session for the streaming endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTenant {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub user_id: crate::domain::UserId,
}

/// Whether the request's `Origin` names this server (scheme, host and port as the browser used
/// them). A request without `Origin` is not a browser's cross-origin request but also not one we
/// can vouch for, so it fails too.
pub fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let info = req.connection_info();
    let scheme = if is_https(req) { "https" } else { "http" };
    origin.eq_ignore_ascii_case(&format!("{scheme}://{}", info.host()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn tokens_are_random_and_hashed_for_storage() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_behind_a_tls_proxy() {
        let plain = TestRequest::default().to_http_request();
        let cookie = secure_cookie(&plain, SESSION_COOKIE, "t".into());
        assert_eq!(cookie.http_only(), Some(true));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(cookie.secure(), Some(false));
        let proxied = TestRequest::default()
            .insert_header(("x-forwarded-proto", "https"))
            .to_http_request();
        assert_eq!(
            secure_cookie(&proxied, SESSION_COOKIE, "t".into()).secure(),
            Some(true)
        );
    }

    #[test]
    fn websocket_origin_must_match_the_host() {
        let same = TestRequest::default()
            .insert_header((header::HOST, "localhost:8080"))
            .insert_header((header::ORIGIN, "http://localhost:8080"))
            .to_http_request();
        assert!(same_origin(&same));
        let other = TestRequest::default()
            .insert_header((header::HOST, "localhost:8080"))
            .insert_header((header::ORIGIN, "http://localhost:9999"))
            .to_http_request();
        assert!(!same_origin(&other));
        let none = TestRequest::default()
            .insert_header((header::HOST, "localhost:8080"))
            .to_http_request();
        assert!(!same_origin(&none));
    }
}
