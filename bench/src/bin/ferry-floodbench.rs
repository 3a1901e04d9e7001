//! `ferry-floodbench`: the XDP guard under a flood. A relay in one network namespace, two
//! legitimate peers in another, joined by veth; the guard runs natively on the relay's veth.
//! One peer sends the other a steady stream of messages through the relay while raw sockets
//! in the peers' namespace (a packet socket on the veth, qdisc bypassed) flood the relay
//! from many spoofed source addresses (198.19.0.0/16), as fast as one core can send them.
//!
//! Four runs, the same traffic each time: XDP off / on, without and with the flood. Each
//! prints the legitimate session's goodput (messages delivered per second, and the share of
//! those sent) and the relay process's CPU time per second of wall time (from
//! `/proc/<pid>/stat`). The flood is a mix: a third random garbage, a third well-formed DATA
//! for sessions that do not exist, a third BIND from sources far over the handshake rate.
//!
//! Needs root (namespaces, raw sockets, XDP). Every loop is bounded by `--seconds`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use ferry_bench::cpu::cpu_ns;
use ferry_bench::udp::{Batch, packet_socket, pin_to};
use ferry_common::header::{BIND_BODY_LEN, PacketType};
use ferry_relay::xdp::flood;
use ferry_relay::xdp::frame::{Frame, datagram};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::sum_metric;
use ferry_testkit::netns::{Topology, in_ns, link_info};
use ferry_testkit::peers::connected_pair;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ring::rand::{SecureRandom, SystemRandom};

/// The XDP guard under a spoofed-source flood: goodput and relay CPU, XDP on and off.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Messages per second the legitimate peer sends.
    #[arg(long, default_value_t = 2000)]
    legit_rate: u32,
    /// Bytes per legitimate message (plaintext).
    #[arg(long, default_value_t = 1000)]
    payload: usize,
    /// Distinct spoofed source addresses in the flood.
    #[arg(long, default_value_t = 1024)]
    sources: u32,
    /// CPU the relay's worker is pinned to.
    #[arg(long, default_value_t = 1)]
    relay_cpu: usize,
    /// CPUs the flood senders are pinned to, one sender each (e.g. `0,1`).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    flood_cpus: Vec<usize>,
    /// How to generate the flood: `packet` (a packet socket with sendmmsg, about 600,000
    /// frames a second here) or `xdp` (an XDP program run in BPF_PROG_TEST_RUN live-frames
    /// mode on the peers' veth, twice that, but it holds its CPU for long stretches, which
    /// starves the legitimate peers on a 2-core machine).
    #[arg(long, value_enum, default_value_t = Generator::Packet)]
    generator: Generator,
    /// Directory with the release binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const PORT: u16 = 7000;

/// The flood generators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Generator {
    /// An XDP program in live-frames mode.
    Xdp,
    /// A packet socket.
    Packet,
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    sent: u64,
    delivered: u64,
    secs: f64,
    relay_cpu: f64,
    flood_sent: u64,
    xdp_dropped: u64,
    relay_rx: u64,
}

/// An Ethernet frame from `src_mac` to `dst_mac` carrying IPv4/UDP from `src` to `dst`, with
/// the IPv4 header checksum filled in (a packet socket sends frames as they are, and the
/// kernel drops IPv4 with a bad checksum before UDP would see it).
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Frame::udp(IpAddr::V4(*src.ip()), IpAddr::V4(*dst.ip()), dst.port());
    f.src_port = src.port();
    let mut bytes = f.build(payload);
    bytes[..6].copy_from_slice(&dst_mac);
    bytes[6..12].copy_from_slice(&src_mac);
    let sum: u32 = bytes[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    bytes[24..26].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    bytes
}

