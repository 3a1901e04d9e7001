//! One relay worker: a thread pinned to a core, with its own io_uring and its own
//! `SO_REUSEPORT` socket per listen address, that hands every datagram to a
//! [`PacketHandler`] and carries out the outcome.
//!
//! The loop, per iteration: submit everything queued and, in the same entry into the kernel,
//! wait for a completion other than those the submitted sends post at once (at most `tick`
//! long; for a batch of them only while a backlog lasts, see [`Wait`] and
//! [`Ring::submit_and_wait`]); read the clocks
//! once; drain all completions; for each received datagram (with UDP GRO, a receive may carry
//! several of one sender) ask the handler and queue the send (forwards go out from the receive
//! buffer itself); re-arm receives the kernel ended; on a
//! tick, send what the handler's timers produced (the reaper's CLOSEs); publish counters. No
//! allocation happens per received datagram.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ferry_core::time::UnixTime;
use ferry_core::wire::{HeaderError, MAX_DATAGRAM};
use io_uring::types::Timespec;
use socket2::{Domain, Protocol, Socket, Type};

use crate::session::{Counters, Notice, Outcome};
use crate::uring::{
    Completion, MAX_GSO_BYTES, MAX_SEGMENTS, MIN_LENT, RecvProblem, Ring, SHUTDOWN_LIMIT, Segment,
    UringError, is_v4, recv_payload_room,
};

/// What the worker asks about each datagram.
pub trait PacketHandler: Send {
    /// Decides what to do with `datagram` from `from`, sent to the relay's address `local`
    /// (known on a socket bound to a wildcard address, `None` on one bound to a specific
    /// address); replies go into `reply`. Each send the outcome asks for names its source
    /// address, which the worker passes to the kernel (`IP_PKTINFO` / `IPV6_PKTINFO`).
    fn handle(
        &mut self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome;

    /// Called about every [`WorkerConfig::tick`], for timers. Datagrams the handler sends
    /// unasked (the reaper's CLOSEs) go into `notices`, which the worker sends and empties.
    fn tick(&mut self, now: Instant, wall: UnixTime, notices: &mut Vec<Notice>);
}

/// Counters one worker publishes for metrics (relaxed atomics, updated once per batch).
///
/// Each `WorkerStats` has one writer, its worker, which adds with a plain load and store rather
/// than an atomic read-modify-write (no locked instruction per counter per batch); readers see
/// every update whole.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Datagrams received and handed to the [`PacketHandler`].
    pub rx_packets: AtomicU64,
    /// Bytes of those datagrams.
    pub rx_bytes: AtomicU64,
    /// Datagrams sent (forwards and replies) that the kernel accepted.
    pub tx_packets: AtomicU64,
    /// Bytes of those datagrams.
    pub tx_bytes: AtomicU64,
    /// Datagrams longer than a receive buffer has room for ([`recv_payload_room`] of
    /// [`RECV_BUF_SIZE`]: 1904 bytes, 1864 on a socket bound to a wildcard address; with UDP GRO the buffers hold any UDP datagram, so this
    /// stays 0), and so longer than [`MAX_DATAGRAM`]: malformed by rule
    /// `too_long` (protocol.md §2.1), cut short by the kernel and dropped without reaching the
    /// handler. [`WorkerStats::add_to_session_counters`] adds them to the session
    /// counters, where the handler counts the shorter datagrams over [`MAX_DATAGRAM`].
    pub rx_too_long: AtomicU64,
    /// Receive completions whose header or source address could not be read (not expected from
    /// a UDP socket); their datagrams are dropped.
    pub rx_undecodable: AtomicU64,
    /// Times a multishot receive found no receive buffer lent to the kernel: a burst used up
    /// the few lent below saturation (or every buffer was in use). The receive ends; its
    /// datagrams wait in the socket's queue (lost only if that overflows, counted in
    /// [`WorkerStats::socket_drops`]) while the worker lends more buffers and re-arms it.
    pub rx_no_buffers: AtomicU64,
    /// Datagrams whose send the kernel failed (e.g. unreachable destination, or a UDP GSO send
    /// the device cannot do).
    pub tx_errors: AtomicU64,
    /// Sends dropped because every send slot was in use (or no socket of the destination's
    /// address family is open).
    pub tx_slots_full: AtomicU64,
    /// Calls into the kernel to submit and wait.
    pub submits: AtomicU64,
    /// Of those, the waits for a whole batch of completions ([`Wait::Batch`]): taken only
    /// right after a drain that found a backlog, never while the worker keeps up.
    pub batch_waits: AtomicU64,
    /// Completions handled.
    pub completions: AtomicU64,
    /// Multishot receives re-armed after the kernel ended them.
    pub rearms: AtomicU64,
    /// Sends that carried several datagrams at once (UDP GSO).
    pub gso_sends: AtomicU64,
    /// Receives that carried several datagrams of one sender at once (UDP GRO).
    pub gro_receives: AtomicU64,
    /// Times the worker turned UDP GSO off because the kernel or device cannot do it (see
    /// [`SendFailure::GsoUnsupported`]); at most 1 per worker.
    pub gso_disabled: AtomicU64,
    /// Datagrams of GSO sends the kernel refused for their size (`EMSGSIZE`: longer than the
    /// path's MTU), sent again one per send for the kernel to fragment.
    pub gso_resent: AtomicU64,
    /// Datagrams the kernel dropped at this worker's sockets before the worker saw them
    /// (mostly a full receive queue), as the kernel counts them (`SO_MEMINFO`): read once a
    /// tick, so up to one tick behind. The kernel counts socket buffers, so with UDP GRO a
    /// dropped coalesced receive (up to 64 datagrams) counts once: a lower bound on datagrams.
    pub socket_drops: AtomicU64,
}

