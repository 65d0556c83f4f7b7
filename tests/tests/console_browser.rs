//! The operators' console (`/admin`) in a real browser: Debian's headless Chromium driven
//! by Playwright (`tests/console/drive.mjs`) against the real Worker, relay and fakes. An
//! admin signs in (a non-admin is refused), opens every page, bans and unbans a user and
//! grants credits; what each page showed is checked against the JSON admin routes, and a
//! screenshot of each page is written to `target/console/` (the README's are copies of
//! one such run, in `docs/console/`). Also: the files' headers (CSP) and refusals.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::CalleeScript;
use cmb_tests::harness::{self, VoiceStack};
use serde_json::Value;

fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1415{n:07}")
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// The console's files come with their type and a CSP that allows no inline code and no
/// other origin; a name outside the whitelist is a JSON 404, not a look into the assets.
#[tokio::test]
async fn the_console_is_served_with_a_strict_policy() {
    let base = harness::worker().url();
    let http = reqwest::Client::new();
    for (path, content_type) in [
        ("/admin", "text/html; charset=utf-8"),
        ("/admin/", "text/html; charset=utf-8"),
        ("/admin/assets/console.js", "text/javascript; charset=utf-8"),
        ("/admin/assets/console.css", "text/css; charset=utf-8"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], content_type, "{path}");
        assert_eq!(
            h["content-security-policy"],
            cmb_core::console::CSP,
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(h.contains_key("x-request-id"), "{path}");
        let body = r.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
    }
    let page = http
        .get(format!("{base}/admin"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<script src="/admin/assets/console.js" defer></script>"#));
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "no inline code or style (the CSP would block it)"
    );
    for path in [
        "/admin/assets/nope.js",
        "/admin/assets/index.json",
        "/admin/assets/..%2Fopenapi.json",
        "/admin/assets/Console.js",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
    }
    let r = http.post(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

/// Everything an operator does in the console, in Chromium, compared with the API.
#[tokio::test]
async fn an_admin_sees_in_the_browser_what_the_api_holds() {
    let repo = xtask::repo::Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: run `cargo xtask setup` (it installs Debian's chromium)"
    );
    let playwright = repo.node_modules().join("playwright-core");
    assert!(
        playwright.is_dir(),
        "{} is missing: run `cargo xtask setup` (npm ci installs playwright-core)",
        playwright.display()
    );
    // Calls ring long enough for the browser to find one live.
    let v = VoiceStack::start_with(
        Vec::new(),
        BTreeMap::from([("TWILIO_RING_TIMEOUT_SECS".to_string(), "300".to_string())]),
    );
    let api = v.api();
    let admin = harness::admin_on(&api, &v.stack).await;

    // A finished conversation: transcript, per-turn latency, costs.
    let talker = api.register_user("console-talker").await.unwrap();
    let line = "could you remind me to stretch after my run";
    let (call_id, _) = v.one_exchange(&api, &talker, line).await.unwrap();

    // A call that rings (nobody answers) while the browser looks at the live page.
    let ringer = api.register_user("console-ringer").await.unwrap();
    let ringing_number = unique_number();
    v.twilio
        .set_script(ringing_number.clone(), CalleeScript::NoAnswer);
    let live_id = api
        .trigger_call(&ringer, "brad", &ringing_number)
        .await
        .unwrap();
    api.wait_call(&ringer, &live_id, Duration::from_secs(20), |b| {
        b["call"]["status"] == "ringing"
    })
    .await
    .unwrap();

    let before = get(&api, &admin, &format!("/admin/users/{}", talker.id)).await;
    let shots = repo.root().join("target/console");
    std::fs::create_dir_all(&shots).unwrap();
    let seen = drive(&v, &admin, &talker, &call_id, &shots).await;

    // The non-admin was refused, kept no token and saw no pages.
    assert!(
        seen["nonAdmin"]["status"]
            .as_str()
            .unwrap()
            .contains("not an admin"),
        "{}",
        seen["nonAdmin"]
    );
    assert_eq!(seen["nonAdmin"]["navHidden"], true);
    assert_eq!(seen["nonAdmin"]["token"], 0);

    // Live: the ringing call is there, the finished one is not; and the page refreshed.
    let live_ids = ids(&seen["live"]["rows"]);
    assert!(live_ids.contains(&live_id), "{live_ids:?}");
    assert!(!live_ids.contains(&call_id), "{live_ids:?}");
    assert_eq!(seen["live"]["refreshed"], true);

    // Calls: the newest page of the API's list, in its order.
    let calls = get(&api, &admin, "/admin/calls?limit=50").await;
    let api_ids: Vec<String> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids(&seen["calls"]["rows"]), api_ids);

    // The call's detail: transcript, latency bars and costs as the API has them.
    let detail = get(&api, &admin, &format!("/admin/calls/{call_id}")).await;
    let transcript: Vec<&str> = detail["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert!(transcript.contains(&line), "{transcript:?}");
    let shown: Vec<&str> = seen["call"]["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(shown, transcript);
    let latencies: Vec<i64> = detail["latencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["end_of_turn_to_first_audio_ms"].as_i64().unwrap_or(0))
        .collect();
    assert!(!latencies.is_empty(), "a measured turn: {detail}");
    let bars: Vec<i64> = numbers(&seen["call"]["latencyBars"]);
    assert_eq!(bars, latencies);
    let providers: Vec<String> = detail["costs"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["provider"].as_str().unwrap().to_owned())
        .collect();
    assert!(!providers.is_empty(), "{detail}");
    assert_eq!(ids(&seen["call"]["costs"]), providers);
    for (row, p) in rows(&seen["call"]["costs"])
        .iter()
        .zip(detail["costs"]["providers"].as_array().unwrap())
    {
        // Dollars to four places, half up.
        let t = (p["cost_micros"].as_i64().unwrap() + 50) / 100;
        assert_eq!(row[2], format!("${}.{:04}", t / 10000, t % 10000), "{p}");
    }
    let events = get(
        &api,
        &admin,
        &format!("/admin/events?call_id={call_id}&limit=100"),
    )
    .await;
    assert_eq!(
        seen["call"]["events"].as_array().unwrap().len(),
        events["events"].as_array().unwrap().len()
    );

    // Users: the search found the talker; the ban, unban and grant went through the API.
    let query = seen["users"]["query"].as_str().unwrap();
    let found = get(&api, &admin, &format!("/admin/users?q={query}")).await;
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(ids(&seen["users"]["rows"]), vec![talker.id.clone()]);
    let credits_before = before["user"]["credits"].as_i64().unwrap();
    assert_eq!(seen["user"]["before"]["state"], "active");
    assert_eq!(seen["user"]["before"]["credits"], credits_before);
    assert_eq!(seen["user"]["banned"]["state"], "banned");
    let after = get(&api, &admin, &format!("/admin/users/{}", talker.id)).await;
    assert_eq!(after["user"]["is_banned"], false, "unbanned at the end");
    assert_eq!(after["user"]["credits"], credits_before + 25);
    assert_eq!(seen["user"]["after"]["state"], "active");
    assert_eq!(seen["user"]["after"]["credits"], credits_before + 25);
    let audit = get(
        &api,
        &admin,
        &format!("/admin/audit?target_id={}&limit=50", talker.id),
    )
    .await;
    let actions: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(actions.len(), 3, "ban, unban, credits: {audit}");
    for reason in [
        "console test: ban",
        "console test: unban",
        "console test: goodwill",
    ] {
        assert!(actions.iter().any(|(_, r)| r == reason), "{actions:?}");
    }
    let shown_actions: Vec<String> = rows(&seen["user"]["after"]["audit"])
        .iter()
        .map(|r| r[1].clone())
        .collect();
    let api_actions: Vec<String> = actions.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(shown_actions, api_actions);

    // Analytics: the tiles and bars are the API's figures for the range shown.
    let range = format!(
        "from={}&to={}",
        seen["analytics"]["from"].as_str().unwrap(),
        seen["analytics"]["to"].as_str().unwrap()
    );
    let by_day = get(&api, &admin, &format!("/admin/analytics/calls?{range}")).await;
    let costs = get(&api, &admin, &format!("/admin/analytics/costs?{range}")).await;
    assert_eq!(
        seen["analytics"]["tiles"]["Calls"],
        by_day["totals"]["calls"].to_string()
    );
    assert!(by_day["totals"]["calls"].as_i64().unwrap() >= 2);
    let column = |report: &Value, field: &str| -> Vec<i64> {
        report["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[field].as_i64().unwrap_or(0))
            .collect()
    };
    assert_eq!(
        numbers(&seen["analytics"]["callsPerDay"]),
        column(&by_day, "calls")
    );
    assert_eq!(
        numbers(&seen["analytics"]["revenueBars"]),
        column(&costs, "revenue_micros")
    );
    assert_eq!(
        numbers(&seen["analytics"]["costBars"]),
        column(&costs, "cost_micros")
    );
    assert_eq!(
        numbers(&seen["analytics"]["marginBars"]),
        column(&costs, "gross_margin_micros")
    );
    assert!(column(&costs, "cost_micros").iter().sum::<i64>() > 0);

    // Events: the newest page, as the API lists it.
    let events = get(&api, &admin, "/admin/events?limit=50").await;
    let newest: Vec<String> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].to_string().trim_matches('"').to_owned())
        .collect();
    let shown_events = ids(&seen["events"]["rows"]);
    // Events keep arriving (the ringing call): the page is the API's list at that moment.
    assert_eq!(shown_events.len(), newest.len().min(50));
    assert!(
        newest.iter().any(|e| shown_events.contains(e)),
        "{shown_events:?} vs {newest:?}"
    );

    // No token in any URL, nothing but the tab's sessionStorage holds it, no page errors.
    for url in seen["requests"].as_array().unwrap() {
        let url = url.as_str().unwrap();
        assert!(!url.contains(&admin.token), "token in {url}");
        assert!(!url.to_lowercase().contains("token"), "{url}");
    }
    assert_eq!(seen["storage"]["local"], 0);
    assert_eq!(seen["storage"]["cookies"], "");
    assert_eq!(
        seen["storage"]["session"],
        serde_json::json!(["cmb.console.token", "cmb.console.who"])
    );
    assert_eq!(seen["signedOut"]["session"], 0);
    assert_eq!(
        seen["problems"],
        serde_json::json!([]),
        "script errors or CSP violations"
    );
    for page in [
        "signin",
        "live",
        "calls",
        "call",
        "users",
        "user-banned",
        "user",
        "analytics",
        "events",
    ] {
        let png = std::fs::read(shots.join(format!("{page}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{page}.png");
    }
}

async fn get(api: &ApiClient, admin: &TestUser, path: &str) -> Value {
    let r = api.get(path, Some(&admin.token)).await.unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.body
}

/// The `data-id`s of a table's rows as the browser saw them.
fn ids(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The cells' text of a table's rows as the browser saw them.
fn rows(rows: &Value) -> Vec<Vec<String>> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["cells"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

fn numbers(values: &Value) -> Vec<i64> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as i64)
        .collect()
}

/// Runs `tests/console/drive.mjs` in Chromium; what the pages showed.
async fn drive(
    v: &VoiceStack,
    admin: &TestUser,
    user: &TestUser,
    call_id: &str,
    shots: &Path,
) -> Value {
    harness::run_node_script(
        "tests/console/drive.mjs",
        &[
            ("CONSOLE_URL", format!("{}/admin", v.stack.worker_url())),
            ("ADMIN_EMAIL", admin.email.clone()),
            ("ADMIN_PASSWORD", admin.password.clone()),
            ("USER_EMAIL", user.email.clone()),
            ("USER_PASSWORD", user.password.clone()),
            ("USER_ID", user.id.clone()),
            ("CALL_ID", call_id.to_owned()),
            ("SHOTS", shots.display().to_string()),
            ("CHROMIUM", CHROMIUM.to_owned()),
        ],
        Duration::from_secs(180),
    )
    .await
}
