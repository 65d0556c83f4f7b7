//! Buying credits: Stripe Checkout (`POST /api/payments/checkout`), the Stripe webhook
//! (`POST /api/payments/webhook`), and the two pages Checkout returns to.
//!
//! Owns the money rules: which events grant (`checkout.session.completed` when
//! `payment_status` is `paid`, and `checkout.session.async_payment_succeeded`) — only
//! for a session we created, and only when `amount_total` and `currency` are the pack's
//! price (`cmb_core::pricing::check_paid`); which take back (`charge.refunded`,
//! proportionally, and `charge.dispute.created`, whatever was not refunded yet — never
//! below zero, the shortfall recorded as debt); a refund that arrives before its
//! purchase is fulfilled is kept pending and netted out of the grant, so the pair nets
//! zero in either order; and that each happens exactly once however often Stripe
//! delivers: per event (`stripe_events`) and per session (ledger key
//! `stripe:session:<id>`), both inside the granting transaction, which locks the user's
//! row first. The signature is
//! verified over the raw body before anything is parsed; a bad one is a 400 with
//! nothing changed. Event types we do not handle get a 200 so Stripe stops retrying.
//!
//! Settings read here (all optional, documented for operators):
//! - `CHECKOUT_SUCCESS_URL`: where Checkout sends the buyer after paying; default
//!   `<PUBLIC_BASE_URL>/payments/success?session_id={CHECKOUT_SESSION_ID}`;
//! - `CHECKOUT_CANCEL_URL`: where it sends them on cancel; default
//!   `<PUBLIC_BASE_URL>/payments/cancel`.
//!
//! The pack catalogue is `cmb_core::pricing::CreditPack` (API.md defaults).

use std::collections::BTreeMap;

use cmb_core::events::{kind, Level};
use cmb_core::model::PurchaseStatus;
use cmb_core::pricing::{self, credits_for_refunded, CreditPack, PaidMismatch};
use cmb_core::stripe_sig;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::{Request, Response};

use crate::clients::stripe::{self, NewCheckout};
use crate::crypto;
use crate::error::{ApiError, ApiResult};
use crate::http::auth::authenticate;
use crate::http::{json, json_body, parse_json, read_body};
use crate::store::WriteConflict;
use crate::store::{Clawback, Fulfilment, NewPurchase, PurchaseRow, RefundStep};
use crate::Ctx;

/// Checkout requests without a client `Idempotency-Key` share a Stripe key for this
/// long, so a double-click opens one session while a later purchase opens a new one.
const CHECKOUT_KEY_BUCKET_SECS: i64 = 60;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    pack: String,
}

/// The Stripe idempotency key of a checkout: the client's key when it sent one,
/// otherwise a one-minute time bucket.
pub fn checkout_idempotency_key(
    user_id: &str,
    pack: CreditPack,
    client_key: Option<&str>,
    now_secs: i64,
) -> String {
    match client_key {
        Some(k) => format!("cmb-checkout:{user_id}:{}:c:{k}", pack.name()),
        None => format!(
            "cmb-checkout:{user_id}:{}:t:{}",
            pack.name(),
            now_secs.div_euclid(CHECKOUT_KEY_BUCKET_SECS)
        ),
    }
}

/// An optional URL setting (not part of the typed config: only checkout needs it).
fn url_setting(ctx: &Ctx, name: &'static str, default: String) -> ApiResult<String> {
    let value = ctx
        .env
        .var(name)
        .map(|v| v.to_string())
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let Some(value) = value else {
        return Ok(default);
    };
    match url::Url::parse(&value) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.has_host() => Ok(value),
        _ => Err(ApiError::new(
            503,
            "misconfigured",
            format!("The service is misconfigured: {name} must be an http(s) URL."),
        )),
    }
}

