//! The contract between the XDP guard (`ebpf/xdp`) and the relay that loads it: map names,
//! the `#[repr(C)]` types stored in the maps, the counter slots, and the rate arithmetic.
//!
//! Every type here is plain old data with no padding, so userspace can write it into a map
//! byte for byte (the `user` feature implements aya's `Pod` for them).
//!
//! ## Rate limiting: GCRA
//!
//! Each bucket is a *generic cell rate algorithm* meter, the token bucket written as one
//! timestamp: the *theoretical arrival time* (TAT) of the next packet if the source kept
//! exactly to its rate. A packet costs `cost` (the time one unit is worth at the configured
//! rate); it is admitted when the backlog it would leave, `max(TAT, now) + cost − now`, stays
//! within `tolerance` (burst × cost). So a silent source may send `burst` units at once, then
//! one unit every `cost`. Admission only ever adds: no division on the packet path, and no
//! refill step that could round to nothing at high packet rates.
//!
//! Costs are kept in [`RATE_SHIFT`]-bit fixed point (1/65536 ns), so that byte rates of
//! several gigabytes a second keep their precision; the TAT itself is whole nanoseconds plus a
//! 16-bit carry ([`Meter`]).

use crate::header::HeaderError;

/// The XDP program's section and function name.
pub const PROGRAM_NAME: &str = "ferry_xdp";

/// Map: `Array<GuardConfig>` with one entry, written by the loader at start and on reload.
pub const MAP_CONFIG: &str = "CONFIG";
/// Map: `PerCpuArray<CounterValue>` with [`COUNTER_SLOTS`] entries, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Map: `LruHashMap<SourceKey, SourceState>`, the per-source meters; its size is set by the
/// loader (`xdp.max_sources`).
pub const MAP_SOURCES: &str = "SOURCES";
/// Map: `LpmTrie<[u8; 4], u32>`, IPv4 deny and allow CIDRs ([`LIST_DENY`], [`LIST_ALLOW`]).
pub const MAP_CIDR_V4: &str = "CIDR_V4";
/// Map: `LpmTrie<[u8; 16], u32>`, IPv6 deny and allow CIDRs.
pub const MAP_CIDR_V6: &str = "CIDR_V6";
/// Map: `HashMap<u64, SessionEntry>`, the sessions the relay holds now and their slots' bound
/// addresses (written by the relay as slots bind, move and leave). DATA, KEEPALIVE, REBIND and
/// CLOSE for any other session are dropped, so a flood of well-formed datagrams for made-up
/// sessions dies in the driver; so are DATA and KEEPALIVE for a held session from an address
/// none of its slots is bound to, which the relay would drop too.
pub const MAP_SESSIONS: &str = "SESSIONS";
/// Map: `HashMap<u64, FastState>`, the fast path's per-session state (byte meters, packet and
/// byte counters, last-seen times per direction), keyed like [`MAP_SESSIONS`]. The relay
/// creates an entry when a session opens (keeping one that exists) and removes it when the
/// session goes; the program only updates entries in place.
pub const MAP_FAST_STATE: &str = "FAST_STATE";
/// Map: `HashMap<u64, FibCache>`, keyed like [`MAP_SESSIONS`]: per receiving slot, the next
/// hop the fast path last resolved with `bpf_fib_lookup` ([`FibHop`]), reused for
/// [`FIB_CACHE_NS`]. The relay creates an entry when a session opens (keeping one that exists)
/// and removes it when the session goes; the program only replaces existing entries, whole.
pub const MAP_FIB_CACHE: &str = "FIB_CACHE";
/// How long the fast path reuses a next hop it resolved (ns): after that it asks the FIB
/// again, so a route or neighbour change reaches the fast path within this time.
pub const FIB_CACHE_NS: u64 = 20_000_000;
/// Map: `DevMapHash` keyed by interface index: the interfaces the fast path sends out of, by
/// `XDP_TX` or `XDP_REDIRECT` (which goes through it). Each is also in [`MAP_FAST_INGRESS`];
/// one that is not here is a veth whose peer takes no XDP frames.
pub const MAP_FAST_IFACES: &str = "FAST_IFACES";
/// Map: `HashMap<u32, u32>` keyed by interface index, valued [`FAST_IN`] and maybe
/// [`FAST_BACK_BY_REDIRECT`]: the interfaces on which the fast path takes DATA in.
pub const MAP_FAST_INGRESS: &str = "FAST_INGRESS";
/// [`MAP_FAST_INGRESS`] value bit: the fast path takes DATA in here.
pub const FAST_IN: u32 = 1;
/// [`MAP_FAST_INGRESS`] value bit: DATA that leaves by the interface it came in on leaves by
/// `XDP_REDIRECT`, not `XDP_TX`. Set on a veth: its `XDP_TX` wakes the peer's receive only if
/// the peer runs an XDP program, where a redirect wakes it whenever it polls with NAPI (GRO
/// on will do).
pub const FAST_BACK_BY_REDIRECT: u32 = 2;
/// Interfaces [`MAP_FAST_IFACES`] and [`MAP_FAST_INGRESS`] can hold.
pub const MAX_FAST_IFACES: u32 = 64;
/// Map: `PerCpuArray<CounterValue>` with one entry: DATA datagrams the fast path forwarded and
/// their bytes (relay header included, as the relay's own `forwarded_bytes` counts them).
pub const MAP_FAST_TOTALS: &str = "FAST_TOTALS";
/// Map: `HashMap<u32, u32>` keyed by interface index, valued [`REPLY_TX`] or
/// [`REPLY_REDIRECT`]: the interfaces the guard answers cookie-less BINDs and REBINDs on itself
/// (a CHALLENGE back out of the interface the request came in on; docs/architecture.md, "The
/// guard's CHALLENGEs"). The relay puts each interface attached in native mode here whose
/// XDP frames arrive (not a veth whose peer takes none); elsewhere the relay answers.
pub const MAP_REPLY_IFACES: &str = "REPLY_IFACES";
/// [`MAP_REPLY_IFACES`] value: answer with `XDP_TX`.
pub const REPLY_TX: u32 = 1;
/// [`MAP_REPLY_IFACES`] value: answer with `XDP_REDIRECT` back to the same interface (a veth:
/// see [`FAST_BACK_BY_REDIRECT`]).
pub const REPLY_REDIRECT: u32 = 2;
/// Map: `HashMap<[u8; 16], u32>`: the relay's listen addresses (IPv4 as IPv4-mapped), each
/// valued 1. The guard answers a handshake only if it is addressed to one of them;
/// `::ffff:0.0.0.0` stands for every IPv4 address (a wildcard listen address), `::` for every
/// IPv6 one.
pub const MAP_RELAY_ADDRS: &str = "RELAY_ADDRS";
/// Addresses [`MAP_RELAY_ADDRS`] can hold.
pub const MAX_RELAY_ADDRS: u32 = 64;

/// Map: `Array<Meter>` with one entry, the relay-wide handshake meter.
pub const MAP_HANDSHAKES: &str = "HANDSHAKES";
/// Map: `Array<CookieKeys>` with one entry: the address cookie's keys of the previous, current
/// and next window (docs/protocol.md §5), which the relay rewrites as windows pass.
pub const MAP_COOKIE_KEYS: &str = "COOKIE_KEYS";

