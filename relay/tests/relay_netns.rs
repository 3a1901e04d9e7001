//! The real `ferry-relay` process in a network namespace, peers in another, over veth:
//! binds with tokens, the end-to-end handshake and data over IPv4 and IPv6, strangers and
//! replays that get nothing forwarded (and the drop counters that say so), a NAT rebind, a
//! SIGHUP with a bad config that keeps the old one, and metrics scraped by a real HTTP client.
//!
//! Needs root (namespaces, the XDP guard), so every test is `#[ignore]`d:
//! `cargo test -- --include-ignored` runs them.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_common::xdp::Counter;
use ferry_core::proof::SlotKeys;
use ferry_core::wire::{self, BindFields, MAX_DATAGRAM, Packet, RejectReason, Slot};
use ferry_peer::udp::UdpPeer;
use ferry_relay::xdp::frame::Frame;
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::metric;
use ferry_testkit::monitoring::{self, Exporter};
use ferry_testkit::netns::{self, Topology};
use ferry_testkit::peers::{peer_pair, talk};
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ferry_testkit::skip;

const PORT: u16 = 7000;
const ADMIN_PORT: u16 = 9477;

/// The relay in `topo`'s relay namespace, on IPv4 and IPv6, two workers, its XDP guard
/// native on the veth, with `xdp_extra` appended to the `[xdp]` section (more lines, or more
/// sections), logging everything to its file.
fn relay_config(auth: &Authority, topo: &Topology, xdp_extra: &str) -> RelayConfig {
    RelayConfig {
        // The most verbose level: even then nothing secret may appear.
        log_filter: "trace".into(),
        ..RelayConfig::native_in(topo, vec![auth.gateway_key()], PORT, ADMIN_PORT, xdp_extra)
            .unwrap()
    }
}

