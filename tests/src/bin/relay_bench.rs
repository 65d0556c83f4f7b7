//! `relay-bench`: N concurrent simulated calls through the media relay, measured from
//! outside (run it with `cargo xtask bench relay`).
//!
//! Starts the fake Deepgram and ElevenLabs (zero added latency) and the fake control peer
//! in this process, starts the relay binary pointed at them (or uses `--relay-url` for
//! any implementation already running against `--providers-only` fakes), ramps up the
//! calls, and reports: end of turn → first persona audio, the relay's own late and
//! dropped frame counters, and the relay's CPU seconds per call-second and resident
//! memory per call from /proc.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use cmb_tests::fakes::{deepgram, elevenlabs, LOOPBACK_ANY};
use cmb_tests::loadgen::{self, ClientConfig, ControlPeer, FrameClock};

const SECRET: &str = "bench-relay-secret-0123456789abcdef0123456789";
const TWILIO_TOKEN: &str = "bench-twilio-token";
const DG_KEY: &str = "dg-bench";
const XI_KEY: &str = "xi-bench";
/// Deepgram's endpointing (SttOptions default): audio-time silence before `speech_final`,
/// part of every measured turn latency but provider behaviour, not relay work.
const ENDPOINTING_MS: f64 = 300.0;

#[derive(Parser)]
#[command(about = "Load benchmark for the media relay")]
struct Args {
    /// Concurrent calls.
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// Steady-state measuring window, after the ramp.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Calls are started evenly over this long.
    #[arg(long, default_value_t = 10)]
    ramp_secs: u64,
    /// The relay binary to start.
    #[arg(long)]
    relay_bin: PathBuf,
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// (CPU seconds used so far, resident KiB) of a process, from /proc.
fn proc_sample(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, rss_kib))
}

struct Relay {
    child: Child,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let frames = FrameClock::default();
    let tap = frames.clone();
    let dg = deepgram::spawn(deepgram::Config {
        api_key: DG_KEY.into(),
        idle_timeout: Duration::from_secs(600),
        audio_tap: Some(deepgram::AudioTap(std::sync::Arc::new(
            move |b: &[u8]| tap.received(b),
        ))),
        ..Default::default()
    })
    .await?;
    let xi = elevenlabs::spawn(elevenlabs::Config {
        api_key: XI_KEY.into(),
        ..Default::default()
    })
    .await?;
    let peer = ControlPeer::new(SECRET);
    let control = loadgen::spawn_control_peer(peer.clone(), LOOPBACK_ANY).await?;

    let relay_addr = free_addr()?;
    let relay_url = format!("ws://{relay_addr}/twilio");
    let child = Command::new(&args.relay_bin)
        .env_clear()
        .env("RELAY_LISTEN", relay_addr.to_string())
        .env("RELAY_SECRET", SECRET)
        .env("RELAY_PUBLIC_URL", &relay_url)
        .env("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
        .env("WORKER_URL", control.base_url())
        .env("DEEPGRAM_API_KEY", DG_KEY)
        .env("DEEPGRAM_URL", format!("{}/v1/listen", dg.ws_url()))
        .env("ELEVENLABS_API_KEY", XI_KEY)
        .env("ELEVENLABS_URL", xi.ws_url())
        .env("RELAY_MAX_CALLS", (args.calls + 10).to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", args.relay_bin.display()))?;
    let relay = Relay { child };
    let pid = relay.child.id();
    let http = reqwest::Client::new();
    let health = format!("http://{relay_addr}/health");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the relay never answered {health}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, rss_idle) = proc_sample(pid)?;

    let cfg = ClientConfig {
        relay_url: relay_url.clone(),
        twilio_auth_token: TWILIO_TOKEN.into(),
        relay_secret: SECRET.into(),
        speak_every_ms: 4000,
        utterance: "hello there".into(),
        frames: frames.clone(),
    };
    let ramp = Duration::from_secs(args.ramp_secs);
    let steady = Duration::from_secs(args.duration_secs);
    let start = Instant::now();
    let end = start + ramp + steady + Duration::from_secs(2);
    let mut tasks = Vec::with_capacity(args.calls);
    for i in 0..args.calls {
        let at = start + ramp.mul_f64(i as f64 / args.calls as f64);
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            loadgen::run_call(cfg, i, end.saturating_duration_since(Instant::now())).await
        }));
    }
    // Measure over the steady window only, when every call is up.
    tokio::time::sleep_until((start + ramp + Duration::from_secs(1)).into()).await;
    let (cpu0, _) = proc_sample(pid)?;
    let t0 = Instant::now();
    let mut rss_samples = Vec::new();
    while t0.elapsed() < steady.saturating_sub(Duration::from_secs(1)) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_samples.push(proc_sample(pid)?.1 as f64);
    }
    let (cpu1, _) = proc_sample(pid)?;
    let window = t0.elapsed().as_secs_f64();
    let metrics = http
        .get(format!("http://{relay_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;

    let mut latencies = Vec::new();
    let (mut frames_in, mut frames_out, mut failed) = (0u64, 0u64, 0usize);
    let mut first_error = None;
    for t in tasks {
        let s = t.await?;
        if let Some(e) = s.error {
            failed += 1;
            first_error.get_or_insert(e);
        }
        latencies.extend(s.turn_latency_ms);
        frames_in += s.frames_in;
        frames_out += s.frames_out;
    }
    drop(relay);

    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let cpu_per_call_sec = (cpu1 - cpu0) / (args.calls as f64 * window);
    let rss_steady = loadgen::percentile(&rss_samples, 0.5).unwrap_or(0.0);
    let rss_per_call_kib = (rss_steady - rss_idle as f64) / args.calls as f64;
    let p = |q| loadgen::percentile(&latencies, q).unwrap_or(f64::NAN);
    let frame_ms = frames.latencies_ms();
    let f = |q| loadgen::percentile(&frame_ms, q).unwrap_or(f64::NAN);

    println!(
        "relay benchmark: {} calls, {}s ramp, {:.0}s measured window",
        args.calls, args.ramp_secs, window
    );
    println!(
        "  calls failed                         {failed}{}",
        first_error
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "  turns answered by the control peer   {}",
        peer.turns_answered
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("  frames in (caller → relay)           {frames_in}");
    println!("  frames out (relay → caller)          {frames_out}");
    println!(
        "  end of utterance → first audio       p50 {:.1} ms  p99 {:.1} ms  (n = {})",
        p(0.5),
        p(0.99),
        latencies.len()
    );
    println!(
        "    minus {ENDPOINTING_MS:.0} ms endpointing         p50 {:.1} ms  p99 {:.1} ms",
        p(0.5) - ENDPOINTING_MS,
        p(0.99) - ENDPOINTING_MS
    );
    println!(
        "  caller frame → Deepgram (forwarding) p50 {:.3} ms  p99 {:.3} ms  (n = {})",
        f(0.5),
        f(0.99),
        frame_ms.len()
    );
    println!(
        "  relay late frames (its counter)      {}",
        metric("relay_late_frames_total")
    );
    println!(
        "  relay dropped frames (its counter)   {}",
        metric("relay_frames_dropped_total")
    );
    println!("  relay CPU per call-second            {cpu_per_call_sec:.6} s   (target ≤ 0.0005 at 200 calls)");
    println!(
        "  relay resident memory                idle {rss_idle} KiB, steady {rss_steady:.0} KiB"
    );
    println!("  relay resident memory per call       {rss_per_call_kib:.1} KiB   (target ≤ 64 KB)");
    Ok(())
}
