//! The fake Twilio's REST API (PROTOCOLS.md §3): create, fetch and update Calls, with
//! HTTP Basic auth and Twilio's error JSON.
//!
//! Owns request parsing and validation and the call resource's JSON shape. It hands a
//! valid new call to `call.rs` and never runs call behaviour itself. Error codes beyond
//! those PROTOCOLS.md lists (20001 for other invalid parameters, 21220 for updating a call
//! in the wrong state) are the fake's best reading of Twilio's catalogue.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::call::{self, TwimlSource};
use super::{new_sid, rfc2822, CallRecord, CallStatus, Command, Shared, API_VERSION};
use crate::fakes::faults::ErrorResponder;

/// Twilio's default and maximum ring timeout, in seconds.
const DEFAULT_TIMEOUT_SECS: u32 = 60;
const MAX_TIMEOUT_SECS: u32 = 600;
/// How long an update waits for the call to reach its final status before answering.
const UPDATE_SETTLE: Duration = Duration::from_secs(3);

pub(super) fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Calls.json",
            post(create_call).get(list_calls),
        )
        // `{sid}.json` is one path segment; the handlers strip the suffix themselves.
        .route(
            "/2010-04-01/Accounts/{account}/Calls/{call}",
            get(fetch_call).post(update_call),
        )
        .with_state(shared)
}

/// An error in Twilio's 2010 API shape.
#[derive(Debug)]
pub(super) struct TwilioError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl TwilioError {
    pub(super) fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(code: u32, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(super) fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            20404,
            format!("The requested resource {path} was not found"),
        )
    }
}

impl IntoResponse for TwilioError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.code,
            "message": self.message,
            "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
            "status": self.status.as_u16(),
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"Twilio API\""),
            );
        }
        response
    }
}

/// Error bodies for the fault layer: the Twilio code that goes with each status.
pub(super) fn error_responder() -> ErrorResponder {
    Arc::new(|status: StatusCode| {
        let code = match status.as_u16() {
            401 => 20003,
            403 => 20403,
            404 => 20404,
            429 => 20429,
            503 => 20503,
            s if s >= 500 => 20500,
            _ => 20001,
        };
        let message = status.canonical_reason().unwrap_or("Error");
        TwilioError::new(status, code, message).into_response()
    })
}

/// Checks HTTP Basic `AccountSid:AuthToken` and that the path names that account.
pub(super) fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    account: &str,
    path: &str,
) -> Result<(), TwilioError> {
    let unauthorized = || TwilioError::new(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| unauthorized())?;
    let decoded = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, password) = decoded.split_once(':').ok_or_else(unauthorized)?;
    if user != shared.cfg.account_sid || password != shared.cfg.auth_token {
        return Err(unauthorized());
    }
    if account != shared.cfg.account_sid {
        // Valid credentials for another account's resources: Twilio answers "not found".
        return Err(TwilioError::not_found(path));
    }
    Ok(())
}

pub(super) fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, TwilioError> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        TwilioError::bad_request(20001, format!("Unable to parse the request body: {e}"))
    })
}