/// The plain counters of one batch, folded into [`WorkerStats`] at its end.
#[derive(Default)]
struct BatchStats {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    rx_too_long: u64,
    rx_undecodable: u64,
    rx_no_buffers: u64,
    tx_errors: u64,
    tx_slots_full: u64,
    completions: u64,
    batch_waits: u64,
    rearms: u64,
    gso_sends: u64,
    gso_disabled: u64,
    gso_resent: u64,
    gro_receives: u64,
}

impl WorkerStats {
    /// Adds what this worker counted on the session logic's behalf to `counters` (summed over
    /// the session shards): the datagrams too long for a receive buffer, malformed by rule
    /// `too_long` and dropped as malformed exactly like the shorter ones over [`MAX_DATAGRAM`]
    /// the handler sees. A datagram over [`MAX_DATAGRAM`] is thus counted once, by the same
    /// rule, whatever its length.
    pub fn add_to_session_counters(&self, counters: &mut Counters) {
        let too_long = self.rx_too_long.load(Ordering::Relaxed);
        counters.malformed += too_long;
        if let Some(n) = counters
            .malformed_by_rule
            .get_mut(HeaderError::TooLong.as_index())
        {
            *n += too_long;
        }
    }

    /// Adds one batch's counts. Only the worker that owns `self` calls this (and stores
    /// [`WorkerStats::socket_drops`]), so a load and a store add without losing an update.
    fn add(&self, b: &BatchStats) {
        let add = |c: &AtomicU64, n: u64| {
            if n > 0 {
                c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            }
        };
        add(&self.rx_packets, b.rx_packets);
        add(&self.rx_bytes, b.rx_bytes);
        add(&self.tx_packets, b.tx_packets);
        add(&self.tx_bytes, b.tx_bytes);
        add(&self.rx_too_long, b.rx_too_long);
        add(&self.rx_undecodable, b.rx_undecodable);
        add(&self.rx_no_buffers, b.rx_no_buffers);
        add(&self.tx_errors, b.tx_errors);
        add(&self.tx_slots_full, b.tx_slots_full);
        add(&self.completions, b.completions);
        add(&self.batch_waits, b.batch_waits);
        add(&self.rearms, b.rearms);
        add(&self.gso_sends, b.gso_sends);
        add(&self.gso_disabled, b.gso_disabled);
        add(&self.gso_resent, b.gso_resent);
        add(&self.gro_receives, b.gro_receives);
        add(&self.submits, 1);
    }
}

/// How to run one worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Addresses to receive on (one `SO_REUSEPORT` socket each).
    pub listen: Vec<SocketAddr>,
    /// The CPU to pin the thread to, if any.
    pub cpu: Option<usize>,
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Receive buffers of [`RECV_BUF_SIZE`] bytes (a power of two), without UDP GRO.
    pub buffers: u16,
    /// Receive buffers of [`GRO_RECV_BUF_SIZE`] bytes (a power of two), with UDP GRO.
    pub gro_buffers: u16,
    /// Receive buffers lent to the kernel at the least: below saturation the same few go
    /// round and stay warm in the cache, and the worker lends more at once while bursts need
    /// them ([`MIN_LENT`] by default; the window is described in `uring.rs`).
    pub min_lent_buffers: u16,
    /// Let the kernel coalesce consecutive datagrams of one sender into one receive (UDP
    /// GRO), where the receiving device does GRO. Turned off by the worker itself (with a
    /// warning) if a socket refuses the option.
    pub gro: bool,
    /// Sends in flight at most.
    pub sends: u32,
    /// Longest wait for completions, and so the timer granularity.
    pub tick: Duration,
    /// Under a backlog (the last drain found at least this many completions), wait for this
    /// many per batch...
    pub batch_target: usize,
    /// ...but never longer than this.
    pub coalesce: Duration,
    /// Forward sends of at least this many bytes with SEND_ZC (zero copy); `None`: never.
    pub zero_copy_min: Option<usize>,
    /// Send consecutive datagrams for the same peer as one UDP GSO send. Turned off by the
    /// worker itself (with a warning) if the kernel or device cannot do it
    /// ([`SendFailure::GsoUnsupported`]).
    pub gso: bool,
    /// The kernel receive and send buffer sizes to give each socket ([`bind_reuseport`]).
    pub socket_buffers: SocketBuffers,
    /// Set to stop the worker.
    pub stop: Arc<AtomicBool>,
    /// Where the worker publishes its counters.
    pub stats: Arc<WorkerStats>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            cpu: None,
            ring_entries: 2048,
            buffers: 4096,
            gro_buffers: 256,
            min_lent_buffers: MIN_LENT,
            gro: true,
            sends: 4096,
            tick: Duration::from_millis(100),
            batch_target: 32,
            coalesce: Duration::from_micros(50),
            gso: true,
            socket_buffers: SocketBuffers::default(),
            zero_copy_min: None,
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(WorkerStats::default()),
        }
    }
}

/// Receive buffer size: room for the kernel's recvmsg header, a full source address, and a
/// datagram of [`MAX_DATAGRAM`] bytes with room to spare. A longer datagram either fits (and
/// the handler drops it by rule `too_long`) or is cut short by the kernel, which the worker
/// counts as [`WorkerStats::rx_too_long`]: either way it is malformed by that rule.
pub const RECV_BUF_SIZE: usize = 2048;

// A datagram cut short by the kernel is longer than the room in a buffer, and so, by this, longer
// than MAX_DATAGRAM: counting it as `too_long` is right.
const _: () = assert!(recv_payload_room(RECV_BUF_SIZE, false, true) >= MAX_DATAGRAM);

/// Receive buffer size with UDP GRO: room for the kernel's header, a full source address, the
/// `UDP_GRO` and destination address control messages and the largest coalesced receive (64 KiB, the kernel's limit for
/// one GRO packet), so a coalesced receive is never cut short.
pub const GRO_RECV_BUF_SIZE: usize = 68 << 10;

