//! `cargo xtask bench relay --vs-node`: our relay and the minimal Node.js `ws` relay of
//! the shared side-by-side kit (`../shared/bench`), measured alternately in one sitting
//! by the kit's own Twilio load generator, against the kit's Node fakes, and reported as
//! CPU per call-second, CPU per frame handled, and the ratio ours / Node.
//!
//! Owns only the orchestration: copying the kit (never writing into it), starting the
//! fakes and each relay fresh per run, reading the generator's JSON line, and the
//! medians. What is measured and how is the kit's (`loadgen.js`, its header comment).
//! Absolute CPU figures drift a lot on shared machines; the ratio in one sitting is the
//! figure to read.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use xtask::net::free_port;
use xtask::repo::Repo;
use xtask::service::{Service, ServiceSpec};

/// Caller frames per call-second: Twilio sends one 20 ms frame every 20 ms.
const INBOUND_FRAMES_PER_CALL_S: f64 = 50.0;
/// The kit's fake Deepgram and ElevenLabs keys (`fakes.js`).
const DG_KEY: &str = "dg-acceptance-key";
const XI_KEY: &str = "xi-acceptance-key";
/// Shared by our relay and the control peer; any 32+ character value.
const SECRET: &str = "bench-relay-secret-0123456789abcdef0123456789";
const TWILIO_TOKEN: &str = "bench-twilio-token";
/// The kit's files; `node_modules` is installed into the copy.
const KIT_FILES: [&str; 4] = ["fakes.js", "loadgen.js", "node-relay.js", "package.json"];

/// What one side-by-side sitting runs.
pub struct Sitting {
    pub calls: usize,
    pub duration: u64,
    pub warmup: u64,
    pub reps: usize,
    /// The kit, `../shared/bench` by default (relative to the repository root).
    pub kit: PathBuf,
}

/// The fields of the generator's JSON line that this report uses.
#[derive(Debug, Clone, Deserialize)]
struct Run {
    server_cpu_s_per_call_s: f64,
    outbound_frames_per_call_s: f64,
    #[serde(default)]
    server_sys_share: Option<f64>,
    sessions_failed: u64,
    #[serde(default)]
    late_frames: u64,
    #[serde(default)]
    eos_to_audio_ms_p50: Option<f64>,
    #[serde(default)]
    rss_per_call_mb: Option<f64>,
    #[serde(default)]
    machine_busy_pct: Option<f64>,
    #[serde(default)]
    loadgen_cpu_pct: Option<f64>,
}

impl Run {
    /// CPU seconds per frame handled: caller frames in plus audio frames out.
    fn cpu_per_frame(&self) -> f64 {
        self.server_cpu_s_per_call_s / (INBOUND_FRAMES_PER_CALL_S + self.outbound_frames_per_call_s)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Node,
    Ours,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Node => "node",
            Side::Ours => "ours",
        }
    }
}

