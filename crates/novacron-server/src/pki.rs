//! The cluster's certificates at run time: node certificates issued with a
//! lifetime and renewed, revoked ones published, the CA rotated. What every
//! party must trust is one object, [`ClusterTrust`] `cluster`: the server
//! applies it to its own listener and client, agents watch it and apply it
//! to theirs, so a revocation reaches every TLS endpoint without restarts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use novacron_api::{ClusterTrust, IssuedCert, Metadata, NodeCredential, RevokedCert, CLUSTER_TRUST};
use novacron_store::{SharedStore, StoreExt};
use novacron_tls::{ClientAuth, ClusterCa, Identity, LiveTls, TlsError, TrustSet};
use parking_lot::Mutex;

use crate::auth::AuthIndex;
use crate::error::{ApiError, ApiResult};

/// The server's TLS material.
pub struct ServerTls {
    ca: Mutex<ClusterCa>,
    /// What the API listener presents (a given certificate, or one from the
    /// cluster CA) and whose client certificates it accepts.
    pub listener_tls: Arc<LiveTls>,
    /// What the server presents to agents when it calls them.
    pub agent_tls: Arc<LiveTls>,
    pub listener: Arc<novacron_tls::rustls::ServerConfig>,
    pub agent_client: Arc<novacron_tls::rustls::ClientConfig>,
    /// How long a node certificate is valid.
    pub node_cert_lifetime: Duration,
    /// Names the server's own certificate is issued for.
    server_names: Vec<String>,
    /// Whether the listener serves a certificate given by the operator
    /// (which a CA rotation leaves alone).
    given_cert: bool,
    /// Serialises changes of credentials and trust.
    changes: tokio::sync::Mutex<()>,
}

impl ServerTls {
    pub fn new(
        pki_dir: &Path,
        given: Option<Identity>,
        server_names: Vec<String>,
        node_cert_lifetime: Duration,
    ) -> Result<ServerTls, TlsError> {
        let ca = ClusterCa::load_or_create(pki_dir)?;
        let generated = ca.issue("novacron-server", &server_names, None)?;
        let trust = TrustSet {
            ca_pem: ca.trusted_pem(),
            revoked: Default::default(),
        };
        let given_cert = given.is_some();
        let listener_tls = LiveTls::new(given.unwrap_or_else(|| generated.clone()), trust.clone(), None)?;
        let agent_tls = LiveTls::new(generated, trust, None)?;
        // HTTP/2 for the API: a browser's dashboard holds several watch
        // streams open, and over HTTP/1.1 a browser opens at most six
        // connections to a host, so a seventh request would wait. (Clients
        // that offer only HTTP/1.1, the agents' among them, get it.)
        let mut listener = (*listener_tls.server_config(ClientAuth::Optional)?).clone();
        listener.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            listener: Arc::new(listener),
            agent_client: Arc::new(agent_tls.client_config()?),
            listener_tls,
            agent_tls,
            ca: Mutex::new(ca),
            node_cert_lifetime,
            server_names,
            given_cert,
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// Every CA to trust (PEM).
    pub fn trusted_pem(&self) -> String {
        self.ca.lock().trusted_pem()
    }

    /// Makes the stored trust agree with the CA and the revocations, drops
    /// revocations of certificates that have expired, and applies it here.
    pub async fn sync_trust(&self, store: &SharedStore) -> ApiResult<ClusterTrust> {
        let _changing = self.changes.lock().await;
        self.publish(store, Vec::new()).await
    }

    /// Writes the trust with `newly_revoked` added. Callers hold `changes`.
    async fn publish(&self, store: &SharedStore, newly_revoked: Vec<RevokedCert>) -> ApiResult<ClusterTrust> {
        let (issuer_pem, ca_pem, rotating) = {
            let ca = self.ca.lock();
            (ca.cert_pem.clone(), ca.trusted_pem(), ca.rotating())
        };
        let now = Utc::now();
        let current = store.get_obj::<ClusterTrust>(CLUSTER_TRUST).await?;
        let rotation_started = match (rotating, current.as_ref().and_then(|t| t.rotation_started)) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
        let mut revoked: Vec<RevokedCert> = current.as_ref().map(|t| t.revoked.clone()).unwrap_or_default();
        revoked.extend(newly_revoked);
        revoked.retain(|r| r.not_after.is_none_or(|t| t > now));
        revoked.dedup_by(|a, b| a.cert_sha256 == b.cert_sha256);
        let trust = match current {
            Some(t)
                if t.issuer_pem == issuer_pem
                    && t.ca_pem == ca_pem
                    && t.revoked == revoked
                    && t.rotation_started == rotation_started =>
            {
                t
            }
            Some(_) => {
                store
                    .modify::<ClusterTrust, _>(CLUSTER_TRUST, |t| {
                        t.issuer_pem = issuer_pem.clone();
                        t.ca_pem = ca_pem.clone();
                        t.revoked = revoked.clone();
                        t.rotation_started = rotation_started;
                        true
                    })
                    .await?
            }
            None => {
                store
                    .create_obj(&ClusterTrust {
                        metadata: Metadata::new(CLUSTER_TRUST, Default::default()),
                        issuer_pem,
                        ca_pem,
                        revoked,
                        rotation_started,
                    })
                    .await?
            }
        };
        let set = trust_set(&trust);
        for live in [&self.listener_tls, &self.agent_tls] {
            live.set_trust(set.clone())
                .map_err(|e| ApiError::internal("Cannot apply the cluster trust", &e))?;
        }
        Ok(trust)
    }

    /// Issues a certificate to node `name` for `hosts` and makes it the
    /// node's credential. A re-join revokes what the node had; a renewal
    /// keeps the certificate it replaces valid until that one expires.
    pub async fn issue_node_cert(
        &self,
        store: &SharedStore,
        auth: &AuthIndex,
        name: &str,
        hosts: Vec<String>,
        renewal: bool,
    ) -> ApiResult<(Identity, String)> {
        let _changing = self.changes.lock().await;
        let (identity, trusted) = {
            let ca = self.ca.lock();
            let identity = ca
                .issue(&format!("node:{name}"), &hosts, Some(self.node_cert_lifetime))
                .map_err(|e| ApiError::internal("Cannot issue the node certificate", &e))?;
            (identity, ca.trusted_pem())
        };
        let cert_sha256 = identity
            .fingerprint()
            .map_err(|e| ApiError::internal("Cannot read the node certificate", &e))?;
        let not_after = not_after(&identity)?;
        let old = store.get_obj::<NodeCredential>(name).await?;
        let credential = NodeCredential {
            metadata: Metadata::new(name, Default::default()),
            cert_sha256,
            not_after,
            hosts,
            issued_at: Some(Utc::now()),
            previous: None,
        };
        let credential = match (old, renewal) {
            (Some(old), true) => {
                let previous = Some(IssuedCert {
                    cert_sha256: old.cert_sha256.clone(),
                    not_after: old.not_after,
                });
                store
                    .modify::<NodeCredential, _>(name, |c| {
                        c.cert_sha256 = credential.cert_sha256.clone();
                        c.not_after = credential.not_after;
                        c.issued_at = credential.issued_at;
                        c.previous = previous.clone();
                        true
                    })
                    .await?
            }
            (Some(old), false) => {
                store.delete_obj::<NodeCredential>(name, None).await?;
                let created = store.create_obj(&credential).await?;
                self.publish(store, revocations(&old)).await?;
                created
            }
            (None, true) => return Err(ApiError::not_found(format!("credential of node {name:?}"))),
            (None, false) => store.create_obj(&credential).await?,
        };
        auth.set_credential(&credential);
        Ok((identity, trusted))
    }

    /// Locks node `name` out: its certificates stop working at the server
    /// now, and at every agent once they see the published trust.
    pub async fn revoke_node(&self, store: &SharedStore, auth: &AuthIndex, name: &str) -> ApiResult<Vec<RevokedCert>> {
        let _changing = self.changes.lock().await;
        let credential = store
            .get_obj::<NodeCredential>(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("credential of node {name:?}")))?;
        store.delete_obj::<NodeCredential>(name, None).await?;
        auth.remove_credential(name);
        let revoked = revocations(&credential);
        self.publish(store, revoked.clone()).await?;
        Ok(revoked)
    }

