//! A string secret that cannot leak through formatting.
//!
//! Owns only the redaction guarantee: `Debug` and `Display` print `REDACTED`, so a secret
//! inside a config struct can be logged or put in an error without exposing it. It must
//! not offer `Serialize`: writing a secret back out has to be an explicit `expose()`.

use std::fmt;

use serde::Deserialize;

/// What `Debug` and `Display` print instead of the value.
const REDACTED: &str = "REDACTED";

/// A secret value (API key, token, HMAC key). Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; every call site is a place the value leaves the wrapper.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither `Debug` nor `Display` (nor `Debug` of a containing struct) shows the value.
    #[test]
    fn formatting_redacts() {
        #[derive(Debug)]
        #[allow(dead_code)] // only read through Debug
        struct Holder {
            key: Secret,
        }
        let s = Secret::new("sk_live_abc");
        assert_eq!(format!("{s}"), "REDACTED");
        assert_eq!(format!("{s:?}"), "REDACTED");
        let h = format!("{:?}", Holder { key: s.clone() });
        assert!(!h.contains("sk_live_abc"), "{h}");
        assert_eq!(s.expose(), "sk_live_abc");
    }

    /// Deserializes from a bare JSON string, and `is_empty` reflects the value.
    #[test]
    fn deserializes_transparently() {
        let s: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(s, Secret::new("abc"));
        assert!(!s.is_empty());
        assert!(Secret::new("").is_empty());
    }
}
