//! The XDP guard's loader: embeds the program built from `ebpf/xdp` (see `build.rs`), loads it
//! with aya, writes the relay's limits and CIDR lists into its maps, attaches it to the
//! configured interfaces, reads its counters, and detaches on drop.
//!
//! Attachment uses a BPF link (Linux 5.9+), owned by this process: when the relay exits,
//! however it exits, the kernel detaches the program. Nothing is pinned in bpffs.
//!
//! The program and the relay share one contract, `ferry_common::xdp` (map names, value types,
//! counter slots), and one header check, `ferry_common::header::check_header`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, DevMapHash, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ferry_common::cookie::CookieKey;
use ferry_common::xdp::{
    BoundSlot, ByteBudget, COUNTER_SLOTS, CookieKeys, CounterValue, FAST_BACK_BY_REDIRECT, FAST_IN,
    FLAG_ACTIVE, FLAG_CHALLENGE, FLAG_DROP_ALL_FRAGMENTS, FLAG_FAST_PATH, FLAG_LISTS_V4,
    FLAG_LISTS_V6, FLAG_SESSION_FILTER, FastState, FibCache, GuardConfig, LIST_ALLOW, LIST_DENY,
    MAP_CIDR_V4, MAP_CIDR_V6, MAP_CONFIG, MAP_COOKIE_KEYS, MAP_COUNTERS, MAP_FAST_IFACES,
    MAP_FAST_INGRESS, MAP_FAST_STATE, MAP_FAST_TOTALS, MAP_FIB_CACHE, MAP_RELAY_ADDRS,
    MAP_REPLY_IFACES, MAP_SESSIONS, MAP_SOURCES, MAX_PORTS, PROGRAM_NAME, REPLY_REDIRECT, REPLY_TX,
    Rate, SessionEntry,
};
pub use ferry_core::cidr::Cidr;

use crate::ethtool;
use crate::session::{SessionEvent, SessionLimits, SlotBudget};
use crate::shards::SessionObserver;

/// The XDP program, built from source by `build.rs`; empty when built with
/// `FERRY_SKIP_EBPF=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-xdp.o"));

/// XDP's return code for "drop", as [`Guard::test_run`] reports it.
pub const XDP_DROP: u32 = 1;
/// XDP's return code for "pass to the kernel".
pub const XDP_PASS: u32 = 2;
/// XDP's return code for "send back out of the interface it came in on".
pub const XDP_TX: u32 = 3;
/// XDP's return code for "send out of another interface" (through a device map).
pub const XDP_REDIRECT: u32 = 4;

/// How the guard attaches (`xdp.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Native (driver) mode; generic mode with a warning when the driver lacks XDP.
    Auto,
    /// Native mode or fail.
    Native,
    /// Generic (SKB) mode: runs after the kernel allocates the packet, so it saves less.
    Generic,
    /// No XDP guard: the relay's own checks and limits still apply.
    Off,
}

impl Mode {
    /// The config spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::Off => "off",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "native" => Ok(Mode::Native),
            "generic" => Ok(Mode::Generic),
            "off" => Ok(Mode::Off),
            _ => Err(format!(
                "must be one of auto, native, generic, off; got {s:?}"
            )),
        }
    }
}

/// How the program ended up attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// In the driver, before the kernel allocates anything.
    Native,
    /// In the kernel's receive path (generic/SKB mode).
    Generic,
}

impl Attachment {
    /// `native` or `generic`, as the metrics label it.
    pub const fn name(self) -> &'static str {
        match self {
            Attachment::Native => "native",
            Attachment::Generic => "generic",
        }
    }
}

/// The validated `[xdp]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct XdpSettings {
    /// How to attach.
    pub mode: Mode,
    /// The interfaces that carry relay traffic.
    pub interfaces: Vec<String>,
    /// Sources tracked at once (LRU); a restart applies a change.
    pub max_sources: u32,
    /// IPv6 sources are metered by this prefix.
    pub ipv6_prefix_len: u8,
    /// Drop every non-first IP fragment, whatever its port.
    pub drop_all_fragments: bool,
    /// DATA/KEEPALIVE/CLOSE packets per source.
    pub data_packets: Rate,
    /// DATA/KEEPALIVE/CLOSE bytes per source.
    pub data_bytes: Rate,
    /// BIND/REBIND packets per source.
    pub handshake: Rate,
    /// BIND/REBIND packets from all sources together.
    pub handshake_total: Rate,
    /// Drop DATA, KEEPALIVE, REBIND and CLOSE for sessions the relay does not hold; the relay
    /// keeps the guard's session map in step through [`SessionFilter`].
    pub session_filter: bool,
    /// Forward bound sessions' DATA in XDP on the interfaces the guard is attached to in
    /// native mode (`xdp.fast_path`).
    pub fast_path: bool,
    /// Answer BINDs and REBINDs without a valid address cookie with a CHALLENGE from XDP
    /// where the interface allows (`xdp.answer_challenges`).
    pub answer_challenges: bool,
    /// Sources dropped outright.
    pub deny: Vec<Cidr>,
    /// Sources exempt from metering (the longest matching prefix wins over `deny`).
    pub allow: Vec<Cidr>,
}

impl XdpSettings {
    /// The program's config for relay `ports` (at most [`MAX_PORTS`] distinct, checked by
    /// config validation).
    pub fn guard_config(&self, ports: &[u16]) -> GuardConfig {
        let mut cfg = GuardConfig {
            data_packets: self.data_packets,
            data_bytes: self.data_bytes,
            handshake: self.handshake,
            handshake_total: self.handshake_total,
            ipv6_mask: GuardConfig::ipv6_mask_for(self.ipv6_prefix_len),
            flags: FLAG_ACTIVE,
            ttl: host_default("/proc/sys/net/ipv4/ip_default_ttl"),
            hop_limit: host_default("/proc/sys/net/ipv6/conf/default/hop_limit"),
            ..GuardConfig::default()
        };
        if self.fast_path {
            cfg.flags |= FLAG_FAST_PATH;
        }
        if self.answer_challenges {
            cfg.flags |= FLAG_CHALLENGE;
        }
        if self.drop_all_fragments {
            cfg.flags |= FLAG_DROP_ALL_FRAGMENTS;
        }
        if self.session_filter {
            cfg.flags |= FLAG_SESSION_FILTER;
        }
        for cidr in self.deny.iter().chain(&self.allow) {
            cfg.flags |= match cidr.addr() {
                IpAddr::V4(_) => FLAG_LISTS_V4,
                IpAddr::V6(_) => FLAG_LISTS_V6,
            };
        }
        for (slot, port) in cfg.ports.iter_mut().zip(ports.iter().take(MAX_PORTS)) {
            *slot = *port;
        }
        cfg
    }

    /// Every list entry with its map value; allow wins over deny for the same prefix
    /// (validation refuses that anyway).
    fn lists(&self) -> BTreeMap<Cidr, u32> {
        let mut lists = BTreeMap::new();
        for cidr in &self.deny {
            lists.insert(*cidr, LIST_DENY);
        }
        for cidr in &self.allow {
            lists.insert(*cidr, LIST_ALLOW);
        }
        lists
    }
}

/// Why the guard could not be loaded, configured or attached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    /// The kernel refused the program or its maps (verifier log included).
    #[error(
        "loading the XDP program failed: {0}. It needs root (or CAP_BPF, CAP_PERFMON and \
         CAP_NET_ADMIN) and Linux 5.9 or newer; set xdp.mode = \"off\" to run without it"
    )]
    Load(String),
    /// A map the program should have is missing or of the wrong type.
    #[error("the XDP program's map {name}: {message}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Attaching to an interface failed.
    #[error("attaching the XDP guard to {interface} in {mode} mode failed: {message}")]
    Attach {
        /// The interface.
        interface: String,
        /// The mode tried last.
        mode: &'static str,
        /// The kernel's answer.
        message: String,
    },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("running the XDP program on a test frame failed: {0}")]
    TestRun(String),
    /// This binary was built with `FERRY_SKIP_EBPF=1` and holds no XDP program.
    #[error(
        "this build has no XDP program: it was built with FERRY_SKIP_EBPF=1. Rebuild without \
         it (needs nightly with rust-src and bpf-linker; .ci/setup installs them), or set \
         xdp.mode = \"off\""
    )]
    NotBuilt,
}

