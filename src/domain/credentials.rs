//! Console credentials: email addresses and passwords (argon2id, salted, PHC strings).

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};

use super::DomainError;

/// Shortest accepted password.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A lower-cased email address with one `@`, a non-empty local part and a dotted domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    /// Validates and lower-cases an address.
    pub fn parse(s: impl AsRef<str>) -> Result<Email, DomainError> {
        let s = s.as_ref().trim();
        let bad = || DomainError::InvalidEmail(s.chars().take(80).collect());
        if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = s.split_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
        {
            return Err(bad());
        }
        Ok(Email(s.to_lowercase()))
    }

    /// The address as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Email::parse(s)
    }
}

impl From<Email> for String {
    fn from(e: Email) -> String {
        e.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plaintext password of acceptable length. `Debug` is redacted.
#[derive(Clone)]
pub struct Password(String);

/// Hashing failed (argon2 parameter or RNG error; not expected with the defaults).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct PasswordHashError(String);

impl Password {
    /// Accepts 8 to 1024 characters.
    pub fn parse(s: impl Into<String>) -> Result<Password, DomainError> {
        let s = s.into();
        let len = s.chars().count();
        if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&len) {
            return Err(DomainError::InvalidPassword {
                len,
                min: MIN_PASSWORD_LEN,
                max: MAX_PASSWORD_LEN,
            });
        }
        Ok(Password(s))
    }

    /// An argon2id PHC string with a fresh random salt. CPU-heavy (tens of ms): call it from a
    /// blocking task in async code.
    pub fn hash(&self) -> Result<String, PasswordHashError> {
        Argon2::default()
            .hash_password(self.0.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| PasswordHashError(e.to_string()))
    }

    /// Whether this password matches a stored PHC string; a malformed hash never matches.
    pub fn verify(&self, phc: &str) -> bool {
        match PasswordHash::new(phc) {
            Ok(parsed) => Argon2::default()
                .verify_password(self.0.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_validated_and_lower_cased() {
        assert_eq!(
            Email::parse(" Ops@Example.COM ").unwrap().as_str(),
            "ops@example.com"
        );
        for bad in [
            "", "a", "@x.y", "a@", "a@b", "a@@b.c", "a b@c.d", "a@.b", "a@b.", "a@b..c",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_hash_verifies_only_the_same_password() {
        let p = Password::parse("correct horse").unwrap();
        let h = p.hash().unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(p.verify(&h));
        assert!(!Password::parse("wrong horse").unwrap().verify(&h));
        assert!(!p.verify("not a phc string"));
    }

    #[test]
    fn short_passwords_are_rejected_with_the_numbers() {
        assert_eq!(
            Password::parse("short").unwrap_err(),
            DomainError::InvalidPassword {
                len: 5,
                min: 8,
                max: 1024
            }
        );
        assert!(!format!("{:?}", Password::parse("secretsecret").unwrap()).contains("secret"));
    }
}
