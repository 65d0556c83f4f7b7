//! The caller's voice activity, frame by frame: is this 20 ms of μ-law loud enough to be
//! speech? Pure and cheap (one table lookup and an add per sample), so the call loop runs
//! it on every caller frame and hands the machine only the transitions
//! ([`crate::machine::Event::CallerVoice`]).
//!
//! It is only the relay's own clock for pauses (when to ask Deepgram to `Finalize`, when a
//! pause has lasted the endpointing time); what was said, and whether it was speech at all,
//! is still Deepgram's to say.

/// A frame at least this loud (mean power, dBFS) is voice: Deepgram's own VAD threshold in
/// the fake, and well above a phone line's noise floor (about −60 dBFS).
pub const VOICE_DBFS: f64 = -40.0;

/// Square of each μ-law code's linear value (G.711, 14-bit magnitude scaled to 16 bits).
const POWER: [u32; 256] = power_table();

const fn power_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        // G.711 μ-law decoding: invert, then exponent and mantissa.
        let u = !(i as u8);
        let exponent = ((u >> 4) & 0x07) as i32;
        let mantissa = (u & 0x0F) as i32;
        let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
        let m = magnitude as u32;
        table[i] = m * m;
        i += 1;
    }
    table
}

/// 0 dBFS: a mean power of 32768² (RMS at full scale, as the fake Deepgram measures).
const FULL_SCALE_POWER: f64 = 32768.0 * 32768.0;

/// Voiced or not, per frame; reports only changes.
#[derive(Debug, Clone)]
pub struct Vad {
    voiced: bool,
    /// Sum of squares per sample at the threshold.
    threshold: u64,
}

impl Default for Vad {
    fn default() -> Self {
        Self::new(VOICE_DBFS)
    }
}

impl Vad {
    /// Starts quiet; `dbfs` is the threshold of mean power.
    pub fn new(dbfs: f64) -> Self {
        let per_sample = FULL_SCALE_POWER * 10f64.powf(dbfs / 10.0);
        Self {
            voiced: false,
            // A power, far inside u64: the cast cannot truncate.
            threshold: per_sample as u64,
        }
    }

    /// Classifies one frame; `Some(voiced)` when it differs from the previous frame.
    pub fn push(&mut self, ulaw: &[u8]) -> Option<bool> {
        if ulaw.is_empty() {
            return None;
        }
        let sum: u64 = ulaw.iter().map(|&b| u64::from(POWER[usize::from(b)])).sum();
        let voiced = sum >= self.threshold * ulaw.len() as u64;
        (voiced != self.voiced).then(|| {
            self.voiced = voiced;
            voiced
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// μ-law encoding of one linear sample (G.711), for test signals.
    fn encode(sample: i32) -> u8 {
        let sign = if sample < 0 { 0x80 } else { 0 };
        let mag = (sample.unsigned_abs().min(32635) + 0x84) as i32;
        let mut exponent = 7;
        while exponent > 0 && mag & (0x4000 >> (7 - exponent)) == 0 {
            exponent -= 1;
        }
        let mantissa = (mag >> (exponent + 3)) & 0x0F;
        !(sign | (exponent << 4) as u8 | mantissa as u8)
    }

    fn tone(amplitude: f64) -> Vec<u8> {
        (0..160)
            .map(|n| {
                let s =
                    amplitude * (2.0 * std::f64::consts::PI * 440.0 * f64::from(n) / 8000.0).sin();
                encode(s as i32)
            })
            .collect()
    }

    /// The table decodes like G.711: silence is zero, the loudest code is 32124.
    #[test]
    fn the_power_table_is_g711() {
        assert_eq!(POWER[0xFF], 0);
        assert_eq!(POWER[0x7F], 0);
        assert_eq!(POWER[0x00], 32124 * 32124);
        assert_eq!(POWER[0x80], 32124 * 32124);
    }

    /// Speech-level audio is voice, digital silence and line noise are not, and only
    /// changes are reported.
    #[test]
    fn reports_transitions_at_the_threshold() {
        let mut vad = Vad::default();
        let silence = vec![0xFF; 160];
        assert_eq!(vad.push(&silence), None);
        // −12 dBFS peak: speech.
        assert_eq!(vad.push(&tone(8000.0)), Some(true));
        assert_eq!(vad.push(&tone(8000.0)), None);
        // About −53 dBFS mean power: a noisy line, not voice.
        assert_eq!(vad.push(&tone(100.0)), Some(false));
        assert_eq!(vad.push(&silence), None);
        // Either side of −40 dBFS (a sine's mean power is peak² / 2).
        let at = |dbfs: f64| 32768.0 * 10f64.powf(dbfs / 20.0) * std::f64::consts::SQRT_2;
        assert_eq!(vad.push(&tone(at(-37.0))), Some(true));
        assert_eq!(vad.push(&tone(at(-43.0))), Some(false));
        assert_eq!(vad.push(&[]), None);
    }
}
