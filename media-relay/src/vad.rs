//! The caller's voice activity, frame by frame: is this 20 ms of μ-law loud enough to be
//! speech? Pure and cheap (one table lookup and an add per sample), so the call loop runs
//! it on every caller frame and hands the machine only the transitions
//! ([`crate::machine::Event::CallerAudio`]).
//!
//! It is the relay's own clock for pauses (when to ask Deepgram to `Finalize`, when a
//! pause has lasted the endpointing time), and, while the persona speaks, the evidence for
//! a fast barge-in: [`analyse`] tells how loud a frame is and whether it is periodic like
//! a voice (a cough or line noise is not). What was said is still Deepgram's to say.

/// A frame at least this loud (mean power, dBFS) is voice: Deepgram's own VAD threshold in
/// the fake, and well above a phone line's noise floor (about −60 dBFS).
pub const VOICE_DBFS: f64 = -40.0;

/// Each μ-law code's linear value (G.711, 14-bit magnitude scaled to 16 bits).
const LINEAR: [i16; 256] = linear_table();
/// Square of each code's linear value.
const POWER: [u32; 256] = power_table();

const fn linear_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        // G.711 μ-law decoding: invert, then sign, exponent and mantissa.
        let u = !(i as u8);
        let exponent = ((u >> 4) & 0x07) as i32;
        let mantissa = (u & 0x0F) as i32;
        let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
        // At most 32124: fits i16.
        table[i] = if u & 0x80 != 0 { -magnitude } else { magnitude } as i16;
        i += 1;
    }
    table
}

const fn power_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let m = LINEAR[i].unsigned_abs() as u32;
        table[i] = m * m;
        i += 1;
    }
    table
}

/// Mean power of a frame (linear, per sample): 0 for an empty one.
pub fn mean_power(ulaw: &[u8]) -> u64 {
    if ulaw.is_empty() {
        return 0;
    }
    let sum: u64 = ulaw.iter().map(|&b| u64::from(POWER[usize::from(b)])).sum();
    sum / ulaw.len() as u64
}

/// A mean power in dBFS (−100 for silence).
pub fn dbfs(mean_power: u64) -> f64 {
    if mean_power == 0 {
        return -100.0;
    }
    10.0 * (mean_power as f64 / FULL_SCALE_POWER).log10()
}

/// Pitch periods searched, in samples: 2.5–12.5 ms (80–400 Hz). A higher tone also
/// repeats at a multiple of its period inside this range.
const LAGS: std::ops::RangeInclusive<usize> = 20..=100;
/// Normalized autocorrelation at or above this is a voice: a voiced vowel or a tone scores
/// 0.8–1.0, noise (a cough, a hiss) well under 0.5.
pub const PERIODIC: f32 = 0.7;

/// How much a frame repeats itself at some pitch period: the best normalized
/// autocorrelation over [`LAGS`], in −1..=1 (0 for a frame too short or silent).
pub fn periodicity(ulaw: &[u8]) -> f32 {
    let n = ulaw.len();
    if n <= *LAGS.end() + 20 {
        return 0.0;
    }
    let mut x = [0i32; 160];
    let n = n.min(x.len());
    for (dst, &b) in x.iter_mut().zip(&ulaw[..n]) {
        *dst = i32::from(LINEAR[usize::from(b)] >> 2);
    }
    let x = &x[..n];
    let mut best = 0.0f32;
    for lag in LAGS {
        let (a, b) = (&x[..n - lag], &x[lag..]);
        let (mut ab, mut aa, mut bb) = (0i64, 0i64, 0i64);
        for (&p, &q) in a.iter().zip(b) {
            ab += i64::from(p * q);
            aa += i64::from(p * p);
            bb += i64::from(q * q);
        }
        if aa > 0 && bb > 0 {
            let r = ab as f64 / ((aa as f64) * (bb as f64)).sqrt();
            best = best.max(r as f32);
        }
    }
    best
}

/// What the machine needs to know of one caller frame while the persona speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAnalysis {
    /// Mean power, linear ([`mean_power`]).
    pub power: u64,
    /// Loud enough to be voice and periodic like one.
    pub voice_like: bool,
}

