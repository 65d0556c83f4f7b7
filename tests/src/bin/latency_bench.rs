//! `latency-bench`: whole calls through the real Worker (under `wrangler dev`: the real
//! CallSession Durable Object) and the real media relay, against the fakes answering with
//! realistic, configurable delays, each latency technique switched off and on in the same
//! run (run it with `cargo xtask bench latency`).
//!
//! Two voice stacks are started side by side, every technique off on one and on on the
//! other (`CALL_PREPARE_GREETING`, `CALL_SPECULATE`), and the calls alternate between
//! them one at a time (off, on, on, off, …), so the machine's noise falls on both alike
//! and no call competes with another. Every call: the phone rings, the callee answers and
//! waits for the greeting to end, says "so", pauses 160 ms (a speculation the caller
//! goes on from), says the rest of the sentence, waits for the reply, says something else
//! and interrupts the reply 600 ms into it, waits for the answer to that and hangs up.
//!
//! Measured on the fake Twilio's side (`StreamRecord::timing`), so each figure includes
//! the injected one-way media delay both ways:
//! 1. answer (`start` sent) → first greeting audio frame received;
//! 2. end of the caller's speech (last speech frame sent) → first reply audio frame
//!    received (both clean turns of every call);
//! 3. the interrupting speech's onset → `clear` received;
//! 4. extra LLM tokens spent on speculation: the call's LLM tokens as the Worker bills
//!    them (its cost line), technique on minus off, medians per call. The conversations
//!    are the same on both sides (the fake LLM echoes), so the difference is what
//!    discarded speculations cost.
//!
//! Then the false barge-ins (`--probe-calls` of each kind per side), with the simulator's
//! two hazards: a callee who only coughs (three 300 ms coughs while the persona speaks)
//! and a silent callee on a line that echoes the persona back (60 ms late, 12 dB down).
//! Neither ever speaks, so every `clear` Twilio receives on those calls is a false
//! barge-in, and every caller line in the transcript a turn that never was.
//!
//! A benchmark, not a test: it prints what it measured and never fails on slowness. Every
//! wait is bounded; a call that fails is counted and its reason printed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use cmb_tests::api::{fresh_number, ApiClient};
use cmb_tests::fakes::twilio::{self, AnsweredBy, CalleeScript, StreamRecord};
use cmb_tests::harness::{ProviderDelays, VoiceStack};
use cmb_tests::loadgen::percentile;
use cmb_tests::sim::{Echo, SimScript, Step, Utterance};

/// The Worker's `endpointing` in the relay's Deepgram query (`SttOptions` default).
fn relay_endpointing_ms() -> u64 {
    u64::from(cmb_core::channel::SttOptions::default().endpointing_ms)
}

/// One ring of the voice stack's fake Twilio (`harness`): rings are counted in these.
const RING_MS: u64 = 200;
/// The persona every call uses (a catalog persona).
const PERSONA: &str = "brad";

#[derive(Parser, Debug)]
#[command(about = "Call latency through the real Worker and relay, techniques off and on")]
struct Args {
    /// Calls per setting (each technique off, and on).
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// Deepgram endpointing, ms of silence before the end of an utterance. At the relay's
    /// own value (300) the fake honours the relay's query; otherwise it overrides it.
    #[arg(long, default_value_t = 300)]
    endpointing_ms: u64,
    /// LLM time to first token, ms.
    #[arg(long, default_value_t = 250)]
    llm_first_token_ms: u64,
    /// LLM generation speed after the first token, tokens (words) per second; 0 = unpaced.
    #[arg(long, default_value_t = 400.0)]
    llm_tokens_per_sec: f64,
    /// ElevenLabs WebSocket connect, ms.
    #[arg(long, default_value_t = 150)]
    tts_connect_ms: u64,
    /// ElevenLabs time to first audio of each generation (and the HTTP stream's first
    /// byte), ms.
    #[arg(long, default_value_t = 120)]
    tts_first_audio_ms: u64,
    /// Twilio media stream delay, each way, ms.
    #[arg(long, default_value_t = 20)]
    twilio_one_way_ms: u64,
    /// How long the phone rings before the callee answers, ms (rounded up to whole
    /// 200 ms rings of the fake).
    #[arg(long, default_value_t = 3000)]
    ring_ms: u64,
    /// Bound on one call, from the trigger to the fake Twilio's end of the call.
    #[arg(long, default_value_t = 120)]
    call_timeout_secs: u64,
    /// False barge-in probes per side, of each kind (coughs; echo).
    #[arg(long, default_value_t = 5)]
    probe_calls: usize,
    /// The "on" side's `CALL_SPECULATE_AFTER_MS`: how far into a pause the relay
    /// finalizes it and offers a speculation. Unset: the Worker's default (80).
    #[arg(long)]
    speculate_after_ms: Option<u32>,
}

