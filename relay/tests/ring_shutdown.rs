//! Shutting an io_uring [`Ring`] down: closing a ring does not end its requests (the kernel
//! cancels them later, from a workqueue), so the ring cancels everything, waits (bounded) for
//! every receive and send to end, zero-copy notifications included, and only then frees the
//! buffers the kernel writes into; if the kernel is not done in time, it leaks them instead.
//!
//! The tests that hold packets with `tc` in a network namespace need root, so they are
//! `#[ignore]`d: `cargo test -- --include-ignored` runs them.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_relay::uring::{Completion, Ring, SHUTDOWN_LIMIT, Segment};
use ferry_testkit::netns::{Topology, in_ns};
use ferry_testkit::skip;
use io_uring::types::Timespec;

/// A ring on `socket`; `None` when io_uring is unavailable and skipping is allowed.
fn ring_on(socket: &UdpSocket) -> Option<Ring> {
    match Ring::new(
        256,
        256,
        2048,
        256,
        vec![socket.as_raw_fd()],
        false,
        &[false],
    ) {
        Ok(ring) => Some(ring),
        Err(e) => {
            skip::skip("ring shutdown test", format!("io_uring unavailable: {e}"));
            None
        }
    }
}

/// One round of the worker's loop, simplified: wait (at most `wait`), then for each received
/// datagram queue a forward of it to `forward_to` (or keep its buffer in `keep`), free the
/// slots of finished sends and re-arm ended receives. Returns the forwards queued.
fn pump(
    ring: &mut Ring,
    wait: Duration,
    forward_to: Option<SocketAddr>,
    keep: &mut Vec<(Segment, usize)>,
) -> usize {
    let ts = Timespec::new().nsec(wait.subsec_nanos());
    ring.submit_and_wait(1, &ts).unwrap();
    let mut completions = Vec::new();
    ring.drain(&mut completions);
    let mut queued = 0;
    for completion in completions {
        match completion {
            Completion::Recv {
                socket,
                result,
                flags,
            } => {
                if result >= 0 {
                    #[allow(unsafe_code)]
                    // SAFETY: this completion was just reaped by `drain` and is handled once;
                    // its buffer is given back or forwarded only below, after the `Datagram`
                    // borrowing the ring is gone.
                    let got = unsafe { ring.datagram(socket, result, flags) }
                        .map(|(bid, d)| (bid, d.map(|d| (d.offset, d.payload.len())).ok()));
                    match got {
                        Some((bid, Some((offset, len)))) => {
                            let segment = Segment { bid, offset };
                            match forward_to {
                                Some(to) => {
                                    if ring.send_forward(0, &[segment], len, to, None).unwrap() {
                                        queued += 1;
                                    } else {
                                        ring.give_back(bid);
                                    }
                                }
                                None => keep.push((segment, len)),
                            }
                        }
                        Some((bid, None)) => ring.give_back(bid),
                        None => {}
                    }
                }
                if !Ring::still_armed(flags) {
                    ring.arm_recv(socket).unwrap();
                }
            }
            Completion::Send { slot, flags, .. } => {
                if io_uring::cqueue::notif(flags) || !io_uring::cqueue::more(flags) {
                    ring.finish_send(slot);
                }
            }
        }
    }
    queued
}

/// Sends 1000-byte datagrams to `to` as fast as it can until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    from: SocketAddr,
}

