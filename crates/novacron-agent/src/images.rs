//! Local cache of image files, fetched from the server and verified by
//! SHA-256. Files are content-addressed, so one copy serves every VM.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use novacron_api::{Image, ImagePart};
use novacron_client::{Client, ClientError};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Image {image:?} has no {part} file")]
    MissingPart { image: String, part: &'static str },
    #[error("Cannot download image file")]
    Download(#[from] ClientError),
    #[error("Downloaded file has checksum {actual}, expected {expected}")]
    Checksum { expected: String, actual: String },
    #[error("Cannot write image cache {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct ImageCache {
    root: PathBuf,
}

impl ImageCache {
    pub fn new(root: PathBuf) -> Self {
        ImageCache { root }
    }

    /// Path of the cached file for `part`, downloading it first if needed.
    pub async fn ensure(&self, client: &Client, image: &Image, part: ImagePart) -> Result<PathBuf, CacheError> {
        let file = image.file(part).ok_or_else(|| CacheError::MissingPart {
            image: image.metadata.name.clone(),
            part: part.as_str(),
        })?;
        let path = self.root.join(&file.sha256);
        if path.exists() {
            return Ok(path);
        }
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| CacheError::Io { path: p, source }
        };
        tokio::fs::create_dir_all(&self.root).await.map_err(io(&self.root))?;
        let partial = self.root.join(format!("{}.partial", file.sha256));
        let result = async {
            let mut out = tokio::fs::File::create(&partial).await.map_err(io(&partial))?;
            let mut stream = client.download_image_part(&image.metadata.name, part).await?;
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                out.write_all(&chunk).await.map_err(io(&partial))?;
            }
            out.sync_all().await.map_err(io(&partial))?;
            let actual = hex::encode(hasher.finalize());
            if actual != file.sha256 {
                return Err(CacheError::Checksum {
                    expected: file.sha256.clone(),
                    actual,
                });
            }
            tokio::fs::rename(&partial, &path).await.map_err(io(&path))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result?;
        tracing::info!(image = %image.metadata.name, part = part.as_str(), "cached image file");
        Ok(path)
    }
}
