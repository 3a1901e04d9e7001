//! The XDP guard on crafted frames with `BPF_PROG_TEST_RUN`: no interface needed, real
//! kernel verifier, real maps. Every malformed class is dropped with its counter, valid
//! packets pass (IPv4, IPv6, VLAN, IP options), buckets refill over time, and the CIDR lists
//! deny and allow by longest prefix.
//!
//! Needs root (CAP_BPF), so every test is `#[ignore]`d: `cargo test -- --include-ignored`
//! runs them. A relay built with `FERRY_SKIP_EBPF=1` has no XDP program: the reason they are
//! ignored says so, and run anyway they fail with the error naming the switch.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::IpAddr;
use std::time::Duration;

use ferry_common::header::{
    BIND_BODY_LEN, CHALLENGE_BODY_LEN, CLOSE_BODY_LEN, HEADER_LEN, Header, HeaderError,
    KEEPALIVE_BODY_LEN, MAX_DATA_BODY, PacketType, REBIND_BODY_LEN,
};
use ferry_common::xdp::{Counter, Rate, slot_labels};
use ferry_relay::xdp::frame::{self, Frame};
use ferry_relay::xdp::{Cidr, Guard, Mode, XDP_DROP, XDP_PASS, XdpSettings};
use ferry_testkit::netns::{Topology, in_ns};
use ferry_testkit::skip;

const PORT: u16 = 7000;
const OTHER_PORT: u16 = 7001;

fn settings() -> XdpSettings {
    XdpSettings {
        mode: Mode::Auto,
        interfaces: Vec::new(),
        max_sources: 1024,
        ipv6_prefix_len: 64,
        drop_all_fragments: false,
        data_packets: Rate::new(1_000_000, 100_000).unwrap(),
        data_bytes: Rate::new(1_000_000_000, 100_000_000).unwrap(),
        handshake: Rate::new(1_000, 1_000).unwrap(),
        handshake_total: Rate::new(1_000_000, 1_000_000).unwrap(),
        session_filter: false,
        fast_path: false,
        answer_challenges: false,
        deny: Vec::new(),
        allow: Vec::new(),
    }
}

/// A loaded guard for `test`, which needs root; configured with `settings`.
fn guard(test: &str, settings: &XdpSettings) -> Guard {
    let mut guard = load(test, settings.max_sources);
    guard.configure(settings, &[PORT, OTHER_PORT]).unwrap();
    guard
}

