//! The coordinator of a testbed from a config file ([`super::testbed`]): `ferry-bench run
//! --testbed FILE`. It connects to the agents, starts (or finds) the relay, binds Ferry's
//! sessions with tokens it mints, and runs the same scenarios as on the namespace topology —
//! the generator's ceiling, the zero-loss search ([`super::scenario`]'s), latency points and
//! fixed rates — each trial counted at every stage: what the generators sent, what the relay
//! received and forwarded (its `/metrics`), what the sinks received. It writes the same
//! result and summary, with a `testbed` section saying which machines ran what and how far
//! their clocks could be trusted.
//!
//! One-way latency: a sink subtracts a datagram's send stamp from its arrival time. When the
//! lane's generator and sink are one agent (one process, one clock), that is exact. When they
//! are agents on different machines, both stamp with the realtime clock (anchored when the
//! agent starts), so the figure is one-way latency plus the difference between the two clocks:
//! synchronize them with PTP (sub-microsecond) or chrony (tens of microseconds on a LAN) and
//! read the `testbed.agents[].clock_offset_us` estimates before trusting microseconds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter};
use ferry_core::wire::Slot;
use ferry_testkit::metrics::{http_get, ok_body, sum_metric};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::agent::{AgentClient, Request, Response, Role};
use super::load::{Pacing, Payload};
use super::paths::{PathKind, rss_bytes};
use super::report::{
    BenchResult, GeneratorSetup, Host, Latency, PathRun, Point, RelayStage, RunConfig, Setup,
    Trial, ZeroLoss, capacity_lines, medians, ratios,
};
use super::scenario::{Plan, Scenario, host_busy_ns, progress, search};
use super::testbed::TestbedFile;
use super::{charts, check_interrupted, report, schema};
use crate::cpu::task_cpu_ns;

/// What the result says about a testbed run (`testbed` in result.json).
#[derive(Clone, Debug, Serialize)]
pub struct TestbedReport {
    /// The testbed file.
    pub file: String,
    /// The relay's addresses, and whether the coordinator started it.
    pub relay: RelayReport,
    /// Every agent, as it introduced itself.
    pub agents: Vec<AgentReport>,
    /// Every lane and how its latency reads.
    pub lanes: Vec<LaneReport>,
    /// How far two agents' clocks were allowed to differ, microseconds.
    pub clock_tolerance_us: f64,
}

/// The relay of a testbed run.
#[derive(Clone, Debug, Serialize)]
pub struct RelayReport {
    /// Where generators sent.
    pub generator_side: String,
    /// Where sinks bound.
    pub sink_side: String,
    /// Its admin listener.
    pub admin: String,
    /// Whether the coordinator started it (then its CPU per packet and memory are measured).
    pub started_by_coordinator: bool,
}

/// An agent of a testbed run.
#[derive(Clone, Debug, Serialize)]
pub struct AgentReport {
    /// Its name in the file.
    pub name: String,
    /// Its control address.
    pub control: String,
    /// Its machine's host name.
    pub hostname: String,
    /// Its machine's CPUs.
    pub cpus: usize,
    /// `realtime` (stamps in nanoseconds since 1970) or `process` (since the agent started).
    pub clock: String,
    /// Its clock minus the coordinator's, estimated from one request, microseconds (null for a
    /// `process` clock).
    pub clock_offset_us: Option<f64>,
    /// Half that request's round trip: the estimate's uncertainty, microseconds.
    pub clock_uncertainty_us: f64,
}

/// A lane of a testbed run.
#[derive(Clone, Debug, Serialize)]
pub struct LaneReport {
    /// The generator's agent.
    pub generator: String,
    /// The sink's agent.
    pub sink: String,
    /// The generator's socket.
    pub generator_addr: String,
    /// The sink's socket.
    pub sink_addr: String,
    /// `exact` (generator and sink are one agent) or `one-way across clocks` (two agents:
    /// latency includes the difference of their clocks).
    pub latency: String,
}

