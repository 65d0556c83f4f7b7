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

/// A body is limited while it streams in: a chunked upload with no `Content-Length`
/// that goes on for 64 MiB is answered `body_too_large` long before it ends (a Worker
/// that buffered the whole body first would answer only after), and nothing is created.
#[tokio::test]
async fn an_endless_chunked_body_is_cut_off_at_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let base = url::Url::parse(&worker().url()).unwrap();
    let addr = format!("{}:{}", base.host_str().unwrap(), base.port().unwrap());
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/auth/register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = {
        let data = "a".repeat(4096);
        format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
    };
    let opening =
        b"{\"email\":\"endless@example.com\",\"password\":\"long enough pass\",\"name\":\"";
    tcp.write_all(format!("{:x}\r\n", opening.len()).as_bytes())
        .await
        .unwrap();
    tcp.write_all(opening).await.unwrap();
    tcp.write_all(b"\r\n").await.unwrap();
    // Keep sending until the Worker answers; stop writing once the socket refuses.
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        // A hard stop far past the limit, so a Worker that buffers still gets an end.
        while sent < 64 * 1024 * 1024 {
            if wr.write_all(&chunk).await.is_err() {
                return (sent, false);
            }
            sent += chunk.len();
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
        (sent, true)
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = rd.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    writer.abort();
    if let Ok((sent, true)) = writer.await {
        panic!("the Worker answered only after the whole {sent}-byte body was sent");
    }
    let text = String::from_utf8_lossy(&answer);
    // The Worker's answer is the 400. Under `wrangler dev`, miniflare's entry worker
    // (the local proxy in front of ours) sometimes loses the race between that early
    // answer and the upload still arriving, and reports "Network connection lost"
    // instead; either way the answer came long before the body ended (checked above).
    let workers_answer = text.starts_with("HTTP/1.1 400") && text.contains("body_too_large");
    let proxy_lost_race =
        text.starts_with("HTTP/1.1 500") && text.contains("Network connection lost");
    assert!(workers_answer || proxy_lost_race, "{text}");

    let login = reqwest::Client::new()
        .post(url("/api/auth/login"))
        .json(&json!({ "email": "endless@example.com", "password": "long enough pass" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 401, "an account was created");
}

/// `GET /openapi.json` serves the checked-in document itself, as JSON, to anyone (no
/// token), with CORS and a request id like every other answer.
#[tokio::test]
async fn the_openapi_document_is_served() {
    let http = reqwest::Client::new();
    let (status, h, body) = send(http.get(url("/openapi.json")).header("origin", APP_ORIGIN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&h, "content-type"), Some("application/json"));
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP_ORIGIN));
    assert!(header(&h, "x-request-id").is_some());
    let checked_in: Value = serde_json::from_str(cmb_core::http::openapi::DOCUMENT).unwrap();
    assert_eq!(body, checked_in);
}
