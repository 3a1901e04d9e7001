//! The io_uring worker on loopback: zero-copy forwards, replies, oversized datagrams, both
//! address families, two workers on one port, a wildcard listen address answering from the
//! address each peer sends to, and a prompt stop.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_core::time::UnixTime;
use ferry_relay::session::{DropReason, Notice, Outcome};
use ferry_relay::worker::{PacketHandler, WorkerConfig, WorkerError, WorkerStats, run_worker};

/// 'F…' is forwarded to `sink` (from `sink_src`), 'R…' answered with its bytes reversed (from
/// the address it was sent to), 'S…' holds the worker for 50 ms (so that datagrams queue up
/// behind it) and is dropped, 'H…' holds it until the test opens `gate` (at most 10 s) and is
/// dropped, anything else dropped.
struct TestHandler {
    sink: SocketAddr,
    sink_src: Option<IpAddr>,
    gate: Arc<Gate>,
}

/// Lets a test hold the worker inside its handler ('H') while it queues datagrams behind it.
#[derive(Default)]
struct Gate {
    /// Set by the handler once it holds the worker.
    holding: AtomicBool,
    /// Set by the test to let it go on.
    open: AtomicBool,
}

impl Gate {
    fn hold(&self) {
        self.holding.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.open.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (at most 10 s) until the handler holds the worker.
    fn wait_holding(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.holding.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the worker never took the 'H' datagram"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl PacketHandler for TestHandler {
    fn handle(
        &mut self,
        _now: Instant,
        _wall: UnixTime,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        match datagram.first() {
            Some(b'F') => Outcome::Forward {
                to: self.sink,
                src: self.sink_src,
            },
            Some(b'R') => {
                let n = datagram.len();
                for (i, b) in datagram.iter().rev().enumerate() {
                    reply[i] = *b;
                }
                Outcome::Reply {
                    to: from,
                    src: local,
                    len: n,
                }
            }
            Some(b'S') => {
                std::thread::sleep(Duration::from_millis(50));
                Outcome::Drop(DropReason::Malformed)
            }
            Some(b'H') => {
                self.gate.hold();
                Outcome::Drop(DropReason::Malformed)
            }
            _ => Outcome::Drop(DropReason::Malformed),
        }
    }

    fn tick(&mut self, _now: Instant, _wall: UnixTime, _notices: &mut Vec<Notice>) {}
}

/// A free port on `ip`, which is written as in a socket address (`[::1]`).
fn free_port(ip: &str) -> u16 {
    ferry_testkit::free_port(ip.trim_matches(['[', ']']).parse().unwrap()).unwrap()
}

struct Running {
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
    gate: Arc<Gate>,
    thread: std::thread::JoinHandle<Result<ferry_relay::worker::WorkerReport, WorkerError>>,
}

/// Starts a worker; `None` when io_uring is unavailable and skipping is allowed.
fn start(listen: Vec<SocketAddr>, sink: SocketAddr) -> Option<Running> {
    start_with(listen, sink, |_| {})
}

/// Starts a worker whose tick (the longest wait for a completion) is a minute long, so that a
/// datagram it held until the tick released it would not arrive within any read timeout here,
/// whose wait for a batch lasts `coalesce`, and which lends the kernel all its receive
/// buffers at once. Stop it with [`Running::stop_waking`].
fn start_without_tick(
    listen: Vec<SocketAddr>,
    sink: SocketAddr,
    coalesce: Duration,
) -> Option<Running> {
    start_with(listen, sink, |cfg| {
        cfg.tick = Duration::from_secs(60);
        cfg.coalesce = coalesce;
        // Every receive buffer lent from the start, as under a sustained load, so that a
        // burst that queued up while the worker was held comes in one drain.
        cfg.min_lent_buffers = u16::MAX;
    })
}

fn start_with(
    listen: Vec<SocketAddr>,
    sink: SocketAddr,
    configure: impl FnOnce(&mut WorkerConfig),
) -> Option<Running> {
    start_from(listen, (sink, None), configure)
}

/// Starts a worker that forwards to `sink.0` from source address `sink.1`.
fn start_from(
    listen: Vec<SocketAddr>,
    sink: (SocketAddr, Option<IpAddr>),
    configure: impl FnOnce(&mut WorkerConfig),
) -> Option<Running> {
    let (sink, sink_src) = sink;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(WorkerStats::default());
    let gate = Arc::new(Gate::default());
    let mut cfg = WorkerConfig {
        listen,
        stop: Arc::clone(&stop),
        stats: Arc::clone(&stats),
        tick: Duration::from_millis(20),
        ..WorkerConfig::default()
    };
    configure(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    let handler = TestHandler {
        sink,
        sink_src,
        gate: Arc::clone(&gate),
    };
    let thread = std::thread::spawn(move || {
        let ready = tx.clone();
        let result = run_worker(cfg, handler, move || drop(ready.send(None)));
        if let Err(e) = &result {
            let _ = tx.send(Some(e.to_string()));
        }
        result
    });
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        None => Some(Running {
            stop,
            stats,
            gate,
            thread,
        }),
        Some(e) => {
            ferry_testkit::skip::skip("worker test", format!("io_uring unavailable: {e}"));
            None
        }
    }
}

impl Running {
    /// Stops a worker started [without a tick](start_without_tick): sets the flag, then
    /// sends it a datagram it drops, which ends a wait for any completion. (A wait for a batch
    /// ends only with its timer: the kernel wakes such a wait early only when as many
    /// deferred completion tasks are queued as it wants completions, and a multishot receive
    /// queues one, however many datagrams it then brings.) `within` is how long the worker
    /// may take to stop.
    fn stop_waking(self, listen: SocketAddr, within: Duration) -> Arc<WorkerStats> {
        let started = Instant::now();
        self.stop.store(true, Ordering::Relaxed);
        let client = UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).unwrap();
        client.send_to(b"x", listen).unwrap();
        let report = self.thread.join().unwrap().unwrap();
        assert!(started.elapsed() < within, "the worker stops promptly");
        assert!(report.shutdown_drained);
        self.stats
    }

    fn stop(self) -> Arc<WorkerStats> {
        let started = Instant::now();
        self.stop.store(true, Ordering::Relaxed);
        let report = self.thread.join().unwrap().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the worker stops promptly"
        );
        assert!(
            report.shutdown_drained,
            "the worker's ring cancelled and drained every request before freeing its buffers"
        );
        self.stats
    }
}

