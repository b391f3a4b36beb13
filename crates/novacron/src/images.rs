//! `novacron image import NAME --url URL --sha256 HEX`: the server
//! downloads the disk; the CLI shows its progress and, if it fails, removes
//! the image so nothing half-imported stays.

use anyhow::{bail, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::{CreateImage, DownloadImage, Image, ImageFormat, ImagePhase};
use novacron_client::Client;

use crate::commands::ImportOptions;

pub async fn import_url(
    c: &Client,
    name: &str,
    format: ImageFormat,
    req: DownloadImage,
    opts: ImportOptions,
) -> Result<Image> {
    if format == ImageFormat::Kernel {
        bail!("A kernel image has two files: import it with --kernel and --initrd");
    }
    req.validate()
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.field, e.message))?;
    c.create_image(&CreateImage {
        name: name.to_string(),
        project: opts.project,
        public: opts.public,
        format,
        labels: Default::default(),
        kernel_args: opts.kernel_args,
    })
    .await?;
    let started: Result<Image, _> = c.post_json(&format!("images/{name}/download"), &req).await;
    if let Err(e) = started {
        let _ = c.delete::<Image>(name).await;
        return Err(e.into());
    }
    let result = follow(c, name).await;
    if result.is_err() {
        // Leave nothing half-imported behind.
        let _ = c.delete::<Image>(name).await;
    }
    result
}

/// Shows the download's progress until the image is Ready or Failed.
async fn follow(c: &Client, name: &str) -> Result<Image> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut changes = std::pin::pin!(novacron_client::watcher::watch_object::<Image>(c.clone(), name));
    let outcome = loop {
        let image = match changes.next().await {
            Some(Some(image)) => image,
            Some(None) => break Err(anyhow::anyhow!("Image {name:?} was deleted during its download")),
            None => break Err(anyhow::anyhow!("Watch of image {name:?} ended")),
        };
        if let Some(d) = &image.status.download {
            bar.set_length(d.bytes_total.unwrap_or(d.bytes_done));
            bar.set_position(d.bytes_done);
        }
        match image.status.phase {
            ImagePhase::Ready => break Ok(image),
            ImagePhase::Failed => {
                let why = image.status.reason.unwrap_or_else(|| "no reason given".into());
                break Err(anyhow::anyhow!("Download of image {name:?} failed: {why}"));
            }
            ImagePhase::Downloading | ImagePhase::Uploading => {}
        }
    };
    bar.finish_and_clear();
    outcome
}
