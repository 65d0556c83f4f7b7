//! Test audio: G.711 μ-law, a "tone-coded speech" codec and WAV helpers.
//!
//! Owns everything the fakes and the phone simulator need to produce and understand
//! telephone audio (8 kHz, mono, μ-law) without a real speech engine: text is encoded as
//! one pure tone per character, so whoever receives the audio can tell exactly what was
//! said, even after it went through the relay, Twilio's framing and a barge-in cut.
//! It must not do any I/O besides the explicit WAV file helpers, and never reads a clock.
//!
//! Tone code: every character is a burst of [`SAMPLES_PER_CHAR`] samples (40 ms) of a
//! cosine starting at phase 0, so each burst begins with a peak and its start can be
//! found exactly after silence. Printable ASCII `' '..='~'` maps to
//! `300 Hz + 30 Hz × (c − ' ')` (300..3120 Hz, under the 4 kHz Nyquist limit); any other
//! character is sent as `'?'`.
//!
//! Decoding runs Goertzel filters over 320-sample blocks aligned on the start of a burst
//! run. Alignment is found again after any silence, which is how a decoder that joins
//! mid-stream, or audio cut by a barge-in and followed by a pause, still decodes. Audio
//! spliced without any silence at a non-burst boundary cannot be re-aligned until the
//! next pause: those blocks are skipped rather than guessed.

use std::f32::consts::PI;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Telephone sample rate in Hz.
pub const SAMPLE_RATE: u32 = 8000;
/// Duration of one tone-coded character.
pub const MS_PER_CHAR: u32 = 40;
/// Samples (= μ-law bytes) in one tone-coded character.
pub const SAMPLES_PER_CHAR: usize = (SAMPLE_RATE * MS_PER_CHAR / 1000) as usize;
/// μ-law byte for a zero sample: what silence looks like on the wire.
pub const ULAW_SILENCE: u8 = 0xFF;
/// Peak amplitude of the tone bursts, about −12 dBFS: loud like speech, far from clipping.
pub const TONE_AMPLITUDE: f32 = 8000.0;

/// Lowest tone frequency (for `' '`).
const BASE_HZ: f32 = 300.0;
/// Spacing between adjacent characters' tones; above the 25 Hz bin width of a 40 ms block.
const STEP_HZ: f32 = 30.0;
/// First and last printable ASCII characters the code carries.
const FIRST_CHAR: u8 = b' ';
const LAST_CHAR: u8 = b'~';
const ALPHABET_LEN: usize = (LAST_CHAR - FIRST_CHAR + 1) as usize;

/// A sample at least this loud can start a burst (a burst starts at +TONE_AMPLITUDE).
const START_THRESHOLD: i32 = 2000;
/// Samples below this are "quiet": a pure tone never has several in a row.
const QUIET_THRESHOLD: i32 = 200;
/// Consecutive quiet samples that must precede a burst start.
const QUIET_RUN_BEFORE_START: usize = 4;
/// Minimum estimated tone amplitude for a block to count as a character: a block that is
/// mostly not tone (e.g. the tail of a cut burst) is not decoded.
const MIN_BLOCK_AMPLITUDE: f32 = TONE_AMPLITUDE * 0.6;
/// Minimum share of the block's energy in the winning tone: an aligned burst scores about
/// 0.99 (μ-law noise only); a block straddling two tones scores far lower.
const MIN_PURITY: f32 = 0.7;
/// Floor returned by [`energy_dbfs`] for digital silence instead of −∞.
pub const SILENCE_DBFS: f32 = -100.0;

const ULAW_BIAS: i32 = 0x84;
const ULAW_CLIP: i32 = 32635;

