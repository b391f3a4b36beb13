//! The dashboard's server side, in process: its files are served from the
//! binary, and its session cookie works as a token only from this origin
//! and, for changes, with the CSRF header.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn send(h: &Harness, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = h.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

fn request(method: Method, path: &str, cookie: Option<&str>) -> axum::http::request::Builder {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "novacron.test:8420");
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    r
}

/// Logs in at /ui/session; the Cookie header the browser would send after.
async fn log_in(h: &Harness, body: Value) -> (StatusCode, Option<String>, String) {
    let req = request(Method::POST, "/ui/session", None)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, headers, _) = send(h, req).await;
    let set: Vec<String> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    if set.is_empty() {
        return (status, None, String::new());
    }
    let session = set.iter().find(|c| c.starts_with("nc_session=")).unwrap();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let csrf_cookie = set.iter().find(|c| c.starts_with("nc_csrf=")).unwrap();
    assert!(!csrf_cookie.contains("HttpOnly"), "scripts must read the CSRF cookie");
    let pair = |c: &str| c.split(';').next().unwrap().to_string();
    let csrf = pair(csrf_cookie).trim_start_matches("nc_csrf=").to_string();
    (status, Some(format!("{}; {}", pair(session), pair(csrf_cookie))), csrf)
}

#[tokio::test]
async fn files_come_from_the_binary() {
    let h = Harness::new().await;
    let (status, headers, body) = send(&h, request(Method::GET, "/ui/", None).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("/ui/app.js"));
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let (status, headers, _) = send(
        &h,
        request(Method::GET, "/ui/vendor/xterm.js", None)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let (status, _, _) = send(
        &h,
        request(Method::GET, "/ui/../admin.token", None)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(
        &h,
        request(Method::GET, "/ui/nope.js", None).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A list of many objects is compressed for a client that takes gzip.
    for i in 0..40 {
        h.state
            .store
            .create(
                "vm",
                &format!("vm-{i:03}"),
                &format!("id-{i}"),
                json!({"metadata": novacron_api::Metadata::new(&format!("vm-{i:03}"), Default::default()),
                       "spec": novacron_api::VmSpec::new("img", 1, 128)}),
            )
            .await
            .unwrap();
    }
    let req = request(Method::GET, "/v1/vms?limit=1000", None)
        .header("authorization", format!("Bearer {}", h.admin))
        .header("accept-encoding", "gzip")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&h, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("content-encoding").map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
}

#[tokio::test]
async fn the_session_cookie_works_from_this_origin_and_changes_need_the_csrf_header() {
    let h = Harness::new().await;
    fixtures(&h).await;
    h.admin(
        Method::POST,
        "/v1/users",
        json!({"name": "ada", "password": "long-enough-1", "bindings": [{"role": "admin"}]}),
    )
    .await;
    let (status, cookie, _) = log_in(&h, json!({"user": "ada", "password": "wrong-password"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.is_none(), "a failed log-in set cookies");
    let (status, cookie, csrf) = log_in(&h, json!({"user": "ada", "password": "long-enough-1"})).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.unwrap();

    let (status, _, body) = send(
        &h,
        request(Method::GET, "/ui/session", Some(&cookie))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let me: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(me["actor"], "ada");

    // Reads with the cookie alone.
    let (status, _, _) = send(
        &h,
        request(Method::GET, "/v1/vms", Some(&cookie))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Changes need the CSRF header, equal to the cookie's.
    let pause = |csrf: Option<&str>, origin: Option<&str>| {
        let mut r = request(Method::POST, "/v1/vms/vm-alpha/pause", Some(&cookie));
        if let Some(c) = csrf {
            r = r.header("x-novacron-csrf", c);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.body(Body::empty()).unwrap()
    };
    let (status, _, body) = send(&h, pause(None, None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = send(&h, pause(Some("not-the-value"), None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Another site's page, even with the value.
    let (status, _, _) = send(&h, pause(Some(&csrf), Some("https://evil.test"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // From this origin with the value, the request reaches the VM (which a
    // migration of the fixtures holds: 409, not a refusal of the session).
    let (status, _, body) = send(&h, pause(Some(&csrf), Some("https://novacron.test:8420"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&body));
    let req = request(Method::POST, "/v1/projects", Some(&cookie))
        .header("x-novacron-csrf", &csrf)
        .header("content-type", "application/json")
        .body(Body::from(json!({"name": "made-in-browser"}).to_string()))
        .unwrap();
    let (status, _, body) = send(&h, req).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));

    // Log-out revokes the token made for the session.
    let req = request(Method::DELETE, "/ui/session", Some(&cookie))
        .header("x-novacron-csrf", &csrf)
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&h, req).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(headers
        .get_all("set-cookie")
        .iter()
        .all(|c| c.to_str().unwrap().contains("Max-Age=0")));
    let (status, _, _) = send(
        &h,
        request(Method::GET, "/v1/vms", Some(&cookie))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the session's token still works after log-out"
    );

    // A token logs in too; log-out then leaves the token alone.
    let viewer = h.token("looker", "viewer", Some("alpha")).await;
    let (status, cookie, csrf) = log_in(&h, json!({"token": viewer})).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.unwrap();
    let req = request(Method::POST, "/v1/vms/vm-alpha/pause", Some(&cookie))
        .header("x-novacron-csrf", &csrf)
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = send(&h, req).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a viewer's session paused a VM");
    let req = request(Method::DELETE, "/ui/session", Some(&cookie))
        .header("x-novacron-csrf", &csrf)
        .body(Body::empty())
        .unwrap();
    send(&h, req).await;
    let (status, _) = h.call(Method::GET, "/v1/vms", Some(&viewer), None).await;
    assert_eq!(status, StatusCode::OK, "logging out revoked a token the user gave");
    let (status, _, _) = log_in(&h, json!({"token": "not-a-token"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
