//! The io_uring worker at its limits, on loopback: datagrams longer than the protocol allows
//! (whether they fit a receive buffer or the kernel cuts them short, each is counted once as
//! malformed by rule `too_long`), and sends the kernel fails (only a failure that means UDP GSO
//! cannot work turns GSO off).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_core::keys::RelayStaticKey;
use ferry_core::proof::CookieJar;
use ferry_core::time::UnixTime;
use ferry_core::token::{TokenVerifier, VerifierConfig};
use ferry_core::wire::{MAX_DATA_BODY, MAX_DATAGRAM, encode_data};
use ferry_relay::exporter;
use ferry_relay::limits::IpLimits;
use ferry_relay::session::{DropReason, Notice, Outcome, SessionLimits};
use ferry_relay::shards::{Sessions, SessionsHandler};
use ferry_relay::uring::recv_payload_room;
use ferry_relay::worker::{
    GRO_RECV_BUF_SIZE, PacketHandler, RECV_BUF_SIZE, SocketBuffers, WorkerConfig, WorkerError,
    WorkerReport, WorkerStats, run_worker, set_int_option, socket_drops,
};

struct Running {
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
    thread: std::thread::JoinHandle<Result<WorkerReport, WorkerError>>,
}

/// Starts a worker on `listen` with `handler`; `None` when io_uring is unavailable and
/// skipping is allowed.
fn start<H: PacketHandler + 'static>(listen: SocketAddr, handler: H) -> Option<Running> {
    start_with(listen, handler, |_| {})
}

/// [`start`] with the worker's config changed by `configure` first.
fn start_with<H: PacketHandler + 'static>(
    listen: SocketAddr,
    handler: H,
    configure: impl FnOnce(&mut WorkerConfig),
) -> Option<Running> {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(WorkerStats::default());
    let mut cfg = WorkerConfig {
        listen: vec![listen],
        stop: Arc::clone(&stop),
        stats: Arc::clone(&stats),
        tick: Duration::from_millis(20),
        ..WorkerConfig::default()
    };
    configure(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
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
            thread,
        }),
        Some(e) if std::env::var("FERRY_REQUIRE_PRIVILEGED").as_deref() != Ok("1") => {
            eprintln!("SKIP worker test: io_uring unavailable: {e}");
            None
        }
        Some(e) => panic!("io_uring worker failed to start and FERRY_REQUIRE_PRIVILEGED=1: {e}"),
    }
}

impl Running {
    fn stop(self) -> Arc<WorkerStats> {
        self.stop.store(true, Ordering::Relaxed);
        let report = self.thread.join().unwrap().unwrap();
        assert!(report.shutdown_drained, "the ring drained before freeing");
        self.stats
    }
}

/// Waits (at most 5 s) until `done` holds.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn free_listen(ip: &str) -> SocketAddr {
    UdpSocket::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sessions() -> Sessions {
    let rng = ring::rand::SystemRandom::new();
    let verifier = TokenVerifier::new(
        VerifierConfig::new(0x5e1a7),
        RelayStaticKey::generate(&rng).unwrap(),
    )
    .unwrap();
    Sessions::new(
        SessionLimits::default(),
        IpLimits::default(),
        verifier,
        CookieJar::generate(&rng).unwrap(),
    )
}

/// A datagram of `len` bytes (at least [`MAX_DATAGRAM`]) that opens with the header of a
/// full-size DATA datagram: only its length is wrong when `len` is over the maximum.
fn data_datagram(len: usize) -> Vec<u8> {
    let mut datagram = vec![0x5a; len];
    encode_data(&mut datagram, 0x1234, &[0x5a; MAX_DATA_BODY]).unwrap();
    datagram
}

/// The value of the sample `series` (name and labels, as rendered) on a metrics page.
fn sample(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} on the page:\n{page}"))
        .parse()
        .unwrap()
}

