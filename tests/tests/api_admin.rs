//! The admin API beyond `api_operators.rs` and `api_analytics.rs`, against the real
//! Worker under `wrangler dev`: analytics over a seeded history that straddles UTC
//! midnights (including a timestamp written with a `+02:00` offset), with hand-computed
//! per-day totals, p95 latency, revenue, refunds and margins; a call's economics as an
//! admin sees it; the exact audit record of grants and bans; idempotent grants; and the
//! full persona catalog.
//!
//! The history is written straight into the Worker's database (the local D1 file, or
//! the Postgres database of a `CMB_DB_BACKEND=postgres` run) in March 2021, so nothing
//! the other tests do today can fall into its range.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Once;

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::harness;
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

/// March 2021, portable SQL. Calls belong to the UTC day they were answered, else due,
/// else requested. Per day (hand-computed):
///
/// - 2021-03-01: a1 (completed 61 s → 2 min, 105 cr), a3 (busy), a5 (completed 120 s →
///   2 min, 105 cr; answered at 01:30+02:00 = 23:30Z on the 1st) → 3 calls, 181 s,
///   4 min, 210 cr. Costs: twilio 52,000 + llm 100 + elevenlabs 63,000 = 115,100 µ$.
///   Latencies 300, 500, 700, 900, 1100 → avg 700, p95 1100. Sales: starter, $5.
/// - 2021-03-02: a2 (requested 23:59:30 on the 1st, answered 00:00:10 on the 2nd;
///   completed 30 s → 1 min, 65 cr), a4 (failed; due on the 2nd, requested in
///   February) → 2 calls, 30 s, 1 min, 65 cr. Costs: twilio 13,000 + deepgram 2,150 =
///   15,150 µ$. Latencies 100..2000 step 100 → avg 1050, p95 1900. Sales: plus, $10;
///   refund $5 of which 300 credits taken and 200 left as debt.
/// - Outside: a6 at 2021-03-03T00:00:00Z and a7 at 2021-02-28T23:59:59.999Z, a paid
///   purchase at 2021-03-03T00:00:00Z, an unpaid one.
const SEED: &str = "
INSERT INTO users (id, email, name, password_hash, created_at, updated_at) VALUES
 ('seed-user', 'seed-analytics@example.com', 'Seed', 'x', '2021-02-01T00:00:00.000Z', '2021-02-01T00:00:00.000Z');
INSERT INTO calls (id, user_id, persona_id, phone_number, status, scheduled_time, started_at, duration_seconds, cost_cents, created_at, updated_at) VALUES
 ('seed-a1', 'seed-user', 'brad', '+14155550100', 'completed', NULL, '2021-03-01T10:00:05.000Z', 61, 105, '2021-03-01T10:00:00.000Z', '2021-03-01T10:02:00.000Z'),
 ('seed-a2', 'seed-user', 'brad', '+14155550100', 'completed', NULL, '2021-03-02T00:00:10.000Z', 30, 65, '2021-03-01T23:59:30.000Z', '2021-03-02T00:01:00.000Z'),
 ('seed-a3', 'seed-user', 'brad', '+14155550100', 'busy', NULL, NULL, 0, 0, '2021-03-01T12:00:00.000Z', '2021-03-01T12:00:30.000Z'),
 ('seed-a4', 'seed-user', 'brad', '+14155550100', 'failed', '2021-03-02T08:00:00.000Z', NULL, NULL, NULL, '2021-02-20T00:00:00.000Z', '2021-03-02T08:00:01.000Z'),
 ('seed-a5', 'seed-user', 'brad', '+14155550100', 'completed', NULL, '2021-03-02T01:30:00+02:00', 120, 105, '2021-03-01T23:00:00.000Z', '2021-03-01T23:32:00.000Z'),
 ('seed-a6', 'seed-user', 'brad', '+14155550100', 'completed', NULL, '2021-03-03T00:00:00.000Z', 60, 65, '2021-03-03T00:00:00.000Z', '2021-03-03T00:01:00.000Z'),
 ('seed-a7', 'seed-user', 'brad', '+14155550100', 'completed', NULL, '2021-02-28T23:59:59.999Z', 10, 65, '2021-02-28T23:59:00.000Z', '2021-03-01T00:00:10.000Z');
