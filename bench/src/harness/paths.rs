//! The paths a run measures, each set up on the same [`Testbed`] and driven by the same
//! generator and sink:
//!
//! - `direct`: no relay process; the relay host's kernel routes generator → sink (the
//!   topology's own limit, and the generator's ceiling);
//! - `plain`: `ferry-plainfwd`, a `recvmmsg`/`sendmmsg` loop with no logic (the practical
//!   ceiling of a socket relay);
//! - `tokio`: `ferry-tokiorelay`, a tokio `recv_from`/`send_to` loop (what a typical Rust
//!   relay does);
//! - `coturn`: Debian's `turnserver`, with a generated config, driven with TURN ChannelData
//!   after Allocate and ChannelBind;
//! - `ferry`: the real `ferry-relay` (io_uring, one worker), every session bound through
//!   BIND / CHALLENGE / BIND / BIND-ACK with gateway tokens minted for it;
//! - `ferry-fast`: the same relay with its XDP guard native on both of the relay host's veths
//!   and `xdp.fast_path` on, so that bound sessions' DATA is forwarded inside XDP
//!   (`XDP_REDIRECT` from one veth to the other) and never reaches a socket.
//!
//! Every forwarder process is pinned to the relay CPU; the generator and the sink run on the
//! load CPU. The relay host's receive processing (routing for `direct`, the stack up to the
//! socket, the fast path's XDP program) runs in its veths' NAPI threads, also on the relay CPU
//! (see [`NetnsTestbed`](super::topology::NetnsTestbed)): counted in the relay host's CPU per
//! packet, not the relay process's.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_core::proof::SlotKeys;
use ferry_core::token::MintedToken;
use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, Slot};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::sum_metric;
use ferry_testkit::relay::{RelayConfig, RelayProcess};

use super::load::{Flow, Framing, Generator};
use super::topology::{KernelCounters, Realtime, Testbed, set_realtime};
use super::{check_interrupted, turn};
use crate::udp::pin_pid;

/// The UDP port every forwarder listens on (on the generator's side of the relay host).
pub const RELAY_PORT: u16 = 7000;
/// The sink's UDP port.
pub const SINK_PORT: u16 = 9000;
/// coturn's listening port.
pub const TURN_PORT: u16 = 3478;

/// A path through the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum PathKind {
    /// No relay process: the relay host's kernel routes.
    Direct,
    /// `ferry-plainfwd`.
    Plain,
    /// `ferry-tokiorelay`.
    Tokio,
    /// coturn's `turnserver`.
    Coturn,
    /// `ferry-relay`.
    Ferry,
    /// `ferry-relay` with its XDP fast path.
    #[value(name = "ferry-fast")]
    FerryFast,
}

impl PathKind {
    /// Every path, in the order a run measures them.
    pub const ALL: [Self; 6] = [
        Self::Direct,
        Self::Plain,
        Self::Tokio,
        Self::Coturn,
        Self::Ferry,
        Self::FerryFast,
    ];

    /// Its name in reports and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Plain => "plain",
            Self::Tokio => "tokio",
            Self::Coturn => "coturn",
            Self::Ferry => "ferry",
            Self::FerryFast => "ferry-fast",
        }
    }

    /// Whether it is `ferry-relay` (either column).
    pub fn is_ferry(&self) -> bool {
        matches!(self, Self::Ferry | Self::FerryFast)
    }

    /// Whether a relay process forwards (all but `direct`).
    pub fn has_process(&self) -> bool {
        *self != Self::Direct
    }
}

/// Where the programs under test are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `ferry-relay`.
    pub relay: PathBuf,
    /// `ferry-plainfwd`.
    pub plainfwd: PathBuf,
    /// `ferry-tokiorelay`.
    pub tokiorelay: PathBuf,
    /// coturn's `turnserver`, when installed.
    pub turnserver: Option<PathBuf>,
}

impl Binaries {
    /// The bench's own programs next to `dir`, `ferry-relay` at `relay` (or in `dir`), and
    /// `turnserver` from `PATH`.
    pub fn find(dir: &Path, relay: Option<PathBuf>) -> Self {
        let turnserver = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("turnserver"))
                .find(|p| p.is_file())
        });
        Self {
            relay: relay.unwrap_or_else(|| dir.join("ferry-relay")),
            plainfwd: dir.join("ferry-plainfwd"),
            tokiorelay: dir.join("ferry-tokiorelay"),
            turnserver,
        }
    }
}

