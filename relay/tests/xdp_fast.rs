//! The XDP fast path on crafted frames with `BPF_PROG_TEST_RUN`, run as if they arrived on a
//! veth in a namespace (so the FIB lookup sees real routes and neighbours): a bound session's
//! DATA is rewritten field by field as the relay's own socket would have sent it, checked by
//! a parser of its own (full checksums recomputed from scratch, not the program's incremental
//! update), and everything the fast path must not forward reaches the relay or is dropped,
//! each under its counter. The relay's interface is a veth, so what goes back out of it
//! leaves by `XDP_REDIRECT` (a veth's `XDP_TX` would reach a peer without an XDP program only
//! when something else woke it).
//!
//! Needs root (CAP_BPF, namespaces), so every test is `#[ignore]`d.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use ferry_common::header::{HEADER_LEN, KEEPALIVE_BODY_LEN, PacketType};
use ferry_common::xdp::{Counter, CounterValue, Rate, slot_labels};
use ferry_relay::session::{SessionEvent, SlotBudget};
use ferry_relay::shards::SessionObserver;
use ferry_relay::xdp::frame::{self, Frame};
use ferry_relay::xdp::{Guard, Mode, SessionFilter, XDP_DROP, XDP_PASS, XDP_REDIRECT, XdpSettings};
use ferry_testkit::netns::{Topology, in_ns, link_info};
use ferry_testkit::skip;

const PORT: u16 = 7000;
const SID: u64 = 0x0102_0304_0506_0708;
/// The MAC the relay's namespace is told peer hosts 2 and 3 have.
const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 2];
const MAC_B: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 3];

fn settings() -> XdpSettings {
    XdpSettings {
        mode: Mode::Native,
        interfaces: Vec::new(),
        max_sources: 1024,
        ipv6_prefix_len: 64,
        drop_all_fragments: false,
        data_packets: Rate::new(1_000_000, 100_000).unwrap(),
        data_bytes: Rate::new(1_000_000_000, 100_000_000).unwrap(),
        handshake: Rate::new(1_000, 1_000).unwrap(),
        handshake_total: Rate::new(1_000_000, 1_000_000).unwrap(),
        session_filter: true,
        fast_path: true,
        answer_challenges: false,
        deny: Vec::new(),
        allow: Vec::new(),
    }
}

/// A topology whose relay side knows peer hosts 2 and 3 by MAC, and the guard attached to its
/// veth in native mode with the fast path on.
struct Bench {
    topo: Topology,
    guard: Guard,
    filter: Arc<SessionFilter>,
    ifindex: u32,
    relay_mac: [u8; 6],
}

impl Bench {
    fn new(test: &str) -> Self {
        Self::with_peer(test, true)
    }

    /// With `gro` false, the peers' veth is left as created: GRO off and no XDP program, so it
    /// takes no XDP frames, and the fast path must not send out of the relay's veth.
    fn with_peer(test: &str, gro: bool) -> Self {
        skip::require_root(test);
        let topo = Topology::new().unwrap();
        if gro {
            topo.gro_on_peers().unwrap();
        }
        for (host, mac) in [(2, MAC_A), (3, MAC_B)] {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            for addr in [
                topo.peer_v4(host).to_string(),
                topo.peer_v6(host).to_string(),
            ] {
                let status = Command::new("ip")
                    .args([
                        "-n",
                        &topo.relay_ns,
                        "neigh",
                        "replace",
                        &addr,
                        "lladdr",
                        &mac,
                    ])
                    .args(["dev", &topo.relay_if, "nud", "permanent"])
                    .status()
                    .unwrap();
                assert!(status.success(), "ip neigh replace {addr}");
            }
        }
        forward(&topo.relay_ns, &topo.relay_if);
        let (ifindex, relay_mac) = link_info(&topo.relay_ns, &topo.relay_if).unwrap();
        let mut s = settings();
        s.interfaces = vec![topo.relay_if.clone()];
        let listen: Vec<SocketAddr> = vec![
            SocketAddr::new(IpAddr::V4(topo.relay_v4()), PORT),
            SocketAddr::new(IpAddr::V6(topo.relay_v6()), PORT),
        ];
        let (guard, filter) = in_ns(&topo.relay_ns, || {
            let mut guard = Guard::start(&s, &[PORT])
                .unwrap_or_else(|e| panic!("{test}: {e}"))
                .unwrap();
            let filter = guard.session_filter(&listen).unwrap();
            (guard, filter)
        })
        .unwrap();
        let fast = guard.fast_path();
        assert_eq!(fast.len(), 1);
        assert!(fast[0].1.takes_data_in(), "{fast:?}");
        assert_eq!(fast[0].1.sends_data_out(), gro, "{fast:?}");
        Bench {
            topo,
            guard,
            filter,
            ifindex,
            relay_mac,
        }
    }

