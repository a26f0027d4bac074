//! What every request passes before its handler: the rate limit, the token
//! (for mutations, and for reads when they are protected), and a deadline;
//! and the headers every response carries.

use std::sync::Arc;

use axum::extract::{Request, State as Extract};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::Token;
use super::api::ApiError;
use super::state::State;

/// The middleware: limit, authorize, bound in time, add security headers.
pub(super) async fn guard(
    Extract(state): Extract<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = match check(&state, &request) {
        Err(refusal) => refusal.into_response(),
        Ok(()) => match tokio::time::timeout(state.timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long",
            )
            .into_response(),
        },
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    response
}

fn check(state: &State, request: &Request) -> Result<(), ApiError> {
    if state.loopback_only && !loopback_host(request) {
        // DNS rebinding: a page of another site whose name now resolves to
        // 127.0.0.1 would otherwise read this API from the user's browser.
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            "this server answers only to localhost, 127.0.0.1 and [::1]",
        ));
    }
    if state.limiter.check().is_err() {
        let mut refusal = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests: slow down",
        );
        refusal.retry_after = Some(1);
        return Err(refusal);
    }
    let path = request.uri().path();
    let mutation = !matches!(*request.method(), Method::GET | Method::HEAD);
    let api = path.starts_with("/api/") || path == "/metrics";
    if mutation && !state.mutations {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "mutations are disabled on this server (AdminOptions::mutations)",
        ));
    }
    if mutation || (api && state.protect_reads) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(expected) = &state.token else {
            return Err(unauthorized("no token is configured"));
        };
        match given {
            None => return Err(unauthorized("a bearer token is required")),
            Some(given) if !token_matches(expected, given) => {
                tracing::info!(path, "admin request with a wrong token refused");
                return Err(unauthorized("wrong token"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether the request names a loopback host (any port), as a browser does
/// for a page it loaded from this server.
fn loopback_host(request: &Request) -> bool {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host());
    let Some(host) = host else {
        // HTTP/1.0 without a Host header: not a browser.
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn unauthorized(reason: &'static str) -> ApiError {
    let mut refusal = ApiError::new(StatusCode::UNAUTHORIZED, "not_authorized", reason);
    refusal.challenge = true;
    refusal
}

/// Compares in time that depends only on the expected token's length: every
/// byte of it is compared, whatever the given one holds.
fn token_matches(expected: &Token, given: &str) -> bool {
    let (expected, given) = (expected.0.as_bytes(), given.as_bytes());
    let mut same = (expected.len() as u64).ct_eq(&(given.len() as u64));
    for (i, byte) in expected.iter().enumerate() {
        same &= byte.ct_eq(given.get(i).unwrap_or(&0));
    }
    same.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_itself() {
        let token = Token("0123456789abcdef".into());
        assert!(token_matches(&token, "0123456789abcdef"));
        assert!(!token_matches(&token, "0123456789abcdeF"));
        assert!(!token_matches(&token, "0123456789abcde"));
        assert!(!token_matches(&token, "0123456789abcdef0"));
        assert!(!token_matches(&token, ""));
    }

    #[test]
    fn only_loopback_host_names_pass() {
        let named = |host: &str| {
            let request = Request::builder()
                .uri("/api/queues")
                .header(header::HOST, host)
                .body(axum::body::Body::empty())
                .unwrap();
            loopback_host(&request)
        };
        for host in [
            "localhost",
            "LOCALHOST:15680",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(named(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:15680",
            "10.0.0.1:15680",
            "localhost.evil.example",
            "[::2]:80",
        ] {
            assert!(!named(host), "{host}");
        }
    }
}
