//! Validation: from the file as written ([`File`]) to a [`RelayConfig`], collecting every
//! problem, each naming its field, so that `ferry-relay check-config` shows them all at once.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use ferry_common::header::MAX_DATAGRAM;
use ferry_common::xdp::{MAX_BURST_SECONDS, MAX_PORTS, Rate};
use ferry_core::keys::{GatewayPublicKey, RelayStaticKey};
use ferry_core::problems::Check;

use super::schema::{
    AdminSection, File, GatewayKeyEntry, HeartbeatSection, LimitsSection, RelaySection, XdpSection,
};
use super::{
    ConfigError, Limits, MAX_SOCKET_BUFFER, MAX_WORKERS, MAX_XDP_SOURCES, MIN_SOCKET_BUFFER,
    RelayConfig,
};
use crate::heartbeat::HeartbeatSettings;
use crate::worker::SocketBuffers;
use crate::xdp::{Mode, XdpSettings};

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
    for (field, value) in [
        (
            "relay.udp_recv_buffer_bytes",
            file.relay.udp_recv_buffer_bytes,
        ),
        (
            "relay.udp_send_buffer_bytes",
            file.relay.udp_send_buffer_bytes,
        ),
    ] {
        check.range(field, value, MIN_SOCKET_BUFFER, MAX_SOCKET_BUFFER);
    }
    let gateway_keys = validate_gateway_keys(&file.gateway_keys, base_dir, &mut check);
    let limits = validate_limits(&file.limits, &mut check);
    let admin_listen = validate_admin(&file.admin, &mut check);
    let xdp = validate_xdp(&file.xdp, &listen, &mut check);
    let heartbeat = file
        .heartbeat
        .as_ref()
        .and_then(|h| validate_heartbeat(h, base_dir, &mut check));
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
        udp_gro: file.relay.udp_gro,
        send_zc_min_bytes: match file.relay.send_zc_min_bytes {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
        socket_buffers: SocketBuffers {
            recv: usize::try_from(file.relay.udp_recv_buffer_bytes).unwrap_or(usize::MAX),
            send: usize::try_from(file.relay.udp_send_buffer_bytes).unwrap_or(usize::MAX),
        },
        gateway_keys,
        limits,
        admin_listen,
        log_level: file.log.level,
        xdp,
        heartbeat,
    })
}

/// Checks `[heartbeat]` and reads its API key and CA files; `None` with a problem recorded
/// for anything wrong.
fn validate_heartbeat(
    h: &HeartbeatSection,
    base_dir: &Path,
    check: &mut Check,
) -> Option<HeartbeatSettings> {
    let problems = check.problems.len();
    let url = h.gateway_url.trim_end_matches('/');
    let host = url.strip_prefix("https://").unwrap_or("");
    if host.is_empty() || host.contains('/') {
        check.fail(
            "heartbeat.gateway_url",
            format!(
                "must be https://host[:port] with no path; got {:?}",
                h.gateway_url
            ),
        );
    }
    let address = match SocketAddr::from_str(&h.address) {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
        _ => {
            check.fail(
                "heartbeat.address",
                format!(
                    "must be the ip:port peers reach this relay at (no port 0, no 0.0.0.0 or ::); got {:?}",
                    h.address
                ),
            );
            None
        }
    };
    check.range("heartbeat.interval_secs", h.interval_secs, 1, 300);
    let api_key_file = base_dir.join(&h.api_key_file);
    let api_key = match ferry_keyfile::load_secret_text(&api_key_file) {
        Ok(text) if text.trim().starts_with("fgk1.") => {
            Some(zeroize::Zeroizing::new(text.trim().to_string()))
        }
        Ok(_) => {
            check.fail(
                "heartbeat.api_key_file",
                format!(
                    "{} does not hold an API key (fgk1.<id>.<secret>)",
                    api_key_file.display()
                ),
            );
            None
        }
        Err(e) => {
            check.fail("heartbeat.api_key_file", e.to_string());
            None
        }
    };
    let ca_file = base_dir.join(&h.ca_file);
    let ca_pem = match read_ca_file(&ca_file) {
        Ok(pem) => match crate::heartbeat::check_ca(&pem) {
            Ok(()) => Some(pem),
            Err(e) => {
                check.fail("heartbeat.ca_file", format!("{}: {e}", ca_file.display()));
                None
            }
        },
        Err(e) => {
            check.fail("heartbeat.ca_file", format!("{}: {e}", ca_file.display()));
            None
        }
    };
    if check.problems.len() > problems {
        return None;
    }
    Some(HeartbeatSettings {
        gateway_url: url.to_string(),
        api_key_file,
        api_key: api_key?,
        ca_file,
        ca_pem: ca_pem?,
        address: address?,
        interval: Duration::from_secs(h.interval_secs),
    })
}

