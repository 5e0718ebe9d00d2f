//! Per-tenant limits; `None` means unlimited.

use serde::{Deserialize, Serialize};

use super::DomainError;

/// Limits of one tenant. Every field is optional: absent or `null` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Live adapters (names) the tenant may hold.
    #[serde(default)]
    pub max_adapters: Option<u64>,
    /// Total bytes of the tenant's stored adapter versions.
    #[serde(default)]
    pub max_adapter_bytes: Option<u64>,
    /// Generations running at once (across sockets and replicas).
    #[serde(default)]
    pub max_concurrent_streams: Option<u64>,
    /// Prompt + completion tokens per calendar minute (UTC).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Prompt + completion tokens per calendar day (UTC).
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
}

impl Quotas {
    /// No limits at all.
    pub const UNLIMITED: Quotas = Quotas {
        max_adapters: None,
        max_adapter_bytes: None,
        max_concurrent_streams: None,
        tokens_per_minute: None,
        tokens_per_day: None,
    };

    /// Checks that every limit fits a Postgres `bigint`.
    pub fn validate(&self) -> Result<(), DomainError> {
        for (name, value) in self.named() {
            if let Some(v) = value
                && i64::try_from(v).is_err()
            {
                return Err(DomainError::QuotaTooLarge { name, value: v });
            }
        }
        Ok(())
    }

    /// Every limit with its name, in the API's order.
    pub fn named(&self) -> [(&'static str, Option<u64>); 5] {
        [
            ("max_adapters", self.max_adapters),
            ("max_adapter_bytes", self.max_adapter_bytes),
            ("max_concurrent_streams", self.max_concurrent_streams),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_null_quotas_mean_unlimited() {
        let q: Quotas =
            serde_json::from_str(r#"{"max_adapters": 3, "tokens_per_day": null}"#).unwrap();
        assert_eq!(q.max_adapters, Some(3));
        assert_eq!(q.tokens_per_day, None);
        assert_eq!(q.max_concurrent_streams, None);
    }

    #[test]
    fn quotas_beyond_bigint_are_rejected() {
        let q = Quotas {
            tokens_per_day: Some(u64::MAX),
            ..Quotas::UNLIMITED
        };
        assert!(matches!(
            q.validate(),
            Err(DomainError::QuotaTooLarge {
                name: "tokens_per_day",
                ..
            })
        ));
        assert!(serde_json::from_str::<Quotas>(r#"{"max_adapters": -1}"#).is_err());
        assert!(serde_json::from_str::<Quotas>(r#"{"max_adaptors": 1}"#).is_err());
    }
}
