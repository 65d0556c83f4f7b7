//! `relay-bench`: N concurrent simulated calls through a media relay, measured from
//! outside (run it with `cargo xtask bench relay`).
//!
//! Plays every side but the relay's: the fake Deepgram and ElevenLabs (zero added
//! latency), the fake control peer (the CallSession channel, replying at once), and N
//! Twilio Media Streams callers. With `--relay-bin` it starts that relay binary pointed at
//! them; with `--relay-url ws://HOST:PORT/twilio` it aims at a relay someone else starts
//! (any implementation speaking the same protocols): the fakes listen on fixed ports
//! (4311 Deepgram, 4312 ElevenLabs, 4313 control peer unless `--*-port` says otherwise),
//! the environment that relay must be given is printed, and the load starts once the
//! relay's port accepts (within `--wait-secs`).
//!
//! Reports: end of turn → first persona audio, caller frame → Deepgram (from outside),
//! the relay's own forwarding histograms and late/dropped counters when it exports them
//! (`/metrics` on the relay's host:port), and its CPU seconds (user and system) per
//! call-second and resident memory per call from /proc (needs the pid: known for
//! `--relay-bin`, `--relay-pid` otherwise).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use cmb_tests::fakes::{deepgram, elevenlabs};
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
    #[arg(
        long,
        required_unless_present = "relay_url",
        conflicts_with = "relay_url"
    )]
    relay_bin: Option<PathBuf>,
    /// A relay started by hand (`ws://HOST:PORT/twilio`): start only the fakes, print the
    /// relay's environment, and run the load once its port accepts.
    #[arg(long)]
    relay_url: Option<String>,
    /// With `--relay-url`: the relay's process, for CPU and memory from /proc.
    // `requires` alone lets `--relay-bin` through: clap waives a requirement that
    // conflicts with a flag that was given.
    #[arg(long, requires = "relay_url", conflicts_with = "relay_bin")]
    relay_pid: Option<u32>,
    /// With `--relay-url`: how long to wait for the relay's port to accept.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// Port of the in-process fake Deepgram (0 = any free port). Default: a free port
    /// with `--relay-bin`; 4311 with `--relay-url`, so a relay configured by hand can be
    /// started before this run.
    #[arg(long)]
    deepgram_port: Option<u16>,
    /// Port of the fake ElevenLabs; default free, or 4312 with `--relay-url`.
    #[arg(long)]
    elevenlabs_port: Option<u16>,
    /// Port of the fake control peer (the relay's `WORKER_URL`); default free, or 4313
    /// with `--relay-url`.
    #[arg(long)]
    control_port: Option<u16>,
}

/// The fakes' fixed ports with `--relay-url` when none are given: the relay under test is
/// configured by hand, possibly before this run starts.
const EXTERNAL_PORTS: [u16; 3] = [4311, 4312, 4313];