    fn peer(&self, host: u8, v6: bool, port: u16) -> SocketAddr {
        let ip = if v6 {
            IpAddr::V6(self.topo.peer_v6(host))
        } else {
            IpAddr::V4(self.topo.peer_v4(host))
        };
        SocketAddr::new(ip, port)
    }

    fn relay(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.topo.relay_v6())
        } else {
            IpAddr::V4(self.topo.relay_v4())
        }
    }

    fn bind(&self, a: Option<SocketAddr>, b: Option<SocketAddr>, rate: u64) {
        self.filter.session_event(SessionEvent::Bound {
            session: SID,
            slots: [a, b],
            locals: [None, None],
            budgets: [a, b].map(|slot| {
                slot.map(|_| SlotBudget {
                    rate,
                    set_at: Instant::now(),
                    fresh: true,
                    previous_rate: rate,
                })
            }),
        });
    }

    /// Runs `frame` as if it came in on the veth; checks that exactly `slot` counted it, with
    /// `action`; returns the frame as the program left it.
    fn expect(&self, frame: &[u8], action: u32, slot: Counter, what: &str) -> Vec<u8> {
        let before = self.guard.counters().unwrap();
        let (got, out) = in_ns(&self.topo.relay_ns, || {
            self.guard.test_run_on(frame, self.ifindex).unwrap()
        })
        .unwrap();
        let after = self.guard.counters().unwrap();
        // The guard is attached to a live veth: the namespace's own traffic (IPv6 neighbour
        // and router discovery) may pass it meanwhile and count as not relay traffic.
        let background = slot_labels(Counter::PassOther as u32).unwrap();
        let mut moved = moved(&before, &after);
        if slot != Counter::PassOther {
            moved.retain(|m| *m != background);
        }
        assert_eq!(got, action, "{what}: action; counters moved: {moved:?}");
        let labels = slot_labels(slot as u32).unwrap();
        assert_eq!(moved, vec![labels], "{what}: counted by the wrong slot");
        out
    }
}

/// Turns IPv4 and IPv6 forwarding on for `interface` in namespace `ns`: the FIB lookup the
/// fast path makes needs it.
fn forward(ns: &str, interface: &str) {
    for family in ["ipv4", "ipv6"] {
        let status = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .arg(format!("net.{family}.conf.{interface}.forwarding=1"))
            .status()
            .unwrap();
        assert!(status.success(), "sysctl {family} forwarding");
    }
}

fn moved(before: &[CounterValue], after: &[CounterValue]) -> Vec<(&'static str, &'static str)> {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a.packets != b.packets)
        .map(|(slot, _)| slot_labels(slot as u32).unwrap())
        .collect()
}

/// A frame from `from` to the relay at `relay` carrying `datagram`, with a correct UDP
/// checksum (the builder leaves it zero) unless `checksum` is false.
fn frame_from(from: SocketAddr, relay: IpAddr, datagram: &[u8], checksum: bool) -> Vec<u8> {
    let mut f = Frame::udp(from.ip(), relay, PORT);
    f.src_port = from.port();
    let mut bytes = f.build(datagram);
    if checksum {
        let parsed = Parsed::of(&bytes);
        let check = parsed.expected_udp_checksum(&bytes);
        bytes[parsed.udp + 6..parsed.udp + 8].copy_from_slice(&check.to_be_bytes());
    }
    bytes
}

