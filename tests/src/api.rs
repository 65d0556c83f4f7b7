//! A small HTTP client for the Worker's public API, used by the integration tests.
//!
//! It speaks plain HTTP/JSON like any frontend would, and returns status + JSON so tests
//! assert on exactly what a client sees. Every response it receives is checked against
//! the OpenAPI document first ([`crate::contract`]): an undocumented status or a body
//! that does not fit its schema is an error of the request, so every suite using this
//! client tests the contract too.

use anyhow::Context as _;
use serde_json::{json, Value};

/// Status code and parsed JSON body (`Value::Null` for an empty body).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// The `error.code` of an API error body, if any.
    pub fn code(&self) -> Option<&str> {
        self.body.get("error")?.get("code")?.as_str()
    }
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    /// The fake Twilio's verification SMS, when the client can read them: then
    /// [`ApiClient::register_user`] verifies a fresh number for each user (as the app's
    /// sign-up does) and [`ApiClient::trigger_call`] verifies the number it is given.
    sms: Option<crate::fakes::twilio::SmsInbox>,
    /// The number each user (by id) has verified through this client.
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

/// A fresh NANP (US, San Francisco 628) number for a test user; unique in this process.
pub fn fresh_number() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("+16284{:06}", n % 1_000_000)
}

/// A registered user and their token.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub password: String,
    pub token: String,
}

