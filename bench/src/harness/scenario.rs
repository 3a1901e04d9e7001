//! The scenarios: the generator's ceiling, zero-loss throughput by binary search, latency
//! at fractions of that rate, at a low steady rate and at fixed offered rates; each path of
//! each payload measured in turn on the same testbed.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use super::load::{MintFn, Pacing, Payload, ReplyProbe, drain, now_ns, sink};
use super::paths::{Binaries, PathKind, PathOptions, RELAY_PORT, RunningPath};
use super::report::{
    BenchResult, FloodRun, GeneratorSetup, Host, Latency, PathRun, Point, RelayStage, ReplyRtt,
    RunConfig, Setup, Skipped, Trial, ZeroLoss, capacity_lines, medians, ratios,
};
use super::topology::Testbed;
use super::{check_interrupted, flood};
use crate::cpu::task_cpu_ns;
use ferry_core::wire::Slot;

/// A scenario `ferry-bench run` can run on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// The zero-loss throughput search (always preceded by the generator's ceiling).
    Throughput,
    /// Latency at fractions of the zero-loss rate (runs the search first) and at a low
    /// steady rate.
    Latency,
    /// Latency, loss and CPU at the fixed offered rates.
    Rates,
    /// Ferry alone as its sessions grow: bind rate, relay memory per session, zero-loss
    /// throughput at each count.
    Scale,
    /// Ferry's legitimate sessions at a steady rate while a spoofed many-source flood hits
    /// the relay, its XDP guard off and on.
    Flood,
    /// Ferry with 1, 2, … workers (up to `--max-workers`, default every CPU): zero-loss
    /// throughput and CPU per packet for each count.
    Workers,
}

impl Scenario {
    /// Its name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Latency => "latency",
            Self::Rates => "rates",
            Self::Scale => "scale",
            Self::Flood => "flood",
            Self::Workers => "workers",
        }
    }
}

/// Everything a run does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `quick` or `full`.
    pub profile: String,
    /// What to run.
    pub scenarios: Vec<Scenario>,
    /// Payloads, each measured on every path.
    pub payloads: Vec<Payload>,
    /// Paths.
    pub paths: Vec<PathKind>,
    /// Whether a path that cannot run (coturn not installed) fails the run instead of being
    /// skipped.
    pub require_all_paths: bool,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Largest loss fraction a zero-loss trial may have.
    pub max_loss: f64,
    /// Seconds per search trial.
    pub trial_seconds: f64,
    /// Seconds per latency point.
    pub latency_seconds: f64,
    /// Search trials after the first.
    pub search_steps: u32,
    /// How paced load is spaced.
    pub pacing: Pacing,
    /// Fractions of the zero-loss rate for the latency scenario.
    pub latency_fractions: Vec<f64>,
    /// The low steady rate (one datagram at a time).
    pub low_rate: u64,
    /// Fixed offered rates.
    pub fixed_rates: Vec<u64>,
    /// Session counts of the scale scenario.
    pub scale_sessions: Vec<usize>,
    /// The legitimate sessions' rate in the flood scenario, datagrams per second in all.
    pub flood_legit_rate: u64,
    /// Forwarders' CPU.
    pub relay_cpu: usize,
    /// Generator's and sink's CPU.
    pub load_cpu: usize,
    /// The largest worker count of the `workers` scenario.
    pub max_workers: usize,
    /// Whether the generator may send with UDP GSO.
    pub gso: bool,
    /// Whether the flood comes from the XDP flood generator instead of a packet socket.
    pub flood_xdp: bool,
    /// Reply-path probes of each kind (bind, KEEPALIVE) a second, in a window after each of
    /// Ferry's latency points at its load, and in an idle window before them (0: no probes).
    pub probe_rate: u64,
    /// How long a probe waits for each answer before it counts it lost.
    pub probe_timeout: Duration,
    /// How many times the per-path scenarios run (at least 1), every path of a payload once
    /// per round, so that a shared machine's drifts fall on every path alike.
    pub rounds: u32,
}

/// The options of a path with one worker and one generator socket.
fn options(plan: &Plan, sessions: usize, xdp_guard: bool) -> PathOptions {
    PathOptions {
        sessions,
        relay_cpu: plan.relay_cpu,
        xdp_guard,
        workers: 1,
        generator_sockets: 1,
    }
}