INSERT INTO call_costs (call_id, provider, quantity, unit, cost_micros) VALUES
 ('seed-a1', 'twilio', 2, 'minutes', 26000),
 ('seed-a1', 'llm', 1000, 'tokens', 100),
 ('seed-a1', 'elevenlabs', 420, 'characters', 63000),
 ('seed-a2', 'twilio', 1, 'minutes', 13000),
 ('seed-a2', 'deepgram', 0.5, 'minutes', 2150),
 ('seed-a5', 'twilio', 2, 'minutes', 26000),
 ('seed-a6', 'twilio', 1, 'minutes', 13000),
 ('seed-a7', 'twilio', 1, 'minutes', 13000);
INSERT INTO call_turn_latencies (call_id, turn, end_of_turn_to_first_audio_ms, llm_first_token_ms, created_at) VALUES
 ('seed-a1', 1, 500, 200, '2021-03-01T10:00:10.000Z'),
 ('seed-a1', 2, 700, 200, '2021-03-01T10:00:20.000Z'),
 ('seed-a1', 3, 900, 200, '2021-03-01T10:00:30.000Z'),
 ('seed-a1', 4, 1100, 200, '2021-03-01T10:00:40.000Z'),
 ('seed-a5', 1, 300, 100, '2021-03-01T23:30:10.000Z'),
 ('seed-a5', 2, NULL, 100, '2021-03-01T23:30:20.000Z'),
 ('seed-a6', 1, 99999, 100, '2021-03-03T00:00:10.000Z'),
 ('seed-a2', 1, 100, 50, '2021-03-02T00:00:11.000Z'), ('seed-a2', 2, 200, 50, '2021-03-02T00:00:12.000Z'),
 ('seed-a2', 3, 300, 50, '2021-03-02T00:00:13.000Z'), ('seed-a2', 4, 400, 50, '2021-03-02T00:00:14.000Z'),
 ('seed-a2', 5, 500, 50, '2021-03-02T00:00:15.000Z'), ('seed-a2', 6, 600, 50, '2021-03-02T00:00:16.000Z'),
 ('seed-a2', 7, 700, 50, '2021-03-02T00:00:17.000Z'), ('seed-a2', 8, 800, 50, '2021-03-02T00:00:18.000Z'),
 ('seed-a2', 9, 900, 50, '2021-03-02T00:00:19.000Z'), ('seed-a2', 10, 1000, 50, '2021-03-02T00:00:20.000Z'),
 ('seed-a2', 11, 1100, 50, '2021-03-02T00:00:21.000Z'), ('seed-a2', 12, 1200, 50, '2021-03-02T00:00:22.000Z'),
 ('seed-a2', 13, 1300, 50, '2021-03-02T00:00:23.000Z'), ('seed-a2', 14, 1400, 50, '2021-03-02T00:00:24.000Z'),
 ('seed-a2', 15, 1500, 50, '2021-03-02T00:00:25.000Z'), ('seed-a2', 16, 1600, 50, '2021-03-02T00:00:26.000Z'),
 ('seed-a2', 17, 1700, 50, '2021-03-02T00:00:27.000Z'), ('seed-a2', 18, 1800, 50, '2021-03-02T00:00:28.000Z'),
 ('seed-a2', 19, 1900, 50, '2021-03-02T00:00:29.000Z'), ('seed-a2', 20, 2000, 50, '2021-03-02T00:00:30.000Z');
INSERT INTO purchases (id, user_id, pack, credits, amount_cents, currency, status, payment_intent, created_at, paid_at, updated_at) VALUES
 ('cs_seed_1', 'seed-user', 'starter', 500, 500, 'usd', 'paid', 'pi_seed_1', '2021-03-01T08:59:00.000Z', '2021-03-01T09:00:00.000Z', '2021-03-01T09:00:00.000Z'),
 ('cs_seed_2', 'seed-user', 'plus', 1200, 1000, 'usd', 'refunded', 'pi_seed_2', '2021-03-02T23:59:00.000Z', '2021-03-02T23:59:59.999Z', '2021-03-02T23:59:59.999Z'),
 ('cs_seed_3', 'seed-user', 'pro', 3000, 2000, 'usd', 'open', NULL, '2021-03-02T10:00:00.000Z', NULL, '2021-03-02T10:00:00.000Z'),
 ('cs_seed_4', 'seed-user', 'starter', 500, 500, 'usd', 'paid', 'pi_seed_4', '2021-03-02T23:59:59.000Z', '2021-03-03T00:00:00.000Z', '2021-03-03T00:00:00.000Z');