impl Flood {
    fn start(to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = client.local_addr().unwrap();
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let msg = [0x46u8; 1000];
                while !stop.load(Ordering::Relaxed) {
                    let _ = client.send_to(&msg, to);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
            from,
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A ring under a flood of datagrams, forwarding each (zero copy when the kernel can) and
/// replying now and then, stopped mid-flight: its receive armed, sends queued but not
/// submitted, sends submitted whose completions and notifications are not reaped.
fn busy_ring(rx: &UdpSocket, sink: SocketAddr) -> Option<(Ring, Flood)> {
    let mut ring = ring_on(rx)?;
    let zero_copy = ring.set_zero_copy_min(Some(1));
    eprintln!(
        "zero copy: {zero_copy}, fixed buffers: {}",
        ring.uses_fixed_buffers()
    );
    ring.arm_recv(0).unwrap();
    let flood = Flood::start(rx.local_addr().unwrap());
    let started = Instant::now();
    let mut forwards = 0;
    let mut keep = Vec::new();
    loop {
        let queued = pump(&mut ring, Duration::from_millis(10), Some(sink), &mut keep);
        forwards += queued;
        if started.elapsed() > Duration::from_millis(200) && queued > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no datagrams");
    }
    // Replies too (never zero copy), submitted, with their completions left unreaped.
    for _ in 0..8 {
        assert!(ring.send_reply(0, b"Rreply", flood.from, None).unwrap());
    }
    ring.submit_and_wait(0, &Timespec::new()).unwrap();
    for _ in 0..4 {
        assert!(ring.send_reply(0, b"Rqueued", flood.from, None).unwrap());
    }
    assert!(forwards > 0);
    assert_eq!(ring.recvs_armed(), 1);
    assert!(ring.sends_in_kernel() >= 4, "{}", ring.sends_in_kernel());
    Some((ring, flood))
}

#[test]
fn shutdown_cancels_the_armed_receive_and_waits_for_every_send_and_notification() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let Some((ring, flood)) = busy_ring(&rx, sink.local_addr().unwrap()) else {
        return;
    };
    let started = Instant::now();
    // The flood keeps going: the kernel has datagrams to write into the buffers until the
    // receive is cancelled.
    let report = ring.shutdown(SHUTDOWN_LIMIT);
    let took = started.elapsed();
    drop(flood);
    eprintln!("{report:?}");
    assert!(report.drained, "{report:?}");
    assert!(!report.leaked, "{report:?}");
    assert_eq!(report.armed_at_start, 1);
    assert!(report.sends_at_start >= 4, "{report:?}");
    assert_eq!((report.armed_left, report.sends_left), (0, 0));
    assert!(
        report.completions > report.sends_at_start,
        "every send's last completion and the receive's end were reaped: {report:?}"
    );
    assert!(took < SHUTDOWN_LIMIT, "{took:?}");
}

#[test]
fn dropping_a_busy_ring_drains_it_within_the_bound() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let Some((ring, flood)) = busy_ring(&rx, sink.local_addr().unwrap()) else {
        return;
    };
    let started = Instant::now();
    drop(ring);
    let took = started.elapsed();
    drop(flood);
    assert!(took < SHUTDOWN_LIMIT, "{took:?}");
    // The sockets are still usable after the ring let go of them.
    sink.set_nonblocking(true).unwrap();
    rx.send_to(b"after", sink.local_addr().unwrap()).unwrap();
}

/// A network namespace for `test`, which is `#[ignore]`d as needing root.
fn namespace(test: &str) -> Topology {
    skip::require_root(test);
    Topology::new().unwrap()
}

/// Makes the namespace's loopback hold every packet past the first `burst` bytes (a token
/// bucket of 1 byte/s), so that sends stay unfinished as long as the test likes. False: skip.
fn hold_loopback(test: &str, topo: &Topology, burst: u32) -> bool {
    let out = Command::new("tc")
        .args([
            "-n",
            &topo.relay_ns,
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
        ])
        .args([
            "rate",
            "8bit",
            "burst",
            &burst.to_string(),
            "limit",
            "1000000",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        skip::skip(
            test,
            format!("tc tbf: {}", String::from_utf8_lossy(&out.stderr)),
        );
    }
    out.status.success()
}

#[test]
#[ignore = "needs root: a network namespace with tc"]
fn a_send_blocked_on_a_full_socket_buffer_is_cancelled_and_drained() {
    let topo = namespace("blocked_send");
    if !hold_loopback("blocked_send", &topo, 4000) {
        return;
    }
    let (rx, sink) = in_ns(&topo.relay_ns, || {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // The smallest send buffer: a few held packets fill it, the next send waits.
        socket2::SockRef::from(&rx).set_send_buffer_size(1).unwrap();
        (rx, UdpSocket::bind("127.0.0.1:0").unwrap())
    })
    .unwrap();
    let Some(mut ring) = ring_on(&rx) else {
        return;
    };
    ring.arm_recv(0).unwrap();
    let to = sink.local_addr().unwrap();
    for _ in 0..16 {
        assert!(ring.send_reply(0, &[0x52; 1000], to, None).unwrap());
    }
    let started = Instant::now();
    let mut keep = Vec::new();
    while started.elapsed() < Duration::from_millis(300) {
        pump(&mut ring, Duration::from_millis(20), None, &mut keep);
    }
    let blocked = ring.sends_in_kernel();
    assert!(
        blocked > 0 && blocked < 16,
        "some sends went out, the rest wait for buffer space ({blocked})"
    );
    let report = ring.shutdown(SHUTDOWN_LIMIT);
    eprintln!("{report:?}");
    assert!(report.drained && !report.leaked, "{report:?}");
    assert_eq!(report.sends_at_start, blocked);
    assert!(
        report.elapsed < Duration::from_millis(500),
        "blocked sends are cancelled, not waited out: {report:?}"
    );
}

#[test]
#[ignore = "needs root: a network namespace with tc"]
fn a_zero_copy_send_the_network_still_holds_is_leaked_not_freed() {
    let topo = namespace("held_zero_copy");
    let (rx, sink, client) = in_ns(&topo.relay_ns, || {
        let bind = || UdpSocket::bind("127.0.0.1:0").unwrap();
        (bind(), bind(), bind())
    })
    .unwrap();
    let Some(mut ring) = ring_on(&rx) else {
        return;
    };
    if !ring.set_zero_copy_min(Some(1)) {
        skip::skip("held_zero_copy", "the kernel lacks SEND_ZC");
        return;
    }
    ring.arm_recv(0).unwrap();
    // Received while the loopback still runs freely...
    let mut keep = Vec::new();
    let started = Instant::now();
    for _ in 0..4 {
        client
            .send_to(&[0x46; 1000], rx.local_addr().unwrap())
            .unwrap();
    }
    while keep.len() < 4 {
        pump(&mut ring, Duration::from_millis(20), None, &mut keep);
        assert!(started.elapsed() < Duration::from_secs(5), "no datagrams");
    }
    // ...then forwarded, zero copy, into the held loopback: the first fits the burst, the
    // others wait in the queue, their receive buffers still lent to the network stack.
    if !hold_loopback("held_zero_copy", &topo, 1500) {
        return;
    }
    let to = sink.local_addr().unwrap();
    for &(segment, len) in &keep {
        assert!(ring.send_forward(0, &[segment], len, to, None).unwrap());
    }
    let started = Instant::now();
    let mut more = Vec::new();
    while started.elapsed() < Duration::from_millis(200) {
        pump(&mut ring, Duration::from_millis(20), None, &mut more);
    }
    assert!(ring.sends_in_kernel() > 0, "a notification is outstanding");
    let limit = Duration::from_millis(300);
    let report = ring.shutdown(limit);
    eprintln!("{report:?}");
    assert!(!report.drained && report.leaked, "{report:?}");
    assert_eq!(
        report.armed_left, 0,
        "the receive was cancelled: {report:?}"
    );
    assert!(report.sends_left > 0, "{report:?}");
    assert!(
        report.elapsed >= limit && report.elapsed < limit + Duration::from_millis(300),
        "gave up at the limit: {report:?}"
    );
    // Deleting the namespace frees the held packets; the kernel then finishes the sends
    // against memory that was leaked, never freed.
    drop(topo);
}
