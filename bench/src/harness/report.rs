//! What a run writes: the JSON result (schema `ferry-bench/result`, version
//! [`SCHEMA_VERSION`], described by docs/bench-result.schema.json), a Markdown summary, and
//! the capacity lines.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// The `schema` field of every result.
pub const SCHEMA_NAME: &str = "ferry-bench/result";
/// The `version` field: raised whenever a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 5;

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Always [`SCHEMA_NAME`].
    pub schema: &'static str,
    /// Always [`SCHEMA_VERSION`].
    pub version: u32,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// How long it took, seconds.
    pub elapsed_seconds: f64,
    /// `quick` or `full`.
    pub profile: String,
    /// The machine.
    pub host: Host,
    /// The topology, in words.
    pub topology: String,
    /// What was asked for.
    pub config: RunConfig,
    /// Paths that were asked for and not measured, and why.
    pub skipped: Vec<Skipped>,
    /// One entry per round, payload and path.
    pub runs: Vec<PathRun>,
    /// The scale scenario: Ferry with the first payload, one entry per session count.
    pub scale: Vec<PathRun>,
    /// The workers scenario: Ferry with the first payload, one entry per worker count.
    pub workers: Vec<PathRun>,
    /// The flood scenario: Ferry with the first payload, guard off and on, flood off and on.
    pub flood: Vec<FloodRun>,
    /// Every Ferry figure against every baseline of the same payload and round.
    pub ratios: Vec<Ratio>,
    /// With more than one round: per Ferry figure and baseline, the median over the rounds
    /// (empty with one round).
    pub medians: Vec<MedianRatio>,
    /// Capacity lines, one per payload Ferry was measured with.
    pub capacity: Vec<String>,
    /// The machines of a run on a testbed from a config file (absent on the namespace
    /// topology).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub testbed: Option<super::remote::TestbedReport>,
}

/// The machine a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Host {
    /// CPUs online.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The 1-minute load average when the run started (other work competes for the CPUs).
    pub load_average_start: f64,
    /// How idle CPUs wait for work, which decides much of what a datagram costs below
    /// saturation (docs/bench.md, "Idle states").
    pub idle: IdlePolicy,
}

impl Host {
    /// This machine, now: its CPUs, kernel release, 1-minute load average and idle policy.
    pub fn here() -> Self {
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            load_average_start: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(f64::NAN),
            idle: IdlePolicy::read(Path::new("/"), read_cpu_latency_limit()),
        }
    }
}

/// How a machine's idle CPUs wait for work. A CPU that halts (or, in a virtual machine, gives
/// its host core away) until the next datagram wakes later and with colder caches than one
/// that polls; at 1,000 datagrams a second that changed relay CPU per packet 2–3× here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdlePolicy {
    /// The cpuidle driver (`/sys/devices/system/cpu/cpuidle/current_driver`: `intel_idle`,
    /// `acpi_idle`, `haltpoll`, …); `None` where the kernel runs none.
    pub driver: Option<String>,
    /// The cpuidle governor (`current_governor`, or `current_governor_ro`).
    pub governor: Option<String>,
    /// How long an idle virtual CPU polls before it halts (`haltpoll`'s `guest_halt_poll_ns`);
    /// `None` where that module is not loaded.
    pub guest_halt_poll_ns: Option<u64>,
    /// The limit on every CPU's wake-up latency that programs hold through
    /// `/dev/cpu_dma_latency`, µs; `None` when there is none (or it cannot be read).
    pub cpu_latency_limit_us: Option<u64>,
    /// CPUs with a wake-up latency limit of their own (`power/pm_qos_resume_latency_us`),
    /// in CPU order; a CPU without one is left out.
    pub cpu_resume_limits: Vec<CpuResumeLimit>,
}

/// One CPU's own wake-up latency limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuResumeLimit {
    /// The CPU.
    pub cpu: usize,
    /// The limit, µs; 0 for `n/a`, where the CPU idles by polling only.
    pub limit_us: u64,
}

/// The value `/dev/cpu_dma_latency` reports when no program asks for a limit (2,000 s).
const NO_CPU_LATENCY_LIMIT_US: i32 = 2_000_000_000;

/// The system-wide CPU latency limit, µs, or `None` when there is none or the device cannot
/// be read (it is root's). Opening the device adds a request for "no limit", which ends
/// when the file is closed, so reading it changes nothing.
fn read_cpu_latency_limit() -> Option<u64> {
    let mut value = [0u8; 4];
    std::fs::File::open("/dev/cpu_dma_latency")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut value))
        .ok()?;
    match i32::from_ne_bytes(value) {
        NO_CPU_LATENCY_LIMIT_US => None,
        limit => u64::try_from(limit).ok(),
    }
}