/// Forwards, replies and drops one datagram at a time, with the small receive buffers a worker
/// has without UDP GRO, so that the one datagram longer than a buffer is cut short by the
/// kernel (with GRO's buffers it would arrive whole: `bursts_of_one_sender` covers that mode).
fn roundtrip(family_ip: &str) {
    let port = free_port(family_ip);
    let listen: SocketAddr = format!("{family_ip}:{port}").parse().unwrap();
    let sink = UdpSocket::bind(format!("{family_ip}:0")).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let Some(worker) = start_with(vec![listen], sink.local_addr().unwrap(), |c| c.gro = false)
    else {
        return;
    };
    let client = UdpSocket::bind(format!("{family_ip}:0")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let sizes = [1usize, 2, 64, 500, 1200, 1472];
    let mut forwarded = 0;
    for round in 0..200 {
        for &size in &sizes {
            let mut msg = vec![(round % 251) as u8; size];
            msg[0] = b'F';
            client.send_to(&msg, listen).unwrap();
            let (n, _) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &msg[..], "forwarded unchanged");
            forwarded += 1;
        }
    }
    for size in [1usize, 100, 1472] {
        let mut msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
        msg[0] = b'R';
        client.send_to(&msg, listen).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, listen);
        let reversed: Vec<u8> = msg.iter().rev().copied().collect();
        assert_eq!(&buf[..n], &reversed[..]);
    }
    // Bigger than a receive buffer: counted, never forwarded cut short.
    let mut big = vec![0u8; 3000];
    big[0] = b'F';
    client.send_to(&big, listen).unwrap();
    client.send_to(b"xdrop me", listen).unwrap();
    let mut marker = b"F-end".to_vec();
    client.send_to(&marker, listen).unwrap();
    let (n, _) = sink.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        &marker[..],
        "the oversized datagram was not forwarded"
    );
    marker.clear();
    let stats = worker.stop();
    assert_eq!(stats.rx_too_long.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.rx_packets.load(Ordering::Relaxed),
        forwarded + 3 + 1 + 1,
        "every datagram but the oversized one was received"
    );
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), forwarded + 3 + 1);
    assert_eq!(stats.tx_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn forwards_and_replies_over_ipv4() {
    roundtrip("127.0.0.1");
}

#[test]
fn forwards_and_replies_over_ipv6() {
    roundtrip("[::1]");
}

/// On a wildcard listen address the worker learns where each datagram was sent and sends from
/// there: peers on connected sockets (which take datagrams only from the address they are
/// connected to) hear from the relay address each talks to, not from the one the kernel's
/// route back would pick (127.0.0.1 for every address of 127.0.0.0/8). Forwards in bursts
/// leave as GSO sends carrying the source too.
#[test]
fn a_wildcard_worker_sends_from_the_address_each_peer_sends_to() {
    let port = free_port("127.0.0.1");
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let relay_at = |last: u8| SocketAddr::from(([127, 0, 0, last], port));
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.connect(relay_at(3)).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sink_src = Some(relay_at(3).ip());
    let Some(worker) = start_from(vec![listen], (sink.local_addr().unwrap(), sink_src), |_| {})
    else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    for last in [2u8, 4] {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(relay_at(last)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.send(b"Rhello").unwrap();
        let n = client
            .recv(&mut buf)
            .expect("the answer, from 127.0.0.x it was sent to");
        assert_eq!(&buf[..n], b"ollehR");
        for round in 0..20u8 {
            for i in 0..16u8 {
                client.send(&[b'F', round, i, 0, 0, 0, 0, 0]).unwrap();
            }
            for i in 0..16u8 {
                let n = sink.recv(&mut buf).expect("forwarded from 127.0.0.3");
                assert_eq!(&buf[..n], &[b'F', round, i, 0, 0, 0, 0, 0]);
            }
        }
    }
    let stats = worker.stop();
    assert_eq!(stats.tx_errors.load(Ordering::Relaxed), 0);
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 2 + 2 * 20 * 16);
}

/// The same over IPv6, where loopback has one address: the worker reads the destination from
/// `IPV6_PKTINFO` and sends from it.
#[test]
fn a_wildcard_ipv6_worker_answers_from_the_address_it_was_sent_to() {
    let port = free_port("[::1]");
    let listen: SocketAddr = format!("[::]:{port}").parse().unwrap();
    let relay: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let sink = UdpSocket::bind("[::1]:0").unwrap();
    sink.connect(relay).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sink_src = Some(relay.ip());
    let Some(worker) = start_from(vec![listen], (sink.local_addr().unwrap(), sink_src), |_| {})
    else {
        return;
    };
    let client = UdpSocket::bind("[::1]:0").unwrap();
    client.connect(relay).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    client.send(b"Rsix").unwrap();
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"xisR");
    for i in 0..32u8 {
        client.send(&[b'F', i, 0, 0]).unwrap();
    }
    for i in 0..32u8 {
        let n = sink.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[b'F', i, 0, 0]);
    }
    let stats = worker.stop();
    assert_eq!(stats.tx_errors.load(Ordering::Relaxed), 0);
}

