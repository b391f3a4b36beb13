//! Identity, in process: quotas, login, tokens and TOTP, the audit chain,
//! and the limits per token (rate, open watch streams, token lifetime).
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use futures::StreamExt;
use novacron_api::Migration;
use novacron_store::StoreExt;
use serde_json::json;

#[tokio::test]
async fn quotas_are_enforced_and_named() {
    let h = Harness::new().await;
    fixtures(&h).await;
    h.admin(
        Method::PUT,
        "/v1/projects/alpha",
        json!({"quota": {"vcpus": 3, "memory_mib": 1024, "vms": 3}}),
    )
    .await;
    let operator = h.token("op", "operator", Some("alpha")).await;
    let create = |name: &str, vcpus: u32, mem: u64| json!({"name": name, "spec": {"image": "img-alpha", "vcpus": vcpus, "memory_mib": mem}});
    // vm-alpha (1 vCPU, 128 MiB) exists; 2 more vCPUs fit, a third does not.
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a1", 2, 256)))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["metadata"]["project"], "alpha");
    let before = h.snapshot().await;
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a2", 1, 128)))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded");
    assert_eq!(v["error"]["field"], "quota.vcpus");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit 3, in use 3, requested 1"),
        "{v}"
    );
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a3", 0, 128)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(h.snapshot().await, before, "a refused create wrote something");
    let (_, project) = h.call(Method::GET, "/v1/projects/alpha", Some(&operator), None).await;
    // Disk: two 1 GiB root disks and the fixtures' 64 MiB volume.
    assert_eq!(
        project["usage"],
        json!({"vcpus": 3, "memory_mib": 384, "disk_mib": 2048 + 64, "vms": 2, "networks": 1, "addresses": 1})
    );
    // Memory names its own quota.
    h.admin(Method::PUT, "/v1/projects/alpha", json!({"quota": {"memory_mib": 400}}))
        .await;
    let (status, v) = h
        .call(Method::POST, "/v1/vms", Some(&operator), Some(create("a4", 1, 64)))
        .await;
    assert_eq!(
        (status, &v["error"]["field"]),
        (StatusCode::FORBIDDEN, &json!("quota.memory_mib"))
    );
    // Unknown project: 422 naming the field.
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/vms",
            Some(&h.admin),
            Some(json!({"name": "x", "project": "nope", "spec": {"image": "img-alpha", "vcpus": 1, "memory_mib": 64}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

#[tokio::test]
async fn login_tokens_expiry_revocation_and_totp() {
    let h = Harness::new().await;
    fixtures(&h).await;
    h.admin(
        Method::POST,
        "/v1/users",
        json!({"name": "alice", "password": "correct horse", "bindings": [{"role": "operator", "project": "alpha"}]}),
    )
    .await;
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/users",
            Some(&h.admin),
            Some(json!({"name": "bob", "password": "short"})),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("password"))
    );
    // Stored as argon2id, never returned.
    let stored = h
        .state
        .store
        .get_obj::<novacron_api::User>("alice")
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.password_hash.starts_with("$argon2id$"),
        "{}",
        stored.password_hash
    );
    let (_, shown) = h.call(Method::GET, "/v1/users/alice", Some(&h.admin), None).await;
    assert!(shown.get("password_hash").is_none(), "{shown}");

    let login = |password: &str, totp: Option<String>| json!({"user": "alice", "password": password, "totp": totp});
    let (status, v) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let secret = v["secret"].as_str().unwrap().to_string();
    assert_eq!(v["token"]["project"], "alpha");
    assert_eq!(v["token"]["role"], "operator");
    assert!(v["token"]["expires_at"].is_string());
    let (status, me) = h.call(Method::GET, "/v1/whoami", Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["user"].as_str(), me["project"].as_str()),
        (Some("alice"), Some("alpha"))
    );
    // The token is stored as a hash only.
    let name = v["token"]["metadata"]["name"].as_str().unwrap().to_string();
    let stored = h
        .state
        .store
        .get_obj::<novacron_api::Token>(&name)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(stored.secret_sha256, secret);
    assert!(!serde_json::to_string(&stored).unwrap().contains(&secret));

    // A user cannot mint a token above their own rights.
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&secret),
            Some(json!({"name": "escalate", "role": "admin"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&secret),
            Some(json!({"name": "alice-ci", "role": "viewer", "ttl_s": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["token"]["project"], "alpha", "a derived token keeps the project");
    let ci = v["secret"].as_str().unwrap().to_string();
    let (_, mine) = h.call(Method::GET, "/v1/tokens", Some(&secret), None).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 2, "{mine}");
    // Revocation takes effect at once.
    let (status, _) = h.call(Method::DELETE, "/v1/tokens/alice-ci", Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = h.call(Method::GET, "/v1/whoami", Some(&ci), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");

    // Expiry: a token past its time is refused.
    h.state
        .store
        .modify::<novacron_api::Token, _>(&name, |t| {
            t.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
            true
        })
        .await
        .unwrap();
    let expired = h
        .state
        .store
        .get_obj::<novacron_api::Token>(&name)
        .await
        .unwrap()
        .unwrap();
    h.state.auth.insert_token(&expired);
    let (status, v) = h.call(Method::GET, "/v1/whoami", Some(&secret), None).await;
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("Token expired"))
    );

    // TOTP: once enabled, a login needs the current code.
    let (_, fresh) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    let fresh = fresh["secret"].as_str().unwrap().to_string();
    let (status, enrol) = h.call(Method::POST, "/v1/users/alice/totp", Some(&fresh), None).await;
    assert_eq!(status, StatusCode::OK, "{enrol}");
    let totp_secret = enrol["secret"].as_str().unwrap();
    let (status, v) = h
        .call(Method::POST, "/v1/login", None, Some(login("correct horse", None)))
        .await;
    assert_eq!(
        (status, v["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("This user needs a TOTP code"))
    );
    let code = novacron_server::totp::code(totp_secret, chrono::Utc::now().timestamp()).unwrap();
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/login",
            None,
            Some(login("correct horse", Some(code))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Throttling: after five failures even the right password waits.
    for _ in 0..5 {
        let (status, _) = h
            .call(Method::POST, "/v1/login", None, Some(login("wrong", None)))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let resp = h
        .raw(
            Method::POST,
            "/v1/login",
            None,
            Body::from(login("correct horse", None).to_string()),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "Retry-After {retry}");

    // Deleting the user revokes their tokens.
    h.admin(Method::DELETE, "/v1/users/alice", json!(null)).await;
    let (status, _) = h.call(Method::GET, "/v1/whoami", Some(&fresh), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn audit_records_requests_and_detects_tampering() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    h.state.store.delete_obj::<Migration>("mig-alpha", None).await.unwrap();
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-beta/stop", Some(&tokens[2]), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-alpha/stop", Some(&tokens[3]), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call(Method::GET, "/v1/vms", Some("wrong-token"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = h
        .call(Method::POST, "/v1/vms/vm-alpha/stop", Some(&tokens[2]), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (_, all) = h.call(Method::GET, "/v1/audit?limit=1000", Some(&h.admin), None).await;
    let items = all["items"].as_array().unwrap();
    let last = |action: &str| {
        items
            .iter()
            .rev()
            .find(|r| r["entry"]["action"] == action)
            .cloned()
            .unwrap()
    };
    let ok = last("POST /v1/vms/vm-alpha/stop");
    assert_eq!(ok["entry"]["actor"], "token:t-operator");
    assert_eq!(ok["entry"]["project"], "alpha");
    assert_eq!(ok["entry"]["target"], "vms/vm-alpha");
    assert_eq!(ok["entry"]["status"], 200);
    let unauth = last("GET /v1/vms");
    assert_eq!(
        (unauth["entry"]["actor"].as_str(), unauth["entry"]["status"].as_u64()),
        (Some("anonymous"), Some(401))
    );
    assert_eq!(unauth["entry"]["reason"], "Invalid token");
    let denied = items
        .iter()
        .find(|r| r["entry"]["action"] == "POST /v1/vms/vm-alpha/stop" && r["entry"]["status"] == 403)
        .unwrap();
    assert_eq!(denied["entry"]["actor"], "token:t-viewer");
    assert_eq!(
        denied["entry"]["project"], "alpha",
        "a refusal names the project of the path"
    );
    // Filters.
    let (_, by_user) = h
        .call(Method::GET, "/v1/audit?user=token:t-viewer", Some(&h.admin), None)
        .await;
    assert!(!by_user["items"].as_array().unwrap().is_empty());
    assert!(by_user["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["entry"]["actor"] == "token:t-viewer"));
    let (_, later) = h
        .call(
            Method::GET,
            "/v1/audit?since=2999-01-01T00:00:00Z",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(later["items"].as_array().unwrap().len(), 0);

    let (_, verdict) = h.call(Method::GET, "/v1/audit/verify", Some(&h.admin), None).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    let n = verdict["records"].as_u64().unwrap();
    assert!(n > 10, "{verdict}");

    // Tamper with the stored log directly in the database.
    let db = rusqlite::Connection::open(h.dir.path().join("novacron.db")).unwrap();
    let verify = || async {
        let (_, v) = h.call(Method::GET, "/v1/audit/verify", Some(&h.admin), None).await;
        v
    };
    let get = |seq: u64| -> String {
        db.query_row(
            "SELECT data FROM objects WHERE kind='audit' AND name=?1",
            [format!("{seq:016}")],
            |r| r.get(0),
        )
        .unwrap()
    };
    let put = |seq: u64, d: &str| {
        db.execute(
            "UPDATE objects SET data=?1 WHERE kind='audit' AND name=?2",
            [d, &format!("{seq:016}")],
        )
        .unwrap()
    };
    // 1. Change a record.
    let d3 = get(3);
    let changed = d3.replacen("\"status\":", "\"status\":1", 1);
    assert_ne!(changed, d3);
    put(3, &changed);
    let v = verify().await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problems"].to_string().contains("record 3 was changed"), "{v}");
    put(3, &d3);
    assert_eq!(verify().await["ok"], true);
    // 2. Reorder: swap the contents of records 4 and 5.
    let (d4, d5) = (get(4), get(5));
    put(4, &d5);
    put(5, &d4);
    let v = verify().await;
    assert_eq!(v["ok"], false, "{v}");
    put(4, &d4);
    put(5, &d5);
    assert_eq!(verify().await["ok"], true);
    // 3. Delete a record in the middle.
    db.execute(
        "DELETE FROM objects WHERE kind='audit' AND name=?1",
        [format!("{:016}", 6)],
    )
    .unwrap();
    let v = verify().await;
    assert_eq!(v["ok"], false);
    assert!(v["problems"].to_string().contains("missing"), "{v}");
    // 4. Delete the newest records: the anchor outside the database notices.
    let h2 = Harness::new().await;
    for i in 0..3 {
        h2.admin(Method::POST, "/v1/projects", json!({"name": format!("p{i}")}))
            .await;
    }
    let db2 = rusqlite::Connection::open(h2.dir.path().join("novacron.db")).unwrap();
    let (_, v) = h2.call(Method::GET, "/v1/audit/verify", Some(&h2.admin), None).await;
    assert_eq!(v["ok"], true, "{v}");
    let last: String = db2
        .query_row("SELECT max(name) FROM objects WHERE kind='audit'", [], |r| r.get(0))
        .unwrap();
    db2.execute("DELETE FROM objects WHERE kind='audit' AND name=?1", [&last])
        .unwrap();
    let (_, v) = h2.call(Method::GET, "/v1/audit/verify", Some(&h2.admin), None).await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problems"].to_string().contains("anchor"), "{v}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let h = Harness::with_rate_limit(Some((1, 3))).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = h.raw(Method::GET, "/v1/whoami", Some(&h.admin), Body::empty()).await;
        statuses.push(resp.status());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3], "{statuses:?}");
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}

/// One token holds at most `MAX_WATCHES_PER_TOKEN` watch streams; the next
/// gets a 429 with Retry-After, and a closed stream frees its place. Other
/// tokens are not affected.
#[tokio::test]
async fn watch_streams_per_token_are_limited() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let limit = novacron_server::limits::MAX_WATCHES_PER_TOKEN as usize;
    let mut open = Vec::new();
    for _ in 0..limit {
        let resp = h
            .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    let refused = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
        .await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let other = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[2]), Body::empty())
        .await;
    assert_eq!(other.status(), StatusCode::OK, "another token has its own places");
    drop(open.pop());
    let again = h
        .raw(Method::GET, "/v1/vms?watch=true", Some(&tokens[3]), Body::empty())
        .await;
    assert_eq!(again.status(), StatusCode::OK, "a closed stream frees its place");
}

/// A token's lifetime is bounded for everyone: an admin's ttl of 26,000
/// years wrote an expiry RFC 3339 cannot carry (found by the API fuzzer).
#[tokio::test]
async fn token_lifetime_is_bounded_for_token_managers_too() {
    let h = Harness::new().await;
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&h.admin),
            Some(json!({"name": "forever", "role": "viewer", "ttl_s": 813_843_191_778u64})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "ttl_s");
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&h.admin),
            Some(json!({"name": "decade", "role": "viewer", "ttl_s": novacron_api::MAX_TOKEN_TTL_S})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A JSON body trickled in (here: a first chunk, then nothing) gets 408 once
/// its 30 s are up, instead of holding the request forever. (Time is paused:
/// the 30 s pass at once.)
#[tokio::test(start_paused = true)]
async fn a_body_that_never_finishes_arriving_gets_408() {
    let h = Harness::new().await;
    let trickle =
        futures::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"name\":")) })
            .chain(futures::stream::pending());
    let resp = h
        .raw(Method::POST, "/v1/projects", Some(&h.admin), Body::from_stream(trickle))
        .await;
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    let (status, _) = h.call(Method::GET, "/v1/projects/never", Some(&h.admin), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the project was not created");
}
