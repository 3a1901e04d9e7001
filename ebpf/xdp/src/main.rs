//! Ferry's XDP guard. For every frame on the relay's interfaces:
//!
//! 1. parse Ethernet (up to two VLAN tags), IPv4 (with options) or IPv6 (with up to
//!    [`MAX_EXT_HEADERS`] extension headers) and UDP; anything that is not UDP to a relay port
//!    passes untouched (`pass/not_relay`);
//! 2. drop relay traffic that is fragmented or whose IP/UDP lengths disagree;
//! 3. drop deny-listed sources (LPM tries; an allow entry exempts from metering);
//! 4. drop datagrams that break the stateless header rules of docs/protocol.md §2.1 — the very
//!    same `ferry_common::header::check_header` the relay's userspace parser runs — and
//!    relay-only types sent to the relay;
//! 5. meter the source (IPv4 address, or IPv6 masked to its prefix) in an LRU map: BIND and
//!    REBIND against a strict handshake rate, everything else against packet and byte rates.
//!    A BIND or REBIND carrying an address cookie valid for its source (checked with the
//!    window keys the relay writes to [`COOKIE_KEYS`]) comes from a host that receives at that
//!    address, so it has a handshake meter of its own, which forged packets cannot spend, and
//!    skips the relay-wide handshake budget, which only cookie-less handshakes share.
//!
//! With the session filter on, step 4 also drops DATA, KEEPALIVE, REBIND and CLOSE for a
//! session the relay does not hold, and DATA and KEEPALIVE from an address none of the
//! session's slots is bound to (the relay's session map, [`SESSIONS`]).
//!
//! With the fast path on ([`FLAG_FAST_PATH`]), DATA that passed every check above is forwarded
//! in XDP when the session, its slots, the budget and the route allow ([`fast`]); otherwise it
//! passes to the relay as before.
//!
//! Every outcome increments one per-CPU counter (frames and bytes). Only the fast path writes
//! to the packet. Each access is bounds-checked against `data_end` right before it, the form
//! the verifier can follow.
#![no_std]
#![no_main]
// The fast path's byte meter is shared by all CPUs: compare-and-swap and atomic adds on map
// memory, which the BPF target offers only as intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod challenge;
mod fast;

use core::mem::size_of;

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use ferry_common::cookie::{cookie, cookie_input};
use ferry_common::header::{HEADER_LEN, PacketType, check_header};
use ferry_common::xdp::{
    COUNTER_SLOTS, CookieKeys, Counter, CounterValue, DEFAULT_MAX_SOURCES, FLAG_ACTIVE,
    FLAG_DROP_ALL_FRAGMENTS, FLAG_FAST_PATH, FLAG_LISTS_V4, FLAG_LISTS_V6, FLAG_SESSION_FILTER,
    GuardConfig, LIST_ALLOW, LIST_DENY, MAX_CIDRS, MAX_SESSIONS, Meter, SessionEntry, SourceKey,
    SourceState,
};

#[map(name = "CONFIG")]
static CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "SOURCES")]
static SOURCES: LruHashMap<SourceKey, SourceState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);

#[map(name = "CIDR_V4")]
static CIDR_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "CIDR_V6")]
static CIDR_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "SESSIONS")]
pub(crate) static SESSIONS: HashMap<u64, SessionEntry> =
    HashMap::with_max_entries(MAX_SESSIONS, BPF_F_NO_PREALLOC);

#[map(name = "HANDSHAKES")]
static HANDSHAKES: Array<Meter> = Array::with_max_entries(1, 0);

#[map(name = "COOKIE_KEYS")]
static COOKIE_KEYS: Array<CookieKeys> = Array::with_max_entries(1, 0);

/// Where a BIND's or REBIND's slot byte and cookie start in its body (docs/protocol.md §3.1,
/// §3.7: the same offsets in both).
const BODY_SLOT: usize = 0;
const BODY_COOKIE: usize = 12;

