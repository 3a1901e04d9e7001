//! `ferry-fwdbench`: forwarded packets per second through the Ferry relay and through the
//! plain `recvmmsg`/`sendmmsg` forwarder (`ferry-plainfwd`, batch 64, no logic), measured in
//! the same run on the same topology, with the same generator and sink.
//!
//! Topology (loopback): generator and sink threads pinned to one CPU, the forwarder process
//! pinned to another. For Ferry, the generator's socket is bound to slot A of a session and the
//! sink's to slot B, with real tokens; the generator then sends DATA datagrams. Besides
//! packets per second at the sink, it reports the forwarder's CPU time per forwarded packet
//! (from /proc), which stays meaningful when the generator, not the forwarder, is the limit.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferry_bench::cpu::cpu_ns;
use ferry_bench::udp::{Batch, pin_to, socket};
use ferry_core::proof::SlotKeys;
use ferry_core::token::MintedToken;
use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, Slot};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::relay::{RelayConfig, RelayProcess};

/// Ferry's relay against a plain batched forwarder, same run, same topology.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Seconds measured per forwarder and size (after a 1 s warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    seconds: u64,
    /// DATA payload sizes to test.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 1200])]
    sizes: Vec<usize>,
    /// CPU for the generator and the sink.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// CPU for the forwarder under test.
    #[arg(long, default_value_t = 1)]
    forwarder_cpu: usize,
    /// Alternating plain/Ferry rounds per size; the median ratio is printed. The machine is
    /// shared and noisy, so a ratio over interleaved rounds holds where one run does not.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    rounds: u16,
    /// Offered load in datagrams per second (0 = as fast as the generator can). A rate both
    /// forwarders sustain without loss makes CPU time per packet the comparable figure.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Run the relay with SEND_ZC for forwards of at least this many bytes
    /// (`relay.send_zc_min_bytes`; 0 = off).
    #[arg(long, default_value_t = 0)]
    zc_min: u64,
    /// Run the relay with UDP GSO off (`relay.udp_gso = false`).
    #[arg(long)]
    no_gso: bool,
    /// Where ferry-relay and ferry-plainfwd are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// What one measurement saw.