/// Entries the session map can hold: the most `limits.max_sessions` allows. The map
/// allocates per entry (`BPF_F_NO_PREALLOC`), so the bound costs nothing until used.
pub const MAX_SESSIONS: u32 = 10_000_000;

/// Default number of sources the LRU map tracks before it evicts the least recently seen.
pub const DEFAULT_MAX_SOURCES: u32 = 262_144;
/// Entries each CIDR trie can hold.
pub const MAX_CIDRS: u32 = 16_384;

/// CIDR list value: drop everything from these sources to the relay ports.
pub const LIST_DENY: u32 = 1;
/// CIDR list value: exempt these sources from the rate limits (header checks still apply).
/// The longest matching prefix wins, so an allow entry can carve a hole in a deny entry.
pub const LIST_ALLOW: u32 = 2;

/// [`GuardConfig::flags`]: the config has been written; until then the program passes all.
pub const FLAG_ACTIVE: u16 = 1;
/// [`GuardConfig::flags`]: drop every IP fragment that is not a first fragment, whatever its
/// port (a non-first fragment carries no UDP header, so its port is unknown).
pub const FLAG_DROP_ALL_FRAGMENTS: u16 = 2;

/// [`GuardConfig::flags`]: drop DATA, KEEPALIVE, REBIND and CLOSE for sessions missing from
/// [`MAP_SESSIONS`].
pub const FLAG_SESSION_FILTER: u16 = 4;

/// [`GuardConfig::flags`]: forward DATA of bound sessions in XDP (the fast path), in from the
/// interfaces in [`MAP_FAST_INGRESS`] and out of those in [`MAP_FAST_IFACES`].
pub const FLAG_FAST_PATH: u16 = 8;

/// [`GuardConfig::flags`]: the IPv4 deny/allow trie has entries; without it the program skips
/// the lookup (a helper call per datagram), as an empty trie matches nothing.
pub const FLAG_LISTS_V4: u16 = 16;
/// [`GuardConfig::flags`]: the IPv6 trie has entries, as [`FLAG_LISTS_V4`].
pub const FLAG_LISTS_V6: u16 = 32;

/// [`GuardConfig::flags`]: answer a BIND or REBIND without a valid address cookie with the
/// CHALLENGE the relay would send, from XDP, where the interface allows
/// ([`MAP_REPLY_IFACES`]); such requests then skip the relay-wide handshake budget
/// (`xdp.answer_challenges`).
pub const FLAG_CHALLENGE: u16 = 64;

/// Most UDP ports the guard protects (the relay's distinct listen ports).
pub const MAX_PORTS: usize = 4;

/// Fixed-point shift of rate costs and tolerances: units of 2⁻¹⁶ ns.
pub const RATE_SHIFT: u32 = 16;

/// Longest time a burst may be worth (`burst / rate`), so tolerances stay far from overflow.
pub const MAX_BURST_SECONDS: u64 = 3600;

/// One rate limit, as the program applies it. `cost == 0` means "no limit".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    /// Time one unit (a packet, a byte) is worth, in 2⁻¹⁶ ns.
    pub cost: u64,
    /// Backlog allowed, in 2⁻¹⁶ ns: `burst × cost`.
    pub tolerance: u64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate {
        cost: 0,
        tolerance: 0,
    };

    /// `per_second` units a second with bursts of `burst` units; `None` when either is 0, or
    /// the burst is worth more than [`MAX_BURST_SECONDS`].
    pub const fn new(per_second: u64, burst: u64) -> Option<Rate> {
        if per_second == 0 || burst == 0 || per_second > 1 << 40 {
            return None;
        }
        // 1e9 << 16 < 2^46, so neither this nor the product below can overflow once the
        // burst is bounded in time.
        let cost = (1_000_000_000u64 << RATE_SHIFT) / per_second;
        let cost = if cost == 0 { 1 } else { cost };
        if burst / per_second >= MAX_BURST_SECONDS {
            return None;
        }
        Some(Rate {
            cost,
            tolerance: cost * burst,
        })
    }
}

/// One meter's state: the theoretical arrival time of the next unit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meter {
    /// Whole nanoseconds (the program's clock, `bpf_ktime_get_coarse_ns`).
    pub tat: u64,
    /// The fraction of a nanosecond past `tat`, in 2⁻¹⁶ ns.
    pub carry: u64,
}

impl Meter {
    /// Admits `units` at time `now` (ns) under `rate`, or refuses them; on refusal the meter
    /// is unchanged. Returns the meter after admission.
    #[inline(always)]
    pub fn admit(&self, rate: &Rate, now: u64, units: u64) -> Option<Meter> {
        if rate.cost == 0 {
            return Some(*self);
        }
        // Backlog left by earlier units, in 2⁻¹⁶ ns. It never exceeds the tolerance
        // (< 2^58 by MAX_BURST_SECONDS), so the shift cannot overflow.
        let backlog = if self.tat > now {
            ((self.tat - now) << RATE_SHIFT) + self.carry
        } else {
            0
        };
        // Units are a datagram's bytes or 1 (clamped to 16 bits) and a cost is under 2^47,
        // so the product stays under 2^63 with the backlog: no overflow, and no 128-bit
        // multiply (which BPF lacks).
        let units = if units > 0xffff { 0xffff } else { units };
        let backlog = backlog + units * rate.cost;
        if backlog > rate.tolerance {
            return None;
        }
        Some(Meter {
            tat: now + (backlog >> RATE_SHIFT),
            carry: backlog & ((1 << RATE_SHIFT) - 1),
        })
    }
}

/// The per-source state: four meters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    /// DATA, KEEPALIVE and CLOSE packets.
    pub data_packets: Meter,
    /// Bytes of DATA, KEEPALIVE and CLOSE datagrams (UDP payload).
    pub data_bytes: Meter,
    /// BIND and REBIND packets without a valid address cookie: each costs the relay a
    /// CHALLENGE, and their source address may be forged.
    pub handshake: Meter,
    /// BIND and REBIND packets with a valid address cookie: each may cost the relay a
    /// signature check and an X25519, and only a source that receives at its address can send
    /// them, so forged ones cannot spend this meter.
    pub proven_handshake: Meter,
}

/// The value of [`MAP_COOKIE_KEYS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieKeys {
    /// The keys of the previous, current and next cookie window.
    pub keys: [crate::cookie::CookieKey; 3],
    /// 1 once the relay has written the keys; until then no cookie is taken as valid.
    pub set: u64,
}

/// The key of the per-source map: the IPv6 source masked to the configured prefix, or the
/// IPv4 source as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// The address bytes, network order.
    pub addr: [u8; 16],
}

