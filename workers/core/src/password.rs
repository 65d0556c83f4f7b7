//! Password policy and the stored password-hash format.
//!
//! The Worker derives hashes with WebCrypto's PBKDF2-HMAC-SHA256 (native code, fast
//! enough for Workers' CPU limits); this module owns what surrounds that: the policy, the
//! iteration count, the `pbkdf2-sha256$<iter>$<b64 salt>$<b64 hash>` string, a
//! constant-time comparison, and a pure-Rust reference derivation that native tests use
//! to cross-check the Worker. It never generates salts (no randomness source here).

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::validate::{codes, ValidationError};

/// PBKDF2 iterations for new hashes. Also the most Cloudflare's WebCrypto accepts, so it
/// is the upper bound for parsed hashes too: a larger count could never be verified.
pub const PBKDF2_ITERATIONS: u32 = 100_000;
/// Shortest accepted password, in characters (API.md `weak_password`).
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest accepted password, in characters: bounds hashing work per request.
pub const MAX_PASSWORD_CHARS: usize = 256;

/// Scheme tag at the start of every stored hash.
const SCHEME: &str = "pbkdf2-sha256";
/// Salt and hash lengths outside these bounds are corrupt, not a design choice.
const MIN_SALT_LEN: usize = 8;
const MIN_HASH_LEN: usize = 16;
const MAX_PART_LEN: usize = 64;

/// A stored PBKDF2-HMAC-SHA256 password hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A stored hash string that is not in the expected format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed password hash")]
pub struct MalformedPasswordHash;

impl PasswordHash {
    /// Parses `pbkdf2-sha256$<iterations>$<base64 salt>$<base64 hash>` (standard,
    /// padded base64).
    pub fn parse(stored: &str) -> Result<Self, MalformedPasswordHash> {
        let mut parts = stored.split('$');
        let (Some(SCHEME), Some(iterations), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MalformedPasswordHash);
        };
        let iterations: u32 = iterations.parse().map_err(|_| MalformedPasswordHash)?;
        let salt = BASE64.decode(salt).map_err(|_| MalformedPasswordHash)?;
        let hash = BASE64.decode(hash).map_err(|_| MalformedPasswordHash)?;
        let lengths_ok = (MIN_SALT_LEN..=MAX_PART_LEN).contains(&salt.len())
            && (MIN_HASH_LEN..=MAX_PART_LEN).contains(&hash.len());
        if !(1..=PBKDF2_ITERATIONS).contains(&iterations) || !lengths_ok {
            return Err(MalformedPasswordHash);
        }
        Ok(Self {
            iterations,
            salt,
            hash,
        })
    }

    /// True when the hash was made with fewer iterations than current policy, so the
    /// Worker should re-hash after the next successful login.
    pub fn needs_rehash(&self) -> bool {
        self.iterations < PBKDF2_ITERATIONS
    }
}

impl fmt::Display for PasswordHash {
    /// The stored form, `pbkdf2-sha256$<iter>$<b64 salt>$<b64 hash>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}${}${}${}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(&self.hash)
        )
    }
}

impl fmt::Debug for PasswordHash {
    /// Shows the parameters, not the hash (offline-crackable material stays out of logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHash")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .field("hash", &"REDACTED")
            .finish()
    }
}

/// Constant-time equality of two derived hashes (length is not secret).
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Checks a new password against the policy: 10 to 256 characters.
pub fn check_password_policy(pw: &str) -> Result<(), ValidationError> {
    let chars = pw.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(ValidationError::new(
            "password",
            codes::WEAK_PASSWORD,
            format!("Password must be at least {MIN_PASSWORD_CHARS} characters."),
        ));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(ValidationError::new(
            "password",
            codes::TOO_LONG,
            format!("Password must be at most {MAX_PASSWORD_CHARS} characters."),
        ));
    }
    Ok(())
}