/// Encodes one 16-bit linear PCM sample as G.711 μ-law (ITU-T G.711, with the standard
/// 0x84 bias and all bits inverted on the wire).
pub fn ulaw_encode(sample: i16) -> u8 {
    let mut pcm = i32::from(sample);
    let sign = if pcm < 0 {
        pcm = -pcm;
        0x80
    } else {
        0x00
    };
    pcm = pcm.min(ULAW_CLIP) + ULAW_BIAS;
    // Exponent = position of the highest set bit above bit 7 (segment number 0..=7).
    let exponent = (0..8).rev().find(|e| pcm & (0x80 << e) != 0).unwrap_or(0);
    let mantissa = (pcm >> (exponent + 3)) & 0x0F;
    // Fits in 8 bits by construction: sign (bit 7) | exponent (bits 4..6) | mantissa.
    let byte = sign | (exponent << 4) | mantissa;
    !(byte as u8)
}

/// Decodes one G.711 μ-law byte to 16-bit linear PCM.
pub fn ulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let sign = u & 0x80;
    let exponent = i32::from((u >> 4) & 0x07);
    let mantissa = i32::from(u & 0x0F);
    let magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS;
    // Largest magnitude is 32124, so the cast cannot overflow.
    let value = magnitude as i16;
    if sign != 0 {
        -value
    } else {
        value
    }
}

/// Encodes linear PCM samples to μ-law bytes.
pub fn pcm_to_ulaw(samples: &[i16]) -> Vec<u8> {
    samples.iter().copied().map(ulaw_encode).collect()
}

/// Decodes μ-law bytes to linear PCM samples.
pub fn ulaw_to_pcm(ulaw: &[u8]) -> Vec<i16> {
    ulaw.iter().copied().map(ulaw_decode).collect()
}

/// `ms` milliseconds of μ-law silence (8 bytes per ms).
pub fn silence(ms: u32) -> Vec<u8> {
    vec![ULAW_SILENCE; (ms as usize) * (SAMPLE_RATE as usize) / 1000]
}

/// Peak amplitude of [`cough`]: louder than the tone code, as a cough into a handset is.
pub const COUGH_AMPLITUDE: f32 = 14_000.0;

/// A cough-like burst: `ms` of white noise (deterministic for `seed`) with a 5 ms onset
/// and an exponential decay over the burst — loud and broadband, with no pitch and no
/// tone a recognizer could read as words.
pub fn cough(ms: u32, seed: u64) -> Vec<u8> {
    let n = (ms as usize) * (SAMPLE_RATE as usize) / 1000;
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            // xorshift64: reproducible noise without a dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let white = (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
            let t = i as f32 / SAMPLE_RATE as f32;
            let onset = (t / 0.005).min(1.0);
            let decay = (-t / (ms.max(1) as f32 / 1000.0 / 3.0)).exp();
            ulaw_encode((COUGH_AMPLITUDE * onset * decay * white) as i16)
        })
        .collect()
}

/// `caller` with `echo` mixed in `loss_db` under its own level (both μ-law; the result
/// is as long as `caller`, the echo cut or padded with silence).
pub fn mix_echo(caller: &[u8], echo: &[u8], loss_db: f32) -> Vec<u8> {
    let gain = 10f32.powf(-loss_db / 20.0);
    caller
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let e = echo
                .get(i)
                .map_or(0.0, |&e| f32::from(ulaw_decode(e)) * gain);
            let sum = (f32::from(ulaw_decode(c)) + e).clamp(-32768.0, 32767.0);
            ulaw_encode(sum as i16)
        })
        .collect()
}