/// What the kernel said when attaching to `interface` in `mode` failed (the error and its
/// causes on one line, errno included), and what to do about the usual reasons.
fn attach_failure(interface: &str, mode: &str, e: &ProgramError) -> String {
    let line = ferry_core::error_line::one_line(e);
    match os_error(e) {
        Some(libc::EBUSY) => format!(
            "{line}: another XDP program is already attached to {interface} (`bpftool net \
             show dev {interface}` lists it; `ip link set dev {interface} xdp off` removes \
             one attached without a BPF link, else stop the program holding it)"
        ),
        Some(libc::EOPNOTSUPP | libc::EINVAL) if mode == "native" => format!(
            "{line}: the driver of {interface} cannot run XDP natively (set xdp.mode = \"auto\" \
             to fall back to generic mode)"
        ),
        _ => line,
    }
}

/// The OS error number at the bottom of `e`'s causes, if there is one.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cause = e.source();
    }
    None
}

/// Attaching to `interface` in `mode` failed before it began: no interface has that name in this
/// network namespace.
fn no_such_interface(interface: &str, mode: &'static str) -> XdpError {
    XdpError::Attach {
        interface: interface.to_owned(),
        mode,
        message: "there is no network interface of this name here (`ip link` lists them)".into(),
    }
}

fn map_error(name: &'static str, e: impl fmt::Display) -> XdpError {
    XdpError::Map {
        name,
        message: e.to_string(),
    }
}

/// The result of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The XDP action ([`XDP_PASS`], [`XDP_DROP`]).
    pub action: u32,
    /// The kernel's mean time per run.
    pub per_run: Duration,
}

