//! An on-path UDP hop between peers and the relay, in this process: what the system tests put
//! in the path to impair it (loss, reordering, delay) and to attack it (inject a datagram
//! toward a peer as if from the relay, replay a recorded one), counting everything it did.
//!
//! Peers send to the hop's address as if it were the relay (a gateway's `[[relays]]` entry
//! names the hop). Like a NAT, the hop opens one upstream socket per client source address and
//! forwards each client's datagrams to the relay from it, and the relay's answers on that
//! socket back to that client from the hop's own address.
//!
//! Impairment is decided per datagram and per direction by a seeded generator, so a seed
//! gives the same fates in the same order ([`Impairment::fates`]). A reordered datagram is
//! held back by [`Impairment::reorder_delay`] on top of [`Impairment::delay`], so the
//! datagrams sent after it overtake it.
//!
//! Threads: one reads the client-facing socket, one reads each upstream socket, one sends the
//! delayed datagrams when they are due. All stop, and are joined, when the [`Hop`] drops.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_core::wire::{self, Packet};

use crate::netns::in_ns;

/// How often blocked reads wake up to check whether the hop is stopping.
const POLL: Duration = Duration::from_millis(50);
/// The socket buffers the hop asks for, so that a burst is not lost in the hop itself.
const SOCKET_BUFFER: usize = 4 << 20;
/// The largest datagram the hop carries.
const MAX_DATAGRAM: usize = 65_536;

/// The two directions through the hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client (a peer) to the relay.
    ToRelay,
    /// From the relay to a client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToRelay => 0,
            Direction::ToClient => 1,
        }
    }
}

/// What the hop does to the datagrams it forwards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairment {
    /// The fraction of datagrams dropped, 0.0 to 1.0, in each direction.
    pub drop: f64,
    /// The fraction of the datagrams not dropped that are held back by
    /// [`Impairment::reorder_delay`], 0.0 to 1.0.
    pub reorder: f64,
    /// How much longer a reordered datagram waits than the others.
    pub reorder_delay: Duration,
    /// The delay of every datagram, each way.
    pub delay: Duration,
    /// The seed of the generator that decides each datagram's fate.
    pub seed: u64,
}

impl Impairment {
    /// Nothing dropped, reordered or delayed.
    pub fn none() -> Self {
        Self {
            drop: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            delay: Duration::ZERO,
            seed: 1,
        }
    }

    /// `drop` and `reorder` (fractions) with seed `seed`; reordered datagrams wait 5 ms more.
    pub fn lossy(drop: f64, reorder: f64, seed: u64) -> Self {
        Self {
            drop,
            reorder,
            seed,
            ..Self::none()
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        for (name, value) in [("drop", self.drop), ("reorder", self.reorder)] {
            if !(0.0..=1.0).contains(&value) {
                bail!("impairment {name} = {value} is not a fraction from 0 to 1");
            }
        }
        Ok(())
    }

    /// The fates of the first `n` datagrams in `direction` with this impairment's seed: what a
    /// fresh hop decides for them, in order.
    pub fn fates(&self, direction: Direction, n: usize) -> Vec<Fate> {
        let mut rng = FateRng::new(self.seed, direction);
        (0..n).map(|_| rng.decide(self)).collect()
    }
}

/// What the hop decided for one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Forwarded after [`Impairment::delay`].
    Forward,
    /// Forwarded after [`Impairment::delay`] plus [`Impairment::reorder_delay`].
    Reorder,
    /// Dropped.
    Drop,
}

/// SplitMix64, seeded per direction: cheap, deterministic, good enough to pick fates.
#[derive(Debug)]
struct FateRng(u64);