/// Turns `kernel.bpf_stats_enabled` on for as long as it lives (XDP run time per run), and
/// back off on drop if it was off.
struct BpfStats {
    was_off: bool,
}

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn on() -> Self {
        let was_off = std::fs::read_to_string(Self::PATH).is_ok_and(|v| v.trim() == "0");
        if was_off {
            let _ = std::fs::write(Self::PATH, "1");
        }
        Self { was_off }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if self.was_off {
            let _ = std::fs::write(Self::PATH, "0");
        }
    }
}

/// Runs `plan` on `bed`, printing a progress line per trial.
pub fn run(plan: &Plan, bed: &dyn Testbed, bins: &Binaries) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let host = Host::here();
    println!("ferry-bench: {}", bed.describe());
    let mut skipped = Vec::new();
    let mut paths = plan.paths.clone();
    paths.sort();
    paths.dedup();
    if paths.contains(&PathKind::Coturn) && bins.turnserver.is_none() {
        let reason = "coturn's turnserver is not installed (.ci/setup --bench installs it)";
        if plan.require_all_paths {
            anyhow::bail!("{reason}");
        }
        println!("skipping coturn: {reason}");
        skipped.push(Skipped {
            path: "coturn".into(),
            reason: reason.into(),
        });
        paths.retain(|p| *p != PathKind::Coturn);
    }
    let _bpf_stats = BpfStats::on();
    let mut runs = Vec::new();
    let per_path = [Scenario::Throughput, Scenario::Latency, Scenario::Rates]
        .iter()
        .any(|s| plan.scenarios.contains(s));
    let rounds = (1..=plan.rounds.max(1)).filter(|_| per_path);
    for (round, payload) in rounds.flat_map(|r| plan.payloads.iter().map(move |p| (r, p))) {
        for &kind in &paths {
            check_interrupted()?;
            let tag = match plan.rounds {
                0 | 1 => format!("[{} B {}]", payload.label(), kind.name()),
                n => format!(
                    "[{} B {}, round {round} of {n}]",
                    payload.label(),
                    kind.name()
                ),
            };
            println!("{tag} setting up ({} sessions)", plan.sessions);
            let fast = kind == PathKind::FerryFast;
            let started = RunningPath::start(kind, bed, bins, options(plan, plan.sessions, false))
                .with_context(|| format!("setting up {}", kind.name()));
            let path = match started {
                Ok(path) => path,
                // A relay built without its eBPF object, or a kernel without native XDP on
                // veth: the column is skipped, saying why.
                Err(e) if fast => {
                    skip(plan, &mut skipped, kind, format!("{e:#}"))?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            path.generator.set_gso(plan.gso);
            if fast && path.metric("ferry_xdp_fast_path_active").unwrap_or(0) == 0 {
                let reason = format!(
                    "the relay's XDP fast path is not active here; its log:\n{}",
                    path.relay_log().unwrap_or_default()
                );
                drop(path);
                skip(plan, &mut skipped, kind, reason)?;
                continue;
            }
            let run =
                measure_path(plan, bed, &path, *payload, &tag).map(|r| PathRun { round, ..r });
            let run = run.with_context(|| match path.relay_log() {
                Some(log) if !log.is_empty() => {
                    format!("measuring {}; the relay's log:\n{log}", kind.name())
                }
                _ => format!("measuring {}", kind.name()),
            })?;
            runs.push(run);
        }
    }
    let mut scale = Vec::new();
    if plan.scenarios.contains(&Scenario::Scale)
        && let Some(&payload) = plan.payloads.first()
    {
        for &sessions in &plan.scale_sessions {
            check_interrupted()?;
            let tag = format!("[scale {} B ferry {sessions}]", payload.label());
            println!("{tag} binding {sessions} sessions");
            let path =
                RunningPath::start(PathKind::Ferry, bed, bins, options(plan, sessions, false))
                    .with_context(|| format!("setting up ferry with {sessions} sessions"))?;
            path.generator.set_gso(plan.gso);
            let search_only = Plan {
                scenarios: vec![Scenario::Throughput],
                search_steps: plan.search_steps.min(4),
                ..plan.clone()
            };
            scale.push(measure_path(&search_only, bed, &path, payload, &tag)?);
        }
    }
    let mut workers = Vec::new();
    if plan.scenarios.contains(&Scenario::Workers)
        && let Some(&payload) = plan.payloads.first()
    {
        for count in 1..=plan.max_workers.clamp(1, host.cpus) {
            check_interrupted()?;
            let tag = format!("[workers {} B ferry {count}]", payload.label());
            // Sessions over several source sockets: SO_REUSEPORT hashes each source 4-tuple
            // to one worker, so one socket would feed one worker however many there are.
            let sockets = (4 * count).min(plan.sessions.max(1));
            println!(
                "{tag} setting up ({} sessions from {sockets} sockets)",
                plan.sessions
            );
            let path = RunningPath::start(
                PathKind::Ferry,
                bed,
                bins,
                PathOptions {
                    workers: count,
                    generator_sockets: sockets,
                    ..options(plan, plan.sessions, false)
                },
            )
            .with_context(|| format!("setting up ferry with {count} workers"))?;
            path.generator.set_gso(plan.gso);
            let search_only = Plan {
                scenarios: vec![Scenario::Throughput],
                ..plan.clone()
            };
            let mut run = measure_path(&search_only, bed, &path, payload, &tag)?;
            run.workers = count;
            workers.push(run);
        }
    }
    let mut flood_runs = Vec::new();
    if plan.scenarios.contains(&Scenario::Flood)
        && let Some(&payload) = plan.payloads.first()
    {
        flood_runs = flood_scenario(plan, bed, bins, payload)?;
    }
    let ratios = ratios(&runs, plan.max_loss);
    let medians = medians(&ratios);
    let capacity = capacity_lines(&runs, plan.max_loss);
    Ok(BenchResult {
        schema: super::report::SCHEMA_NAME,
        version: super::report::SCHEMA_VERSION,
        started_unix,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        profile: plan.profile.clone(),
        host,
        topology: bed.describe(),
        config: RunConfig {
            scenarios: plan.scenarios.iter().map(|s| s.name().into()).collect(),
            payloads: plan.payloads.iter().map(Payload::label).collect(),
            paths: plan.paths.iter().map(|p| p.name().into()).collect(),
            sessions: plan.sessions,
            max_loss: plan.max_loss,
            trial_seconds: plan.trial_seconds,
            latency_seconds: plan.latency_seconds,
            search_steps: plan.search_steps,
            pacing: plan.pacing.label(),
            latency_fractions: plan.latency_fractions.clone(),
            low_rate: plan.low_rate,
            fixed_rates: plan.fixed_rates.clone(),
            scale_sessions: plan.scale_sessions.clone(),
            flood_legit_rate: plan.flood_legit_rate,
            flood_generator: if plan.flood_xdp { "xdp" } else { "packet" }.into(),
            relay_cpu: plan.relay_cpu,
            load_cpu: plan.load_cpu,
            max_workers: plan.max_workers,
            generator_gso: plan.gso,
            probe_rate: plan.probe_rate,
            probe_timeout_ms: plan.probe_timeout.as_millis() as u64,
            rounds: plan.rounds.max(1),
        },
        skipped,
        runs,
        scale,
        workers,
        flood: flood_runs,
        ratios,
        medians,
        capacity,
        testbed: None,
    })
}

/// Records that `kind` cannot run here, or fails the run when every path is required.
fn skip(
    plan: &Plan,
    skipped: &mut Vec<Skipped>,
    kind: PathKind,
    reason: String,
) -> anyhow::Result<()> {
    if plan.require_all_paths {
        anyhow::bail!("{}: {reason}", kind.name());
    }
    println!("skipping {}: {reason}", kind.name());
    skipped.push(Skipped {
        path: kind.name().into(),
        reason,
    });
    Ok(())
}

/// Ferry with its guard off, then on; each time the legitimate sessions at
/// `flood_legit_rate` alone, then under the flood.
fn flood_scenario(
    plan: &Plan,
    bed: &dyn Testbed,
    bins: &Binaries,
    payload: Payload,
) -> anyhow::Result<Vec<FloodRun>> {
    bed.route_to_generator(flood::SPOOF_NET)?;
    let (raw, gen_mac, relay_mac) = bed.generator_packet_socket()?;
    let IpAddr::V4(relay_ip) = bed.relay_ip_to_generator() else {
        anyhow::bail!("the flood is IPv4");
    };
    let frames = flood::frames(
        4096,
        SocketAddrV4::new(relay_ip, RELAY_PORT),
        gen_mac,
        relay_mac,
    )?;
    let xdp_flooder = match plan.flood_xdp {
        true => Some(bed.generator_xdp_flooder()?),
        false => None,
    };
    let mut out = Vec::new();
    for guard in [false, true] {
        let tag = format!(
            "[flood {} B ferry, guard {}]",
            payload.label(),
            if guard { "on" } else { "off" }
        );
        println!("{tag} setting up ({} sessions)", plan.sessions);
        let path = RunningPath::start(
            PathKind::Ferry,
            bed,
            bins,
            options(plan, plan.sessions, guard),
        )
        .with_context(|| {
            format!(
                "setting up ferry with its guard {}",
                if guard { "on" } else { "off" }
            )
        })?;
        trial(plan, bed, &path, payload, 1000, Pacing::Constant, 0.3)?;
        for flooding in [false, true] {
            let xdp_drop = "ferry_xdp_packets_total{action=\"drop\"";
            let drops0 = path.metric(xdp_drop).unwrap_or(0);
            let challenges0 = xdp_challenges(&path);
            let cpu0 = path.pid.map(task_cpu_ns).transpose()?.unwrap_or(0);
            let started = Instant::now();
            let stop = AtomicBool::new(false);
            let (t, flood_sent) = std::thread::scope(|s| -> anyhow::Result<_> {
                let flooder = flooding.then(|| {
                    s.spawn(|| match &xdp_flooder {
                        Some(x) => x.send(&frames, Some(plan.load_cpu), &stop),
                        None => flood::send(&raw, &frames, Some(plan.load_cpu), &stop),
                    })
                });
                let t = trial(
                    plan,
                    bed,
                    &path,
                    payload,
                    plan.flood_legit_rate,
                    Pacing::Constant,
                    plan.latency_seconds,
                );
                stop.store(true, Ordering::Relaxed);
                let sent = match flooder {
                    Some(f) => f
                        .join()
                        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))?,
                    None => 0,
                };
                Ok((t?, sent))
            })?;
            let wall = started.elapsed().as_secs_f64();
            if flooding && flood_sent == 0 {
                println!(
                    "{tag} the flood generator sent nothing (the XDP one needs an XDP program on \
                     the relay host's veth, which the guard brings; on 6.18, GRO alone did not)"
                );
            }
            let cpu1 = path.pid.map(task_cpu_ns).transpose()?.unwrap_or(0);
            let drops1 = path.metric(xdp_drop).unwrap_or(0);
            let challenges1 = xdp_challenges(&path);
            let run = FloodRun {
                guard,
                flood: flooding,
                flood_pps: flood_sent as f64 / wall,
                xdp_drops_per_second: drops1.saturating_sub(drops0) as f64 / wall,
                xdp_challenges_per_second: challenges1.saturating_sub(challenges0) as f64 / wall,
                relay_cpu_share: cpu1.saturating_sub(cpu0) as f64 / 1e9 / wall,
                trial: t,
            };
            println!(
                "{tag} flood {}: {:.0} flood frames/s, XDP drops {:.0}/s, CHALLENGEs from XDP \
                 {:.0}/s, relay CPU {:.0} % of a core; legitimate: sent {} ({:.0} pps), sink {} \
                 ({:.0} pps), loss {:.3} %{}",
                if flooding { "on" } else { "off" },
                run.flood_pps,
                run.xdp_drops_per_second,
                run.xdp_challenges_per_second,
                run.relay_cpu_share * 100.0,
                run.trial.sent,
                run.trial.offered_pps,
                run.trial.sink_received,
                run.trial.delivered_pps,
                run.trial.loss * 100.0,
                run.trial.latency_us.map_or(String::new(), |l| format!(
                    ", p50/p99 {:.0}/{:.0} µs",
                    l.p50, l.p99
                )),
            );
            out.push(run);
        }
    }
    Ok(out)
}

