//! WebCrypto from the Workers runtime: randomness, UUIDs and PBKDF2 password hashing.
//!
//! PBKDF2-HMAC-SHA256 runs in the runtime's native code (≈ milliseconds for 100,000
//! iterations), which a pure-wasm implementation cannot match within Workers' CPU limits.
//! The stored format and policy live in `cmb_core::password`.

use cmb_core::password::{PasswordHash, PBKDF2_ITERATIONS};
use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Crypto, CryptoKey, Pbkdf2Params};

const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("WebCrypto failure: {0}")]
pub struct CryptoError(String);

fn js_err(context: &str, e: JsValue) -> CryptoError {
    CryptoError(format!("{context}: {e:?}"))
}

fn crypto() -> Result<Crypto, CryptoError> {
    let global = js_sys::global();
    let c = Reflect::get(&global, &JsValue::from_str("crypto")).map_err(|e| js_err("crypto", e))?;
    c.dyn_into::<Crypto>()
        .map_err(|_| CryptoError("globalThis.crypto is not a Crypto".into()))
}

/// Cryptographically secure random bytes.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut buf = [0u8; N];
    crypto()?
        .get_random_values_with_u8_array(&mut buf)
        .map_err(|e| js_err("getRandomValues", e))?;
    Ok(buf)
}

/// A random (v4) UUID, used for ids and JWT `jti`s.
pub fn uuid() -> Result<String, CryptoError> {
    Ok(crypto()?.random_uuid())
}

async fn pbkdf2(password: &str, salt: &[u8], iterations: u32) -> Result<Vec<u8>, CryptoError> {
    let subtle = crypto()?.subtle();
    let usages = Array::of1(&JsValue::from_str("deriveBits"));
    let pw = Uint8Array::from(password.as_bytes());
    let key = JsFuture::from(
        subtle
            .import_key_with_str("raw", &pw, "PBKDF2", false, &usages)
            .map_err(|e| js_err("importKey", e))?,
    )
    .await
    .map_err(|e| js_err("importKey", e))?;
    let key: CryptoKey = key.unchecked_into();
    let salt = Uint8Array::from(salt);
    let params = Pbkdf2Params::new_with_str("PBKDF2", "SHA-256", iterations, &salt);
    let bits = JsFuture::from(
        subtle
            .derive_bits_with_object(
                params.unchecked_ref::<Object>(),
                &key,
                (HASH_LEN * 8) as u32,
            )
            .map_err(|e| js_err("deriveBits", e))?,
    )
    .await
    .map_err(|e| js_err("deriveBits", e))?;
    Ok(Uint8Array::new(&bits).to_vec())
}

/// Hashes a new password with a fresh random salt, in the stored string format.
pub async fn hash_password(password: &str) -> Result<String, CryptoError> {
    let salt = random_bytes::<SALT_LEN>()?;
    let hash = pbkdf2(password, &salt, PBKDF2_ITERATIONS).await?;
    Ok(PasswordHash {
        iterations: PBKDF2_ITERATIONS,
        salt: salt.to_vec(),
        hash,
    }
    .to_string())
}

/// Checks a password against a stored hash in constant time. A stored value that does
/// not parse never matches.
pub async fn verify_password(password: &str, stored: &str) -> Result<bool, CryptoError> {
    let Ok(parsed) = PasswordHash::parse(stored) else {
        return Ok(false);
    };
    let computed = pbkdf2(password, &parsed.salt, parsed.iterations).await?;
    Ok(cmb_core::password::hashes_equal(&computed, &parsed.hash))
}

/// Burns the same work as a real verification, so that login takes as long for an
/// unknown email as for a wrong password.
pub async fn dummy_verify(password: &str) -> Result<(), CryptoError> {
    let salt = [0u8; SALT_LEN];
    pbkdf2(password, &salt, PBKDF2_ITERATIONS).await.map(|_| ())
}

/// A random `u32` (backoff jitter).
pub fn random_u32() -> Result<u32, CryptoError> {
    random_bytes::<4>().map(u32::from_le_bytes)
}
