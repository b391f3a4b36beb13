//! Calls to the other agent of a migration: the calls that drive it, the
//! health checks meanwhile, and the opening of a DWCP session to it.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use novacron_api::agent::DwcpEndpoint;
use novacron_api::{Node, AGENT_SECRET_HEADER};
use novacron_dwcp::Sender;

use crate::dwcp::PeerError;
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use super::{MigrationError, Migrations, REPORT_EVERY, TARGET_CALL_TIMEOUT};

/// How often a migration's driving connection to the target is used while
/// nothing else uses it: well within the pool's idle timeout.
const KEEP_WARM_EVERY: Duration = Duration::from_secs(novacron_api::POOL_IDLE_TIMEOUT.as_secs() / 3);

impl Migrations {
    pub(super) async fn check_target_alive(&self, target: &Node) -> Result<(), MigrationError> {
        target_alive(&self.http, target).await
    }

    /// Checks every `REPORT_EVERY`, in the background, that the target's agent
    /// answers: a dead one could not finish the switchover, and stopping then
    /// also makes the target QEMU exit (its incoming stream fails). The loops that
    /// wait for QEMU must not wait on the network, or they see its end late
    /// and the guest stays paused for it.
    ///
    /// Meanwhile it keeps the connection of the calls that drive the migration
    /// open: idle longer than the pool allows (a long pre-copy), it would be
    /// gone at the switchover, whose call would then wait for a TCP and a TLS
    /// handshake — two more round trips of the guest's pause.
    pub(super) fn watch_target(&self, target: &Node) -> TargetWatch {
        let (http, drive, target) = (self.watch_http.clone(), self.http.clone(), target.clone());
        let failure = Arc::new(Mutex::new(None));
        let found = failure.clone();
        let warm_target = target.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REPORT_EVERY).await;
                if let Err(e) = target_alive(&http, &target).await {
                    *found.lock() = Some(e);
                    return;
                }
            }
        });
        let warming = Arc::new(tokio::sync::Mutex::new(()));
        let turn = warming.clone();
        let warm = tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEP_WARM_EVERY).await;
                let _turn = turn.lock().await;
                // Failures are the health check's to report.
                let _ = target_alive(&drive, &warm_target).await;
            }
        });
        TargetWatch {
            failure,
            _task: AbortOnDropHandle::new(task),
            warming,
            warm: AbortOnDropHandle::new(warm),
        }
    }

    /// Calls `what` of `migration_id` on the target agent with `body`.
    pub(super) async fn target_call<R: for<'de> Deserialize<'de>>(
        &self,
        target: &Node,
        what: &str,
        migration_id: &str,
        body: &impl Serialize,
    ) -> Result<R, MigrationError> {
        let secret = self.node.agent_secret();
        let url = format!(
            "{}/agent/v1/migrations/{migration_id}/{what}",
            target.spec.address.trim_end_matches('/')
        );
        let resp = self
            .http
            .post(&url)
            .header(AGENT_SECRET_HEADER, secret)
            .timeout(TARGET_CALL_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| MigrationError::Target(format!("{what}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| MigrationError::Target(format!("{what}: reading the answer: {e}")))?;
        if !status.is_success() {
            let why = novacron_api::error::message_of(&text);
            return Err(MigrationError::Target(format!("{what} answered {status}: {why}")));
        }
        serde_json::from_str(&text).map_err(|e| MigrationError::Target(format!("{what}: bad answer: {e}")))
    }

    /// Opens a DWCP session to the target agent (asking it for its DWCP port).
    pub(super) async fn open_dwcp(
        &self,
        target: &Node,
        session: &str,
        bandwidth_mib_s: Option<u64>,
    ) -> Result<Arc<Sender>, PeerError> {
        let Some(d) = &self.dwcp else {
            return Err(PeerError::NoCertificate);
        };
        if let Some(port) = target.status.dwcp_port {
            return d
                .connect(target, port, session, bandwidth_mib_s.map(|b| b * 1024 * 1024))
                .await;
        }
        // An agent that registered without saying its port (an older one): ask.
        let secret = self.node.agent_secret();
        let url = format!("{}/agent/v1/dwcp", target.spec.address.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .header(AGENT_SECRET_HEADER, secret)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|source| PeerError::Ask {
                node: target.metadata.name.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(PeerError::NotOffered {
                node: target.metadata.name.clone(),
                status: resp.status().as_u16(),
            });
        }
        let ep: DwcpEndpoint = resp.json().await.map_err(|source| PeerError::Ask {
            node: target.metadata.name.clone(),
            source,
        })?;
        d.connect(target, ep.port, session, bandwidth_mib_s.map(|b| b * 1024 * 1024))
            .await
    }

    /// A failed DWCP session fails the migration now, with its reason (a dead
    /// target agent first: that is what the operator needs to know).
    pub(super) async fn check_session(
        &self,
        session: &Option<Arc<Sender>>,
        target: &Node,
    ) -> Result<(), MigrationError> {
        match session.as_ref().and_then(|s| s.error()) {
            Some(e) => {
                self.check_target_alive(target).await?;
                Err(MigrationError::Dwcp(e.to_string()))
            }
            None => Ok(()),
        }
    }
}

async fn target_alive(http: &reqwest::Client, target: &Node) -> Result<(), MigrationError> {
    let url = format!("{}/agent/v1/healthz", target.spec.address.trim_end_matches('/'));
    match http.get(&url).timeout(Duration::from_secs(2)).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(MigrationError::Target(format!(
            "agent health check answered {}",
            r.status()
        ))),
        Err(e) => Err(MigrationError::Target(format!(
            "agent on {} is unreachable: {e}",
            target.metadata.name
        ))),
    }
}

/// A background health check of a migration's target (see `watch_target`).
pub(super) struct TargetWatch {
    failure: Arc<Mutex<Option<MigrationError>>>,
    _task: AbortOnDropHandle<()>,
    /// Held while a keep-warm call is on the driving connection.
    warming: Arc<tokio::sync::Mutex<()>>,
    warm: AbortOnDropHandle<()>,
}

impl TargetWatch {
    /// The check's failure, once: the migration stops on it.
    pub(super) fn check(&self) -> Result<(), MigrationError> {
        match self.failure.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops keeping the driving connection warm, once a call on it has
    /// ended: the switchover's call then finds it idle in the pool instead of
    /// opening another beside it.
    pub(super) async fn hand_over_connection(&self) {
        let _turn = self.warming.lock().await;
        self.warm.abort();
    }
}
