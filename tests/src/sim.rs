//! Phone simulator: the person who answers a fake Twilio call.
//!
//! Owns the callee's behaviour as a scripted state machine that never reads a clock (the
//! str0m shape from STYLE.md): [`Simulator::tick`] is called once per 20 ms media frame
//! with the media time and the audio the callee heard during that frame, and returns the
//! audio the callee speaks in the same frame, plus a DTMF digit or a hang-up. The fake
//! Twilio media loop drives it in real time; unit tests drive it as fast as they like.
//!
//! What the persona says is recovered with [`crate::audio::ToneDecoder`] (fakes speak
//! tone-coded text), turned into a live transcript of both sides (`[persona] …` /
//! `[caller] …`, via `tracing` and [`Simulator::transcript`]) and optionally recorded to a
//! WAV file. It must not do network I/O nor know Twilio's wire format: that is the fake's
//! job. The only I/O here is rendering WAV/espeak utterances and writing the recording.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::audio;

/// Duration of one media frame, the simulator's time step.
pub const FRAME_MS: u64 = 20;
/// μ-law bytes in one frame (8 kHz, 20 ms).
pub const FRAME_BYTES: usize = 160;
/// Frames louder than this carry persona speech (tone-coded speech is about −15 dBFS,
/// digital silence is [`audio::SILENCE_DBFS`]).
pub const VAD_THRESHOLD_DBFS: f32 = -40.0;

/// What the callee does, step by step.
#[derive(Clone, Debug, PartialEq)]
pub struct SimScript {
    pub steps: Vec<Step>,
    /// Silence that ends a persona turn (transcript lines, [`Step::HangUpAfterTurns`]).
    pub turn_silence_ms: u64,
    /// Dead air after which a waiting callee gives up and hangs up, as people do; it also
    /// bounds a call whose bot never speaks.
    pub give_up_after_ms: u64,
    /// Where to write everything the callee heard (8 kHz WAV) when the call ends.
    pub record_wav: Option<PathBuf>,
    /// A line that echoes the persona back into the callee's microphone.
    pub echo: Option<Echo>,
}

/// Line echo: what the callee heard comes back this late and this much quieter, mixed
/// into what they send (a handset or a hybrid with poor echo return loss).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Echo {
    /// A multiple of 20 ms (rounded down).
    pub delay_ms: u64,
    pub loss_db: f32,
}

impl Default for SimScript {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl SimScript {
    /// A script with the default timings: 700 ms ends a turn, 30 s of dead air ends the call.
    pub fn new(steps: Vec<Step>) -> Self {
        Self {
            steps,
            turn_silence_ms: 700,
            give_up_after_ms: 30_000,
            record_wav: None,
            echo: None,
        }
    }

    /// The same script on a line with `echo`.
    pub fn with_echo(mut self, echo: Echo) -> Self {
        self.echo = Some(echo);
        self
    }

    /// Records what the callee heard to `path` when the call ends.
    pub fn with_recording(mut self, path: impl Into<PathBuf>) -> Self {
        self.record_wav = Some(path.into());
        self
    }

    /// The first call of the `cargo xtask dev` demo: a goal the persona's notes keep, a
    /// turn the caller interrupts, "call me back in two minutes" (the persona books it
    /// and confirms), then "bye" (the persona says goodbye and hangs up itself).
    pub fn demo_first_call() -> Self {
        Self::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text(
                "Hi, I am ready. My goal is to run five kilometres by Friday.",
            )),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Tell me about my plan for today.")),
            Step::InterruptAfterMs(600),
            Step::Say(Utterance::text("Sorry, I have to drive now.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Call me back in two minutes.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Thanks, bye.")),
            // The persona hangs up; hang up ourselves only if it never does.
            Step::Pause(20_000),
            Step::HangUp,
        ])
    }

    /// The demo's callback: the persona opens with what it remembers; the caller says bye.
    pub fn demo_callback() -> Self {
        Self::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Hey, it is me again.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Great, thanks. Bye.")),
            Step::Pause(20_000),
            Step::HangUp,
        ])
    }

    /// The script the `fakes` binary uses (so `cargo xtask dev` shows a whole call): wait
    /// for the greeting, take two turns, interrupt the persona's second reply, take one
    /// more turn, then hang up.
    pub fn default_conversation() -> Self {
        Self::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Hi, I am ready.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Tell me about my plan for today.")),
            // Barge in a little way into the persona's answer, as people do.
            Step::InterruptAfterMs(600),
            Step::Say(Utterance::text("Sorry, one more thing.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::Say(Utterance::text("Thanks, bye.")),
            Step::WaitForPersonaToFinish { silence_ms: 800 },
            Step::HangUp,
        ])
    }
}