pub(crate) const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
pub(crate) const IPV6_HLEN: usize = 40;
pub(crate) const UDP_HLEN: usize = 8;
/// IPv6 extension headers the guard walks before it gives up on a frame (and drops it as
/// `bad_ip_header` if it might be relay traffic). Real traffic carries at most one or two.
const MAX_EXT_HEADERS: usize = 4;
/// IPv6 next-header values of the extension headers walked (hop-by-hop, routing,
/// destination options) and the fragment header.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

#[xdp]
pub fn ferry_xdp(ctx: XdpContext) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let (action, counter) = match guard(&ctx) {
        Verdict::Done(action, counter) => (action, counter),
        Verdict::Fast(cfg, data) => fast::forward(&ctx, cfg, &data),
        Verdict::Challenge(cfg, keys, request) => challenge::answer(&ctx, cfg, keys, &request),
    };
    count(counter, frame_len);
    action
}

/// Bumps counter slot `slot` on this CPU.
#[inline(always)]
fn count(slot: u32, frame_len: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array slot belongs to this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len;
        }
    }
}

/// A pointer to a `T` at `offset` in the frame, or `None` if it would run past the end.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` (a byte array: no alignment needed) at `offset`.
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; `T` is a byte array,
    // read unaligned.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub(crate) fn read_u16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

const PASS_OTHER: (u32, u32) = (XDP_PASS, Counter::PassOther as u32);

#[inline(always)]
fn drop(counter: Counter) -> (u32, u32) {
    (XDP_DROP, counter as u32)
}

/// Where the UDP header is and what the IP layer said about it.
pub(crate) struct L4 {
    /// Offset of the IP header in the frame.
    pub(crate) ip_offset: usize,
    /// IPv4 options or IPv6 extension headers present.
    pub(crate) ip_options: bool,
    /// Offset of the UDP header in the frame.
    pub(crate) offset: usize,
    /// Bytes from the UDP header to the end of the IP payload.
    ip_payload_len: usize,
    /// The source, as the per-source map keys it (before the IPv6 mask).
    pub(crate) source: [u8; 16],
    /// The IPv4 source, for the IPv4 trie.
    pub(crate) v4: Option<[u8; 4]>,
    /// A first fragment (the UDP header is there, but not the whole datagram).
    first_fragment: bool,
}

/// What the guard decided about one frame.
enum Verdict<'a> {
    /// This action, counted in this slot.
    Done(u32, u32),
    /// DATA that passed every check, for the fast path to forward or pass.
    Fast(&'a GuardConfig, fast::Data),
    /// A BIND or REBIND without a valid cookie that passed every check, for the guard to
    /// answer with a CHALLENGE itself.
    Challenge(&'a GuardConfig, &'a CookieKeys, challenge::Request),
}

/// The guard's verdict for one frame. The fast path runs after it returns, so that the
/// guard's stack is free again by then (BPF programs have 512 bytes of it).
#[inline(always)]
fn guard(ctx: &XdpContext) -> Verdict<'static> {
    match guard_checks(ctx) {
        Ok(verdict) => verdict,
        Err(done) => Verdict::Done(done.0, done.1),
    }
}

