//! The user controls their data, against the real Worker under `wrangler dev`: the export
//! (`GET /api/me/export`) holds everything of the account and nothing of anyone else's,
//! and the erasure (`DELETE /api/me`) leaves an account nobody can sign in to, whose
//! pending calls never dial, whose calls keep their accounting without the number, and
//! whose email is free again. A voice-stack test covers transcripts and memories, which
//! only a real conversation produces.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cmb_tests::api::{ApiClient, TestUser};
use cmb_tests::fakes::twilio::CalleeScript;
use cmb_tests::harness::{self, VoiceStack};
use cmb_tests::sim::{SimScript, Step};
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

/// A phone number no other test uses.
fn unique_number() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 10_000_000;
    format!("+1415{n:07}")
}

fn rfc3339_in(secs: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn custom_persona(name: &str) -> Value {
    json!({
        "name": name,
        "description": "A persona of one account only.",
        "system_prompt": "You are a patient piano teacher. Keep replies short.",
        "greeting": "Ready for scales?",
        "voice_id": "21m00Tcm4TlvDq8ikWAM",
    })
}

/// `GET /api/me/export` with the raw response, for its headers.
async fn export_raw(api: &ApiClient, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/api/me/export", api.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn export(api: &ApiClient, user: &TestUser) -> Value {
    let r = api.get("/api/me/export", Some(&user.token)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["export"].clone()
}

async fn erase(api: &ApiClient, token: &str) -> cmb_tests::api::Reply {
    api.delete("/api/me", Some(token)).await.unwrap()
}

/// Polls the owner's view of call `id` until its status is one of `want`.
async fn wait_status(api: &ApiClient, user: &TestUser, id: &str, want: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let r = api
            .get(&format!("/api/calls/{id}"), Some(&user.token))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        if want.iter().any(|w| r.body["call"]["status"] == *w) {
            return r.body;
        }
        assert!(Instant::now() < deadline, "call {id} stuck: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`furnish`] gave an account, by id.
struct Furnished {
    number: String,
    persona_id: String,
    finished_call: String,
    scheduled_call: String,
    schedule_id: String,
    schedule_call: String,
    purchase_id: String,
}

/// Gives `user` one of everything the API can give without a conversation: a verified
/// number, a time zone, a custom persona, two favourites, a finished call, a call
/// scheduled `scheduled_in_secs` from now, a recurring schedule (with its pending
/// attempt) and a Checkout purchase.
async fn furnish(api: &ApiClient, user: &TestUser, scheduled_in_secs: i64) -> Furnished {
    let number = unique_number();
    api.ensure_verified(user, &number).await.unwrap();
    let zone = api
        .raw(
            reqwest::Method::PATCH,
            "/api/me",
            Some(&user.token),
            Some((
                "application/json",
                br#"{"timezone":"Europe/Dublin"}"#.to_vec(),
            )),
        )
        .await
        .unwrap();
    assert_eq!(zone.status, 200, "{}", zone.body);

    let created = api
        .post(
            "/api/personas",
            Some(&user.token),
            &custom_persona("Piano teacher"),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let persona_id = created.body["persona"]["id"].as_str().unwrap().to_owned();
    for fav in ["brad", persona_id.as_str()] {
        let r = api
            .post(
                "/api/favorites",
                Some(&user.token),
                &json!({ "persona_id": fav }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
    }

    // A finished call (the fake Twilio answers; without a relay it completes).
    harness::worker().twilio.set_script(
        number.clone(),
        CalleeScript::answer(SimScript::new(vec![Step::Pause(200), Step::HangUp])),
    );
    let finished_call = api.trigger_call(user, "brad", &number).await.unwrap();
    api.wait_settled(user, &finished_call, Duration::from_secs(45))
        .await
        .unwrap();

    let r = api
        .post(
            "/api/calls/schedule",
            Some(&user.token),
            &json!({ "persona_id": "sarah", "scheduled_time": rfc3339_in(scheduled_in_secs) }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let scheduled_call = r.body["call"]["id"].as_str().unwrap().to_owned();

    // A daily schedule a few hours from now (UTC), so its attempt waits.
    let at = time::OffsetDateTime::now_utc() + time::Duration::hours(3);
    let r = api
        .post(
            "/api/schedules",
            Some(&user.token),
            &json!({
                "persona_id": "alex",
                "time_of_day": format!("{:02}:{:02}", at.hour(), at.minute()),
                "timezone": "UTC",
            }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let schedule_id = r.body["schedule"]["id"].as_str().unwrap().to_owned();
    let listed = api.get("/api/schedules", Some(&user.token)).await.unwrap();
    let schedule_call = listed.body["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == schedule_id.as_str())
        .and_then(|s| s["pending_call_id"].as_str())
        .unwrap_or_else(|| panic!("the schedule booked no attempt: {}", listed.body))
        .to_owned();

    let purchase_id = api.checkout(user, "starter").await.unwrap();
    Furnished {
        number,
        persona_id,
        finished_call,
        scheduled_call,
        schedule_id,
        schedule_call,
        purchase_id,
    }
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The export is one downloadable JSON document holding the account, every call (the
/// scheduled ones too) with its transcript, the favourites, custom personas, schedules,
/// purchases and the ledger — and no password hash, token or secret anywhere in it.
#[tokio::test]
async fn the_export_holds_the_whole_account_and_no_secret() {
    let api = client();
    let user = api.register_user("export").await.unwrap();
    let f = furnish(&api, &user, 3600).await;

    let resp = export_raw(&api, &user.token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"callmeback-export.json\""
    );
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let text = resp.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let e = &doc["export"];
    assert!(e["generated_at"].is_string(), "{e}");

    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(
        e["user"], me.body["user"],
        "the account as GET /api/me shows it"
    );
    assert_eq!(e["user"]["timezone"], "Europe/Dublin");
    assert_eq!(e["user"]["phone_number"], f.number.as_str());

    let calls = e["calls"].as_array().unwrap();
    let call_ids = ids(&e["calls"]);
    for id in [&f.finished_call, &f.scheduled_call, &f.schedule_call] {
        assert!(call_ids.contains(id), "call {id} missing: {call_ids:?}");
    }
    for c in calls {
        assert_eq!(c["user_id"], user.id.as_str());
        assert!(
            c["transcript"].is_array(),
            "every call carries its transcript: {c}"
        );
    }
    let finished = calls
        .iter()
        .find(|c| c["id"] == f.finished_call.as_str())
        .unwrap();
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["phone_number"], f.number.as_str());
    let scheduled = calls
        .iter()
        .find(|c| c["id"] == f.scheduled_call.as_str())
        .unwrap();
    assert_eq!(scheduled["status"], "scheduled");

    let favorites: Vec<&str> = e["favorites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["persona_id"].as_str().unwrap())
        .collect();
    assert!(favorites.contains(&"brad") && favorites.contains(&f.persona_id.as_str()));
    assert_eq!(ids(&e["personas"]), std::slice::from_ref(&f.persona_id));
    assert_eq!(e["personas"][0]["name"], "Piano teacher");
    assert_eq!(ids(&e["schedules"]), std::slice::from_ref(&f.schedule_id));
    assert_eq!(
        e["schedules"][0]["pending_call_id"],
        f.schedule_call.as_str()
    );
    assert!(
        ids(&e["purchases"]).contains(&f.purchase_id),
        "{}",
        e["purchases"]
    );

    let ledger = e["ledger"].as_array().unwrap();
    let kinds: Vec<&str> = ledger.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    for kind in ["grant", "reserve", "settle"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let sum: i64 = ledger.iter().map(|l| l["amount"].as_i64().unwrap()).sum();
    assert_eq!(
        sum,
        me.body["user"]["credits"].as_i64().unwrap(),
        "the whole ledger"
    );
    assert_eq!(
        e["memories"],
        json!([]),
        "no conversation, nothing remembered"
    );

    for secret in [
        "password",
        "pbkdf2",
        "jti",
        user.password.as_str(),
        user.token.as_str(),
        harness::JWT_SECRET,
        harness::RELAY_SECRET,
        harness::STRIPE_SECRET_KEY,
        harness::TWILIO_AUTH_TOKEN,
    ] {
        assert!(!text.contains(secret), "the export contains {secret:?}");
    }
}

/// One account's export never holds another's data, and the route needs a token.
#[tokio::test]
async fn an_export_holds_nothing_of_another_account() {
    let api = client();
    let a = api.register_user("export-a").await.unwrap();
    let b = api.register_user("export-b").await.unwrap();
    let fa = furnish(&api, &a, 3600).await;
    let fb = furnish(&api, &b, 3600).await;

    for (me, mine, other, theirs) in [(&a, &fa, &b, &fb), (&b, &fb, &a, &fa)] {
        let doc = export(&api, me).await;
        let text = doc.to_string();
        assert!(text.contains(&mine.number) && text.contains(&mine.persona_id));
        for foreign in [
            other.id.as_str(),
            other.email.as_str(),
            theirs.number.as_str(),
            theirs.persona_id.as_str(),
            theirs.finished_call.as_str(),
            theirs.schedule_id.as_str(),
            theirs.purchase_id.as_str(),
        ] {
            assert!(
                !text.contains(foreign),
                "{}'s export holds {foreign:?}",
                me.email
            );
        }
    }

    let anonymous = api.get("/api/me/export", None).await.unwrap();
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.code(), Some("unauthorized"));
}

/// The erasure, as a user and as everyone else sees it afterwards: 204; the old token is
/// 401 (a second erasure too); the old password signs in nowhere; the email registers a
/// new account; the admin sees a tombstone with the ledger whole, the calls without their
/// number, the pending calls canceled (and the fake Twilio never dials the one that was
/// due), the custom persona retired and blanked; and the verified number, kept only as
/// its digest, brings no second free credits.
#[tokio::test]
async fn erasure_leaves_the_accounts_and_nothing_personal() {
    let api = client();
    let admin = harness::admin(&api).await;
    let user = api.register_user("erase").await.unwrap();
    let f = furnish(&api, &user, 20).await;
    let due = Instant::now() + Duration::from_secs(20);
    let ledger_before = export(&api, &user).await["ledger"].clone();
    assert!(!ledger_before.as_array().unwrap().is_empty());

    // A body is optional; an unknown field is refused and changes nothing.
    let bad = api
        .raw(
            reqwest::Method::DELETE,
            "/api/me",
            Some(&user.token),
            Some(("application/json", br#"{"really":true}"#.to_vec())),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body["error"]["message"].is_string());
    assert_eq!(
        api.get("/api/me", Some(&user.token)).await.unwrap().status,
        200
    );

    let gone = erase(&api, &user.token).await;
    assert_eq!(gone.status, 204, "{}", gone.body);

    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(me.status, 401, "{}", me.body);
    assert_eq!(me.code(), Some("unauthorized"));
    let again = erase(&api, &user.token).await;
    assert_eq!(again.status, 401, "{}", again.body);
    assert_eq!(again.code(), Some("unauthorized"));
    let login = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": user.email, "password": user.password }),
        )
        .await
        .unwrap();
    assert_eq!(login.status, 401, "{}", login.body);
    assert_eq!(login.code(), Some("invalid_credentials"));
    let tombstone = format!("erased-{}@erased.invalid", user.id);
    let login = api
        .post(
            "/api/auth/login",
            None,
            &json!({ "email": tombstone, "password": user.password }),
        )
        .await
        .unwrap();
    assert_eq!(login.status, 401, "{}", login.body);

    // The admin's view: a tombstone whose ledger is whole.
    let seen = api
        .get(&format!("/admin/users/{}", user.id), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(seen.status, 200, "{}", seen.body);
    let u = &seen.body["user"];
    assert_eq!(u["email"], tombstone.as_str());
    assert_eq!(u["name"], "");
    assert_eq!(u["phone_number"], Value::Null);
    assert!(u["erased_at"].is_string(), "{u}");
    let mut kept = ids(&seen.body["ledger"]);
    let mut before = ids(&ledger_before);
    kept.sort();
    before.sort();
    assert_eq!(kept, before, "every ledger row kept");

    // The calls: kept for the accounts, without the number; nothing pending.
    let calls = api
        .get(
            &format!("/admin/calls?user_id={}&limit=100", user.id),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(calls.status, 200, "{}", calls.body);
    let calls = calls.body["calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    for c in &calls {
        assert_eq!(c["phone_number"], "", "{c}");
        let want = if c["id"] == f.finished_call.as_str() {
            "completed"
        } else {
            "canceled"
        };
        assert_eq!(c["status"], want, "{c}");
    }
    let finished = api
        .get(
            &format!("/admin/calls/{}", f.finished_call),
            Some(&admin.token),
        )
        .await
        .unwrap();
    assert_eq!(finished.body["transcript"], json!([]));
    assert!(
        !finished.body["ledger"].as_array().unwrap().is_empty(),
        "its charge is kept"
    );

    // The custom persona: retired, its words gone, the row kept for the calls.
    let personas = api
        .get("/admin/personas?include_custom=true", Some(&admin.token))
        .await
        .unwrap();
    let persona = personas.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == f.persona_id.as_str())
        .unwrap_or_else(|| panic!("the persona row is kept: {}", personas.body))
        .clone();
    assert_eq!(persona["is_active"], false);
    for field in ["name", "description", "system_prompt", "greeting"] {
        assert_eq!(persona[field], "", "{field}: {persona}");
    }

    // The audit log records the erasure, under the tombstone.
    let audit = api.audit(&admin, "user.erase", &user.id).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["actor"], tombstone.as_str());

    // The email is free again: a new account, a new id.
    let again = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": user.email, "password": "a brand new password", "name": "Back" }),
        )
        .await
        .unwrap();
    assert_eq!(again.status, 201, "{}", again.body);
    assert_ne!(again.body["user"]["id"], user.id.as_str());
    let reborn = TestUser {
        id: again.body["user"]["id"].as_str().unwrap().to_owned(),
        email: user.email.clone(),
        password: "a brand new password".into(),
        token: again.body["token"].as_str().unwrap().to_owned(),
    };
    let fresh = export(&api, &reborn).await;
    assert_eq!(
        fresh["calls"],
        json!([]),
        "nothing of the old account: {fresh}"
    );
    assert_eq!(fresh["favorites"], json!([]));
    // The number the erased account verified is known only by its digest now, and still
    // brings no second free credits.
    let verified = api.verify_phone(&reborn, &f.number).await.unwrap();
    assert_eq!(verified.status, 200, "{}", verified.body);
    assert_eq!(verified.body["user"]["phone_verified"], true);
    assert_eq!(
        verified.body["user"]["credits"], 0,
        "free credits once per number"
    );

    // The scheduled call that was due never rings.
    tokio::time::sleep_until((due + Duration::from_secs(6)).into()).await;
    let dialed = harness::worker()
        .twilio
        .calls()
        .into_iter()
        .filter(|c| c.to == f.number)
        .count();
    assert_eq!(dialed, 1, "only the call placed before the erasure");
}

/// An admin cannot erase their own account (403 `admin_cannot_erase`), and a user with a
/// call ringing right now gets 409 `call_in_progress`; both keep everything.
#[tokio::test]
async fn admins_and_live_calls_are_refused() {
    let api = client();
    let admin = harness::admin(&api).await;
    let r = erase(&api, &admin.token).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.code(), Some("admin_cannot_erase"));
    assert_eq!(
        api.get("/api/me", Some(&admin.token)).await.unwrap().status,
        200
    );

    let user = api.register_user("erase-live").await.unwrap();
    let number = unique_number();
    harness::worker()
        .twilio
        .set_script(number.clone(), CalleeScript::NoAnswer);
    let id = api.trigger_call(&user, "brad", &number).await.unwrap();
    let r = erase(&api, &user.token).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.code(), Some("call_in_progress"));
    let me = api.get("/api/me", Some(&user.token)).await.unwrap();
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["phone_number"], number.as_str());
    // Once the call is over, the erasure goes through.
    wait_status(&api, &user, &id, &["no_answer", "failed", "completed"]).await;
    let r = erase(&api, &user.token).await;
    assert_eq!(r.status, 204, "{}", r.body);
}

/// Its own voice stack (Worker, relay, all fakes): the LLM echoes, so the call's
/// transcript and the persona's notes hold what the caller said.
fn voice() -> &'static VoiceStack {
    static STACK: OnceLock<VoiceStack> = OnceLock::new();
    STACK.get_or_init(|| VoiceStack::start(Vec::new()))
}

/// A real conversation's record: the export holds the call's transcript lines and the
/// persona's memory of the caller; after the erasure the call keeps its accounting but
/// neither its transcript nor its number.
#[tokio::test]
async fn the_export_holds_transcripts_and_memories_and_the_erasure_removes_them() {
    let v = voice();
    let api = v.api();
    let admin = harness::admin_on(&api, &v.stack).await;
    let user = api.register_user("erase-voice").await.unwrap();
    let line = "my name is robin and i practise the cello every morning";
    let (id, done) = v.one_exchange(&api, &user, line).await.unwrap();
    // The notes are written after settlement, in the background.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let r = api
            .get("/api/personas/brad/memory", Some(&user.token))
            .await
            .unwrap();
        if r.body["memory"]["calls"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no memory: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let doc = export(&api, &user).await;
    let call = doc["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        call["transcript"], done["transcript"],
        "the call's transcript, in order"
    );
    assert!(call["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["role"] == "user" && l["text"] == line));
    let memory = api
        .get("/api/personas/brad/memory", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        doc["memories"],
        json!([{ "persona_id": "brad", "memory": memory.body["memory"] }])
    );

    let r = erase(&api, &user.token).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let seen = api
        .get(&format!("/admin/calls/{id}"), Some(&admin.token))
        .await
        .unwrap();
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(seen.body["transcript"], json!([]));
    assert_eq!(seen.body["call"]["phone_number"], "");
    assert_eq!(seen.body["call"]["status"], "completed");
    assert!(!seen.body["ledger"].as_array().unwrap().is_empty());
    // And the call's Durable Object dropped what it kept of the conversation (this stack
    // runs only this test, so the Worker's log line is in the recent output).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = v.stack.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("\"user_erased\"") && l.contains(&user.id));
        if let Some(line) = line {
            assert!(
                line.contains("\"sessions_forgotten\":1")
                    && line.contains("\"sessions_not_forgotten\":0"),
                "{line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no user_erased line in {logs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
