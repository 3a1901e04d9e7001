//! `ferry-fwdbench`: forwarded packets per second through the Ferry relay and through the
//! plain `recvmmsg`/`sendmmsg` forwarder (`ferry-plainfwd`, batch 64, no logic), measured in
//! the same run on the same topology, with the same generator and sink.
//!
//! Topology (loopback): generator and sink threads pinned to one CPU, the forwarder process
//! pinned to another. For Ferry, the generator's socket is bound to slot A of a session and the
//! sink's to slot B, with real tokens; the generator then sends DATA datagrams. Besides
//! packets per second at the sink, it reports the forwarder's CPU time per forwarded packet
//! (from /proc), which stays meaningful when the generator, not the forwarder, is the limit.
//!
//! With `--netns`, the topology is three namespaces instead (see [`netns`]): generator →
//! relay host with two veths → sink, all in 198.18.0.0/15, and four paths in interleaved
//! rounds: the kernel forwarding between the two veths (direct), the plain forwarder, the
//! io_uring relay (`xdp.fast_path = false`), and the relay's XDP fast path. Besides the sink's
//! rate it reports busy CPU per delivered packet over all CPUs (from /proc/stat: generator,
//! sink and relay host share the machine) and, with `kernel.bpf_stats_enabled`, the XDP
//! program's own run time per run.
//!
//! With `--latency`, the generator instead sends one datagram at a time, paced to each
//! `--rate`, with the send time (monotonic clock, nanoseconds) in its last 8 bytes; the sink
//! records one-way latency into a histogram and the table gives p50/p99/p99.9/max next to CPU
//! per delivered packet, Ferry's as a ratio to the plain forwarder's in the same round. That is
//! the regime below saturation, where batching must not cost latency.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferry_bench::cpu::task_cpu_ns;
use ferry_bench::udp::{Batch, fine_timer_slack, pin_to, socket};
use ferry_core::proof::SlotKeys;
use ferry_core::token::MintedToken;
use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, Slot};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use hdrhistogram::Histogram;

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
    /// Offered loads in datagrams per second (0 = as fast as the generator can), each measured
    /// in turn. A rate both forwarders sustain without loss makes CPU time per packet the
    /// comparable figure.
    #[arg(long = "rate", value_delimiter = ',', default_values_t = vec![100_000u64])]
    rates: Vec<u64>,
    /// Measure one-way latency instead of throughput: one timestamped datagram at a time, paced
    /// to each `--rate` (which must then be above 0), percentiles at the sink.
    #[arg(long)]
    latency: bool,
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
    /// The three-namespace topology (needs root): direct path, plain forwarder, io_uring
    /// relay and XDP fast path, interleaved.
    #[arg(long)]
    netns: bool,
}

/// What one measurement saw.
#[derive(Clone, Copy, Debug)]
struct Run {
    offered_pps: f64,
    received_pps: f64,
    cpu_ns_per_packet: f64,
    /// One-way latency percentiles (`--latency` only).
    latency: Option<Latency>,
    /// The relay's io_uring submits per datagram it received (Ferry only).
    submits_per_datagram: Option<f64>,
    /// Busy CPU time of all CPUs per delivered packet, ns (/proc/stat).
    host_ns_per_packet: f64,
    /// The XDP programs' run time per run in the measured process, ns, when
    /// `kernel.bpf_stats_enabled` is on and it holds one.
    xdp_ns_per_run: Option<f64>,
}

