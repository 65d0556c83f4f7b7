//! The short-lived stream token: minted by the Worker into the TwiML `<Parameter>`s,
//! verified by the relay when Twilio's `start` message arrives (DESIGN.md, step 3–4).
//!
//! Format: `base64url(payload) "." base64url(HMAC-SHA256(secret, label || payload))` where
//! `payload = "v1.<call_id>.<expires_at>.<nonce>"`. Owns minting and verification only;
//! remembering used nonces (to refuse a replay) is the relay's job, and the caller supplies
//! the nonce's randomness and `now`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Version tag inside the payload, so the format can change without ambiguity.
const VERSION: &str = "v1";

/// Domain-separation label mixed into the MAC: the same `RELAY_SECRET` also
/// authenticates the control channel, and a MAC made for one use must not serve another.
const MAC_LABEL: &[u8] = b"cmb-stream-token\n";

/// How long a freshly minted token should live: Twilio opens the stream within seconds of
/// fetching the TwiML, so a couple of minutes covers slow networks without leaving a long
/// replay window.
pub const RECOMMENDED_TTL_SECS: i64 = 120;

/// What a valid token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTokenClaims {
    pub call_id: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
    /// Single-use marker; the relay refuses a nonce it has already seen.
    pub nonce: String,
}

/// Why a stream token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamTokenError {
    #[error("stream token is malformed")]
    Malformed,
    #[error("stream token signature is invalid")]
    BadSignature,
    #[error("stream token has expired")]
    Expired,
    #[error("stream token was issued for another call")]
    WrongCall,
}

fn mac(secret: &str, payload: &[u8]) -> HmacSha256 {
    // HMAC-SHA256 takes keys of any length, so `new_from_slice` cannot fail here; the
    // zero-key fallback only exists to keep this path panic-free.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()));
    mac.update(MAC_LABEL);
    mac.update(payload);
    mac
}

/// Mints a token for `call_id` valid until `expires_at_unix`.
///
/// `call_id` must not contain `.` (call ids are UUIDs); `nonce` may be any URL-safe text,
/// typically random bytes the caller hex- or base64url-encoded.
pub fn mint(secret: &str, call_id: &str, expires_at_unix: i64, nonce: &str) -> String {
    let payload = format!("{VERSION}.{call_id}.{expires_at_unix}.{nonce}");
    let tag = mac(secret, payload.as_bytes()).finalize().into_bytes();
    format!("{}.{}", B64URL.encode(payload), B64URL.encode(tag))
}

/// Verifies a token for the call the relay expects, at `now_unix`.
///
/// The signature is checked (in constant time) before anything in the payload is
/// trusted; then the version, the call id and the expiry.
pub fn verify(
    secret: &str,
    token: &str,
    call_id: &str,
    now_unix: i64,
) -> Result<StreamTokenClaims, StreamTokenError> {
    use StreamTokenError::*;
    let (payload_b64, tag_b64) = token.trim().split_once('.').ok_or(Malformed)?;
    let payload = B64URL.decode(payload_b64).map_err(|_| Malformed)?;
    let tag = B64URL.decode(tag_b64).map_err(|_| Malformed)?;
    mac(secret, &payload)
        .verify_slice(&tag)
        .map_err(|_| BadSignature)?;

    let payload = std::str::from_utf8(&payload).map_err(|_| Malformed)?;
    // `splitn` leaves any '.' inside the nonce intact.
    let mut parts = payload.splitn(4, '.');
    let (Some(version), Some(token_call), Some(exp), Some(nonce)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed);
    };
    if version != VERSION {
        return Err(Malformed);
    }
    let expires_at: i64 = exp.parse().map_err(|_| Malformed)?;
    if token_call != call_id {
        return Err(WrongCall);
    }
    if now_unix >= expires_at {
        return Err(Expired);
    }
    Ok(StreamTokenClaims {
        call_id: token_call.to_owned(),
        expires_at,
        nonce: nonce.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const CALL: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    const NOW: i64 = 1_700_000_000;

    /// A minted token verifies and returns the claims it was minted with.
    #[test]
    fn round_trip() {
        let t = mint(SECRET, CALL, NOW + 60, "n0nce-1");
        let claims = verify(SECRET, &t, CALL, NOW).unwrap();
        assert_eq!(
            claims,
            StreamTokenClaims {
                call_id: CALL.into(),
                expires_at: NOW + 60,
                nonce: "n0nce-1".into()
            }
        );
    }

    /// The token is URL-safe (it travels in XML attributes and JSON untouched).
    #[test]
    fn token_is_url_safe() {
        let t = mint(SECRET, CALL, NOW, "a.b/c+d");
        assert!(t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
        assert_eq!(verify(SECRET, &t, CALL, NOW - 1).unwrap().nonce, "a.b/c+d");
    }

    /// Valid up to the second before `expires_at`, refused from then on.
    #[test]
    fn expiry_boundary() {
        let t = mint(SECRET, CALL, NOW, "n");
        assert!(verify(SECRET, &t, CALL, NOW - 1).is_ok());
        assert_eq!(
            verify(SECRET, &t, CALL, NOW),
            Err(StreamTokenError::Expired)
        );
    }

    /// A token for another call is refused.
    #[test]
    fn wrong_call() {
        let t = mint(SECRET, CALL, NOW + 60, "n");
        assert_eq!(
            verify(SECRET, &t, "00000000-0000-0000-0000-000000000000", NOW),
            Err(StreamTokenError::WrongCall)
        );
    }

    /// Another secret, or any edited payload (e.g. a pushed-back expiry), fails the MAC.
    #[test]
    fn tampering_fails() {
        let t = mint(SECRET, CALL, NOW + 60, "n");
        assert_eq!(
            verify("another-secret-another-secret-xx", &t, CALL, NOW),
            Err(StreamTokenError::BadSignature)
        );
        let (_, tag) = t.split_once('.').unwrap();
        let forged_payload = B64URL.encode(format!("v1.{CALL}.{}.n", NOW + 9999));
        assert_eq!(
            verify(SECRET, &format!("{forged_payload}.{tag}"), CALL, NOW),
            Err(StreamTokenError::BadSignature)
        );
        let mut flipped = t.into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            verify(SECRET, &String::from_utf8(flipped).unwrap(), CALL, NOW),
            Err(StreamTokenError::BadSignature)
        );
    }

    /// Structurally broken tokens are `Malformed`, including a correctly signed payload
    /// of the wrong version.
    #[test]
    fn malformed() {
        for t in ["", "abc", "!!!.???", "a.b", "YQ.%%"] {
            assert_eq!(
                verify(SECRET, t, CALL, NOW),
                Err(StreamTokenError::Malformed),
                "{t:?}"
            );
        }
        let payload = b"v2.x.1.n";
        let tag = mac(SECRET, payload).finalize().into_bytes();
        let t = format!("{}.{}", B64URL.encode(payload), B64URL.encode(tag));
        assert_eq!(verify(SECRET, &t, "x", 0), Err(StreamTokenError::Malformed));
    }
}
