//! Where the load runs: a generator host, the relay host and a sink host.
//!
//! [`Testbed`] is what every scenario needs from a topology: where the generator and the sink
//! open their sockets, how the relay host runs a process and reads its kernel's UDP counters.
//! [`NetnsTestbed`] builds it on one machine from three network namespaces and two veth pairs,
//! generator → relay host → sink, addressed from 198.18.0.0/15, and removes them on drop (so
//! also on an error, a panic, or a SIGINT/SIGTERM that the caller turns into an error; see
//! [`super::catch_interrupts`]). A testbed on real interfaces (the relay on a NIC, the generator on
//! another machine) implements the same trait.

use std::io::BufRead as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};
use ferry_relay::xdp::wire::WireEnd;
use ferry_testkit::netns::{in_ns, link_info};

use super::flood::{self, XdpFlooder};
use crate::udp::{packet_socket, pin_pid, socket};

/// What a scenario needs from a topology.
pub trait Testbed: std::fmt::Debug {
    /// One line saying what the topology is.
    fn describe(&self) -> String;
    /// The generator host's address.
    fn generator_ip(&self) -> IpAddr;
    /// The sink host's address.
    fn sink_ip(&self) -> IpAddr;
    /// The relay host's address on the generator's side.
    fn relay_ip_to_generator(&self) -> IpAddr;
    /// The relay host's address on the sink's side.
    fn relay_ip_to_sink(&self) -> IpAddr;
    /// A UDP socket (large buffers) on the generator host, bound to `addr`.
    fn generator_socket(&self, addr: SocketAddr) -> anyhow::Result<UdpSocket>;
    /// A UDP socket (large buffers) on the sink host, bound to `addr`.
    fn sink_socket(&self, addr: SocketAddr) -> anyhow::Result<UdpSocket>;
    /// A command that runs `program` on the relay host.
    fn relay_command(&self, program: &Path) -> Command;
    /// The relay host's network namespace, when it is one on this machine.
    fn relay_netns(&self) -> Option<&str>;
    /// The relay host's kernel counters (UDP and IP forwarding).
    fn relay_kernel_counters(&self) -> anyhow::Result<KernelCounters>;
    /// The sink host's kernel counters.
    fn sink_kernel_counters(&self) -> anyhow::Result<KernelCounters>;
    /// Bytes waiting in the receive queues of the relay host's UDP sockets on `port`.
    fn relay_udp_queued(&self, port: u16) -> anyhow::Result<u64>;
    /// The relay host's interface towards the generator (where the XDP guard attaches).
    fn relay_interface_to_generator(&self) -> &str;
    /// A packet socket on the generator's interface towards the relay host (it sends whole
    /// frames, qdisc bypassed), with that link's MAC addresses: the generator's, the relay
    /// host's. For a flood with forged source addresses.
    fn generator_packet_socket(&self) -> anyhow::Result<(UdpSocket, [u8; 6], [u8; 6])>;
    /// Routes `cidr` from the relay host back to the generator, so that reverse-path filtering
    /// keeps datagrams forged from it.
    fn route_to_generator(&self, cidr: &str) -> anyhow::Result<()>;
    /// An XDP flood generator on the generator's interface (with what it needs of the
    /// relay host's interface); it routes [`flood::XDP_SPOOF_NET`] back towards the generator.
    fn generator_xdp_flooder(&self) -> anyhow::Result<XdpFlooder> {
        bail!("this testbed has no XDP flood generator")
    }
    /// The kernel threads that do the relay host's receive processing, when they are threads
    /// of their own that this machine can measure (threaded NAPI on the namespace testbed):
    /// their CPU time counts in the relay host's CPU per packet.
    fn relay_host_threads(&self) -> Vec<u32> {
        Vec::new()
    }
    /// The relay host's interface towards the sink, when the XDP fast path can redirect to
    /// it.
    fn relay_interface_to_sink(&self) -> Option<&str> {
        None
    }
}

