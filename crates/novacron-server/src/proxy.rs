//! Calls from the server to a node agent: console log streaming and the
//! interactive serial console (WebSocket bridged to WebSocket).

use axum::body::Body;
use axum::extract::ws::{Message as AxMessage, WebSocket};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use novacron_api::agent::PlanRequest;
use novacron_api::{Node, Vm, AGENT_SECRET_HEADER};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as TMessage;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

type Upstream = tokio_tungstenite::WebSocketStream<Box<dyn novacron_tls::AsyncIo>>;

fn agent_url(node: &Node, vm: &Vm, what: &str) -> String {
    format!(
        "{}/agent/v1/vms/{}/{what}",
        node.spec.address.trim_end_matches('/'),
        vm.metadata.id
    )
}

fn unreachable(node: &Node, e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("Node {:?} is unreachable: {e}", node.metadata.name))
}

pub async fn logs(state: &AppState, node: &Node, vm: &Vm, follow: bool) -> ApiResult<Response> {
    let resp = state
        .agents
        .get(agent_url(node, vm, "logs"))
        .query(&[("follow", follow)])
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        .send()
        .await
        .map_err(|e| unreachable(node, e))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(ApiError::not_found(format!("console log of VM {:?}", vm.metadata.name)));
    }
    if !resp.status().is_success() {
        return Err(unreachable(node, format!("agent answered {}", resp.status())));
    }
    let body = Body::from_stream(resp.bytes_stream());
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// Runs a command in the VM's guest (`/agent/v1/vms/{id}/exec`).
pub async fn exec(
    state: &AppState,
    node: &Node,
    vm: &Vm,
    req: &novacron_api::ExecRequest,
) -> ApiResult<novacron_api::ExecResult> {
    let resp = state
        .agents
        .post(agent_url(node, vm, "exec"))
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        .timeout(req.timeout() + std::time::Duration::from_secs(15))
        .json(req)
        .send()
        .await
        .map_err(|e| unreachable(node, e))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| unreachable(node, e))?;
    if !status.is_success() {
        return Err(refused_by_agent(status, &text));
    }
    serde_json::from_str(&text).map_err(|e| ApiError::bad_gateway(format!("bad exec result from the agent: {e}")))
}

/// Sends a call to the agent of `node`: its answer when it succeeded, else
/// the refusal (see [`refused_by_agent`]) or the node unreachable.
async fn answer(node: &Node, req: reqwest::RequestBuilder) -> ApiResult<reqwest::Response> {
    let resp = req.send().await.map_err(|e| unreachable(node, e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(refused_by_agent(status, &text))
}

/// What the server answers when an agent refused a call about a VM: the
/// VM's state is wrong (409), the call took too long (504), or the agent
/// failed (502); with the agent's own message.
fn refused_by_agent(status: reqwest::StatusCode, body: &str) -> ApiError {
    let why = novacron_api::error::message_of(body);
    match status {
        reqwest::StatusCode::CONFLICT | reqwest::StatusCode::NOT_FOUND => ApiError::conflict(why),
        reqwest::StatusCode::GATEWAY_TIMEOUT => ApiError::gateway_timeout(why),
        s => ApiError::bad_gateway(format!("agent answered {s}: {why}")),
    }
}

/// A snapshot call (`snapshots` or `snapshots/NAME[/revert]` under the VM)
/// to the VM's agent, with its JSON answer. The agent's 404 (no such
/// snapshot) stays a 404, its 409 (the VM is running or busy) a 409.
pub async fn snapshots<T: serde::de::DeserializeOwned>(
    state: &AppState,
    node: &Node,
    vm: &Vm,
    method: reqwest::Method,
    what: &str,
    body: Option<&novacron_api::CreateSnapshot>,
) -> ApiResult<T> {
    let mut req = state
        .agents
        .request(method, agent_url(node, vm, what))
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        // Deleting a snapshot merges its layer into its children: minutes for a large disk.
        .timeout(std::time::Duration::from_secs(1800));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| unreachable(node, e))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| unreachable(node, e))?;
    match status {
        s if s.is_success() => serde_json::from_str(&text)
            .map_err(|e| ApiError::bad_gateway(format!("bad snapshot answer from the agent: {e}"))),
        reqwest::StatusCode::NOT_FOUND => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            novacron_api::error::message_of(&text),
        )),
        reqwest::StatusCode::UNPROCESSABLE_ENTITY => {
            Err(ApiError::invalid("name", novacron_api::error::message_of(&text)))
        }
        s => Err(refused_by_agent(s, &text)),
    }
}

