//! Prometheus metrics for `/metrics`.
//!
//! Owns the metric registry and the handles the call tasks update. It must not decide
//! anything: call code records what happened, this module only counts and encodes.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Label set of `relay_reconnects_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// `deepgram`, `elevenlabs` or `control`.
    pub provider: &'static str,
}

/// Label set of `relay_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// How the call ended, e.g. `completed`, `rejected_token`, `tts_failed`.
    pub outcome: &'static str,
}

/// Every relay metric. Handles are cheap clones of shared atomics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls currently streaming.
    pub active_calls: Gauge,
    /// Twilio media frames received.
    pub frames_in: Counter,
    /// Audio frames sent to Twilio.
    pub frames_out: Counter,
    /// Outbound frames thrown away (barge-in, full queue, call end).
    pub frames_dropped: Counter,
    /// Outbound frames sent later than their 20 ms slot.
    pub late_frames: Counter,
    /// Provider reconnect attempts.
    pub reconnects: Family<ProviderLabel, Counter>,
    /// Calls by outcome.
    pub calls: Family<OutcomeLabel, Counter>,
    /// Greetings synthesized while the phone rang (`synthesized`, `cached`, `failed`),
    /// and at each stream's start whether one was there (`played`, `not_ready`, `missing`).
    pub greetings: Family<OutcomeLabel, Counter>,
    /// From the user's end of turn to the first persona audio frame sent.
    pub end_of_turn_to_first_audio: Histogram,
    /// From Deepgram's end-of-speech timestamp to the final transcript arriving.
    pub stt_final_latency: Histogram,
    /// From text sent to TTS to its first audio byte.
    pub tts_first_byte: Histogram,
    /// From `user_turn` sent to the DO's first `say_delta` (the LLM's first token).
    pub llm_first_token: Histogram,
    /// A caller frame read from Twilio → written to Deepgram's socket.
    pub forward_in: Histogram,
    /// TTS audio read from ElevenLabs → its first frame written to Twilio, for audio the
    /// pacer sends at once (audio held back to pace playback is not overhead).
    pub forward_out: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts a greeting outcome (see [`Metrics::greetings`]).
    pub fn greeting(&self, outcome: &'static str) {
        self.greetings
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            active_calls: Gauge::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            frames_dropped: Counter::default(),
            late_frames: Counter::default(),
            reconnects: Family::default(),
            calls: Family::default(),
            greetings: Family::default(),
            end_of_turn_to_first_audio: latency_histogram(),
            stt_final_latency: latency_histogram(),
            tts_first_byte: latency_histogram(),
            llm_first_token: latency_histogram(),
            forward_in: forwarding_histogram(),
            forward_out: forwarding_histogram(),
            registry: Registry::default(),
        };
        // Counter names get `_total` and unit-tagged names `_seconds` from the encoder.
        registry.register(
            "relay_active_calls",
            "Calls currently streaming",
            m.active_calls.clone(),
        );
        registry.register(
            "relay_frames_in",
            "Twilio media frames received",
            m.frames_in.clone(),
        );
        registry.register(
            "relay_frames_out",
            "Audio frames sent to Twilio",
            m.frames_out.clone(),
        );
        registry.register(
            "relay_frames_dropped",
            "Outbound audio frames dropped (barge-in, overflow, call end)",
            m.frames_dropped.clone(),
        );
        registry.register(
            "relay_late_frames",
            "Outbound audio frames sent after their 20 ms slot",
            m.late_frames.clone(),
        );
        registry.register(
            "relay_reconnects",
            "Provider reconnect attempts",
            m.reconnects.clone(),
        );
        registry.register("relay_calls", "Calls handled, by outcome", m.calls.clone());
        registry.register(
            "relay_greetings",
            "Greetings prepared while ringing, and found (or not) at stream start",
            m.greetings.clone(),
        );
        // Histograms in seconds (the encoder appends `_seconds`).
        for (name, help, histogram) in [
            (
                "relay_end_of_turn_to_first_audio",
                "User end of turn to first persona audio frame",
                &m.end_of_turn_to_first_audio,
            ),
            (
                "relay_stt_final_latency",
                "End of speech to final transcript",
                &m.stt_final_latency,
            ),
            (
                "relay_tts_first_byte",
                "Text sent to TTS to first audio",
                &m.tts_first_byte,
            ),
            (
                "relay_llm_first_token",
                "user_turn sent to first say_delta",
                &m.llm_first_token,
            ),
            (
                "relay_forward_in",
                "Caller frame read from Twilio to written to Deepgram",
                &m.forward_in,
            ),
            (
                "relay_forward_out",
                "TTS audio read from ElevenLabs to its first frame written to Twilio (unpaced)",
                &m.forward_out,
            ),
        ] {
            registry.register_with_unit(name, help, Unit::Seconds, histogram.clone());
        }
        Self { registry, ..m }
    }

    /// Counts one reconnect attempt to `provider`.
    pub fn reconnect(&self, provider: &'static str) {
        self.reconnects
            .get_or_create(&ProviderLabel { provider })
            .inc();
    }

    /// Counts one call that ended with `outcome`.
    pub fn call_ended(&self, outcome: &'static str) {
        self.calls.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The registry in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
    }
}

/// 10 ms … ~10 s: the interesting range for conversational latency.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 11))
}

/// 10 µs … 100 ms: per-frame work inside the relay, with room for a stalled machine.
fn forwarding_histogram() -> Histogram {
    Histogram::new([
        10e-6, 25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 1e-3, 2e-3, 5e-3,
        10e-3, 25e-3, 50e-3, 100e-3,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric named in the brief appears in the output under its exact name.
    #[test]
    fn all_metrics_are_exposed() {
        let m = Metrics::new();
        m.reconnect("deepgram");
        m.call_ended("completed");
        m.frames_in.inc();
        m.tts_first_byte.observe(0.2);
        let text = m.encode();
        for name in [
            "relay_active_calls ",
            "relay_frames_in_total 1",
            "relay_frames_out_total 0",
            "relay_frames_dropped_total 0",
            "relay_late_frames_total 0",
            "relay_reconnects_total{provider=\"deepgram\"} 1",
            "relay_calls_total{outcome=\"completed\"} 1",
            "relay_end_of_turn_to_first_audio_seconds_bucket",
            "relay_stt_final_latency_seconds_count 0",
            "relay_tts_first_byte_seconds_count 1",
            "relay_llm_first_token_seconds_sum",
            "relay_forward_in_seconds_bucket{le=\"0.0002\"}",
            "relay_forward_out_seconds_count 0",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
    }
}
