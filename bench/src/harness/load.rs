//! The load: a generator that sends DATA datagrams for many sessions, paced (constant or in
//! bursts) or as fast as it can, with batched `sendmmsg` so that it is not what is measured;
//! a sink that counts what arrives with `recvmmsg` and records one-way latency; and a probe
//! that times round trips through Ferry's reply path (full binds, KEEPALIVE echoes) while the
//! load runs ([`ReplyProbe`]).
//!
//! Every datagram carries its send time in its last 8 bytes (nanoseconds on the monotonic
//! clock since [`epoch`], little-endian), written just before the `sendmmsg` that sends it.
//! The generator and the sink are threads of one process, and network namespaces share the
//! monotonic clock, so arrival minus that stamp is the one-way latency of the path.

use std::net::{SocketAddr, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_core::proof::SlotKeys;
use ferry_core::token::MintedToken;
use ferry_core::wire::{self, MAX_DATA_BODY, MAX_DATAGRAM, Packet};
use hdrhistogram::Histogram;

use super::turn;
use crate::udp::{Batch, GroBatch, fine_timer_slack, pin_to, set_gro};

/// Bytes of the send timestamp at the end of every datagram.
pub const STAMP_LEN: usize = 8;
/// Datagrams per `sendmmsg`/`recvmmsg` at most.
pub const BATCH: usize = 64;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The instant that timestamps count from (the first call fixes it).
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Fixes [`epoch`] at the Unix epoch of the realtime clock, so that [`now_ns`] reads
/// nanoseconds since 1970 (advancing with the monotonic clock from here on) and stamps written
/// by processes on different machines compare, to within how well their clocks are
/// synchronized (PTP, chrony). A `ferry-bench agent` calls it before anything reads the clock;
/// an error when the epoch was already fixed or the clock is before 1970.
pub fn anchor_epoch_to_realtime() -> anyhow::Result<()> {
    let since_1970 = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .context("the realtime clock is before 1970")?;
    let anchored = Instant::now()
        .checked_sub(since_1970)
        .context("the monotonic clock cannot express 1970")?;
    if EPOCH.set(anchored).is_err() {
        bail!("the stamp clock's epoch was fixed before it could be anchored to realtime");
    }
    Ok(())
}

/// Nanoseconds since [`epoch`], at least 1.
pub fn now_ns() -> u64 {
    (epoch().elapsed().as_nanos() as u64).max(1)
}

/// The DATA body sizes a run sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Every body this many bytes.
    Fixed(usize),
    /// A simple IMIX: of every 12 datagrams, 7 with 64-byte bodies, 4 with 576 and 1 with 1400
    /// (mean 346 bytes).
    Imix,
}

impl Payload {
    /// The IMIX cycle.
    const IMIX: [usize; 12] = [64, 576, 64, 64, 576, 64, 1400, 64, 576, 64, 576, 64];

    /// Parses `64`, `1200`, … or `imix`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.eq_ignore_ascii_case("imix") {
            return Ok(Self::Imix);
        }
        let size: usize = text
            .parse()
            .with_context(|| format!("payload {text:?}: a size in bytes or \"imix\""))?;
        if !(STAMP_LEN..=MAX_DATA_BODY).contains(&size) {
            bail!("payload {size}: outside {STAMP_LEN}..={MAX_DATA_BODY} bytes");
        }
        Ok(Self::Fixed(size))
    }

    /// The body sizes, in the order they cycle.
    pub fn sizes(&self) -> Vec<usize> {
        match self {
            Self::Fixed(n) => vec![*n],
            Self::Imix => Self::IMIX.to_vec(),
        }
    }

    /// The mean body size in bytes.
    pub fn mean_bytes(&self) -> f64 {
        let sizes = self.sizes();
        sizes.iter().sum::<usize>() as f64 / sizes.len() as f64
    }

    /// `64`, `1200`, `imix`: the name in reports.
    pub fn label(&self) -> String {
        match self {
            Self::Fixed(n) => n.to_string(),
            Self::Imix => "imix".into(),
        }
    }
}

/// How the generator spaces its datagrams at a given rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    /// Each datagram at its own due time `k / rate`; late ones go out together in one batch.
    Constant,
    /// `burst` datagrams back to back every `burst / rate` seconds.
    Bursty {
        /// Datagrams per burst.
        burst: usize,
    },
}