/// Runs the sitting; `bins` holds our release `media-relay` and `fakes`.
pub fn run(repo: &Repo, bins: &Path, s: &Sitting) -> Result<()> {
    let kit = prepare_kit(repo, &s.kit)?;
    let logs = repo.root().join("target/node-bench/logs");
    fs::create_dir_all(&logs)?;
    let node_fakes_port = free_port()?;
    let control_port = free_port()?;
    let mut node_fakes = Service::spawn(
        ServiceSpec::new("node-fakes", "node")
            .arg("fakes.js")
            .arg(node_fakes_port.to_string())
            .cwd(&kit)
            .log_file(logs.join("node-fakes.log")),
    )?;
    let mut control = Service::spawn(
        ServiceSpec::new("control", bins.join("fakes"))
            .args(["--only", "control", "--control-port"])
            .arg(control_port.to_string())
            .env("RELAY_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .cwd(&kit)
            .log_file(logs.join("control.log")),
    )?;
    wait_for_port(node_fakes_port, &mut node_fakes)?;
    wait_for_port(control_port, &mut control)?;
    let fakes = format!("127.0.0.1:{node_fakes_port}");
    println!(
        "side by side: {} calls, {} s window (+{} s warm-up), {} repetitions, alternating; kit {}",
        s.calls,
        s.duration,
        s.warmup,
        s.reps,
        s.kit.display()
    );
    let mut node_runs = Vec::new();
    let mut our_runs = Vec::new();
    for rep in 0..s.reps {
        // Alternate which goes first, so a drift within the sitting falls on both.
        let order = if rep % 2 == 0 {
            [Side::Node, Side::Ours]
        } else {
            [Side::Ours, Side::Node]
        };
        for side in order {
            let run = one_run(side, &kit, bins, &logs, &fakes, control_port, s)
                .with_context(|| format!("{} relay, repetition {}", side.label(), rep + 1))?;
            print_run(side, rep, &run);
            match side {
                Side::Node => node_runs.push(run),
                Side::Ours => our_runs.push(run),
            }
        }
    }
    let _ = control.stop(Duration::from_secs(3));
    let _ = node_fakes.stop(Duration::from_secs(3));
    print_summary(&node_runs, &our_runs);
    Ok(())
}

/// Copies the kit's files into `target/node-bench/kit` and installs its dependencies there
/// when they are missing; the kit itself is never written to.
fn prepare_kit(repo: &Repo, kit: &Path) -> Result<PathBuf> {
    let kit = if kit.is_absolute() {
        kit.to_path_buf()
    } else {
        repo.root().join(kit)
    };
    let dest = repo.root().join("target/node-bench/kit");
    fs::create_dir_all(&dest)?;
    for f in KIT_FILES {
        let from = kit.join(f);
        fs::copy(&from, dest.join(f)).with_context(|| {
            format!(
                "copying {} (the side-by-side kit; --node-kit to point elsewhere)",
                from.display()
            )
        })?;
    }
    if !dest.join("node_modules/ws/package.json").is_file() {
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-save"])
            .current_dir(&dest)
            .status()
            .context("running npm install for the side-by-side kit")?;
        if !status.success() {
            bail!("npm install in {} failed ({status})", dest.display());
        }
    }
    Ok(dest)
}

/// One fresh relay of `side`, loaded by the generator once; returns its JSON line.
fn one_run(
    side: Side,
    kit: &Path,
    bins: &Path,
    logs: &Path,
    fakes: &str,
    control_port: u16,
    s: &Sitting,
) -> Result<Run> {
    let port = free_port()?;
    let dg = format!("ws://{fakes}/v1/listen");
    let xi = format!("ws://{fakes}");
    let log = logs.join(format!("{}-relay.log", side.label()));
    let (spec, url) = match side {
        Side::Node => (
            ServiceSpec::new("node-relay", "node")
                .arg("node-relay.js")
                .env("PORT", port.to_string())
                .env("DEEPGRAM_URL", &dg)
                .env("ELEVENLABS_URL", &xi)
                .env("DEEPGRAM_API_KEY", DG_KEY)
                .env("ELEVENLABS_API_KEY", XI_KEY),
            format!("ws://127.0.0.1:{port}"),
        ),
        Side::Ours => {
            let url = format!("ws://127.0.0.1:{port}/twilio");
            (
                ServiceSpec::new("media-relay", bins.join("media-relay"))
                    .env("RELAY_LISTEN", format!("127.0.0.1:{port}"))
                    .env("RELAY_PUBLIC_URL", &url)
                    .env("RELAY_SECRET", SECRET)
                    .env("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
                    .env("WORKER_URL", format!("http://127.0.0.1:{control_port}"))
                    .env("DEEPGRAM_URL", &dg)
                    .env("DEEPGRAM_API_KEY", DG_KEY)
                    .env("ELEVENLABS_URL", &xi)
                    .env("ELEVENLABS_API_KEY", XI_KEY)
                    .env("RELAY_MAX_CALLS", (s.calls + 10).to_string())
                    .env("RUST_LOG", "warn"),
                url,
            )
        }
    };
    let mut relay = Service::spawn(spec.cwd(kit).log_file(log))?;
    wait_for_port(port, &mut relay)?;
    let pid = service_pid(&relay)?;
    let mut gen = Command::new("node");
    gen.current_dir(kit).arg("loadgen.js").args([
        "--url",
        &url,
        "-n",
        &s.calls.to_string(),
        "--duration",
        &s.duration.to_string(),
        "--warmup",
        &s.warmup.to_string(),
        "--server-pid",
        &pid.to_string(),
        "--label",
        side.label(),
        "--finals-url",
        &format!("http://{fakes}/_speech_finals"),
    ]);
    if side == Side::Ours {
        gen.args([
            "--token-url",
            &format!("http://127.0.0.1:{control_port}"),
            "--token-bearer",
            SECRET,
            "--twilio-token",
            TWILIO_TOKEN,
        ]);
    }
    let out = gen.output().context("running loadgen.js")?;
    let _ = relay.stop(Duration::from_secs(5));
    if !out.status.success() {
        bail!(
            "loadgen.js failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("loadgen.js printed no JSON line")?;
    fs::write(logs.join(format!("{}-loadgen.json", side.label())), line)?;
    serde_json::from_str(line).with_context(|| format!("loadgen.js output: {line}"))
}

/// The service's own process (not its `sh` wrapper, which leads the group): the wrapper's
/// child that is not a shell. Its CPU is what the generator reads from /proc.
fn service_pid(service: &Service) -> Result<u32> {
    let leader = service.pgid();
    let children = fs::read_to_string(format!("/proc/{leader}/task/{leader}/children"))
        .with_context(|| format!("children of {}", service.name()))?;
    for pid in children.split_whitespace() {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if !argv0.is_empty() && argv0 != b"sh" && !argv0.ends_with(b"/sh") {
            return pid.parse().context("pid");
        }
    }
    bail!("no process found for {}", service.name())
}

/// Waits until `port` on loopback accepts, or fails with the service's output.
fn wait_for_port(port: u16, service: &mut Service) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = service.exited()? {
            bail!(
                "{} exited ({status}); last output:\n{}",
                service.name(),
                service.tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{} did not accept on port {port}; last output:\n{}",
        service.name(),
        service.tail(20)
    )
}

fn print_run(side: Side, rep: usize, r: &Run) {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v}"));
    println!(
        "  #{} {:<4} cpu/call-s {:.5}  per frame {:.2} µs  out frames/call-s {:.1}  sys share {}  \
         failed {}  late {}  eos→audio p50 {} ms  rss/call {} MB  machine busy {}%  loadgen {}%",
        rep + 1,
        side.label(),
        r.server_cpu_s_per_call_s,
        r.cpu_per_frame() * 1e6,
        r.outbound_frames_per_call_s,
        opt(r.server_sys_share),
        r.sessions_failed,
        r.late_frames,
        opt(r.eos_to_audio_ms_p50),
        opt(r.rss_per_call_mb),
        opt(r.machine_busy_pct),
        opt(r.loadgen_cpu_pct),
    );
}

fn print_summary(node: &[Run], ours: &[Run]) {
    let stat = |runs: &[Run], f: fn(&Run) -> f64| Spread::of(runs.iter().map(f).collect());
    let per_call = |r: &Run| r.server_cpu_s_per_call_s;
    let per_frame = |r: &Run| r.cpu_per_frame() * 1e6;
    println!("medians (range) over {} runs each:", node.len());
    for (label, runs) in [("node", node), ("ours", ours)] {
        println!(
            "  {label}: {} CPU-s per call-second, {} µs CPU per frame handled",
            stat(runs, per_call).show(5),
            stat(runs, per_frame).show(2),
        );
    }
    // Each of ours against the Node run of the same repetition.
    let paired = |f: fn(&Run) -> f64| {
        Spread::of(
            ours.iter()
                .zip(node)
                .map(|(o, n)| f(o) / f(n))
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "ratio ours/node per call-second: {} (median of paired runs)",
        paired(per_call).show(3)
    );
    println!(
        "ratio ours/node per frame handled: {} (median of paired runs)",
        paired(per_frame).show(3)
    );
}

/// Median and range of a few figures.
#[derive(Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut xs: Vec<f64>) -> Spread {
        xs.retain(|x| x.is_finite());
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        if n == 0 {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Spread {
            median,
            min: xs[0],
            max: xs[n - 1],
        }
    }

    fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Medians of odd and even counts, ranges, and non-finite figures left out.
    #[test]
    fn spread() {
        assert_eq!(
            Spread::of(vec![3.0, 1.0, 2.0]),
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        let s = Spread::of(vec![4.0, 1.0, f64::NAN, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Spread::of(vec![]).median.is_nan());
    }

    /// Frames handled are the 50 caller frames per second plus the audio sent back.
    #[test]
    fn cpu_per_frame_counts_both_directions() {
        let line = r#"{"server_cpu_s_per_call_s":0.0016,"outbound_frames_per_call_s":14,
            "sessions_failed":0,"server_sys_share":0.5,"other":"ignored"}"#;
        let r: Run = serde_json::from_str(line).expect("generator line");
        assert!((r.cpu_per_frame() - 0.0016 / 64.0).abs() < 1e-12);
    }
}