/// CHALLENGEs the XDP guard of `path`'s relay has sent itself so far (`XDP_TX` and
/// `XDP_REDIRECT`).
fn xdp_challenges(path: &RunningPath) -> u64 {
    ["tx", "redirect"]
        .iter()
        .map(|action| {
            let name =
                format!("ferry_xdp_packets_total{{action=\"{action}\",reason=\"challenge\"}}");
            path.metric(&name).unwrap_or(0)
        })
        .sum()
}

fn measure_path(
    plan: &Plan,
    bed: &dyn Testbed,
    path: &RunningPath,
    payload: Payload,
    tag: &str,
) -> anyhow::Result<PathRun> {
    let sessions = path.generator.flows();
    let setup = Setup {
        bind_seconds: path.bind_seconds,
        binds_per_second: path
            .bind_seconds
            .filter(|s| *s > 0.0)
            .map(|s| sessions as f64 / s),
        rss_before_bytes: path.rss_bytes.map(|r| r.0),
        rss_after_bytes: path.rss_bytes.map(|r| r.1),
        rss_per_session_bytes: path
            .rss_bytes
            .map(|(a, b)| b.saturating_sub(a) as f64 / sessions.max(1) as f64),
    };
    if let Some(s) = path.bind_seconds {
        println!(
            "{tag} {sessions} sessions set up in {s:.3} s ({:.0}/s)",
            sessions as f64 / s.max(1e-9)
        );
    }
    // A short warm-up: caches, ARP, the forwarder's first allocations.
    trial(plan, bed, path, payload, 1000, Pacing::Constant, 0.3)?;
    let wants = |s: Scenario| plan.scenarios.contains(&s);
    // Ferry's reply path is timed at every latency point, from an idle baseline on.
    let mint = |session: u64| path.mint(session, Slot::A, 3000);
    let mint: &MintFn<'_> = &mint;
    let mut probe = match path.kind.is_ferry()
        && plan.probe_rate > 0
        && (wants(Scenario::Latency) || wants(Scenario::Rates))
    {
        true => Some(start_probe(plan, bed, mint)?),
        false => None,
    };
    let mut reply_idle = None;
    if let Some(probe) = probe.as_mut() {
        let cpu0 = path.pid.map(task_cpu_ns).transpose()?;
        let window = probe.run(
            plan.latency_seconds,
            Some(plan.load_cpu),
            &AtomicBool::new(false),
        )?;
        let cpu1 = path.pid.map(task_cpu_ns).transpose()?;
        let idle = ReplyRtt::from_window(&window, cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)));
        reply_progress(tag, "idle", &idle);
        reply_idle = Some(idle);
    }
    let ceiling = trial(plan, bed, path, payload, 0, plan.pacing, plan.trial_seconds)?;
    progress(
        tag,
        "generator ceiling (as fast as it can)",
        &ceiling,
        plan.max_loss,
    );
    let mut zero_loss = None;
    if wants(Scenario::Throughput) || wants(Scenario::Latency) {
        zero_loss = Some(search(plan, &ceiling, tag, |target| {
            trial(
                plan,
                bed,
                path,
                payload,
                target,
                plan.pacing,
                plan.trial_seconds,
            )
        })?);
    }
    let mut points = Vec::new();
    if wants(Scenario::Latency) {
        let rate = zero_loss.as_ref().map_or(0.0, |z: &ZeroLoss| z.pps);
        for &f in &plan.latency_fractions {
            let target = (rate * f).round() as u64;
            if target == 0 {
                continue;
            }
            let label = format!("{:.0}%", f * 100.0);
            let (t, reply) = probed_trial(
                plan,
                bed,
                path,
                payload,
                target,
                plan.pacing,
                probe.as_mut(),
            )?;
            let what = format!("latency at {label} ({target} pps)");
            progress(tag, &what, &t, plan.max_loss);
            points.push(point(tag, &what, label, t, reply));
        }
        let (t, reply) = probed_trial(
            plan,
            bed,
            path,
            payload,
            plan.low_rate,
            Pacing::Constant,
            probe.as_mut(),
        )?;
        let what = format!("low steady rate ({} pps)", plan.low_rate);
        progress(tag, &what, &t, plan.max_loss);
        points.push(point(tag, &what, "low".into(), t, reply));
    }
    if wants(Scenario::Rates) {
        for &rate in &plan.fixed_rates {
            let (t, reply) =
                probed_trial(plan, bed, path, payload, rate, plan.pacing, probe.as_mut())?;
            let what = format!("fixed {rate} pps");
            progress(tag, &what, &t, plan.max_loss);
            points.push(point(tag, &what, "fixed".into(), t, reply));
        }
    }
    drop(probe);
    Ok(PathRun {
        round: 1,
        payload: payload.label(),
        mean_body_bytes: payload.mean_bytes(),
        path: path.kind.name().into(),
        sessions,
        workers: 1,
        generator: GeneratorSetup {
            sockets: path.generator.sockets(),
            gso: path.generator.uses_gso(),
        },
        setup,
        generator_ceiling: ceiling,
        zero_loss,
        points,
        reply_idle,
    })
}