/// The flood's frames: `n` of them cycling garbage, DATA for unknown sessions and BIND, from
/// `sources` spoofed addresses in 198.19.0.0/16, addressed to the relay's MAC `dst_mac`.
fn flood_frames(
    n: usize,
    sources: u32,
    relay: SocketAddrV4,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let rng = SystemRandom::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = [0u8; 16];
        rng.fill(&mut r)
            .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
        let host = u32::from_be_bytes([r[0], r[1], r[2], r[3]]) % sources.max(1);
        let src = SocketAddrV4::new(
            Ipv4Addr::new(198, 19, (host >> 8) as u8, host as u8),
            1024 + (host as u16 % 50_000),
        );
        let session = u64::from_be_bytes([r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11]]) | 1;
        let payload = match i % 3 {
            0 => {
                let mut garbage = vec![0u8; 64 + usize::from(r[12]) * 4];
                rng.fill(&mut garbage)
                    .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
                garbage
            }
            1 => datagram(PacketType::Data, session, 1000),
            _ => datagram(PacketType::Bind, session, BIND_BODY_LEN),
        };
        out.push(frame(src_mac, dst_mac, src, relay, &payload));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run(
    cli: &Cli,
    bin: &Path,
    ns: &Topology,
    xdp: bool,
    flood: bool,
    packets: &[Vec<u8>],
) -> anyhow::Result<Run> {
    let listen = SocketAddr::new(ns.relay_v4().into(), PORT);
    let xdp_section = if xdp {
        format!(
            "[xdp]\nmode = \"native\"\ninterfaces = [\"{}\"]\n",
            ns.relay_if
        )
    } else {
        "[xdp]\nmode = \"off\"\n".to_string()
    };
    let auth = Authority::new()?;
    let config = RelayConfig {
        listen: vec![listen],
        admin: "127.0.0.1:9477".parse()?,
        relay_extra: format!("cpus = [{}]", cli.relay_cpu),
        sections: format!(
            "{xdp_section}\n[limits]\ndefault_session_rate = 1000000000\n\
             max_session_rate = 1000000000\n\n[log]\nlevel = \"error\"\n"
        ),
        netns: Some(ns.relay_ns.clone()),
        log_to_file: false,
        ..RelayConfig::loopback(vec![auth.gateway_key()])?
    };
    let relay = RelayProcess::start(bin, &auth.relay_key, &config)?;
    let peer_socket = |host: u8| ns.peer_socket(SocketAddr::new(ns.peer_v4(host).into(), 0));
    let (mut a, mut b) = connected_pair(&auth, relay.listen, peer_socket(2)?, peer_socket(3)?)?;
    let (peers_index, _) = link_info(&ns.peers_ns, &ns.peers_if)?;
    // Three templates for the XDP generator, which varies only the source address.
    let templates: Vec<Vec<u8>> = packets.iter().take(3).cloned().collect();
    let raw = in_ns(&ns.peers_ns, || packet_socket(peers_index))?
        .context("a packet socket on the peers' veth")?;

    let before = relay.metrics();
    let cpu_before = cpu_ns(relay.pid())? as f64 / 1e9;
    let started = Instant::now();
    let duration = Duration::from_secs_f64(cli.seconds);
    let message = vec![0x5au8; cli.payload];
    let expected = (cli.seconds * f64::from(cli.legit_rate)) as u64;
    let (sent, delivered, flood_sent) = std::thread::scope(|s| -> anyhow::Result<_> {
        let flooders: Vec<_> = cli
            .flood_cpus
            .iter()
            .enumerate()
            .filter(|_| flood)
            .map(|(k, &cpu)| {
                let raw = &raw;
                let templates = &templates;
                let peers_ns = ns.peers_ns.as_str();
                s.spawn(move || -> u64 {
                    match cli.generator {
                        Generator::Xdp => {
                            // Each template in turn, 65,536 frames a call: each call sets up a
                            // page pool, so smaller calls generate far less (2,048 a call: about
                            // 80,000 frames a second).
                            in_ns(peers_ns, || {
                                let _ = pin_to(cpu);
                                let Ok(generator) = flood::Generator::load(cli.sources) else {
                                    return 0;
                                };
                                let mut sent = 0;
                                let mut next = k;
                                while started.elapsed() < duration {
                                    let template = &templates[next % templates.len()];
                                    next += 1;
                                    let slice = Duration::from_millis(1);
                                    match generator.run(template, peers_index, 65_536, slice) {
                                        Ok(n) => sent += n,
                                        Err(_) => break,
                                    }
                                }
                                sent
                            })
                            .unwrap_or(0)
                        }
                        Generator::Packet => {
                            let _ = pin_to(cpu);
                            let mut batch = Batch::new(64);
                            let mut sent = 0u64;
                            let mut next = k * 997;
                            while started.elapsed() < duration {
                                for slot in 0..batch.len() {
                                    let frame = &packets[next % packets.len()];
                                    batch.fill_slot_unaddressed(slot, frame);
                                    next += 1;
                                }
                                if let Ok(n) = batch.send(raw, 64) {
                                    sent += n as u64;
                                }
                            }
                            sent
                        }
                    }
                })
            })
            .collect();
        let receiving = s.spawn(|| {
            let mut got = 0u64;
            let deadline = started + duration + Duration::from_secs(1);
            while got < expected && Instant::now() < deadline {
                if b.recv_message(Duration::from_millis(200)).is_ok() {
                    got += 1;
                }
            }
            got
        });
        let mut sent = 0u64;
        let interval = 1.0 / f64::from(cli.legit_rate.max(1));
        for i in 0..expected {
            let due = started + Duration::from_secs_f64(i as f64 * interval);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if a.send(&message).is_ok() {
                sent += 1;
            }
        }
        let mut flood_sent = 0;
        for flooder in flooders {
            flood_sent += flooder
                .join()
                .map_err(|_| anyhow::anyhow!("a flood thread panicked"))?;
        }
        let delivered = receiving
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
        Ok((sent, delivered, flood_sent))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let relay_cpu = ((cpu_ns(relay.pid())? as f64 / 1e9) - cpu_before) / secs;
    let after = relay.metrics();
    let delta = |prefix: &str| sum_metric(&after, prefix) - sum_metric(&before, prefix);
    Ok(Run {
        sent,
        delivered,
        secs,
        relay_cpu,
        flood_sent,
        xdp_dropped: delta("ferry_xdp_packets_total{action=\"drop\""),
        relay_rx: delta("ferry_worker_rx_packets_total"),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary's directory")?
            .to_path_buf(),
    };
    let bin = bin_dir.join("ferry-relay");
    ensure!(
        bin.exists(),
        "{} not found: cargo build --release -p ferry-relay",
        bin.display()
    );
    let ns = Topology::new().context("creating namespaces (needs root)")?;
    // The spoofed flood sources: reverse-path filtering keeps them, replies go nowhere harmful.
    ns.route_via_peers("198.19.0.0/16")?;
    if cli.generator == Generator::Xdp {
        // XDP_TX into a veth needs the receiving end's NAPI, which the guard brings when it is
        // attached; GRO brings it when the guard is off.
        let status = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.relay_ns,
                "ethtool",
                "-K",
                &ns.relay_if,
                "gro",
                "on",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running ethtool (Debian package ethtool)")?;
        ensure!(status.success(), "ethtool -K {} gro on failed", ns.relay_if);
    }
    let relay = SocketAddrV4::new(ns.relay_v4(), PORT);
    let (_, relay_mac) = link_info(&ns.relay_ns, &ns.relay_if)?;
    let (_, peers_mac) = link_info(&ns.peers_ns, &ns.peers_if)?;
    let packets = flood_frames(4096, cli.sources, relay, peers_mac, relay_mac)?;
    println!(
        "ferry-floodbench: {} s per run; legitimate session {} msg/s of {} B; flood from {} \
         spoofed sources (garbage, DATA for unknown sessions, BIND), senders on CPUs {:?}; relay \
         worker on CPU {}",
        cli.seconds, cli.legit_rate, cli.payload, cli.sources, cli.flood_cpus, cli.relay_cpu
    );
    println!(
        "{:<6} {:<6} {:>8} {:>12} {:>10} {:>10} {:>11} {:>11} {:>11}",
        "xdp",
        "flood",
        "sent/s",
        "goodput/s",
        "delivered",
        "relay CPU",
        "flood pps",
        "XDP drop/s",
        "relay rx/s"
    );
    let mut results = Vec::new();
    for xdp in [false, true] {
        for flood in [false, true] {
            let r = run(&cli, &bin, &ns, xdp, flood, &packets)?;
            println!(
                "{:<6} {:<6} {:>8.0} {:>12.0} {:>9.1}% {:>9.1}% {:>11.0} {:>11.0} {:>11.0}",
                if xdp { "on" } else { "off" },
                if flood { "yes" } else { "no" },
                r.sent as f64 / r.secs,
                r.delivered as f64 / r.secs,
                100.0 * r.delivered as f64 / r.sent.max(1) as f64,
                100.0 * r.relay_cpu,
                r.flood_sent as f64 / r.secs,
                r.xdp_dropped as f64 / r.secs,
                r.relay_rx as f64 / r.secs,
            );
            results.push(((xdp, flood), r));
        }
    }
    let get = |xdp: bool, flood: bool| {
        results
            .iter()
            .find(|(k, _)| *k == (xdp, flood))
            .map(|(_, r)| *r)
    };
    if let (Some(quiet), Some(flooded), Some(off_flooded)) =
        (get(true, false), get(true, true), get(false, true))
    {
        let goodput = |r: &Run| r.delivered as f64 / r.secs;
        println!(
            "with XDP on, the flood leaves {:.1}% of the no-flood goodput (goal >= 95%) and costs \
             the relay {:.1}% of a core (goal < 5%); with XDP off: {:.1}% and {:.1}%",
            100.0 * goodput(&flooded) / goodput(&quiet).max(1e-9),
            100.0 * (flooded.relay_cpu - quiet.relay_cpu).max(0.0),
            100.0 * goodput(&off_flooded) / goodput(&quiet).max(1e-9),
            100.0 * (off_flooded.relay_cpu - quiet.relay_cpu).max(0.0),
        );
    }
    let starved = results
        .iter()
        .any(|(_, r)| (r.sent as f64) < 0.95 * cli.seconds * f64::from(cli.legit_rate));
    if starved {
        println!(
            "note: the legitimate sender could not keep its {} msg/s in some runs (sent/s): the \
             flood senders took its CPU. That is this machine running out of cores, not the relay \
             losing messages (see `delivered`); give the flood fewer CPUs.",
            cli.legit_rate
        );
    }
    Ok(())
}