/// A host's kernel counters, from its `/proc/net/snmp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// `Udp: InDatagrams`: datagrams delivered to a socket.
    pub udp_in: u64,
    /// `Udp: RcvbufErrors`: datagrams dropped because a socket's receive queue was full.
    pub udp_rcvbuf_errors: u64,
    /// `Udp: OutDatagrams`: datagrams sent (a GSO send may count once for many).
    pub udp_out: u64,
    /// `Ip: ForwDatagrams`: packets the host routed on (the direct path).
    pub ip_forwarded: u64,
}

impl KernelCounters {
    /// Parses a `/proc/net/snmp` page.
    pub fn parse(page: &str) -> anyhow::Result<Self> {
        let field = |proto: &str, name: &str| -> anyhow::Result<u64> {
            let mut lines = page.lines().filter(|l| l.starts_with(proto));
            let names = lines.next().with_context(|| format!("no {proto} header"))?;
            let values = lines.next().with_context(|| format!("no {proto} values"))?;
            let at = names
                .split_whitespace()
                .position(|n| n == name)
                .with_context(|| format!("no {proto} {name}"))?;
            values
                .split_whitespace()
                .nth(at)
                .with_context(|| format!("no value for {proto} {name}"))?
                .parse()
                .with_context(|| format!("{proto} {name} is not a number"))
        };
        Ok(Self {
            udp_in: field("Udp:", "InDatagrams")?,
            udp_rcvbuf_errors: field("Udp:", "RcvbufErrors")?,
            udp_out: field("Udp:", "OutDatagrams")?,
            ip_forwarded: field("Ip:", "ForwDatagrams")?,
        })
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            udp_in: self.udp_in.saturating_sub(earlier.udp_in),
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(earlier.udp_rcvbuf_errors),
            udp_out: self.udp_out.saturating_sub(earlier.udp_out),
            ip_forwarded: self.ip_forwarded.saturating_sub(earlier.ip_forwarded),
        }
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn ethtool(ns: &str, dev: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, "ethtool", "-K", dev];
    all.extend_from_slice(args);
    run("ip", &all).with_context(|| format!("ethtool -K {dev} {} in {ns}", args.join(" ")))
}

/// Frames the generator's veth queues while the relay host's veth ring is full.
const GENERATOR_QUEUE: &str = "4096";

/// The real-time priority of the testbed's NAPI threads and of every forwarder: that of
/// interrupt threads.
pub const REALTIME_PRIORITY: &str = "50";

/// How a thread of the testbed is scheduled, always at [`REALTIME_PRIORITY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Realtime {
    /// `SCHED_RR`: threads of the relay host (its NAPI threads, the forwarder) preempt
    /// everything else on the relay CPU, and take turns with each other: each runs until it
    /// waits for work or its round-robin slice (100 ms) ends, so that under overload neither
    /// starves the other.
    RoundRobin,
    /// `SCHED_FIFO`: the sink's NAPI thread runs as soon as frames wait, ahead of the
    /// generator.
    Fifo,
}

/// Makes thread `tid` real-time: `policy`, at [`REALTIME_PRIORITY`].
pub fn set_realtime(tid: u32, policy: Realtime) -> anyhow::Result<()> {
    let flag = match policy {
        Realtime::RoundRobin => "-r",
        Realtime::Fifo => "-f",
    };
    run("chrt", &[flag, "-p", REALTIME_PRIORITY, &tid.to_string()])
}

