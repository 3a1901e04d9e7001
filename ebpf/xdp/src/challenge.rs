//! The guard's own CHALLENGEs: a BIND or REBIND without an address cookie valid for its
//! source is answered from XDP with exactly the CHALLENGE the relay would send (protocol.md
//! §3.2, §5), rewritten in place from the request's frame and sent back out of the interface
//! it came in on. The relay never sees such a request, so a flood of them from spoofed sources
//! costs the relay nothing and needs no relay-wide budget: each source still gets at most its
//! handshake rate of answers, and an answer (82 bytes on the wire over IPv4, 102 over IPv6) is
//! never larger than the request it answers (a BIND is 310 or 330 bytes, a REBIND 102 or 122).
//!
//! The guard answers only what it can answer exactly as the relay would: a request the header
//! and body rules accept, addressed to one of the relay's listen addresses, in a frame without
//! VLAN tags, IPv4 options or IPv6 extension headers, on an interface in
//! [`REPLY_IFACES`], once the relay has written the cookie keys ([`answerable`]). Everything
//! else goes to the relay as before.

use aya_ebpf::bindings::xdp_action::{XDP_PASS, XDP_REDIRECT, XDP_TX};
use aya_ebpf::helpers::{bpf_redirect, bpf_xdp_adjust_tail};
use aya_ebpf::macros::map;
use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::XdpContext;
use ferry_common::cookie::{cookie, cookie_input};
use ferry_common::header::{CHALLENGE_BODY_LEN, HEADER_LEN, PacketType, handshake_body_ok};
use ferry_common::xdp::{
    CookieKeys, Counter, FLAG_CHALLENGE, GuardConfig, MAX_FAST_IFACES, MAX_RELAY_ADDRS,
    REPLY_REDIRECT,
};

use crate::{ETH_HLEN, IPV6_HLEN, L4, UDP_HLEN, ipv4_mapped};

/// The interfaces the guard answers on, and how ([`REPLY_TX`](ferry_common::xdp::REPLY_TX),
/// [`REPLY_REDIRECT`]).
#[map(name = "REPLY_IFACES")]
static REPLY_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_FAST_IFACES, 0);

/// The relay's listen addresses (IPv4-mapped for IPv4; the unspecified address of a family
/// stands for all of its addresses).
#[map(name = "RELAY_ADDRS")]
static RELAY_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_RELAY_ADDRS, 0);

const IPPROTO_UDP: u8 = 17;
/// The CHALLENGE datagram: header and body.
const CHALLENGE_LEN: usize = HEADER_LEN + CHALLENGE_BODY_LEN;
/// Its UDP length.
const CHALLENGE_UDP_LEN: usize = UDP_HLEN + CHALLENGE_LEN;
/// The answer's frame: Ethernet, IPv4 without options, UDP, the CHALLENGE.
const V4_FRAME: usize = ETH_HLEN + 20 + CHALLENGE_UDP_LEN;
/// The answer's frame over IPv6.
const V6_FRAME: usize = ETH_HLEN + IPV6_HLEN + CHALLENGE_UDP_LEN;
/// `::ffff:0.0.0.0`, the key standing for every IPv4 address.
const ANY_V4: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
/// `::`, the key standing for every IPv6 address.
const ANY_V6: [u8; 16] = [0; 16];

/// A request the guard answers: how the answer leaves
/// ([`REPLY_TX`](ferry_common::xdp::REPLY_TX) or [`REPLY_REDIRECT`]) and whether it came over
/// IPv4. The rest is read from the frame again when the answer is made,
/// at offsets [`answerable`] made sure of, so that the guard's stack need not carry it.
pub struct Request {
    /// [`REPLY_TX`](ferry_common::xdp::REPLY_TX) or [`REPLY_REDIRECT`].
    pub how: u32,
    /// IPv4 (else IPv6).
    pub v4: bool,
}

/// Whether the guard may answer this request itself: `packet_type` (BIND or REBIND, without a
/// valid cookie) with body fields `body` (its first 28 bytes) in the frame `l4` describes; see
/// the module's documentation for the conditions. `None` leaves it to the relay.
#[inline(always)]
pub fn answerable(
    ctx: &XdpContext,
    cfg: &GuardConfig,
    l4: &L4,
    packet_type: PacketType,
    body: &[u8; 28],
    keys: &CookieKeys,
) -> Option<Request> {
    if cfg.flags & FLAG_CHALLENGE == 0 || keys.set != 1 {
        return None;
    }
    if l4.ip_offset != ETH_HLEN || l4.ip_options {
        return None;
    }
    if !handshake_body_ok(packet_type, [body[0], body[1], body[2], body[3]]) {
        return None;
    }
    // SAFETY: a plain value read from map memory valid for this run.
    let how = *unsafe { REPLY_IFACES.get(ctx.ingress_ifindex() as u32) }?;
    let (dest, any) = match l4.v4 {
        Some(_) => {
            let d = crate::read::<[u8; 4]>(ctx, l4.ip_offset + 16)?;
            (ipv4_mapped(d), &ANY_V4)
        }
        None => (crate::read::<[u8; 16]>(ctx, l4.ip_offset + 24)?, &ANY_V6),
    };
    // SAFETY: as above.
    if unsafe { RELAY_ADDRS.get(dest) }.is_none() && unsafe { RELAY_ADDRS.get(any) }.is_none() {
        return None;
    }
    Some(Request {
        how,
        v4: l4.v4.is_some(),
    })
}