#[test]
fn two_workers_share_a_port_and_both_receive() {
    let port = free_port("127.0.0.1");
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let Some(first) = start(vec![listen], sink_addr) else {
        return;
    };
    let Some(second) = start(vec![listen], sink_addr) else {
        return;
    };
    let mut buf = [0u8; 64];
    for i in 0..64u8 {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[b'F', i], listen).unwrap();
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[b'F', i]);
    }
    let a = first.stop().rx_packets.load(Ordering::Relaxed);
    let b = second.stop().rx_packets.load(Ordering::Relaxed);
    assert_eq!(a + b, 64);
    assert!(
        a > 0 && b > 0,
        "SO_REUSEPORT spreads 64 source ports over both ({a}, {b})"
    );
}

#[test]
fn bursts_for_one_peer_leave_as_gso_sends_and_arrive_whole() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let Some(worker) = start(vec![listen], sink.local_addr().unwrap()) else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = vec![0u8; 4096];
    let mut received = 0;
    // Bursts of same-size datagrams, so that a batch holds several for the same peer.
    for round in 0..50u32 {
        for i in 0..40u32 {
            let mut msg = vec![0u8; 700];
            msg[0] = b'F';
            msg[1..5].copy_from_slice(&round.to_be_bytes());
            msg[5..9].copy_from_slice(&i.to_be_bytes());
            client.send_to(&msg, listen).unwrap();
        }
        while received < (round + 1) * 40 {
            let Ok((n, _)) = sink.recv_from(&mut buf) else {
                break;
            };
            assert_eq!(n, 700, "every datagram arrives with its own length");
            assert_eq!(buf[0], b'F');
            received += 1;
        }
    }
    let stats = worker.stop();
    let rx = stats.rx_packets.load(Ordering::Relaxed);
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), rx);
    assert_eq!(
        u64::from(received),
        rx,
        "whatever the worker took in, the sink got"
    );
    assert!(
        rx >= 1900,
        "loopback may drop a few under a burst, not more ({rx})"
    );
    assert!(
        stats.gso_sends.load(Ordering::Relaxed) > 0,
        "some bursts went out as GSO sends"
    );
}

