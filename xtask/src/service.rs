//! A long-running child (wrangler, the relay, the fakes) owned as a whole process group,
//! with its output captured line by line.
//!
//! Each service runs under a tiny `sh` wrapper that is the leader of a fresh process group
//! (`Command::process_group(0)`, so the terminal's Ctrl-C reaches only us). The wrapper's
//! stdin is a pipe whose write end only this process holds: when we exit for any reason
//! (clean stop, panic, SIGKILL), the pipe closes and a watchdog inside the wrapper sends
//! SIGTERM, then SIGKILL, to the whole group. This matters because killing only wrangler's
//! pid leaves `workerd` listening. [`Service::stop`] and `Drop` do the same eagerly.
//!
//! This module must stay free of `unsafe` (the workspace forbids it): no `pre_exec`,
//! no `prctl`; the pipe is what ties the children's lifetime to ours.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::killpg;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The wrapper run as `sh -c WRAPPER sh PROGRAM ARGS...`.
///
/// - The service gets `/dev/null` as stdin and not the watchdog pipe (fd 3), so only the
///   watchdog notices the owner going away.
/// - `trap '' TERM` comes *after* starting the service, so the service keeps the default
///   TERM action while the wrapper and watchdog survive the group-wide TERM they send.
/// - When the service exits on its own, the wrapper TERMs leftovers (e.g. a workerd whose
///   wrangler crashed) and exits with the service's code, which the owner observes.
const WRAPPER: &str = r#"exec 3<&0
"$@" 3<&- </dev/null &
svc=$!
trap '' TERM
{ cat <&3 >/dev/null 2>&1; kill -TERM 0; sleep 5; kill -KILL 0; } </dev/null >/dev/null 2>&1 &
exec 3<&-
wait "$svc"
code=$?
kill -TERM 0
exit "$code"
"#;

/// Lines kept in memory per service for error messages and readiness checks.
const LOG_CAPACITY: usize = 2000;

/// What to run and where its output goes.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    cwd: Option<PathBuf>,
    log_file: Option<PathBuf>,
    echo: bool,
}