/// Runs a Python snippet in the relay's namespace: a real HTTP client for the admin listener.
fn http_get(ns: &str, path: &str) -> (u16, String) {
    let script = format!(
        "import urllib.request, urllib.error, sys\n\
         try:\n    r = urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}{path}', timeout=5)\n    \
         print(r.status); sys.stdout.write(r.read().decode())\n\
         except urllib.error.HTTPError as e:\n    print(e.code); sys.stdout.write(e.read().decode())\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or(("0", ""));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// The relay process and the namespace it runs in.
struct Relay {
    process: RelayProcess,
    ns: String,
}

fn start_relay(auth: &Authority, topo: &Topology, xdp_extra: &str) -> Relay {
    let config = relay_config(auth, topo, xdp_extra);
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-relay"));
    Relay {
        process: RelayProcess::start(bin, &auth.relay_key, &config).unwrap(),
        ns: topo.relay_ns.clone(),
    }
}

fn scrape(relay: &Relay) -> String {
    let (status, page) = http_get(&relay.ns, "/metrics");
    assert_eq!(status, 200);
    page
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
fn the_relay_process_serves_peers_and_refuses_everyone_else() {
    skip::require_root("relay_netns");
    let topo = Topology::new().unwrap();
    let auth = Authority::new().unwrap();
    let relay = start_relay(&auth, &topo, "");
    // Ready, the relay holds none of the capabilities it needed to start, in any thread (the
    // binds, reloads and scrapes below then show the guard's maps still work without them).
    assert_start_caps_dropped(relay.process.pid());
    let relay_v4 = SocketAddr::new(topo.relay_v4().into(), PORT);
    let relay_v6 = SocketAddr::new(topo.relay_v6().into(), PORT);
    let at = |ip: Ipv4Addr| topo.peer_socket(SocketAddr::new(ip.into(), 0)).unwrap();

    // Two IPv4 peers: bind, handshake, talk.
    let (mut a, mut b) = peer_pair_in(
        &auth,
        &topo,
        0x1001,
        relay_v4,
        topo.peer_v4(2),
        topo.peer_v4(3),
    );
    assert!(!a.bind(Duration::from_secs(5)).unwrap());
    assert!(b.bind(Duration::from_secs(5)).unwrap());
    talk(&mut a, &mut b, 20).unwrap();

    // Two IPv6 peers in their own session.
    let (mut c, mut d) = peer_pair_in(
        &auth,
        &topo,
        0x2002,
        relay_v6,
        topo.peer_v6(2),
        topo.peer_v6(3),
    );
    c.bind(Duration::from_secs(5)).unwrap();
    d.bind(Duration::from_secs(5)).unwrap();
    talk(&mut c, &mut d, 20).unwrap();

    let before = scrape(&relay);
    let forwarded_before = metric(&before, "ferry_forwarded_packets_total");
    // Each of the four binds was a BIND without a cookie, answered with a CHALLENGE, then the
    // BIND with its cookie, which the guard verified with the window keys the relay wrote.
    assert_eq!(
        metric(
            &before,
            "ferry_xdp_packets_total{action=\"pass\",reason=\"relay_cookie\"}"
        ),
        4
    );

    // A stranger sends DATA for session 0x1001 from its own address: nothing reaches B.
    let stranger = at(topo.peer_v4(5));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = wire::encode_data(&mut buf, 0x1001, b"let me in").unwrap();
    for _ in 0..10 {
        stranger.send_to(&buf[..n], relay_v4).unwrap();
    }
    // Garbage, and a token for another session presented for this one.
    stranger
        .send_to(b"GET / HTTP/1.1\r\n\r\n", relay_v4)
        .unwrap();
    let other = auth.mint(0x3003, Slot::A, 600).unwrap();
    let reject = bind_exchange(&stranger, relay_v4, 0x1001, &other);
    assert!(
        matches!(reject, Some((Some(RejectReason::WrongSession), _))),
        "{reject:?}"
    );
    // The refusal is logged as a security event, with its source and reason.
    let source = stranger.local_addr().unwrap().to_string();
    let line = wait_for_log_line(&relay, |l| {
        l.contains("bind_refused") && l.contains("wrong_session")
    });
    assert!(line.contains(&source), "{line}");
    assert!(line.contains("0000000000001001"), "{line}");
    // A valid BIND captured on the wire and replayed verbatim from elsewhere only earns a
    // CHALLENGE: the cookie inside it belongs to the original sender's address.
    let victim = at(topo.peer_v4(6));
    let token = auth.mint(0x4004, Slot::A, 600).unwrap();
    let Some((None, captured)) = bind_exchange(&victim, relay_v4, 0x4004, &token) else {
        panic!("the victim's bind should succeed");
    };
    stranger.send_to(&captured, relay_v4).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (len, _) = stranger.recv_from(&mut buf).unwrap();
    assert!(matches!(wire::parse(&buf[..len]), Ok(Packet::Challenge(_))));

    // B got nothing of all that; A and B still talk.
    a.send(b"still here").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"still here"
    );

    let after = scrape(&relay);
    assert_eq!(
        metric(&after, "ferry_forwarded_packets_total"),
        forwarded_before + 1,
        "only A's message was forwarded"
    );
    let drops = |page: &str, reason: &str| {
        metric(page, &format!("ferry_drops_total{{reason=\"{reason}\"}}"))
    };
    // The DATA from strangers naming A and B's session died in the driver too: the guard
    // knows where the session's slots are bound.
    assert_eq!(
        drops(&after, "data_unbound") - drops(&before, "data_unbound"),
        0
    );
    let xdp_unbound = "ferry_xdp_packets_total{action=\"drop\",reason=\"unbound_source\"}";
    assert_eq!(
        metric(&after, xdp_unbound) - metric(&before, xdp_unbound),
        10
    );
    // The stray HTTP request never reached the relay: the XDP guard dropped it in the veth
    // driver, counted by the rule it broke (it does not start with Ferry's magic).
    assert_eq!(drops(&after, "malformed") - drops(&before, "malformed"), 0);
    assert_eq!(
        metric(&after, "ferry_malformed_total{rule=\"bad_magic\"}"),
        0
    );
    let xdp = |page: &str, action: &str, reason: &str| {
        metric(
            page,
            &format!("ferry_xdp_packets_total{{action=\"{action}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(xdp(&after, "drop", "malformed_bad_magic"), 1);
    assert!(xdp(&after, "pass", "relay") > xdp(&before, "pass", "relay"));
    // Forwarding is off in the relay's namespace, so the fast path is active nowhere: DATA is
    // the relay's, counted as such, not as a fast-path fallback on every datagram.
    for fallback in Counter::FAST_FALLBACKS {
        let (action, reason) = fallback.labels();
        assert_eq!(xdp(&after, action, reason), 0, "{reason}");
    }
    assert_eq!(metric(&after, "ferry_xdp_enabled"), 1);
    // Every relay metric the alert rules and the dashboard in monitoring/ use is on the page.
    assert_eq!(
        monitoring::missing_from(&after, Exporter::Relay),
        Vec::<String>::new(),
        "monitoring/ uses relay metrics this page lacks"
    );
    // And docs/operations.md names every family on it.
    assert_eq!(
        monitoring::undocumented(&after, &["operations.md"]),
        Vec::<String>::new(),
        "relay metrics docs/operations.md does not name"
    );
    assert!(
        after.contains(&format!(
            "ferry_xdp_attached{{interface=\"{}\",mode=\"native\"}} 1",
            topo.relay_if
        )),
        "the guard reports where it runs"
    );
    let rejected = |page: &str, reason: &str| {
        metric(
            page,
            &format!("ferry_binds_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(rejected(&after, "wrong_session"), 1);
    assert!(metric(&after, "ferry_sessions_active") >= 3);
    assert!(after.contains("ferry_worker_rx_packets_total{worker=\"1\"}"));

    // A REBIND without the slot secret (the attacker has A's session id and slot, and gets a
    // cookie for its own address) is refused; A's binding does not move.
    let hijacker = at(topo.peer_v4(9));
    hijacker
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut cookie = [0u8; 16];
    for seq in [u64::MAX - 1, u64::MAX] {
        let fields = wire::RebindFields {
            slot: Slot::A,
            bind_seq: seq,
            cookie,
        };
        let n = wire::encode_rebind(&mut buf, 0x1001, &fields, |_| [0x77; 16]).unwrap();
        hijacker.send_to(&buf[..n], relay_v4).unwrap();
        let (len, _) = hijacker.recv_from(&mut buf).unwrap();
        match wire::parse(&buf[..len]).unwrap() {
            Packet::Challenge(c) => cookie = *c.cookie(),
            Packet::Reject(r) => assert_eq!(r.reason(), RejectReason::BadProof),
            other => panic!("unexpected answer to a forged REBIND: {other:?}"),
        }
    }
    a.send(b"still mine").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"still mine"
    );
    b.send(b"to the real A").unwrap();
    assert_eq!(
        a.recv_message(Duration::from_secs(5)).unwrap(),
        b"to the real A"
    );

    // NAT rebinding: A's address changes; a REBIND with proof moves the binding.
    a.set_socket(at(topo.peer_v4(7)));
    assert!(a.bind(Duration::from_secs(5)).unwrap());
    a.send(b"from my new address").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"from my new address"
    );
    b.send(b"got it").unwrap();
    assert_eq!(a.recv_message(Duration::from_secs(5)).unwrap(), b"got it");
    assert_eq!(metric(&scrape(&relay), "ferry_rebinds_accepted_total"), 1);

    // SIGHUP with a broken config: refused, the old one stays, traffic flows.
    std::fs::write(relay.process.config_path(), "[relay]\nid = 0\n").unwrap();
    hup(&relay);
    a.send(b"after a bad reload").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"after a bad reload"
    );
    // And a good one that tightens a limit applies without dropping the session.
    std::fs::write(
        relay.process.config_path(),
        relay_config(
            &auth,
            &topo,
            "\n[limits]\nmax_sessions = 50\nreplay_cache_capacity = 100\n",
        )
        .text(),
    )
    .unwrap();
    hup(&relay);
    a.send(b"after a good reload").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"after a good reload"
    );
    let text = relay.process.log_text();
    assert!(text.contains("reload refused"), "{text}");
    assert!(text.contains("config reloaded"), "{text}");
    let page = scrape(&relay);
    assert_eq!(
        metric(&page, "ferry_config_reloads_total{result=\"refused\"}"),
        1,
        "{page}"
    );
    assert_eq!(
        metric(&page, "ferry_config_reloads_total{result=\"applied\"}"),
        1,
        "{page}"
    );
    // No secrets in the log: not a token, not a slot secret.
    assert!(!text.contains(&base64(&token.bytes)), "a token was logged");
    assert!(
        !text.contains(&*token.slot_secret.to_base64()),
        "a slot secret was logged"
    );

    // Unknown paths and methods get proper errors.
    assert_eq!(http_get(&relay.ns, "/nope").0, 404);
    assert_eq!(http_get(&relay.ns, "/healthz").0, 200);
}

/// Asserts that no thread of process `pid` has CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21),
/// CAP_PERFMON (38) or CAP_BPF (39) in its effective or permitted set (the relay drops them
/// after start on Linux 6.5 and later; this host's kernel is newer).
fn assert_start_caps_dropped(pid: u32) {
    let start_only: u64 = (1 << 12) | (1 << 21) | (1 << 38) | (1 << 39);
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A short-lived thread (a reload or a scrape's helper) may end between the listing
        // and the read; a thread that is gone holds nothing.
        let status = match std::fs::read_to_string(task.unwrap().path().join("status")) {
            Ok(status) => status,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading a relay thread's status: {e}"),
        };
        for set in ["CapEff:", "CapPrm:"] {
            let line = status.lines().find(|l| l.starts_with(set)).unwrap();
            let bits = u64::from_str_radix(line[set.len()..].trim(), 16).unwrap();
            assert_eq!(
                bits & start_only,
                0,
                "a relay thread kept a start-only capability: {line}"
            );
        }
        threads += 1;
    }
    assert!(
        threads >= 3,
        "the main thread, two workers and the admin listener"
    );
}

fn hup(relay: &Relay) {
    relay.process.signal("HUP").unwrap();
    std::thread::sleep(Duration::from_millis(500));
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Two peers whose sockets live in the peers' namespace.
fn peer_pair_in(
    auth: &Authority,
    topo: &Topology,
    session: u64,
    relay: SocketAddr,
    ip_a: impl Into<IpAddr>,
    ip_b: impl Into<IpAddr>,
) -> (UdpPeer, UdpPeer) {
    let at = |ip: IpAddr| topo.peer_socket(SocketAddr::new(ip, 0)).unwrap();
    peer_pair(auth, session, relay, at(ip_a.into()), at(ip_b.into())).unwrap()
}

/// Sends one UDP datagram over IPv4 with a forged source address, from a raw socket in
/// namespace `ns`, built by the XDP tests' frame builder without its Ethernet header (the
/// kernel fills in the IP checksum; the UDP checksum is left out, which IPv4 allows).
fn send_spoofed_v4(ns: &str, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let mut frame = Frame::udp(IpAddr::V4(*src.ip()), IpAddr::V4(*dst.ip()), dst.port());
    frame.src_port = src.port();
    let packet = frame.build(payload).split_off(14);
    netns::send_raw_ipv4(ns, *dst.ip(), &packet).unwrap();
}

/// BIND `token` under `session` from `socket`, through the CHALLENGE. Returns the REJECT
/// reason (None if acknowledged) and the final BIND's bytes.
/// The first line of the relay's log that `matches`, waiting up to 5 s for it.
fn wait_for_log_line(relay: &Relay, matches: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = relay.process.log_text().lines().find(|l| matches(l)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no such line in the relay's log:\n{}",
            relay.process.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bind_exchange(
    socket: &UdpSocket,
    relay: SocketAddr,
    session: u64,
    token: &ferry_core::token::MintedToken,
) -> Option<(Option<RejectReason>, Vec<u8>)> {
    let keys = SlotKeys::derive(&token.slot_secret);
    let slot = token.claims.slot;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut out, mut inbuf) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut cookie = [0u8; 16];
    for seq in 1..=2u64 {
        let fields = BindFields {
            slot,
            bind_seq: seq,
            cookie,
            token: &token.bytes,
        };
        let n = wire::encode_bind(&mut out, session, &fields, |m| keys.peer.mac(m)).unwrap();
        socket.send_to(&out[..n], relay).unwrap();
        let (len, _) = socket.recv_from(&mut inbuf).ok()?;
        match wire::parse(&inbuf[..len]).ok()? {
            Packet::Challenge(c) => cookie = *c.cookie(),
            Packet::BindAck(_) => return Some((None, out[..n].to_vec())),
            Packet::Reject(r) => return Some((Some(r.reason()), out[..n].to_vec())),
            _ => return None,
        }
    }
    None
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
fn spoofed_sources_idle_and_expired_bindings_get_nothing() {
    skip::require_root("relay_netns_reaping");
    let topo = Topology::new().unwrap();
    let auth = Authority::new().unwrap();
    let relay = start_relay(
        &auth,
        &topo,
        "\n[limits]\nidle_timeout_secs = 5\nmax_clock_skew_secs = 0\n",
    );
    let relay_v4 = SocketAddr::new(topo.relay_v4().into(), PORT);
    let (mut a, mut b) = peer_pair_in(
        &auth,
        &topo,
        0x5005,
        relay_v4,
        topo.peer_v4(2),
        topo.peer_v4(3),
    );
    a.bind(Duration::from_secs(5)).unwrap();
    b.bind(Duration::from_secs(5)).unwrap();
    talk(&mut a, &mut b, 3).unwrap();

    // Forged sources: a BIND whose CHALLENGE goes to an address nobody answers from, and DATA
    // claiming to come from a host that is not bound. Neither binds nor forwards anything.
    let before = scrape(&relay);
    let forged = SocketAddrV4::new(topo.peer_v4(8), 4444);
    let dst = SocketAddrV4::new(topo.relay_v4(), PORT);
    let token = auth.mint(0x6006, Slot::A, 600).unwrap();
    let keys = SlotKeys::derive(&token.slot_secret);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let fields = BindFields {
        slot: Slot::A,
        bind_seq: 1,
        cookie: [0; 16],
        token: &token.bytes,
    };
    let n = wire::encode_bind(&mut buf, 0x6006, &fields, |m| keys.peer.mac(m)).unwrap();
    send_spoofed_v4(&topo.peers_ns, forged, dst, &buf[..n]);
    let n = wire::encode_data(&mut buf, 0x5005, b"forged").unwrap();
    for _ in 0..5 {
        send_spoofed_v4(&topo.peers_ns, forged, dst, &buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    assert_eq!(
        metric(&after, "ferry_challenges_total") - metric(&before, "ferry_challenges_total"),
        1
    );
    assert_eq!(
        metric(&after, "ferry_sessions_active"),
        1,
        "the forged BIND bound nothing"
    );
    // The forged DATA names a live session from an address none of its slots is bound to:
    // the guard drops it before the relay sees it.
    let unbound = "ferry_xdp_packets_total{action=\"drop\",reason=\"unbound_source\"}";
    assert_eq!(metric(&after, unbound) - metric(&before, unbound), 5);
    assert_eq!(
        metric(&after, "ferry_forwarded_packets_total"),
        metric(&before, "ferry_forwarded_packets_total")
    );

    // Idle: nobody speaks for longer than the 5 s idle timeout; both slots are reaped.
    std::thread::sleep(Duration::from_secs(7));
    let page = scrape(&relay);
    assert_eq!(metric(&page, "ferry_sessions_active"), 0);
    assert_eq!(metric(&page, "ferry_reaped_total"), 2);
    a.send(b"anyone?").unwrap();
    assert!(
        b.recv_message(Duration::from_millis(500)).is_err(),
        "a reaped session forwards nothing"
    );

    // Expired: a session kept busy is still unbound when its tokens expire (skew 0 here).
    let (mut c, mut d) = peer_pair_in(
        &auth,
        &topo,
        0x7007,
        relay_v4,
        topo.peer_v4(4),
        topo.peer_v4(5),
    );
    let short_a = auth.mint(0x7007, Slot::A, 4).unwrap();
    let short_b = auth.mint(0x7007, Slot::B, 4).unwrap();
    for (peer, token, slot) in [(&mut c, &short_a, Slot::A), (&mut d, &short_b, Slot::B)] {
        peer.replace_bind_client(ferry_peer::bind::BindClient::new(
            0x7007,
            slot,
            token.bytes,
            &token.slot_secret,
            1,
        ));
        peer.bind(Duration::from_secs(5)).unwrap();
    }
    // The tokens expire 4 s after minting: keep the slots busy for 2 of those seconds...
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert!(c.keepalive(Duration::from_secs(1)).unwrap());
        assert!(d.keepalive(Duration::from_secs(1)).unwrap());
        std::thread::sleep(Duration::from_millis(400));
    }
    // ...then, still well inside the 5 s idle timeout, wait for the expiry and a reap pass.
    while started.elapsed() < Duration::from_millis(4500) {
        // Past 3 s the token may have expired: no echo, or the relay's CLOSE (`EXPIRED`)
        // answering the KEEPALIVE, are both what comes next.
        let alive = c.keepalive(Duration::from_secs(1));
        assert!(
            matches!(alive, Ok(true)) || started.elapsed() > Duration::from_secs(3),
            "{alive:?}"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !c.keepalive(Duration::from_millis(500)).unwrap(),
        "the expired binding is gone"
    );
    assert_eq!(metric(&scrape(&relay), "ferry_reaped_total"), 4);
}

/// Valid DATA datagrams for session `session` from a source that never bound: well-formed, so
/// only the guard's meter (or, past it, the relay's session lookup) stops them.
fn flood_datagram(session: u64) -> Vec<u8> {
    let mut out = vec![0u8; MAX_DATAGRAM];
    let n = wire::encode_data_header(&mut out, session, 100).unwrap();
    out.truncate(n + 100);
    out
}

/// A well-formed CLOSE for `session`'s slot A whose MAC is wrong: the guard meters it against
/// the source's data rates (a CLOSE may come from any address), the relay drops it as
/// `bad_close`.
fn forged_close(session: u64) -> Vec<u8> {
    let mut out = vec![0u8; MAX_DATAGRAM];
    let fields = wire::CloseFields {
        slot: Slot::A,
        reason: wire::CloseReason::PeerClosed,
        seq: u64::MAX,
    };
    let n = wire::encode_close(&mut out, session, &fields, |_| [0; 16]).unwrap();
    out.truncate(n);
    out
}

/// One flood phase: `flooder` sends forged CLOSEs for A and B's session (as anyone might: a
/// CLOSE is proved by its MAC, not its address) as fast as it can for `secs` while A sends B a
/// message every 5 ms. Returns (flood datagrams that reached the relay, flood datagrams the
/// guard dropped for rate, messages B received of those A sent, seconds the flood lasted).
fn flood_phase(
    relay: &Relay,
    flooder: &UdpSocket,
    relay_addr: SocketAddr,
    a: &mut UdpPeer,
    b: &mut UdpPeer,
    secs: f64,
) -> (u64, u64, (usize, usize), f64) {
    let before = scrape(relay);
    let flood = forged_close(FLOODED_SESSION);
    let mut flood_secs = 0.0;
    let (sent_legit, got_legit) = std::thread::scope(|s| {
        let flooding = s.spawn(|| {
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while Instant::now() < deadline {
                for _ in 0..64 {
                    // ENOBUFS under a full-speed flood is fine: the point is pressure.
                    if flooder.send_to(&flood, relay_addr).is_ok() {
                        sent += 1;
                    }
                }
            }
            (sent, start.elapsed().as_secs_f64())
        });
        let expected = (secs / 0.005) as usize;
        let receiver = s.spawn(move || {
            let mut got = 0usize;
            while got < expected {
                match b.recv_message(Duration::from_secs(2)) {
                    Ok(_) => got += 1,
                    Err(_) => break,
                }
            }
            got
        });
        let mut sent = 0usize;
        let start = Instant::now();
        for i in 0..expected {
            let due = start + Duration::from_millis(5 * i as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            a.send(format!("goodput {i}").as_bytes()).unwrap();
            sent += 1;
        }
        let (flood_sent, elapsed) = flooding.join().unwrap();
        assert!(flood_sent > 0);
        flood_secs = elapsed;
        (sent, receiver.join().unwrap())
    });
    std::thread::sleep(Duration::from_millis(200));
    let after = scrape(relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    let reached = delta("ferry_drops_total{reason=\"bad_close\"}");
    let rate_dropped =
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"rate_data_packets\"}");
    (reached, rate_dropped, (sent_legit, got_legit), flood_secs)
}

/// The session the flood tests bind A and B to.
const FLOODED_SESSION: u64 = 0x3003;

#[test]
#[cfg_attr(
    not(ferry_skip_ebpf),
    ignore = "needs root: network namespaces, the XDP guard"
)]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_xdp_guard_cuts_a_flood_to_its_rate_and_keeps_the_other_session_going() {
    skip::require_root("relay_netns_xdp_flood");
    let topo = Topology::new().unwrap();
    let auth = Authority::new().unwrap();
    let limits = |pps: u32| format!("data_packets_per_second = {pps}\ndata_packet_burst = 200\n");
    let relay = start_relay(&auth, &topo, &limits(2000));
    let relay_v4 = SocketAddr::new(topo.relay_v4().into(), PORT);
    let (mut a, mut b) = peer_pair_in(
        &auth,
        &topo,
        FLOODED_SESSION,
        relay_v4,
        topo.peer_v4(2),
        topo.peer_v4(3),
    );
    assert!(!a.bind(Duration::from_secs(5)).unwrap());
    assert!(b.bind(Duration::from_secs(5)).unwrap());
    talk(&mut a, &mut b, 2).unwrap();
    let flooder = topo
        .peer_socket(SocketAddr::new(topo.peer_v4(4).into(), 0))
        .unwrap();

    // Phase 1: 2000 datagrams a second admitted, burst 200.
    let (reached, dropped, (sent, got), secs) =
        flood_phase(&relay, &flooder, relay_v4, &mut a, &mut b, 2.0);
    eprintln!(
        "flood at 2000/s: {reached} reached the relay, {dropped} dropped by XDP, \
         in {secs:.2} s; goodput {got}/{sent}"
    );
    let allowed = 2000.0 * secs + 200.0;
    assert!(
        (reached as f64) <= allowed * 1.05,
        "the relay saw {reached} flood datagrams; the limit allows {allowed:.0}"
    );
    assert!(
        (reached as f64) >= 2000.0 * secs * 0.5,
        "the meter should admit about its rate, not starve the source: {reached}"
    );
    assert!(
        dropped > 4 * reached,
        "a full-speed flood is several times the rate: {dropped} dropped, {reached} passed"
    );
    assert!(
        got as f64 >= sent as f64 * 0.95,
        "the other session kept its goodput: {got} of {sent}"
    );

    // Malformed datagrams never reach the relay socket: its counters stay flat while the
    // guard's rise.
    let before = scrape(&relay);
    let stray = topo
        .peer_socket(SocketAddr::new(topo.peer_v4(5).into(), 0))
        .unwrap();
    let mut bad = flood_datagram(0x42);
    bad[2] = 9; // version
    for _ in 0..50 {
        stray.send_to(&bad, relay_v4).unwrap();
        stray.send_to(b"\x46\x52", relay_v4).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(delta("ferry_drops_total{reason=\"malformed\"}"), 0);
    let rx = |page: &str| -> u64 {
        page.lines()
            .filter(|l| l.starts_with("ferry_worker_rx_packets_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        rx(&after),
        rx(&before),
        "nothing reached the relay's sockets"
    );
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"malformed_bad_version\"}"),
        50
    );
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"malformed_too_short\"}"),
        50
    );

    // Well-formed DATA for a session the relay does not hold dies in the driver too: the
    // guard's session map follows the relay's tables.
    let before = scrape(&relay);
    let made_up = flood_datagram(0x7777_0000_0000_0001);
    for _ in 0..100 {
        stray.send_to(&made_up, relay_v4).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(
        rx(&after),
        rx(&before),
        "nothing reached the relay's sockets"
    );
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"unknown_session\"}"),
        100
    );

    // So does DATA naming the live session from an address neither of its slots is bound
    // to, while A and B's own DATA passes.
    let before = scrape(&relay);
    let strangers = flood_datagram(FLOODED_SESSION);
    for _ in 0..100 {
        stray.send_to(&strangers, relay_v4).unwrap();
    }
    a.send(b"still here").unwrap();
    assert_eq!(
        b.recv_message(Duration::from_secs(5)).unwrap(),
        b"still here"
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"unbound_source\"}"),
        100
    );
    assert_eq!(delta("ferry_drops_total{reason=\"data_unbound\"}"), 0);

    // A reload changes the limit live: a quarter of the rate, same session, no detach.
    std::fs::write(
        relay.process.config_path(),
        relay_config(&auth, &topo, &limits(500)).text(),
    )
    .unwrap();
    hup(&relay);
    std::thread::sleep(Duration::from_millis(500));
    let (reached, dropped, (sent, got), secs) =
        flood_phase(&relay, &flooder, relay_v4, &mut a, &mut b, 2.0);
    eprintln!(
        "flood at 500/s after SIGHUP: {reached} reached the relay, {dropped} dropped by XDP, \
         in {secs:.2} s; goodput {got}/{sent}"
    );
    let allowed = 500.0 * secs + 200.0;
    assert!(
        (reached as f64) <= allowed * 1.05,
        "after the reload the relay saw {reached} flood datagrams; the limit allows {allowed:.0}"
    );
    assert!((reached as f64) >= 500.0 * secs * 0.5, "{reached}");
    assert!(got as f64 >= sent as f64 * 0.95, "goodput {got} of {sent}");
}

/// A cookie-less BIND (slot 0, a token length of 208 as the body rules want; the token itself
/// does not matter: the answer comes before any check of it) for `session`.
fn spoofed_bind(session: u64) -> Vec<u8> {
    let mut d = ferry_relay::xdp::frame::datagram(
        ferry_common::header::PacketType::Bind,
        session,
        ferry_common::header::BIND_BODY_LEN,
    );
    let body = ferry_common::header::HEADER_LEN;
    d[body + 2..body + 4].copy_from_slice(&208u16.to_be_bytes());
    d
}

/// Sends cookie-less BINDs forged from `sources` addresses of 198.19.`net`.0/24 (round robin)
/// to `relay` from a raw socket in the peers' namespace, for `secs` seconds; returns how many.
fn spoofed_bind_flood(topo: &Topology, relay: SocketAddrV4, sources: u8, secs: f64) -> u64 {
    let payload = spoofed_bind(0x5555_0000_0000_0001);
    let packets: Vec<Vec<u8>> = (1..=sources)
        .map(|host| {
            let src = Ipv4Addr::new(198, 19, topo.net, host);
            let mut frame = Frame::udp(IpAddr::V4(src), IpAddr::V4(*relay.ip()), relay.port());
            frame.src_port = 40_000;
            frame.build(&payload).split_off(14)
        })
        .collect();
    netns::in_ns(&topo.peers_ns, || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .unwrap();
        let to = SocketAddrV4::new(*relay.ip(), 0).into();
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while Instant::now() < end {
            for packet in &packets {
                if socket.send_to(packet, &to).is_ok() {
                    sent += 1;
                }
            }
            // About 50,000 a second: far above the relay-wide budget, within the machine.
            std::thread::sleep(Duration::from_micros(u64::from(sources) * 20));
        }
        sent
    })
    .unwrap()
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
fn under_a_spoofed_bind_flood_the_guard_answers_the_challenges_and_real_peers_bind() {
    skip::require_root("relay_netns_challenge_flood");
    let topo = Topology::new().unwrap();
    // The guard sends out of the relay's veth only if the peers' end takes XDP frames.
    topo.gro_on_peers().unwrap();
    let auth = Authority::new().unwrap();
    // A relay-wide budget of one cookie-less handshake a second: with the relay answering, a
    // flood would leave a real peer's first BIND about no chance.
    let budget = |answer: bool| {
        format!(
            "handshake_total_per_second = 1\nhandshake_total_burst = 1\n\
             answer_challenges = {answer}\n"
        )
    };
    let relay = start_relay(&auth, &topo, &budget(true));
    let relay_v4 = SocketAddrV4::new(topo.relay_v4(), PORT);
    let before = scrape(&relay);
    let flood = {
        let topo = &topo;
        std::thread::scope(|s| {
            let flood = s.spawn(move || spoofed_bind_flood(topo, relay_v4, 200, 3.0));
            std::thread::sleep(Duration::from_millis(300));
            for (i, session) in [0x6001u64, 0x6002, 0x6003].into_iter().enumerate() {
                let host = 2 + 2 * i as u8;
                let (mut a, mut b) = peer_pair_in(
                    &auth,
                    topo,
                    session,
                    relay_v4.into(),
                    topo.peer_v4(host),
                    topo.peer_v4(host + 1),
                );
                assert!(
                    !a.bind(Duration::from_secs(2)).unwrap(),
                    "pair {i}: A binds"
                );
                assert!(b.bind(Duration::from_secs(2)).unwrap(), "pair {i}: B binds");
                talk(&mut a, &mut b, 2).unwrap();
            }
            flood.join().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    let answered = delta("ferry_xdp_packets_total{action=\"redirect\",reason=\"challenge\"}");
    let over_rate = delta("ferry_xdp_packets_total{action=\"drop\",reason=\"rate_handshake\"}");
    eprintln!(
        "{flood} forged BINDs sent, {answered} answered in XDP, {over_rate} over their \
         source's rate"
    );
    // Each of the 200 sources gets its burst of 100 answers and then 50 a second; the rest
    // is over its source's rate. Nothing else happens to them.
    assert!(answered >= 200 * 100, "{answered} answered");
    assert!(
        (answered + over_rate) as f64 >= 0.95 * flood as f64,
        "every forged BIND is answered or over its rate: {answered} + {over_rate} of {flood}"
    );
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"rate_handshake_total\"}"),
        0,
        "what the guard answers never spends the relay-wide budget"
    );
    assert_eq!(
        delta("ferry_challenges_total"),
        answered,
        "every CHALLENGE came from the guard (the real peers' too), and is counted"
    );
    assert_eq!(delta("ferry_binds_accepted_total"), 6);

    // Switched off by a reload, the relay answers again, within its budget of one a second.
    std::fs::write(
        relay.process.config_path(),
        relay_config(&auth, &topo, &budget(false)).text(),
    )
    .unwrap();
    hup(&relay);
    std::thread::sleep(Duration::from_millis(500));
    let before = scrape(&relay);
    let flood = spoofed_bind_flood(&topo, relay_v4, 200, 1.0);
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&relay);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(
        delta("ferry_xdp_packets_total{action=\"redirect\",reason=\"challenge\"}"),
        0
    );
    let over_budget =
        delta("ferry_xdp_packets_total{action=\"drop\",reason=\"rate_handshake_total\"}");
    let relay_challenges = delta("ferry_challenges_total");
    eprintln!("{flood} forged BINDs sent, {over_budget} over the relay-wide budget");
    assert!(
        over_budget >= 1000,
        "the relay-wide budget holds the flood again: {over_budget} of {flood} dropped"
    );
    assert!(
        relay_challenges <= 3,
        "the relay sent {relay_challenges} CHALLENGEs, its budget is one a second"
    );
}
