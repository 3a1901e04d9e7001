//! What handlers take from a request: the client address, a strict JSON body, and the
//! authenticated API key or admin token (with the audit log of failures).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::app::{App, Live, Shared};
use super::types::parse_body;
use super::{AUDIT, ApiError};
use crate::apikey::{PresentedKey, Scopes};
use crate::metrics::{AuthFailure, Limiter};
use crate::net::ClientIp;

/// The peer address of the connection a request came on; the server puts it in every
/// request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// A JSON body: `application/json`, at most `server.max_body_bytes`, fields as documented and
/// no others.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Shared) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let too_long = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len > app.max_body_bytes as u64);
        if too_long {
            return Err(ApiError::PayloadTooLarge);
        }
        let bytes =
            Bytes::from_request(req, app)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
                    _ => ApiError::BadRequest,
                })?;
        parse_body(&bytes).map(JsonBody).ok_or(ApiError::BadRequest)
    }
}

/// An authenticated client: a valid, unrevoked API key within its rate limit.
#[derive(Debug, Clone)]
pub struct Client {
    /// The key id.
    pub key_id: String,
    /// What the key may do.
    pub scopes: Scopes,
    /// Where the request came from.
    pub addr: ClientIp,
    /// The settings in force when the request was authenticated.
    pub(super) live: Arc<Live>,
}

/// Where a request came from: what [`guard`](super::guard) resolved (behind trusted proxies), or the TCP
/// peer.
fn client_addr(parts: &Parts) -> ClientIp {
    if let Some(ip) = parts.extensions.get::<ClientIp>() {
        return *ip;
    }
    ClientIp::direct(
        parts
            .extensions
            .get::<ClientAddr>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0),
    )
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthFailure::Missing)?;
    let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    Ok(token.trim())
}

impl App {
    pub(super) fn auth_failed(
        &self,
        reason: AuthFailure,
        key_id: Option<&str>,
        addr: ClientIp,
        route: &str,
    ) -> ApiError {
        self.metrics.auth_failure(reason);
        tracing::warn!(
            target: AUDIT,
            event = "auth_failure",
            reason = reason.name(),
            key_id = key_id.unwrap_or("-"),
            client = %addr.ip,
            via = %addr.via_display(),
            route,
        );
        match reason {
            AuthFailure::Scope => ApiError::Forbidden,
            _ => ApiError::Unauthorized,
        }
    }

    async fn authenticate(&self, parts: &Parts) -> Result<Client, ApiError> {
        let addr = client_addr(parts);
        let route = parts.uri.path();
        let token = bearer(&parts.headers).map_err(|r| self.auth_failed(r, None, addr, route))?;
        let presented = PresentedKey::parse(token)
            .map_err(|_| self.auth_failed(AuthFailure::Malformed, None, addr, route))?;
        let id = presented.id();
        let live = self.live();
        let Some(entry) = live.api_keys.get(id) else {
            // Same work as a known key, so timing does not tell which ids exist.
            let _ = self.dummy_hash.matches(&presented);
            return Err(self.auth_failed(AuthFailure::UnknownKey, Some(id), addr, route));
        };
        if !entry.hash.matches(&presented) {
            return Err(self.auth_failed(AuthFailure::WrongSecret, Some(id), addr, route));
        }
        if live.revoked.contains(id) || self.state.is_revoked(id).await? {
            return Err(self.auth_failed(AuthFailure::Revoked, Some(id), addr, route));
        }
        if let Err(refused) = self.key_limiter.check(&entry.id, Instant::now()) {
            self.metrics.rate_limited(Limiter::Key);
            tracing::info!(target: AUDIT, event = "rate_limited", limiter = "key", key_id = id, client = %addr.ip, via = %addr.via_display());
            return Err(ApiError::RateLimited(refused.retry_after_secs()));
        }
        Ok(Client {
            key_id: entry.id.clone(),
            scopes: entry.scopes.clone(),
            addr,
            live: Arc::clone(&live),
        })
    }

    fn check_admin(&self, parts: &Parts) -> Result<(), ApiError> {
        let addr = client_addr(parts);
        let fail = || self.auth_failed(AuthFailure::AdminToken, None, addr, parts.uri.path());
        let token = bearer(&parts.headers).map_err(|_| fail())?;
        let presented = PresentedKey::parse(token).map_err(|_| fail())?;
        match &self.live().admin_token {
            Some(hash) if presented.id() == "admin" && hash.matches(&presented) => Ok(()),
            _ => Err(fail()),
        }
    }
}

impl FromRequestParts<Shared> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, ApiError> {
        app.authenticate(parts).await
    }
}

/// A request that carried the admin bearer token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, ApiError> {
        app.check_admin(parts).map(|()| Admin)
    }
}

/// Where the request came from, as an extractor.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddrExtractor(pub ClientIp);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddrExtractor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(client_addr(parts)))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn bearer_tokens_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthFailure::Missing));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(AuthFailure::Malformed));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  fgk1.a.b "),
        );
        assert_eq!(bearer(&h), Ok("fgk1.a.b"));
    }
}
