//! Personas and favourites over HTTP against the real Worker under `wrangler dev`.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use cmb_tests::api::ApiClient;
use cmb_tests::harness;
use serde_json::{json, Value};

fn client() -> ApiClient {
    harness::worker().api()
}

fn custom_persona(name: &str) -> Value {
    json!({
        "name": name,
        "description": "Tests custom personas.",
        "system_prompt": "You are a patient language tutor. Keep replies short.",
        "greeting": "Hola! Ready to practise?",
        "voice_id": "21m00Tcm4TlvDq8ikWAM",
        "voice_settings": { "stability": 0.4, "similarity_boost": 0.8, "style": 0.1, "speed": 1.1 }
    })
}

/// The launch catalog is seeded and visible to anonymous callers, with voice settings.
#[tokio::test]
async fn catalog_is_seeded_and_public() {
    let r = client().get("/api/personas", None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let personas = r.body["personas"].as_array().unwrap();
    let names: Vec<&str> = personas.iter().filter_map(|p| p["name"].as_str()).collect();
    for expected in ["Brad", "Sarah", "Alex", "Boss", "Doctor"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let brad = personas.iter().find(|p| p["name"] == "Brad").unwrap();
    assert!(brad["system_prompt"].as_str().unwrap().len() > 100);
    assert!(!brad["greeting"].as_str().unwrap().is_empty());
    assert!(brad["voice_settings"]["stability"].is_number());
    assert_eq!(brad["is_custom"], false);

    let one = client().get("/api/personas/brad", None).await.unwrap();
    assert_eq!(one.status, 200);
    assert_eq!(one.body["persona"]["name"], "Brad");
    let missing = client()
        .get("/api/personas/no-such-persona", None)
        .await
        .unwrap();
    assert_eq!(missing.status, 404);
}

/// A user creates, updates and soft-deletes their own persona; others never see it.
#[tokio::test]
async fn custom_persona_lifecycle_is_private_to_its_owner() {
    let api = client();
    let owner = api.register_user("owner").await.unwrap();
    let other = api.register_user("other").await.unwrap();

    let created = api
        .post(
            "/api/personas",
            Some(&owner.token),
            &custom_persona("Tutor"),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["persona"]["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["persona"]["is_custom"], true);
    assert_eq!(created.body["persona"]["owner_id"], owner.id.as_str());

    let mine = api.get("/api/personas", Some(&owner.token)).await.unwrap();
    assert!(mine.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id.as_str()));
    let theirs = api.get("/api/personas", Some(&other.token)).await.unwrap();
    assert!(!theirs.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id.as_str()));
    let peek = api
        .get(&format!("/api/personas/{id}"), Some(&other.token))
        .await
        .unwrap();
    assert_eq!(
        peek.status, 404,
        "another user's custom persona is invisible"
    );

    let updated = api
        .put(
            &format!("/api/personas/{id}"),
            Some(&owner.token),
            &json!({ "name": "Tutora", "voice_settings": { "speed": 0.9 } }),
        )
        .await
        .unwrap();
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.body["persona"]["name"], "Tutora");
    assert_eq!(updated.body["persona"]["voice_settings"]["speed"], 0.9);
    assert_eq!(
        updated.body["persona"]["voice_settings"]["stability"], 0.4,
        "partial update keeps other fields"
    );

    let deleted = api
        .delete(&format!("/api/personas/{id}"), Some(&owner.token))
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    let gone = api.get("/api/personas", Some(&owner.token)).await.unwrap();
    assert!(!gone.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id.as_str()));
}

/// Another user can neither edit nor delete my custom persona, and nothing changes.
#[tokio::test]
async fn another_user_cannot_edit_or_delete_my_persona() {
    let api = client();
    let owner = api.register_user("mine").await.unwrap();
    let intruder = api.register_user("intruder").await.unwrap();
    let created = api
        .post(
            "/api/personas",
            Some(&owner.token),
            &custom_persona("Private"),
        )
        .await
        .unwrap();
    let id = created.body["persona"]["id"].as_str().unwrap().to_string();

    let edit = api
        .put(
            &format!("/api/personas/{id}"),
            Some(&intruder.token),
            &json!({ "name": "Hijacked" }),
        )
        .await
        .unwrap();
    assert!(edit.status == 403 || edit.status == 404, "{}", edit.status);
    let del = api
        .delete(&format!("/api/personas/{id}"), Some(&intruder.token))
        .await
        .unwrap();
    assert!(del.status == 403 || del.status == 404, "{}", del.status);

    let still = api
        .get(&format!("/api/personas/{id}"), Some(&owner.token))
        .await
        .unwrap();
    assert_eq!(still.status, 200);
    assert_eq!(still.body["persona"]["name"], "Private");
    assert_eq!(still.body["persona"]["is_active"], true);

    let catalog_edit = api
        .put(
            "/api/personas/brad",
            Some(&owner.token),
            &json!({ "name": "Chad" }),
        )
        .await
        .unwrap();
    assert_eq!(catalog_edit.status, 403, "only admins edit the catalog");
}

