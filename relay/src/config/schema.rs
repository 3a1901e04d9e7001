//! The config file as written: the TOML sections, their fields and their defaults, parsed
//! strictly (an unknown field is an error). [`super::validate`] turns a [`File`] into a
//! [`super::RelayConfig`].

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub(super) relay: RelaySection,
    #[serde(default)]
    pub(super) gateway_keys: Vec<GatewayKeyEntry>,
    #[serde(default)]
    pub(super) limits: LimitsSection,
    #[serde(default)]
    pub(super) admin: AdminSection,
    #[serde(default)]
    pub(super) log: LogSection,
    #[serde(default)]
    pub(super) xdp: XdpSection,
    pub(super) heartbeat: Option<HeartbeatSection>,
}

/// `[heartbeat]`: reporting load to a gateway; absent, no heartbeats are sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeartbeatSection {
    pub(super) gateway_url: String,
    pub(super) api_key_file: PathBuf,
    pub(super) ca_file: PathBuf,
    pub(super) address: String,
    #[serde(default = "default_heartbeat_interval")]
    pub(super) interval_secs: u64,
}

fn default_heartbeat_interval() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RelaySection {
    pub(super) id: u64,
    #[serde(default = "default_listen")]
    pub(super) listen: Vec<String>,
    pub(super) static_key: PathBuf,
    #[serde(default)]
    pub(super) workers: usize,
    #[serde(default)]
    pub(super) cpus: Vec<usize>,
    #[serde(default = "yes")]
    pub(super) udp_gso: bool,
    #[serde(default = "yes")]
    pub(super) udp_gro: bool,
    #[serde(default)]
    pub(super) send_zc_min_bytes: u64,
    #[serde(default = "default_socket_buffer")]
    pub(super) udp_recv_buffer_bytes: u64,
    #[serde(default = "default_socket_buffer")]
    pub(super) udp_send_buffer_bytes: u64,
}

fn default_socket_buffer() -> u64 {
    8 << 20
}

fn yes() -> bool {
    true
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:7000".into(), "[::]:7000".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GatewayKeyEntry {
    pub(super) kid: u32,
    /// The key itself; or, with `public_key_file`, the file `ferry-gateway keygen` wrote it to.
    #[serde(default)]
    pub(super) public_key: Option<String>,
    #[serde(default)]
    pub(super) public_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct LimitsSection {
    pub(super) max_sessions: u64,
    pub(super) max_bindings_per_ip: u64,
    pub(super) bind_rate_per_ip: f64,
    pub(super) bind_burst_per_ip: u64,
    pub(super) default_session_rate: u64,
    pub(super) max_session_rate: u64,
    pub(super) idle_timeout_secs: u64,
    pub(super) max_clock_skew_secs: u64,
    pub(super) max_token_lifetime_secs: u64,
    pub(super) replay_cache_capacity: u64,
    pub(super) tracked_ips: u64,
    pub(super) ipv6_prefix_len: u64,
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
            ipv6_prefix_len: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct AdminSection {
    pub(super) listen: String,
    pub(super) allow_non_loopback: bool,
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
pub(super) struct LogSection {
    pub(super) level: String,
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
pub(super) struct XdpSection {
    pub(super) mode: String,
    pub(super) interfaces: Vec<String>,
    pub(super) max_sources: u64,
    pub(super) ipv6_prefix_len: u64,
    pub(super) drop_all_fragments: bool,
    pub(super) data_packets_per_second: u64,
    pub(super) data_packet_burst: u64,
    pub(super) data_bytes_per_second: u64,
    pub(super) data_byte_burst: u64,
    pub(super) handshake_packets_per_second: u64,
    pub(super) handshake_packet_burst: u64,
    pub(super) handshake_total_per_second: u64,
    pub(super) handshake_total_burst: u64,
    pub(super) session_filter: bool,
    pub(super) fast_path: bool,
    pub(super) answer_challenges: bool,
    pub(super) deny: Vec<String>,
    pub(super) allow: Vec<String>,
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
            fast_path: true,
            answer_challenges: true,
            deny: Vec::new(),
            allow: Vec::new(),
        }
    }
}
