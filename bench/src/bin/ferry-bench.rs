//! `ferry-bench`: the harness capacity planners run. It builds a topology (three network
//! namespaces: generator → relay host → sink), sets each path up on it in turn — the direct
//! path, the plain `recvmmsg`/`sendmmsg` forwarder, a plain tokio relay, coturn and
//! `ferry-relay` — drives each with the same batched, paced generator, and writes a JSON
//! result (schema docs/bench-result.schema.json) and a Markdown summary. docs/bench.md says
//! how to run it and how to read the report. Needs root (namespaces).
//!
//! `ferry-bench run --testbed FILE` runs the same scenarios on a relay on real interfaces with
//! `ferry-bench agent`s generating and sinking on other machines (no root needed).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ferry_bench::harness::agent::{self, Secret};
use ferry_bench::harness::load::{Pacing, Payload};
use ferry_bench::harness::paths::{Binaries, PathKind};
use ferry_bench::harness::report::BenchResult;
use ferry_bench::harness::scenario::{Plan, Scenario, run};
use ferry_bench::harness::testbed::TestbedFile;
use ferry_bench::harness::topology::{NetnsTestbed, delete_namespace, stale_namespaces};
use ferry_bench::harness::{catch_interrupts, remote, schema};

/// Ferry's bench harness: zero-loss throughput, latency and CPU per packet, against
/// baselines measured in the same run on the same topology.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs scenarios (throughput, latency and rates when none is named) and writes
    /// result.json and summary.md.
    Run(Box<RunArgs>),
    /// Checks a result.json against the schema.
    Validate {
        /// The file.
        file: PathBuf,
    },
    /// Deletes the namespaces of runs that were killed (SIGKILL) before they could.
    Cleanup,
    /// Serves a testbed's coordinator on a generator or sink machine (see docs/bench.md).
    Agent {
        /// The TCP address to listen on for the coordinator.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The testbed's pre-shared secret (at least 32 bytes, mode 0600).
        #[arg(long)]
        secret_file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenarios to run: throughput, latency, rates, scale, flood, workers (default: the first
    /// three).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Run on the relay and agents a testbed file describes instead of on namespaces; the
    /// load settings come from the file, only the scenarios and --out apply.
    #[arg(long, conflicts_with_all = [
        "quick", "full", "payloads", "paths", "require_all_paths", "sessions", "max_loss",
        "trial_seconds", "latency_seconds", "search_steps", "rounds", "pacing", "burst", "fractions",
        "low_rate", "rates", "scale_sessions", "flood_legit_rate", "relay_cpu", "load_cpu",
        "relay_bin", "bin_dir", "probe_rate", "probe_timeout_ms",
    ])]
    testbed: Option<PathBuf>,
    /// The quick profile (under two minutes): 64 B, 4 sessions, short trials, two fixed rates.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full profile (the default): 64 and 1200 B, 16 sessions, longer trials, the fixed
    /// rates 1k/20k/100k/200k pps.
    #[arg(long)]
    full: bool,
    /// DATA body sizes in bytes, or `imix` (default: the profile's).
    #[arg(long, value_delimiter = ',')]
    payloads: Option<Vec<String>>,
    /// Paths to measure (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    paths: Option<Vec<PathKind>>,
    /// Fail instead of skipping a path that cannot run here (coturn not installed).
    #[arg(long)]
    require_all_paths: bool,
    /// Concurrent sessions.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sessions: Option<u32>,
    /// Largest loss (a fraction) a zero-loss trial may have.
    #[arg(long, default_value_t = 0.001)]
    max_loss: f64,
    /// Seconds per search trial.
    #[arg(long)]
    trial_seconds: Option<f64>,
    /// Seconds per latency point.
    #[arg(long)]
    latency_seconds: Option<f64>,
    /// Search trials after the first.
    #[arg(long)]
    search_steps: Option<u32>,
    /// Rounds of the per-path scenarios (throughput, latency, rates): every path of a payload
    /// is measured once per round, the paths interleaved, and the report adds per ratio the
    /// median over the rounds and their range (1 to 20).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// `constant`, or `bursty` (`--burst` datagrams back to back).
    #[arg(long, default_value = "constant")]
    pacing: String,
    /// Datagrams per burst with `--pacing bursty`.
    #[arg(long, default_value_t = 32)]
    burst: usize,
    /// Fractions of the zero-loss rate the latency scenario measures at.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.1, 0.5, 0.9])]
    fractions: Vec<f64>,
    /// The low steady rate of the latency scenario, datagrams per second.
    #[arg(long, default_value_t = 1000)]
    low_rate: u64,
    /// The fixed offered rates of the rates scenario (default: the profile's).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u64>>,
    /// Session counts of the scale scenario (default: the profile's; at most 100,000, the
    /// relay's limit of slots per source address).
    #[arg(long, value_delimiter = ',')]
    scale_sessions: Option<Vec<usize>>,
    /// The legitimate sessions' rate in the flood scenario, datagrams per second in all
    /// (default: 2000 quick, 20,000 full).
    #[arg(long)]
    flood_legit_rate: Option<u64>,
    /// The CPU every forwarder is pinned to.
    #[arg(long, default_value_t = 1)]
    relay_cpu: usize,
    /// The CPU of the generator and the sink.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// The largest worker count of the workers scenario (default: every CPU).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_workers: Option<u32>,
    /// Send one datagram per message instead of UDP GSO runs (to measure what GSO buys).
    #[arg(long)]
    no_gso: bool,
    /// Put an XDP wire between the generator's veth and the relay host's, so that the relay
    /// host receives XDP frames in pages of their own, as from a NIC, instead of socket
    /// buffers that a veth copies before a native XDP program sees them (every path alike;
    /// docs/bench.md, "The veth copy and the XDP wire").
    #[arg(long)]
    xdp_wire: bool,
    /// Reply-path probes of each kind a second (0 to 50; 0: none) at Ferry's latency points
    /// (latency and rates scenarios), each in a window of its own after the point's trial at
    /// the same load, and in an idle window before them: full binds of fresh sessions (BIND,
    /// CHALLENGE, BIND, BIND-ACK) and KEEPALIVE echoes, one at a time from a socket of their
    /// own in the generator's host. Their windows double each Ferry point's time; the points'
    /// CPU figures exclude them. At most 50, the XDP guard's handshake rate per source.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=50))]
    probe_rate: u64,
    /// How long a reply-path probe waits for each answer before it counts as lost, ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    probe_timeout_ms: u64,
    /// What sends the flood scenario's flood: `packet` (a packet socket) or `xdp` (the XDP
    /// flood generator, about twice as much from one core).
    #[arg(long, default_value = "packet", value_parser = ["packet", "xdp"])]
    flood_generator: String,
    /// The ferry-relay binary (default: next to this program).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Where ferry-plainfwd and ferry-tokiorelay are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where result.json and summary.md go (default: target/ferry-bench/<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            schema::validate(&value)?;
            println!("{}: valid ferry-bench result", file.display());
            Ok(())
        }
        Command::Agent {
            listen,
            secret_file,
        } => {
            // First, before anything reads the stamp clock.
            ferry_bench::harness::load::anchor_epoch_to_realtime()?;
            let secret = Secret::load(&secret_file)?;
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("listening on {listen}"))?;
            println!("ferry-bench agent listening on {}", listener.local_addr()?);
            std::io::Write::flush(&mut std::io::stdout())?;
            agent::serve(listener, std::sync::Arc::new(secret), true)
        }
        Command::Cleanup => {
            for ns in stale_namespaces()? {
                delete_namespace(&ns)?;
                println!("deleted namespace {ns}");
            }
            Ok(())
        }
    }
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.testbed {
        return testbed_command(file, &args);
    }
    if !ferry_testkit::skip::is_root() {
        bail!("ferry-bench needs root (network namespaces)");
    }
    if !(0.0..1.0).contains(&args.max_loss) {
        bail!("--max-loss is a fraction in [0, 1)");
    }
    catch_interrupts()?;
    let quick = args.quick;
    let profile = if quick { "quick" } else { "full" };
    let pacing = match args.pacing.as_str() {
        "constant" => Pacing::Constant,
        "bursty" => Pacing::Bursty {
            burst: args.burst.clamp(1, 1024),
        },
        other => bail!("--pacing {other:?}: constant or bursty"),
    };
    let payloads = match &args.payloads {
        Some(list) => list
            .iter()
            .map(|p| Payload::parse(p))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None if quick => vec![Payload::Fixed(64)],
        None => vec![Payload::Fixed(64), Payload::Fixed(1200)],
    };
    let mut scenarios = args.scenarios.clone();
    if scenarios.is_empty() {
        scenarios = vec![Scenario::Throughput, Scenario::Latency, Scenario::Rates];
    }
    scenarios.sort();
    scenarios.dedup();
    let seconds = |given: Option<f64>, quick_s: f64, full_s: f64| -> anyhow::Result<f64> {
        let s = given.unwrap_or(if quick { quick_s } else { full_s });
        if !(0.1..=600.0).contains(&s) {
            bail!("{s} s: trials last 0.1 to 600 s");
        }
        Ok(s)
    };
    let plan = Plan {
        profile: profile.into(),
        scenarios,
        payloads,
        paths: args.paths.clone().unwrap_or_else(|| PathKind::ALL.to_vec()),
        require_all_paths: args.require_all_paths,
        sessions: args
            .sessions
            .map_or(if quick { 4 } else { 16 }, |s| s as usize),
        max_loss: args.max_loss,
        trial_seconds: seconds(args.trial_seconds, 0.5, 2.0)?,
        latency_seconds: seconds(args.latency_seconds, 0.5, 3.0)?,
        search_steps: args
            .search_steps
            .unwrap_or(if quick { 3 } else { 7 })
            .min(30),
        pacing,
        latency_fractions: args.fractions.clone(),
        low_rate: args.low_rate.max(1),
        fixed_rates: args.rates.clone().unwrap_or_else(|| {
            if quick {
                vec![1000, 20_000]
            } else {
                vec![1000, 20_000, 100_000, 200_000]
            }
        }),
        scale_sessions: args.scale_sessions.clone().unwrap_or_else(|| {
            if quick {
                vec![1, 10, 100]
            } else {
                vec![1, 100, 1000, 10_000, 100_000]
            }
        }),
        flood_legit_rate: args
            .flood_legit_rate
            .unwrap_or(if quick { 2000 } else { 20_000 })
            .max(1),
        relay_cpu: args.relay_cpu,
        load_cpu: args.load_cpu,
        max_workers: args.max_workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        ),
        gso: !args.no_gso,
        flood_xdp: args.flood_generator == "xdp",
        probe_rate: args.probe_rate,
        probe_timeout: std::time::Duration::from_millis(args.probe_timeout_ms),
        rounds: args.rounds,
    };
    if let Some(&n) = plan
        .scale_sessions
        .iter()
        .find(|&&n| !(1..=100_000).contains(&n))
    {
        bail!("--scale-sessions {n}: 1 to 100,000");
    }
    if plan.fixed_rates.contains(&0) {
        bail!("--rates are above 0");
    }
    let here = std::env::current_exe()?
        .parent()
        .context("no directory for this program")?
        .to_owned();
    let bins = Binaries::find(
        args.bin_dir.as_deref().unwrap_or(&here),
        args.relay_bin
            .clone()
            .or_else(|| Some(here.join("ferry-relay"))),
    );
    let bed = NetnsTestbed::new(args.relay_cpu, args.load_cpu, args.xdp_wire)
        .context("building the namespace topology (needs iproute2)")?;
    let result = run(&plan, &bed, &bins);
    // The namespaces go before anything else can fail.
    drop(bed);
    let result = result?;
    publish(&result, &args)
}

/// Writes `result.json` and `summary.md` to `--out` (default `target/ferry-bench/<start>`) and
/// prints the summary.
fn publish(result: &BenchResult, args: &RunArgs) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("target/ferry-bench").join(result.started_unix.to_string())
    });
    let md = remote::write_report(result, &out)?;
    println!("\n{md}");
    println!(
        "wrote {} and {}",
        out.join("result.json").display(),
        out.join("summary.md").display()
    );
    Ok(())
}

/// `ferry-bench run --testbed FILE`: the file is checked whole before anything runs.
fn testbed_command(file: &std::path::Path, args: &RunArgs) -> anyhow::Result<()> {
    let bed = TestbedFile::load(file)?;
    catch_interrupts()?;
    let result = remote::run(&bed, &args.scenarios)?;
    publish(&result, args)
}
