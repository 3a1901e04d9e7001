//! The gateway's counters and their Prometheus text page (format 0.0.4), in the relay's
//! style: written by hand, a family header once, then its samples; no registry, no globals.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request failed authentication: the `reason` label of
/// `ferry_gateway_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// The header or key is not of the expected form.
    Malformed,
    /// No key has this id.
    UnknownKey,
    /// The id is known but the secret does not match.
    WrongSecret,
    /// The key was revoked.
    Revoked,
    /// The key is valid but its scopes do not allow the request.
    Scope,
    /// The admin bearer token is missing or wrong.
    AdminToken,
}

impl AuthFailure {
    /// Every reason, in label order.
    pub const ALL: [AuthFailure; 7] = [
        Self::Missing,
        Self::Malformed,
        Self::UnknownKey,
        Self::WrongSecret,
        Self::Revoked,
        Self::Scope,
        Self::AdminToken,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::WrongSecret => "wrong_secret",
            Self::Revoked => "revoked",
            Self::Scope => "scope",
            Self::AdminToken => "admin_token",
        }
    }
}

/// Which limiter refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// The per-client-IP bucket.
    Ip,
    /// The per-API-key bucket.
    Key,
}

/// Every counter of the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    rate_limited_ip: AtomicU64,
    rate_limited_key: AtomicU64,
    /// Sessions created.
    pub sessions_created: AtomicU64,
    /// Sessions joined.
    pub sessions_joined: AtomicU64,
    /// Join attempts with an unknown, used or expired code.
    pub join_codes_refused: AtomicU64,
    /// Tokens minted.
    pub tokens_minted: AtomicU64,
    /// Relay heartbeats accepted.
    pub relay_heartbeats: AtomicU64,
    /// Requests that failed because the shared state was unavailable.
    pub state_errors: AtomicU64,
    /// Create requests refused for want of a healthy relay.
    pub no_relay: AtomicU64,
    /// Requests cut off by the request timeout.
    pub request_timeouts: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Config reloads (SIGHUP) applied.
    pub reloads_applied: AtomicU64,
    /// Config reloads refused (invalid, or needing a restart).
    pub reloads_refused: AtomicU64,
}

impl Metrics {
    /// Counts a request to `route` answered with `status`.
    pub fn request(&self, route: &'static str, status: u16) {
        let mut map = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry((route, status)).or_default() += 1;
    }

