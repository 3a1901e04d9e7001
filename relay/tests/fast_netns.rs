//! The XDP fast path with real traffic: the `ferry-relay` process in a namespace, peers in
//! another, over veth. Peers talk while the relay's sockets see nothing of their DATA; the
//! datagrams a receiver gets are the same, byte for byte and from the same address, as the
//! io_uring path delivers; a NAT rebind moves the session's entry and a close removes it; a
//! flow that only the fast path carries keeps its session alive, and once it stops the reaper
//! removes the session; a flow over its rate is cut to it.
//!
//! Needs root (namespaces, the XDP guard), so every test is `#[ignore]`d.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_core::proof::SlotKeys;
use ferry_core::token::MintedToken;
use ferry_core::wire::{self, BindFields, CloseReason, MAX_DATAGRAM, Packet, Slot};
use ferry_relay::xdp::{Guard, Mode};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::{metric, sum_metric};
use ferry_testkit::netns::{Topology, in_ns};
use ferry_testkit::peers::{peer_pair, talk};
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ferry_testkit::skip;

const PORT: u16 = 7000;
const ADMIN_PORT: u16 = 9478;

/// A topology set up for the fast path: forwarding on the relay's veth (the FIB lookup needs
/// it), an XDP program on the peers' veth (a veth delivers frames that an XDP program on its
/// peer sent back only then: an unconfigured guard, which passes everything), and checksums
/// computed in full by the peers' side (no partial checksum to pass on). The guard is
/// returned: dropping it detaches it.
fn topology() -> (Topology, Guard) {
    let topo = forwarding_topology();
    let (peers_ns, peers_if) = (topo.peers_ns.as_str(), topo.peers_if.as_str());
    run(&[
        "ip",
        "netns",
        "exec",
        peers_ns,
        "ethtool",
        "-K",
        peers_if,
        "tx-checksumming",
        "off",
    ]);
    let mut pass = Guard::load(16).unwrap();
    in_ns(peers_ns, || pass.attach(peers_if, Mode::Native).unwrap()).unwrap();
    (topo, pass)
}

/// The namespaces, with forwarding on at the relay's veth (the FIB lookup needs it) and the
/// peers' veth as `ip link add` makes it.
fn forwarding_topology() -> Topology {
    let topo = Topology::new().unwrap();
    for family in ["ipv4", "ipv6"] {
        run(&[
            "ip",
            "netns",
            "exec",
            &topo.relay_ns,
            "sysctl",
            "-qw",
            &format!("net.{family}.conf.{}.forwarding=1", topo.relay_if),
        ]);
    }
    topo
}

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{args:?}");
}

fn relay_config(auth: &Authority, topo: &Topology, extra: &str) -> RelayConfig {
    RelayConfig::native_in(topo, vec![auth.gateway_key()], PORT, ADMIN_PORT, extra).unwrap()
}

fn start(auth: &Authority, topo: &Topology, extra: &str) -> RelayProcess {
    let config = relay_config(auth, topo, extra);
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-relay"));
    RelayProcess::start(bin, &auth.relay_key, &config).unwrap()
}

/// The metrics page, scraped inside the relay's namespace.
fn scrape(topo: &Topology) -> String {
    let script = format!(
        "import urllib.request,sys\n\
         sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}/metrics', timeout=5).read().decode())\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.relay_ns, "python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// DATA the fast path sent back out of the veth it came in on: by `XDP_REDIRECT`, as on every
/// veth.
const FAST_BACK: &str = "ferry_xdp_packets_total{action=\"redirect\",reason=\"fast_path\"}";

/// Datagrams the relay's workers received from their sockets.
fn socket_rx(page: &str) -> u64 {
    sum_metric(page, "ferry_worker_rx_packets_total")
}

/// A slot bound by hand on a plain socket in the peers' namespace, to send and receive raw
/// relay datagrams.
struct Slotted {
    socket: UdpSocket,
    session: u64,
}

impl Slotted {
    fn bind(
        topo: &Topology,
        auth: &Authority,
        relay: SocketAddr,
        from: IpAddr,
        session: u64,
        slot: Slot,
    ) -> Self {
        let socket = topo.peer_socket(SocketAddr::new(from, 0)).unwrap();
        let token = auth.mint(session, slot, 600).unwrap();
        bind(&socket, relay, session, &token);
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Slotted { socket, session }
    }

    fn data(&self, body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = wire::encode_data(&mut buf, self.session, body).unwrap();
        buf.truncate(n);
        buf
    }

    /// The next datagram within `wait`, and where it came from.
    fn recv(&self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, from)) = self.socket.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    }

    /// Drains whatever is queued.
    fn drain(&self) {
        while self.recv(Duration::from_millis(100)).is_some() {}
    }
}