impl ServiceSpec {
    /// `name` prefixes echoed log lines and names the service in errors.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            cwd: None,
            log_file: None,
            echo: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Drops an inherited variable (so a developer's shell cannot leak into a test).
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env_remove.push(key.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Also write every output line to this file (created or truncated).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Also print every output line to our stderr as `name | line`.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line, for messages.
    pub fn display_command(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The retained tail of a service's output.
#[derive(Default)]
struct LogLines {
    lines: VecDeque<String>,
    /// Output streams still being read; 0 once everything the service wrote is here.
    open_streams: usize,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogLines>,
    grew: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogLines> {
        // A pump thread panicking mid-push leaves the lines valid; keep using them.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, line: String) {
        let mut state = self.lock();
        if state.lines.len() == LOG_CAPACITY {
            state.lines.pop_front();
        }
        state.lines.push_back(line);
        self.grew.notify_all();
    }

    fn stream_closed(&self) {
        let mut state = self.lock();
        state.open_streams = state.open_streams.saturating_sub(1);
        self.grew.notify_all();
    }

    /// Waits (bounded) until every stream hit EOF, so an exited service's last words are
    /// in the log before it is quoted in an error.
    fn drain(&self, timeout: Duration) {
        let state = self.lock();
        let _ = self
            .grew
            .wait_timeout_while(state, timeout, |s| s.open_streams > 0);
    }
}

/// A running service; stopping it (explicitly or on drop) ends its whole process group.
pub struct Service {
    name: String,
    child: Child,
    pgid: Pid,
    /// Write end of the watchdog pipe; dropping it makes the wrapper kill the group.
    watchdog: Option<ChildStdin>,
    log: Arc<Log>,
    log_file: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl Service {
    /// Starts the service in its own process group.
    pub fn spawn(spec: ServiceSpec) -> Result<Service> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("sh")
            .arg(&spec.program)
            .args(&spec.args)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for key in &spec.env_remove {
            cmd.env_remove(key);
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let file = match &spec.log_file {
            Some(path) => Some(Arc::new(Mutex::new(
                File::create(path)
                    .with_context(|| format!("creating log file {}", path.display()))?,
            ))),
            None => None,
        };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}: {}", spec.name, spec.display_command()))?;
        let pid = i32::try_from(child.id()).context("child pid out of range")?;
        let log = Arc::new(Log::default());
        let pumps = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        let streams: Vec<_> = pumps.into_iter().flatten().collect();
        log.lock().open_streams = streams.len();
        for stream in streams {
            let pump = Pump {
                prefix: spec.name.clone(),
                echo: spec.echo,
                file: file.clone(),
                log: log.clone(),
            };
            // Detached: an escaped grandchild may hold the pipe open forever, and nothing
            // should wait on that. The thread ends when the last writer closes.
            std::thread::Builder::new()
                .name(format!("log-{}", spec.name))
                .spawn(move || pump.run(stream))
                .context("starting a log thread")?;
        }
        Ok(Service {
            name: spec.name,
            watchdog: child.stdin.take(),
            child,
            pgid: Pid::from_raw(pid),
            log,
            log_file: spec.log_file,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process group id (the wrapper's pid).
    pub fn pgid(&self) -> i32 {
        self.pgid.as_raw()
    }

    pub fn log_file(&self) -> Option<&Path> {
        self.log_file.as_deref()
    }

    /// The exit status if the service has ended (it should not, until stopped).
    /// On first seeing the exit it lets the output drain briefly, so a following
    /// [`Service::tail`] quotes the service's last words.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking on {}", self.name))?;
            if self.status.is_some() {
                self.log.drain(Duration::from_millis(500));
            }
        }
        Ok(self.status)
    }

    /// Blocks until the service ends by itself (for finite jobs run as services, such as
    /// parallel `cargo install`s whose output we want prefixed).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// The last `n` output lines, joined, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let state = self.log.lock();
        let skip = state.lines.len().saturating_sub(n);
        let lines: Vec<&str> = state.lines.iter().skip(skip).map(String::as_str).collect();
        if lines.is_empty() {
            "(no output)".to_owned()
        } else {
            lines.join("\n")
        }
    }

    /// All retained output lines.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().lines.iter().cloned().collect()
    }

    /// Waits until an output line satisfies `pred` and returns it; fails if the service
    /// exits first or `timeout` passes, with the output tail in the error.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let state = self.log.lock();
                if let Some(line) = state.lines.iter().find(|l| pred(l)) {
                    return Ok(line.clone());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // Re-check the child at least every 200 ms even if no output arrives.
                let _ = self
                    .log
                    .grew
                    .wait_timeout(state, left.min(Duration::from_millis(200)));
            }
            if let Some(status) = self.exited()? {
                // The line may have arrived with the exit (exited() drained the output).
                if let Some(line) = self.log.lock().lines.iter().find(|l| pred(l)) {
                    return Ok(line.clone());
                }
                bail!(
                    "{} exited ({status}) before it was ready; last output:\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {}s; last output:\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.tail(40)
                );
            }
        }
    }

    /// Ends the whole process group: SIGTERM, up to `grace` for the service to exit, then
    /// SIGKILL for anything left. Idempotent.
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if self.watchdog.is_none() {
            return Ok(self.status);
        }
        // Closing the pipe alone would do (the watchdog TERMs the group), but signalling
        // directly does not depend on the wrapper being healthy.
        drop(self.watchdog.take());
        signal_group(self.pgid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.exited()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Stragglers that ignored TERM, and the watchdog's own grace sleep.
        signal_group(self.pgid, Signal::SIGKILL);
        if self.status.is_none() {
            self.status = Some(
                self.child
                    .wait()
                    .with_context(|| format!("waiting for {}", self.name))?,
            );
        }
        Ok(self.status)
    }
}

impl Service {
    /// SIGKILL to the whole group at once, as a crash would: no clean shutdown. The
    /// service is reaped later by [`Service::stop`] or drop. A group already gone is fine.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Sends `signal` to the service's whole process group; a group already gone is not
    /// an error.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("sending {signal} to {}", self.name)),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

/// Signals a process group; a group that is already gone is not an error.
fn signal_group(pgid: Pid, signal: Signal) {
    let _ = killpg(pgid, signal);
}

/// Copies one output stream into the log, the log file and (optionally) our stderr.
struct Pump {
    prefix: String,
    echo: bool,
    file: Option<Arc<Mutex<File>>>,
    log: Arc<Log>,
}

impl Pump {
    fn run(self, stream: Box<dyn Read + Send>) {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => {
                    self.log.stream_closed();
                    return;
                }
                Ok(_) => {}
            }
            // Tools may print invalid UTF-8 or CRLF; neither should break logging.
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            if let Some(file) = &self.file {
                let mut file = file
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = writeln!(file, "{line}");
            }
            if self.echo {
                // Straight to the stderr handle, not `eprintln!`: libtest captures the
                // macros per test, which would hide (or misattribute) a shared stack's logs.
                let _ = writeln!(std::io::stderr().lock(), "{:>8} | {line}", self.prefix);
            }
            self.log.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str) -> ServiceSpec {
        ServiceSpec::new(name, "sh").arg("-c").arg(script)
    }

    fn alive(pid: i32) -> bool {
        // Signal 0 probes existence; a zombie still "exists" until reaped, so also check
        // /proc state.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() && !stat.contains(") Z")
    }

    fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cond()
    }

    /// Both stdout and stderr lines are captured, and a matching line is found.
    #[test]
    fn captures_lines_and_finds_a_pattern() {
        let mut svc =
            Service::spawn(sh("t", "echo one; echo two >&2; echo ready; sleep 30")).unwrap();
        let line = svc
            .wait_for_line(Duration::from_secs(10), |l| l == "ready")
            .unwrap();
        assert_eq!(line, "ready");
        assert!(svc.lines().contains(&"one".to_owned()), "stdout order kept");
        // stderr has its own pump, so it may land after "ready": wait for it too.
        svc.wait_for_line(Duration::from_secs(10), |l| l == "two")
            .unwrap();
        svc.stop(Duration::from_secs(5)).unwrap();
    }

    /// Stopping kills grandchildren too: the whole process group goes.
    #[test]
    fn stop_kills_the_whole_group() {
        let mut svc = Service::spawn(sh("t", "sleep 300 & echo grandchild $!; wait")).unwrap();
        let line = svc
            .wait_for_line(Duration::from_secs(10), |l| l.starts_with("grandchild "))
            .unwrap();
        let pid: i32 = line["grandchild ".len()..].parse().unwrap();
        assert!(alive(pid));
        svc.stop(Duration::from_secs(5)).unwrap();
        assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    }

    /// A service that ignores SIGTERM is killed after the grace period.
    #[test]
    fn stop_escalates_to_sigkill() {
        let mut svc =
            Service::spawn(sh("t", "trap '' TERM; echo up; while :; do sleep 1; done")).unwrap();
        svc.wait_for_line(Duration::from_secs(10), |l| l == "up")
            .unwrap();
        let started = Instant::now();
        let status = svc.stop(Duration::from_millis(300)).unwrap();
        assert!(status.is_some());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Closing the watchdog pipe (what happens when the owner dies) ends the group even
    /// without an explicit signal from the owner.
    #[test]
    fn owner_going_away_ends_the_group() {
        let mut svc = Service::spawn(sh("t", "sleep 300 & echo grandchild $!; wait")).unwrap();
        let line = svc
            .wait_for_line(Duration::from_secs(10), |l| l.starts_with("grandchild "))
            .unwrap();
        let pid: i32 = line["grandchild ".len()..].parse().unwrap();
        // Simulate the owner vanishing: only the pipe closes, no signal is sent.
        drop(svc.watchdog.take());
        assert!(wait_until(Duration::from_secs(10), || !alive(pid)));
        assert!(wait_until(Duration::from_secs(10), || svc
            .exited()
            .unwrap()
            .is_some()));
    }

    /// A service that dies on its own is reported with its output, not waited on forever.
    #[test]
    fn early_exit_is_reported_with_output() {
        let mut svc = Service::spawn(sh("t", "echo boom; exit 3")).unwrap();
        let err = svc
            .wait_for_line(Duration::from_secs(10), |l| l == "never")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert_eq!(svc.exited().unwrap().and_then(|s| s.code()), Some(3));
    }

    /// `kill` ends the whole group at once, even a service that ignores SIGTERM.
    #[test]
    fn kill_is_immediate_for_the_whole_group() {
        let mut svc = Service::spawn(sh(
            "t",
            "trap '' TERM; sleep 300 & echo grandchild $!; while :; do sleep 1; done",
        ))
        .unwrap();
        let line = svc
            .wait_for_line(Duration::from_secs(10), |l| l.starts_with("grandchild "))
            .unwrap();
        let pid: i32 = line["grandchild ".len()..].parse().unwrap();
        svc.kill().unwrap();
        assert!(wait_until(Duration::from_secs(2), || !alive(pid)));
        assert!(wait_until(Duration::from_secs(2), || svc
            .exited()
            .unwrap()
            .is_some()));
        // Killing a group that is already gone is not an error.
        svc.kill().unwrap();
    }

    /// Output is also written to the log file.
    #[test]
    fn writes_the_log_file() {
        let path = std::env::temp_dir().join(format!("xtask-svc-{}.log", std::process::id()));
        let mut svc = Service::spawn(sh("t", "echo to-file; sleep 30").log_file(&path)).unwrap();
        svc.wait_for_line(Duration::from_secs(10), |l| l == "to-file")
            .unwrap();
        svc.stop(Duration::from_secs(5)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.contains("to-file"), "{text}");
    }
}