#[test]
fn zero_copy_forwards_arrive_and_give_their_buffers_back() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let Some(worker) = start_with(vec![listen], sink_addr, |cfg| cfg.zero_copy_min = Some(1))
    else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = vec![0u8; 4096];
    // More datagrams than the worker has receive buffers: a buffer not given back after its
    // zero-copy notification would stall the worker long before the end.
    for i in 0..6000u32 {
        let mut msg = vec![0u8; 1200];
        msg[0] = b'F';
        msg[1..5].copy_from_slice(&i.to_be_bytes());
        client.send_to(&msg, listen).unwrap();
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &msg[..]);
    }
    let stats = worker.stop();
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 6000);
    assert_eq!(stats.tx_errors.load(Ordering::Relaxed), 0);
}

/// Sends `n` datagrams `F<round><i>` of 64 bytes back to back and receives them at `sink`.
fn burst(client: &UdpSocket, listen: SocketAddr, sink: &UdpSocket, round: u8, n: u8) {
    for i in 0..n {
        let mut msg = [0u8; 64];
        msg[..3].copy_from_slice(&[b'F', round, i]);
        client.send_to(&msg, listen).unwrap();
    }
    let mut buf = [0u8; 128];
    for _ in 0..n {
        let (len, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!((len, buf[0], buf[1]), (64, b'F', round));
    }
}

#[test]
fn datagrams_the_worker_keeps_up_with_never_wait_for_a_batch() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let Some(worker) = start(vec![listen], sink.local_addr().unwrap()) else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Short bursts, whose drains hold several datagrams (their completions stay below a
    // batch), each followed by a lone datagram: before, a drain of two or more made the next
    // wait one for a whole batch, and the lone datagram sat out the coalescing timer.
    let mut sent = 0u64;
    for round in 0..20u8 {
        burst(&client, listen, &sink, round, 8);
        burst(&client, listen, &sink, round, 1);
        sent += 9;
    }
    let stats = worker.stop();
    assert_eq!(stats.rx_packets.load(Ordering::Relaxed), sent);
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), sent);
    assert_eq!(
        stats.batch_waits.load(Ordering::Relaxed),
        0,
        "no drain reached a batch, so no wait was one for a batch"
    );
    assert!(
        stats.submits.load(Ordering::Relaxed) > 0,
        "the worker counts its waits"
    );
}

#[test]
fn a_backlog_makes_the_worker_wait_for_batches() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let Some(worker) = start(vec![listen], sink.local_addr().unwrap()) else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // 'S' holds the worker while 100 datagrams queue up behind it: some drain then holds at
    // least a batch (32) of completions, and the wait after it is one for a batch.
    client.send_to(b"S", listen).unwrap();
    burst(&client, listen, &sink, 0, 100);
    let stats = worker.stop();
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 100);
    assert!(
        stats.batch_waits.load(Ordering::Relaxed) >= 1,
        "a drain of a whole batch is followed by a wait for a batch"
    );
}

