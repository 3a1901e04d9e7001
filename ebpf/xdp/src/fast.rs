//! The fast path: DATA of a bound session, from one of its bound slots and within that slot's
//! byte budget, rewritten to the other slot and sent on from XDP (`XDP_TX` out of the interface
//! it came in on, `XDP_REDIRECT` through [`FAST_IFACES`] otherwise). It runs only after every
//! guard check has passed the datagram; whatever it cannot or should not forward goes on to
//! the relay exactly as before, counted under its reason.
//!
//! Order of decisions, so that a peer cannot double its rate by making some of its datagrams
//! fall back: first the relay's own decision (a bound sender, a bound receiver) and whether
//! there is a budget to charge, then the byte budget, charged before every other reason to
//! fall back (mixed families, VLAN tags, IP options, the route). A datagram charged here that
//! then falls back is charged again by the relay against its own bucket of the same rate, so
//! the two together never let through more than the rate.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};
use core::mem::size_of;

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup};
use aya_ebpf::helpers::bpf_fib_lookup as fib_lookup;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{DevMapHash, HashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use ferry_common::xdp::{
    BoundSlot, Counter, CounterValue, FAST_BACK_BY_REDIRECT, FIB_CACHE_NS, FastSlot, FastState,
    FibCache, FibHop, GuardConfig, MAX_FAST_IFACES, MAX_SESSIONS, SessionEntry,
};

use crate::{ETH_HLEN, IPV6_HLEN, UDP_HLEN, ipv4_mapped};

#[map(name = "FAST_STATE")]
static FAST_STATE: HashMap<u64, FastState> =
    HashMap::with_max_entries(MAX_SESSIONS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "FIB_CACHE")]
static FIB_CACHE: HashMap<u64, FibCache> =
    HashMap::with_max_entries(MAX_SESSIONS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Where a next hop is put together before it replaces the cached one: a per-CPU entry, as
/// the stack has no room for it next to the guard's.
#[map(name = "FIB_SCRATCH")]
static FIB_SCRATCH: PerCpuArray<FibCache> = PerCpuArray::with_max_entries(1, 0);

/// The interfaces the fast path sends out of.
#[map(name = "FAST_IFACES")]
static FAST_IFACES: DevMapHash = DevMapHash::with_max_entries(MAX_FAST_IFACES, 0);

/// The interfaces the fast path takes DATA in from.
#[map(name = "FAST_INGRESS")]
static FAST_INGRESS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_FAST_IFACES, 0);

