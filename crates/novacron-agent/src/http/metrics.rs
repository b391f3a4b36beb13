//! The agent's own Prometheus metrics at `/metrics`: this node's running
//! VMs' counters (the same families the server serves, read here without
//! the server in the way, so scraping grows with the nodes) and what the
//! agent runs. A scrape is let in with the agent secret (the server), or
//! with a cluster token the server says has `metrics:read` for every
//! project (as the kubelet asks the API server about the tokens it is
//! given); the server's verdict on a token is kept for a while.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use novacron_api::error::chain;
use novacron_api::AGENT_SECRET_HEADER;
use novacron_metrics::{gauges, VmLabels, OPENMETRICS};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::{error, secret_matches, HttpState};
use crate::qemu::{LaunchSpec, VmDir};

/// How long the server's yes (or no) about a token holds here.
const ALLOWED_FOR: Duration = Duration::from_secs(30);
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Verdicts kept at most; past it they are all forgotten.
const MAX_VERDICTS: usize = 1024;

/// Whether a token may scrape, or why not.
type Verdict = Result<(), String>;

/// The server's verdicts on tokens, by the token's SHA-256, and when each was given.
#[derive(Default)]
pub struct Verdicts(Mutex<HashMap<[u8; 32], (Instant, Verdict)>>);

pub async fn scrape(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err((status, why)) = admit(&state, &headers).await {
        return error(status, why);
    }
    match encode(&state).await {
        Ok(body) => ([(CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Cannot encode the metrics: {e}"),
        ),
    }
}

async fn admit(state: &HttpState, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let secret = headers.get(AGENT_SECRET_HEADER).and_then(|v| v.to_str().ok());
    if secret.is_some() {
        let expected = state.secret.read().clone();
        return if secret_matches(expected.as_deref(), secret) {
            Ok(())
        } else {
            Err((StatusCode::UNAUTHORIZED, "Wrong agent secret".into()))
        };
    }
    let Some(token) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err((StatusCode::UNAUTHORIZED, "Missing bearer token".into()));
    };
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some((at, verdict)) = state.scrapers.0.lock().get(&key) {
        let holds = if verdict.is_ok() { ALLOWED_FOR } else { REFUSED_FOR };
        if at.elapsed() < holds {
            return verdict.clone().map_err(|why| (StatusCode::FORBIDDEN, why));
        }
    }
    let verdict = match state.node.client.whoami_of(token).await {
        Ok(me) if me.project.is_some() => Err(format!(
            "the metrics cover every project; this token is limited to {:?}",
            me.project.unwrap_or_default()
        )),
        Ok(me) if me.permissions.iter().any(|p| p == "metrics:read") => Ok(()),
        Ok(me) => Err(format!("role {:?} does not allow metrics:read", me.role)),
        Err(e) if e.status().is_some_and(|s| s == 401 || s == 403) => {
            return Err((StatusCode::UNAUTHORIZED, "The server does not know this token".into()))
        }
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot ask the server about a scraper's token");
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot check the token with the server".into(),
            ));
        }
    };
    let mut verdicts = state.scrapers.0.lock();
    if verdicts.len() >= MAX_VERDICTS {
        verdicts.clear();
    }
    verdicts.insert(key, (Instant::now(), verdict.clone()));
    verdict.map_err(|why| (StatusCode::FORBIDDEN, why))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    node: String,
    version: String,
    accel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

async fn encode(state: &HttpState) -> Result<String, std::fmt::Error> {
    let node = &state.node;
    let stats = crate::stats::collect(node).await;
    // Named as the VM was when it was launched here.
    let each: Vec<(VmLabels, &novacron_api::agent::VmStats)> = stats
        .iter()
        .map(|s| {
            let launched = std::fs::read(VmDir::new(&node.vms_root, &s.vm_id).launch_spec())
                .ok()
                .and_then(|b| serde_json::from_slice::<LaunchSpec>(&b).ok());
            let (vm, project) = launched.map(|l| (l.name, l.project)).unwrap_or_default();
            let labels = VmLabels {
                vm,
                project,
                node: node.name.clone(),
            };
            (labels, s)
        })
        .collect();
    let mut registry = Registry::default();
    gauges(
        &mut registry,
        "novacron_agent_info",
        "1, labelled with the agent's version and the accelerator its guests use",
        [(
            AgentLabels {
                node: node.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                accel: node.accel.clone(),
            },
            1.0,
        )],
    );
    gauges(
        &mut registry,
        "novacron_agent_vms_running",
        "QEMU processes running on the node",
        [(
            NodeLabels {
                node: node.name.clone(),
            },
            each.len() as f64,
        )],
    );
    novacron_metrics::register_vm_stats(&mut registry, &each);
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)?;
    Ok(body)
}