/// The loaded program with its maps, and the interfaces it is attached to.
pub struct Guard {
    ebpf: Ebpf,
    filter: Option<Arc<SessionFilter>>,
    attached: Vec<(String, Attachment)>,
    /// Per attached interface, whether the fast path is active on it and why not.
    fast: Vec<(String, FastPathStatus)>,
    /// The index of each attached interface, learnt when attaching (in the namespace the
    /// guard attached in, which later calls may not run in).
    indexes: BTreeMap<String, u32>,
    /// For each interface attached in native mode, whether the XDP frames the fast path would
    /// send out of it arrive, checked when attaching (the relay may lack the privilege to
    /// check later).
    peers: BTreeMap<String, VethPeer>,
    /// `xdp.fast_path` as last configured.
    fast_wanted: bool,
    /// The CIDR entries written into the tries, so a reload removes exactly the stale ones.
    lists: BTreeMap<Cidr, u32>,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("attached", &self.attached)
            .field("lists", &self.lists.len())
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// Loads the program into the kernel (verifier included) with room for `max_sources`
    /// sources, without attaching it or configuring it: until [`Guard::configure`], it
    /// passes everything.
    pub fn load(max_sources: u32) -> Result<Self, XdpError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(MAP_SOURCES, max_sources.max(1));
        let ebpf = load_object(loader, OBJECT, PROGRAM_NAME)?;
        Ok(Guard {
            ebpf,
            filter: None,
            attached: Vec::new(),
            fast: Vec::new(),
            indexes: BTreeMap::new(),
            peers: BTreeMap::new(),
            fast_wanted: false,
            lists: BTreeMap::new(),
        })
    }

    /// Loads, configures for relay `ports`, and attaches to every configured interface;
    /// `None` when the mode is `off`.
    pub fn start(settings: &XdpSettings, ports: &[u16]) -> Result<Option<Self>, XdpError> {
        if settings.mode == Mode::Off {
            return Ok(None);
        }
        let mut guard = Guard::load(settings.max_sources)?;
        guard.configure(settings, ports)?;
        for interface in &settings.interfaces {
            guard.attach(interface, settings.mode)?;
        }
        guard.sync_fast_path()?;
        Ok(Some(guard))
    }

    /// Writes limits, ports and flags, and brings the CIDR tries in line with `settings`;
    /// the program keeps running throughout (no detach), and source meters are kept.
    pub fn configure(&mut self, settings: &XdpSettings, ports: &[u16]) -> Result<(), XdpError> {
        let wanted = settings.lists();
        let mut v4: LpmTrie<&mut MapData, [u8; 4], u32> = map_mut(&mut self.ebpf, MAP_CIDR_V4)?;
        sync_trie(&mut v4, MAP_CIDR_V4, &self.lists, &wanted, v4_key)?;
        let mut v6: LpmTrie<&mut MapData, [u8; 16], u32> = map_mut(&mut self.ebpf, MAP_CIDR_V6)?;
        sync_trie(&mut v6, MAP_CIDR_V6, &self.lists, &wanted, v6_key)?;
        self.lists = wanted;
        let mut config: Array<&mut MapData, GuardConfig> = map_mut(&mut self.ebpf, MAP_CONFIG)?;
        config
            .set(0, settings.guard_config(ports), 0)
            .map_err(|e| map_error(MAP_CONFIG, e))?;
        let changed = self.fast_wanted != settings.fast_path;
        self.fast_wanted = settings.fast_path;
        if changed && !self.attached.is_empty() {
            self.sync_fast_path()?;
        }
        self.write_fast_flag()
    }

    /// Writes [`FLAG_FAST_PATH`] as it takes effect: set only while `xdp.fast_path` is on and
    /// some attached interface takes DATA in. Elsewhere (generic mode, forwarding off, or no
    /// interface attached yet) the program would only look the session up for nothing and
    /// count every DATA as a fast-path fallback (`fast_interface`); without the flag it is
    /// `pass relay`, like any datagram the relay handles.
    fn write_fast_flag(&mut self) -> Result<(), XdpError> {
        let on = self.fast_wanted && self.fast.iter().any(|(_, s)| s.takes_data_in());
        let mut config: Array<&mut MapData, GuardConfig> = map_mut(&mut self.ebpf, MAP_CONFIG)?;
        let mut cfg = config.get(&0, 0).map_err(|e| map_error(MAP_CONFIG, e))?;
        let flags = match on {
            true => cfg.flags | FLAG_FAST_PATH,
            false => cfg.flags & !FLAG_FAST_PATH,
        };
        if flags != cfg.flags {
            cfg.flags = flags;
            config
                .set(0, cfg, 0)
                .map_err(|e| map_error(MAP_CONFIG, e))?;
        }
        Ok(())
    }

    /// Brings the fast path's interface maps in line with `xdp.fast_path`, how each interface
    /// is attached and whether its peer takes XDP frames, and logs, per interface, whether the
    /// fast path is active and why not.
    fn sync_fast_path(&mut self) -> Result<(), XdpError> {
        let mut status = Vec::with_capacity(self.attached.len());
        for (interface, attachment) in self.attached.clone() {
            let interface = interface.as_str();
            let index = self.indexes.get(interface).copied();
            let (forwarding, unknown) = forwarding(Path::new("/proc"), interface);
            let state = match (self.fast_wanted, attachment, index) {
                (false, _, _) => FastPathStatus::Off,
                (true, Attachment::Generic, _) => FastPathStatus::GenericMode,
                (true, Attachment::Native, None) => FastPathStatus::Gone,
                (true, Attachment::Native, _)
                    if forwarding == [false, false] && unknown.is_none() =>
                {
                    FastPathStatus::ForwardingOff
                }
                (true, Attachment::Native, Some(index)) => {
                    let peer = self.peers.get(interface).cloned();
                    self.activate(index, peer.unwrap_or(VethPeer::NotVeth))
                        .unwrap_or_else(|e| FastPathStatus::Refused(format!("{e:#}")))
                }
            };
            if let Some(index) = index {
                // Already absent is fine: the goal is that it is not there.
                if !state.takes_data_in() {
                    let mut ingress: HashMap<&mut MapData, u32, u32> =
                        map_mut(&mut self.ebpf, MAP_FAST_INGRESS)?;
                    let _ = ingress.remove(&index);
                }
                if state != FastPathStatus::Active {
                    let mut ifaces: DevMapHash<&mut MapData> =
                        map_mut(&mut self.ebpf, MAP_FAST_IFACES)?;
                    let _ = ifaces.remove(index);
                }
            }
            match &state {
                FastPathStatus::Active => tracing::info!(
                    interface,
                    ipv4 = forwarding[0],
                    ipv6 = forwarding[1],
                    "XDP fast path active (for the address families with forwarding on here)"
                ),
                FastPathStatus::ReceiveOnly(why) => tracing::warn!(
                    interface,
                    ipv4 = forwarding[0],
                    ipv6 = forwarding[1],
                    reason = %why,
                    "XDP fast path active for DATA arriving here, but DATA that leaves by this \
                     interface goes through the relay"
                ),
                other => tracing::info!(interface, reason = %other, "XDP fast path not active"),
            }
            if let Some(why) = &unknown
                && state.takes_data_in()
            {
                tracing::warn!(
                    interface,
                    %why,
                    "whether this interface forwards is unknown; the fast path runs anyway, and \
                     if forwarding is off its DATA falls back to the relay (counted as fast_fib_miss)"
                );
            }
            status.push((interface.to_owned(), state));
        }
        self.fast = status;
        self.write_fast_flag()
    }

    /// Puts interface `index` in the fast path's maps: in [`MAP_FAST_INGRESS`] always (a veth
    /// with [`FAST_BACK_BY_REDIRECT`]), in [`MAP_FAST_IFACES`] (the ways out) unless `peer`
    /// says its XDP frames would be lost.
    fn activate(&mut self, index: u32, peer: VethPeer) -> Result<FastPathStatus, XdpError> {
        let flags = match peer {
            VethPeer::NotVeth => FAST_IN,
            _ => FAST_IN | FAST_BACK_BY_REDIRECT,
        };
        let mut ingress: HashMap<&mut MapData, u32, u32> =
            map_mut(&mut self.ebpf, MAP_FAST_INGRESS)?;
        ingress
            .insert(index, flags, 0)
            .map_err(|e| map_error(MAP_FAST_INGRESS, e))?;
        if let Some(why) = peer.loses_frames() {
            return Ok(FastPathStatus::ReceiveOnly(why));
        }
        let mut ifaces: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, MAP_FAST_IFACES)?;
        ifaces
            .insert(index, index, None, 0)
            .map_err(|e| map_error(MAP_FAST_IFACES, e))?;
        Ok(FastPathStatus::Active)
    }

    /// Per attached interface, whether the fast path is active on it and why not.
    pub fn fast_path(&self) -> &[(String, FastPathStatus)] {
        &self.fast
    }

    /// DATA datagrams the fast path has forwarded, and their bytes (relay header included),
    /// summed over CPUs.
    pub fn fast_totals(&self) -> Result<CounterValue, XdpError> {
        let map = self
            .ebpf
            .map(MAP_FAST_TOTALS)
            .ok_or_else(|| map_error(MAP_FAST_TOTALS, "missing"))?;
        let totals: PerCpuArray<&MapData, CounterValue> =
            PerCpuArray::try_from(map).map_err(|e| map_error(MAP_FAST_TOTALS, e))?;
        let per_cpu = totals
            .get(&0, 0)
            .map_err(|e| map_error(MAP_FAST_TOTALS, e))?;
        let mut sum = CounterValue::default();
        for value in per_cpu.iter() {
            sum.packets = sum.packets.wrapping_add(value.packets);
            sum.bytes = sum.bytes.wrapping_add(value.bytes);
        }
        Ok(sum)
    }

    /// Writes the address cookie's keys of the previous, current and next window
    /// ([`ferry_core::proof::CookieJar::window_keys`]): the program takes a BIND or REBIND
    /// whose cookie is valid under one of them as coming from a source that receives at its
    /// address. Call it at start and whenever the cookie window changes; until the first call
    /// no cookie counts as valid.
    pub fn set_cookie_keys(&mut self, keys: [CookieKey; 3]) -> Result<(), XdpError> {
        let mut map: Array<&mut MapData, CookieKeys> = map_mut(&mut self.ebpf, MAP_COOKIE_KEYS)?;
        map.set(0, CookieKeys { keys, set: 1 }, 0)
            .map_err(|e| map_error(MAP_COOKIE_KEYS, e))
    }

    /// Attaches to `interface` as `mode` asks: `auto` tries native mode first and falls back
    /// to generic mode with a warning.
    pub fn attach(&mut self, interface: &str, mode: Mode) -> Result<Attachment, XdpError> {
        if !interface_exists(interface) {
            return Err(no_such_interface(interface, mode.name()));
        }
        let program = program_mut(&mut self.ebpf, PROGRAM_NAME)?;
        let fail = |mode: &'static str, e: ProgramError| XdpError::Attach {
            interface: interface.to_owned(),
            mode,
            message: attach_failure(interface, mode, &e),
        };
        let attachment = match mode {
            Mode::Native => program
                .attach(interface, XdpMode::Driver)
                .map(|_| Attachment::Native)
                .map_err(|e| fail("native", e))?,
            Mode::Generic => program
                .attach(interface, XdpMode::Skb)
                .map(|_| Attachment::Generic)
                .map_err(|e| fail("generic", e))?,
            Mode::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(_) => Attachment::Native,
                // Another program holds the interface: generic mode would not change that.
                Err(native) if os_error(&native) == Some(libc::EBUSY) => {
                    return Err(fail("native", native));
                }
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %ferry_core::error_line::one_line(&native),
                        "the driver cannot run XDP natively; attaching in generic mode, which \
                         drops later in the receive path and saves less CPU"
                    );
                    program
                        .attach(interface, XdpMode::Skb)
                        .map(|_| Attachment::Generic)
                        .map_err(|e| fail("generic", e))?
                }
            },
            Mode::Off => {
                return Err(XdpError::Attach {
                    interface: interface.to_owned(),
                    mode: "off",
                    message: "xdp.mode is off".into(),
                });
            }
        };
        tracing::info!(interface, mode = attachment.name(), "XDP guard attached");
        self.attached.push((interface.to_owned(), attachment));
        if let Some(index) = interface_index(interface) {
            self.indexes.insert(interface.to_owned(), index);
            if attachment == Attachment::Native {
                let peer = check_veth_peer(interface, index);
                let reply = match &peer {
                    VethPeer::NotVeth => Some(Reply::Tx),
                    VethPeer::Takes => Some(Reply::Redirect),
                    VethPeer::Refuses(_) | VethPeer::Unknown(_) => None,
                };
                match (reply, peer.loses_frames()) {
                    (Some(how), _) => self.reply_on(index, how)?,
                    (None, why) => tracing::info!(
                        interface,
                        reason = why.as_deref().unwrap_or("its peer takes no XDP frames"),
                        "the relay answers cookie-less BINDs and REBINDs arriving here: the \
                         guard cannot send out of this veth"
                    ),
                }
                self.peers.insert(interface.to_owned(), peer);
            }
        }
        Ok(attachment)
    }

    /// Lets the program answer cookie-less BINDs and REBINDs that arrive on interface `index`
    /// with a CHALLENGE itself (when `xdp.answer_challenges` is on), sent back `how`.
    /// [`Guard::attach`] calls it for each interface attached in native mode whose XDP frames
    /// arrive; tests call it for the interface their test runs name.
    pub fn reply_on(&mut self, index: u32, how: Reply) -> Result<(), XdpError> {
        let mut map: HashMap<&mut MapData, u32, u32> = map_mut(&mut self.ebpf, MAP_REPLY_IFACES)?;
        let value = match how {
            Reply::Tx => REPLY_TX,
            Reply::Redirect => REPLY_REDIRECT,
        };
        map.insert(index, value, 0)
            .map_err(|e| map_error(MAP_REPLY_IFACES, e))
    }

    /// Tells the program the relay's listen addresses: it answers a handshake with a CHALLENGE
    /// only if it is addressed to one of them (a wildcard address stands for every address of
    /// its family). Until this is called it answers none. The addresses are fixed for the
    /// relay's life (changing them needs a restart), so this is called once, at start.
    pub fn set_relay_addresses(&mut self, listen: &[SocketAddr]) -> Result<(), XdpError> {
        let mut map: HashMap<&mut MapData, [u8; 16], u32> =
            map_mut(&mut self.ebpf, MAP_RELAY_ADDRS)?;
        for addr in listen {
            let key = match addr.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                IpAddr::V6(ip) => ip.octets(),
            };
            map.insert(key, 1, 0)
                .map_err(|e| map_error(MAP_RELAY_ADDRS, e))?;
        }
        Ok(())
    }

    /// The writer of the guard's session map, for [`crate::shards::Sessions::with_observer`];
    /// `listen` are the relay's listen addresses, from which it learns what address and port
    /// the relay sends to each slot from (see [`RelaySources`]). The first call takes the
    /// session maps from the program's map set; later calls share them.
    pub fn session_filter(
        &mut self,
        listen: &[SocketAddr],
    ) -> Result<Arc<SessionFilter>, XdpError> {
        if let Some(filter) = &self.filter {
            return Ok(Arc::clone(filter));
        }
        let map = self
            .ebpf
            .take_map(MAP_SESSIONS)
            .ok_or_else(|| map_error(MAP_SESSIONS, "missing"))?;
        let map: HashMap<MapData, u64, SessionEntry> =
            HashMap::try_from(map).map_err(|e| map_error(MAP_SESSIONS, e))?;
        let state = self
            .ebpf
            .take_map(MAP_FAST_STATE)
            .ok_or_else(|| map_error(MAP_FAST_STATE, "missing"))?;
        let state: HashMap<MapData, u64, FastState> =
            HashMap::try_from(state).map_err(|e| map_error(MAP_FAST_STATE, e))?;
        let hops = self
            .ebpf
            .take_map(MAP_FIB_CACHE)
            .ok_or_else(|| map_error(MAP_FIB_CACHE, "missing"))?;
        let hops: HashMap<MapData, u64, FibCache> =
            HashMap::try_from(hops).map_err(|e| map_error(MAP_FIB_CACHE, e))?;
        let filter = Arc::new(SessionFilter {
            maps: Mutex::new(FilterMaps {
                sessions: map,
                state,
                hops,
            }),
            sources: RelaySources::of(listen),
            clock: KernelClock::now(),
            errors: AtomicU64::new(0),
        });
        self.filter = Some(Arc::clone(&filter));
        Ok(filter)
    }

    /// Session map updates the kernel refused (see [`SessionFilter`]).
    pub fn session_filter_errors(&self) -> u64 {
        self.filter
            .as_ref()
            .map_or(0, |f| f.errors.load(Ordering::Relaxed))
    }

    /// The interfaces the guard is attached to, and how.
    pub fn attached(&self) -> &[(String, Attachment)] {
        &self.attached
    }

    /// Every counter slot (`ferry_common::xdp::slot_labels` names them), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterValue>, XdpError> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or_else(|| map_error(MAP_COUNTERS, "missing"))?;
        let counters: PerCpuArray<&MapData, CounterValue> =
            PerCpuArray::try_from(map).map_err(|e| map_error(MAP_COUNTERS, e))?;
        let mut out = Vec::with_capacity(COUNTER_SLOTS as usize);
        for slot in 0..COUNTER_SLOTS {
            let per_cpu = counters
                .get(&slot, 0)
                .map_err(|e| map_error(MAP_COUNTERS, e))?;
            let mut sum = CounterValue::default();
            for value in per_cpu.iter() {
                sum.packets = sum.packets.wrapping_add(value.packets);
                sum.bytes = sum.bytes.wrapping_add(value.bytes);
            }
            out.push(sum);
        }
        Ok(out)
    }

    /// Runs the program once on `frame` as if it arrived on interface `ingress` (an index in
    /// the calling thread's network namespace), and returns its action and the frame as the
    /// program left it (rewritten, when the fast path forwarded it).
    pub fn test_run_on(&self, frame: &[u8], ingress: u32) -> Result<(u32, Vec<u8>), XdpError> {
        let (action, out, _) = self.test_run_once(frame, ingress)?;
        Ok((action, out))
    }

    /// Runs the program `runs` times on `frame` as if it arrived on interface `ingress` (as
    /// [`Guard::test_run_on`]), each run on a fresh copy of the frame (one rewritten by the
    /// fast path would no longer be the same datagram), and returns the last action and the
    /// kernel's mean time per run: the program's own cost, caches warm, without the syscall.
    pub fn time_on(
        &self,
        frame: &[u8],
        ingress: u32,
        runs: u32,
    ) -> Result<TestRunOutcome, XdpError> {
        let mut total = Duration::ZERO;
        let mut action = XDP_PASS;
        for _ in 0..runs.max(1) {
            let (a, _, took) = self.test_run_once(frame, ingress)?;
            action = a;
            total += took;
        }
        Ok(TestRunOutcome {
            action,
            per_run: total / runs.max(1),
        })
    }

    /// One run on `frame` arriving on `ingress`: the action, the frame as left, the time taken.
    fn test_run_once(
        &self,
        frame: &[u8],
        ingress: u32,
    ) -> Result<(u32, Vec<u8>, Duration), XdpError> {
        let program = program(&self.ebpf, PROGRAM_NAME)?;
        let ctx = xdp_md(frame, ingress);
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let result = program
            .test_run(opts)
            .map_err(|e| XdpError::TestRun(format!("{e:#}")))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// Runs the program `repeat` times on `frame` with `BPF_PROG_TEST_RUN` (no interface
    /// needed; maps and counters are the live ones).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, XdpError> {
        let program = program(&self.ebpf, PROGRAM_NAME)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let result = program
            .test_run(opts)
            .map_err(|e| XdpError::TestRun(format!("{e:#}")))?;
        Ok(TestRunOutcome {
            action: result.return_value,
            per_run: result.duration,
        })
    }
}

