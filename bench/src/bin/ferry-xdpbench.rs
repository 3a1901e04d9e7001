//! `ferry-xdpbench`: nanoseconds per packet of the XDP guard, measured by the kernel with
//! `BPF_PROG_TEST_RUN` (`repeat` runs on one frame, the kernel's mean), for each path the
//! guard takes: a frame that is not relay traffic (the baseline: Ethernet, IP and UDP parsed,
//! port compared), a relay datagram passed (header check, CIDR lookup, LRU meter update), a
//! malformed drop, and rate-limited drops (data and handshake).
//!
//! Rounds are interleaved (every case once per round) and the median is printed with its ratio
//! to the baseline of the same run, so a noisy machine shifts all figures together.
//! Needs root (CAP_BPF).

use std::net::IpAddr;

use anyhow::{Context, ensure};
use clap::Parser;
use ferry_common::header::{BIND_BODY_LEN, PacketType};
use ferry_common::xdp::Rate;
use ferry_relay::xdp::frame::{self, Frame};
use ferry_relay::xdp::{Cidr, Guard, Mode, XDP_DROP, XDP_PASS, XdpSettings};

/// Nanoseconds per packet of the XDP guard, per verdict, via BPF_PROG_TEST_RUN.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Runs per measurement (the kernel reports their mean).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

const PORT: u16 = 7000;

fn settings(packets: Rate, handshake: Rate, denied: Cidr) -> XdpSettings {
    XdpSettings {
        mode: Mode::Auto,
        interfaces: Vec::new(),
        max_sources: 65_536,
        ipv6_prefix_len: 64,
        drop_all_fragments: false,
        data_packets: packets,
        data_bytes: Rate::UNLIMITED,
        handshake,
        handshake_total: Rate::UNLIMITED,
        session_filter: false,
        fast_path: false,
        answer_challenges: false,
        // A deny entry that never matches the benchmark's source: the trie lookup is real.
        deny: vec![denied],
        allow: Vec::new(),
    }
}

fn datagram(packet_type: PacketType, body_len: usize) -> Vec<u8> {
    frame::datagram(packet_type, 0x0102_0304_0506_0708, body_len)
}

struct Case {
    name: &'static str,
    guard: usize,
    frame: Vec<u8>,
    action: u32,
    samples: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let generous = Rate::new(1 << 40, 1 << 40).context("rate")?;
    let denied: Cidr = "198.19.0.0/16".parse().map_err(anyhow::Error::msg)?;
    let one = Rate::new(1, 1).context("rate")?;
    let open = Guard::load(65_536)
        .and_then(|mut g| {
            g.configure(&settings(generous, generous, denied), &[PORT])
                .map(|()| g)
        })
        .context("loading the XDP guard (needs root)")?;
    let strict = Guard::load(65_536)
        .and_then(|mut g| {
            g.configure(&settings(one, one, denied), &[PORT])
                .map(|()| g)
        })
        .context("loading the XDP guard (needs root)")?;
    let mut unlisted_settings = settings(generous, generous, denied);
    unlisted_settings.deny.clear();
    let unlisted = Guard::load(65_536)
        .and_then(|mut g| g.configure(&unlisted_settings, &[PORT]).map(|()| g))
        .context("loading the XDP guard (needs root)")?;
    let guards = [&open, &strict, &unlisted];

    let src: IpAddr = "198.18.0.2".parse()?;
    let dst: IpAddr = "198.18.0.1".parse()?;
    let relay = |payload: &[u8]| Frame::udp(src, dst, PORT).build(payload);
    let mut bad_magic = datagram(PacketType::Data, 1184);
    bad_magic[0] = 0;
    let mut cases = [
        Case {
            name: "not relay traffic (UDP to another port): baseline",
            guard: 0,
            frame: Frame::udp(src, dst, 53).build(&[0u8; 1200]),
            action: XDP_PASS,
            samples: Vec::new(),
        },
        Case {
            name: "relay DATA passed (1200 B, metered)",
            guard: 0,
            frame: relay(&datagram(PacketType::Data, 1184)),
            action: XDP_PASS,
            samples: Vec::new(),
        },
        Case {
            name: "relay DATA passed, empty deny/allow lists",
            guard: 2,
            frame: relay(&datagram(PacketType::Data, 1184)),
            action: XDP_PASS,
            samples: Vec::new(),
        },
        Case {
            name: "malformed drop (bad magic)",
            guard: 0,
            frame: relay(&bad_magic),
            action: XDP_DROP,
            samples: Vec::new(),
        },
        Case {
            name: "rate-limited drop (DATA over the packet rate)",
            guard: 1,
            frame: relay(&datagram(PacketType::Data, 1184)),
            action: XDP_DROP,
            samples: Vec::new(),
        },
        Case {
            name: "rate-limited drop (BIND over the handshake rate)",
            guard: 1,
            frame: relay(&datagram(PacketType::Bind, BIND_BODY_LEN)),
            action: XDP_DROP,
            samples: Vec::new(),
        },
    ];
    // Spend the strict guard's one-packet bursts, so every measured run is a drop.
    for case in cases.iter().filter(|c| c.guard == 1) {
        strict.test_run(&case.frame, 2)?;
    }
    println!(
        "ferry-xdpbench: BPF_PROG_TEST_RUN, {} runs per measurement, {} interleaved rounds",
        cli.repeat, cli.rounds
    );
    for _ in 0..cli.rounds {
        for case in cases.iter_mut() {
            let outcome = guards[case.guard].test_run(&case.frame, cli.repeat)?;
            ensure!(
                outcome.action == case.action,
                "{}: the guard returned {} (expected {})",
                case.name,
                outcome.action,
                case.action
            );
            case.samples.push(outcome.per_run.as_nanos() as f64);
        }
    }
    let median = |samples: &mut Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    let baseline = median(&mut cases[0].samples.clone());
    println!("{:<52} {:>10} {:>12}", "path", "ns/packet", "vs baseline");
    for case in cases.iter_mut() {
        let m = median(&mut case.samples);
        println!(
            "{:<52} {:>10.1} {:>11.2}x",
            case.name,
            m,
            m / baseline.max(0.1)
        );
    }
    Ok(())
}
