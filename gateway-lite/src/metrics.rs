//! The gateway's counters and their Prometheus text page (format 0.0.4), written by
//! `prometheus-client` from one registry per [`Metrics`]; no globals.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, prometheus_text};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// The `route` and `status` labels of `ferry_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    route: &'static str,
    status: u16,
}

/// A gauge of a non-negative quantity.
pub type UGauge = Gauge<u64, AtomicU64>;

/// Every counter of the gateway, each registered once in [`Metrics::default`] under its name
/// and help text.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    auth_failures: [Counter; AuthFailure::ALL.len()],
    rate_limited_ip: Counter,
    rate_limited_key: Counter,
    /// Sessions created.
    pub sessions_created: Counter,
    /// Sessions joined.
    pub sessions_joined: Counter,
    /// Joins refused with `invalid_join_code`: an unknown, used, expired or malformed code,
    /// or one used by another request in between.
    pub join_codes_refused: Counter,
    /// Slots renewed: fresh tokens granted for a slot of an existing session.
    pub sessions_renewed: Counter,
    /// Renewals refused with `not_found` (unknown or forgotten session, or a slot the key does
    /// not hold) or `session_too_old`.
    pub renewals_refused: Counter,
    /// Tokens minted.
    pub tokens_minted: Counter,
    /// Relay heartbeats accepted.
    pub relay_heartbeats: Counter,
    /// Requests answered 503 `unavailable`: the shared state was unreachable, full, or held an
    /// unreadable record.
    pub state_errors: Counter,
    /// Requests answered 503 `no_relay_available`: no healthy relay for a new session, or the
    /// session's relay gone at join.
    pub no_relay: Counter,
    /// Requests cut off by the request timeout.
    pub request_timeouts: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Connections open now.
    pub connections: UGauge,
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// Connections closed at once because their client address held its maximum.
    pub connections_refused_per_address: Counter,
    /// Config reloads (SIGHUP) applied.
    pub reloads_applied: Counter,
    /// Config reloads refused (invalid, or needing a restart).
    pub reloads_refused: Counter,
    relays_healthy: UGauge,
    relays_unhealthy: UGauge,
}

impl Default for Metrics {
    /// Registers every family, in page order. Names are given without the `_total` that the
    /// encoder appends to counters, and help texts without the full stop it appends.
    fn default() -> Self {
        let mut r = Registry::default();
        let requests = Family::<Request, Counter>::default();
        r.register(
            "ferry_gateway_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let auth_failures = labelled(
            &mut r,
            "ferry_gateway_auth_failures",
            "Requests refused by authentication or authorization, by reason",
            "reason",
            AuthFailure::ALL.map(AuthFailure::name),
        );
        let [rate_limited_ip, rate_limited_key] = labelled(
            &mut r,
            "ferry_gateway_rate_limited",
            "Requests refused with 429, by limiter",
            "limiter",
            ["ip", "key"],
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            r.register(name, help, counter.clone());
            counter
        };
        let sessions_created = counter("ferry_gateway_sessions_created", "Sessions created");
        let sessions_joined = counter("ferry_gateway_sessions_joined", "Sessions joined");
        let join_codes_refused = counter(
            "ferry_gateway_join_codes_refused",
            "Joins refused with invalid_join_code: unknown, used, expired or malformed codes",
        );
        let sessions_renewed = counter(
            "ferry_gateway_sessions_renewed",
            "Slots renewed with a fresh token",
        );
        let renewals_refused = counter(
            "ferry_gateway_renewals_refused",
            "Renewals refused with not_found or session_too_old",
        );
        let tokens_minted = counter("ferry_gateway_tokens_minted", "Relay tokens minted");
        let relay_heartbeats = counter(
            "ferry_gateway_relay_heartbeats",
            "Relay heartbeats accepted",
        );
        let state_errors = counter(
            "ferry_gateway_state_errors",
            "Requests answered 503 unavailable: the shared state was unreachable, full or unreadable",
        );
        let no_relay = counter(
            "ferry_gateway_no_relay",
            "Requests answered 503 no_relay_available: no healthy relay to create on, or the session's relay gone at join or renewal",
        );
        let request_timeouts = counter(
            "ferry_gateway_request_timeouts",
            "Requests cut off by the request timeout",
        );
        let tls_handshake_failures = counter(
            "ferry_gateway_tls_handshake_failures",
            "TLS handshakes that failed or timed out",
        );
        let connections_accepted =
            counter("ferry_gateway_connections_accepted", "Connections accepted");
        let connections_refused_per_address = counter(
            "ferry_gateway_connections_refused_per_address",
            "Connections closed at once because their client address (IPv4, or IPv6 /64) held server.max_connections_per_address",
        );
        let [reloads_applied, reloads_refused] = labelled(
            &mut r,
            "ferry_gateway_config_reloads",
            "Config reloads (SIGHUP), by result",
            "result",
            ["applied", "refused"],
        );
        let connections = UGauge::default();
        r.register(
            "ferry_gateway_connections",
            "Connections open now",
            connections.clone(),
        );
        let [relays_healthy, relays_unhealthy] = labelled(
            &mut r,
            "ferry_gateway_relays",
            "Relays known now, by health",
            "health",
            ["healthy", "unhealthy"],
        );
        Self {
            registry: r,
            requests,
            auth_failures,
            rate_limited_ip,
            rate_limited_key,
            sessions_created,
            sessions_joined,
            join_codes_refused,
            sessions_renewed,
            renewals_refused,
            tokens_minted,
            relay_heartbeats,
            state_errors,
            no_relay,
            request_timeouts,
            tls_handshake_failures,
            connections,
            connections_accepted,
            connections_refused_per_address,
            reloads_applied,
            reloads_refused,
            relays_healthy,
            relays_unhealthy,
        }
    }
}