/// What the CHALLENGE needs from the request, read from the frame `answerable` accepted
/// (no VLAN tags, no IP options or extension headers, so at fixed offsets).
struct Fields {
    session_id: u64,
    slot: u8,
    seq: [u8; 8],
    source: [u8; 16],
    src_port: u16,
}

#[inline(always)]
fn fields<const N: usize>(ctx: &XdpContext, v4: bool) -> Option<Fields> {
    // Ethernet, IP, UDP, the relay header and the body's first 12 bytes, in one read.
    let h = crate::read::<[u8; N]>(ctx, 0)?;
    let udp = if v4 {
        ETH_HLEN + 20
    } else {
        ETH_HLEN + IPV6_HLEN
    };
    let payload = udp + UDP_HLEN;
    let source = if v4 {
        ipv4_mapped([
            h[ETH_HLEN + 12],
            h[ETH_HLEN + 13],
            h[ETH_HLEN + 14],
            h[ETH_HLEN + 15],
        ])
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&h[ETH_HLEN + 8..ETH_HLEN + 24]);
        a
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[payload + 4..payload + 12]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[payload + HEADER_LEN + 4..payload + HEADER_LEN + 12]);
    Some(Fields {
        session_id: u64::from_be_bytes(id),
        slot: h[payload + HEADER_LEN],
        seq,
        source,
        src_port: u16::from_be_bytes([h[udp], h[udp + 1]]),
    })
}

/// Ethernet, IPv4, UDP, relay header, the body's first 12 bytes.
const V4_READ: usize = ETH_HLEN + 20 + UDP_HLEN + HEADER_LEN + 12;
/// The same over IPv6.
const V6_READ: usize = ETH_HLEN + IPV6_HLEN + UDP_HLEN + HEADER_LEN + 12;

/// Rewrites the request's frame into its CHALLENGE and sends it back: the verdict and its
/// counter. The frame is cut to the answer's length first; if the kernel refuses that, the
/// frame is still the request, untouched, and goes to the relay.
#[inline(always)]
pub fn answer(ctx: &XdpContext, cfg: &GuardConfig, keys: &CookieKeys, req: &Request) -> (u32, u32) {
    let read = if req.v4 {
        fields::<V4_READ>(ctx, true)
    } else {
        fields::<V6_READ>(ctx, false)
    };
    let Some(req_fields) = read else {
        return (XDP_PASS, Counter::PassRelay as u32);
    };
    let f = &req_fields;
    let input = cookie_input(f.session_id, f.slot, &f.source, f.src_port);
    // The current window's key: the relay writes the previous, current and next window's.
    let given = cookie(&keys.keys[1], &input);
    let want = if req.v4 { V4_FRAME } else { V6_FRAME };
    let delta = want as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context is this run's; the helper checks the new length itself.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return (XDP_PASS, Counter::PassRelay as u32);
    }
    let written = if req.v4 {
        write_v4(ctx, cfg, f, &given)
    } else {
        write_v6(ctx, cfg, f, &given)
    };
    if written.is_none() {
        // Only if the kernel's new length were not the one asked for. The frame is no longer
        // the request, so it must not reach the relay.
        return (
            aya_ebpf::bindings::xdp_action::XDP_DROP,
            Counter::DropChallengeFailed as u32,
        );
    }
    if req.how == REPLY_REDIRECT {
        // SAFETY: the helper has no preconditions; it returns XDP_REDIRECT or XDP_ABORTED.
        let action = unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32;
        if action == XDP_REDIRECT {
            return (action, Counter::ChallengeRedirect as u32);
        }
        return (
            aya_ebpf::bindings::xdp_action::XDP_DROP,
            Counter::DropChallengeFailed as u32,
        );
    }
    // Otherwise REPLY_TX: the relay writes no third value.
    (XDP_TX, Counter::ChallengeTx as u32)
}

/// The relay header and body of the CHALLENGE, at `at` in `h`.
#[inline(always)]
fn write_challenge<const N: usize>(h: &mut [u8; N], at: usize, req: &Fields, given: &[u8; 16]) {
    h[at] = 0x46;
    h[at + 1] = 0x52;
    h[at + 2] = 1;
    h[at + 3] = PacketType::Challenge as u8;
    h[at + 4..at + 12].copy_from_slice(&req.session_id.to_be_bytes());
    h[at + 12..at + 14].copy_from_slice(&(CHALLENGE_BODY_LEN as u16).to_be_bytes());
    h[at + 14] = 0;
    h[at + 15] = 0;
    h[at + 16..at + 24].copy_from_slice(&req.seq);
    h[at + 24..at + 40].copy_from_slice(given);
}