/// `datagram` from `from` as a sender that leaves the UDP checksum to its device sends it: the
/// checksum field holds the folded sum of the pseudo-header alone (what Linux writes for
/// `CHECKSUM_PARTIAL`: `~csum_tcpudp_magic(..)`, `~csum_ipv6_magic(..)`).
fn frame_with_partial_checksum(from: SocketAddr, relay: IpAddr, datagram: &[u8]) -> Vec<u8> {
    let mut bytes = frame_from(from, relay, datagram, false);
    let parsed = Parsed::of(&bytes);
    let partial = fold(parsed.pseudo_header_sum());
    bytes[parsed.udp + 6..parsed.udp + 8].copy_from_slice(&partial.to_be_bytes());
    bytes
}

fn data(len: usize) -> Vec<u8> {
    let mut d = frame::datagram(PacketType::Data, SID, len);
    for (i, b) in d[HEADER_LEN..].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    d
}

/// An Ethernet frame carrying IPv4 or IPv6 and UDP, parsed without any of the program's code.
#[derive(Debug)]
struct Parsed {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    ip_checksum_ok: bool,
    udp: usize,
    src_port: u16,
    dst_port: u16,
    payload: Vec<u8>,
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

impl Parsed {
    fn of(f: &[u8]) -> Self {
        let mac = |at: usize| -> [u8; 6] { f[at..at + 6].try_into().unwrap() };
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let (src, dst, ttl, ip_checksum_ok, udp) = match ethertype {
            0x0800 => {
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let ip = &f[14..14 + ihl];
                let src: [u8; 4] = ip[12..16].try_into().unwrap();
                let dst: [u8; 4] = ip[16..20].try_into().unwrap();
                (
                    src.into(),
                    dst.into(),
                    ip[8],
                    fold(sum(ip)) == 0xffff,
                    14 + ihl,
                )
            }
            0x86dd => {
                let ip = &f[14..54];
                let src: [u8; 16] = ip[8..24].try_into().unwrap();
                let dst: [u8; 16] = ip[24..40].try_into().unwrap();
                (src.into(), dst.into(), ip[7], true, 54)
            }
            other => panic!("ethertype {other:#x}"),
        };
        let udp_len = usize::from(u16::from_be_bytes([f[udp + 4], f[udp + 5]]));
        Parsed {
            dst_mac: mac(0),
            src_mac: mac(6),
            src,
            dst,
            ttl,
            ip_checksum_ok,
            udp,
            src_port: u16::from_be_bytes([f[udp], f[udp + 1]]),
            dst_port: u16::from_be_bytes([f[udp + 2], f[udp + 3]]),
            payload: f[udp + 8..udp + udp_len].to_vec(),
        }
    }

    /// The UDP checksum the frame should carry, computed from scratch over the pseudo-header
    /// and the whole datagram with its checksum field taken as zero.
    /// The unfolded sum of the UDP pseudo-header (RFC 768, RFC 8200 §8.1).
    fn pseudo_header_sum(&self) -> u32 {
        let udp_len = 8 + self.payload.len();
        let mut pseudo = Vec::new();
        for ip in [self.src, self.dst] {
            match ip {
                IpAddr::V4(a) => pseudo.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => pseudo.extend_from_slice(&a.octets()),
            }
        }
        match self.src {
            IpAddr::V4(_) => {
                pseudo.extend_from_slice(&[0, 17]);
                pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
            }
            IpAddr::V6(_) => {
                pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
            }
        }
        sum(&pseudo)
    }

    fn expected_udp_checksum(&self, f: &[u8]) -> u16 {
        let udp_len = 8 + self.payload.len();
        let mut datagram = f[self.udp..self.udp + udp_len].to_vec();
        datagram[6] = 0;
        datagram[7] = 0;
        if datagram.len() % 2 == 1 {
            datagram.push(0);
        }
        let c = !fold(self.pseudo_header_sum() + sum(&datagram));
        if c == 0 { 0xffff } else { c }
    }

