//! `X-Twilio-Signature` computation and validation (PROTOCOLS.md §2, and §1 for the
//! WebSocket upgrade).
//!
//! Owns the algorithm only: the caller rebuilds the URL exactly as Twilio requested it
//! (from the configured public origin, never from a proxied local request) and passes
//! every received form parameter untouched. Nothing here trims, decodes or re-encodes
//! values, because any change breaks the HMAC.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha1 = Hmac<Sha1>;

/// The query parameter Twilio adds to the URL of a JSON-body webhook.
const BODY_SHA256_PARAM: &str = "bodySHA256";

/// `base64(HMAC-SHA1(auth_token, url + name1 + value1 + name2 + value2 …))`, with the
/// parameters sorted by name in byte order and repeated names sorted by value.
pub fn compute_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // Tuple order = name first, then value: exactly "sorted keys, each key's values sorted".
    // `str` ordering is byte ordering, which is what Twilio's libraries use.
    sorted.sort();
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps it panic-free.
    let Ok(mut mac) = HmacSha1::new_from_slice(auth_token.as_bytes()) else {
        return String::new();
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    BASE64.encode(mac.finalize().into_bytes())
}

/// Validates a form-encoded (or GET, with empty `params`) webhook signature.
///
/// Accepts the signature whether Twilio computed it with or without the scheme's default
/// port in the URL, as Twilio's own libraries do: Twilio is inconsistent about it.
pub fn validate_request(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    if auth_token.is_empty() {
        // An unset token would make every forged request with HMAC("") pass.
        return false;
    }
    let mut ok = false;
    for candidate in url_variants(url) {
        let expected = compute_signature(auth_token, &candidate, params);
        // Evaluate every variant (no short-circuit) so timing does not reveal which matched.
        ok |= bool::from(expected.as_bytes().ct_eq(signature.as_bytes()));
    }
    ok
}

/// Validates a JSON-body webhook: the URL carries `bodySHA256=<hex sha256 of body>`, the
/// signature covers that URL with no parameters, and the body must hash to that value.
pub fn validate_request_with_body(
    auth_token: &str,
    url: &str,
    body: &[u8],
    signature: &str,
) -> bool {
    let Some(claimed) = query_value(url, BODY_SHA256_PARAM) else {
        return false;
    };
    let actual = body_sha256_hex(body);
    // Twilio sends lowercase hex; accept uppercase too since hex case carries no meaning.
    let body_matches = bool::from(
        claimed
            .to_ascii_lowercase()
            .as_bytes()
            .ct_eq(actual.as_bytes()),
    );
    let signature_matches = validate_request(auth_token, url, &[], signature);
    body_matches & signature_matches
}

/// Lowercase hex SHA-256 of a raw request body, as Twilio puts in `bodySHA256`.
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The URL as given plus its default-port twin: `https://h/x` ⇄ `https://h:443/x`.
fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_owned()];
    if let Some(twin) = default_port_twin(url) {
        variants.push(twin);
    }
    variants
}

/// Adds the default port when the URL has none, or removes it when it is the default;
/// `None` for a non-default port or a URL without a recognised scheme.
fn default_port_twin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => "443",
        "http" | "ws" => "80",
        _ => return None,
    };
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    // Userinfo may itself contain ':'; the port can only follow the host part.
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    // In an IPv6 literal (`[::1]:443`) only a ':' after the ']' starts a port.
    let search_from = host_port.rfind(']').map_or(0, |i| i + 1);
    let port_colon = host_port[search_from..]
        .rfind(':')
        .map(|i| host_start + search_from + i);
    match port_colon {
        Some(colon) => {
            let port = &authority[colon + 1..];
            (port == default_port).then(|| format!("{scheme}://{}{tail}", &authority[..colon]))
        }
        None => Some(format!("{scheme}://{authority}:{default_port}{tail}")),
    }
}

