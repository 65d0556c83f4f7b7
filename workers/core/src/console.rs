//! The operators' console (`/admin`): which files it is made of and the headers they are
//! served with. The pages are static assets (`workers/console/`, copied by
//! `cargo xtask build-worker` into `build/assets/admin/`); the Worker serves them itself
//! (`run_worker_first`) so every answer carries the headers decided here.
//!
//! The console holds an admin's token in `sessionStorage` and sends it as a bearer header
//! to the JSON admin routes; nothing secret is ever in a URL.

/// The Content-Security-Policy of every console file: only the console's own script and
/// style, requests only to this origin, no inline code, no framing, no forms posting away.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// The page itself: `GET /admin`.
pub const INDEX: &str = "index.html";

/// Where the console's files are in the assets directory.
pub const ASSET_DIR: &str = "admin";

/// The `Content-Type` of a console file named `file` (`GET /admin/assets/:file`), or
/// `None` when no such file can exist: a name of lowercase letters, digits, `-` and one
/// `.` before a known extension. Anything else (a path, `..`, an unknown type) is a 404
/// without asking the asset store.
pub fn content_type(file: &str) -> Option<&'static str> {
    let (stem, ext) = file.rsplit_once('.')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !plain(stem) {
        return None;
    }
    Some(match ext {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        _ => return None,
    })
}

/// The headers every console answer carries besides its type.
pub const HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    // Small files that change with each deploy: always revalidated.
    ("cache-control", "no-cache"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_files_have_their_types() {
        assert_eq!(
            content_type("console.js"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(content_type("console.css"), Some("text/css; charset=utf-8"));
        assert_eq!(content_type(INDEX), Some("text/html; charset=utf-8"));
        assert_eq!(content_type("logo-2.svg"), Some("image/svg+xml"));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "console",
            ".js",
            "../openapi.json",
            "a/b.js",
            "a..js",
            "Console.js",
            "console.JS",
            "console.json",
            "console.js.map",
            "con sole.js",
            "%2e%2e.js",
        ] {
            assert_eq!(content_type(bad), None, "{bad:?}");
        }
        assert_eq!(content_type(&format!("{}.js", "a".repeat(65))), None);
    }

    #[test]
    fn the_policy_allows_no_inline_code_and_no_other_origin() {
        assert!(!CSP.contains("unsafe-inline"));
        assert!(!CSP.contains("unsafe-eval"));
        assert!(!CSP.contains('*'));
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(CSP.contains("connect-src 'self'"));
    }
}
