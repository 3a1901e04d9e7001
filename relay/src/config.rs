//! The relay's config file: one TOML file (`/etc/ferry/relay.toml` by default), parsed
//! strictly (unknown fields are errors) and validated into [`RelayConfig`] before anything is
//! applied. Every field is documented in docs/config.md.
//!
//! Validation collects every problem, each naming its field, so `ferry-relay check-config`
//! shows them all at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ferry_core::keys::{GatewayPublicKey, RelayStaticKey};
pub use ferry_core::problems::Problem;
use ferry_core::problems::{Check, join};
use ferry_core::token::VerifierConfig;
use ferry_keyfile::KeyFileError;
use serde::Deserialize;

use ferry_common::header::MAX_DATAGRAM;
use ferry_common::xdp::{MAX_BURST_SECONDS, MAX_PORTS, Rate};

use crate::limits::IpLimits;
use crate::session::SessionLimits;
use crate::xdp::{Cidr, Mode, XdpSettings};

/// Where the relay looks for its config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/relay.toml";

/// Why a config could not be loaded or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown field or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Values are out of range or inconsistent; every problem found is listed.
    #[error("{path}: {} problem(s):\n  {}", .problems.len(), join(.problems))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Each problem, naming its field.
        problems: Vec<Problem>,
    },
    /// The relay's static key file could not be loaded, and nothing else is wrong (otherwise
    /// its problem is one of [`ConfigError::Invalid`]'s, under `relay.static_key`).
    #[error("relay.static_key: {0}")]
    Key(#[from] KeyFileError),
    /// A reload changed something that only a restart can apply.
    #[error("these changes need a restart of the relay: {}", .0.join(", "))]
    NeedsRestart(Vec<String>),
}

// ---- The file, as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    relay: RelaySection,
    #[serde(default)]
    gateway_keys: Vec<GatewayKeyEntry>,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    xdp: XdpSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    id: u64,
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    static_key: PathBuf,
    #[serde(default)]
    workers: usize,
    #[serde(default)]
    cpus: Vec<usize>,
    #[serde(default = "yes")]
    udp_gso: bool,
    #[serde(default)]
    send_zc_min_bytes: u64,
}

fn yes() -> bool {
    true
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:7000".into(), "[::]:7000".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayKeyEntry {
    kid: u32,
    public_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    max_sessions: u64,
    max_bindings_per_ip: u64,
    bind_rate_per_ip: f64,
    bind_burst_per_ip: u64,
    default_session_rate: u64,
    max_session_rate: u64,
    idle_timeout_secs: u64,
    max_clock_skew_secs: u64,
    max_token_lifetime_secs: u64,
    replay_cache_capacity: u64,
    tracked_ips: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_sessions: 100_000,
            max_bindings_per_ip: 64,
            bind_rate_per_ip: 20.0,
            bind_burst_per_ip: 40,
            default_session_rate: 1_250_000,
            max_session_rate: 125_000_000,
            idle_timeout_secs: 60,
            max_clock_skew_secs: 30,
            max_token_lifetime_secs: 3600,
            replay_cache_capacity: 200_000,
            tracked_ips: 1 << 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdminSection {
    listen: String,
    allow_non_loopback: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9477".into(),
            allow_non_loopback: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct XdpSection {
    mode: String,
    interfaces: Vec<String>,
    max_sources: u64,
    ipv6_prefix_len: u64,
    drop_all_fragments: bool,
    data_packets_per_second: u64,
    data_packet_burst: u64,
    data_bytes_per_second: u64,
    data_byte_burst: u64,
    handshake_packets_per_second: u64,
    handshake_packet_burst: u64,
    handshake_total_per_second: u64,
    handshake_total_burst: u64,
    session_filter: bool,
    deny: Vec<String>,
    allow: Vec<String>,
}

impl Default for XdpSection {
    fn default() -> Self {
        Self {
            mode: "auto".into(),
            interfaces: Vec::new(),
            max_sources: u64::from(ferry_common::xdp::DEFAULT_MAX_SOURCES),
            ipv6_prefix_len: 64,
            drop_all_fragments: false,
            data_packets_per_second: 50_000,
            data_packet_burst: 5_000,
            data_bytes_per_second: 62_500_000,
            data_byte_burst: 6_250_000,
            handshake_packets_per_second: 50,
            handshake_packet_burst: 100,
            handshake_total_per_second: 2_000,
            handshake_total_burst: 400,
            session_filter: true,
            deny: Vec::new(),
            allow: Vec::new(),
        }
    }
}

// ---- The validated config ----

/// The limits an admin tunes; all of them reload on SIGHUP.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Sessions held at once.
    pub max_sessions: usize,
    /// Slots one source IP may hold.
    pub max_bindings_per_ip: u32,
    /// BIND/REBIND per second per source IP.
    pub bind_rate_per_ip: f64,
    /// BIND/REBIND burst per source IP.
    pub bind_burst_per_ip: u32,
    /// Bytes per second a slot gets when its token claims 0.
    pub default_session_rate: u64,
    /// The most bytes per second any slot gets.
    pub max_session_rate: u64,
    /// A slot silent this long is unbound.
    pub idle_timeout: Duration,
    /// Tolerated clock skew on token validity, seconds.
    pub max_clock_skew_secs: u64,
    /// Longest token lifetime accepted, seconds.
    pub max_token_lifetime_secs: u64,
    /// Token ids remembered against replay.
    pub replay_cache_capacity: usize,
    /// Source IPs tracked by the per-IP limits.
    pub tracked_ips: usize,
}

/// A validated relay config, ready to apply.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The config file it came from.
    pub path: PathBuf,
    /// The relay id tokens must name.
    pub relay_id: u64,
    /// UDP addresses to serve.
    pub listen: Vec<SocketAddr>,
    /// The static key file.
    pub static_key_path: PathBuf,
    /// The static key (opens slot secrets sealed in tokens).
    pub static_key: RelayStaticKey,
    /// Worker threads (resolved: never 0).
    pub workers: usize,
    /// CPUs to pin workers to, in worker order; empty = one per CPU in order.
    pub cpus: Vec<usize>,
    /// Forward bursts for one peer as UDP GSO sends.
    pub udp_gso: bool,
    /// Forwards of at least this many bytes use SEND_ZC; `None`: off.
    pub send_zc_min_bytes: Option<usize>,
    /// Trusted gateway keys by `kid`.
    pub gateway_keys: Vec<(u32, GatewayPublicKey)>,
    /// The limits.
    pub limits: Limits,
    /// The admin listener.
    pub admin_listen: SocketAddr,
    /// The log level.
    pub log_level: String,
    /// The XDP guard.
    pub xdp: XdpSettings,
}