pub(super) fn first<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `+` then 2 to 15 digits, the first not 0 (ITU-T E.164).
pub(super) fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn is_http_url(value: &str) -> bool {
    url::Url::parse(value).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

fn parse_method(form: &[(String, String)], name: &str) -> Result<String, TwilioError> {
    match first(form, name) {
        None | Some("") => Ok("POST".to_owned()),
        Some(m) if m.eq_ignore_ascii_case("GET") || m.eq_ignore_ascii_case("POST") => {
            Ok(m.to_ascii_uppercase())
        }
        Some(m) => Err(TwilioError::bad_request(
            20001,
            format!("{name} must be either GET or POST, got '{m}'"),
        )),
    }
}

/// A validated create request.
struct NewCall {
    to: String,
    from: String,
    source: TwimlSource,
    url: Option<String>,
    method: String,
    twiml: Option<String>,
    status_callback: Option<String>,
    status_callback_method: String,
    events: Vec<String>,
    timeout_secs: u32,
    machine_detection: Option<String>,
}

fn validate_create(form: &[(String, String)]) -> Result<NewCall, TwilioError> {
    let to = first(form, "To")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| TwilioError::bad_request(21201, "No 'To' number is specified"))?;
    if !is_e164(to) {
        return Err(TwilioError::bad_request(
            21211,
            format!("The 'To' number {to} is not a valid phone number."),
        ));
    }
    let from = first(form, "From")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| TwilioError::bad_request(21213, "No 'From' number is specified"))?;
    if !is_e164(from) {
        return Err(TwilioError::bad_request(
            21212,
            format!("The 'From' number {from} is not a valid phone number, shortcode, or alphanumeric sender ID."),
        ));
    }
    let method = parse_method(form, "Method")?;
    let url = first(form, "Url").filter(|v| !v.is_empty());
    let twiml = first(form, "Twiml").filter(|v| !v.is_empty());
    let source = match (url, twiml) {
        (Some(url), _) => {
            if !is_http_url(url) {
                return Err(TwilioError::bad_request(
                    21205,
                    format!("Url is not a valid URL: {url}"),
                ));
            }
            TwimlSource::Url {
                url: url.to_owned(),
                method: method.clone(),
            }
        }
        (None, Some(doc)) => TwimlSource::Inline(doc.to_owned()),
        (None, None) => {
            // The fake has no Applications, so ApplicationSid cannot stand in for Url.
            return Err(TwilioError::bad_request(
                21205,
                "Url parameter is required. Provide Url or Twiml (ApplicationSid is not supported by the fake).",
            ));
        }
    };
    let status_callback = first(form, "StatusCallback").filter(|v| !v.is_empty());
    if let Some(cb) = status_callback {
        if !is_http_url(cb) {
            return Err(TwilioError::bad_request(
                21609,
                format!("StatusCallback is not a valid URL: {cb}"),
            ));
        }
    }
    let status_callback_method = parse_method(form, "StatusCallbackMethod")?;
    let mut events = Vec::new();
    // Repeated keys are the documented form; some clients join values with spaces.
    for value in form
        .iter()
        .filter(|(k, _)| k == "StatusCallbackEvent")
        .flat_map(|(_, v)| v.split_whitespace())
    {
        if !matches!(value, "initiated" | "ringing" | "answered" | "completed") {
            return Err(TwilioError::bad_request(
                20001,
                format!("StatusCallbackEvent '{value}' is not one of initiated, ringing, answered, completed"),
            ));
        }
        if !events.iter().any(|e| e == value) {
            events.push(value.to_owned());
        }
    }
    let timeout_secs = match first(form, "Timeout") {
        None | Some("") => DEFAULT_TIMEOUT_SECS,
        Some(t) => t
            .parse::<u32>()
            .map_err(|_| {
                TwilioError::bad_request(20001, format!("Timeout must be an integer, got '{t}'"))
            })?
            // Twilio silently caps the ring timeout at 600 s.
            .min(MAX_TIMEOUT_SECS),
    };
    let machine_detection = match first(form, "MachineDetection") {
        None | Some("") => None,
        Some(m @ ("Enable" | "DetectMessageEnd")) => Some(m.to_owned()),
        Some(m) => {
            return Err(TwilioError::bad_request(
                20001,
                format!("MachineDetection must be Enable or DetectMessageEnd, got '{m}'"),
            ))
        }
    };
    Ok(NewCall {
        to: to.to_owned(),
        from: from.to_owned(),
        source,
        url: url.map(str::to_owned),
        method,
        twiml: twiml.map(str::to_owned),
        status_callback: status_callback.map(str::to_owned),
        status_callback_method,
        events,
        timeout_secs,
        machine_detection,
    })
}

async fn create_call(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{API_VERSION}/Accounts/{account}/Calls.json");
    if let Err(e) = authorize(&shared, &headers, &account, &path) {
        return e.into_response();
    }
    let form = match parse_form(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let new = match validate_create(&form) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(fake = "twilio", code = e.code, message = %e.message, "create call refused");
            return e.into_response();
        }
    };
    let now = OffsetDateTime::now_utc();
    let sid = new_sid("CA");
    let record = CallRecord {
        sid: sid.clone(),
        params: form,
        to: new.to.clone(),
        from: new.from,
        url: new.url,
        method: new.method,
        twiml: new.twiml,
        status_callback: new.status_callback,
        status_callback_method: new.status_callback_method,
        status_callback_events: new.events,
        timeout_secs: new.timeout_secs,
        machine_detection: new.machine_detection,
        status: CallStatus::Queued,
        status_history: vec![CallStatus::Queued],
        answered_by: None,
        date_created: now,
        date_updated: now,
        start_time: None,
        end_time: None,
        duration_secs: None,
        callbacks: Vec::new(),
        stream_callbacks: Vec::new(),
        twiml_fetches: Vec::new(),
        streams: Vec::new(),
        notices: Vec::new(),
        transcript: Vec::new(),
        heard_text: String::new(),
        sim_events: Vec::new(),
        finished: false,
    };
    let body = call_json(&record, &shared.cfg.account_sid);
    let script = shared.script_for(&new.to);
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut state = shared.lock();
        let i = state.calls.len();
        state.index.insert(sid.clone(), i);
        state.calls.push(record);
        state.commands.insert(sid.clone(), tx);
    }
    shared.changed.send_modify(|v| *v += 1);
    tracing::info!(fake = "twilio", call_sid = %sid, to = %new.to, "call created");
    call::start(shared.clone(), sid, new.source, script, rx);
    (StatusCode::CREATED, Json(body)).into_response()
}