impl FateRng {
    fn new(seed: u64, direction: Direction) -> Self {
        Self(seed ^ (0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(direction.index() as u64 + 1)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn decide(&mut self, impairment: &Impairment) -> Fate {
        // Two draws for every datagram, whatever the first says, so one fraction's change
        // does not shift the other's sequence.
        let (d, r) = (self.unit(), self.unit());
        if d < impairment.drop {
            Fate::Drop
        } else if r < impairment.reorder {
            Fate::Reorder
        } else {
            Fate::Forward
        }
    }
}

/// What the hop has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopCounts {
    /// Datagrams received from clients.
    pub from_clients: u64,
    /// Datagrams received from the relay.
    pub from_relay: u64,
    /// Datagrams sent on, toward the relay (reordered ones included).
    pub forwarded_to_relay: u64,
    /// Datagrams sent on, toward clients (reordered ones included).
    pub forwarded_to_clients: u64,
    /// Datagrams dropped on their way to the relay.
    pub dropped_to_relay: u64,
    /// Datagrams dropped on their way to clients.
    pub dropped_to_clients: u64,
    /// Datagrams held back to be overtaken, toward the relay.
    pub reordered_to_relay: u64,
    /// Datagrams held back to be overtaken, toward clients.
    pub reordered_to_clients: u64,
    /// Datagrams the hop made up and sent toward a client ([`Hop::inject_to_client`]).
    pub injected: u64,
    /// Recorded datagrams sent again ([`Hop::replay`]).
    pub replayed: u64,
    /// Datagrams that could not be sent (an error from the socket).
    pub send_errors: u64,
    /// Client source addresses seen (upstream sockets opened).
    pub clients: u64,
}

#[derive(Debug, Default)]
struct Counters {
    from: [AtomicU64; 2],
    forwarded: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    reordered: [AtomicU64; 2],
    injected: AtomicU64,
    replayed: AtomicU64,
    send_errors: AtomicU64,
    clients: AtomicU64,
}

/// One DATA datagram the hop recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The client it came from or went to.
    pub client: SocketAddr,
    /// Which way it went.
    pub direction: Direction,
    /// The whole datagram, relay header included.
    pub bytes: Vec<u8>,
}

/// How the hop opens an upstream socket for a new client (in the right namespace).
pub type UpstreamFactory = Box<dyn Fn() -> anyhow::Result<UdpSocket> + Send + Sync>;

/// A datagram waiting for its time.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    direction: Direction,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

struct Upstream {
    socket: Arc<UdpSocket>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    client_socket: Arc<UdpSocket>,
    relay: SocketAddr,
    upstream_factory: UpstreamFactory,
    /// Client address → its upstream socket, and the clients in the order they first sent.
    upstreams: Mutex<(HashMap<SocketAddr, Upstream>, Vec<SocketAddr>)>,
    impairment: Mutex<(Impairment, [FateRng; 2])>,
    record_limit: usize,
    recorded: Mutex<Vec<Recorded>>,
    counters: Counters,
    delayed: Mutex<Option<Sender<Delayed>>>,
    seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking hop thread leaves consistent data behind: counters and lists only.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The hop: see the module documentation. Stopped, its threads joined, on drop.
pub struct Hop {
    shared: Arc<Shared>,
    listen: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop")
            .field("listen", &self.listen)
            .field("relay", &self.shared.relay)
            .finish_non_exhaustive()
    }
}

impl Hop {
    /// A hop that takes clients' datagrams on `client_socket` and forwards them to `relay`
    /// from sockets made by `upstream`, one per client, impaired by `impairment`; it records
    /// the first `record_limit` DATA datagrams of each direction.
    pub fn start(
        client_socket: UdpSocket,
        relay: SocketAddr,
        upstream: UpstreamFactory,
        impairment: Impairment,
        record_limit: usize,
    ) -> anyhow::Result<Self> {
        impairment.check()?;
        tune(&client_socket)?;
        let listen = client_socket.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            client_socket: Arc::new(client_socket),
            relay,
            upstream_factory: upstream,
            upstreams: Mutex::new((HashMap::new(), Vec::new())),
            impairment: Mutex::new((
                impairment,
                [
                    FateRng::new(impairment.seed, Direction::ToRelay),
                    FateRng::new(impairment.seed, Direction::ToClient),
                ],
            )),
            record_limit,
            recorded: Mutex::new(Vec::new()),
            counters: Counters::default(),
            delayed: Mutex::new(Some(tx)),
            seq: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let s = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("hop-delayed".into())
                .spawn(move || send_delayed(&s, rx))?,
        );
        let s = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("hop-clients".into())
                .spawn(move || read_clients(&s))?,
        );
        Ok(Self {
            shared,
            listen,
            threads,
        })
    }

    /// A hop on 127.0.0.1 (a free port) in front of `relay`, upstream sockets on 127.0.0.1.
    pub fn loopback(
        relay: SocketAddr,
        impairment: Impairment,
        record_limit: usize,
    ) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding the hop's socket")?;
        let factory: UpstreamFactory =
            Box::new(|| UdpSocket::bind("127.0.0.1:0").context("an upstream socket"));
        Self::start(socket, relay, factory, impairment, record_limit)
    }

    /// A hop in network namespace `ns`, taking clients' datagrams at `listen` and forwarding
    /// them to `relay` from sockets on an ephemeral port of that namespace.
    pub fn in_namespace(
        ns: &str,
        listen: SocketAddr,
        relay: SocketAddr,
        impairment: Impairment,
        record_limit: usize,
    ) -> anyhow::Result<Self> {
        let socket = in_ns(ns, || UdpSocket::bind(listen))?
            .with_context(|| format!("binding the hop's socket {listen} in {ns}"))?;
        let ns = ns.to_string();
        let unspecified: SocketAddr = if relay.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let factory: UpstreamFactory = Box::new(move || {
            in_ns(&ns, || UdpSocket::bind(unspecified))?
                .with_context(|| format!("an upstream socket in {ns}"))
        });
        Self::start(socket, relay, factory, impairment, record_limit)
    }

    /// Where clients send: the address to give them as the relay's.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Replaces the impairment from now on; its generator starts again from its seed.
    pub fn set_impairment(&self, impairment: Impairment) -> anyhow::Result<()> {
        impairment.check()?;
        *lock(&self.shared.impairment) = (
            impairment,
            [
                FateRng::new(impairment.seed, Direction::ToRelay),
                FateRng::new(impairment.seed, Direction::ToClient),
            ],
        );
        Ok(())
    }

    /// The client source addresses seen so far, in the order they first sent.
    pub fn clients(&self) -> Vec<SocketAddr> {
        lock(&self.shared.upstreams).1.clone()
    }

    /// The upstream address (in the hop's namespace) that the relay sees for `client`.
    pub fn upstream_addr(&self, client: SocketAddr) -> Option<SocketAddr> {
        lock(&self.shared.upstreams)
            .0
            .get(&client)
            .and_then(|u| u.socket.local_addr().ok())
    }

    /// The DATA datagrams recorded so far (the first `record_limit` of each direction), in
    /// the order they passed.
    pub fn recorded(&self) -> Vec<Recorded> {
        lock(&self.shared.recorded).clone()
    }

    /// Sends `bytes` to `client` from the hop's address, as if the relay sent it.
    pub fn inject_to_client(&self, client: SocketAddr, bytes: &[u8]) -> anyhow::Result<()> {
        self.shared
            .client_socket
            .send_to(bytes, client)
            .with_context(|| format!("injecting a datagram toward {client}"))?;
        self.shared
            .counters
            .injected
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a recorded datagram again the way it went: toward the relay from its client's
    /// upstream socket, or toward its client from the hop's address.
    pub fn replay(&self, recorded: &Recorded) -> anyhow::Result<()> {
        match recorded.direction {
            Direction::ToClient => {
                self.shared
                    .client_socket
                    .send_to(&recorded.bytes, recorded.client)
                    .with_context(|| format!("replaying toward {}", recorded.client))?;
            }
            Direction::ToRelay => {
                let socket = lock(&self.shared.upstreams)
                    .0
                    .get(&recorded.client)
                    .map(|u| Arc::clone(&u.socket))
                    .with_context(|| format!("no upstream socket for {}", recorded.client))?;
                socket
                    .send(&recorded.bytes)
                    .context("replaying toward the relay")?;
            }
        }
        self.shared
            .counters
            .replayed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// What the hop has done so far.
    pub fn counts(&self) -> HopCounts {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HopCounts {
            from_clients: get(&c.from[0]),
            from_relay: get(&c.from[1]),
            forwarded_to_relay: get(&c.forwarded[0]),
            forwarded_to_clients: get(&c.forwarded[1]),
            dropped_to_relay: get(&c.dropped[0]),
            dropped_to_clients: get(&c.dropped[1]),
            reordered_to_relay: get(&c.reordered[0]),
            reordered_to_clients: get(&c.reordered[1]),
            injected: get(&c.injected),
            replayed: get(&c.replayed),
            send_errors: get(&c.send_errors),
            clients: get(&c.clients),
        }
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Closing the channel wakes the delayed sender at once.
        lock(&self.shared.delayed).take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let upstream_threads: Vec<JoinHandle<()>> = lock(&self.shared.upstreams)
            .0
            .values_mut()
            .filter_map(|u| u.thread.take())
            .collect();
        for thread in upstream_threads {
            let _ = thread.join();
        }
    }
}

/// Bigger buffers and a read timeout, so reads wake up to notice a stop.
fn tune(socket: &UdpSocket) -> anyhow::Result<()> {
    let sock = socket2::SockRef::from(socket);
    // Best effort: the kernel caps buffers at its rmem_max / wmem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    socket
        .set_read_timeout(Some(POLL))
        .context("setting a read timeout")
}

/// The client-facing socket's reader.
fn read_clients(shared: &Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Relaxed) {
        let (len, client) = match shared.client_socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if crate::is_read_timeout(&e) => continue,
            // ECONNREFUSED and the like from an earlier send: nothing to do with this read.
            Err(_) => continue,
        };
        let Some(upstream) = upstream_for(shared, client) else {
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        pass(
            shared,
            Direction::ToRelay,
            client,
            &buf[..len],
            upstream,
            None,
        );
    }
}