/// One slot of a [`SessionEntry`]: the address and port the slot is bound to, and what the fast
/// path needs to forward to it and from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundSlot {
    /// The address, network order; IPv4 as an IPv4-mapped IPv6 address, as in [`SourceKey`].
    pub addr: [u8; 16],
    /// The UDP port, host order.
    pub port: u16,
    /// 1 when the slot is bound; 0 when it is not (the other fields are then zero).
    pub bound: u8,
    /// 1 when [`BoundSlot::relay_addr`] is the address the relay sends to this slot from; 0
    /// when the relay listens on the unspecified address, and the kernel's route to the slot
    /// picks the source (the fast path then asks the FIB for it).
    pub relay_addr_set: u8,
    /// The relay's UDP port that datagrams to this slot leave from, host order; 0 when the
    /// fast path may not forward to this slot.
    pub relay_port: u16,
    /// 1 when [`BoundSlot::budget`] was created full at [`BoundSlot::budget_since`] (a new
    /// binding); 0 when its rate was changed then, keeping what was saved (a reload).
    pub budget_fresh: u8,
    /// Zero.
    pub _pad: u8,
    /// The relay address datagrams to this slot leave from (see
    /// [`BoundSlot::relay_addr_set`]), in the slot's family, IPv4 mapped as in
    /// [`BoundSlot::addr`].
    pub relay_addr: [u8; 16],
    /// The byte budget of DATA *from* this slot; a zero cost means the fast path may not
    /// forward from it.
    pub budget: ByteBudget,
    /// When (`CLOCK_MONOTONIC` ns, read by the relay) the relay created the slot's budget or
    /// changed its rate: the fast path starts or carries over its meter at that instant, as
    /// the relay's bucket did, and charges no datagram at an earlier time
    /// ([`BoundSlot::charge_time`]).
    pub budget_since: u64,
    /// The budget in force before [`BoundSlot::budget_since`] (the same as `budget` for a
    /// fresh one).
    pub budget_before: ByteBudget,
}

impl BoundSlot {
    /// Whether the slot is bound to `addr` and `port`.
    #[inline(always)]
    pub fn is(&self, addr: &[u8; 16], port: u16) -> bool {
        self.bound == 1 && self.port == port && self.addr == *addr
    }

    /// Whether the slot's address is IPv4 (IPv4-mapped).
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        is_v4_mapped(&self.addr)
    }

    /// When to charge DATA from this slot against its budget, given the program's clock
    /// reading `now_ns`: `now_ns`, or [`BoundSlot::budget_since`] if that is later. The
    /// program reads the kernel's coarse monotonic clock (`bpf_ktime_get_coarse_ns`), which
    /// lags the precise one the relay stamps `budget_since` with by up to one scheduler tick:
    /// without this, a budget the relay has just created full would look partly spent for up
    /// to a tick. Times compare as wrapping differences, as the meter's do.
    #[inline(always)]
    pub fn charge_time(&self, now_ns: u64) -> u64 {
        if self.budget_since.wrapping_sub(now_ns) as i64 > 0 {
            self.budget_since
        } else {
            now_ns
        }
    }
}

/// Whether `addr` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the form the guard keys
/// IPv4 addresses in.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// The value of [`MAP_SESSIONS`]: what the guard knows of one session the relay holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionEntry {
    /// Slot A, then slot B.
    pub slots: [BoundSlot; 2],
}

impl SessionEntry {
    /// Whether a DATA or KEEPALIVE from `addr`, `port` comes from one of the session's bound
    /// slots: the only sources the relay takes them from (docs/protocol.md §3.5, §3.6).
    #[inline(always)]
    pub fn from_bound_slot(&self, addr: &[u8; 16], port: u16) -> bool {
        self.slots[0].is(addr, port) || self.slots[1].is(addr, port)
    }

    /// Where the fast path would send a DATA from `addr`, `port`: `Ok((from, to))` (slot
    /// indexes), or the counter of the reason it leaves the datagram to the relay. The same
    /// decision as the relay's for DATA (docs/protocol.md §7: from a bound slot, to the other
    /// slot, which must be bound), plus a budget the fast path can charge. What else it cannot
    /// do is checked after the budget is charged ([`SessionEntry::fast_sendable`]).
    #[inline(always)]
    pub fn fast_route(&self, addr: &[u8; 16], port: u16) -> Result<(usize, usize), Counter> {
        let (from, to) = if self.slots[0].is(addr, port) {
            (0, 1)
        } else if self.slots[1].is(addr, port) {
            (1, 0)
        } else {
            // The session filter drops these when it is on; the relay drops them either way.
            return Err(Counter::FastPeerUnbound);
        };
        if self.slots[to].bound != 1 {
            return Err(Counter::FastPeerUnbound);
        }
        if self.slots[from].budget.cost == 0 {
            return Err(Counter::FastNotEligible);
        }
        Ok((from, to))
    }

    /// Whether the fast path can send from slot `from` to slot `to` itself, once the budget
    /// is charged: both in one IP family, and a relay port to send from. Checked after the
    /// charge so that DATA the relay forwards instead is charged in both places alike, and
    /// the two meters stay equal.
    #[inline(always)]
    pub fn fast_sendable(&self, from: usize, to: usize) -> Result<(), Counter> {
        let (sender, receiver) = (&self.slots[from & 1], &self.slots[to & 1]);
        if sender.is_v4() != receiver.is_v4() {
            return Err(Counter::FastMixedFamily);
        }
        if receiver.relay_port == 0 {
            return Err(Counter::FastNotEligible);
        }
        Ok(())
    }
}

/// Fixed-point shift of [`ByteBudget`] costs and of [`FastSlot::tat`]: units of 2⁻¹⁰ ns.
pub const FAST_SHIFT: u32 = 10;

/// A slot's DATA byte budget as the fast path applies it: the relay's token bucket for that
/// slot (`rate` bytes a second, at most `burst` saved up) written as a GCRA meter whose whole
/// state is one 64-bit theoretical arrival time ([`FastSlot::tat`]), so that CPUs update it
/// with one compare-and-swap. Costs are in 2⁻¹⁰ ns, and times wrap modulo 2⁶⁴ of those units
/// (comparisons are of differences), so the meter never overflows however long the host runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteBudget {
    /// Time one byte is worth, in 2⁻¹⁰ ns; 0 when the budget cannot be represented.
    pub cost: u64,
    /// Backlog allowed, in 2⁻¹⁰ ns: `burst × cost`.
    pub tolerance: u64,
}

impl ByteBudget {
    /// The budget of `rate` bytes a second with bursts of `burst` bytes; `None` when either is
    /// 0, the rate is over 2⁴⁰ bytes a second, or the burst is worth more than
    /// [`MAX_BURST_SECONDS`].
    pub const fn new(rate: u64, burst: u64) -> Option<ByteBudget> {
        if rate == 0 || burst == 0 || rate > 1 << 40 || burst / rate >= MAX_BURST_SECONDS {
            return None;
        }
        let cost = (1_000_000_000u64 << FAST_SHIFT) / rate;
        let cost = if cost == 0 { 1 } else { cost };
        Some(ByteBudget {
            cost,
            // cost × burst ≤ 1e9·2¹⁰·MAX_BURST_SECONDS < 2⁶²: no overflow.
            tolerance: cost * burst,
        })
    }

