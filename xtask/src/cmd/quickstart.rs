//! `cargo xtask quickstart`: the README's "Quickstart" followed as a newcomer would, so
//! the README cannot drift from what works. `cargo xtask test` runs it as a step.
//!
//! It starts `cargo xtask dev --simulate` on spare ports with a fresh state folder (the
//! README's first block), then feeds every other `sh` block of the section, in order, to
//! one `bash` session, the way a reader pastes them into a second terminal. Only two
//! lines are changed, and each must be in the README exactly as written here: the
//! `API=` line gets the spare port, and the `CODE=` line gets the code the dev log
//! printed (the reader types what they read). Between blocks it waits where a reader
//! would: for the SMS in the dev log, and for the call to end. Then it checks what the
//! reader was promised: free credits after verifying, the live transcript in the dev log,
//! and the call in the history with its costs and latencies.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use xtask::net::{ensure_port_free, free_port};
use xtask::repo::Repo;
use xtask::service::{Service, ServiceSpec};
use xtask::text::strip_ansi;

/// The quickstart section's markers in README.md.
const BEGIN: &str = "<!-- quickstart:begin -->";
const END: &str = "<!-- quickstart:end -->";
/// The two lines the reader adapts, exactly as the README has them.
const API_LINE: &str = "API=http://localhost:8787";
const CODE_LINE: &str = "CODE=123456";
/// The number the README verifies and calls.
const PHONE: &str = "+14155550123";

/// First start builds what is stale and runs setup; generous, it is not a benchmark.
const DEV_READY: Duration = Duration::from_secs(600);
/// A block's commands, or the demo call, taking longer than this is a failure.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(repo: &Repo) -> Result<()> {
    let readme =
        std::fs::read_to_string(repo.root().join("README.md")).context("reading README.md")?;
    let blocks = quickstart_blocks(&readme)?;
    let (dev_block, reader_blocks) = blocks.split_first().context("no blocks")?;
    ensure!(
        dev_block.trim_start().starts_with("cargo xtask dev"),
        "the quickstart's first block must start the stack with `cargo xtask dev`: {dev_block:?}"
    );
    ensure!(
        reader_blocks.len() == 4,
        "the quickstart has {} blocks after `cargo xtask dev`; this check knows four \
         (register, verify, call, history): update xtask/src/cmd/quickstart.rs with it",
        reader_blocks.len()
    );

    let port = free_port()?;
    let relay_port = free_port()?;
    let inspector_port = free_port()?;
    let fakes_base = free_run_of_ports(5)?;
    let state = repo.root().join("target/quickstart");
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("clearing {}", state.display()))?;
    }
    let dev = ServiceSpec::new(
        "dev",
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
    )
    .args(["xtask", "dev", "--simulate"])
    .args(["--port", &port.to_string()])
    .args(["--relay-port", &relay_port.to_string()])
    .args(["--inspector-port", &inspector_port.to_string()])
    .args(["--fakes-base-port", &fakes_base.to_string()])
    .arg("--state-dir")
    .arg(&state)
    .cwd(repo.root())
    .echo(std::env::var_os("CMB_STACK_LOG").is_some());
    println!("quickstart: {} ", dev.display_command());
    let mut dev = Service::spawn(dev)?;
    let result = follow(&mut dev, reader_blocks, port);
    let _ = dev.stop(Duration::from_secs(15));
    if result.is_err() {
        eprintln!("quickstart: the dev log's last lines:\n{}", dev.tail(60));
    }
    result
}