/// The process ids of the kernel's NAPI threads (`napi/<interface>-<id>`).
fn napi_threads() -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that ended since the listing has no comm: skipped.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm"))
            && comm.starts_with("napi/")
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Turns threaded NAPI on for `dev` in namespace `ns` (which must have NAPI: GRO or XDP on),
/// pins its NAPI threads to `cpu` and makes them real-time with `policy`. The threads are the ones that appear when it is turned
/// on (a thread's name is cut to 15 bytes, too short to tell the testbeds' interfaces apart).
fn threaded_napi(ns: &str, dev: &str, cpu: usize, policy: Realtime) -> anyhow::Result<Vec<u32>> {
    let before = napi_threads()?;
    // `ip netns exec` mounts the namespace's own /sys.
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{dev}/threaded"),
        ],
    )
    .with_context(|| format!("threaded NAPI on {dev} in {ns}"))?;
    let tag: String = format!("napi/{dev}").chars().take(15).collect();
    let new: Vec<u32> = napi_threads()?
        .into_iter()
        .filter(|pid| !before.contains(pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end().starts_with(&tag))
        })
        .collect();
    if new.is_empty() {
        bail!("threaded NAPI on {dev} in {ns}: no NAPI thread of it appeared");
    }
    for &pid in &new {
        pin_pid(pid, cpu)
            .with_context(|| format!("pinning {dev}'s NAPI thread {pid} to CPU {cpu}"))?;
        set_realtime(pid, policy)
            .with_context(|| format!("real-time scheduling for {dev}'s NAPI thread {pid}"))?;
    }
    Ok(new)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Three network namespaces on this machine: the generator's, the relay host's and the
/// sink's, joined by two veth pairs.
///
/// ```text
///  generator ns            relay ns                         sink ns
///  198.18.N.2 ── veth ── 198.18.N.1 | 198.19.N.1 ── veth ── 198.19.N.2
/// ```
///
/// The generator's and the sink's default routes point at the relay host, which routes
/// between its two veths (`net.ipv4.ip_forward = 1`): the direct path, with no relay process,
/// is the topology's own limit. `N` differs between processes and between the testbeds of one
/// process; names carry the process id and a counter.
///
/// Each host receives as if it had a NIC of its own: every receiving veth polls with threaded
/// NAPI, the relay host's two on the relay CPU (real-time round-robin, as the forwarder),
/// the sink's on the load CPU (real-time). So the relay host's routing, its stack up to the
/// forwarder's socket and its XDP programs run on the relay CPU whichever path is measured,
/// not in the sending generator's softirq, and [`Testbed::relay_host_threads`] lets a trial
/// count them. The generator's veth checksums every datagram in full (no offload) and queues
/// what the relay host's veth cannot take yet, for every path.
#[derive(Debug)]
pub struct NetnsTestbed {
    /// The generator's namespace.
    pub generator_ns: String,
    /// The relay host's namespace.
    pub relay_ns: String,
    /// The sink's namespace.
    pub sink_ns: String,
    /// The third octet of every address.
    pub net: u8,
    /// The relay host's veth towards the generator.
    pub relay_if_generator: String,
    /// The relay host's veth towards the sink.
    pub relay_if_sink: String,
    /// The generator's veth.
    pub generator_if: String,
    /// The sink's veth.
    pub sink_if: String,
    /// The CPU the relay host's receive processing (its veths' NAPI threads) runs on.
    pub relay_cpu: usize,
    /// The CPU the sink's receive processing (its veth's NAPI thread) runs on.
    pub load_cpu: usize,
    /// The NAPI threads of the relay host's two veths.
    relay_napi: Vec<u32>,
    /// With `--xdp-wire`: the two ends of the XDP wire between the generator's veth and the
    /// relay host's (in the generator's namespace), attached while the testbed lives.
    wire: Vec<WireEnd>,
}