    /// Admits a datagram of `bytes` at `now_ns` (`CLOCK_MONOTONIC` ns) against a
    /// meter at `tat`; returns the meter's new arrival time, or `None` (meter unchanged) when
    /// the datagram is over budget. A silent slot may send `burst` bytes at once, then `rate`
    /// a second: the relay's `TokenBucket` admits exactly the same, up to rounding of the cost.
    #[inline(always)]
    pub fn admit(&self, tat: u64, now_ns: u64, bytes: u64) -> Option<u64> {
        let now = now_ns.wrapping_shl(FAST_SHIFT);
        // The backlog left by earlier datagrams: tat − now as a signed difference (both wrap
        // together), none when tat is in the past.
        let ahead = tat.wrapping_sub(now) as i64;
        let backlog = if ahead > 0 { ahead as u64 } else { 0 };
        // A datagram is at most 65,535 bytes and a cost under 2⁴⁰: no overflow.
        let bytes = if bytes > 0xffff { 0xffff } else { bytes };
        let backlog = backlog + bytes * self.cost;
        if backlog > self.tolerance {
            return None;
        }
        Some(now.wrapping_add(backlog))
    }

    /// A meter at `tat`, last charged under budget `charged`, carried over to this budget at
    /// `now_ns`, when the relay changed the slot's budget from `before` to this one: as the
    /// relay's `TokenBucket::set_rate` does it, what was saved is kept, capped at this
    /// budget's burst. A meter with nothing pending at `now_ns` was full, so it keeps
    /// `before`'s burst. One charged under an older budget than `before` (two changes with no
    /// DATA between) keeps at most `before`'s burst; what it saved under `charged` is an
    /// estimate then, exact only if the budget in between refilled as fast.
    #[inline(always)]
    pub fn carry_over(
        &self,
        tat: u64,
        now_ns: u64,
        charged: &ByteBudget,
        before: &ByteBudget,
    ) -> u64 {
        let now = now_ns.wrapping_shl(FAST_SHIFT);
        let Some(burst) = self.tolerance.checked_div(self.cost) else {
            return tat;
        };
        let before_burst = before.tolerance.checked_div(before.cost).unwrap_or(burst);
        let ahead = tat.wrapping_sub(now) as i64;
        let saved = if ahead <= 0 || charged.cost == 0 {
            before_burst
        } else {
            let saved = charged
                .tolerance
                .saturating_sub(ahead as u64)
                .checked_div(charged.cost)
                .unwrap_or(0);
            if saved < before_burst {
                saved
            } else {
                before_burst
            }
        };
        let saved = if saved < burst { saved } else { burst };
        now.wrapping_add(self.tolerance - saved * self.cost)
    }
}