/// The upstream socket of `client`, opened (with its reader thread) on its first datagram.
fn upstream_for(shared: &Arc<Shared>, client: SocketAddr) -> Option<Arc<UdpSocket>> {
    let mut upstreams = lock(&shared.upstreams);
    if let Some(u) = upstreams.0.get(&client) {
        return Some(Arc::clone(&u.socket));
    }
    let socket = (shared.upstream_factory)().ok()?;
    tune(&socket).ok()?;
    // Connected: the kernel delivers only the relay's datagrams to it.
    socket.connect(shared.relay).ok()?;
    let socket = Arc::new(socket);
    let s = Arc::clone(shared);
    let reader = Arc::clone(&socket);
    let thread = std::thread::Builder::new()
        .name("hop-upstream".into())
        .spawn(move || read_upstream(&s, client, &reader))
        .ok()?;
    upstreams.0.insert(
        client,
        Upstream {
            socket: Arc::clone(&socket),
            thread: Some(thread),
        },
    );
    upstreams.1.push(client);
    shared.counters.clients.fetch_add(1, Ordering::Relaxed);
    Some(socket)
}

/// One upstream socket's reader: the relay's datagrams for `client`.
fn read_upstream(shared: &Arc<Shared>, client: SocketAddr, socket: &UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Relaxed) {
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(_) => continue,
        };
        let out = Arc::clone(&shared.client_socket);
        pass(
            shared,
            Direction::ToClient,
            client,
            &buf[..len],
            out,
            Some(client),
        );
    }
}