    fn udp_checksum(&self, f: &[u8]) -> u16 {
        u16::from_be_bytes([f[self.udp + 6], f[self.udp + 7]])
    }
}

/// Checks every field of `out`, the fast path's rewrite of `input` to `to`.
fn check_rewrite(b: &Bench, input: &[u8], out: &[u8], to: SocketAddr, to_mac: [u8; 6]) {
    assert_eq!(out.len(), input.len(), "the frame keeps its length");
    let before = Parsed::of(input);
    let after = Parsed::of(out);
    let v6 = to.is_ipv6();
    assert_eq!(
        after.dst_mac, to_mac,
        "Ethernet destination: the neighbour's MAC"
    );
    assert_eq!(
        after.src_mac, b.relay_mac,
        "Ethernet source: the relay's interface"
    );
    assert_eq!(after.src, b.relay(v6), "IP source: the relay address");
    assert_eq!(after.dst, to.ip(), "IP destination: the receiving slot");
    assert_eq!(after.src_port, PORT, "UDP source port: the relay's");
    assert_eq!(
        after.dst_port,
        to.port(),
        "UDP destination port: the receiving slot's"
    );
    assert_eq!(after.ttl, 64, "TTL or hop limit: the host's default");
    assert!(after.ip_checksum_ok, "the IPv4 header checksum verifies");
    assert_eq!(after.payload, before.payload, "the datagram is unchanged");
    if before.udp_checksum(input) == 0 && !v6 {
        assert_eq!(
            after.udp_checksum(out),
            0,
            "no IPv4 UDP checksum stays none"
        );
    } else {
        assert_eq!(
            after.udp_checksum(out),
            after.expected_udp_checksum(out),
            "the UDP checksum verifies"
        );
    }
    // The other header bytes are untouched: IPv4 version/IHL, TOS, length, id, flags,
    // protocol; IPv6 version, class, flow label, payload length, next header.
    let ip = 14;
    if v6 {
        assert_eq!(out[ip..ip + 7], input[ip..ip + 7]);
    } else {
        assert_eq!(out[ip..ip + 8], input[ip..ip + 8]);
        assert_eq!(out[ip + 9], input[ip + 9]);
    }
    assert_eq!(out[12..14], input[12..14], "ethertype");
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn bound_ipv4_data_is_rewritten_field_by_field_and_sent_back_out() {
    let b = Bench::new("bound_ipv4_data_is_rewritten_field_by_field_and_sent_back_out");
    let (a, bb) = (b.peer(2, false, 40_000), b.peer(3, false, 50_000));
    b.bind(Some(a), Some(bb), 10_000_000);
    for len in [1, 2, 101, 1200] {
        for checksum in [true, false] {
            let input = frame_from(a, b.relay(false), &data(len), checksum);
            let out = b.expect(&input, XDP_REDIRECT, Counter::FastRedirect, "A to B");
            check_rewrite(&b, &input, &out, bb, MAC_B);
        }
        let input = frame_from(bb, b.relay(false), &data(len), true);
        let out = b.expect(&input, XDP_REDIRECT, Counter::FastRedirect, "B to A");
        check_rewrite(&b, &input, &out, a, MAC_A);
    }
    // A partial checksum (the sender's device was to finish it) goes to the relay.
    for len in [1, 1200] {
        let input = frame_with_partial_checksum(a, b.relay(false), &data(len));
        b.expect(
            &input,
            XDP_PASS,
            Counter::FastPartialChecksum,
            "partial checksum",
        );
    }
    let state = b.filter.fast_state(SID).unwrap();
    assert_eq!(state.slots[0].packets, 8);
    assert_eq!(state.slots[1].packets, 4);
    assert_eq!(state.slots[1].bytes, 4 * HEADER_LEN as u64 + 1304);
    assert_ne!(state.slots[0].last_seen, 0);
    let totals = b.guard.fast_totals().unwrap();
    assert_eq!(totals.packets, 12);
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn bound_ipv6_data_is_rewritten_field_by_field_and_sent_back_out() {
    let b = Bench::new("bound_ipv6_data_is_rewritten_field_by_field_and_sent_back_out");
    let (a, bb) = (b.peer(2, true, 40_000), b.peer(3, true, 50_000));
    b.bind(Some(a), Some(bb), 10_000_000);
    for len in [1, 2, 101, 1200] {
        let input = frame_from(a, b.relay(true), &data(len), true);
        let out = b.expect(&input, XDP_REDIRECT, Counter::FastRedirect, "A to B");
        check_rewrite(&b, &input, &out, bb, MAC_B);
        let input = frame_from(bb, b.relay(true), &data(len), true);
        let out = b.expect(&input, XDP_REDIRECT, Counter::FastRedirect, "B to A");
        check_rewrite(&b, &input, &out, a, MAC_A);
    }
    // IPv6 UDP without a checksum is not valid; the kernel drops it, the fast path does not
    // forward it.
    let input = frame_from(a, b.relay(true), &data(10), false);
    b.expect(&input, XDP_PASS, Counter::FastNoChecksum, "no checksum");
    for len in [1, 1200] {
        let input = frame_with_partial_checksum(a, b.relay(true), &data(len));
        b.expect(
            &input,
            XDP_PASS,
            Counter::FastPartialChecksum,
            "partial checksum",
        );
    }
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn nothing_is_sent_out_of_a_veth_whose_peer_takes_no_xdp_frames() {
    // The veth would drop every frame the fast path sent out of it: the relay found that out
    // when it attached (by sending one such frame), so the program passes DATA that would
    // leave by that veth to the relay, for each family, while it still takes DATA in there.
    let b = Bench::with_peer(
        "nothing_is_sent_out_of_a_veth_whose_peer_takes_no_xdp_frames",
        false,
    );
    let status = &b.guard.fast_path()[0].1;
    assert!(
        status.to_string().contains("takes no XDP frames"),
        "{status}"
    );
    for v6 in [false, true] {
        let (a, bb) = (b.peer(2, v6, 40_000), b.peer(3, v6, 50_000));
        b.bind(Some(a), Some(bb), 10_000_000);
        let input = frame_from(a, b.relay(v6), &data(100), true);
        b.expect(&input, XDP_PASS, Counter::FastInterface, "A to B");
    }
    assert_eq!(b.guard.fast_totals().unwrap().packets, 0);
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn what_the_fast_path_must_not_forward_goes_to_the_relay_each_reason_counted() {
    let mut b =
        Bench::new("what_the_fast_path_must_not_forward_goes_to_the_relay_each_reason_counted");
    let (a, bb) = (b.peer(2, false, 40_000), b.peer(3, false, 50_000));
    let relay = b.relay(false);
    let d = frame_from(a, relay, &data(100), true);

    // Unknown session: the session filter drops it before the fast path.
    b.expect(&d, XDP_DROP, Counter::DropUnknownSession, "unknown session");
    // Half-bound session: the relay decides (and drops it, nobody to send to).
    b.bind(Some(a), None, 10_000_000);
    b.expect(&d, XDP_PASS, Counter::FastPeerUnbound, "other slot unbound");
    // Bound, but from the wrong source: the guard drops it.
    b.bind(Some(a), Some(bb), 10_000_000);
    let wrong = frame_from(b.peer(4, false, 40_000), relay, &data(100), true);
    b.expect(&wrong, XDP_DROP, Counter::DropUnboundSource, "wrong source");
    // Types other than DATA pass as before.
    let ka = frame_from(
        a,
        relay,
        &frame::datagram(PacketType::Keepalive, SID, KEEPALIVE_BODY_LEN),
        true,
    );
    b.expect(&ka, XDP_PASS, Counter::PassRelay, "KEEPALIVE");
    // IP options and VLAN tags.
    let mut f = Frame::udp(a.ip(), relay, PORT);
    f.src_port = a.port();
    f.ip_options = 8;
    b.expect(
        &f.build(&data(100)),
        XDP_PASS,
        Counter::FastIpOptions,
        "IPv4 options",
    );
    let mut f = Frame::udp(a.ip(), relay, PORT);
    f.src_port = a.port();
    f.vlans = vec![7];
    b.expect(
        &f.build(&data(100)),
        XDP_PASS,
        Counter::FastVlan,
        "VLAN tag",
    );
    // Mixed families.
    let b6 = b.peer(3, true, 50_000);
    b.bind(Some(a), Some(b6), 10_000_000);
    b.expect(&d, XDP_PASS, Counter::FastMixedFamily, "IPv4 to IPv6");
    // No route to the receiving slot: a FIB miss.
    let far: SocketAddr = "198.19.200.3:50000".parse().unwrap();
    b.bind(Some(a), Some(far), 10_000_000);
    b.expect(&d, XDP_PASS, Counter::FastFibMiss, "no route");
    // No neighbour entry yet: a FIB miss too (the relay's own send resolves it).
    b.bind(Some(a), Some(b.peer(5, false, 50_000)), 10_000_000);
    b.expect(&d, XDP_PASS, Counter::FastFibMiss, "no neighbour");
    // A budget the fast path cannot express leaves the slot to the relay.
    b.bind(Some(a), Some(bb), 0);
    b.expect(&d, XDP_PASS, Counter::FastNotEligible, "no budget");

    // Over budget: the smallest budget is two maximal datagrams' worth (the relay's burst
    // floor), so a small rate admits that much at once, then drops.
    b.bind(Some(a), Some(bb), 1_000);
    let big = frame_from(a, relay, &data(1200), true);
    let mut forwarded = 0;
    for _ in 0..3 {
        let (action, _) = in_ns(&b.topo.relay_ns, || {
            b.guard.test_run_on(&big, b.ifindex).unwrap()
        })
        .unwrap();
        forwarded += usize::from(action == XDP_REDIRECT);
    }
    assert!(forwarded >= 2, "the burst passes: {forwarded}");
    b.expect(&big, XDP_DROP, Counter::FastOverBudget, "over budget");

    // The fast path off by reload: DATA passes to the relay as before.
    let mut s = settings();
    s.interfaces = vec![b.topo.relay_if.clone()];
    s.fast_path = false;
    b.bind(Some(a), Some(bb), 10_000_000);
    b.guard.configure(&s, &[PORT]).unwrap();
    assert_eq!(
        b.guard.fast_path()[0].1.to_string(),
        "xdp.fast_path is false"
    );
    b.expect(&d, XDP_PASS, Counter::PassRelay, "fast path off");
    // And on again.
    s.fast_path = true;
    in_ns(&b.topo.relay_ns, || b.guard.configure(&s, &[PORT]).unwrap()).unwrap();
    b.expect(
        &d,
        XDP_REDIRECT,
        Counter::FastRedirect,
        "fast path on again",
    );

    // Closing the session removes both of its entries.
    b.filter.session_event(SessionEvent::Closed(SID));
    assert!(b.filter.get(SID).is_none());
    assert!(b.filter.fast_state(SID).is_none());
    b.expect(&d, XDP_DROP, Counter::DropUnknownSession, "closed");
    let _ = XDP_DROP;
}

/// Runs `frame` until the program's action and output satisfy `done`, or two seconds pass
/// (the cached next hop lives `FIB_CACHE_NS`, a hundred times less).
fn until(b: &Bench, frame: &[u8], done: impl Fn(u32, &[u8]) -> bool) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    while Instant::now() < deadline {
        let (action, out) = in_ns(&b.topo.relay_ns, || {
            b.guard.test_run_on(frame, b.ifindex).unwrap()
        })
        .unwrap();
        if done(action, &out) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

fn ip_in(ns: &str, args: &[&str]) {
    let status = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}");
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_cached_next_hop_follows_rebinds_at_once_and_route_and_neighbour_changes_soon() {
    let b = Bench::new(
        "the_cached_next_hop_follows_rebinds_at_once_and_route_and_neighbour_changes_soon",
    );
    let (ns, dev) = (b.topo.relay_ns.clone(), b.topo.relay_if.clone());
    let (a, bb) = (b.peer(2, false, 40_000), b.peer(3, false, 50_000));
    let relay = b.relay(false);
    b.bind(Some(a), Some(bb), 10_000_000);
    let small = frame_from(a, relay, &data(100), true);
    let out = b.expect(&small, XDP_REDIRECT, Counter::FastRedirect, "first");
    check_rewrite(&b, &small, &out, bb, MAC_B);
    // The hop is cached for slot B, for B's address and port and this interface.
    let hop = b.filter.fib_cache(SID).unwrap().slots[1];
    assert_eq!(hop.dmac, MAC_B);
    assert_eq!(hop.smac, b.relay_mac);
    assert_eq!((hop.egress, hop.ingress), (b.ifindex, b.ifindex));
    assert_eq!(hop.dst_port, 50_000);
    assert_ne!(hop.expires, 0);
    assert_eq!(b.filter.fib_cache(SID).unwrap().slots[0].expires, 0);

    // B rebinds to another host: its first datagram there takes that host's MAC, not the
    // hop cached for the old address.
    let mac_c = [0x02, 0xcc, 0, 0, 0, 4];
    let c = b.peer(4, false, 50_000);
    ip_in(
        &ns,
        &[
            "neigh",
            "replace",
            &c.ip().to_string(),
            "lladdr",
            "02:cc:00:00:00:04",
            "dev",
            &dev,
            "nud",
            "permanent",
        ],
    );
    b.bind(Some(a), Some(c), 10_000_000);
    let out = b.expect(
        &small,
        XDP_REDIRECT,
        Counter::FastRedirect,
        "after the rebind",
    );
    check_rewrite(&b, &small, &out, c, mac_c);
    // Back to B; its port changes too.
    let bb2 = b.peer(3, false, 50_001);
    b.bind(Some(a), Some(bb2), 10_000_000);
    let out = b.expect(&small, XDP_REDIRECT, Counter::FastRedirect, "back to B");
    check_rewrite(&b, &small, &out, bb2, MAC_B);

    // B's host moves to another MAC: the fast path follows once the cached hop expires.
    let mac_moved = [0x02, 0xdd, 0, 0, 0, 3];
    ip_in(
        &ns,
        &[
            "neigh",
            "replace",
            &bb.ip().to_string(),
            "lladdr",
            "02:dd:00:00:00:03",
            "dev",
            &dev,
            "nud",
            "permanent",
        ],
    );
    assert!(
        until(&b, &small, |action, out| action == XDP_REDIRECT
            && out[..6] == mac_moved),
        "the new neighbour MAC never reached the fast path"
    );
    let out = b.expect(
        &small,
        XDP_REDIRECT,
        Counter::FastRedirect,
        "after the move",
    );
    check_rewrite(&b, &small, &out, bb2, mac_moved);

    // A route with a smaller MTU (locked: forwarding honours a route's MTU only then):
    // datagrams that fit go on through the cached hop at once, a longer one is never sent
    // through it (the lookup refuses it) and goes to the relay.
    ip_in(
        &ns,
        &[
            "route",
            "add",
            &format!("{}/32", bb.ip()),
            "dev",
            &dev,
            "mtu",
            "lock",
            "600",
        ],
    );
    let big = frame_from(a, relay, &data(1000), true);
    assert!(
        until(&b, &big, |action, _| action == XDP_PASS),
        "the smaller MTU never reached the fast path"
    );
    b.expect(&big, XDP_PASS, Counter::FastFibMiss, "longer than the MTU");
    let out = b.expect(
        &small,
        XDP_REDIRECT,
        Counter::FastRedirect,
        "within the MTU",
    );
    check_rewrite(&b, &small, &out, bb2, mac_moved);

    // The route goes away: the fast path stops using the hop once it expires.
    ip_in(
        &ns,
        &[
            "route",
            "replace",
            "unreachable",
            &format!("{}/32", bb.ip()),
        ],
    );
    assert!(
        until(&b, &small, |action, _| action == XDP_PASS),
        "the removed route never reached the fast path"
    );
    b.expect(&small, XDP_PASS, Counter::FastFibMiss, "no route");

    // A route out of an interface the fast path is not active on: the redirect is refused
    // before the frame is touched, and it goes to the relay.
    let other = format!("fo{}", std::process::id())
        .chars()
        .take(15)
        .collect::<String>();
    let peer = format!("{other}p").chars().take(15).collect::<String>();
    ip_in(
        &ns,
        &["link", "add", &other, "type", "veth", "peer", "name", &peer],
    );
    ip_in(&ns, &["link", "set", &other, "up"]);
    ip_in(&ns, &["link", "set", &peer, "up"]);
    let elsewhere: SocketAddr = "198.19.99.3:50000".parse().unwrap();
    ip_in(&ns, &["route", "add", "198.19.99.3/32", "dev", &other]);
    ip_in(
        &ns,
        &[
            "neigh",
            "replace",
            "198.19.99.3",
            "lladdr",
            "02:ee:00:00:00:03",
            "dev",
            &other,
            "nud",
            "permanent",
        ],
    );
    b.bind(Some(a), Some(elsewhere), 10_000_000);
    let out = b.expect(&small, XDP_PASS, Counter::FastInterface, "not active there");
    assert_eq!(out, small, "the frame is left as it came");

    // Closing the session removes its cached hops with it.
    b.filter.session_event(SessionEvent::Closed(SID));
    assert!(b.filter.fib_cache(SID).is_none());
}