    /// Makes a new CA the issuer, trusting both until the rotation is
    /// finished. A server certificate from the cluster CA is re-issued from
    /// the new one.
    pub async fn rotate_ca(&self, store: &SharedStore) -> ApiResult<ClusterTrust> {
        self.change_ca(store, ClusterCa::rotate).await
    }

    /// Stops trusting the previous CA. The server's certificate is re-issued
    /// without the cross-signed CA, which chains to a CA no longer trusted.
    pub async fn finish_ca_rotation(&self, store: &SharedStore) -> ApiResult<ClusterTrust> {
        self.change_ca(store, ClusterCa::finish_rotation).await
    }

    /// Changes the CA, re-issues the server's own certificate from it,
    /// publishes the trust and presents the new certificate.
    async fn change_ca(
        &self,
        store: &SharedStore,
        change: fn(&mut ClusterCa) -> Result<(), TlsError>,
    ) -> ApiResult<ClusterTrust> {
        let _changing = self.changes.lock().await;
        let generated = {
            let mut ca = self.ca.lock();
            change(&mut ca).map_err(rotation_error)?;
            ca.issue("novacron-server", &self.server_names, None)
                .map_err(|e| ApiError::internal("Cannot issue the server certificate", &e))?
        };
        let trust = self.publish(store, Vec::new()).await?;
        let present = |live: &LiveTls| {
            live.set_identity(generated.clone())
                .map_err(|e| ApiError::internal("Cannot use the new server certificate", &e))
        };
        if !self.given_cert {
            present(&self.listener_tls)?;
        }
        present(&self.agent_tls)?;
        Ok(trust)
    }
}

fn rotation_error(e: TlsError) -> ApiError {
    match e {
        TlsError::Rotation(why) => ApiError::conflict(why),
        other => ApiError::internal("The CA rotation failed", &other),
    }
}

/// The trust an agent or the server applies.
pub fn trust_set(trust: &ClusterTrust) -> TrustSet {
    TrustSet {
        ca_pem: trust.ca_pem.clone(),
        revoked: trust.revoked.iter().map(|r| r.cert_sha256.clone()).collect(),
    }
}

fn revocations(c: &NodeCredential) -> Vec<RevokedCert> {
    let now = Utc::now();
    let revoked = |cert_sha256: &str, not_after| RevokedCert {
        cert_sha256: cert_sha256.to_string(),
        node: c.metadata.name.clone(),
        not_after,
        revoked_at: now,
    };
    let mut out = vec![revoked(&c.cert_sha256, c.not_after)];
    if let Some(p) = &c.previous {
        out.push(revoked(&p.cert_sha256, p.not_after));
    }
    out
}

fn not_after(identity: &Identity) -> ApiResult<Option<DateTime<Utc>>> {
    let (_, until) = identity
        .validity()
        .map_err(|e| ApiError::internal("Cannot read the node certificate", &e))?;
    let secs = until
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| ApiError::internal("The node certificate expires before 1970", &e))?
        .as_secs();
    Ok(DateTime::from_timestamp(secs as i64, 0))
}