impl Pacing {
    /// `constant` or `bursty`.
    pub fn label(&self) -> String {
        match self {
            Self::Constant => "constant".into(),
            Self::Bursty { burst } => format!("bursty-{burst}"),
        }
    }
}

/// How one session's datagrams look on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A Ferry DATA datagram for `session`.
    FerryData {
        /// The session id in the header.
        session: u64,
    },
    /// The same DATA datagram inside TURN ChannelData on `channel` (coturn).
    ChannelData {
        /// The session id of the inner DATA header.
        session: u64,
        /// The TURN channel number.
        channel: u16,
    },
}

/// One session as the generator drives it: which of its sockets sends, to where, framed how.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// Index into the generator's sockets.
    pub socket: usize,
    /// Where its datagrams go.
    pub target: SocketAddr,
    /// How they are framed.
    pub framing: Framing,
}

/// The datagram of `framing` with a body of `body` bytes (0xa5, the stamp left to the
/// sender).
pub fn datagram(framing: Framing, body: usize) -> anyhow::Result<Vec<u8>> {
    let session = match framing {
        Framing::FerryData { session } | Framing::ChannelData { session, .. } => session,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = wire::encode_data(&mut buf, session, &vec![0xa5u8; body])?;
    buf.truncate(n);
    Ok(match framing {
        Framing::FerryData { .. } => buf,
        Framing::ChannelData { channel, .. } => turn::channel_data(channel, &buf),
    })
}

/// The longest head that differs between the datagrams of two sessions: a ChannelData prefix
/// and a DATA header.
const HEAD_LEN: usize = 4 + wire::HEADER_LEN;

/// How many leading bytes of a datagram of `framing` depend on the session.
fn head_len(framing: Framing) -> usize {
    match framing {
        Framing::FerryData { .. } => wire::HEADER_LEN,
        Framing::ChannelData { .. } => HEAD_LEN,
    }
}

/// The session-dependent head of the datagram of `framing` with a body of `body` bytes.
fn head(framing: Framing, body: usize) -> anyhow::Result<[u8; HEAD_LEN]> {
    let whole = datagram(framing, body)?;
    let mut out = [0u8; HEAD_LEN];
    let n = head_len(framing);
    out[..n].copy_from_slice(
        whole
            .get(..n)
            .context("a datagram shorter than its header")?,
    );
    Ok(out)
}

/// What one generator run sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Datagrams the kernel accepted.
    pub datagrams: u64,
    /// Their DATA body bytes.
    pub body_bytes: u64,
    /// Seconds from the first send to the last.
    pub seconds: f64,
    /// Failed `sendmmsg` calls.
    pub errors: u64,
}

/// A load generator: sockets on the generator host and the sessions it drives through them.
#[derive(Debug)]
pub struct Generator {
    sockets: Vec<UdpSocket>,
    flows: Vec<Flow>,
    /// Consecutive datagrams of one flow: 1 when every flow shares one socket, 16 when flows
    /// have sockets of their own, so that one `sendmmsg` still carries many datagrams.
    run: u64,
    /// Whether it sends with UDP GSO (a run of equal-sized datagrams to one address in one
    /// message); cleared for good when the kernel refuses it.
    gso: AtomicBool,
}

impl Generator {
    /// A generator over `sockets` driving `flows`: datagram `k` belongs to flow `k mod
    /// flows`, or with several sockets to flow `(k / 16) mod flows`.
    pub fn new(sockets: Vec<UdpSocket>, flows: Vec<Flow>) -> anyhow::Result<Self> {
        if flows.is_empty() {
            bail!("a generator needs at least one flow");
        }
        if let Some(f) = flows.iter().find(|f| f.socket >= sockets.len()) {
            bail!("flow on socket {} of {}", f.socket, sockets.len());
        }
        let run = if sockets.len() > 1 { 16 } else { 1 };
        Ok(Self {
            sockets,
            flows,
            run,
            gso: AtomicBool::new(true),
        })
    }

    /// Sends with UDP GSO (the default) or one datagram per message.
    pub fn set_gso(&self, on: bool) {
        self.gso.store(on, Ordering::Relaxed);
    }