/// The guard loaded with room for `max_sources`, unconfigured, for `test`, which needs root.
fn load(test: &str, max_sources: u32) -> Guard {
    skip::require_root(test);
    Guard::load(max_sources).unwrap_or_else(|e| panic!("{test}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const RELAY4: &str = "198.18.0.1";
const RELAY6: &str = "2001:db8::1";

/// A datagram with a valid header of `packet_type` and `body_len` zero bytes.
fn datagram(packet_type: PacketType, body_len: usize) -> Vec<u8> {
    frame::datagram(packet_type, 0x0102_0304_0506_0708, body_len)
}

fn data(body_len: usize) -> Vec<u8> {
    datagram(PacketType::Data, body_len)
}

fn bind() -> Vec<u8> {
    datagram(PacketType::Bind, BIND_BODY_LEN)
}

fn v4_from(src: &str) -> Frame {
    Frame::udp(ip(src), ip(RELAY4), PORT)
}

fn v6_from(src: &str) -> Frame {
    Frame::udp(ip(src), ip(RELAY6), PORT)
}

/// Runs `frame` once and checks the action and that exactly `slot` counted it.
fn expect(guard: &Guard, frame: &[u8], action: u32, slot: u32, what: &str) {
    let before = guard.counters().unwrap();
    let outcome = guard.test_run(frame, 1).unwrap();
    let after = guard.counters().unwrap();
    assert_eq!(
        outcome.action,
        action,
        "{what}: action {} (expected {action}); counters moved: {:?}",
        outcome.action,
        moved(&before, &after)
    );
    let moved = moved(&before, &after);
    let (want_action, want_reason) = slot_labels(slot).unwrap();
    assert_eq!(
        moved,
        vec![(want_action, want_reason, frame.len() as u64)],
        "{what}: counted by the wrong slot"
    );
}

/// The counters that changed: (action, reason, bytes added).
fn moved(
    before: &[ferry_common::xdp::CounterValue],
    after: &[ferry_common::xdp::CounterValue],
) -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for (slot, (b, a)) in before.iter().zip(after).enumerate() {
        if a.packets != b.packets {
            let (action, reason) = slot_labels(slot as u32).unwrap();
            assert_eq!(a.packets - b.packets, 1, "{reason} counted twice");
            out.push((action, reason, a.bytes - b.bytes));
        }
    }
    out
}

const PASS_RELAY: u32 = Counter::PassRelay as u32;
const PASS_OTHER: u32 = Counter::PassOther as u32;

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn valid_relay_packets_pass_in_every_encapsulation() {
    let g = guard(
        "valid_relay_packets_pass_in_every_encapsulation",
        &settings(),
    );
    let d = data(100);
    expect(
        &g,
        &v4_from("198.18.0.2").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "IPv4",
    );
    expect(
        &g,
        &v6_from("2001:db8::2").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "IPv6",
    );
    let mut f = v4_from("198.18.0.2");
    f.vlans = vec![100];
    expect(
        &g,
        &f.build(&d),
        XDP_PASS,
        PASS_RELAY,
        "IPv4 in one VLAN tag",
    );
    f.vlans = vec![100, 200];
    expect(&g, &f.build(&d), XDP_PASS, PASS_RELAY, "IPv4 in QinQ");
    let mut f = v6_from("2001:db8::2");
    f.vlans = vec![7];
    expect(&g, &f.build(&d), XDP_PASS, PASS_RELAY, "IPv6 in a VLAN");
    let mut f = v4_from("198.18.0.2");
    f.ip_options = 40;
    expect(
        &g,
        &f.build(&d),
        XDP_PASS,
        PASS_RELAY,
        "IPv4 with 40 bytes of options",
    );
    let mut f = v6_from("2001:db8::2");
    f.ip_options = 16;
    expect(
        &g,
        &f.build(&d),
        XDP_PASS,
        PASS_RELAY,
        "IPv6 with destination options",
    );
    let mut f = v4_from("198.18.0.2");
    f.trailer = 20;
    let tiny = datagram(PacketType::Keepalive, KEEPALIVE_BODY_LEN);
    expect(
        &g,
        &f.build(&tiny),
        XDP_PASS,
        PASS_RELAY,
        "Ethernet padding after IPv4",
    );
    let mut f = Frame::udp(ip("198.18.0.2"), ip(RELAY4), OTHER_PORT);
    f.src_port = 1;
    expect(
        &g,
        &f.build(&d),
        XDP_PASS,
        PASS_RELAY,
        "the second relay port",
    );
    for (ty, len) in [
        (PacketType::Data, 1),
        (PacketType::Data, MAX_DATA_BODY),
        (PacketType::Bind, BIND_BODY_LEN),
        (PacketType::Rebind, REBIND_BODY_LEN),
        (PacketType::Keepalive, KEEPALIVE_BODY_LEN),
    ] {
        let frame = v4_from("198.18.0.3").build(&datagram(ty, len));
        expect(
            &g,
            &frame,
            XDP_PASS,
            PASS_RELAY,
            &format!("{ty:?} of {len}"),
        );
    }
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn other_traffic_passes_untouched() {
    let g = guard("other_traffic_passes_untouched", &settings());
    let garbage = [0xffu8; 3];
    let f = Frame::udp(ip("198.18.0.2"), ip(RELAY4), 53);
    expect(
        &g,
        &f.build(&garbage),
        XDP_PASS,
        PASS_OTHER,
        "UDP to another port",
    );
    let f = Frame::udp(ip("2001:db8::2"), ip(RELAY6), 443);
    expect(
        &g,
        &f.build(&garbage),
        XDP_PASS,
        PASS_OTHER,
        "IPv6 UDP to another port",
    );
    // ARP: neither IPv4 nor IPv6.
    let mut arp = vec![0xffu8; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    expect(&g, &arp, XDP_PASS, PASS_OTHER, "ARP");
    // TCP to the relay port: the guard meters UDP only.
    let mut tcp = v4_from("198.18.0.2").build(&data(10));
    tcp[14 + 9] = 6;
    expect(&g, &tcp, XDP_PASS, PASS_OTHER, "TCP to the relay port");
    // A bare Ethernet header (BPF_PROG_TEST_RUN needs at least that much).
    let mut bare = vec![0u8; 12];
    bare.extend_from_slice(&[0x88, 0xb5]);
    expect(&g, &bare, XDP_PASS, PASS_OTHER, "a bare Ethernet header");
    // An IPv4 ethertype with nothing after it: the kernel would drop it too.
    bare[12..].copy_from_slice(&[0x08, 0x00]);
    let bad_ip = Counter::DropBadIpHeader as u32;
    expect(
        &g,
        &bare,
        XDP_DROP,
        bad_ip,
        "an IPv4 ethertype and no header",
    );
    // A non-first fragment: no UDP header, port unknown, so it passes by default.
    let mut f = v4_from("198.18.0.2");
    f.fragment = Some((100, false));
    expect(
        &g,
        &f.build(&garbage),
        XDP_PASS,
        PASS_OTHER,
        "a non-first IPv4 fragment",
    );
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn every_malformed_class_is_dropped_and_counted() {
    let g = guard("every_malformed_class_is_dropped_and_counted", &settings());
    let drop = |counter: Counter| counter as u32;
    let rule = Counter::malformed_slot;
    let good = data(100);

    // Each header rule of protocol.md §2.1, IPv4 and IPv6.
    let mut cases: Vec<(Vec<u8>, HeaderError)> = Vec::new();
    cases.push((good[..HEADER_LEN - 1].to_vec(), HeaderError::TooShort));
    cases.push((data(MAX_DATA_BODY + 1), HeaderError::TooLong));
    let mut bad = good.clone();
    bad[0] = b'X';
    cases.push((bad, HeaderError::BadMagic));
    let mut bad = good.clone();
    bad[2] = 9;
    cases.push((bad, HeaderError::BadVersion));
    let mut bad = good.clone();
    bad[3] = 0xee;
    cases.push((bad, HeaderError::UnknownType));
    let mut bad = good.clone();
    bad[4..12].fill(0);
    cases.push((bad, HeaderError::ZeroSession));
    let mut bad = good.clone();
    bad[15] = 1;
    cases.push((bad, HeaderError::ReservedNonZero));
    let mut bad = good.clone();
    bad[13] ^= 1;
    cases.push((bad, HeaderError::LengthMismatch));
    cases.push((
        datagram(PacketType::Bind, BIND_BODY_LEN - 1),
        HeaderError::BodyLengthOutOfRange,
    ));
    assert_eq!(cases.len(), HeaderError::COUNT, "one case per rule");
    for (payload, err) in &cases {
        let f4 = v4_from("198.18.0.2").build(payload);
        expect(&g, &f4, XDP_DROP, rule(*err), &format!("IPv4 {err:?}"));
        let f6 = v6_from("2001:db8::2").build(payload);
        expect(&g, &f6, XDP_DROP, rule(*err), &format!("IPv6 {err:?}"));
    }

    // A relay-only type sent to the relay.
    let challenge = datagram(PacketType::Challenge, CHALLENGE_BODY_LEN);
    let f = v4_from("198.18.0.2").build(&challenge);
    expect(
        &g,
        &f,
        XDP_DROP,
        drop(Counter::DropUnexpectedType),
        "CHALLENGE to the relay",
    );

    // Fragments.
    let mut f = v4_from("198.18.0.2");
    f.fragment = Some((0, true));
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        drop(Counter::DropFragment),
        "IPv4 first fragment",
    );
    let mut f = v6_from("2001:db8::2");
    f.fragment = Some((0, true));
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        drop(Counter::DropFragment),
        "IPv6 first fragment",
    );

    // UDP length.
    for delta in [-1, 1, -100] {
        let mut f = v4_from("198.18.0.2");
        f.udp_len_delta = delta;
        let what = format!("IPv4 UDP length off by {delta}");
        expect(
            &g,
            &f.build(&good),
            XDP_DROP,
            drop(Counter::DropBadUdpLength),
            &what,
        );
        let mut f = v6_from("2001:db8::2");
        f.udp_len_delta = delta;
        let what = format!("IPv6 UDP length off by {delta}");
        expect(
            &g,
            &f.build(&good),
            XDP_DROP,
            drop(Counter::DropBadUdpLength),
            &what,
        );
    }
    let mut f = v4_from("198.18.0.2");
    f.udp_len_delta = -(good.len() as i32) - 3; // 5: under the UDP header
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        drop(Counter::DropBadUdpLength),
        "UDP length 5",
    );

    // IP headers the kernel would drop too.
    let bad_ip = drop(Counter::DropBadIpHeader);
    let mut f = v4_from("198.18.0.2");
    f.ihl = Some(4);
    expect(&g, &f.build(&good), XDP_DROP, bad_ip, "IHL 4");
    let mut f = v4_from("198.18.0.2");
    f.ip_len_delta = 1;
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        bad_ip,
        "IPv4 total length past the frame",
    );
    let mut f = v4_from("198.18.0.2");
    f.ip_version = Some(5);
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        bad_ip,
        "IPv4 ethertype, version 5",
    );
    let mut f = v6_from("2001:db8::2");
    f.ip_len_delta = 1;
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        bad_ip,
        "IPv6 payload length past the frame",
    );
    let mut cut = v4_from("198.18.0.2").build(&good);
    cut.truncate(14 + 10);
    expect(
        &g,
        &cut,
        XDP_DROP,
        bad_ip,
        "a frame cut inside the IPv4 header",
    );

    // A shorter IP length with the UDP length left alone: the UDP length now disagrees.
    let mut f = v4_from("198.18.0.2");
    f.ip_len_delta = -1;
    f.trailer = 1;
    expect(
        &g,
        &f.build(&good),
        XDP_DROP,
        drop(Counter::DropBadUdpLength),
        "IP says less",
    );
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn non_first_fragments_drop_when_configured() {
    let mut s = settings();
    s.drop_all_fragments = true;
    let g = guard("non_first_fragments_drop_when_configured", &s);
    let mut f = Frame::udp(ip("198.18.0.2"), ip(RELAY4), 53);
    f.fragment = Some((100, true));
    let what = "a non-first IPv4 fragment";
    expect(
        &g,
        &f.build(&[1; 64]),
        XDP_DROP,
        Counter::DropFragment as u32,
        what,
    );
    let mut f = Frame::udp(ip("2001:db8::2"), ip(RELAY6), 53);
    f.fragment = Some((100, false));
    let what = "a non-first IPv6 fragment";
    expect(
        &g,
        &f.build(&[1; 64]),
        XDP_DROP,
        Counter::DropFragment as u32,
        what,
    );
}