/// Swaps the `len`-byte fields at `a` and `b` of `h`.
#[inline(always)]
fn swap<const N: usize>(h: &mut [u8; N], a: usize, b: usize, len: usize) {
    for i in 0..len {
        h.swap(a + i, b + i);
    }
}

/// The UDP header (ports swapped, length, checksum 0 for now) at `udp`.
#[inline(always)]
fn write_udp<const N: usize>(h: &mut [u8; N], udp: usize) {
    swap(h, udp, udp + 2, 2);
    h[udp + 4..udp + 6].copy_from_slice(&(CHALLENGE_UDP_LEN as u16).to_be_bytes());
    h[udp + 6] = 0;
    h[udp + 7] = 0;
}

/// The UDP checksum of the datagram at `udp` with the pseudo-header's addresses summing to
/// `addresses`: computed in full, as the answer's bytes are all new.
#[inline(always)]
fn udp_checksum<const N: usize>(h: &[u8; N], addresses: u32, udp: usize) -> [u8; 2] {
    let sum = addresses
        + u32::from(IPPROTO_UDP)
        + CHALLENGE_UDP_LEN as u32
        + crate::fast::sum16(h, udp, CHALLENGE_UDP_LEN);
    let c = !crate::fast::fold(sum);
    // 0 means "no checksum" in UDP; the same value is sent as 0xffff.
    if c == 0 {
        [0xff, 0xff]
    } else {
        c.to_be_bytes()
    }
}

#[inline(always)]
fn write_v4(ctx: &XdpContext, cfg: &GuardConfig, req: &Fields, given: &[u8; 16]) -> Option<()> {
    let start = ctx.data();
    if start + V4_FRAME > ctx.data_end() {
        return None;
    }
    // SAFETY: the whole answer lies inside the frame (checked just above), which this run
    // owns; byte arrays need no alignment.
    let h = unsafe { &mut *(start as *mut [u8; V4_FRAME]) };
    let ip = ETH_HLEN;
    let udp = ip + 20;
    swap(h, 0, 6, 6);
    h[ip] = 0x45;
    h[ip + 1] = 0;
    h[ip + 2..ip + 4].copy_from_slice(&((20 + CHALLENGE_UDP_LEN) as u16).to_be_bytes());
    // Identification 0 and Don't Fragment, as Linux sends a datagram that fits the path.
    h[ip + 4] = 0;
    h[ip + 5] = 0;
    h[ip + 6] = 0x40;
    h[ip + 7] = 0;
    h[ip + 8] = cfg.ttl;
    h[ip + 9] = IPPROTO_UDP;
    h[ip + 10] = 0;
    h[ip + 11] = 0;
    swap(h, ip + 12, ip + 16, 4);
    let ip_check = !crate::fast::fold(crate::fast::sum16(h, ip, 20));
    h[ip + 10..ip + 12].copy_from_slice(&ip_check.to_be_bytes());
    write_udp(h, udp);
    write_challenge(h, udp + UDP_HLEN, req, given);
    let check = udp_checksum(h, crate::fast::sum16(h, ip + 12, 8), udp);
    h[udp + 6..udp + 8].copy_from_slice(&check);
    Some(())
}

#[inline(always)]
fn write_v6(ctx: &XdpContext, cfg: &GuardConfig, req: &Fields, given: &[u8; 16]) -> Option<()> {
    let start = ctx.data();
    if start + V6_FRAME > ctx.data_end() {
        return None;
    }
    // SAFETY: as in `write_v4`.
    let h = unsafe { &mut *(start as *mut [u8; V6_FRAME]) };
    let ip = ETH_HLEN;
    let udp = ip + IPV6_HLEN;
    swap(h, 0, 6, 6);
    // Version 6, traffic class 0, flow label 0.
    h[ip] = 0x60;
    h[ip + 1] = 0;
    h[ip + 2] = 0;
    h[ip + 3] = 0;
    h[ip + 4..ip + 6].copy_from_slice(&(CHALLENGE_UDP_LEN as u16).to_be_bytes());
    h[ip + 6] = IPPROTO_UDP;
    h[ip + 7] = cfg.hop_limit;
    swap(h, ip + 8, ip + 24, 16);
    write_udp(h, udp);
    write_challenge(h, udp + UDP_HLEN, req, given);
    let check = udp_checksum(h, crate::fast::sum16(h, ip + 8, 32), udp);
    h[udp + 6..udp + 8].copy_from_slice(&check);
    Some(())
}