    /// Whether it sends with UDP GSO: on unless [`set_gso`](Self::set_gso) turned it off or
    /// the kernel refused it (an interface without checksum offload, as the fast path's
    /// topology needs).
    pub fn uses_gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Sockets it sends from.
    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    /// Sessions it drives.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Sends `payload` at `rate` datagrams a second (0: as fast as it can) with `pacing`,
    /// for `seconds` or until `stop`, from the calling thread pinned to `cpu`.
    pub fn run(
        &self,
        payload: Payload,
        rate: u64,
        pacing: Pacing,
        seconds: f64,
        cpu: Option<usize>,
        stop: &AtomicBool,
    ) -> anyhow::Result<Sent> {
        if let Some(cpu) = cpu {
            let _ = pin_to(cpu);
        }
        let _ = fine_timer_slack();
        let sizes = payload.sizes();
        // One whole datagram per size (from the first flow), and per flow and size only the
        // head that differs (the header with its session id, the ChannelData prefix): 100,000
        // sessions of IMIX cost 24 MB, not 400.
        let templates: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&s| datagram(self.flows[0].framing, s))
            .collect::<anyhow::Result<_>>()?;
        let heads: Vec<Vec<[u8; HEAD_LEN]>> = self
            .flows
            .iter()
            .map(|f| sizes.iter().map(|&s| head(f.framing, s)).collect())
            .collect::<anyhow::Result<_>>()?;
        let mut batch = Batch::new(BATCH);
        let (flows, n_sizes) = (self.flows.len() as u64, sizes.len() as u64);
        let mut sent = Sent::default();
        let mut k = 0u64;
        let started = Instant::now();
        let duration = Duration::from_secs_f64(seconds);
        let interval_ns = match rate {
            0 => 0.0,
            r => 1e9 / r as f64,
        };
        let burst = match pacing {
            Pacing::Constant => 1u64,
            Pacing::Bursty { burst } => burst.max(1) as u64,
        };
        loop {
            let elapsed = started.elapsed();
            if elapsed >= duration || stop.load(Ordering::Relaxed) {
                break;
            }
            let due = match rate {
                0 => k + BATCH as u64,
                _ => {
                    let slots = (elapsed.as_nanos() as f64 / (interval_ns * burst as f64)) as u64;
                    (slots + 1) * burst
                }
            };
            if due <= k {
                // Sleep until the next datagram (or burst) is due.
                let next_ns = (k / burst) as f64 * interval_ns * burst as f64;
                let wait = (next_ns - elapsed.as_nanos() as f64).max(1000.0);
                std::thread::sleep(Duration::from_nanos(wait as u64));
                continue;
            }
            let want = (due - k).min(BATCH as u64) as usize;
            let flow_of = |index: u64| ((index / self.run) % flows) as usize;
            let first = &self.flows[flow_of(k)];
            let mut n = 0;
            let mut bytes = 0u64;
            let stamp = now_ns().to_le_bytes();
            while n < want {
                let index = k + n as u64;
                let flow = &self.flows[flow_of(index)];
                if flow.socket != first.socket {
                    break;
                }
                let size_index = (index % n_sizes) as usize;
                let template = &templates[size_index];
                batch.fill_slot(n, template, flow.target);
                let flow_head = &heads[flow_of(index)][size_index];
                if let Some(h) = batch.head_mut(n, head_len(flow.framing)) {
                    h.copy_from_slice(&flow_head[..h.len()]);
                }
                if let Some(tail) = batch.tail_mut(n, STAMP_LEN) {
                    tail.copy_from_slice(&stamp);
                }
                bytes += sizes[size_index] as u64;
                n += 1;
            }
            let socket = &self.sockets[first.socket];
            let gso = self.gso.load(Ordering::Relaxed);
            let result = match gso {
                true => batch.send_gso(socket, n),
                false => batch.send(socket, n),
            };
            if gso && let Err(e) = &result {
                // EIO: no checksum offload on the route's interface, so no GSO; EINVAL: a
                // kernel without UDP_SEGMENT. Either way, one datagram per message from now on.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) {
                    self.gso.store(false, Ordering::Relaxed);
                    continue;
                }
            }
            match result {
                Ok(got) => {
                    // What the kernel did not take is sent again next time round.
                    if got < n {
                        bytes = (0..got)
                            .map(|i| sizes[((k + i as u64) % n_sizes) as usize] as u64)
                            .sum();
                    }
                    k += got as u64;
                    sent.body_bytes += bytes;
                }
                Err(_) => {
                    sent.errors += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        sent.datagrams = k;
        sent.seconds = started.elapsed().as_secs_f64();
        Ok(sent)
    }
}

/// What the sink saw.
#[derive(Debug)]
pub struct Received {
    /// Datagrams stamped at or after the start given to [`sink`].
    pub datagrams: u64,
    /// Datagrams stamped before it (late arrivals of an earlier trial), not counted.
    pub stale: u64,
    /// Counted datagrams whose stamp was later than their arrival (only possible within the
    /// clock tolerance of [`sink_across_clocks`]: the sender's clock is ahead); their latency
    /// is recorded as 1 ns.
    pub ahead: u64,
    /// One-way latency of the counted datagrams, in nanoseconds.
    pub latency: Histogram<u64>,
}

/// Counts and times what arrives on `socket` until `stop`, from the calling thread pinned to
/// `cpu`; datagrams stamped before `since_ns` are not counted. `arrivals` counts every
/// datagram as it comes, so the caller can see when the queues have drained.
pub fn sink(
    socket: &UdpSocket,
    since_ns: u64,
    cpu: Option<usize>,
    stop: &AtomicBool,
    arrivals: &AtomicU64,
) -> anyhow::Result<Received> {
    sink_across_clocks(socket, since_ns, 0, cpu, stop, arrivals)
}

/// [`sink`] for stamps from another machine's clock: a datagram counts when its stamp lies
/// between `since_ns − tolerance_ns` and its arrival `+ tolerance_ns`, where `tolerance_ns`
/// bounds how far the two clocks may differ.
pub fn sink_across_clocks(
    socket: &UdpSocket,
    since_ns: u64,
    tolerance_ns: u64,
    cpu: Option<usize>,
    stop: &AtomicBool,
    arrivals: &AtomicU64,
) -> anyhow::Result<Received> {
    if let Some(cpu) = cpu {
        let _ = pin_to(cpu);
    }
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    // UDP GRO: datagrams of one flow that the sink host's interface coalesced come in one
    // buffer, so the sink costs less per datagram; each still carries its own stamp.
    let gro = set_gro(socket, true).is_ok();
    // 1 ns to 100 s at 3 significant figures.
    let mut latency = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)?;
    let mut batch = Batch::new(BATCH);
    let mut gro_batch = GroBatch::new(if gro { 32 } else { 0 });
    let (mut datagrams, mut stale, mut ahead) = (0u64, 0u64, 0u64);
    let since_ns = since_ns.saturating_sub(tolerance_ns);
    let mut record = |d: &[u8], arrived: u64| {
        let Some(stamp) = d
            .len()
            .checked_sub(STAMP_LEN)
            .and_then(|at| d.get(at..))
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_le_bytes)
        else {
            stale += 1;
            return;
        };
        if stamp < since_ns || stamp > arrived.saturating_add(tolerance_ns) {
            stale += 1;
            return;
        }
        datagrams += 1;
        if stamp > arrived {
            ahead += 1;
        }
        latency.saturating_record(arrived.saturating_sub(stamp).max(1));
    };
    while !stop.load(Ordering::Relaxed) {
        if gro {
            let Ok(n) = gro_batch.recv(socket) else {
                continue;
            };
            let arrived = now_ns();
            let mut count = 0;
            for i in 0..n {
                for d in gro_batch.datagrams(i) {
                    record(d, arrived);
                    count += 1;
                }
            }
            arrivals.fetch_add(count, Ordering::Relaxed);
            continue;
        }
        let Ok(n) = batch.recv(socket) else { continue };
        arrivals.fetch_add(n as u64, Ordering::Relaxed);
        let arrived = now_ns();
        for i in 0..n {
            record(batch.datagram(i), arrived);
        }
    }
    if gro {
        // A socket outlives the trial: leave it as it was.
        let _ = set_gro(socket, false);
    }
    Ok(Received {
        datagrams,
        stale,
        ahead,
        latency,
    })
}