/// One-way latency at the sink, in microseconds.
#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// How the generator offers load in one measurement.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Datagrams per second; 0: as fast as possible.
    rate: u64,
    /// One timestamped datagram at a time, latency recorded at the sink.
    latency: bool,
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
    if cli.netns {
        return netns::table(&cli, &bin_dir);
    }
    if cli.latency {
        if cli.rates.contains(&0) {
            bail!("--latency needs a rate above 0 (one datagram at a time, paced)");
        }
        if let Some(&size) = cli.sizes.iter().find(|&&s| s < 8) {
            bail!("--latency needs payloads of at least 8 bytes for the timestamp, not {size}");
        }
    }
    println!(
        "ferry-fwdbench: loopback, generator+sink on CPU {}, forwarder on CPU {}, {} s per run, {}",
        cli.load_cpu,
        cli.forwarder_cpu,
        cli.seconds,
        match cli.latency {
            true => "latency (one datagram at a time, paced)",
            false => "throughput",
        }
    );
    for &rate in &cli.rates {
        let load = Load {
            rate,
            latency: cli.latency,
        };
        match cli.latency {
            true => latency_table(&cli, &bin_dir, load)?,
            false => throughput_table(&cli, &bin_dir, load)?,
        }
    }
    match cli.latency {
        true => println!(
            "latency in µs at the sink; ns/pkt: forwarder CPU per delivered packet; \
             subm/dgram: Ferry's io_uring submits per datagram received; \
             x: Ferry's figure / plain's in the same round (medians over rounds; <1: Ferry better)"
        ),
        false => println!(
            "pps x = Ferry's forwarded rate / plain; cpu x = plain CPU per packet / Ferry's (>1: Ferry cheaper)"
        ),
    }
    Ok(())
}