impl Args {
    fn delays(&self) -> ProviderDelays {
        ProviderDelays {
            twilio_media_one_way: Duration::from_millis(self.twilio_one_way_ms),
            deepgram_endpointing_ms: (self.endpointing_ms != relay_endpointing_ms())
                .then_some(self.endpointing_ms),
            llm_first_token: Duration::from_millis(self.llm_first_token_ms),
            llm_tokens_per_sec: (self.llm_tokens_per_sec > 0.0).then_some(self.llm_tokens_per_sec),
            tts_connect: Duration::from_millis(self.tts_connect_ms),
            tts_first_audio: Duration::from_millis(self.tts_first_audio_ms),
        }
    }

    fn rings(&self) -> u32 {
        u32::try_from(self.ring_ms.div_ceil(RING_MS).max(1)).unwrap_or(u32::MAX)
    }
}

/// What the callee does on every call. Utterances: 0 "so", 1 the rest of that sentence
/// (reply figure), 2 the long question (reply figure), 3 the interruption (barge-in).
fn callee_script() -> SimScript {
    SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 800 },
        Step::Say(Utterance::text("so")),
        Step::Pause(160),
        Step::Say(Utterance::text("what should I train today")),
        Step::WaitForPersonaToFinish { silence_ms: 800 },
        Step::Say(Utterance::text(
            "give me a full workout for the whole week with every exercise and every set please",
        )),
        Step::InterruptAfterMs(600),
        Step::Say(Utterance::text("wait a second")),
        Step::WaitForPersonaToFinish { silence_ms: 800 },
        Step::HangUp,
    ])
}

/// A callee who never speaks: three coughs during the greeting, then listens.
fn cough_script() -> SimScript {
    let cough = || Step::Say(Utterance::Cough(300));
    SimScript::new(vec![
        Step::InterruptAfterMs(800),
        cough(),
        Step::Pause(700),
        cough(),
        Step::Pause(700),
        cough(),
        Step::WaitForPersonaToFinish { silence_ms: 1500 },
        Step::HangUp,
    ])
}

/// A callee who never speaks, on a line that echoes the persona back.
fn echo_script() -> SimScript {
    SimScript::new(vec![
        Step::WaitForPersonaToFinish { silence_ms: 1500 },
        Step::HangUp,
    ])
    .with_echo(Echo {
        delay_ms: 60,
        loss_db: 12.0,
    })
}

/// What a probe call (the callee never speaks) provoked.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Probe {
    clears: usize,
    /// Caller lines in the stored transcript.
    user_turns: usize,
    /// The persona never went quiet (it kept answering what it heard): hung up at the
    /// probe's bound.
    went_on: bool,
}

/// A probe call normally ends within ~15 s (greeting, then 1.5 s of quiet).
const PROBE_BOUND: Duration = Duration::from_secs(40);

