//! The HTTP API: the public `/v1` routes and the admin routes, their handlers, the error
//! bodies, authentication and the audit log. docs/gateway-api.md describes it for clients, and
//! docs/gateway-openapi.yaml lists exactly the routes of [`public_routes`] and
//! [`admin_routes`] (a test keeps them in step).
//!
//! Every error answer is `{"error": "<code>"}` with a fixed code per case: nothing from the
//! request, the config or an internal error is echoed. The audit log (tracing target
//! `ferry_gateway::audit`) records who asked for what and what was granted — key ids, realms,
//! session and relay ids, kids, expiry times, client addresses — and never an API key, a token,
//! a slot secret or a join code.
//!
//! The parts: [`App`] (what handlers share), [`ApiError`], the extractors ([`Client`],
//! [`Admin`], [`JsonBody`]), the bodies ([`Grant`] and the requests), the handlers, and here the
//! route tables, the routers and the middleware around every request.

mod app;
mod error;
mod extract;
mod handlers;
mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};

pub use self::app::App;
use self::app::Shared;
pub use self::error::ApiError;
pub use self::extract::{Admin, Client, ClientAddr, ClientAddrExtractor, JsonBody};
pub use self::handlers::JOIN_CODE_LEN;
use self::handlers::{
    admin_relays, admin_revoke, admin_sessions, create_session, healthz, join_session,
    metrics_page, relay_heartbeat, renew_session,
};
pub use self::types::{
    CreateSession, Grant, Heartbeat, JoinSession, RelayBody, RenewSession, Revoke, parse_body,
};
use crate::metrics::Limiter;
use crate::net as client_net;

/// The audit log's tracing target.
pub const AUDIT: &str = "ferry_gateway::audit";

/// The realm of a session whose creator named none.
pub const DEFAULT_REALM: &str = "default";

/// One route: method, path, handler.
pub type Route = (&'static str, &'static str, MethodRouter<Shared>);

/// The routes of the public listener.
pub fn public_routes() -> Vec<Route> {
    vec![
        ("GET", "/healthz", get(healthz)),
        ("POST", "/v1/sessions", post(create_session)),
        ("POST", "/v1/sessions/join", post(join_session)),
        ("POST", "/v1/sessions/renew", post(renew_session)),
        ("POST", "/v1/relays/heartbeat", post(relay_heartbeat)),
    ]
}

/// The routes of the admin listener.
pub fn admin_routes() -> Vec<Route> {
    vec![
        ("GET", "/healthz", get(healthz)),
        ("GET", "/metrics", get(metrics_page)),
        ("GET", "/admin/v1/relays", get(admin_relays)),
        ("GET", "/admin/v1/sessions", get(admin_sessions)),
        ("POST", "/admin/v1/keys/revoke", post(admin_revoke)),
    ]
}

/// Which listener a router serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The public listener: per-IP rate limit on `/v1`.
    Public,
    /// The admin listener.
    Admin,
}

fn build(app: Shared, routes: Vec<Route>, listener: Listener) -> Router {
    let paths: Vec<&'static str> = routes.iter().map(|(_, p, _)| *p).collect();
    let mut router: Router<Shared> = Router::new();
    for (_, path, handler) in routes {
        router = router.route(
            path,
            handler.fallback(|| async { ApiError::MethodNotAllowed }),
        );
    }
    let limit = app.max_body_bytes;
    router
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            (Arc::clone(&app), listener, Arc::new(paths)),
            guard,
        ))
        .with_state(app)
}

/// The public listener's router.
pub fn public_router(app: Shared) -> Router {
    build(app, public_routes(), Listener::Public)
}

/// The admin listener's router.
pub fn admin_router(app: Shared) -> Router {
    build(app, admin_routes(), Listener::Admin)
}

/// Around every request: the per-IP limit (public `/v1` routes), the request timeout, the
/// request counter, and the counters of 503 causes (every `unavailable` answer counts as a
/// state error, every `no_relay_available` as no relay, whichever handler or extractor
/// failed).
async fn guard(
    AxState((app, listener, paths)): AxState<(Shared, Listener, Arc<Vec<&'static str>>)>,
    mut req: Request,
    next: Next,
) -> Response {
    // Every route is a fixed path, so the label is the path when it is one of them.
    let route: &'static str = paths
        .iter()
        .copied()
        .find(|p| *p == req.uri().path())
        .unwrap_or("other");
    let response = async {
        let peer = req.extensions().get::<ClientAddr>().map(|c| c.0);
        if listener == Listener::Public
            && let Some(peer) = peer
        {
            let live = app.live();
            let client = live.trusted_proxies.client_ip(peer, req.headers());
            req.extensions_mut().insert(client);
            if req.uri().path().starts_with("/v1/") {
                let key = client_net::limit_key(client.ip, live.ipv6_prefix_len);
                if let Err(refused) = app.ip_limiter.check(&key, Instant::now()) {
                    app.metrics.rate_limited(Limiter::Ip);
                    tracing::info!(target: AUDIT, event = "rate_limited", limiter = "ip", client = %client.ip, via = %client.via_display());
                    return ApiError::RateLimited(refused.retry_after_secs()).into_response();
                }
            }
        }
        match tokio::time::timeout(app.request_timeout, next.run(req)).await {
            Ok(response) => response,
            Err(_) => {
                app.metrics.request_timeouts.inc();
                let mut response = ApiError::Timeout.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    }
    .await;
    match response.extensions().get::<ApiError>() {
        Some(ApiError::Unavailable) => {
            app.metrics.state_errors.inc();
        }
        Some(ApiError::NoRelay) => {
            app.metrics.no_relay.inc();
        }
        _ => {}
    }
    app.metrics.request(route, response.status().as_u16());
    response
}