impl IdlePolicy {
    /// Reads the policy from the sysfs below `root` (`/` for this machine), with the
    /// system-wide limit read separately.
    pub fn read(root: &Path, cpu_latency_limit_us: Option<u64>) -> Self {
        let text = |path: &str| {
            std::fs::read_to_string(root.join(path))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty() && t != "none")
        };
        let cpuidle = "sys/devices/system/cpu/cpuidle";
        let mut cpu_resume_limits = Vec::new();
        if let Ok(entries) = std::fs::read_dir(root.join("sys/devices/system/cpu")) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(cpu) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("cpu"))
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                let limit = match text(&format!(
                    "sys/devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us"
                ))
                .as_deref()
                {
                    Some("n/a") => Some(0),
                    // 0 is "no limit".
                    Some(us) => us.parse::<u64>().ok().filter(|&us| us > 0),
                    None => None,
                };
                if let Some(limit_us) = limit {
                    cpu_resume_limits.push(CpuResumeLimit { cpu, limit_us });
                }
            }
        }
        cpu_resume_limits.sort_by_key(|l| l.cpu);
        Self {
            driver: text(&format!("{cpuidle}/current_driver")),
            governor: text(&format!("{cpuidle}/current_governor"))
                .or_else(|| text(&format!("{cpuidle}/current_governor_ro"))),
            guest_halt_poll_ns: text("sys/module/haltpoll/parameters/guest_halt_poll_ns")
                .and_then(|ns| ns.parse().ok()),
            cpu_latency_limit_us,
            cpu_resume_limits,
        }
    }

    /// One line for the summary: "cpuidle haltpoll (governor haltpoll), idle vCPUs poll 0 ns
    /// before they halt, no CPU latency limit".
    pub fn describe(&self) -> String {
        let mut parts = vec![match (&self.driver, &self.governor) {
            (Some(d), Some(g)) => format!("cpuidle {d} (governor {g})"),
            (Some(d), None) => format!("cpuidle {d}"),
            (None, _) => "no cpuidle driver".to_string(),
        }];
        if let Some(ns) = self.guest_halt_poll_ns {
            parts.push(format!("idle vCPUs poll {ns} ns before they halt"));
        }
        parts.push(match self.cpu_latency_limit_us {
            Some(0) => "every CPU idles by polling (/dev/cpu_dma_latency 0)".to_string(),
            Some(us) => format!("CPU wake-up latency limited to {us} µs"),
            None => "no CPU latency limit".to_string(),
        });
        let polling: Vec<String> = self
            .cpu_resume_limits
            .iter()
            .map(|l| match l.limit_us {
                0 => format!("CPU {} polls", l.cpu),
                us => format!("CPU {} wakes within {us} µs", l.cpu),
            })
            .collect();
        if !polling.is_empty() {
            parts.push(polling.join(", "));
        }
        parts.join(", ")
    }
}

/// The run's settings.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    /// Scenarios run.
    pub scenarios: Vec<String>,
    /// Payloads (DATA body bytes, or `imix`).
    pub payloads: Vec<String>,
    /// Paths asked for.
    pub paths: Vec<String>,
    /// Concurrent sessions.
    pub sessions: usize,
    /// The loss a zero-loss trial may have, a fraction.
    pub max_loss: f64,
    /// Seconds per search trial.
    pub trial_seconds: f64,
    /// Seconds per latency point.
    pub latency_seconds: f64,
    /// Search trials after the first.
    pub search_steps: u32,
    /// `constant` or `bursty-N`.
    pub pacing: String,
    /// Fractions of the zero-loss rate the latency scenario measures at.
    pub latency_fractions: Vec<f64>,
    /// The low steady rate, datagrams per second.
    pub low_rate: u64,
    /// The fixed offered rates of the `rates` scenario.
    pub fixed_rates: Vec<u64>,
    /// The session counts of the `scale` scenario.
    pub scale_sessions: Vec<usize>,
    /// The legitimate rate of the `flood` scenario, datagrams per second.
    pub flood_legit_rate: u64,
    /// What sends the flood: `packet` (a packet socket) or `xdp` (the XDP flood generator).
    pub flood_generator: String,
    /// The CPU every forwarder is pinned to.
    pub relay_cpu: usize,
    /// The CPU of the generator and the sink.
    pub load_cpu: usize,
    /// The largest worker count of the `workers` scenario (no larger than the CPUs).
    pub max_workers: usize,
    /// Whether the generator was allowed UDP GSO.
    pub generator_gso: bool,
    /// Reply-path probes of each kind (bind, KEEPALIVE) a second at Ferry's latency points
    /// (0: none).
    pub probe_rate: u64,
    /// How long a probe waits for each answer before it counts as lost, milliseconds.
    pub probe_timeout_ms: u64,
    /// How many times the per-path scenarios ran, every path of a payload once per round.
    pub rounds: u32,
}

/// A path that was not measured.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// The path.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// One path with one payload, in one round.
#[derive(Clone, Debug, Serialize)]
pub struct PathRun {
    /// The round, from 1 (always 1 in the scale and workers scenarios).
    pub round: u32,
    /// The payload.
    pub payload: String,
    /// Mean DATA body bytes.
    pub mean_body_bytes: f64,
    /// The path.
    pub path: String,
    /// Concurrent sessions.
    pub sessions: usize,
    /// The relay's workers (1 but in the `workers` scenario; baselines have one thread).
    pub workers: usize,
    /// How the generator sent.
    pub generator: GeneratorSetup,
    /// How the sessions were set up.
    pub setup: Setup,
    /// What the generator sends as fast as it can on this path: its ceiling here.
    pub generator_ceiling: Trial,
    /// The zero-loss throughput search, when run.
    pub zero_loss: Option<ZeroLoss>,
    /// The latency points (fractions of the zero-loss rate, the low steady rate, the fixed
    /// rates), in the order measured.
    pub points: Vec<Point>,
    /// Ferry's reply path with no load, before the latency points: the baseline of their
    /// `reply` (null on other paths, when no latency point ran, or with probes off).
    pub reply_idle: Option<ReplyRtt>,
}

/// How the generator sent on a path.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct GeneratorSetup {
    /// Sockets (source 4-tuples) it sent from.
    pub sockets: usize,
    /// Whether it sent with UDP GSO (false: one datagram per message, because `--no-gso` said
    /// so or the kernel refused GSO, as kernels before 6.11 do on an interface without
    /// checksum offload, which `ferry-fast` needs).
    pub gso: bool,
}

/// One measurement of the flood scenario.
#[derive(Clone, Debug, Serialize)]
pub struct FloodRun {
    /// Whether Ferry's XDP guard was on.
    pub guard: bool,
    /// Whether the flood ran.
    pub flood: bool,
    /// Flood frames the packet socket sent per second.
    pub flood_pps: f64,
    /// Datagrams the XDP guard dropped per second (`ferry_xdp_packets_total{action="drop"}`).
    pub xdp_drops_per_second: f64,
    /// CHALLENGEs the XDP guard sent itself per second, answering cookie-less BINDs and
    /// REBINDs (`ferry_xdp_packets_total{reason="challenge"}`, `tx` and `redirect`): the
    /// flood's requests the relay process never saw.
    pub xdp_challenges_per_second: f64,
    /// The relay process's CPU time over wall time (1.0: one core busy).
    pub relay_cpu_share: f64,
    /// The legitimate sessions' trial. With the flood on and the guard off, the relay's
    /// counts include the flood datagrams it received.
    pub trial: Trial,
}