/// Whether the fast path is active on one interface, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FastPathStatus {
    /// Active: DATA arriving here or routed out of here is forwarded in XDP.
    Active,
    /// DATA arriving here is forwarded in XDP, but not out of here: this is a veth whose peer
    /// takes no XDP frames (it runs no XDP program and has GRO off), so a veth would drop
    /// them; or whether it does could not be checked. The reason says which.
    ReceiveOnly(String),
    /// `xdp.fast_path = false`.
    Off,
    /// The guard runs in generic mode here, where forwarding in XDP saves nothing.
    GenericMode,
    /// The interface had no index when the guard attached.
    Gone,
    /// Neither `net.ipv4.conf.<interface>.forwarding` nor `net.ipv6.conf.<interface>.forwarding`
    /// is on: the kernel's FIB lookup, which finds the next hop, answers XDP programs only for
    /// traffic arriving on an interface that forwards.
    ForwardingOff,
    /// The kernel refused the interface in the fast path's device map.
    Refused(String),
}

impl FastPathStatus {
    /// Whether the fast path forwards DATA arriving on this interface.
    pub fn takes_data_in(&self) -> bool {
        matches!(
            self,
            FastPathStatus::Active | FastPathStatus::ReceiveOnly(_)
        )
    }

    /// Whether the fast path sends DATA out of this interface.
    pub fn sends_data_out(&self) -> bool {
        *self == FastPathStatus::Active
    }
}

impl fmt::Display for FastPathStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FastPathStatus::Active => f.write_str("active"),
            FastPathStatus::ReceiveOnly(why) => f.write_str(why),
            FastPathStatus::Off => f.write_str("xdp.fast_path is false"),
            FastPathStatus::GenericMode => f.write_str(
                "the guard is attached in generic mode here (the driver has no native XDP)",
            ),
            FastPathStatus::Gone => f.write_str("the interface had no index when attached"),
            FastPathStatus::ForwardingOff => f.write_str(
                "forwarding is off on this interface (net.ipv4.conf.<interface>.forwarding and \
                 net.ipv6.conf.<interface>.forwarding are 0), and the kernel's FIB lookup \
                 needs it",
            ),
            FastPathStatus::Refused(e) => write!(f, "the device map refused it: {e}"),
        }
    }
}

/// Where the relay's io_uring workers send from to each address family: the listen address of
/// that family (at most one each), as the workers pick their sending socket. On a wildcard
/// address the workers send to each slot from the address it was bound through, which the
/// session's events carry (see [`entry`]). The fast path sends from the same address and port,
/// so a peer cannot tell which path a datagram took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelaySources {
    /// Datagrams to IPv4 peers.
    pub v4: Option<SocketAddr>,
    /// Datagrams to IPv6 peers.
    pub v6: Option<SocketAddr>,
}