/// How to set a path up.
#[derive(Clone, Copy, Debug)]
pub struct PathOptions {
    /// Concurrent sessions the generator drives.
    pub sessions: usize,
    /// The CPU every forwarder is pinned to.
    pub relay_cpu: usize,
    /// Ferry only: its XDP guard on the relay host's interface towards the generator
    /// (native mode). `ferry-fast` always has it, on both interfaces.
    pub xdp_guard: bool,
    /// Ferry only: its io_uring workers, one per CPU: `relay_cpu` first, then the other CPUs
    /// in order.
    pub workers: usize,
    /// Ferry only: the generator's sockets, its sessions spread over them (each socket is
    /// one source 4-tuple, which `SO_REUSEPORT` hashes to one worker).
    pub generator_sockets: usize,
}

impl PathOptions {
    /// The CPUs of `workers` workers: the relay CPU, then the others of `cpus` in order.
    pub fn worker_cpus(&self, cpus: usize) -> Vec<usize> {
        std::iter::once(self.relay_cpu)
            .chain((0..cpus).filter(|&c| c != self.relay_cpu))
            .take(self.workers.max(1))
            .collect()
    }
}

/// Datagram counts at the relay host, since some earlier [`Snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayCounts {
    /// Datagrams the forwarder took in (`direct`: the kernel routed).
    pub received: u64,
    /// Datagrams the kernel dropped at the forwarder's full socket.
    pub socket_drops: u64,
    /// Datagrams the forwarder sent on (`direct`: the kernel routed).
    pub forwarded: u64,
    /// Of those, forwarded inside XDP (`ferry-fast`).
    pub fast_forwarded: u64,
    /// Where these counts come from: `kernel` (`/proc/net/snmp` of the relay host) or
    /// `metrics` (Ferry's own `/metrics` page).
    pub source: &'static str,
}

/// The relay host's counters at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    kernel: KernelCounters,
    metrics: Option<FerryCounts>,
    xdp: Option<(u64, u64)>,
}

/// Ferry's own counters (`/metrics`) at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct FerryCounts {
    /// `ferry_worker_rx_packets`: datagrams its sockets delivered.
    rx: u64,
    /// `ferry_forwarded_packets`: forwarded, by a worker or by the fast path.
    forwarded: u64,
    /// `ferry_worker_socket_drops`.
    socket_drops: u64,
    /// `ferry_xdp_fast_forwarded_packets`: forwarded inside XDP.
    fast_forwarded: u64,
    /// `ferry_xdp_packets_total{action="drop"}`: dropped by the guard.
    xdp_drops: u64,
}

/// A forwarder process that is stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SIGTERM to this child's pid only, so it can shut down cleanly.
        ferry_testkit::process::terminate(&mut self.0, Duration::from_secs(3));
    }
}

/// A path set up and ready for load; its processes stop on drop.
#[derive(Debug)]
pub struct RunningPath {
    /// Which path.
    pub kind: PathKind,
    /// The generator, its sockets bound (Ferry) or allocated (coturn) for every session.
    pub generator: Generator,
    /// The sink's socket.
    pub sink: UdpSocket,
    /// The forwarder's process id.
    pub pid: Option<u32>,
    /// The UDP port the forwarder receives the generator's datagrams on.
    pub port: Option<u16>,
    /// Seconds it took to bind every session (Ferry: both slots of each), if it binds.
    pub bind_seconds: Option<f64>,
    /// The forwarder's resident memory before and after the sessions were set up, bytes.
    pub rss_bytes: Option<(u64, u64)>,
    relay: Option<RelayProcess>,
    /// Ferry only: the gateway key the relay trusts, to mint tokens for sessions of its own
    /// (the reply-path probe's).
    authority: Option<Authority>,
    _child: Option<Reaped>,
    _dir: Option<ferry_testkit::TempDir>,
}