/// Out-of-range voice settings and invalid fields are 400 and create nothing.
#[tokio::test]
async fn out_of_range_voice_settings_are_400() {
    let api = client();
    let user = api.register_user("ranges").await.unwrap();
    for (field, value) in [
        ("stability", 1.5),
        ("similarity_boost", -0.1),
        ("style", 2.0),
        ("speed", 3.0),
        ("speed", 0.5),
    ] {
        let mut body = custom_persona("Bad");
        body["voice_settings"][field] = json!(value);
        let r = api
            .post("/api/personas", Some(&user.token), &body)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{field}={value}: {}", r.body);
        assert_eq!(r.code(), Some("out_of_range"), "{}", r.body);
    }
    let mut empty_name = custom_persona("x");
    empty_name["name"] = json!("");
    let r = api
        .post("/api/personas", Some(&user.token), &empty_name)
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    let created = api
        .post("/api/personas", Some(&user.token), &custom_persona("Good"))
        .await
        .unwrap();
    let id = created.body["persona"]["id"].as_str().unwrap().to_string();
    let bad_update = api
        .put(
            &format!("/api/personas/{id}"),
            Some(&user.token),
            &json!({ "name": "Changed", "voice_settings": { "stability": 9 } }),
        )
        .await
        .unwrap();
    assert_eq!(bad_update.status, 400);
    let after = api
        .get(&format!("/api/personas/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(
        after.body["persona"]["name"], "Good",
        "a rejected update changes nothing"
    );

    let mine = api.get("/api/personas", Some(&user.token)).await.unwrap();
    let customs = mine.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["is_custom"] == true)
        .count();
    assert_eq!(customs, 1, "only the valid persona exists");
}

/// Anonymous callers cannot create personas.
#[tokio::test]
async fn creating_needs_a_user() {
    let r = client()
        .post("/api/personas", None, &custom_persona("Anon"))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}

