//! The `fakes` binary's control peer (`--only control`): the relay's CallSession side for
//! load tests, which also mints stream tokens for any load generator.

// Helpers outside #[test] fns unwrap too: any panic here is a test failure.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use cmb_core::channel::{self, DoToRelay};
use futures::StreamExt as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "control-test-secret";
const WAIT: Duration = Duration::from_secs(10);

fn fakes() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fakes"));
    cmd.args([
        "--host",
        "127.0.0.1",
        "--base-port",
        "0",
        "--only",
        "control",
    ])
    .env_remove("RELAY_SECRET")
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    cmd
}

/// `fakes --only control` announces the control peer, mints stream tokens that verify
/// for the call asked about (only for the relay secret's holder), serves the channel
/// with a `hello`, and stops cleanly on SIGTERM.
#[tokio::test]
async fn fakes_binary_serves_the_control_peer() {
    let mut child = fakes()
        .env("RELAY_SECRET", SECRET)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let announced = cmb_tests::process::fakes_announcements(&mut child, WAIT)
        .await
        .unwrap();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let base = announced[0]
        .strip_prefix("fake control listening on ")
        .unwrap()
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    let http = reqwest::Client::new();
    let url = format!("{base}/internal/calls/call-42/stream-token");
    let minted: Value = http
        .get(&url)
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(minted["callId"], "call-42");
    let token = minted["streamToken"].as_str().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = cmb_core::stream_token::verify(SECRET, token, "call-42", now).unwrap();
    assert_eq!(Some(claims.expires_at), minted["expiresAt"].as_i64());
    assert!((now + 290..=now + 310).contains(&claims.expires_at));
    assert!(cmb_core::stream_token::verify(SECRET, token, "call-43", now).is_err());
    let again: Value = http
        .get(&url)
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(again["streamToken"], minted["streamToken"], "fresh nonce");
    for bad in [Some("guess"), None] {
        let mut req = http.get(&url);
        if let Some(bad) = bad {
            req = req.bearer_auth(bad);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "{bad:?}");
    }

    // The channel: the relay's upgrade with the secret gets `hello` for that call.
    let ws_url = format!(
        "{}/internal/calls/call-42/session",
        base.replacen("http://", "ws://", 1)
    );
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let Message::Text(first) = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    else {
        panic!("hello is text");
    };
    let hello = channel::decode::<DoToRelay>(&first).unwrap().unwrap();
    assert!(
        matches!(&hello.msg, DoToRelay::Hello { call_id, .. } if call_id == "call-42"),
        "{first}"
    );
    let unsigned = ws_url.as_str().into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(unsigned).await.is_err());

    cmb_tests::process::stop_cleanly(&mut child, WAIT)
        .await
        .unwrap();
}

/// Without `RELAY_SECRET` (or with an empty one) the control peer does not start: there
/// is no stand-in secret, and the error names the variable.
#[tokio::test]
async fn fakes_binary_control_needs_the_relay_secret() {
    for secret in [None, Some("")] {
        let mut cmd = fakes();
        if let Some(s) = secret {
            cmd.env("RELAY_SECRET", s);
        }
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(!out.status.success(), "{secret:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("RELAY_SECRET"), "{secret:?}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("fakes ready"),
            "{secret:?}"
        );
    }
}
