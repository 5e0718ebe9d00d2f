//! The only place with SQL. Tenants, operators, tenant users, API keys, adapters and their
//! versions, quotas, the usage ledger, token-rate windows and concurrent-stream leases.
//!
//! Every query on tenant-owned data takes the tenant id and filters on it, so a handler that
//! holds tenant A's id cannot read or change tenant B's rows even by passing B's object ids.
//! Queries are runtime `query_as` + `FromRow`: no database is needed at build time.
//! Quota checks that must hold across replicas are done in SQL (row locks or conditional
//! `UPDATE ... RETURNING`), never as read-then-write in Rust.

mod adapters;
mod api_keys;
mod console;
pub mod managed;
mod tenants;
mod usage;
mod users;

use std::time::Duration;

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

pub use adapters::{AdapterStatus, AdapterVersion, BlobLock, NewAdapterVersion};
pub use api_keys::{ApiKeyInfo, AuthenticatedKey};
pub use console::{ConsoleSession, SessionPrincipal, TenantOverview};
pub use tenants::Tenant;
pub use usage::{TokenReservation, UsageDay, UsageRecord};
pub use users::{Operator, TenantUser};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Errors of the store. Handlers map them to HTTP statuses; the variants carry the numbers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such row in the caller's scope.
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// A unique name or email is taken.
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    /// A tenant quota would be exceeded.
    #[error("quota {quota} exceeded: limit {limit}, in use {current}, requested {requested}")]
    QuotaExceeded {
        quota: &'static str,
        limit: u64,
        current: u64,
        requested: u64,
    },
    /// A token-rate window is full.
    #[error(
        "token rate limit per {window} reached: limit {limit}, used {used}, requested {requested}"
    )]
    RateLimited {
        window: &'static str,
        limit: u64,
        used: u64,
        requested: u64,
        /// Seconds until the window rolls over.
        retry_after_secs: u64,
    },
    /// The server did not answer in time.
    #[error("no answer within {secs} s")]
    ConnectTimeout { secs: u64 },
    /// A stored value no longer parses (hand-edited database).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Connection, protocol or SQL error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Handle to the database; cheap to clone (a pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Wraps an existing pool.
    pub fn new(pool: PgPool) -> Store {
        Store { pool }
    }

    /// Connects (failing after `timeout` when the server does not answer).
    ///
    /// One direct connection comes first: the pool retries refused connections until its
    /// timeout and then reports only "timed out", while the direct attempt keeps the real cause
    /// (refused, unknown database, authentication) for the error message.
    pub async fn connect(
        options: PgConnectOptions,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let probe = tokio::time::timeout(timeout, PgConnection::connect_with(&options))
            .await
            .map_err(|_| StoreError::ConnectTimeout {
                secs: timeout.as_secs(),
            })??;
        probe.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// The underlying pool (tests and health checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations; a no-op when the schema is current. Safe to run from several
    /// replicas at once (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// One round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates database `name` on the server behind `maintenance` (a connection to an existing
/// database such as `postgres`) unless it exists.
pub async fn ensure_database(
    maintenance: PgConnectOptions,
    name: &str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let admin = Store::connect(maintenance, timeout).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(admin.pool())
        .await?;
    if exists.is_none() {
        let sql = format!("CREATE DATABASE {}", quote_ident(name));
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(admin.pool())
            .await
        {
            Ok(_) => {}
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => {
                admin.close().await;
                return Err(e.into());
            }
        }
    }
    admin.close().await;
    Ok(())
}

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `host:port/database` (or the socket directory) of a connection target, without credentials,
/// for error messages.
pub fn describe_target(options: &PgConnectOptions) -> String {
    let db = options.get_database().unwrap_or("");
    match options.get_socket() {
        Some(dir) => format!(
            "unix socket {} port {}/{db}",
            dir.display(),
            options.get_port()
        ),
        None => format!("{}:{}/{db}", options.get_host(), options.get_port()),
    }
}

fn map_unique(e: sqlx::Error, what: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict { what },
        _ => StoreError::Database(e),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(to_u64)
}
