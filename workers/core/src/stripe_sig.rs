//! `Stripe-Signature` webhook header: generation (for tests and fakes) and verification
//! (PROTOCOLS.md §7).
//!
//! Owns the header format and the HMAC check. It never parses the event itself: the
//! caller must verify the raw body exactly as received *before* deserializing it, and
//! passes `now` in (no clock here).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance for the signed timestamp, in seconds.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a `Stripe-Signature` header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StripeSigError {
    /// The header has no parsable `t=` timestamp or is not `key=value` pairs.
    #[error("malformed Stripe-Signature header")]
    MalformedHeader,
    /// The header carries no `v1` signature.
    #[error("no v1 signature in Stripe-Signature header")]
    NoSignatures,
    /// The signed timestamp is older than the tolerance allows.
    #[error("Stripe-Signature timestamp outside tolerance")]
    TimestampOutsideTolerance,
    /// No `v1` signature matches the payload.
    #[error("no Stripe signature matches the payload")]
    Mismatch,
}

/// Hex HMAC-SHA256 of `"<timestamp>.<payload>"` keyed by the endpoint secret.
fn v1_signature(secret: &str, timestamp: i64, payload: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; the empty fallback simply never matches.
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().to_vec()
}

/// The header Stripe would send for `payload` at `timestamp`: `t=<ts>,v1=<hex>`.
pub fn signature_header(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(v1_signature(secret, timestamp, payload))
    )
}

/// Verifies a `Stripe-Signature` header against the raw payload.
///
/// Accepts when any `v1` entry matches (several appear during secret rotation); other
/// schemes such as `v0` are ignored. Like Stripe's libraries, only timestamps that are
/// too old are refused (`t < now - tolerance`); a tolerance of 0 or less disables that
/// check.
pub fn verify(
    secret: &str,
    header: &str,
    payload: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), StripeSigError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(StripeSigError::MalformedHeader)?;
        match key {
            "t" => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| StripeSigError::MalformedHeader)?;
                timestamp = Some(t);
            }
            "v1" => candidates.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(StripeSigError::MalformedHeader)?;
    if candidates.is_empty() {
        return Err(StripeSigError::NoSignatures);
    }
    // Compared as lowercase hex text, as Stripe's libraries do: an entry that is not hex
    // simply never matches, and a good sibling entry still counts.
    let expected = hex::encode(v1_signature(secret, timestamp, payload));
    let mut matched = false;
    for candidate in &candidates {
        matched |= bool::from(candidate.as_bytes().ct_eq(expected.as_bytes()));
    }
    if !matched {
        return Err(StripeSigError::Mismatch);
    }
    // Checked after the HMAC so an attacker learns nothing about the timestamp rule
    // without a valid signature; a genuine but stale event is a replay.
    if tolerance_secs > 0 && timestamp < now_unix.saturating_sub(tolerance_secs) {
        return Err(StripeSigError::TimestampOutsideTolerance);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const T: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","object":"event"}"#;
    const HEADER: &str =
        "t=1700000000,v1=0c8670ed117751cc551a20e35839447075c42800ea3cf3e8a2fbda99cd1e6edd";

    /// The PROTOCOLS.md vector (Stripe's python oracle) is reproduced and verifies.
    #[test]
    fn vector_matches_oracle() {
        assert_eq!(signature_header(SECRET, T, BODY), HEADER);
        assert_eq!(verify(SECRET, HEADER, BODY, T + 10, 300), Ok(()));
    }

    /// During rotation the header holds two v1 entries; the second one matching suffices,
    /// and a v0 entry is ignored.
    #[test]
    fn rotation_second_v1_valid() {
        let good = signature_header(SECRET, T, BODY);
        let good_v1 = good.split_once(",v1=").unwrap().1;
        let header = format!("t={T},v1={},v0=deadbeef,v1={good_v1}", "ab".repeat(32));
        assert_eq!(verify(SECRET, &header, BODY, T, 300), Ok(()));
    }

    /// A body differing by one byte is a mismatch.
    #[test]
    fn tampered_body_fails() {
        let body = br#"{"id":"evt_2","object":"event"}"#;
        assert_eq!(
            verify(SECRET, HEADER, body, T, 300),
            Err(StripeSigError::Mismatch)
        );
    }

    /// The wrong secret is a mismatch.
    #[test]
    fn wrong_secret_fails() {
        assert_eq!(
            verify("whsec_other", HEADER, BODY, T, 300),
            Err(StripeSigError::Mismatch)
        );
    }

    /// Older than the tolerance is refused, exactly at the boundary is accepted, a
    /// future timestamp is accepted (Stripe's rule), and tolerance 0 disables the check.
    #[test]
    fn timestamp_tolerance() {
        assert_eq!(
            verify(SECRET, HEADER, BODY, T + 301, 300),
            Err(StripeSigError::TimestampOutsideTolerance)
        );
        assert_eq!(verify(SECRET, HEADER, BODY, T + 300, 300), Ok(()));
        assert_eq!(verify(SECRET, HEADER, BODY, T - 1000, 300), Ok(()));
        assert_eq!(verify(SECRET, HEADER, BODY, T + 100_000, 0), Ok(()));
    }

    /// A re-signed header with a moved timestamp cannot reuse the old signature.
    #[test]
    fn changed_timestamp_fails() {
        let v1 = HEADER.split_once(",v1=").unwrap().1;
        let header = format!("t={},v1={v1}", T + 1);
        assert_eq!(
            verify(SECRET, &header, BODY, T, 300),
            Err(StripeSigError::Mismatch)
        );
    }

    /// Garbage, a missing or non-numeric `t`, and a header without v1 are told apart.
    #[test]
    fn malformed_headers() {
        for h in ["", "garbage", "t=abc,v1=00", "v1=00", "t=1,,v1=00"] {
            assert_eq!(
                verify(SECRET, h, BODY, T, 300),
                Err(StripeSigError::MalformedHeader),
                "{h:?}"
            );
        }
        assert_eq!(
            verify(SECRET, "t=1700000000,v0=abcd", BODY, T, 300),
            Err(StripeSigError::NoSignatures)
        );
        assert_eq!(
            verify(SECRET, "t=1700000000,v1=not-hex", BODY, T, 300),
            Err(StripeSigError::Mismatch)
        );
    }
}