/// The guard's checks: `Err` for a verdict reached before the fast path's question.
#[inline(always)]
fn guard_checks(ctx: &XdpContext) -> Result<Verdict<'static>, (u32, u32)> {
    let Some(cfg) = CONFIG.get(0) else {
        return Err(PASS_OTHER);
    };
    if cfg.flags & FLAG_ACTIVE == 0 {
        return Err(PASS_OTHER);
    }

    // ---- Ethernet and VLAN ----
    let Some(mut proto) = read_u16(ctx, 12) else {
        return Err(PASS_OTHER);
    };
    let mut offset = ETH_HLEN;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let Some(inner) = read_u16(ctx, offset + 2) else {
                return Err(PASS_OTHER);
            };
            proto = inner;
            offset += 4;
        }
    }

    // ---- IP ----
    let l4 = match proto {
        ETH_P_IPV4 => ipv4(ctx, offset, cfg),
        ETH_P_IPV6 => ipv6(ctx, offset, cfg),
        _ => return Err(PASS_OTHER),
    };
    let l4 = l4?;

    // ---- UDP ----
    let Some(dst_port) = read_u16(ctx, l4.offset + 2) else {
        // The IP header promised more than the frame holds; ip*() checked lengths, so this
        // is a UDP header cut short.
        return Err(drop(Counter::DropBadIpHeader));
    };
    if !cfg.is_relay_port(dst_port) {
        return Err(PASS_OTHER);
    }
    if l4.first_fragment {
        return Err(drop(Counter::DropFragment));
    }
    let Some(udp_len) = read_u16(ctx, l4.offset + 4) else {
        return Err(drop(Counter::DropBadIpHeader));
    };
    let udp_len = usize::from(udp_len);
    if udp_len < UDP_HLEN || udp_len != l4.ip_payload_len {
        return Err(drop(Counter::DropBadUdpLength));
    }

    // ---- Deny and allow lists (an empty trie is not asked) ----
    let listed = match l4.v4 {
        Some(v4) if cfg.flags & FLAG_LISTS_V4 != 0 => CIDR_V4.get(Key::new(32, v4)).copied(),
        None if cfg.flags & FLAG_LISTS_V6 != 0 => CIDR_V6.get(Key::new(128, l4.source)).copied(),
        _ => None,
    };
    if listed == Some(LIST_DENY) {
        return Err(drop(Counter::DropDenyListed));
    }

    // ---- The relay header (docs/protocol.md §2.1) ----
    let datagram_len = udp_len - UDP_HLEN;
    let payload = l4.offset + UDP_HLEN;
    let first16 = if datagram_len >= HEADER_LEN {
        match read::<[u8; HEADER_LEN]>(ctx, payload) {
            Some(bytes) => bytes,
            None => return Err(drop(Counter::DropBadIpHeader)),
        }
    } else {
        // Rule 1 fails on the length alone; the bytes are not looked at.
        [0; HEADER_LEN]
    };
    let header = match check_header(&first16, datagram_len) {
        Ok(header) => header,
        Err(rule) => return Err((XDP_DROP, Counter::malformed_slot(rule))),
    };
    if !header.packet_type.sent_by_peer() {
        return Err(drop(Counter::DropUnexpectedType));
    }
    // Everything but BIND names a session the relay must already hold; DATA and KEEPALIVE
    // must come from one of its bound slots. REBIND (from a new address) and CLOSE (from any)
    // are proved by their MAC, which the relay checks. The entry looked up here is the one
    // the fast path uses: one lookup per datagram.
    let fast = header.packet_type == PacketType::Data && cfg.flags & FLAG_FAST_PATH != 0;
    let filter = cfg.flags & FLAG_SESSION_FILTER != 0 && header.packet_type != PacketType::Bind;
    let mut session: Option<*const SessionEntry> = None;
    if filter || fast {
        session = SESSIONS.get_ptr(header.session_id);
    }
    if filter {
        let Some(entry) = session else {
            return Err(drop(Counter::DropUnknownSession));
        };
        if matches!(header.packet_type, PacketType::Data | PacketType::Keepalive) {
            let Some(src_port) = read_u16(ctx, l4.offset) else {
                return Err(drop(Counter::DropBadIpHeader));
            };
            // SAFETY: the map's value for this key, valid for this run; the relay replaces
            // entries whole, so it is never seen half written.
            if !unsafe { (*entry).from_bound_slot(&l4.source, src_port) } {
                return Err(drop(Counter::DropUnboundSource));
            }
        }
    }
    // SAFETY: the helper has no preconditions. Read once for the meters, the fast path's byte
    // budget, last-seen time and next-hop cache. The coarse clock (CLOCK_MONOTONIC as of the
    // last scheduler tick) reads no clock source (bpf_ktime_get_ns reads the TSC, and under
    // KVM the pvclock page: 15-35 ns a datagram on the development VM); what its resolution
    // means for the meters is in docs/architecture.md ("The program's clock").
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut answer = None;
    let verdict = if listed == Some(LIST_ALLOW) {
        (XDP_PASS, Counter::PassAllowListed as u32)
    } else {
        // ---- Per-source meters ----
        let handshake = match header.packet_type {
            PacketType::Bind | PacketType::Rebind => {
                // One bounds check and one copy for all the body bytes needed: the verifier
                // follows that form, where separate reads at nearby offsets may be merged past
                // their checks.
                let Some(body) = read::<[u8; BODY_COOKIE + 16]>(ctx, payload + HEADER_LEN) else {
                    return Err(drop(Counter::DropBadIpHeader));
                };
                let Some(src_port) = read_u16(ctx, l4.offset) else {
                    return Err(drop(Counter::DropBadIpHeader));
                };
                let keys = COOKIE_KEYS.get(0);
                if cookie_is_valid(&body, keys, header.session_id, &l4.source, src_port) {
                    Handshake::Proven
                } else {
                    answer = keys.and_then(|keys| {
                        let request =
                            challenge::answerable(ctx, cfg, &l4, header.packet_type, &body, keys)?;
                        Some((keys, request))
                    });
                    match answer {
                        Some(_) => Handshake::Answered,
                        None => Handshake::Unproven,
                    }
                }
            }
            _ => Handshake::No,
        };
        let mut key = SourceKey { addr: l4.source };
        if l4.v4.is_none() {
            for i in 0..16 {
                key.addr[i] &= cfg.ipv6_mask[i];
            }
        }
        meter(cfg, &key, handshake, datagram_len as u64, now)
    };

    // ---- The guard's own CHALLENGE: a handshake the meters passed ----
    if let Some((keys, request)) = answer
        && verdict.0 == XDP_PASS
    {
        return Ok(Verdict::Challenge(cfg, keys, request));
    }

    // ---- The fast path: DATA the guard passed ----
    if verdict.0 != XDP_PASS || !fast {
        return Err(verdict);
    }
    let Some(entry) = session else {
        // Only without the session filter: the relay decides (and drops it).
        return Err((XDP_PASS, Counter::FastPeerUnbound as u32));
    };
    let Some(src_port) = read_u16(ctx, l4.offset) else {
        return Err(drop(Counter::DropBadIpHeader));
    };
    let data = fast::Data {
        entry,
        now,
        session_id: header.session_id,
        source: l4.source,
        src_port,
        ip_offset: l4.ip_offset,
        ip_options: l4.ip_options,
        datagram_len,
    };
    Ok(Verdict::Fast(cfg, data))
}

