//! The web dashboard at `/ui`: static assets compiled into the binary (no
//! download at run time, works air-gapped), and the browser's session.
//!
//! A browser logs in at `POST /ui/session` (user, password and TOTP code, or
//! an API token) and gets the token as an HttpOnly cookie scripts cannot
//! read, with `SameSite=Strict` so no other site's page sends it. Requests
//! authenticated by that cookie must also come from this origin (`Origin`,
//! when the browser sends one, names this host: a WebSocket opened by
//! another site's page is refused) and, if they change anything, carry the
//! `X-NovaCron-CSRF` header equal to the `nc_csrf` cookie (double submit:
//! only this origin's scripts can read that cookie).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, HOST, ORIGIN, SET_COOKIE, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use novacron_api::{Login, WhoAmI};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub const SESSION_COOKIE: &str = "nc_session";
pub const CSRF_COOKIE: &str = "nc_csrf";
pub const CSRF_HEADER: &str = "x-novacron-csrf";
/// How long a dashboard session lasts.
const SESSION_TTL_S: u64 = 12 * 3600;

/// The dashboard's files: path under `/ui/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/api.js"),
    ),
    (
        "views.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/views.js"),
    ),
    ("vm.js", "text/javascript; charset=utf-8", include_bytes!("../ui/vm.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/style.css"),
    ),
    (
        "vendor/xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/vendor/xterm.js"),
    ),
    (
        "vendor/xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/vendor/xterm.css"),
    ),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("index.html") }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>| async move { asset(&path) }),
        )
        .route("/ui/session", get(session).post(log_in).delete(log_out))
}

fn asset(path: &str) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return ApiError::not_found(format!("UI file {path:?}")).into_response();
    };
    (
        [
            (CONTENT_TYPE, *content_type),
            // Assets change with the binary: always ask (cheap on loopback; no stale UI after an upgrade).
            (CACHE_CONTROL, "no-cache"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        *bytes,
    )
        .into_response()
}

/// The value of cookie `name` in the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// A request authenticated by the session cookie: from this origin, and
/// with the CSRF header if it changes anything.
pub fn check_browser_request(req: &Request) -> Result<(), ApiError> {
    let headers = req.headers();
    if let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) {
        // HTTP/2 carries the host in the URI's authority, HTTP/1.1 in Host.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| headers.get(HOST).and_then(|v| v.to_str().ok()))
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or_default();
        if host.is_empty() || origin_host != host {
            return Err(ApiError::forbidden(format!(
                "A dashboard session is used from this origin only, not {origin:?}"
            )));
        }
    }
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let expected = cookie(headers, CSRF_COOKIE).unwrap_or_default();
    let given = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(ApiError::forbidden(
            "A change made with a dashboard session needs the X-NovaCron-CSRF header",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSession {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    totp: Option<String>,
    #[serde(default)]
    project: Option<String>,
    /// An API token instead of a user and password.
    #[serde(default)]
    token: Option<String>,
}

fn set_cookies(secure: bool, session: &str, csrf: &str, max_age: u64) -> [String; 2] {
    let secure = if secure { "; Secure" } else { "" };
    [
        format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"),
        format!("{CSRF_COOKIE}={csrf}; Path=/; SameSite=Strict; Max-Age={max_age}{secure}"),
    ]
}

/// Logs a browser in: the session cookie holds a token made for it (or the
/// API token it gave).
async fn log_in(
    State(state): State<AppState>,
    source: Option<axum::Extension<ConnectInfo<novacron_tls::PeerInfo>>>,
    body: JsonBody,
) -> ApiResult<Response> {
    let req: NewSession = body.parse()?;
    let (secret, max_age) = match (req.token, req.user, req.password) {
        (Some(token), None, None) => {
            state.auth.authenticate(token.trim()).map_err(ApiError::unauthorized)?;
            (token.trim().to_string(), SESSION_TTL_S)
        }
        (None, Some(user), Some(password)) => {
            let source: Option<SocketAddr> = source.map(|c| c.0 .0.addr);
            let login = Login {
                user,
                password,
                totp: req.totp,
                project: req.project,
                ttl_s: Some(SESSION_TTL_S),
            };
            let issued = crate::routes::identity::login_inner(&state, source, login).await?;
            (issued.secret, SESSION_TTL_S)
        }
        _ => {
            return Err(ApiError::bad_request(
                "Log in with a user and password (and TOTP code), or with a token",
            ))
        }
    };
    let p = state.auth.authenticate(&secret).map_err(ApiError::unauthorized)?;
    let csrf = crate::auth::random_secret().map_err(|e| ApiError::internal("Cannot get random bytes", &e))?;
    Ok(with_cookies(
        Json(p.who()).into_response(),
        set_cookies(state.tls.is_some(), &secret, &csrf, max_age),
    ))
}

/// Who the session is (401 without one): the dashboard's start.
async fn session(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<WhoAmI>> {
    let secret = session_cookie(&headers).ok_or_else(|| ApiError::unauthorized("Not logged in"))?;
    let p = state.auth.authenticate(&secret).map_err(ApiError::unauthorized)?;
    Ok(Json(p.who()))
}

/// Logs out: a token made at log-in is revoked; the cookies are cleared.
async fn log_out(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    if let Some(secret) = session_cookie(req.headers()) {
        check_browser_request(&req)?;
        if let Ok(p) = state.auth.authenticate(&secret) {
            if p.token.starts_with("login-") {
                crate::routes::identity::revoke(&state, &p.token).await?;
            }
        }
    }
    Ok(with_cookies(
        StatusCode::NO_CONTENT.into_response(),
        set_cookies(state.tls.is_some(), "", "", 0),
    ))
}

/// Adds each cookie as a Set-Cookie header of its own.
fn with_cookies(mut resp: Response, cookies: [String; 2]) -> Response {
    for value in cookies {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_served() {
        let index = std::str::from_utf8(ASSETS[0].2).unwrap();
        for (path, _, bytes) in ASSETS {
            assert!(!bytes.is_empty(), "{path} is empty");
        }
        for src in index.split(['"', '\'']).filter(|s| s.starts_with("/ui/")) {
            let path = src.trim_start_matches("/ui/");
            assert!(
                ASSETS.iter().any(|(p, _, _)| *p == path),
                "index.html names {src}, which is not compiled in"
            );
        }
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; nc_csrf=xyz"));
        h.append(COOKIE, HeaderValue::from_static("nc_session=secret"));
        assert_eq!(session_cookie(&h).as_deref(), Some("secret"));
        assert_eq!(cookie(&h, CSRF_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