impl ApiClient {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            sms: None,
            verified: Default::default(),
        }
    }

    /// This client reads verification codes from the fake Twilio's `inbox`.
    pub fn with_sms(mut self, inbox: crate::fakes::twilio::SmsInbox) -> Self {
        self.sms = Some(inbox);
        self
    }

    /// Verifies `number` for `user` the way the app does: ask for a code, read the SMS,
    /// send the code back. The reply of `POST /api/me/phone/verify`.
    pub async fn verify_phone(&self, user: &TestUser, number: &str) -> anyhow::Result<Reply> {
        let inbox = self
            .sms
            .as_ref()
            .context("this ApiClient cannot read SMS: build it with `with_sms`")?;
        let started = self
            .post(
                "/api/me/phone",
                Some(&user.token),
                &json!({ "phone_number": number }),
            )
            .await?;
        anyhow::ensure!(
            started.status == 202,
            "POST /api/me/phone answered {}: {}",
            started.status,
            started.body
        );
        let code = inbox
            .latest(number)
            .with_context(|| format!("no SMS reached {number}"))?;
        let reply = self
            .post(
                "/api/me/phone/verify",
                Some(&user.token),
                &json!({ "phone_number": number, "code": code }),
            )
            .await?;
        if reply.status == 200 {
            self.verified
                .lock()
                .map_err(|_| anyhow::anyhow!("verified map poisoned"))?
                .insert(user.id.clone(), number.to_owned());
        }
        Ok(reply)
    }

    /// [`ApiClient::verify_phone`] when `number` is not already `user`'s verified number.
    pub async fn ensure_verified(&self, user: &TestUser, number: &str) -> anyhow::Result<()> {
        let known = self
            .verified
            .lock()
            .map_err(|_| anyhow::anyhow!("verified map poisoned"))?
            .get(&user.id)
            .is_some_and(|n| n == number);
        if !known {
            let r = self.verify_phone(user, number).await?;
            anyhow::ensure!(r.status == 200, "verify {number}: {} {}", r.status, r.body);
        }
        Ok(())
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request with an optional bearer token and raw body.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Reply> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        Ok(self.send(req, &method, path).await?.0)
    }

    /// Sends a built request; its reply and response headers.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        method: &reqwest::Method,
        path: &str,
    ) -> anyhow::Result<(Reply, reqwest::header::HeaderMap)> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let headers = resp.headers().clone();
        let status = resp.status().as_u16();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{method} {path} answered {status} with non-JSON: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        crate::contract::check(
            method.as_str(),
            path,
            status,
            content_type.as_deref(),
            &body,
        )?;
        Ok((Reply { status, body }, headers))
    }

    /// POSTs JSON text (as given, so tests can vary whitespace and key order) as `user`
    /// with an optional `Idempotency-Key` (bytes, so malformed keys can be sent too): the
    /// reply, and whether it came marked `Idempotent-Replayed: true`.
    pub async fn post_idempotent(
        &self,
        path: &str,
        user: &TestUser,
        key: Option<&[u8]>,
        body: &str,
    ) -> anyhow::Result<(Reply, bool)> {
        let method = reqwest::Method::POST;
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&user.token)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(k)?,
            );
        }
        let (reply, headers) = self.send(req, &method, path).await?;
        let replayed = match headers.get("idempotent-replayed") {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) => anyhow::bail!("Idempotent-Replayed is {v:?}, not true"),
        };
        Ok((reply, replayed))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<Reply> {
        self.raw(reqwest::Method::GET, path, token, None).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> anyhow::Result<Reply> {
        self.raw(reqwest::Method::DELETE, path, token, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Reply> {
        self.raw(
            reqwest::Method::POST,
            path,
            token,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
    }

    pub async fn put(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Reply> {
        self.raw(
            reqwest::Method::PUT,
            path,
            token,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
    }

    pub async fn patch(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Reply> {
        self.raw(
            reqwest::Method::PATCH,
            path,
            token,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
    }

    /// `POST /admin/users/:id/ban {reason}` as `admin`.
    pub async fn ban(
        &self,
        admin: &TestUser,
        user_id: &str,
        reason: &str,
    ) -> anyhow::Result<Reply> {
        self.post(
            &format!("/admin/users/{user_id}/ban"),
            Some(&admin.token),
            &serde_json::json!({ "reason": reason }),
        )
        .await
    }

    /// `POST /api/payments/checkout {pack}` as `user`: the Checkout Session's id.
    pub async fn checkout(&self, user: &TestUser, pack: &str) -> anyhow::Result<String> {
        let r = self
            .post(
                "/api/payments/checkout",
                Some(&user.token),
                &json!({ "pack": pack }),
            )
            .await?;
        anyhow::ensure!(r.status == 200, "checkout: {} {}", r.status, r.body);
        r.body["session_id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no session_id: {}", r.body))
    }

    /// `GET /admin/audit?action&target_id` with `admin`'s token: the matching entries,
    /// newest first.
    pub async fn audit(
        &self,
        admin: &TestUser,
        action: &str,
        target_id: &str,
    ) -> anyhow::Result<Vec<Value>> {
        let r = self
            .get(
                &format!("/admin/audit?action={action}&target_id={target_id}"),
                Some(&admin.token),
            )
            .await?;
        anyhow::ensure!(r.status == 200, "audit: {} {}", r.status, r.body);
        Ok(r.body["entries"].as_array().cloned().unwrap_or_default())
    }

    /// The user's current balance (`GET /api/me`).
    pub async fn credits(&self, user: &TestUser) -> anyhow::Result<i64> {
        let me = self.get("/api/me", Some(&user.token)).await?;
        me.body["user"]["credits"]
            .as_i64()
            .with_context(|| format!("no credits in /api/me: {}", me.body))
    }

    /// `POST /api/calls/trigger` as `user`; the new call's id (any answer but 201 is an
    /// error carrying the body).
    pub async fn trigger_call(
        &self,
        user: &TestUser,
        persona_id: &str,
        number: &str,
    ) -> anyhow::Result<String> {
        if self.sms.is_some() {
            self.ensure_verified(user, number).await?;
        }
        let r = self
            .post(
                "/api/calls/trigger",
                Some(&user.token),
                &serde_json::json!({ "persona_id": persona_id, "phone_number": number }),
            )
            .await?;
        anyhow::ensure!(r.status == 201, "trigger: {} {}", r.status, r.body);
        r.body["call"]["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no call id in {}", r.body))
    }

    /// Waits until call `id` is settled (its cost is recorded); its detail body.
    pub async fn wait_settled(
        &self,
        user: &TestUser,
        id: &str,
        within: std::time::Duration,
    ) -> anyhow::Result<Value> {
        self.wait_call(user, id, within, |b| !b["call"]["cost_cents"].is_null())
            .await
    }

    /// Polls `GET /api/calls/:id` until `done` holds for its body, or fails after
    /// `within` with the last body.
    pub async fn wait_call(
        &self,
        user: &TestUser,
        id: &str,
        within: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let r = self
                .get(&format!("/api/calls/{id}"), Some(&user.token))
                .await?;
            if done(&r.body) {
                return Ok(r.body);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "call {id} not done in {within:?}: {}",
                r.body
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Registers a fresh user with a unique email and returns it with its token.
    pub async fn register_user(&self, label: &str) -> anyhow::Result<TestUser> {
        let email = format!("{label}-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = "correct horse battery".to_string();
        let reply = self
            .post(
                "/api/auth/register",
                None,
                &json!({ "email": email, "password": password, "name": label }),
            )
            .await?;
        anyhow::ensure!(
            reply.status == 201,
            "register answered {}: {}",
            reply.status,
            reply.body
        );
        let token = reply.body["token"].as_str().context("token")?.to_string();
        let id = reply.body["user"]["id"]
            .as_str()
            .context("user.id")?
            .to_string();
        let user = TestUser {
            id,
            email,
            password,
            token,
        };
        // A new user of the app verifies their phone next, which brings the free credits.
        if self.sms.is_some() {
            self.ensure_verified(&user, &fresh_number()).await?;
        }
        Ok(user)
    }
}

impl ApiClient {
    /// [`ApiClient::post_idempotent`], which must be answered with `want`: the status,
    /// the error code (`None`: no error) and whether it was a replay. The reply.
    pub async fn post_idempotent_expect(
        &self,
        path: &str,
        user: &TestUser,
        key: Option<&[u8]>,
        body: &str,
        want: (u16, Option<&str>, bool),
    ) -> anyhow::Result<Reply> {
        let (reply, replayed) = self.post_idempotent(path, user, key, body).await?;
        let got = (reply.status, reply.code(), replayed);
        anyhow::ensure!(
            got == want,
            "POST {path} {body} answered {got:?}, not {want:?}: {}",
            reply.body
        );
        Ok(reply)
    }

    /// Sends `n` identical [`ApiClient::post_idempotent`] requests at once and checks
    /// that exactly one ran (201, not a replay), every other being its replay or 409
    /// `idempotency_key_in_progress`: the call id of the one that ran.
    pub async fn post_idempotent_at_once(
        &self,
        n: usize,
        path: &str,
        user: &TestUser,
        key: &str,
        body: &str,
    ) -> anyhow::Result<String> {
        let sends = (0..n).map(|_| self.post_idempotent(path, user, Some(key.as_bytes()), body));
        let answers = futures::future::join_all(sends)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        one_ran(&answers)
    }
}

fn one_ran(answers: &[(Reply, bool)]) -> anyhow::Result<String> {
    let ran: Vec<&Reply> = answers
        .iter()
        .filter(|(r, replayed)| r.status == 201 && !replayed)
        .map(|(r, _)| r)
        .collect();
    anyhow::ensure!(ran.len() == 1, "not exactly one ran: {answers:?}");
    for (r, replayed) in answers {
        match (r.status, replayed) {
            (201, _) => anyhow::ensure!(r.body == ran[0].body, "another answer: {answers:?}"),
            (409, false) if r.code() == Some("idempotency_key_in_progress") => {}
            _ => anyhow::bail!("unexpected answer {r:?} among {answers:?}"),
        }
    }
    ran[0].body["call"]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no call id in {}", ran[0].body))
}