#[map(name = "FAST_TOTALS")]
static FAST_TOTALS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(1, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;
/// `BPF_FIB_LOOKUP_SRC`: fill in the route's preferred source address.
const FIB_SRC: u32 = 16;
/// `BPF_EXIST`: update an entry only if it exists.
const BPF_EXIST: u64 = 2;
/// Tries of the byte meter's compare-and-swap before giving the datagram to the relay.
const CAS_TRIES: usize = 4;
/// Ethernet + IPv4 (no options) + UDP.
const V4_HEADERS: usize = ETH_HLEN + 20 + UDP_HLEN;
/// Ethernet + IPv6 (no extension headers) + UDP.
const V6_HEADERS: usize = ETH_HLEN + IPV6_HLEN + UDP_HLEN;

/// What the guard learnt of a DATA datagram it passed.
pub struct Data {
    /// The session's entry in [`SESSIONS`](crate::SESSIONS), which the guard looked up (not
    /// null; valid for this run).
    pub entry: *const SessionEntry,
    /// `bpf_ktime_get_coarse_ns` as the guard read it for this datagram.
    pub now: u64,
    /// The session id.
    pub session_id: u64,
    /// The source address (IPv4-mapped for IPv4) and port.
    pub source: [u8; 16],
    /// The UDP source port.
    pub src_port: u16,
    /// Offset of the IP header (14 without VLAN tags).
    pub ip_offset: usize,
    /// Whether the IP header has options (IPv4) or extension headers (IPv6).
    pub ip_options: bool,
    /// The relay datagram's length (UDP payload).
    pub datagram_len: usize,
}

/// The fast path's verdict on `data`, and the counter slot that counts it.
#[inline(always)]
pub fn forward(ctx: &XdpContext, cfg: &GuardConfig, data: &Data) -> (u32, u32) {
    // SAFETY: the guard's lookup of this session in SESSIONS, not null, valid for this run;
    // the relay replaces entries whole, so it is never seen half written.
    let entry = unsafe { &*data.entry };
    let (from, to) = match entry.fast_route(&data.source, data.src_port) {
        Ok(route) => route,
        Err(reason) => return pass(reason),
    };
    let Some(state) = FAST_STATE.get_ptr_mut(data.session_id) else {
        // The relay creates the state with the session; a session without it is new or its
        // creation failed (counted by the relay).
        return pass(Counter::FastNotEligible);
    };
    let sender = &entry.slots[from];
    let receiver = &entry.slots[to];
    let now = data.now;
    // SAFETY: `state` is the map's value for this key, valid for this run; its fields are
    // 8-byte aligned u64s (the value is #[repr(C)] of u64s), shared with other CPUs and
    // touched only through atomics or whole 8-byte stores.
    let slot = unsafe { &raw mut (*state).slots[from] };
    // SAFETY: as above; an aligned 8-byte store (one instruction, never torn) of a recent
    // time is all the reaper needs.
    unsafe { (&raw mut (*slot).last_seen).write_volatile(now) };
    // SAFETY: as above.
    let tat = unsafe { &raw mut (*slot).tat };
    let bytes = data.datagram_len as u64;
    let mut charged = false;
    // SAFETY: as above; written only after a successful exchange, by whichever CPU made it.
    let under = unsafe { &raw mut (*slot).charged_under };
    // SAFETY: as above.
    let epoch = unsafe { &raw mut (*slot).epoch };
    for _ in 0..CAS_TRIES {
        // SAFETY: as above; an aligned 8-byte load is one instruction, never torn.
        let old = unsafe { tat.read_volatile() };
        // SAFETY: as above. Two CPUs race here only if they charge the same direction right
        // after the relay set its budget anew; one datagram may then be charged against the
        // meter as it was before.
        let (last, since) = unsafe { (under.read_volatile(), epoch.read_volatile()) };
        let start = FastSlot::start(old, since, &last, sender);
        let Some(new) = sender.budget.admit(start, sender.charge_time(now), bytes) else {
            return (XDP_DROP, Counter::FastOverBudget as u32);
        };
        // SAFETY: as above. The exchange succeeds only if no other CPU charged the meter
        // since the load, so every admitted datagram is charged exactly once.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                tat, old, new,
            )
        };
        if swapped {
            if since != sender.budget_since {
                // SAFETY: as above.
                unsafe {
                    under.write_volatile(sender.budget);
                    epoch.write_volatile(sender.budget_since);
                }
            }
            charged = true;
            break;
        }
    }
    if !charged {
        return pass(Counter::FastContended);
    }
    if let Err(reason) = entry.fast_sendable(from, to) {
        return pass(reason);
    }

    // ---- What depends on this datagram's own shape and route ----
    if data.ip_offset != ETH_HLEN {
        return pass(Counter::FastVlan);
    }
    if data.ip_options {
        return pass(Counter::FastIpOptions);
    }
    // Whether the fast path is active on the interface it came in on is checked when its next
    // hop is resolved (`next_hop`), and holds for as long as the hop does.
    let ingress = ctx.ingress_ifindex() as u32;
    let action = if receiver.is_v4() {
        forward_v4(ctx, cfg, data, to, receiver, ingress)
    } else {
        forward_v6(ctx, cfg, data, to, receiver, ingress)
    };
    let action = match action {
        Ok(action) => action,
        Err(reason) => return pass(reason),
    };
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*slot).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*slot).bytes, bytes);
    }
    if let Some(total) = FAST_TOTALS.get_ptr_mut(0) {
        // SAFETY: a per-CPU array slot belongs to this CPU while the program runs.
        unsafe {
            (*total).packets += 1;
            (*total).bytes += bytes;
        }
    }
    action
}