/// The reply-path probe of a Ferry path: a socket of its own in the generator's host, its
/// KEEPALIVE sessions bound, fresh session ids from a random start (far from the load's).
fn start_probe<'m>(
    plan: &Plan,
    bed: &dyn Testbed,
    mint: &'m MintFn<'m>,
) -> anyhow::Result<ReplyProbe<'m>> {
    let socket = bed.generator_socket(SocketAddr::new(bed.generator_ip(), 0))?;
    let random = super::paths::rand8(&ring::rand::SystemRandom::new())?;
    // The load's session ids are below 2^62; these have the top bit set.
    let first = 1 << 63 | u64::from_be_bytes(random) >> 2;
    ReplyProbe::new(
        socket,
        SocketAddr::new(bed.relay_ip_to_generator(), RELAY_PORT),
        mint,
        first,
        plan.probe_rate,
        plan.probe_timeout,
    )
    .context("starting the reply-path probe")
}

/// A latency point, its reply-path figures printed when it has them.
fn point(tag: &str, what: &str, label: String, trial: Trial, reply: Option<ReplyRtt>) -> Point {
    if let Some(r) = &reply {
        reply_progress(tag, what, r);
    }
    Point {
        label,
        trial,
        reply,
    }
}

/// A latency point's trial and, when there is a probe, its reply-path figures from a second
/// window at the same load. The probes get a window of their own because each bind costs the
/// relay a token check (about 200 µs of CPU): run during the data trial, they would add to the
/// relay's CPU per forwarded datagram what the plain forwarder, which is never probed, does not
/// pay, most at the low rates where that figure is compared.
#[allow(clippy::too_many_arguments)]
fn probed_trial(
    plan: &Plan,
    bed: &dyn Testbed,
    path: &RunningPath,
    payload: Payload,
    rate: u64,
    pacing: Pacing,
    probe: Option<&mut ReplyProbe<'_>>,
) -> anyhow::Result<(Trial, Option<ReplyRtt>)> {
    let seconds = plan.latency_seconds;
    let data = trial(plan, bed, path, payload, rate, pacing, seconds)?;
    let reply = match probe {
        Some(probe) => {
            trial_with_probe(plan, bed, path, payload, rate, pacing, seconds, Some(probe))?.1
        }
        None => None,
    };
    Ok((data, reply))
}

