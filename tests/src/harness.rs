//! Shared stacks for integration tests: one real Worker (under `wrangler dev`, fresh local
//! D1/KV/DO state) per test binary, started on first use, configured with test secrets
//! and pointed at in-process fake providers.
//!
//! The Worker outlives individual `#[tokio::test]` runtimes, so the fakes it talks to run
//! on a dedicated runtime thread owned by this module.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{ApiClient, TestUser};
use crate::fakes;
use crate::stack::{Stack, StackOptions};

/// Test secrets, shared with the fakes (which check them) and the tests (which forge or
/// sign with them). Long enough for the Worker's config rules.
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789abcdef";
pub const RELAY_SECRET: &str = "test-relay-secret-0123456789abcdef0123456789abcdef";
/// The browser frontend's origin the test Workers allow (`CORS_ORIGINS`).
pub const APP_ORIGIN: &str = "http://app.test:5173";
pub const TWILIO_ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
pub const TWILIO_AUTH_TOKEN: &str = "test-twilio-auth-token";
pub const STRIPE_SECRET_KEY: &str = "sk_test_call_me_back";
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_test_call_me_back";
pub const LLM_API_KEY: &str = "test-llm-key";
pub const ADMIN_EMAIL: &str = "admin@callmeback.test";

/// A running Worker plus the fakes it is wired to.
pub struct TestWorker {
    stack: Stack,
    pub twilio: fakes::twilio::Handle,
    /// The fake Stripe behind `STRIPE_API_BASE`; its pay page delivers signed
    /// `checkout.session.completed` events to this Worker's webhook.
    pub stripe: fakes::stripe::Handle,
    /// The Worker's Postgres database when the suite runs on Postgres; `None` on D1
    /// (whose file is under [`Stack::dir`]).
    pub postgres_url: Option<String>,
}

impl TestWorker {
    pub fn url(&self) -> String {
        self.stack.worker_url()
    }

    /// The running stack (its state directory holds the Worker's local D1).
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// An API client that can read the fake Twilio's verification SMS.
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.url()).with_sms(self.twilio.sms_inbox())
    }
}

/// The runtime that hosts the fakes for the whole test binary.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fakes")
            .build()
            .expect("fakes runtime")
    })
}

/// Runs a future to completion on the fakes' runtime, from any context (a test's own
/// runtime cannot block on another one, so this hops through a plain thread).
pub fn on_fakes_runtime<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || runtime().block_on(fut))
        .join()
        .expect("fakes runtime thread")
}

/// The Worker configuration the tests run with, pointing at the given fake bases.
pub fn worker_vars(twilio_base: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        vars.insert(k.to_string(), v.to_string());
    };
    set("JWT_SECRET", JWT_SECRET);
    set("RELAY_SECRET", RELAY_SECRET);
    set("RELAY_URL", "ws://127.0.0.1:9/twilio");
    set("TWILIO_ACCOUNT_SID", TWILIO_ACCOUNT_SID);
    set("TWILIO_AUTH_TOKEN", TWILIO_AUTH_TOKEN);
    set("TWILIO_PHONE_NUMBER", "+15005550006");
    set("TWILIO_API_BASE", twilio_base);
    set("LLM_API_KEY", LLM_API_KEY);
    set("LLM_API_BASE", "http://127.0.0.1:9/v1");
    set("STRIPE_SECRET_KEY", STRIPE_SECRET_KEY);
    set("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET);
    set("STRIPE_API_BASE", "http://127.0.0.1:9");
    // Listed, to show it grants nothing any more (admins come from `xtask admin grant`).
    set("ADMIN_EMAILS", ADMIN_EMAIL);
    set(
        "TWILIO_VERIFY_SERVICE_SID",
        crate::fakes::twilio::VERIFY_SERVICE_SID,
    );
    set("TWILIO_VERIFY_API_BASE", twilio_base);
    set("FREE_CREDITS", "200");
    set("CORS_ORIGINS", APP_ORIGIN);
    // A call whose callbacks are lost is looked up 3 s after its ring timeout (30 s).
    set("CALL_RECONCILE_MARGIN_SECS", "3");
    // Test-only: a schedule's retry may come at once (users may not go below 5 minutes).
    set("SCHEDULE_MIN_RETRY_MINUTES", "0");
    // The api_* stacks have no relay (RELAY_URL is dead): an answered call must not be
    // ended for its missing audio while a test still looks at it.
    set("CALL_RELAY_CONNECT_TIMEOUT_SECS", "600");
    vars
}