/// Session set-up figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    /// Seconds to bind (Ferry) or allocate (coturn) every session.
    pub bind_seconds: Option<f64>,
    /// Sessions set up per second.
    pub binds_per_second: Option<f64>,
    /// The forwarder's resident memory before the sessions, bytes.
    pub rss_before_bytes: Option<u64>,
    /// And after.
    pub rss_after_bytes: Option<u64>,
    /// The difference per session, bytes.
    pub rss_per_session_bytes: Option<f64>,
}

/// The zero-loss throughput.
#[derive(Clone, Debug, Serialize)]
pub struct ZeroLoss {
    /// The highest offered rate whose trial lost at most `max_loss` (0 when none did).
    pub pps: f64,
    /// The same in Mbit/s of DATA body.
    pub body_mbps: f64,
    /// Whether the generator's own ceiling was reached without loss (the path may carry more).
    pub generator_limited: bool,
    /// The trial at that rate, when one passed.
    pub at_rate: Option<Trial>,
    /// Every search trial in order.
    pub trials: Vec<Trial>,
}

/// One latency point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// `10%`, `50%`, `90%` (of the zero-loss rate), `low`, or `fixed`.
    pub label: String,
    /// The trial.
    pub trial: Trial,
    /// Ferry's reply path timed while the trial's load ran (null on other paths or with
    /// probes off).
    pub reply: Option<ReplyRtt>,
}

/// Round trips through the relay's reply path, timed by a probe in the generator's host on a
/// socket of its own, one probe at a time.
#[derive(Clone, Debug, Serialize)]
pub struct ReplyRtt {
    /// Seconds it probed.
    pub seconds: f64,
    /// Full binds of fresh sessions: BIND, CHALLENGE, BIND with cookie and proof, BIND-ACK
    /// (two round trips and the relay's token check).
    pub bind: RttFigures,
    /// KEEPALIVE echoes on a bound session (one round trip).
    pub keepalive: RttFigures,
    /// Idle window only: the relay process's CPU time per second while nothing but the probes
    /// reached it, ns — what they add to its CPU at every point (null under load).
    pub relay_cpu_ns_per_second: Option<f64>,
    /// Why the window's first failed probe failed (null when none did).
    pub first_failure: Option<String>,
}

impl ReplyRtt {
    /// The figures of what a probe measured; `relay_cpu_ns` is the relay's CPU time over the
    /// window, given for the idle one.
    pub fn from_window(w: &super::load::ReplyWindow, relay_cpu_ns: Option<u64>) -> Self {
        let figures = |s: &super::load::RttSeries| RttFigures {
            sent: s.sent,
            answered: s.answered,
            lost: s.lost,
            failed: s.failed,
            rtt_us: Latency::from_ns(&s.rtt_ns),
        };
        Self {
            seconds: w.seconds,
            bind: figures(&w.bind),
            keepalive: figures(&w.keepalive),
            relay_cpu_ns_per_second: relay_cpu_ns.map(|ns| ns as f64 / w.seconds.max(1e-9)),
            first_failure: w.first_failure.clone(),
        }
    }
}

/// One kind of reply-path probe in one window.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RttFigures {
    /// Probes started.
    pub sent: u64,
    /// Answered within the timeout.
    pub answered: u64,
    /// Given up after the timeout.
    pub lost: u64,
    /// Failed otherwise (a REJECT, a socket error); `sent ≥ answered + lost + failed`.
    pub failed: u64,
    /// Round-trip times of the answered probes (null when none was).
    pub rtt_us: Option<Latency>,
}

/// One-way latency at the sink, microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The percentiles of a histogram of one-way latencies in nanoseconds, or `None` when
    /// nothing was recorded.
    pub fn from_ns(h: &hdrhistogram::Histogram<u64>) -> Option<Self> {
        let us = |ns: u64| ns as f64 / 1000.0;
        (!h.is_empty()).then(|| Self {
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        })
    }
}

/// The relay host's counts in one trial.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RelayStage {
    /// Datagrams the forwarder took in.
    pub received: u64,
    /// Dropped by the kernel at the forwarder's full socket.
    pub socket_drops: u64,
    /// Sent on.
    pub forwarded: u64,
    /// Of those, forwarded inside XDP (`ferry-fast`; 0 elsewhere).
    pub fast_forwarded: u64,
    /// `kernel` or `metrics`.
    pub source: &'static str,
}

/// One measurement: load offered for a while, every stage counted.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    /// Asked rate, datagrams per second (0: as fast as the generator can).
    pub target_pps: u64,
    /// `constant`, `bursty-N` or `blast`.
    pub pacing: String,
    /// Seconds the generator sent.
    pub seconds: f64,
    /// Datagrams the generator's kernel accepted.
    pub sent: u64,
    /// `sent / seconds`.
    pub offered_pps: f64,
    /// The relay host's counts.
    pub relay: RelayStage,
    /// Datagrams the sink host's kernel dropped at the sink's full socket (part of
    /// `lost_after_relay`: the sink, not the path, could not keep up).
    pub sink_socket_drops: u64,
    /// Datagrams of this trial at the sink.
    pub sink_received: u64,
    /// Datagrams of earlier trials that arrived during this one (not counted).
    pub stale: u64,
    /// `(sent − sink_received) / sent`.
    pub loss: f64,
    /// Lost between the generator and the forwarder: `sent − received − socket_drops`.
    pub lost_before_relay: i64,
    /// Lost in the forwarder: `received − forwarded`.
    pub lost_in_relay: i64,
    /// Lost between the forwarder and the sink: `forwarded − sink_received`.
    pub lost_after_relay: i64,
    /// `sink_received / seconds`.
    pub delivered_pps: f64,
    /// DATA body Mbit/s delivered.
    pub delivered_body_mbps: f64,
    /// One-way latency of the datagrams delivered.
    pub latency_us: Option<Latency>,
    /// The forwarder process's CPU time per forwarded datagram, ns (`/proc/PID/task/*/schedstat`).
    pub relay_cpu_ns_per_packet: Option<f64>,
    /// The whole host's busy CPU time per delivered datagram, ns (`/proc/stat`; includes the
    /// generator and the sink).
    pub host_cpu_ns_per_packet: f64,
    /// The relay host's own CPU time per delivered datagram, ns: the forwarder process's
    /// threads plus the kernel threads that do the relay host's receive processing (on the
    /// namespace testbed, the threaded NAPI of its two veths: routing, XDP, the stack up to the
    /// socket), from their `schedstat`; not the generator's or the sink's. `None` where the
    /// testbed cannot tell them apart.
    pub relay_host_cpu_ns_per_packet: Option<f64>,
    /// The forwarder's XDP programs' run time per run, ns (every frame they saw;
    /// `kernel.bpf_stats_enabled`), when it has any that ran.
    pub xdp_ns_per_run: Option<f64>,
    /// Failed `sendmmsg` calls.
    pub send_errors: u64,
}