/// The figures of one call, in ms; `None` where the call did not get that far.
#[derive(Debug, Default, Clone, PartialEq)]
struct CallFigures {
    greeting_ms: Option<f64>,
    /// One per clean turn (utterances 1 and 2).
    reply_ms: Vec<f64>,
    barge_in_ms: Option<f64>,
    /// LLM tokens billed for the call (prompt + completion, the Worker's cost line).
    llm_tokens: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the figures off a stream's timing. Pure, so it is unit-tested.
fn figures(stream: &StreamRecord) -> CallFigures {
    let t = &stream.timing;
    let greeting_ms = match (t.start_sent, t.first_media) {
        (Some(start), Some(first)) => Some(ms(first.saturating_duration_since(start))),
        _ => None,
    };
    let reply_ms = t
        .utterances
        .iter()
        .skip(1)
        .take(2)
        .filter_map(|u| Some(ms(u.first_media_after?.saturating_duration_since(u.ended?))))
        .collect();
    let barge_in_ms = t.utterances.get(3).and_then(|u| {
        let clear = t.clears.iter().find(|c| **c >= u.started)?;
        Some(ms(clear.saturating_duration_since(u.started)))
    });
    CallFigures {
        greeting_ms,
        reply_ms,
        barge_in_ms,
        llm_tokens: None,
    }
}

/// The LLM tokens on a settled call's cost breakdown.
fn llm_tokens(view: &serde_json::Value) -> Option<f64> {
    view["costs"]["providers"]
        .as_array()?
        .iter()
        .find(|c| c["provider"] == "llm")?["quantity"]
        .as_f64()
}

/// A placed call, once it ended.
struct Placed {
    user: cmb_tests::api::TestUser,
    id: String,
    stream: StreamRecord,
    heard: String,
    /// False when it was hung up at its deadline.
    ended_in_time: bool,
}

/// One voice stack and what the run measured on it.
struct Side {
    label: &'static str,
    stack: VoiceStack,
    /// Registers users without verifying a number (the call's number is verified by
    /// `api`, so each user verifies exactly one: the verification limits stay far off).
    plain: ApiClient,
    api: ApiClient,
    calls: Vec<CallFigures>,
    coughs: Vec<Probe>,
    echoes: Vec<Probe>,
    failures: Vec<String>,
}

impl Side {
    /// `speculate_after_ms`: the side's `CALL_SPECULATE_AFTER_MS`, if set.
    fn start(
        label: &'static str,
        on: bool,
        delays: &ProviderDelays,
        speculate_after_ms: Option<u32>,
    ) -> Result<Side> {
        let mut vars = BTreeMap::from([
            ("CALL_PREPARE_GREETING".to_owned(), on.to_string()),
            ("CALL_SPECULATE".to_owned(), on.to_string()),
            ("CALL_FAST_BARGE_IN".to_owned(), on.to_string()),
        ]);
        if let Some(ms) = speculate_after_ms {
            vars.insert("CALL_SPECULATE_AFTER_MS".to_owned(), ms.to_string());
        }
        eprintln!("latency-bench: starting the stack with the technique {label} …");
        // VoiceStack panics when a service does not come up; report it as an error.
        let delays = delays.clone();
        let stack =
            std::thread::spawn(move || VoiceStack::start_with_delays(Vec::new(), vars, &delays))
                .join()
                .map_err(|_| {
                    anyhow::anyhow!("the stack ({label}) did not start; see the messages above")
                })?;
        let plain = ApiClient::new(stack.stack.worker_url());
        let api = stack.api();
        Ok(Side {
            label,
            stack,
            plain,
            api,
            calls: Vec::new(),
            coughs: Vec::new(),
            echoes: Vec::new(),
            failures: Vec::new(),
        })
    }

    async fn call(&mut self, n: usize, rings: u32, timeout: Duration) {
        match self.try_call(rings, timeout).await {
            Ok(f) => {
                eprintln!(
                    "latency-bench: {} call {n}: greeting {} ms, replies {:?} ms, barge-in {} ms, LLM tokens {}",
                    self.label,
                    fmt_opt(f.greeting_ms),
                    f.reply_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
                    fmt_opt(f.barge_in_ms),
                    fmt_opt(f.llm_tokens)
                );
                self.calls.push(f);
            }
            Err(e) => {
                eprintln!("latency-bench: {} call {n} FAILED: {e:#}", self.label);
                self.failures.push(format!("call {n}: {e:#}"));
            }
        }
    }