/// The fast path's state for DATA *from* one slot of a session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastSlot {
    /// The byte meter's theoretical arrival time (see [`ByteBudget`]); updated with a
    /// compare-and-swap.
    pub tat: u64,
    /// The budget `tat` was last charged under.
    pub charged_under: ByteBudget,
    /// The [`BoundSlot::budget_since`] `tat` was last charged under: when the relay sets the
    /// slot's budget anew, the meter starts again or is carried over ([`FastSlot::start`]).
    pub epoch: u64,
    /// DATA datagrams forwarded in XDP (atomic adds).
    pub packets: u64,
    /// Their bytes, relay header included (atomic adds).
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC` at the last scheduler tick) when DATA
    /// from this slot last reached the fast path, forwarded or over budget; 0 never.
    pub last_seen: u64,
}

impl FastSlot {
    /// The meter's arrival time to charge the next datagram from `slot` against: `tat` itself
    /// while the relay has not set the slot's budget anew since it was last charged; else the
    /// meter as the relay's bucket was left at [`BoundSlot::budget_since`]: full for a budget
    /// created then, carried over from [`FastSlot::charged_under`] for a rate changed then.
    #[inline(always)]
    pub fn start(tat: u64, epoch: u64, charged_under: &ByteBudget, slot: &BoundSlot) -> u64 {
        if epoch == slot.budget_since {
            tat
        } else if slot.budget_fresh == 1 {
            slot.budget_since.wrapping_shl(FAST_SHIFT)
        } else {
            slot.budget
                .carry_over(tat, slot.budget_since, charged_under, &slot.budget_before)
        }
    }
}

/// The value of [`MAP_FAST_STATE`]: slot A's direction, then slot B's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastState {
    /// Per sending slot.
    pub slots: [FastSlot; 2],
}

/// A next hop the fast path resolved for DATA to one slot: where `bpf_fib_lookup` sent a
/// datagram from [`FibHop::ingress`] to [`FibHop::dst`] port [`FibHop::dst_port`], and when
/// to ask again. It is used only for a datagram with exactly those three inputs (so a slot
/// that rebinds, or DATA that arrives on another interface, never takes a hop resolved for
/// something else), no longer than its IPv4 total length or IPv6 payload plus header length
/// [`FibHop::max_len`] (the MTU the lookup checked), and only until [`FibHop::expires`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FibHop {
    /// `bpf_ktime_get_coarse_ns` after which the hop is stale; 0: never resolved.
    pub expires: u64,
    /// The receiving slot's address it was resolved for, as in [`BoundSlot::addr`].
    pub dst: [u8; 16],
    /// The source address to send from (the relay address, or the route's preferred source),
    /// as in [`BoundSlot::relay_addr`].
    pub src: [u8; 16],
    /// The interface the datagram leaves by.
    pub egress: u32,
    /// The interface the datagram that resolved it came in on.
    pub ingress: u32,
    /// The receiving slot's port it was resolved for, host order.
    pub dst_port: u16,
    /// The longest IP length (IPv4 total length, IPv6 payload length + 40) the lookup cleared
    /// against the route's MTU.
    pub max_len: u16,
    /// The next hop's MAC address (Ethernet destination).
    pub dmac: [u8; 6],
    /// The egress interface's MAC address (Ethernet source).
    pub smac: [u8; 6],
    /// 1: leave by `XDP_REDIRECT` even when [`FibHop::egress`] is [`FibHop::ingress`] (the
    /// ingress interface has [`FAST_BACK_BY_REDIRECT`]).
    pub back_by_redirect: u8,
    /// Zero.
    pub _pad: [u8; 7],
}

impl FibHop {
    /// Whether the hop may carry a datagram of IP length `len` that came in on `ingress`, for
    /// a receiving slot bound at `dst`, `dst_port`, at `now` (ns).
    #[inline(always)]
    pub fn serves(&self, ingress: u32, dst: &[u8; 16], dst_port: u16, len: u16, now: u64) -> bool {
        now < self.expires
            && self.ingress == ingress
            && self.dst_port == dst_port
            && len <= self.max_len
            && self.dst == *dst
    }
}

/// The value of [`MAP_FIB_CACHE`]: the next hop to slot A, then to slot B.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FibCache {
    /// Per receiving slot.
    pub slots: [FibHop; 2],
}

/// Everything the program needs to know, in map [`MAP_CONFIG`] at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// DATA, KEEPALIVE, CLOSE packets per source.
    pub data_packets: Rate,
    /// DATA, KEEPALIVE, CLOSE bytes per source.
    pub data_bytes: Rate,
    /// BIND and REBIND packets per source: those without a valid cookie and those with one
    /// each have a meter of this rate.
    pub handshake: Rate,
    /// BIND and REBIND packets without a valid cookie from all sources together.
    pub handshake_total: Rate,
    /// Mask applied to IPv6 sources before metering (`xdp.ipv6_prefix_len`).
    pub ipv6_mask: [u8; 16],
    /// The relay's UDP ports, host order; unused entries are 0 (port 0 never matches).
    pub ports: [u16; MAX_PORTS],
    /// [`FLAG_ACTIVE`] | [`FLAG_DROP_ALL_FRAGMENTS`] | [`FLAG_SESSION_FILTER`] |
    /// [`FLAG_FAST_PATH`].
    pub flags: u16,
    /// The IPv4 TTL of datagrams the fast path sends (the relay host's
    /// `net.ipv4.ip_default_ttl`, what the relay's own sockets use).
    pub ttl: u8,
    /// The IPv6 hop limit of datagrams the fast path sends (the host's default hop limit).
    pub hop_limit: u8,
    /// Zero; keeps the struct free of padding.
    pub reserved: [u16; 2],
}

impl GuardConfig {
    /// The IPv6 mask that keeps the first `prefix_len` bits (clamped to 128).
    pub const fn ipv6_mask_for(prefix_len: u8) -> [u8; 16] {
        let mut mask = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            let bits = prefix_len as i32 - (i as i32) * 8;
            mask[i] = if bits >= 8 {
                0xff
            } else if bits <= 0 {
                0
            } else {
                !(0xffu8 >> bits)
            };
            i += 1;
        }
        mask
    }

    /// Whether `port` (host order) is one of the relay's.
    #[inline(always)]
    pub fn is_relay_port(&self, port: u16) -> bool {
        port != 0
            && (port == self.ports[0]
                || port == self.ports[1]
                || port == self.ports[2]
                || port == self.ports[3])
    }
}

/// One counter: packets and bytes (whole frames, as the NIC delivered them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Frames.
    pub packets: u64,
    /// Bytes of those frames, link-layer header included.
    pub bytes: u64,
}

/// What the program did with a frame, and why: one per-CPU counter slot each.
///
/// Slots `0..FIRST_MALFORMED` are these variants; slots `FIRST_MALFORMED..COUNTER_SLOTS` are
/// the header rules of docs/protocol.md §2.1, in [`HeaderError`] order.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A well-formed relay packet within its source's limits: passed to the relay.
    PassRelay = 0,
    /// A well-formed relay packet from an allow-listed source: passed without metering.
    PassAllowListed = 1,
    /// Not relay traffic (another protocol or port): passed untouched.
    PassOther = 2,
    /// An IP fragment of relay traffic (or any non-first fragment with
    /// `xdp.drop_all_fragments`); relay datagrams are never fragmented.
    DropFragment = 3,
    /// An IP header the kernel would drop too: bad version, IHL < 5, lengths beyond the frame,
    /// an IPv4-mapped IPv6 source, or more IPv6 extension headers than the guard walks.
    DropBadIpHeader = 4,
    /// A UDP length that disagrees with the IP length, or is under 8.
    DropBadUdpLength = 5,
    /// From a deny-listed source.
    DropDenyListed = 6,
    /// A relay-only type (CHALLENGE, BIND-ACK, REJECT) sent to the relay.
    DropUnexpectedType = 7,
    /// BIND or REBIND over the source's handshake rate.
    DropRateHandshake = 8,
    /// DATA, KEEPALIVE or CLOSE over the source's packet rate.
    DropRateDataPackets = 9,
    /// DATA, KEEPALIVE or CLOSE over the source's byte rate.
    DropRateDataBytes = 10,
    /// BIND or REBIND without a valid cookie over the relay-wide handshake rate (all sources
    /// together).
    DropRateHandshakeTotal = 11,
    /// DATA, KEEPALIVE, REBIND or CLOSE for a session the relay does not hold.
    DropUnknownSession = 12,
    /// DATA or KEEPALIVE for a session the relay holds, from an address and port that none
    /// of its slots is bound to.
    DropUnboundSource = 13,
    /// A BIND or REBIND with an address cookie valid for its source: passed to the relay after
    /// its source's meter for such handshakes, without the relay-wide budget.
    PassCookie = 14,
    /// DATA the fast path forwarded out of the interface it came in on (`XDP_TX`).
    FastTx = 15,
    /// DATA the fast path forwarded by `XDP_REDIRECT`: out of another interface, or back out
    /// of a veth it came in on ([`FAST_BACK_BY_REDIRECT`]).
    FastRedirect = 16,
    /// DATA over its sending slot's byte budget, dropped by the fast path as the relay would.
    FastOverBudget = 17,
    /// Fast path fallback: DATA for a session not in the map, from an address no slot is
    /// bound to, or whose other slot is not bound; the relay decides (and drops it).
    FastPeerUnbound = 18,
    /// Fast path fallback: the two slots are bound in different IP families.
    FastMixedFamily = 19,
    /// Fast path fallback: the relay did not clear the session for the fast path (a budget it
    /// cannot express, no relay port for the receiving slot's family).
    FastNotEligible = 20,
    /// Fast path fallback: VLAN-tagged frame.
    FastVlan = 21,
    /// Fast path fallback: IPv4 options or IPv6 extension headers.
    FastIpOptions = 22,
    /// Fast path fallback: the fast path does not take DATA in on the interface it came in on,
    /// or does not send out of the one the route leaves by (not active there, or a veth whose
    /// peer takes no XDP frames).
    FastInterface = 23,
    /// Fast path fallback: the FIB has no route, no neighbour entry yet, or a smaller MTU.
    FastFibMiss = 24,
    /// Fast path fallback: IPv6 UDP without a checksum (the kernel drops it).
    FastNoChecksum = 25,
    /// Fast path fallback: the byte meter changed under this CPU too often in a row.
    FastContended = 26,
    /// Fast path fallback: the UDP checksum field holds only the pseudo-header's sum, which a
    /// sender leaves when it hands the rest of the checksum to its device (checksum offload,
    /// on a veth or a local socket's path); forwarded as it is, the receiver would drop it.
    FastPartialChecksum = 27,
    /// A BIND or REBIND without a valid address cookie, answered by the guard with a
    /// CHALLENGE by `XDP_TX` ([`FLAG_CHALLENGE`]).
    ChallengeTx = 28,
    /// The same, answered by `XDP_REDIRECT` back out of the veth it came in on.
    ChallengeRedirect = 29,
    /// A CHALLENGE the guard had begun to write over its request could not be sent (the
    /// kernel cut the frame to another length than asked, or refused the redirect): the frame
    /// is no longer the request, so it is dropped. Not expected to happen.
    DropChallengeFailed = 30,
}

/// The first slot of the malformed-header counters.
pub const FIRST_MALFORMED: u32 = 31;
/// Number of counter slots: the [`Counter`] variants, then one per [`HeaderError`].
pub const COUNTER_SLOTS: u32 = FIRST_MALFORMED + HeaderError::COUNT as u32;

impl Counter {
    /// Every variant, in slot order.
    pub const ALL: [Counter; FIRST_MALFORMED as usize] = [
        Counter::PassRelay,
        Counter::PassAllowListed,
        Counter::PassOther,
        Counter::DropFragment,
        Counter::DropBadIpHeader,
        Counter::DropBadUdpLength,
        Counter::DropDenyListed,
        Counter::DropUnexpectedType,
        Counter::DropRateHandshake,
        Counter::DropRateDataPackets,
        Counter::DropRateDataBytes,
        Counter::DropRateHandshakeTotal,
        Counter::DropUnknownSession,
        Counter::DropUnboundSource,
        Counter::PassCookie,
        Counter::FastTx,
        Counter::FastRedirect,
        Counter::FastOverBudget,
        Counter::FastPeerUnbound,
        Counter::FastMixedFamily,
        Counter::FastNotEligible,
        Counter::FastVlan,
        Counter::FastIpOptions,
        Counter::FastInterface,
        Counter::FastFibMiss,
        Counter::FastNoChecksum,
        Counter::FastContended,
        Counter::FastPartialChecksum,
        Counter::ChallengeTx,
        Counter::ChallengeRedirect,
        Counter::DropChallengeFailed,
    ];

    /// The fast path's fallbacks: DATA it passed to the relay, and why.
    pub const FAST_FALLBACKS: [Counter; 10] = [
        Counter::FastPeerUnbound,
        Counter::FastMixedFamily,
        Counter::FastNotEligible,
        Counter::FastVlan,
        Counter::FastIpOptions,
        Counter::FastInterface,
        Counter::FastFibMiss,
        Counter::FastNoChecksum,
        Counter::FastContended,
        Counter::FastPartialChecksum,
    ];

    /// The counter slot.
    pub const fn slot(self) -> u32 {
        self as u32
    }

    /// The slot counting frames that broke header rule `rule`.
    pub const fn malformed_slot(rule: HeaderError) -> u32 {
        FIRST_MALFORMED + rule as u32
    }

    /// `(action, reason)` labels: action is `pass` or `drop`.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Counter::PassRelay => ("pass", "relay"),
            Counter::PassAllowListed => ("pass", "allow_listed"),
            Counter::PassOther => ("pass", "not_relay"),
            Counter::DropFragment => ("drop", "fragment"),
            Counter::DropBadIpHeader => ("drop", "bad_ip_header"),
            Counter::DropBadUdpLength => ("drop", "bad_udp_length"),
            Counter::DropDenyListed => ("drop", "deny_listed"),
            Counter::DropUnexpectedType => ("drop", "unexpected_type"),
            Counter::DropRateHandshake => ("drop", "rate_handshake"),
            Counter::DropRateDataPackets => ("drop", "rate_data_packets"),
            Counter::DropRateDataBytes => ("drop", "rate_data_bytes"),
            Counter::DropRateHandshakeTotal => ("drop", "rate_handshake_total"),
            Counter::DropUnknownSession => ("drop", "unknown_session"),
            Counter::DropUnboundSource => ("drop", "unbound_source"),
            Counter::PassCookie => ("pass", "relay_cookie"),
            Counter::FastTx => ("tx", "fast_path"),
            Counter::FastRedirect => ("redirect", "fast_path"),
            Counter::FastOverBudget => ("drop", "fast_over_budget"),
            Counter::FastPeerUnbound => ("pass", "fast_peer_unbound"),
            Counter::FastMixedFamily => ("pass", "fast_mixed_family"),
            Counter::FastNotEligible => ("pass", "fast_not_eligible"),
            Counter::FastVlan => ("pass", "fast_vlan"),
            Counter::FastIpOptions => ("pass", "fast_ip_options"),
            Counter::FastInterface => ("pass", "fast_interface"),
            Counter::FastFibMiss => ("pass", "fast_fib_miss"),
            Counter::FastNoChecksum => ("pass", "fast_no_checksum"),
            Counter::FastContended => ("pass", "fast_contended"),
            Counter::FastPartialChecksum => ("pass", "fast_partial_checksum"),
            Counter::ChallengeTx => ("tx", "challenge"),
            Counter::ChallengeRedirect => ("redirect", "challenge"),
            Counter::DropChallengeFailed => ("drop", "challenge_failed"),
        }
    }
}

/// `(action, reason)` labels of any slot in `0..COUNTER_SLOTS`: malformed-header slots are
/// `("drop", "malformed_<rule>")` as in the relay's own counters.
pub fn slot_labels(slot: u32) -> Option<(&'static str, &'static str)> {
    if let Some(counter) = Counter::ALL.get(slot as usize) {
        return Some(counter.labels());
    }
    let rule = HeaderError::ALL.get(slot.checked_sub(FIRST_MALFORMED)? as usize)?;
    Some(("drop", malformed_reason(*rule)))
}

/// The counter reason of a header rule: `malformed_<rule name>`.
pub const fn malformed_reason(rule: HeaderError) -> &'static str {
    match rule {
        HeaderError::TooShort => "malformed_too_short",
        HeaderError::TooLong => "malformed_too_long",
        HeaderError::BadMagic => "malformed_bad_magic",
        HeaderError::BadVersion => "malformed_bad_version",
        HeaderError::UnknownType => "malformed_unknown_type",
        HeaderError::ZeroSession => "malformed_zero_session",
        HeaderError::ReservedNonZero => "malformed_reserved_non_zero",
        HeaderError::LengthMismatch => "malformed_length_mismatch",
        HeaderError::BodyLengthOutOfRange => "malformed_body_length_out_of_range",
    }
}

#[cfg(feature = "user")]
mod pod {
    //! aya's `Pod`: these types are `#[repr(C)]`, have no padding, and every bit pattern is a
    //! valid value, so copying them to and from the kernel byte for byte is sound.
    #![allow(unsafe_code)]

    use super::{
        BoundSlot, ByteBudget, CookieKeys, CounterValue, FastSlot, FastState, FibCache, FibHop,
        GuardConfig, Meter, Rate, SessionEntry, SourceKey, SourceState,
    };

    // SAFETY (all fourteen impls below): #[repr(C)], fields are integers or integer arrays laid out
    // without padding (checked by the size assertions in the tests), so any bytes are a valid
    // value.
    unsafe impl aya::Pod for Rate {}
    unsafe impl aya::Pod for Meter {}
    unsafe impl aya::Pod for SourceState {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for GuardConfig {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for BoundSlot {}
    unsafe impl aya::Pod for SessionEntry {}
    unsafe impl aya::Pod for CookieKeys {}
    unsafe impl aya::Pod for ByteBudget {}
    unsafe impl aya::Pod for FastSlot {}
    unsafe impl aya::Pod for FastState {}
    unsafe impl aya::Pod for FibHop {}
    unsafe impl aya::Pod for FibCache {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::mem::size_of;
    use proptest::prelude::*;

    #[test]
    fn map_types_have_no_padding() {
        assert_eq!(size_of::<Rate>(), 16);
        assert_eq!(size_of::<Meter>(), 16);
        assert_eq!(size_of::<SourceState>(), 64);
        assert_eq!(size_of::<CookieKeys>(), 3 * 16 + 8);
        assert_eq!(size_of::<SourceKey>(), 16);
        assert_eq!(
            size_of::<GuardConfig>(),
            4 * 16 + 16 + 2 * MAX_PORTS + 2 + 6
        );
        assert_eq!(size_of::<CounterValue>(), 16);
        assert_eq!(
            size_of::<BoundSlot>(),
            16 + 2 + 1 + 1 + 2 + 1 + 1 + 16 + 16 + 8 + 16
        );
        assert_eq!(size_of::<ByteBudget>(), 16);
        assert_eq!(size_of::<FastSlot>(), 56);
        assert_eq!(size_of::<FastState>(), 112);
        assert_eq!(size_of::<FibHop>(), 8 + 16 + 16 + 4 + 4 + 2 + 2 + 6 + 6 + 8);
        assert_eq!(size_of::<FibCache>(), 2 * size_of::<FibHop>());
        assert_eq!(size_of::<SessionEntry>(), 2 * size_of::<BoundSlot>());
    }

    #[test]
    fn a_session_entry_admits_exactly_its_bound_slots() {
        let v4 = |last: u8| [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, last];
        let mut entry = SessionEntry::default();
        // Nothing bound: not even the all-zero address and port.
        assert!(!entry.from_bound_slot(&[0; 16], 0));
        entry.slots[1] = BoundSlot {
            addr: v4(2),
            port: 4000,
            bound: 1,
            ..BoundSlot::default()
        };
        assert!(entry.from_bound_slot(&v4(2), 4000));
        assert!(!entry.from_bound_slot(&v4(2), 4001));
        assert!(!entry.from_bound_slot(&v4(3), 4000));
        assert!(!entry.from_bound_slot(&[0; 16], 0));
    }

    fn v4(last: u8) -> [u8; 16] {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, last]
    }

    fn slot(addr: [u8; 16], port: u16, rate: u64) -> BoundSlot {
        BoundSlot {
            addr,
            port,
            bound: 1,
            relay_port: 7000,
            budget: ByteBudget::new(rate, rate).unwrap_or_default(),
            ..BoundSlot::default()
        }
    }

    #[test]
    fn the_fast_path_needs_a_bound_sender_a_bound_receiver_a_budget_and_one_family() {
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let mut entry = SessionEntry::default();
        assert_eq!(entry.fast_route(&v4(2), 1), Err(Counter::FastPeerUnbound));
        entry.slots[0] = slot(v4(2), 1, 1000);
        assert_eq!(entry.fast_route(&v4(2), 1), Err(Counter::FastPeerUnbound));
        entry.slots[1] = slot(v4(3), 2, 1000);
        assert_eq!(entry.fast_route(&v4(2), 1), Ok((0, 1)));
        assert_eq!(entry.fast_route(&v4(3), 2), Ok((1, 0)));
        assert_eq!(entry.fast_route(&v4(3), 1), Err(Counter::FastPeerUnbound));
        assert_eq!(entry.fast_sendable(0, 1), Ok(()));
        entry.slots[1] = slot(v6, 2, 1000);
        assert_eq!(entry.fast_route(&v4(2), 1), Ok((0, 1)));
        assert_eq!(entry.fast_sendable(0, 1), Err(Counter::FastMixedFamily));
        entry.slots[1] = slot(v4(3), 2, 0);
        assert_eq!(entry.fast_route(&v4(2), 1), Ok((0, 1)));
        assert_eq!(entry.fast_route(&v4(3), 2), Err(Counter::FastNotEligible));
        entry.slots[1].relay_port = 0;
        assert_eq!(entry.fast_sendable(0, 1), Err(Counter::FastNotEligible));
    }

    #[test]
    fn a_silent_slot_gets_its_burst_then_its_rate_across_the_clock_wrapping() {
        let budget = ByteBudget::new(1000, 3000).expect("valid"); // 1 ms a byte
        // Start just before the meter's clock (ns << 10) wraps.
        let t0 = (u64::MAX >> FAST_SHIFT) - 1_000_000;
        let mut tat = t0.wrapping_shl(FAST_SHIFT);
        for _ in 0..3 {
            tat = budget.admit(tat, t0, 1000).expect("within the burst");
        }
        assert_eq!(budget.admit(tat, t0, 1), None, "burst spent");
        assert_eq!(budget.admit(tat, t0 + 999_000, 1), None, "too early");
        let later = t0 + 1_000_000 + 10;
        tat = budget
            .admit(tat, later, 1)
            .expect("a byte's worth of time refills a byte");
        // Far past the wrap, a silent slot has its whole burst again.
        let much_later = later + 3_600_000_000_000;
        assert!(budget.admit(tat, much_later, 3000).is_some());
        assert_eq!(
            budget.admit(tat, much_later, 3001),
            None,
            "never more than the burst"
        );
    }

    #[test]
    fn a_budget_change_keeps_what_was_saved_capped_at_the_new_burst() {
        let slow = ByteBudget::new(1000, 3000).expect("valid");
        let fast = ByteBudget::new(1_000_000, 1_000_000).expect("valid");
        let now = 1 << 40;
        // 2000 of 3000 bytes spent: 1000 saved.
        let tat = slow.admit(now << FAST_SHIFT, now, 2000).expect("within");
        let moved = fast.carry_over(tat, now, &slow, &slow);
        assert!(fast.admit(moved, now, 1000).is_some());
        assert_eq!(fast.admit(moved, now, 1001), None);
        // And back: the 1000 saved fit the smaller burst.
        let back = slow.carry_over(moved, now, &fast, &fast);
        assert!(slow.admit(back, now, 1000).is_some());
        assert_eq!(slow.admit(back, now, 1001), None);
        // A full meter keeps the burst it had, capped at the new one.
        let full = slow.carry_over(0, now, &fast, &fast);
        assert!(slow.admit(full, now, 3000).is_some());
        assert_eq!(slow.admit(full, now, 3001), None);
        let up = fast.carry_over(0, now, &slow, &slow);
        assert!(fast.admit(up, now, 3000).is_some());
        assert_eq!(
            fast.admit(up, now, 3001),
            None,
            "only what was saved: slow's burst"
        );
        // A meter never charged was full under the budget before.
        let never = fast.carry_over(0, now, &ByteBudget::default(), &slow);
        assert_eq!(never, up);
    }

    #[test]
    fn a_budget_is_charged_no_earlier_than_the_relay_set_it() {
        let budget = ByteBudget::new(1000, 3000).expect("valid"); // 1 ms a byte
        let since = 1u64 << 40;
        let slot = BoundSlot {
            budget,
            budget_since: since,
            budget_fresh: 1,
            ..BoundSlot::default()
        };
        // The program's coarse clock may still read up to a tick before the relay's stamp.
        let lagging = since - 3_999_999;
        assert_eq!(slot.charge_time(lagging), since);
        assert_eq!(slot.charge_time(since + 5), since + 5);
        let start = FastSlot::start(0, 0, &ByteBudget::default(), &slot);
        let tat = budget
            .admit(start, slot.charge_time(lagging), 3000)
            .expect("a budget the relay just created is full");
        assert_eq!(budget.admit(tat, slot.charge_time(lagging), 1), None);
        // Never set (0): the clock as read; and across the clock's wrap.
        let unset = BoundSlot::default();
        assert_eq!(unset.charge_time(12345), 12345);
        let wrapping = BoundSlot {
            budget_since: 5,
            ..BoundSlot::default()
        };
        assert_eq!(wrapping.charge_time(u64::MAX - 5), 5);
        assert_eq!(wrapping.charge_time(6), 6);
    }

    proptest! {
        /// Over any arrival pattern, the fast path's meter admits what a token bucket of the
        /// same rate and burst admits, to within rounding of one byte's cost.
        #[test]
        fn the_byte_budget_admits_no_more_than_burst_plus_rate(
            rate in 1_000u64..200_000_000,
            gaps in proptest::collection::vec(0u64..2_000_000, 1..300),
            sizes in proptest::collection::vec(17u64..1473, 1..300),
        ) {
            let burst = rate.max(2944);
            let budget = ByteBudget::new(rate, burst).expect("valid");
            let start = 5_000_000_000u64;
            let mut now = start;
            let mut tat = 0;
            let mut admitted = 0u128;
            for (gap, size) in gaps.iter().zip(sizes.iter().cycle()) {
                now += gap;
                if let Some(t) = budget.admit(tat, now, *size) {
                    tat = t;
                    admitted += u128::from(*size);
                }
            }
            let elapsed = u128::from(now - start);
            let base = u128::from(burst) + elapsed * u128::from(rate) / 1_000_000_000 + 1;
            let bound = base + base / u128::from(budget.cost) + 1;
            prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
        }

        /// With the program's coarse clock, which reads the time of the last scheduler tick,
        /// every interval between two admissions holds at most burst + rate × (its length + one
        /// tick): one tick more than the precise meter, never more over time.
        #[test]
        fn on_a_ticking_clock_the_byte_budget_admits_at_most_one_tick_more(
            rate in 1_000u64..200_000_000,
            tick in prop_oneof![Just(1_000_000u64), Just(4_000_000), Just(10_000_000)],
            gaps in proptest::collection::vec(0u64..100, 1..400),
            sizes in proptest::collection::vec(17u64..1473, 1..400),
        ) {
            let burst = 2944; // two of the largest datagrams: the meter limits at once
            let budget = ByteBudget::new(rate, burst).expect("valid");
            // Start just before a tick, when the coarse clock lags the most.
            let mut now = 5_000_000_000u64 + tick - 1;
            let mut tat = 0;
            let mut admitted: std::vec::Vec<(u64, u64)> = std::vec::Vec::new();
            for (gap, size) in gaps.iter().zip(sizes.iter().cycle()) {
                let coarse = now - now % tick;
                if let Some(t) = budget.admit(tat, coarse, *size) {
                    tat = t;
                    admitted.push((now, *size));
                }
                // Offered faster than the rate (each gap under its datagram's worth of time),
                // so the meter is what limits.
                now += size * 1_000_000_000 / rate * gap / 100;
            }
            for i in 0..admitted.len() {
                let mut bytes = 0u128;
                for &(at, size) in &admitted[i..] {
                    bytes += u128::from(size);
                    let window = u128::from(at - admitted[i].0 + tick);
                    let base = u128::from(burst) + window * u128::from(rate) / 1_000_000_000 + 1;
                    let bound = base + base / u128::from(budget.cost) + 1;
                    prop_assert!(bytes <= bound, "{bytes} bytes in a window, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn every_slot_has_distinct_labels() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..COUNTER_SLOTS {
            let labels = slot_labels(slot).expect("every slot is labelled");
            assert!(seen.insert(labels), "slot {slot} repeats {labels:?}");
        }
        assert_eq!(slot_labels(COUNTER_SLOTS), None);
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.slot() as usize, i);
        }
        assert_eq!(
            slot_labels(Counter::malformed_slot(HeaderError::BadMagic)),
            Some(("drop", "malformed_bad_magic"))
        );
    }

    #[test]
    fn ipv6_masks() {
        assert_eq!(GuardConfig::ipv6_mask_for(0), [0; 16]);
        assert_eq!(GuardConfig::ipv6_mask_for(128), [0xff; 16]);
        let m = GuardConfig::ipv6_mask_for(60);
        assert_eq!(&m[..7], &[0xff; 7]);
        assert_eq!(m[7], 0xf0);
        assert_eq!(&m[8..], &[0; 8]);
    }

    #[test]
    fn rate_rejects_nonsense() {
        assert_eq!(Rate::new(0, 10), None);
        assert_eq!(Rate::new(10, 0), None);
        assert_eq!(Rate::new(1, MAX_BURST_SECONDS), None);
        assert!(Rate::new(1, MAX_BURST_SECONDS - 1).is_some());
        assert!(Rate::new(10_000_000_000, 100_000_000).is_some());
    }

    #[test]
    fn a_silent_source_gets_its_burst_then_its_rate() {
        let rate = Rate::new(1000, 10).expect("valid"); // 1 ms a packet
        let mut meter = Meter::default();
        let t0 = 5_000_000_000;
        for _ in 0..10 {
            meter = meter.admit(&rate, t0, 1).expect("within burst");
        }
        assert_eq!(meter.admit(&rate, t0, 1), None, "burst spent");
        assert_eq!(meter.admit(&rate, t0 + 999_000, 1), None, "too early");
        let after = meter.admit(&rate, t0 + 1_000_000, 1);
        assert!(
            after.is_some(),
            "one packet's worth of time refills one packet"
        );
    }

    #[test]
    fn unlimited_admits_everything() {
        let meter = Meter::default();
        assert_eq!(meter.admit(&Rate::UNLIMITED, 1, 1 << 40), Some(meter));
    }

    proptest! {
        /// Over any arrival pattern, the admitted units never exceed burst + rate × elapsed.
        #[test]
        fn admitted_never_exceeds_burst_plus_rate(
            per_second in 1u64..10_000_000,
            burst in 1u64..10_000,
            gaps in proptest::collection::vec(0u64..2_000_000, 1..400),
            units in 1u64..1500,
        ) {
            prop_assume!(burst / per_second < MAX_BURST_SECONDS);
            let rate = Rate::new(per_second, burst.max(units)).expect("valid");
            let burst = burst.max(units);
            let start = 1_000_000_000u64;
            let mut now = start;
            let mut meter = Meter::default();
            let mut admitted = 0u128;
            for gap in gaps {
                now += gap;
                if let Some(m) = meter.admit(&rate, now, units) {
                    meter = m;
                    admitted += u128::from(units);
                }
            }
            let elapsed = u128::from(now - start);
            // Costs round down by under one part in `cost`, admitting that much more.
            let base = u128::from(burst) + elapsed * u128::from(per_second) / 1_000_000_000 + 1;
            let bound = base + base / u128::from(rate.cost) + 1;
            prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
        }

        /// A source that keeps to its rate is never refused.
        #[test]
        fn a_source_at_its_rate_is_never_refused(
            per_second in 1u64..1_000_000,
            burst in 1u64..100,
            n in 1usize..300,
        ) {
            prop_assume!(burst / per_second < MAX_BURST_SECONDS);
            let rate = Rate::new(per_second, burst).expect("valid");
            let interval = 1_000_000_000 / per_second + 1;
            let mut meter = Meter::default();
            let mut now = 1u64 << 40;
            for _ in 0..n {
                meter = meter.admit(&rate, now, 1).expect("at its rate");
                now += interval;
            }
        }
    }
}
