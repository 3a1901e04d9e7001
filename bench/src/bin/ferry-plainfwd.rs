//! `ferry-plainfwd`: the baseline Ferry's relay is measured against. Everything received on
//! `--listen` goes to `--to`, unchanged, 64 datagrams per `recvmmsg`/`sendmmsg`, no parsing, no
//! state. Stops by itself after `--seconds`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench::udp::{Batch, pin_to, socket};

/// A plain batched UDP forwarder (the throughput baseline).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to receive on.
    #[arg(long)]
    listen: SocketAddr,
    /// Where every datagram goes.
    #[arg(long)]
    to: SocketAddr,
    /// How long to run (at most 600 s).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Datagrams per system call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// CPU to pin to.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(cpu) = cli.cpu {
        pin_to(cpu)?;
    }
    let sock = socket(cli.listen)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut batch = Batch::new(cli.batch.clamp(1, 1024));
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let (mut forwarded, mut errors) = (0u64, 0u64);
    while Instant::now() < deadline {
        let n = match batch.recv(&sock) {
            Ok(n) => n,
            Err(_) => continue,
        };
        match batch.forward(&sock, n, cli.to) {
            Ok(sent) => forwarded += sent as u64,
            Err(_) => errors += 1,
        }
    }
    println!("{{\"forwarded\":{forwarded},\"send_errors\":{errors}}}");
    Ok(())
}