/// Reads and drops whatever waits on `socket` (left from an earlier trial).
pub fn drain(socket: &UdpSocket) -> anyhow::Result<()> {
    socket.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    while socket.recv_from(&mut buf).is_ok() {}
    socket.set_nonblocking(false)?;
    Ok(())
}

/// The most reply-path probes of each kind a second: the XDP guard of `ferry-fast` lets one
/// source send 50 BIND packets a second of each kind (with and without a cookie), and a bind
/// probe sends one of each.
pub const MAX_PROBE_RATE: u64 = 50;

/// Sessions the probe keeps bound for its KEEPALIVEs, used in turn: an echo that comes after
/// its probe gave up is for another session than the next probe's, and is not taken for its
/// answer.
const KEEPALIVE_SESSIONS: u64 = 4;

/// How the reply-path probe of one window fared with one kind of round trip.
#[derive(Debug)]
pub struct RttSeries {
    /// Probes started.
    pub sent: u64,
    /// Probes answered within the timeout; their round trips are in `rtt_ns`.
    pub answered: u64,
    /// Probes with no answer within the timeout (given up, not waited for).
    pub lost: u64,
    /// Probes that failed otherwise: a REJECT, or a socket error.
    pub failed: u64,
    /// Round-trip times of the answered probes, nanoseconds.
    pub rtt_ns: Histogram<u64>,
}