/// Reads, parses and validates the config at `path`, and loads its key file.
pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_str(&text, path, base)
}

/// Parses and validates config `text` (named `path` in messages); relative key paths are
/// resolved against `base_dir`.
pub fn parse_str(text: &str, path: &Path, base_dir: &Path) -> Result<RelayConfig, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut check = Check::default();
    let listen = validate_listen(&file.relay, &mut check);
    if file.relay.id == 0 {
        check.fail("relay.id", "must not be 0");
    }
    let workers = validate_workers(&file.relay, &mut check);
    let gateway_keys = validate_gateway_keys(&file.gateway_keys, &mut check);
    let limits = validate_limits(&file.limits, &mut check);
    let admin_listen = validate_admin(&file.admin, &mut check);
    let xdp = validate_xdp(&file.xdp, &listen, &mut check);
    if !["error", "warn", "info", "debug", "trace"].contains(&file.log.level.as_str()) {
        check.fail(
            "log.level",
            format!(
                "must be one of error, warn, info, debug, trace; got {:?}",
                file.log.level
            ),
        );
    }
    // The key is loaded even when other fields are wrong, so that check-config lists its
    // problem (e.g. the chmod that fixes it) with theirs; alone, it is `ConfigError::Key`.
    let static_key_path = base_dir.join(&file.relay.static_key);
    let static_key = ferry_keyfile::load_secret_file::<RelayStaticKey>(&static_key_path);
    if !check.problems.is_empty() {
        if let Err(e) = &static_key {
            check.fail("relay.static_key", e.to_string());
        }
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems: check.problems,
        });
    }
    let static_key = static_key?;
    Ok(RelayConfig {
        path: path.to_owned(),
        relay_id: file.relay.id,
        listen,
        static_key_path,
        static_key,
        workers,
        cpus: file.relay.cpus,
        udp_gso: file.relay.udp_gso,
        send_zc_min_bytes: match file.relay.send_zc_min_bytes {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
        gateway_keys,
        limits,
        admin_listen,
        log_level: file.log.level,
        xdp,
    })
}

/// Most worker threads a relay runs; `workers = 0` on a larger machine means this many.
pub const MAX_WORKERS: usize = 256;

/// Resolves `relay.workers` (0: one per usable CPU, or one per entry of `relay.cpus`) and
/// checks `relay.cpus`.
fn validate_workers(relay: &RelaySection, check: &mut Check) -> usize {
    let online = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = match relay.workers {
        0 if !relay.cpus.is_empty() => relay.cpus.len(),
        // Not an error on a machine with more CPUs than that: the operator asked for "all".
        0 => online.min(MAX_WORKERS),
        n => n,
    };
    if relay.workers > MAX_WORKERS {
        check.fail(
            "relay.workers",
            format!("must be between 0 and {MAX_WORKERS}, got {}", relay.workers),
        );
    } else if relay.cpus.len() > MAX_WORKERS {
        check.fail(
            "relay.cpus",
            format!(
                "lists {} CPUs, more than {MAX_WORKERS} workers",
                relay.cpus.len()
            ),
        );
    } else if !relay.cpus.is_empty() && relay.cpus.len() != workers {
        check.fail(
            "relay.cpus",
            format!(
                "lists {} CPUs for {workers} workers (relay.workers); list one per worker",
                relay.cpus.len()
            ),
        );
    }
    // sched_setaffinity takes a CPU_SETSIZE-bit set; a CPU beyond it cannot be named.
    let set_size = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    for (i, &cpu) in relay.cpus.iter().enumerate() {
        if cpu >= set_size {
            check.fail(
                format!("relay.cpus[{i}]"),
                format!(
                    "CPU {cpu} is out of range: CPUs are numbered 0 to {}",
                    set_size - 1
                ),
            );
        } else if relay.cpus[..i].contains(&cpu) {
            check.fail(
                format!("relay.cpus[{i}]"),
                format!("CPU {cpu} is listed twice: each worker gets a CPU of its own"),
            );
        }
    }
    workers
}

fn validate_listen(relay: &RelaySection, check: &mut Check) -> Vec<SocketAddr> {
    if relay.listen.is_empty() {
        check.fail("relay.listen", "needs at least one address");
    }
    let mut out = Vec::new();
    for (i, text) in relay.listen.iter().enumerate() {
        match SocketAddr::from_str(text) {
            Ok(addr) if out.contains(&addr) => {
                check.fail(
                    format!("relay.listen[{i}]"),
                    format!("{addr} is listed twice"),
                );
            }
            Ok(addr) if addr.port() == 0 => {
                check.fail(format!("relay.listen[{i}]"), "needs a port");
            }
            Ok(addr) => out.push(addr),
            Err(_) => check.fail(
                format!("relay.listen[{i}]"),
                format!("{text:?} is not an address like 0.0.0.0:7000 or [::]:7000"),
            ),
        }
    }
    let v4 = out.iter().filter(|a| a.is_ipv4()).count();
    let v6 = out.len() - v4;
    if v4 > 1 || v6 > 1 {
        check.fail(
            "relay.listen",
            "at most one IPv4 and one IPv6 address (each worker opens one socket per family)",
        );
    }
    out
}

