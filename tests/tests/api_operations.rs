//! The operators' event log and the MCP server, against the real Worker (D1, and
//! Postgres in the `api_*` Postgres pass): events written by admin actions, refused
//! webhooks and calls; the relay's batches; the cron's prune; `POST /mcp` by hand (the
//! protocol's edges) and through the official MCP TypeScript SDK (`tests/mcp/client.mjs`).

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmb_tests::api::{ApiClient, Reply};
use cmb_tests::harness;
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

/// `POST /mcp` with one JSON-RPC message, as an MCP client sends it.
async fn rpc(api: &ApiClient, token: Option<&str>, message: &Value) -> Reply {
    api.raw(
        reqwest::Method::POST,
        "/mcp",
        token,
        Some(("application/json", serde_json::to_vec(message).unwrap())),
    )
    .await
    .unwrap()
}

async fn events(api: &ApiClient, token: &str, query: &str) -> Value {
    let r = api
        .get(&format!("/admin/events?{query}"), Some(token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    r.body
}

fn kinds(events: &Value) -> Vec<&str> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect()
}

/// Ban, unban and a credit grant are events naming the user, the admin and the reason,
/// beside their audit rows; the search filters by user, kind prefix and level.
#[tokio::test]
async fn admin_actions_are_events() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("evented").await.unwrap();
    let path = |what: &str| format!("/admin/users/{}/{what}", user.id);
    for (what, body) in [
        ("ban", json!({ "reason": "abuse report 17" })),
        ("unban", json!({})),
        ("credits", json!({ "amount": 25, "reason": "goodwill" })),
    ] {
        let r = api
            .post(&path(what), Some(&admin.token), &body)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{what}: {}", r.body);
    }
    let found = events(
        &api,
        &admin.token,
        &format!("user_id={}&kind=admin.", user.id),
    )
    .await;
    assert_eq!(found["total"], 3, "{found}");
    // Newest first.
    assert_eq!(kinds(&found), ["admin.credits", "admin.unban", "admin.ban"]);
    let ban = &found["events"][2];
    assert_eq!(ban["body"]["reason"], "abuse report 17");
    assert_eq!(ban["body"]["by"], admin.id.as_str());
    assert_eq!(ban["source"], "worker");
    assert!(ban["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(found["events"][0]["body"]["amount"], 25);
    // Admin actions are info: a search for warnings and up finds none of them.
    let warn = events(
        &api,
        &admin.token,
        &format!("user_id={}&level=warn", user.id),
    )
    .await;
    assert_eq!(warn["total"], 0, "{warn}");
    // Free text finds the reason, case-insensitively.
    let text = events(&api, &admin.token, &format!("user_id={}&q=ABUSE", user.id)).await;
    assert_eq!(kinds(&text), ["admin.ban"]);
}

/// A webhook with a forged signature is refused and is a warning event carrying the
/// refused request's id; the search's bad input is a 400 that names the field.
#[tokio::test]
async fn refused_webhooks_are_events_and_bad_searches_are_400() {
    let api = client();
    let admin = harness::admin(&api).await;
    let r = api
        .raw(
            reqwest::Method::POST,
            "/api/voice/status",
            None,
            Some((
                "application/x-www-form-urlencoded",
                b"CallSid=CAforged&CallStatus=completed".to_vec(),
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let request_id = r.body["error"]["request_id"].as_str().unwrap().to_owned();
    let found = events(
        &api,
        &admin.token,
        "kind=webhook.refused&level=warn&limit=200",
    )
    .await;
    let event = found["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no event for {request_id}: {found}"));
    assert_eq!(event["level"], "warn");
    assert_eq!(event["body"]["path"], "/api/voice/status");
    assert_eq!(event["body"]["status"], 403);

    for (query, field) in [
        ("level=debug", "level"),
        ("kind=Bad", "kind"),
        ("from=yesterday", "from"),
        ("limit=0", "limit"),
        ("from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z", "from"),
    ] {
        let r = api
            .get(&format!("/admin/events?{query}"), Some(&admin.token))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.body["error"]["details"][0]["field"], field, "{query}");
    }
    let user = api.register_user("nosy").await.unwrap();
    let r = api.get("/admin/events", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 403);
}

/// The relay's batch is stored all or none: its events as `relay.<kind>` with the call,
/// what it dropped as one more event; a wrong secret and an info event are refused.
#[tokio::test]
async fn relay_batches_are_stored_whole_or_refused() {
    let api = client();
    let admin = harness::admin(&api).await;
    let call_id = uuid::Uuid::new_v4().to_string();
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() as u64 * 1000;
    let batch = |level: &str| {
        json!({ "events": [
            { "at_ms": now_ms, "level": "warn", "kind": "provider_reconnect", "call_id": call_id,
              "fields": { "provider": "deepgram", "attempt": 2, "transcript": "never stored" } },
            { "at_ms": now_ms, "level": level, "kind": "tts_failed", "call_id": call_id },
        ], "dropped": 4 })
    };
    let send = |secret: &'static str, body: Value| {
        let api = api.clone();
        async move {
            api.raw(
                reqwest::Method::POST,
                "/internal/relay/events",
                Some(secret),
                Some(("application/json", serde_json::to_vec(&body).unwrap())),
            )
            .await
            .unwrap()
        }
    };
    let r = send("not-the-relay-secret", batch("error")).await;
    assert_eq!(r.status, 401);
    let r = send(harness::RELAY_SECRET, batch("info")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["details"][0]["field"], "events[1].level");
    let none = events(&api, &admin.token, &format!("call_id={call_id}")).await;
    assert_eq!(none["total"], 0, "a refused batch stores nothing: {none}");

    let r = send(harness::RELAY_SECRET, batch("error")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["stored"], 3);
    let found = events(
        &api,
        &admin.token,
        &format!("call_id={call_id}&kind=relay."),
    )
    .await;
    let mut got = kinds(&found);
    got.sort_unstable();
    assert_eq!(got, ["relay.provider_reconnect", "relay.tts_failed"]);
    let reconnect = found["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "relay.provider_reconnect")
        .unwrap();
    assert_eq!(reconnect["source"], "relay");
    assert_eq!(
        reconnect["body"],
        json!({ "provider": "deepgram", "attempt": 2 })
    );
    let dropped = events(&api, &admin.token, "kind=relay.events_dropped&limit=200").await;
    assert!(
        dropped["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["body"]["dropped"] == 4),
        "{dropped}"
    );
}

/// The cron prunes events past `EVENT_RETENTION_DAYS` (30 by default) and keeps newer
/// ones, and says what it did as an event.
#[tokio::test]
async fn the_cron_prunes_old_events() {
    let api = client();
    let admin = harness::admin(&api).await;
    let worker = harness::worker();
    let (old, recent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let ago = |days: i64| {
        (time::OffsetDateTime::now_utc() - time::Duration::days(days))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let insert = |id: &uuid::Uuid, at: &str| {
        format!(
            "INSERT INTO events (id, created_at, level_rank, kind, source, call_id, user_id, request_id, body_json) \
             VALUES ('{id}', '{at}', 2, 'test.seeded', 'worker', NULL, NULL, NULL, '{{}}')"
        )
    };
    let (old_at, recent_at) = (ago(31), ago(29));
    let seed = format!("{}; {}", insert(&old, &old_at), insert(&recent, &recent_at));
    tokio::task::spawn_blocking(move || worker.stack().execute_sql(&seed))
        .await
        .unwrap()
        .unwrap();
    let seeded = events(&api, &admin.token, "kind=test.seeded&limit=200").await;
    let ids: Vec<&str> = seeded["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&old.to_string().as_str()), "{seeded}");

    let cron = reqwest::get(format!(
        "{}/__scheduled?cron=17+3+*+*+*",
        harness::worker().url()
    ))
    .await
    .unwrap();
    assert!(cron.status().is_success(), "{}", cron.status());
    let after = events(&api, &admin.token, "kind=test.seeded&limit=200").await;
    let ids: Vec<&str> = after["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&old.to_string().as_str()),
        "31 days old: pruned: {after}"
    );
    assert!(
        ids.contains(&recent.to_string().as_str()),
        "29 days old: kept: {after}"
    );
    let pruned = events(&api, &admin.token, "kind=events.pruned").await;
    let last = &pruned["events"][0];
    assert!(last["body"]["pruned"].as_i64().unwrap() >= 1, "{pruned}");
    assert_eq!(last["body"]["retention_days"], 30);
}

/// The transport's edges by hand: the 401 challenge, 403 for a non-admin, 202 for a
/// notification, and JSON-RPC errors for bad JSON, unknown methods and tools.
#[tokio::test]
async fn mcp_speaks_json_rpc_and_needs_an_admin() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("not-an-operator").await.unwrap();
    let init = json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": { "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": { "name": "by-hand", "version": "0" } } });

    // The challenge header, which the shared client does not expose: plain reqwest.
    let anon = reqwest::Client::new()
        .post(format!("{}/mcp", harness::worker().url()))
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let challenge = anon.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert_eq!(rpc(&api, None, &init).await.status, 401);
    assert_eq!(rpc(&api, Some(&user.token), &init).await.status, 403);

    let r = rpc(&api, Some(&admin.token), &init).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["id"], 1);
    assert_eq!(r.body["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(
        r.body["result"]["capabilities"]["tools"]["listChanged"],
        false
    );

    let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
    assert_eq!(rpc(&api, Some(&admin.token), &note).await.status, 202);

    let code = |r: &Reply| r.body["error"]["code"].as_i64();
    let unknown = json!({ "jsonrpc": "2.0", "id": "u", "method": "resources/list" });
    let r = rpc(&api, Some(&admin.token), &unknown).await;
    assert_eq!((code(&r), r.body["id"].clone()), (Some(-32601), json!("u")));
    let tool = json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                       "params": { "name": "drop_tables", "arguments": {} } });
    assert_eq!(
        code(&rpc(&api, Some(&admin.token), &tool).await),
        Some(-32602)
    );
    let bad_args = json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/call",
                           "params": { "name": "list_calls", "arguments": { "limit": 1000 } } });
    assert_eq!(
        code(&rpc(&api, Some(&admin.token), &bad_args).await),
        Some(-32602)
    );
    let r = api
        .raw(
            reqwest::Method::POST,
            "/mcp",
            Some(&admin.token),
            Some(("application/json", b"{\"jsonrpc\": \"2.0\", ".to_vec())),
        )
        .await
        .unwrap();
    assert_eq!((r.status, code(&r)), (200, Some(-32700)));

    let old = reqwest::Client::new()
        .post(format!("{}/mcp", harness::worker().url()))
        .bearer_auth(&admin.token)
        .header("mcp-protocol-version", "2024-11-05")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 400);
}

/// The official MCP TypeScript SDK connects, lists the four tools with their schemas, and
/// calls each; its results (checked by the SDK against each tool's output schema) agree
/// with the admin API.
#[tokio::test]
async fn an_mcp_sdk_client_uses_every_tool() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("mcp-caller").await.unwrap();
    let call_id = api
        .trigger_call(&user, "sarah", &cmb_tests::api::fresh_number())
        .await
        .unwrap();
    api.wait_settled(&user, &call_id, Duration::from_secs(30))
        .await
        .unwrap();
    let r = api
        .post(
            &format!("/admin/users/{}/ban", user.id),
            Some(&admin.token),
            &json!({ "reason": "mcp test" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let calls = json!([
        { "name": "list_calls", "arguments": { "user_id": user.id } },
        { "name": "get_call", "arguments": { "call_id": call_id } },
        { "name": "search_logs", "arguments": { "user_id": user.id, "kind": "admin." } },
        { "name": "analytics_summary", "arguments": {} },
        { "name": "get_call", "arguments": { "call_id": "00000000-0000-4000-8000-000000000000" } },
    ]);
    let out = run_sdk_client(&admin.token, &calls).await;

    let names: Vec<&str> = out["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["list_calls", "get_call", "search_logs", "analytics_summary"]
    );
    for t in out["tools"].as_array().unwrap() {
        assert_eq!(t["inputSchema"]["type"], "object", "{t}");
        assert_eq!(t["outputSchema"]["type"], "object", "{t}");
    }
    assert_eq!(out["serverVersion"]["name"], "call-me-back");
    let results = out["results"].as_array().unwrap();
    for r in &results[..4] {
        assert_eq!(r["isError"], false, "{r}");
    }

    let listed = &results[0]["structuredContent"];
    let admin_list = api
        .get(
            &format!("/admin/calls?user_id={}", user.id),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(listed["total"], admin_list.body["total"]);
    assert_eq!(listed["calls"][0]["id"], call_id.as_str());

    let got = &results[1]["structuredContent"];
    let detail = api
        .get(&format!("/admin/calls/{call_id}"), Some(&admin.token))
        .await
        .unwrap();
    for field in ["call", "transcript", "costs", "latencies", "ledger"] {
        // Through JavaScript, 1.0 comes back as 1: compare numbers as numbers.
        assert_eq!(
            numeric(&got[field]),
            numeric(&detail.body[field]),
            "get_call {field}"
        );
    }
    let status_events: Vec<&Value> = got["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "call.status")
        .collect();
    assert!(
        status_events.iter().any(|e| e["body"]["final"] == true),
        "the final record is an event: {}",
        got["events"]
    );
    assert!(status_events
        .iter()
        .all(|e| e["call_id"] == call_id.as_str()));

    let logs = &results[2]["structuredContent"];
    assert_eq!(logs["total"], 1, "{logs}");
    assert_eq!(logs["events"][0]["kind"], "admin.ban");

    let summary = &results[3]["structuredContent"];
    let report = api
        .get("/admin/analytics/calls", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(summary["from"], report.body["from"]);
    assert!(summary["calls"].as_i64().unwrap() >= 1, "{summary}");
    let costs = api
        .get("/admin/analytics/costs", Some(&admin.token))
        .await
        .unwrap();
    assert!(
        summary["provider_cost_micros"].as_i64().unwrap()
            >= detail.body["costs"]["total_cost_micros"].as_i64().unwrap()
    );
    assert!(costs.body["totals"]["cost_micros"].as_i64().is_some());

    // A call that does not exist is the tool's own failure, not a protocol error.
    assert_eq!(results[4]["isError"], true, "{}", results[4]);
}

/// `v` with every number as an f64.
fn numeric(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => a.iter().map(numeric).collect(),
        Value::Object(o) => o.iter().map(|(k, v)| (k.clone(), numeric(v))).collect(),
        other => other.clone(),
    }
}

/// Runs `tests/mcp/client.mjs` (the SDK client) against this binary's Worker.
async fn run_sdk_client(token: &str, calls: &Value) -> Value {
    let repo = xtask::repo::Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let sdk = repo.node_modules().join("@modelcontextprotocol/sdk");
    assert!(
        sdk.is_dir(),
        "{} is missing: run `cargo xtask setup` (npm ci installs the MCP SDK)",
        sdk.display()
    );
    harness::run_node_script(
        "tests/mcp/client.mjs",
        &[
            ("MCP_URL", format!("{}/mcp", harness::worker().url())),
            ("MCP_TOKEN", token.to_owned()),
            ("MCP_CALLS", calls.to_string()),
        ],
        Duration::from_secs(60),
    )
    .await
}