/// Forwarded packets per second and CPU per packet at `load`, Ferry against plain.
fn throughput_table(cli: &Cli, bin_dir: &Path, load: Load) -> anyhow::Result<()> {
    println!(
        "offered {}",
        match load.rate {
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
            let plain = run_plain(cli, bin_dir, size, load)?;
            let ferry = run_ferry(cli, bin_dir, size, load)?;
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
    Ok(())
}

/// One-way latency and CPU per packet at `load`, Ferry against plain, one line per round and
/// the medians.
fn latency_table(cli: &Cli, bin_dir: &Path, load: Load) -> anyhow::Result<()> {
    println!(
        "{:>7} {:>6} | {:<31} {:>6} | {:<31} {:>6} {:>5} | {:>5} {:>5} {:>5} {:>5}",
        "rate",
        "size",
        "plain p50/p99/p99.9/max µs",
        "ns/pkt",
        "ferry p50/p99/p99.9/max µs",
        "ns/pkt",
        "subm",
        "p50 x",
        "p99 x",
        "p999x",
        "cpu x"
    );
    for &size in &cli.sizes {
        if !(8..=wire::MAX_DATA_BODY).contains(&size) {
            bail!("payload size {size} is outside 8..={}", wire::MAX_DATA_BODY);
        }
        let mut rows: Vec<(Run, Run)> = Vec::new();
        for _ in 0..cli.rounds {
            let plain = run_plain(cli, bin_dir, size, load)?;
            let ferry = run_ferry(cli, bin_dir, size, load)?;
            let (Some(_), Some(_)) = (plain.latency, ferry.latency) else {
                println!(
                    "{:>7} {size:>5}B | round discarded: plain {:.0} pps, ferry {:.0} pps delivered",
                    load.rate, plain.received_pps, ferry.received_pps
                );
                continue;
            };
            print_latency_row(&format!("{}", load.rate), size, &plain, &ferry);
            rows.push((plain, ferry));
        }
        if rows.len() > 1 {
            let med = |f: &dyn Fn(&Run) -> f64, which: bool| {
                let mut v: Vec<f64> = rows
                    .iter()
                    .map(|(p, fe)| f(if which { fe } else { p }))
                    .collect();
                median(&mut v)
            };
            let lat = |pick: fn(&Latency) -> f64| {
                move |r: &Run| r.latency.as_ref().map_or(f64::NAN, pick)
            };
            let summary = |which: bool| Run {
                offered_pps: med(&|r| r.offered_pps, which),
                received_pps: med(&|r| r.received_pps, which),
                cpu_ns_per_packet: med(&|r| r.cpu_ns_per_packet, which),
                latency: Some(Latency {
                    p50: med(&lat(|l| l.p50), which),
                    p99: med(&lat(|l| l.p99), which),
                    p999: med(&lat(|l| l.p999), which),
                    max: med(&lat(|l| l.max), which),
                }),
                host_ns_per_packet: med(&|r| r.host_ns_per_packet, which),
                xdp_ns_per_run: None,
                submits_per_datagram: Some(med(
                    &|r| r.submits_per_datagram.unwrap_or(f64::NAN),
                    which,
                )),
            };
            print_latency_row(
                &format!("median{}", rows.len()),
                size,
                &summary(false),
                &summary(true),
            );
        }
    }
    Ok(())
}

fn print_latency_row(label: &str, size: usize, plain: &Run, ferry: &Run) {
    let fmt = |r: &Run| match r.latency {
        Some(l) => format!("{:.0}/{:.0}/{:.0}/{:.0}", l.p50, l.p99, l.p999, l.max),
        None => "-".into(),
    };
    let ratio = |pick: fn(&Latency) -> f64| match (plain.latency, ferry.latency) {
        (Some(p), Some(f)) => pick(&f) / pick(&p),
        _ => f64::NAN,
    };
    println!(
        "{:>7} {:>5}B | {:<31} {:>6.0} | {:<31} {:>6.0} {:>5.2} | {:>5.2} {:>5.2} {:>5.2} {:>5.2}",
        label,
        size,
        fmt(plain),
        plain.cpu_ns_per_packet,
        fmt(ferry),
        ferry.cpu_ns_per_packet,
        ferry.submits_per_datagram.unwrap_or(f64::NAN),
        ratio(|l| l.p50),
        ratio(|l| l.p99),
        ratio(|l| l.p999),
        ferry.cpu_ns_per_packet / plain.cpu_ns_per_packet,
    );
    if ferry.received_pps < 0.99 * ferry.offered_pps
        || plain.received_pps < 0.99 * plain.offered_pps
    {
        println!(
            "{:>7} {:>5}  loss: plain {:.0} of {:.0} pps delivered, ferry {:.0} of {:.0}",
            "", "", plain.received_pps, plain.offered_pps, ferry.received_pps, ferry.offered_pps
        );
    }
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sends `datagram` from `generator` to `target` at `load` and counts what arrives at `sink`
/// (and, with `load.latency`, how long it took), measuring the forwarder process `pid`'s CPU
/// over the same window.
fn measure(
    cli: &Cli,
    load: Load,
    generator: UdpSocket,
    sink: UdpSocket,
    target: SocketAddr,
    datagram: &[u8],
    pid: u32,
) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    // Latency is recorded only inside the measured window.
    let recording = Arc::new(AtomicBool::new(false));
    let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let load_cpu = cli.load_cpu;
    // The generator's and the sink's common clock: both threads are in this process.
    let epoch = Instant::now();
    let sink_thread = {
        let (stop, recording, received) = (
            Arc::clone(&stop),
            Arc::clone(&recording),
            Arc::clone(&received),
        );
        std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
            let _ = pin_to(load_cpu);
            // 1 ns to 10 s at 3 significant figures.
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
            let mut batch = Batch::new(64);
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = batch.recv(&sink) else { continue };
                received.fetch_add(n as u64, Ordering::Relaxed);
                if !load.latency || !recording.load(Ordering::Relaxed) {
                    continue;
                }
                let arrived = epoch.elapsed().as_nanos() as u64;
                for i in 0..n {
                    if let Some(sent_at) = timestamp(batch.datagram(i)) {
                        histogram.saturating_record(arrived.saturating_sub(sent_at).max(1));
                    }
                }
            }
            Ok(histogram)
        })
    };
    let gen_thread = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let datagram = datagram.to_vec();
        std::thread::spawn(move || {
            let _ = pin_to(load_cpu);
            match load.latency {
                true => paced_one_at_a_time(
                    &generator, target, datagram, load.rate, epoch, &stop, &sent,
                ),
                false => batched(&generator, target, &datagram, load.rate, &stop, &sent),
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    recording.store(true, Ordering::Relaxed);
    let (h0, x0) = (host_busy_ns(), xdp_stats(pid));
    let (s0, r0, c0, t0) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        task_cpu_ns(pid)?,
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(cli.seconds));
    let (s1, r1, c1, t1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        task_cpu_ns(pid)?,
        Instant::now(),
    );
    let (h1, x1) = (host_busy_ns(), xdp_stats(pid));
    recording.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = gen_thread.join();
    let histogram = match sink_thread.join() {
        Ok(h) => h?,
        Err(_) => bail!("the sink thread panicked"),
    };
    let secs = (t1 - t0).as_secs_f64();
    let forwarded = (r1 - r0).max(1);
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Run {
        offered_pps: (s1 - s0) as f64 / secs,
        received_pps: (r1 - r0) as f64 / secs,
        cpu_ns_per_packet: c1.saturating_sub(c0) as f64 / forwarded as f64,
        latency: (load.latency && !histogram.is_empty()).then(|| Latency {
            p50: us(histogram.value_at_quantile(0.50)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
        }),
        submits_per_datagram: None,
        host_ns_per_packet: h1.saturating_sub(h0) as f64 / forwarded as f64,
        xdp_ns_per_run: match (x0, x1) {
            (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
                Some((t1 - t0) as f64 / (n1 - n0) as f64)
            }
            _ => None,
        },
    })
}

/// Busy time of all CPUs so far, ns: /proc/stat's first line without idle and iowait.
fn host_busy_ns() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| *v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    busy.saturating_mul(1_000_000_000 / hz)
}