/// Favourites: add (idempotent), list, remove; invisible personas cannot be favourited.
#[tokio::test]
async fn favourites_round_trip() {
    let api = client();
    let user = api.register_user("fav").await.unwrap();
    let other = api.register_user("fav-other").await.unwrap();
    for _ in 0..2 {
        let r = api
            .post(
                "/api/favorites",
                Some(&user.token),
                &json!({ "persona_id": "brad" }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let r = api
        .post(
            "/api/favorites",
            Some(&user.token),
            &json!({ "personaId": "doctor" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let list = api.get("/api/favorites", Some(&user.token)).await.unwrap();
    let ids: Vec<&str> = list.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"brad") && ids.contains(&"doctor"));

    let private = api
        .post(
            "/api/personas",
            Some(&other.token),
            &custom_persona("Theirs"),
        )
        .await
        .unwrap();
    let private_id = private.body["persona"]["id"].as_str().unwrap();
    let r = api
        .post(
            "/api/favorites",
            Some(&user.token),
            &json!({ "persona_id": private_id }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);

    let r = api
        .delete("/api/favorites/brad", Some(&user.token))
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let list = api.get("/api/favorites", Some(&user.token)).await.unwrap();
    assert_eq!(list.body["personas"].as_array().unwrap().len(), 1);
}

/// An admin (from ADMIN_EMAILS) creates a catalog persona everyone sees.
#[tokio::test]
async fn admin_creates_catalog_personas() {
    let api = client();
    let admin = harness::admin(&api).await;
    let r = api
        .post("/api/personas", Some(&admin.token), &custom_persona("Chef"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["persona"]["is_custom"], false);
    let id = r.body["persona"]["id"].as_str().unwrap().to_string();
    let anon = api.get("/api/personas", None).await.unwrap();
    assert!(anon.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id.as_str()));
}

/// The first version's frontend creates and edits personas with its own field names
/// (`core_system_prompt`, `default_voice_id`, `default_voice_settings`, no greeting,
/// `avatar_url`, `category`); both names come back.
#[tokio::test]
async fn first_version_persona_body_is_accepted() {
    let api = client();
    let user = api.register_user("v1-personas").await.unwrap();
    // Exactly the body the first version's frontend sends.
    let body = json!({
        "name": "Coach Max",
        "description": "No-nonsense gym coach",
        "core_system_prompt": "You are Max, an upbeat gym coach. Keep it short.",
        "default_voice_id": "pNInz6obpgDQGcFmaJgB",
        "default_voice_settings": { "stability": 0.4, "similarity_boost": 0.8, "speed": 1.1, "style": 0.2 },
        "avatar_url": "https://cdn.example.com/avatars/max.png",
        "category": "fitness"
    });
    let r = api
        .post("/api/personas", Some(&user.token), &body)
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let p = &r.body["persona"];
    for (new, old) in [
        ("system_prompt", "core_system_prompt"),
        ("voice_id", "default_voice_id"),
        ("voice_settings", "default_voice_settings"),
    ] {
        assert_eq!(p[new], p[old], "{new} vs {old}: {p}");
    }
    assert_eq!(
        p["system_prompt"],
        "You are Max, an upbeat gym coach. Keep it short."
    );
    assert_eq!(p["voice_id"], "pNInz6obpgDQGcFmaJgB");
    assert_eq!(p["voice_settings"]["style"], 0.2);
    assert_eq!(p["avatar_url"], "https://cdn.example.com/avatars/max.png");
    assert_eq!(p["category"], "fitness");
    assert!(
        p["greeting"].as_str().unwrap().contains("Coach Max"),
        "a default greeting from the name: {p}"
    );

    // An update in the old shape, read back.
    let id = p["id"].as_str().unwrap();
    let r = api
        .put(
            &format!("/api/personas/{id}"),
            Some(&user.token),
            &json!({ "core_system_prompt": "You are Max, now calmer.", "category": "" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let got = api
        .get(&format!("/api/personas/{id}"), Some(&user.token))
        .await
        .unwrap();
    let p = &got.body["persona"];
    assert_eq!(p["core_system_prompt"], "You are Max, now calmer.");
    assert_eq!(p["system_prompt"], "You are Max, now calmer.");
    assert_eq!(p["category"], Value::Null);
    assert_eq!(p["avatar_url"], "https://cdn.example.com/avatars/max.png");

    // A bad avatar is a 400 that changes nothing.
    let r = api
        .put(
            &format!("/api/personas/{id}"),
            Some(&user.token),
            &json!({ "avatar_url": "javascript:alert(1)", "name": "Renamed" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let got = api
        .get(&format!("/api/personas/{id}"), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(got.body["persona"]["name"], "Coach Max");
}

/// A user may own 20 active custom personas: 25 created at once yield exactly 20 (the
/// cap holds under concurrency, on D1 and on Postgres), the rest are 409
/// `too_many_personas`; deleting one makes room. The list is paginated with a total.
#[tokio::test]
async fn custom_personas_are_capped_and_the_list_is_paginated() {
    let api = client();
    let user = api.register_user("collector").await.unwrap();
    let tasks: Vec<_> = (0..25)
        .map(|i| {
            let api = api.clone();
            let token = user.token.clone();
            tokio::spawn(async move {
                api.post(
                    "/api/personas",
                    Some(&token),
                    &custom_persona(&format!("Tutor {i}")),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created.push(r.body["persona"]["id"].as_str().unwrap().to_string()),
            409 => {
                assert_eq!(r.code(), Some("too_many_personas"), "{}", r.body);
                assert_eq!(r.body["error"]["details"]["limit"], 20);
                refused += 1;
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert_eq!((created.len(), refused), (20, 5));

    let all = api.get("/api/personas", Some(&user.token)).await.unwrap();
    let total = all.body["total"].as_i64().unwrap();
    let mine = all.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner_id"] == user.id.as_str())
        .count();
    assert_eq!(mine, 20, "{}", all.body);
    // Pages of 7 cover the same list, in order, without overlap.
    let mut paged = Vec::new();
    for offset in (0..total).step_by(7) {
        let r = api
            .get(
                &format!("/api/personas?limit=7&offset={offset}"),
                Some(&user.token),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["total"], total);
        for p in r.body["personas"].as_array().unwrap() {
            paged.push(p["id"].as_str().unwrap().to_string());
        }
    }
    let listed: Vec<String> = all.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paged, listed);
    for bad in ["limit=0", "limit=201", "offset=-1", "limit=ten"] {
        let r = api
            .get(&format!("/api/personas?{bad}"), Some(&user.token))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    let r = api
        .delete(&format!("/api/personas/{}", created[0]), Some(&user.token))
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api
        .post(
            "/api/personas",
            Some(&user.token),
            &custom_persona("Room made"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A custom persona's prompt (8,000 characters) and greeting (500) are bounded: one
/// character more is a 400 naming the field, and nothing is created.
#[tokio::test]
async fn prompt_and_greeting_lengths_are_bounded() {
    let api = client();
    let user = api.register_user("verbose").await.unwrap();
    for (field, max) in [("system_prompt", 8000), ("greeting", 500)] {
        let mut body = custom_persona("Long");
        body[field] = json!("a".repeat(max + 1));
        let r = api
            .post("/api/personas", Some(&user.token), &body)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        assert!(r.body.to_string().contains(field), "{}", r.body);
        body[field] = json!("a".repeat(max));
        body["name"] = json!(format!("Longest {field}"));
        let r = api
            .post("/api/personas", Some(&user.token), &body)
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{field} at the limit: {}", r.body);
    }
    let mine = api.get("/api/personas", Some(&user.token)).await.unwrap();
    let own = mine.body["personas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner_id"] == user.id.as_str())
        .count();
    assert_eq!(own, 2, "only the two within the limits exist");
}

/// A persona's memory of the caller: empty before any call, private to each caller,
/// 404 for personas the caller cannot talk to, and forgetting is idempotent.
#[tokio::test]
async fn persona_memory_routes() {
    let api = client();
    let me = api.register_user("memory").await.unwrap();
    let other = api.register_user("memory-other").await.unwrap();

    let empty = api
        .get("/api/personas/brad/memory", Some(&me.token))
        .await
        .unwrap();
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert_eq!(
        empty.body["memory"],
        json!({ "summary": null, "updated_at": null, "calls": 0, "last_call_at": null })
    );

    let anonymous = api.get("/api/personas/brad/memory", None).await.unwrap();
    assert_eq!(
        (anonymous.status, anonymous.code()),
        (401, Some("unauthorized"))
    );
    let unknown = api
        .get("/api/personas/no-such-persona/memory", Some(&me.token))
        .await
        .unwrap();
    assert_eq!((unknown.status, unknown.code()), (404, Some("not_found")));

    // Another caller's custom persona does not exist for me, for reading or forgetting.
    let created = api
        .post(
            "/api/personas",
            Some(&other.token),
            &custom_persona("Theirs"),
        )
        .await
        .unwrap();
    let theirs = created.body["persona"]["id"].as_str().unwrap().to_string();
    let path = format!("/api/personas/{theirs}/memory");
    assert_eq!(api.get(&path, Some(&me.token)).await.unwrap().status, 404);
    assert_eq!(
        api.delete(&path, Some(&me.token)).await.unwrap().status,
        404
    );
    assert_eq!(
        api.get(&path, Some(&other.token)).await.unwrap().status,
        200
    );

    // Forgetting works with nothing to forget, and twice; a retired persona of mine can
    // still be made to forget.
    for _ in 0..2 {
        let gone = api
            .delete("/api/personas/brad/memory", Some(&me.token))
            .await
            .unwrap();
        assert_eq!(gone.status, 204, "{}", gone.body);
    }
    assert_eq!(
        api.delete(&format!("/api/personas/{theirs}"), Some(&other.token))
            .await
            .unwrap()
            .status,
        204
    );
    assert_eq!(
        api.delete(&path, Some(&other.token)).await.unwrap().status,
        204
    );
    let wrong_method = api
        .put("/api/personas/brad/memory", Some(&me.token), &json!({}))
        .await
        .unwrap();
    assert_eq!(wrong_method.status, 405);
}
