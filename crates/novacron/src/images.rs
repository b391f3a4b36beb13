//! `novacron image ...`: import (a file uploaded, or a URL the server
//! downloads), export, list and delete images. A failed import removes the
//! image, so nothing half-imported stays.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_api::{CreateImage, DownloadImage, Image, ImageFormat, ImagePart, ImagePhase};
use novacron_client::Client;

use crate::commands::{client, list, ListArgs};
use crate::output;
use crate::Global;

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
    opts.create(c, name, format).await?;
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

#[derive(Subcommand)]
pub enum ImageCommand {
    /// List images.
    List(ListArgs),
    /// Import a qcow2 or raw disk image, or a kernel + initrd pair.
    Import {
        name: String,
        /// Disk image file (qcow2 or raw; detected).
        file: Option<PathBuf>,
        /// Have the server download the disk from this URL instead.
        #[arg(long, conflicts_with_all = ["file", "kernel"], requires = "sha256")]
        url: Option<String>,
        /// SHA-256 the downloaded file must have.
        #[arg(long, requires = "url")]
        sha256: Option<String>,
        /// Format of the file at --url.
        #[arg(long, value_enum, default_value_t = UrlFormat::Qcow2, requires = "url")]
        format: UrlFormat,
        /// Kernel for direct-kernel boot.
        #[arg(long, requires = "initrd", conflicts_with = "file")]
        kernel: Option<PathBuf>,
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line added for every VM of this image.
        #[arg(long, requires = "kernel")]
        kernel_args: Option<String>,
        /// Project (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Usable by every project.
        #[arg(long)]
        public: bool,
    },
    /// Delete an image no VM uses.
    Delete { name: String },
    /// Download an image's disk (or `--part kernel|initrd`) to FILE.
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "disk")]
        part: String,
    },
}

/// Disk formats an image downloaded from a URL can have.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum UrlFormat {
    Qcow2,
    Raw,
}

pub async fn image(g: &Global, cmd: ImageCommand) -> Result<()> {
    let c = client(g)?;
    match cmd {
        ImageCommand::List(a) => {
            list::<Image>(g, &c, a, output::images, |i| {
                format!("{}  {:?}", i.metadata.name, i.status.phase)
            })
            .await
        }
        ImageCommand::Export { name, file, part } => export_image(&c, &name, &file, &part).await,
        ImageCommand::Delete { name } => {
            c.delete::<Image>(&name).await?;
            println!("image {name:?} deleted");
            Ok(())
        }
        ImageCommand::Import {
            name,
            url: Some(url),
            sha256,
            format,
            kernel_args,
            project,
            public,
            ..
        } => {
            let req = novacron_api::DownloadImage {
                url,
                sha256: sha256.unwrap_or_default(),
            };
            let opts = ImportOptions {
                kernel_args,
                project,
                public,
            };
            let format = match format {
                UrlFormat::Qcow2 => ImageFormat::Qcow2,
                UrlFormat::Raw => ImageFormat::Raw,
            };
            let image = crate::images::import_url(&c, &name, format, req, opts).await?;
            output::images(g.output, &[image])
        }
        ImageCommand::Import {
            name,
            file,
            kernel,
            initrd,
            kernel_args,
            project,
            public,
            ..
        } => {
            let image = import(
                &c,
                &name,
                file.as_deref(),
                kernel.as_deref().zip(initrd.as_deref()),
                ImportOptions {
                    kernel_args,
                    project,
                    public,
                },
            )
            .await?;
            output::images(g.output, &[image])
        }
    }
}

/// Detects a disk file's format with qemu-img.
async fn disk_format(path: &Path) -> Result<ImageFormat> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .context("Cannot run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{} is not a disk image: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    match info["format"].as_str() {
        Some("qcow2") => Ok(ImageFormat::Qcow2),
        Some("raw") => Ok(ImageFormat::Raw),
        other => bail!("Unsupported image format {other:?}: use qcow2 or raw"),
    }
}

/// Where an imported image goes and how VMs boot it.
#[derive(Default)]
pub struct ImportOptions {
    pub kernel_args: Option<String>,
    pub project: Option<String>,
    pub public: bool,
}

impl ImportOptions {
    /// The image record, files to follow.
    async fn create(self, c: &Client, name: &str, format: ImageFormat) -> Result<Image> {
        Ok(c.create_image(&CreateImage {
            name: name.to_string(),
            project: self.project,
            public: self.public,
            format,
            labels: Default::default(),
            kernel_args: self.kernel_args,
        })
        .await?)
    }
}

pub async fn import(
    c: &Client,
    name: &str,
    file: Option<&Path>,
    kernel: Option<(&Path, &Path)>,
    opts: ImportOptions,
) -> Result<Image> {
    let (format, parts): (ImageFormat, Vec<(ImagePart, &Path)>) = match (file, kernel) {
        (Some(f), None) => (disk_format(f).await?, vec![(ImagePart::Disk, f)]),
        (None, Some((k, i))) => (
            ImageFormat::Kernel,
            vec![(ImagePart::Kernel, k), (ImagePart::Initrd, i)],
        ),
        _ => bail!("Give a disk image FILE, or --kernel and --initrd"),
    };
    for (_, p) in &parts {
        std::fs::metadata(p).with_context(|| format!("Cannot read {}", p.display()))?;
    }
    opts.create(c, name, format).await?;
    let mut image = None;
    for (part, path) in parts {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("Cannot open {}", path.display()))?;
        let len = file.metadata().await?.len();
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("uploading {}", part.as_str()));
        let progress = bar.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
            if let Ok(c) = &chunk {
                progress.inc(c.len() as u64);
            }
            chunk
        });
        let result = c
            .upload_image_part(name, part, reqwest::Body::wrap_stream(stream))
            .await;
        bar.finish_and_clear();
        match result {
            Ok(i) => image = Some(i),
            Err(e) => {
                // Leave nothing half-imported behind.
                let _ = c.delete::<Image>(name).await;
                return Err(e).with_context(|| format!("Uploading {} failed", path.display()));
            }
        }
    }
    image.context("no file uploaded")
}

/// Streams one file of an image to `path` (via `path.partial`, checked
/// against the image's SHA-256 before it takes the name).
async fn export_image(c: &Client, name: &str, path: &Path, part: &str) -> Result<()> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let part = ImagePart::parse(part).with_context(|| format!("unknown part {part:?} (disk, kernel, initrd)"))?;
    let image: Image = c.get(name).await?;
    let file = image
        .file(part)
        .with_context(|| format!("image {name:?} has no {} file", part.as_str()))?
        .clone();
    let partial = path.with_extension("partial");
    let bar = ProgressBar::new(file.size_bytes);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("downloading {}", part.as_str()));
    let result = async {
        let mut out = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("Cannot create {}", partial.display()))?;
        let mut stream = c.download_image_part(name, part).await?;
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bar.inc(chunk.len() as u64);
            out.write_all(&chunk).await?;
        }
        out.sync_all().await?;
        let got = hex::encode(hasher.finalize());
        if got != file.sha256 {
            bail!("downloaded file has SHA-256 {got}, the image's is {}", file.sha256);
        }
        tokio::fs::rename(&partial, path).await?;
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result?;
    println!(
        "image {name:?} {} saved to {} ({} bytes)",
        part.as_str(),
        path.display(),
        file.size_bytes
    );
    Ok(())
}