/// The raw value of `name` in the URL's query string (hex needs no percent-decoding).
fn query_value<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let without_fragment = url.split('#').next().unwrap_or(url);
    let (_, query) = without_fragment.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const FORM_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const FORM_SIG: &str = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
    const JSON_BODY: &[u8] = br#"{"property": "value", "boolean": true}"#;
    const JSON_BODY_HASH: &str = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
    const JSON_SIG: &str = "y77kIzt2vzLz71DgmJGsen2scGs=";

    fn form_params() -> Vec<(String, String)> {
        // Deliberately not in sorted order: the function must sort.
        [
            ("To", "+18005551212"),
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("Caller", "+12349013030"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn json_url() -> String {
        format!("https://mycompany.com/myapp.php?bodySHA256={JSON_BODY_HASH}")
    }

    /// The form vector from PROTOCOLS.md (Twilio's python oracle) is reproduced.
    #[test]
    fn form_vector_matches_oracle() {
        assert_eq!(compute_signature(TOKEN, FORM_URL, &form_params()), FORM_SIG);
        assert!(validate_request(TOKEN, FORM_URL, &form_params(), FORM_SIG));
    }

    /// The same signature validates when the URL is given with the explicit `:443`.
    #[test]
    fn form_vector_validates_with_default_port() {
        let url = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert!(validate_request(TOKEN, url, &form_params(), FORM_SIG));
    }

    /// A signature Twilio computed over the `:443` URL validates against the bare URL.
    #[test]
    fn signature_with_port_validates_without_port() {
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        let sig = compute_signature(TOKEN, with_port, &form_params());
        assert_ne!(sig, FORM_SIG);
        assert!(validate_request(TOKEN, FORM_URL, &form_params(), &sig));
    }

    /// A non-default port is part of the signed URL and is never stripped.
    #[test]
    fn non_default_port_is_not_interchangeable() {
        let url = "https://mycompany.com:8443/myapp.php?foo=1&bar=2";
        assert!(!validate_request(TOKEN, url, &form_params(), FORM_SIG));
        assert_eq!(default_port_twin(url), None);
    }

    /// Default-port twins are built per scheme, including userinfo and IPv6 hosts.
    #[test]
    fn default_port_twins() {
        assert_eq!(
            default_port_twin("wss://example.com/media").as_deref(),
            Some("wss://example.com:443/media")
        );
        assert_eq!(
            default_port_twin("http://h:80?x=1").as_deref(),
            Some("http://h?x=1")
        );
        assert_eq!(
            default_port_twin("ws://u:p@h/x").as_deref(),
            Some("ws://u:p@h:80/x")
        );
        assert_eq!(
            default_port_twin("https://[::1]:443/x").as_deref(),
            Some("https://[::1]/x")
        );
        assert_eq!(
            default_port_twin("https://[::1]/x").as_deref(),
            Some("https://[::1]:443/x")
        );
        assert_eq!(default_port_twin("ftp://h/x"), None);
        assert_eq!(default_port_twin("not a url"), None);
    }

    /// Changing one parameter value invalidates the signature.
    #[test]
    fn tampered_param_fails() {
        let mut params = form_params();
        params[2].1 = "9999".into();
        assert!(!validate_request(TOKEN, FORM_URL, &params, FORM_SIG));
    }

    /// Dropping a parameter invalidates the signature.
    #[test]
    fn missing_param_fails() {
        let mut params = form_params();
        params.remove(0);
        assert!(!validate_request(TOKEN, FORM_URL, &params, FORM_SIG));
    }

    /// Another auth token (or none at all) does not validate.
    #[test]
    fn wrong_or_empty_token_fails() {
        assert!(!validate_request(
            "54321",
            FORM_URL,
            &form_params(),
            FORM_SIG
        ));
        let forged = compute_signature("", FORM_URL, &form_params());
        assert!(!validate_request("", FORM_URL, &form_params(), &forged));
    }

    /// A different URL (path or query) does not validate.
    #[test]
    fn tampered_url_fails() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=3";
        assert!(!validate_request(TOKEN, url, &form_params(), FORM_SIG));
    }

    /// Repeated keys are ordered by value, whatever order they arrived in.
    #[test]
    fn repeated_keys_sorted_by_value() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let a = compute_signature(
            TOKEN,
            "https://h/x",
            &p(&[("K", "b"), ("A", "1"), ("K", "a")]),
        );
        let b = compute_signature(
            TOKEN,
            "https://h/x",
            &p(&[("K", "a"), ("K", "b"), ("A", "1")]),
        );
        assert_eq!(a, b);
        // And the concatenation really is A1KaKb.
        assert_eq!(a, compute_signature(TOKEN, "https://h/xA1KaKb", &[]));
    }

    /// The JSON-body vector from PROTOCOLS.md: body hash and signature both match.
    #[test]
    fn json_vector_matches_oracle() {
        assert_eq!(body_sha256_hex(JSON_BODY), JSON_BODY_HASH);
        assert_eq!(compute_signature(TOKEN, &json_url(), &[]), JSON_SIG);
        assert!(validate_request_with_body(
            TOKEN,
            &json_url(),
            JSON_BODY,
            JSON_SIG
        ));
    }

    /// A body that does not hash to `bodySHA256` fails even with a valid URL signature.
    #[test]
    fn json_tampered_body_fails() {
        let body = br#"{"property": "value", "boolean": false}"#;
        assert!(!validate_request_with_body(
            TOKEN,
            &json_url(),
            body,
            JSON_SIG
        ));
    }

    /// A URL without `bodySHA256`, or a wrong signature, fails.
    #[test]
    fn json_missing_hash_or_bad_signature_fails() {
        let url = "https://mycompany.com/myapp.php";
        let sig = compute_signature(TOKEN, url, &[]);
        assert!(!validate_request_with_body(TOKEN, url, JSON_BODY, &sig));
        assert!(!validate_request_with_body(
            "54321",
            &json_url(),
            JSON_BODY,
            JSON_SIG
        ));
    }

    /// The JSON variant also accepts the `:443` form of the URL.
    #[test]
    fn json_vector_validates_with_default_port() {
        let url = format!("https://mycompany.com:443/myapp.php?bodySHA256={JSON_BODY_HASH}");
        assert!(validate_request_with_body(TOKEN, &url, JSON_BODY, JSON_SIG));
    }

    /// The WebSocket upgrade vector: `wss://example.com/media` with no params.
    #[test]
    fn websocket_vector_matches() {
        let url = "wss://example.com/media";
        assert_eq!(
            compute_signature(TOKEN, url, &[]),
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        );
        assert!(validate_request(
            TOKEN,
            url,
            &[],
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        ));
        assert!(validate_request(
            TOKEN,
            "wss://example.com:443/media",
            &[],
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        ));
    }

    /// An empty or truncated signature never validates.
    #[test]
    fn empty_or_truncated_signature_fails() {
        assert!(!validate_request(TOKEN, FORM_URL, &form_params(), ""));
        assert!(!validate_request(
            TOKEN,
            FORM_URL,
            &form_params(),
            &FORM_SIG[..10]
        ));
    }
}