impl Trial {
    /// Whether the trial lost at most `max_loss` and delivered something.
    pub fn passes(&self, max_loss: f64) -> bool {
        self.sink_received > 0 && self.loss <= max_loss
    }
}

/// A Ferry figure over a baseline's, same payload, same round, same point.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The round both were measured in.
    pub round: u32,
    /// The payload.
    pub payload: String,
    /// The Ferry column: `ferry` or `ferry-fast`.
    pub path: String,
    /// `zero_loss_pps`, `relay_cpu_ns_per_packet`, `host_cpu_ns_per_packet`,
    /// `relay_host_cpu_ns_per_packet`, `p50_us`, `p99_us`, `p999_us`.
    pub figure: String,
    /// `zero_loss`, or a point's label.
    pub point: String,
    /// The baseline path.
    pub baseline: String,
    /// The Ferry column's value.
    pub ferry: f64,
    /// The baseline's value.
    pub baseline_value: f64,
    /// `ferry / baseline_value`.
    pub ratio: f64,
    /// Whether both trials lost at most the run's `max_loss`: a latency ratio between a path
    /// that kept up and one that queued and dropped compares queues, not forwarders.
    pub both_within_loss: bool,
}

/// The median over the rounds of one [`Ratio`]'s figures (same payload, Ferry column, figure,
/// point and baseline in every round).
#[derive(Clone, Debug, Serialize)]
pub struct MedianRatio {
    /// The payload.
    pub payload: String,
    /// The Ferry column.
    pub path: String,
    /// As in [`Ratio::figure`].
    pub figure: String,
    /// As in [`Ratio::point`].
    pub point: String,
    /// The baseline path.
    pub baseline: String,
    /// Rounds that had both figures.
    pub rounds: u32,
    /// Of those, rounds where both trials lost at most the run's `max_loss`.
    pub rounds_within_loss: u32,
    /// The median of the Ferry column's values.
    pub ferry: f64,
    /// The median of the baseline's values.
    pub baseline_value: f64,
    /// The median of the rounds' ratios (not the ratio of the two medians).
    pub ratio: f64,
    /// The smallest and the largest of the rounds' ratios.
    pub ratio_min: f64,
    /// See `ratio_min`.
    pub ratio_max: f64,
}

/// The median of `v` (the mean of the middle two for an even count); `v` must not be empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n % 2 {
        1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The medians over the rounds of `ratios`, one per payload, Ferry column, figure, point and
/// baseline, in the order they first appear; empty unless some figure has more than one round.
pub fn medians(ratios: &[Ratio]) -> Vec<MedianRatio> {
    // What makes two rounds' ratios the same figure.
    fn key(r: &Ratio) -> (&str, &str, &str, &str, &str) {
        (&r.payload, &r.path, &r.figure, &r.point, &r.baseline)
    }
    let mut out: Vec<MedianRatio> = Vec::new();
    let mut seen = Vec::new();
    for first in ratios {
        let k = key(first);
        if seen.contains(&k) {
            continue;
        }
        let group: Vec<&Ratio> = ratios.iter().filter(|r| key(r) == k).collect();
        seen.push(k);
        let pick = |f: fn(&Ratio) -> f64| group.iter().map(|r| f(r)).collect::<Vec<f64>>();
        let mut ratio = pick(|r| r.ratio);
        out.push(MedianRatio {
            payload: first.payload.clone(),
            path: first.path.clone(),
            figure: first.figure.clone(),
            point: first.point.clone(),
            baseline: first.baseline.clone(),
            rounds: group.len() as u32,
            rounds_within_loss: group.iter().filter(|r| r.both_within_loss).count() as u32,
            ferry: median(&mut pick(|r| r.ferry)),
            baseline_value: median(&mut pick(|r| r.baseline_value)),
            ratio_min: ratio.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_max: ratio.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ratio: median(&mut ratio),
        });
    }
    if out.iter().all(|m| m.rounds <= 1) {
        out.clear();
    }
    out
}

/// Whether `path` is one of Ferry's columns.
pub fn is_ferry(path: &str) -> bool {
    path == "ferry" || path == "ferry-fast"
}