fn follow(dev: &mut Service, blocks: &[String], port: u16) -> Result<()> {
    dev.wait_for_line(DEV_READY, |l| l.starts_with("Logs follow"))?;
    println!("quickstart: the stack is up on port {port}");
    let mut shell = Shell::start()?;

    // 1. Register and ask for the verification SMS.
    let register = replace_line(
        &blocks[0],
        API_LINE,
        &format!("API=http://localhost:{port}"),
    )?;
    let out = shell.run(&register)?;
    ensure!(
        out.contains("\"status\":\"pending\"") || out.contains("\"status\": \"pending\""),
        "asking for the SMS did not answer a pending verification:\n{out}"
    );

    // 2. The reader reads the code off the dev log and types it.
    let sms = dev.wait_for_line(BLOCK_TIMEOUT, |l| {
        l.contains(&format!("SMS to {PHONE}: your Call Me Back code is "))
    })?;
    let code: String = strip_ansi(&sms)
        .split("code is ")
        .nth(1)
        .unwrap_or_default()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    ensure!(
        code.len() == 6,
        "no six-digit code in the dev log's line: {sms}"
    );
    let verify = replace_line(&blocks[1], CODE_LINE, &format!("CODE={code}"))?;
    let out = shell.run(&verify)?;
    ensure!(
        out.trim() == "200",
        "verifying should print the 200 free credits, printed:\n{out}"
    );

    // 3. Ask for the call, then watch it in the dev log until the persona hangs up.
    shell.run(&blocks[2])?;
    shell.run(&format!(
        "for _ in $(seq {}); do \
           [ \"$(curl -s $API/api/calls/$CALL -H \"authorization: Bearer $TOKEN\" | jq -r .call.cost_cents)\" != null ] && break; \
           sleep 1; \
         done",
        CALL_TIMEOUT.as_secs()
    ))?;
    let log: Vec<String> = dev.lines().iter().map(|l| strip_ansi(l)).collect();
    for who in ["[persona]", "[caller]"] {
        ensure!(
            log.iter().any(|l| l.contains(who)),
            "the dev log shows no {who} lines of the conversation"
        );
    }

    // 4. The history and the call's detail.
    let out = shell.run(&blocks[3])?;
    let values: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .with_context(|| format!("the history block printed something other than JSON:\n{out}"))?;
    let detail = values.last().context("the history block printed nothing")?;
    ensure!(
        values[..values.len() - 1]
            .iter()
            .any(|c| c["status"] == "completed" && c["cost_cents"].as_i64().is_some()),
        "the history has no completed, charged call:\n{out}"
    );
    let providers = detail["costs"]["providers"].as_array().map_or(0, Vec::len);
    ensure!(
        providers >= 4,
        "the cost breakdown has {providers} providers:\n{detail:#}"
    );
    ensure!(
        detail["latencies"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
        "the detail has no per-turn latencies:\n{detail:#}"
    );
    ensure!(
        detail["transcript"]
            .as_array()
            .is_some_and(|t| t.len() >= 2),
        "the detail has no transcript:\n{detail:#}"
    );
    shell.finish()?;
    println!("quickstart: every step of the README's quickstart worked");
    Ok(())
}

/// The `sh` code blocks between the quickstart markers, in order.
fn quickstart_blocks(readme: &str) -> Result<Vec<String>> {
    let start = readme
        .find(BEGIN)
        .context("README.md has no quickstart:begin marker")?;
    let end = readme[start..]
        .find(END)
        .context("README.md has no quickstart:end marker after quickstart:begin")?;
    let section = &readme[start..start + end];
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    ensure!(
        current.is_none(),
        "an unclosed code block in the quickstart"
    );
    Ok(blocks)
}

/// `block` with the line that starts with `line` (a comment may follow) replaced.
fn replace_line(block: &str, line: &str, with: &str) -> Result<String> {
    let mut found = false;
    let out: Vec<String> = block
        .lines()
        .map(|l| {
            if l.trim_start().starts_with(line) {
                found = true;
                with.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    ensure!(found, "the quickstart block has no `{line}` line:\n{block}");
    Ok(out.join("\n") + "\n")
}

/// The first of `n` consecutive free ports (the fakes take a run of them).
fn free_run_of_ports(n: u16) -> Result<u16> {
    for _ in 0..20 {
        let base = free_port()?;
        if base.checked_add(n).is_some()
            && (0..n).all(|i| ensure_port_free(base + i, "a fake provider").is_ok())
        {
            return Ok(base);
        }
    }
    bail!("found no {n} consecutive free ports on 127.0.0.1")
}

/// One `bash` session the blocks are pasted into, as in a reader's second terminal. A
/// failing command ends it (`set -eo pipefail`), and that is reported with its output.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    blocks: usize,
}

impl Shell {
    fn start() -> Result<Shell> {
        let mut child = Command::new("bash")
            .arg("--noprofile")
            .arg("--norc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting bash")?;
        let mut stdin = child.stdin.take().context("bash stdin")?;
        let stdout = child.stdout.take().context("bash stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        writeln!(stdin, "set -eo pipefail").context("writing to bash")?;
        Ok(Shell {
            child,
            stdin,
            lines,
            blocks: 0,
        })
    }

    /// Pastes `block` and returns what it printed on stdout.
    fn run(&mut self, block: &str) -> Result<String> {
        self.blocks += 1;
        let done = format!("__quickstart_block_{}_done__", self.blocks);
        println!("quickstart: block {}:\n{}", self.blocks, block.trim_end());
        write!(self.stdin, "{block}\necho {done}\n").context("writing to bash")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + BLOCK_TIMEOUT.max(CALL_TIMEOUT);
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // A command's output without a final newline (curl's) shares the
                // sentinel's line: keep what comes before it.
                Ok(line) if line.ends_with(&done) => {
                    let before = &line[..line.len() - done.len()];
                    if !before.is_empty() {
                        println!("  | {before}");
                        out.push_str(before);
                        out.push('\n');
                    }
                    break;
                }
                Ok(line) => {
                    println!("  | {line}");
                    out.push_str(&line);
                    out.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "block {} did not finish in time; it printed:\n{out}",
                        self.blocks
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "block {} failed (bash {status}); it printed:\n{out}",
                        self.blocks
                    )
                }
            }
        }
        Ok(out)
    }

    fn finish(mut self) -> Result<()> {
        writeln!(self.stdin, "exit 0")?;
        let status = self.child.wait()?;
        ensure!(status.success(), "bash ended with {status}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README in the repository has the section this check follows, with the lines it
    /// adapts; a rewrite that drops them fails here, before any stack starts.
    #[test]
    fn the_readme_has_the_quickstart_this_check_follows() {
        let readme = include_str!("../../../README.md");
        let blocks = quickstart_blocks(readme).unwrap();
        assert_eq!(blocks.len(), 5, "{blocks:#?}");
        assert!(blocks[0].starts_with("cargo xtask dev"));
        assert!(replace_line(&blocks[1], API_LINE, "API=x").is_ok());
        assert!(replace_line(&blocks[2], CODE_LINE, "CODE=1").is_ok());
        assert!(blocks[1].contains(PHONE) && blocks[2].contains(PHONE));
    }

    #[test]
    fn blocks_are_read_in_order_and_only_inside_the_markers() {
        let text = "```sh\nnot this\n```\n<!-- quickstart:begin -->\n```sh\na\n```\ntext\n```json\n{}\n```\n```sh\nb\nc\n```\n<!-- quickstart:end -->\n```sh\nnor this\n```\n";
        assert_eq!(quickstart_blocks(text).unwrap(), vec!["a\n", "b\nc\n"]);
    }

    #[test]
    fn a_line_is_replaced_only_where_the_readme_has_it() {
        let block = "API=http://localhost:8787   # the Worker\ncurl $API\n";
        assert_eq!(
            replace_line(block, API_LINE, "API=http://localhost:1").unwrap(),
            "API=http://localhost:1\ncurl $API\n"
        );
        assert!(replace_line("curl $API\n", API_LINE, "x").is_err());
    }
}
