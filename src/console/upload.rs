//! The console's bridge to the serving side for adapters and keys. Until the service's adapter
//! routes are mounted, deleting an adapter is the store's soft delete (the name is freed, the
//! versions are marked deleted and stop resolving) and the upload form is not offered.

use actix_web::HttpRequest;

use super::ConsoleState;
use super::error::ConsoleError;
use crate::domain::{AdapterName, TenantId};

/// The service's upload limit, when the service is mounted.
pub fn max_upload_bytes(_req: &HttpRequest) -> Option<u64> {
    None
}

/// Whether adapter uploads can be taken (the service's upload route is mounted).
pub fn uploads_enabled(_req: &HttpRequest) -> bool {
    false
}

/// The base model's id for the playground's menu.
pub fn model_id(_req: &HttpRequest) -> String {
    "base model".to_owned()
}

/// Deletes one of the tenant's adapters.
pub async fn delete_adapter(
    _req: &HttpRequest,
    state: &ConsoleState,
    tenant: TenantId,
    _tenant_name: &str,
    name: &AdapterName,
) -> Result<(), ConsoleError> {
    state.store.delete_adapter(tenant, name).await?;
    Ok(())
}
