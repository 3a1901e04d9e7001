//! A relay listening on the wildcard addresses (`0.0.0.0:7000`, `[::]:7000`, the documented
//! default) on a host with two networks, a generator side and a sink side, routing between
//! them. A peer may send to either of the relay's addresses, also to the far one, which its
//! datagrams reach through the near interface; the kernel's route back would answer from the
//! near address, which the peer (ignoring every source but the relay address it sends to, as
//! docs/protocol.md §1 says it should) drops. The relay must answer and forward to each peer
//! from the address that peer sends to: the bind completes, DATA flows both ways, a KEEPALIVE
//! is echoed and a CLOSE reaches the other peer, over IPv4 and IPv6, with the XDP guard off
//! and with the XDP fast path forwarding between the two interfaces.
//!
//! Needs root (namespaces, the XDP guard), so every test is `#[ignore]`d.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_peer::udp::{UdpPeer, UdpPeerError};
use ferry_relay::xdp::{Guard, Mode};
use ferry_testkit::fixtures::Authority;
use ferry_testkit::metrics::{metric, sum_metric};
use ferry_testkit::netns::{Side, TwoSided, in_ns};
use ferry_testkit::peers::{peer_pair_via, talk};
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ferry_testkit::skip;

const PORT: u16 = 7000;
const ADMIN_PORT: u16 = 9479;

/// DATA the fast path sent out of another interface than it came in on, or back out of the
/// same veth: by `XDP_REDIRECT` either way.
const FAST_REDIRECT: &str = "ferry_xdp_packets_total{action=\"redirect\",reason=\"fast_path\"}";

/// The relay in `topo`'s relay namespace on the wildcard addresses, two workers, with
/// `sections` (its `[xdp]` section and more).
fn start(auth: &Authority, topo: &TwoSided, sections: String) -> RelayProcess {
    let config = RelayConfig {
        listen: vec![
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), PORT),
        ],
        workers: 2,
        admin: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT),
        sections,
        netns: Some(topo.relay_ns.clone()),
        log_filter: "info".into(),
        ..RelayConfig::loopback(vec![auth.gateway_key()]).unwrap()
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_ferry-relay"));
    RelayProcess::start(bin, &auth.relay_key, &config).unwrap()
}

/// The relay's address on `side` in the family of `v6`, at the relay port.
fn relay_on(topo: &TwoSided, side: Side, v6: bool) -> SocketAddr {
    let ip: IpAddr = match v6 {
        false => topo.relay_v4(side).into(),
        true => topo.relay_v6(side).into(),
    };
    SocketAddr::new(ip, PORT)
}

/// A peer pair for `session`: A on the generator side talking to the relay's address on
/// `a_to`, B on the sink side talking to the one on `b_to`, in the family of `v6`; both bound.
fn bound_pair(
    auth: &Authority,
    topo: &TwoSided,
    session: u64,
    (a_to, b_to): (Side, Side),
    v6: bool,
) -> (UdpPeer, UdpPeer) {
    let relays = [relay_on(topo, a_to, v6), relay_on(topo, b_to, v6)];
    bound_pair_via(auth, topo, session, relays)
}

