//! Files fetched from another node's agent (a stopped VM's disks in a cold
//! migration, a detached volume for a VM here), written whole or not at all.

use std::path::Path;

use futures::StreamExt;
use novacron_api::AGENT_SECRET_HEADER;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {message}")]
    Peer { url: String, message: String },
    #[error("Cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Streams `url` from a peer agent into `dest`, through `dest.partial`
/// (removed on failure), so `dest` exists only once complete.
pub async fn download(http: &reqwest::Client, url: &str, secret: &str, dest: &Path) -> Result<u64, FetchError> {
    let peer = |message: String| FetchError::Peer {
        url: url.to_string(),
        message,
    };
    let resp = http
        .get(url)
        .header(AGENT_SECRET_HEADER, secret)
        .send()
        .await
        .map_err(|e| peer(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(peer(format!(
            "answered {status}: {}",
            novacron_api::error::message_of(&body)
        )));
    }
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    let partial = std::path::PathBuf::from(name);
    let io = |source| FetchError::Io {
        path: partial.display().to_string(),
        source,
    };
    let result = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut stream = resp.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| peer(e.to_string()))?;
            file.write_all(&chunk).await.map_err(io)?;
            written += chunk.len() as u64;
        }
        file.sync_all().await.map_err(io)?;
        std::fs::rename(&partial, dest).map_err(io)?;
        Ok(written)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}