/// The run time (ns) and run count of the XDP programs process `pid` holds, summed, from its
/// fdinfo: counted only while `kernel.bpf_stats_enabled` is 1.
fn xdp_stats(pid: u32) -> Option<(u64, u64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let (mut time, mut count, mut found) = (0u64, 0u64, false);
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // BPF_PROG_TYPE_XDP.
        if field("prog_type:") != Some(6) {
            continue;
        }
        if let (Some(t), Some(n)) = (field("run_time_ns:"), field("run_cnt:")) {
            time += t;
            count += n;
            found = true;
        }
    }
    found.then_some((time, count))
}

/// The send time a latency-mode datagram carries in its last 8 bytes.
fn timestamp(datagram: &[u8]) -> Option<u64> {
    let tail = datagram
        .len()
        .checked_sub(8)
        .and_then(|at| datagram.get(at..))?;
    Some(u64::from_le_bytes(tail.try_into().ok()?))
}

/// Throughput load: batches of 16, paced to `rate` (0: as fast as possible).
fn batched(
    generator: &UdpSocket,
    target: SocketAddr,
    datagram: &[u8],
    rate: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    let mut batch = Batch::new(16);
    batch.fill(datagram, target);
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
        if let Ok(n) = batch.send(generator, 16) {
            total += n as u64;
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Latency load: each datagram on its own, at its due time `k / rate` (sleeping in between),
/// stamped with the moment it is sent. A generator that fell behind (descheduled) catches up
/// one datagram at a time, as an application with a backlog would.
fn paced_one_at_a_time(
    generator: &UdpSocket,
    target: SocketAddr,
    mut datagram: Vec<u8>,
    rate: u64,
    epoch: Instant,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    let _ = fine_timer_slack();
    let interval_ns = 1_000_000_000 / rate.max(1);
    let stamp_at = datagram.len().saturating_sub(8);
    let mut due_ns = epoch.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let now_ns = epoch.elapsed().as_nanos() as u64;
        if now_ns < due_ns {
            std::thread::sleep(Duration::from_nanos(due_ns - now_ns));
            continue;
        }
        if let Some(stamp) = datagram.get_mut(stamp_at..) {
            stamp.copy_from_slice(&now_ns.to_le_bytes());
        }
        if generator.send_to(&datagram, target).is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        due_ns += interval_ns;
    }
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

fn run_plain(cli: &Cli, bin_dir: &Path, size: usize, load: Load) -> anyhow::Result<Run> {
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
        load,
        generator,
        sink,
        listen,
        &payload_datagram(1, size)?,
        child.0.id(),
    )
}

fn run_ferry(cli: &Cli, bin_dir: &Path, size: usize, load: Load) -> anyhow::Result<Run> {
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
        load,
        generator,
        sink,
        listen,
        &payload_datagram(session, size)?,
        relay.pid(),
    );
    // Where packets went, from the relay's own counters (the non-zero ones).
    let page = relay.metrics();
    if !load.latency {
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
    }
    // How often the worker entered the kernel per datagram: 1 to 2 when every datagram is
    // handled as it comes (its receive, then its send's completion), far less under load.
    let submits = metric_sum(&page, "ferry_uring_submits");
    let received = metric_sum(&page, "ferry_worker_rx_packets");
    run.map(|r| Run {
        submits_per_datagram: (received > 0.0).then(|| submits / received),
        ..r
    })
}