/// Spectral flatness of μ-law audio, 0..=1: the geometric over the arithmetic mean of its
/// power spectrum (a naive DFT over 32 bands). Tones and voiced speech concentrate their
/// power and score low; noise spreads it and scores high (white noise ≈ 0.5–0.6 over so
/// short a window). The fake Deepgram uses it to hear a cough as no words.
pub fn spectral_flatness(ulaw: &[u8]) -> f32 {
    const BANDS: usize = 32;
    let x: Vec<f32> = ulaw.iter().map(|&b| f32::from(ulaw_decode(b))).collect();
    if x.len() < 2 * BANDS || x.iter().all(|&v| v == 0.0) {
        return 0.0;
    }
    let n = x.len() as f32;
    let power: Vec<f32> = (1..=BANDS)
        .map(|k| {
            let w = 2.0 * PI * (k as f32) * 0.5 / (BANDS as f32 + 1.0);
            let (re, im) = x
                .iter()
                .enumerate()
                .fold((0.0f32, 0.0f32), |(re, im), (i, &v)| {
                    let a = w * i as f32;
                    (re + v * a.cos(), im - v * a.sin())
                });
            (re * re + im * im) / n + 1e-3
        })
        .collect();
    let log_mean = power.iter().map(|p| p.ln()).sum::<f32>() / BANDS as f32;
    let mean = power.iter().sum::<f32>() / BANDS as f32;
    log_mean.exp() / mean
}

/// Duration in milliseconds of `bytes` μ-law bytes at 8 kHz.
pub fn duration_ms(bytes: usize) -> u64 {
    (bytes as u64) * 1000 / u64::from(SAMPLE_RATE)
}

/// RMS level of μ-law audio in dBFS (0 dBFS = full-scale square wave); used by the fakes'
/// voice activity detection. Empty input and digital silence give [`SILENCE_DBFS`].
pub fn energy_dbfs(ulaw: &[u8]) -> f32 {
    if ulaw.is_empty() {
        return SILENCE_DBFS;
    }
    let sum: f64 = ulaw
        .iter()
        .map(|&b| {
            let s = f64::from(ulaw_decode(b));
            s * s
        })
        .sum();
    let rms = (sum / ulaw.len() as f64).sqrt();
    if rms <= 0.0 {
        return SILENCE_DBFS;
    }
    let db = 20.0 * (rms / 32768.0).log10();
    (db as f32).max(SILENCE_DBFS)
}

/// The character a tone code actually carries for `c` (unsupported characters become `'?'`).
pub fn normalize_char(c: char) -> char {
    if c.is_ascii() && (FIRST_CHAR..=LAST_CHAR).contains(&(c as u8)) {
        c
    } else {
        '?'
    }
}

/// The text a tone code actually carries for `text` (what a decoder will give back).
pub fn normalize_text(text: &str) -> String {
    text.chars().map(normalize_char).collect()
}

/// Tone frequency in Hz for a character (after [`normalize_char`]).
pub fn char_frequency(c: char) -> f32 {
    let index = normalize_char(c) as u8 - FIRST_CHAR;
    BASE_HZ + STEP_HZ * f32::from(index)
}

/// Encodes `text` as tone-coded μ-law audio: 40 ms per character, no gaps, no padding.
pub fn encode_text(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.chars().count() * SAMPLES_PER_CHAR);
    for c in text.chars() {
        let w = 2.0 * PI * char_frequency(c) / SAMPLE_RATE as f32;
        // Phase restarts at 0 for every character so each burst starts on a peak.
        out.extend((0..SAMPLES_PER_CHAR).map(|n| {
            let s = TONE_AMPLITUDE * (w * n as f32).cos();
            ulaw_encode(s as i16)
        }));
    }
    out
}

/// Decodes a complete tone-coded buffer in one go (see [`ToneDecoder`]).
pub fn decode_text(ulaw: &[u8]) -> String {
    let mut decoder = ToneDecoder::new();
    decoder.push(ulaw)
}

/// Precomputed Goertzel coefficients, one per alphabet character.
struct Bank {
    coeffs: [f32; ALPHABET_LEN],
}

impl Bank {
    fn new() -> Self {
        let mut coeffs = [0.0; ALPHABET_LEN];
        for (i, c) in coeffs.iter_mut().enumerate() {
            let f = BASE_HZ + STEP_HZ * i as f32;
            *c = 2.0 * (2.0 * PI * f / SAMPLE_RATE as f32).cos();
        }
        Self { coeffs }
    }