impl RttSeries {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sent: 0,
            answered: 0,
            lost: 0,
            failed: 0,
            // 1 ns to 100 s at 3 significant figures, as the sink's.
            rtt_ns: Histogram::new_with_bounds(1, 100_000_000_000, 3)?,
        })
    }

    fn answered_after(&mut self, started: Instant) {
        self.answered += 1;
        self.rtt_ns
            .saturating_record((started.elapsed().as_nanos() as u64).max(1));
    }
}

/// What the reply-path probe measured in one window.
#[derive(Debug)]
pub struct ReplyWindow {
    /// Seconds it probed.
    pub seconds: f64,
    /// Full bind round trips of fresh sessions: BIND, CHALLENGE, BIND with the cookie and
    /// proof, BIND-ACK (two round trips through the relay).
    pub bind: RttSeries,
    /// KEEPALIVE echoes on a bound session (one round trip).
    pub keepalive: RttSeries,
    /// Why the first failed probe failed, if one did.
    pub first_failure: Option<String>,
}

/// Mints a slot-A token for a session id, one the relay under test accepts.
pub type MintFn<'m> = dyn Fn(u64) -> anyhow::Result<MintedToken> + Sync + 'm;

/// Times the relay's reply path from the generator's host while load runs: on a socket of its
/// own it alternates full binds of fresh sessions (each closed again once timed, so it holds
/// no slot) and KEEPALIVE echoes on sessions it bound at the start, at a fixed rate, one
/// probe at a time, each given up after a timeout.
pub struct ReplyProbe<'m> {
    socket: UdpSocket,
    relay: SocketAddr,
    mint: &'m MintFn<'m>,
    /// Probes of each kind a second.
    rate: u64,
    timeout: Duration,
    /// The sessions its KEEPALIVEs are for, bound from `socket`.
    keepalive: Vec<MintedToken>,
    next_keepalive: usize,
    next_session: u64,
    /// Sessions whose bind probe got no answer in time: the relay may still bind them, so they
    /// are closed again at the end of the window.
    unsettled: Vec<MintedToken>,
}