/// The sum of every sample of the counter `name` (over its labels) on a metrics page.
fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with("_total") || rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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

/// The three-namespace topology of `--netns`.
mod netns {
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use anyhow::{Context, bail};
    use ferry_core::wire::Slot;
    use ferry_relay::xdp::{Guard, Mode};
    use ferry_testkit::fixtures::Authority;
    use ferry_testkit::netns::in_ns;
    use ferry_testkit::relay::{RelayConfig, RelayProcess};

    use super::{Cli, Load, Reaped, Run, bind, measure, median, payload_datagram, rand8};
    use ferry_bench::udp::socket;

    const RELAY_PORT: u16 = 7000;
    const SINK_PORT: u16 = 9000;

    /// Generator namespace (198.18.1.2) ─ veth ─ relay namespace (198.18.1.1, 198.18.2.1,
    /// forwarding on, XDP-capable veths) ─ veth ─ sink namespace (198.18.2.2). The generator's
    /// veth computes UDP checksums in full (a partial one cannot be forwarded from XDP), and
    /// the sink's veth runs an XDP program that passes everything, without which a veth
    /// drops frames redirected to it. Removed on drop.
    struct Topology {
        gen_ns: String,
        relay_ns: String,
        sink_ns: String,
        /// Keeps the sink veth's pass-all XDP program attached.
        _pass: Option<Guard>,
    }

    fn ip(args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .status()
            .context("running ip")?;
        if !status.success() {
            bail!("ip {} failed", args.join(" "));
        }
        Ok(())
    }