/// Which database the integration suite runs on: `CMB_DB_BACKEND=postgres` (set by
/// `cargo xtask test` for its second pass) or D1, the default.
pub fn postgres_mode() -> bool {
    std::env::var("CMB_DB_BACKEND").is_ok_and(|v| v == "postgres")
}

/// Points a stack at a fresh Postgres database when the suite runs on Postgres.
pub fn with_backend(mut opts: StackOptions, label: &str) -> StackOptions {
    if postgres_mode() {
        let db = crate::pg::fresh_database(label).expect("a fresh Postgres database");
        opts.worker_vars
            .insert("DB_BACKEND".into(), "postgres".into());
        opts.postgres_url = Some(db.url());
    }
    opts
}

/// The shared Worker of this test binary, started on first use.
pub fn worker() -> &'static TestWorker {
    static WORKER: OnceLock<TestWorker> = OnceLock::new();
    WORKER.get_or_init(|| {
        let mut cfg = fakes::twilio::Config::new(TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN);
        // Short rings keep the suite fast; the protocol Twilio speaks is unchanged.
        cfg.ring = std::time::Duration::from_millis(300);
        let twilio = on_fakes_runtime(fakes::twilio::spawn(cfg)).expect("start fake Twilio");
        let stripe = on_fakes_runtime(fakes::stripe::spawn(fakes::stripe::Config::new(
            STRIPE_SECRET_KEY,
        )))
        .expect("start fake Stripe");
        let mut vars = worker_vars(&twilio.base_url());
        vars.insert("STRIPE_API_BASE".into(), stripe.base_url());
        let opts = StackOptions {
            worker_vars: vars,
            // PUBLIC_BASE_URL must be the Worker's own address (Twilio signs it); the
            // launcher fills it in once it knows the port.
            ..Default::default()
        };
        let opts = with_backend(opts, "api");
        let postgres_url = opts.postgres_url.clone();
        let stack = Stack::start(opts).expect("start the Worker under wrangler dev");
        stripe.set_webhook(Some(fakes::stripe::WebhookTarget {
            url: format!("{}/api/payments/webhook", stack.worker_url()),
            secret: STRIPE_WEBHOOK_SECRET.into(),
        }));
        TestWorker {
            stack,
            twilio,
            stripe,
            postgres_url,
        }
    })
}

pub fn jwt_secret() -> &'static str {
    JWT_SECRET
}

/// The admin user of this binary's Worker: registered like anyone (its email is in
/// `ADMIN_EMAILS`, which grants nothing), then made an admin by the operator command
/// (`cargo xtask admin grant`), once per binary.
pub async fn admin(api: &ApiClient) -> TestUser {
    static ADMIN: tokio::sync::Mutex<Option<TestUser>> = tokio::sync::Mutex::const_new(None);
    let mut slot = ADMIN.lock().await;
    if let Some(user) = slot.clone() {
        return user;
    }
    let user = admin_on(api, &worker().stack).await;
    *slot = Some(user.clone());
    user
}