/// `POST /api/payments/checkout {pack}` → `200 {url, session_id}`.
pub async fn checkout(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let session = authenticate(&req, ctx).await?;
    let client_key = crate::http::idempotency_key(&req)?;
    let body: CheckoutBody = json_body(&mut req).await?;
    let pack = CreditPack::from_name(body.pack.trim()).ok_or_else(|| {
        ApiError::bad_request("invalid_pack", "pack must be one of starter, plus, pro.")
            .with_details(json!([{ "field": "pack", "allowed": ["starter", "plus", "pro"] }]))
    })?;
    let base = &ctx.cfg.public_base_url;
    let success_url = url_setting(
        ctx,
        "CHECKOUT_SUCCESS_URL",
        format!("{base}/payments/success?session_id={{CHECKOUT_SESSION_ID}}"),
    )?;
    let cancel_url = url_setting(
        ctx,
        "CHECKOUT_CANCEL_URL",
        format!("{base}/payments/cancel"),
    )?;
    let user = &session.user;
    let key = checkout_idempotency_key(&user.id, pack, client_key.as_deref(), ctx.now_secs());
    let created = stripe::create_checkout_session(
        &ctx.cfg,
        &NewCheckout {
            user_id: &user.id,
            email: &user.email,
            pack,
            success_url: &success_url,
            cancel_url: &cancel_url,
            idempotency_key: &key,
        },
    )
    .await
    .map_err(|e| {
        crate::log::warn("checkout_failed", json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": user.id, "error": e.to_string() }));
        ApiError::new(502, "payment_provider_error", e.message)
    })?;
    ctx.store
        .record_checkout(
            &NewPurchase {
                id: &created.id,
                user_id: &user.id,
                pack: pack.name(),
                credits: pack.credits(),
                amount_cents: created.amount_total.unwrap_or(pack.price_cents()),
                currency: created.currency.as_deref().unwrap_or("usd"),
            },
            &ctx.now_iso(),
        )
        .await?;
    // A replay of a key whose session was already paid has no page left to show.
    let Some(url) = created.url else {
        return Err(ApiError::conflict(
            "checkout_completed",
            "This checkout was already completed. Start a new purchase in a minute.",
        ));
    };
    json(200, &json!({ "url": url, "session_id": created.id }))
}

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: Value,
    #[serde(default)]
    previous_attributes: Option<Value>,
}

/// The fields of a `checkout.session` we use.
#[derive(Debug, Deserialize)]
struct SessionObject {
    id: String,
    #[serde(default)]
    payment_status: Option<String>,
    #[serde(default)]
    amount_total: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    payment_intent: Option<String>,
}

/// The fields of a `charge` we use.
#[derive(Debug, Deserialize)]
struct ChargeObject {
    id: String,
    amount: i64,
    amount_refunded: i64,
    #[serde(default)]
    refunded: bool,
    #[serde(default)]
    payment_intent: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// The fields of a `dispute` we use.
#[derive(Debug, Deserialize)]
struct DisputeObject {
    id: String,
    #[serde(default)]
    amount: i64,
    charge: String,
    #[serde(default)]
    payment_intent: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn invalid_event(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_event", format!("Unexpected event shape: {e}"))
}

fn received(outcome: &str) -> ApiResult<Response> {
    json(200, &json!({ "received": true, "outcome": outcome }))
}

/// `POST /api/payments/webhook`: verify, then act once.
pub async fn webhook(mut req: Request, ctx: &Ctx) -> ApiResult<Response> {
    let bad_signature = |why: &str| {
        crate::log::warn(
            "stripe_signature_refused",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "why": why }),
        );
        ApiError::bad_request("invalid_signature", "Invalid Stripe signature.")
    };
    let header = req
        .headers()
        .get("stripe-signature")
        .ok()
        .flatten()
        .ok_or_else(|| bad_signature("no Stripe-Signature header"))?;
    let body = read_body(&mut req).await?;
    stripe_sig::verify(
        ctx.cfg.stripe_webhook_secret.expose(),
        &header,
        &body,
        ctx.now_secs(),
        stripe_sig::DEFAULT_TOLERANCE_SECS,
    )
    .map_err(|e| bad_signature(&e.to_string()))?;
    let event: Event = parse_json(&body)?;
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let session: SessionObject =
                serde_json::from_value(event.data.object.clone()).map_err(invalid_event)?;
            // `completed` also arrives for delayed methods still unpaid: those grant on
            // `async_payment_succeeded` instead.
            let paid = event.kind == "checkout.session.async_payment_succeeded"
                || session.payment_status.as_deref() == Some("paid");
            if !paid {
                return received("awaiting_payment");
            }
            fulfil(ctx, &event, &session).await
        }
        "checkout.session.async_payment_failed" | "checkout.session.expired" => {
            let session: SessionObject =
                serde_json::from_value(event.data.object.clone()).map_err(invalid_event)?;
            let status = if event.kind.ends_with("failed") {
                PurchaseStatus::Failed
            } else {
                PurchaseStatus::Expired
            };
            match ctx
                .store
                .close_purchase(&event.id, &event.kind, &session.id, status, &ctx.now_iso())
                .await?
            {
                Ok(()) => received(status.as_str()),
                Err(_) => received("duplicate"),
            }
        }
        "charge.refunded" => refund(ctx, &event).await,
        "charge.dispute.created" => dispute(ctx, &event).await,
        other => {
            crate::log::info(
                "stripe_event_ignored",
                json!({ "request_id": ctx.request_id, "provider": "stripe", "type": other, "stripe_event": event.id }),
            );
            received("ignored")
        }
    }
}