impl RunningPath {
    /// Sets `kind` up on `bed`.
    pub fn start(
        kind: PathKind,
        bed: &dyn Testbed,
        bins: &Binaries,
        options: PathOptions,
    ) -> anyhow::Result<Self> {
        check_interrupted()?;
        let sink_addr = SocketAddr::new(bed.sink_ip(), SINK_PORT);
        let sink = bed.sink_socket(sink_addr)?;
        let relay_addr = SocketAddr::new(bed.relay_ip_to_generator(), RELAY_PORT);
        let one_socket = || -> anyhow::Result<Vec<UdpSocket>> {
            Ok(vec![bed.generator_socket(SocketAddr::new(
                bed.generator_ip(),
                0,
            ))?])
        };
        let flows_to = |target: SocketAddr| -> Vec<Flow> {
            (0..options.sessions)
                .map(|s| Flow {
                    socket: 0,
                    target,
                    framing: Framing::FerryData {
                        session: s as u64 + 1,
                    },
                })
                .collect()
        };
        let base = |generator, pid, child, dir| -> anyhow::Result<Self> {
            Ok(Self {
                kind,
                generator,
                sink: sink.try_clone().context("cloning the sink socket")?,
                pid,
                port: match kind {
                    PathKind::Direct => None,
                    PathKind::Coturn => Some(TURN_PORT),
                    _ => Some(RELAY_PORT),
                },
                bind_seconds: None,
                rss_bytes: None,
                relay: None,
                authority: None,
                _child: child,
                _dir: dir,
            })
        };
        match kind {
            PathKind::Direct => base(
                Generator::new(one_socket()?, flows_to(sink_addr))?,
                None,
                None,
                None,
            ),
            PathKind::Plain | PathKind::Tokio => {
                let program = match kind {
                    PathKind::Plain => &bins.plainfwd,
                    _ => &bins.tokiorelay,
                };
                let child = bed
                    .relay_command(program)
                    .args(["--listen", &relay_addr.to_string()])
                    .args(["--to", &sink_addr.to_string()])
                    .args(["--seconds", "600"])
                    .args(["--cpu", &options.relay_cpu.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .with_context(|| {
                        format!(
                            "starting {} (cargo build --release -p ferry-bench)",
                            program.display()
                        )
                    })?;
                let child = Reaped(child);
                let pid = child.0.id();
                wait_for_udp_listener(pid, RELAY_PORT)?;
                realtime_forwarder(pid)?;
                base(
                    Generator::new(one_socket()?, flows_to(relay_addr))?,
                    Some(pid),
                    Some(child),
                    None,
                )
            }
            PathKind::Coturn => {
                let bin = bins
                    .turnserver
                    .as_ref()
                    .context("coturn's turnserver is not installed (apt-get install coturn)")?;
                let dir = ferry_testkit::temp_dir("bench-coturn")?;
                let config = dir.path().join("turnserver.conf");
                std::fs::write(&config, coturn_config(bed, dir.path()))?;
                let child = bed
                    .relay_command(bin)
                    .arg("-c")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting turnserver")?;
                let child = Reaped(child);
                let pid = child.0.id();
                let turn_addr = SocketAddr::new(bed.relay_ip_to_generator(), TURN_PORT);
                wait_for_udp_listener(pid, TURN_PORT)?;
                let rss_before = rss_bytes(pid).ok();
                // One allocation per 5-tuple: a socket per session.
                let mut sockets = Vec::with_capacity(options.sessions);
                let mut flows = Vec::with_capacity(options.sessions);
                let started = Instant::now();
                for s in 0..options.sessions {
                    check_interrupted()?;
                    let sock = bed.generator_socket(SocketAddr::new(bed.generator_ip(), 0))?;
                    turn::allocate_and_bind(
                        &sock,
                        turn_addr,
                        sink_addr,
                        turn::FIRST_CHANNEL,
                        s as u64 + 1,
                    )
                    .with_context(|| format!("coturn session {s}"))?;
                    flows.push(Flow {
                        socket: s,
                        target: turn_addr,
                        framing: Framing::ChannelData {
                            session: s as u64 + 1,
                            channel: turn::FIRST_CHANNEL,
                        },
                    });
                    sockets.push(sock);
                }
                let bind_seconds = started.elapsed().as_secs_f64();
                pin_all_threads(pid, options.relay_cpu)?;
                realtime_forwarder(pid)?;
                let mut path = base(
                    Generator::new(sockets, flows)?,
                    Some(pid),
                    Some(child),
                    Some(dir),
                )?;
                path.bind_seconds = Some(bind_seconds);
                path.rss_bytes = rss_before.zip(rss_bytes(pid).ok());
                Ok(path)
            }
            PathKind::Ferry | PathKind::FerryFast => {
                Self::start_ferry(kind, bed, bins, options, base, &sink)
            }
        }
    }

    fn start_ferry(
        kind: PathKind,
        bed: &dyn Testbed,
        bins: &Binaries,
        options: PathOptions,
        base: impl FnOnce(
            Generator,
            Option<u32>,
            Option<Reaped>,
            Option<ferry_testkit::TempDir>,
        ) -> anyhow::Result<Self>,
        sink: &UdpSocket,
    ) -> anyhow::Result<Self> {
        let auth = Authority::new()?;
        let gen_side = SocketAddr::new(bed.relay_ip_to_generator(), RELAY_PORT);
        let sink_side = SocketAddr::new(bed.relay_ip_to_sink(), RELAY_PORT);
        let sessions = options.sessions.max(1);
        // The table enforces max_sessions per shard (64 of them, by session id): room to
        // spare, so that no shard fills first.
        let max_sessions = sessions * 3 / 2 + 4096;
        // One address per family: the relay host's wildcard, so that each side reaches it
        // on its own veth (and replies leave from that side's address).
        let xdp = match (kind, options.xdp_guard) {
            (PathKind::FerryFast, _) => format!(
                // The guard's per-source DATA limits out of the way: one source sends it all.
                "[xdp]\nmode = \"native\"\ninterfaces = [\"{}\", \"{}\"]\nfast_path = true\n\
                 data_packets_per_second = 1099511627776\ndata_packet_burst = 1099511627776\n\
                 data_bytes_per_second = 1099511627776\ndata_byte_burst = 1099511627776",
                bed.relay_interface_to_generator(),
                bed.relay_interface_to_sink()
                    .context("this testbed has no XDP fast path")?,
            ),
            (_, true) => format!(
                "[xdp]\nmode = \"native\"\ninterfaces = [\"{}\"]\nfast_path = false",
                bed.relay_interface_to_generator()
            ),
            (_, false) => "[xdp]\nmode = \"off\"".to_string(),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let worker_cpu_list = options.worker_cpus(cpus);
        let worker_cpus = worker_cpu_list
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let config = RelayConfig {
            listen: vec![SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), RELAY_PORT)],
            admin: "127.0.0.1:9477".parse()?,
            workers: worker_cpu_list.len(),
            relay_extra: format!("cpus = [{worker_cpus}]"),
            sections: format!(
                "{xdp}\n\n[limits]\nmax_sessions = {max_sessions}\n\
                 replay_cache_capacity = {}\nmax_bindings_per_ip = {}\n\
                 bind_rate_per_ip = 1000000\nbind_burst_per_ip = 1000000\n\
                 default_session_rate = 100000000000\nmax_session_rate = 100000000000\n\
                 idle_timeout_secs = 3600\n\n[log]\nlevel = \"warn\"\n",
                2 * max_sessions,
                (sessions + 16).min(100_000),
            ),
            netns: bed.relay_netns().map(str::to_string),
            log_to_file: true,
            ..RelayConfig::loopback(vec![auth.gateway_key()])?
        };
        let relay = RelayProcess::start(&bins.relay, &auth.relay_key, &config)?;
        let pid = relay.pid();
        // The workers are pinned by the config (several CPUs in the workers scenario); its other
        // threads (the main loop, the admin listener) join the relay CPU, so that none of the
        // forwarder's work lands on the load CPU, as with the single-threaded baselines.
        pin_threads_but(pid, options.relay_cpu, "ferry-worker")?;
        realtime_forwarder(pid)?;
        let rss_before = rss_bytes(pid).ok();
        let generator_sockets = (0..options.generator_sockets.clamp(1, sessions))
            .map(|_| bed.generator_socket(SocketAddr::new(bed.generator_ip(), 0)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rng = ring::rand::SystemRandom::new();
        let first = u64::from_be_bytes(rand8(&rng)?) >> 2 | 1;
        // Tokens are minted first, so that the bind time is the relay's and the round trips,
        // not the gateway's signing.
        let mut tokens = Vec::with_capacity(sessions);
        for s in 0..sessions as u64 {
            if s % 1024 == 0 {
                check_interrupted()?;
            }
            let session = first + s;
            tokens.push((
                session,
                auth.mint(session, Slot::A, 3000)?,
                auth.mint(session, Slot::B, 3000)?,
            ));
        }
        let started = Instant::now();
        let mut flows = Vec::with_capacity(sessions);
        for (s, (session, token_a, token_b)) in tokens.iter().enumerate() {
            if s % 256 == 0 {
                check_interrupted()?;
            }
            let socket = s % generator_sockets.len();
            bind(&generator_sockets[socket], gen_side, token_a)
                .with_context(|| format!("binding slot A of session {s}"))?;
            bind(sink, sink_side, token_b)
                .with_context(|| format!("binding slot B of session {s}"))?;
            flows.push(Flow {
                socket,
                target: gen_side,
                framing: Framing::FerryData { session: *session },
            });
        }
        let bind_seconds = started.elapsed().as_secs_f64();
        let mut path = base(
            Generator::new(generator_sockets, flows)?,
            Some(pid),
            None,
            None,
        )?;
        path.bind_seconds = Some(bind_seconds);
        path.rss_bytes = rss_before.zip(rss_bytes(pid).ok());
        path.relay = Some(relay);
        path.authority = Some(auth);
        Ok(path)
    }

    /// The relay host's counters now.
    pub fn snapshot(&self, bed: &dyn Testbed) -> anyhow::Result<Snapshot> {
        let metrics = match &self.relay {
            Some(relay) => {
                let page = relay.metrics();
                if page.is_empty() {
                    bail!("ferry-relay's /metrics page could not be read");
                }
                Some(FerryCounts {
                    rx: sum_metric(&page, "ferry_worker_rx_packets"),
                    forwarded: sum_metric(&page, "ferry_forwarded_packets"),
                    socket_drops: sum_metric(&page, "ferry_worker_socket_drops"),
                    fast_forwarded: sum_metric(&page, "ferry_xdp_fast_forwarded_packets"),
                    xdp_drops: sum_metric(&page, "ferry_xdp_packets_total{action=\"drop\""),
                })
            }
            None => None,
        };
        Ok(Snapshot {
            kernel: bed.relay_kernel_counters()?,
            metrics,
            xdp: self.pid.and_then(xdp_stats),
        })
    }

    /// The counts between `before` and `after`.
    pub fn counts(&self, before: &Snapshot, after: &Snapshot) -> RelayCounts {
        let k = after.kernel.since(&before.kernel);
        match (self.kind, before.metrics, after.metrics) {
            (PathKind::Ferry | PathKind::FerryFast, Some(b), Some(a)) => RelayCounts {
                // What the fast path forwarded, or its guard dropped, never reached a socket,
                // but the relay host took it in. (`ferry` with its guard on faces a flood in
                // the flood scenario: what the guard drops there is the flood's.)
                received: a.rx.saturating_sub(b.rx)
                    + a.fast_forwarded.saturating_sub(b.fast_forwarded)
                    + match self.kind {
                        PathKind::FerryFast => a.xdp_drops.saturating_sub(b.xdp_drops),
                        _ => 0,
                    },
                forwarded: a.forwarded.saturating_sub(b.forwarded),
                socket_drops: a
                    .socket_drops
                    .saturating_sub(b.socket_drops)
                    .max(k.udp_rcvbuf_errors),
                fast_forwarded: a.fast_forwarded.saturating_sub(b.fast_forwarded),
                source: "metrics",
            },
            (PathKind::Direct, _, _) => RelayCounts {
                received: k.ip_forwarded,
                socket_drops: 0,
                forwarded: k.ip_forwarded,
                fast_forwarded: 0,
                source: "kernel",
            },
            _ => RelayCounts {
                received: k.udp_in,
                socket_drops: k.udp_rcvbuf_errors,
                forwarded: k.udp_out,
                fast_forwarded: 0,
                source: "kernel",
            },
        }
    }

    /// The run time per run of the XDP programs the forwarder holds between `before` and
    /// `after`, ns: `None` unless `kernel.bpf_stats_enabled` is on and they ran.
    pub fn xdp_ns_per_run(&self, before: &Snapshot, after: &Snapshot) -> Option<f64> {
        let ((t0, n0), (t1, n1)) = (before.xdp?, after.xdp?);
        let runs = n1.checked_sub(n0).filter(|&n| n > 0)?;
        Some(t1.saturating_sub(t0) as f64 / runs as f64)
    }

    /// The sum of the samples of `prefix` on Ferry's metrics page (`None` for other paths or
    /// when the page cannot be read).
    pub fn metric(&self, prefix: &str) -> Option<u64> {
        let page = self.relay.as_ref()?.metrics();
        (!page.is_empty()).then(|| sum_metric(&page, prefix))
    }

    /// A token for `slot` of `session_id` that this path's relay accepts, valid for
    /// `lifetime_secs` (Ferry only: an error for other paths).
    pub fn mint(
        &self,
        session_id: u64,
        slot: Slot,
        lifetime_secs: u64,
    ) -> anyhow::Result<MintedToken> {
        self.authority
            .as_ref()
            .context("only ferry-relay paths take tokens")?
            .mint(session_id, slot, lifetime_secs)
    }

    /// The relay's log so far (Ferry only), for an error message.
    pub fn relay_log(&self) -> Option<String> {
        self.relay.as_ref().map(RelayProcess::log_text)
    }
}

/// coturn's config: UDP only, no authentication, listening on the generator's side of the
/// relay host and relaying from its sink side, only the test range allowed as peers.
fn coturn_config(bed: &dyn Testbed, dir: &Path) -> String {
    format!(
        "listening-ip={listen}\nlistening-port={TURN_PORT}\nrelay-ip={relay}\n\
         external-ip={relay}\nmin-port=40000\nmax-port=60000\nno-auth\nno-tcp\nno-tls\nno-dtls\n\
         no-tcp-relay\nno-cli\nno-multicast-peers\nrelay-threads=1\n\
         denied-peer-ip=0.0.0.0-255.255.255.255\nallowed-peer-ip=198.18.0.0-198.19.255.255\n\
         realm=ferry-bench\nno-stdout-log\nlog-file={log}\nsimple-log\npidfile={pid}\n\
         userdb={db}\nmax-bps=0\ntotal-quota=0\nuser-quota=0\nstale-nonce=0\n\
         channel-lifetime=3600\npermission-lifetime=3600\nmax-allocate-lifetime=3600\n",
        listen = bed.relay_ip_to_generator(),
        relay = bed.relay_ip_to_sink(),
        log = dir.join("turn.log").display(),
        pid = dir.join("turn.pid").display(),
        db = dir.join("turndb").display(),
    )
}

/// Waits (at most 10 s) until process `pid` has a UDP socket on `port`.
fn wait_for_udp_listener(pid: u32, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{port:04X} ");
    loop {
        check_interrupted()?;
        // The process's own view of its namespace's sockets.
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap_or_default();
        if table.lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|local| format!("{local} ").contains(&needle))
        }) {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("the forwarder (pid {pid}) exited before it listened on port {port}");
        }
        if Instant::now() > deadline {
            bail!("the forwarder (pid {pid}) did not listen on UDP port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run time (ns) and run count of the XDP programs process `pid` holds, summed over its
/// descriptors' fdinfo; counted only while `kernel.bpf_stats_enabled` is 1.
pub fn xdp_stats(pid: u32) -> Option<(u64, u64)> {
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

/// The thread ids of process `pid`.
fn threads(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut tids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        tids.push(
            task?
                .file_name()
                .to_string_lossy()
                .parse()
                .context("a task id")?,
        );
    }
    Ok(tids)
}

/// Applies `apply` to every thread of process `pid`. A thread that ends between the listing
/// and `apply` is skipped (the relay's admin listener, for one, serves each connection on a
/// short-lived thread, and the harness polls it while a forwarder starts); any other failure
/// is returned.
fn for_each_thread(
    pid: u32,
    mut apply: impl FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for tid in threads(pid)? {
        if let Err(e) = apply(tid)
            && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
        {
            return Err(e);
        }
    }
    Ok(())
}

/// Pins every thread of process `pid` to `cpu`.
fn pin_all_threads(pid: u32, cpu: usize) -> anyhow::Result<()> {
    for_each_thread(pid, |tid| {
        pin_pid(tid, cpu).with_context(|| format!("pinning thread {tid} to CPU {cpu}"))
    })
}

/// Pins every thread of process `pid` whose name does not start with `except` to `cpu`.
fn pin_threads_but(pid: u32, cpu: usize, except: &str) -> anyhow::Result<()> {
    for_each_thread(pid, |tid| {
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .with_context(|| format!("reading thread {tid}'s name"))?;
        match name.starts_with(except) {
            true => Ok(()),
            false => {
                pin_pid(tid, cpu).with_context(|| format!("pinning thread {tid} to CPU {cpu}"))
            }
        }
    })
}

/// Schedules every thread of forwarder `pid` as the relay host's receive threads are
/// ([`Realtime::RoundRobin`]): they take turns on the relay CPU, ahead of everything else.
fn realtime_forwarder(pid: u32) -> anyhow::Result<()> {
    for_each_thread(pid, |tid| {
        set_realtime(tid, Realtime::RoundRobin)
            .with_context(|| format!("real-time scheduling for forwarder thread {tid}"))
    })
}

/// The resident memory of process `pid` (`VmRSS` of `/proc/PID/status`), bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .split_whitespace()
        .next()
        .context("no VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

/// Eight random bytes from `rng` (session ids start from them).
pub(crate) fn rand8(rng: &dyn ring::rand::SecureRandom) -> anyhow::Result<[u8; 8]> {
    let mut b = [0u8; 8];
    rng.fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(b)
}

/// The next BIND sequence number (starting from the clock, as peers do).
static BIND_SEQ: LazyLock<AtomicU64> =
    LazyLock::new(|| AtomicU64::new(ferry_testkit::micros_now()));

/// BIND, CHALLENGE, BIND, BIND-ACK from `sock` to the relay at `relay`.
pub(crate) fn bind(sock: &UdpSocket, relay: SocketAddr, token: &MintedToken) -> anyhow::Result<()> {
    bind_within(sock, relay, token, Duration::from_secs(2))
}

/// [`bind`], each answer awaited at most `timeout`: the error of a missing answer holds the
/// socket's `WouldBlock` or `TimedOut`.
pub(crate) fn bind_within(
    sock: &UdpSocket,
    relay: SocketAddr,
    token: &MintedToken,
    timeout: Duration,
) -> anyhow::Result<()> {
    let keys = SlotKeys::derive(&token.slot_secret);
    let slot = token.claims.slot;
    sock.set_read_timeout(Some(timeout))?;
    let (mut out, mut inbuf) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut cookie = [0u8; 16];
    for _ in 0..3 {
        // Sequence numbers grow for every BIND a source sends, whichever session it is for.
        let bind_seq = BIND_SEQ.fetch_add(1, Ordering::Relaxed);
        let fields = BindFields {
            slot,
            bind_seq,
            cookie,
            token: &token.bytes,
        };
        let n = wire::encode_bind(&mut out, token.claims.session_id, &fields, |m| {
            keys.peer.mac(m)
        })?;
        sock.send_to(&out[..n], relay)?;
        // The socket may hold the relay's messages for other sessions it is bound in (a
        // notice that the other slot bound): skip them.
        let packet = loop {
            let (len, _) = sock.recv_from(&mut inbuf).context("no answer to BIND")?;
            match wire::parse(&inbuf[..len]) {
                Ok(p) if p.session_id() == token.claims.session_id => break p,
                _ => continue,
            }
        };
        match packet {
            Packet::Challenge(c) => cookie = *c.cookie(),
            Packet::BindAck(_) => return Ok(()),
            Packet::Reject(r) => bail!("BIND rejected: {}", r.reason().name()),
            _ => bail!("unexpected answer to BIND"),
        }
    }
    bail!("BIND did not complete")
}