/// Resolves `relay.workers` (0: one per usable CPU, or one per entry of `relay.cpus`) and
/// checks `relay.cpus`.
pub(super) fn validate_workers(relay: &RelaySection, check: &mut Check) -> usize {
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

pub(super) fn validate_listen(relay: &RelaySection, check: &mut Check) -> Vec<SocketAddr> {
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

pub(super) fn validate_gateway_keys(
    entries: &[GatewayKeyEntry],
    base_dir: &Path,
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
        // A repeated kid is one problem and its key (checked below) may be another: every
        // problem is reported at once, whatever its entry's other faults.
        let repeated = entries[..i].iter().any(|e| e.kid == entry.kid);
        if repeated {
            check.fail(
                format!("gateway_keys[{i}].kid"),
                format!("kid {} is listed twice", entry.kid),
            );
        }
        let key = match (&entry.public_key, &entry.public_key_file) {
            (Some(text), None) => GatewayPublicKey::from_str(text.trim())
                .map_err(|e| (format!("gateway_keys[{i}].public_key"), e.to_string())),
            (None, Some(file)) => {
                ferry_keyfile::load_public_file::<GatewayPublicKey>(&base_dir.join(file))
                    .map_err(|e| (format!("gateway_keys[{i}].public_key_file"), e.to_string()))
            }
            _ => Err((
                format!("gateway_keys[{i}]"),
                "needs exactly one of public_key and public_key_file".to_owned(),
            )),
        };
        match key {
            Ok(key) if !repeated => out.push((entry.kid, key)),
            Ok(_) => {}
            Err((field, problem)) => check.fail(field, problem),
        }
    }
    out
}

pub(super) fn validate_limits(l: &LimitsSection, check: &mut Check) -> Limits {
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
    check.range("limits.ipv6_prefix_len", l.ipv6_prefix_len, 8, 128);
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
        ipv6_prefix_len: u8::try_from(l.ipv6_prefix_len).unwrap_or(128),
    }
}

pub(super) fn validate_admin(admin: &AdminSection, check: &mut Check) -> SocketAddr {
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

/// The distinct ports of `listen`, in order.
pub(super) fn distinct_ports(listen: &[SocketAddr]) -> Vec<u16> {
    let mut ports: Vec<u16> = listen.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Checks `[xdp]`; `listen` gives the ports it guards.
pub(super) fn validate_xdp(
    x: &XdpSection,
    listen: &[SocketAddr],
    check: &mut Check,
) -> XdpSettings {
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
    let deny = check.cidrs("xdp.deny", &x.deny);
    let allow = check.cidrs("xdp.allow", &x.allow);
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
        fast_path: x.fast_path,
        answer_challenges: x.answer_challenges,
        deny,
        allow,
    }
}

/// Reads `heartbeat.ca_file`: a regular file (a FIFO would block the read until something
/// writes to it) of at most [`ferry_keyfile::MAX_PEM_FILE`] bytes.
fn read_ca_file(path: &Path) -> std::io::Result<Vec<u8>> {
    Ok(
        ferry_keyfile::read_text_file(path, ferry_keyfile::MAX_PEM_FILE)?
            .as_bytes()
            .to_vec(),
    )
}