/// BINDs `token` from `socket` through the CHALLENGE; panics unless acknowledged.
fn bind(socket: &UdpSocket, relay: SocketAddr, session: u64, token: &MintedToken) {
    let keys = SlotKeys::derive(&token.slot_secret);
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut out, mut inbuf) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut cookie = [0u8; 16];
    for seq in 1..=2u64 {
        let fields = BindFields {
            slot: token.claims.slot,
            bind_seq: seq,
            cookie,
            token: &token.bytes,
        };
        let n = wire::encode_bind(&mut out, session, &fields, |m| keys.peer.mac(m)).unwrap();
        socket.send_to(&out[..n], relay).unwrap();
        let (len, _) = socket.recv_from(&mut inbuf).unwrap();
        match wire::parse(&inbuf[..len]).unwrap() {
            Packet::Challenge(c) => cookie = *c.cookie(),
            Packet::BindAck(_) => return,
            other => panic!("unexpected answer to a BIND: {other:?}"),
        }
    }
    panic!("no BIND-ACK");
}

/// Polls `page` until `done` holds, for at most `within`.
fn wait_for(topo: &Topology, within: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let page = scrape(topo);
        if done(&page) || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[cfg_attr(
    not(ferry_skip_ebpf),
    ignore = "needs root: network namespaces, the XDP guard"
)]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn peers_talk_through_the_fast_path_and_get_what_the_io_uring_path_delivers() {
    skip::require_root("fast_netns");
    let (topo, _pass) = topology();
    let auth = Authority::new().unwrap();
    let relay = start(&auth, &topo, "");
    let log = relay.log_text();
    assert!(log.contains("XDP fast path active"), "{log}");
    let relay_v4 = SocketAddr::new(topo.relay_v4().into(), PORT);
    let relay_v6 = SocketAddr::new(topo.relay_v6().into(), PORT);
    let at = |ip: IpAddr| topo.peer_socket(SocketAddr::new(ip, 0)).unwrap();

    // Two IPv4 peers and two IPv6 peers: bind, Noise handshake, talk.
    let (mut a, mut b) = peer_pair(
        &auth,
        0x5001,
        relay_v4,
        at(topo.peer_v4(2).into()),
        at(topo.peer_v4(3).into()),
    )
    .unwrap();
    a.bind(Duration::from_secs(5)).unwrap();
    b.bind(Duration::from_secs(5)).unwrap();
    talk(&mut a, &mut b, 5).unwrap();
    let (mut c, mut d) = peer_pair(
        &auth,
        0x5002,
        relay_v6,
        at(topo.peer_v6(2).into()),
        at(topo.peer_v6(3).into()),
    )
    .unwrap();
    c.bind(Duration::from_secs(5)).unwrap();
    d.bind(Duration::from_secs(5)).unwrap();
    talk(&mut c, &mut d, 5).unwrap();

    // Then 100 messages each way on each pair: the relay's sockets stay (nearly) flat, the
    // fast path carries them, and the forwarded totals count them.
    let before = scrape(&topo);
    for i in 0..100 {
        let msg = format!("fast {i}");
        for (x, y) in [(&mut a, &mut b), (&mut c, &mut d)] {
            x.send(msg.as_bytes()).unwrap();
            assert_eq!(
                y.recv_message(Duration::from_secs(5)).unwrap(),
                msg.as_bytes()
            );
            y.send(msg.as_bytes()).unwrap();
            assert_eq!(
                x.recv_message(Duration::from_secs(5)).unwrap(),
                msg.as_bytes()
            );
        }
    }
    let after = scrape(&topo);
    let fast = metric(&after, FAST_BACK) - metric(&before, FAST_BACK);
    assert!(fast >= 400, "the fast path carried {fast} of 400");
    let rx = socket_rx(&after) - socket_rx(&before);
    assert!(
        rx < 40,
        "the relay's sockets received {rx} datagrams meanwhile"
    );
    let forwarded = metric(&after, "ferry_forwarded_packets_total")
        - metric(&before, "ferry_forwarded_packets_total");
    assert!(forwarded >= 400, "forwarded total moved by {forwarded}");
    assert!(
        metric(&after, "ferry_xdp_fast_forwarded_bytes_total") > 0,
        "{after}"
    );
    assert!(after.contains(&format!(
        "ferry_xdp_fast_path_active{{interface=\"{}\"}} 1",
        topo.relay_if
    )));

    // NAT rebinding: A moves; its REBIND moves the entry, and the fast path follows.
    let before = scrape(&topo);
    a.set_socket(at(topo.peer_v4(7).into()));
    assert!(a.bind(Duration::from_secs(5)).unwrap());
    for _ in 0..10 {
        a.send(b"from my new address").unwrap();
        assert_eq!(
            b.recv_message(Duration::from_secs(5)).unwrap(),
            b"from my new address"
        );
        b.send(b"got it").unwrap();
        assert_eq!(a.recv_message(Duration::from_secs(5)).unwrap(), b"got it");
    }
    let after = scrape(&topo);
    assert!(metric(&after, FAST_BACK) - metric(&before, FAST_BACK) >= 19);

    // Close: both entries go, and B's DATA dies in the driver as for any unknown session.
    c.close().unwrap();
    let before = wait_for(&topo, Duration::from_secs(5), |p| {
        metric(p, "ferry_sessions_closed_total") >= 1
    });
    let unknown = "ferry_xdp_packets_total{action=\"drop\",reason=\"unknown_session\"}";
    d.send(b"anyone there?").unwrap();
    let after = wait_for(&topo, Duration::from_secs(5), |p| {
        metric(p, unknown) > metric(&before, unknown)
    });
    assert_eq!(metric(&after, unknown), metric(&before, unknown) + 1);

    // The same raw datagrams through both paths: the receiver gets the same bytes from the
    // same address either way.
    let mut received = Vec::new();
    for (round, fast_path) in [(0u64, true), (1, false)] {
        if !fast_path {
            std::fs::write(
                relay.config_path(),
                relay_config(&auth, &topo, "fast_path = false\n").text(),
            )
            .unwrap();
            relay.signal("HUP").unwrap();
            let page = wait_for(&topo, Duration::from_secs(5), |p| {
                p.contains(&format!(
                    "ferry_xdp_fast_path_active{{interface=\"{}\"}} 0",
                    topo.relay_if
                ))
            });
            assert!(page.contains("fast_path_active"), "{page}");
        }
        for (relay_addr, ip_a, ip_b) in [
            (relay_v4, topo.peer_v4(4).into(), topo.peer_v4(5).into()),
            (relay_v6, topo.peer_v6(4).into(), topo.peer_v6(5).into()),
        ] {
            let session = 0x6000 + round * 2 + u64::from(relay_addr.is_ipv6());
            let x = Slotted::bind(&topo, &auth, relay_addr, ip_a, session, Slot::A);
            let y = Slotted::bind(&topo, &auth, relay_addr, ip_b, session, Slot::B);
            x.drain();
            let before = scrape(&topo);
            let mut got = Vec::new();
            for len in [1usize, 100, 1400] {
                let body: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
                let sent = x.data(&body);
                x.socket.send_to(&sent, relay_addr).unwrap();
                let (bytes, from) = y.recv(Duration::from_secs(5)).expect("forwarded");
                assert_eq!(bytes, sent, "the datagram arrives unchanged");
                assert_eq!(from, relay_addr, "from the address B bound to");
                // Session ids differ between rounds; the rest must be equal.
                got.push((bytes[..8].to_vec(), bytes[16..].to_vec(), from));
            }
            let after = scrape(&topo);
            let fast = metric(&after, FAST_BACK) - metric(&before, FAST_BACK);
            if fast_path {
                assert_eq!(fast, 3, "the fast path carried them");
            } else {
                assert_eq!(fast, 0, "the io_uring path carried them");
            }
            received.push(got);
        }
    }
    assert_eq!(
        received[0], received[2],
        "IPv4: the same through both paths"
    );
    assert_eq!(
        received[1], received[3],
        "IPv6: the same through both paths"
    );
    let log = relay.log_text();
    assert!(log.contains("XDP fast path not active"), "{log}");
}

#[test]
#[cfg_attr(
    not(ferry_skip_ebpf),
    ignore = "needs root: network namespaces, the XDP guard"
)]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn an_xdp_only_flow_stays_alive_is_held_to_its_rate_and_is_reaped_when_it_stops() {
    skip::require_root("fast_netns");
    let (topo, _pass) = topology();
    let auth = Authority::new().unwrap();
    // A 5 s idle timeout, and a rate of 50,000 bytes a second per slot.
    let relay = start(
        &auth,
        &topo,
        "\n[limits]\nidle_timeout_secs = 5\ndefault_session_rate = 50000\n",
    );
    let relay_v4 = SocketAddr::new(topo.relay_v4().into(), PORT);
    let x = Slotted::bind(
        &topo,
        &auth,
        relay_v4,
        topo.peer_v4(2).into(),
        0x7001,
        Slot::A,
    );
    let y = Slotted::bind(
        &topo,
        &auth,
        relay_v4,
        topo.peer_v4(3).into(),
        0x7001,
        Slot::B,
    );
    x.drain();
    y.drain();

    // Both sides send a small datagram every 250 ms for 8 s, longer than the idle timeout:
    // all of it through the fast path, and the session stays.
    let before = scrape(&topo);
    let (from_x, from_y) = (x.data(b"x"), y.data(b"y"));
    let end = Instant::now() + Duration::from_secs(8);
    let mut last_y_got = Instant::now();
    while Instant::now() < end {
        x.socket.send_to(&from_x, relay_v4).unwrap();
        y.socket.send_to(&from_y, relay_v4).unwrap();
        if let Some((bytes, _)) = y.recv(Duration::from_millis(250))
            && bytes == from_x
        {
            last_y_got = Instant::now();
        }
        x.drain();
    }
    assert!(
        last_y_got.elapsed() < Duration::from_secs(2),
        "B stopped receiving {:?} ago",
        last_y_got.elapsed()
    );
    let after = scrape(&topo);
    assert!(metric(&after, FAST_BACK) - metric(&before, FAST_BACK) >= 40);
    assert!(
        socket_rx(&after) - socket_rx(&before) < 10,
        "the relay's sockets saw the flow"
    );
    assert_eq!(metric(&after, "ferry_sessions_active"), 1, "still held");
    assert_eq!(metric(&after, "ferry_reaped_total"), 0);

    // Over budget: A blasts 1,000-byte datagrams for 2 s; B gets at most the burst (a
    // second's worth) plus the rate, the rest dies in the driver.
    let blast = x.data(&[0x5a; 1000 - 16]);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        if x.socket.send_to(&blast, relay_v4).is_ok() {
            sent += 1;
        }
        if sent.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut got = 0u64;
    while let Some((bytes, _)) = y.recv(Duration::from_millis(300)) {
        if bytes == blast {
            got += bytes.len() as u64;
        }
    }
    let allowed = 50_000.0 * (1.0 + elapsed) + 2_000.0;
    assert!(
        (got as f64) <= allowed * 1.05,
        "B got {got} bytes in {elapsed:.2} s; the budget allows {allowed:.0}"
    );
    assert!(got > 0, "some got through");
    let page = scrape(&topo);
    assert!(
        metric(
            &page,
            "ferry_xdp_packets_total{action=\"drop\",reason=\"fast_over_budget\"}"
        ) > 0,
        "sent {sent}"
    );

    // Silence: the reaper removes both slots within the idle timeout and a pass, and tells
    // each peer why.
    let page = wait_for(&topo, Duration::from_secs(10), |p| {
        metric(p, "ferry_sessions_active") == 0
    });
    assert_eq!(metric(&page, "ferry_sessions_active"), 0, "reaped");
    let closed = |s: &Slotted| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let Some((bytes, _)) = s.recv(Duration::from_millis(200)) else {
                continue;
            };
            if let Ok(Packet::Close(c)) = wire::parse(&bytes) {
                return Some(c.reason());
            }
        }
        None
    };
    assert_eq!(closed(&y), Some(CloseReason::Idle));
    assert_eq!(closed(&x), Some(CloseReason::Idle));
    drop(relay);
}

