//! What a call costs the user (credits) and what it cost us (provider USD).
//!
//! Owns the price list and the arithmetic: credits are integers (1 credit = 1 US cent),
//! provider costs are integer micro-dollars so sums and aggregates stay exact. Balances,
//! reservations and the ledger live in the Worker's database.

use serde::{Deserialize, Serialize};

/// 1 credit = 1 US cent = 10,000 micro-dollars (costs are kept in micro-dollars).
pub const MICROS_PER_CREDIT: i64 = 10_000;

/// Flat fee of every connected call.
pub const BASE_CALL_CREDITS: i64 = 25;
/// Per started minute of a connected call.
pub const PER_MINUTE_CREDITS: i64 = 40;
/// A call needs at least the base fee plus one minute to start.
pub const MIN_CREDITS_TO_START: i64 = BASE_CALL_CREDITS + PER_MINUTE_CREDITS;

const MICROS_PER_USD: f64 = 1_000_000.0;

/// Minutes billed for a duration: every started minute counts (61 s is 2 minutes).
pub fn started_minutes(duration_secs: u32) -> i64 {
    i64::from(duration_secs.div_ceil(60))
}

/// Credits charged for a call: nothing if it never connected, otherwise the base fee
/// plus 40 per started minute (a connected 0-second call costs the base fee only).
pub fn call_charge_credits(duration_secs: u32, connected: bool) -> i64 {
    if !connected {
        return 0;
    }
    BASE_CALL_CREDITS + PER_MINUTE_CREDITS * started_minutes(duration_secs)
}

/// The longest call a balance pays for in full, in seconds (whole minutes; 0 below
/// [`MIN_CREDITS_TO_START`]). The DO uses it to cap `max_duration_secs`.
pub fn max_call_secs_for_balance(balance: i64) -> u32 {
    if balance < MIN_CREDITS_TO_START {
        return 0;
    }
    let minutes = (balance - BASE_CALL_CREDITS) / PER_MINUTE_CREDITS;
    u32::try_from(minutes.saturating_mul(60)).unwrap_or(u32::MAX)
}

/// Credit packs sold through Stripe Checkout (API.md defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CreditPack {
    Starter,
    Plus,
    Pro,
}

impl CreditPack {
    /// Parses the API's pack name (`starter`, `plus`, `pro`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "starter" => Some(Self::Starter),
            "plus" => Some(Self::Plus),
            "pro" => Some(Self::Pro),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Starter => "starter",
            Self::Plus => "plus",
            Self::Pro => "pro",
        }
    }

    /// Credits granted.
    pub fn credits(self) -> i64 {
        match self {
            Self::Starter => 500,
            Self::Plus => 1_200,
            Self::Pro => 3_000,
        }
    }

    /// Price in US cents (Stripe `unit_amount`, currency `usd`).
    pub fn price_cents(self) -> i64 {
        match self {
            Self::Starter => 500,
            Self::Plus => 1_000,
            Self::Pro => 2_000,
        }
    }
}

/// The currency every pack is sold in (Stripe's lowercase code).
pub const PACK_CURRENCY: &str = "usd";

/// Why a paid Checkout Session does not match the pack it claims to buy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaidMismatch {
    Amount { paid: Option<i64>, price: i64 },
    Currency { paid: Option<String> },
}

/// Checks what Stripe says was paid (`amount_total`, `currency`) against the pack's
/// price: credits are granted only for exactly the pack's price in its currency.
pub fn check_paid(
    pack: CreditPack,
    amount_total: Option<i64>,
    currency: Option<&str>,
) -> Result<(), PaidMismatch> {
    if amount_total != Some(pack.price_cents()) {
        return Err(PaidMismatch::Amount {
            paid: amount_total,
            price: pack.price_cents(),
        });
    }
    if currency != Some(PACK_CURRENCY) {
        return Err(PaidMismatch::Currency {
            paid: currency.map(str::to_owned),
        });
    }
    Ok(())
}

/// Credits bought by `refunded` cents of a charge of `amount` that bought `credits`,
/// rounded down — so the steps of a charge refunded in parts add up to exactly
/// `credits` once it is fully refunded.
pub fn credits_for_refunded(credits: i64, amount: i64, refunded: i64) -> i64 {
    if amount <= 0 {
        return if refunded > 0 { credits } else { 0 };
    }
    let refunded = refunded.clamp(0, amount);
    let scaled = i128::from(credits) * i128::from(refunded) / i128::from(amount);
    i64::try_from(scaled).unwrap_or(credits)
}

