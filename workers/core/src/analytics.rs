//! Business analytics, pure: the admin's `from..=to` range of UTC days, and the
//! reports folded from the grouped rows the store's SQL returns (`calls`, `call_costs`,
//! `call_turn_latencies`, `purchases`, `payment_refunds`): one object per day (days
//! without activity included, as zeros) plus range totals. A call belongs to the UTC day
//! it was answered, else the day it was due, else the day it was requested (the store's
//! `CALL_DAY`). The Worker's `routes/admin/analytics.rs` only authenticates, queries and
//! answers.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use time::macros::format_description;
use time::Date;

use crate::pricing::MICROS_PER_CREDIT;
use crate::validate::ValidationError;

/// Calls of one UTC day and status.
#[derive(Debug, Clone, Deserialize)]
pub struct CallDayRow {
    pub day: String,
    pub status: String,
    pub calls: i64,
    pub duration_seconds: i64,
    pub billed_minutes: i64,
    pub credits_charged: i64,
}

/// End-of-turn latency of one UTC day (or of the whole range, `day = "total"`).
#[derive(Debug, Clone, Deserialize)]
pub struct LatencyDayRow {
    pub day: String,
    pub turns: i64,
    pub avg_ms: Option<f64>,
    pub p95_ms: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SalesDayRow {
    pub day: String,
    pub purchases: i64,
    pub credits_sold: i64,
    pub sales_cents: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefundDayRow {
    pub day: String,
    pub refunds: i64,
    pub refunded_cents: i64,
    pub credits_taken: i64,
    pub debt_credits: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CostDayRow {
    pub day: String,
    pub provider: String,
    pub quantity: f64,
    pub cost_micros: i64,
}

const MAX_RANGE_DAYS: i64 = 366;
const DEFAULT_RANGE_DAYS: i64 = 30;
/// The providers every cost report names, even at zero.
const PROVIDERS: [&str; 4] = ["twilio", "deepgram", "llm", "elevenlabs"];

/// An inclusive range of UTC days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: Date,
    pub to: Date,
}

impl Range {
    /// Every day of the range as `YYYY-MM-DD`, in order.
    pub fn days(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut day = Some(self.from);
        while let Some(d) = day.filter(|d| *d <= self.to) {
            out.push(d.to_string());
            day = d.next_day();
        }
        out
    }
}

/// The code of every range error (the query as a whole is what is wrong).
pub const INVALID_QUERY: &str = "invalid_query";

fn bad_range(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError::new(field, INVALID_QUERY, message)
}

pub fn parse_day(field: &str, value: &str) -> Result<Date, ValidationError> {
    Date::parse(value.trim(), format_description!("[year]-[month]-[day]")).map_err(|_| {
        bad_range(
            field,
            format!("{field} must be a date like 2026-01-31 (YYYY-MM-DD, UTC)."),
        )
    })
}

/// Validates `from`/`to` against `today` (UTC): both inclusive, `from <= to`, at most
/// 366 days; missing `to` is today, missing `from` is 30 days up to `to`.
pub fn parse_range(
    from: Option<&str>,
    to: Option<&str>,
    today: Date,
) -> Result<Range, ValidationError> {
    let to = match to.filter(|s| !s.trim().is_empty()) {
        Some(t) => parse_day("to", t)?,
        None => today,
    };
    let from = match from.filter(|s| !s.trim().is_empty()) {
        Some(f) => parse_day("from", f)?,
        None => to
            .checked_sub(time::Duration::days(DEFAULT_RANGE_DAYS - 1))
            .unwrap_or(to),
    };
    if from > to {
        return Err(bad_range("from", "from must not be after to."));
    }
    if (to - from).whole_days() + 1 > MAX_RANGE_DAYS {
        return Err(bad_range(
            "from",
            format!("The range can span at most {MAX_RANGE_DAYS} days."),
        ));
    }
    Ok(Range { from, to })
}

fn round_to(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn latency_view(row: Option<&LatencyDayRow>) -> Value {
    match row {
        Some(l) => json!({
            "turns": l.turns,
            "avg_ms": l.avg_ms.map(|a| round_to(a, 1)),
            "p95_ms": l.p95_ms,
        }),
        None => json!({ "turns": 0, "avg_ms": null, "p95_ms": null }),
    }
}

/// Sums the numeric fields of `days` into one object (non-numeric fields skipped,
/// nested objects summed field by field).
fn sum_objects<'a>(days: impl Iterator<Item = &'a Value>, skip: &[&str]) -> Value {
    fn add(into: &mut Map<String, Value>, from: &Map<String, Value>, skip: &[&str]) {
        for (k, v) in from {
            if skip.contains(&k.as_str()) {
                continue;
            }
            match v {
                Value::Number(n) => {
                    let entry = into.entry(k.clone()).or_insert(json!(0));
                    if let (Some(a), Some(b)) = (entry.as_i64(), n.as_i64()) {
                        *entry = json!(a + b);
                    }
                }
                Value::Object(inner) => {
                    let entry = into.entry(k.clone()).or_insert_with(|| json!({}));
                    if let Value::Object(target) = entry {
                        add(target, inner, &[]);
                    }
                }
                _ => {}
            }
        }
    }
    let mut total = Map::new();
    for day in days {
        if let Value::Object(o) = day {
            add(&mut total, o, skip);
        }
    }
    Value::Object(total)
}

/// The calls report from grouped rows (`day`/`status`) and latency rows.
pub fn calls_report(range: &Range, rows: &[CallDayRow], latency: &[LatencyDayRow]) -> Value {
    let days: Vec<Value> = range
        .days()
        .into_iter()
        .map(|day| {
            let mut by_status = Map::new();
            let (mut calls, mut secs, mut minutes, mut credits) = (0, 0, 0, 0);
            for r in rows.iter().filter(|r| r.day == day) {
                by_status.insert(r.status.clone(), json!(r.calls));
                calls += r.calls;
                secs += r.duration_seconds;
                minutes += r.billed_minutes;
                credits += r.credits_charged;
            }
            let lat = latency.iter().find(|l| l.day == day);
            json!({
                "day": day,
                "calls": calls,
                "by_status": by_status,
                "duration_seconds": secs,
                "billed_minutes": minutes,
                "credits_charged": credits,
                "latency": latency_view(lat),
            })
        })
        .collect();
    let mut totals = sum_objects(days.iter(), &["day", "latency"]);
    totals["latency"] = latency_view(latency.iter().find(|l| l.day == "total"));
    json!({
        "from": range.from.to_string(),
        "to": range.to.to_string(),
        "days": days,
        "totals": totals,
    })
}

/// The revenue report: sales and refunds by day, and call revenue from the calls rows.
pub fn revenue_report(
    range: &Range,
    sales: &[SalesDayRow],
    refunds: &[RefundDayRow],
    calls: &[CallDayRow],
) -> Value {
    let days: Vec<Value> = range
        .days()
        .into_iter()
        .map(|day| {
            let s = sales.iter().find(|s| s.day == day);
            let r = refunds.iter().find(|r| r.day == day);
            let call_credits: i64 = calls
                .iter()
                .filter(|c| c.day == day)
                .map(|c| c.credits_charged)
                .sum();
            let sales_cents = s.map_or(0, |s| s.sales_cents);
            let refunded_cents = r.map_or(0, |r| r.refunded_cents);
            json!({
                "day": day,
                "purchases": s.map_or(0, |s| s.purchases),
                "credits_sold": s.map_or(0, |s| s.credits_sold),
                "sales_usd_cents": sales_cents,
                "refunds": r.map_or(0, |r| r.refunds),
                "refunded_usd_cents": refunded_cents,
                "credits_refunded": r.map_or(0, |r| r.credits_taken),
                "debt_credits": r.map_or(0, |r| r.debt_credits),
                "net_sales_usd_cents": sales_cents - refunded_cents,
                "call_revenue_credits": call_credits,
                // 1 credit = 1 US cent.
                "call_revenue_usd_cents": call_credits,
            })
        })
        .collect();
    let totals = sum_objects(days.iter(), &["day"]);
    json!({
        "from": range.from.to_string(),
        "to": range.to.to_string(),
        "days": days,
        "totals": totals,
    })
}

fn margin_fields(out: &mut Value, revenue_credits: i64, cost_micros: i64) {
    let revenue_micros = revenue_credits * MICROS_PER_CREDIT;
    let margin = revenue_micros - cost_micros;
    out["revenue_credits"] = json!(revenue_credits);
    out["revenue_micros"] = json!(revenue_micros);
    out["cost_micros"] = json!(cost_micros);
    out["gross_margin_micros"] = json!(margin);
    // Undefined without revenue rather than a misleading 0% or -inf.
    out["gross_margin_pct"] = if revenue_micros > 0 {
        json!(round_to(margin as f64 * 100.0 / revenue_micros as f64, 2))
    } else {
        Value::Null
    };
}

/// The costs report: provider cost per day and provider against call revenue.
pub fn costs_report(range: &Range, costs: &[CostDayRow], calls: &[CallDayRow]) -> Value {
    let mut total_by_provider: BTreeMap<String, (f64, i64)> = PROVIDERS
        .iter()
        .map(|p| ((*p).to_string(), (0.0, 0)))
        .collect();
    let (mut total_revenue, mut total_cost) = (0, 0);
    let days: Vec<Value> = range
        .days()
        .into_iter()
        .map(|day| {
            let mut providers: BTreeMap<String, (f64, i64)> = PROVIDERS
                .iter()
                .map(|p| ((*p).to_string(), (0.0, 0)))
                .collect();
            for c in costs.iter().filter(|c| c.day == day) {
                let e = providers.entry(c.provider.clone()).or_insert((0.0, 0));
                e.0 += c.quantity;
                e.1 += c.cost_micros;
                let t = total_by_provider
                    .entry(c.provider.clone())
                    .or_insert((0.0, 0));
                t.0 += c.quantity;
                t.1 += c.cost_micros;
            }
            let cost: i64 = providers.values().map(|(_, m)| m).sum();
            let revenue: i64 = calls
                .iter()
                .filter(|c| c.day == day)
                .map(|c| c.credits_charged)
                .sum();
            total_cost += cost;
            total_revenue += revenue;
            let mut out = json!({ "day": day, "providers": provider_view(&providers) });
            margin_fields(&mut out, revenue, cost);
            out
        })
        .collect();
    let mut totals = json!({ "providers": provider_view(&total_by_provider) });
    margin_fields(&mut totals, total_revenue, total_cost);
    json!({
        "from": range.from.to_string(),
        "to": range.to.to_string(),
        "days": days,
        "totals": totals,
    })
}

/// One summary of a range (the MCP tool `analytics_summary`): the totals of the calls,
/// revenue and costs reports side by side.
pub fn summary(
    range: &Range,
    calls: &[CallDayRow],
    latency: &[LatencyDayRow],
    sales: &[SalesDayRow],
    refunds: &[RefundDayRow],
    costs: &[CostDayRow],
) -> Value {
    let c = &calls_report(range, calls, latency)["totals"];
    let r = &revenue_report(range, sales, refunds, calls)["totals"];
    let k = &costs_report(range, costs, calls)["totals"];
    json!({
        "from": range.from.to_string(),
        "to": range.to.to_string(),
        "calls": c["calls"],
        "calls_by_status": c["by_status"],
        "talk_seconds": c["duration_seconds"],
        "billed_minutes": c["billed_minutes"],
        "latency": c["latency"],
        "purchases": r["purchases"],
        "sales_usd_cents": r["sales_usd_cents"],
        "refunded_usd_cents": r["refunded_usd_cents"],
        "net_sales_usd_cents": r["net_sales_usd_cents"],
        "debt_credits": r["debt_credits"],
        "credits_charged": k["revenue_credits"],
        "revenue_micros": k["revenue_micros"],
        "provider_cost_micros": k["cost_micros"],
        "gross_margin_micros": k["gross_margin_micros"],
        "gross_margin_pct": k["gross_margin_pct"],
        "providers": k["providers"],
    })
}

fn provider_view(p: &BTreeMap<String, (f64, i64)>) -> Value {
    p.iter()
        .map(|(name, (quantity, micros))| {
            (
                name.clone(),
                json!({ "quantity": round_to(*quantity, 3), "cost_micros": micros }),
            )
        })
        .collect::<Map<String, Value>>()
        .into()
}

#[cfg(test)]
// A panic in a test is that test's failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::date;

    fn call_row(
        day: &str,
        status: &str,
        calls: i64,
        secs: i64,
        min: i64,
        credits: i64,
    ) -> CallDayRow {
        CallDayRow {
            day: day.into(),
            status: status.into(),
            calls,
            duration_seconds: secs,
            billed_minutes: min,
            credits_charged: credits,
        }
    }

    /// Defaults, inclusive bounds, the 366-day cap, order and format are all enforced.
    #[test]
    fn range_validation() {
        let today = date!(2026 - 03 - 10);
        let r = parse_range(None, None, today).unwrap();
        assert_eq!((r.from, r.to), (date!(2026 - 02 - 09), today));
        assert_eq!(r.days().len(), 30);
        let r = parse_range(Some("2024-02-28"), Some("2024-03-01"), today).unwrap();
        assert_eq!(r.days(), ["2024-02-28", "2024-02-29", "2024-03-01"]);
        assert!(parse_range(Some("2025-01-01"), Some("2026-01-01"), today).is_ok());
        assert!(parse_range(Some("2024-12-31"), Some("2026-01-01"), today).is_err());
        for (from, to) in [
            ("2026-01-02", "2026-01-01"),
            ("2026-1-01", "2026-01-02"),
            ("yesterday", "2026-01-02"),
            ("2026-02-30", "2026-03-01"),
        ] {
            let e = parse_range(Some(from), Some(to), today).unwrap_err();
            assert_eq!(e.code, INVALID_QUERY, "{from}..{to}");
        }
    }

    /// The summary is the three reports' totals: counts, money and margin agree.
    #[test]
    fn summary_totals_the_reports() {
        let range = parse_range(
            Some("2026-01-01"),
            Some("2026-01-02"),
            date!(2026 - 01 - 02),
        )
        .unwrap();
        let calls = [
            call_row("2026-01-01", "completed", 2, 150, 4, 185),
            call_row("2026-01-02", "failed", 1, 0, 0, 0),
        ];
        let sales = [SalesDayRow {
            day: "2026-01-02".into(),
            purchases: 1,
            credits_sold: 500,
            sales_cents: 499,
        }];
        let costs = [CostDayRow {
            day: "2026-01-01".into(),
            provider: "twilio".into(),
            quantity: 4.0,
            cost_micros: 56_000,
        }];
        let s = summary(&range, &calls, &[], &sales, &[], &costs);
        assert_eq!(s["calls"], 3);
        assert_eq!(s["calls_by_status"], json!({ "completed": 2, "failed": 1 }));
        assert_eq!(
            (s["talk_seconds"].clone(), s["billed_minutes"].clone()),
            (json!(150), json!(4))
        );
        assert_eq!(s["sales_usd_cents"], 499);
        assert_eq!(s["revenue_micros"], 185 * MICROS_PER_CREDIT);
        assert_eq!(s["provider_cost_micros"], 56_000);
        assert_eq!(s["gross_margin_micros"], 185 * MICROS_PER_CREDIT - 56_000);
        assert_eq!(s["providers"]["twilio"]["cost_micros"], 56_000);
        assert_eq!(
            (s["from"].clone(), s["to"].clone()),
            (json!("2026-01-01"), json!("2026-01-02"))
        );
    }

    /// Status rows fold into one object per day, empty days are zeros, totals add up.
    #[test]
    fn calls_report_folds_and_totals() {
        let range = parse_range(
            Some("2026-01-01"),
            Some("2026-01-03"),
            date!(2026 - 01 - 03),
        )
        .unwrap();
        let rows = [
            call_row("2026-01-01", "completed", 2, 150, 4, 185),
            call_row("2026-01-01", "failed", 1, 0, 0, 0),
            call_row("2026-01-03", "completed", 1, 60, 1, 65),
        ];
        let lat = [
            LatencyDayRow {
                day: "2026-01-01".into(),
                turns: 3,
                avg_ms: Some(700.04),
                p95_ms: Some(900),
            },
            LatencyDayRow {
                day: "total".into(),
                turns: 4,
                avg_ms: Some(650.0),
                p95_ms: Some(900),
            },
        ];
        let r = calls_report(&range, &rows, &lat);
        assert_eq!(r["days"][0]["calls"], 3);
        assert_eq!(
            r["days"][0]["by_status"],
            json!({"completed": 2, "failed": 1})
        );
        assert_eq!(
            r["days"][0]["latency"],
            json!({"turns": 3, "avg_ms": 700.0, "p95_ms": 900})
        );
        assert_eq!(
            r["days"][1],
            json!({
                "day": "2026-01-02", "calls": 0, "by_status": {}, "duration_seconds": 0,
                "billed_minutes": 0, "credits_charged": 0,
                "latency": {"turns": 0, "avg_ms": null, "p95_ms": null}
            })
        );
        assert_eq!(r["totals"]["calls"], 4);
        assert_eq!(
            r["totals"]["by_status"],
            json!({"completed": 3, "failed": 1})
        );
        assert_eq!(r["totals"]["billed_minutes"], 5);
        assert_eq!(r["totals"]["credits_charged"], 250);
        assert_eq!(r["totals"]["latency"]["turns"], 4);
    }

    /// Margin is revenue (credits at 10,000 µ$) minus provider cost; no revenue, no %.
    #[test]
    fn costs_report_margin() {
        let range = parse_range(
            Some("2026-01-01"),
            Some("2026-01-02"),
            date!(2026 - 01 - 02),
        )
        .unwrap();
        let costs = [
            CostDayRow {
                day: "2026-01-01".into(),
                provider: "twilio".into(),
                quantity: 4.0,
                cost_micros: 52_000,
            },
            CostDayRow {
                day: "2026-01-01".into(),
                provider: "llm".into(),
                quantity: 1000.0,
                cost_micros: 100,
            },
            CostDayRow {
                day: "2026-01-02".into(),
                provider: "twilio".into(),
                quantity: 1.0,
                cost_micros: 13_000,
            },
        ];
        let calls = [call_row("2026-01-01", "completed", 2, 150, 4, 185)];
        let r = costs_report(&range, &costs, &calls);
        let d0 = &r["days"][0];
        assert_eq!(d0["cost_micros"], 52_100);
        assert_eq!(d0["revenue_micros"], 1_850_000);
        assert_eq!(d0["gross_margin_micros"], 1_797_900);
        assert_eq!(d0["gross_margin_pct"], 97.18);
        assert_eq!(
            d0["providers"]["deepgram"],
            json!({"quantity": 0.0, "cost_micros": 0})
        );
        assert_eq!(r["days"][1]["gross_margin_pct"], Value::Null);
        assert_eq!(r["days"][1]["gross_margin_micros"], -13_000);
        assert_eq!(r["totals"]["providers"]["twilio"]["cost_micros"], 65_000);
        assert_eq!(r["totals"]["gross_margin_micros"], 1_850_000 - 65_100);
    }

    /// Net sales subtract refunds; call revenue comes from the calls rows.
    #[test]
    fn revenue_report_nets_refunds() {
        let range = parse_range(
            Some("2026-01-01"),
            Some("2026-01-01"),
            date!(2026 - 01 - 01),
        )
        .unwrap();
        let sales = [SalesDayRow {
            day: "2026-01-01".into(),
            purchases: 2,
            credits_sold: 1700,
            sales_cents: 1500,
        }];
        let refunds = [RefundDayRow {
            day: "2026-01-01".into(),
            refunds: 1,
            refunded_cents: 500,
            credits_taken: 300,
            debt_credits: 200,
        }];
        let calls = [call_row("2026-01-01", "completed", 1, 60, 1, 65)];
        let r = revenue_report(&range, &sales, &refunds, &calls);
        assert_eq!(r["days"][0]["net_sales_usd_cents"], 1000);
        assert_eq!(r["days"][0]["debt_credits"], 200);
        assert_eq!(r["totals"]["call_revenue_credits"], 65);
        assert_eq!(r["totals"]["credits_sold"], 1700);
    }
}
