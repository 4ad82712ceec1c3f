//! Client ids and the secret tokens that guard a private client's history.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new client id: 16 random hex digits, unique across all gateways with
/// overwhelming probability (64 random bits).
pub fn new_client_id() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// A new secret token: 128 random bits as 32 hex digits.
pub fn new_token() -> String {
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

/// The form in which a token is stored and compared: hex SHA-256, so the
/// database never holds a usable secret.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The shortest device secret accepted (22 base64url characters, 132
/// bits): the pages send 43 (32 random bytes).
pub const MIN_DEVICE_SECRET_LEN: usize = 22;

/// The longest device secret accepted.
pub const MAX_DEVICE_SECRET_LEN: usize = 128;

/// Whether `secret` is a well-formed device secret: base64url characters
/// (`A-Z a-z 0-9 - _`), from [`MIN_DEVICE_SECRET_LEN`] to
/// [`MAX_DEVICE_SECRET_LEN`] of them.
pub fn valid_device_secret(secret: &str) -> bool {
    (MIN_DEVICE_SECRET_LEN..=MAX_DEVICE_SECRET_LEN).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A browser identity's key: hex SHA-256 of `"pingapp-device:" + secret`.
/// The browser keeps the secret; the gateway derives this digest, which is
/// what the bus and the database carry. Nobody can present another
/// browser's identity without its secret, and the digest alone unlocks
/// nothing over the HTTP API (docs/security.md).
pub fn device_digest(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"pingapp-device:");
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// Whether `token` is the token whose [`token_digest`] is `stored_digest`,
/// compared in constant time so the answer's timing tells nothing about
/// how much of the digest matched.
pub fn token_matches(stored_digest: &str, token: &str) -> bool {
    digest_matches(stored_digest, &token_digest(token))
}

/// Whether a presented token digest (what a history query carries over
/// the bus instead of the token) is `stored_digest`, compared in constant
/// time.
pub fn digest_matches(stored_digest: &str, presented_digest: &str) -> bool {
    stored_digest
        .as_bytes()
        .ct_eq(presented_digest.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_client_id();
        let b = new_client_id();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn token_digest_is_stable_and_hides_the_token() {
        let t = new_token();
        assert_eq!(t.len(), 32);
        assert_eq!(token_digest(&t), token_digest(&t));
        assert_ne!(token_digest(&t), t);
        assert_ne!(token_digest(&t), token_digest(&new_token()));
    }

    #[test]
    fn tokens_match_only_their_digest() {
        let t = new_token();
        let digest = token_digest(&t);
        assert!(token_matches(&digest, &t));
        assert!(!token_matches(&digest, &new_token()));
        assert!(
            !token_matches(&t, &t),
            "the digest, not the token, is stored"
        );
        assert!(!token_matches(&digest[..10], &t), "a prefix is no match");
        assert!(!token_matches("", &t));
        assert!(digest_matches(&digest, &token_digest(&t)));
        assert!(!digest_matches(&digest, &t), "a token is not its digest");
        assert!(!digest_matches(&digest, &digest[..63]));
    }
}