/// `GET Calls.json?To=…`: the Calls list, newest first, filtered by `To` (the date
/// filters are accepted and, at a fake's time scale, every call matches them).
async fn list_calls(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/{API_VERSION}/Accounts/{account}/Calls.json");
    if let Err(e) = authorize(&shared, &headers, &account, &path) {
        return e.into_response();
    }
    let to = query
        .iter()
        .find(|(k, _)| k == "To")
        .map(|(_, v)| v.clone());
    let mut calls: Vec<Value> = {
        let state = shared.lock();
        state
            .calls
            .iter()
            .filter(|c| to.as_deref().is_none_or(|t| c.to == t))
            .map(|c| call_json(c, &shared.cfg.account_sid))
            .collect()
    };
    calls.reverse();
    Json(serde_json::json!({
        "calls": calls,
        "page": 0,
        "page_size": 50,
        "uri": path,
        "next_page_uri": null,
    }))
    .into_response()
}

async fn fetch_call(
    State(shared): State<Arc<Shared>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/{API_VERSION}/Accounts/{account}/Calls/{file}");
    if let Err(e) = authorize(&shared, &headers, &account, &path) {
        return e.into_response();
    }
    match file.strip_suffix(".json").and_then(|sid| shared.call(sid)) {
        Some(record) => Json(call_json(&record, &shared.cfg.account_sid)).into_response(),
        None => TwilioError::not_found(&path).into_response(),
    }
}

async fn update_call(
    State(shared): State<Arc<Shared>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{API_VERSION}/Accounts/{account}/Calls/{file}");
    if let Err(e) = authorize(&shared, &headers, &account, &path) {
        return e.into_response();
    }
    let Some((sid, record)) = file
        .strip_suffix(".json")
        .and_then(|sid| shared.call(sid).map(|r| (sid.to_owned(), r)))
    else {
        return TwilioError::not_found(&path).into_response();
    };
    let form = match parse_form(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let command = match plan_update(&record, &form) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Some(command) = command {
        let wait_final = !matches!(command, Command::Redirect(_));
        let sent = shared
            .lock()
            .commands
            .get(&sid)
            .is_some_and(|tx| tx.send(command).is_ok());
        if sent && wait_final {
            settle(&shared, &sid).await;
        }
    }
    match shared.call(&sid) {
        Some(record) => Json(call_json(&record, &shared.cfg.account_sid)).into_response(),
        None => TwilioError::not_found(&path).into_response(),
    }
}

/// Decides what an update asks of the call, or why it is refused.
fn plan_update(
    record: &CallRecord,
    form: &[(String, String)],
) -> Result<Option<Command>, TwilioError> {
    let not_in_progress =
        || TwilioError::bad_request(21220, "Call is not in-progress. Cannot redirect.");
    match first(form, "Status") {
        Some("completed") => {
            if record.status.is_final() {
                return Err(not_in_progress());
            }
            return Ok(Some(Command::Hangup { by_callee: false }));
        }
        Some("canceled") => {
            return match record.status {
                CallStatus::Queued | CallStatus::Ringing => Ok(Some(Command::Cancel)),
                // Canceling only applies before pick-up; an answered call needs `completed`.
                _ => Err(TwilioError::bad_request(
                    21220,
                    format!(
                        "Call is {}: only queued or ringing calls can be canceled (use Status=completed).",
                        record.status.as_str()
                    ),
                )),
            };
        }
        Some(other) => {
            return Err(TwilioError::bad_request(
                20001,
                format!("Status must be completed or canceled, got '{other}'"),
            ))
        }
        None => {}
    }
    let method = parse_method(form, "Method")?;
    let source = match (first(form, "Url"), first(form, "Twiml")) {
        (Some(url), _) if !url.is_empty() => {
            if !is_http_url(url) {
                return Err(TwilioError::bad_request(
                    21205,
                    format!("Url is not a valid URL: {url}"),
                ));
            }
            TwimlSource::Url {
                url: url.to_owned(),
                method,
            }
        }
        (_, Some(doc)) if !doc.is_empty() => TwimlSource::Inline(doc.to_owned()),
        // Nothing to change (e.g. only StatusCallback): the call is returned as is.
        _ => return Ok(None),
    };
    if record.status != CallStatus::InProgress {
        return Err(not_in_progress());
    }
    Ok(Some(Command::Redirect(source)))
}

/// Waits (briefly) until the call reached a final status, so the answer shows it.
async fn settle(shared: &Shared, sid: &str) {
    let mut rx = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + UPDATE_SETTLE;
    loop {
        rx.borrow_and_update();
        if shared.call(sid).is_none_or(|c| c.status.is_final()) {
            return;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            tracing::warn!(fake = "twilio", call_sid = %sid, "call did not end within the update wait");
            return;
        }
    }
}

/// US numbers get Twilio's `(555) 867-5310` form; others are shown as given.
fn formatted(number: &str) -> String {
    match number.strip_prefix("+1") {
        Some(d) if d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit()) => {
            format!("({}) {}-{}", &d[..3], &d[3..6], &d[6..])
        }
        _ => number.to_owned(),
    }
}

