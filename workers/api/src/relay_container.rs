//! The `RelayContainer` Durable Object: the media relay in Cloudflare Containers
//! (`[env.production-containers]`, README "Deploying"), and the Worker's forwarding of
//! the relay's routes to it.
//!
//! A thin shell over `cmb_core::relay_container` (which paths, which environment): the
//! DO starts its container when it is not running, with the relay's settings taken from
//! the Worker's, and passes the request to the relay's port, retrying while the freshly
//! started relay is not yet listening, within a deadline. In the other environments the
//! class is exported but unbound, and the relay's paths are the route table's (404).

use std::time::Duration;

use cmb_core::relay_container::{self as core, INSTANCE_NAME, RELAY_PORT};
use futures::FutureExt as _;
use worker::{
    durable_object, ContainerStartupOptions, Delay, DurableObject, Env, ObjectNamespace, Request,
    Response, Result, State,
};

use crate::error::{ApiError, ApiResult};

/// How long a request may wait for the relay, a container start included.
const DEADLINE_MS: u64 = 20_000;
/// Pause between attempts while a started relay is not listening yet.
const RETRY_MS: u64 = 250;

/// The Worker side: a relay path goes to the one relay instance of `namespace`
/// (`RELAY_CONTAINER`), within the deadline.
pub async fn forward(namespace: ObjectNamespace, req: Request) -> ApiResult<Response> {
    let reply = async {
        let stub = namespace.id_from_name(INSTANCE_NAME)?.get_stub()?;
        stub.fetch_with_request(req).await
    };
    match with_deadline(reply, DEADLINE_MS + 5_000).await {
        // The DO's own failure carries its cause (logged at the boundary, never sent).
        Ok(Ok(mut resp)) if resp.headers().has(DO_ERROR_HEADER).unwrap_or(false) => {
            let status = resp.status_code();
            let body = resp.text().await.unwrap_or_default();
            Err(ApiError::from_internal_reply(
                "relay container",
                status,
                &body,
            ))
        }
        // The relay's answer (a WebSocket upgrade, the greeting's status), as it is.
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(ApiError::internal("relay container", e)),
        Err(e) => Err(ApiError::internal("relay container", e)),
    }
}

/// Marks a reply the DO made itself (an internal reply), as opposed to the relay's.
const DO_ERROR_HEADER: &str = "x-cmb-relay-container-error";

#[durable_object]
pub struct RelayContainer {
    state: State,
    env: Env,
}

impl DurableObject for RelayContainer {
    fn new(state: State, env: Env) -> Self {
        Self { state, env }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.serve(req).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                let mut reply = e.into_internal_reply()?;
                reply.headers_mut().set(DO_ERROR_HEADER, "1")?;
                Ok(reply)
            }
        }
    }
}

impl RelayContainer {
    async fn serve(&self, req: Request) -> ApiResult<Response> {
        let Some(container) = self.state.container() else {
            return Err(ApiError::new(
                503,
                "misconfigured",
                "RelayContainer has no container: this environment needs a [[containers]] entry with class_name = \"RelayContainer\".",
            ));
        };
        if !container.running() {
            let env = core::container_env(|name| {
                self.env
                    .secret(name)
                    .map(|s| s.to_string())
                    .or_else(|_| self.env.var(name).map(|v| v.to_string()))
                    .ok()
            })
            .map_err(|problems| {
                let names: Vec<&str> = problems.iter().map(|p| p.name).collect();
                ApiError::new(
                    503,
                    "misconfigured",
                    format!(
                        "The relay container cannot start: {} missing.",
                        names.join(", ")
                    ),
                )
            })?;
            let mut options = ContainerStartupOptions::new();
            for (name, value) in &env {
                options.add_env(name, value);
            }
            // Deepgram, ElevenLabs and this Worker's control channel are on the internet.
            options.enable_internet(true);
            container
                .start(Some(options))
                .map_err(|e| ApiError::internal("starting the relay container", e))?;
        }
        let port = container
            .get_tcp_port(RELAY_PORT)
            .map_err(|e| ApiError::internal("relay container port", e))?;
        let started = worker::Date::now().as_millis();
        loop {
            let attempt = req
                .clone()
                .map_err(|e| ApiError::internal("relay request", e))?;
            let left = DEADLINE_MS.saturating_sub(worker::Date::now().as_millis() - started);
            match with_deadline(port.fetch_request(attempt), left.max(1)).await {
                Ok(Ok(resp)) => return Ok(resp),
                // Refused: the relay is still starting.
                Ok(Err(_)) if left > RETRY_MS => {
                    Delay::from(Duration::from_millis(RETRY_MS)).await;
                }
                Ok(Err(e)) => return Err(ApiError::internal("relay container", e)),
                Err(e) => return Err(ApiError::internal("relay container", e)),
            }
        }
    }
}

/// `fut`, or an error once `ms` have passed.
async fn with_deadline<T>(
    fut: impl std::future::Future<Output = T>,
    ms: u64,
) -> std::result::Result<T, String> {
    let fut = fut.fuse();
    let timer = Delay::from(Duration::from_millis(ms)).fuse();
    futures::pin_mut!(fut, timer);
    futures::select! {
        out = fut => Ok(out),
        () = timer => Err(format!("no answer within {ms} ms")),
    }
}