    /// One probe call: `cough` or echo. Its clears and caller turns, or why it failed.
    async fn probe(&mut self, cough: bool, n: usize, rings: u32, timeout: Duration) {
        let (script, kind) = match cough {
            true => (cough_script(), "cough"),
            false => (echo_script(), "echo"),
        };
        match self.try_probe(script, rings, timeout).await {
            Ok(p) => {
                eprintln!(
                    "latency-bench: {} {kind} probe {n}: {} clears, {} caller turns{}",
                    self.label,
                    p.clears,
                    p.user_turns,
                    if p.went_on {
                        ", the persona never went quiet"
                    } else {
                        ""
                    }
                );
                match cough {
                    true => self.coughs.push(p),
                    false => self.echoes.push(p),
                }
            }
            Err(e) => {
                eprintln!(
                    "latency-bench: {} {kind} probe {n} FAILED: {e:#}",
                    self.label
                );
                self.failures.push(format!("{kind} probe {n}: {e:#}"));
            }
        }
    }

    async fn try_probe(
        &mut self,
        script: SimScript,
        rings: u32,
        timeout: Duration,
    ) -> Result<Probe> {
        let deadline = tokio::time::Instant::now() + timeout.min(PROBE_BOUND);
        let placed = self.place(script, rings, deadline).await?;
        let left = Duration::from_secs(30);
        let view = self
            .api
            .wait_settled(&placed.user, &placed.id, left)
            .await?;
        let user_turns = view["transcript"]
            .as_array()
            .map_or(0, |t| t.iter().filter(|l| l["role"] == "user").count());
        Ok(Probe {
            clears: placed.stream.clears.len(),
            user_turns,
            went_on: !placed.ended_in_time,
        })
    }

