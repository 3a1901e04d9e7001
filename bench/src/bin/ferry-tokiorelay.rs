//! `ferry-tokiorelay`: a baseline for `ferry-bench`, what a typical Rust UDP relay does — a
//! tokio task that awaits `recv_from` and then `send_to` for every datagram, one at a time, on
//! a single-threaded runtime. Everything received on `--listen` goes to `--to`, unchanged.
//! Stops by itself after `--seconds`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ferry_bench::udp::{pin_to, socket};

/// A plain tokio UDP relay (a baseline).
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
    /// CPU to pin to.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(cpu) = cli.cpu {
        pin_to(cpu)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let std_socket = socket(cli.listen)?;
        std_socket.set_nonblocking(true)?;
        let sock = tokio::net::UdpSocket::from_std(std_socket)?;
        let relay = async {
            let mut buf = vec![0u8; 65_536];
            loop {
                // A failed receive or send loses that datagram, as in any UDP relay; the
                // harness counts it at the relay host's kernel.
                let Ok((n, _)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let _ = sock.send_to(&buf[..n], cli.to).await;
            }
        };
        tokio::select! {
            _ = relay => {}
            () = tokio::time::sleep(Duration::from_secs(cli.seconds)) => {}
        }
        Ok(())
    })
}