/// A peer pair for `session`: A on the generator side talking to the relay at `relays[0]`,
/// B on the sink side talking to it at `relays[1]`, each from a host address of its relay
/// address's family; both bound.
fn bound_pair_via(
    auth: &Authority,
    topo: &TwoSided,
    session: u64,
    relays: [SocketAddr; 2],
) -> (UdpPeer, UdpPeer) {
    let socket = |side: Side, relay: SocketAddr| {
        let host: IpAddr = match relay.is_ipv6() {
            false => topo.host_v4(side, 2).into(),
            true => topo.host_v6(side, 2).into(),
        };
        topo.socket(side, SocketAddr::new(host, 0)).unwrap()
    };
    let (a_socket, b_socket) = (socket(Side::Gen, relays[0]), socket(Side::Sink, relays[1]));
    let (mut a, mut b) = peer_pair_via(auth, session, relays, a_socket, b_socket).unwrap();
    let what = format!(
        "session {session:#x}: A to {}, B to {}",
        relays[0], relays[1]
    );
    assert!(
        !a.bind(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: A's bind: {e}")),
        "{what}: B is not bound yet"
    );
    assert!(
        b.bind(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: B's bind: {e}")),
        "{what}: A is bound"
    );
    (a, b)
}

/// The relay's addresses each peer talks to: A (generator side), B (sink side). The first is
/// the audit's case, both at the address a gateway hands out, which is far for B; in the
/// second each talks to the other side's address, so every datagram of the session leaves
/// from an address the kernel's route would not pick, and from a different one to each peer.
const CASES: [(Side, Side); 2] = [(Side::Gen, Side::Gen), (Side::Sink, Side::Gen)];

#[test]
#[ignore = "needs root: network namespaces"]
fn peers_sending_to_the_far_address_of_a_wildcard_relay_bind_and_talk() {
    skip::require_root("wildcard_netns");
    let topo = TwoSided::new().unwrap();
    let auth = Authority::new().unwrap();
    let relay = start(&auth, &topo, "[xdp]\nmode = \"off\"\n".into());
    let mut session = 0x7100;
    for v6 in [false, true] {
        for case in CASES {
            session += 1;
            let (mut a, mut b) = bound_pair(&auth, &topo, session, case, v6);
            talk(&mut a, &mut b, 5).unwrap();
            assert!(a.keepalive(Duration::from_secs(2)).unwrap(), "A's echo");
            assert!(b.keepalive(Duration::from_secs(2)).unwrap(), "B's echo");
            // A's CLOSE reaches B as the relay's CLOSE, from the address B sends to.
            a.close().unwrap();
            match b.recv_message(Duration::from_secs(5)) {
                Err(UdpPeerError::Closed) => {}
                other => panic!("session {session:#x}: B got {other:?}, not the CLOSE"),
            }
        }
    }
    let page = relay.metrics();
    assert_eq!(
        sum_metric(&page, "ferry_worker_tx_errors_total"),
        0,
        "{page}"
    );
}

/// Sends of the relay's workers toward a peer bound through an address the operator then
/// removes fail (Linux refuses an IPv6 source address that is gone with `EINVAL`, for a GSO
/// send as for any other), and are counted as send errors. They must not turn UDP GSO off for
/// the worker, and the peer is reached again, in GSO sends, once the address is back.
#[test]
#[ignore = "needs root: network namespaces"]
fn removing_the_address_a_peer_is_bound_through_leaves_gso_on() {
    skip::require_root("wildcard_netns");
    let topo = TwoSided::new().unwrap();
    let auth = Authority::new().unwrap();
    // A second relay address on the sink side (hosts 2..=9 are the side's), for B alone.
    let extra = format!("{}/64", topo.host_v6(Side::Sink, 10));
    let relay_ns = topo.relay_ns.as_str();
    let dev = topo.relay_sink_if.as_str();
    let address = |op: &str| {
        run(&[
            "ip", "-n", relay_ns, "addr", op, &extra, "dev", dev, "nodad",
        ])
    };
    address("add");
    let relay = start(&auth, &topo, "[xdp]\nmode = \"off\"\n".into());
    let session = 0x7300;
    let relays = [
        relay_on(&topo, Side::Sink, true),
        SocketAddr::new(topo.host_v6(Side::Sink, 10).into(), PORT),
    ];
    let (mut a, mut b) = bound_pair_via(&auth, &topo, session, relays);
    talk(&mut a, &mut b, 3).unwrap();
    let gso_sends = |page: &str| sum_metric(page, "ferry_worker_gso_sends_total");
    // A burst of DATA from A (the relay forwards it unread), until the workers have sent B
    // at least one GSO send since `since`; returns the datagrams B received.
    let burst_until_gso = |since: u64| -> u64 {
        let b_socket = b.socket();
        b_socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut received = 0;
        let mut buf = vec![0u8; 2048];
        for _ in 0..50 {
            for i in 0..32u8 {
                let mut datagram = [0u8; 700];
                let n = ferry_core::wire::encode_data(&mut datagram, session, &[i; 600]).unwrap();
                a.socket().send_to(&datagram[..n], relays[0]).unwrap();
            }
            while b_socket.recv(&mut buf).is_ok() {
                received += 1;
            }
            if gso_sends(&relay.metrics()) > since {
                return received;
            }
        }
        let page = relay.metrics();
        let log = relay.log_text();
        panic!("no GSO send toward B in 50 bursts of 32 datagrams: {page}\n{log}");
    };
    address("del");
    let before = relay.metrics();
    let received = burst_until_gso(gso_sends(&before));
    let page = relay.metrics();
    assert_eq!(received, 0, "B is unreachable without the address");
    assert!(
        sum_metric(&page, "ferry_worker_tx_errors_total") > 0,
        "the failed sends are counted: {page}"
    );
    assert_eq!(
        sum_metric(&page, "ferry_worker_gso_disabled_total"),
        0,
        "a source address that is gone says nothing about GSO: {page}"
    );
    address("add");
    let received = burst_until_gso(gso_sends(&page));
    assert!(received > 0, "B is reached again once the address is back");
}

/// Ten bursts of 16 DATA datagrams of the largest size (`MAX_DATAGRAM`, 1472 bytes) from A to
/// the relay at `relay_addr`, every one of which must reach B whole (the relay forwards DATA
/// unread, so these are not A's Noise messages); then no send error on the relay's metrics
/// page, which is returned.
fn full_size_bursts_arrive_whole(
    a: &UdpPeer,
    b: &UdpPeer,
    session: u64,
    relay_addr: SocketAddr,
    relay: &RelayProcess,
) -> String {
    use ferry_core::wire::{HEADER_LEN, MAX_DATAGRAM, encode_data};
    let b_socket = b.socket();
    b_socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    for round in 0..10u8 {
        for i in 0..16u8 {
            let mut datagram = [0u8; MAX_DATAGRAM];
            let n = encode_data(
                &mut datagram,
                session,
                &[i ^ round; MAX_DATAGRAM - HEADER_LEN],
            )
            .unwrap();
            assert_eq!(n, MAX_DATAGRAM);
            a.socket().send_to(&datagram[..n], relay_addr).unwrap();
        }
        for i in 0..16u8 {
            let n = b_socket.recv(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "round {round}: datagram {i} of 16 never came ({e}): {}",
                    relay.metrics()
                )
            });
            assert_eq!(n, MAX_DATAGRAM, "round {round}");
        }
    }
    let page = relay.metrics();
    assert_eq!(
        sum_metric(&page, "ferry_worker_tx_errors_total"),
        0,
        "{page}"
    );
    page
}