/// The ratios of every Ferry figure (`ferry`, `ferry-fast`) to every baseline's of the same
/// payload and round: the paths that are not Ferry, and for `ferry-fast` also `ferry`.
pub fn ratios(runs: &[PathRun], max_loss: f64) -> Vec<Ratio> {
    let mut out = Vec::new();
    for ferry in runs.iter().filter(|r| is_ferry(&r.path)) {
        for base in runs.iter().filter(|r| {
            r.payload == ferry.payload
                && r.round == ferry.round
                && r.path != ferry.path
                && (!is_ferry(&r.path) || ferry.path == "ferry-fast")
        }) {
            let mut push = |figure: &str,
                            point: &str,
                            f: Option<f64>,
                            b: Option<f64>,
                            both_within_loss: bool| {
                if let (Some(f), Some(b)) = (f, b)
                    && b > 0.0
                    && f.is_finite()
                {
                    out.push(Ratio {
                        round: ferry.round,
                        payload: ferry.payload.clone(),
                        path: ferry.path.clone(),
                        figure: figure.into(),
                        point: point.into(),
                        baseline: base.path.clone(),
                        ferry: f,
                        baseline_value: b,
                        ratio: f / b,
                        both_within_loss,
                    });
                }
            };
            if let (Some(f), Some(b)) = (&ferry.zero_loss, &base.zero_loss) {
                let passed = f.at_rate.is_some() && b.at_rate.is_some();
                push(
                    "zero_loss_pps",
                    "zero_loss",
                    Some(f.pps),
                    Some(b.pps),
                    passed,
                );
                let cpu = |z: &ZeroLoss| z.at_rate.as_ref().and_then(|t| t.relay_cpu_ns_per_packet);
                push(
                    "relay_cpu_ns_per_packet",
                    "zero_loss",
                    cpu(f),
                    cpu(b),
                    passed,
                );
                let host = |z: &ZeroLoss| z.at_rate.as_ref().map(|t| t.host_cpu_ns_per_packet);
                push(
                    "host_cpu_ns_per_packet",
                    "zero_loss",
                    host(f),
                    host(b),
                    passed,
                );
                let relay_host = |z: &ZeroLoss| {
                    z.at_rate
                        .as_ref()
                        .and_then(|t| t.relay_host_cpu_ns_per_packet)
                };
                push(
                    "relay_host_cpu_ns_per_packet",
                    "zero_loss",
                    relay_host(f),
                    relay_host(b),
                    passed,
                );
            }
            for fp in &ferry.points {
                let Some(bp) = base.points.iter().find(|p| same_point(p, fp)) else {
                    continue;
                };
                let point = point_name(fp);
                let ok = fp.trial.passes(max_loss) && bp.trial.passes(max_loss);
                let lat =
                    |p: &Point, pick: fn(&Latency) -> f64| p.trial.latency_us.map(|l| pick(&l));
                push("p50_us", &point, lat(fp, |l| l.p50), lat(bp, |l| l.p50), ok);
                push("p99_us", &point, lat(fp, |l| l.p99), lat(bp, |l| l.p99), ok);
                push(
                    "p999_us",
                    &point,
                    lat(fp, |l| l.p999),
                    lat(bp, |l| l.p999),
                    ok,
                );
                push(
                    "relay_cpu_ns_per_packet",
                    &point,
                    fp.trial.relay_cpu_ns_per_packet,
                    bp.trial.relay_cpu_ns_per_packet,
                    ok,
                );
                push(
                    "relay_host_cpu_ns_per_packet",
                    &point,
                    fp.trial.relay_host_cpu_ns_per_packet,
                    bp.trial.relay_host_cpu_ns_per_packet,
                    ok,
                );
            }
        }
    }
    out
}

/// Points are the same when their labels are and, for fixed rates, their rates are.
fn same_point(a: &Point, b: &Point) -> bool {
    a.label == b.label && (a.label != "fixed" || a.trial.target_pps == b.trial.target_pps)
}

/// `10%`, `low`, or `fixed 20000`.
pub fn point_name(p: &Point) -> String {
    match p.label.as_str() {
        "fixed" => format!("fixed {}", p.trial.target_pps),
        other => other.to_string(),
    }
}