fn reply_progress(tag: &str, what: &str, r: &ReplyRtt) {
    let rtt = |f: &super::report::RttFigures| {
        f.rtt_us.map_or("–".into(), |l| {
            format!("{:.0}/{:.0}/{:.0}", l.p50, l.p99, l.max)
        })
    };
    println!(
        "{tag} reply path, {what}: bind p50/p99/max {} µs ({} sent, {} lost, {} failed), \
         keepalive {} µs ({} sent, {} lost, {} failed){}",
        rtt(&r.bind),
        r.bind.sent,
        r.bind.lost,
        r.bind.failed,
        rtt(&r.keepalive),
        r.keepalive.sent,
        r.keepalive.lost,
        r.keepalive.failed,
        r.relay_cpu_ns_per_second
            .map_or(String::new(), |ns| format!(
                "; relay CPU {:.0} µs a second",
                ns / 1000.0
            )),
    );
    if let Some(f) = &r.first_failure {
        println!("{tag} reply path, {what}: a probe failed: {f}");
    }
}

/// RFC 2544-style: the ceiling's delivered rate first, then halving the interval between the
/// highest passing and the lowest failing rate, `search_steps` times or until it is within 1 %.
/// `run_trial` runs one search trial at the rate it is given.
pub(crate) fn search(
    plan: &Plan,
    ceiling: &Trial,
    tag: &str,
    mut run_trial: impl FnMut(u64) -> anyhow::Result<Trial>,
) -> anyhow::Result<ZeroLoss> {
    let mut trials = Vec::new();
    if ceiling.passes(plan.max_loss) {
        // The generator could not offer more than the path carried.
        return Ok(ZeroLoss {
            pps: ceiling.offered_pps,
            body_mbps: ceiling.delivered_body_mbps,
            generator_limited: true,
            at_rate: Some(ceiling.clone()),
            trials: vec![ceiling.clone()],
        });
    }
    let (mut lo, mut hi) = (0.0f64, ceiling.offered_pps);
    let mut best: Option<Trial> = None;
    let mut next = ceiling.delivered_pps.clamp(1.0, hi);
    for step in 0..=plan.search_steps {
        check_interrupted()?;
        let target = next.round().max(1.0) as u64;
        let mut t = run_trial(target)?;
        if !t.passes(plan.max_loss) && load_side_failed(&t, target) {
            // The sink's own socket overflowed, or the generator offered under 90 % of the
            // target: the load CPU was taken from them (other work), which says nothing of
            // the path. The trial is run once more, and the second one counts.
            progress(tag, "load side fell behind, once more", &t, plan.max_loss);
            trials.push(t);
            t = run_trial(target)?;
        }
        let ok = t.passes(plan.max_loss);
        progress(
            tag,
            &format!(
                "search {}/{}: {target} pps",
                step + 1,
                plan.search_steps + 1
            ),
            &t,
            plan.max_loss,
        );
        if ok {
            // A generator that fell behind (descheduled) offered less than asked: what
            // passed is the rate it offered.
            lo = (target as f64).min(t.offered_pps);
            best = Some(t.clone());
        } else {
            hi = target as f64;
        }
        trials.push(t);
        if hi - lo <= 0.01 * hi {
            break;
        }
        next = (lo + hi) / 2.0;
    }
    let body_mbps = best.as_ref().map_or(0.0, |t| t.delivered_body_mbps);
    println!(
        "{tag} zero-loss throughput: {lo:.0} pps ({body_mbps:.1} Mbit/s of body), loss ≤ {} %",
        plan.max_loss * 100.0
    );
    Ok(ZeroLoss {
        pps: lo,
        body_mbps,
        generator_limited: false,
        at_rate: best,
        trials,
    })
}

