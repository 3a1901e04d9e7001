//! `ferry-testkit`: what Ferry's test suites and its benchmark harness share, so each exists
//! once. Tests use it as a dev-dependency; `ferry-bench` uses it as a normal dependency,
//! because its binaries start the same relay process in the same namespaces.
//!
//! - [`skip`]: the skip policy (`#[ignore]` for tests that need root, `FERRY_REQUIRE_PRIVILEGED`).
//! - [`fixtures`]: a gateway signing key and a relay key pair that mint tokens.
//! - [`peers`]: two peers of one session, bound and through their Noise handshake.
//! - [`gateway`]: a real `ferry-gateway` process over HTTPS with a test CA, stopped on drop.
//! - [`relay`]: a real `ferry-relay` process with a generated config, stopped on drop.
//! - [`netns`]: two network namespaces joined by a veth pair (or three in a row, the relay
//!   between two networks), removed on drop.
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
use std::net::{IpAddr, TcpListener, UdpSocket};
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

/// A port on `ip` that was free for both UDP and TCP a moment ago, for a test to give a process
/// it starts (a relay's datagram port, an admin listener's). It is taken below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), from which the kernel picks the port of
/// every `bind(0)` and outgoing connection: a port from inside it, free a moment ago, may be
/// any connection's by the time the process binds it. Tests that pick at the same moment can
/// still meet, one chance in thousands.
pub fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    const LOWEST: u16 = 10_000;
    let below = ephemeral_start().unwrap_or(32_768).saturating_sub(1);
    let rng = ring::rand::SystemRandom::new();
    if below > LOWEST + 1_000 {
        for _ in 0..256 {
            let draw: [u8; 2] = ring::rand::generate(&rng)
                .map_err(|_| anyhow::anyhow!("no random numbers"))?
                .expose();
            let port = LOWEST + u16::from_ne_bytes(draw) % (below - LOWEST);
            if port_is_free(ip, port) {
                return Ok(port);
            }
        }
    }
    // No room below the range (or every try was taken): the kernel's pick.
    for _ in 0..64 {
        let socket = UdpSocket::bind((ip, 0)).with_context(|| format!("binding a port on {ip}"))?;
        let port = socket.local_addr()?.port();
        drop(socket);
        if port_is_free(ip, port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no port on {ip} is free for both UDP and TCP")
}

/// Whether `port` on `ip` can be bound for UDP and for TCP.
fn port_is_free(ip: IpAddr, port: u16) -> bool {
    UdpSocket::bind((ip, port)).is_ok() && TcpListener::bind((ip, port)).is_ok()
}

/// The first port of the kernel's ephemeral range, in this network namespace.
fn ephemeral_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_below_the_ephemeral_range_and_bindable_for_udp_and_tcp() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let start = ephemeral_start().unwrap();
        for _ in 0..20 {
            let port = free_port(lo).unwrap();
            assert!(
                (10_000..start).contains(&port),
                "{port} (range from {start})"
            );
            let _udp = UdpSocket::bind((lo, port)).unwrap();
            let _tcp = TcpListener::bind((lo, port)).unwrap();
        }
    }
}
