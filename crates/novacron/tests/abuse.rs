//! Limits that hold against abusive clients, on the real server over TLS:
//! slow request heads are cut off, one address cannot take every
//! connection, and oversized heads are refused. (Body, watch and console
//! limits are in the server's in-process tests.)
#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness code: panics are failures

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS connection to the server from `source`.
async fn connect(
    c: &Cluster,
    source: &str,
) -> std::io::Result<novacron_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let addr: SocketAddr = c.url.trim_start_matches("https://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let tcp = socket.connect(addr).await?;
    let ca = std::fs::read_to_string(c.ca_path()).unwrap();
    let config = Arc::new(novacron_tls::client_config(&ca, None).unwrap());
    let name = novacron_tls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    novacron_tls::tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Reads until the server closes; what it sent, or None if it did not close within `within`.
async fn closed_within(
    conn: &mut novacron_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_greedy_clients_cannot_exhaust_the_server() {
    // 16 connections in all, 4 from one address.
    let c = Cluster::start(Options {
        agents: 0,
        max_connections: Some(16),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    // Four slowloris connections from an address of their own (the
    // harness's client keeps connections from 127.0.0.1 open, which count
    // too): a request head never finished.
    const SLOW: &str = "127.0.0.3";
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut conn = connect(&c, SLOW).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .unwrap();
        conn.flush().await.unwrap();
        slow.push(conn);
    }
    // A fifth from the same address is closed at once.
    let fifth = connect(&c, SLOW).await;
    if let Ok(mut conn) = fifth {
        let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let answer = closed_within(&mut conn, Duration::from_secs(3)).await;
        assert_eq!(
            answer.as_deref(),
            Some(""),
            "a fifth connection from one address was served"
        );
    }
    // Another address is served meanwhile.
    let from = |address: &str| {
        reqwest::Client::builder()
            .use_preconfigured_tls(
                novacron_tls::client_config(&std::fs::read_to_string(c.ca_path()).unwrap(), None).unwrap(),
            )
            .local_address(address.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let resp = from("127.0.0.2")
        .get(format!("{}/healthz", c.url))
        .send()
        .await
        .expect("served");
    assert_eq!(resp.status(), 200);
    // The slow heads are cut off after the 30 s head deadline.
    let deadline = novacron_api::SERVER_IDLE_TIMEOUT;
    for conn in &mut slow {
        let left = (deadline + Duration::from_secs(5)).saturating_sub(started.elapsed());
        let answer = closed_within(conn, left).await;
        assert!(
            answer.is_some(),
            "a slow request head kept its connection past {deadline:?} + 5 s"
        );
    }
    let cut_after = started.elapsed();
    assert!(
        cut_after >= deadline - Duration::from_secs(1),
        "cut after {cut_after:?}"
    );
    eprintln!("slow request heads cut off after {} ms", cut_after.as_millis());
    // Then that address is served again.
    let resp = from(SLOW)
        .get(format!("{}/healthz", c.url))
        .send()
        .await
        .expect("served again");
    assert_eq!(resp.status(), 200);

    // A request head over 64 KiB, or with too many headers, is refused.
    let big = "x".repeat(100 << 10);
    let resp = c
        .http()
        .get(format!("{}/healthz", c.url))
        .header("X-Big", big)
        .send()
        .await;
    assert_eq!(resp.map(|r| r.status().as_u16()).ok(), Some(431));
    let mut many = reqwest::header::HeaderMap::new();
    for i in 0..150 {
        many.insert(
            reqwest::header::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "1".parse().unwrap(),
        );
    }
    let resp = c.http().get(format!("{}/healthz", c.url)).headers(many).send().await;
    assert_eq!(resp.map(|r| r.status().as_u16()).ok(), Some(431));
}