INSERT INTO payment_refunds (id, charge_id, purchase_id, user_id, refunded_cents, credits_due, credits_taken, created_at) VALUES
 ('ch_seed_1:500', 'ch_seed_1', 'cs_seed_1', 'seed-user', 500, 500, 300, '2021-03-02T12:00:00.000Z');
";

/// The Worker's local D1 file (the one database file of the D1 object's directory).
fn d1_file() -> PathBuf {
    let dir = harness::worker()
        .stack()
        .dir()
        .join("state/v3/d1/miniflare-D1DatabaseObject");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "sqlite")
                && p.file_name().is_some_and(|n| n != "metadata.sqlite")
        })
        .collect();
    assert_eq!(files.len(), 1, "one D1 database in {}", dir.display());
    files.remove(0)
}

/// Writes [`SEED`] once per test binary into whichever database the Worker uses.
fn seed_history() {
    static SEEDED: Once = Once::new();
    SEEDED.call_once(|| match &harness::worker().postgres_url {
        Some(url) => {
            let out = std::process::Command::new("psql")
                .arg(url)
                .args(["-v", "ON_ERROR_STOP=1", "-q", "-1", "-c", SEED])
                .output()
                .expect("run psql");
            assert!(
                out.status.success(),
                "seeding Postgres: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => {
            let db = rusqlite::Connection::open(d1_file()).unwrap();
            db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
            db.execute_batch(&format!("BEGIN; {SEED} COMMIT;")).unwrap();
        }
    });
}

async fn analytics(api: &ApiClient, admin: &TestUser, report: &str) -> Value {
    let r = api
        .get(
            &format!("/admin/analytics/{report}?from=2021-03-01&to=2021-03-02"),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{report}: {}", r.body);
    assert_eq!(r.body["days"].as_array().unwrap().len(), 2, "{}", r.body);
    r.body
}

/// Calls per day split at UTC midnight (an offset timestamp lands on its UTC day),
/// minutes, credits and average / p95 latency match the hand-computed values.
#[tokio::test]
async fn call_analytics_split_days_in_utc() {
    seed_history();
    let api = client();
    let admin = harness::admin(&api).await;
    let r = analytics(&api, &admin, "calls").await;
    let (d1, d2, t) = (&r["days"][0], &r["days"][1], &r["totals"]);
    assert_eq!(d1["day"], "2021-03-01");
    assert_eq!(d1["calls"], 3, "{r}");
    assert_eq!(d1["by_status"], json!({ "completed": 2, "busy": 1 }));
    assert_eq!(
        (
            &d1["duration_seconds"],
            &d1["billed_minutes"],
            &d1["credits_charged"]
        ),
        (&json!(181), &json!(4), &json!(210))
    );
    assert_eq!(
        d1["latency"],
        json!({ "turns": 5, "avg_ms": 700.0, "p95_ms": 1100 })
    );
    assert_eq!(d2["day"], "2021-03-02");
    assert_eq!(d2["by_status"], json!({ "completed": 1, "failed": 1 }));
    assert_eq!(
        (
            &d2["duration_seconds"],
            &d2["billed_minutes"],
            &d2["credits_charged"]
        ),
        (&json!(30), &json!(1), &json!(65))
    );
    assert_eq!(
        d2["latency"],
        json!({ "turns": 20, "avg_ms": 1050.0, "p95_ms": 1900 })
    );
    assert_eq!(t["calls"], 5);
    assert_eq!(
        t["by_status"],
        json!({ "completed": 3, "busy": 1, "failed": 1 })
    );
    assert_eq!(t["credits_charged"], 275);
    assert_eq!(
        t["latency"],
        json!({ "turns": 25, "avg_ms": 980.0, "p95_ms": 1900 })
    );
}

/// Provider costs per day and provider, against call revenue, give the hand-computed
/// gross margins.
#[tokio::test]
async fn cost_analytics_give_the_margin() {
    seed_history();
    let api = client();
    let admin = harness::admin(&api).await;
    let r = analytics(&api, &admin, "costs").await;
    let (d1, d2, t) = (&r["days"][0], &r["days"][1], &r["totals"]);
    assert_eq!(d1["providers"]["twilio"]["cost_micros"], 52_000, "{r}");
    assert_eq!(d1["providers"]["twilio"]["quantity"], 4.0);
    assert_eq!(d1["providers"]["elevenlabs"]["cost_micros"], 63_000);
    assert_eq!(d1["providers"]["deepgram"]["cost_micros"], 0);
    assert_eq!(d1["cost_micros"], 115_100);
    assert_eq!(d1["revenue_micros"], 2_100_000);
    assert_eq!(d1["gross_margin_micros"], 1_984_900);
    assert_eq!(d1["gross_margin_pct"], 94.52);
    assert_eq!(d2["cost_micros"], 15_150);
    assert_eq!(d2["providers"]["deepgram"]["quantity"], 0.5);
    assert_eq!(d2["gross_margin_micros"], 634_850);
    assert_eq!(d2["gross_margin_pct"], 97.67);
    assert_eq!(t["cost_micros"], 130_250);
    assert_eq!(t["revenue_credits"], 275);
    assert_eq!(t["gross_margin_micros"], 2_619_750);
    assert_eq!(t["gross_margin_pct"], 95.26);
}

/// Sales, refunds, debt and call revenue per day; a purchase paid at 23:59:59.999 is
/// on its day, one paid at midnight on the next, an unpaid one nowhere.
#[tokio::test]
async fn revenue_analytics_count_sales_and_refunds() {
    seed_history();
    let api = client();
    let admin = harness::admin(&api).await;
    let r = analytics(&api, &admin, "revenue").await;
    assert_eq!(
        r["days"][0],
        json!({
            "day": "2021-03-01", "purchases": 1, "credits_sold": 500, "sales_usd_cents": 500,
            "refunds": 0, "refunded_usd_cents": 0, "credits_refunded": 0, "debt_credits": 0,
            "net_sales_usd_cents": 500, "call_revenue_credits": 210, "call_revenue_usd_cents": 210,
        })
    );
    assert_eq!(
        r["days"][1],
        json!({
            "day": "2021-03-02", "purchases": 1, "credits_sold": 1200, "sales_usd_cents": 1000,
            "refunds": 1, "refunded_usd_cents": 500, "credits_refunded": 300, "debt_credits": 200,
            "net_sales_usd_cents": 500, "call_revenue_credits": 65, "call_revenue_usd_cents": 65,
        })
    );
    assert_eq!(r["totals"]["net_sales_usd_cents"], 1000);
    assert_eq!(r["totals"]["credits_sold"], 1700);
}

/// An admin sees any call with its owner, transcript, latencies, and what it cost us
/// per provider against what it earned.
#[tokio::test]
async fn admin_call_detail_shows_its_economics() {
    seed_history();
    let api = client();
    let admin = harness::admin(&api).await;
    let r = api
        .get("/admin/calls/seed-a1", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["call"]["user_email"], "seed-analytics@example.com");
    let costs = &r.body["costs"];
    assert_eq!(costs["credits_charged"], 105);
    assert_eq!(costs["total_cost_micros"], 89_100);
    assert_eq!(costs["revenue_micros"], 1_050_000);
    assert_eq!(costs["margin_micros"], 960_900);
    assert_eq!(costs["providers"].as_array().unwrap().len(), 3);
    assert_eq!(r.body["latencies"].as_array().unwrap().len(), 4);
    let list = api
        .get(
            "/admin/calls?user_id=seed-user&limit=100",
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(list.body["total"], 7, "{}", list.body);
    let users = api
        .get("/admin/users?q=seed-analytics", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(users.body["users"][0]["debt"], 200, "{}", users.body);
}

/// A grant's audit row holds the exact balance before and after, the actor and the
/// reason; the same Idempotency-Key grants once; a deduction past the balance is 409
/// and changes nothing.
#[tokio::test]
async fn grants_are_audited_exactly_and_idempotent() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("audited").await.unwrap();
    let path = format!("/admin/users/{}/credits", user.id);
    let body =
        serde_json::to_vec(&json!({ "amount": 250, "reason": "apology for an outage" })).unwrap();
    for replay in [false, true] {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", api.base()))
            .bearer_auth(&admin.token)
            .header("content-type", "application/json")
            .header("Idempotency-Key", "outage-2021-03")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let r: Value = r.json().await.unwrap();
        assert_eq!(r["replayed"], replay, "{r}");
        assert_eq!(r["user"]["credits"], 450);
    }
    let r = api
        .post(
            &path,
            Some(&admin.token),
            &json!({ "amount": -451, "reason": "too much" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.code(), Some("insufficient_credits"));
    let r = api
        .post(
            &path,
            Some(&admin.token),
            &json!({ "amount": -50, "reason": "correction" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api.credits(&user).await.unwrap(), 400);

    let audit = api
        .get(
            &format!("/admin/audit?target_id={}", user.id),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(
        audit.body["total"], 2,
        "one row per applied change: {}",
        audit.body
    );
    let entry = |action: &str| {
        audit.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("no {action} in {}", audit.body))
            .clone()
    };
    let (grant, deduct) = (entry("credits.grant"), entry("credits.deduct"));
    assert_eq!(grant["action"], "credits.grant");
    assert_eq!(grant["actor"], harness::ADMIN_EMAIL);
    assert_eq!(grant["actor_id"], admin.id.as_str());
    assert_eq!(grant["reason"], "apology for an outage");
    assert_eq!(grant["before"], json!({ "credits": 200 }));
    assert_eq!(grant["after"]["credits"], 450);
    assert_eq!(deduct["action"], "credits.deduct");
    assert_eq!(deduct["before"], json!({ "credits": 450 }));
    assert_eq!(deduct["after"]["credits"], 400);
}

/// Ban and unban are audited with the state before and after; banning yourself is
/// refused; the user list shows the flag.
#[tokio::test]
async fn bans_are_audited_and_never_self_inflicted() {
    let api = client();
    let admin = harness::admin(&api).await;
    let r = api
        .post(
            &format!("/admin/users/{}/ban", admin.id),
            Some(&admin.token),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.code(), Some("cannot_ban_self"));

    let user = api.register_user("troll").await.unwrap();
    let r = api.ban(&admin, &user.id, "abuse").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["is_banned"], true);
    let label = &user.email[..user.email.find('@').unwrap()];
    let listed = api
        .get(&format!("/admin/users?q={label}"), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(
        listed.body["users"][0]["is_banned"], true,
        "{}",
        listed.body
    );
    api.post(
        &format!("/admin/users/{}/unban", user.id),
        Some(&admin.token),
        &json!({}),
    )
    .await
    .unwrap();

    let audit = api
        .get(
            &format!("/admin/audit?target_id={}", user.id),
            Some(&admin.token),
        )
        .await
        .unwrap();
    let entries = audit.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{}", audit.body);
    let entry = |action: &str| entries.iter().find(|e| e["action"] == action).unwrap();
    let (ban, unban) = (entry("user.ban"), entry("user.unban"));
    assert_eq!(ban["reason"], "abuse");
    assert_eq!(ban["before"], json!({ "is_banned": false }));
    assert_eq!(ban["after"], json!({ "is_banned": true }));
    assert_eq!(unban["before"], json!({ "is_banned": true }));
    assert_eq!(unban["after"], json!({ "is_banned": false }));
}

/// The admin catalog lists retired personas, which the public catalog hides.
#[tokio::test]
async fn admin_catalog_includes_retired_personas() {
    let api = client();
    let admin = harness::admin(&api).await;
    let created = api
        .post(
            "/api/personas",
            Some(&admin.token),
            &json!({
                "name": "Retiree", "system_prompt": "You are retired.",
                "greeting": "Hello from retirement.", "voice_id": "voice_1"
            }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["persona"]["id"].as_str().unwrap().to_string();
    let deleted = api
        .delete(&format!("/api/personas/{id}"), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);

    let public = api.get("/api/personas", None).await.unwrap();
    assert!(!public.body.to_string().contains(&id));
    let all = api
        .get("/admin/personas", Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(all.status, 200, "{}", all.body);
    let retired = all.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id.as_str())
        .expect("retired persona listed for admins");
    assert_eq!(retired["is_active"], false);
}