impl NetnsTestbed {
    /// Creates the namespaces, veths, addresses and routes, with the relay host's receive
    /// processing on `relay_cpu` and the sink's on `load_cpu` (see [`NetnsTestbed`]), and with
    /// `xdp_wire` an XDP wire in front of the relay host (`--xdp-wire`, docs/bench.md). Needs
    /// root, iproute2 and ethtool.
    pub fn new(relay_cpu: usize, load_cpu: usize, xdp_wire: bool) -> anyhow::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let net = (pid.wrapping_mul(37).wrapping_add(n) % 200) as u8 + 20;
        // Interface names are at most 15 bytes.
        let ifname =
            |tag: &str| -> String { format!("fb{tag}{pid}x{n}").chars().take(15).collect() };
        let mut bed = Self {
            generator_ns: format!("ferry-bg-{pid}-{n}"),
            relay_ns: format!("ferry-br-{pid}-{n}"),
            sink_ns: format!("ferry-bs-{pid}-{n}"),
            net,
            relay_if_generator: ifname("r"),
            relay_if_sink: ifname("q"),
            generator_if: ifname("g"),
            sink_if: ifname("s"),
            relay_cpu,
            load_cpu,
            relay_napi: Vec::new(),
            wire: Vec::new(),
        };
        // From here on, dropping `bed` removes whatever was created.
        let wire = xdp_wire.then(|| (ifname("a"), ifname("b")));
        let wire_ends = wire.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
        bed.relay_napi = bed.build(&bed.generator_if, &bed.sink_if, wire_ends)?;
        if let Some((a, b)) = wire_ends {
            bed.wire = bed.attach_wire(a, b)?;
        }
        Ok(bed)
    }

    /// Attaches the XDP wire that [`NetnsTestbed::build`] laid between the generator's veth and
    /// the relay host's: `wire_a` (the generator's veth's peer) and `wire_b` (the relay host's
    /// veth's), both in the generator's namespace, each redirecting every frame it receives to
    /// the other with the `ferry_wire` XDP program. The relay host's veth then receives what
    /// the generator sends as XDP frames in pages of their own, as a NIC driver receives into
    /// its DMA pages, rather than as the generator's socket buffers, which a veth copies into a
    /// fresh page before it runs a native XDP program (`skb_pp_cow_data`: a socket's buffer has
    /// a head of its own allocation, not a page fragment, and less than 256 bytes of
    /// headroom). So the XDP fast path pays no copy that a NIC would not make; the copy moves
    /// to the wire, on the generator's CPU, for every path alike. What the relay host's
    /// 256-frame ring cannot take is then dropped at the wire, as by a NIC whose ring is full,
    /// instead of waiting in the generator's queue.
    fn attach_wire(&self, wire_a: &str, wire_b: &str) -> anyhow::Result<Vec<WireEnd>> {
        let g = self.generator_ns.as_str();
        // The generator's veth receives the wire's XDP frames (the replies) only with NAPI.
        // What the relay host sends back (replies) crosses the wire too: its veth checksums
        // in full (an XDP frame cannot carry a checksum left to offload, so the generator
        // would drop it), which also turns TSO off, without which wire_b would take those
        // frames past its XDP program, into its own stack.
        ethtool(g, &self.generator_if, &["gro", "on"])?;
        ethtool(
            &self.relay_ns,
            &self.relay_if_generator,
            &["tx-checksumming", "off"],
        )?;
        in_ns(g, || -> anyhow::Result<Vec<WireEnd>> {
            Ok(vec![
                WireEnd::attach(wire_a, wire_b).context("the XDP wire (a to b)")?,
                WireEnd::attach(wire_b, wire_a).context("the XDP wire (b to a)")?,
            ])
        })?
    }

    /// Builds the topology; returns the NAPI threads of the relay host's veths. With `wire`,
    /// the generator's veth and the relay host's are not each other's peers: each is paired
    /// with one of the wire's two veths, both in the generator's namespace
    /// ([`NetnsTestbed::attach_wire`]).
    fn build(
        &self,
        gen_if: &str,
        sink_if: &str,
        wire: Option<(&str, &str)>,
    ) -> anyhow::Result<Vec<u32>> {
        let (g, r, s) = (
            self.generator_ns.as_str(),
            self.relay_ns.as_str(),
            self.sink_ns.as_str(),
        );
        for ns in [g, r, s] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let net = self.net;
        for (outer_ns, outer_if, inner_if, outer_ip, inner_ip) in [
            (
                g,
                gen_if,
                self.relay_if_generator.as_str(),
                format!("198.18.{net}.2/24"),
                format!("198.18.{net}.1/24"),
            ),
            (
                s,
                sink_if,
                self.relay_if_sink.as_str(),
                format!("198.19.{net}.2/24"),
                format!("198.19.{net}.1/24"),
            ),
        ] {
            match wire {
                Some((wire_a, wire_b)) if outer_ns == g => {
                    ip(&[
                        "link", "add", wire_a, "type", "veth", "peer", "name", outer_if,
                    ])?;
                    ip(&[
                        "link", "add", wire_b, "type", "veth", "peer", "name", inner_if,
                    ])?;
                    for dev in [wire_a, wire_b] {
                        ip(&["link", "set", dev, "netns", g])?;
                        ip(&["-n", g, "link", "set", dev, "up"])?;
                    }
                }
                _ => ip(&[
                    "link", "add", outer_if, "type", "veth", "peer", "name", inner_if,
                ])?,
            }
            ip(&["link", "set", outer_if, "netns", outer_ns])?;
            ip(&["link", "set", inner_if, "netns", r])?;
            ip(&["-n", outer_ns, "addr", "add", &outer_ip, "dev", outer_if])?;
            ip(&["-n", r, "addr", "add", &inner_ip, "dev", inner_if])?;
            ip(&["-n", outer_ns, "link", "set", outer_if, "up"])?;
            ip(&["-n", r, "link", "set", inner_if, "up"])?;
        }
        ip(&[
            "-n",
            g,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{net}.1"),
        ])?;
        ip(&[
            "-n",
            s,
            "route",
            "add",
            "default",
            "via",
            &format!("198.19.{net}.1"),
        ])?;
        run(
            "ip",
            &["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )?;
        // The generator sends runs of datagrams as one UDP GSO buffer; its veth cuts them
        // into datagrams and checksums each in full before they cross, so that the relay host
        // receives them one by one, complete, as from a wire (a partial checksum left to
        // offload is something the XDP fast path cannot finish; every path gets the same
        // frames). Without TSO on the sending veth, its peer takes every frame through NAPI.
        ethtool(
            g,
            gen_if,
            &["tx-checksumming", "off", "tx-udp-segmentation", "off"],
        )?;
        // A queue in front of the generator's veth: when the relay host's veth ring (256
        // frames) is full, the veth stops taking frames and they wait here (Linux 6.16 and
        // later; before, the veth drops them), as behind a wire into a NIC with a ring of a few
        // thousand descriptors, instead of being lost to the bursts a generator catching up
        // after a pause sends faster than any wire. What the relay host cannot take in then
        // slows the generator down rather than counting as loss before the relay.
        run(
            "ip",
            &[
                "netns",
                "exec",
                g,
                "tc",
                "qdisc",
                "replace",
                "dev",
                gen_if,
                "root",
                "pfifo",
                "limit",
                GENERATOR_QUEUE,
            ],
        )
        .context("tc (a queue on the generator's veth)")?;
        // A veth hands what it sends to its peer's GRO only when it has no TSO (or the
        // datagram is the sender's own and the peer forwards with GRO): off on the relay
        // host's side, which sends UDP only.
        ethtool(r, &self.relay_if_sink, &["tso", "off"])?;
        // Receive processing as on hosts with NICs of their own: every receiving veth polls
        // with NAPI (GRO on: a veth has NAPI only with GRO or an XDP program), in a kernel
        // thread of its own (threaded NAPI) pinned to its host's CPU, as a NIC's receive queue
        // whose interrupt goes to that CPU. Without it a veth's receive work runs in the
        // softirq of the CPU that sent: the relay host's routing, or its XDP program, on the
        // generator's CPU. The same for every path. The threads are real-time, as interrupt
        // threads, so that other work on the machine never delays them while a veth's
        // 256-frame ring overflows: the relay host's round-robin, as the forwarder is (see
        // `Realtime`), the sink's first-in-first-out. The sink's veth coalesces what arrives
        // (GRO), so that the sink, reading with UDP GRO, costs less per datagram.
        let mut receivers = vec![
            (
                r,
                self.relay_if_generator.as_str(),
                self.relay_cpu,
                Realtime::RoundRobin,
            ),
            (
                r,
                self.relay_if_sink.as_str(),
                self.relay_cpu,
                Realtime::RoundRobin,
            ),
            (s, sink_if, self.load_cpu, Realtime::Fifo),
        ];
        // The generator's host receives too: the relay's replies, and the CHALLENGEs the XDP
        // guard sends back to the flood's forged sources. With NAPI on its veth the guard can
        // send there (a veth hands XDP frames only to a peer that polls with NAPI), as out of
        // a NIC, and the work stays on the load CPU. (Behind the XDP wire, the wire's own
        // setup takes care of it.)
        if wire.is_none() {
            receivers.push((g, gen_if, self.load_cpu, Realtime::Fifo));
        }
        let mut relay_napi = Vec::new();
        for (ns, dev, cpu, policy) in receivers {
            ethtool(ns, dev, &["gro", "on"])?;
            let threads = threaded_napi(ns, dev, cpu, policy)?;
            if ns == r {
                relay_napi.extend(threads);
            }
        }
        Ok(relay_napi)
    }

    fn counters(ns: &str) -> anyhow::Result<KernelCounters> {
        // /proc/thread-self/net is the calling thread's namespace; /proc/net would be the
        // process's (its main thread's).
        let page = in_ns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))?
            .with_context(|| format!("reading /proc/net/snmp in {ns}"))?;
        KernelCounters::parse(&page)
    }
}

