//! The stack launcher itself: a real Worker under `wrangler dev` comes up on a free port
//! with fresh local state, answers `/health` with JSON, and is gone once dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cmb_tests::stack::{Stack, StackOptions};

fn vars() -> BTreeMap<String, String> {
    [
        (
            "JWT_SECRET",
            "smoke-jwt-secret-0123456789abcdef0123456789abcdef",
        ),
        (
            "RELAY_SECRET",
            "smoke-relay-secret-0123456789abcdef0123456789abcdef",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `/health` answers with the documented JSON shape, and dropping the stack frees its port
/// (the whole wrangler/workerd process group is gone).
#[test]
fn worker_answers_health_json_and_stops_on_drop() {
    let stack = Stack::start(StackOptions {
        worker_vars: vars(),
        ..Default::default()
    })
    .expect("start the Worker under wrangler dev");

    let reply = stack.worker_health().expect("GET /health");
    assert!(
        reply.status == 200 || reply.status == 503,
        "status {}: {}\n{}",
        reply.status,
        reply.body,
        stack.logs()
    );
    let body: serde_json::Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {}", reply.body));
    assert!(body["status"].is_string(), "{body}");
    assert!(body["checks"].is_object(), "{body}");
    // The launcher filled in the Worker's own address.
    assert_eq!(stack.worker_vars()["PUBLIC_BASE_URL"], stack.worker_url());

    let url = stack.worker_url();
    let dir = stack.dir().to_path_buf();
    drop(stack);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut still_up = true;
    while still_up && Instant::now() < deadline {
        still_up = xtask::health::get(&format!("{url}/health"), Duration::from_secs(2)).is_ok();
        if still_up {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        !still_up,
        "the Worker still answers after the stack was dropped"
    );
    assert!(
        !dir.exists(),
        "state directory {} was not removed",
        dir.display()
    );
}

/// A Worker missing most of its configuration still answers a browser: the preflight
/// before any configuration is read, and the 503 `misconfigured` with CORS headers and
/// the request id, so a frontend can show the reason.
#[test]
fn a_misconfigured_worker_still_speaks_cors() {
    let origin = "http://app.test:5173";
    let mut v = vars();
    v.insert("CORS_ORIGINS".into(), origin.into());
    let stack = Stack::start(StackOptions {
        worker_vars: v,
        ..Default::default()
    })
    .expect("start the Worker under wrangler dev");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let pre = http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/me", stack.worker_url()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
            .await
            .expect("preflight");
        assert_eq!(pre.status().as_u16(), 204, "{}", stack.logs());
        assert_eq!(
            pre.headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some(origin)
        );
        let resp = http
            .get(format!("{}/api/me", stack.worker_url()))
            .header("origin", origin)
            .send()
            .await
            .expect("GET /api/me");
        assert_eq!(resp.status().as_u16(), 503);
        let allow = resp
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(allow.as_deref(), Some(origin));
        let id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("x-request-id");
        let body: serde_json::Value = resp.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "misconfigured", "{body}");
        assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");
    });
}

/// Two stacks run side by side on different ports with separate state.
#[test]
fn stacks_are_isolated() {
    let a = Stack::start(StackOptions {
        worker_vars: vars(),
        ..Default::default()
    })
    .expect("first stack");
    let b = Stack::start(StackOptions {
        worker_vars: vars(),
        ..Default::default()
    })
    .expect("second stack");
    assert_ne!(a.worker_url(), b.worker_url());
    assert_ne!(a.dir(), b.dir());
    for stack in [&a, &b] {
        let reply = stack.worker_health().expect("GET /health");
        assert!(matches!(reply.status, 200 | 503), "{}", stack.logs());
    }
}

/// A Worker configured for production (`DEPLOY_ENV=production`, as `[env.production*]`
/// sets it) whose `PUBLIC_BASE_URL` and `RELAY_URL` are still loopback addresses says so:
/// `/health` is 503 naming both settings. The rest of the API keeps serving.
#[test]
fn a_production_worker_on_loopback_urls_is_unhealthy() {
    let mut v = cmb_tests::harness::worker_vars("http://127.0.0.1:9");
    v.insert("DEPLOY_ENV".into(), "production".into());
    let stack = Stack::start(StackOptions {
        worker_vars: v,
        ..Default::default()
    })
    .expect("start the Worker under wrangler dev");

    let reply = stack.worker_health().expect("GET /health");
    assert_eq!(reply.status, 503, "{}\n{}", reply.body, stack.logs());
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(body["status"], "unhealthy", "{body}");
    let config = &body["checks"]["config"];
    assert_eq!(config["ok"], false, "{body}");
    let named: Vec<&str> = config["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(named, ["PUBLIC_BASE_URL", "RELAY_URL"], "{body}");
    assert!(
        config["problems"][0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("127.0.0.1") && p.contains("loopback")),
        "{body}"
    );
    assert_eq!(body["checks"]["db"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["kv"]["ok"], true, "{body}");

    // Only /health reports it: registering still works.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/api/auth/register", stack.worker_url()))
            .json(&serde_json::json!({
                "email": "loopback@example.com",
                "password": "a long password",
                "name": "Loop"
            }))
            .send()
            .await
            .expect("POST /api/auth/register")
            .status()
            .as_u16()
    });
    assert_eq!(status, 201, "{}", stack.logs());
}