/// Records, decides the fate of, and sends on (now or later) one datagram: on `socket`, to
/// `to` (or to the socket's connected address).
fn pass(
    shared: &Shared,
    direction: Direction,
    client: SocketAddr,
    bytes: &[u8],
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) {
    let d = direction.index();
    let c = &shared.counters;
    c.from[d].fetch_add(1, Ordering::Relaxed);
    if shared.record_limit > 0 && matches!(wire::parse(bytes), Ok(Packet::Data(_))) {
        let mut recorded = lock(&shared.recorded);
        let so_far = recorded.iter().filter(|r| r.direction == direction).count();
        if so_far < shared.record_limit {
            recorded.push(Recorded {
                client,
                direction,
                bytes: bytes.to_vec(),
            });
        }
    }
    let (fate, impairment) = {
        let mut guard = lock(&shared.impairment);
        let (impairment, rngs) = &mut *guard;
        (rngs[d].decide(impairment), *impairment)
    };
    let wait = match fate {
        Fate::Drop => {
            c.dropped[d].fetch_add(1, Ordering::Relaxed);
            return;
        }
        Fate::Reorder => {
            c.reordered[d].fetch_add(1, Ordering::Relaxed);
            impairment.delay + impairment.reorder_delay
        }
        Fate::Forward => impairment.delay,
    };
    if wait.is_zero() {
        send(shared, &socket, to, direction, bytes);
        return;
    }
    let delayed = Delayed {
        due: Instant::now() + wait,
        seq: shared.seq.fetch_add(1, Ordering::Relaxed),
        socket,
        to,
        direction,
        bytes: bytes.to_vec(),
    };
    if let Some(tx) = lock(&shared.delayed).as_ref() {
        let _ = tx.send(delayed);
    }
}