const _: () = assert!(recv_payload_room(GRO_RECV_BUF_SIZE, true, true) >= 1 << 16);

/// Makes `socket`, bound to the wildcard address `addr`, tell the destination address of each
/// datagram it receives (`IP_PKTINFO`, `IPV6_RECVPKTINFO`): the relay answers and forwards to
/// a peer from the address the peer sends to, which on a host with several addresses is not
/// always the one the kernel's route would pick.
pub fn set_pktinfo(socket: &impl AsRawFd, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => set_int_option(socket, libc::SOL_IP, libc::IP_PKTINFO, 1),
        SocketAddr::V6(_) => set_int_option(socket, libc::SOL_IPV6, libc::IPV6_RECVPKTINFO, 1),
    }
}

/// Turns UDP GRO on (`on`) or off for `socket`.
fn set_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    set_int_option(socket, libc::SOL_UDP, libc::UDP_GRO, libc::c_int::from(on))
}

/// `setsockopt` of an `int` option (`level`, `name`: the C constants, e.g. `libc::SOL_UDP`,
/// `libc::UDP_GRO`) on `socket`.
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: setsockopt reads exactly `size_of::<c_int>()` bytes from a live c_int, on a
    // descriptor the caller borrows to us.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// What a worker did, returned when it stops.
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// The ring's shutdown saw every request end in time, so its memory was freed rather than
    /// leaked (see [`Ring::shutdown`]).
    pub shutdown_drained: bool,
}

