//! [`ApiError`]: every error answer of the API, each a fixed code.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::state::StateError;

/// Every error answer of the API. The body is `{"error": code}` and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 `bad_request`: malformed JSON, a missing or invalid field.
    BadRequest,
    /// 401 `unauthorized`: no valid, unrevoked API key (or admin token).
    Unauthorized,
    /// 403 `forbidden`: the key's scopes do not allow this.
    Forbidden,
    /// 403 `peer_identity_mismatch`: the joiner is not the peer the creator expects.
    PeerIdentityMismatch,
    /// 404 `not_found`: no such route; or, on a renewal, no live session with a slot the key
    /// holds.
    NotFound,
    /// 404 `invalid_join_code`: unknown, already used or expired join code.
    InvalidJoinCode,
    /// 410 `session_too_old`: the session is older than `sessions.max_session_age_secs`, so
    /// its slots are no longer renewed.
    SessionTooOld,
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 408 `request_timeout`: the request took longer than `server.request_timeout_ms`.
    Timeout,
    /// 413 `payload_too_large`: the body exceeds `server.max_body_bytes`.
    PayloadTooLarge,
    /// 415 `unsupported_media_type`: the body is not `application/json`.
    UnsupportedMediaType,
    /// 429 `rate_limited`, with `Retry-After` in seconds.
    RateLimited(u64),
    /// 503 `no_relay_available`: no healthy relay to hand out (or the session's relay is gone).
    NoRelay,
    /// 503 `unavailable`: the shared state is unreachable or full.
    Unavailable,
    /// 500 `internal`: something failed that the client cannot fix.
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::PeerIdentityMismatch => StatusCode::FORBIDDEN,
            Self::NotFound | Self::InvalidJoinCode => StatusCode::NOT_FOUND,
            Self::SessionTooOld => StatusCode::GONE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoRelay | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code in the body.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::PeerIdentityMismatch => "peer_identity_mismatch",
            Self::NotFound => "not_found",
            Self::InvalidJoinCode => "invalid_join_code",
            Self::SessionTooOld => "session_too_old",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout => "request_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited(_) => "rate_limited",
            Self::NoRelay => "no_relay_available",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Every answer built from an `ApiError` carries it in its extensions, so that
/// `guard` (in `api.rs`) counts each 503 by its cause in one place.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code() }).to_string();
        let mut response = (self.status(), body).into_response();
        // For the middleware, which counts the 503s by cause.
        response.extensions_mut().insert(self);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Self::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body is not read: say the connection ends here, so that a
            // client does not send its next request on it and lose it.
            Self::PayloadTooLarge => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        if let Some(suppressed) = STATE_ERRORS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now())
        {
            tracing::error!(error = %e, suppressed_before = suppressed, "shared state");
        }
        Self::Unavailable
    }
}

/// Shared-state failures logged at most once per [`LogOnce::INTERVAL`]: a full store refuses
/// every create, and one client must not be able to flood the log through it. The requests
/// still get their 503, and the gateway's metrics count them.
static STATE_ERRORS: Mutex<LogOnce> = Mutex::new(LogOnce {
    last: None,
    suppressed: 0,
});

/// One log line per interval, and a count of the ones held back.
#[derive(Debug)]
struct LogOnce {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogOnce {
    /// At most one line this often.
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` when a line may be written at `now`;
    /// `None` (and one more held back) otherwise.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_state_errors_are_logged_once_a_second_with_the_count_held_back() {
        let t0 = Instant::now();
        let mut log = LogOnce {
            last: None,
            suppressed: 0,
        };
        assert_eq!(log.admit(t0), Some(0));
        let written = (0..1000)
            .filter(|i| log.admit(t0 + Duration::from_micros(*i)).is_some())
            .count();
        assert_eq!(written, 0);
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(log.admit(t0 + Duration::from_secs(3)), Some(0));
    }

    #[test]
    fn error_bodies_are_fixed_codes() {
        for e in [
            ApiError::BadRequest,
            ApiError::Unauthorized,
            ApiError::RateLimited(3),
            ApiError::Internal,
        ] {
            let r = e.into_response();
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            if let ApiError::RateLimited(_) = e {
                assert_eq!(r.headers()[header::RETRY_AFTER], "3");
            }
        }
    }
}