/// Registers the admin on `stack`'s Worker and grants the role with the operator
/// command. For stacks of their own (the shared Worker's admin is [`admin`]).
pub async fn admin_on(api: &ApiClient, stack: &Stack) -> TestUser {
    let password = "admin password long enough".to_string();
    let reply = api
        .post(
            "/api/auth/register",
            None,
            &json!({ "email": ADMIN_EMAIL, "password": password, "name": "Admin" }),
        )
        .await
        .expect("register admin");
    assert_eq!(reply.status, 201, "admin: {}", reply.body);
    assert_eq!(
        reply.body["user"]["role"], "user",
        "registering an ADMIN_EMAILS address grants nothing"
    );
    // Blocking (wrangler takes a second or two): the fakes run on their own runtime.
    let outcome = stack
        .set_admin(ADMIN_EMAIL, xtask::admin::Change::Grant)
        .expect("cargo xtask admin grant");
    assert_eq!(outcome.after, "admin");
    let user = TestUser {
        id: reply.body["user"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        email: ADMIN_EMAIL.into(),
        password,
        token: reply.body["token"].as_str().unwrap_or_default().to_string(),
    };
    user
}

/// The voice stacks' `AI_DISCLOSURE`: short, so the first call to each test number
/// (every test number is new) spends little time on it.
pub const VOICE_AI_DISCLOSURE: &str = "This is an AI voice.";

/// Provider keys of the voice stack's fakes.
pub const DG_KEY: &str = "dg-e2e-key";
pub const XI_KEY: &str = "xi-e2e-key";
pub const LLM_KEY: &str = "csk-e2e-key";

/// How slowly the voice stack's fakes answer; all zero (as fast as loopback) by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProviderDelays {
    /// Twilio media stream, each way ([`fakes::twilio::Config::media_one_way_delay`]).
    pub twilio_media_one_way: Duration,
    /// Deepgram endpointing instead of the relay's query value
    /// ([`fakes::deepgram::Config::endpointing_override_ms`]); `None`: the relay's.
    pub deepgram_endpointing_ms: Option<u64>,
    /// LLM time to first token and tokens per second ([`fakes::cerebras::Config`]).
    pub llm_first_token: Duration,
    pub llm_tokens_per_sec: Option<f64>,
    /// ElevenLabs WebSocket connect, and time to first audio of each generation (also
    /// the HTTP stream's first byte) ([`fakes::elevenlabs::Config`]).
    pub tts_connect: Duration,
    pub tts_first_audio: Duration,
}

/// The whole voice path: Worker and relay processes, and in-process fakes for Twilio
/// (with the phone simulator), Deepgram, ElevenLabs and Cerebras.
pub struct VoiceStack {
    pub stack: Stack,
    pub twilio: fakes::twilio::Handle,
    pub deepgram: fakes::deepgram::Handle,
    pub elevenlabs: fakes::elevenlabs::Handle,
    pub cerebras: fakes::cerebras::Handle,
}

