//! The API's bearer tokens: HS256 JWTs with claims `sub`, `jti`, `iat`, `exp`, `role`.
//!
//! Owns the claim set and the signing/verification rules. Time checks happen here against
//! the caller's `now_unix`: jsonwebtoken's own `exp` validation reads the system clock,
//! which panics on wasm32, so it is switched off. Revocation (the `jti` blacklist in KV)
//! is the Worker's job.
//!
//! jsonwebtoken runs with [`HS256_ONLY`], its `CryptoProvider` for the one algorithm we
//! use (`hmac` + `sha2`), instead of its `rust_crypto` feature: that one links RSA, P-256,
//! P-384 and Ed25519 into the Worker, a third of its wasm (docs/PERFORMANCE.md, "Worker
//! size"), for tokens we never accept.

use hmac::{Hmac, Mac};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// HS256 signing and verification; every other algorithm is refused as
/// `InvalidAlgorithm` (decoding already demands HS256 before any key is used).
pub static HS256_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: hs256_signer,
    verifier_factory: hs256_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

struct Hs256(HmacSha256);

impl Hs256 {
    fn new(alg: &Algorithm, key: &[u8]) -> jsonwebtoken::errors::Result<Self> {
        if *alg != Algorithm::HS256 {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        HmacSha256::new_from_slice(key)
            .map(Hs256)
            .map_err(|_| ErrorKind::InvalidKeyFormat.into())
    }
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut mac = self.0.clone();
        mac.update(msg);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let mut mac = self.0.clone();
        mac.update(msg);
        // Constant time, as `hmac` compares.
        mac.verify_slice(sig).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

fn hs256_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Ok(Box::new(Hs256::new(alg, key.as_bytes())?))
}

fn hs256_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    Ok(Box::new(Hs256::new(alg, key.try_get_as_bytes()?)?))
}

/// Makes [`HS256_ONLY`] jsonwebtoken's provider. Idempotent: installing it again (or
/// finding it installed) is fine; the crate has no other provider compiled in.
fn install_provider() {
    let _ = HS256_ONLY.install_default();
}

/// Tolerated clock skew for `iat` in the future (isolates' clocks differ slightly).
pub const IAT_LEEWAY_SECS: i64 = 30;

/// What a user can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    /// The stored and serialized name: `user` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// The token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Token id, the key of the revocation blacklist.
    pub jti: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
    pub role: Role,
}

/// Why a token was refused (or could not be made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Bad structure, signature, algorithm or claims.
    #[error("invalid token")]
    Invalid,
    /// Well signed but past its `exp`.
    #[error("token expired")]
    Expired,
}

/// Signs `claims` with HS256.
pub fn encode(secret: &[u8], claims: &Claims) -> Result<String, JwtError> {
    if secret.is_empty() {
        return Err(JwtError::Invalid);
    }
    install_provider();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| JwtError::Invalid)
}