/// The number of frames the guard counted under fast-path `reason` (`pass` action).
fn fast_pass(page: &str, reason: &str) -> u64 {
    metric(
        page,
        &format!("ferry_xdp_packets_total{{action=\"pass\",reason=\"{reason}\"}}"),
    )
}

/// Binds a fresh pair of IPv4 peers as session `session`, runs their Noise handshake and
/// exchanges `messages` more each way; every one must arrive.
fn pair_talks(topo: &Topology, auth: &Authority, session: u64, hosts: [u8; 2], messages: usize) {
    let relay = SocketAddr::new(topo.relay_v4().into(), PORT);
    let at = |host: u8| {
        topo.peer_socket(SocketAddr::new(topo.peer_v4(host).into(), 0))
            .unwrap()
    };
    let (mut a, mut b) = peer_pair(auth, session, relay, at(hosts[0]), at(hosts[1])).unwrap();
    a.bind(Duration::from_secs(5)).unwrap();
    b.bind(Duration::from_secs(5)).unwrap();
    if let Err(e) = talk(&mut a, &mut b, 5) {
        let page = scrape(topo);
        let xdp: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("ferry_xdp_packets_total") && !l.ends_with(" 0"))
            .collect();
        panic!("session {session:#x}: {e:#}\n{}", xdp.join("\n"));
    }
    for i in 0..messages {
        let msg = format!("message {i}");
        a.send(msg.as_bytes()).unwrap();
        assert_eq!(
            b.recv_message(Duration::from_secs(5)).unwrap(),
            msg.as_bytes()
        );
        b.send(msg.as_bytes()).unwrap();
        assert_eq!(
            a.recv_message(Duration::from_secs(5)).unwrap(),
            msg.as_bytes()
        );
    }
}