/// What kind of packet the meters see.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// DATA, KEEPALIVE or CLOSE.
    No,
    /// BIND or REBIND without a cookie valid for its source: the source may be forged.
    Unproven,
    /// BIND or REBIND with a cookie valid for its source, which only a host that receives at
    /// that address can have.
    Proven,
    /// BIND or REBIND without a valid cookie that the guard answers itself if its source's
    /// meter admits it: it costs the relay nothing, so it skips the relay-wide budget.
    Answered,
}

/// Whether a BIND or REBIND with body fields `body` (its first 28 bytes), from `source` and
/// `port`, carries an address cookie valid for its source in one of the windows whose keys
/// the relay wrote (`keys`).
#[inline(always)]
fn cookie_is_valid(
    body: &[u8; BODY_COOKIE + 16],
    keys: Option<&CookieKeys>,
    session_id: u64,
    source: &[u8; 16],
    port: u16,
) -> bool {
    let slot = body[BODY_SLOT];
    let mut given = [0u8; 16];
    given.copy_from_slice(&body[BODY_COOKIE..]);
    // The all-zero cookie (a first attempt) is never valid.
    if given == [0; 16] {
        return false;
    }
    let Some(keys) = keys else {
        return false;
    };
    if keys.set != 1 {
        return false;
    }
    let input = cookie_input(session_id, slot, source, port);
    for key in &keys.keys {
        if cookie(key, &input) == given {
            return true;
        }
    }
    false
}