/// Who bought what, from our purchase row: a session we did not create (no row, or a
/// pack we do not sell) grants nothing, whatever its metadata says.
fn purchase_of(row: Option<PurchaseRow>) -> Option<(String, CreditPack, i64)> {
    let p = row?;
    let pack = CreditPack::from_name(&p.pack)?;
    Some((p.user_id, pack, p.credits))
}

async fn fulfil(ctx: &Ctx, event: &Event, s: &SessionObject) -> ApiResult<Response> {
    let row = ctx.store.purchase(&s.id).await?;
    let Some((user_id, pack, credits)) = purchase_of(row) else {
        crate::log::warn(
            "stripe_session_not_ours",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "session": s.id, "stripe_event": event.id }),
        );
        ctx.store
            .note_stripe_event(&event.id, &event.kind, &s.id, "not_ours", &ctx.now_iso())
            .await?;
        return received("not_ours");
    };
    if let Err(mismatch) = pricing::check_paid(pack, s.amount_total, s.currency.as_deref()) {
        // Paid, but not what the pack costs: nothing is granted and an operator must look.
        let why = match mismatch {
            PaidMismatch::Amount { paid, price } => json!({ "amount_total": paid, "price": price }),
            PaidMismatch::Currency { paid } => {
                json!({ "currency": paid, "expected": pricing::PACK_CURRENCY })
            }
        };
        crate::log::error(
            "payment_amount_mismatch",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": user_id, "session": s.id, "pack": pack.name(), "mismatch": why }),
        );
        ctx.store
            .note_stripe_event(
                &event.id,
                &event.kind,
                &s.id,
                "amount_mismatch",
                &ctx.now_iso(),
            )
            .await?;
        return received("amount_mismatch");
    }
    if ctx.store.user_by_id(&user_id).await?.is_none() {
        // Paid, but for an account that no longer exists: an operator must look.
        crate::log::error(
            "payment_for_unknown_user",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": user_id, "session": s.id }),
        );
        return received("unknown_user");
    }
    let ledger_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let audit_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let f = Fulfilment {
        event_id: &event.id,
        event_type: &event.kind,
        purchase: NewPurchase {
            id: &s.id,
            user_id: &user_id,
            pack: pack.name(),
            credits,
            amount_cents: pack.price_cents(),
            currency: pricing::PACK_CURRENCY,
        },
        payment_intent: s.payment_intent.as_deref(),
        ledger_id: &ledger_id,
        audit_id: &audit_id,
    };
    match ctx.store.fulfil_purchase(&f, &ctx.now_iso()).await? {
        Ok(()) => {
            crate::log::info(
                "credits_purchased",
                json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": user_id, "session": s.id, "credits": credits }),
            );
            let fields = json!({ "provider": "stripe", "session": s.id, "credits": credits, "stripe_event": event.id });
            ctx.record(
                ctx.event(Level::Info, kind::PAYMENT_COMPLETED, fields)
                    .user(Some(user_id.as_str())),
            )
            .await;
            received("fulfilled")
        }
        Err(WriteConflict::Duplicate) => {
            ctx.store
                .note_stripe_event(&event.id, &event.kind, &s.id, "duplicate", &ctx.now_iso())
                .await?;
            received("duplicate")
        }
        Err(e) => Err(ApiError::internal("fulfil purchase", format!("{e:?}"))),
    }
}

