//! Platform-free HTTP decisions the Worker makes before any route runs: which CORS
//! headers a response carries, the request id, which route a method and path name, and
//! the OpenAPI document of those routes.

pub mod cors;
pub mod openapi;
pub mod request_id;
pub mod routes;

/// The longest client `Idempotency-Key` accepted.
pub const IDEMPOTENCY_KEY_MAX: usize = 100;

/// Whether a client's `Idempotency-Key` (already trimmed) is one we accept: 1 to 100
/// letters, digits or `- _ . :` (what UUIDs, ULIDs and "order-1:retry" keys use).
pub fn valid_idempotency_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= IDEMPOTENCY_KEY_MAX
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys() {
        assert!(valid_idempotency_key("order-1:retry_2.x"));
        assert!(valid_idempotency_key(
            "0b5f3c9e-8a4d-4e7b-9a61-2f0c1d2e3f40"
        ));
        assert!(valid_idempotency_key(&"x".repeat(100)));
        assert!(!valid_idempotency_key(&"x".repeat(101)));
        assert!(!valid_idempotency_key(""));
        assert!(!valid_idempotency_key("has space"));
        assert!(!valid_idempotency_key("naïve"));
    }
}