/// One thing the callee does. Steps run in order; waiting steps consume media time.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Wait until the persona has spoken (since this step began) and then been silent
    /// for `silence_ms`.
    WaitForPersonaToFinish { silence_ms: u64 },
    /// Speak an utterance to the end (whatever the persona does meanwhile).
    Say(Utterance),
    /// Wait until the persona has been speaking for this many ms (its current reply, or
    /// the next one), then go on: put a `Say` after it to barge in.
    InterruptAfterMs(u64),
    /// Press a key (one DTMF event).
    PressDigit(char),
    /// Stay silent this long.
    Pause(u64),
    /// Hang up now.
    HangUp,
    /// Keep listening until the persona has finished this many turns since the call
    /// began, then hang up.
    HangUpAfterTurns(u32),
}

/// Something the callee says.
#[derive(Clone, Debug, PartialEq)]
pub enum Utterance {
    /// Tone-coded text ([`audio::encode_text`]): the fake Deepgram transcribes it exactly.
    Text(String),
    /// An 8 kHz mono 16-bit WAV file (never resampled).
    Wav(PathBuf),
    /// Real synthetic speech from `espeak-ng`, resampled to 8 kHz by `sox`; both must be
    /// installed, otherwise rendering fails with a clear error.
    Espeak(String),
    /// A cough ([`audio::cough`]) this many ms long: loud noise, no words.
    Cough(u32),
}

impl Utterance {
    /// Tone-coded text.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }

    /// Renders the utterance to μ-law audio plus the label shown in the transcript.
    pub fn render(&self) -> Result<(Vec<u8>, String), SimError> {
        match self {
            // The label is what a decoder will return, so transcripts compare exactly.
            Self::Text(text) => Ok((audio::encode_text(text), audio::normalize_text(text))),
            Self::Wav(path) => {
                let ulaw = audio::read_wav(path).map_err(|e| SimError::Wav {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                Ok((ulaw, format!("(wav {})", path.display())))
            }
            Self::Espeak(text) => Ok((espeak(text)?, text.clone())),
            Self::Cough(ms) => Ok((audio::cough(*ms, u64::from(*ms)), "(cough)".into())),
        }
    }
}

/// Why a script cannot be played.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("utterance WAV {path}: {message}")]
    Wav { path: PathBuf, message: String },
    #[error("espeak utterance: {0}")]
    Espeak(String),
    #[error("writing the recording to {path}: {message}")]
    Recording { path: PathBuf, message: String },
}

/// `espeak-ng --stdout | sox → 8 kHz mono 16-bit WAV`, read back as μ-law.
fn espeak(text: &str) -> Result<Vec<u8>, SimError> {
    let missing = |tool: &str, e: std::io::Error| {
        SimError::Espeak(format!(
            "cannot run `{tool}` ({e}); Utterance::Espeak needs both espeak-ng and sox installed \
             (apt-get install espeak-ng sox), or use Utterance::Text"
        ))
    };
    let speech = Command::new("espeak-ng")
        .args(["--stdout", "-v", "en-us", "--"])
        .arg(text)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| missing("espeak-ng", e))?;
    if !speech.status.success() {
        return Err(SimError::Espeak(format!(
            "espeak-ng exited with {}",
            speech.status
        )));
    }
    // espeak-ng only speaks at 22050 Hz; sox resamples to telephone audio.
    let mut sox = Command::new("sox")
        .args([
            "-t",
            "wav",
            "-",
            "-r",
            "8000",
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-t",
            "wav",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| missing("sox", e))?;
    let mut stdin = sox
        .stdin
        .take()
        .ok_or_else(|| SimError::Espeak("sox stdin unavailable".into()))?;
    // Feed sox from a thread so a full stdout pipe cannot deadlock us.
    let wav_in = speech.stdout;
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &wav_in));
    let out = sox
        .wait_with_output()
        .map_err(|e| SimError::Espeak(format!("sox: {e}")))?;
    let fed = feeder
        .join()
        .map_err(|_| SimError::Espeak("sox feeder thread panicked".into()))?;
    fed.map_err(|e| SimError::Espeak(format!("writing to sox: {e}")))?;
    if !out.status.success() {
        return Err(SimError::Espeak(format!("sox exited with {}", out.status)));
    }
    audio::read_wav_from(std::io::Cursor::new(out.stdout))
        .map_err(|e| SimError::Espeak(format!("reading sox output: {e}")))
}