#[test]
#[cfg_attr(
    not(ferry_skip_ebpf),
    ignore = "needs root: network namespaces, the XDP guard"
)]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn on_a_veth_left_as_created_nothing_is_lost_and_the_fast_path_takes_what_it_safely_can() {
    skip::require_root("fast_netns");
    // The peers' veth as `ip link add` makes it: no XDP program and GRO off, so it takes no
    // XDP frames, and checksum offload on, so the peers' datagrams carry partial checksums.
    // Forwarding is on at the relay, as for the kernel's own forwarding.
    let topo = forwarding_topology();
    let auth = Authority::new().unwrap();
    let sends = format!(
        "ferry_xdp_fast_path_sends{{interface=\"{}\"}}",
        topo.relay_if
    );
    let active = format!(
        "ferry_xdp_fast_path_active{{interface=\"{}\"}}",
        topo.relay_if
    );

    let peers_ethtool = |setting: &str| {
        run(&[
            "ip",
            "netns",
            "exec",
            &topo.peers_ns,
            "ethtool",
            "-K",
            &topo.peers_if,
            setting,
            if setting == "gro" { "on" } else { "off" },
        ]);
    };

    {
        // The relay finds out that its veth's peer would drop what XDP sends it: the fast
        // path takes DATA in there but sends nothing out. The partial checksums go to the
        // relay first, which completes them, and every message arrives.
        let relay = start(&auth, &topo, "");
        let log = relay.log_text();
        assert!(log.contains("takes no XDP frames"), "{log}");
        pair_talks(&topo, &auth, 0x5101, [2, 3], 20);
        let page = scrape(&topo);
        assert_eq!(metric(&page, &active), 1, "{page}");
        assert_eq!(metric(&page, &sends), 0, "{page}");
        assert!(fast_pass(&page, "fast_partial_checksum") >= 40, "{page}");

        // Complete checksums: now it is the way out that sends them to the relay, and again
        // every message arrives.
        peers_ethtool("tx-checksumming");
        pair_talks(&topo, &auth, 0x5102, [4, 5], 20);
        let page = scrape(&topo);
        assert!(fast_pass(&page, "fast_interface") >= 40, "{page}");
        assert_eq!(metric(&page, FAST_BACK), 0, "{page}");
    }

    // GRO on at the peer, and a restart: the fast path sends out of the veth, and carries the
    // messages.
    peers_ethtool("gro");
    let relay = start(&auth, &topo, "");
    let log = relay.log_text();
    assert!(log.contains("XDP fast path active"), "{log}");
    pair_talks(&topo, &auth, 0x5103, [6, 7], 20);
    let page = scrape(&topo);
    assert_eq!(metric(&page, &sends), 1, "{page}");
    assert!(metric(&page, FAST_BACK) >= 40, "{page}");
}
