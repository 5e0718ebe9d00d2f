//! Console accounts: operators (service administrators) and tenant users. Passwords arrive here
//! already hashed (argon2id PHC strings, see [`crate::domain::Password::hash`]).

use sqlx::FromRow;
use time::OffsetDateTime;

use super::{Store, StoreError, map_unique};
use crate::domain::{Email, OperatorId, TenantId, UserId};

/// An operator account (without its password hash).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Operator {
    pub id: OperatorId,
    pub email: Email,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A tenant's console user (without its password hash).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TenantUser {
    pub id: UserId,
    pub tenant_id: TenantId,
    pub email: Email,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(FromRow)]
struct OperatorRow {
    id: OperatorId,
    email: String,
    password_hash: String,
    created_at: OffsetDateTime,
}

#[derive(FromRow)]
struct UserRow {
    id: UserId,
    tenant_id: TenantId,
    email: String,
    password_hash: String,
    created_at: OffsetDateTime,
}

fn email(s: String) -> Result<Email, StoreError> {
    Email::parse(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl OperatorRow {
    fn split(self) -> Result<(Operator, String), StoreError> {
        Ok((
            Operator {
                id: self.id,
                email: email(self.email)?,
                created_at: self.created_at,
            },
            self.password_hash,
        ))
    }
}

impl UserRow {
    fn split(self) -> Result<(TenantUser, String), StoreError> {
        Ok((
            TenantUser {
                id: self.id,
                tenant_id: self.tenant_id,
                email: email(self.email)?,
                created_at: self.created_at,
            },
            self.password_hash,
        ))
    }
}

impl Store {
    /// Creates an operator. `Conflict` when the email is taken.
    pub async fn create_operator(
        &self,
        email: &Email,
        password_hash: &str,
    ) -> Result<Operator, StoreError> {
        let row: OperatorRow = sqlx::query_as(
            "INSERT INTO operators (id, email, password_hash) VALUES ($1, $2, $3) \
             RETURNING id, email, password_hash, created_at",
        )
        .bind(OperatorId::new())
        .bind(email.as_str())
        .bind(password_hash)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_unique(e, "operator"))?;
        Ok(row.split()?.0)
    }

    /// Replaces an operator's password hash (the `operator create` command on an existing email).
    pub async fn set_operator_password(
        &self,
        email: &Email,
        password_hash: &str,
    ) -> Result<Operator, StoreError> {
        let row: Option<OperatorRow> = sqlx::query_as(
            "UPDATE operators SET password_hash = $2 WHERE email = $1 \
             RETURNING id, email, password_hash, created_at",
        )
        .bind(email.as_str())
        .bind(password_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .ok_or(StoreError::NotFound { what: "operator" })?
            .split()?
            .0)
    }

    /// An operator and its password hash, for login.
    pub async fn operator_credentials(
        &self,
        email: &Email,
    ) -> Result<Option<(Operator, String)>, StoreError> {
        let row: Option<OperatorRow> = sqlx::query_as(
            "SELECT id, email, password_hash, created_at FROM operators WHERE email = $1",
        )
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(OperatorRow::split).transpose()
    }

    /// One operator by id (session lookups).
    pub async fn get_operator(&self, id: OperatorId) -> Result<Operator, StoreError> {
        let row: Option<OperatorRow> = sqlx::query_as(
            "SELECT id, email, password_hash, created_at FROM operators WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .ok_or(StoreError::NotFound { what: "operator" })?
            .split()?
            .0)
    }

    /// Number of operator accounts.
    pub async fn count_operators(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM operators")
            .fetch_one(&self.pool)
            .await?;
        Ok(super::to_u64(n))
    }

    /// Creates a console user for a tenant. `NotFound` when the tenant does not exist,
    /// `Conflict` when the email is taken.
    pub async fn create_tenant_user(
        &self,
        tenant: TenantId,
        email: &Email,
        password_hash: &str,
    ) -> Result<TenantUser, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "INSERT INTO tenant_users (id, tenant_id, email, password_hash) \
             SELECT $1, t.id, $3, $4 FROM tenants t WHERE t.id = $2 \
             RETURNING id, tenant_id, email, password_hash, created_at",
        )
        .bind(UserId::new())
        .bind(tenant)
        .bind(email.as_str())
        .bind(password_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_unique(e, "user"))?;
        Ok(row
            .ok_or(StoreError::NotFound { what: "tenant" })?
            .split()?
            .0)
    }

    /// A tenant user and its password hash, for login.
    pub async fn tenant_user_credentials(
        &self,
        email: &Email,
    ) -> Result<Option<(TenantUser, String)>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, tenant_id, email, password_hash, created_at FROM tenant_users \
             WHERE email = $1",
        )
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(UserRow::split).transpose()
    }

    /// One tenant user by id (session lookups; the user's tenant comes with it).
    pub async fn get_tenant_user(&self, id: UserId) -> Result<TenantUser, StoreError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, tenant_id, email, password_hash, created_at FROM tenant_users \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.ok_or(StoreError::NotFound { what: "user" })?.split()?.0)
    }

    /// A tenant's console users, oldest first.
    pub async fn list_tenant_users(&self, tenant: TenantId) -> Result<Vec<TenantUser>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT id, tenant_id, email, password_hash, created_at FROM tenant_users \
             WHERE tenant_id = $1 ORDER BY created_at, email",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| r.split().map(|(u, _)| u))
            .collect()
    }

    /// Deletes one of a tenant's users. `NotFound` when it is not that tenant's.
    pub async fn delete_tenant_user(&self, tenant: TenantId, id: UserId) -> Result<(), StoreError> {
        let n = sqlx::query("DELETE FROM tenant_users WHERE tenant_id = $1 AND id = $2")
            .bind(tenant)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound { what: "user" });
        }
        Ok(())
    }
}