fn validate_gateway_keys(
    entries: &[GatewayKeyEntry],
    check: &mut Check,
) -> Vec<(u32, GatewayPublicKey)> {
    if entries.is_empty() {
        check.fail(
            "gateway_keys",
            "needs at least one [[gateway_keys]] entry: the relay trusts no gateway otherwise",
        );
    }
    let mut out: Vec<(u32, GatewayPublicKey)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if out.iter().any(|(kid, _)| *kid == entry.kid) {
            check.fail(
                format!("gateway_keys[{i}].kid"),
                format!("kid {} is listed twice", entry.kid),
            );
            continue;
        }
        match GatewayPublicKey::from_str(entry.public_key.trim()) {
            Ok(key) => out.push((entry.kid, key)),
            Err(e) => check.fail(format!("gateway_keys[{i}].public_key"), e.to_string()),
        }
    }
    out
}

fn validate_limits(l: &LimitsSection, check: &mut Check) -> Limits {
    check.range("limits.max_sessions", l.max_sessions, 1, 10_000_000);
    check.range(
        "limits.max_bindings_per_ip",
        l.max_bindings_per_ip,
        1,
        100_000,
    );
    check.rate("limits.bind_rate_per_ip", l.bind_rate_per_ip);
    check.range(
        "limits.bind_burst_per_ip",
        l.bind_burst_per_ip,
        1,
        1_000_000,
    );
    check.range(
        "limits.default_session_rate",
        l.default_session_rate,
        1500,
        100_000_000_000,
    );
    if l.max_session_rate < l.default_session_rate {
        check.fail(
            "limits.max_session_rate",
            format!(
                "must be at least limits.default_session_rate ({}), got {}",
                l.default_session_rate, l.max_session_rate
            ),
        );
    }
    check.range("limits.idle_timeout_secs", l.idle_timeout_secs, 5, 3600);
    check.range("limits.max_clock_skew_secs", l.max_clock_skew_secs, 0, 300);
    check.range(
        "limits.max_token_lifetime_secs",
        l.max_token_lifetime_secs,
        60,
        86_400,
    );
    let min_cache = l.max_sessions.saturating_mul(2);
    if l.replay_cache_capacity < min_cache {
        check.fail(
            "limits.replay_cache_capacity",
            format!(
                "must be at least twice limits.max_sessions ({min_cache}): every session has two tokens; got {}",
                l.replay_cache_capacity
            ),
        );
    }
    check.range("limits.tracked_ips", l.tracked_ips, 1024, 100_000_000);
    let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Limits {
        max_sessions: clamp(l.max_sessions),
        max_bindings_per_ip: u32::try_from(l.max_bindings_per_ip).unwrap_or(u32::MAX),
        bind_rate_per_ip: l.bind_rate_per_ip,
        bind_burst_per_ip: u32::try_from(l.bind_burst_per_ip).unwrap_or(u32::MAX),
        default_session_rate: l.default_session_rate,
        max_session_rate: l.max_session_rate,
        idle_timeout: Duration::from_secs(l.idle_timeout_secs),
        max_clock_skew_secs: l.max_clock_skew_secs,
        max_token_lifetime_secs: l.max_token_lifetime_secs,
        replay_cache_capacity: clamp(l.replay_cache_capacity),
        tracked_ips: clamp(l.tracked_ips),
    }
}

fn validate_admin(admin: &AdminSection, check: &mut Check) -> SocketAddr {
    let fallback = SocketAddr::from(([127, 0, 0, 1], 9477));
    match SocketAddr::from_str(&admin.listen) {
        // `to_canonical`: [::ffff:127.0.0.1] is IPv4 loopback too.
        Ok(addr) if !addr.ip().to_canonical().is_loopback() && !admin.allow_non_loopback => {
            check.fail(
                "admin.listen",
                format!(
                    "{addr} is not a loopback address; the admin listener exposes metrics and \
                     health, so set admin.allow_non_loopback = true to serve it elsewhere"
                ),
            );
            fallback
        }
        Ok(addr) => addr,
        Err(_) => {
            check.fail(
                "admin.listen",
                format!("{:?} is not an address like 127.0.0.1:9477", admin.listen),
            );
            fallback
        }
    }
}

/// Most sources the XDP guard's LRU map may track (about 100 bytes each in the kernel).
pub const MAX_XDP_SOURCES: u64 = 1 << 24;