/// Whether a trial failed on the load side rather than on the path: the sink's socket dropped
/// datagrams, or the generator offered less than 90 % of `target`.
fn load_side_failed(t: &Trial, target: u64) -> bool {
    t.sink_socket_drops > 0 || t.offered_pps < 0.9 * target as f64
}

pub(crate) fn progress(tag: &str, what: &str, t: &Trial, max_loss: f64) {
    println!(
        "{tag} {what}: sent {} ({:.0} pps), relay in {} (+{} socket drops) out {}, sink {} \
         ({:.0} pps, +{} socket drops), loss {:.3} % {}{}",
        t.sent,
        t.offered_pps,
        t.relay.received,
        t.relay.socket_drops,
        t.relay.forwarded,
        t.sink_received,
        t.delivered_pps,
        t.sink_socket_drops,
        t.loss * 100.0,
        if t.passes(max_loss) { "ok" } else { "LOSS" },
        t.latency_us.map_or(String::new(), |l| format!(
            ", p50/p99/p99.9/max {:.0}/{:.0}/{:.0}/{:.0} µs",
            l.p50, l.p99, l.p999, l.max
        )),
    );
}

/// Busy (not idle, not iowait) CPU time of the whole host, ns, from `/proc/stat`.
pub(crate) fn host_busy_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("an empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    // USER_HZ is 100 on every Linux ABI Ferry runs on.
    Ok(total.saturating_sub(idle) * 10_000_000)
}