async fn refund(ctx: &Ctx, event: &Event) -> ApiResult<Response> {
    let charge: ChargeObject =
        serde_json::from_value(event.data.object.clone()).map_err(invalid_event)?;
    let purchase = match charge.payment_intent.as_deref() {
        Some(pi) => ctx.store.purchase_by_payment_intent(pi).await?,
        None => None,
    };
    let meta = charge.metadata.as_ref();
    let (user_id, credits, purchase_id) = match &purchase {
        Some(p) => (p.user_id.clone(), p.credits, Some(p.id.clone())),
        None => {
            // A refund seen before its purchase is fulfilled: the charge carries the user
            // and pack we put in the PaymentIntent's metadata, and the PaymentIntent links
            // it to the purchase when that is fulfilled (the refund waits, pending, and
            // is netted out of the grant). Without a PaymentIntent it can never be linked.
            let user = meta.and_then(|m| m.get("user_id")).cloned();
            let pack = meta
                .and_then(|m| m.get("pack"))
                .and_then(|p| CreditPack::from_name(p));
            match (user, pack, &charge.payment_intent) {
                (Some(u), Some(p), Some(_)) => (u, p.credits(), None),
                _ => {
                    crate::log::warn(
                        "refund_not_ours",
                        json!({ "request_id": ctx.request_id, "provider": "stripe", "charge": charge.id }),
                    );
                    return received("not_ours");
                }
            }
        }
    };
    // Stripe reports the cumulative refunded amount; the step is the difference from
    // the previous value (previous_attributes), else from what we recorded.
    let previous = event
        .data
        .previous_attributes
        .as_ref()
        .and_then(|p| p.get("amount_refunded"))
        .and_then(Value::as_i64)
        .or_else(|| purchase.as_ref().map(|p| p.refunded_cents))
        .unwrap_or(0);
    let step_cents = charge.amount_refunded - previous;
    if step_cents <= 0 {
        return received("nothing_to_refund");
    }
    let due = credits_for_refunded(credits, charge.amount, charge.amount_refunded)
        - credits_for_refunded(credits, charge.amount, previous);
    if ctx.store.user_by_id(&user_id).await?.is_none() {
        crate::log::error(
            "refund_for_unknown_user",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": user_id }),
        );
        return received("unknown_user");
    }
    let step_id = format!("{}:{}", charge.id, charge.amount_refunded);
    let ledger_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let audit_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let step = RefundStep {
        kind: Clawback::Refund,
        event_id: &event.id,
        event_type: &event.kind,
        id: &step_id,
        charge_id: &charge.id,
        payment_intent: charge.payment_intent.as_deref(),
        purchase_id: purchase_id.as_deref(),
        user_id: &user_id,
        refunded_cents: step_cents,
        cumulative_refunded_cents: charge.amount_refunded,
        fully_refunded: charge.refunded,
        credits_due: due.max(0),
        ledger_id: &ledger_id,
        audit_id: &audit_id,
    };
    if purchase_id.is_some() {
        return apply_clawback(ctx, event, &step, "refunded").await;
    }
    let answer = apply_clawback(ctx, event, &step, "refund_pending").await?;
    // The purchase may have been fulfilled after it was looked up above; its netting
    // cannot have seen this step, so settle it now (a no-op when there is nothing left).
    match charge.payment_intent.as_deref() {
        Some(pi) if settle_pending(ctx, pi).await? => received("refunded"),
        _ => Ok(answer),
    }
}

/// Settles the pending refund steps of a PaymentIntent whose purchase is fulfilled by
/// now; whether any was.
async fn settle_pending(ctx: &Ctx, payment_intent: &str) -> ApiResult<bool> {
    let Some(purchase) = ctx.store.purchase_by_payment_intent(payment_intent).await? else {
        return Ok(false);
    };
    let steps = ctx.store.pending_refunds(payment_intent).await?;
    for step in &steps {
        let ledger_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
        match ctx
            .store
            .settle_pending_refund(
                step,
                &purchase.id,
                &purchase.user_id,
                &ledger_id,
                &ctx.now_iso(),
            )
            .await?
        {
            Ok(()) | Err(WriteConflict::Duplicate) => {}
            Err(e) => return Err(ApiError::internal("settle refund", format!("{e:?}"))),
        }
    }
    Ok(!steps.is_empty())
}

/// Applies a refund step or a dispute once; a replay is a `duplicate` with nothing
/// changed.
async fn apply_clawback(
    ctx: &Ctx,
    event: &Event,
    step: &RefundStep<'_>,
    outcome: &'static str,
) -> ApiResult<Response> {
    match ctx.store.refund_purchase(step, &ctx.now_iso()).await? {
        Ok(()) => {
            crate::log::info(
                "credits_clawed_back",
                json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": step.user_id, "charge": step.charge_id, "due": step.credits_due, "outcome": outcome }),
            );
            let fields = json!({ "provider": "stripe", "charge": step.charge_id, "credits_due": step.credits_due, "outcome": outcome });
            ctx.record(
                ctx.event(Level::Warn, kind::PAYMENT_REFUNDED, fields)
                    .user(Some(step.user_id)),
            )
            .await;
            received(outcome)
        }
        Err(WriteConflict::Duplicate) => {
            ctx.store
                .note_stripe_event(
                    &event.id,
                    &event.kind,
                    step.charge_id,
                    "duplicate",
                    &ctx.now_iso(),
                )
                .await?;
            received("duplicate")
        }
        Err(e) => Err(ApiError::internal("refund purchase", format!("{e:?}"))),
    }
}