    /// Classifies one block: the character whose tone it carries, or `None` if the block
    /// is silence, too short a piece of tone, or a mix of tones.
    fn classify(&self, block: &[f32]) -> Option<char> {
        let n = block.len() as f32;
        let total_energy: f32 = block.iter().map(|s| s * s).sum();
        if total_energy <= 0.0 {
            return None;
        }
        let (best, best_power) = self
            .coeffs
            .iter()
            .map(|&coeff| goertzel_power(block, coeff))
            .enumerate()
            .fold(
                (0, 0.0_f32),
                |acc, (i, p)| if p > acc.1 { (i, p) } else { acc },
            );
        // For a pure tone of amplitude A: |X| = A·N/2 and the energy is A²·N/2.
        let amplitude = 2.0 * best_power.sqrt() / n;
        let purity = best_power / (total_energy * n / 2.0);
        if amplitude < MIN_BLOCK_AMPLITUDE || purity < MIN_PURITY {
            return None;
        }
        // `best` < ALPHABET_LEN = 95, so it fits in a u8 and lands on printable ASCII.
        Some(char::from(FIRST_CHAR + best as u8))
    }
}

/// Squared magnitude of the DFT of `block` at the frequency behind `coeff`.
fn goertzel_power(block: &[f32], coeff: f32) -> f32 {
    let (mut s1, mut s2) = (0.0_f32, 0.0_f32);
    for &x in block {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// Streaming tone-code decoder: feed it μ-law in frames of any size, get characters back.
///
/// It waits in "searching" mode for a loud sample after a few quiet ones (the start of a
/// burst run), then classifies every following 320-sample block. A block that carries no
/// clean tone (silence, a cut tail, a splice) sends it back to searching, which re-scans
/// that block's samples so a burst starting inside it is not missed.
pub struct ToneDecoder {
    bank: Bank,
    /// Samples of the block being collected (only while aligned on a burst run).
    block: Vec<f32>,
    aligned: bool,
    /// Consecutive quiet samples seen while searching.
    quiet_run: usize,
    text: String,
}

impl Default for ToneDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ToneDecoder {
    /// A decoder at the start of a stream (the stream start counts as silence).
    pub fn new() -> Self {
        Self {
            bank: Bank::new(),
            block: Vec::with_capacity(SAMPLES_PER_CHAR),
            aligned: false,
            quiet_run: QUIET_RUN_BEFORE_START,
            text: String::new(),
        }
    }

    /// Feeds μ-law audio; returns the characters completed by this frame (also appended
    /// to [`ToneDecoder::text`]). A trailing partial block waits for more audio.
    pub fn push(&mut self, ulaw: &[u8]) -> String {
        let mut out = String::new();
        for &b in ulaw {
            self.push_sample(f32::from(ulaw_decode(b)), &mut out);
        }
        self.text.push_str(&out);
        out
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes everything decoded so far, leaving the decoder's text empty (alignment kept).
    pub fn take_text(&mut self) -> String {
        std::mem::take(&mut self.text)
    }

    /// Whether the decoder is currently inside a burst run.
    pub fn in_burst(&self) -> bool {
        self.aligned
    }

    fn push_sample(&mut self, sample: f32, out: &mut String) {
        if self.aligned {
            self.block.push(sample);
            if self.block.len() == SAMPLES_PER_CHAR {
                // Aligned bursts start on a peak; leading quiet samples mean this block
                // straddles a pause and its tone starts later: re-align on it.
                let starts_quiet = self.block[..QUIET_RUN_BEFORE_START]
                    .iter()
                    .all(|s| (s.abs() as i32) < QUIET_THRESHOLD);
                let decoded = if starts_quiet {
                    None
                } else {
                    self.bank.classify(&self.block)
                };
                match decoded {
                    Some(c) => {
                        out.push(c);
                        self.block.clear();
                    }
                    None => {
                        // Not a clean burst: search again inside this very block.
                        self.aligned = false;
                        self.quiet_run = 0;
                        // A new block can start inside but never complete within these
                        // 320 samples (a start needs quiet samples first), so this recursion
                        // is one level deep.
                        let samples = std::mem::take(&mut self.block);
                        for s in samples {
                            self.push_sample(s, out);
                        }
                    }
                }
            }
            return;
        }
        let magnitude = sample.abs() as i32;
        if magnitude >= START_THRESHOLD && self.quiet_run >= QUIET_RUN_BEFORE_START {
            self.aligned = true;
            self.block.clear();
            self.block.push(sample);
        } else if magnitude < QUIET_THRESHOLD {
            self.quiet_run += 1;
        } else {
            self.quiet_run = 0;
        }
    }
}

/// Errors of the WAV helpers.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("wav: {0}")]
    Hound(#[from] hound::Error),
    #[error("wav must be 8000 Hz mono 16-bit PCM (no resampling), got {rate} Hz, {channels} channel(s), {bits}-bit {format:?}")]
    Format {
        rate: u32,
        channels: u16,
        bits: u16,
        format: hound::SampleFormat,
    },
}

fn wav_spec() -> hound::WavSpec {
    hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

/// Writes μ-law audio as an 8 kHz mono 16-bit PCM WAV to any seekable writer.
pub fn write_wav_to<W: Write + Seek>(writer: W, ulaw: &[u8]) -> Result<(), WavError> {
    let mut wav = hound::WavWriter::new(writer, wav_spec())?;
    for &b in ulaw {
        wav.write_sample(ulaw_decode(b))?;
    }
    wav.finalize()?;
    Ok(())
}

/// Writes μ-law audio as an 8 kHz mono 16-bit PCM WAV file (handy to listen to a call).
pub fn write_wav(path: impl AsRef<Path>, ulaw: &[u8]) -> Result<(), WavError> {
    let mut wav = hound::WavWriter::create(path, wav_spec())?;
    for &b in ulaw {
        wav.write_sample(ulaw_decode(b))?;
    }
    wav.finalize()?;
    Ok(())
}

/// The bytes of an 8 kHz mono 16-bit PCM WAV holding `ulaw`.
pub fn wav_bytes(ulaw: &[u8]) -> Result<Vec<u8>, WavError> {
    let mut cursor = std::io::Cursor::new(Vec::new());
    write_wav_to(&mut cursor, ulaw)?;
    Ok(cursor.into_inner())
}

/// Reads an 8 kHz mono 16-bit PCM WAV into μ-law; anything else is an error (we never
/// resample: test audio must already be telephone audio).
pub fn read_wav_from<R: Read>(reader: R) -> Result<Vec<u8>, WavError> {
    let wav = hound::WavReader::new(reader)?;
    let spec = wav.spec();
    if spec.sample_rate != SAMPLE_RATE
        || spec.channels != 1
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        return Err(WavError::Format {
            rate: spec.sample_rate,
            channels: spec.channels,
            bits: spec.bits_per_sample,
            format: spec.sample_format,
        });
    }
    wav.into_samples::<i16>()
        .map(|s| s.map(ulaw_encode).map_err(WavError::from))
        .collect()
}

/// Reads an 8 kHz mono 16-bit PCM WAV file into μ-law (see [`read_wav_from`]).
pub fn read_wav(path: impl AsRef<Path>) -> Result<Vec<u8>, WavError> {
    let file = std::fs::File::open(path).map_err(hound::Error::from)?;
    read_wav_from(std::io::BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known G.711 μ-law code points (ITU-T table): zero, the segment ends and full scale.
    #[test]
    fn ulaw_matches_reference_points() {
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(ulaw_encode(-1), 0x7F);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(ulaw_decode(0xFF), 0);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_decode(0x00), -32124);
        // 0xEF → segment 1, mantissa 0: (132<<1) − 132 = 132.
        assert_eq!(ulaw_decode(0xEF), 132);
        // 0xF0 → segment 0, mantissa 15: ((15<<3)+132)<<0 − 132 = 120.
        assert_eq!(ulaw_decode(0xF0), 120);
        // 0x8F → segment 7, mantissa 0: (132<<7) − 132 = 16764.
        assert_eq!(ulaw_decode(0x8F), 16764);
    }

    /// Decoding then re-encoding every code word gives it back (encode is decode's inverse),
    /// except the two zero codes, which both decode to 0.
    #[test]
    fn ulaw_round_trips_every_code_word() {
        for b in 0..=255u8 {
            let again = ulaw_encode(ulaw_decode(b));
            if b == 0x7F {
                // "Negative zero" decodes to 0, which encodes as positive zero.
                assert_eq!(again, 0xFF);
            } else {
                assert_eq!(again, b, "code word {b:#04x}");
            }
        }
    }

    /// μ-law error stays within half a quantisation step of the sample's segment.
    #[test]
    fn ulaw_quantisation_error_is_bounded() {
        for s in (-32000..32000).step_by(7) {
            let back = i32::from(ulaw_decode(ulaw_encode(s as i16)));
            let err = (back - s).abs();
            // Step size doubles per segment; relative error of μ-law is under ~6.5 %.
            assert!(err <= 16 || err * 100 <= s.abs() * 7, "s={s} back={back}");
        }
    }

    /// Encoding then decoding tone-coded text gives the text back, with '?' for the rest.
    #[test]
    fn tone_code_round_trips_text() {
        let text = "Hello, world! 0123456789 ~{|}` AZaz";
        let audio = encode_text(text);
        assert_eq!(audio.len(), text.len() * SAMPLES_PER_CHAR);
        assert_eq!(decode_text(&audio), text);
        assert_eq!(decode_text(&encode_text("café\tok")), "caf??ok");
        assert_eq!(normalize_text("café\tok"), "caf??ok");
    }

    /// Every printable ASCII character survives, including neighbours 30 Hz apart.
    #[test]
    fn tone_code_covers_the_whole_alphabet() {
        let all: String = (FIRST_CHAR..=LAST_CHAR).map(char::from).collect();
        assert_eq!(decode_text(&encode_text(&all)), all);
        let reversed: String = all.chars().rev().collect();
        assert_eq!(decode_text(&encode_text(&reversed)), reversed);
    }

    /// Decoding is identical when the audio arrives in Twilio-sized 160-byte frames or odd sizes.
    #[test]
    fn decoder_survives_chopping_into_frames() {
        let text = "book a table for two";
        let audio = [silence(100), encode_text(text), silence(60)].concat();
        for frame in [160, 1, 37, 319, 321] {
            let mut d = ToneDecoder::new();
            let mut streamed = String::new();
            for chunk in audio.chunks(frame) {
                streamed.push_str(&d.push(chunk));
            }
            assert_eq!(streamed, text, "frame size {frame}");
            assert_eq!(d.text(), text);
        }
    }

    /// Truncated audio decodes to a prefix of the text (a partial last burst is dropped).
    #[test]
    fn truncated_audio_decodes_to_a_prefix() {
        let text = "interrupt me";
        let audio = encode_text(text);
        for cut in [0, 100, 320, 5 * 320 + 200, audio.len() - 1] {
            let decoded = decode_text(&audio[..cut]);
            assert_eq!(decoded, &text[..cut / SAMPLES_PER_CHAR], "cut at {cut}");
        }
    }

    /// Silence between runs of any length re-aligns the decoder, even mid-block.
    #[test]
    fn silence_resyncs_alignment() {
        for gap_ms in [1, 5, 13, 40, 300] {
            let audio = [encode_text("ab"), silence(gap_ms), encode_text("cd")].concat();
            assert_eq!(decode_text(&audio), "abcd", "gap {gap_ms} ms");
        }
    }

    /// A burst cut mid-way (barge-in) and followed by a pause is skipped cleanly, not misread.
    #[test]
    fn cut_burst_then_pause_resyncs() {
        let first = encode_text("hello");
        let cut = &first[..2 * SAMPLES_PER_CHAR + 100];
        let audio = [cut, &silence(20)[..], &encode_text("bye")[..]].concat();
        assert_eq!(decode_text(&audio), "hebye");
    }

    /// A decoder joining mid-stream finds its footing at the next pause.
    #[test]
    fn decoder_joining_mid_burst_recovers_after_silence() {
        let audio = [encode_text("xyz"), silence(20), encode_text("ok")].concat();
        let decoded = decode_text(&audio[150..]);
        assert!(decoded.ends_with("ok"), "{decoded:?}");
    }

    /// Tone audio is speech-loud and silence is the floor; quiet noise is far below speech.
    #[test]
    fn energy_separates_speech_from_silence() {
        let tone = energy_dbfs(&encode_text("aaaa"));
        assert!((-20.0..-10.0).contains(&tone), "{tone}");
        assert_eq!(energy_dbfs(&silence(20)), SILENCE_DBFS);
        assert_eq!(energy_dbfs(&[]), SILENCE_DBFS);
        let noise = pcm_to_ulaw(&[30, -30, 25, -20]);
        assert!(energy_dbfs(&noise) < -55.0);
        assert_eq!(silence(20).len(), 160);
        assert_eq!(duration_ms(8000), 1000);
    }

    /// WAV round trip keeps the μ-law bytes; other formats are refused, never resampled.
    #[test]
    fn wav_round_trip_and_format_check() {
        let audio = [silence(20), encode_text("wav")].concat();
        let bytes = wav_bytes(&audio).unwrap();
        let back = read_wav_from(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(back, audio);

        let mut cursor = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            sample_rate: 16000,
            ..wav_spec()
        };
        let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
        w.write_sample(0i16).unwrap();
        w.finalize().unwrap();
        let err = read_wav_from(std::io::Cursor::new(cursor.into_inner())).unwrap_err();
        assert!(matches!(err, WavError::Format { rate: 16000, .. }), "{err}");
    }

    /// The file helpers write and read back the same audio.
    #[test]
    fn wav_file_helpers_round_trip() {
        let path = std::env::temp_dir().join(format!("cmb-audio-{}.wav", std::process::id()));
        let audio = encode_text("file");
        write_wav(&path, &audio).unwrap();
        let back = read_wav(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(decode_text(&back), "file");
        assert_eq!(back, audio);
    }

    /// A cough is loud, flat-spectrum noise; tone-coded speech is neither flat nor quiet.
    #[test]
    fn coughs_are_loud_and_flat_tones_are_not() {
        let c = cough(300, 42);
        assert_eq!(c.len(), 2400);
        assert_eq!(cough(300, 42), c, "deterministic");
        let head = &c[..160];
        assert!(energy_dbfs(head) > -20.0, "{}", energy_dbfs(head));
        for frame in c[..1600].chunks(160) {
            let f = spectral_flatness(frame);
            assert!(f > 0.3, "cough frame flatness {f}");
        }
        let speech = encode_text("hello there");
        for frame in speech.chunks(160).take(10) {
            let f = spectral_flatness(frame);
            assert!(f < 0.2, "tone frame flatness {f}");
        }
        assert_eq!(spectral_flatness(&silence(20)), 0.0);
    }

    /// Echo is mixed in at its loss: silence plus a tone 20 dB down is 20 dB quieter.
    #[test]
    fn echo_mixes_in_at_its_loss() {
        let tone = encode_text("aaaa");
        let quiet = mix_echo(&silence(160), &tone, 20.0);
        let drop = energy_dbfs(&tone) - energy_dbfs(&quiet);
        assert!((drop - 20.0).abs() < 1.0, "{drop}");
        assert_eq!(mix_echo(&tone, &[], 20.0), tone, "no echo, no change");
    }
}