/// A UDP socket on `addr` with `SO_REUSEPORT`, so every worker can bind the same port and the
/// kernel spreads source 4-tuples across them. IPv6 sockets are v6-only.
pub fn bind_reuseport(addr: SocketAddr, buffers: SocketBuffers) -> io::Result<UdpSocket> {
    let domain = match addr {
        SocketAddr::V4(_) => Domain::IPV4,
        SocketAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let recv = size_buffer(&socket, BufferKind::Recv, buffers.recv);
    let send = size_buffer(&socket, BufferKind::Send, buffers.send);
    for (kind, wanted, got, sysctl, beyond) in [
        (
            "receive",
            buffers.recv,
            recv,
            "net.core.rmem_max",
            "bursts beyond it are dropped by the kernel and counted in \
             ferry_worker_socket_drops_total",
        ),
        (
            "send",
            buffers.send,
            send,
            "net.core.wmem_max",
            "sends beyond it wait for room, which slows the worker under a burst",
        ),
    ] {
        if got < wanted {
            tracing::warn!(
                %addr,
                wanted,
                got,
                "the kernel gave the socket a smaller {kind} buffer than configured: without \
                 CAP_NET_ADMIN it is capped at {sysctl}; {beyond}"
            );
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Fails with [`io::ErrorKind::AddrInUse`] if a socket already holds `addr`, mostly another
/// relay's workers. `SO_REUSEPORT` lets any process of the same user join a port's group, and
/// the kernel then splits the port's sources between the two processes: a session whose two
/// slots land on different relays cannot forward. A socket bound without the option conflicts
/// with every other binding of the port, so binding one (and closing it at once) finds them.
/// A relay starting at the very same moment could still slip in between; that is the
/// operator's doing, not a state this check can see.
pub fn check_not_in_use(addr: SocketAddr) -> io::Result<()> {
    let domain = match addr {
        SocketAddr::V4(_) => Domain::IPV4,
        SocketAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// [`check_not_in_use`], asked again every 50 ms for up to `patience` while `addr` is in use:
/// a relay killed a moment ago keeps its sockets until the kernel has torn its io_uring rings
/// down, which happens in the background once the process is gone; a running relay keeps them
/// for good.
pub fn wait_until_not_in_use(addr: SocketAddr, patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match check_not_in_use(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The kernel buffer sizes each relay socket asks for (`relay.udp_recv_buffer_bytes`,
/// `relay.udp_send_buffer_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Receive buffer, bytes: how large a burst the kernel queues while the worker is busy.
    pub recv: usize,
    /// Send buffer, bytes.
    pub send: usize,
}

impl Default for SocketBuffers {
    /// 8 MiB each: at 1500-byte datagrams, several milliseconds of a 10 Gbit/s burst.
    fn default() -> Self {
        Self {
            recv: 8 << 20,
            send: 8 << 20,
        }
    }
}

#[derive(Clone, Copy)]
enum BufferKind {
    Recv,
    Send,
}

/// Gives `socket`'s receive or send buffer `bytes`: with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`
/// where the process may (CAP_NET_ADMIN, which the relay has for XDP), else with `SO_RCVBUF` /
/// `SO_SNDBUF`, which the kernel caps at `net.core.rmem_max` / `wmem_max`. Returns the size the
/// kernel reports afterwards, halved: the kernel doubles what it is given, to allow for its
/// bookkeeping, and reports the doubled figure.
fn size_buffer(socket: &Socket, kind: BufferKind, bytes: usize) -> usize {
    let force = match kind {
        BufferKind::Recv => libc::SO_RCVBUFFORCE,
        BufferKind::Send => libc::SO_SNDBUFFORCE,
    };
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let forced = set_int_option(socket, libc::SOL_SOCKET, force, value).is_ok();
    let result = match kind {
        BufferKind::Recv if !forced => socket.set_recv_buffer_size(bytes),
        BufferKind::Send if !forced => socket.set_send_buffer_size(bytes),
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!("setting a socket buffer size: {e}");
    }
    let got = match kind {
        BufferKind::Recv => socket.recv_buffer_size(),
        BufferKind::Send => socket.send_buffer_size(),
    };
    got.map_or(0, |n| n / 2)
}

/// The datagrams the kernel has dropped at `socket` since it was opened (`SO_MEMINFO`'s
/// `SK_MEMINFO_DROPS`: a full receive queue, mostly), or `None` if the kernel does not say.
pub fn socket_drops(socket: &impl AsRawFd) -> Option<u64> {
    /// `SK_MEMINFO_VARS` and the index of `SK_MEMINFO_DROPS` (linux/sock_diag.h).
    const MEMINFO_VARS: usize = 9;
    const MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; MEMINFO_VARS];
    let mut len = size_of_val(&info) as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which has that many, and
    // updates `len`; the descriptor is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let filled = usize::try_from(len).unwrap_or(0) / size_of::<u32>();
    (rc == 0 && filled > MEMINFO_DROPS).then(|| u64::from(info[MEMINFO_DROPS]))
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks `cpu` against the set size, and
    // sched_setaffinity(0, …) only reads the set and affects the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A listen socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// io_uring failed.
    #[error(transparent)]
    Uring(#[from] UringError),
}

/// Runs a worker until `cfg.stop` is set. `ready` is called once the sockets are bound and
/// receives are armed.
pub fn run_worker<H: PacketHandler>(
    cfg: WorkerConfig,
    mut handler: H,
    ready: impl FnOnce(),
) -> Result<WorkerReport, WorkerError> {
    if let Some(cpu) = cfg.cpu
        && let Err(e) = pin_to(cpu)
    {
        tracing::warn!(cpu, "could not pin the worker to its CPU: {e}");
    }
    let sockets = cfg
        .listen
        .iter()
        .map(|&addr| {
            bind_reuseport(addr, cfg.socket_buffers)
                .map_err(|source| WorkerError::Bind { addr, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fds = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    // Sockets on a wildcard address learn each datagram's destination address; on a
    // specific one it is the socket's own, and nothing changes.
    let pktinfo: Vec<bool> = cfg.listen.iter().map(|a| a.ip().is_unspecified()).collect();
    for (socket, &addr) in sockets.iter().zip(&cfg.listen) {
        if addr.ip().is_unspecified() {
            set_pktinfo(socket, addr).map_err(|source| WorkerError::Bind { addr, source })?;
        }
    }
    let v4_socket = cfg.listen.iter().position(|a| a.is_ipv4());
    let v6_socket = cfg.listen.iter().position(|a| a.is_ipv6());
    let gro = cfg.gro
        && match sockets.iter().try_for_each(|s| set_gro(s, true)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "the kernel refused UDP GRO on a socket ({e}); receiving datagrams one by one"
                );
                // The small buffers cannot hold a coalesced receive: no socket may keep it.
                for (socket, &addr) in sockets.iter().zip(&cfg.listen) {
                    set_gro(socket, false).map_err(|source| WorkerError::Bind { addr, source })?;
                }
                false
            }
        };
    let (buffers, buf_size) = match gro {
        true => (cfg.gro_buffers, GRO_RECV_BUF_SIZE),
        false => (cfg.buffers, RECV_BUF_SIZE),
    };
    let mut ring = Ring::new(
        cfg.ring_entries,
        buffers,
        buf_size,
        cfg.sends,
        fds,
        gro,
        &pktinfo,
    )?;
    ring.set_min_lent(cfg.min_lent_buffers);
    if cfg.zero_copy_min.is_some() {
        match ring.set_zero_copy_min(cfg.zero_copy_min) {
            false => tracing::warn!("the kernel lacks SEND_ZC for sendmsg; forwarding with copies"),
            true => tracing::info!(
                fixed_buffers = ring.uses_fixed_buffers(),
                "zero-copy sends on for large forwards"
            ),
        }
    }
    for index in 0..ring.socket_count() {
        ring.arm_recv(index)?;
    }
    ready();

    let tick = Timespec::from(cfg.tick);
    let mut completions = Vec::with_capacity(4096);
    let mut reply = vec![0u8; MAX_DATAGRAM];
    let mut notices = Vec::new();
    let mut report = WorkerReport::default();
    let mut next_tick = Instant::now();
    let mut wall_clock = WallClock::read();
    let mut pending = PendingForwards {
        gso: cfg.gso,
        alone: SendAlone::default(),
        socket: 0,
        to: SocketAddr::from(([0, 0, 0, 0], 0)),
        src: None,
        len: 0,
        segments: Vec::with_capacity(MAX_SEGMENTS),
    };
    let coalesce = Timespec::from(cfg.coalesce);
    let mut wait = Wait::Any;
    while !cfg.stop.load(Ordering::Relaxed) {
        match wait {
            Wait::Batch => ring.submit_and_wait(cfg.batch_target, &coalesce)?,
            Wait::Any => ring.submit_and_wait(1, &tick)?,
        }
        ring.drain(&mut completions);
        let now = Instant::now();
        if now >= next_tick {
            wall_clock = WallClock::read();
        }
        let wall = wall_clock.at(now);
        let mut batch = BatchStats {
            completions: completions.len() as u64,
            batch_waits: u64::from(wait == Wait::Batch),
            ..BatchStats::default()
        };
        wait = Wait::after_drain(completions.len(), cfg.batch_target);
        for &completion in &completions {
            match completion {
                Completion::Recv {
                    socket,
                    result,
                    flags,
                } => {
                    on_recv(
                        &mut ring,
                        &mut handler,
                        &mut pending,
                        RecvCtx {
                            now,
                            wall,
                            socket,
                            result,
                            flags,
                            v4_socket,
                            v6_socket,
                        },
                        &mut reply,
                        &mut batch,
                    )?;
                    if !Ring::still_armed(flags) {
                        ring.arm_recv(socket)?;
                        batch.rearms += 1;
                    }
                }
                Completion::Send {
                    slot,
                    result,
                    flags,
                } => {
                    // A zero-copy send completes twice: first the result (with `more`), then
                    // the notification that the buffers are free again.
                    if io_uring::cqueue::notif(flags) {
                        ring.finish_send(slot);
                        continue;
                    }
                    let segments = ring.send_segments(slot) as u64;
                    let src = ring.send_source(slot);
                    let more = io_uring::cqueue::more(flags);
                    // A GSO send refused for its size goes out again one datagram per send,
                    // which the kernel fragments to the path's MTU (a zero-copy send still
                    // lends its buffers: it is left as it is).
                    let resent = if result == -libc::EMSGSIZE && segments > 1 && !more {
                        if let Some(to) = ring.send_destination(slot) {
                            pending.alone.insert(to, now);
                        }
                        ring.resend_alone(slot)? as u64
                    } else {
                        0
                    };
                    batch.gso_resent += resent;
                    if !more {
                        ring.finish_send(slot);
                    }
                    match usize::try_from(result) {
                        Ok(n) => {
                            batch.tx_packets += segments;
                            batch.tx_bytes += n as u64;
                        }
                        Err(_) => {
                            batch.tx_errors += segments - resent;
                            let errno = -result;
                            let failure = SendFailure::classify(errno, segments > 1, src.is_some());
                            if failure == SendFailure::GsoUnsupported && pending.gso {
                                // Degrade instead of failing: every later forward goes out on
                                // its own. GSO sends already queued may fail the same way;
                                // they are counted as send errors only.
                                pending.gso = false;
                                batch.gso_disabled += 1;
                                tracing::warn!(
                                    errno,
                                    source = ?src,
                                    "the kernel or device cannot do UDP GSO here; sending \
                                     datagrams one by one from now on"
                                );
                            }
                        }
                    }
                }
            }
        }
        pending.flush(&mut ring, &mut batch)?;
        if now >= next_tick {
            handler.tick(now, wall, &mut notices);
            pending.alone.forget_expired(now);
            for notice in notices.drain(..) {
                let socket = out_socket(v4_socket, v6_socket, notice.to);
                send_reply(
                    &mut ring,
                    socket,
                    Some(&notice.datagram),
                    (notice.to, notice.src),
                    &mut batch,
                )?;
            }
            next_tick = now + cfg.tick;
            // The kernel's own count is per socket and since it was opened; the sum is this
            // worker's. (The u32 counter wraps after 4 billion drops, far past any alert.)
            let drops = sockets.iter().filter_map(socket_drops).sum::<u64>();
            cfg.stats.socket_drops.store(drops, Ordering::Relaxed);
        }
        report.rx_packets += batch.rx_packets;
        report.tx_packets += batch.tx_packets;
        cfg.stats.add(&batch);
    }
    // Cancel everything and wait for the kernel to let go of the buffers before they are
    // freed. (On an error return above, dropping the ring does the same.) The sockets outlive
    // the ring: they were bound before it.
    let shutdown = ring.shutdown(SHUTDOWN_LIMIT);
    tracing::debug!(?shutdown, "worker ring shut down");
    report.shutdown_drained = shutdown.drained;
    Ok(report)
}

/// The wall clock as the worker reads it: `SystemTime` once a tick, and in between that
/// reading advanced by the monotonic clock the worker reads for every batch anyway, so a batch
/// costs one clock read, not two. A step of the system clock (NTP, an operator) shows within a
/// tick; tokens and cookies count in whole seconds.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Time since the Unix epoch at `base`.
    since_epoch: Duration,
    /// When the system clock was read.
    base: Instant,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn read() -> Self {
        Self::from_readings(SystemTime::now(), Instant::now())
    }

    /// A clock that read `wall` at `base` (times before the epoch count as the epoch).
    pub fn from_readings(wall: SystemTime, base: Instant) -> Self {
        Self {
            since_epoch: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            base,
        }
    }

    /// The wall-clock time at `now` (a monotonic reading no earlier than the base; an
    /// earlier one counts as the base).
    pub fn at(&self, now: Instant) -> UnixTime {
        UnixTime(
            self.since_epoch
                .saturating_add(now.saturating_duration_since(self.base))
                .as_secs(),
        )
    }
}

/// How the worker waits for completions next.
///
/// Like interrupt coalescing, waiting for a batch buys fewer kernel entries and larger GSO
/// sends, but it holds every datagram already received until the batch fills or the
/// `coalesce` timer fires. That is free only when the batch is (nearly) there already: right
/// after a drain that found a whole batch, i.e. while the worker is behind. Any smaller drain
/// means the worker keeps up, and a batch would fill only by waiting for datagrams not yet
/// sent; so it waits for the first completion instead, as a `recvmmsg` forwarder does. While
/// the worker keeps up, no datagram waits for a batch and the `coalesce` timer never fires;
/// while it is behind, drains are full and it keeps coalescing; when a backlog ends, one wait at
/// most runs into the timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Wait for any completion, or the tick: the worker has caught up.
    Any,
    /// Wait for [`WorkerConfig::batch_target`] completions, at most
    /// [`WorkerConfig::coalesce`]: a backlog. On a `DEFER_TASKRUN` ring this in practice lasts
    /// the whole `coalesce`: the kernel wakes a waiter early only once as many completion tasks
    /// are queued as it waits for, and a multishot receive queues one, however many datagrams
    /// it then brings in.
    Batch,
}

impl Wait {
    /// The wait after a drain of `drained` completions.
    pub fn after_drain(drained: usize, batch_target: usize) -> Self {
        match batch_target > 1 && drained >= batch_target {
            true => Wait::Batch,
            false => Wait::Any,
        }
    }
}

/// Everything `on_recv` needs to know about one receive completion.
struct RecvCtx {
    now: Instant,
    wall: UnixTime,
    socket: usize,
    result: i32,
    flags: u32,
    v4_socket: Option<usize>,
    v6_socket: Option<usize>,
}

fn on_recv<H: PacketHandler>(
    ring: &mut Ring,
    handler: &mut H,
    pending: &mut PendingForwards,
    cx: RecvCtx,
    reply: &mut [u8],
    batch: &mut BatchStats,
) -> Result<(), UringError> {
    if cx.result == -libc::ENOBUFS {
        batch.rx_no_buffers += 1;
    }
    // An error comes without a buffer, so `datagram` returns `None` for it (were one attached
    // anyway, it would come back as undecodable and be given back).
    #[allow(unsafe_code)]
    // SAFETY: `cx` is a receive completion that `drain` reaped from `ring` in this batch, and
    // the worker handles each completion once. The completion's reference to the buffer it
    // handed to userspace is given back only at the end of this function, and the references
    // forwards take only after the bytes were read; every such call takes `&mut ring`, so it
    // comes after the last use of `datagram`, whose borrow of `ring` has ended by then. Until
    // the last reference is given back the kernel does not write that buffer.
    let Some((bid, parsed)) = (unsafe { ring.datagram(cx.socket, cx.result, cx.flags) }) else {
        return Ok(());
    };
    let (from, local, segments) = match parsed {
        Ok(d) => (d.from, d.local, d.segments()),
        Err(problem) => {
            match problem {
                RecvProblem::Truncated => batch.rx_too_long += 1,
                RecvProblem::Undecodable => batch.rx_undecodable += 1,
            }
            ring.give_back(bid);
            return Ok(());
        }
    };
    let mut count = 0;
    for (offset, len) in segments {
        count += 1;
        on_datagram(
            ring,
            handler,
            pending,
            &cx,
            (from, local),
            bid,
            offset,
            len,
            reply,
            batch,
        )?;
    }
    batch.gro_receives += u64::from(count > 1);
    ring.give_back(bid);
    Ok(())
}

/// Hands one received datagram (`len` bytes at `offset` of buffer `bid`, which the caller
/// holds; from `from.0`, sent to `from.1` when the socket says) to the handler and carries
/// out the outcome.
#[allow(clippy::too_many_arguments)]
fn on_datagram<H: PacketHandler>(
    ring: &mut Ring,
    handler: &mut H,
    pending: &mut PendingForwards,
    cx: &RecvCtx,
    (from, local): (SocketAddr, Option<IpAddr>),
    bid: u16,
    offset: usize,
    len: usize,
    reply: &mut [u8],
    batch: &mut BatchStats,
) -> Result<(), UringError> {
    #[allow(unsafe_code)]
    // SAFETY: the caller holds the completion's reference to buffer `bid` until after this
    // call, so the kernel does not write it; the slice's borrow of `ring` ends with `handle`,
    // before anything below takes `&mut ring`.
    let Some(payload) = (unsafe { ring.received(bid, offset, len) }) else {
        batch.rx_undecodable += 1;
        return Ok(());
    };
    batch.rx_packets += 1;
    batch.rx_bytes += len as u64;
    let outcome = handler.handle(cx.now, cx.wall, from, local, payload, reply);
    let out_socket = |to: SocketAddr| out_socket(cx.v4_socket, cx.v6_socket, to);
    match outcome {
        Outcome::Forward { to, src } => match out_socket(to) {
            Some(socket) if ring.retain(bid) => {
                let segment = Segment { bid, offset };
                pending.add(ring, cx.now, socket, (to, src), len, segment, batch)?;
            }
            _ => batch.tx_slots_full += 1,
        },
        Outcome::Reply { to, src, len } => {
            send_reply(ring, out_socket(to), reply.get(..len), (to, src), batch)?;
        }
        Outcome::ReplyAndNotify {
            to,
            src,
            len,
            notify,
            notify_src,
            notice_len,
        } => {
            send_reply(ring, out_socket(to), reply.get(..len), (to, src), batch)?;
            let notice = reply.get(len..len.saturating_add(notice_len));
            let dest = (notify, notify_src);
            send_reply(ring, out_socket(notify), notice, dest, batch)?;
        }
        Outcome::Consumed | Outcome::Drop(_) => {}
    }
    Ok(())
}

/// The socket that sends to `to`: the one of its address family, if one is open.
fn out_socket(v4_socket: Option<usize>, v6_socket: Option<usize>, to: SocketAddr) -> Option<usize> {
    match is_v4(to.ip()) {
        true => v4_socket,
        false => v6_socket,
    }
}

/// Queues `bytes` for `to.0` from a send slot of `socket`, from source address `to.1` if set;
/// counts it as
/// [`WorkerStats::tx_slots_full`] when no slot is free or no socket of its family is open
/// (or, which the handler never does, when the outcome named bytes past the reply buffer).
fn send_reply(
    ring: &mut Ring,
    socket: Option<usize>,
    bytes: Option<&[u8]>,
    (to, src): (SocketAddr, Option<IpAddr>),
    batch: &mut BatchStats,
) -> Result<(), UringError> {
    let queued = match (socket, bytes) {
        (Some(s), Some(bytes)) => ring.send_reply(s, bytes, to, src)?,
        _ => false,
    };
    if !queued {
        batch.tx_slots_full += 1;
    }
    Ok(())
}

/// What a failed send says about UDP GSO, after quinn-udp's `unix.rs`: Linux has no way to ask
/// whether a route's device can segment UDP, short of a GSO send failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFailure {
    /// A GSO send failed with `EIO` (the device cannot checksum the segments, or the route
    /// transforms them, e.g. IPsec) or `EINVAL` (the kernel refuses the `UDP_SEGMENT` request,
    /// e.g. on a socket with UDP checksums off): GSO cannot work here, so the worker turns it
    /// off for good, logs it once and counts it in [`WorkerStats::gso_disabled`].
    GsoUnsupported,
    /// Anything else (unreachable or forbidden destination, full queue, message too long...),
    /// any failure of a single-datagram send, and an `EINVAL` of a send that names its source
    /// address (a wildcard socket's): Linux refuses an `IPV6_PKTINFO` source that is no longer
    /// on the host, or still tentative, with `EINVAL`, GSO or not, and an operator removing
    /// the address one session was bound through must not cost every session its GSO. (The
    /// GSO causes of `EINVAL` cannot be Ferry's: it never turns UDP checksums off, and never
    /// sends more than [`MAX_SEGMENTS`] at once. Whether the address is there cannot be asked
    /// when the completion is read: it may have come back since.) Counted as a send error;
    /// GSO stays on.
    Other,
}

impl SendFailure {
    /// Classifies a failed send by its `errno`; `gso` says whether it carried several datagrams
    /// (a `UDP_SEGMENT` control message), `names_source` whether it named its source address
    /// (an `IP_PKTINFO` or `IPV6_PKTINFO` control message).
    pub fn classify(errno: i32, gso: bool, names_source: bool) -> Self {
        match (gso, errno) {
            (true, libc::EINVAL) if names_source => SendFailure::Other,
            (true, libc::EIO | libc::EINVAL) => SendFailure::GsoUnsupported,
            _ => SendFailure::Other,
        }
    }
}

/// Longest datagram a GSO send carries to an IPv6 destination: a 1500-byte MTU less the IPv6
/// and UDP headers. DATA from a peer on IPv4 may be up to `MAX_DATAGRAM` = 1472 bytes; forwarded
/// to a peer on IPv6 it leaves alone, for the kernel to fragment as it does any single datagram
/// over the path MTU, where a GSO send of such datagrams would be refused whole (`EMSGSIZE`).
pub const MAX_GSO_SEGMENT_V6: usize = 1452;

/// Whether datagrams of `len` bytes to `to` may leave in a GSO send.
fn gso_fits(to: SocketAddr, len: usize) -> bool {
    to.is_ipv4() || len <= MAX_GSO_SEGMENT_V6
}

/// Forwards decided in this batch and not yet queued. Consecutive datagrams of one length for
/// one destination from one source address leave as a single UDP GSO send: a bulk flow
/// through the relay costs one send per batch instead of one per datagram.
struct PendingForwards {
    gso: bool,
    /// Destinations sent one datagram per send until the instant given.
    alone: SendAlone,
    socket: usize,
    to: SocketAddr,
    /// The source address the datagrams leave from (a wildcard socket's), if set.
    src: Option<IpAddr>,
    len: usize,
    segments: Vec<Segment>,
}

impl PendingForwards {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        ring: &mut Ring,
        now: Instant,
        socket: usize,
        (to, src): (SocketAddr, Option<IpAddr>),
        len: usize,
        segment: Segment,
        batch: &mut BatchStats,
    ) -> Result<(), UringError> {
        let gso = self.gso && gso_fits(to, len) && !self.alone.holds(to, now);
        let joins = gso
            && socket == self.socket
            && to == self.to
            && src == self.src
            && len == self.len
            && self.segments.len() < MAX_SEGMENTS
            && (self.segments.len() + 1) * len <= MAX_GSO_BYTES;
        if !joins {
            self.flush(ring, batch)?;
            (self.socket, self.to, self.src, self.len) = (socket, to, src, len);
        }
        self.segments.push(segment);
        if !gso {
            self.flush(ring, batch)?;
        }
        Ok(())
    }

    fn flush(&mut self, ring: &mut Ring, batch: &mut BatchStats) -> Result<(), UringError> {
        if self.segments.is_empty() {
            return Ok(());
        }
        if ring.send_forward(self.socket, &self.segments, self.len, self.to, self.src)? {
            batch.gso_sends += u64::from(self.segments.len() > 1);
        } else {
            batch.tx_slots_full += self.segments.len() as u64;
            for segment in &self.segments {
                ring.give_back(segment.bid);
            }
        }
        self.segments.clear();
        Ok(())
    }
}

/// Destinations whose path refused a GSO send for its size (`EMSGSIZE`: the path's MTU is
/// under the datagrams' length, which the kernel fragments one by one but will not segment):
/// later forwards to them go one datagram per send for [`SendAlone::FOR`], as long as the
/// kernel keeps a learnt path MTU (`net.ipv4.route.mtu_expires`), instead of each burst being
/// refused and sent again. Empty, as it is on almost every relay, it costs a forward one
/// length check.
#[derive(Default)]
struct SendAlone {
    until: HashMap<SocketAddr, Instant>,
}

impl SendAlone {
    const FOR: Duration = Duration::from_secs(600);
    /// The most destinations remembered; past it, the oldest half is forgotten.
    const MAX: usize = 4096;

    fn holds(&self, to: SocketAddr, now: Instant) -> bool {
        !self.until.is_empty() && self.until.get(&to).is_some_and(|&until| now < until)
    }

    fn insert(&mut self, to: SocketAddr, now: Instant) {
        if self.until.len() >= Self::MAX {
            self.forget_expired(now);
        }
        if self.until.len() >= Self::MAX {
            let mut ends: Vec<Instant> = self.until.values().copied().collect();
            let (_, &mut middle, _) = ends.select_nth_unstable(Self::MAX / 2);
            self.until.retain(|_, until| *until > middle);
        }
        self.until.insert(to, now + Self::FOR);
    }

    /// Forgets the destinations whose time is up (once a tick).
    fn forget_expired(&mut self, now: Instant) {
        if !self.until.is_empty() {
            self.until.retain(|_, until| *until > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_relay_holds_is_found_in_use() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let holder = bind_reuseport(any, SocketBuffers::default()).expect("bind");
        let held = holder.local_addr().expect("addr");
        let e = check_not_in_use(held).expect_err("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        // The same check passes once the holder is gone, and leaves nothing bound behind it.
        drop(holder);
        check_not_in_use(held).expect("free");
        let again = bind_reuseport(held, SocketBuffers::default()).expect("rebind");
        assert_eq!(again.local_addr().expect("addr"), held);
        // A holder that lets go within the patience is waited for; one that does not is not.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(again);
        });
        wait_until_not_in_use(held, Duration::from_secs(5)).expect("released");
        late.join().expect("thread");
        let holder = bind_reuseport(held, SocketBuffers::default()).expect("rebind");
        let e = wait_until_not_in_use(held, Duration::from_millis(120)).expect_err("held");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(holder);
    }

    #[test]
    fn only_eio_and_einval_on_a_gso_send_turn_gso_off() {
        use SendFailure::{GsoUnsupported, Other};
        // A send naming a source address that is gone fails with EINVAL (IPv6), GSO or not.
        assert_eq!(SendFailure::classify(libc::EINVAL, true, true), Other);
        assert_eq!(SendFailure::classify(libc::EIO, true, true), GsoUnsupported);
        let cases = [
            (libc::EIO, true, GsoUnsupported),
            (libc::EINVAL, true, GsoUnsupported),
            // A single datagram carries no UDP_SEGMENT: its failure says nothing about GSO.
            (libc::EIO, false, Other),
            (libc::EINVAL, false, Other),
            (libc::ENETUNREACH, true, Other),
            (libc::EHOSTUNREACH, true, Other),
            (libc::ECONNREFUSED, true, Other),
            (libc::EACCES, true, Other),
            (libc::EPERM, true, Other),
            (libc::EMSGSIZE, true, Other),
            (libc::ENOBUFS, true, Other),
            (libc::EAGAIN, true, Other),
            (libc::ECANCELED, true, Other),
        ];
        for (errno, gso, want) in cases {
            assert_eq!(
                SendFailure::classify(errno, gso, false),
                want,
                "errno {errno}, gso {gso}"
            );
        }
    }

    #[test]
    fn only_a_full_drain_makes_the_worker_wait_for_a_batch() {
        let cases = [
            (0, 32, Wait::Any),
            // A lone datagram, with or without its send's completion.
            (1, 32, Wait::Any),
            (2, 32, Wait::Any),
            // A burst the worker kept up with.
            (31, 32, Wait::Any),
            // A backlog: the next batch is (nearly) there already.
            (32, 32, Wait::Batch),
            (500, 32, Wait::Batch),
            // A target of one (or none) is no batch.
            (500, 1, Wait::Any),
            (500, 0, Wait::Any),
        ];
        for (drained, target, want) in cases {
            assert_eq!(
                Wait::after_drain(drained, target),
                want,
                "{drained} drained, target {target}"
            );
        }
    }

    #[test]
    fn the_wall_clock_advances_with_the_monotonic_one() {
        let base = Instant::now();
        let epoch = SystemTime::UNIX_EPOCH;
        let clock =
            WallClock::from_readings(epoch + Duration::from_millis(1_700_000_000_400), base);
        assert_eq!(clock.at(base), UnixTime(1_700_000_000));
        assert_eq!(
            clock.at(base + Duration::from_millis(599)),
            UnixTime(1_700_000_000)
        );
        assert_eq!(
            clock.at(base + Duration::from_millis(600)),
            UnixTime(1_700_000_001),
            "whole seconds of the sum, not of each part"
        );
        assert_eq!(
            clock.at(base + Duration::from_secs(3600)),
            UnixTime(1_700_003_600)
        );
        let later = base + Duration::from_secs(5);
        let clock = WallClock::from_readings(epoch + Duration::from_secs(10), later);
        assert_eq!(
            clock.at(base),
            UnixTime(10),
            "an earlier reading counts as the base"
        );
        let before_epoch = epoch - Duration::from_secs(1);
        assert_eq!(
            WallClock::from_readings(before_epoch, base).at(base),
            UnixTime(0)
        );
    }

    #[test]
    fn a_receive_buffer_has_the_room_the_docs_state() {
        assert_eq!(recv_payload_room(RECV_BUF_SIZE, false, false), 1904);
        assert_eq!(recv_payload_room(RECV_BUF_SIZE, false, true), 1864);
    }

    #[test]
    fn a_destination_refused_a_gso_send_is_sent_alone_for_a_while_and_the_memory_is_bounded() {
        let mut alone = SendAlone::default();
        let t0 = Instant::now();
        let to = SocketAddr::from(([198, 18, 0, 9], 4000));
        let other = SocketAddr::from(([198, 18, 0, 9], 4001));
        assert!(!alone.holds(to, t0));
        alone.insert(to, t0);
        assert!(alone.holds(to, t0 + Duration::from_secs(1)));
        assert!(!alone.holds(other, t0));
        assert!(!alone.holds(to, t0 + SendAlone::FOR));
        alone.forget_expired(t0 + SendAlone::FOR);
        assert!(alone.until.is_empty());
        // Full: the oldest half goes, the newest stays, and it never holds more than MAX.
        for i in 0..SendAlone::MAX as u32 + 10 {
            let at = t0 + Duration::from_millis(u64::from(i));
            alone.insert(SocketAddr::from((i.to_be_bytes(), 9)), at);
            assert!(alone.until.len() <= SendAlone::MAX);
        }
        let last = SendAlone::MAX as u32 + 9;
        let now = t0 + Duration::from_millis(u64::from(last));
        assert!(alone.holds(SocketAddr::from((last.to_be_bytes(), 9)), now));
        assert!(!alone.holds(SocketAddr::from((0u32.to_be_bytes(), 9)), now));
    }

    #[test]
    fn oversized_datagrams_join_the_too_long_rule() {
        let stats = WorkerStats::default();
        stats.rx_too_long.store(3, Ordering::Relaxed);
        let mut counters = Counters::default();
        let too_long = HeaderError::TooLong.as_index();
        counters.malformed = 2;
        counters.malformed_by_rule[too_long] = 1;
        counters.malformed_by_rule[HeaderError::BadMagic.as_index()] = 1;
        stats.add_to_session_counters(&mut counters);
        assert_eq!(counters.malformed_by_rule[too_long], 4);
        assert_eq!(counters.malformed, 5);
        assert_eq!(
            counters.malformed_by_rule.iter().sum::<u64>(),
            counters.malformed,
            "every malformed datagram is counted under exactly one rule"
        );
    }
}
