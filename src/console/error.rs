//! The console's one error type and how each variant looks to a browser: an HTML page with the
//! right status (404 for anything outside the caller's scope, so other tenants' ids reveal
//! nothing), or a redirect to the login form.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use askama::Template;

use super::view::Layout;
use crate::store::StoreError;

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No such page, or not the caller's to see.
    #[error("not found")]
    NotFound,
    /// No valid session; the browser is sent to the login form and then back to `next`.
    #[error("login required")]
    LoginRequired { next: String },
    /// A form arrived without the session's CSRF token.
    #[error("missing or wrong CSRF token")]
    Csrf,
    /// A malformed request (bad form body).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else that is our fault (template rendering, a blocking task that died).
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    layout: Layout,
    heading: &'static str,
    message: String,
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::NotFound => StatusCode::NOT_FOUND,
            ConsoleError::LoginRequired { .. } => StatusCode::SEE_OTHER,
            ConsoleError::Csrf => StatusCode::FORBIDDEN,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Store(StoreError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ConsoleError::Store(_) | ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ConsoleError::LoginRequired { next } = self {
            let location = format!("/console/login?next={}", super::view::encode_query(next));
            return HttpResponse::SeeOther()
                .insert_header((header::LOCATION, location))
                .finish();
        }
        let status = self.status_code();
        let (heading, message) = match self {
            ConsoleError::NotFound | ConsoleError::Store(StoreError::NotFound { .. }) => (
                "Not found",
                "There is nothing here, or it is not yours to see.".to_owned(),
            ),
            ConsoleError::Csrf => (
                "Form expired",
                "This form did not carry a valid security token. Reload the page and try again."
                    .to_owned(),
            ),
            ConsoleError::BadRequest(reason) => ("Bad request", reason.clone()),
            other => {
                tracing::error!(error = %other, "console request failed");
                (
                    "Something went wrong",
                    "The server could not complete this request. Try again in a moment.".to_owned(),
                )
            }
        };
        let page = ErrorPage {
            layout: Layout::anonymous(heading, ""),
            heading,
            message,
        };
        match page.render() {
            Ok(html) => HttpResponse::build(status)
                .content_type("text/html; charset=utf-8")
                .body(html),
            Err(_) => HttpResponse::build(status)
                .content_type("text/plain; charset=utf-8")
                .body(heading),
        }
    }
}

impl From<askama::Error> for ConsoleError {
    fn from(e: askama::Error) -> Self {
        ConsoleError::Internal(format!("template: {e}"))
    }
}

impl From<actix_web::error::BlockingError> for ConsoleError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ConsoleError::Internal(format!("blocking task: {e}"))
    }
}
