//! Where the XDP program's time goes: `BPF_PROG_TEST_RUN` on crafted frames that leave the
//! program at successive stages (not relay traffic, an unknown session, the guard alone on
//! DATA, the fast path's fallbacks after each of its lookups, and forwarded frames), as if they
//! arrived on a veth in a namespace with real routes and neighbours, at 64 and 1200 B
//! payloads. Prints, per stage, the minimum and the median of 15 batch means (the kernel's
//! clock, caches warm; every figure includes the test run's own clock reads, which the first
//! line is almost entirely). docs/bench.md quotes it.
//!
//! `sudo cargo run --release -p ferry-relay --example fast_profile [RUNS]` (default 60,000
//! runs per stage). Needs root: namespaces and the XDP program.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use ferry_common::header::{KEEPALIVE_BODY_LEN, PacketType};
use ferry_common::xdp::Rate;
use ferry_relay::session::{SessionEvent, SlotBudget};
use ferry_relay::shards::SessionObserver;
use ferry_relay::xdp::frame::{self, Frame};
use ferry_relay::xdp::{Guard, Mode, SessionFilter, XdpSettings};
use ferry_testkit::netns::{Topology, in_ns, link_info};

const PORT: u16 = 7000;
const SID: u64 = 0x0102_0304_0506_0708;
/// Batches per stage; the minimum and the median of their means are printed.
const BATCHES: u32 = 15;

fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("ip -n {ns} {}", args.join(" "));
    }
    Ok(())
}

/// A frame from `from` to the relay at `relay`:PORT carrying `datagram`, with a full UDP
/// checksum.
fn frame_to_relay(from: SocketAddr, relay: IpAddr, datagram: &[u8]) -> Vec<u8> {
    let mut f = Frame::udp(from.ip(), relay, PORT);
    f.src_port = from.port();
    let mut bytes = f.build(datagram);
    let (udp, mut sum) = match (from.ip(), relay) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 17]);
            p.extend_from_slice(&((8 + datagram.len()) as u16).to_be_bytes());
            (34, p)
        }
        (s, d) => {
            let mut p = Vec::new();
            for a in [s, d] {
                if let IpAddr::V6(a) = a {
                    p.extend_from_slice(&a.octets());
                }
            }
            p.extend_from_slice(&((8 + datagram.len()) as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 17]);
            (54, p)
        }
    };
    sum.extend_from_slice(&bytes[udp..]);
    if sum.len() % 2 == 1 {
        sum.push(0);
    }
    let mut s: u32 = sum
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    let check = match !(s as u16) {
        0 => 0xffff,
        c => c,
    };
    bytes[udp + 6..udp + 8].copy_from_slice(&check.to_be_bytes());
    bytes
}

fn bind(filter: &SessionFilter, a: Option<SocketAddr>, b: Option<SocketAddr>) {
    filter.session_event(SessionEvent::Bound {
        session: SID,
        slots: [a, b],
        locals: [None, None],
        budgets: [a, b].map(|slot| {
            slot.map(|_| SlotBudget {
                rate: 100_000_000_000,
                set_at: Instant::now(),
                fresh: true,
                previous_rate: 100_000_000_000,
            })
        }),
    });
}

