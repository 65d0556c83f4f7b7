//! Replay protection for stream tokens: a bounded set of nonces already used.
//!
//! Owns only membership and expiry; the token's signature and lifetime are checked by
//! `cmb_core::stream_token` before a nonce gets here. Time is an argument (unix seconds).
//! It must not grow without bound: when full, expired entries are purged, and if the set
//! is still full the claim is refused (fail closed) rather than forgetting a live nonce,
//! which would re-open a replay window.

use std::collections::HashMap;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceRejected {
    /// Seen before and its token has not expired yet: a replay.
    Reused,
    /// The set is full of live nonces; refusing is safer than evicting one.
    Full,
}

/// Nonces of stream tokens that opened a stream, until their tokens expire.
#[derive(Debug)]
pub struct NonceCache {
    capacity: usize,
    /// nonce → unix second its token expires; after that the token itself is refused.
    seen: HashMap<String, i64>,
}

impl NonceCache {
    /// An empty cache holding at most `capacity` live nonces.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: HashMap::new(),
        }
    }

    /// Records `nonce` (valid until `expires_at`) if it has not been used.
    pub fn claim(
        &mut self,
        nonce: &str,
        expires_at: i64,
        now_unix: i64,
    ) -> Result<(), NonceRejected> {
        if let Some(&exp) = self.seen.get(nonce) {
            if exp > now_unix {
                return Err(NonceRejected::Reused);
            }
        }
        if self.seen.len() >= self.capacity && !self.seen.contains_key(nonce) {
            // O(n) but only when full; at a steady state the purge frees most of the set.
            self.seen.retain(|_, exp| *exp > now_unix);
            if self.seen.len() >= self.capacity {
                return Err(NonceRejected::Full);
            }
        }
        self.seen.insert(nonce.to_owned(), expires_at);
        Ok(())
    }

    /// Live-or-not-yet-purged entries, for tests and diagnostics.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nonce can be used once while its token is live.
    #[test]
    fn second_use_is_a_replay() {
        let mut c = NonceCache::new(8);
        assert_eq!(c.claim("n1", 100, 10), Ok(()));
        assert_eq!(c.claim("n1", 100, 50), Err(NonceRejected::Reused));
        assert_eq!(c.claim("n2", 100, 50), Ok(()));
    }

    /// After its token expired, a nonce no longer blocks (the token check refuses it anyway).
    #[test]
    fn expired_entries_do_not_block() {
        let mut c = NonceCache::new(8);
        assert_eq!(c.claim("n1", 100, 10), Ok(()));
        assert_eq!(c.claim("n1", 200, 100), Ok(()));
    }

    /// A full cache purges expired entries, and refuses only when every entry is live.
    #[test]
    fn full_cache_purges_then_fails_closed() {
        let mut c = NonceCache::new(2);
        assert_eq!(c.claim("a", 50, 0), Ok(()));
        assert_eq!(c.claim("b", 500, 0), Ok(()));
        assert_eq!(c.claim("c", 500, 10), Err(NonceRejected::Full));
        // At t=60 "a" has expired and is purged to make room.
        assert_eq!(c.claim("c", 500, 60), Ok(()));
        assert_eq!(c.len(), 2);
        assert_eq!(c.claim("b", 500, 60), Err(NonceRejected::Reused));
    }
}