#[inline(always)]
fn pass(reason: Counter) -> (u32, u32) {
    (XDP_PASS, reason as u32)
}

/// How the frame leaves by `hop`: `XDP_TX` when that is back out of `ingress` (unless the hop
/// says to redirect there too), else a redirect through the device map, which fails (and the
/// frame goes to the relay, untouched) when the fast path does not send out of the egress
/// interface. Decided before the frame is rewritten: a rewritten frame cannot be passed on.
#[inline(always)]
fn send(hop: &FibHop, ingress: u32) -> Result<(u32, u32), Counter> {
    let egress = hop.egress;
    if egress == ingress && hop.back_by_redirect == 0 {
        return Ok((XDP_TX, Counter::FastTx as u32));
    }
    match FAST_IFACES.redirect(egress, 0) {
        Ok(action) => Ok((action, Counter::FastRedirect as u32)),
        Err(_) => Err(Counter::FastInterface),
    }
}

/// The next hop for DATA `data` to slot `to` of its session (bound at `receiver`) that came
/// in on `ingress` with IP length `ip_len`: the cached one when it serves ([`FibHop::serves`]),
/// else, if the fast path takes DATA in on `ingress`, a FIB lookup, as the forwarding path
/// does it (the kernel answers only if forwarding is enabled on the ingress interface; the
/// relay checks and says so), whose result replaces the cached hop if the fast path sends
/// out of the interface it names. The hop returned lies in map memory (the cache, or this
/// CPU's scratch entry), valid for this run.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    data: &Data,
    to: usize,
    receiver: &BoundSlot,
    ingress: u32,
    ip_len: u16,
) -> Result<*const FibHop, Counter> {
    let (session_id, now) = (data.session_id, data.now);
    let to = to & 1;
    let cached = FIB_CACHE.get_ptr(session_id);
    if let Some(cache) = cached {
        // SAFETY: the map's value for this key, valid for this run; the program replaces
        // entries whole (below), so it is never seen half written.
        let hop = unsafe { &(*cache).slots[to] };
        if hop.serves(ingress, &receiver.addr, receiver.port, ip_len, now) {
            return Ok(hop);
        }
    }
    // SAFETY: a plain value read from map memory valid for this run.
    let Some(&ingress_flags) = (unsafe { FAST_INGRESS.get(ingress) }) else {
        return Err(Counter::FastInterface);
    };
    let Some(fresh) = FIB_SCRATCH.get_ptr_mut(0) else {
        return Err(Counter::FastFibMiss);
    };
    // SAFETY: a per-CPU array entry belongs to this CPU while the program runs.
    let fresh = unsafe { &mut *fresh };
    match cached {
        // SAFETY: as above; copied so that the other slot's hop is kept.
        Some(cache) => *fresh = unsafe { *cache },
        None => *fresh = FibCache::default(),
    }
    let v4 = receiver.is_v4();
    let want_src = receiver.relay_addr_set != 1;
    // SAFETY: all-zero bytes are a valid bpf_fib_lookup (integers and unions of integers).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.l4_protocol = IPPROTO_UDP;
    params.sport = receiver.relay_port.to_be();
    params.dport = receiver.port.to_be();
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ingress;
    if v4 {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(last4(&receiver.addr));
        params.__bindgen_anon_3.ipv4_src = if want_src {
            0
        } else {
            u32::from_ne_bytes(last4(&receiver.relay_addr))
        };
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = words(&receiver.addr);
        params.__bindgen_anon_3.ipv6_src = if want_src {
            [0; 4]
        } else {
            words(&receiver.relay_addr)
        };
    }
    let flags = if want_src { FIB_SRC } else { 0 };
    let size = size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: `params` is a valid bpf_fib_lookup of `size` bytes for the call's duration.
    let rc = unsafe { fib_lookup(ctx.ctx as *mut _, &mut params, size, flags) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Counter::FastFibMiss);
    }
    // Out of an interface the fast path does not send out of (a veth whose peer would drop
    // the frame, or one without the fast path), the relay sends it. Checked here, so that a
    // cached hop never leads out of such an interface, `XDP_TX` included.
    if FAST_IFACES.get(params.ifindex).is_none() {
        return Err(Counter::FastInterface);
    }
    let hop = &mut fresh.slots[to];
    hop.expires = now.wrapping_add(FIB_CACHE_NS);
    hop.dst = receiver.addr;
    if v4 {
        // SAFETY: the kernel wrote an IPv4 source into the union for an AF_INET lookup.
        let src = unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
        hop.src = ipv4_mapped(src);
    } else {
        // SAFETY: the kernel wrote an IPv6 source into the union for an AF_INET6 lookup.
        let src = unsafe { params.__bindgen_anon_3.ipv6_src };
        for (i, w) in src.iter().enumerate() {
            hop.src[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    hop.egress = params.ifindex;
    hop.ingress = ingress;
    hop.dst_port = receiver.port;
    hop.max_len = ip_len;
    hop.dmac = params.dmac;
    hop.smac = params.smac;
    hop.back_by_redirect = u8::from(ingress_flags & FAST_BACK_BY_REDIRECT != 0);
    let hop: *const FibHop = hop;
    if cached.is_some() {
        // Replaces the entry whole (from map memory: no copy on the stack), and only if the
        // relay still has it (it removes it with the session): a failure costs only the next
        // datagram's lookup.
        let _ = FIB_CACHE.insert(session_id, fresh, BPF_EXIST);
    }
    Ok(hop)
}

/// The 16-bit one's-complement sum of the `len` bytes of `bytes` from `start` (big-endian
/// words), not folded.
#[inline(always)]
pub(crate) fn sum16<const N: usize>(bytes: &[u8; N], start: usize, len: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < len {
        sum += u32::from(u16::from_be_bytes([bytes[start + i], bytes[start + i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
pub(crate) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether UDP checksum `check` is a partial one: the folded sum of the pseudo-header alone
/// (addresses summing to `addresses`, the protocol, UDP length `udp_len`; the same sum for IPv4
/// and IPv6), which a sender that leaves the checksum to its device (`CHECKSUM_PARTIAL`: a
/// veth with checksum offload on, a local socket's path) puts there for the device to
/// complete. Rewritten and sent on, the receiver would find it wrong and drop the datagram. A
/// complete checksum equals it only by chance (one datagram in 65,536), and such a datagram
/// goes to the relay, which forwards it too.
#[inline(always)]
fn is_partial(check: u16, addresses: u32, udp_len: u16) -> bool {
    check == fold(addresses + u32::from(IPPROTO_UDP) + u32::from(udp_len))
}

/// The UDP checksum after the words summing to `old` were replaced by words summing to `new`
/// (RFC 1624: `HC' = ~(~HC + ~m + m')`), for a checksum that is not zero.
#[inline(always)]
fn udp_checksum_update(check: u16, old: u32, new: u32) -> u16 {
    // ~m summed over the old words is (0xffff × words − Σm); with folding, adding the
    // complement of the folded old sum is the same thing.
    let sum = u32::from(!check) + u32::from(!fold(old)) + u32::from(fold(new));
    let c = !fold(sum);
    // 0 means "no checksum" in UDP; the same value is sent as 0xffff.
    if c == 0 { 0xffff } else { c }
}

#[inline(always)]
fn forward_v4(
    ctx: &XdpContext,
    cfg: &GuardConfig,
    data: &Data,
    to: usize,
    receiver: &BoundSlot,
    ingress: u32,
) -> Result<(u32, u32), Counter> {
    let start = ctx.data();
    if start + V4_HEADERS > ctx.data_end() {
        return Err(Counter::FastIpOptions);
    }
    // SAFETY: the whole header block lies inside the frame (checked just above), which this
    // run owns; byte arrays need no alignment. Rewritten in place: a copy on the stack would
    // not fit next to the guard's.
    let h = unsafe { &mut *(start as *mut [u8; V4_HEADERS]) };
    let ip = ETH_HLEN;
    let udp = ETH_HLEN + 20;
    let check = u16::from_be_bytes([h[udp + 6], h[udp + 7]]);
    let udp_len = u16::from_be_bytes([h[udp + 4], h[udp + 5]]);
    if check != 0 && is_partial(check, sum16(h, ip + 12, 8), udp_len) {
        return Err(Counter::FastPartialChecksum);
    }
    let tot_len = u16::from_be_bytes([h[ip + 2], h[ip + 3]]);
    // SAFETY: map memory valid for this run (see `next_hop`).
    let hop = unsafe { &*next_hop(ctx, data, to, receiver, ingress, tot_len)? };
    let action = send(hop, ingress)?;

    // The words the UDP checksum covers that change: the pseudo-header's addresses and the
    // ports.
    let old = sum16(h, ip + 12, 8) + sum16(h, udp, 4);
    h[..6].copy_from_slice(&hop.dmac);
    h[6..12].copy_from_slice(&hop.smac);
    h[ip + 8] = cfg.ttl;
    h[ip + 10] = 0;
    h[ip + 11] = 0;
    h[ip + 12..ip + 16].copy_from_slice(&hop.src[12..16]);
    h[ip + 16..ip + 20].copy_from_slice(&receiver.addr[12..16]);
    let ip_check = !fold(sum16(h, ip, 20));
    h[ip + 10..ip + 12].copy_from_slice(&ip_check.to_be_bytes());
    h[udp..udp + 2].copy_from_slice(&receiver.relay_port.to_be_bytes());
    h[udp + 2..udp + 4].copy_from_slice(&receiver.port.to_be_bytes());
    if check != 0 {
        let new = sum16(h, ip + 12, 8) + sum16(h, udp, 4);
        let check = udp_checksum_update(check, old, new);
        h[udp + 6..udp + 8].copy_from_slice(&check.to_be_bytes());
    }
    Ok(action)
}

#[inline(always)]
fn forward_v6(
    ctx: &XdpContext,
    cfg: &GuardConfig,
    data: &Data,
    to: usize,
    receiver: &BoundSlot,
    ingress: u32,
) -> Result<(u32, u32), Counter> {
    let start = ctx.data();
    if start + V6_HEADERS > ctx.data_end() {
        return Err(Counter::FastIpOptions);
    }
    // SAFETY: as in `forward_v4`.
    let h = unsafe { &mut *(start as *mut [u8; V6_HEADERS]) };
    let ip = ETH_HLEN;
    let udp = ETH_HLEN + IPV6_HLEN;
    let check = u16::from_be_bytes([h[udp + 6], h[udp + 7]]);
    if check == 0 {
        return Err(Counter::FastNoChecksum);
    }
    let udp_len = u16::from_be_bytes([h[udp + 4], h[udp + 5]]);
    if is_partial(check, sum16(h, ip + 8, 32), udp_len) {
        return Err(Counter::FastPartialChecksum);
    }
    let tot_len = u16::from_be_bytes([h[ip + 4], h[ip + 5]]).wrapping_add(IPV6_HLEN as u16);
    // SAFETY: map memory valid for this run (see `next_hop`).
    let hop = unsafe { &*next_hop(ctx, data, to, receiver, ingress, tot_len)? };
    let action = send(hop, ingress)?;

    let old = sum16(h, ip + 8, 32) + sum16(h, udp, 4);
    h[..6].copy_from_slice(&hop.dmac);
    h[6..12].copy_from_slice(&hop.smac);
    h[ip + 7] = cfg.hop_limit;
    h[ip + 8..ip + 24].copy_from_slice(&hop.src);
    h[ip + 24..ip + 40].copy_from_slice(&receiver.addr);
    h[udp..udp + 2].copy_from_slice(&receiver.relay_port.to_be_bytes());
    h[udp + 2..udp + 4].copy_from_slice(&receiver.port.to_be_bytes());
    let new = sum16(h, ip + 8, 32) + sum16(h, udp, 4);
    let check = udp_checksum_update(check, old, new);
    h[udp + 6..udp + 8].copy_from_slice(&check.to_be_bytes());
    Ok(action)
}

/// The last four bytes of an address: an IPv4-mapped address's IPv4 part.
#[inline(always)]
fn last4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// An IPv6 address as the FIB lookup's four network-order words.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
