//! Images downloaded by the server from a URL (a file server the test runs
//! on a port of its own): Ready only with the right checksum and a real
//! disk image; a wrong checksum, a non-image, an interrupted transfer or an
//! error status leave the image Failed with the reason and no file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness code: panics are failures

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use common::Harness;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Serves `/good` (a qcow2), `/noise` (not an image) and `/cut` (announces
/// the qcow2's length, sends half, then drops the connection).
async fn file_server(qcow2: Vec<u8>) -> String {
    let half = qcow2[..qcow2.len() / 2].to_vec();
    let len = qcow2.len();
    let app = axum::Router::new()
        .route("/good", get(move || async move { qcow2.clone() }))
        .route("/noise", get(|| async { vec![7u8; 65536] }))
        .route(
            "/cut",
            get(move || async move {
                // The error comes once the headers and the first half are out.
                let chunks = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(half.clone()))]).chain(
                    futures::stream::once(async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err(std::io::Error::other("connection dropped"))
                    }),
                );
                axum::response::Response::builder()
                    .header("content-length", len)
                    .body(Body::from_stream(chunks))
                    .unwrap()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn image(h: &Harness, name: &str) -> Value {
    h.call(Method::GET, &format!("/v1/images/{name}"), Some(&h.admin), None)
        .await
        .1
}

/// Creates image `name` and asks for its download; the answer's status and body.
async fn download(h: &Harness, name: &str, format: &str, url: &str, sha: &str) -> (StatusCode, Value) {
    h.admin(Method::POST, "/v1/images", json!({"name": name, "format": format}))
        .await;
    h.call(
        Method::POST,
        &format!("/v1/images/{name}/download"),
        Some(&h.admin),
        Some(json!({"url": url, "sha256": sha})),
    )
    .await
}

/// Polls until the image leaves Downloading.
async fn settled(h: &Harness, name: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let img = image(h, name).await;
        if img["status"]["phase"] != "Downloading" {
            return img;
        }
        assert!(std::time::Instant::now() < deadline, "{name} still downloading: {img}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No file (complete or partial) in the image's directory.
fn no_files(h: &Harness, img: &Value) {
    let dir = h
        .dir
        .path()
        .join("images")
        .join(img["metadata"]["id"].as_str().unwrap());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[tokio::test]
async fn downloads_are_checked_and_failures_leave_no_file() {
    let h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let qcow2 = std::fs::read(&path).unwrap();
    let good_sha = sha256(&qcow2);
    let base = file_server(qcow2.clone()).await;

    // The right file: Ready, with its checksum, size and progress.
    let (status, started) = download(&h, "dl", "qcow2", &format!("{base}/good"), &good_sha.to_uppercase()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["status"]["phase"], "Downloading");
    let img = settled(&h, "dl").await;
    assert_eq!(img["status"]["phase"], "Ready", "{img}");
    assert_eq!(img["status"]["files"][0]["sha256"], good_sha.as_str());
    assert_eq!(img["status"]["virtual_size_bytes"], 16 << 20);
    assert_eq!(img["status"]["download"]["bytes_done"], qcow2.len());
    // It has its disk now: no second download.
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/images/dl/download",
            Some(&h.admin),
            Some(json!({"url": format!("{base}/good"), "sha256": good_sha})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Failures: Failed with the reason, no file.
    let noise_sha = sha256(&[7u8; 65536]);
    for (name, path, sha, says) in [
        ("dl-sum", "/good", "0".repeat(64), "checksum mismatch"),
        ("dl-noise", "/noise", noise_sha, "image is raw, not qcow2"),
        ("dl-cut", "/cut", good_sha.clone(), "interrupted"),
        ("dl-404", "/missing", good_sha.clone(), "404"),
    ] {
        let (status, body) = download(&h, name, "qcow2", &format!("{base}{path}"), &sha).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{name}: {body}");
        let img = settled(&h, name).await;
        assert_eq!(img["status"]["phase"], "Failed", "{name}: {img}");
        let reason = img["status"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(says), "{name}: {reason}");
        assert!(img["status"]["files"].as_array().unwrap().is_empty(), "{img}");
        no_files(&h, &img);
    }
    // A Failed image may try again.
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/images/dl-cut/download",
            Some(&h.admin),
            Some(json!({"url": format!("{base}/good"), "sha256": good_sha})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(settled(&h, "dl-cut").await["status"]["phase"], "Ready");

    // Bad requests change nothing.
    h.admin(Method::POST, "/v1/images", json!({"name": "dl-bad", "format": "qcow2"}))
        .await;
    h.admin(
        Method::POST,
        "/v1/images",
        json!({"name": "dl-kernel", "format": "kernel"}),
    )
    .await;
    for (name, body, field) in [
        ("dl-bad", json!({"url": "ftp://x/y", "sha256": good_sha}), "url"),
        (
            "dl-bad",
            json!({"url": format!("{base}/good"), "sha256": "abc"}),
            "sha256",
        ),
        (
            "dl-kernel",
            json!({"url": format!("{base}/good"), "sha256": good_sha}),
            "url",
        ),
    ] {
        let before = image(&h, name).await;
        let (status, err) = h
            .call(
                Method::POST,
                &format!("/v1/images/{name}/download"),
                Some(&h.admin),
                Some(body),
            )
            .await;
        assert_eq!(
            (status, err["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{err}"
        );
        assert_eq!(image(&h, name).await, before);
    }
}
