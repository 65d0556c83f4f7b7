//! The Worker's house rules, seen as a browser frontend on another origin and as an
//! operator would see them: CORS on every answer (errors and preflights included), a
//! request id on every answer and in error bodies, 405 with `Allow`, and
//! `WWW-Authenticate` on 401.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_tests::harness::{worker, APP_ORIGIN};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

fn url(path: &str) -> String {
    format!("{}{path}", worker().url())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn send(req: reqwest::RequestBuilder) -> (u16, HeaderMap, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

/// A preflight from the allowed origin is 204 with the methods and headers a client
/// needs, `idempotency-key` (checkout) included; another origin gets no CORS at all.
#[tokio::test]
async fn preflight_allows_the_app_and_the_idempotency_key() {
    let http = reqwest::Client::new();
    let (status, h, _) = send(
        http.request(Method::OPTIONS, url("/api/payments/checkout"))
            .header("origin", APP_ORIGIN)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            ),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP_ORIGIN));
    let allowed = header(&h, "access-control-allow-headers").unwrap();
    for name in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.split(", ").any(|a| a == name), "{name}: {allowed}");
    }
    assert!(header(&h, "access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert!(h.get("access-control-allow-credentials").is_none());
    assert!(header(&h, "x-request-id").is_some());

    let (status, h, _) = send(
        http.request(Method::OPTIONS, url("/api/me"))
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "GET"),
    )
    .await;
    assert_eq!(status, 204);
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    assert_eq!(header(&h, "vary"), Some("Origin"));
}

/// Errors carry CORS headers too, so the frontend can read `error.code` instead of an
/// opaque "CORS error"; 401 says which scheme it wants.
#[tokio::test]
async fn errors_carry_cors_and_the_request_id() {
    let http = reqwest::Client::new();
    let (status, h, body) = send(http.get(url("/api/me")).header("origin", APP_ORIGIN)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP_ORIGIN));
    assert!(header(&h, "access-control-expose-headers")
        .unwrap()
        .contains("x-request-id"));
    assert_eq!(
        header(&h, "www-authenticate"),
        Some(r#"Bearer realm="call-me-back""#)
    );
    let id = header(&h, "x-request-id").unwrap();
    assert_eq!(body["error"]["request_id"], id, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");

    // A 400 from a route, read by the browser.
    let (status, h, body) = send(
        http.post(url("/api/auth/register"))
            .header("origin", APP_ORIGIN)
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "malformed_json");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP_ORIGIN));

    // Successes too.
    let (status, h, _) = send(http.get(url("/health")).header("origin", APP_ORIGIN)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP_ORIGIN));
}

/// The request id is Cloudflare's `cf-ray` when it sent one, else generated per request.
#[tokio::test]
async fn the_request_id_is_cf_ray_or_fresh() {
    let http = reqwest::Client::new();
    let (_, h, body) = send(
        http.get(url("/api/nothing-here"))
            .header("cf-ray", "8c1f2a3b4d5e6f70-LAX"),
    )
    .await;
    assert_eq!(header(&h, "x-request-id"), Some("8c1f2a3b4d5e6f70-LAX"));
    assert_eq!(body["error"]["request_id"], "8c1f2a3b4d5e6f70-LAX");

    let (_, a, _) = send(http.get(url("/health"))).await;
    let (_, b, _) = send(http.get(url("/health")).header("cf-ray", "not a ray!")).await;
    let (a, b) = (
        header(&a, "x-request-id").unwrap(),
        header(&b, "x-request-id").unwrap(),
    );
    assert_ne!(a, b);
    for id in [a, b] {
        assert!(
            id.len() == 16 && id.bytes().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
}

/// A known path with the wrong method is 405 with the methods it has in `Allow`; a
/// literal path is never taken for a parameter (`/api/calls/history` is not a call id).
#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let http = reqwest::Client::new();
    let (status, h, body) = send(http.patch(url("/api/personas/some-id"))).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(header(&h, "allow"), Some("GET, PUT, DELETE, OPTIONS"));
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(
        body["error"]["details"],
        json!({ "allow": "GET, PUT, DELETE, OPTIONS" })
    );

    let (status, h, _) = send(http.delete(url("/api/calls/history"))).await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("GET, OPTIONS"));

    let (status, h, _) = send(http.get(url("/api/auth/login"))).await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("POST, OPTIONS"));

    let (status, _, body) = send(http.get(url("/api/personas/x/y"))).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
}
