//! The relay's warnings and errors, shipped to the Worker's event log in batches
//! (`POST {WORKER_URL}/internal/relay/events`, bearer `RELAY_SECRET`; the Worker's rules
//! are `cmb_core::events::from_relay`).
//!
//! Audio never waits for this: a [`Layer`] of the relay's own tracing hands each warning
//! or error to a bounded queue with `try_send` (a full queue drops the event and counts
//! it), and one task sends what is queued at most every [`FLUSH_EVERY`], with a deadline.
//! A batch that fails is dropped and counted too; the next batch says how many were lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Events waiting to be sent; more are dropped (and counted) rather than queued.
pub const QUEUE: usize = 512;
/// Most events per batch (the Worker's limit).
pub const BATCH_MAX: usize = cmb_core::events::RELAY_BATCH_MAX;
/// How long the first event of a batch waits for others.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Deadline of one batch's request.
const DEADLINE: Duration = Duration::from_secs(5);

/// One event as the Worker reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Shipped {
    pub at_ms: u64,
    pub level: &'static str,
    pub kind: String,
    pub call_id: Option<String>,
    pub fields: Map<String, Value>,
}

/// The tracing layer: warnings and errors of the relay's own code, queued.
pub struct Shipper {
    tx: mpsc::Sender<Shipped>,
    dropped: Arc<AtomicU64>,
}

/// The receiving end, for [`spawn`].
pub struct Queue {
    rx: mpsc::Receiver<Shipped>,
    dropped: Arc<AtomicU64>,
}

/// A layer and its queue.
pub fn channel(capacity: usize) -> (Shipper, Queue) {
    let (tx, rx) = mpsc::channel(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    (
        Shipper {
            tx,
            dropped: dropped.clone(),
        },
        Queue { rx, dropped },
    )
}

/// The event kind of a tracing target: its last path segment, as the Worker spells kinds
/// (`media_relay::deepgram` → `deepgram`).
pub fn kind_of(target: &str) -> String {
    let last = target.rsplit("::").next().unwrap_or(target);
    let kind: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if kind.starts_with(|c: char| c.is_ascii_lowercase()) {
        kind
    } else {
        format!("x{kind}")
    }
}

/// A span's `call_id`, kept so the events inside it name their call.
struct CallId(String);

#[derive(Default)]
struct Fields {
    map: Map<String, Value>,
    call_id: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "call_id" {
            self.call_id = Some(value.to_owned());
        }
        self.map.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.map.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "call_id" {
            self.call_id = Some(text.trim_matches('"').to_owned());
        }
        self.map.insert(field.name().to_owned(), Value::from(text));
    }
}

/// Only the relay's own code (not its libraries, not this module: a failed batch must
/// not queue an event about itself).
fn shipped_target(target: &str) -> bool {
    (target == "media_relay" || target.starts_with("media_relay::"))
        && !target.starts_with("media_relay::events")
}

impl<S> Layer<S> for Shipper
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(call_id), Some(span)) = (fields.call_id, ctx.span(id)) {
            span.extensions_mut().insert(CallId(call_id));
        }
    }

    /// `call_id` is often recorded once the call is known (`Span::record`).
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let (Some(call_id), Some(span)) = (fields.call_id, ctx.span(id)) {
            span.extensions_mut().replace(CallId(call_id));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            _ => return,
        };
        if !shipped_target(meta.target()) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let call_id = fields.call_id.take().or_else(|| {
            ctx.event_scope(event)?
                .find_map(|span| span.extensions().get::<CallId>().map(|c| c.0.clone()))
        });
        let shipped = Shipped {
            at_ms: now_ms(),
            level,
            kind: kind_of(meta.target()),
            call_id,
            fields: fields.map,
        };
        if self.tx.try_send(shipped).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The request body of one batch.
pub fn body(batch: &[Shipped], dropped: u64) -> Value {
    let events: Vec<Value> = batch
        .iter()
        .map(|e| {
            json!({
                "at_ms": e.at_ms, "level": e.level, "kind": e.kind,
                "call_id": e.call_id, "fields": e.fields,
            })
        })
        .collect();
    json!({ "events": events, "dropped": dropped })
}

/// Sends the queue's events to `url` until the queue closes (every [`Shipper`] dropped).
pub fn spawn(mut queue: Queue, url: String, secret: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = match reqwest::Client::builder().timeout(DEADLINE).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target: "media_relay::events", error = %e, "event shipping disabled");
                return;
            }
        };
        let mut batch = Vec::with_capacity(BATCH_MAX);
        while let Some(first) = queue.rx.recv().await {
            batch.push(first);
            let window = tokio::time::sleep(FLUSH_EVERY);
            tokio::pin!(window);
            while batch.len() < BATCH_MAX {
                tokio::select! {
                    next = queue.rx.recv() => match next {
                        Some(e) => batch.push(e),
                        None => break,
                    },
                    () = &mut window => break,
                }
            }
            let dropped = queue.dropped.swap(0, Ordering::Relaxed);
            let sent = http
                .post(&url)
                .bearer_auth(&secret)
                .json(&body(&batch, dropped))
                .send()
                .await;
            let ok = matches!(&sent, Ok(r) if r.status().is_success());
            if !ok {
                // Lost, and said so in the next batch; logged here below the shipped level.
                queue
                    .dropped
                    .fetch_add(dropped + batch.len() as u64, Ordering::Relaxed);
                let why = match sent {
                    Ok(r) => r.status().to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::info!(target: "media_relay::events", %why, events = batch.len(), "event batch not delivered");
            }
            batch.clear();
        }
    })
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn kinds_follow_the_workers_rules() {
        for target in [
            "media_relay::deepgram",
            "media_relay",
            "media_relay::call",
            "9lives",
        ] {
            let kind = format!("relay.{}", kind_of(target));
            assert!(cmb_core::events::valid_kind(&kind), "{kind}");
        }
        assert_eq!(kind_of("media_relay::elevenlabs"), "elevenlabs");
    }

    /// Warnings and errors of the relay's code are queued with their span's call id;
    /// info, other crates and the shipper's own lines are not; a full queue counts drops.
    #[test]
    fn the_layer_queues_what_operators_need_and_drops_when_full() {
        let (shipper, mut queue) = channel(2);
        let subscriber = tracing_subscriber::registry().with(shipper);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(target: "media_relay::call", "call", call_id = tracing::field::Empty);
            span.record("call_id", "c-1");
            let _in = span.enter();
            tracing::warn!(target: "media_relay::deepgram", attempt = 2, "reconnecting");
            tracing::info!(target: "media_relay::deepgram", "connected");
            tracing::error!(target: "hyper::proto", "not ours");
            tracing::error!(target: "media_relay::events", "about itself");
            tracing::error!(target: "media_relay::tts", "synthesis failed");
            tracing::error!(target: "media_relay::tts", "one too many");
        });
        let first = queue.rx.try_recv().unwrap();
        assert_eq!((first.level, first.kind.as_str()), ("warn", "deepgram"));
        assert_eq!(first.call_id.as_deref(), Some("c-1"));
        assert_eq!(first.fields["attempt"], 2);
        assert_eq!(first.fields["message"], "reconnecting");
        let second = queue.rx.try_recv().unwrap();
        assert_eq!((second.level, second.kind.as_str()), ("error", "tts"));
        assert!(queue.rx.try_recv().is_err());
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 1);

        let b = body(&[first], 1);
        assert_eq!(b["dropped"], 1);
        assert_eq!(b["events"][0]["kind"], "deepgram");
        assert_eq!(b["events"][0]["call_id"], "c-1");
    }
}