impl Testbed for NetnsTestbed {
    fn describe(&self) -> String {
        format!(
            "network namespaces: generator {} (198.18.{n}.2) → relay host {} (198.18.{n}.1, \
             198.19.{n}.1) → sink {} (198.19.{n}.2), veth pairs{}",
            self.generator_ns,
            self.relay_ns,
            self.sink_ns,
            if self.wire.is_empty() {
                ""
            } else {
                ", an XDP wire in front of the relay host (--xdp-wire)"
            },
            n = self.net
        )
    }

    fn generator_ip(&self) -> IpAddr {
        Ipv4Addr::new(198, 18, self.net, 2).into()
    }

    fn sink_ip(&self) -> IpAddr {
        Ipv4Addr::new(198, 19, self.net, 2).into()
    }

    fn relay_ip_to_generator(&self) -> IpAddr {
        Ipv4Addr::new(198, 18, self.net, 1).into()
    }

    fn relay_ip_to_sink(&self) -> IpAddr {
        Ipv4Addr::new(198, 19, self.net, 1).into()
    }

    fn generator_socket(&self, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
        in_ns(&self.generator_ns, || socket(addr))?
            .with_context(|| format!("binding {addr} in {}", self.generator_ns))
    }

    fn sink_socket(&self, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
        in_ns(&self.sink_ns, || socket(addr))?
            .with_context(|| format!("binding {addr} in {}", self.sink_ns))
    }