impl RelaySources {
    /// The sources for listen addresses `listen`.
    pub fn of(listen: &[SocketAddr]) -> Self {
        RelaySources {
            v4: listen.iter().find(|a| a.is_ipv4()).copied(),
            v6: listen.iter().find(|a| a.is_ipv6()).copied(),
        }
    }

    /// The listen address datagrams to `peer` leave from, if any.
    fn for_peer(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let v4 = match peer.ip() {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
        };
        if v4 { self.v4 } else { self.v6 }
    }
}

/// The maps a [`SessionFilter`] writes, under one lock so that a session's entries change
/// together.
struct FilterMaps {
    sessions: HashMap<MapData, u64, SessionEntry>,
    state: HashMap<MapData, u64, FastState>,
    hops: HashMap<MapData, u64, FibCache>,
}

/// Keeps the guard's session map equal to the relay's session tables: a session goes in when
/// its first slot binds, its entry is replaced with the slots' new addresses and budgets
/// whenever a BIND or REBIND is accepted, one slot is reaped, or a reload changes a rate (each
/// before the BIND-ACK leaves, so the peer's first DATA from that address finds it), and it
/// goes out when the session is closed or reaped. An update replaces the whole entry, so the
/// program never reads one half written.
///
/// The fast path's per-session state ([`FastState`]: byte meters, counters, last-seen times)
/// lives in a second map, which the program updates in place: it is created when the session
/// opens (before its entry, so the program finds both), kept while the session lives (a
/// rebind keeps the meters and counters), and removed after the entry when the session goes.
/// So is its slot in the next-hop cache ([`FibCache`]), which the program fills and replaces
/// whole (only while the entry exists); a hop serves only the address it was resolved for, so
/// a rebind needs no change there.
pub struct SessionFilter {
    maps: Mutex<FilterMaps>,
    sources: RelaySources,
    clock: KernelClock,
    errors: AtomicU64,
}

/// Turns [`Instant`]s into the program's clock (`CLOCK_MONOTONIC` in nanoseconds, which the
/// program reads coarse, `bpf_ktime_get_coarse_ns`: as of the last scheduler tick): both are
/// the monotonic clock, read once together here so that one `Instant` always gives the same
/// nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct KernelClock {
    base: Instant,
    base_ns: u64,
}

impl KernelClock {
    /// The clock, read now.
    pub fn now() -> Self {
        KernelClock {
            base: Instant::now(),
            base_ns: monotonic_ns(),
        }
    }

    /// A clock on which `base` is `base_ns` (tests).
    pub fn at(base: Instant, base_ns: u64) -> Self {
        KernelClock { base, base_ns }
    }

    /// `at` on the program's clock.
    pub fn ns(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.base) {
            Some(after) => self.base_ns.wrapping_add(after.as_nanos() as u64),
            None => self
                .base_ns
                .wrapping_sub(self.base.duration_since(at).as_nanos() as u64),
        }
    }
}

impl fmt::Debug for SessionFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFilter")
            .field("sources", &self.sources)
            .field("errors", &self.errors.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

impl SessionFilter {
    /// Whether `session` is in the map now.
    pub fn contains(&self, session: u64) -> bool {
        self.get(session).is_some()
    }

    /// The map's entry for `session`, if it has one.
    pub fn get(&self, session: u64) -> Option<SessionEntry> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.sessions.get(&session, 0).ok()
    }

    /// The fast path's next-hop cache for `session`, if it has one.
    pub fn fib_cache(&self, session: u64) -> Option<FibCache> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.hops.get(&session, 0).ok()
    }

    /// The fast path's state for `session`, if it has some.
    pub fn fast_state(&self, session: u64) -> Option<FastState> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.state.get(&session, 0).ok()
    }

    fn apply(&self, event: SessionEvent) -> Result<(), MapError> {
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            SessionEvent::Bound {
                session,
                slots,
                locals,
                budgets,
            } => {
                let entry = entry(slots, locals, budgets, &self.sources, &self.clock);
                if let Ok(old) = maps.sessions.get(&session, 0)
                    && source_moved(&old, &entry)
                {
                    // A cached hop keeps the source its slot's datagrams left from; a slot
                    // that stays at its address but is now sent to at another relay address
                    // (a BIND again, through the other one) needs a fresh lookup.
                    let _ = maps.hops.insert(session, FibCache::default(), 0);
                }
                match maps
                    .state
                    .insert(session, FastState::default(), BPF_NOEXIST)
                {
                    Ok(()) => {}
                    // Kept: the session's meters and counters carry on.
                    Err(e) if exists(&e) => {}
                    Err(e) => return Err(e),
                }
                match maps.hops.insert(session, FibCache::default(), BPF_NOEXIST) {
                    // Kept: a hop is used only for the address it was resolved for.
                    Ok(()) => {}
                    Err(e) if exists(&e) => {}
                    Err(e) => return Err(e),
                }
                maps.sessions.insert(session, entry, 0)
            }
            SessionEvent::Closed(id) => {
                let entry = maps.sessions.remove(&id);
                let _ = maps.state.remove(&id);
                let _ = maps.hops.remove(&id);
                entry
            }
        }
    }
}

/// Whether a map insert with `BPF_NOEXIST` failed because the key was there already.
fn exists(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EEXIST))
}

impl SessionObserver for SessionFilter {
    fn session_event(&self, event: SessionEvent) {
        if let Err(e) = self.apply(event) {
            // The map holds every session `limits.max_sessions` allows, so this is a kernel
            // allocation failure: that session's datagrams are dropped by the guard until it
            // is bound again. Counted, and logged once in a while.
            let n = self.errors.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(?event, errors = n + 1, "updating the XDP session map: {e}");
            }
        }
    }

    fn last_seen(&self, session: u64) -> [Option<Instant>; 2] {
        let Some(state) = self.fast_state(session) else {
            return [None, None];
        };
        let now = Instant::now();
        let now_ns = monotonic_ns();
        state.slots.map(|slot| {
            (slot.last_seen != 0)
                .then(|| {
                    now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(slot.last_seen)))
                })
                .flatten()
        })
    }
}

/// How the program sends its CHALLENGEs back out of an interface ([`Guard::reply_on`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `XDP_TX`: a NIC driver transmits the frame itself.
    Tx,
    /// `XDP_REDIRECT` to the same interface: a veth, whose `XDP_TX` reaches the peer only if
    /// the peer runs an XDP program.
    Redirect,
}

/// Whether the XDP frames the fast path sends out of an interface arrive, as checked when the
/// guard attached to it natively.
#[derive(Clone, Debug, PartialEq, Eq)]
enum VethPeer {
    /// Not a veth: a driver that transmits XDP frames on its own hardware.
    NotVeth,
    /// A veth whose peer took the check's frame.
    Takes,
    /// A veth whose peer did not take it; `ethtool -S` names the peer's index (in the peer's
    /// namespace).
    Refuses(Option<u64>),
    /// A veth the check could not be run on, and why.
    Unknown(String),
}

impl VethPeer {
    /// Why the fast path must not send out of this interface, if it must not.
    fn loses_frames(&self) -> Option<String> {
        let fix = "turn GRO on there (`ethtool -K <peer> gro on`) or attach an XDP program \
                   to it, then restart the relay (docs/operations.md, \"veth\")";
        match self {
            VethPeer::NotVeth | VethPeer::Takes => None,
            VethPeer::Refuses(peer) => Some(format!(
                "a veth whose peer{} takes no XDP frames, so it would drop what the fast path \
                 sends: {fix}",
                peer.map(|p| format!(" (interface index {p} in its namespace)"))
                    .unwrap_or_default()
            )),
            VethPeer::Unknown(why) => Some(format!(
                "a veth whose peer could not be checked for XDP frames ({why}): {fix}"
            )),
        }
    }
}

/// The `ethtool -S` statistics of a veth that count the XDP frames its peer took, one per
/// queue (`tx_queue_0_xdp_xmit`, ...).
const VETH_XDP_TAKEN: &str = "_xdp_xmit";
/// The IEEE local experimental EtherType, of the frame [`check_veth_peer`] sends.
const ETHERTYPE_LOCAL_EXPERIMENTAL: u16 = 0x88b5;