/// Without UDP GRO (`gro` false) the receive buffers are small and the kernel cuts the longest
/// datagrams short; with it they hold any datagram and the session table sees them all.
fn oversized_datagrams_are_malformed_too_long(ip: &str, gro: bool) {
    let listen = free_listen(ip);
    let sessions = Arc::new(sessions());
    let Some(worker) = start_with(
        listen,
        SessionsHandler::new(Arc::clone(&sessions), 0, Instant::now()),
        |c| c.gro = gro,
    ) else {
        return;
    };
    let room = match gro {
        false => recv_payload_room(RECV_BUF_SIZE, false, false),
        true => recv_payload_room(GRO_RECV_BUF_SIZE, true, false),
    };
    assert!(
        gro || (1500..1999).contains(&room),
        "a 1500-byte datagram reaches the session table, a 1999-byte one is cut short"
    );
    // Over the maximum: some fit a receive buffer and reach the session table, the others
    // the kernel cuts short; both sides of that boundary, and far past it. (With GRO's
    // buffers the boundary lies past the largest UDP datagram, 65,507 bytes over IPv4.)
    let oversized: Vec<usize> = [
        MAX_DATAGRAM + 1,
        room,
        room + 1,
        1500,
        1999,
        2000,
        9000,
        65000,
    ]
    .into_iter()
    .filter(|&n| n <= 65_507)
    .collect();
    let seen_by_table = oversized.iter().filter(|&&n| n <= room).count() as u64;
    let client = UdpSocket::bind(format!("{ip}:0")).unwrap();
    // Well-formed but for an unknown session: the control, dropped for another reason.
    client
        .send_to(&data_datagram(MAX_DATAGRAM), listen)
        .unwrap();
    for &len in &oversized {
        client.send_to(&data_datagram(len), listen).unwrap();
    }
    let stats = Arc::clone(&worker.stats);
    let expected_rx = 1 + seen_by_table;
    let expected_cut = oversized.len() as u64 - seen_by_table;
    wait_for("every datagram was handled", || {
        load(&stats.rx_packets) == expected_rx && load(&stats.rx_too_long) == expected_cut
    });
    let stats = worker.stop();
    assert_eq!(load(&stats.rx_undecodable), 0);

    let page = exporter::render(&sessions, &[Arc::clone(&stats)], None);
    let n = oversized.len() as u64;
    assert_eq!(sample(&page, "ferry_malformed_total{rule=\"too_long\"}"), n);
    assert_eq!(sample(&page, "ferry_drops_total{reason=\"malformed\"}"), n);
    assert_eq!(
        sample(&page, "ferry_drops_total{reason=\"data_unbound\"}"),
        1
    );
    for rule in ["too_short", "length_mismatch", "body"] {
        assert_eq!(
            sample(&page, &format!("ferry_malformed_total{{rule=\"{rule}\"}}")),
            0,
            "{rule}"
        );
    }
    assert!(
        !page.contains("truncated"),
        "no second name for the same drop"
    );
}

#[test]
fn oversized_datagrams_are_malformed_too_long_over_ipv4() {
    oversized_datagrams_are_malformed_too_long("127.0.0.1", false);
    oversized_datagrams_are_malformed_too_long("127.0.0.1", true);
}

#[test]
fn oversized_datagrams_are_malformed_too_long_over_ipv6() {
    oversized_datagrams_are_malformed_too_long("[::1]", false);
    oversized_datagrams_are_malformed_too_long("[::1]", true);
}

/// Where 'F…' goes: the sink. 'U…' goes to the loopback broadcast address, which a socket
/// without `SO_BROADCAST` may not send to (EACCES: nothing leaves the host). Anything else is
/// dropped.
struct ForwardHandler {
    sink: SocketAddr,
}

/// The broadcast address of 127.0.0.0/8 on `lo`.
const LOOPBACK_BROADCAST: &str = "127.255.255.255:9";

impl PacketHandler for ForwardHandler {
    fn handle(
        &mut self,
        _now: Instant,
        _wall: UnixTime,
        _from: SocketAddr,
        _local: Option<IpAddr>,
        datagram: &[u8],
        _reply: &mut [u8],
    ) -> Outcome {
        match datagram.first() {
            Some(b'F') => Outcome::Forward {
                to: self.sink,
                src: None,
            },
            Some(b'U') => Outcome::Forward {
                to: LOOPBACK_BROADCAST.parse().unwrap(),
                src: None,
            },
            _ => Outcome::Drop(DropReason::Malformed),
        }
    }