/// The largest DATA from a peer on IPv4 (a 1472-byte datagram) does not fit a 1500-byte IPv6
/// path to the other peer; the relay sends each such datagram alone, which the kernel
/// fragments, and never in a GSO send, which the kernel would refuse whole. Bursts of them
/// arrive complete.
#[test]
#[ignore = "needs root: network namespaces"]
fn full_size_data_from_ipv4_reaches_a_peer_on_ipv6_whole() {
    skip::require_root("wildcard_netns");
    let topo = TwoSided::new().unwrap();
    let auth = Authority::new().unwrap();
    let relay = start(&auth, &topo, "[xdp]\nmode = \"off\"\n".into());
    let session = 0x7400;
    let relays = [
        relay_on(&topo, Side::Gen, false),
        relay_on(&topo, Side::Sink, true),
    ];
    let (mut a, mut b) = bound_pair_via(&auth, &topo, session, relays);
    talk(&mut a, &mut b, 3).unwrap();
    full_size_bursts_arrive_whole(&a, &b, session, relays[0], &relay);
}

/// A peer behind a path with a smaller MTU than the sender's (1400 bytes on the relay's sink
/// side): the kernel refuses a GSO send of 1472-byte datagrams there whole (`EMSGSIZE`), so
/// the relay sends them again one per send, which the kernel fragments; bursts of them arrive
/// complete, and nothing is counted as a send error.
#[test]
#[ignore = "needs root: network namespaces"]
fn datagrams_over_a_smaller_path_mtu_are_resent_alone_and_arrive_whole() {
    skip::require_root("wildcard_netns");
    let topo = TwoSided::new().unwrap();
    run(&[
        "ip",
        "-n",
        &topo.relay_ns,
        "link",
        "set",
        &topo.relay_sink_if,
        "mtu",
        "1400",
    ]);
    let auth = Authority::new().unwrap();
    let relay = start(&auth, &topo, "[xdp]\nmode = \"off\"\n".into());
    let session = 0x7500;
    let relays = [
        relay_on(&topo, Side::Gen, false),
        relay_on(&topo, Side::Gen, false),
    ];
    let (mut a, mut b) = bound_pair_via(&auth, &topo, session, relays);
    talk(&mut a, &mut b, 3).unwrap();
    let page = full_size_bursts_arrive_whole(&a, &b, session, relays[0], &relay);
    // Some arrived in one receive and left as a GSO send first; once refused, the destination
    // is sent one datagram per send, so only the first round's GSO sends were refused.
    let resent = sum_metric(&page, "ferry_worker_gso_resent_total");
    assert!(
        (1..=16).contains(&resent),
        "{resent} resent: some in the first round, none after: {page}"
    );
    assert_eq!(
        sum_metric(&page, "ferry_worker_gso_disabled_total"),
        0,
        "{page}"
    );
}