/// The distinct ports of `listen`, in order.
fn distinct_ports(listen: &[SocketAddr]) -> Vec<u16> {
    let mut ports: Vec<u16> = listen.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Checks `[xdp]`; `listen` gives the ports it guards.
fn validate_xdp(x: &XdpSection, listen: &[SocketAddr], check: &mut Check) -> XdpSettings {
    let mode = x.mode.parse::<Mode>().unwrap_or_else(|problem| {
        check.fail("xdp.mode", problem);
        Mode::Off
    });
    if mode != Mode::Off {
        if x.interfaces.is_empty() {
            check.fail(
                "xdp.interfaces",
                "list the interfaces that carry relay traffic (e.g. [\"eth0\"]), or set \
                 xdp.mode = \"off\" to run without the XDP guard",
            );
        }
        if distinct_ports(listen).len() > MAX_PORTS {
            check.fail(
                "relay.listen",
                format!("the XDP guard protects at most {MAX_PORTS} distinct ports"),
            );
        }
    }
    for (i, name) in x.interfaces.iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() < 16
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
        if !valid {
            check.fail(
                format!("xdp.interfaces[{i}]"),
                format!("{name:?} is not an interface name (1 to 15 characters, no / or :)"),
            );
        } else if x.interfaces[..i].contains(name) {
            check.fail(
                format!("xdp.interfaces[{i}]"),
                format!("{name} is listed twice"),
            );
        }
    }
    check.range("xdp.max_sources", x.max_sources, 1, MAX_XDP_SOURCES);
    check.range("xdp.ipv6_prefix_len", x.ipv6_prefix_len, 8, 128);
    let mut rate = |per_second: (&str, u64), burst: (&str, u64)| -> Rate {
        check.range(per_second.0, per_second.1, 1, 1 << 40);
        check.range(burst.0, burst.1, 1, 1 << 40);
        Rate::new(per_second.1, burst.1).unwrap_or_else(|| {
            if per_second.1 > 0 && burst.1 > 0 {
                check.fail(
                    burst.0,
                    format!(
                        "a burst must be worth under {MAX_BURST_SECONDS} seconds at {} = {}",
                        per_second.0, per_second.1
                    ),
                );
            }
            Rate::UNLIMITED
        })
    };
    let data_packets = rate(
        ("xdp.data_packets_per_second", x.data_packets_per_second),
        ("xdp.data_packet_burst", x.data_packet_burst),
    );
    let data_bytes = rate(
        ("xdp.data_bytes_per_second", x.data_bytes_per_second),
        ("xdp.data_byte_burst", x.data_byte_burst),
    );
    let handshake = rate(
        (
            "xdp.handshake_packets_per_second",
            x.handshake_packets_per_second,
        ),
        ("xdp.handshake_packet_burst", x.handshake_packet_burst),
    );
    let handshake_total = rate(
        (
            "xdp.handshake_total_per_second",
            x.handshake_total_per_second,
        ),
        ("xdp.handshake_total_burst", x.handshake_total_burst),
    );
    if x.data_byte_burst < MAX_DATAGRAM as u64 {
        check.fail(
            "xdp.data_byte_burst",
            format!(
                "must be at least {MAX_DATAGRAM} (one full datagram), got {}",
                x.data_byte_burst
            ),
        );
    }
    let mut lists = |field: &str, entries: &[String]| -> Vec<Cidr> {
        let mut out: Vec<Cidr> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match entry.parse::<Cidr>() {
                Ok(cidr) if out.contains(&cidr) => {
                    check.fail(format!("{field}[{i}]"), format!("{cidr} is listed twice"));
                }
                Ok(cidr) => out.push(cidr),
                Err(problem) => check.fail(format!("{field}[{i}]"), problem),
            }
        }
        out
    };
    let deny = lists("xdp.deny", &x.deny);
    let allow = lists("xdp.allow", &x.allow);
    for (i, cidr) in allow.iter().enumerate() {
        if deny.contains(cidr) {
            check.fail(
                format!("xdp.allow[{i}]"),
                format!("{cidr} is also in xdp.deny; list it in one of them"),
            );
        }
    }
    if deny.len() + allow.len() > ferry_common::xdp::MAX_CIDRS as usize {
        check.fail(
            "xdp.deny",
            format!(
                "xdp.deny and xdp.allow hold at most {} entries together",
                ferry_common::xdp::MAX_CIDRS
            ),
        );
    }
    XdpSettings {
        mode,
        interfaces: x.interfaces.clone(),
        max_sources: u32::try_from(x.max_sources).unwrap_or(u32::MAX),
        ipv6_prefix_len: u8::try_from(x.ipv6_prefix_len).unwrap_or(128),
        drop_all_fragments: x.drop_all_fragments,
        data_packets,
        data_bytes,
        handshake,
        handshake_total,
        session_filter: x.session_filter,
        deny,
        allow,
    }
}

impl RelayConfig {
    /// The distinct UDP ports the relay listens on: the ports the XDP guard protects.
    pub fn xdp_ports(&self) -> Vec<u16> {
        distinct_ports(&self.listen)
    }

    /// The token verifier's settings.
    pub fn verifier_config(&self) -> VerifierConfig {
        VerifierConfig {
            relay_id: self.relay_id,
            max_skew_secs: self.limits.max_clock_skew_secs,
            max_lifetime_secs: self.limits.max_token_lifetime_secs,
        }
    }