/// Provider list prices in USD, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderRates {
    /// Twilio outbound voice, per started minute.
    pub twilio_per_min_usd: f64,
    /// Deepgram streaming STT, per minute of audio (billed per second).
    pub deepgram_per_min_usd: f64,
    /// LLM, per million tokens (input and output alike).
    pub llm_per_million_tokens_usd: f64,
    /// ElevenLabs TTS, per thousand characters.
    pub tts_per_thousand_chars_usd: f64,
}

impl Default for ProviderRates {
    /// The first version's rates.
    fn default() -> Self {
        Self {
            twilio_per_min_usd: 0.013,
            deepgram_per_min_usd: 0.0043,
            llm_per_million_tokens_usd: 0.10,
            tts_per_thousand_chars_usd: 0.15,
        }
    }
}

/// What one call consumed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallUsage {
    /// Twilio's call duration (billed per started minute).
    pub call_duration_secs: u32,
    pub stt_audio_secs: f64,
    pub llm_input_tokens: u64,
    pub llm_output_tokens: u64,
    pub tts_chars: u64,
}

/// Provider costs of one call in micro-dollars (1 USD = 1,000,000).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostBreakdown {
    pub twilio_micros: i64,
    pub stt_micros: i64,
    pub llm_micros: i64,
    pub tts_micros: i64,
    pub total_micros: i64,
}

/// A USD price as whole micro-dollars; a negative or non-finite rate counts as 0 rather
/// than corrupting totals.
fn usd_to_micros(usd: f64) -> i64 {
    if !usd.is_finite() || usd <= 0.0 {
        return 0;
    }
    // `as` saturates for huge values, which no real price reaches.
    (usd * MICROS_PER_USD).round() as i64
}

/// `count × micros_per_unit / per_units`, rounded half up, in integers.
fn scaled(count: u64, micros_per_unit: i64, per_units: u64) -> i64 {
    let num = u128::from(count) * u128::from(micros_per_unit.unsigned_abs());
    let per = u128::from(per_units.max(1));
    i64::try_from((num + per / 2) / per).unwrap_or(i64::MAX)
}