/// Admits or refuses one relay datagram from `key`, updating its meters in place.
#[inline(always)]
fn meter(
    cfg: &GuardConfig,
    key: &SourceKey,
    handshake: Handshake,
    bytes: u64,
    now: u64,
) -> (u32, u32) {
    let existing = SOURCES.get_ptr_mut(key);
    let mut state = match existing {
        // SAFETY: the pointer is the map's value for `key`, valid for this run. Two CPUs may
        // update the same source at once; a lost update admits at most one extra packet.
        Some(p) => unsafe { *p },
        None => SourceState::default(),
    };
    let mut verdict = (XDP_PASS, Counter::PassRelay as u32);
    if handshake == Handshake::Proven {
        // Only the source itself can spend this meter; the relay's own bind rate, charged
        // after its cookie check, comes next.
        match state.proven_handshake.admit(&cfg.handshake, now, 1) {
            Some(m) => state.proven_handshake = m,
            None => return drop(Counter::DropRateHandshake),
        }
        verdict = (XDP_PASS, Counter::PassCookie as u32);
    } else if handshake == Handshake::Answered {
        // The guard answers it: the relay's CPU is not spent, so only the source's own
        // cookie-less meter applies.
        match state.handshake.admit(&cfg.handshake, now, 1) {
            Some(m) => state.handshake = m,
            None => return drop(Counter::DropRateHandshake),
        }
    } else if handshake == Handshake::Unproven {
        match state.handshake.admit(&cfg.handshake, now, 1) {
            Some(m) => state.handshake = m,
            None => return drop(Counter::DropRateHandshake),
        }
        // Then the relay-wide budget, so that many sources each under their own rate still
        // cost the relay at most this many handshakes a second. CPUs race on this one meter;
        // a lost update admits at most one extra handshake per CPU.
        if let Some(total) = HANDSHAKES.get_ptr_mut(0) {
            // SAFETY: index 0 of a one-entry array, valid for this run.
            match unsafe { (*total).admit(&cfg.handshake_total, now, 1) } {
                Some(m) => unsafe { *total = m },
                None => return drop(Counter::DropRateHandshakeTotal),
            }
        }
    } else {
        let Some(packets) = state.data_packets.admit(&cfg.data_packets, now, 1) else {
            return drop(Counter::DropRateDataPackets);
        };
        let Some(bytes) = state.data_bytes.admit(&cfg.data_bytes, now, bytes) else {
            return drop(Counter::DropRateDataBytes);
        };
        if let Some(p) = existing {
            // SAFETY: as above. Only the two meters that changed are written back.
            unsafe {
                (*p).data_packets = packets;
                (*p).data_bytes = bytes;
            }
            return verdict;
        }
        state.data_packets = packets;
        state.data_bytes = bytes;
    }
    match existing {
        // SAFETY: as above.
        Some(p) => unsafe { *p = state },
        None => {
            // A full LRU map evicts its least recently used entry, so this only fails under
            // memory pressure; the packet is admitted either way (it was within limits).
            let _ = SOURCES.insert(key, state, 0);
        }
    }
    verdict
}