/// Analyses a caller frame (the periodicity only for a loud one: it is the costly part).
pub fn analyse(ulaw: &[u8]) -> FrameAnalysis {
    analyse_with_power(ulaw, mean_power(ulaw))
}

/// [`analyse`] of a frame whose [`mean_power`] is already known (the [`Vad`] took it).
pub fn analyse_with_power(ulaw: &[u8], power: u64) -> FrameAnalysis {
    let loud = dbfs(power) >= VOICE_DBFS;
    FrameAnalysis {
        power,
        voice_like: loud && periodicity(ulaw) >= PERIODIC,
    }
}

/// 0 dBFS: a mean power of 32768² (RMS at full scale, as the fake Deepgram measures).
const FULL_SCALE_POWER: f64 = 32768.0 * 32768.0;

/// Voiced or not, per frame; reports only changes.
#[derive(Debug, Clone)]
pub struct Vad {
    voiced: bool,
    /// Mean power of the last frame.
    power: u64,
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
            power: 0,
            // A power, far inside u64: the cast cannot truncate.
            threshold: per_sample as u64,
        }
    }

    /// Mean power of the last frame ([`mean_power`]).
    pub fn power(&self) -> u64 {
        self.power
    }

    /// Whether the last frame was voiced.
    pub fn voiced(&self) -> bool {
        self.voiced
    }

    /// Classifies one frame; `Some(voiced)` when it differs from the previous frame.
    pub fn push(&mut self, ulaw: &[u8]) -> Option<bool> {
        if ulaw.is_empty() {
            return None;
        }
        self.power = mean_power(ulaw);
        let voiced = self.power >= self.threshold;
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

    /// The tables decode like G.711: silence is zero, the loudest codes are ∓32124, and
    /// encoding then decoding stays within μ-law's step.
    #[test]
    fn the_tables_are_g711() {
        assert_eq!(LINEAR[0xFF], 0);
        assert_eq!(LINEAR[0x7F], 0);
        assert_eq!(LINEAR[0x00], -32124);
        assert_eq!(LINEAR[0x80], 32124);
        assert_eq!(POWER[0x00], 32124 * 32124);
        for s in [-20_000, -1000, -7, 0, 5, 300, 8000, 31_000] {
            let back = i32::from(LINEAR[usize::from(encode(s))]);
            assert!((back - s).abs() <= (s.abs() / 16).max(8), "{s} → {back}");
        }
    }

    /// Deterministic white noise with a cough's envelope: a sharp onset, then decay.
    fn cough(amplitude: f64, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..160)
            .map(|n| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let white = (x % 20_001) as f64 / 10_000.0 - 1.0;
                let envelope = (-f64::from(n) / 400.0).exp();
                encode((amplitude * envelope * white) as i32)
            })
            .collect()
    }

    /// Tones across the tone-code range and a low voice pitch are periodic; noise, loud
    /// or not, is not; a cough is loud but not voice-like.
    #[test]
    fn voices_repeat_and_noise_does_not() {
        let tone_at = |hz: f64| -> Vec<u8> {
            (0..160)
                .map(|n| {
                    encode(
                        (8000.0 * (2.0 * std::f64::consts::PI * hz * f64::from(n) / 8000.0).cos())
                            as i32,
                    )
                })
                .collect()
        };
        for hz in [110.0, 300.0, 440.0, 1234.0, 3120.0] {
            let p = periodicity(&tone_at(hz));
            assert!(p >= PERIODIC, "{hz} Hz: {p}");
        }
        for seed in 1..20u64 {
            let noise = cough(12_000.0, seed * 7919);
            let p = periodicity(&noise);
            assert!(p < 0.5, "noise {seed}: {p}");
            let a = analyse(&noise);
            assert!(dbfs(a.power) > VOICE_DBFS && !a.voice_like, "{a:?}");
        }
        assert!(analyse(&tone(8000.0)).voice_like);
        assert!(!analyse(&tone(100.0)).voice_like, "too quiet to be voice");
        assert_eq!(periodicity(&[0xFF; 160]), 0.0);
        assert_eq!(periodicity(&[0x00; 100]), 0.0);
        assert!(dbfs(mean_power(&tone(8000.0))) > -20.0);
        assert_eq!(dbfs(0), -100.0);
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
