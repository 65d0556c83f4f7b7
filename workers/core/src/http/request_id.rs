//! The request id: Cloudflare's `cf-ray` when present (so a log line can be matched to
//! Cloudflare's own records), else one generated from random bytes. Returned to the
//! client as `x-request-id`, carried by every log line of the request and by 5xx bodies.

/// Longest id accepted from a header.
const MAX_LEN: usize = 64;

/// The id to use for a request with this `cf-ray` header, if it is a plausible one
/// (ASCII letters, digits and `-`, at most 64 characters); None: generate one.
pub fn from_cf_ray(header: Option<&str>) -> Option<String> {
    let v = header?.trim();
    let ok = !v.is_empty()
        && v.len() <= MAX_LEN
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then(|| v.to_owned())
}

/// A generated id: 16 lowercase hex digits from 8 random bytes.
pub fn generated(random: [u8; 8]) -> String {
    hex::encode(random)
}

/// The id when no random bytes can be had: 12 hex digits of the clock (ms) and 4 of a
/// counter, so ids stay distinct within an isolate and sort by time.
pub fn from_clock(now_ms: u64, seq: u16) -> String {
    format!("{:012x}{seq:04x}", now_ms & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ids_are_distinct_and_as_long_as_random_ones() {
        let a = from_clock(1_764_700_000_123, 0);
        let b = from_clock(1_764_700_000_123, 1);
        let c = from_clock(1_764_700_000_124, 0);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), generated([0; 8]).len());
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(from_clock(0x1_0000_0000_0000, 7), "0000000000000007");
    }

    #[test]
    fn cf_ray_is_used_when_plausible() {
        assert_eq!(
            from_cf_ray(Some("8c1f2a3b4d5e6f70-LAX")).as_deref(),
            Some("8c1f2a3b4d5e6f70-LAX")
        );
        assert_eq!(from_cf_ray(None), None);
        assert_eq!(from_cf_ray(Some("")), None);
        assert_eq!(from_cf_ray(Some("has space")), None);
        assert_eq!(from_cf_ray(Some("\"quoted\"")), None);
        assert_eq!(from_cf_ray(Some(&"a".repeat(65))), None);
    }

    #[test]
    fn generated_ids_are_hex() {
        assert_eq!(
            generated([0, 1, 2, 3, 0xa, 0xb, 0xfe, 0xff]),
            "000102030a0bfeff"
        );
    }
}
