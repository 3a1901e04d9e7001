//! Throughput and CPU cost of the file transfer (`ferry_peer::transfer`) over an in-memory
//! link, against the link's ceiling: the same link blasted with unreliable messages.
//!
//! ```text
//! cargo run --release -p ferry-peer --example transfer_bench -- [MIB] [bbr|cubic|newreno] [WINDOW_MIB]
//! ```
//!
//! Defaults: 64 MiB, BBR, the default window. Each row is one run in this process, on a
//! two-thread tokio runtime: the link's blast, then transfers with no impairment, with 5 %
//! loss, with 5 % loss, 5 % reordering and 2 ms of delay each way, and with 20 ms of delay
//! each way (where the window matters: at most one window per round trip). CPU is the process's
//! user + system time (both peers, the link's carrier tasks, the file threads) per MiB moved.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_peer::link::{DatagramLink, Impairment, MEMORY_LINK_MAX_PAYLOAD, memory_pair};
use ferry_peer::transfer::{Congestion, NoProgress, TransferOptions, receive_file, send_file};

/// Total CPU time (user + system) of this process, from `/proc/self/stat`.
fn cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(')').context("bad /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ, the unit of utime and stime, is 100 on every Linux ABI.
    Ok(Duration::from_millis(ticks * 10))
}

/// One measured row.
struct Row {
    what: &'static str,
    bytes: u64,
    wall: Duration,
    cpu: Duration,
    note: String,
}

impl Row {
    fn print(&self) {
        let mib = self.bytes as f64 / (1024.0 * 1024.0);
        let secs = self.wall.as_secs_f64();
        println!(
            "{:<28} {:>8.1} MiB/s {:>8.0} Mbit/s {:>7.2} s {:>7.1} ms CPU/MiB  {}",
            self.what,
            mib / secs,
            self.bytes as f64 * 8.0 / secs / 1e6,
            secs,
            self.cpu.as_secs_f64() * 1000.0 / mib,
            self.note
        );
    }
}

/// The link's ceiling: `bytes` in full-size unreliable messages, timed until the last arrives.
async fn blast(bytes: u64) -> anyhow::Result<Row> {
    let (a, b) = memory_pair(Impairment::NONE);
    let count = bytes.div_ceil(MEMORY_LINK_MAX_PAYLOAD as u64);
    let cpu = cpu_time()?;
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let message = vec![0x5a; MEMORY_LINK_MAX_PAYLOAD];
        for _ in 0..count {
            a.send(&message).await?;
        }
        anyhow::Ok(a)
    });
    let mut got = 0u64;
    for _ in 0..count {
        got += b.recv().await?.len() as u64;
    }
    let wall = start.elapsed();
    let cpu = cpu_time()? - cpu;
    drop(sender.await??);
    Ok(Row {
        what: "link blast (unreliable)",
        bytes: got,
        wall,
        cpu,
        note: String::new(),
    })
}

/// One transfer of `file` over a link with `impairment`.
async fn transfer(
    what: &'static str,
    file: &Path,
    impairment: Impairment,
    options: &TransferOptions,
) -> anyhow::Result<Row> {
    let dest = tempfile::tempdir()?;
    let (a, b) = memory_pair(impairment);
    let cpu = cpu_time()?;
    let start = Instant::now();
    let recv_options = options.clone();
    let dest_path = dest.path().to_owned();
    let receiver = tokio::spawn(async move {
        receive_file(Arc::new(b), &dest_path, &recv_options, &NoProgress).await
    });
    let sent = send_file(Arc::new(a), file, options, &NoProgress).await?;
    let received = receiver.await??;
    let wall = start.elapsed();
    let cpu = cpu_time()? - cpu;
    if sent.hash_hex != received.hash_hex {
        bail!("hashes differ");
    }
    Ok(Row {
        what,
        bytes: sent.bytes,
        wall,
        cpu,
        note: format!(
            "sent {} pkts, lost {}, rtt {:?}",
            sent.sent_packets, sent.lost_packets, sent.rtt
        ),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.first().map_or(Ok(64), |s| s.parse())?;
    let congestion = match args.get(1).map(String::as_str) {
        None | Some("bbr") => Congestion::Bbr,
        Some("cubic") => Congestion::Cubic,
        Some("newreno") => Congestion::NewReno,
        Some(other) => bail!("unknown congestion controller {other:?}"),
    };
    let mut options = TransferOptions {
        congestion,
        ..TransferOptions::default()
    };
    if let Some(window) = args.get(2) {
        options.window = window.parse::<u64>()? * 1024 * 1024;
    }
    let bytes = mib * 1024 * 1024;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let src = tempfile::tempdir()?;
        let file = src.path().join("bench.bin");
        let mut content = vec![0u8; bytes as usize];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for byte in &mut content {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = (x >> 24) as u8;
        }
        std::fs::write(&file, &content)?;
        drop(content);
        println!(
            "{mib} MiB, {congestion:?}, window {} MiB, link messages of {MEMORY_LINK_MAX_PAYLOAD} bytes",
            options.window >> 20
        );
        blast(bytes).await?.print();
        transfer("transfer, perfect link", &file, Impairment::NONE, &options)
            .await?
            .print();
        let loss = Impairment {
            loss: 0.05,
            reorder: 0.0,
            delay: Duration::ZERO,
            seed: 3,
        };
        transfer("transfer, 5% loss", &file, loss, &options)
            .await?
            .print();
        let rough = Impairment {
            loss: 0.05,
            reorder: 0.05,
            delay: Duration::from_millis(2),
            seed: 4,
        };
        transfer("transfer, 5% loss+reord+2ms", &file, rough, &options)
            .await?
            .print();
        let far = Impairment {
            delay: Duration::from_millis(20),
            ..Impairment::NONE
        };
        transfer("transfer, 20 ms each way", &file, far, &options)
            .await?
            .print();
        anyhow::Ok(())
    })
}
