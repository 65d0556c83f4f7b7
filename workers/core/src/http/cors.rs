//! CORS for browser clients on other origins (`CORS_ORIGINS`).
//!
//! Origins are matched exactly; `*` allows any origin by answering the literal `*`, never
//! by reflecting the caller's origin (we send no `allow-credentials`: the API uses bearer
//! tokens, so a browser never attaches cookies). Every response carries the headers, errors
//! included, so a browser can read a 400's JSON instead of an opaque "CORS error".

/// Methods any route answers.
pub const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Request headers a client may send (`idempotency-key`: checkout, calls, schedules;
/// `x-request-id`: tracing).
pub const ALLOW_HEADERS: &str = "authorization, content-type, idempotency-key, x-request-id";
/// Response headers a script may read.
pub const EXPOSE_HEADERS: &str = "x-request-id, retry-after, www-authenticate, idempotent-replayed";
/// How long a browser may cache a preflight, in seconds.
pub const MAX_AGE_SECS: u32 = 600;

/// The allowed origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsPolicy {
    origins: Vec<String>,
    any: bool,
}

/// Why an entry of `CORS_ORIGINS` is not an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOrigin(pub String);

/// One `CORS_ORIGINS` entry as an origin (`scheme://host[:port]`, no path), or why not.
pub fn parse_origin(entry: &str) -> Result<String, BadOrigin> {
    let entry = entry.trim();
    if entry == "*" {
        return Ok(entry.to_owned());
    }
    let origin = entry.trim_end_matches('/');
    match url::Url::parse(origin) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some()
                && url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none()
                && url.username().is_empty() =>
        {
            // Browsers send the serialized origin: lowercase host, no default port.
            Ok(url.origin().ascii_serialization())
        }
        _ => Err(BadOrigin(format!(
            "{entry:?} is not an origin like https://app.example.com"
        ))),
    }
}

impl CorsPolicy {
    /// From already-validated origins (see [`parse_origin`]).
    pub fn new(origins: Vec<String>) -> Self {
        let any = origins.iter().any(|o| o == "*");
        let origins = origins.into_iter().filter(|o| o != "*").collect();
        Self { origins, any }
    }

    /// From the raw comma-separated setting, keeping the valid entries. For the early
    /// path (a preflight is answered before configuration is validated; a bad entry is
    /// reported by `/health` and by the 503 every other request gets).
    pub fn lenient(raw: &str) -> Self {
        Self::new(
            raw.split(',')
                .filter(|e| !e.trim().is_empty())
                .filter_map(|e| parse_origin(e).ok())
                .collect(),
        )
    }

    /// The headers for a response to a request from `origin` (`preflight`: an `OPTIONS`).
    pub fn headers(&self, origin: Option<&str>, preflight: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.any {
            // The answer depends on the Origin header: caches must know.
            out.push(("vary", "Origin".to_owned()));
        }
        let Some(origin) = origin else { return out };
        let allowed = if self.any {
            "*".to_owned()
        } else if self.origins.iter().any(|o| o == origin) {
            origin.to_owned()
        } else {
            return out;
        };
        out.push(("access-control-allow-origin", allowed));
        out.push(("access-control-expose-headers", EXPOSE_HEADERS.to_owned()));
        if preflight {
            out.push(("access-control-allow-methods", ALLOW_METHODS.to_owned()));
            out.push(("access-control-allow-headers", ALLOW_HEADERS.to_owned()));
            out.push(("access-control-max-age", MAX_AGE_SECS.to_string()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn exact_origins_only() {
        let p = CorsPolicy::lenient("https://app.example.com, http://localhost:5173");
        let h = p.headers(Some("https://app.example.com"), false);
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(get(&h, "vary"), Some("Origin"));
        assert!(get(&h, "access-control-allow-methods").is_none());
        for other in [
            "https://evil.example.com",
            "https://app.example.com.evil.com",
            "http://app.example.com",
            "null",
        ] {
            let h = p.headers(Some(other), true);
            assert_eq!(get(&h, "access-control-allow-origin"), None, "{other}");
            assert_eq!(get(&h, "vary"), Some("Origin"));
        }
    }

    #[test]
    fn preflight_allows_the_idempotency_key() {
        let p = CorsPolicy::lenient("http://localhost:5173");
        let h = p.headers(Some("http://localhost:5173"), true);
        let allowed = get(&h, "access-control-allow-headers").unwrap_or_default();
        for name in ["authorization", "content-type", "idempotency-key"] {
            assert!(allowed.split(", ").any(|a| a == name), "{name}");
        }
        assert!(get(&h, "access-control-allow-methods")
            .unwrap_or_default()
            .contains("DELETE"));
        assert_eq!(get(&h, "access-control-max-age"), Some("600"));
        assert!(get(&h, "access-control-expose-headers")
            .unwrap_or_default()
            .contains("x-request-id"));
    }

    #[test]
    fn wildcard_answers_star_and_never_reflects() {
        let p = CorsPolicy::lenient("*");
        let h = p.headers(Some("https://anyone.example"), true);
        assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
        assert!(get(&h, "access-control-allow-credentials").is_none());
        assert!(get(&h, "vary").is_none());
    }

    #[test]
    fn no_origin_no_cors() {
        let p = CorsPolicy::lenient("https://app.example.com");
        let h = p.headers(None, false);
        assert_eq!(h, vec![("vary", "Origin".to_owned())]);
        assert!(CorsPolicy::default()
            .headers(Some("https://app.example.com"), true)
            .iter()
            .all(|(k, _)| *k == "vary"));
    }

    #[test]
    fn origins_are_normalized_and_bad_entries_refused() {
        assert_eq!(
            parse_origin("HTTPS://App.Example.com:443/").as_deref(),
            Ok("https://app.example.com")
        );
        assert_eq!(
            parse_origin("http://localhost:5173").as_deref(),
            Ok("http://localhost:5173")
        );
        for bad in [
            "app.example.com",
            "https://app.example.com/path",
            "ftp://x.example",
            "https://u:p@x.example",
            "https://x.example?q=1",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        // The lenient form keeps the good entries of a half-bad list.
        let p = CorsPolicy::lenient("nonsense, https://ok.example");
        let h = p.headers(Some("https://ok.example"), false);
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://ok.example")
        );
    }
}
