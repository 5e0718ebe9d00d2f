//! UUID identifiers, one type per entity so a tenant id can never be passed where an adapter id
//! is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::DomainError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                $name(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub fn from_uuid(id: Uuid) -> Self {
                $name(id)
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map($name)
                    .map_err(|_| DomainError::InvalidId(s.chars().take(64).collect()))
            }
        }
    };
}

uuid_id!(
    /// A tenant: the unit of isolation for adapters, keys, usage and quotas.
    TenantId
);
uuid_id!(
    /// An operator (service administrator) account.
    OperatorId
);
uuid_id!(
    /// A tenant's console user.
    UserId
);
uuid_id!(
    /// An API key row (not the secret key itself).
    ApiKeyId
);
uuid_id!(
    /// An adapter (a name in a tenant's namespace; it has versions).
    AdapterId
);
uuid_id!(
    /// One uploaded version of an adapter: the unit the engine loads and caches.
    AdapterVersionId
);
uuid_id!(
    /// One held concurrent-stream permit.
    StreamLeaseId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_string_form() {
        let id = TenantId::new();
        assert_eq!(id.to_string().parse::<TenantId>().unwrap(), id);
        assert!("not-a-uuid".parse::<TenantId>().is_err());
    }
}