/// Asks the VM's agent for a backup; its answer streams the backup's
/// progress (newline-delimited `BackupEvent`s). No timeout: a backup of a
/// large disk takes as long as reading it.
pub async fn backup(
    state: &AppState,
    node: &Node,
    vm: &Vm,
    body: &novacron_api::agent::BackupRequest,
) -> ApiResult<reqwest::Response> {
    let req = state
        .agents
        .post(agent_url(node, vm, "backups"))
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        .json(body);
    answer(node, req).await
}

/// A stopped VM's root disk, flattened by its agent, as a byte stream.
pub async fn root_image(state: &AppState, node: &Node, vm: &Vm) -> ApiResult<reqwest::Response> {
    let req = state
        .agents
        .get(agent_url(node, vm, "root-image"))
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref());
    answer(node, req).await
}

/// The counters of the VMs running on `node`, for the metrics.
pub async fn vm_stats(state: &AppState, node: &Node) -> ApiResult<Vec<novacron_api::agent::VmStats>> {
    let url = format!("{}/agent/v1/vm-stats", node.spec.address.trim_end_matches('/'));
    let resp = state
        .agents
        .get(url)
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        .timeout(std::time::Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| unreachable(node, e))?;
    if !resp.status().is_success() {
        return Err(unreachable(node, format!("agent answered {}", resp.status())));
    }
    resp.json()
        .await
        .map_err(|e| unreachable(node, format!("bad VM stats: {e}")))
}

/// Asks the source agent to predict a migration (`/agent/v1/plan`).
pub async fn plan(state: &AppState, node: &Node, body: &PlanRequest) -> ApiResult<novacron_api::MigrationPlan> {
    let url = format!("{}/agent/v1/plan", node.spec.address.trim_end_matches('/'));
    let resp = state
        .agents
        .post(url)
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref())
        .timeout(std::time::Duration::from_secs(60))
        .json(body)
        .send()
        .await
        .map_err(|e| unreachable(node, e))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| unreachable(node, e))?;
    let why = || novacron_api::error::message_of(&text);
    if status.is_client_error() {
        return Err(ApiError::conflict(format!("Cannot plan the migration: {}", why())));
    }
    if !status.is_success() {
        return Err(unreachable(node, format!("agent answered {status}: {}", why())));
    }
    serde_json::from_str(&text).map_err(|e| unreachable(node, format!("bad plan from the agent: {e}")))
}

pub async fn connect_console(state: &AppState, node: &Node, vm: &Vm) -> ApiResult<Upstream> {
    let http_url = agent_url(node, vm, "console");
    let url = reqwest::Url::parse(&http_url).map_err(|e| unreachable(node, e))?;
    let mut req = http_url
        .replacen("http", "ws", 1)
        .into_client_request()
        .map_err(|e| unreachable(node, e))?;
    let secret = state.agent_secret.parse().map_err(|e| unreachable(node, e))?;
    req.headers_mut().insert(AGENT_SECRET_HEADER, secret);
    let connect = novacron_tls::connect_url(&url, state.tls.as_ref().map(|t| t.agent_client.clone()));
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| unreachable(node, "connection timed out"))?
        .map_err(|e| unreachable(node, e))?;
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| unreachable(node, e))?;
    Ok(ws)
}

/// Copies frames both ways until either side closes.
pub async fn pump_console(client: WebSocket, upstream: Upstream) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let to_agent = async {
        while let Some(Ok(msg)) = client_rx.next().await {
            let out = match msg {
                AxMessage::Binary(b) => TMessage::Binary(b),
                AxMessage::Text(t) => TMessage::Binary(bytes::Bytes::copy_from_slice(t.as_bytes())),
                AxMessage::Close(_) => break,
                _ => continue,
            };
            if up_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = up_tx.close().await;
    };
    let to_client = async {
        while let Some(Ok(msg)) = up_rx.next().await {
            let out = match msg {
                TMessage::Binary(b) => AxMessage::Binary(b),
                TMessage::Text(t) => AxMessage::Binary(bytes::Bytes::copy_from_slice(t.as_bytes())),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if client_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = client_tx.close().await;
    };
    tokio::select! {
        _ = to_agent => {}
        _ = to_client => {}
    }
}

/// Asks the agent of `node` to delete the detached volume `id` from its pool.
pub async fn delete_volume(state: &AppState, node: &Node, id: &str) -> ApiResult<()> {
    let url = format!("{}/agent/v1/volumes/{id}", node.spec.address.trim_end_matches('/'));
    let req = state
        .agents
        .delete(url)
        .header(AGENT_SECRET_HEADER, state.agent_secret.as_ref());
    answer(node, req).await.map(drop)
}
