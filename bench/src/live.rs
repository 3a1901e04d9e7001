//! The live demo: the real `ferry-relay` process (io_uring workers) on loopback with a config
//! generated on the spot, and two peers over real UDP sockets that bind with gateway tokens,
//! run the Noise handshake through it and exchange encrypted messages.

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::{sample, sum_metric};
use ferry_testkit::peers::connected_pair;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ferry_testkit::skip::is_root;

/// What the live run measured.
#[derive(Clone, Debug)]
pub struct LiveReport {
    /// Messages that made the round trip A → relay → B → relay → A, authenticated both ways.
    pub round_trips: usize,
    /// Wall time of the exchange.
    pub elapsed: Duration,
    /// Datagrams the relay says it forwarded.
    pub forwarded: u64,
}

/// Runs the live demo with the relay binary at `relay_bin`.
pub fn run(relay_bin: &Path, messages: usize, payload: usize) -> anyhow::Result<LiveReport> {
    // Default limits except the per-slot budget, which the demo's back-to-back round trips
    // would exceed (1.25 MB/s by default).
    // The XDP guard needs root; as root it runs on loopback in generic mode (loopback has no
    // driver to run it natively), as it would on a NIC.
    let xdp = is_root().then_some("lo");
    let xdp_section = match xdp {
        Some(interface) => format!("[xdp]\nmode = \"generic\"\ninterfaces = [\"{interface}\"]"),
        None => "[xdp]\nmode = \"off\"".to_string(),
    };
    let auth = Authority::new()?;
    let config = || -> anyhow::Result<RelayConfig> {
        Ok(RelayConfig {
            relay_extra: "cpus = [0]".into(),
            sections: format!(
                "{xdp_section}\n\n[limits]\ndefault_session_rate = 1000000000\n\
                 max_session_rate = 1000000000\n\n[log]\nlevel = \"warn\"\n"
            ),
            log_to_file: true,
            ..RelayConfig::loopback(vec![auth.gateway_key()])?
        })
    };
    // The loopback config's ports were free when it was made; another process may take one
    // before the relay binds it. Then a fresh config, with fresh ports, is tried.
    let mut attempt = 0;
    let relay = loop {
        attempt += 1;
        match RelayProcess::start(relay_bin, &auth.relay_key, &config()?) {
            Ok(relay) => break relay,
            Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                println!("  a port of the relay's config was taken meanwhile; new ports");
            }
            Err(e) => return Err(e),
        }
    };
    println!(
        "  ferry-relay running: UDP {} (io_uring), admin http://{}, XDP guard {}",
        relay.listen,
        relay.admin,
        match xdp {
            Some(_) => "on lo (generic mode)",
            None => "off (needs root)",
        }
    );
    let (mut alice, mut bob) = connected_pair(
        &auth,
        relay.listen,
        UdpSocket::bind("127.0.0.1:0")?,
        UdpSocket::bind("127.0.0.1:0")?,
    )?;
    println!("  both peers bound (BIND, CHALLENGE, BIND, BIND-ACK over UDP)");
    println!("  Noise XX handshake done through the relay; identities pinned on both sides");

    let message = vec![0x42u8; payload];
    let started = Instant::now();
    for _ in 0..messages {
        alice.send(&message)?;
        let got = bob.recv_message(Duration::from_secs(5))?;
        ensure!(got == message, "bob got a corrupted message");
        bob.send(&got)?;
        let back = alice.recv_message(Duration::from_secs(5))?;
        ensure!(back == message, "alice got a corrupted echo");
    }
    let elapsed = started.elapsed();
    alice.close()?;
    std::thread::sleep(Duration::from_millis(100));
    let page = relay.metrics();
    let forwarded = value(&page, "ferry_forwarded_packets_total");
    println!(
        "  {messages} round trips of {payload} bytes in {:.3} s ({:.0} µs each, one message at a time)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / messages.max(1) as f64
    );
    println!(
        "  relay metrics: forwarded {forwarded}, binds accepted {}, sessions closed {}, drops {}",
        value(&page, "ferry_binds_accepted_total"),
        value(&page, "ferry_sessions_closed_total"),
        sum_metric(&page, "ferry_drops_total")
    );
    if xdp.is_some() {
        show_the_guard(&relay)?;
    }
    Ok(LiveReport {
        round_trips: messages,
        elapsed,
        forwarded,
    })
}

/// Sends the relay three datagrams that break the header rules and shows that the XDP guard
/// dropped them before the relay saw them.
fn show_the_guard(relay: &RelayProcess) -> anyhow::Result<()> {
    let before = relay.metrics();
    let stray = UdpSocket::bind("127.0.0.1:0")?;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0u8; 8],
        &[0x46, 0x52, 9, 0, 1],
    ] {
        stray.send_to(garbage, relay.listen)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = relay.metrics();
    let xdp_drops = |page: &str| sum_metric(page, "ferry_xdp_packets_total{action=\"drop\"");
    let dropped = xdp_drops(&after) - xdp_drops(&before);
    let relay_malformed = value(&after, "ferry_drops_total{reason=\"malformed\"}")
        - value(&before, "ferry_drops_total{reason=\"malformed\"}");
    ensure!(
        dropped == 3 && relay_malformed == 0,
        "the XDP guard should have dropped 3 malformed datagrams before the relay (it dropped \
         {dropped}, the relay saw {relay_malformed})"
    );
    println!(
        "  XDP guard: passed {} relay datagrams; dropped 3 malformed ones before the relay saw \
         them (too short, bad magic, bad version)",
        value(
            &after,
            "ferry_xdp_packets_total{action=\"pass\",reason=\"relay\"}"
        )
    );
    Ok(())
}

/// A sample on the page, 0 when absent (a labelled counter that never moved).
fn value(page: &str, name: &str) -> u64 {
    sample(page, name).unwrap_or(0)
}