/// Verifies an HS256 token and its times at `now_unix`.
///
/// Any other algorithm (including `none` and the other HMACs) is refused. A token is
/// expired from its `exp` second on; one issued more than [`IAT_LEEWAY_SECS`] in the
/// future is invalid.
pub fn decode(secret: &[u8], token: &str, now_unix: i64) -> Result<Claims, JwtError> {
    if secret.is_empty() {
        return Err(JwtError::Invalid);
    }
    install_provider();
    let mut validation = Validation::new(Algorithm::HS256);
    // Both would read the system clock (a panic on wasm32); checked below instead.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    // Still demand the time claims be present; `Claims` also requires them to parse.
    validation.set_required_spec_claims(&["exp", "iat", "sub"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|_| JwtError::Invalid)?;
    let claims = data.claims;
    if claims.iat > now_unix.saturating_add(IAT_LEEWAY_SECS) || claims.exp <= claims.iat {
        return Err(JwtError::Invalid);
    }
    if now_unix >= claims.exp {
        return Err(JwtError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use base64::Engine as _;

    use super::*;

    const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
    const NOW: i64 = 1_700_000_000;

    fn claims() -> Claims {
        Claims {
            sub: "user-1".into(),
            jti: "jti-1".into(),
            iat: NOW,
            exp: NOW + 3600,
            role: Role::Admin,
        }
    }

    /// A token made by `encode` decodes to the same claims; the role is lowercase JSON.
    #[test]
    fn round_trip() {
        let token = encode(SECRET, &claims()).unwrap();
        assert_eq!(decode(SECRET, &token, NOW + 10).unwrap(), claims());
        let payload = token.split('.').nth(1).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(payload).unwrap()).unwrap();
        assert_eq!(json["role"], "admin");
        assert_eq!(json["exp"], NOW + 3600);
    }

    /// Expired from the `exp` second on, valid the second before.
    #[test]
    fn expired() {
        let token = encode(SECRET, &claims()).unwrap();
        assert!(decode(SECRET, &token, NOW + 3599).is_ok());
        assert_eq!(decode(SECRET, &token, NOW + 3600), Err(JwtError::Expired));
    }

    /// A token issued well in the future, or with `exp` not after `iat`, is invalid.
    #[test]
    fn bad_times_invalid() {
        let future = Claims {
            iat: NOW + 3600,
            exp: NOW + 7200,
            ..claims()
        };
        let token = encode(SECRET, &future).unwrap();
        assert_eq!(decode(SECRET, &token, NOW), Err(JwtError::Invalid));
        assert!(decode(SECRET, &token, NOW + 3600 - IAT_LEEWAY_SECS).is_ok());
        let inverted = Claims {
            exp: NOW,
            ..claims()
        };
        let token = encode(SECRET, &inverted).unwrap();
        assert_eq!(decode(SECRET, &token, NOW - 100), Err(JwtError::Invalid));
    }

    /// Another secret, or an empty one, does not verify.
    #[test]
    fn wrong_secret() {
        let token = encode(SECRET, &claims()).unwrap();
        assert_eq!(
            decode(b"another-secret-another-secret-xx", &token, NOW),
            Err(JwtError::Invalid)
        );
        assert_eq!(decode(b"", &token, NOW), Err(JwtError::Invalid));
        assert_eq!(encode(b"", &claims()), Err(JwtError::Invalid));
    }

    /// Editing the payload (promoting to admin) or the signature breaks verification.
    #[test]
    fn tampered() {
        let user = Claims {
            role: Role::User,
            ..claims()
        };
        let token = encode(SECRET, &user).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = B64URL.encode(serde_json::to_vec(&claims()).unwrap());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(decode(SECRET, &forged, NOW), Err(JwtError::Invalid));
        let mut sig = parts[2].to_owned();
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(0..1, flipped);
        let bad_sig = format!("{}.{}.{sig}", parts[0], parts[1]);
        assert_eq!(decode(SECRET, &bad_sig, NOW), Err(JwtError::Invalid));
    }

    /// `alg: none` (unsigned) tokens are refused.
    #[test]
    fn alg_none_rejected() {
        let header = B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = B64URL.encode(serde_json::to_vec(&claims()).unwrap());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            assert_eq!(decode(SECRET, &token, NOW), Err(JwtError::Invalid));
        }
    }

    /// A correctly keyed token with another algorithm (HS512) is refused.
    #[test]
    fn other_algorithm_rejected() {
        // Signed by hand: our provider signs HS256 only (and refuses to sign HS512).
        let header = B64URL.encode(br#"{"alg":"HS512","typ":"JWT"}"#);
        let body = B64URL.encode(serde_json::to_vec(&claims()).unwrap());
        let mut mac = Hmac::<sha2::Sha512>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{header}.{body}").as_bytes());
        let sig = B64URL.encode(mac.finalize().into_bytes());
        let token = format!("{header}.{body}.{sig}");
        assert_eq!(decode(SECRET, &token, NOW), Err(JwtError::Invalid));
        install_provider();
        assert!(jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(),
            &EncodingKey::from_secret(SECRET),
        )
        .is_err());
    }

    /// Garbage is invalid, not a panic.
    #[test]
    fn garbage() {
        for token in ["", "a", "a.b.c", "....", "eyJ.eyJ.sig"] {
            assert_eq!(
                decode(SECRET, token, NOW),
                Err(JwtError::Invalid),
                "{token}"
            );
        }
    }
}