/// Per-provider cost of a call at `rates`.
pub fn cost_breakdown(rates: &ProviderRates, usage: &CallUsage) -> CostBreakdown {
    let twilio_micros = usd_to_micros(rates.twilio_per_min_usd)
        .saturating_mul(started_minutes(usage.call_duration_secs));
    // STT is billed per second of audio: work in thousandths of a second to keep
    // fractional seconds without floating-point sums.
    let stt_millis = if usage.stt_audio_secs.is_finite() && usage.stt_audio_secs > 0.0 {
        (usage.stt_audio_secs * 1000.0).round() as u64
    } else {
        0
    };
    let stt_micros = scaled(
        stt_millis,
        usd_to_micros(rates.deepgram_per_min_usd),
        60_000,
    );
    let llm_tokens = usage
        .llm_input_tokens
        .saturating_add(usage.llm_output_tokens);
    let llm_micros = scaled(
        llm_tokens,
        usd_to_micros(rates.llm_per_million_tokens_usd),
        1_000_000,
    );
    let tts_micros = scaled(
        usage.tts_chars,
        usd_to_micros(rates.tts_per_thousand_chars_usd),
        1_000,
    );
    CostBreakdown {
        twilio_micros,
        stt_micros,
        llm_micros,
        tts_micros,
        total_micros: twilio_micros
            .saturating_add(stt_micros)
            .saturating_add(llm_micros)
            .saturating_add(tts_micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 25 + 40 per started minute; 0 when never connected; 0 s connected is the base fee.
    /// Partial refunds add up to the whole pack, never more; a zero-amount charge is
    /// all or nothing.
    #[test]
    fn refund_credits_are_proportional_and_sum_exactly() {
        assert_eq!(credits_for_refunded(1200, 1000, 1000), 1200);
        assert_eq!(credits_for_refunded(1200, 1000, 0), 0);
        assert_eq!(credits_for_refunded(1200, 1000, 333), 399);
        let steps = [0, 333, 666, 1000];
        let total: i64 = steps
            .windows(2)
            .map(|w| {
                credits_for_refunded(1200, 1000, w[1]) - credits_for_refunded(1200, 1000, w[0])
            })
            .sum();
        assert_eq!(total, 1200);
        assert_eq!(
            credits_for_refunded(500, 500, 9_999),
            500,
            "clamped to the charge"
        );
        assert_eq!(credits_for_refunded(500, 0, 1), 500);
        assert_eq!(credits_for_refunded(500, 0, 0), 0);
    }

    /// Only the pack's exact price in dollars buys the pack.
    #[test]
    fn paid_amounts_must_match_the_pack() {
        let pro = CreditPack::Pro;
        assert_eq!(check_paid(pro, Some(2_000), Some("usd")), Ok(()));
        assert_eq!(
            check_paid(pro, Some(1), Some("usd")),
            Err(PaidMismatch::Amount {
                paid: Some(1),
                price: 2_000
            })
        );
        assert!(check_paid(pro, None, Some("usd")).is_err());
        assert_eq!(
            check_paid(pro, Some(2_000), Some("eur")),
            Err(PaidMismatch::Currency {
                paid: Some("eur".into())
            })
        );
        assert!(check_paid(pro, Some(2_000), None).is_err());
    }

    #[test]
    fn call_charges() {
        assert_eq!(call_charge_credits(0, false), 0);
        assert_eq!(call_charge_credits(300, false), 0);
        assert_eq!(call_charge_credits(0, true), 25);
        assert_eq!(call_charge_credits(1, true), 65);
        assert_eq!(call_charge_credits(60, true), 65);
        assert_eq!(call_charge_credits(61, true), 105);
        assert_eq!(call_charge_credits(600, true), 25 + 400);
        assert_eq!(MIN_CREDITS_TO_START, 65);
        assert_eq!(call_charge_credits(u32::MAX, true), 25 + 40 * 71_582_789);
    }

    /// The affordable duration is whole minutes after the base fee.
    #[test]
    fn max_call_secs() {
        assert_eq!(max_call_secs_for_balance(-5), 0);
        assert_eq!(max_call_secs_for_balance(64), 0);
        assert_eq!(max_call_secs_for_balance(65), 60);
        assert_eq!(max_call_secs_for_balance(104), 60);
        assert_eq!(max_call_secs_for_balance(105), 120);
        assert_eq!(max_call_secs_for_balance(200), 240);
        assert_eq!(max_call_secs_for_balance(i64::MAX), u32::MAX);
    }

    /// Pack names, credits and prices are the API.md defaults.
    #[test]
    fn packs() {
        assert_eq!(CreditPack::from_name("starter"), Some(CreditPack::Starter));
        assert_eq!(CreditPack::from_name("Pro"), None);
        let table: Vec<_> = [CreditPack::Starter, CreditPack::Plus, CreditPack::Pro]
            .iter()
            .map(|p| (p.name(), p.credits(), p.price_cents()))
            .collect();
        assert_eq!(
            table,
            [
                ("starter", 500, 500),
                ("plus", 1200, 1000),
                ("pro", 3000, 2000)
            ]
        );
        assert_eq!(
            serde_json::to_string(&CreditPack::Plus).unwrap(),
            "\"plus\""
        );
    }

    /// A 61.5-second call at the default rates, computed by hand:
    /// Twilio 2 min × 13,000 = 26,000 µ$; STT 61.5 s × 4,300/60 = 4,407.5 → 4,408 µ$;
    /// LLM 1,234 tok × 0.1 = 123.4 → 123 µ$; TTS 420 chars × 150 = 63,000 µ$.
    #[test]
    fn default_rates_breakdown() {
        let usage = CallUsage {
            call_duration_secs: 62,
            stt_audio_secs: 61.5,
            llm_input_tokens: 1_000,
            llm_output_tokens: 234,
            tts_chars: 420,
        };
        assert_eq!(
            cost_breakdown(&ProviderRates::default(), &usage),
            CostBreakdown {
                twilio_micros: 26_000,
                stt_micros: 4_408,
                llm_micros: 123,
                tts_micros: 63_000,
                total_micros: 93_531,
            }
        );
    }

    /// Nothing used costs nothing; broken rates or usage count as zero, not NaN.
    #[test]
    fn zero_and_garbage() {
        assert_eq!(
            cost_breakdown(&ProviderRates::default(), &CallUsage::default()),
            CostBreakdown::default()
        );
        let rates = ProviderRates {
            twilio_per_min_usd: f64::NAN,
            deepgram_per_min_usd: -1.0,
            llm_per_million_tokens_usd: f64::INFINITY,
            tts_per_thousand_chars_usd: 0.15,
        };
        let usage = CallUsage {
            call_duration_secs: 60,
            stt_audio_secs: f64::NAN,
            llm_input_tokens: 10,
            llm_output_tokens: 0,
            tts_chars: 1,
        };
        let c = cost_breakdown(&rates, &usage);
        assert_eq!(
            (
                c.twilio_micros,
                c.stt_micros,
                c.llm_micros,
                c.tts_micros,
                c.total_micros
            ),
            (0, 0, 0, 150, 150)
        );
    }

    /// Sub-micro-dollar amounts round half up.
    #[test]
    fn rounding() {
        assert_eq!(scaled(5, 1, 10), 1);
        assert_eq!(scaled(4, 1, 10), 0);
        assert_eq!(scaled(15, 1, 10), 2);
        assert_eq!(usd_to_micros(0.013), 13_000);
        assert_eq!(usd_to_micros(0.0043), 4_300);
    }
}