impl VoiceStack {
    /// An API client that can read this stack's fake Twilio verification SMS.
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.stack.worker_url()).with_sms(self.twilio.sms_inbox())
    }

    /// Starts everything; the LLM answers with `replies` in order, then echoes.
    pub fn start(replies: Vec<String>) -> VoiceStack {
        Self::start_with(replies, BTreeMap::new())
    }

    /// Like [`VoiceStack::start`], with extra Worker settings (e.g. a short idle timeout).
    pub fn start_with(
        replies: Vec<String>,
        extra_worker_vars: BTreeMap<String, String>,
    ) -> VoiceStack {
        Self::start_full(
            replies,
            extra_worker_vars,
            false,
            &ProviderDelays::default(),
            BTreeMap::new(),
        )
    }

    /// Like [`VoiceStack::start`], with extra relay settings (e.g. a longer
    /// `RELAY_DRAIN_SECS` than the test stacks' 3 s).
    pub fn start_with_relay_env(
        replies: Vec<String>,
        extra_relay_env: BTreeMap<String, String>,
    ) -> VoiceStack {
        Self::start_full(
            replies,
            BTreeMap::new(),
            false,
            &ProviderDelays::default(),
            extra_relay_env,
        )
    }

    /// Like [`VoiceStack::start_with`], with the fakes answering as slowly as `delays`
    /// says (the latency benchmark).
    pub fn start_with_delays(
        replies: Vec<String>,
        extra_worker_vars: BTreeMap<String, String>,
        delays: &ProviderDelays,
    ) -> VoiceStack {
        Self::start_full(replies, extra_worker_vars, false, delays, BTreeMap::new())
    }

    /// The `cargo xtask dev` demo's providers: the fake LLM acts (`cerebras::acting`),
    /// and callees play the demo's first call, then its callback.
    pub fn start_demo() -> VoiceStack {
        Self::start_full(
            Vec::new(),
            BTreeMap::new(),
            true,
            &ProviderDelays::default(),
            BTreeMap::new(),
        )
    }

    fn start_full(
        replies: Vec<String>,
        extra_worker_vars: BTreeMap<String, String>,
        demo: bool,
        delays: &ProviderDelays,
        extra_relay_env: BTreeMap<String, String>,
    ) -> VoiceStack {
        use fakes::{cerebras, deepgram, elevenlabs, twilio};
        let mut tcfg = twilio::Config::new(TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN);
        tcfg.ring = std::time::Duration::from_millis(200);
        tcfg.media_one_way_delay = delays.twilio_media_one_way;
        if demo {
            tcfg.default_script =
                twilio::CalleeScript::answer(crate::sim::SimScript::demo_first_call());
            tcfg.repeat_script = Some(twilio::CalleeScript::answer(
                crate::sim::SimScript::demo_callback(),
            ));
        }
        let twilio = on_fakes_runtime(twilio::spawn(tcfg)).expect("fake Twilio");
        let deepgram = on_fakes_runtime(deepgram::spawn(deepgram::Config {
            api_key: DG_KEY.into(),
            endpointing_override_ms: delays.deepgram_endpointing_ms,
            ..Default::default()
        }))
        .expect("fake Deepgram");
        let elevenlabs = on_fakes_runtime(elevenlabs::spawn(elevenlabs::Config {
            api_key: XI_KEY.into(),
            connect_delay: delays.tts_connect,
            first_audio_delay: delays.tts_first_audio,
            http_first_byte: delays.tts_first_audio,
            ..Default::default()
        }))
        .expect("fake ElevenLabs");
        let cerebras = on_fakes_runtime(cerebras::spawn(cerebras::Config {
            api_key: LLM_KEY.into(),
            script: replies,
            acts: demo,
            first_token_delay: delays.llm_first_token,
            tokens_per_sec: delays.llm_tokens_per_sec,
            ..Default::default()
        }))
        .expect("fake Cerebras");

        let mut worker_vars = worker_vars(&twilio.base_url());
        worker_vars.insert("LLM_API_BASE".into(), format!("{}/v1", cerebras.base_url()));
        worker_vars.insert("LLM_API_KEY".into(), LLM_KEY.into());
        worker_vars.insert("AI_DISCLOSURE".into(), VOICE_AI_DISCLOSURE.into());
        // The launcher points RELAY_URL at the relay it starts.
        worker_vars.remove("RELAY_URL");
        worker_vars.extend(extra_worker_vars);
        let mut relay_env = BTreeMap::from([
            ("DEEPGRAM_API_KEY".to_string(), DG_KEY.to_string()),
            (
                "DEEPGRAM_URL".to_string(),
                format!("{}/v1/listen", deepgram.ws_url()),
            ),
            ("ELEVENLABS_API_KEY".to_string(), XI_KEY.to_string()),
            ("ELEVENLABS_URL".to_string(), elevenlabs.ws_url()),
        ]);
        relay_env.extend(extra_relay_env);
        let opts = with_backend(
            StackOptions {
                worker_vars,
                with_relay: true,
                relay_env,
                ..Default::default()
            },
            "voice",
        );
        let stack = Stack::start(opts).expect("start Worker and relay");
        VoiceStack {
            stack,
            twilio,
            deepgram,
            elevenlabs,
            cerebras,
        }
    }

    /// One short conversation with Brad on a fresh number: the persona greets, the callee
    /// says `line`, the persona answers, the callee hangs up. The call's id and its
    /// settled detail (`GET /api/calls/:id`), once it is `completed`.
    pub async fn one_exchange(
        &self,
        api: &ApiClient,
        user: &TestUser,
        line: &str,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        use crate::sim::{SimScript, Step, Utterance};
        let number = crate::api::fresh_number();
        self.twilio.set_script(
            number.clone(),
            fakes::twilio::CalleeScript::answer(SimScript::new(vec![
                Step::WaitForPersonaToFinish { silence_ms: 700 },
                Step::Say(Utterance::text(line)),
                Step::WaitForPersonaToFinish { silence_ms: 700 },
                Step::HangUp,
            ])),
        );
        let id = api.trigger_call(user, "brad", &number).await?;
        let done = api.wait_settled(user, &id, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            done["call"]["status"] == "completed",
            "not completed: {done}"
        );
        Ok((id, done))
    }
}

