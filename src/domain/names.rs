//! Names chosen by clients: tenant names and adapter names share one shape,
//! `[a-z0-9][a-z0-9._-]{0,62}`, so they are safe in URLs, logs and blob keys.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::DomainError;

fn is_valid_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_lowercase() || first.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.len() <= 63
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Accepts `[a-z0-9][a-z0-9._-]{0,62}`.
            pub fn parse(s: impl Into<String>) -> Result<Self, DomainError> {
                let s = s.into();
                if is_valid_name(&s) {
                    Ok($name(s))
                } else {
                    Err(DomainError::InvalidName {
                        what: $what,
                        value: s.chars().take(80).collect(),
                    })
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = DomainError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A tenant's name, unique across the service.
    TenantName,
    "tenant name"
);
name_type!(
    /// An adapter's name, unique within its tenant.
    AdapterName,
    "adapter name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_follow_the_documented_pattern() {
        for ok in ["a", "0", "legal-v2", "my.adapter_1", &"a".repeat(63)] {
            assert!(AdapterName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "legal v2",
            "ü",
            "a/b",
            &"a".repeat(64),
        ] {
            assert!(AdapterName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tenant_names_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<TenantName>("\"acme\"").is_ok());
        assert!(serde_json::from_str::<TenantName>("\"Acme Corp\"").is_err());
    }
}
