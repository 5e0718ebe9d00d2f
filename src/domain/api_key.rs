//! Tenant API keys: `pun_<12 chars prefix>_<43 chars secret>`, 256 random bits of secret.
//!
//! Keys are shown once and stored as a SHA-256 hash next to their public prefix. A slow password
//! hash would buy nothing here: the key is high-entropy, so brute force is hopeless anyway, and a
//! fast hash keeps the per-request lookup (prefix index, then hash compare) cheap.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::DomainError;

/// Every key starts with this.
pub const API_KEY_PREFIX: &str = "pun_";
const PREFIX_ID_LEN: usize = 12;
const SECRET_BYTES: usize = 32;
const SECRET_LEN: usize = 43; // base64url without padding of 32 bytes
const KEY_LEN: usize = API_KEY_PREFIX.len() + PREFIX_ID_LEN + 1 + SECRET_LEN;
const PREFIX_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A full API key (secret). `Debug` shows only the public prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

/// SHA-256 of a full key, as stored in the database.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyHash(pub [u8; 32]);

impl ApiKey {
    /// A new random key.
    pub fn generate() -> ApiKey {
        let mut prefix_bytes = [0u8; PREFIX_ID_LEN];
        rand::fill(&mut prefix_bytes[..]);
        let prefix: String = prefix_bytes
            .iter()
            .map(|b| PREFIX_ALPHABET[usize::from(b % 32)] as char)
            .collect();
        let mut secret = [0u8; SECRET_BYTES];
        rand::fill(&mut secret[..]);
        ApiKey(format!(
            "{API_KEY_PREFIX}{prefix}_{}",
            URL_SAFE_NO_PAD.encode(secret)
        ))
    }

    /// Accepts only strings with this service's key shape (cheap rejection before any lookup).
    pub fn parse(s: &str) -> Result<ApiKey, DomainError> {
        let s = s.trim();
        if s.len() != KEY_LEN || !s.starts_with(API_KEY_PREFIX) {
            return Err(DomainError::InvalidApiKey);
        }
        let rest = &s.as_bytes()[API_KEY_PREFIX.len()..];
        let (id, tail) = rest.split_at(PREFIX_ID_LEN);
        if !id.iter().all(|b| PREFIX_ALPHABET.contains(b))
            || tail[0] != b'_'
            || !tail[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(DomainError::InvalidApiKey);
        }
        Ok(ApiKey(s.to_owned()))
    }

    /// The public part that identifies the key in listings and the database (`pun_xxxxxxxxxxxx`).
    pub fn prefix(&self) -> &str {
        &self.0[..API_KEY_PREFIX.len() + PREFIX_ID_LEN]
    }

    /// The hash stored in the database.
    pub fn hash(&self) -> ApiKeyHash {
        ApiKeyHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The full key; only for showing it once to its creator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}_[redacted])", self.prefix())
    }
}

impl ApiKeyHash {
    /// Builds a hash from stored bytes; `None` when the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<ApiKeyHash> {
        <[u8; 32]>::try_from(bytes).ok().map(ApiKeyHash)
    }

    /// Constant-time comparison, so response timing says nothing about how much of a guess matched.
    pub fn matches(&self, other: &ApiKeyHash) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyHash({})", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a, b);
        assert_ne!(a.prefix(), b.prefix());
        let parsed = ApiKey::parse(a.expose()).unwrap();
        assert_eq!(parsed.hash(), a.hash());
        assert_eq!(a.prefix().len(), 16);
        assert!(a.prefix().starts_with(API_KEY_PREFIX));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        let good = ApiKey::generate();
        let k = good.expose();
        for bad in [
            "",
            "pun_",
            &k[1..],
            &format!("{k}x"),
            &k.replace("pun_", "sk__"),
            &format!("{}!{}", &k[..16], &k[17..]),
        ] {
            assert!(ApiKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let k = ApiKey::generate();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&k.expose()[17..]));
        assert!(dbg.contains(k.prefix()));
    }

    #[test]
    fn hash_comparison_distinguishes_keys() {
        let a = ApiKey::generate().hash();
        let b = ApiKey::generate().hash();
        assert!(a.matches(&a));
        assert!(!a.matches(&b));
    }
}