impl std::fmt::Debug for ReplyProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyProbe")
            .field("relay", &self.relay)
            .field("rate", &self.rate)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<'m> ReplyProbe<'m> {
    /// A probe on `socket` for the relay at `relay`, `rate` probes of each kind a second (1 to
    /// [`MAX_PROBE_RATE`]), each given up after `timeout`; binds its KEEPALIVE sessions now,
    /// with tokens from `mint` for session ids from `first_session` on.
    pub fn new(
        socket: UdpSocket,
        relay: SocketAddr,
        mint: &'m MintFn<'m>,
        first_session: u64,
        rate: u64,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if !(1..=MAX_PROBE_RATE).contains(&rate) {
            bail!("a probe rate of {rate}/s: 1 to {MAX_PROBE_RATE}");
        }
        let mut probe = Self {
            socket,
            relay,
            mint,
            rate,
            timeout,
            keepalive: Vec::new(),
            next_keepalive: 0,
            next_session: first_session,
            unsettled: Vec::new(),
        };
        for _ in 0..KEEPALIVE_SESSIONS {
            let token = probe.fresh_token()?;
            super::paths::bind(&probe.socket, relay, &token)
                .context("binding a session for the reply-path probe's KEEPALIVEs")?;
            probe.keepalive.push(token);
        }
        Ok(probe)
    }

    fn fresh_token(&mut self) -> anyhow::Result<MintedToken> {
        let session = self.next_session;
        self.next_session = self.next_session.wrapping_add(1);
        (self.mint)(session)
    }

    /// Probes for `seconds` or until `stop`, from the calling thread pinned to `cpu`: bind and
    /// KEEPALIVE in turn, `2 × rate` probes a second in all. A probe that is late (the one
    /// before it took long) starts at once; the ones it would have overlapped are skipped.
    pub fn run(
        &mut self,
        seconds: f64,
        cpu: Option<usize>,
        stop: &AtomicBool,
    ) -> anyhow::Result<ReplyWindow> {
        if let Some(cpu) = cpu {
            let _ = pin_to(cpu);
        }
        let _ = fine_timer_slack();
        let mut window = ReplyWindow {
            seconds: 0.0,
            bind: RttSeries::new()?,
            keepalive: RttSeries::new()?,
            first_failure: None,
        };
        let interval = Duration::from_secs_f64(1.0 / (2 * self.rate) as f64);
        let started = Instant::now();
        let until = started + Duration::from_secs_f64(seconds);
        let mut slot = 0u32;
        let mut bind_next = true;
        loop {
            let now = Instant::now();
            if now >= until || stop.load(Ordering::Relaxed) {
                break;
            }
            let due = started + interval * slot;
            if now < due {
                // Short sleeps, so that `stop` is seen within a few milliseconds.
                std::thread::sleep((due - now).min(until - now).min(Duration::from_millis(5)));
                continue;
            }
            let failure = if bind_next {
                self.bind_probe(&mut window.bind)?
            } else {
                self.keepalive_probe(&mut window.keepalive)
            };
            if window.first_failure.is_none() {
                window.first_failure = failure;
            }
            bind_next = !bind_next;
            let elapsed = started.elapsed();
            slot = (slot + 1).max((elapsed.as_nanos() / interval.as_nanos().max(1)) as u32);
        }
        window.seconds = started.elapsed().as_secs_f64();
        // What the relay may have bound after its probe gave up.
        for token in std::mem::take(&mut self.unsettled) {
            self.close(&token);
        }
        Ok(window)
    }

    /// One full bind of a fresh session, timed from the first BIND to the BIND-ACK (the token
    /// is minted before); the session is closed again. A failure other than a timeout is
    /// returned in words.
    fn bind_probe(&mut self, series: &mut RttSeries) -> anyhow::Result<Option<String>> {
        let token = self.fresh_token()?;
        series.sent += 1;
        let started = Instant::now();
        let outcome = super::paths::bind_within(&self.socket, self.relay, &token, self.timeout);
        let mut failure = None;
        match &outcome {
            Ok(()) => series.answered_after(started),
            Err(e) if timed_out(e) => series.lost += 1,
            Err(e) => {
                series.failed += 1;
                failure = Some(format!("bind probe: {e:#}"));
            }
        }
        self.close(&token);
        if outcome.is_err() {
            // The relay may still bind it after the probe gave up: closed again later.
            self.unsettled.push(token);
        }
        Ok(failure)
    }

    /// One KEEPALIVE and its echo, on the next of the probe's bound sessions. A failure other
    /// than a timeout is returned in words.
    fn keepalive_probe(&mut self, series: &mut RttSeries) -> Option<String> {
        let Some(token) = self
            .keepalive
            .get(self.next_keepalive % self.keepalive.len().max(1))
        else {
            return Some("keepalive probe: no bound session".into());
        };
        self.next_keepalive += 1;
        let session = token.claims.session_id;
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = match wire::encode_keepalive(&mut buf, session) {
            Ok(n) => n,
            Err(e) => return Some(format!("keepalive probe: {e}")),
        };
        series.sent += 1;
        let started = Instant::now();
        let deadline = started + self.timeout;
        if let Err(e) = self.socket.send_to(&buf[..n], self.relay) {
            series.failed += 1;
            return Some(format!("keepalive probe: sending: {e}"));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                series.lost += 1;
                return None;
            }
            if let Err(e) = self.socket.set_read_timeout(Some(left)) {
                series.failed += 1;
                return Some(format!("keepalive probe: {e}"));
            }
            match self.socket.recv_from(&mut buf) {
                // Only the echo of this session: late answers to earlier probes are skipped.
                Ok((len, _)) => match wire::parse(&buf[..len]) {
                    Ok(Packet::Keepalive(k)) if k.session_id() == session => {
                        series.answered_after(started);
                        return None;
                    }
                    _ => continue,
                },
                Err(e) if ferry_testkit::is_read_timeout(&e) => {
                    series.lost += 1;
                    return None;
                }
                Err(e) => {
                    series.failed += 1;
                    return Some(format!("keepalive probe: receiving: {e}"));
                }
            }
        }
    }

    /// Closes `token`'s session (slot A; best effort, the relay does not answer): a number
    /// above any the probe used, so the relay takes it whatever the session's last one.
    fn close(&self, token: &MintedToken) {
        let keys = SlotKeys::derive(&token.slot_secret);
        let fields = wire::CloseFields {
            slot: token.claims.slot,
            reason: wire::CloseReason::PeerClosed,
            seq: u64::MAX,
        };
        let mut buf = [0u8; MAX_DATAGRAM];
        if let Ok(n) = wire::encode_close(&mut buf, token.claims.session_id, &fields, |m| {
            keys.peer.mac(m)
        }) {
            let _ = self.socket.send_to(&buf[..n], self.relay);
        }
    }
}