/// Reference PBKDF2-HMAC-SHA256, byte-for-byte what WebCrypto's `deriveBits` returns for
/// the same inputs. Slow in wasm: for tests and tools, not for the Worker's hot path.
pub fn pbkdf2_sha256(
    password: impl AsRef<[u8]>,
    salt: &[u8],
    iterations: u32,
    out_len: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_len];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_ref(), salt, iterations, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7914 §11 PBKDF2-HMAC-SHA256 test vectors (c = 1 and c = 80,000).
    #[test]
    fn pbkdf2_rfc7914_vectors() {
        assert_eq!(
            hex::encode(pbkdf2_sha256("passwd", b"salt", 1, 64)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
        assert_eq!(
            hex::encode(pbkdf2_sha256(b"Password", b"NaCl", 80_000, 64)),
            "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56\
             a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d"
        );
    }

    /// A stored string produced by an independent implementation (Python's
    /// `hashlib.pbkdf2_hmac`) parses, and re-deriving from the password matches it.
    #[test]
    fn stored_format_cross_check() {
        let stored = "pbkdf2-sha256$100000$AAECAwQFBgcICQoLDA0ODw==$\
                      SdScJfWXhGIJ8Nkud3CrZOHHXpS0zmxQkmXuZxddKh4=";
        let parsed = PasswordHash::parse(stored).unwrap();
        assert_eq!(parsed.iterations, PBKDF2_ITERATIONS);
        assert_eq!(parsed.salt, (0u8..16).collect::<Vec<_>>());
        let derived = pbkdf2_sha256(
            "correct horse battery staple",
            &parsed.salt,
            parsed.iterations,
            32,
        );
        assert!(hashes_equal(&derived, &parsed.hash));
        let wrong = pbkdf2_sha256("correct horse battery stapler", &parsed.salt, 100_000, 32);
        assert!(!hashes_equal(&wrong, &parsed.hash));
        assert_eq!(parsed.to_string(), stored);
        assert!(!parsed.needs_rehash());
    }

    /// `to_string` and `parse` are inverses.
    #[test]
    fn format_round_trip() {
        let h = PasswordHash {
            iterations: 1_000,
            salt: vec![7; 16],
            hash: vec![9; 32],
        };
        let s = h.to_string();
        assert!(s.starts_with("pbkdf2-sha256$1000$"));
        assert_eq!(PasswordHash::parse(&s).unwrap(), h);
        assert!(h.needs_rehash());
    }

    /// Anything but the exact format, sane lengths and 1..=100,000 iterations is refused.
    #[test]
    fn parse_rejects_malformed() {
        let salt = BASE64.encode([1u8; 16]);
        let hash = BASE64.encode([2u8; 32]);
        for bad in [
            String::new(),
            "plaintext".into(),
            format!("bcrypt$100000${salt}${hash}"),
            format!("pbkdf2-sha256$0${salt}${hash}"),
            format!("pbkdf2-sha256$100001${salt}${hash}"),
            format!("pbkdf2-sha256$-1${salt}${hash}"),
            format!("pbkdf2-sha256$abc${salt}${hash}"),
            format!("pbkdf2-sha256$1000$!!!${hash}"),
            format!("pbkdf2-sha256$1000${salt}"),
            format!("pbkdf2-sha256$1000${salt}${hash}$extra"),
            format!("pbkdf2-sha256$1000${}${hash}", BASE64.encode([1u8; 4])),
            format!("pbkdf2-sha256$1000${salt}${}", BASE64.encode([2u8; 8])),
            format!("pbkdf2-sha256$1000${salt}${}", BASE64.encode([2u8; 65])),
        ] {
            assert_eq!(
                PasswordHash::parse(&bad),
                Err(MalformedPasswordHash),
                "{bad}"
            );
        }
    }

    /// Equal hashes compare equal; any difference (content or length) does not.
    #[test]
    fn constant_time_compare() {
        assert!(hashes_equal(b"abcdef", b"abcdef"));
        assert!(!hashes_equal(b"abcdef", b"abcdeg"));
        assert!(!hashes_equal(b"abcdef", b"abcde"));
    }

    /// The policy counts characters: 9 is weak, 10 passes, 256 passes, 257 is too long.
    #[test]
    fn policy() {
        assert_eq!(
            check_password_policy("123456789").unwrap_err().code,
            codes::WEAK_PASSWORD
        );
        assert!(check_password_policy("1234567890").is_ok());
        assert!(check_password_policy("ééééééééééé").is_ok());
        assert_eq!(
            check_password_policy("ééééé").unwrap_err().code,
            codes::WEAK_PASSWORD
        );
        assert!(check_password_policy(&"x".repeat(256)).is_ok());
        let long = check_password_policy(&"x".repeat(257)).unwrap_err();
        assert_eq!(
            (long.code, long.field.as_str()),
            (codes::TOO_LONG, "password")
        );
    }

    /// Debug output never contains the hash bytes.
    #[test]
    fn debug_redacts_hash() {
        let h = PasswordHash {
            iterations: 1_000,
            salt: vec![7; 16],
            hash: vec![0xAB; 32],
        };
        let dbg = format!("{h:?}");
        assert!(dbg.contains("REDACTED"), "{dbg}");
        assert!(
            !dbg.contains("171") && !dbg.contains(&BASE64.encode(&h.hash)),
            "{dbg}"
        );
    }
}