/// "This host carries N sessions of R Mbit/s each with p99 < L µs", from Ferry's highest
/// latency point of each payload that lost at most `max_loss`; with several rounds, from the
/// round whose such point carried the least (the figure a planner can count on).
pub fn capacity_lines(runs: &[PathRun], max_loss: f64) -> Vec<String> {
    // Per payload and Ferry column: (rounds seen, the least delivered rate, its line).
    let mut best: Vec<(&str, &str, u32, f64, String)> = Vec::new();
    for ferry in runs.iter().filter(|r| is_ferry(&r.path)) {
        let top = ferry
            .points
            .iter()
            .filter(|p| p.trial.passes(max_loss) && p.trial.latency_us.is_some())
            .max_by(|a, b| a.trial.delivered_pps.total_cmp(&b.trial.delivered_pps));
        let Some(p) = top else { continue };
        let Some(lat) = p.trial.latency_us else {
            continue;
        };
        let sessions = ferry.sessions.max(1);
        let line = format!(
            "with {} B payloads this host carries {} concurrent sessions of {:.3} Mbit/s each \
             ({:.0} datagrams/s in all, {} point) with p99 < {:.0} µs and {:.3} % loss, \
             through one ferry-relay worker{}",
            ferry.payload,
            sessions,
            p.trial.delivered_body_mbps / sessions as f64,
            p.trial.delivered_pps,
            point_name(p),
            lat.p99.ceil(),
            p.trial.loss * 100.0,
            if ferry.path == "ferry-fast" {
                " and its XDP fast path"
            } else {
                ""
            }
        );
        let pps = p.trial.delivered_pps;
        match best
            .iter_mut()
            .find(|b| b.0 == ferry.payload && b.1 == ferry.path)
        {
            Some(b) => {
                b.2 += 1;
                if pps < b.3 {
                    (b.3, b.4) = (pps, line);
                }
            }
            None => best.push((&ferry.payload, &ferry.path, 1, pps, line)),
        }
    }
    best.into_iter()
        .map(|(_, _, rounds, _, line)| match rounds {
            1 => line,
            n => format!("{line} (the least of {n} rounds)"),
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

/// The Markdown summary of `result`.
pub fn markdown(result: &BenchResult) -> String {
    let mut md = String::new();
    let c = &result.config;
    let _ = writeln!(md, "# ferry-bench ({} profile)\n", result.profile);
    let _ = writeln!(
        md,
        "- host: {} CPUs, kernel {}, load average {:.2} at the start\n- idle: {}\n\
         - topology: {}\n\
         - sessions: {}, pacing: {}, max loss {} %, {} s per search trial, {} s per latency point\n\
         - forwarders on CPU {}, generator and sink on CPU {}\n- took {:.0} s{}",
        result.host.cpus,
        result.host.kernel,
        result.host.load_average_start,
        result.host.idle.describe(),
        result.topology,
        c.sessions,
        c.pacing,
        c.max_loss * 100.0,
        c.trial_seconds,
        c.latency_seconds,
        c.relay_cpu,
        c.load_cpu,
        result.elapsed_seconds,
        match c.rounds {
            0 | 1 => String::new(),
            n => format!(
                "\n- {n} rounds: every path of a payload once per round, interleaved; the ratio \
                 tables give the median over the rounds and the range of the rounds' ratios"
            ),
        }
    );
    for s in &result.skipped {
        let _ = writeln!(md, "- skipped {}: {}", s.path, s.reason);
    }
    if !result.capacity.is_empty() {
        let _ = writeln!(md, "\n## Capacity\n");
        for line in &result.capacity {
            let _ = writeln!(md, "- {line}");
        }
    }
    for payload in &c.payloads {
        let runs: Vec<&PathRun> = result
            .runs
            .iter()
            .filter(|r| &r.payload == payload)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let _ = writeln!(md, "\n## {payload} B payloads\n");
        let _ = writeln!(
            md,
            "| path | generator ceiling (sent pps) | zero-loss pps | body Mbit/s | relay CPU/pkt | \
             relay host CPU/pkt | host CPU/pkt | XDP ns/run | sent / relay in / relay out / sink \
             at that rate |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in &runs {
            let z = r.zero_loss.as_ref();
            let at = z.and_then(|z| z.at_rate.as_ref());
            let _ = writeln!(
                md,
                "| {} | {:.0} ({}) | {}{} | {} | {} | {} | {} | {} | {} |",
                path_label(r, c.rounds),
                r.generator_ceiling.offered_pps,
                if r.generator.gso { "GSO" } else { "sendmmsg" },
                opt(z.map(|z| z.pps), 0),
                if z.is_some_and(|z| z.generator_limited) {
                    " (generator-limited)"
                } else {
                    ""
                },
                opt(z.map(|z| z.body_mbps), 1),
                opt(at.and_then(|t| t.relay_cpu_ns_per_packet), 0) + " ns",
                opt(at.and_then(|t| t.relay_host_cpu_ns_per_packet), 0) + " ns",
                opt(at.map(|t| t.host_cpu_ns_per_packet), 0) + " ns",
                opt(at.and_then(|t| t.xdp_ns_per_run), 0),
                at.map_or("–".into(), |t| format!(
                    "{} / {} / {} / {}",
                    t.sent, t.relay.received, t.relay.forwarded, t.sink_received
                )),
            );
        }
        let _ = writeln!(
            md,
            "\n| point | path | offered pps | delivered pps | loss % | p50 / p99 / p99.9 / max µs | relay CPU/pkt |\n\
             |---|---|---:|---:|---:|---|---:|"
        );
        let mut names: Vec<String> = Vec::new();
        for r in &runs {
            for p in &r.points {
                let n = point_name(p);
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for name in &names {
            for r in &runs {
                for p in r.points.iter().filter(|p| &point_name(p) == name) {
                    let t = &p.trial;
                    let _ = writeln!(
                        md,
                        "| {name} | {} | {:.0} | {:.0} | {:.3} | {} | {} ns |",
                        path_label(r, c.rounds),
                        t.offered_pps,
                        t.delivered_pps,
                        t.loss * 100.0,
                        t.latency_us.map_or("–".into(), |l| format!(
                            "{:.0} / {:.0} / {:.0} / {:.0}",
                            l.p50, l.p99, l.p999, l.max
                        )),
                        opt(t.relay_cpu_ns_per_packet, 0),
                    );
                }
            }
        }
        reply_table(&mut md, &runs, c.rounds);
        ratio_table(&mut md, result, payload);
    }
    if !result.scale.is_empty() {
        let _ = writeln!(
            md,
            "\n## Session scale (ferry, {} B)\n\n\
             | sessions | bind time | sessions bound/s | relay RSS growth per session | zero-loss pps | relay CPU/pkt |\n\
             |---:|---:|---:|---:|---:|---:|",
            result.scale[0].payload
        );
        for r in &result.scale {
            let z = r.zero_loss.as_ref();
            let _ = writeln!(
                md,
                "| {} | {} s | {} | {} B | {} | {} ns |",
                r.sessions,
                opt(r.setup.bind_seconds, 2),
                opt(r.setup.binds_per_second, 0),
                opt(r.setup.rss_per_session_bytes, 0),
                opt(z.map(|z| z.pps), 0),
                opt(
                    z.and_then(|z| z.at_rate.as_ref())
                        .and_then(|t| t.relay_cpu_ns_per_packet),
                    0
                ),
            );
        }
    }
    if !result.workers.is_empty() {
        let _ = writeln!(
            md,
            "\n## Worker scaling (ferry, {} B)\n\n\
             | workers | generator ceiling (sent pps) | zero-loss pps | relay CPU/pkt | host CPU/pkt | \
             sent / relay in / relay out / sink at that rate |\n\
             |---:|---:|---:|---:|---:|---|",
            result.workers[0].payload
        );
        for r in &result.workers {
            let z = r.zero_loss.as_ref();
            let at = z.and_then(|z| z.at_rate.as_ref());
            let _ = writeln!(
                md,
                "| {} | {:.0} | {}{} | {} ns | {} ns | {} |",
                r.workers,
                r.generator_ceiling.offered_pps,
                opt(z.map(|z| z.pps), 0),
                if z.is_some_and(|z| z.generator_limited) {
                    " (generator-limited)"
                } else {
                    ""
                },
                opt(at.and_then(|t| t.relay_cpu_ns_per_packet), 0),
                opt(at.map(|t| t.host_cpu_ns_per_packet), 0),
                at.map_or("–".into(), |t| format!(
                    "{} / {} / {} / {}",
                    t.sent, t.relay.received, t.relay.forwarded, t.sink_received
                )),
            );
        }
        let _ = writeln!(
            md,
            "\nWorkers take the relay CPU first, then the others in order; with as many workers \
             as CPUs, workers share CPUs with the generator and the sink, so the rate is the \
             machine's, not the relay's alone."
        );
    }
    if !result.flood.is_empty() {
        let _ = writeln!(
            md,
            "\n## Flood (ferry, {} B, legitimate {} pps)\n\n\
             | XDP guard | flood | flood frames/s | XDP drops/s | CHALLENGEs from XDP/s | relay CPU (of a core) | legitimate delivered pps | loss % | p50 / p99 µs |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|",
            result.config.payloads.first().map_or("", String::as_str),
            result.config.flood_legit_rate
        );
        for f in &result.flood {
            let t = &f.trial;
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} % | {:.0} | {:.3} | {} |",
                if f.guard { "on" } else { "off" },
                if f.flood { "on" } else { "off" },
                f.flood_pps,
                f.xdp_drops_per_second,
                f.xdp_challenges_per_second,
                f.relay_cpu_share * 100.0,
                t.delivered_pps,
                t.loss * 100.0,
                t.latency_us
                    .map_or("–".into(), |l| format!("{:.0} / {:.0}", l.p50, l.p99)),
            );
        }
    }
    if result.ratios.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "\nRatios are Ferry's figure over the baseline's, same payload, same point: above 1 is \
         better for throughput, below 1 is better for latency and CPU. (loss): one of the \
         two trials lost more than the run's max loss, so the ratio compares queues, not \
         forwarders."
    );
    md
}

/// The reply path's round trips beside the data latency of the same point, for the runs (of
/// one payload) that probed it: the idle baseline first, then every point.
fn reply_table(md: &mut String, runs: &[&PathRun], rounds: u32) {
    let probed: Vec<&&PathRun> = runs
        .iter()
        .filter(|r| r.reply_idle.is_some() || r.points.iter().any(|p| p.reply.is_some()))
        .collect();
    if probed.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nReply path (round trips from the generator's host; a bind is BIND, CHALLENGE, BIND, \
         BIND-ACK):\n\n\
         | path | point | offered pps | data p50 / p99 µs | bind RTT p50 / p99 / max µs | \
         keepalive RTT p50 / p99 / max µs | bind probes sent / lost / failed | keepalive probes sent / lost / failed |\n\
         |---|---|---:|---|---|---|---:|---:|"
    );
    let rtt = |f: &RttFigures| {
        f.rtt_us.map_or("–".into(), |l| {
            format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.max)
        })
    };
    let counts = |f: &RttFigures| format!("{} / {} / {}", f.sent, f.lost, f.failed);
    for r in probed {
        if let Some(idle) = &r.reply_idle {
            let _ = writeln!(
                md,
                "| {} | idle | 0 | – | {} | {} | {} | {} |",
                path_label(r, rounds),
                rtt(&idle.bind),
                rtt(&idle.keepalive),
                counts(&idle.bind),
                counts(&idle.keepalive),
            );
        }
        for p in &r.points {
            let Some(reply) = &p.reply else { continue };
            let t = &p.trial;
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                path_label(r, rounds),
                point_name(p),
                t.offered_pps,
                t.latency_us
                    .map_or("–".into(), |l| format!("{:.0} / {:.0}", l.p50, l.p99)),
                rtt(&reply.bind),
                rtt(&reply.keepalive),
                counts(&reply.bind),
                counts(&reply.keepalive),
            );
        }
    }
    if let Some(cpu) = runs
        .iter()
        .filter_map(|r| {
            Some((
                r.path.as_str(),
                r.reply_idle.as_ref()?.relay_cpu_ns_per_second?,
            ))
        })
        .map(|(path, ns)| format!("{path} {:.0} µs/s", ns / 1000.0))
        .reduce(|a, b| format!("{a}, {b}"))
    {
        let _ = writeln!(
            md,
            "\nThe probes cost the relay (CPU per second of probing, idle): {cpu}. They run in a \
             window of their own after each point, so the points' CPU figures do not include it."
        );
    }
}