    /// Places a call answered by `script` and waits for its end, hanging up at
    /// `deadline` if it goes on.
    async fn place(
        &mut self,
        script: SimScript,
        rings: u32,
        deadline: tokio::time::Instant,
    ) -> Result<Placed> {
        let user = self.plain.register_user("latency").await?;
        let number = fresh_number();
        self.stack.twilio.set_script(
            number.clone(),
            CalleeScript::Answer(twilio::Answer {
                after_rings: rings,
                answered_by: AnsweredBy::Human,
                session: script,
                duration_override_secs: None,
            }),
        );
        let id = self.api.trigger_call(&user, PERSONA, &number).await?;
        let sid = loop {
            if let Some(c) = self
                .stack
                .twilio
                .calls()
                .into_iter()
                .find(|c| c.to == number)
            {
                break c.sid;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the Worker never dialled {number}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (record, ended_in_time) = match self.stack.twilio.wait_finished(&sid, left).await {
            Ok(r) => (r, true),
            Err(_) => {
                // Do not leave it running into the next call.
                self.stack.twilio.hangup(&sid);
                let r = self
                    .stack
                    .twilio
                    .wait_finished(&sid, Duration::from_secs(10))
                    .await
                    .map_err(|_| anyhow::anyhow!("call {sid} did not end even when hung up"))?;
                (r, false)
            }
        };
        let stream = record
            .streams
            .first()
            .cloned()
            .with_context(|| format!("call {sid} ({:?}) had no media stream", record.status))?;
        Ok(Placed {
            user,
            id,
            stream,
            heard: record.heard_text,
            ended_in_time,
        })
    }

    async fn try_call(&mut self, rings: u32, timeout: Duration) -> Result<CallFigures> {
        let deadline = tokio::time::Instant::now() + timeout;
        let Placed {
            user,
            id,
            stream,
            heard,
            ended_in_time,
        } = self.place(callee_script(), rings, deadline).await?;
        if !ended_in_time {
            bail!("call {id} did not end within {timeout:?}");
        }
        let mut f = figures(&stream);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        f.llm_tokens = match self.api.wait_settled(&user, &id, left).await {
            Ok(view) => llm_tokens(&view),
            Err(_) => None,
        };
        let mut missing = Vec::new();
        if f.greeting_ms.is_none() {
            missing.push("greeting audio");
        }
        if f.reply_ms.len() < 2 {
            missing.push("a reply");
        }
        if f.barge_in_ms.is_none() {
            missing.push("a clear after the interruption");
        }
        if f.llm_tokens.is_none() {
            missing.push("LLM cost line");
        }
        if !missing.is_empty() {
            // Its figures still count where it has them; the call is reported as failed.
            self.calls.push(f);
            bail!("call {id}: no {} (heard: {heard:?})", missing.join(", no "));
        }
        Ok(f)
    }

    /// The relay's greeting outcomes (`relay_greetings_total{outcome=…}`), from /metrics.
    async fn greeting_outcomes(&self) -> String {
        let Some(base) = self.stack.stack.relay_url() else {
            return "no relay".into();
        };
        let text = match reqwest::get(format!("{base}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => return format!("metrics unavailable: {e}"),
        };
        let outcomes: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("relay_greetings_total{outcome=\""))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect();
        if outcomes.is_empty() {
            "none counted".into()
        } else {
            outcomes.join(", ")
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// `p50 / p95 (n)` of `values`, or `-` when there are none.
fn cell(values: &[f64]) -> String {
    match (percentile(values, 0.5), percentile(values, 0.95)) {
        (Some(p50), Some(p95)) => format!("{p50:.0} / {p95:.0} (n={})", values.len()),
        _ => "- (n=0)".into(),
    }
}

/// `on − off` of the medians, or `-`.
fn delta(off: &[f64], on: &[f64]) -> String {
    match (percentile(off, 0.5), percentile(on, 0.5)) {
        (Some(off), Some(on)) => format!("{:+.0}", on - off),
        _ => "-".into(),
    }
}

fn print_report(args: &Args, off: &Side, on: &Side, outcomes: [&str; 2]) {
    let greeting =
        |s: &Side| -> Vec<f64> { s.calls.iter().filter_map(|c| c.greeting_ms).collect() };
    let reply =
        |s: &Side| -> Vec<f64> { s.calls.iter().flat_map(|c| c.reply_ms.clone()).collect() };
    let barge = |s: &Side| -> Vec<f64> { s.calls.iter().filter_map(|c| c.barge_in_ms).collect() };
    let tokens = |s: &Side| -> Vec<f64> { s.calls.iter().filter_map(|c| c.llm_tokens).collect() };
    let endpointing = if args.endpointing_ms == relay_endpointing_ms() {
        format!("{} ms (the relay's own query value)", args.endpointing_ms)
    } else {
        format!(
            "{} ms (fake override; the relay asks for {})",
            args.endpointing_ms,
            relay_endpointing_ms()
        )
    };
    let tps = if args.llm_tokens_per_sec > 0.0 {
        format!(
            "{} tokens/s (a token: one streamed word)",
            args.llm_tokens_per_sec
        )
    } else {
        "unpaced".into()
    };
    println!();
    println!("latency-bench: whole calls through the Worker under wrangler dev (CallSession DO) and the media relay");
    println!("injected provider delays:");
    println!("  Deepgram endpointing          {endpointing}");
    println!(
        "  LLM first token               {} ms, then {tps}",
        args.llm_first_token_ms
    );
    println!("  ElevenLabs WebSocket connect  {} ms", args.tts_connect_ms);
    println!(
        "  ElevenLabs first audio        {} ms per generation (HTTP stream: first byte)",
        args.tts_first_audio_ms
    );
    println!(
        "  Twilio media                  {} ms each way",
        args.twilio_one_way_ms
    );
    println!(
        "  phone rings                   {} ms before the answer",
        u64::from(args.rings()) * RING_MS
    );
    println!(
        "calls per setting: {} (failed: off {}, on {}; a failed call's figures count where it has them)",
        args.calls,
        off.failures.len(),
        on.failures.len()
    );
    println!();
    println!("techniques: off = CALL_PREPARE_GREETING, CALL_SPECULATE, CALL_FAST_BARGE_IN false; on = all true");
    println!(
        "  on: CALL_SPECULATE_AFTER_MS = {}",
        args.speculate_after_ms.map_or_else(
            || format!(
                "{} (default)",
                cmb_core::channel::DEFAULT_SPECULATE_AFTER_MS
            ),
            |ms| ms.to_string()
        )
    );
    println!(
        "  figure 1: the greeting staged while the phone rings; 2 and 4: speculative replies;"
    );
    println!(
        "  3: fast barge-in (clear on confirmed voice; words that could be echo do not count)"
    );
    println!(
        "  {:<52} {:>22} {:>22} {:>10}",
        "figure, ms (p50 / p95)", "off", "on", "Δ p50"
    );
    let row = |name: &str, off: Vec<f64>, on: Vec<f64>| {
        println!(
            "  {:<52} {:>22} {:>22} {:>10}",
            name,
            cell(&off),
            cell(&on),
            delta(&off, &on)
        );
    };
    row(
        "1. answer → first greeting audio",
        greeting(off),
        greeting(on),
    );
    row(
        "2. end of caller speech → first reply audio",
        reply(off),
        reply(on),
    );
    row("3. barge-in onset → clear", barge(off), barge(on));
    row(
        "LLM tokens per call (prompt + completion, billed)",
        tokens(off),
        tokens(on),
    );
    println!(
        "  {:<52} {:>22} {:>22} {:>10}",
        "4. extra LLM tokens spent on speculation, per call",
        "",
        "",
        delta(&tokens(off), &tokens(on))
    );
    println!(
        "  relay greeting outcomes: off: {}; on: {}",
        outcomes[0], outcomes[1]
    );
    println!(
        "  the script pauses 160 ms after \"so\": on, that pause is speculated on and dropped every call"
    );
    println!();
    println!(
        "false barge-ins (the callee never speaks; probes per side: {})",
        args.probe_calls
    );
    println!(
        "  {:<52} {:>22} {:>22}",
        "calls with a clear, clears, caller turns, went on", "off", "on"
    );
    let probes = |p: &[Probe]| -> String {
        let with = p.iter().filter(|p| p.clears > 0).count();
        let clears: usize = p.iter().map(|p| p.clears).sum();
        let turns: usize = p.iter().map(|p| p.user_turns).sum();
        let went_on = p.iter().filter(|p| p.went_on).count();
        format!("{with}/{}, {clears}, {turns}, {went_on}", p.len())
    };
    println!(
        "  {:<52} {:>22} {:>22}",
        "three 300 ms coughs during the greeting",
        probes(&off.coughs),
        probes(&on.coughs)
    );
    println!(
        "  {:<52} {:>22} {:>22}",
        "line echo, 60 ms late, 12 dB down",
        probes(&off.echoes),
        probes(&on.echoes)
    );
    for side in [off, on] {
        for f in &side.failures {
            println!("failed ({}): {f}", side.label);
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let delays = args.delays();
    let off = Side::start("off", false, &delays, None)?;
    let on = Side::start("on", true, &delays, args.speculate_after_ms)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut sides = [off, on];
    let rings = args.rings();
    let timeout = Duration::from_secs(args.call_timeout_secs);
    rt.block_on(async {
        for n in 1..=args.calls {
            // Alternate which setting goes first, so neither always follows the other.
            let order = if n % 2 == 1 { [0, 1] } else { [1, 0] };
            for i in order {
                sides[i].call(n, rings, timeout).await;
            }
        }
        for n in 1..=args.probe_calls {
            for cough in [true, false] {
                for side in sides.iter_mut() {
                    side.probe(cough, n, rings, timeout).await;
                }
            }
        }
    });
    let outcomes = rt.block_on(async {
        [
            sides[0].greeting_outcomes().await,
            sides[1].greeting_outcomes().await,
        ]
    });
    print_report(&args, &sides[0], &sides[1], [&outcomes[0], &outcomes[1]]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmb_tests::fakes::twilio::{StreamTiming, UtteranceTiming};
    use tokio::time::Instant;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// The probe callees never speak: nothing but coughs, or nothing at all on an echoing
    /// line.
    #[test]
    fn probe_callees_never_speak() {
        let says: Vec<_> = cough_script()
            .steps
            .into_iter()
            .filter_map(|s| match s {
                Step::Say(u) => Some(u),
                _ => None,
            })
            .collect();
        assert_eq!(says, vec![Utterance::Cough(300); 3]);
        let echo = echo_script();
        assert!(echo.steps.iter().all(|s| !matches!(s, Step::Say(_))));
        assert_eq!(echo.echo.map(|e| e.loss_db), Some(12.0));
    }

    /// Figures come from the right moments: the greeting from `start`, replies from the
    /// end of utterances 1 and 2, the barge-in from the fourth's onset to the first clear
    /// after it (an earlier clear does not count).
    #[test]
    fn figures_from_timing() {
        let t0 = Instant::now();
        let utterance = |started, ended, first: Option<u64>| UtteranceTiming {
            text: String::new(),
            started: at(t0, started),
            ended: Some(at(t0, ended)),
            first_media_after: first.map(|ms| at(t0, ms)),
        };
        let stream = StreamRecord {
            timing: StreamTiming {
                start_sent: Some(t0),
                first_media: Some(at(t0, 180)),
                utterances: vec![
                    utterance(2_000, 2_100, None),
                    utterance(3_000, 4_000, Some(4_900)),
                    utterance(8_000, 9_000, Some(9_800)),
                    utterance(10_500, 11_000, None),
                ],
                clears: vec![at(t0, 5_000), at(t0, 10_900)],
            },
            ..StreamRecord::default()
        };
        let f = figures(&stream);
        assert_eq!(f.greeting_ms, Some(180.0));
        assert_eq!(f.reply_ms, vec![900.0, 800.0]);
        assert_eq!(f.barge_in_ms, Some(400.0));
    }

    /// A call that got nowhere has no figures, and says so instead of inventing any.
    #[test]
    fn missing_moments_give_no_figures() {
        let f = figures(&StreamRecord::default());
        assert_eq!(f, CallFigures::default());
        assert_eq!(cell(&[]), "- (n=0)");
        assert_eq!(delta(&[], &[1.0]), "-");
        assert_eq!(delta(&[100.0], &[40.0]), "-60");
    }

    /// The LLM tokens are read off the cost breakdown's `llm` line, and nothing else.
    #[test]
    fn llm_tokens_from_the_cost_line() {
        let view = serde_json::json!({"costs": {"providers": [
            {"provider": "twilio", "quantity": 2.0},
            {"provider": "llm", "quantity": 1234.0},
        ]}});
        assert_eq!(llm_tokens(&view), Some(1234.0));
        assert_eq!(
            llm_tokens(&serde_json::json!({"costs": {"providers": []}})),
            None
        );
    }

    /// Defaults are the brief's delays; the relay's own endpointing is not overridden.
    #[test]
    fn default_delays() {
        let args = Args::parse_from(["latency-bench"]);
        let d = args.delays();
        assert_eq!(d.deepgram_endpointing_ms, None);
        assert_eq!(d.llm_first_token, Duration::from_millis(250));
        assert_eq!(d.llm_tokens_per_sec, Some(400.0));
        assert_eq!(d.tts_connect, Duration::from_millis(150));
        assert_eq!(d.tts_first_audio, Duration::from_millis(120));
        assert_eq!(d.twilio_media_one_way, Duration::from_millis(20));
        assert_eq!(args.rings(), 15);
        let args = Args::parse_from(["latency-bench", "--endpointing-ms", "500", "--ring-ms", "1"]);
        assert_eq!(args.delays().deepgram_endpointing_ms, Some(500));
        assert_eq!(args.rings(), 1);
    }
}