fn send(
    shared: &Shared,
    socket: &UdpSocket,
    to: Option<SocketAddr>,
    direction: Direction,
    bytes: &[u8],
) {
    let sent = match to {
        Some(to) => socket.send_to(bytes, to),
        None => socket.send(bytes),
    };
    let counter = match sent {
        Ok(_) => &shared.counters.forwarded[direction.index()],
        Err(_) => &shared.counters.send_errors,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Sends delayed datagrams when they are due, earliest first.
fn send_delayed(shared: &Shared, rx: Receiver<Delayed>) {
    let mut queue: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse(d)| d.due <= now) {
            if let Some(Reverse(d)) = queue.pop() {
                send(shared, &d.socket, d.to, d.direction, &d.bytes);
            }
        }
        let wait = queue
            .peek()
            .map_or(POLL, |Reverse(d)| d.due.saturating_duration_since(now));
        match rx.recv_timeout(wait) {
            Ok(d) => queue.push(Reverse(d)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

    use super::*;

    /// Datagrams as a receiver saw them: source and bytes.
    type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

    /// A stand-in relay on loopback that answers every datagram with `echo:` and its bytes,
    /// and remembers the source addresses it saw.
    struct Echo {
        addr: SocketAddr,
        seen: Seen,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Echo {
        fn start() -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_read_timeout(Some(POLL)).unwrap();
            let addr = socket.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !st.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    lock(&s).push((from, buf[..n].to_vec()));
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            });
            Self {
                addr,
                seen,
                stop,
                thread: Some(thread),
            }
        }

        fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
            lock(&self.seen).clone()
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn client() -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
    }

    fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    }

    /// Polls `f` until it is true, for at most five seconds.
    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn data(session: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let n = wire::encode_data(&mut buf, session, payload).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn it_forwards_both_ways_with_one_upstream_socket_per_client() {
        let echo = Echo::start();
        let hop = Hop::loopback(echo.addr, Impairment::none(), 0).unwrap();
        let (a, b) = (client(), client());
        for i in 0..5u8 {
            a.send_to(&[b'a', i], hop.listen_addr()).unwrap();
            let (reply, from) = recv(&a);
            assert_eq!(reply, [b"echo:".as_slice(), &[b'a', i]].concat());
            assert_eq!(from, hop.listen_addr(), "answers come from the hop");
        }
        b.send_to(b"b", hop.listen_addr()).unwrap();
        assert_eq!(recv(&b).0, b"echo:b");

        let sources: Vec<SocketAddr> = echo.seen().iter().map(|(from, _)| *from).collect();
        let (a_up, b_up) = (
            hop.upstream_addr(a.local_addr().unwrap()).unwrap(),
            hop.upstream_addr(b.local_addr().unwrap()).unwrap(),
        );
        assert_ne!(a_up, b_up);
        assert_eq!(sources.iter().filter(|s| **s == a_up).count(), 5);
        assert_eq!(sources.iter().filter(|s| **s == b_up).count(), 1);
        assert_eq!(
            hop.clients(),
            vec![a.local_addr().unwrap(), b.local_addr().unwrap()]
        );
        // The hop counts a reply forwarded after sending it: wait for the last count.
        let deadline = Instant::now() + Duration::from_secs(5);
        while hop.counts().forwarded_to_clients < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let counts = hop.counts();
        assert_eq!(counts.clients, 2);
        assert_eq!(counts.from_clients, 6);
        assert_eq!(counts.forwarded_to_relay, 6);
        assert_eq!(counts.from_relay, 6);
        assert_eq!(counts.forwarded_to_clients, 6);
        assert_eq!(counts.dropped_to_relay + counts.dropped_to_clients, 0);
    }

    #[test]
    fn fates_follow_the_seed_and_the_fractions() {
        let imp = Impairment::lossy(0.05, 0.05, 42);
        let n = 20_000;
        let fates = imp.fates(Direction::ToRelay, n);
        assert_eq!(
            fates,
            imp.fates(Direction::ToRelay, n),
            "same seed, same fates"
        );
        assert_ne!(
            fates,
            Impairment::lossy(0.05, 0.05, 43).fates(Direction::ToRelay, n)
        );
        assert_ne!(fates, imp.fates(Direction::ToClient, n), "each way its own");
        let share = |f: Fate| fates.iter().filter(|x| **x == f).count() as f64 / n as f64;
        assert!(
            (0.04..0.06).contains(&share(Fate::Drop)),
            "{}",
            share(Fate::Drop)
        );
        // Reordering applies to what is not dropped: 5% of 95%.
        assert!(
            (0.0375..0.0575).contains(&share(Fate::Reorder)),
            "{}",
            share(Fate::Reorder)
        );
        assert!(
            Impairment::none()
                .fates(Direction::ToClient, 1000)
                .iter()
                .all(|f| *f == Fate::Forward)
        );
        assert!(Impairment::lossy(1.5, 0.0, 1).check().is_err());
        assert!(Impairment::lossy(0.0, -0.1, 1).check().is_err());
    }

    #[test]
    fn dropped_and_reordered_datagrams_are_counted_as_decided() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let imp = Impairment {
            reorder_delay: Duration::from_millis(30),
            ..Impairment::lossy(0.2, 0.2, 7)
        };
        let hop = Hop::loopback(sink.local_addr().unwrap(), imp, 0).unwrap();
        let a = client();
        let n = 300u16;
        for i in 0..n {
            a.send_to(&i.to_be_bytes(), hop.listen_addr()).unwrap();
            // Spread out, so that a held-back datagram has later ones to overtake it.
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let fates = imp.fates(Direction::ToRelay, n.into());
        let count = |f: Fate| fates.iter().filter(|x| **x == f).count() as u64;
        eventually("every datagram handled", || {
            let c = hop.counts();
            c.forwarded_to_relay + c.dropped_to_relay == u64::from(n)
        });
        let c = hop.counts();
        assert_eq!(c.dropped_to_relay, count(Fate::Drop));
        assert_eq!(c.reordered_to_relay, count(Fate::Reorder));
        assert!(c.dropped_to_relay > 0 && c.reordered_to_relay > 0);

        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(len) = sink.recv(&mut buf) {
            assert_eq!(len, 2);
            got.push(u16::from_be_bytes([buf[0], buf[1]]));
        }
        // Nothing dropped arrives; something arrives after a later datagram.
        for (i, fate) in fates.iter().enumerate() {
            if *fate == Fate::Drop {
                assert!(!got.contains(&(i as u16)), "dropped {i} arrived");
            }
        }
        assert!(
            got.windows(2).any(|w| w[0] > w[1]),
            "nothing arrived out of order: {got:?}"
        );
    }

    #[test]
    fn a_delay_holds_every_datagram() {
        let echo = Echo::start();
        let imp = Impairment {
            delay: Duration::from_millis(40),
            ..Impairment::none()
        };
        let hop = Hop::loopback(echo.addr, imp, 0).unwrap();
        let a = client();
        let sent = Instant::now();
        a.send_to(b"x", hop.listen_addr()).unwrap();
        assert_eq!(recv(&a).0, b"echo:x");
        // Both ways: at least twice the delay (a lower bound, never an upper one).
        assert!(sent.elapsed() >= Duration::from_millis(80));
    }

    #[test]
    fn it_records_data_datagrams_injects_and_replays() {
        let echo = Echo::start();
        let hop = Hop::loopback(echo.addr, Impairment::none(), 2).unwrap();
        let a = client();
        a.send_to(b"not a relay datagram", hop.listen_addr())
            .unwrap();
        recv(&a);
        let first = data(0x77, b"first");
        for payload in [b"first".as_slice(), b"second", b"third"] {
            a.send_to(&data(0x77, payload), hop.listen_addr()).unwrap();
            recv(&a);
        }
        let recorded = hop.recorded();
        let to_relay: Vec<&Recorded> = recorded
            .iter()
            .filter(|r| r.direction == Direction::ToRelay)
            .collect();
        assert_eq!(to_relay.len(), 2, "only DATA, only the first two");
        assert_eq!(to_relay[0].bytes, first);
        assert_eq!(to_relay[0].client, a.local_addr().unwrap());
        // The echoes are not DATA datagrams (they start with "echo:"): none recorded.
        assert!(recorded.iter().all(|r| r.direction == Direction::ToRelay));

        // A replay toward the relay comes from the client's upstream address again.
        let before = echo.seen().len();
        hop.replay(to_relay[0]).unwrap();
        assert_eq!(recv(&a).0, [b"echo:".as_slice(), &first].concat());
        let seen = echo.seen();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(
            seen[before],
            (hop.upstream_addr(a.local_addr().unwrap()).unwrap(), first)
        );

        // An injected datagram reaches the client from the hop's address, as from the relay.
        hop.inject_to_client(a.local_addr().unwrap(), b"forged")
            .unwrap();
        let (got, from) = recv(&a);
        assert_eq!(
            (got.as_slice(), from),
            (b"forged".as_slice(), hop.listen_addr())
        );
        let c = hop.counts();
        assert_eq!((c.injected, c.replayed), (1, 1));
    }
}