impl Args {
    /// Deepgram, ElevenLabs and control peer ports: the flags, else free ports for a
    /// relay this run starts, else [`EXTERNAL_PORTS`].
    fn fake_ports(&self) -> [u16; 3] {
        let [dg, xi, control] = if self.relay_url.is_some() {
            EXTERNAL_PORTS
        } else {
            [0; 3]
        };
        [
            self.deepgram_port.unwrap_or(dg),
            self.elevenlabs_port.unwrap_or(xi),
            self.control_port.unwrap_or(control),
        ]
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One /proc reading of a process.
#[derive(Clone, Copy)]
struct ProcSample {
    user_secs: f64,
    sys_secs: f64,
    rss_kib: u64,
}

/// CPU seconds so far (user, system) and resident KiB of a process, from /proc.
fn proc_sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    // USER_HZ is 100 on Linux.
    Ok(ProcSample {
        user_secs: utime / 100.0,
        sys_secs: stime / 100.0,
        rss_kib,
    })
}

/// The relay this run started, killed on drop.
struct Relay {
    child: Child,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections.
async fn wait_for_port(addr: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing accepted connections on {addr} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let [deepgram_port, elevenlabs_port, control_port] = args.fake_ports();
    let frames = FrameClock::default();
    let tap = frames.clone();
    let dg = deepgram::spawn(deepgram::Config {
        addr: loopback(deepgram_port),
        api_key: DG_KEY.into(),
        idle_timeout: Duration::from_secs(600),
        audio_tap: Some(deepgram::AudioTap(std::sync::Arc::new(
            move |b: &[u8]| tap.received(b),
        ))),
        ..Default::default()
    })
    .await?;
    let xi = elevenlabs::spawn(elevenlabs::Config {
        addr: loopback(elevenlabs_port),
        api_key: XI_KEY.into(),
        ..Default::default()
    })
    .await?;
    let peer = ControlPeer::new(SECRET);
    let control = loadgen::spawn_control_peer(peer.clone(), loopback(control_port)).await?;
    let relay_env = |relay_url: &str| {
        [
            ("RELAY_SECRET", SECRET.to_owned()),
            ("RELAY_PUBLIC_URL", relay_url.to_owned()),
            ("TWILIO_AUTH_TOKEN", TWILIO_TOKEN.to_owned()),
            ("WORKER_URL", control.base_url()),
            ("DEEPGRAM_API_KEY", DG_KEY.to_owned()),
            ("DEEPGRAM_URL", format!("{}/v1/listen", dg.ws_url())),
            ("ELEVENLABS_API_KEY", XI_KEY.to_owned()),
            ("ELEVENLABS_URL", xi.ws_url()),
            ("RELAY_MAX_CALLS", (args.calls + 10).to_string()),
        ]
    };

    // Start the relay, or wait for the one under test.
    let (relay_url, relay_host, started, pid) = match (&args.relay_bin, &args.relay_url) {
        (Some(bin), _) => {
            let relay_addr = free_addr()?;
            let relay_url = format!("ws://{relay_addr}/twilio");
            let child = Command::new(bin)
                .env_clear()
                .envs(relay_env(&relay_url))
                .env("RELAY_LISTEN", relay_addr.to_string())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let relay = Relay { child };
            let pid = relay.child.id();
            (relay_url, relay_addr.to_string(), Some(relay), Some(pid))
        }
        (None, Some(url)) => {
            let parsed = url::Url::parse(url).context("--relay-url")?;
            let host = format!(
                "{}:{}",
                parsed.host_str().context("--relay-url has no host")?,
                parsed
                    .port_or_known_default()
                    .context("--relay-url has no port")?
            );
            println!("relay under test: {url}; start it with this environment:");
            for (k, v) in relay_env(url) {
                println!("  {k}={v}");
            }
            wait_for_port(&host, Duration::from_secs(args.wait_secs)).await?;
            (url.clone(), host, None, args.relay_pid)
        }
        (None, None) => bail!("give --relay-bin or --relay-url"),
    };
    // Bounded: a relay under test need not speak HTTP at all.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let metrics_url = format!("http://{relay_host}/metrics");
    if started.is_some() {
        let health = format!("http://{relay_host}/health");
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
    }
    let idle = pid.map(proc_sample).transpose()?;
    // A relay started by hand may have served calls already: its histograms and counters
    // are cumulative, and its "idle" memory is not idle.
    let before = fetch_metrics(&http, &metrics_url)
        .await
        .and_then(|m| metric_sum(&m, "relay_frames_in_total"))
        .filter(|n| *n > 0.0);

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
    let cpu0 = pid.map(proc_sample).transpose()?;
    let own0 = proc_sample(std::process::id())?;
    let t0 = Instant::now();
    let mut rss_samples = Vec::new();
    while t0.elapsed() < steady.saturating_sub(Duration::from_secs(1)) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(pid) = pid {
            rss_samples.push(proc_sample(pid)?.rss_kib as f64);
        }
    }
    let cpu1 = pid.map(proc_sample).transpose()?;
    let own1 = proc_sample(std::process::id())?;
    let window = t0.elapsed().as_secs_f64();
    // Another implementation may not serve Prometheus metrics: then those lines say so.
    let metrics = fetch_metrics(&http, &metrics_url).await;

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
    drop(started);