/// A relay process the coordinator started: stopped (SIGTERM, then SIGKILL after 5 s) on drop.
struct StartedRelay {
    child: Child,
    log: PathBuf,
    _dir: ferry_testkit::TempDir,
}

impl StartedRelay {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StartedRelay {
    fn drop(&mut self) {
        ferry_testkit::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// The relay's counters on its `/metrics` page.
#[derive(Clone, Copy)]
struct RelayCounters {
    /// Datagrams its workers received.
    received: u64,
    /// Datagrams it forwarded, by its workers or in XDP.
    forwarded: u64,
    /// Of those, forwarded by the XDP fast path (which its workers never see).
    fast_forwarded: u64,
    /// Datagrams the kernel dropped at the workers' full sockets.
    socket_drops: u64,
}

fn relay_counters(admin: SocketAddr) -> anyhow::Result<RelayCounters> {
    let response = http_get(admin, "/metrics");
    let page = ok_body(&response)
        .with_context(|| format!("the relay's /metrics at {admin} could not be read"))?;
    Ok(RelayCounters {
        received: sum_metric(page, "ferry_worker_rx_packets"),
        forwarded: sum_metric(page, "ferry_forwarded_packets"),
        fast_forwarded: sum_metric(page, "ferry_xdp_fast_forwarded_packets"),
        socket_drops: sum_metric(page, "ferry_worker_socket_drops"),
    })
}

/// Starts the relay with `command` when given, then waits until `/readyz` answers.
fn start_relay(bed: &TestbedFile) -> anyhow::Result<Option<StartedRelay>> {
    let admin = bed.relay.admin;
    let deadline = Instant::now() + Duration::from_secs(bed.relay.ready_timeout_secs);
    let mut started = None;
    if let Some(cmd) = &bed.relay.command {
        let dir = ferry_testkit::temp_dir("testbed-relay")?;
        let log = dir.path().join("relay.log");
        let child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting the relay: {}", cmd.join(" ")))?;
        started = Some(StartedRelay {
            child,
            log,
            _dir: dir,
        });
    }
    loop {
        check_interrupted()?;
        if ok_body(&http_get(admin, "/readyz")).is_some() {
            return Ok(started);
        }
        if let Some(relay) = started.as_mut()
            && let Some(status) = relay.child.try_wait()?
        {
            bail!("the relay exited ({status}): {}", relay.log_text());
        }
        if Instant::now() > deadline {
            bail!(
                "the relay's /readyz at {admin} did not answer 200 within {} s{}",
                bed.relay.ready_timeout_secs,
                started
                    .as_ref()
                    .map_or(" (relay.command is not set: is it running?)".into(), |r| {
                        format!("; its log: {}", r.log_text())
                    })
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One lane's connections and sockets.
struct Lane {
    generator: AgentClient,
    sink: AgentClient,
    generator_socket: u32,
    sink_socket: u32,
    sink_local: SocketAddr,
    /// 0 when generator and sink are one agent.
    tolerance_ns: u64,
    /// Ferry's sessions, when bound: the first id (they are consecutive).
    ferry_first: Option<u64>,
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Hello to one agent: its report.
fn hello(client: &mut AgentClient, control: SocketAddr) -> anyhow::Result<AgentReport> {
    let t0 = realtime_ns();
    let answer = client.call(&Request::Hello {})?;
    let t1 = realtime_ns();
    let Response::Hello {
        version,
        hostname,
        cpus,
        clock_ns,
        realtime,
    } = answer
    else {
        bail!("agent {}: unexpected answer {answer:?}", client.name);
    };
    if version != super::agent::PROTOCOL_VERSION {
        bail!("agent {}: protocol version {version}", client.name);
    }
    let mid = t0 / 2 + t1 / 2;
    Ok(AgentReport {
        name: client.name.clone(),
        control: control.to_string(),
        hostname,
        cpus,
        clock: if realtime { "realtime" } else { "process" }.into(),
        clock_offset_us: realtime.then(|| (clock_ns as i128 - mid as i128) as f64 / 1000.0),
        clock_uncertainty_us: t1.saturating_sub(t0) as f64 / 2000.0,
    })
}

/// A testbed being run.
struct Run<'a> {
    bed: &'a TestbedFile,
    lanes: Vec<Lane>,
    plan: Plan,
    relay: Option<StartedRelay>,
    minter: Option<&'a TokenMinter>,
    rng: ring::rand::SystemRandom,
    /// Whether every generator sent with UDP GSO in every trial so far.
    gso: bool,
}

impl Run<'_> {
    fn relay_pid(&self) -> Option<u32> {
        self.relay.as_ref().map(|r| r.child.id())
    }

    fn target(&self, kind: PathKind, lane: &Lane) -> anyhow::Result<SocketAddr> {
        Ok(match kind {
            PathKind::Direct => lane.sink_local,
            PathKind::Ferry => self.bed.relay.generator_side,
            PathKind::Plain => self.bed.plain.context("no plain forwarder address")?,
            other => bail!(
                "the {} path runs only on the namespace topology",
                other.name()
            ),
        })
    }

    fn mint(&self, session: u64, slot: Slot) -> anyhow::Result<MintedToken> {
        let (Some(minter), Some(g)) = (self.minter, &self.bed.gateway) else {
            bail!("no [gateway] to mint tokens with");
        };
        let now = UnixTime::from(SystemTime::now());
        let input = ClaimsInput {
            slot,
            relay_id: self.bed.relay.id,
            session_id: session,
            not_before: now.saturating_sub(5),
            expires: now.saturating_add(g.token_lifetime_secs),
            rate_bytes_per_sec: g.session_rate_bytes,
        };
        minter
            .mint(&self.rng, &input, &self.bed.relay.public_key)
            .context("minting a token")
    }

    /// Fresh Ferry sessions on every lane: slot A from its generator, slot B from its sink.
    fn bind_ferry(&mut self, tag: &str) -> anyhow::Result<Setup> {
        let sessions = self.plan.sessions as u64;
        let first = (u64::from_be_bytes(super::paths::rand8(&self.rng)?) >> 2) | 1;
        let rss_before = self.relay_pid().and_then(|p| rss_bytes(p).ok());
        let mut bind_seconds = 0.0;
        for i in 0..self.lanes.len() {
            let lane_first = first + i as u64 * sessions;
            let mut a = Vec::with_capacity(sessions as usize);
            let mut bside = Vec::with_capacity(sessions as usize);
            for s in lane_first..lane_first + sessions {
                if s % 1024 == 0 {
                    check_interrupted()?;
                }
                a.push(self.mint(s, Slot::A)?);
                bside.push(self.mint(s, Slot::B)?);
            }
            let (generator_side, sink_side) =
                (self.bed.relay.generator_side, self.bed.relay.sink_side);
            let lane = &mut self.lanes[i];
            // Each slot's binds go in chunks, A then B, so that a session is complete once both
            // chunks are through; the relay forwards nothing before.
            bind_seconds += lane
                .generator
                .bind(lane.generator_socket, generator_side, &a)?;
            bind_seconds += lane.sink.bind(lane.sink_socket, sink_side, &bside)?;
            lane.ferry_first = Some(lane_first);
        }
        let total = sessions as usize * self.lanes.len();
        println!(
            "{tag} {total} sessions bound in {bind_seconds:.3} s ({:.0}/s)",
            total as f64 / bind_seconds.max(1e-9)
        );
        let rss_after = self.relay_pid().and_then(|p| rss_bytes(p).ok());
        Ok(Setup {
            bind_seconds: Some(bind_seconds),
            binds_per_second: (bind_seconds > 0.0).then(|| total as f64 / bind_seconds),
            rss_before_bytes: rss_before,
            rss_after_bytes: rss_after,
            rss_per_session_bytes: rss_before
                .zip(rss_after)
                .map(|(a, b)| b.saturating_sub(a) as f64 / total.max(1) as f64),
        })
    }

    /// One trial on every lane at once: `rate` in all (0: as fast as they can).
    fn trial(
        &mut self,
        kind: PathKind,
        payload: Payload,
        rate: u64,
        pacing: Pacing,
        seconds: f64,
    ) -> anyhow::Result<Trial> {
        check_interrupted()?;
        let ferry = kind == PathKind::Ferry;
        let admin = self.bed.relay.admin;
        let before = ferry.then(|| relay_counters(admin)).transpose()?;
        let pid = if ferry { self.relay_pid() } else { None };
        let cpu0 = pid.map(task_cpu_ns).transpose()?;
        let host0 = host_busy_ns()?;
        let sink_cpu = self.bed.sink_cpu;
        for lane in &mut self.lanes {
            lane.sink.call(&Request::StartSink {
                socket: lane.sink_socket,
                cpu: sink_cpu,
                clock_tolerance_ns: lane.tolerance_ns,
            })?;
        }
        let n = self.lanes.len() as u64;
        let per_lane = rate.div_ceil(n);
        let burst = match pacing {
            Pacing::Constant => 0,
            Pacing::Bursty { burst } => burst,
        };
        let mut requests = Vec::new();
        for lane in &self.lanes {
            let (first_session, sessions) = match (kind, lane.ferry_first) {
                (PathKind::Ferry, Some(first)) => (first, self.plan.sessions as u64),
                (PathKind::Ferry, None) => bail!("Ferry's sessions are not bound"),
                _ => (1, self.plan.sessions as u64),
            };
            requests.push(Request::Send {
                socket: lane.generator_socket,
                target: self.target(kind, lane)?,
                first_session,
                sessions,
                payload: payload.label(),
                rate: per_lane,
                burst,
                seconds,
                cpu: self.bed.generator_cpu,
            });
        }
        let sent: Vec<anyhow::Result<Response>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .lanes
                .iter_mut()
                .zip(&requests)
                .map(|(lane, request)| s.spawn(move || lane.generator.call(request)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a generator thread panicked"))?
                })
                .collect()
        });
        let (mut datagrams, mut body_bytes, mut secs, mut errors) = (0u64, 0u64, 0f64, 0u64);
        let mut failure = None;
        for s in sent {
            match s {
                Ok(Response::Sent {
                    datagrams: d,
                    body_bytes: b,
                    seconds: t,
                    errors: e,
                    gso,
                }) => {
                    self.gso &= gso;
                    datagrams += d;
                    body_bytes += b;
                    secs = secs.max(t);
                    errors += e;
                }
                Ok(other) => failure = Some(anyhow::anyhow!("unexpected answer {other:?}")),
                Err(e) => failure = Some(e),
            }
        }
        // Every sink is stopped, also when a generator failed.
        let mut latency = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)?;
        let (mut delivered, mut stale, mut ahead, mut sink_drops) = (0u64, 0u64, 0u64, 0u64);
        for lane in &mut self.lanes {
            let r = lane.sink.stop_sink(lane.sink_socket)?;
            delivered += r.datagrams;
            stale += r.stale;
            ahead += r.ahead;
            sink_drops += r.rcvbuf_errors;
            latency
                .add(&r.latency)
                .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        }
        if let Some(e) = failure {
            return Err(e.context("a generator failed"));
        }
        if ahead > 0 {
            println!(
                "  warning: {ahead} datagrams arrived stamped later than their arrival: a \
                 generator's clock is ahead of its sink's (see clock_offset_us)"
            );
        }
        let after = before.map(|_| relay_counters(admin)).transpose()?;
        let cpu1 = pid.map(task_cpu_ns).transpose()?;
        let host1 = host_busy_ns()?;
        let relay = match (before, after) {
            (Some(b), Some(a)) => {
                // What the fast path forwarded never reached a worker: it was received too.
                let fast = a.fast_forwarded.saturating_sub(b.fast_forwarded);
                RelayStage {
                    received: a.received.saturating_sub(b.received) + fast,
                    socket_drops: a.socket_drops.saturating_sub(b.socket_drops),
                    forwarded: a.forwarded.saturating_sub(b.forwarded),
                    fast_forwarded: fast,
                    source: "metrics",
                }
            }
            // No relay stage is counted on these paths: everything lost is lost on the way.
            _ => RelayStage {
                received: delivered,
                socket_drops: 0,
                forwarded: delivered,
                fast_forwarded: 0,
                source: "none",
            },
        };
        let secs = secs.max(1e-9);
        let loss = match datagrams {
            0 => 1.0,
            n => n.saturating_sub(delivered) as f64 / n as f64,
        };
        let body_per_datagram = match datagrams {
            0 => 0.0,
            n => body_bytes as f64 / n as f64,
        };
        let signed = |a: u64, b: u64| a as i64 - b as i64;
        Ok(Trial {
            target_pps: rate,
            pacing: match rate {
                0 => "blast".into(),
                _ => pacing.label(),
            },
            seconds: secs,
            sent: datagrams,
            offered_pps: datagrams as f64 / secs,
            relay,
            sink_socket_drops: sink_drops,
            sink_received: delivered,
            stale,
            loss,
            lost_before_relay: signed(datagrams, relay.received + relay.socket_drops),
            lost_in_relay: signed(relay.received, relay.forwarded),
            lost_after_relay: signed(relay.forwarded, delivered),
            delivered_pps: delivered as f64 / secs,
            delivered_body_mbps: delivered as f64 * body_per_datagram * 8.0 / secs / 1e6,
            latency_us: Latency::from_ns(&latency),
            relay_cpu_ns_per_packet: match (cpu0, cpu1) {
                (Some(a), Some(b)) if relay.forwarded > 0 => {
                    Some(b.saturating_sub(a) as f64 / relay.forwarded as f64)
                }
                _ => None,
            },
            host_cpu_ns_per_packet: host1.saturating_sub(host0) as f64 / delivered.max(1) as f64,
            // The XDP programs' run time is read from the relay process's BPF file descriptors
            // in the namespace topology; a testbed does not read it.
            relay_host_cpu_ns_per_packet: None,
            xdp_ns_per_run: None,
            send_errors: errors,
        })
    }

    /// The namespace harness's sequence for one path and payload: a warm-up, the ceiling,
    /// the search, the latency points, the fixed rates.
    fn measure(&mut self, kind: PathKind, payload: Payload) -> anyhow::Result<PathRun> {
        self.gso = true;
        let plan: Plan = self.plan.clone();
        let tag = format!("[{} B {}]", payload.label(), kind.name());
        let setup = match kind {
            PathKind::Ferry => self.bind_ferry(&tag)?,
            _ => Setup::default(),
        };
        self.trial(kind, payload, 1000, Pacing::Constant, 0.3)?;
        let ceiling = self.trial(kind, payload, 0, plan.pacing, plan.trial_seconds)?;
        progress(
            &tag,
            "generator ceiling (as fast as it can)",
            &ceiling,
            plan.max_loss,
        );
        let wants = |s: Scenario| plan.scenarios.contains(&s);
        let mut zero_loss: Option<ZeroLoss> = None;
        if wants(Scenario::Throughput) || wants(Scenario::Latency) {
            zero_loss = Some(search(&plan, &ceiling, &tag, |target| {
                self.trial(kind, payload, target, plan.pacing, plan.trial_seconds)
            })?);
        }
        let mut points = Vec::new();
        let mut point = |run: &mut Self, label: String, what: String, rate: u64, pacing| {
            let t = run.trial(kind, payload, rate, pacing, plan.latency_seconds)?;
            progress(&tag, &what, &t, plan.max_loss);
            points.push(Point {
                label,
                trial: t,
                reply: None,
            });
            anyhow::Ok(())
        };
        if wants(Scenario::Latency) {
            let rate = zero_loss.as_ref().map_or(0.0, |z| z.pps);
            for &f in &plan.latency_fractions {
                let target = (rate * f).round() as u64;
                if target == 0 {
                    continue;
                }
                let label = format!("{:.0}%", f * 100.0);
                let what = format!("latency at {label} ({target} pps)");
                point(self, label, what, target, plan.pacing)?;
            }
            let what = format!("low steady rate ({} pps)", plan.low_rate);
            point(self, "low".into(), what, plan.low_rate, Pacing::Constant)?;
        }
        if wants(Scenario::Rates) {
            for &rate in &plan.fixed_rates {
                let what = format!("fixed {rate} pps");
                point(self, "fixed".into(), what, rate, plan.pacing)?;
            }
        }
        Ok(PathRun {
            round: 1,
            payload: payload.label(),
            mean_body_bytes: payload.mean_bytes(),
            path: kind.name().into(),
            sessions: plan.sessions * self.lanes.len(),
            setup,
            generator_ceiling: ceiling,
            zero_loss,
            points,
            workers: 1,
            generator: GeneratorSetup {
                sockets: self.lanes.len(),
                gso: self.gso,
            },
            // The reply-path probe runs on the namespace topology only.
            reply_idle: None,
        })
    }
}

/// Runs the testbed `bed` with `scenarios` (empty: the file's), printing a progress line per
/// trial.
pub fn run(bed: &TestbedFile, scenarios: &[Scenario]) -> anyhow::Result<BenchResult> {
    let started = Instant::now();
    let started_unix = realtime_ns() / 1_000_000_000;
    // Read now: the report labels the load average as the one at the start.
    let host = Host::here();
    let mut plan = bed.plan.clone();
    if !scenarios.is_empty() {
        if let Some(s) = scenarios
            .iter()
            .find(|s| matches!(s, Scenario::Scale | Scenario::Flood))
        {
            bail!(
                "the {} scenario runs only on the namespace topology",
                s.name()
            );
        }
        plan.scenarios = scenarios.to_vec();
        plan.scenarios.sort();
        plan.scenarios.dedup();
    }
    let topology = describe(bed);
    println!("ferry-bench: {topology}");

    // The agents: two connections per lane (generator, sink), each agent introduced once.
    let mut agents: Vec<AgentReport> = Vec::new();
    let mut lanes = Vec::new();
    let mut lane_reports = Vec::new();
    for spec in &bed.lanes {
        let (g, s) = (&bed.agents[spec.generator], &bed.agents[spec.sink]);
        let mut generator = AgentClient::connect(&g.name, g.control, &bed.secret)?;
        let mut sink = AgentClient::connect(&s.name, s.control, &bed.secret)?;
        for (client, spec) in [(&mut generator, g), (&mut sink, s)] {
            if !agents.iter().any(|a| a.name == spec.name) {
                agents.push(hello(client, spec.control)?);
            }
        }
        let same = spec.generator == spec.sink;
        if !same {
            for name in [&g.name, &s.name] {
                if agents
                    .iter()
                    .any(|a| &a.name == name && a.clock != "realtime")
                {
                    bail!(
                        "agent {name} does not stamp with the realtime clock, so a sink on \
                         another agent cannot time its datagrams (run it as ferry-bench agent)"
                    );
                }
            }
        }
        let (generator_socket, generator_local) =
            generator.open(Role::Generator, SocketAddr::new(spec.generator_ip, 0))?;
        let (sink_socket, sink_local) = sink.open(Role::Sink, spec.sink_addr)?;
        lane_reports.push(LaneReport {
            generator: g.name.clone(),
            sink: s.name.clone(),
            generator_addr: generator_local.to_string(),
            sink_addr: sink_local.to_string(),
            latency: if same {
                "exact"
            } else {
                "one-way across clocks"
            }
            .into(),
        });
        lanes.push(Lane {
            generator,
            sink,
            generator_socket,
            sink_socket,
            sink_local,
            tolerance_ns: if same { 0 } else { bed.clock_tolerance_ns },
            ferry_first: None,
        });
    }
    for a in &agents {
        println!(
            "agent {} at {}: {} ({} CPUs), {} clock{}",
            a.name,
            a.control,
            a.hostname,
            a.cpus,
            a.clock,
            a.clock_offset_us.map_or(String::new(), |o| format!(
                ", {o:.0} ± {:.0} µs from this machine's",
                a.clock_uncertainty_us
            ))
        );
    }

    let uses_relay = plan.paths.contains(&PathKind::Ferry);
    let relay = if uses_relay { start_relay(bed)? } else { None };
    let mut run = Run {
        bed,
        plan: plan.clone(),
        lanes,
        relay,
        minter: bed.gateway.as_ref().map(|g| &g.minter),
        rng: ring::rand::SystemRandom::new(),
        gso: true,
    };
    let mut runs = Vec::new();
    let rounds = 1..=plan.rounds.max(1);
    for (round, &payload) in rounds.flat_map(|r| plan.payloads.iter().map(move |p| (r, p))) {
        for &kind in &plan.paths {
            let r = run.measure(kind, payload).with_context(|| {
                match run.relay.as_ref().map(StartedRelay::log_text) {
                    Some(log) if kind == PathKind::Ferry && !log.is_empty() => {
                        format!("measuring {}; the relay's log:\n{log}", kind.name())
                    }
                    _ => format!("measuring {}", kind.name()),
                }
            })?;
            runs.push(PathRun { round, ..r });
        }
    }
    let started_by_coordinator = run.relay.is_some();
    drop(run);

    let ratios = ratios(&runs, plan.max_loss);
    let medians = medians(&ratios);
    let capacity = capacity_lines(&runs, plan.max_loss)
        .into_iter()
        .map(|l| {
            l.replace("this host carries", "this testbed carried")
                .replace(
                    "through one ferry-relay worker",
                    "through the relay under test",
                )
        })
        .collect();
    Ok(BenchResult {
        schema: report::SCHEMA_NAME,
        version: report::SCHEMA_VERSION,
        started_unix,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        profile: plan.profile.clone(),
        host,
        topology,
        config: RunConfig {
            scenarios: plan.scenarios.iter().map(|s| s.name().into()).collect(),
            payloads: plan.payloads.iter().map(Payload::label).collect(),
            paths: plan.paths.iter().map(|p| p.name().into()).collect(),
            sessions: plan.sessions * bed.lanes.len(),
            max_loss: plan.max_loss,
            trial_seconds: plan.trial_seconds,
            latency_seconds: plan.latency_seconds,
            search_steps: plan.search_steps,
            pacing: plan.pacing.label(),
            latency_fractions: plan.latency_fractions.clone(),
            low_rate: plan.low_rate,
            fixed_rates: plan.fixed_rates.clone(),
            scale_sessions: Vec::new(),
            flood_legit_rate: plan.flood_legit_rate,
            relay_cpu: plan.relay_cpu,
            load_cpu: plan.load_cpu,
            max_workers: plan.max_workers,
            generator_gso: plan.gso,
            flood_generator: "packet".into(),
            probe_rate: plan.probe_rate,
            probe_timeout_ms: plan.probe_timeout.as_millis() as u64,
            rounds: plan.rounds.max(1),
        },
        skipped: Vec::new(),
        runs,
        scale: Vec::new(),
        workers: Vec::new(),
        flood: Vec::new(),
        ratios,
        medians,
        capacity,
        testbed: Some(TestbedReport {
            file: bed.path.display().to_string(),
            relay: RelayReport {
                generator_side: bed.relay.generator_side.to_string(),
                sink_side: bed.relay.sink_side.to_string(),
                admin: bed.relay.admin.to_string(),
                started_by_coordinator,
            },
            agents,
            lanes: lane_reports,
            clock_tolerance_us: bed.clock_tolerance_ns as f64 / 1000.0,
        }),
    })
}

/// The testbed in words, for `topology`.
fn describe(bed: &TestbedFile) -> String {
    let lanes: Vec<String> = bed
        .lanes
        .iter()
        .map(|l| {
            format!(
                "{} ({}) → {} ({})",
                bed.agents[l.generator].name, l.generator_ip, bed.agents[l.sink].name, l.sink_addr
            )
        })
        .collect();
    format!(
        "testbed {}: relay at {} (generators) / {} (sinks), lanes {}",
        bed.path.display(),
        bed.relay.generator_side,
        bed.relay.sink_side,
        lanes.join(", ")
    )
}

/// Writes result.json (checked against the schema), the charts and summary.md (with the
/// testbed's own section when the run was on a testbed) to `out`; returns the summary. Both
/// the namespace and the testbed runs write their reports with it.
pub fn write_report(result: &BenchResult, out: &Path) -> anyhow::Result<String> {
    let json = serde_json::to_value(result)?;
    schema::validate(&json).context("the result does not match its own schema")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("result.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let charts = charts::draw(result, out).context("drawing the charts")?;
    let mut md = report::markdown(result);
    if let Some(t) = &result.testbed {
        // The namespace topology's CPU line says nothing about machines the agents pinned.
        let cpus = format!(
            "- forwarders on CPU {}, generator and sink on CPU {}\n",
            result.config.relay_cpu, result.config.load_cpu
        );
        md = md.replacen(&cpus, "", 1);
        md.push_str(&testbed_markdown(t));
    }
    if !charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for chart in &charts {
            if let Some(name) = chart.file_name().and_then(|n| n.to_str()) {
                md.push_str(&format!("![{name}]({name})\n"));
            }
        }
    }
    std::fs::write(out.join("summary.md"), &md)?;
    Ok(md)
}

fn testbed_markdown(t: &TestbedReport) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Testbed ({})\n\nRelay: generators send to {}, sinks bind at {}, counters from \
         http://{}/metrics; {}.\n\n| agent | control | host | CPUs | clock | offset from the \
         coordinator |\n|---|---|---|---:|---|---:|",
        t.file,
        t.relay.generator_side,
        t.relay.sink_side,
        t.relay.admin,
        if t.relay.started_by_coordinator {
            "started by the coordinator (relay CPU and memory measured)"
        } else {
            "already running (relay CPU and memory not measured)"
        }
    );
    for a in &t.agents {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            a.name,
            a.control,
            a.hostname,
            a.cpus,
            a.clock,
            a.clock_offset_us.map_or("–".into(), |o| format!(
                "{o:.0} ± {:.0} µs",
                a.clock_uncertainty_us
            )),
        );
    }
    let _ = writeln!(
        md,
        "\n| lane | generator | sink | latency |\n|---|---|---|---|"
    );
    for (i, l) in t.lanes.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {i} | {} ({}) | {} ({}) | {} |",
            l.generator, l.generator_addr, l.sink, l.sink_addr, l.latency
        );
    }
    let _ = writeln!(
        md,
        "\nLatency of a lane whose generator and sink are one agent is exact; across two \
         agents it is one-way latency plus the difference of their clocks (tolerance {:.0} µs): \
         synchronize them with PTP or chrony.",
        t.clock_tolerance_us
    );
    md
}