/// `charge.dispute.created`: the buyer asked their bank for the money back. The
/// purchase's credits not already refunded are taken back at once (as far as the
/// balance allows, the rest is debt) and the purchase is marked disputed; an operator
/// who wins the dispute can grant them again.
async fn dispute(ctx: &Ctx, event: &Event) -> ApiResult<Response> {
    let d: DisputeObject =
        serde_json::from_value(event.data.object.clone()).map_err(invalid_event)?;
    let purchase = match d.payment_intent.as_deref() {
        Some(pi) => ctx.store.purchase_by_payment_intent(pi).await?,
        None => None,
    };
    let Some(p) = purchase else {
        crate::log::warn(
            "dispute_not_ours",
            json!({ "request_id": ctx.request_id, "provider": "stripe", "dispute": d.id, "charge": d.charge }),
        );
        ctx.store
            .note_stripe_event(&event.id, &event.kind, &d.id, "not_ours", &ctx.now_iso())
            .await?;
        return received("not_ours");
    };
    crate::log::warn(
        "payment_disputed",
        json!({ "request_id": ctx.request_id, "provider": "stripe", "user_id": p.user_id, "dispute": d.id, "charge": d.charge, "reason": d.reason }),
    );
    let due = p.credits - credits_for_refunded(p.credits, p.amount_cents, p.refunded_cents);
    let step_id = format!("dispute:{}", d.id);
    let ledger_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let audit_id = crypto::uuid().map_err(|e| ApiError::internal("uuid", e))?;
    let step = RefundStep {
        kind: Clawback::Dispute,
        event_id: &event.id,
        event_type: &event.kind,
        id: &step_id,
        charge_id: &d.charge,
        payment_intent: d.payment_intent.as_deref(),
        purchase_id: Some(&p.id),
        user_id: &p.user_id,
        refunded_cents: d.amount.max(0),
        cumulative_refunded_cents: p.refunded_cents,
        fully_refunded: false,
        credits_due: due.max(0),
        ledger_id: &ledger_id,
        audit_id: &audit_id,
    };
    apply_clawback(ctx, event, &step, "disputed").await
}

fn page(title: &str, text: &str) -> ApiResult<Response> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head><body style=\"font-family:sans-serif;text-align:center;padding:3em\">\
         <h1>{title}</h1><p>{text}</p></body></html>"
    );
    let mut resp = Response::ok(html)?;
    resp.headers_mut()
        .set("content-type", "text/html; charset=utf-8")?;
    Ok(resp)
}

/// `GET /payments/success`: where Checkout returns after paying (default setting).
pub fn success_page() -> ApiResult<Response> {
    page(
        "Payment received",
        "Thank you! Your credits will appear in the app in a moment. You can close this page.",
    )
}

/// `GET /payments/cancel`: where Checkout returns when the buyer cancels.
pub fn cancel_page() -> ApiResult<Response> {
    page(
        "Payment canceled",
        "No payment was taken. You can close this page.",
    )
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The same user, pack and minute share a key; a client key overrides the bucket;
    /// a different pack or minute is a different checkout.
    #[test]
    fn checkout_keys() {
        let k = |c: Option<&str>, t: i64| checkout_idempotency_key("u1", CreditPack::Starter, c, t);
        assert_eq!(k(None, 120), k(None, 179));
        assert_ne!(k(None, 179), k(None, 180));
        assert_ne!(
            k(None, 120),
            checkout_idempotency_key("u1", CreditPack::Pro, None, 120)
        );
        assert_eq!(k(Some("abc"), 1), k(Some("abc"), 9_999));
        assert_eq!(k(Some("abc"), 1), "cmb-checkout:u1:starter:c:abc");
    }

    /// Only our purchase row says who bought what; without one nothing is granted.
    #[test]
    fn purchase_resolution() {
        let row = |pack: &str| PurchaseRow {
            id: "cs_1".into(),
            user_id: "owner".into(),
            pack: pack.into(),
            credits: 1200,
            amount_cents: 1000,
            currency: "usd".into(),
            status: PurchaseStatus::Open,
            payment_intent: None,
            refunded_cents: 0,
            created_at: String::new(),
            paid_at: None,
        };
        assert_eq!(
            purchase_of(Some(row("plus"))),
            Some(("owner".into(), CreditPack::Plus, 1200))
        );
        assert_eq!(purchase_of(Some(row("gold"))), None);
        assert_eq!(purchase_of(None), None);
    }
}