#[test]
fn a_lone_datagram_is_never_held_for_a_timer() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A minute to coalesce: a datagram held for a batch would miss the read timeouts too.
    let coalesce = Duration::from_secs(60);
    let Some(worker) = start_without_tick(vec![listen], sink.local_addr().unwrap(), coalesce)
    else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 128];
    let mut handled = 0u64;
    for round in 0..100u8 {
        // One at a time: each is sent only once the one before has arrived, so the worker
        // never has a second datagram to wait for. Held for a batch, or until the tick, it
        // would miss the read timeout.
        burst(&client, listen, &sink, round, 1);
        let reply = [b'R', round];
        client.send_to(&reply, listen).unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[round, b'R'], "a reply is not held either");
        handled += 2;
        if round % 10 == 0 {
            // A burst whose drains hold several datagrams, then a lone one again.
            burst(&client, listen, &sink, round, 8);
            handled += 8;
        }
    }
    let submits = worker.stats.submits.load(Ordering::Relaxed);
    let stats = worker.stop_waking(listen, Duration::from_secs(1));
    assert!(stats.rx_packets.load(Ordering::Relaxed) >= handled);
    assert_eq!(
        stats.batch_waits.load(Ordering::Relaxed),
        0,
        "no drain reached a batch, so no wait was one for a batch"
    );
    // A lone datagram costs one entry into the kernel: the one that submits its send and waits
    // for the next datagram. (Waiting for the send's own completion as well made it two.)
    assert!(
        submits <= handled + handled / 4,
        "{submits} entries into the kernel for {handled} datagrams handled one at a time"
    );
}

#[test]
fn a_reply_leaves_at_once_while_the_worker_waits_for_a_batch() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Long enough that the reply could not arrive before the wait for a batch ends, were it
    // sent only after it; short enough for the test to end soon after.
    let coalesce = Duration::from_secs(3);
    let Some(worker) = start_without_tick(vec![listen], sink.local_addr().unwrap(), coalesce)
    else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Hold the worker while a request and a burst of 40 forwards queue up behind it: once let
    // go, its drain holds the request and a whole batch (32) of datagrams, so its next wait is
    // one for a batch, which only its timer ends (see `Running::stop_waking`).
    client.send_to(b"H", listen).unwrap();
    worker.gate.wait_holding();
    client.send_to(b"Rq", listen).unwrap();
    for i in 0..40u8 {
        let mut msg = [0u8; 64];
        msg[..3].copy_from_slice(&[b'F', 0, i]);
        client.send_to(&msg, listen).unwrap();
    }
    worker.gate.open.store(true, Ordering::SeqCst);
    let mut buf = [0u8; 128];
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"qR",
        "the reply left in the entry that began the wait"
    );
    assert_eq!(
        worker.stats.batch_waits.load(Ordering::Relaxed),
        0,
        "no wait for a batch had ended when the reply arrived"
    );
    // Once the wait for a batch has timed out, every forward queued behind the request leaves.
    let stats = worker.stop_waking(listen, coalesce + Duration::from_secs(5));
    for _ in 0..40 {
        let (len, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!((len, buf[0]), (64, b'F'));
    }
    assert!(
        stats.batch_waits.load(Ordering::Relaxed) >= 1,
        "the drain with the request held a batch, so the worker waited for one"
    );
}

/// Below saturation a worker lends the kernel only a few of its receive buffers (8), so that
/// the same few go round and stay warm. A burst that is all there at once runs them out: the
/// rest of it waits in the socket's queue while the worker lends more (each time counted in
/// `rx_no_buffers`), and every datagram is forwarded, in order.
#[test]
fn a_burst_longer_than_the_buffers_lent_waits_in_the_queue_and_all_of_it_is_forwarded() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let Some(worker) = start(vec![listen], sink.local_addr().unwrap()) else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Hold the worker while the burst queues up behind the 'H' datagram.
    client.send_to(b"H", listen).unwrap();
    worker.gate.wait_holding();
    const BURST: u8 = 100;
    for i in 0..BURST {
        let mut msg = [0u8; 64];
        msg[..3].copy_from_slice(&[b'F', 1, i]);
        client.send_to(&msg, listen).unwrap();
    }
    worker.gate.open.store(true, Ordering::SeqCst);
    let mut buf = [0u8; 128];
    for i in 0..BURST {
        let (len, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(
            (len, buf[0], buf[1], buf[2]),
            (64, b'F', 1, i),
            "datagram {i}"
        );
    }
    let stats = worker.stop();
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), u64::from(BURST));
    assert!(
        stats.rx_no_buffers.load(Ordering::Relaxed) >= 1,
        "the burst ran out the buffers lent at first"
    );
}