/// Runs `args` (a command and its arguments), which must succeed.
fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{args:?}");
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
fn the_fast_path_forwards_from_the_address_each_peer_sends_to() {
    skip::require_root("wildcard_netns");
    let topo = TwoSided::new().unwrap();
    // As in fast_netns: an XDP program on each side's veth, so that a veth delivers the frames
    // the fast path redirects into it, and full checksums from the sides.
    let mut pass = Guard::load(16).unwrap();
    for side in [Side::Gen, Side::Sink] {
        let (ns, _, host_if) = topo.side(side);
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ethtool",
            "-K",
            host_if,
            "tx-checksumming",
            "off",
        ]);
        in_ns(ns, || pass.attach(host_if, Mode::Native).unwrap()).unwrap();
    }
    let auth = Authority::new().unwrap();
    let sections = format!(
        "[xdp]\nmode = \"native\"\ninterfaces = [\"{}\", \"{}\"]\n",
        topo.relay_gen_if, topo.relay_sink_if
    );
    let relay = start(&auth, &topo, sections);
    let log = relay.log_text();
    assert!(log.contains("XDP fast path active"), "{log}");
    let mut session = 0x7200;
    for v6 in [false, true] {
        for case in CASES {
            session += 1;
            let (mut a, mut b) = bound_pair(&auth, &topo, session, case, v6);
            talk(&mut a, &mut b, 3).unwrap();
            let before = relay.metrics();
            for i in 0..50 {
                let msg = format!("fast {i}");
                a.send(msg.as_bytes()).unwrap();
                let got = b.recv_message(Duration::from_secs(5));
                assert_eq!(got.unwrap(), msg.as_bytes(), "session {session:#x} to B");
                b.send(msg.as_bytes()).unwrap();
                let got = a.recv_message(Duration::from_secs(5));
                assert_eq!(got.unwrap(), msg.as_bytes(), "session {session:#x} to A");
            }
            let after = relay.metrics();
            let fast = metric(&after, FAST_REDIRECT) - metric(&before, FAST_REDIRECT);
            assert!(
                fast >= 100,
                "session {session:#x}: the fast path carried {fast} of 100"
            );
        }
    }
}
