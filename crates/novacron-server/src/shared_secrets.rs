//! Secrets every server of one cluster must hold alike — the agent secret and
//! the cluster CA — kept in a shared store (etcd) so that any server can
//! admit agents and sign their certificates. The first server to start puts
//! its own there; every later one takes them into its data directory before
//! it loads them, so the rest of the server reads files as it always did.
//! (In etcd they are as readable as any object: protect etcd as Kubernetes
//! protects its Secrets.)

use std::collections::BTreeMap;
use std::path::Path;

use novacron_store::{SharedStore, StoreError};

use crate::ServerError;

/// Raw store kind (no API route reads it) and the one object's name.
const KIND: &str = "server_secrets";
const NAME: &str = "cluster";
/// Files under the data directory, and whether they are private.
const FILES: [(&str, bool); 5] = [
    ("agent.secret", true),
    ("pki/ca.key", true),
    ("pki/ca.crt", false),
    ("pki/ca-cross.crt", false),
    ("pki/ca-previous.crt", false),
];

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

/// Makes this server's secret files the cluster's: takes the stored ones, or
/// stores this server's (made now if missing) when it is the first.
pub async fn share(store: &SharedStore, data_dir: &Path) -> Result<(), ServerError> {
    if let Some(rec) = store.get(KIND, NAME).await? {
        return write_files(data_dir, &rec.value);
    }
    crate::auth::load_or_create_agent_secret(data_dir)?;
    novacron_tls::ClusterCa::load_or_create(&data_dir.join("pki"))?;
    let id = uuid::Uuid::new_v4().to_string();
    match store.create(KIND, NAME, &id, read_files(data_dir)?).await {
        Ok(_) => {
            tracing::info!("stored this server's cluster CA and agent secret for the other servers");
            Ok(())
        }
        // Another server started at the same moment and won: take its.
        Err(StoreError::AlreadyExists { .. }) => match store.get(KIND, NAME).await? {
            Some(rec) => write_files(data_dir, &rec.value),
            None => Err(StoreError::Unexpected("the cluster's secrets vanished while being read".into()).into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// The secret files of the data directory, as stored.
fn read_files(data_dir: &Path) -> Result<serde_json::Value, ServerError> {
    let mut files = BTreeMap::new();
    for (name, _) in FILES {
        let path = data_dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                files.insert(name.to_string(), serde_json::Value::String(text));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(dir_err(&path)(e)),
        }
    }
    Ok(serde_json::json!(files))
}

/// After this server changed its CA (a rotation): the cluster's copy follows,
/// so servers that start from now on take the new CA.
pub async fn store_changed(store: &SharedStore, data_dir: &Path) -> Result<(), ServerError> {
    let files = read_files(data_dir)?;
    loop {
        let Some(current) = store.get(KIND, NAME).await? else {
            return Err(StoreError::Unexpected("the cluster's secrets are missing from the store".into()).into());
        };
        match store.update(KIND, NAME, current.rev, files.clone()).await {
            Err(StoreError::Conflict { .. }) => continue,
            other => return other.map(|_| ()).map_err(Into::into),
        }
    }
}

fn write_files(data_dir: &Path, value: &serde_json::Value) -> Result<(), ServerError> {
    let files = value
        .as_object()
        .ok_or_else(|| StoreError::Unexpected("the cluster's secrets are not an object".into()))?;
    std::fs::create_dir_all(data_dir.join("pki")).map_err(dir_err(data_dir))?;
    for (name, private) in FILES {
        let path = data_dir.join(name);
        let Some(text) = files.get(name) else {
            // Not in the cluster's set (no CA rotation going on, say).
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(dir_err(&path)(e)),
            }
            continue;
        };
        let text = text
            .as_str()
            .ok_or_else(|| StoreError::Unexpected(format!("the cluster's {name} is not text")))?;
        if private {
            novacron_tls::write_private(&path, text)?;
        } else {
            novacron_tls::write_public(&path, text)?;
        }
    }
    Ok(())
}