/// Who spoke a transcript line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    Persona,
    Caller,
}

/// One line of the live transcript.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranscriptLine {
    /// Media time (ms since the simulator started) when the line began.
    pub at_ms: u64,
    pub speaker: Speaker,
    pub text: String,
}

/// Why the callee hung up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HangUpReason {
    /// A [`Step::HangUp`].
    Script,
    /// A [`Step::HangUpAfterTurns`] was satisfied.
    AfterTurns(u32),
    /// Nothing was heard for [`SimScript::give_up_after_ms`].
    DeadAir,
    /// The script could not be rendered (see [`Simulator::error`]).
    ScriptError,
}

/// Things the callee did, with their media time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    StartedSpeaking {
        at_ms: u64,
        text: String,
    },
    /// The utterance's last audio went out in the frame that starts at `at_ms`.
    StoppedSpeaking {
        at_ms: u64,
    },
    Pressed {
        at_ms: u64,
        digit: char,
    },
    HungUp {
        at_ms: u64,
        reason: HangUpReason,
    },
}

/// What the callee produces during one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimFrame {
    /// Exactly one frame of μ-law audio (silence when the callee is quiet).
    pub audio: [u8; FRAME_BYTES],
    pub dtmf: Option<char>,
    /// The callee hung up (stays true on every later frame).
    pub hang_up: bool,
}

impl SimFrame {
    fn silent() -> Self {
        Self {
            audio: [audio::ULAW_SILENCE; FRAME_BYTES],
            dtmf: None,
            hang_up: false,
        }
    }
}

/// A step after rendering, ready to run.
#[derive(Clone, Debug)]
enum Planned {
    WaitFinish(u64),
    Say { audio: Vec<u8>, label: String },
    Interrupt(u64),
    Digit(char),
    Pause(u64),
    HangUp,
    HangUpAfterTurns(u32),
}

/// The step in progress and its progress.
#[derive(Debug)]
enum Active {
    WaitFinish {
        silence_ms: u64,
        started: u64,
        heard_voice: bool,
    },
    Interrupt {
        after_ms: u64,
        started: u64,
    },
    Speaking {
        audio: Vec<u8>,
        pos: usize,
    },
    Pause {
        until: u64,
    },
    AfterTurns {
        turns: u32,
        started: u64,
    },
    /// Script exhausted: listen silently until the other side ends the call.
    Idle {
        started: u64,
    },
}

/// What the callee knows about the persona's speech so far.
#[derive(Debug, Default)]
struct Listener {
    /// Start of the persona turn in progress, if one is open.
    turn_started: Option<u64>,
    /// End of the last frame that carried persona speech.
    last_voice_end: Option<u64>,
    turns_completed: u32,
    /// Decoded characters of the open turn.
    turn_text: String,
}

/// The scripted callee. Feed it one frame at a time with [`Simulator::tick`].
pub struct Simulator {
    plan: std::vec::IntoIter<Planned>,
    active: Option<Active>,
    turn_silence_ms: u64,
    give_up_after_ms: u64,
    record_wav: Option<PathBuf>,
    decoder: audio::ToneDecoder,
    listener: Listener,
    heard: Vec<u8>,
    transcript: Vec<TranscriptLine>,
    events: Vec<SimEvent>,
    hung_up: bool,
    finished: bool,
    error: Option<String>,
    label: String,
    /// The echo and the heard frames waiting to come back.
    echo: Option<(Echo, std::collections::VecDeque<Vec<u8>>)>,
}

