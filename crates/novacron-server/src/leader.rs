//! Which server runs the controllers. Every server serves the API; placement,
//! node liveness, backup schedules, events and webhooks run on one at a time.
//! On an embedded store there is one server and it always leads. On etcd the
//! servers campaign in an etcd election under a lease: the winner runs the
//! controllers while it keeps renewing the lease, and stops them before the
//! lease can have expired, so a new leader (elected only once etcd dropped
//! the old lease) never works beside it. Controllers write with
//! compare-and-swap, so a pass cut short is redone by the next leader, not
//! doubled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use novacron_store::etcd_client::{self, LeaseKeeper};
use novacron_store::EtcdStore;
use tokio::time::Instant;

use crate::AppState;

/// Lease time to live: a dead leader's controllers are taken over this long
/// after its last renewal (plus an election).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_millis(1000);
/// A leader that could not renew for this long steps down, safely before the
/// lease expires in etcd.
const STEP_DOWN_AFTER: Duration = Duration::from_millis(3500);

/// This server's part in the election.
pub struct Leadership {
    /// Set when the store is shared.
    etcd: Option<Arc<EtcdStore>>,
    /// What this server campaigns as (shown to clients as the leader).
    pub id: String,
    leading: AtomicBool,
}

impl Leadership {
    pub fn new(etcd: Option<Arc<EtcdStore>>, id: String) -> Leadership {
        Leadership {
            leading: AtomicBool::new(etcd.is_none()),
            etcd,
            id,
        }
    }

    /// The store the servers share (etcd), if they do.
    pub fn etcd(&self) -> Option<&Arc<EtcdStore>> {
        self.etcd.as_ref()
    }

    /// Whether this server runs the controllers now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }
}

fn election_name(etcd: &EtcdStore) -> String {
    format!("{}/leader", etcd.root())
}

/// Runs the controllers whenever this server leads, until the task is aborted.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(etcd) = state.leadership.etcd.clone() else {
            let mut controllers = crate::controllers::spawn(state);
            // One-shot tasks end; the loops run until the server stops.
            while controllers.join_next().await.is_some() {}
            std::future::pending::<()>().await;
            return;
        };
        loop {
            if let Err(e) = lead_once(&state, &etcd).await {
                // Whatever failed, the next campaign goes to another member.
                etcd.use_next_member();
                tracing::warn!(error = %e, server = %state.leadership.id, "leader election failed; campaigning again");
            }
            state.leadership.leading.store(false, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Campaigns, leads while the lease holds, and returns when it does not.
async fn lead_once(state: &AppState, etcd: &EtcdStore) -> Result<(), etcd_client::Error> {
    let mut leases = etcd.client().lease_client();
    let lease = leases.grant(LEASE_TTL.as_secs() as i64, None).await?.id();
    let (mut keeper, mut renewals) = leases.keep_alive(lease).await?;
    let mut renewed = Instant::now();
    let name = election_name(etcd);
    // A campaign waits for as long as another server leads: without a
    // request deadline (see `EtcdStore::patient_client`), renewing the lease
    // meanwhile. Once won, the win is checked against what etcd says leads.
    let mut elections = etcd.patient_client().election_client();
    let campaigned: Result<etcd_client::LeaderKey, etcd_client::Error> = async {
        let campaign = elections.campaign(name.clone(), state.leadership.id.clone(), lease);
        tokio::pin!(campaign);
        let mut won = loop {
            tokio::select! {
                won = &mut campaign => break won?,
                kept = renew(&mut keeper, &mut renewals, &mut renewed) => kept?,
            }
        };
        let key = won
            .take_leader()
            .ok_or_else(|| etcd_client::Error::ElectError("a campaign won without a leader key".into()))?;
        let leading = etcd.client().election_client().leader(name.clone()).await?;
        match leading.kv() {
            Some(kv) if kv.key() == key.key() => Ok(key),
            other => Err(etcd_client::Error::ElectError(format!(
                "won a campaign, but etcd names {:?} the leader",
                other.map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            ))),
        }
    }
    .await;
    let leader_key = match campaigned {
        Ok(key) => key,
        Err(e) => {
            // Out of the line now, so a dead candidate's key cannot be
            // elected while no one acts on it.
            let _ = leases.revoke(lease).await;
            return Err(e);
        }
    };
    tracing::info!(server = %state.leadership.id, "elected leader; starting the controllers");
    state.leadership.leading.store(true, Ordering::Release);
    let mut controllers = crate::controllers::spawn(state.clone());
    let lost = loop {
        if let Err(e) = renew(&mut keeper, &mut renewals, &mut renewed).await {
            break e;
        }
    };
    // Stop acting first, then tell.
    controllers.abort_all();
    state.leadership.leading.store(false, Ordering::Release);
    tracing::warn!(server = %state.leadership.id, error = %lost, "lost the leader lease; stopped the controllers");
    let _ = etcd
        .client()
        .election_client()
        .resign(Some(etcd_client::ResignOptions::new().with_leader(leader_key)))
        .await;
    let _ = leases.revoke(lease).await;
    Ok(())
}

/// Renews the lease once (after [`RENEW_EVERY`]); fails when etcd says the
/// lease is gone or when it has not been renewed for [`STEP_DOWN_AFTER`].
async fn renew(
    keeper: &mut LeaseKeeper,
    renewals: &mut etcd_client::LeaseKeepAliveStream,
    renewed: &mut Instant,
) -> Result<(), etcd_client::Error> {
    let deadline = *renewed + STEP_DOWN_AFTER;
    tokio::time::sleep(RENEW_EVERY).await;
    // etcd's deadline runs from when it renewed, which is after this.
    let sent = Instant::now();
    let attempt = async {
        keeper.keep_alive().await?;
        match renewals.message().await? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            Some(_) => Err(etcd_client::Error::LeaseKeepAliveError("the lease expired".into())),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the renewal stream ended".into(),
            )),
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(())) => {
            *renewed = sent;
            Ok(())
        }
        Ok(Err(e)) if Instant::now() < deadline => {
            // One failed renewal is not yet a lost lease.
            tracing::debug!(error = %e, "lease renewal failed; retrying");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(etcd_client::Error::LeaseKeepAliveError(format!(
            "not renewed for {STEP_DOWN_AFTER:?}"
        ))),
    }
}