    fn relay_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.relay_ns])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    fn relay_netns(&self) -> Option<&str> {
        Some(&self.relay_ns)
    }

    fn relay_kernel_counters(&self) -> anyhow::Result<KernelCounters> {
        Self::counters(&self.relay_ns)
    }

    fn sink_kernel_counters(&self) -> anyhow::Result<KernelCounters> {
        Self::counters(&self.sink_ns)
    }

    fn relay_udp_queued(&self, port: u16) -> anyhow::Result<u64> {
        let table = in_ns(&self.relay_ns, || {
            std::fs::read_to_string("/proc/thread-self/net/udp")
        })??;
        Ok(udp_queued(&table, port))
    }

    fn relay_interface_to_generator(&self) -> &str {
        &self.relay_if_generator
    }

    fn generator_packet_socket(&self) -> anyhow::Result<(UdpSocket, [u8; 6], [u8; 6])> {
        let (index, gen_mac) = link_info(&self.generator_ns, &self.generator_if)?;
        let (_, relay_mac) = link_info(&self.relay_ns, &self.relay_if_generator)?;
        let raw = in_ns(&self.generator_ns, || packet_socket(index))?
            .context("a packet socket on the generator's veth")?;
        Ok((raw, gen_mac, relay_mac))
    }

    fn route_to_generator(&self, cidr: &str) -> anyhow::Result<()> {
        let via = self.generator_ip().to_string();
        ip(&["-n", &self.relay_ns, "route", "replace", cidr, "via", &via])
    }

    fn relay_interface_to_sink(&self) -> Option<&str> {
        Some(&self.relay_if_sink)
    }

    fn relay_host_threads(&self) -> Vec<u32> {
        self.relay_napi.clone()
    }

    fn generator_xdp_flooder(&self) -> anyhow::Result<XdpFlooder> {
        self.route_to_generator(flood::XDP_SPOOF_NET)?;
        let (ifindex, _) = link_info(&self.generator_ns, &self.generator_if)?;
        let flooder = XdpFlooder {
            generator_ns: self.generator_ns.clone(),
            ifindex,
            relay_if: (self.relay_ns.clone(), self.relay_if_generator.clone()),
        };
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.relay_ns,
                "ethtool",
                "-K",
                &self.relay_if_generator,
                "gro",
                "on",
            ],
        )
        .context("ethtool (GRO on the relay host's veth, for the XDP flood)")?;
        Ok(flooder)
    }
}