/// The call resource as the 2010 API returns it (snake_case, RFC 2822 dates).
pub(super) fn call_json(record: &CallRecord, account_sid: &str) -> Value {
    let base = format!("/{API_VERSION}/Accounts/{account_sid}/Calls/{}", record.sid);
    let sub = |name: &str| format!("{base}/{name}.json");
    json!({
        "sid": record.sid,
        "date_created": rfc2822(record.date_created),
        "date_updated": rfc2822(record.date_updated),
        "parent_call_sid": null,
        "account_sid": account_sid,
        "to": record.to,
        "to_formatted": formatted(&record.to),
        "from": record.from,
        "from_formatted": formatted(&record.from),
        "phone_number_sid": null,
        "status": record.status.as_str(),
        "start_time": record.start_time.map(rfc2822),
        "end_time": record.end_time.map(rfc2822),
        "duration": record.duration_secs.map(|d| d.to_string()),
        "price": null,
        "price_unit": "USD",
        "direction": "outbound-api",
        "answered_by": record.answered_by.map(|a| a.as_str()),
        "api_version": API_VERSION,
        "forwarded_from": null,
        "group_sid": null,
        "caller_name": null,
        "queue_time": "0",
        "trunk_sid": null,
        "uri": format!("{base}.json"),
        "subresource_uris": {
            "feedback": format!("{base}/Feedback.json"),
            "notifications": sub("Notifications"),
            "recordings": sub("Recordings"),
            "streams": sub("Streams"),
            "payments": sub("Payments"),
            "siprec": sub("Siprec"),
            "events": sub("Events"),
            "user_defined_message_subscriptions": sub("UserDefinedMessageSubscriptions"),
            "user_defined_messages": sub("UserDefinedMessages"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// E.164: plus sign, 2–15 digits, no leading zero.
    #[test]
    fn e164_rules() {
        for ok in ["+15558675310", "+447911123456", "+12"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in [
            "15558675310",
            "+0155586753",
            "+1555867531012345",
            "+1 555",
            "+",
            "",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    /// Each invalid create input maps to Twilio's code.
    #[test]
    fn create_validation_codes() {
        let base = [
            ("To", "+15558675310"),
            ("From", "+15017122661"),
            ("Url", "https://x.test/twiml"),
        ];
        let code = |pairs: &[(&str, &str)]| validate_create(&form(pairs)).err().map(|e| e.code);
        assert_eq!(code(&base), None);
        assert_eq!(code(&base[1..]), Some(21201));
        assert_eq!(code(&[base[0], base[2]]), Some(21213));
        assert_eq!(code(&[("To", "5558675310"), base[1], base[2]]), Some(21211));
        assert_eq!(code(&[base[0], ("From", "me"), base[2]]), Some(21212));
        assert_eq!(code(&base[..2]), Some(21205));
        assert_eq!(code(&[base[0], base[1], ("Url", "ftp://x/y")]), Some(21205));
        assert_eq!(
            code(&[base[0], base[1], base[2], ("Timeout", "soon")]),
            Some(20001)
        );
        assert_eq!(
            code(&[base[0], base[1], base[2], ("MachineDetection", "yes")]),
            Some(20001)
        );
        assert_eq!(
            code(&[
                base[0],
                base[1],
                base[2],
                ("StatusCallbackEvent", "picked-up")
            ]),
            Some(20001)
        );
        assert_eq!(
            code(&[base[0], base[1], base[2], ("Method", "PUT")]),
            Some(20001)
        );
    }

    /// Events are read from repeated keys and from space-joined values, deduplicated.
    #[test]
    fn status_callback_events_both_forms() {
        let new = validate_create(&form(&[
            ("To", "+15558675310"),
            ("From", "+15017122661"),
            ("Twiml", "<Response/>"),
            ("StatusCallbackEvent", "initiated ringing"),
            ("StatusCallbackEvent", "answered"),
            ("StatusCallbackEvent", "ringing"),
            ("Timeout", "900"),
        ]))
        .unwrap();
        assert_eq!(new.events, vec!["initiated", "ringing", "answered"]);
        assert_eq!(new.timeout_secs, 600);
        assert!(matches!(new.source, TwimlSource::Inline(_)));
    }

    /// US numbers are formatted like Twilio's `to_formatted`.
    #[test]
    fn formatting() {
        assert_eq!(formatted("+15558675310"), "(555) 867-5310");
        assert_eq!(formatted("+447911123456"), "+447911123456");
    }
}