/// Registers a family with one label, and returns its metric for each of `values` (so that
/// each is on the page from the start, at zero).
fn labelled<M, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [M; N]
where
    M: EncodeMetric + TypedMetric + Clone + Default + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<[(&'static str, &'static str); 1], M>::default();
    registry.register(name, help, family.clone());
    values.map(|value| family.get_or_create_owned(&[(label, value)]))
}

impl Metrics {
    /// Counts a request to `route` answered with `status`.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&Request { route, status })
            .inc();
    }

    fn auth_counter(&self, reason: AuthFailure) -> Option<&Counter> {
        let i = AuthFailure::ALL.iter().position(|r| *r == reason)?;
        self.auth_failures.get(i)
    }

    /// Counts an authentication failure.
    pub fn auth_failure(&self, reason: AuthFailure) {
        if let Some(counter) = self.auth_counter(reason) {
            counter.inc();
        }
    }

    /// Authentication failures so far for `reason`.
    pub fn auth_failures(&self, reason: AuthFailure) -> u64 {
        self.auth_counter(reason).map_or(0, Counter::get)
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, limiter: Limiter) {
        match limiter {
            Limiter::Ip => &self.rate_limited_ip,
            Limiter::Key => &self.rate_limited_key,
        }
        .inc();
    }

    /// The Prometheus page (text format 0.0.4); `relays` is `(healthy, unhealthy)` relays
    /// known now.
    pub fn render(&self, relays: (u64, u64)) -> String {
        self.relays_healthy.set(relays.0);
        self.relays_unhealthy.set(relays.1);
        let mut page = String::new();
        // Writing to a `String` cannot fail, and registered metrics fail only when writing does.
        let _ = prometheus_text::encode(&mut page, &self.registry);
        page
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

    #[test]
    fn families_keep_their_names_types_and_help() {
        let m = Metrics::default();
        m.request("/healthz", 200);
        let page = m.render((0, 0));
        let families: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "ferry_gateway_requests_total counter",
                "ferry_gateway_auth_failures_total counter",
                "ferry_gateway_rate_limited_total counter",
                "ferry_gateway_sessions_created_total counter",
                "ferry_gateway_sessions_joined_total counter",
                "ferry_gateway_join_codes_refused_total counter",
                "ferry_gateway_sessions_renewed_total counter",
                "ferry_gateway_renewals_refused_total counter",
                "ferry_gateway_tokens_minted_total counter",
                "ferry_gateway_relay_heartbeats_total counter",
                "ferry_gateway_state_errors_total counter",
                "ferry_gateway_no_relay_total counter",
                "ferry_gateway_request_timeouts_total counter",
                "ferry_gateway_tls_handshake_failures_total counter",
                "ferry_gateway_connections_accepted_total counter",
                "ferry_gateway_connections_refused_per_address_total counter",
                "ferry_gateway_config_reloads_total counter",
                "ferry_gateway_connections gauge",
                "ferry_gateway_relays gauge",
            ]
        );
        assert!(page.contains(
            "# HELP ferry_gateway_sessions_created_total Sessions created.\n\
             # TYPE ferry_gateway_sessions_created_total counter\n\
             ferry_gateway_sessions_created_total 0\n"
        ));
        for help in page.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
        }
        m.connections.inc();
        m.connections.inc();
        m.connections.dec();
        let page = m.render((3, 0));
        assert!(page.contains("ferry_gateway_connections 1\n"), "{page}");
        assert!(page.contains("ferry_gateway_relays{health=\"healthy\"} 3\n"));
        assert!(page.contains("ferry_gateway_config_reloads_total{result=\"applied\"} 0\n"));
    }
}