/// A path's name in the tables, with its round when the run had several.
fn path_label(r: &PathRun, rounds: u32) -> String {
    match rounds {
        0 | 1 => r.path.clone(),
        _ => format!("{} (round {})", r.path, r.round),
    }
}

/// The Ferry columns' figures over each baseline's for `payload`: the ratios of the one round,
/// or with several rounds the median of the rounds' ratios and their range.
fn ratio_table(md: &mut String, result: &BenchResult, payload: &str) {
    // (Ferry column, figure, point, baseline, cell)
    let cells: Vec<(&str, &str, &str, &str, String)> = match result.medians.is_empty() {
        true => result
            .ratios
            .iter()
            .filter(|r| r.payload == payload)
            .map(|r| {
                let mark = if r.both_within_loss { "" } else { " (loss)" };
                let cell = format!("{:.2}×{mark}", r.ratio);
                (&*r.path, &*r.figure, &*r.point, &*r.baseline, cell)
            })
            .collect(),
        false => result
            .medians
            .iter()
            .filter(|m| m.payload == payload)
            .map(|m| {
                let mark = match m.rounds - m.rounds_within_loss {
                    0 => String::new(),
                    k => format!(" (loss in {k} of {})", m.rounds),
                };
                let cell = format!(
                    "{:.2}× [{:.2}–{:.2}]{mark}",
                    m.ratio, m.ratio_min, m.ratio_max
                );
                (&*m.path, &*m.figure, &*m.point, &*m.baseline, cell)
            })
            .collect(),
    };
    if cells.is_empty() {
        return;
    }
    let mut baselines: Vec<&str> = Vec::new();
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for &(path, figure, point, baseline, _) in &cells {
        if !baselines.contains(&baseline) {
            baselines.push(baseline);
        }
        if !rows.contains(&(path, figure, point)) {
            rows.push((path, figure, point));
        }
    }
    let _ = writeln!(
        md,
        "\n| Ferry column | figure ÷ baseline{} | point | {} |\n|---|---|---|{}",
        match result.medians.is_empty() {
            true => String::new(),
            false => format!(", median of {} rounds [range]", result.config.rounds),
        },
        baselines.join(" | "),
        "---:|".repeat(baselines.len())
    );
    for (path, figure, point) in rows {
        let row: Vec<&str> = baselines
            .iter()
            .map(|&b| {
                cells
                    .iter()
                    .find(|c| (c.0, c.1, c.2, c.3) == (path, figure, point, b))
                    .map_or("–", |c| c.4.as_str())
            })
            .collect();
        let _ = writeln!(md, "| {path} | {figure} | {point} | {} |", row.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` at `path` below `root`, creating its directories.
    fn put(root: &Path, path: &str, text: &str) {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }

    #[test]
    fn the_idle_policy_is_read_from_sysfs_and_said_in_one_line() {
        let root = ferry_testkit::temp_dir("idle").unwrap();
        let cpu = "sys/devices/system/cpu";
        put(
            root.path(),
            &format!("{cpu}/cpuidle/current_driver"),
            "haltpoll\n",
        );
        put(
            root.path(),
            &format!("{cpu}/cpuidle/current_governor_ro"),
            "haltpoll\n",
        );
        put(
            root.path(),
            "sys/module/haltpoll/parameters/guest_halt_poll_ns",
            "0\n",
        );
        // cpu0 has no limit (0), cpu1 polls (n/a), cpu10 wakes within 20 µs; cpufreq and a
        // CPU without the file are not CPUs with a limit.
        put(
            root.path(),
            &format!("{cpu}/cpu0/power/pm_qos_resume_latency_us"),
            "0\n",
        );
        put(
            root.path(),
            &format!("{cpu}/cpu10/power/pm_qos_resume_latency_us"),
            "20\n",
        );
        put(
            root.path(),
            &format!("{cpu}/cpu1/power/pm_qos_resume_latency_us"),
            "n/a\n",
        );
        put(root.path(), &format!("{cpu}/cpufreq/boost"), "1\n");
        std::fs::create_dir_all(root.path().join(format!("{cpu}/cpu2"))).unwrap();

        let idle = IdlePolicy::read(root.path(), None);
        assert_eq!(
            idle,
            IdlePolicy {
                driver: Some("haltpoll".into()),
                governor: Some("haltpoll".into()),
                guest_halt_poll_ns: Some(0),
                cpu_latency_limit_us: None,
                cpu_resume_limits: vec![
                    CpuResumeLimit {
                        cpu: 1,
                        limit_us: 0
                    },
                    CpuResumeLimit {
                        cpu: 10,
                        limit_us: 20
                    },
                ],
            }
        );
        assert_eq!(
            idle.describe(),
            "cpuidle haltpoll (governor haltpoll), idle vCPUs poll 0 ns before they halt, \
             no CPU latency limit, CPU 1 polls, CPU 10 wakes within 20 µs"
        );
        let polling = IdlePolicy::read(root.path(), Some(0));
        assert!(polling.describe().contains("every CPU idles by polling"));
    }

    #[test]
    fn a_machine_without_cpuidle_says_so() {
        let root = ferry_testkit::temp_dir("idle").unwrap();
        put(
            root.path(),
            "sys/devices/system/cpu/cpuidle/current_driver",
            "none\n",
        );
        let idle = IdlePolicy::read(root.path(), Some(10));
        assert_eq!(idle.driver, None);
        assert_eq!(idle.guest_halt_poll_ns, None);
        assert!(idle.cpu_resume_limits.is_empty());
        assert_eq!(
            idle.describe(),
            "no cpuidle driver, CPU wake-up latency limited to 10 µs"
        );
    }

    fn ratio(round: u32, baseline: &str, ferry: f64, base: f64, ok: bool) -> Ratio {
        Ratio {
            round,
            payload: "64".into(),
            path: "ferry".into(),
            figure: "p50_us".into(),
            point: "low".into(),
            baseline: baseline.into(),
            ferry,
            baseline_value: base,
            ratio: ferry / base,
            both_within_loss: ok,
        }
    }

    #[test]
    fn one_round_has_no_medians() {
        let one = [
            ratio(1, "plain", 10.0, 20.0, true),
            ratio(1, "direct", 10.0, 5.0, true),
        ];
        assert!(medians(&one).is_empty());
    }

    #[test]
    fn medians_take_each_figure_over_its_rounds_apart_from_the_others() {
        let rounds = [
            ratio(1, "plain", 10.0, 20.0, true),
            ratio(2, "plain", 30.0, 20.0, false),
            ratio(3, "plain", 12.0, 10.0, true),
            ratio(1, "direct", 8.0, 4.0, true),
            ratio(2, "direct", 8.0, 2.0, true),
        ];
        let m = medians(&rounds);
        assert_eq!(m.len(), 2);
        let plain = &m[0];
        assert_eq!(plain.baseline, "plain");
        assert_eq!((plain.rounds, plain.rounds_within_loss), (3, 2));
        assert_eq!(plain.ferry, 12.0);
        assert_eq!(plain.baseline_value, 20.0);
        // The rounds' ratios are 0.5, 1.5 and 1.2: the median is theirs, not 12 / 20.
        assert_eq!(plain.ratio, 1.2);
        assert_eq!((plain.ratio_min, plain.ratio_max), (0.5, 1.5));
        let direct = &m[1];
        assert_eq!(direct.rounds, 2);
        // An even count: the mean of the middle two.
        assert_eq!(direct.baseline_value, 3.0);
        assert_eq!(direct.ratio, 3.0);
    }
}