/// Whether the XDP frames the fast path would send out of `interface` (index `index`, in the
/// calling thread's namespace) arrive. A NIC driver transmits them itself. A veth hands them
/// to its peer, and only if the peer polls with NAPI (runs an XDP program, or has GRO on);
/// otherwise it drops them, and nothing the program could see says so. So for a veth this
/// sends one frame out of it as the fast path would (`XDP_REDIRECT`, from a program run in
/// live-frame mode) and reads the veth's count of frames its peer took. The frame goes from
/// and to the interface's own MAC address with EtherType 0x88B5 (IEEE local experimental),
/// which the peer's stack drops.
fn check_veth_peer(interface: &str, index: u32) -> VethPeer {
    match ethtool::driver(interface) {
        Ok(driver) if driver == "veth" => {}
        // A device without a driver name (the loopback device, for one) is no veth.
        _ => return VethPeer::NotVeth,
    }
    let taken =
        || ethtool::sum_of(interface, VETH_XDP_TAKEN).map_err(|e| format!("its statistics: {e}"));
    let check = || -> Result<bool, String> {
        let mac =
            ethtool::hardware_address(interface).map_err(|e| format!("its MAC address: {e}"))?;
        let mut frame = Vec::with_capacity(60);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&ETHERTYPE_LOCAL_EXPERIMENTAL.to_be_bytes());
        frame.extend_from_slice(b"ferry-relay: does this veth's peer take XDP frames?");
        frame.resize(frame.len().max(60), 0);
        let before = taken()?;
        wire::send_one(index, &frame).map_err(|e| e.to_string())?;
        Ok(taken()? > before)
    };
    match check() {
        Ok(true) => VethPeer::Takes,
        Ok(false) => VethPeer::Refuses(ethtool::stat(interface, "peer_ifindex").ok().flatten()),
        Err(why) => VethPeer::Unknown(why),
    }
}

/// The `struct xdp_md` context for a `BPF_PROG_TEST_RUN` of `frame` as if it arrived on
/// interface `ingress`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex.
fn xdp_md(frame: &[u8], ingress: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ingress, 0, 0]
        .iter()
        .flat_map(|field| field.to_ne_bytes())
        .collect()
}

/// Whether IPv4 and IPv6 forwarding are on for `interface` (this process's namespace), from
/// `/proc/sys` under `proc`; with why the IPv4 setting could not be read, if it could not (a
/// sandbox that hides `/proc/sys`, such as systemd's `ProcSubset=pid`). An unreadable IPv6
/// setting counts as off: a kernel booted with `ipv6.disable=1` has none.
fn forwarding(proc: &Path, interface: &str) -> ([bool; 2], Option<String>) {
    let read = |family: &str| {
        let path = proc.join(format!("sys/net/{family}/conf/{interface}/forwarding"));
        std::fs::read_to_string(&path)
            .map(|v| v.trim() != "0")
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let (v4, v6) = (read("ipv4"), read("ipv6"));
    let unknown = v4.as_ref().err().cloned();
    ([v4.unwrap_or(false), v6.unwrap_or(false)], unknown)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of [`Instant`], and the one the program's
/// `bpf_ktime_get_coarse_ns` reads as of the last scheduler tick.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The index of interface `name` in this network namespace, if it exists.
fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    #[allow(unsafe_code)]
    // SAFETY: if_nametoindex reads the NUL-terminated string, which lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The TTL or hop limit in sysctl file `path` (what the relay's own sockets send with), or 64
/// when it cannot be read.
fn host_default(path: &str) -> u8 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(64)
}

/// Whether this network namespace has an interface named `name`.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name).is_some()
}

/// An address as the guard keys it: IPv4 as IPv4-mapped IPv6 (a dual-stack socket may report
/// an IPv4 peer that way already).
fn guard_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Whether a slot bound in both `old` and `new`, at the same address, leaves from another
/// relay address in `new`.
fn source_moved(old: &SessionEntry, new: &SessionEntry) -> bool {
    old.slots.iter().zip(&new.slots).any(|(o, n)| {
        o.bound == 1
            && n.bound == 1
            && (o.addr, o.port) == (n.addr, n.port)
            && (o.relay_addr_set, o.relay_addr) != (n.relay_addr_set, n.relay_addr)
    })
}

/// The guard's map entry for a session whose slots are bound at `slots` through the relay
/// addresses `locals` (those the workers know: on a wildcard listen address) with DATA byte
/// budgets `budgets`, for a relay that sends from `sources`; times on the program's clock
/// `clock`. DATA to a slot leaves from its local address when known, else from the listen
/// address of its family; only when that is a wildcard and the slot's local address unknown
/// does the fast path let the FIB pick the source. A slot whose budget the fast path cannot
/// express (see [`ByteBudget::new`]) gets a zero budget, and its DATA goes to the relay.
pub fn entry(
    slots: [Option<SocketAddr>; 2],
    locals: [Option<IpAddr>; 2],
    budgets: [Option<SlotBudget>; 2],
    sources: &RelaySources,
    clock: &KernelClock,
) -> SessionEntry {
    let slot = |i: usize| match slots[i] {
        Some(addr) => {
            let source = sources.for_peer(addr);
            // A local address of the other family (which a worker never records) is ignored.
            let local = locals[i].filter(|l| source.is_some_and(|s| s.is_ipv4() == l.is_ipv4()));
            let relay_ip = local.or(source.map(|s| s.ip()));
            let (relay_addr, relay_addr_set) = match relay_ip {
                Some(ip) if !ip.is_unspecified() => (guard_addr(ip), 1),
                _ => ([0; 16], 0),
            };
            let (rate, since, fresh, previous) = budgets[i].map_or((0, 0, 0, 0), |b| {
                (
                    b.rate,
                    clock.ns(b.set_at),
                    u8::from(b.fresh),
                    b.previous_rate,
                )
            });
            let budget_of =
                |rate| ByteBudget::new(rate, SessionLimits::slot_burst(rate)).unwrap_or_default();
            BoundSlot {
                addr: guard_addr(addr.ip()),
                port: addr.port(),
                bound: 1,
                relay_addr_set,
                relay_port: source.map_or(0, |s| s.port()),
                budget_fresh: fresh,
                _pad: 0,
                relay_addr,
                budget: budget_of(rate),
                budget_since: since,
                budget_before: budget_of(previous),
            }
        }
        None => BoundSlot::default(),
    };
    SessionEntry {
        slots: [slot(0), slot(1)],
    }
}

/// Loads `object` with `loader` and its XDP program `name` into the kernel (verifier
/// included).
fn load_object(mut loader: EbpfLoader<'_>, object: &[u8], name: &str) -> Result<Ebpf, XdpError> {
    if object.is_empty() {
        return Err(XdpError::NotBuilt);
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|e| XdpError::Load(format!("{e:#}")))?;
    program_mut(&mut ebpf, name)?
        .load()
        .map_err(|e| XdpError::Load(verifier_error(&e)))?;
    Ok(ebpf)
}

/// The XDP program `name` of `ebpf`.
fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp, XdpError> {
    ebpf.program(name)
        .ok_or_else(|| XdpError::Load(format!("the object has no program {name}")))?
        .try_into()
        .map_err(|e: ProgramError| XdpError::Load(e.to_string()))
}

/// The XDP program `name` of `ebpf`, to load or attach.
fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, XdpError> {
    ebpf.program_mut(name)
        .ok_or_else(|| XdpError::Load(format!("the object has no program {name}")))?
        .try_into()
        .map_err(|e: ProgramError| XdpError::Load(e.to_string()))
}

/// Map `name` of `ebpf` as the typed map `M`.
fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| map_error(name, "missing"))?;
    M::try_from(map).map_err(|e| map_error(name, e))
}

/// The verifier's complaint, when that is why loading failed.
fn verifier_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}; verifier log:\n{verifier_log}")
        }
        other => format!("{other:#}"),
    }
}

