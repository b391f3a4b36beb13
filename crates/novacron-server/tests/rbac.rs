//! Authorization, in process: the full endpoint × principal × project
//! matrix (token roles and node certificates), what lists show, custom roles,
//! hostile input, and refusal before the body is read.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: panics are failures

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use novacron_api::Migration;
use novacron_store::StoreExt;
use serde_json::{json, Value};

#[tokio::test]
async fn every_endpoint_role_and_project_matches_the_matrix() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;

    // The matrix covers exactly the API: a new endpoint without a row fails here.
    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let in_spec = spec_endpoints(&doc);
    // Creates link to the operations on what they made, by its name.
    let link = &doc["paths"]["/v1/vms"]["post"]["responses"]["201"]["links"]["get_vm"];
    assert_eq!(link["operationId"], "get_vm", "{link}");
    assert_eq!(link["parameters"]["path.name"], "$response.body#/metadata/name");
    let in_matrix: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .chain(PUBLIC.iter().map(|(m, p)| (m.to_string(), p.to_string())))
        .collect();
    let missing: Vec<_> = in_spec.difference(&in_matrix).collect();
    let stale: Vec<_> = in_matrix.difference(&in_spec).collect();
    assert!(
        missing.is_empty(),
        "endpoints without an authorization rule in MATRIX: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "MATRIX rows for endpoints that do not exist: {stale:?}"
    );

    let mut wrong = Vec::new();
    let mut n = 0;
    for (method, template, own, other) in MATRIX {
        for (project, expected) in [("alpha", own), ("beta", other)] {
            for (i, who) in PRINCIPALS.iter().enumerate() {
                n += 1;
                let want_allowed = expected.as_bytes()[i] == b'Y';
                let (path, body) = request_for(&h, method, template, project, n).await;
                let m = Method::from_bytes(method.as_bytes()).unwrap();
                let resp = match (*method, *template) {
                    ("PUT", "/v1/images/{name}/files/{part}") => h
                        .raw(m, &path, Some(&tokens[i]), Body::from(vec![1u8; 16]))
                        .await
                        .status(),
                    _ => h.call(m, &path, Some(&tokens[i]), body).await.0,
                };
                let denied = matches!(
                    resp,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                );
                // 502/503: allowed, then the (absent) agent could not be reached.
                assert_ne!(resp, StatusCode::INTERNAL_SERVER_ERROR, "{method} {path} as {who}");
                if !declared(&doc, method, template, resp) {
                    wrong.push(format!(
                        "{method} {template}: answered {resp}, which the document does not declare"
                    ));
                }
                if denied == want_allowed {
                    wrong.push(format!(
                        "{method} {path} as {who} ({project}): got {resp}, expected {}",
                        if want_allowed { "allowed" } else { "denied" }
                    ));
                }
                if !denied && *method != "GET" {
                    reset_objects(&h).await;
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} checks differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Without a token, every protected endpoint is refused.
    for (method, template, _, _) in MATRIX {
        let (path, body) = request_for(&h, method, template, "alpha", 0).await;
        let (status, _) = h
            .call(Method::from_bytes(method.as_bytes()).unwrap(), &path, None, body)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        assert!(
            declared(&doc, method, template, status),
            "{method} {template}: 401 undeclared"
        );
    }
}

#[tokio::test]
async fn lists_show_only_the_callers_project() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = h.call(Method::GET, "/v1/vms", Some(&tokens[0]), None).await;
    assert_eq!(names(&all), ["vm-alpha", "vm-beta"]);
    let (_, own) = h.call(Method::GET, "/v1/vms", Some(&tokens[2]), None).await;
    assert_eq!(names(&own), ["vm-alpha"]);
    let (_, own) = h.call(Method::GET, "/v1/migrations", Some(&tokens[3]), None).await;
    assert_eq!(names(&own), ["mig-alpha"]);
    let (_, projects) = h.call(Method::GET, "/v1/projects", Some(&tokens[3]), None).await;
    assert_eq!(names(&projects), ["alpha"]);
    // A public image is visible everywhere.
    h.admin(
        Method::POST,
        "/v1/images",
        json!({"name": "shared", "format": "kernel", "public": true}),
    )
    .await;
    let (_, images) = h.call(Method::GET, "/v1/images", Some(&tokens[3]), None).await;
    assert_eq!(names(&images), ["img-alpha", "shared"]);
}

#[tokio::test]
async fn custom_roles_grant_exactly_their_permissions() {
    let h = Harness::new().await;
    fixtures(&h).await;
    let (status, v) = h
        .call(
            Method::POST,
            "/v1/roles",
            Some(&h.admin),
            Some(json!({"name": "bad", "permissions": ["vms:fly"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    h.admin(
        Method::POST,
        "/v1/roles",
        json!({"name": "restarter", "permissions": ["vms:read", "vms:update"]}),
    )
    .await;
    let t = h.token("restart-bot", "restarter", Some("alpha")).await;
    // Lifecycle actions wait for migrations; the fixture's one is not needed here.
    h.state.store.delete_obj::<Migration>("mig-alpha", None).await.unwrap();
    let (status, _) = h.call(Method::POST, "/v1/vms/vm-alpha/reboot", Some(&t), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.call(Method::DELETE, "/v1/vms/vm-alpha", Some(&t), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Deleting the role takes its permissions away from its tokens.
    h.admin(Method::DELETE, "/v1/roles/restarter", json!(null)).await;
    let (status, _) = h.call(Method::POST, "/v1/vms/vm-alpha/reboot", Some(&t), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Hostile and malformed JSON against every endpoint that takes a body, as
/// every principal: no panic, no 5xx, nothing written (the audit log aside).
#[tokio::test]
async fn hostile_json_never_causes_5xx_or_writes() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,40}".prop_map(Value::from),
        Just(json!("../../etc/passwd")),
        Just(json!("a".repeat(5000))),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
    ];
    let keys = prop_oneof![
        Just("name".to_string()),
        Just("spec".to_string()),
        Just("vcpus".to_string()),
        Just("memory_mib".to_string()),
        Just("image".to_string()),
        Just("project".to_string()),
        Just("role".to_string()),
        Just("password".to_string()),
        Just("permissions".to_string()),
        Just("quota".to_string()),
        Just("metadata".to_string()),
        Just("status".to_string()),
        "[a-z_]{1,10}",
    ];
    let json_value = leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let raw_garbage = prop_oneof![
        Just("{".to_string()),
        Just("{\"name\":".to_string()),
        Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_string()),
        Just("\u{0}\u{1}".to_string()),
        "\\PC{0,64}",
    ];
    let writes: Vec<(&str, &str)> = MATRIX
        .iter()
        .filter(|(m, _, _, _)| *m == "POST" || *m == "PUT")
        .map(|(m, p, _, _)| (*m, *p))
        .chain(PUBLIC.iter().copied())
        .collect();

    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let mut runner = TestRunner::deterministic();
    let before = h.snapshot().await;
    let mut sent = 0;
    for round in 0..6 {
        for (method, template) in &writes {
            if *template == "/v1/images/{name}/files/{part}" {
                continue; // takes raw bytes, not JSON
            }
            let (path, valid) =
                request_for(&h, method, template, if round % 2 == 0 { "alpha" } else { "beta" }, 0).await;
            let document = json_value.new_tree(&mut runner).unwrap().current().to_string();
            let garbage = raw_garbage.new_tree(&mut runner).unwrap().current();
            // Principals that may write nothing get any document; the admin
            // gets unparseable bodies, on endpoints that require a body.
            let mut attempts = vec![(&tokens[3], document.clone()), (&tokens[5], garbage.clone())];
            if valid.is_some() {
                attempts.push((&h.admin, garbage.clone()));
            }
            for (token, body) in attempts {
                let resp = h
                    .raw(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        &path,
                        Some(token),
                        Body::from(body.clone()),
                    )
                    .await;
                sent += 1;
                assert!(
                    !resp.status().is_server_error() && !resp.status().is_success(),
                    "{method} {path} with {body:?}: {}",
                    resp.status()
                );
                assert!(
                    declared(&doc, method, template, resp.status()),
                    "{method} {template} with {body:?}: {} is not in the document",
                    resp.status()
                );
            }
        }
    }
    assert!(sent > 100);
    assert_eq!(h.snapshot().await, before, "a rejected request wrote something");
}

/// A caller who may not make a request is refused before its body is read:
/// a malformed, mistyped, oversized or wrongly labelled body gets the same
/// 401/403/404 as a valid one, so validation tells it nothing.
#[tokio::test]
async fn refusal_comes_before_the_body_is_read() {
    let h = Harness::new().await;
    let tokens = fixtures(&h).await;
    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", Some(&h.admin), None).await;
    let oversized = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let bodies: [(&str, &str); 4] = [
        ("application/json", "{not json"),
        ("application/json", "{\"name\": 5, \"spec\": []}"),
        ("application/json", &oversized),
        ("text/plain", "{}"),
    ];
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (method, template, own, _) in MATRIX {
        if !matches!(*method, "POST" | "PUT") || *template == "/v1/images/{name}/files/{part}" {
            continue;
        }
        for (i, who) in PRINCIPALS.iter().enumerate() {
            // Where the body decides (which share of its rights a caller hands
            // on in a token; which node registers; whose VM's backup a node
            // commits), the caller may make the request and is refused only
            // for what it asks.
            let body_decides = *template == "/v1/tokens"
                || (matches!(*template, "/v1/nodes/register" | "/v1/backup-stores/{store}/backups")
                    && who.starts_with("node-"));
            if own.as_bytes()[i] == b'Y' || body_decides {
                continue;
            }
            let (path, _) = request_for(&h, method, template, "alpha", 0).await;
            for (content_type, body) in bodies {
                let status = h
                    .send(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        &path,
                        Some(&tokens[i]),
                        content_type,
                        Body::from(body.to_string()),
                    )
                    .await
                    .status();
                checked += 1;
                if !declared(&doc, method, template, status) {
                    wrong.push(format!(
                        "{method} {template}: answered {status}, which the document does not declare"
                    ));
                }
                if !matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND) {
                    wrong.push(format!(
                        "{method} {path} as {who} with {content_type} {:.20}: {status}",
                        body
                    ));
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} requests");
    assert!(
        wrong.is_empty(),
        "{} of {checked} answered before authorization:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
