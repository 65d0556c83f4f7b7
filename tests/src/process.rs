//! Child processes in tests: stopping one the way a supervisor does.

use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{ensure, Context as _};

/// Sends SIGTERM to `child` and waits up to `within` for it to exit with success.
pub async fn stop_cleanly(
    child: &mut tokio::process::Child,
    within: Duration,
) -> anyhow::Result<()> {
    let status = terminate(child, within).await?;
    ensure!(status.success(), "exited with {status} after SIGTERM");
    Ok(())
}

/// Sends SIGTERM to `child` and waits up to `within` for it to exit; its exit status.
pub async fn terminate(
    child: &mut tokio::process::Child,
    within: Duration,
) -> anyhow::Result<ExitStatus> {
    let pid = child.id().context("the child has already exited")?;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    ensure!(sent.success(), "kill -TERM {pid} failed");
    tokio::time::timeout(within, child.wait())
        .await
        .with_context(|| format!("pid {pid} still running {within:?} after SIGTERM"))?
        .context("waiting for the child")
}

/// Reads the `fakes` binary's start-up announcements from its stdout, up to
/// `fakes ready` (exclusive), within `within`.
pub async fn fakes_announcements(
    child: &mut tokio::process::Child,
    within: Duration,
) -> anyhow::Result<Vec<String>> {
    use tokio::io::AsyncBufReadExt as _;
    let stdout = child.stdout.take().context("stdout is not piped")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut announced = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if line == "fakes ready" {
                return Ok(());
            }
            announced.push(line);
        }
        anyhow::bail!("the fakes exited before `fakes ready`")
    };
    tokio::time::timeout(within, read)
        .await
        .context("no `fakes ready` in time")??;
    Ok(announced)
}
