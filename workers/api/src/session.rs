//! The `CallSession` Durable Object: one per call, owner of the call's state machine and
//! conversation. (Its behaviour arrives with the calls issue; the class exists now so the
//! binding and its SQLite storage migration are in place from the first deploy.)

use worker::{durable_object, DurableObject, Env, Request, Response, Result, State};

#[durable_object]
pub struct CallSession {
    #[allow(dead_code)]
    state: State,
    #[allow(dead_code)]
    env: Env,
}

impl DurableObject for CallSession {
    fn new(state: State, env: Env) -> Self {
        Self { state, env }
    }

    async fn fetch(&self, _req: Request) -> Result<Response> {
        Response::error("not implemented yet", 501)
    }
}
