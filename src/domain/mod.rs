//! Validated domain types ("parse, don't validate"): once a value of one of these types exists it
//! is known to be well formed, so handlers and the store never re-check it.

mod api_key;
mod credentials;
mod ids;
mod names;
mod quotas;

pub use api_key::{API_KEY_PREFIX, ApiKey, ApiKeyHash};
pub use credentials::{Email, Password, PasswordHashError};
pub use ids::{AdapterId, AdapterVersionId, ApiKeyId, OperatorId, StreamLeaseId, TenantId, UserId};
pub use names::{AdapterName, TenantName};
pub use quotas::Quotas;

/// Why a value was rejected. Messages are meant for API clients (`invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A name does not match `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error(
        "invalid {what} `{value}`: use 1 to 63 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    InvalidName { what: &'static str, value: String },
    /// Not an email address.
    #[error("invalid email address `{0}`")]
    InvalidEmail(String),
    /// Password too short or too long.
    #[error("password must be between {min} and {max} characters, got {len}")]
    InvalidPassword { len: usize, min: usize, max: usize },
    /// Not an API key of this service.
    #[error("malformed API key")]
    InvalidApiKey,
    /// A quota does not fit the database's signed 64-bit integers.
    #[error("quota `{name}` is too large: {value}")]
    QuotaTooLarge { name: &'static str, value: u64 },
    /// Not a UUID.
    #[error("invalid id `{0}`")]
    InvalidId(String),
}