/// The CPU time of threads `tids` (each a thread of its own, as kernel threads are), ns.
fn threads_cpu_ns(tids: &[u32]) -> anyhow::Result<u64> {
    tids.iter().map(|&t| task_cpu_ns(t)).sum()
}

/// One trial: `rate` (0: as fast as possible) for `seconds`, every stage counted.
pub fn trial(
    plan: &Plan,
    bed: &dyn Testbed,
    path: &RunningPath,
    payload: Payload,
    rate: u64,
    pacing: Pacing,
    seconds: f64,
) -> anyhow::Result<Trial> {
    Ok(trial_with_probe(plan, bed, path, payload, rate, pacing, seconds, None)?.0)
}

/// [`trial`], with `probe` timing the reply path while the generator sends.
#[allow(clippy::too_many_arguments)]
fn trial_with_probe(
    plan: &Plan,
    bed: &dyn Testbed,
    path: &RunningPath,
    payload: Payload,
    rate: u64,
    pacing: Pacing,
    seconds: f64,
    probe: Option<&mut ReplyProbe<'_>>,
) -> anyhow::Result<(Trial, Option<ReplyRtt>)> {
    check_interrupted()?;
    // What an earlier trial left queued at the forwarder goes first (at most 5 s), so that this
    // trial's datagrams do not wait behind it.
    if let Some(port) = path.port {
        let deadline = Instant::now() + Duration::from_secs(5);
        while bed.relay_udp_queued(port)? > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drain(&path.sink)?;
    let before = path.snapshot(bed)?;
    let cpu0 = path.pid.map(task_cpu_ns).transpose()?;
    let kthreads = bed.relay_host_threads();
    let kernel0 = threads_cpu_ns(&kthreads)?;
    let host0 = host_busy_ns()?;
    let sink0 = bed.sink_kernel_counters()?;
    let since = now_ns();
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals = Arc::new(AtomicU64::new(0));
    let sink_socket = path.sink.try_clone()?;
    let load_cpu = plan.load_cpu;
    let sink_thread = {
        let (stop, arrivals) = (Arc::clone(&stop), Arc::clone(&arrivals));
        std::thread::spawn(move || sink(&sink_socket, since, Some(load_cpu), &stop, &arrivals))
    };
    let probe_stop = AtomicBool::new(false);
    let (sent, window) = std::thread::scope(|s| {
        // The probe stops with the generator (and, bounded, a second after it should have).
        let prober = probe.map(|p| s.spawn(|| p.run(seconds + 1.0, Some(load_cpu), &probe_stop)));
        let sent = s
            .spawn(|| {
                path.generator.run(
                    payload,
                    rate,
                    pacing,
                    seconds,
                    Some(load_cpu),
                    &AtomicBool::new(false),
                )
            })
            .join();
        probe_stop.store(true, Ordering::Relaxed);
        (sent, prober.map(|p| p.join()))
    });
    let reply = match window {
        Some(w) => Some(ReplyRtt::from_window(
            &w.map_err(|_| anyhow::anyhow!("the reply-path probe panicked"))??,
            None,
        )),
        None => None,
    };
    // Let the queues drain before counting: until nothing arrived for 30 ms (at most 2 s).
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    let mut seen = arrivals.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(30));
        let now = arrivals.load(Ordering::Relaxed);
        if now == seen || Instant::now() > drain_deadline {
            break;
        }
        seen = now;
    }
    stop.store(true, Ordering::Relaxed);
    let received = sink_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the sink thread panicked"))??;
    let sent = sent.map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
    let after = path.snapshot(bed)?;
    let cpu1 = path.pid.map(task_cpu_ns).transpose()?;
    let kernel1 = threads_cpu_ns(&kthreads)?;
    let host1 = host_busy_ns()?;
    let sink_drops = bed.sink_kernel_counters()?.since(&sink0).udp_rcvbuf_errors;
    let relay = path.counts(&before, &after);
    let secs = sent.seconds.max(1e-9);
    let delivered = received.datagrams;
    let loss = match sent.datagrams {
        0 => 1.0,
        n => n.saturating_sub(delivered) as f64 / n as f64,
    };
    let h = &received.latency;
    let body_per_datagram = match sent.datagrams {
        0 => 0.0,
        n => sent.body_bytes as f64 / n as f64,
    };
    let signed = |a: u64, b: u64| a as i64 - b as i64;
    let trial = Trial {
        target_pps: rate,
        pacing: match rate {
            0 => "blast".into(),
            _ => pacing.label(),
        },
        seconds: secs,
        sent: sent.datagrams,
        offered_pps: sent.datagrams as f64 / secs,
        relay: RelayStage {
            received: relay.received,
            socket_drops: relay.socket_drops,
            forwarded: relay.forwarded,
            fast_forwarded: relay.fast_forwarded,
            source: relay.source,
        },
        xdp_ns_per_run: path.xdp_ns_per_run(&before, &after),
        sink_socket_drops: sink_drops,
        sink_received: delivered,
        stale: received.stale,
        loss,
        lost_before_relay: signed(sent.datagrams, relay.received + relay.socket_drops),
        lost_in_relay: signed(relay.received, relay.forwarded),
        lost_after_relay: signed(relay.forwarded, delivered),
        delivered_pps: delivered as f64 / secs,
        delivered_body_mbps: delivered as f64 * body_per_datagram * 8.0 / secs / 1e6,
        latency_us: Latency::from_ns(h),
        relay_cpu_ns_per_packet: match (cpu0, cpu1) {
            (Some(a), Some(b)) if relay.forwarded > 0 => {
                Some(b.saturating_sub(a) as f64 / relay.forwarded as f64)
            }
            _ => None,
        },
        host_cpu_ns_per_packet: host1.saturating_sub(host0) as f64 / delivered.max(1) as f64,
        relay_host_cpu_ns_per_packet: (!kthreads.is_empty()).then(|| {
            let process = cpu1.zip(cpu0).map_or(0, |(b, a)| b.saturating_sub(a));
            (kernel1.saturating_sub(kernel0) + process) as f64 / delivered.max(1) as f64
        }),
        send_errors: sent.errors,
    };
    Ok((trial, reply))
}
