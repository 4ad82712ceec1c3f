//! Client ids and the secret tokens that guard a private client's history.

use rand::Rng;
use sha2::{Digest, Sha256};

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
}