    /// The session tables' limits.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            idle_timeout: self.limits.idle_timeout,
            max_sessions: self.limits.max_sessions,
            replay_cache_capacity: self.limits.replay_cache_capacity,
            default_session_rate: self.limits.default_session_rate,
            max_session_rate: self.limits.max_session_rate,
        }
    }

    /// The per-source-IP limits.
    pub fn ip_limits(&self) -> IpLimits {
        IpLimits {
            bind_rate: self.limits.bind_rate_per_ip,
            bind_burst: self.limits.bind_burst_per_ip,
            max_bindings: self.limits.max_bindings_per_ip,
            capacity: self.limits.tracked_ips,
        }
    }

    /// The CPU worker `index` is pinned to: the configured list, else CPU `index` modulo the
    /// CPUs this process may use.
    pub fn cpu_for_worker(&self, index: usize) -> Option<usize> {
        match self.cpus.get(index) {
            Some(&cpu) => Some(cpu),
            None => {
                let online = std::thread::available_parallelism().map_or(1, usize::from);
                Some(index % online)
            }
        }
    }

    /// Checks that `new` (a freshly loaded file) changes only what SIGHUP can apply —
    /// `[[gateway_keys]]` and the `[limits]` that [`Self::session_limits`] and
    /// [`Self::ip_limits`] carry — and returns it; otherwise lists what needs a restart, and
    /// the running config stays in force.
    ///
    /// Two limits are the token verifier's settings, fixed when the session tables are built,
    /// so changing them needs a restart too: `max_clock_skew_secs` and
    /// `max_token_lifetime_secs`. A new `replay_cache_capacity` is accepted (it still bounds
    /// `max_sessions`) but the running cache keeps its size until the relay restarts.
    ///
    /// The XDP guard's rates, lists and fragment policy reload live; its mode, interfaces and
    /// map size need a restart.
    pub fn reload_from(&self, new: RelayConfig) -> Result<RelayConfig, ConfigError> {
        let mut restart = Vec::new();
        if new.relay_id != self.relay_id {
            restart.push("relay.id".to_string());
        }
        let mut old_listen = self.listen.clone();
        let mut new_listen = new.listen.clone();
        old_listen.sort_unstable();
        new_listen.sort_unstable();
        if new_listen != old_listen {
            restart.push("relay.listen".into());
        }
        if new.static_key.public() != self.static_key.public() {
            restart.push("relay.static_key".into());
        }
        if new.workers != self.workers || new.cpus != self.cpus {
            restart.push("relay.workers / relay.cpus".into());
        }
        if new.udp_gso != self.udp_gso || new.send_zc_min_bytes != self.send_zc_min_bytes {
            restart.push("relay.udp_gso / relay.send_zc_min_bytes".into());
        }
        let (old_limits, new_limits) = (&self.limits, &new.limits);
        if new_limits.max_clock_skew_secs != old_limits.max_clock_skew_secs {
            restart.push("limits.max_clock_skew_secs".into());
        }
        if new_limits.max_token_lifetime_secs != old_limits.max_token_lifetime_secs {
            restart.push("limits.max_token_lifetime_secs".into());
        }
        if new.admin_listen != self.admin_listen {
            restart.push("admin.listen".into());
        }
        if new.log_level != self.log_level {
            restart.push("log.level".into());
        }
        let (old_xdp, new_xdp) = (&self.xdp, &new.xdp);
        if new_xdp.mode != old_xdp.mode
            || new_xdp.interfaces != old_xdp.interfaces
            || new_xdp.max_sources != old_xdp.max_sources
        {
            restart.push("xdp.mode / xdp.interfaces / xdp.max_sources".into());
        }
        match restart.is_empty() {
            true => Ok(new),
            false => Err(ConfigError::NeedsRestart(restart)),
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::keys::GatewaySigningKey;
    use ring::rand::SystemRandom;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "ferry-config-{}-{nanos}-{name}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let rng = SystemRandom::new();
            let key = RelayStaticKey::generate(&rng).unwrap();
            ferry_keyfile::write_secret_file(&dir.join("relay.key"), &key, false).unwrap();
            Self(dir)
        }

        fn parse(&self, text: &str) -> Result<RelayConfig, ConfigError> {
            parse_str(text, &self.0.join("relay.toml"), &self.0)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn gateway_key() -> String {
        let rng = SystemRandom::new();
        GatewaySigningKey::generate(&rng)
            .unwrap()
            .public()
            .to_string()
    }

    fn minimal() -> String {
        format!(
            "[relay]\nid = 7\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\npublic_key = \"{}\"\n\n[xdp]\ninterfaces = [\"eth0\"]\n",
            gateway_key()
        )
    }

    fn problems(result: Result<RelayConfig, ConfigError>) -> Vec<Problem> {
        match result {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn fields(result: Result<RelayConfig, ConfigError>) -> Vec<String> {
        problems(result).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_minimal_file_gets_safe_defaults() {
        let dir = Dir::new("minimal");
        let cfg = dir.parse(&minimal()).unwrap();
        assert_eq!(cfg.relay_id, 7);
        assert_eq!(cfg.listen.len(), 2);
        assert!(cfg.admin_listen.ip().is_loopback());
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(60));
        assert!(cfg.workers >= 1);
        assert_eq!(cfg.gateway_keys.len(), 1);
        assert_eq!(cfg.verifier_config().relay_id, 7);
    }

    #[test]
    fn the_example_file_is_valid() {
        let dir = Dir::new("example");
        let text = include_str!("../relay.example.toml")
            .replace("/etc/ferry/relay.key", "relay.key")
            .replace("REPLACE-WITH-THE-GATEWAY-PUBLIC-KEY", &gateway_key());
        let cfg = dir.parse(&text).unwrap();
        assert_eq!(
            cfg.limits,
            validate_limits(&LimitsSection::default(), &mut Check::default())
        );
        // The example shows the defaults: it means the same as the minimal file.
        let min = dir.parse(&minimal()).unwrap();
        assert_eq!(cfg.listen, min.listen);
        assert_eq!((cfg.workers, &cfg.cpus), (min.workers, &min.cpus));
        assert_eq!(
            (cfg.udp_gso, cfg.send_zc_min_bytes),
            (min.udp_gso, min.send_zc_min_bytes)
        );
        assert_eq!(
            (cfg.admin_listen, &cfg.log_level),
            (min.admin_listen, &min.log_level)
        );
        assert_eq!(cfg.limits, min.limits);
        // Copied unedited, it fails closed: its gateway key is a placeholder.
        let unedited =
            include_str!("../relay.example.toml").replace("/etc/ferry/relay.key", "relay.key");
        assert_eq!(fields(dir.parse(&unedited)), ["gateway_keys[0].public_key"]);
    }

    /// The fields of the example file, `section.field`.
    fn example_fields() -> Vec<String> {
        let table: toml::Table = toml::from_str(include_str!("../relay.example.toml")).unwrap();
        let mut out = Vec::new();
        for (section, value) in &table {
            let entries = match value {
                toml::Value::Table(t) => vec![t],
                toml::Value::Array(a) => a.iter().filter_map(toml::Value::as_table).collect(),
                other => panic!("{section} = {other} is not a section"),
            };
            for entry in entries {
                out.extend(entry.keys().map(|k| format!("{section}.{k}")));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The fields documented in docs/config.md: rows of the table under each section heading.
    fn documented_fields() -> Vec<String> {
        let mut out = Vec::new();
        let mut section = None;
        for line in include_str!("../../docs/config.md").lines() {
            // The gateway's part follows; gateway-lite's tests check it.
            if line == "# Gateway configuration" {
                break;
            }
            if let Some(heading) = line.strip_prefix("## `[") {
                section = Some(heading.trim_start_matches('[').split(']').next().unwrap());
            } else if let (Some(section), Some(row)) = (section, line.strip_prefix("| `")) {
                out.push(format!("{section}.{}", row.split('`').next().unwrap()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn every_field_is_in_the_example_and_the_docs() {
        let example = example_fields();
        assert_eq!(example, documented_fields());
        // And the parser knows each of them: a file with all of them parsed above, and here
        // every section rejects a field it does not know.
        assert!(example.len() >= 20, "{example:?}");
        let dir = Dir::new("fields");
        for section in ["relay", "limits", "admin", "log"] {
            let text = if section == "relay" {
                minimal().replace("[relay]\n", "[relay]\nbogus = 1\n")
            } else {
                minimal() + &format!("\n[{section}]\nbogus = 1\n")
            };
            match dir.parse(&text) {
                Err(ConfigError::Parse { message, .. }) => {
                    assert!(message.contains("unknown field `bogus`"), "{message}")
                }
                other => panic!("[{section}] took an unknown field: {other:?}"),
            }
        }
    }

    #[test]
    fn parse_errors_say_where() {
        let dir = Dir::new("where");
        let text = minimal() + "\n[limits]\nmax_sessions = \"many\"\n";
        let line = text.lines().count();
        match dir.parse(&text) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains(&format!("line {line}")), "{message}");
                assert!(message.contains("max_sessions"), "{message}");
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
        let text = minimal().replace("[relay]\n", "[relay]\nbogus = 1\n");
        match dir.parse(&text) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("line 2"), "{message}")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_are_errors_that_name_them() {
        let dir = Dir::new("unknown");
        let text = minimal() + "\n[limits]\nidle_timeout = 5\n";
        match dir.parse(&text) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("idle_timeout"), "{message}")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let dir = Dir::new("ranges");
        let text = minimal()
            + "\n[limits]\nidle_timeout_secs = 2\nmax_clock_skew_secs = 301\nmax_sessions = 0\n\
               bind_rate_per_ip = -1.0\ndefault_session_rate = 10\n\n[log]\nlevel = \"loud\"\n";
        let found = fields(dir.parse(&text));
        for field in [
            "limits.idle_timeout_secs",
            "limits.max_clock_skew_secs",
            "limits.max_sessions",
            "limits.bind_rate_per_ip",
            "limits.default_session_rate",
            "log.level",
        ] {
            assert!(
                found.iter().any(|f| f == field),
                "{field} missing from {found:?}"
            );
        }
        let message = dir.parse(&text).unwrap_err().to_string();
        assert!(
            message.contains("must be between 5 and 3600, got 2"),
            "{message}"
        );
    }

    #[test]
    fn each_out_of_range_value_names_its_field_alone() {
        let dir = Dir::new("each");
        let cases = [
            ("relay", "id = 0", "relay.id"),
            ("relay", "listen = []", "relay.listen"),
            ("relay", "listen = [\"0.0.0.0:0\"]", "relay.listen[0]"),
            ("relay", "workers = 300", "relay.workers"),
            ("limits", "max_sessions = 0", "limits.max_sessions"),
            (
                "limits",
                "max_bindings_per_ip = 0",
                "limits.max_bindings_per_ip",
            ),
            (
                "limits",
                "max_bindings_per_ip = 100001",
                "limits.max_bindings_per_ip",
            ),
            (
                "limits",
                "bind_rate_per_ip = 0.0",
                "limits.bind_rate_per_ip",
            ),
            (
                "limits",
                "bind_rate_per_ip = nan",
                "limits.bind_rate_per_ip",
            ),
            (
                "limits",
                "bind_rate_per_ip = inf",
                "limits.bind_rate_per_ip",
            ),
            (
                "limits",
                "bind_burst_per_ip = 0",
                "limits.bind_burst_per_ip",
            ),
            (
                "limits",
                "default_session_rate = 1499",
                "limits.default_session_rate",
            ),
            (
                "limits",
                "max_session_rate = 1000000",
                "limits.max_session_rate",
            ),
            (
                "limits",
                "idle_timeout_secs = 4",
                "limits.idle_timeout_secs",
            ),
            (
                "limits",
                "idle_timeout_secs = 3601",
                "limits.idle_timeout_secs",
            ),
            (
                "limits",
                "max_clock_skew_secs = 301",
                "limits.max_clock_skew_secs",
            ),
            (
                "limits",
                "max_token_lifetime_secs = 59",
                "limits.max_token_lifetime_secs",
            ),
            (
                "limits",
                "max_token_lifetime_secs = 86401",
                "limits.max_token_lifetime_secs",
            ),
            (
                "limits",
                "replay_cache_capacity = 199999",
                "limits.replay_cache_capacity",
            ),
            ("limits", "tracked_ips = 1023", "limits.tracked_ips"),
            ("admin", "listen = \"localhost:9477\"", "admin.listen"),
            ("log", "level = \"INFO\"", "log.level"),
            ("xdp", "mode = \"xdpdrv\"", "xdp.mode"),
            ("xdp", "interfaces = []", "xdp.interfaces"),
            (
                "xdp",
                "interfaces = [\"eth0\", \"eth0\"]",
                "xdp.interfaces[1]",
            ),
            ("xdp", "interfaces = [\"a/b\"]", "xdp.interfaces[0]"),
            (
                "xdp",
                "interfaces = [\"sixteen-chars-xx\"]",
                "xdp.interfaces[0]",
            ),
            ("xdp", "max_sources = 0", "xdp.max_sources"),
            ("xdp", "max_sources = 16777217", "xdp.max_sources"),
            ("xdp", "ipv6_prefix_len = 7", "xdp.ipv6_prefix_len"),
            ("xdp", "ipv6_prefix_len = 129", "xdp.ipv6_prefix_len"),
            (
                "xdp",
                "data_packets_per_second = 0",
                "xdp.data_packets_per_second",
            ),
            ("xdp", "data_packet_burst = 0", "xdp.data_packet_burst"),
            (
                "xdp",
                "handshake_packet_burst = 180000",
                "xdp.handshake_packet_burst",
            ),
            ("xdp", "data_byte_burst = 1471", "xdp.data_byte_burst"),
            ("xdp", "deny = [\"198.18.0.1/24\"]", "xdp.deny[0]"),
            ("xdp", "deny = [\"198.18.0.0/33\"]", "xdp.deny[0]"),
            ("xdp", "deny = [\"::/0\", \"::/0\"]", "xdp.deny[1]"),
            ("xdp", "allow = [\"example.com\"]", "xdp.allow[0]"),
        ];
        for (section, line, field) in cases {
            let text = match section {
                "relay" if line.starts_with("id ") => minimal().replace("id = 7", line),
                "relay" => minimal().replace("[relay]\n", &format!("[relay]\n{line}\n")),
                // minimal() lists an interface: this line comes first, so it wins.
                "xdp" if line.starts_with("interfaces") => {
                    minimal().replace("interfaces = [\"eth0\"]\n", &format!("{line}\n"))
                }
                "xdp" => minimal().replace("[xdp]\n", &format!("[xdp]\n{line}\n")),
                _ => minimal() + &format!("\n[{section}]\n{line}\n"),
            };
            let found = problems(dir.parse(&text));
            assert_eq!(found.len(), 1, "{line}: {found:?}");
            assert_eq!(found[0].field, field, "{line}");
        }
        // The bounds themselves are accepted.
        let edges = minimal()
            + "\n[limits]\nidle_timeout_secs = 5\nmax_clock_skew_secs = 300\n\
               max_token_lifetime_secs = 86400\ndefault_session_rate = 1500\n\
               max_session_rate = 1500\nreplay_cache_capacity = 200000\n";
        dir.parse(&edges).unwrap();
    }

    #[test]
    fn xdp_lists_and_ports_are_checked() {
        let dir = Dir::new("xdp");
        let both = minimal().replace(
            "[xdp]\n",
            "[xdp]\ndeny = [\"198.18.0.0/16\"]\nallow = [\"198.18.0.0/16\", \"2001:db8::/32\"]\n",
        );
        assert_eq!(fields(dir.parse(&both)), ["xdp.allow[0]"]);
        let off = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\n\
                   public_key = \"KEY\"\n\n[xdp]\nmode = \"off\"\n"
            .replace("KEY", &gateway_key());
        let cfg = dir.parse(&off).unwrap();
        assert_eq!(cfg.xdp.mode, Mode::Off);
        let cfg = dir.parse(&minimal()).unwrap();
        assert_eq!(cfg.xdp.mode, Mode::Auto);
        assert_eq!(cfg.xdp_ports(), [7000]);
        assert_eq!(cfg.xdp.interfaces, ["eth0"]);
    }

    #[test]
    fn gateway_keys_are_checked() {
        let dir = Dir::new("keys");
        let key = gateway_key();
        let text = format!(
            "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\npublic_key = \"{key}\"\n\n\
             [[gateway_keys]]\nkid = 1\npublic_key = \"{key}\"\n\n[[gateway_keys]]\nkid = 2\npublic_key = \"not base64!\"\n\n[xdp]\nmode = \"off\"\n"
        );
        let found = fields(dir.parse(&text));
        assert_eq!(found, ["gateway_keys[1].kid", "gateway_keys[2].public_key"]);
        let none = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n[xdp]\nmode = \"off\"\n";
        assert_eq!(fields(dir.parse(none)), ["gateway_keys"]);
    }

    #[test]
    fn listen_and_admin_addresses_are_checked() {
        let dir = Dir::new("listen");
        let text = minimal().replace(
            "[relay]\n",
            "[relay]\nlisten = [\"0.0.0.0:7000\", \"0.0.0.0:7000\", \"nowhere\"]\n",
        ) + "\n[admin]\nlisten = \"198.18.0.1:9477\"\n";
        let found = fields(dir.parse(&text));
        assert!(found.contains(&"relay.listen[1]".to_string()), "{found:?}");
        assert!(found.contains(&"relay.listen[2]".to_string()), "{found:?}");
        assert!(found.contains(&"admin.listen".to_string()), "{found:?}");
        let allowed =
            minimal() + "\n[admin]\nlisten = \"198.18.0.1:9477\"\nallow_non_loopback = true\n";
        assert!(dir.parse(&allowed).is_ok());
    }

    #[test]
    fn workers_and_cpus_are_checked() {
        let dir = Dir::new("workers");
        let with = |relay: &str| minimal().replace("[relay]\n", &format!("[relay]\n{relay}\n"));
        let cfg = dir.parse(&with("workers = 0\ncpus = [2, 3]")).unwrap();
        assert_eq!((cfg.workers, cfg.cpus.as_slice()), (2, [2, 3].as_slice()));
        assert_eq!(cfg.cpu_for_worker(1), Some(3));
        let cfg = dir.parse(&with("workers = 0")).unwrap();
        assert!((1..=MAX_WORKERS).contains(&cfg.workers));
        assert_eq!(fields(dir.parse(&with("workers = 257"))), ["relay.workers"]);
        assert_eq!(
            fields(dir.parse(&with("workers = 3\ncpus = [0, 1]"))),
            ["relay.cpus"]
        );
        assert_eq!(
            fields(dir.parse(&with("workers = 3\ncpus = [0, 1, 1]"))),
            ["relay.cpus[2]"]
        );
        let problems = problems(dir.parse(&with("workers = 2\ncpus = [0, 4096]")));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "relay.cpus[1]");
        assert!(problems[0].problem.contains("out of range"), "{problems:?}");
    }

    #[test]
    fn the_admin_listener_stays_on_loopback_unless_allowed() {
        let dir = Dir::new("admin");
        for ok in ["127.0.0.1:9477", "[::1]:9477", "[::ffff:127.0.0.1]:9477"] {
            let text = minimal() + &format!("\n[admin]\nlisten = \"{ok}\"\n");
            assert!(dir.parse(&text).is_ok(), "{ok}");
        }
        let text = minimal() + "\n[admin]\nlisten = \"[2001:db8::1]:9477\"\n";
        let found = problems(dir.parse(&text));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field, "admin.listen");
        assert!(found[0].problem.contains("allow_non_loopback"), "{found:?}");
    }

    #[test]
    fn a_readable_key_file_is_refused_with_the_fix() {
        let dir = Dir::new("perms");
        std::fs::set_permissions(
            dir.0.join("relay.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let message = dir.parse(&minimal()).unwrap_err().to_string();
        assert!(message.contains("chmod 600"), "{message}");
        assert!(message.starts_with("relay.static_key"), "{message}");
        // With other problems, the key's is listed among them.
        let text = minimal() + "\n[limits]\nidle_timeout_secs = 2\n";
        let found = problems(dir.parse(&text));
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].field, "limits.idle_timeout_secs");
        assert_eq!(found[1].field, "relay.static_key");
        assert!(found[1].problem.contains("chmod 600"), "{found:?}");
    }

    #[test]
    fn reload_takes_limits_and_keys_but_not_addresses_or_keys_of_the_relay() {
        let dir = Dir::new("reload");
        let old = dir.parse(&minimal()).unwrap();
        let tighter = dir
            .parse(&(minimal() + "\n[limits]\nmax_sessions = 10\nidle_timeout_secs = 30\n"))
            .unwrap();
        let applied = old.reload_from(tighter).unwrap();
        assert_eq!(applied.limits.max_sessions, 10);
        assert_eq!(applied.limits.idle_timeout, Duration::from_secs(30));
        let reordered = dir
            .parse(&minimal().replace(
                "[relay]\n",
                "[relay]\nlisten = [\"[::]:7000\", \"0.0.0.0:7000\"]\n",
            ))
            .unwrap();
        assert!(old.reload_from(reordered).is_ok());
        let moved = dir
            .parse(&minimal().replace("[relay]\n", "[relay]\nlisten = [\"0.0.0.0:7001\"]\n"))
            .unwrap();
        match old.reload_from(moved) {
            Err(ConfigError::NeedsRestart(fields)) => assert_eq!(fields, ["relay.listen"]),
            other => panic!("expected NeedsRestart, got {other:?}"),
        }
        for limit in ["max_clock_skew_secs = 10", "max_token_lifetime_secs = 600"] {
            let changed = dir
                .parse(&(minimal() + "\n[limits]\n" + limit + "\n"))
                .unwrap();
            let field = format!("limits.{}", limit.split(' ').next().unwrap());
            match old.reload_from(changed) {
                Err(ConfigError::NeedsRestart(fields)) => assert_eq!(fields, [field]),
                other => panic!("expected NeedsRestart for {field}, got {other:?}"),
            }
        }
        // The guard's rates and lists reload; its mode, interfaces and map size do not.
        let xdp = |line: &str| {
            dir.parse(&minimal().replace("[xdp]\n", &format!("[xdp]\n{line}\n")))
                .unwrap()
        };
        let applied = old
            .reload_from(xdp(
                "deny = [\"198.18.0.0/15\"]\ndata_packets_per_second = 10",
            ))
            .unwrap();
        assert_eq!(applied.xdp.deny.len(), 1);
        for line in ["mode = \"generic\"", "max_sources = 1000"] {
            match old.reload_from(xdp(line)) {
                Err(ConfigError::NeedsRestart(fields)) => {
                    assert_eq!(fields, ["xdp.mode / xdp.interfaces / xdp.max_sources"])
                }
                other => panic!("expected NeedsRestart for {line}, got {other:?}"),
            }
        }
        let other_key = Dir::new("reload-key");
        let rekeyed = other_key.parse(&minimal()).unwrap();
        assert!(matches!(
            old.reload_from(rekeyed),
            Err(ConfigError::NeedsRestart(_))
        ));
    }
}
