//! `watch --exec CMD`: tells the runtime about each change, consul-template's `command`
//! convention. `sh -c CMD` runs with the change in `WORKERPUSH_*` environment variables; exit
//! 0 means the runtime took it, anything else (or the time limit) refuses it with the first
//! line of the command's stderr.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::io::AsyncReadExt;

/// Bytes of the command's stderr kept for the reason of a refusal.
const STDERR_KEPT: u64 = 4096;
/// Characters of its first line sent as the reason.
const REASON_CHARS: usize = 200;

/// The command and its time limit.
#[derive(Clone, Debug)]
pub struct Exec {
    /// Run with `sh -c`.
    pub command: String,
    /// Killed (with its process group) past this.
    pub timeout: Duration,
}

/// One change, as the command sees it.
pub struct Change<'a> {
    /// `put` or `delete`.
    pub kind: &'a str,
    /// The worker.
    pub worker: &'a str,
    /// Its version (the new one for a put, the removed one for a delete).
    pub version: &'a str,
    /// The new `worker.js` of a put; the removed worker directory of a delete.
    pub path: &'a Path,
    /// SHA-256 of the code (empty for a delete).
    pub checksum: &'a str,
    /// The change's revision.
    pub revision: u64,
}

impl Exec {
    /// Runs the command for `change`: `Ok` on exit 0, else the reason.
    pub async fn run(&self, change: &Change<'_>) -> Result<(), String> {
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(&self.command)
            .env("WORKERPUSH_KIND", change.kind)
            .env("WORKERPUSH_WORKER", change.worker)
            .env("WORKERPUSH_VERSION", change.version)
            .env("WORKERPUSH_PATH", change.path)
            .env("WORKERPUSH_CHECKSUM", change.checksum)
            .env("WORKERPUSH_REVISION", change.revision.to_string())
            .stdin(Stdio::null())
            // Our stdout is the event stream: the command's output goes to stderr.
            .stdout(stderr())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("--exec could not start: {e}"))?;
        let pid = child.id();
        let mut stderr_pipe = child.stderr.take();
        let waited = tokio::time::timeout(self.timeout, async {
            let mut kept = Vec::new();
            if let Some(pipe) = stderr_pipe.as_mut() {
                let _ = pipe.take(STDERR_KEPT).read_to_end(&mut kept).await;
            }
            // Whatever it writes past what is kept is drained, so that it never blocks.
            if let Some(mut pipe) = stderr_pipe {
                let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
            }
            (child.wait().await, kept)
        })
        .await;
        let (status, kept) = match waited {
            Ok(done) => done,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                return Err(format!("--exec timed out after {:?}", self.timeout));
            }
        };
        let status = status.map_err(|e| format!("--exec: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&kept);
        let first: String = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(REASON_CHARS)
            .collect();
        let how = match status.code() {
            Some(code) => format!("exited with {code}"),
            None => "was killed".to_owned(),
        };
        Err(if first.is_empty() {
            format!("--exec {how}")
        } else {
            format!("--exec {how}: {first}")
        })
    }
}

/// Our stderr, for the command's stdout; nothing if it cannot be shared.
fn stderr() -> Stdio {
    use std::os::fd::AsFd;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn change() -> Change<'static> {
        Change {
            kind: "put",
            worker: "app",
            version: "2",
            path: Path::new("/nowhere/worker.js"),
            checksum: "",
            revision: 7,
        }
    }

    fn exec(command: &str, timeout: Duration) -> Exec {
        Exec {
            command: command.to_owned(),
            timeout,
        }
    }

    #[tokio::test]
    async fn the_command_sees_the_change_and_its_exit_decides() {
        let ok = exec(
            r#"test "$WORKERPUSH_WORKER@$WORKERPUSH_VERSION $WORKERPUSH_REVISION" = "app@2 7""#,
            Duration::from_secs(10),
        );
        ok.run(&change()).await.unwrap();
        let refused = exec(
            "echo; echo 'syntax error' >&2; exit 3",
            Duration::from_secs(10),
        );
        assert_eq!(
            refused.run(&change()).await.unwrap_err(),
            "--exec exited with 3: syntax error"
        );
    }

    #[tokio::test]
    async fn a_command_past_its_time_limit_is_killed_and_refuses() {
        let started = std::time::Instant::now();
        let slow = exec("sleep 30", Duration::from_millis(200));
        let error = slow.run(&change()).await.unwrap_err();
        assert!(error.contains("timed out"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
