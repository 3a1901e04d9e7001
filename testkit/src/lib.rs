//! `ferry-testkit`: what Ferry's test suites and its benchmark harness share, so each exists
//! once. Tests use it as a dev-dependency; `ferry-bench` uses it as a normal dependency,
//! because its binaries start the same relay process in the same namespaces.
//!
//! - [`skip`]: the skip policy (`#[ignore]` for tests that need root, `FERRY_REQUIRE_PRIVILEGED`).
//! - [`fixtures`]: a gateway signing key and a relay key pair that mint tokens.
//! - [`peers`]: two peers of one session, bound and through their Noise handshake.
//! - [`gateway`]: a real `ferry-gateway` process over HTTPS with a test CA, stopped on drop.
//! - [`relay`]: a real `ferry-relay` process with a generated config, stopped on drop.
//! - [`netns`]: two network namespaces joined by a veth pair, removed on drop.
//! - [`hop`]: an on-path UDP hop that impairs (loss, reordering, delay), injects and replays.
//! - [`metrics`]: samples of a Prometheus page and a minimal HTTP GET for admin listeners.
//! - [`process`]: a signal to one child process, and a stop with SIGTERM, then SIGKILL.
//!
//! Errors are `anyhow` errors, as in a binary: every caller is a test (which unwraps) or a
//! benchmark binary (which prints them).

pub mod config_fields;
pub mod fixtures;
pub mod gateway;
pub mod hop;
pub mod metrics;
pub mod monitoring;
pub mod netns;
pub mod peers;
pub mod process;
pub mod relay;
pub mod skip;

use std::io::Write as _;
use std::net::{IpAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;
pub use tempfile::TempDir;

/// Whether `e` is what a socket read with a timeout returns when nothing came in time
/// (`WouldBlock` or `TimedOut`, depending on the platform and the call).
pub fn is_read_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A fresh directory under the system's temporary directory, named `ferry-<name>-…`, removed
/// (with everything in it) when the returned value drops.
pub fn temp_dir(name: &str) -> anyhow::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("ferry-{name}-"))
        .tempdir()
        .context("creating a temporary directory")
}

/// A UDP port on `ip` that was free a moment ago.
pub fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    let socket = UdpSocket::bind((ip, 0)).with_context(|| format!("binding a port on {ip}"))?;
    Ok(socket.local_addr()?.port())
}

/// Microseconds since the Unix epoch: the start of a peer's BIND sequence numbers.
pub fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// Writes `text` to a new or truncated file at `path` that only its owner can read (mode 0600).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