/// Parses the IPv4 header at `offset`.
#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize, cfg: &GuardConfig) -> Result<L4, (u32, u32)> {
    let Some(fixed) = read::<[u8; 20]>(ctx, offset) else {
        return Err(drop(Counter::DropBadIpHeader));
    };
    let version = fixed[0] >> 4;
    let ihl = usize::from(fixed[0] & 0x0f) * 4;
    if version != 4 || ihl < 20 {
        return Err(drop(Counter::DropBadIpHeader));
    }
    let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    let frame_left = ctx.data_end() - ctx.data() - offset;
    if total_len < ihl || total_len > frame_left {
        return Err(drop(Counter::DropBadIpHeader));
    }
    if fixed[9] != IPPROTO_UDP {
        return Err(PASS_OTHER);
    }
    let frag = u16::from_be_bytes([fixed[6], fixed[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    if fragment_offset != 0 {
        // No UDP header here: the port is unknown.
        return Err(non_first_fragment(cfg));
    }
    let source = ipv4_mapped([fixed[12], fixed[13], fixed[14], fixed[15]]);
    Ok(L4 {
        ip_offset: offset,
        ip_options: ihl != 20,
        offset: offset + ihl,
        ip_payload_len: total_len - ihl,
        source,
        v4: Some([fixed[12], fixed[13], fixed[14], fixed[15]]),
        first_fragment: more_fragments,
    })
}

/// `::ffff:a.b.c.d`, the key the guard gives an IPv4 source. Built as one 128-bit integer:
/// an array literal with a run of zeros compiles to a call to a byte-at-a-time `memset`
/// subprogram, on every IPv4 frame.
#[inline(always)]
pub(crate) fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    (0xffff_0000_0000u128 | u128::from(u32::from_be_bytes(v4))).to_be_bytes()
}

/// Parses the IPv6 header at `offset` and walks its extension headers.
#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize, cfg: &GuardConfig) -> Result<L4, (u32, u32)> {
    let Some(fixed) = read::<[u8; 8]>(ctx, offset) else {
        return Err(drop(Counter::DropBadIpHeader));
    };
    let Some(source) = read::<[u8; 16]>(ctx, offset + 8) else {
        return Err(drop(Counter::DropBadIpHeader));
    };
    if fixed[0] >> 4 != 6 {
        return Err(drop(Counter::DropBadIpHeader));
    }
    // An IPv4-mapped source (::ffff:a.b.c.d), which the kernel drops too: the guard keys IPv4
    // sources that way, so such a frame would otherwise spend an IPv4 source's meters and
    // pass as that source's session traffic.
    if source[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        return Err(drop(Counter::DropBadIpHeader));
    }
    let payload_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
    let frame_left = ctx.data_end() - ctx.data() - offset;
    if IPV6_HLEN + payload_len > frame_left {
        return Err(drop(Counter::DropBadIpHeader));
    }
    let mut next = fixed[6];
    let mut ext_len = 0usize;
    let mut first_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_UDP => break,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some(ext) = read::<[u8; 2]>(ctx, offset + IPV6_HLEN + ext_len) else {
                    return Err(drop(Counter::DropBadIpHeader));
                };
                next = ext[0];
                ext_len += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let Some(ext) = read::<[u8; 8]>(ctx, offset + IPV6_HLEN + ext_len) else {
                    return Err(drop(Counter::DropBadIpHeader));
                };
                next = ext[0];
                ext_len += 8;
                let frag = u16::from_be_bytes([ext[2], ext[3]]);
                if frag & 0xfff8 != 0 {
                    return Err(non_first_fragment(cfg));
                }
                // Offset 0: a first fragment, or an atomic fragment (M = 0); either way not
                // how relay datagrams travel.
                first_fragment = true;
            }
            _ => return Err(PASS_OTHER),
        }
    }
    match next {
        IPPROTO_UDP => {}
        // More extension headers than the guard walks: the transport is unknown, and real
        // traffic never looks like this.
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            return Err(drop(Counter::DropBadIpHeader));
        }
        _ => return Err(PASS_OTHER),
    }
    if ext_len > payload_len {
        return Err(drop(Counter::DropBadIpHeader));
    }
    Ok(L4 {
        ip_offset: offset,
        ip_options: ext_len != 0,
        offset: offset + IPV6_HLEN + ext_len,
        ip_payload_len: payload_len - ext_len,
        source,
        v4: None,
        first_fragment,
    })
}

/// A non-first fragment: its port is unknown, so it passes unless the admin asked to drop
/// them all.
#[inline(always)]
fn non_first_fragment(cfg: &GuardConfig) -> (u32, u32) {
    if cfg.flags & FLAG_DROP_ALL_FRAGMENTS != 0 {
        drop(Counter::DropFragment)
    } else {
        PASS_OTHER
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