/// Brings one CIDR trie from `old` to `new`: removes the entries that went, writes the rest.
/// `key` gives an entry's trie key, or `None` for the other address family.
fn sync_trie<K: aya::Pod>(
    trie: &mut LpmTrie<&mut MapData, K, u32>,
    name: &'static str,
    old: &BTreeMap<Cidr, u32>,
    new: &BTreeMap<Cidr, u32>,
    key: impl Fn(&Cidr) -> Option<K>,
) -> Result<(), XdpError> {
    let key = |cidr: &Cidr| key(cidr).map(|k| Key::new(u32::from(cidr.prefix_len()), k));
    for cidr in old.keys().filter(|c| !new.contains_key(c)) {
        if let Some(k) = key(cidr) {
            // Already gone is fine: the goal is that it is not there.
            let _ = trie.remove(&k);
        }
    }
    for (cidr, value) in new {
        if let Some(k) = key(cidr) {
            trie.insert(&k, value, 0)
                .map_err(|e| map_error(name, format!("{cidr}: {e}")))?;
        }
    }
    Ok(())
}

fn v4_key(cidr: &Cidr) -> Option<[u8; 4]> {
    match cidr.addr() {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    }
}

fn v6_key(cidr: &Cidr) -> Option<[u8; 16]> {
    match cidr.addr() {
        IpAddr::V6(a) => Some(a.octets()),
        IpAddr::V4(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_that_cannot_be_read_is_unknown_not_off() {
        let proc = std::env::temp_dir().join(format!("ferry-proc-{}", std::process::id()));
        let conf = |family: &str| proc.join(format!("sys/net/{family}/conf/eth9"));
        std::fs::create_dir_all(conf("ipv4")).unwrap();
        std::fs::write(conf("ipv4").join("forwarding"), "1\n").unwrap();
        // No IPv6 at all (ipv6.disable=1): off, and nothing unknown.
        assert_eq!(forwarding(&proc, "eth9"), ([true, false], None));
        std::fs::write(conf("ipv4").join("forwarding"), "0\n").unwrap();
        std::fs::create_dir_all(conf("ipv6")).unwrap();
        std::fs::write(conf("ipv6").join("forwarding"), "1\n").unwrap();
        assert_eq!(forwarding(&proc, "eth9"), ([false, true], None));
        // A /proc without sys (systemd's ProcSubset=pid): unknown, with the path and the error.
        std::fs::remove_dir_all(proc.join("sys")).unwrap();
        let (on, unknown) = forwarding(&proc, "eth9");
        assert_eq!(on, [false, false]);
        let why = unknown.expect("unknown");
        assert!(why.contains("sys/net/ipv4/conf/eth9/forwarding"), "{why}");
        assert!(why.contains("No such file"), "{why}");
        std::fs::remove_dir_all(&proc).unwrap();
    }

    #[test]
    fn modes_parse() {
        for mode in [Mode::Auto, Mode::Native, Mode::Generic, Mode::Off] {
            assert_eq!(mode.name().parse::<Mode>(), Ok(mode));
        }
        assert!("xdpdrv".parse::<Mode>().is_err());
    }

    #[test]
    fn the_program_asks_only_a_trie_that_has_entries() {
        let rate = Rate::new(1, 1).unwrap();
        let mut s = XdpSettings {
            mode: Mode::Native,
            interfaces: Vec::new(),
            max_sources: 16,
            ipv6_prefix_len: 64,
            drop_all_fragments: false,
            data_packets: rate,
            data_bytes: rate,
            handshake: rate,
            handshake_total: rate,
            session_filter: true,
            fast_path: true,
            answer_challenges: true,
            deny: Vec::new(),
            allow: Vec::new(),
        };
        let lists =
            |s: &XdpSettings| s.guard_config(&[7000]).flags & (FLAG_LISTS_V4 | FLAG_LISTS_V6);
        assert_eq!(lists(&s), 0);
        s.deny = vec!["198.18.0.0/15".parse().unwrap()];
        assert_eq!(lists(&s), FLAG_LISTS_V4);
        s.allow = vec!["2001:db8::/32".parse().unwrap()];
        assert_eq!(lists(&s), FLAG_LISTS_V4 | FLAG_LISTS_V6);
        s.deny.clear();
        assert_eq!(lists(&s), FLAG_LISTS_V6);
    }
}

/// Builds Ethernet frames carrying UDP, for `BPF_PROG_TEST_RUN` tests and benchmarks of the
/// guard: VLAN tags, IPv4 options, fragments and wrong length fields on request.
pub mod frame {
    use std::net::IpAddr;

    /// What to build. [`Frame::udp`] fills in a well-formed frame; change fields to break it.
    #[derive(Clone, Debug)]
    pub struct Frame {
        /// Source address (its family picks IPv4 or IPv6; the destination must match).
        pub src: IpAddr,
        /// Destination address.
        pub dst: IpAddr,
        /// UDP source port.
        pub src_port: u16,
        /// UDP destination port.
        pub dst_port: u16,
        /// 802.1Q tags (VLAN ids), outermost first.
        pub vlans: Vec<u16>,
        /// IPv4 option bytes (a multiple of 4, at most 40); IPv6: a destination-options
        /// extension header of this many bytes (a multiple of 8) instead.
        pub ip_options: usize,
        /// IPv4 fragment offset (8-byte units) and more-fragments flag; IPv6: a fragment
        /// header with these values.
        pub fragment: Option<(u16, bool)>,
        /// Added to the IP length field (total length or payload length).
        pub ip_len_delta: i32,
        /// Added to the UDP length field.
        pub udp_len_delta: i32,
        /// Overrides the IP version nibble.
        pub ip_version: Option<u8>,
        /// Overrides the IPv4 IHL (in 4-byte words).
        pub ihl: Option<u8>,
        /// Bytes of Ethernet padding after the IP packet.
        pub trailer: usize,
    }

    impl Frame {
        /// A well-formed UDP frame from `src` to `dst`:`dst_port`.
        pub fn udp(src: IpAddr, dst: IpAddr, dst_port: u16) -> Self {
            Frame {
                src,
                dst,
                src_port: 40_000,
                dst_port,
                vlans: Vec::new(),
                ip_options: 0,
                fragment: None,
                ip_len_delta: 0,
                udp_len_delta: 0,
                ip_version: None,
                ihl: None,
                trailer: 0,
            }
        }

        /// The frame's bytes around UDP `payload`.
        pub fn build(&self, payload: &[u8]) -> Vec<u8> {
            let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
            for vlan in &self.vlans {
                out.extend_from_slice(&0x8100u16.to_be_bytes());
                out.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
            }
            let udp_len = 8 + payload.len();
            let mut udp = Vec::with_capacity(udp_len);
            udp.extend_from_slice(&self.src_port.to_be_bytes());
            udp.extend_from_slice(&self.dst_port.to_be_bytes());
            udp.extend_from_slice(&adjust(udp_len, self.udp_len_delta).to_be_bytes());
            udp.extend_from_slice(&[0, 0]); // no checksum: the kernel is not asked to verify
            udp.extend_from_slice(payload);
            match (self.src, self.dst) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => {
                    out.extend_from_slice(&0x0800u16.to_be_bytes());
                    let ihl = self.ihl.unwrap_or((5 + self.ip_options / 4) as u8);
                    let header_len = 20 + self.ip_options;
                    let total = header_len + udp.len();
                    let version = self.ip_version.unwrap_or(4);
                    out.push((version << 4) | (ihl & 0x0f));
                    out.push(0);
                    out.extend_from_slice(&adjust(total, self.ip_len_delta).to_be_bytes());
                    out.extend_from_slice(&[0x12, 0x34]);
                    let frag = match self.fragment {
                        Some((offset, more)) => (offset & 0x1fff) | if more { 0x2000 } else { 0 },
                        None => 0x4000, // don't fragment
                    };
                    out.extend_from_slice(&frag.to_be_bytes());
                    out.extend_from_slice(&[64, 17, 0, 0]);
                    out.extend_from_slice(&src.octets());
                    out.extend_from_slice(&dst.octets());
                    // Options: NOPs, then end-of-list.
                    let mut options = vec![1u8; self.ip_options];
                    if let Some(last) = options.last_mut() {
                        *last = 0;
                    }
                    out.extend_from_slice(&options);
                }
                (IpAddr::V6(src), IpAddr::V6(dst)) => {
                    out.extend_from_slice(&0x86ddu16.to_be_bytes());
                    let mut ext = Vec::new();
                    let mut next = 17u8;
                    if let Some((offset, more)) = self.fragment {
                        let field = (offset << 3) | u16::from(more);
                        let mut frag = vec![next, 0];
                        frag.extend_from_slice(&field.to_be_bytes());
                        frag.extend_from_slice(&[0, 0, 0, 1]);
                        ext.splice(0..0, frag);
                        next = 44;
                    }
                    if self.ip_options >= 8 {
                        let mut opts = vec![next, (self.ip_options / 8 - 1) as u8];
                        opts.extend_from_slice(&[1, (self.ip_options - 4) as u8]);
                        opts.resize(self.ip_options, 0);
                        ext.splice(0..0, opts);
                        next = 60;
                    }
                    let version = self.ip_version.unwrap_or(6);
                    out.extend_from_slice(&[version << 4, 0, 0, 0]);
                    let payload_len = ext.len() + udp.len();
                    out.extend_from_slice(&adjust(payload_len, self.ip_len_delta).to_be_bytes());
                    out.extend_from_slice(&[next, 64]);
                    out.extend_from_slice(&src.octets());
                    out.extend_from_slice(&dst.octets());
                    out.extend_from_slice(&ext);
                }
                _ => panic!("source and destination must be the same IP family"),
            }
            out.extend_from_slice(&udp);
            out.resize(out.len() + self.trailer, 0);
            out
        }
    }

    /// A relay datagram: a valid header for `packet_type`, `session_id` and a body of
    /// `body_len` zero bytes (which [`ferry_common::header::check_header`] accepts when the
    /// length fits the type and the session is not zero).
    pub fn datagram(
        packet_type: ferry_common::header::PacketType,
        session_id: u64,
        body_len: usize,
    ) -> Vec<u8> {
        use ferry_common::header::{HEADER_LEN, Header};
        let mut out = vec![0u8; HEADER_LEN + body_len];
        let mut first = [0u8; HEADER_LEN];
        Header {
            packet_type,
            session_id,
            body_len: u16::try_from(body_len).unwrap_or(u16::MAX),
        }
        .write(&mut first);
        out[..HEADER_LEN].copy_from_slice(&first);
        out
    }

    fn adjust(len: usize, delta: i32) -> u16 {
        (len as i64 + i64::from(delta)).clamp(0, 0xffff) as u16
    }
}

/// A traffic generator for benchmarks (`ferry-bench run flood --flood-generator xdp`): the
/// `ferry_flood` program of `ebpf/xdp`, run with `BPF_PROG_TEST_RUN` in live-frames mode, so the kernel transmits one
/// template frame out of an interface millions of times a second, each with the next of
/// `sources` spoofed IPv4 sources (198.19.0.0/16). The relay never loads it.
pub mod flood {
    use std::time::{Duration, Instant};

    use aya::maps::{Array, MapData};
    use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
    use aya::{Ebpf, EbpfLoader};

    use super::{XdpError, load_object, map_error, map_mut, program, xdp_md};

    /// Built from source by `build.rs`; empty when built with `FERRY_SKIP_EBPF=1`.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-flood.o"));

    /// The loaded generator.
    pub struct Generator {
        ebpf: Ebpf,
    }

    impl std::fmt::Debug for Generator {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Generator").finish_non_exhaustive()
        }
    }

    impl Generator {
        /// Loads it, cycling through `sources` source addresses (rounded up to a power of
        /// two, at most 65,536).
        pub fn load(sources: u32) -> Result<Self, XdpError> {
            let mut ebpf = load_object(EbpfLoader::new(), OBJECT, "ferry_flood")?;
            let mut cfg: Array<&mut MapData, u32> = map_mut(&mut ebpf, "FLOOD_CFG")?;
            let sources = sources.clamp(1, 65_536).next_power_of_two();
            cfg.set(0, sources, 0)
                .map_err(|e| map_error("FLOOD_CFG", e))?;
            Ok(Generator { ebpf })
        }

        /// Transmits `frame` (Ethernet, IPv4 without options, UDP; its source in
        /// 198.19.0.0/16) out of interface `ifindex` — which must be in the calling thread's
        /// network namespace — `frames` at a time, until `duration` has passed. Returns how
        /// many frames the program handled.
        pub fn run(
            &self,
            frame: &[u8],
            ifindex: u32,
            frames: u32,
            duration: Duration,
        ) -> Result<u64, XdpError> {
            let program = program(&self.ebpf, "ferry_flood")?;
            let ctx = xdp_md(frame, ifindex);
            let deadline = Instant::now() + duration;
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(frame);
                opts.ctx_in = Some(&ctx);
                opts.repeat = frames.max(1);
                opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
                program
                    .test_run(opts)
                    .map_err(|e| XdpError::TestRun(format!("{e:#}")))?;
                sent += u64::from(frames.max(1));
            }
            Ok(sent)
        }
    }
}