impl Simulator {
    /// Renders every utterance up front (so a missing WAV or espeak fails before the call,
    /// not in the middle of it). `label` prefixes the tracing lines (e.g. the call sid).
    pub fn new(script: SimScript, label: impl Into<String>) -> Result<Self, SimError> {
        let plan = script
            .steps
            .iter()
            .map(|step| {
                Ok(match step {
                    Step::WaitForPersonaToFinish { silence_ms } => Planned::WaitFinish(*silence_ms),
                    Step::Say(u) => {
                        let (audio, label) = u.render()?;
                        Planned::Say { audio, label }
                    }
                    Step::InterruptAfterMs(ms) => Planned::Interrupt(*ms),
                    Step::PressDigit(d) => Planned::Digit(*d),
                    Step::Pause(ms) => Planned::Pause(*ms),
                    Step::HangUp => Planned::HangUp,
                    Step::HangUpAfterTurns(n) => Planned::HangUpAfterTurns(*n),
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        Ok(Self::from_plan(plan, &script, label.into()))
    }

    /// A callee whose script failed to render: it hangs up at the first frame and keeps
    /// the error, so the call shows why instead of hanging.
    pub fn broken(error: &SimError, label: impl Into<String>) -> Self {
        let mut sim = Self::from_plan(Vec::new(), &SimScript::default(), label.into());
        sim.error = Some(error.to_string());
        sim
    }

    fn from_plan(plan: Vec<Planned>, script: &SimScript, label: String) -> Self {
        Self {
            plan: plan.into_iter(),
            active: None,
            turn_silence_ms: script.turn_silence_ms,
            give_up_after_ms: script.give_up_after_ms,
            record_wav: script.record_wav.clone(),
            decoder: audio::ToneDecoder::new(),
            listener: Listener::default(),
            heard: Vec::new(),
            transcript: Vec::new(),
            events: Vec::new(),
            hung_up: false,
            finished: false,
            error: None,
            label,
            echo: script.echo.map(|e| (e, std::collections::VecDeque::new())),
        }
    }

    /// Advances one frame: `now_ms` is the media time at the start of the frame and
    /// `heard` the audio played to the callee during it (shorter than a frame, or empty,
    /// when the line was partly quiet). Returns what the callee does in that frame.
    pub fn tick(&mut self, now_ms: u64, heard: &[u8]) -> SimFrame {
        let mut frame = self.act(now_ms, heard);
        if let Some((echo, line)) = &mut self.echo {
            line.push_back(heard.to_vec());
            if line.len() as u64 > echo.delay_ms / FRAME_MS {
                let back = line.pop_front().unwrap_or_default();
                let mixed = audio::mix_echo(&frame.audio, &back, echo.loss_db);
                frame.audio.copy_from_slice(&mixed);
            }
        }
        frame
    }

    /// What the callee does in this frame, before the line adds its echo.
    fn act(&mut self, now_ms: u64, heard: &[u8]) -> SimFrame {
        self.listen(now_ms, heard);
        let mut frame = SimFrame::silent();
        if self.hung_up {
            frame.hang_up = true;
            return frame;
        }
        if self.error.is_some() {
            self.hang_up(now_ms, HangUpReason::ScriptError);
            frame.hang_up = true;
            return frame;
        }
        // Instant steps (digits aside) chain within one frame; time-consuming ones stop it.
        loop {
            let active = match self.active.take() {
                Some(active) => active,
                None => match self.plan.next() {
                    Some(planned) => match self.start(planned, now_ms, &mut frame) {
                        Some(active) => active,
                        // Digit pressed or hung up: this frame is spoken for.
                        None => return frame,
                    },
                    None => Active::Idle { started: now_ms },
                },
            };
            match self.advance(active, now_ms, &mut frame) {
                Progress::Continue(active) => {
                    self.active = Some(active);
                    return frame;
                }
                Progress::Done => {
                    if frame.hang_up || frame.dtmf.is_some() {
                        return frame;
                    }
                }
                Progress::DoneThisFrame => return frame,
            }
        }
    }

    /// Starts a planned step. Returns `None` when the step completed instantly and used
    /// the frame (a digit or a hang-up).
    fn start(&mut self, planned: Planned, now_ms: u64, frame: &mut SimFrame) -> Option<Active> {
        Some(match planned {
            Planned::WaitFinish(silence_ms) => Active::WaitFinish {
                silence_ms,
                started: now_ms,
                // A reply already under way counts: we wait for it to end.
                heard_voice: self.listener.turn_started.is_some(),
            },
            Planned::Interrupt(after_ms) => Active::Interrupt {
                after_ms,
                started: now_ms,
            },
            Planned::Say { audio, label } => {
                tracing::info!(sim = %self.label, at_ms = now_ms, "[caller] {label}");
                self.transcript.push(TranscriptLine {
                    at_ms: now_ms,
                    speaker: Speaker::Caller,
                    text: label.clone(),
                });
                self.events.push(SimEvent::StartedSpeaking {
                    at_ms: now_ms,
                    text: label,
                });
                Active::Speaking { audio, pos: 0 }
            }
            Planned::Pause(ms) => Active::Pause { until: now_ms + ms },
            Planned::Digit(digit) => {
                tracing::info!(sim = %self.label, at_ms = now_ms, "[caller] presses {digit}");
                self.events.push(SimEvent::Pressed {
                    at_ms: now_ms,
                    digit,
                });
                frame.dtmf = Some(digit);
                return None;
            }
            Planned::HangUp => {
                self.hang_up(now_ms, HangUpReason::Script);
                frame.hang_up = true;
                return None;
            }
            Planned::HangUpAfterTurns(turns) => Active::AfterTurns {
                turns,
                started: now_ms,
            },
        })
    }

    fn advance(&mut self, active: Active, now_ms: u64, frame: &mut SimFrame) -> Progress {
        match active {
            Active::WaitFinish {
                silence_ms,
                started,
                mut heard_voice,
            } => {
                let last_end = self.listener.last_voice_end;
                heard_voice |= last_end.is_some_and(|end| end > started);
                match last_end {
                    Some(end) if heard_voice && now_ms.saturating_sub(end) >= silence_ms => {
                        Progress::Done
                    }
                    _ => self.wait_or_give_up(
                        Active::WaitFinish {
                            silence_ms,
                            started,
                            heard_voice,
                        },
                        started,
                        now_ms,
                        frame,
                    ),
                }
            }
            Active::Interrupt { after_ms, started } => match self.listener.turn_started {
                Some(onset) if now_ms >= onset + after_ms => Progress::Done,
                _ => self.wait_or_give_up(
                    Active::Interrupt { after_ms, started },
                    started,
                    now_ms,
                    frame,
                ),
            },
            Active::Speaking { audio, mut pos } => {
                let end = (pos + FRAME_BYTES).min(audio.len());
                frame.audio[..end - pos].copy_from_slice(&audio[pos..end]);
                pos = end;
                if pos >= audio.len() {
                    self.events
                        .push(SimEvent::StoppedSpeaking { at_ms: now_ms });
                    Progress::DoneThisFrame
                } else {
                    Progress::Continue(Active::Speaking { audio, pos })
                }
            }
            Active::Pause { until } => {
                if now_ms >= until {
                    Progress::Done
                } else {
                    Progress::Continue(Active::Pause { until })
                }
            }
            Active::AfterTurns { turns, started } => {
                if self.listener.turns_completed >= turns {
                    self.hang_up(now_ms, HangUpReason::AfterTurns(turns));
                    frame.hang_up = true;
                    Progress::Done
                } else {
                    self.wait_or_give_up(
                        Active::AfterTurns { turns, started },
                        started,
                        now_ms,
                        frame,
                    )
                }
            }
            Active::Idle { started } => {
                self.wait_or_give_up(Active::Idle { started }, started, now_ms, frame)
            }
        }
    }

    /// Keeps waiting, unless the line has been dead for `give_up_after_ms`.
    fn wait_or_give_up(
        &mut self,
        active: Active,
        started: u64,
        now_ms: u64,
        frame: &mut SimFrame,
    ) -> Progress {
        let persona_busy = self.listener.turn_started.is_some();
        let quiet_since = self.listener.last_voice_end.unwrap_or(0).max(started);
        if !persona_busy && now_ms.saturating_sub(quiet_since) >= self.give_up_after_ms {
            self.hang_up(now_ms, HangUpReason::DeadAir);
            frame.hang_up = true;
            return Progress::Done;
        }
        Progress::Continue(active)
    }

    fn hang_up(&mut self, now_ms: u64, reason: HangUpReason) {
        tracing::info!(sim = %self.label, at_ms = now_ms, ?reason, "[caller] hangs up");
        self.hung_up = true;
        self.events.push(SimEvent::HungUp {
            at_ms: now_ms,
            reason,
        });
    }

    /// Updates what the callee knows about the persona from one frame of heard audio.
    fn listen(&mut self, now_ms: u64, heard: &[u8]) {
        // Pad to a full frame: the decoder and the recording follow the wall clock, and an
        // underrun really is silence on a phone line.
        let mut frame = heard.to_vec();
        if frame.len() < FRAME_BYTES {
            frame.resize(FRAME_BYTES, audio::ULAW_SILENCE);
        }
        self.heard.extend_from_slice(&frame);
        let decoded = self.decoder.push(&frame);
        let voiced = audio::energy_dbfs(heard) > VAD_THRESHOLD_DBFS;
        let frame_end = now_ms + FRAME_MS;
        if voiced {
            self.listener.last_voice_end = Some(frame_end);
            self.listener.turn_started.get_or_insert(now_ms);
        }
        if self.listener.turn_started.is_some() {
            self.listener.turn_text.push_str(&decoded);
        }
        let silent_for = self
            .listener
            .last_voice_end
            .map_or(0, |end| now_ms.saturating_sub(end));
        if !voiced && silent_for >= self.turn_silence_ms {
            self.close_turn();
        }
    }

    /// Ends the open persona turn, if any, and writes its transcript line.
    fn close_turn(&mut self) {
        let Some(started) = self.listener.turn_started.take() else {
            return;
        };
        self.listener.turns_completed += 1;
        let mut text = std::mem::take(&mut self.listener.turn_text);
        if text.is_empty() {
            let ms = self.listener.last_voice_end.unwrap_or(started) - started;
            text = format!("(unintelligible, {ms} ms)");
        }
        tracing::info!(sim = %self.label, at_ms = started, "[persona] {text}");
        self.transcript.push(TranscriptLine {
            at_ms: started,
            speaker: Speaker::Persona,
            text,
        });
    }

    /// Ends the session: closes the persona turn in progress and writes the recording if
    /// the script asked for one. Idempotent.
    pub fn finish(&mut self) -> Result<(), SimError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        // Flush the decoder's last block: the call may end right after a burst.
        let tail = self.decoder.push(&[audio::ULAW_SILENCE; FRAME_BYTES]);
        if self.listener.turn_started.is_some() {
            self.listener.turn_text.push_str(&tail);
        }
        self.close_turn();
        if let Some(path) = &self.record_wav {
            write_recording(path, &self.heard)?;
        }
        Ok(())
    }

    /// The transcript so far, both sides. Persona lines are written when the turn ends
    /// (their `at_ms` is when it began), so sort by `at_ms` for a strict timeline.
    pub fn transcript(&self) -> &[TranscriptLine] {
        &self.transcript
    }

    /// Everything decoded from the persona's audio, in order, across turns.
    pub fn heard_text(&self) -> &str {
        self.decoder.text()
    }

    /// Everything the callee heard, one padded frame per tick.
    pub fn heard_audio(&self) -> &[u8] {
        &self.heard
    }

    /// What the callee did, in order.
    pub fn events(&self) -> &[SimEvent] {
        &self.events
    }

    /// Persona turns heard to the end (a turn ends after `turn_silence_ms` of silence).
    pub fn persona_turns(&self) -> u32 {
        self.listener.turns_completed
    }

    /// Whether the callee has hung up.
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// Why the script could not be played, for a simulator made by [`Simulator::broken`].
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

/// Outcome of running the active step for one frame.
enum Progress {
    /// Still running; the frame is done.
    Continue(Active),
    /// Finished without using the frame: the next step may start in it.
    Done,
    /// Finished and used the frame (the last audio of an utterance).
    DoneThisFrame,
}

fn write_recording(path: &Path, heard: &[u8]) -> Result<(), SimError> {
    audio::write_wav(path, heard).map_err(|e| SimError::Recording {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: [u8; 0] = [];

    /// Runs `sim` over `persona` audio played from `start_ms`, then silence, until
    /// `end_ms`; returns the frames the callee produced, with their time.
    fn run(
        sim: &mut Simulator,
        persona: &[u8],
        start_ms: u64,
        end_ms: u64,
    ) -> Vec<(u64, SimFrame)> {
        let mut out = Vec::new();
        let mut now = 0;
        while now < end_ms {
            let heard: &[u8] = if now >= start_ms {
                let off = ((now - start_ms) / FRAME_MS) as usize * FRAME_BYTES;
                persona
                    .get(off..(off + FRAME_BYTES).min(persona.len()))
                    .unwrap_or(&QUIET)
            } else {
                &QUIET
            };
            let frame = sim.tick(now, heard);
            let hang = frame.hang_up;
            out.push((now, frame));
            if hang {
                break;
            }
            now += FRAME_MS;
        }
        out
    }

    fn decoded_caller_audio(frames: &[(u64, SimFrame)]) -> String {
        let bytes: Vec<u8> = frames.iter().flat_map(|(_, f)| f.audio).collect();
        audio::decode_text(&bytes)
    }

    /// The callee waits for the greeting to end plus the silence, then speaks, then hangs up.
    #[test]
    fn waits_for_persona_then_speaks_then_hangs_up() {
        let script = SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 200 },
            Step::Say(Utterance::text("yes")),
            Step::HangUp,
        ]);
        let mut sim = Simulator::new(script, "t").unwrap();
        let greeting = audio::encode_text("hello"); // 200 ms
        let frames = run(&mut sim, &greeting, 100, 5_000);
        // Greeting plays 100..300 ms; speech starts once 200 ms of silence passed.
        let first_voice = frames
            .iter()
            .find(|(_, f)| f.audio != [audio::ULAW_SILENCE; FRAME_BYTES])
            .map(|(t, _)| *t);
        assert_eq!(first_voice, Some(500));
        assert_eq!(decoded_caller_audio(&frames), "yes");
        let (end, last) = frames.last().unwrap();
        assert!(last.hang_up);
        // 3 chars = 120 ms = 6 frames starting at 500, hang-up in the next frame.
        assert_eq!(*end, 620);
        assert_eq!(sim.heard_text(), "hello");
        assert!(sim.hung_up());
        assert_eq!(
            sim.events().last(),
            Some(&SimEvent::HungUp {
                at_ms: 620,
                reason: HangUpReason::Script
            })
        );
    }

    /// InterruptAfterMs starts the next step that long into the persona's speech.
    #[test]
    fn interrupt_starts_speaking_into_the_reply() {
        let script = SimScript::new(vec![
            Step::InterruptAfterMs(300),
            Step::Say(Utterance::text("stop")),
        ]);
        let mut sim = Simulator::new(script, "t").unwrap();
        let reply = audio::encode_text("a long long reply from the persona");
        let frames = run(&mut sim, &reply, 200, 1_000);
        let first_voice = frames
            .iter()
            .find(|(_, f)| f.audio != [audio::ULAW_SILENCE; FRAME_BYTES])
            .map(|(t, _)| *t);
        // Reply starts at 200 ms; 300 ms into it is 500 ms.
        assert_eq!(first_voice, Some(500));
    }

    /// The transcript holds the persona's decoded turns and the caller's lines.
    #[test]
    fn transcript_has_both_sides() {
        let mut script = SimScript::new(vec![
            Step::WaitForPersonaToFinish { silence_ms: 100 },
            Step::Say(Utterance::text("ok")),
            Step::Pause(2_000),
        ]);
        script.turn_silence_ms = 100;
        let mut sim = Simulator::new(script, "t").unwrap();
        let _ = run(&mut sim, &audio::encode_text("hi there"), 0, 1_000);
        sim.finish().unwrap();
        let lines: Vec<_> = sim
            .transcript()
            .iter()
            .map(|l| (l.speaker, l.text.as_str()))
            .collect();
        assert_eq!(
            lines,
            vec![(Speaker::Persona, "hi there"), (Speaker::Caller, "ok")]
        );
        assert_eq!(sim.persona_turns(), 1);
    }

    /// A digit press produces exactly one frame with that DTMF, then the script goes on.
    #[test]
    fn press_digit_once() {
        let script = SimScript::new(vec![
            Step::PressDigit('1'),
            Step::PressDigit('#'),
            Step::HangUp,
        ]);
        let mut sim = Simulator::new(script, "t").unwrap();
        let frames = run(&mut sim, &[], 0, 1_000);
        let digits: Vec<_> = frames
            .iter()
            .filter_map(|(t, f)| f.dtmf.map(|d| (*t, d)))
            .collect();
        assert_eq!(digits, vec![(0, '1'), (20, '#')]);
        assert!(frames.last().unwrap().1.hang_up);
        assert_eq!(frames.len(), 3);
    }

    /// HangUpAfterTurns waits for the Nth persona turn to end, not just start.
    #[test]
    fn hang_up_after_turns() {
        let mut script = SimScript::new(vec![Step::HangUpAfterTurns(2)]);
        script.turn_silence_ms = 100;
        let mut sim = Simulator::new(script, "t").unwrap();
        // Two turns separated by 300 ms of silence.
        let persona = [
            audio::encode_text("one"),
            audio::silence(300),
            audio::encode_text("two"),
        ]
        .concat();
        let frames = run(&mut sim, &persona, 0, 5_000);
        let (end, last) = frames.last().unwrap();
        assert!(last.hang_up);
        // "two" plays 420..540 ms; the turn ends 100 ms later.
        assert_eq!(*end, 640);
        assert_eq!(
            sim.events().last(),
            Some(&SimEvent::HungUp {
                at_ms: 640,
                reason: HangUpReason::AfterTurns(2)
            })
        );
    }

    /// A callee that hears nothing gives up after the dead-air limit.
    #[test]
    fn dead_air_gives_up() {
        let mut script = SimScript::new(vec![Step::WaitForPersonaToFinish { silence_ms: 100 }]);
        script.give_up_after_ms = 1_000;
        let mut sim = Simulator::new(script, "t").unwrap();
        let frames = run(&mut sim, &[], 0, 10_000);
        let (end, last) = frames.last().unwrap();
        assert!(last.hang_up);
        assert_eq!(*end, 1_000);
        assert!(matches!(
            sim.events().last(),
            Some(SimEvent::HungUp {
                reason: HangUpReason::DeadAir,
                ..
            })
        ));
    }

    /// A script with a missing WAV fails to build, and a broken simulator hangs up at once.
    #[test]
    fn missing_wav_is_a_clear_error() {
        let script = SimScript::new(vec![Step::Say(Utterance::Wav("/nonexistent/x.wav".into()))]);
        let err = Simulator::new(script, "t").err().unwrap();
        assert!(err.to_string().contains("/nonexistent/x.wav"), "{err}");
        let mut sim = Simulator::broken(&err, "t");
        assert!(sim.tick(0, &[]).hang_up);
        assert!(sim.error().is_some());
    }

    /// A WAV utterance is played byte for byte, and the recording holds what was heard.
    #[test]
    fn wav_utterance_and_recording() {
        let dir = std::env::temp_dir();
        let input = dir.join(format!("cmb-sim-in-{}.wav", std::process::id()));
        let record = dir.join(format!("cmb-sim-rec-{}.wav", std::process::id()));
        audio::write_wav(&input, &audio::encode_text("wav")).unwrap();
        let script = SimScript::new(vec![Step::Say(Utterance::Wav(input.clone())), Step::HangUp])
            .with_recording(&record);
        let mut sim = Simulator::new(script, "t").unwrap();
        let heard = audio::encode_text("hey");
        let frames = run(&mut sim, &heard, 0, 1_000);
        sim.finish().unwrap();
        assert_eq!(decoded_caller_audio(&frames), "wav");
        let recorded = audio::read_wav(&record).unwrap();
        assert_eq!(audio::decode_text(&recorded), "hey");
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&record);
    }

    /// Utterance::Espeak renders when espeak-ng and sox exist, else names what is missing.
    #[test]
    fn espeak_renders_or_explains() {
        match Utterance::Espeak("hello".into()).render() {
            Ok((audio, label)) => {
                assert!(!audio.is_empty());
                assert_eq!(label, "hello");
            }
            Err(e) => assert!(e.to_string().contains("espeak-ng and sox"), "{e}"),
        }
    }
}