    let metric = |name: &str| metric_sum(metrics.as_deref()?, name);
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
        "  caller frame → Deepgram, end to end  p50 {:.3} ms  p99 {:.3} ms  (n = {}; load generator → fake, both in this process)",
        f(0.5),
        f(0.99),
        frame_ms.len()
    );
    for (label, name) in [
        (
            "in-relay: Twilio read → Deepgram write",
            "relay_forward_in_seconds",
        ),
        (
            "in-relay: TTS read → Twilio write     ",
            "relay_forward_out_seconds",
        ),
    ] {
        let q = |q| {
            metrics
                .as_deref()
                .and_then(|m| loadgen::histogram_quantile(m, name, q))
        };
        match (q(0.5), q(0.99), metric(&format!("{name}_count"))) {
            (Some(p50), Some(p99), Some(n)) => println!(
                "  {label} p50 {:.3} ms  p99 {:.3} ms  (n = {n}; from its histogram)",
                p50 * 1000.0,
                p99 * 1000.0
            ),
            _ => println!("  {label} not exported by this relay"),
        }
    }
    let counter = |name: &str| metric(name).map_or("not available".to_owned(), |v| v.to_string());
    println!(
        "  relay late frames (its counter)      {}",
        counter("relay_late_frames_total")
    );
    println!(
        "  relay dropped frames (its counter)   {}",
        counter("relay_frames_dropped_total")
    );
    match (idle, cpu0, cpu1) {
        (Some(idle), Some(c0), Some(c1)) => {
            let per_call_sec = |secs: f64| secs / (args.calls as f64 * window);
            let user = per_call_sec(c1.user_secs - c0.user_secs);
            let sys = per_call_sec(c1.sys_secs - c0.sys_secs);
            let rss_steady = loadgen::percentile(&rss_samples, 0.5).unwrap_or(0.0);
            let rss_per_call_kib = (rss_steady - idle.rss_kib as f64) / args.calls as f64;
            println!(
                "  relay CPU per call-second            {:.6} s  (user {user:.6} + system {sys:.6}; target ≤ 0.0005 at 200 calls)",
                user + sys
            );
            println!(
                "  relay resident memory                idle {} KiB, steady {rss_steady:.0} KiB",
                idle.rss_kib
            );
            println!(
                "  relay resident memory per call       {rss_per_call_kib:.1} KiB = {:.1} KB  (target ≤ 64 KB)",
                rss_per_call_kib * 1.024
            );
        }
        _ => println!("  relay CPU and memory                 not measured (no --relay-pid)"),
    }
    // The load generator and the fakes share the machine with the relay: when they use
    // most of it, latencies measure the machine more than the relay.
    println!(
        "  this process (callers + fakes) CPU   {:.2} cores of {}",
        (own1.user_secs + own1.sys_secs - own0.user_secs - own0.sys_secs) / window,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    if let Some(n) = before {
        println!(
            "  note: the relay had forwarded {n} caller frames before this run; its histograms, \
             counters and idle memory include earlier calls (start a fresh relay per run)"
        );
    }
    Ok(())
}

/// The relay's Prometheus exposition, if it serves one.
async fn fetch_metrics(http: &reqwest::Client, url: &str) -> Option<String> {
    match http.get(url).send().await {
        Ok(r) if r.status().is_success() => r.text().await.ok(),
        _ => None,
    }
}

/// The sum of every series of metric `name` (all label sets); `None` when it has none.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("relay_bench").chain(args.iter().copied()))
            .expect("parses")
    }

    /// Free ports for a relay this run starts; fixed ones for a relay started by hand;
    /// a flag wins either way. Exactly one of --relay-bin and --relay-url.
    #[test]
    fn fake_ports_and_relay_choice() {
        assert_eq!(parse(&["--relay-bin", "r"]).fake_ports(), [0, 0, 0]);
        let url = ["--relay-url", "ws://127.0.0.1:4400/twilio"];
        assert_eq!(parse(&url).fake_ports(), EXTERNAL_PORTS);
        let given = parse(&[
            url[0],
            url[1],
            "--control-port",
            "9000",
            "--deepgram-port",
            "0",
        ]);
        assert_eq!(given.fake_ports(), [0, 4312, 9000]);
        let parse_err = |a: &[&str]| {
            Args::try_parse_from(std::iter::once("relay_bench").chain(a.iter().copied())).is_err()
        };
        assert!(parse_err(&[]), "one of them is required");
        assert!(parse_err(&["--relay-bin", "r", url[0], url[1]]), "not both");
        assert!(
            parse_err(&["--relay-bin", "r", "--relay-pid", "1"]),
            "pid only with a URL"
        );
    }

    /// Counters sum over label sets, match the exact name only, and are `None` when absent.
    #[test]
    fn metric_sums() {
        let text = "# TYPE relay_calls counter\n\
            relay_calls_total{outcome=\"a\"} 2\n\
            relay_calls_total{outcome=\"b\"} 3\n\
            relay_calls_total_extra 100\n\
            relay_late_frames_total 0\n";
        assert_eq!(metric_sum(text, "relay_calls_total"), Some(5.0));
        assert_eq!(metric_sum(text, "relay_late_frames_total"), Some(0.0));
        assert_eq!(metric_sum(text, "relay_frames_dropped_total"), None);
    }
}