impl Drop for ReplyProbe<'_> {
    fn drop(&mut self) {
        for token in self.keepalive.iter().chain(&self.unsettled) {
            self.close(token);
        }
    }
}

/// Whether `e` says that an answer did not come in time (the socket's read timeout).
fn timed_out(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(ferry_testkit::is_read_timeout)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::udp::socket;

    #[test]
    fn payloads_parse_and_imix_has_its_mean() {
        assert_eq!(Payload::parse("64").expect("64"), Payload::Fixed(64));
        assert_eq!(Payload::parse("IMIX").expect("imix"), Payload::Imix);
        assert!(Payload::parse("4").is_err(), "no room for the stamp");
        assert!(Payload::parse("99999").is_err());
        assert!(Payload::parse("big").is_err());
        assert!((Payload::Imix.mean_bytes() - 346.0).abs() < 1.0);
    }

    #[test]
    fn the_generator_paces_and_the_sink_times_what_it_stamped() {
        let rx = socket("127.0.0.1:0".parse().expect("addr")).expect("rx");
        let tx = socket("127.0.0.1:0".parse().expect("addr")).expect("tx");
        let target = rx.local_addr().expect("addr");
        let flows = (1..=3)
            .map(|s| Flow {
                socket: 0,
                target,
                framing: Framing::FerryData { session: s },
            })
            .collect();
        let generator = Generator::new(vec![tx], flows).expect("generator");
        let stop = Arc::new(AtomicBool::new(false));
        let since = now_ns();
        let sink_thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || sink(&rx, since, None, &stop, &AtomicU64::new(0)))
        };
        let sent = generator
            .run(
                Payload::Imix,
                2000,
                Pacing::Bursty { burst: 4 },
                0.25,
                None,
                &AtomicBool::new(false),
            )
            .expect("run");
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let got = sink_thread.join().expect("sink").expect("sink");
        // Paced to 2000/s for 0.25 s: about 500, never far more.
        assert!(
            (100..=700).contains(&sent.datagrams),
            "sent {}",
            sent.datagrams
        );
        assert!(got.datagrams > 0 && got.datagrams <= sent.datagrams);
        assert_eq!(got.latency.len(), got.datagrams);
        assert!(got.latency.max() < 10_000_000_000);
    }

    #[test]
    fn sessions_differ_only_in_their_heads() {
        for (a, b) in [
            (
                Framing::FerryData { session: 1 },
                Framing::FerryData { session: 2 },
            ),
            (
                Framing::ChannelData {
                    session: 1,
                    channel: 0x4000,
                },
                Framing::ChannelData {
                    session: 9,
                    channel: 0x4000,
                },
            ),
        ] {
            for size in [8, 64, 1400] {
                let (da, db) = (datagram(a, size).expect("a"), datagram(b, size).expect("b"));
                let n = head_len(a);
                assert_ne!(da[..n], db[..n]);
                assert_eq!(da[n..], db[n..], "only the head differs");
                assert_eq!(head(b, size).expect("head")[..n], db[..n]);
            }
        }
    }

    #[test]
    fn a_channel_data_datagram_wraps_the_data_datagram() {
        let inner = datagram(Framing::FerryData { session: 7 }, 64).expect("data");
        let outer = datagram(
            Framing::ChannelData {
                session: 7,
                channel: 0x4001,
            },
            64,
        )
        .expect("channel data");
        assert_eq!(&outer[4..], &inner[..]);
        assert_eq!(&outer[..2], &[0x40, 0x01]);
    }

    /// A stand-in relay on loopback: BIND with no cookie gets a CHALLENGE, BIND with one a
    /// BIND-ACK (the probe does not check its MAC), every other KEEPALIVE an echo; it returns
    /// the sessions it got a CLOSE for.
    fn fake_relay(
        socket: UdpSocket,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<std::collections::HashSet<u64>> {
        std::thread::spawn(move || {
            socket
                .set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
            let (mut buf, mut out) = ([0u8; MAX_DATAGRAM], [0u8; MAX_DATAGRAM]);
            let mut keepalives = 0u64;
            let mut closed = std::collections::HashSet::new();
            loop {
                // Until stopped and nothing more is queued (loopback queues at send time).
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                };
                let n = match wire::parse(&buf[..len]) {
                    Ok(Packet::Bind(b)) if *b.cookie() == [0; 16] => wire::encode_challenge(
                        &mut out,
                        b.session_id(),
                        &wire::ChallengeFields {
                            bind_seq: b.bind_seq(),
                            cookie: [7; 16],
                        },
                    ),
                    Ok(Packet::Bind(b)) => wire::encode_bind_ack(
                        &mut out,
                        b.session_id(),
                        &wire::BindAckFields {
                            slot: b.slot(),
                            peer_present: false,
                            idle_timeout_secs: 60,
                            bind_seq: b.bind_seq(),
                            expires_at: 0,
                        },
                        |_| [0; 16],
                    ),
                    Ok(Packet::Keepalive(k)) => {
                        keepalives += 1;
                        if keepalives.is_multiple_of(2) {
                            continue;
                        }
                        wire::encode_keepalive(&mut out, k.session_id())
                    }
                    Ok(Packet::Close(c)) => {
                        closed.insert(c.session_id());
                        continue;
                    }
                    _ => continue,
                };
                socket
                    .send_to(&out[..n.expect("encodes")], from)
                    .expect("answer");
            }
            closed
        })
    }

    #[test]
    fn the_reply_probe_times_binds_and_echoes_and_counts_what_is_lost() {
        let relay = socket("127.0.0.1:0".parse().expect("addr")).expect("relay");
        let relay_addr = relay.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let fake = fake_relay(relay, Arc::clone(&stop));
        let auth = ferry_testkit::fixtures::Authority::new().expect("keys");
        let mint = |s: u64| auth.mint(s, wire::Slot::A, 600);
        let mint: &MintFn<'_> = &mint;
        let probe_socket = socket("127.0.0.1:0".parse().expect("addr")).expect("probe");
        let mut probe = ReplyProbe::new(
            probe_socket,
            relay_addr,
            mint,
            1000,
            MAX_PROBE_RATE,
            Duration::from_millis(30),
        )
        .expect("the probe binds its KEEPALIVE sessions");
        let w = probe
            .run(0.4, None, &AtomicBool::new(false))
            .expect("probing");
        drop(probe);
        stop.store(true, Ordering::Relaxed);
        let closed = fake.join().expect("the fake relay");
        for (kind, s) in [("bind", &w.bind), ("keepalive", &w.keepalive)] {
            assert!(s.sent > 0 && s.answered > 0, "{kind}: {s:?}");
            assert_eq!(s.sent, s.answered + s.lost + s.failed, "{kind}: {s:?}");
            assert_eq!(s.failed, 0, "{kind}: {:?}", w.first_failure);
            assert_eq!(s.rtt_ns.len(), s.answered, "{kind}");
        }
        assert_eq!(w.bind.lost, 0, "the fake relay answers every bind");
        // Every other echo is dropped, and a lost one is given up on, not waited for.
        assert!(w.keepalive.lost > 0, "{:?}", w.keepalive);
        // Every session it bound was closed again: the bind probes' and its KEEPALIVE ones.
        let sessions = KEEPALIVE_SESSIONS + w.bind.sent;
        assert!(
            (1000..1000 + sessions).all(|s| closed.contains(&s)),
            "closed {} of {sessions}",
            closed.len()
        );
    }
}