    /// Counts an authentication failure.
    pub fn auth_failure(&self, reason: AuthFailure) {
        if let Some(i) = AuthFailure::ALL.iter().position(|r| *r == reason) {
            self.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Authentication failures so far for `reason`.
    pub fn auth_failures(&self, reason: AuthFailure) -> u64 {
        AuthFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.auth_failures[i].load(Ordering::Relaxed))
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, limiter: Limiter) {
        match limiter {
            Limiter::Ip => &self.rate_limited_ip,
            Limiter::Key => &self.rate_limited_key,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus page; `relays` is `(healthy, unhealthy)` relays known now.
    pub fn render(&self, relays: (u64, u64)) -> String {
        let mut w = PromWriter::default();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        w.family(
            "ferry_gateway_requests_total",
            "HTTP requests answered, by route and status.",
            "counter",
        );
        {
            let map = self
                .requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((route, status), n) in map.iter() {
                w.sample(
                    "ferry_gateway_requests_total",
                    &[("route", route), ("status", &status.to_string())],
                    *n,
                );
            }
        }
        w.family(
            "ferry_gateway_auth_failures_total",
            "Requests refused by authentication or authorization, by reason.",
            "counter",
        );
        for (i, reason) in AuthFailure::ALL.iter().enumerate() {
            w.sample(
                "ferry_gateway_auth_failures_total",
                &[("reason", reason.name())],
                get(&self.auth_failures[i]),
            );
        }
        w.family(
            "ferry_gateway_rate_limited_total",
            "Requests refused with 429, by limiter.",
            "counter",
        );
        w.sample(
            "ferry_gateway_rate_limited_total",
            &[("limiter", "ip")],
            get(&self.rate_limited_ip),
        );
        w.sample(
            "ferry_gateway_rate_limited_total",
            &[("limiter", "key")],
            get(&self.rate_limited_key),
        );
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "ferry_gateway_sessions_created_total",
                "Sessions created.",
                &self.sessions_created,
            ),
            (
                "ferry_gateway_sessions_joined_total",
                "Sessions joined.",
                &self.sessions_joined,
            ),
            (
                "ferry_gateway_join_codes_refused_total",
                "Joins with an unknown, used or expired join code.",
                &self.join_codes_refused,
            ),
            (
                "ferry_gateway_tokens_minted_total",
                "Relay tokens minted.",
                &self.tokens_minted,
            ),
            (
                "ferry_gateway_relay_heartbeats_total",
                "Relay heartbeats accepted.",
                &self.relay_heartbeats,
            ),
            (
                "ferry_gateway_state_errors_total",
                "Requests failed because the shared state was unavailable.",
                &self.state_errors,
            ),
            (
                "ferry_gateway_no_relay_total",
                "Session creations refused for want of a healthy relay.",
                &self.no_relay,
            ),
            (
                "ferry_gateway_request_timeouts_total",
                "Requests cut off by the request timeout.",
                &self.request_timeouts,
            ),
            (
                "ferry_gateway_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out.",
                &self.tls_handshake_failures,
            ),
            (
                "ferry_gateway_connections_accepted_total",
                "Connections accepted.",
                &self.connections_accepted,
            ),
        ];
        for (name, help, counter) in counters {
            w.family(name, help, "counter")
                .sample(name, &[], get(counter));
        }
        w.family(
            "ferry_gateway_config_reloads_total",
            "Config reloads (SIGHUP), by result.",
            "counter",
        )
        .sample(
            "ferry_gateway_config_reloads_total",
            &[("result", "applied")],
            get(&self.reloads_applied),
        )
        .sample(
            "ferry_gateway_config_reloads_total",
            &[("result", "refused")],
            get(&self.reloads_refused),
        );
        w.family(
            "ferry_gateway_connections",
            "Connections open now.",
            "gauge",
        )
        .sample("ferry_gateway_connections", &[], get(&self.connections));
        w.family(
            "ferry_gateway_relays",
            "Relays known now, by health.",
            "gauge",
        )
        .sample("ferry_gateway_relays", &[("health", "healthy")], relays.0)
        .sample("ferry_gateway_relays", &[("health", "unhealthy")], relays.1);
        w.out
    }
}

#[derive(Debug, Default)]
struct PromWriter {
    out: String,
}

impl PromWriter {
    fn family(&mut self, name: &str, help: &str, kind: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let value = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{key}=\"{value}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_every_auth_failure_reason_and_counts() {
        let m = Metrics::default();
        m.auth_failure(AuthFailure::WrongSecret);
        m.auth_failure(AuthFailure::WrongSecret);
        m.request("/v1/sessions", 201);
        m.rate_limited(Limiter::Ip);
        let page = m.render((2, 1));
        assert!(page.contains("# TYPE ferry_gateway_auth_failures_total counter\n"));
        for reason in AuthFailure::ALL {
            assert!(
                page.contains(&format!("reason=\"{}\"", reason.name())),
                "{page}"
            );
        }
        assert!(page.contains("ferry_gateway_auth_failures_total{reason=\"wrong_secret\"} 2\n"));
        assert!(
            page.contains(
                "ferry_gateway_requests_total{route=\"/v1/sessions\",status=\"201\"} 1\n"
            )
        );
        assert!(page.contains("ferry_gateway_rate_limited_total{limiter=\"ip\"} 1\n"));
        assert!(page.contains("ferry_gateway_relays{health=\"unhealthy\"} 1\n"));
        assert_eq!(m.auth_failures(AuthFailure::WrongSecret), 2);
    }
}