    fn exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    impl Topology {
        fn new() -> anyhow::Result<Self> {
            let pid = std::process::id();
            let mut topo = Topology {
                gen_ns: format!("ferry-bg-{pid}"),
                relay_ns: format!("ferry-br-{pid}"),
                sink_ns: format!("ferry-bs-{pid}"),
                _pass: None,
            };
            let (g, r, s) = (
                topo.gen_ns.clone(),
                topo.relay_ns.clone(),
                topo.sink_ns.clone(),
            );
            for ns in [&g, &r, &s] {
                ip(&["netns", "add", ns])?;
                exec(ns, &["ip", "link", "set", "lo", "up"])?;
            }
            for (side, ns, net) in [("g", &g, 1), ("s", &s, 2)] {
                let (outer, inner) = (format!("fb{side}{pid}"), format!("fr{side}{pid}"));
                let (outer, inner) = (
                    outer.chars().take(15).collect::<String>(),
                    inner.chars().take(15).collect::<String>(),
                );
                ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ])?;
                ip(&["link", "set", &outer, "netns", ns])?;
                ip(&["link", "set", &inner, "netns", &r])?;
                exec(
                    ns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("198.18.{net}.2/24"),
                        "dev",
                        &outer,
                    ],
                )?;
                exec(
                    &r,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("198.18.{net}.1/24"),
                        "dev",
                        &inner,
                    ],
                )?;
                exec(ns, &["ip", "link", "set", &outer, "up"])?;
                exec(&r, &["ip", "link", "set", &inner, "up"])?;
                exec(
                    ns,
                    &[
                        "ip",
                        "route",
                        "add",
                        "198.18.0.0/15",
                        "via",
                        &format!("198.18.{net}.1"),
                    ],
                )?;
                exec(
                    &r,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv4.conf.{inner}.forwarding=1"),
                    ],
                )?;
                if side == "g" {
                    exec(ns, &["ethtool", "-K", &outer, "tx-checksumming", "off"])?;
                } else {
                    let mut pass = Guard::load(16)?;
                    let outer = outer.clone();
                    in_ns(ns, || pass.attach(&outer, Mode::Native).map(|_| ()))??;
                    topo._pass = Some(pass);
                }
            }
            exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            Ok(topo)
        }

        /// The relay namespace's veths: to the generator, to the sink.
        fn relay_ifs() -> [String; 2] {
            let pid = std::process::id();
            ["g", "s"].map(|side| format!("fr{side}{pid}").chars().take(15).collect())
        }

        fn socket_in(ns: &str, addr: &str) -> anyhow::Result<UdpSocket> {
            let addr: SocketAddr = addr.parse()?;
            Ok(in_ns(ns, || socket(addr))??)
        }
    }

    impl Drop for Topology {
        fn drop(&mut self) {
            for ns in [&self.gen_ns, &self.relay_ns, &self.sink_ns] {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }

    /// Which way datagrams go from the generator to the sink.
    #[derive(Clone, Copy, PartialEq)]
    enum Path4 {
        Direct,
        Plain,
        Uring,
        Fast,
    }

    const PATHS: [(Path4, &str); 4] = [
        (Path4::Direct, "direct"),
        (Path4::Plain, "plain"),
        (Path4::Uring, "io_uring"),
        (Path4::Fast, "xdp fast"),
    ];

    pub(super) fn table(cli: &Cli, bin_dir: &Path) -> anyhow::Result<()> {
        let topo = Topology::new().context("setting up the namespaces (needs root)")?;
        let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .unwrap_or_else(|_| "0".into());
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        let load = Load {
            rate: cli.rates.first().copied().unwrap_or(0),
            latency: false,
        };
        println!(
            "ferry-fwdbench --netns: generator ns -> relay ns (2 veths) -> sink ns, {} s per run, {} round(s), offered {}",
            cli.seconds,
            cli.rounds,
            match load.rate {
                0 => "as fast as possible".to_string(),
                r => format!("{r} pps"),
            }
        );
        println!(
            "{:>7} {:>9} | {:>10} {:>6} | {:>10} {:>10} | {:>8}",
            "payload", "path", "pps", "x dir", "host ns/p", "proc ns/p", "xdp ns"
        );
        for &size in &cli.sizes {
            let mut results: Vec<Vec<Run>> = vec![Vec::new(); PATHS.len()];
            for _ in 0..cli.rounds {
                for (i, (path, _)) in PATHS.iter().enumerate() {
                    let run = run_path(cli, bin_dir, &topo, *path, size, load)?;
                    results[i].push(run);
                }
            }
            let mut direct = results[0]
                .iter()
                .map(|r| r.received_pps)
                .collect::<Vec<_>>();
            let direct = median(&mut direct);
            for (i, (_, name)) in PATHS.iter().enumerate() {
                let runs = &results[i];
                let med = |f: &dyn Fn(&Run) -> f64| {
                    let mut v: Vec<f64> = runs.iter().map(f).collect();
                    median(&mut v)
                };
                let pps = med(&|r| r.received_pps);
                let xdp = runs
                    .iter()
                    .filter_map(|r| r.xdp_ns_per_run)
                    .collect::<Vec<_>>();
                let process = med(&|r| r.cpu_ns_per_packet);
                println!(
                    "{:>6}B {:>9} | {:>10.0} {:>5.2}x | {:>10.0} {:>10} | {:>8}",
                    size,
                    name,
                    pps,
                    pps / direct.max(1.0),
                    med(&|r| r.host_ns_per_packet),
                    match process.is_nan() {
                        true => "-".to_string(),
                        false => format!("{process:.0}"),
                    },
                    match xdp.is_empty() {
                        true => "-".to_string(),
                        false => format!("{:.0}", median(&mut xdp.clone())),
                    },
                );
            }
        }
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
        println!(
            "medians over rounds; x dir: delivered rate / the direct path's; host ns/p: busy CPU \
             of all CPUs per delivered packet (generator and sink included); proc ns/p: the \
             forwarder process's CPU per delivered packet; xdp ns: the relay's XDP program's \
             run time per run (every frame it saw, kernel.bpf_stats_enabled)"
        );
        drop(topo);
        Ok(())
    }

    fn run_path(
        cli: &Cli,
        bin_dir: &Path,
        topo: &Topology,
        path: Path4,
        size: usize,
        load: Load,
    ) -> anyhow::Result<Run> {
        let generator = Topology::socket_in(&topo.gen_ns, "198.18.1.2:0")?;
        let sink = Topology::socket_in(&topo.sink_ns, &format!("198.18.2.2:{SINK_PORT}"))?;
        match path {
            Path4::Direct => {
                let to: SocketAddr = format!("198.18.2.2:{SINK_PORT}").parse()?;
                let run = measure(
                    cli,
                    load,
                    generator,
                    sink,
                    to,
                    &payload_datagram(1, size)?,
                    std::process::id(),
                )?;
                // No forwarder process: this process's CPU is the generator's and the sink's,
                // and the XDP program it holds is the sink's pass-all one.
                Ok(Run {
                    cpu_ns_per_packet: f64::NAN,
                    xdp_ns_per_run: None,
                    ..run
                })
            }
            Path4::Plain => {
                let listen = format!("198.18.1.1:{RELAY_PORT}");
                let child = Command::new("ip")
                    .args(["netns", "exec", &topo.relay_ns])
                    .arg(bin_dir.join("ferry-plainfwd"))
                    .args(["--listen", &listen])
                    .args(["--to", &format!("198.18.2.2:{SINK_PORT}")])
                    .args(["--seconds", &(cli.seconds + 3).to_string()])
                    .args(["--cpu", &cli.forwarder_cpu.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting ferry-plainfwd")?;
                let child = Reaped(child);
                std::thread::sleep(Duration::from_millis(300));
                measure(
                    cli,
                    load,
                    generator,
                    sink,
                    listen.parse()?,
                    &payload_datagram(1, size)?,
                    child.0.id(),
                )
            }
            Path4::Uring | Path4::Fast => {
                let auth = Authority::new()?;
                let [to_gen, to_sink] = Topology::relay_ifs();
                let config = RelayConfig {
                    listen: vec![SocketAddr::new(IpAddr::from([0, 0, 0, 0]), RELAY_PORT)],
                    relay_extra: format!("cpus = [{}]", cli.forwarder_cpu),
                    sections: format!(
                        "[xdp]\nmode = \"native\"\ninterfaces = [\"{to_gen}\", \"{to_sink}\"]\n\
                         fast_path = {}\ndata_packets_per_second = 1099511627776\n\
                         data_packet_burst = 1099511627776\ndata_bytes_per_second = 1099511627776\n\
                         data_byte_burst = 1099511627776\n\n\
                         [limits]\ndefault_session_rate = 100000000000\nmax_session_rate = 100000000000\n\n\
                         [log]\nlevel = \"warn\"\n",
                        path == Path4::Fast
                    ),
                    netns: Some(topo.relay_ns.clone()),
                    log_to_file: true,
                    ..RelayConfig::loopback(vec![auth.gateway_key()])?
                };
                let relay =
                    RelayProcess::start(&bin_dir.join("ferry-relay"), &auth.relay_key, &config)?;
                let rng = ring::rand::SystemRandom::new();
                let session = u64::from_be_bytes(rand8(&rng)?).max(1);
                let to_relay_gen: SocketAddr = format!("198.18.1.1:{RELAY_PORT}").parse()?;
                let to_relay_sink: SocketAddr = format!("198.18.2.1:{RELAY_PORT}").parse()?;
                bind(&generator, to_relay_gen, &auth.mint(session, Slot::A, 600)?)?;
                bind(&sink, to_relay_sink, &auth.mint(session, Slot::B, 600)?)?;
                measure(
                    cli,
                    load,
                    generator,
                    sink,
                    to_relay_gen,
                    &payload_datagram(session, size)?,
                    relay.pid(),
                )
            }
        }
    }
}