    fn tick(&mut self, _now: Instant, _wall: UnixTime, _notices: &mut Vec<Notice>) {}
}

/// Sends `count` 700-byte datagrams opening with `tag` to `to` in one burst, so that a batch
/// holds several for the same destination (a GSO send).
fn burst(client: &UdpSocket, to: SocketAddr, tag: u8, count: u32) {
    for i in 0..count {
        let mut msg = vec![0u8; 700];
        msg[0] = tag;
        msg[1..5].copy_from_slice(&i.to_be_bytes());
        client.send_to(&msg, to).unwrap();
    }
}

/// A socket that counts the 700-byte datagrams it receives, on a thread of its own so that
/// bursts never overflow its receive buffer.
struct Sink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Room for whole bursts, so that a busy machine drops as little as it can.
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(8 << 20)
            .unwrap();
        let addr = socket.local_addr().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, _)) = socket.recv_from(&mut buf) {
                        assert_eq!(len, 700, "every datagram arrives with its own length");
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far, once nothing has arrived for 100 ms.
    fn settled(&self) -> u64 {
        let mut last = load(&self.received);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = load(&self.received);
            if now == last {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Waits until the worker has finished with every datagram it received: each was sent or
/// failed.
fn wait_until_sent(stats: &WorkerStats) {
    wait_for("every received datagram was sent or failed", || {
        load(&stats.tx_packets) + load(&stats.tx_errors) == load(&stats.rx_packets)
    });
}

#[test]
fn a_failed_send_that_says_nothing_about_gso_leaves_gso_on() {
    let listen = free_listen("127.0.0.1");
    let sink = Sink::start();
    let Some(worker) = start(listen, ForwardHandler { sink: sink.addr }) else {
        return;
    };
    let stats = Arc::clone(&worker.stats);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Bursts the kernel refuses (EACCES), until some went out as GSO sends.
    let started = Instant::now();
    while load(&stats.gso_sends) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no GSO send formed"
        );
        burst(&client, listen, b'U', 40);
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_until_sent(&stats);
    let failed_gso_sends = load(&stats.gso_sends);
    assert_eq!(load(&stats.tx_packets), 0);
    assert_eq!(load(&stats.tx_errors), load(&stats.rx_packets));
    assert_eq!(
        load(&stats.gso_disabled),
        0,
        "EACCES says nothing about GSO"
    );
    // GSO is still on: bursts to the sink leave as GSO sends again, and arrive whole.
    let mut forwarded = 0;
    let started = Instant::now();
    while load(&stats.gso_sends) == failed_gso_sends {
        assert!(started.elapsed() < Duration::from_secs(5), "GSO stayed off");
        burst(&client, listen, b'F', 40);
        forwarded += 40;
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_until_sent(&stats);
    let arrived = sink.settled();
    let stats = worker.stop();
    assert_eq!(load(&stats.gso_disabled), 0);
    assert!(
        arrived <= load(&stats.tx_packets),
        "nothing arrived that the worker did not count as sent"
    );
    assert!(
        arrived >= forwarded * 9 / 10,
        "loopback may drop a few under a burst, not more ({arrived} of {forwarded})"
    );
}

/// Turns UDP checksums off (`SO_NO_CHECK`) on this process's UDP socket bound to `addr`: the
/// worker's, which the test reaches through `/proc/self/fd` because the worker opens it itself.
/// Linux refuses a GSO send on such a socket with EINVAL, as it does where the device cannot
/// segment (quinn-udp, too, turns GSO off on EINVAL).
fn turn_udp_checksums_off(addr: SocketAddr) {
    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Some(fd) = entry
            .unwrap()
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        #[allow(unsafe_code)]
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor (or fails, for an fd closed
        // meanwhile); it changes nothing for the fd's owner.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        #[allow(unsafe_code)]
        // SAFETY: `dup` was just returned by fcntl, is open, and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let socket = socket2::SockRef::from(&owned);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
        if bound != Some(addr) || socket.r#type().ok() != Some(socket2::Type::DGRAM) {
            continue;
        }
        set_int_option(&owned, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).expect("SO_NO_CHECK");
        found = true;
    }
    assert!(found, "the worker's socket on {addr}");
}

#[test]
fn a_gso_send_the_kernel_refuses_turns_gso_off_once() {
    let listen = free_listen("127.0.0.1");
    let sink = Sink::start();
    let Some(worker) = start(listen, ForwardHandler { sink: sink.addr }) else {
        return;
    };
    let stats = Arc::clone(&worker.stats);
    turn_udp_checksums_off(listen);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Bursts until a GSO send has been refused.
    let started = Instant::now();
    while load(&stats.gso_disabled) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no GSO send refused"
        );
        burst(&client, listen, b'F', 40);
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_until_sent(&stats);
    let arrived_before = sink.settled();
    let (gso_sends, errors) = (load(&stats.gso_sends), load(&stats.tx_errors));
    assert!(
        errors >= 2,
        "the refused GSO send's datagrams are send errors ({errors})"
    );
    // From now on every datagram goes out on its own, and arrives.
    for _ in 0..20 {
        burst(&client, listen, b'F', 40);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_until_sent(&stats);
    let arrived = sink.settled();
    let stats = worker.stop();
    assert_eq!(load(&stats.gso_disabled), 1, "turned off once, logged once");
    assert_eq!(load(&stats.gso_sends), gso_sends, "no GSO send after that");
    assert_eq!(load(&stats.tx_errors), errors, "and no more send errors");
    // Loopback itself may drop a few datagrams of a burst into the sink's socket when the
    // machine is busy, so arrivals are bounded by sends rather than equal to them.
    assert!(
        arrived <= load(&stats.tx_packets),
        "nothing arrived that the worker did not count as sent"
    );
    assert!(
        arrived - arrived_before >= 800 * 9 / 10,
        "loopback may drop a few under a burst, not more ({} of 800)",
        arrived - arrived_before
    );
}

/// Sleeps on the first datagram it is given, as a worker stalled by a slow host would, and
/// drops every datagram.
struct Stalling {
    stalled: bool,
}

impl PacketHandler for Stalling {
    fn handle(
        &mut self,
        _now: Instant,
        _wall: UnixTime,
        _from: SocketAddr,
        _local: Option<IpAddr>,
        _datagram: &[u8],
        _reply: &mut [u8],
    ) -> Outcome {
        if !self.stalled {
            self.stalled = true;
            std::thread::sleep(Duration::from_millis(500));
        }
        Outcome::Drop(DropReason::Malformed)
    }

    fn tick(&mut self, _now: Instant, _wall: UnixTime, _notices: &mut Vec<Notice>) {}
}

#[test]
fn datagrams_the_kernel_drops_at_a_full_socket_are_counted() {
    let listen = free_listen("127.0.0.1");
    let small = SocketBuffers {
        recv: 64 << 10,
        send: 64 << 10,
    };
    let Some(worker) = start_with(listen, Stalling { stalled: false }, |c| {
        c.socket_buffers = small;
    }) else {
        return;
    };
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // While the worker sleeps on the first datagram, 20 MB arrive for a 64 KiB buffer.
    client.send_to(b"wake", listen).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let datagram = vec![0u8; 1000];
    for _ in 0..20_000 {
        let _ = client.send_to(&datagram, listen);
    }
    wait_for("the kernel's drops in the worker's counters", || {
        load(&worker.stats.socket_drops) > 0
    });
    let page = exporter::render(&sessions(), std::slice::from_ref(&worker.stats), None);
    assert!(
        sample(&page, "ferry_worker_socket_drops_total{worker=\"0\"}") > 0,
        "{page}"
    );
    let stats = worker.stop();
    let (received, dropped) = (load(&stats.rx_packets), load(&stats.socket_drops));
    assert!(
        received + dropped <= 20_001,
        "{received} received and {dropped} dropped of 20001 sent"
    );
}

#[test]
fn socket_drops_reads_the_kernels_count_for_a_socket() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(socket_drops(&sink), Some(0));
    // Nobody reads the sink: its default buffer overflows long before 20 MB have arrived.
    let datagram = vec![0u8; 1000];
    for _ in 0..20_000 {
        let _ = client.send_to(&datagram, sink.local_addr().unwrap());
    }
    let drops = socket_drops(&sink).unwrap();
    assert!(drops > 10_000, "only {drops} drops counted");
}
