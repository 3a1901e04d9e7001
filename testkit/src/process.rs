//! Signalling and stopping child processes (relays, gateways, peers, forwarders) the way a
//! service manager does: a named signal to that one process, and a stop that sends SIGTERM so
//! it can shut down cleanly, then SIGKILL once a grace period has passed.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Sends `signal` (a name such as `HUP`, `INT` or `TERM`) to `child`'s process only.
pub fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid}: {status}");
    }
    Ok(())
}

/// Stops `child`: SIGTERM, then SIGKILL if it still runs after `grace`. Returns how it ended
/// (`None` only if it cannot be waited for, e.g. it was already reaped).
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    // A process that already exited cannot take the signal; its status is still collected.
    let _ = signal(child, "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn a_process_that_honours_sigterm_ends_by_it() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawning sleep");
        let status = terminate(&mut child, Duration::from_secs(5)).expect("an exit status");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        // The shell ignores TERM, says so, and the sleep it execs into inherits that.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 30"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning sh");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("the shell's stdout"))
            .read_line(&mut ready)
            .expect("reading the shell's stdout");
        assert_eq!(ready, "ready\n");
        let status = terminate(&mut child, Duration::from_millis(300)).expect("an exit status");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn signalling_a_reaped_process_is_an_error() {
        let mut child = Command::new("true").spawn().expect("spawning true");
        child.wait().expect("waiting for true");
        assert!(signal(&child, "HUP").is_err());
    }
}