/// Runs a Node script of the repository (`tests/…/*.mjs`) with Node 22 and the npm
/// packages `cargo xtask setup` installs; it must exit 0 within `within` and print one
/// JSON value on stdout, which is returned. Any other outcome panics with its output.
pub async fn run_node_script(
    script: &str,
    env: &[(&str, String)],
    within: Duration,
) -> serde_json::Value {
    let repo =
        xtask::repo::Repo::from_crate_dir(env!("CARGO_MANIFEST_DIR")).expect("the repository root");
    let node = xtask::toolchain::Node::require(&repo).expect("Node 22 (cargo xtask setup)");
    let mut cmd = tokio::process::Command::new(node.bin_dir.join("node"));
    cmd.arg(repo.root().join(script))
        .current_dir(repo.root())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {within:?}"))
        .unwrap_or_else(|e| panic!("starting {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script}: {e}: {stdout}"))
}

/// Reads `ws` until the peer's close frame and returns its code: `None` for a close
/// frame without payload, or when the stream ends without one (read errors are skipped).
/// `Err` when `within` passes first. For the e2e tests that expect the relay to refuse
/// a stream (e.g. close 1008).
pub async fn wait_close_code<S, E>(
    ws: &mut S,
    within: Duration,
) -> Result<Option<u16>, tokio::time::error::Elapsed>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
{
    tokio::time::timeout(within, async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    type Read = Result<Message, &'static str>;

    fn close(code: u16) -> Read {
        Ok(Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        })))
    }

    /// Other messages and read errors before the close frame are passed over.
    #[tokio::test]
    async fn close_code_after_other_messages() {
        let mut ws = futures::stream::iter(vec![
            Ok(Message::text("hello")),
            Err("broken frame"),
            close(1008),
            Ok(Message::text("after")),
        ]);
        let got = wait_close_code(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(got.unwrap(), Some(1008));
    }

    /// A close frame without payload, and a stream that just ends, both give `None`.
    #[tokio::test]
    async fn no_code_without_payload_or_close() {
        let mut bare = futures::stream::iter(vec![Ok::<_, &str>(Message::Close(None))]);
        assert_eq!(
            wait_close_code(&mut bare, Duration::from_secs(5))
                .await
                .unwrap(),
            None
        );
        let mut ended = futures::stream::iter(vec![Ok::<_, &str>(Message::text("hi"))]);
        assert_eq!(
            wait_close_code(&mut ended, Duration::from_secs(5))
                .await
                .unwrap(),
            None
        );
    }

    /// A socket that stays open past the deadline is an `Err`.
    #[tokio::test(start_paused = true)]
    async fn deadline_passes() {
        let mut open = futures::stream::pending::<Read>();
        assert!(wait_close_code(&mut open, Duration::from_secs(5))
            .await
            .is_err());
    }
}