fn main() -> anyhow::Result<()> {
    let runs: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("RUNS must be a number")?,
        None => 60_000,
    };
    let topo = Topology::new().context("setting up the namespaces (needs root)")?;
    let ns = topo.relay_ns.clone();
    // A second interface in the relay's namespace, for redirects.
    let pid = std::process::id();
    let (xa, xb) = (format!("fx{pid}a"), format!("fx{pid}b"));
    ip(
        &ns,
        &["link", "add", &xa, "type", "veth", "peer", "name", &xb],
    )?;
    ip(&ns, &["addr", "add", "198.19.77.1/24", "dev", &xa])?;
    ip(&ns, &["link", "set", &xa, "up"])?;
    ip(&ns, &["link", "set", &xb, "up"])?;
    // The fast path sends out of a veth only if the veth's peer takes XDP frames: GRO on.
    for (space, dev) in [
        (ns.as_str(), xb.as_str()),
        (topo.peers_ns.as_str(), &topo.peers_if),
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", space, "ethtool", "-K", dev, "gro", "on"])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("turning GRO on for {dev}");
        }
    }
    let mut neighbours = Vec::new();
    for host in [2, 3] {
        neighbours.push((topo.peer_v4(host).to_string(), topo.relay_if.clone()));
        neighbours.push((topo.peer_v6(host).to_string(), topo.relay_if.clone()));
    }
    neighbours.push(("198.19.77.3".to_string(), xa.clone()));
    for (addr, dev) in &neighbours {
        ip(
            &ns,
            &[
                "neigh",
                "replace",
                addr,
                "lladdr",
                "02:bb:00:00:00:03",
                "dev",
                dev,
                "nud",
                "permanent",
            ],
        )?;
    }
    for dev in [&topo.relay_if, &xa] {
        for family in ["ipv4", "ipv6"] {
            let status = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .arg(format!("net.{family}.conf.{dev}.forwarding=1"))
                .status()?;
            if !status.success() {
                bail!("turning {family} forwarding on for {dev}");
            }
        }
    }
    let (ifindex, _) = link_info(&ns, &topo.relay_if)?;
    let unlimited = Rate::new(1 << 40, 1 << 40).context("rate")?;
    let mut settings = XdpSettings {
        mode: Mode::Native,
        interfaces: vec![topo.relay_if.clone(), xa.clone()],
        max_sources: 1024,
        ipv6_prefix_len: 64,
        drop_all_fragments: false,
        data_packets: unlimited,
        data_bytes: unlimited,
        handshake: Rate::new(1_000, 1_000).context("rate")?,
        handshake_total: Rate::new(1_000_000, 1_000_000).context("rate")?,
        session_filter: true,
        fast_path: true,
        answer_challenges: false,
        deny: Vec::new(),
        allow: Vec::new(),
    };
    let listen = [
        SocketAddr::new(IpAddr::V4(topo.relay_v4()), PORT),
        SocketAddr::new(IpAddr::V6(topo.relay_v6()), PORT),
    ];
    let (mut guard, filter) = in_ns(&ns, || -> anyhow::Result<_> {
        let mut guard = Guard::start(&settings, &[PORT])?.context("xdp.mode is off")?;
        let filter = guard.session_filter(&listen)?;
        Ok((guard, filter))
    })??;
    let relay4 = IpAddr::V4(topo.relay_v4());
    let relay6 = IpAddr::V6(topo.relay_v6());
    let a = SocketAddr::new(IpAddr::V4(topo.peer_v4(2)), 40_000);
    let b = SocketAddr::new(IpAddr::V4(topo.peer_v4(3)), 50_000);
    let a6 = SocketAddr::new(IpAddr::V6(topo.peer_v6(2)), 40_000);
    let b6 = SocketAddr::new(IpAddr::V6(topo.peer_v6(3)), 50_000);
    let time = |guard: &Guard, name: &str, frame: &[u8]| -> anyhow::Result<()> {
        let mut means = Vec::new();
        let mut action = 0;
        for _ in 0..BATCHES {
            let out = in_ns(&ns, || guard.time_on(frame, ifindex, runs / BATCHES))??;
            means.push(out.per_run.as_nanos());
            action = out.action;
        }
        means.sort_unstable();
        println!(
            "{name:<44} {:>5} B frame  action {action}  min {:>4} ns  median {:>4} ns",
            frame.len(),
            means[0],
            means[means.len() / 2]
        );
        Ok(())
    };
    for len in [64, 1200] {
        let data = frame::datagram(PacketType::Data, SID, len);
        let from_a = frame_to_relay(a, relay4, &data);
        bind(&filter, Some(a), Some(b));
        let mut other = Frame::udp(a.ip(), relay4, 9999);
        other.src_port = a.port();
        time(&guard, "not relay traffic", &other.build(&data))?;
        let unknown = frame::datagram(PacketType::Data, SID + 1, len);
        time(
            &guard,
            "DATA, unknown session (dropped)",
            &frame_to_relay(a, relay4, &unknown),
        )?;
        let keepalive = frame::datagram(PacketType::Keepalive, SID, KEEPALIVE_BODY_LEN);
        time(
            &guard,
            "KEEPALIVE from a bound slot",
            &frame_to_relay(a, relay4, &keepalive),
        )?;
        settings.fast_path = false;
        in_ns(&ns, || guard.configure(&settings, &[PORT]))??;
        time(&guard, "DATA, guard only (fast path off)", &from_a)?;
        // The same with a deny list of one entry that does not match: the trie is asked.
        settings.deny = vec!["198.19.200.0/24".parse().map_err(anyhow::Error::msg)?];
        in_ns(&ns, || guard.configure(&settings, &[PORT]))??;
        time(&guard, "DATA, guard only, a deny list of one", &from_a)?;
        settings.deny.clear();
        settings.fast_path = true;
        in_ns(&ns, || guard.configure(&settings, &[PORT]))??;
        bind(&filter, Some(a), None);
        time(&guard, "DATA, other slot unbound", &from_a)?;
        bind(&filter, Some(a), Some(b6));
        time(&guard, "DATA, mixed families (after the budget)", &from_a)?;
        let nobody = SocketAddr::new(IpAddr::V4(topo.peer_v4(5)), 50_000);
        bind(&filter, Some(a), Some(nobody));
        time(&guard, "DATA, no neighbour (FIB miss)", &from_a)?;
        bind(&filter, Some(a), Some(b));
        time(&guard, "DATA forwarded back out (redirect)", &from_a)?;
        let far: SocketAddr = "198.19.77.3:50000".parse()?;
        bind(&filter, Some(a), Some(far));
        time(&guard, "DATA forwarded, XDP_REDIRECT", &from_a)?;
        bind(&filter, Some(a6), Some(b6));
        time(
            &guard,
            "DATA forwarded back out, IPv6 (redirect)",
            &frame_to_relay(a6, relay6, &data),
        )?;
    }
    Ok(())
}