/// Makes every send of `socket` a UDP GSO send of `size`-byte datagrams (`UDP_SEGMENT` as a
/// socket option): one `send_to` of several times `size` bytes leaves as one packet that the
/// kernel splits only where it must. Over loopback it reaches a socket with UDP GRO whole, as
/// a burst a GRO-capable device coalesced would.
fn segment_sends(socket: &UdpSocket, size: u16) {
    ferry_relay::worker::set_int_option(
        socket,
        libc::SOL_UDP,
        libc::UDP_SEGMENT,
        libc::c_int::from(size),
    )
    .expect("UDP_SEGMENT");
}

/// Coalesced receives (`gro`) and one-by-one receives of the same bursts: every datagram is
/// handled on its own (forwarded, answered or dropped by its first byte), forwards arrive whole
/// with their own lengths, the last, shorter one included, and a receive buffer shared by
/// several forwards is given back only once all of them are sent (the burst count is far over
/// the worker's 256 receive buffers, so a buffer given back early or never would show).
fn bursts_of_one_sender(ip: &str, gro: bool) {
    let listen: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
    let sink = UdpSocket::bind(format!("{ip}:0")).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let Some(worker) = start_with(vec![listen], sink.local_addr().unwrap(), |c| c.gro = gro) else {
        return;
    };
    let client = UdpSocket::bind(format!("{ip}:0")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    const SIZE: usize = 300;
    segment_sends(&client, SIZE as u16);
    // Per burst: F, R, x (dropped), F, then a shorter F.
    let kinds = [b'F', b'R', b'x', b'F', b'F'];
    let bursts = 400u32;
    let mut buf = vec![0u8; 4096];
    for n in 0..bursts {
        let mut burst = Vec::new();
        for (i, &kind) in kinds.iter().enumerate() {
            let len = if i == kinds.len() - 1 { 100 } else { SIZE };
            let mut msg = vec![i as u8; len];
            msg[0] = kind;
            msg[1..5].copy_from_slice(&n.to_be_bytes());
            burst.extend_from_slice(&msg);
        }
        client.send_to(&burst, listen).unwrap();
        for (i, want_len) in [(0u8, SIZE), (3, SIZE), (4, 100)] {
            let (len, _) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(len, want_len, "burst {n}, datagram {i}: its own length");
            assert_eq!(buf[0], b'F');
            assert_eq!(buf[1..5], n.to_be_bytes(), "in order, from burst {n}");
            assert!(
                buf[5..len].iter().all(|&b| b == i),
                "burst {n} datagram {i}"
            );
        }
        let (len, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((len, from), (SIZE, listen));
        assert_eq!(buf[SIZE - 1], b'R', "the reply reverses the datagram");
    }
    let stats = worker.stop();
    let per_burst = kinds.len() as u64;
    assert_eq!(
        stats.rx_packets.load(Ordering::Relaxed),
        per_burst * u64::from(bursts),
        "every datagram counted on its own"
    );
    assert_eq!(
        stats.tx_packets.load(Ordering::Relaxed),
        4 * u64::from(bursts),
        "three forwards and a reply per burst"
    );
    assert_eq!(stats.rx_too_long.load(Ordering::Relaxed), 0);
    assert_eq!(stats.tx_slots_full.load(Ordering::Relaxed), 0);
    let coalesced = stats.gro_receives.load(Ordering::Relaxed);
    match gro {
        true => assert_eq!(coalesced, u64::from(bursts), "one receive per burst"),
        false => assert_eq!(coalesced, 0, "without GRO the kernel splits each burst"),
    }
}

#[test]
fn a_coalesced_burst_is_handled_datagram_by_datagram() {
    bursts_of_one_sender("127.0.0.1", true);
    bursts_of_one_sender("[::1]", true);
}

#[test]
fn without_gro_the_same_bursts_arrive_one_by_one() {
    bursts_of_one_sender("127.0.0.1", false);
}