/// One end of an XDP wire for benchmarks (`ferry-bench run --xdp-wire`): the `ferry_wire`
/// program of `ebpf/xdp`, attached natively to a veth, redirects every frame it receives to
/// another interface. A veth that gets a frame that way hands it to its peer as an XDP frame in
/// a page of its own, as a NIC driver receives into its DMA pages; a frame that a veth gets
/// as a socket buffer (anything a local socket sent) it copies into a fresh page before it runs
/// the peer's native XDP program. The relay attaches it nowhere; it runs it once, unattached,
/// to send the frame that checks a veth's peer (`send_one`).
pub mod wire {
    use aya::maps::{DevMap, MapData};
    use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, XdpMode};
    use aya::{Ebpf, EbpfLoader};

    use super::{
        XdpError, interface_exists, interface_index, load_object, map_error, map_mut,
        no_such_interface, program, program_mut, xdp_md,
    };

    /// Built from source by `build.rs`; empty when built with `FERRY_SKIP_EBPF=1`.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-wire.o"));

    /// An attached end; dropping it detaches the program.
    pub struct WireEnd {
        _ebpf: Ebpf,
    }

    impl std::fmt::Debug for WireEnd {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("WireEnd").finish_non_exhaustive()
        }
    }

    /// The program, loaded, with interface `index` as the one every frame leaves by.
    fn load_towards(index: u32) -> Result<Ebpf, XdpError> {
        let mut ebpf = load_object(EbpfLoader::new(), OBJECT, "ferry_wire")?;
        let mut out: DevMap<&mut MapData> = map_mut(&mut ebpf, "WIRE_OUT")?;
        out.set(0, index, None, 0)
            .map_err(|e| map_error("WIRE_OUT", e))?;
        Ok(ebpf)
    }

    /// Sends `frame` out of interface `index` (in the calling thread's network namespace)
    /// once, the way the fast path sends: `XDP_REDIRECT` through a device map, from the
    /// program run unattached with `BPF_PROG_TEST_RUN` in live-frame mode, as if the frame had
    /// come in on that interface.
    pub(super) fn send_one(index: u32, frame: &[u8]) -> Result<(), XdpError> {
        let ebpf = load_towards(index)?;
        let ctx = xdp_md(frame, index);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = 1;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(1);
        program(&ebpf, "ferry_wire")?
            .test_run(opts)
            .map_err(|e| XdpError::TestRun(format!("{e:#}")))?;
        Ok(())
    }

    impl WireEnd {
        /// Attaches natively to interface `from`, redirecting every frame it receives to
        /// interface `to`; both must be in the calling thread's network namespace, and `to`
        /// must be able to transmit XDP frames (a veth whose peer polls with NAPI: has GRO on
        /// or an XDP program).
        pub fn attach(from: &str, to: &str) -> Result<Self, XdpError> {
            let to_index = interface_index(to).ok_or_else(|| no_such_interface(to, "native"))?;
            if !interface_exists(from) {
                return Err(no_such_interface(from, "native"));
            }
            let mut ebpf = load_towards(to_index)?;
            program_mut(&mut ebpf, "ferry_wire")?
                .attach(from, XdpMode::Driver)
                .map_err(|e| XdpError::Attach {
                    interface: from.to_owned(),
                    mode: "native",
                    message: format!("{e:#}"),
                })?;
            Ok(WireEnd { _ebpf: ebpf })
        }
    }
}