/// Sends `frame` `n` times, one run each, and returns how many passed.
fn passed(g: &Guard, frame: &[u8], n: usize) -> usize {
    (0..n)
        .filter(|_| g.test_run(frame, 1).unwrap().action == XDP_PASS)
        .count()
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn handshakes_and_data_have_separate_buckets_that_refill() {
    let mut s = settings();
    // 250 ms a packet: slow enough that a loaded machine running the loops below cannot earn
    // an extra packet while they run.
    s.handshake = Rate::new(4, 5).unwrap();
    s.data_packets = Rate::new(4, 10).unwrap();
    let g = guard("handshakes_and_data_have_separate_buckets_that_refill", &s);
    let hs = v4_from("198.18.0.2").build(&bind());
    let dat = v4_from("198.18.0.2").build(&data(100));
    assert_eq!(passed(&g, &hs, 20), 5, "the handshake burst");
    expect(
        &g,
        &hs,
        XDP_DROP,
        Counter::DropRateHandshake as u32,
        "over the rate",
    );
    assert_eq!(passed(&g, &dat, 30), 10, "data has its own bucket");
    expect(
        &g,
        &dat,
        XDP_DROP,
        Counter::DropRateDataPackets as u32,
        "over the rate",
    );
    // Another source is metered on its own.
    let other = v4_from("198.18.0.3").build(&bind());
    assert_eq!(
        passed(&g, &other, 20),
        5,
        "a second source gets its own burst"
    );
    // Refill: 4 a second, so 1.4 s brings back the whole burst of 5 (and no more).
    std::thread::sleep(Duration::from_millis(1400));
    assert_eq!(passed(&g, &hs, 20), 5, "refilled to the burst, not beyond");
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_byte_rate_counts_datagram_bytes() {
    let mut s = settings();
    s.data_bytes = Rate::new(1_000, 3_000).unwrap();
    let g = guard("the_byte_rate_counts_datagram_bytes", &s);
    let big = v4_from("198.18.0.2").build(&data(1000 - HEADER_LEN));
    assert_eq!(
        passed(&g, &big, 10),
        3,
        "3000 bytes of burst: three 1000-byte datagrams"
    );
    expect(
        &g,
        &big,
        XDP_DROP,
        Counter::DropRateDataBytes as u32,
        "over the byte rate",
    );
    // The packet bucket was not charged for the refused ones: small datagrams still pass
    // until the byte bucket is empty too.
    let small = v4_from("198.18.0.9").build(&data(10));
    assert_eq!(
        passed(&g, &small, 10),
        10,
        "another source, small datagrams"
    );
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn ipv6_sources_share_a_bucket_per_prefix() {
    let mut s = settings();
    s.handshake = Rate::new(1, 3).unwrap();
    s.ipv6_prefix_len = 64;
    let g = guard("ipv6_sources_share_a_bucket_per_prefix", &s);
    let a = v6_from("2001:db8:0:1::a").build(&bind());
    let b = v6_from("2001:db8:0:1:ffff::b").build(&bind());
    let c = v6_from("2001:db8:0:2::a").build(&bind());
    assert_eq!(passed(&g, &a, 2), 2);
    assert_eq!(
        passed(&g, &b, 5),
        1,
        "same /64: one left of the shared burst of 3"
    );
    assert_eq!(passed(&g, &c, 5), 3, "another /64: its own burst");
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn cidr_lists_deny_and_allow_by_longest_prefix_and_reload_live() {
    let mut s = settings();
    s.handshake = Rate::new(1, 2).unwrap();
    s.deny = vec![
        "198.18.0.0/16".parse().unwrap(),
        "2001:db8:bad::/48".parse().unwrap(),
    ];
    s.allow = vec!["198.18.7.0/24".parse::<Cidr>().unwrap()];
    let mut g = guard(
        "cidr_lists_deny_and_allow_by_longest_prefix_and_reload_live",
        &s,
    );
    let deny = Counter::DropDenyListed as u32;
    let allowed = Counter::PassAllowListed as u32;
    let d = data(50);
    expect(
        &g,
        &v4_from("198.18.3.3").build(&d),
        XDP_DROP,
        deny,
        "inside the deny /16",
    );
    expect(
        &g,
        &v6_from("2001:db8:bad:1::1").build(&d),
        XDP_DROP,
        deny,
        "deny /48",
    );
    expect(
        &g,
        &v6_from("2001:db8:900::1").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "outside",
    );
    expect(
        &g,
        &v4_from("198.19.0.1").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "outside the /16",
    );
    // The allow /24 inside the deny /16 wins, and skips the meters: ten handshakes pass
    // where the burst is two.
    let bind_allowed = v4_from("198.18.7.7").build(&bind());
    for _ in 0..10 {
        expect(
            &g,
            &bind_allowed,
            XDP_PASS,
            allowed,
            "allow-listed handshake",
        );
    }
    // Allow-listed sources still get the header checks.
    let mut bad = d.clone();
    bad[0] = 0;
    let rule = Counter::malformed_slot(HeaderError::BadMagic);
    expect(
        &g,
        &v4_from("198.18.7.7").build(&bad),
        XDP_DROP,
        rule,
        "allow-listed garbage",
    );
    // Deny-listed traffic to another port is not the guard's business.
    let other = Frame::udp(ip("198.18.3.3"), ip(RELAY4), 53).build(&d);
    expect(
        &g,
        &other,
        XDP_PASS,
        PASS_OTHER,
        "deny-listed source, other port",
    );

    // Reload: the deny /16 goes, a new deny appears; the program never detaches.
    s.deny = vec!["198.19.0.0/16".parse().unwrap()];
    s.allow = Vec::new();
    g.configure(&s, &[PORT]).unwrap();
    expect(
        &g,
        &v4_from("198.18.3.3").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "deny removed",
    );
    expect(
        &g,
        &v4_from("198.19.0.1").build(&d),
        XDP_DROP,
        deny,
        "deny added",
    );
    expect(
        &g,
        &v6_from("2001:db8:bad:1::1").build(&d),
        XDP_PASS,
        PASS_RELAY,
        "v6 removed",
    );
    // The port list was reloaded too: 7001 is no longer a relay port.
    let f = Frame::udp(ip("198.18.3.3"), ip(RELAY4), OTHER_PORT).build(&d);
    expect(
        &g,
        &f,
        XDP_PASS,
        PASS_OTHER,
        "port 7001 dropped from the config",
    );
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn an_unconfigured_guard_passes_everything() {
    let g = load("an_unconfigured_guard_passes_everything", 16);
    let mut garbage = v4_from("198.18.0.2").build(&data(10));
    garbage[14 + 28] = 0; // bad magic
    expect(&g, &garbage, XDP_PASS, PASS_OTHER, "before configure");
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_session_filter_drops_datagrams_for_sessions_the_relay_does_not_hold() {
    let mut s = settings();
    s.session_filter = true;
    let mut g = guard(
        "the_session_filter_drops_datagrams_for_sessions_the_relay_does_not_hold",
        &s,
    );
    use ferry_relay::session::SessionEvent;
    use ferry_relay::shards::SessionObserver;
    let filter = g.session_filter(&[]).unwrap();
    let unknown = Counter::DropUnknownSession as u32;
    let sid = 0x0102_0304_0506_0708; // the session of `datagram()`
    let d = v4_from("198.18.0.2").build(&data(100));
    let ka = v4_from("198.18.0.2").build(&datagram(PacketType::Keepalive, KEEPALIVE_BODY_LEN));
    let rebind = v4_from("198.18.0.2").build(&datagram(PacketType::Rebind, REBIND_BODY_LEN));
    let hs = v4_from("198.18.0.2").build(&bind());
    expect(&g, &d, XDP_DROP, unknown, "DATA before the session exists");
    expect(
        &g,
        &ka,
        XDP_DROP,
        unknown,
        "KEEPALIVE before the session exists",
    );
    expect(
        &g,
        &rebind,
        XDP_DROP,
        unknown,
        "REBIND before the session exists",
    );
    expect(
        &g,
        &hs,
        XDP_PASS,
        PASS_RELAY,
        "BIND opens sessions, so it passes",
    );
    // Slot A bound at the frames' source (198.18.0.2, port 40000).
    let a: std::net::SocketAddr = "198.18.0.2:40000".parse().unwrap();
    filter.session_event(SessionEvent::Bound {
        session: sid,
        slots: [Some(a), None],
        locals: [None, None],
        budgets: [None, None],
    });
    assert!(filter.contains(sid));
    expect(
        &g,
        &d,
        XDP_PASS,
        PASS_RELAY,
        "DATA once the relay holds the session",
    );
    expect(
        &g,
        &rebind,
        XDP_PASS,
        PASS_RELAY,
        "REBIND once the relay holds the session",
    );
    filter.session_event(SessionEvent::Closed(sid));
    assert!(!filter.contains(sid));
    expect(&g, &d, XDP_DROP, unknown, "DATA after the session closed");
    expect(
        &g,
        &ka,
        XDP_DROP,
        unknown,
        "KEEPALIVE after the session closed",
    );
    // Turning the filter off by reload passes them again.
    s.session_filter = false;
    g.configure(&s, &[PORT]).unwrap();
    expect(&g, &d, XDP_PASS, PASS_RELAY, "filter off");
    assert_eq!(g.session_filter_errors(), 0);
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn data_and_keepalives_for_a_held_session_pass_only_from_its_bound_slots() {
    let mut s = settings();
    s.session_filter = true;
    let mut g = guard(
        "data_and_keepalives_for_a_held_session_pass_only_from_its_bound_slots",
        &s,
    );
    use ferry_relay::session::SessionEvent;
    use ferry_relay::shards::SessionObserver;
    let filter = g.session_filter(&[]).unwrap();
    let unbound = Counter::DropUnboundSource as u32;
    let sid = 0x0102_0304_0506_0708; // the session of `datagram()`
    let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (
        "198.18.0.2:40000".parse().unwrap(),
        "[2001:db8::2]:40001".parse().unwrap(),
    );
    let from = |src: &str, port: u16, packet: &[u8]| {
        let mut f = Frame::udp(
            ip(src),
            ip(if src.contains(':') { RELAY6 } else { RELAY4 }),
            PORT,
        );
        f.src_port = port;
        f.build(packet)
    };
    let d = data(100);
    let ka = datagram(PacketType::Keepalive, KEEPALIVE_BODY_LEN);
    let rebind = datagram(PacketType::Rebind, REBIND_BODY_LEN);
    let close = datagram(PacketType::Close, CLOSE_BODY_LEN);
    filter.session_event(SessionEvent::Bound {
        session: sid,
        slots: [Some(a), Some(b)],
        locals: [None, None],
        budgets: [None, None],
    });
    let entry = filter.get(sid).unwrap();
    assert!(entry.slots.iter().all(|s| s.bound == 1));
    for (packet, name) in [(&d, "DATA"), (&ka, "KEEPALIVE")] {
        let what = |from: &str| format!("{name} {from}");
        expect(
            &g,
            &from("198.18.0.2", 40_000, packet),
            XDP_PASS,
            PASS_RELAY,
            &what("from slot A"),
        );
        expect(
            &g,
            &from("2001:db8::2", 40_001, packet),
            XDP_PASS,
            PASS_RELAY,
            &what("from slot B (IPv6)"),
        );
        expect(
            &g,
            &from("198.18.0.2", 40_001, packet),
            XDP_DROP,
            unbound,
            &what("from A's address, another port"),
        );
        expect(
            &g,
            &from("198.18.0.3", 40_000, packet),
            XDP_DROP,
            unbound,
            &what("from another address, A's port"),
        );
        expect(
            &g,
            &from("2001:db8::3", 40_001, packet),
            XDP_DROP,
            unbound,
            &what("from B's /64, another address"),
        );
        expect(
            &g,
            &from("::ffff:198.18.0.2", 40_000, packet),
            XDP_DROP,
            Counter::DropBadIpHeader as u32,
            &what("from A's address, IPv4-mapped in an IPv6 frame (the kernel drops it too)"),
        );
    }
    // REBIND (a peer whose address changed) and CLOSE (proved by its MAC) pass from anywhere.
    expect(
        &g,
        &from("198.18.0.9", 5000, &rebind),
        XDP_PASS,
        PASS_RELAY,
        "REBIND from a new address",
    );
    expect(
        &g,
        &from("198.18.0.9", 5000, &close),
        XDP_PASS,
        PASS_RELAY,
        "CLOSE from a new address",
    );
    // The relay moves slot A: the old address is refused, the new one passes.
    filter.session_event(SessionEvent::Bound {
        session: sid,
        slots: [Some("198.18.0.9:5000".parse().unwrap()), Some(b)],
        locals: [None, None],
        budgets: [None, None],
    });
    expect(
        &g,
        &from("198.18.0.9", 5000, &d),
        XDP_PASS,
        PASS_RELAY,
        "DATA from A's new address",
    );
    expect(
        &g,
        &from("198.18.0.2", 40_000, &d),
        XDP_DROP,
        unbound,
        "DATA from A's old address",
    );
    // Slot B reaped: its address is refused, while the session stays.
    filter.session_event(SessionEvent::Bound {
        session: sid,
        slots: [Some("198.18.0.9:5000".parse().unwrap()), None],
        locals: [None, None],
        budgets: [None, None],
    });
    expect(
        &g,
        &from("2001:db8::2", 40_001, &d),
        XDP_DROP,
        unbound,
        "DATA from B after B was reaped",
    );
    expect(
        &g,
        &from("198.18.0.9", 5000, &ka),
        XDP_PASS,
        PASS_RELAY,
        "KEEPALIVE from A",
    );
    assert_eq!(g.session_filter_errors(), 0);
}

/// A BIND (or REBIND) from `src`:`port` for slot 1 of the session of `datagram()`, carrying
/// `cookie` at its place in the body.
fn handshake_from(packet_type: PacketType, src: &str, port: u16, cookie: [u8; 16]) -> Vec<u8> {
    let body_len = match packet_type {
        PacketType::Bind => BIND_BODY_LEN,
        _ => REBIND_BODY_LEN,
    };
    let mut d = datagram(packet_type, body_len);
    d[HEADER_LEN] = 1;
    d[HEADER_LEN + 12..HEADER_LEN + 28].copy_from_slice(&cookie);
    let relay = if src.contains(':') { RELAY6 } else { RELAY4 };
    let mut f = Frame::udp(ip(src), ip(relay), PORT);
    f.src_port = port;
    f.build(&d)
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn handshakes_with_a_valid_cookie_have_a_meter_forged_ones_cannot_spend() {
    use ferry_core::proof::CookieJar;
    use ferry_core::time::UnixTime;
    let mut s = settings();
    s.handshake = Rate::new(1, 3).unwrap();
    s.handshake_total = Rate::new(1, 6).unwrap();
    let mut g = guard(
        "handshakes_with_a_valid_cookie_have_a_meter_forged_ones_cannot_spend",
        &s,
    );
    let (rate, total, cookie_pass) = (
        Counter::DropRateHandshake as u32,
        Counter::DropRateHandshakeTotal as u32,
        Counter::PassCookie as u32,
    );
    let jar = CookieJar::new([7; 32]);
    let now = UnixTime::from(std::time::SystemTime::now());
    let sid = 0x0102_0304_0506_0708;
    let victim: std::net::SocketAddr = "198.18.0.2:40000".parse().unwrap();
    let cookie = jar.issue(now, sid, 1, victim);
    let bind = PacketType::Bind;
    // Before the relay writes the keys, no cookie counts: a valid one is metered like none.
    expect(
        &g,
        &handshake_from(bind, "198.18.0.9", 1, cookie),
        XDP_PASS,
        PASS_RELAY,
        "no keys yet",
    );
    g.set_cookie_keys(jar.window_keys(now)).unwrap();
    // Forged BINDs in the victim's name (no cookie: the forger cannot receive there) spend
    // its cookie-less meter (burst 3) ...
    let forged = handshake_from(bind, "198.18.0.2", 40_000, [0; 16]);
    for i in 0..3 {
        expect(
            &g,
            &forged,
            XDP_PASS,
            PASS_RELAY,
            &format!("cookie-less BIND {i}"),
        );
    }
    expect(
        &g,
        &forged,
        XDP_DROP,
        rate,
        "cookie-less BIND over the source's rate",
    );
    // ... and a made-up cookie or one for another port or slot is no better ...
    let made_up = handshake_from(bind, "198.18.0.2", 40_000, [0x5a; 16]);
    expect(
        &g,
        &made_up,
        XDP_DROP,
        rate,
        "a made-up cookie is metered as none",
    );
    let other_port = handshake_from(bind, "198.18.0.2", 40_001, cookie);
    expect(
        &g,
        &other_port,
        XDP_DROP,
        rate,
        "the cookie of another port",
    );
    // ... but the victim's own BIND with its cookie has a meter of its own.
    let genuine = handshake_from(bind, "198.18.0.2", 40_000, cookie);
    for i in 0..3 {
        expect(
            &g,
            &genuine,
            XDP_PASS,
            cookie_pass,
            &format!("BIND with a valid cookie {i}"),
        );
    }
    expect(
        &g,
        &genuine,
        XDP_DROP,
        rate,
        "the victim's own handshakes are still metered",
    );
    // Cookie-less handshakes from many sources exhaust the relay-wide budget (burst 6: the
    // first BIND above from .9 and the victim's three took four of it); ones with a valid cookie
    // do not wait for it. A REBIND's cookie is for its new address, checked the same way.
    expect(
        &g,
        &handshake_from(bind, "198.18.0.10", 1, [0; 16]),
        XDP_PASS,
        PASS_RELAY,
        "budget 5",
    );
    expect(
        &g,
        &handshake_from(bind, "198.18.0.11", 1, [0; 16]),
        XDP_PASS,
        PASS_RELAY,
        "budget 6",
    );
    expect(
        &g,
        &handshake_from(bind, "198.18.0.12", 1, [0; 16]),
        XDP_DROP,
        total,
        "budget spent",
    );
    let moved: std::net::SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
    let rebind_cookie = jar.issue(now, sid, 1, moved);
    let rebind = handshake_from(PacketType::Rebind, "2001:db8::7", 5000, rebind_cookie);
    expect(
        &g,
        &rebind,
        XDP_PASS,
        cookie_pass,
        "a REBIND with a valid cookie, budget spent",
    );
    // Keys of a window long gone no longer count.
    let old = UnixTime(now.as_secs() - 3600);
    g.set_cookie_keys(jar.window_keys(old)).unwrap();
    expect(
        &g,
        &rebind,
        XDP_DROP,
        total,
        "a cookie of a window the guard no longer holds",
    );
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn a_relay_wide_handshake_budget_caps_many_sources_each_under_their_own_rate() {
    let mut s = settings();
    s.handshake = Rate::new(100, 10).unwrap();
    s.handshake_total = Rate::new(1, 25).unwrap();
    let g = guard("a_relay_wide_handshake_budget_caps_many_sources", &s);
    let mut admitted = 0;
    for host in 0..10u8 {
        let f = v4_from(&format!("198.18.1.{}", host + 10)).build(&bind());
        admitted += passed(&g, &f, 5);
    }
    assert_eq!(
        admitted, 25,
        "ten sources, five each, all under their own burst of 10"
    );
    let f = v4_from("198.18.1.99").build(&bind());
    expect(
        &g,
        &f,
        XDP_DROP,
        Counter::DropRateHandshakeTotal as u32,
        "a new source, budget spent",
    );
    // DATA is not charged to the handshake budget.
    expect(
        &g,
        &v4_from("198.18.1.99").build(&data(10)),
        XDP_PASS,
        PASS_RELAY,
        "DATA",
    );
}

/// The guard and the relay's parser run the same `check_header`; this checks it end to end:
/// for random datagrams (random bytes, and valid headers with one field changed), the
/// program's verdict in the kernel is exactly what `check_header` says on the host.
#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_kernel_verdict_matches_the_host_header_check_on_random_datagrams() {
    let g = guard(
        "the_kernel_verdict_matches_the_host_header_check_on_random_datagrams",
        &settings(),
    );
    use ferry_common::header::parse_header;
    let rng = ring::rand::SystemRandom::new();
    let mut seen = std::collections::HashSet::new();
    for round in 0..3000u32 {
        let mut r = [0u8; 8];
        ring::rand::SecureRandom::fill(&rng, &mut r).unwrap();
        let len = usize::from(u16::from_be_bytes([r[0], r[1]])) % 1500;
        let mut payload = vec![0u8; len];
        ring::rand::SecureRandom::fill(&rng, &mut payload).unwrap();
        if round % 2 == 0 && len >= HEADER_LEN {
            // Start from a valid header for this length and break one byte of it (or none),
            // so the deeper rules are reached too, not only the magic.
            let ty = PacketType::ALL[usize::from(r[2]) % PacketType::ALL.len()];
            let mut first = [0u8; HEADER_LEN];
            Header {
                packet_type: ty,
                session_id: u64::from(r[3]) + 1,
                body_len: (len - HEADER_LEN) as u16,
            }
            .write(&mut first);
            if r[4] % 3 != 0 {
                first[usize::from(r[5]) % HEADER_LEN] ^= r[6] | 1;
            }
            payload[..HEADER_LEN].copy_from_slice(&first);
        }
        let expected = match parse_header(&payload) {
            Err(rule) => (XDP_DROP, Counter::malformed_slot(rule)),
            Ok(h) if !h.packet_type.sent_by_peer() => {
                (XDP_DROP, Counter::DropUnexpectedType as u32)
            }
            Ok(_) => (XDP_PASS, PASS_RELAY),
        };
        seen.insert(expected.1);
        let frame = v4_from(&format!("198.18.{}.{}", r[6], r[7])).build(&payload);
        expect(
            &g,
            &frame,
            expected.0,
            expected.1,
            &format!("round {round}, {len} bytes"),
        );
    }
    // Every rule and both outcomes were exercised.
    assert!(seen.len() >= HeaderError::COUNT, "outcomes seen: {seen:?}");
}

/// `ip -d link show dev <interface>` in namespace `ns`: the XDP attachment shows as `xdp` or
/// `xdpgeneric`.
fn link_details(ns: &str, interface: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", interface])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn attach_modes_fall_back_as_configured_and_dropping_the_guard_detaches() {
    let mut g = load("attach_modes_fall_back", 16);
    let topo = Topology::new().unwrap();
    let ns = topo.relay_ns.clone();
    type Attach<'a> = &'a mut (dyn FnMut() -> Result<ferry_relay::xdp::Attachment, String> + Send);
    let in_ns = |f: Attach<'_>| in_ns(&ns, f).unwrap();
    g.configure(&settings(), &[PORT]).unwrap();

    // Loopback has no native XDP: `native` fails with a clear error, `auto` falls back.
    let err = in_ns(&mut || g.attach("lo", Mode::Native).map_err(|e| e.to_string())).unwrap_err();
    assert!(err.contains("lo") && err.contains("native"), "{err}");
    assert!(
        err.contains("os error"),
        "the kernel's errno is shown: {err}"
    );
    assert!(err.contains("cannot run XDP natively"), "{err}");
    let mode = in_ns(&mut || g.attach("lo", Mode::Auto).map_err(|e| e.to_string())).unwrap();
    assert_eq!(mode, ferry_relay::xdp::Attachment::Generic);
    assert!(
        link_details(&ns, "lo").contains("xdpgeneric"),
        "attached in generic mode"
    );

    // The veth has a native driver: `native` attaches there.
    let relay_if = topo.relay_if.clone();
    let mode = in_ns(&mut || g.attach(&relay_if, Mode::Native).map_err(|e| e.to_string())).unwrap();
    assert_eq!(mode, ferry_relay::xdp::Attachment::Native);
    let details = link_details(&ns, &relay_if);
    assert!(
        details.contains("xdp") && !details.contains("xdpgeneric"),
        "{details}"
    );
    assert_eq!(g.attached().len(), 2);

    // A second guard on the same veth: the error says another program holds it, and `auto`
    // does not blame the driver by falling back to generic mode.
    let mut second = load("attach_modes_busy", 16);
    second.configure(&settings(), &[PORT]).unwrap();
    let err = in_ns(&mut || {
        second
            .attach(&relay_if, Mode::Auto)
            .map_err(|e| e.to_string())
    })
    .unwrap_err();
    assert!(
        err.contains("another XDP program is already attached") && err.contains("os error 16"),
        "{err}"
    );
    drop(second);

    // An interface that does not exist is an error naming it.
    let err =
        in_ns(&mut || g.attach("nosuch0", Mode::Auto).map_err(|e| e.to_string())).unwrap_err();
    assert!(err.contains("nosuch0"), "{err}");

    // Dropping the guard detaches it everywhere.
    drop(g);
    assert!(!link_details(&ns, "lo").contains("xdp"), "detached from lo");
    assert!(
        !link_details(&ns, &relay_if).contains("xdp"),
        "detached from the veth"
    );
}

/// Random whole frames — random bytes after a random choice of IPv4, IPv6 or VLAN ethertype,
/// and mutations of valid frames at every byte — each get exactly one verdict and one counter,
/// never an aborted run.
#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn random_frames_get_exactly_one_verdict_each() {
    let g = guard("random_frames_get_exactly_one_verdict_each", &settings());
    let rng = ring::rand::SystemRandom::new();
    let fill = |buf: &mut [u8]| ring::rand::SecureRandom::fill(&rng, buf).unwrap();
    let valid4 = v4_from("198.18.0.2").build(&data(64));
    let valid6 = v6_from("2001:db8::2").build(&data(64));
    for round in 0..2000usize {
        let mut r = [0u8; 4];
        fill(&mut r);
        let frame = match round % 3 {
            0 => {
                let mut f = vec![0u8; 14 + usize::from(r[0]) % 200];
                fill(&mut f);
                let ethertype: [u8; 2] = match r[1] % 3 {
                    0 => [0x08, 0x00],
                    1 => [0x86, 0xdd],
                    _ => [0x81, 0x00],
                };
                f[12..14].copy_from_slice(&ethertype);
                f
            }
            1 => {
                let mut f = valid4.clone();
                let at = 14 + usize::from(u16::from_be_bytes([r[0], r[1]])) % (f.len() - 14);
                f[at] ^= r[2] | 1;
                f
            }
            _ => {
                let mut f = valid6.clone();
                let at = 14 + usize::from(u16::from_be_bytes([r[0], r[1]])) % (f.len() - 14);
                f[at] ^= r[2] | 1;
                f
            }
        };
        let before = g.counters().unwrap();
        let outcome = g.test_run(&frame, 1).unwrap();
        let after = g.counters().unwrap();
        assert!(
            outcome.action == XDP_PASS || outcome.action == XDP_DROP,
            "round {round}: action {}",
            outcome.action
        );
        let changed = moved(&before, &after);
        assert_eq!(changed.len(), 1, "round {round}: {changed:?}");
        let (action, _, bytes) = changed[0];
        assert_eq!(
            action == "pass",
            outcome.action == XDP_PASS,
            "round {round}"
        );
        assert_eq!(bytes, frame.len() as u64);
    }
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words (an odd last byte padded
/// with zero), not folded: the checksum arithmetic of RFC 1071, written here apart from the
/// program's.
fn ones_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn folded(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A cookie-less BIND (or REBIND) of slot 1 with bind sequence number `seq`, keeping every
/// body rule (a BIND's token length is 208), from `src`:`port` to `dst`.
fn first_attempt(packet_type: PacketType, src: &str, port: u16, dst: &str, seq: u64) -> Vec<u8> {
    let body_len = match packet_type {
        PacketType::Bind => BIND_BODY_LEN,
        _ => REBIND_BODY_LEN,
    };
    let mut d = datagram(packet_type, body_len);
    d[HEADER_LEN] = 1;
    if packet_type == PacketType::Bind {
        d[HEADER_LEN + 2..HEADER_LEN + 4].copy_from_slice(&208u16.to_be_bytes());
    }
    d[HEADER_LEN + 4..HEADER_LEN + 12].copy_from_slice(&seq.to_be_bytes());
    let mut f = Frame::udp(ip(src), ip(dst), PORT);
    f.src_port = port;
    f.build(&d)
}

/// Checks that `out` is the CHALLENGE the relay would send in answer to `request` (built by
/// [`first_attempt`] from `src`:`port` with `seq`): the request's frame turned around
/// (Ethernet addresses, IP addresses, UDP ports swapped), a fresh IP header (TTL or hop limit
/// of the host's default), correct IPv4 and UDP checksums, and as UDP payload exactly what
/// `ferry_core::wire::encode_challenge` writes for the cookie `jar` issues now.
fn check_challenge(
    out: &[u8],
    request: &[u8],
    src: std::net::SocketAddr,
    seq: u64,
    jar: &ferry_core::proof::CookieJar,
    now: ferry_core::time::UnixTime,
) {
    use ferry_core::wire::{ChallengeFields, encode_challenge};
    let mut want = [0u8; 64];
    let fields = ChallengeFields {
        bind_seq: seq,
        cookie: jar.issue(now, 0x0102_0304_0506_0708, 1, src),
    };
    let n = encode_challenge(&mut want, 0x0102_0304_0506_0708, &fields).unwrap();
    let want = &want[..n];
    assert_eq!(&out[..6], &request[6..12], "to the request's source MAC");
    assert_eq!(&out[6..12], &request[..6], "from the MAC it was sent to");
    assert_eq!(&out[12..14], &request[12..14], "same EtherType");
    let (udp, addresses) = if src.is_ipv4() {
        let ip = &out[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 20 + 8 + n);
        assert_eq!(&ip[6..8], &[0x40, 0], "DF, not a fragment");
        let ttl: u8 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(ip[8], ttl);
        assert_eq!(ip[9], 17);
        assert_eq!(folded(ones_sum(ip)), 0xffff, "IPv4 header checksum");
        assert_eq!(
            &ip[12..16],
            &request[30..34],
            "from the relay address asked"
        );
        assert_eq!(&ip[16..20], &request[26..30], "to the requester");
        (34, ones_sum(&ip[12..20]))
    } else {
        let ip = &out[14..54];
        assert_eq!(&ip[..4], &[0x60, 0, 0, 0]);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]) as usize, 8 + n);
        assert_eq!(ip[6], 17);
        let hops: u8 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/hop_limit")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(ip[7], hops);
        assert_eq!(&ip[8..24], &request[38..54], "from the relay address asked");
        assert_eq!(&ip[24..40], &request[22..38], "to the requester");
        (54, ones_sum(&ip[8..40]))
    };
    assert_eq!(out.len(), udp + 8 + n, "nothing after the CHALLENGE");
    assert_eq!(
        &out[udp..udp + 2],
        &request[udp + 2..udp + 4],
        "from the relay port"
    );
    assert_eq!(
        &out[udp + 2..udp + 4],
        &src.port().to_be_bytes(),
        "to the source port"
    );
    assert_eq!(
        u16::from_be_bytes([out[udp + 4], out[udp + 5]]) as usize,
        8 + n
    );
    let pseudo = addresses + 17 + (8 + n) as u64;
    assert_ne!(&out[udp + 6..udp + 8], &[0, 0], "a UDP checksum is there");
    assert_eq!(
        folded(pseudo + ones_sum(&out[udp..])),
        0xffff,
        "UDP checksum"
    );
    assert_eq!(&out[udp + 8..], want, "the CHALLENGE the relay would send");
    // And the relay takes the cookie back.
    assert!(jar.check(now, &fields.cookie, 0x0102_0304_0506_0708, 1, src));
}

#[test]
#[cfg_attr(not(ferry_skip_ebpf), ignore = "needs root: loads the XDP program")]
#[cfg_attr(
    ferry_skip_ebpf,
    ignore = "built with FERRY_SKIP_EBPF=1: no XDP program"
)]
fn the_guard_answers_cookie_less_handshakes_with_the_relays_challenge_itself() {
    use ferry_core::proof::CookieJar;
    use ferry_core::time::UnixTime;
    use ferry_relay::xdp::Reply;
    let test = "the_guard_answers_cookie_less_handshakes_with_the_relays_challenge_itself";
    let mut s = settings();
    s.answer_challenges = true;
    s.handshake = Rate::new(1, 3).unwrap();
    // A relay-wide budget of one: what the guard answers itself does not spend it.
    s.handshake_total = Rate::new(1, 1).unwrap();
    let mut g = guard(test, &s);
    let jar = CookieJar::new([7; 32]);
    let now = UnixTime::from(std::time::SystemTime::now());
    g.set_cookie_keys(jar.window_keys(now)).unwrap();
    let (total, rate) = (
        Counter::DropRateHandshakeTotal as u32,
        Counter::DropRateHandshake as u32,
    );
    // The interface the test runs name is the loopback device (index 1): until the relay
    // says the guard may send out of it, and which addresses are its own, the relay answers.
    let lo = 1;
    let bind = first_attempt(PacketType::Bind, "198.18.0.2", 40_000, RELAY4, 77);
    expect(
        &g,
        &bind,
        XDP_PASS,
        PASS_RELAY,
        "no interface to answer on yet",
    );
    g.reply_on(lo, Reply::Tx).unwrap();
    let other = first_attempt(PacketType::Bind, "198.18.0.3", 40_000, RELAY4, 77);
    expect(
        &g,
        &other,
        XDP_DROP,
        total,
        "no relay address yet: the budget",
    );
    g.set_relay_addresses(&[
        format!("{RELAY4}:{PORT}").parse().unwrap(),
        format!("[{RELAY6}]:{PORT}").parse().unwrap(),
    ])
    .unwrap();

    // IPv4 and IPv6, BIND and REBIND: answered in XDP, byte for byte as the relay would.
    for (packet_type, src, relay) in [
        (PacketType::Bind, "198.18.0.4", RELAY4),
        (PacketType::Rebind, "198.18.0.5", RELAY4),
        (PacketType::Bind, "2001:db8::4", RELAY6),
        (PacketType::Rebind, "2001:db8:0:1::5", RELAY6),
    ] {
        let request = first_attempt(packet_type, src, 40_001, relay, 0x1122_3344_5566_7788);
        let before = g.counters().unwrap();
        let (action, out) = g.test_run_on(&request, lo).unwrap();
        let moved = moved(&before, &g.counters().unwrap());
        assert_eq!(action, 3, "{packet_type:?} from {src}: XDP_TX");
        assert_eq!(moved, vec![("tx", "challenge", request.len() as u64)]);
        let source = std::net::SocketAddr::new(ip(src), 40_001);
        check_challenge(&out, &request, source, 0x1122_3344_5566_7788, &jar, now);
    }

    // What the relay would not answer with a CHALLENGE, the guard does not answer either: a
    // broken body rule (the relay drops it), another destination address, a VLAN tag or IP
    // options (left to the relay), a valid cookie (the relay's business).
    let mut bad_slot = first_attempt(PacketType::Bind, "198.18.0.6", 1, RELAY4, 1);
    bad_slot[42 + HEADER_LEN] = 2;
    let mut bad_token_len = first_attempt(PacketType::Bind, "198.18.0.6", 2, RELAY4, 1);
    bad_token_len[42 + HEADER_LEN + 3] = 207;
    let mut bad_reserved = first_attempt(PacketType::Rebind, "198.18.0.6", 3, RELAY4, 1);
    bad_reserved[42 + HEADER_LEN + 2] = 1;
    let elsewhere = first_attempt(PacketType::Bind, "198.18.0.6", 4, "198.18.0.99", 1);
    for (frame, what) in [
        (&bad_slot, "slot 2"),
        (&bad_token_len, "token length 207"),
        (&bad_reserved, "a reserved byte set"),
        (&elsewhere, "not a relay address"),
    ] {
        let (action, _) = g.test_run_on(frame, lo).unwrap();
        assert_ne!(action, 3, "{what}: answered");
    }
    let valid = {
        let source: std::net::SocketAddr = "198.18.0.7:5000".parse().unwrap();
        let mut f = first_attempt(PacketType::Bind, "198.18.0.7", 5000, RELAY4, 1);
        let cookie = jar.issue(now, 0x0102_0304_0506_0708, 1, source);
        f[42 + HEADER_LEN + 12..42 + HEADER_LEN + 28].copy_from_slice(&cookie);
        f
    };
    expect(
        &g,
        &valid,
        XDP_PASS,
        Counter::PassCookie as u32,
        "a valid cookie",
    );

    // Each source still gets at most its handshake rate of answers (burst 3).
    let flood = first_attempt(PacketType::Bind, "198.18.0.8", 9, RELAY4, 1);
    for i in 0..3 {
        let (action, _) = g.test_run_on(&flood, lo).unwrap();
        assert_eq!(action, 3, "answer {i}");
    }
    expect(&g, &flood, XDP_DROP, rate, "over the source's rate");

    // On a veth the answer leaves by a redirect back out of it.
    g.reply_on(lo, Reply::Redirect).unwrap();
    let request = first_attempt(PacketType::Bind, "198.18.0.9", 40_002, RELAY4, 5);
    let before = g.counters().unwrap();
    let (action, out) = g.test_run_on(&request, lo).unwrap();
    assert_eq!(action, 4, "XDP_REDIRECT");
    assert_eq!(
        moved(&before, &g.counters().unwrap()),
        vec![("redirect", "challenge", request.len() as u64)]
    );
    check_challenge(
        &out,
        &request,
        "198.18.0.9:40002".parse().unwrap(),
        5,
        &jar,
        now,
    );

    // Switched off by the config, the relay answers again (within the relay-wide budget).
    s.answer_challenges = false;
    g.configure(&s, &[PORT, OTHER_PORT]).unwrap();
    let again = first_attempt(PacketType::Bind, "198.18.0.10", 1, RELAY4, 1);
    let (action, _) = g.test_run_on(&again, lo).unwrap();
    assert_ne!(action, 3, "answered with the switch off");
    assert_ne!(action, 4, "answered with the switch off");
}
