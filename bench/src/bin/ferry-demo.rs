//! `ferry-demo`: runs Ferry end to end in one process (see `ferry_bench::demo`).

use anyhow::Context;
use clap::Parser;
use ferry_bench::demo::{self, DemoOptions};

/// Ferry in one process: a gateway mints tokens, two peers bind at the relay's session table,
/// run the Noise handshake through it and exchange encrypted datagrams it cannot read.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Messages each way after the handshake.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Plaintext bytes per message (at most 1427).
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u16).range(1..=1427))]
    payload: u16,
    /// Print only the summary lines.
    #[arg(long)]
    quiet: bool,
    /// Skip the second part (the real relay process over UDP).
    #[arg(long)]
    in_memory_only: bool,
    /// Round trips in the second part.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = DemoOptions {
        messages: cli.messages,
        payload: usize::from(cli.payload),
        verbose: !cli.quiet,
    };
    println!("Part 1: everything in one process, an in-memory network instead of UDP");
    let report = demo::run(&opts)?;
    println!(
        "ok: {} messages delivered and authenticated end to end; the relay forwarded {} datagrams it could not read",
        report.delivered, report.relay.forwarded
    );
    if cli.in_memory_only {
        return Ok(());
    }
    println!("\nPart 2: the real ferry-relay process and two peers over UDP on loopback");
    let relay_bin = std::env::current_exe()?
        .parent()
        .context("no directory for this program")?
        .join("ferry-relay");
    let live = ferry_bench::live::run(&relay_bin, cli.round_trips, usize::from(cli.payload))?;
    println!(
        "ok: {} round trips through ferry-relay; it forwarded {} datagrams it could not read",
        live.round_trips, live.forwarded
    );
    Ok(())
}
