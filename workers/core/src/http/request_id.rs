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

#[cfg(test)]
mod tests {
    use super::*;

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