impl Drop for NetnsTestbed {
    fn drop(&mut self) {
        // Deleting a namespace removes its ends of the veths, which removes the pairs.
        for ns in [&self.generator_ns, &self.relay_ns, &self.sink_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The bytes in the receive queues of the sockets bound to `port` in a `/proc/net/udp` table
/// (`local_address` `ADDR:PORT` and `tx_queue:rx_queue`, all hexadecimal).
fn udp_queued(table: &str, port: u16) -> u64 {
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let local = fields.nth(1)?;
            let queues = fields.nth(2)?;
            local.ends_with(&want).then_some(queues)
        })
        .filter_map(|q| u64::from_str_radix(q.split(':').nth(1)?, 16).ok())
        .sum()
}

/// Namespaces named `ferry-b?-PID-N` whose process `PID` is gone: what a run killed with
/// SIGKILL left behind. Returns their names (`ferry-bench cleanup` deletes them).
pub fn stale_namespaces() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    let mut stale = Vec::new();
    for line in out.stdout.lines() {
        let line = line?;
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = ["ferry-bg-", "ferry-br-", "ferry-bs-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            stale.push(name.to_string());
        }
    }
    Ok(stale)
}

/// Deletes namespace `name`.
pub fn delete_namespace(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "del", name])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters_are_read_by_name() {
        let page = "Ip: Forwarding DefaultTTL InReceives ForwDatagrams\n\
                    Ip: 1 64 100 42\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 1 2 20 3 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 0 0\n";
        let c = KernelCounters::parse(page).expect("a valid page");
        assert_eq!(
            c,
            KernelCounters {
                udp_in: 10,
                udp_rcvbuf_errors: 3,
                udp_out: 20,
                ip_forwarded: 42
            }
        );
        let later = KernelCounters { udp_in: 15, ..c };
        assert_eq!(later.since(&c).udp_in, 5);
        assert!(KernelCounters::parse("Udp: InDatagrams\nUdp: 1\n").is_err());
    }

    #[test]
    fn queued_bytes_are_summed_over_the_sockets_of_a_port() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when\n\
                     1: 00000000:1B58 00000000:0000 07 00000000:00000100 00:00000000\n\
                     2: 00000000:1B58 00000000:0000 07 00000000:00000010 00:00000000\n\
                     3: 0100007F:2328 00000000:0000 07 00000000:00000fff 00:00000000\n";
        assert_eq!(udp_queued(table, 7000), 0x110);
        assert_eq!(udp_queued(table, 9000), 0xfff);
        assert_eq!(udp_queued(table, 1), 0);
    }
}