#[derive(Clone, Copy, Debug)]
struct Run {
    offered_pps: f64,
    received_pps: f64,
    cpu_ns_per_packet: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this program")?
            .to_owned(),
    };
    println!(
        "ferry-fwdbench: loopback, generator+sink on CPU {}, forwarder on CPU {}, {} s per run, offered {}",
        cli.load_cpu,
        cli.forwarder_cpu,
        cli.seconds,
        match cli.rate {
            0 => "as fast as possible".to_string(),
            r => format!("{r} pps"),
        }
    );
    println!(
        "{:>7} | {:>12} {:>10} | {:>12} {:>10} | {:>7} {:>7}",
        "payload", "plain pps", "ns/pkt", "ferry pps", "ns/pkt", "pps x", "cpu x"
    );
    for &size in &cli.sizes {
        if !(1..=wire::MAX_DATA_BODY).contains(&size) {
            bail!("payload size {size} is outside 1..={}", wire::MAX_DATA_BODY);
        }
        let (mut pps_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
        for _ in 0..cli.rounds {
            let plain = run_plain(&cli, &bin_dir, size)?;
            let ferry = run_ferry(&cli, &bin_dir, size)?;
            if plain.received_pps < 1.0 || ferry.received_pps < 1.0 {
                // A forwarder that delivered nothing did not run (a port taken, a process
                // starved): that round measures the machine, not the forwarders.
                println!(
                    "{size:>6}B | round discarded: plain {:.0} pps, ferry {:.0} pps",
                    plain.received_pps, ferry.received_pps
                );
                continue;
            }
            let pps_x = ferry.received_pps / plain.received_pps;
            let cpu_x = plain.cpu_ns_per_packet / ferry.cpu_ns_per_packet;
            pps_ratios.push(pps_x);
            cpu_ratios.push(cpu_x);
            println!(
                "{:>6}B | {:>12.0} {:>10.0} | {:>12.0} {:>10.0} | {:>6.3}x {:>6.3}x",
                size,
                plain.received_pps,
                plain.cpu_ns_per_packet,
                ferry.received_pps,
                ferry.cpu_ns_per_packet,
                pps_x,
                cpu_x,
            );
            println!(
                "{:>7}   offered: plain {:.0} pps, ferry {:.0} pps",
                "", plain.offered_pps, ferry.offered_pps
            );
        }
        if pps_ratios.len() > 1 {
            println!(
                "{:>6}B   median of {} rounds: pps x {:.3} (min {:.3}, max {:.3}), cpu x {:.3} (min {:.3}, max {:.3})",
                size,
                pps_ratios.len(),
                median(&mut pps_ratios),
                pps_ratios[0],
                pps_ratios[pps_ratios.len() - 1],
                median(&mut cpu_ratios),
                cpu_ratios[0],
                cpu_ratios[cpu_ratios.len() - 1],
            );
        }
    }
    println!(
        "pps x = Ferry's forwarded rate / plain; cpu x = plain CPU per packet / Ferry's (>1: Ferry cheaper)"
    );
    Ok(())
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Blasts `datagram` from `generator` to `target` and counts what arrives at `sink`, measuring the
/// forwarder process `pid`'s CPU over the same window.
fn measure(
    cli: &Cli,
    generator: UdpSocket,
    sink: UdpSocket,
    target: SocketAddr,
    datagram: &[u8],
    pid: u32,
) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let load_cpu = cli.load_cpu;
    let sink_thread = {
        let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
        std::thread::spawn(move || {
            let _ = pin_to(load_cpu);
            let mut batch = Batch::new(64);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = batch.recv(&sink) {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let gen_thread = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let datagram = datagram.to_vec();
        let rate = cli.rate;
        std::thread::spawn(move || {
            let _ = pin_to(load_cpu);
            let mut batch = Batch::new(16);
            batch.fill(&datagram, target);
            let started = Instant::now();
            let mut total = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Paced: stay on the line `rate × elapsed`, in batches of 16.
                if rate > 0 {
                    let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    if total >= due {
                        std::thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                }
                if let Ok(n) = batch.send(&generator, 16) {
                    total += n as u64;
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let (s0, r0, c0, t0) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        cpu_ns(pid)?,
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(cli.seconds));
    let (s1, r1, c1, t1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        cpu_ns(pid)?,
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = gen_thread.join();
    let _ = sink_thread.join();
    let secs = (t1 - t0).as_secs_f64();
    let forwarded = (r1 - r0).max(1);
    Ok(Run {
        offered_pps: (s1 - s0) as f64 / secs,
        received_pps: (r1 - r0) as f64 / secs,
        cpu_ns_per_packet: (c1 - c0) as f64 / forwarded as f64,
    })
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SIGTERM first so the relay shuts down cleanly; then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn payload_datagram(session: u64, size: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = wire::encode_data(&mut buf, session, &vec![0xa5u8; size])?;
    buf.truncate(n);
    Ok(buf)
}

fn run_plain(cli: &Cli, bin_dir: &Path, size: usize) -> anyhow::Result<Run> {
    let port = ferry_testkit::free_port(Ipv4Addr::LOCALHOST.into())?;
    let sink = socket("127.0.0.1:0".parse()?)?;
    let generator = socket("127.0.0.1:0".parse()?)?;
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let child = Command::new(bin_dir.join("ferry-plainfwd"))
        .args(["--listen", &listen.to_string()])
        .args(["--to", &sink.local_addr()?.to_string()])
        .args(["--seconds", &(cli.seconds + 3).to_string()])
        .args(["--cpu", &cli.forwarder_cpu.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting ferry-plainfwd (build it: cargo build --release -p ferry-bench)")?;
    let child = Reaped(child);
    std::thread::sleep(Duration::from_millis(300));
    measure(
        cli,
        generator,
        sink,
        listen,
        &payload_datagram(1, size)?,
        child.0.id(),
    )
}

fn run_ferry(cli: &Cli, bin_dir: &Path, size: usize) -> anyhow::Result<Run> {
    let auth = Authority::new()?;
    let config = RelayConfig {
        relay_extra: format!(
            "cpus = [{}]\nudp_gso = {}\nsend_zc_min_bytes = {}",
            cli.forwarder_cpu, !cli.no_gso, cli.zc_min
        ),
        sections: "[xdp]\nmode = \"off\"\n\n\
                   [limits]\ndefault_session_rate = 100000000000\nmax_session_rate = 100000000000\n\n\
                   [log]\nlevel = \"warn\"\n"
            .into(),
        log_to_file: false,
        ..RelayConfig::loopback(vec![auth.gateway_key()])?
    };
    let relay = RelayProcess::start(&bin_dir.join("ferry-relay"), &auth.relay_key, &config)?;
    let listen = relay.listen;
    let rng = ring::rand::SystemRandom::new();
    let session = u64::from_be_bytes(rand8(&rng)?).max(1);
    let generator = socket("127.0.0.1:0".parse()?)?;
    let sink = socket("127.0.0.1:0".parse()?)?;
    for (sock, slot) in [(&generator, Slot::A), (&sink, Slot::B)] {
        bind(sock, listen, &auth.mint(session, slot, 600)?)?;
    }
    let run = measure(
        cli,
        generator,
        sink,
        listen,
        &payload_datagram(session, size)?,
        relay.pid(),
    );
    // Where packets went, from the relay's own counters (the non-zero ones).
    let page = relay.metrics();
    let counters: Vec<&str> = page
        .lines()
        .filter(|l| {
            [
                "ferry_drops_total",
                "ferry_worker_rx_no_buffers",
                "ferry_worker_tx_errors",
                "ferry_worker_tx_slots_full",
                "ferry_worker_gso_sends",
                "ferry_worker_rx_packets",
                "ferry_worker_tx_packets",
            ]
            .iter()
            .any(|p| l.starts_with(p))
                && !l.ends_with(" 0")
        })
        .collect();
    println!("          relay counters: {}", counters.join(", "));
    run
}

fn rand8(rng: &dyn ring::rand::SecureRandom) -> anyhow::Result<[u8; 8]> {
    let mut b = [0u8; 8];
    rng.fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(b)
}

/// BIND, CHALLENGE, BIND, BIND-ACK from `sock`.
fn bind(sock: &UdpSocket, relay: SocketAddr, token: &MintedToken) -> anyhow::Result<()> {
    let keys = SlotKeys::derive(&token.slot_secret);
    let slot = token.claims.slot;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (mut out, mut inbuf) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut cookie = [0u8; 16];
    for seq in 1..=3u64 {
        let fields = BindFields {
            slot,
            bind_seq: seq,
            cookie,
            token: &token.bytes,
        };
        let n = wire::encode_bind(&mut out, token.claims.session_id, &fields, |m| {
            keys.peer.mac(m)
        })?;
        sock.send_to(&out[..n], relay)?;
        let (len, _) = sock.recv_from(&mut inbuf).context("no answer to BIND")?;
        match wire::parse(&inbuf[..len]) {
            Ok(Packet::Challenge(c)) => cookie = *c.cookie(),
            Ok(Packet::BindAck(_)) => return Ok(()),
            Ok(Packet::Reject(r)) => bail!("BIND rejected: {}", r.reason().name()),
            _ => bail!("unexpected answer to BIND"),
        }
    }
    bail!("BIND did not complete")
}
