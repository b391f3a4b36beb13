//! `POST /v1/images/{name}/download`: the server fetches an image's disk
//! from a URL in the background, with its progress in `status.download`.
//! The file is checked against the SHA-256 given and inspected like an
//! upload before the image is Ready; a failed, corrupt or interrupted
//! download leaves the image Failed with the reason, and no file.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use futures::StreamExt;
use novacron_api::error::chain;
use novacron_api::{DownloadImage, Image, ImageDownload, ImageFormat, ImagePart, ImagePhase, Verb};
use novacron_store::{SharedStore, StoreExt};
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, images};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

/// How often the bytes downloaded are written to the image's status.
const REPORT_EVERY: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(download_image))
}

/// Have the server download the image's disk from a URL. Answers at once
/// (202); the image is Downloading, then Ready, or Failed with the reason.
#[utoipa::path(post, path = "/v1/images/{name}/download", tag = "images", params(("name" = String, Path)),
    request_body = DownloadImage,
    responses((status = 202, body = Image), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The image has its disk already, or is downloading it", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody)))]
async fn download_image(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let image = find_authorized::<Image>(&state, &p, &name, Verb::Create).await?;
    let req: DownloadImage = body.parse()?;
    req.validate()?;
    let url = reqwest::Url::parse(&req.url).map_err(|e| ApiError::invalid("url", format!("not a URL: {e}")))?;
    if image.spec.format == ImageFormat::Kernel {
        return Err(ApiError::invalid(
            "url",
            "a kernel image has two files: upload them (image import --kernel --initrd)",
        ));
    }
    let waiting = matches!(image.status.phase, ImagePhase::Uploading | ImagePhase::Failed);
    if !waiting || image.file(ImagePart::Disk).is_some() {
        return Err(ApiError::conflict(format!(
            "image {:?} is {:?}: only an image without its disk can download one",
            image.metadata.name, image.status.phase
        )));
    }
    let mut claimed = image;
    claimed.status.phase = ImagePhase::Downloading;
    claimed.status.reason = None;
    claimed.status.download = Some(ImageDownload {
        url: req.url.clone(),
        sha256: req.sha256.to_ascii_lowercase(),
        bytes_done: 0,
        bytes_total: None,
    });
    // Compare-and-swap on the revision read: two downloads cannot both start.
    let claimed = state.store.update_obj(&claimed).await?;
    let span = tracing::info_span!("image download", image = %claimed.metadata.name, url = %url);
    tokio::spawn(run(state.clone(), claimed.clone(), url).instrument(span));
    tracing::info!(image = %claimed.metadata.name, url = %req.url, "image download started");
    Ok((StatusCode::ACCEPTED, Json(claimed)))
}

async fn run(state: AppState, image: Image, url: reqwest::Url) {
    let name = image.metadata.name.clone();
    match fetch(&state, &image, url).await {
        Ok(_) => tracing::info!(image = %name, "image downloaded and checked"),
        Err(e) => {
            tracing::warn!(image = %name, error = %e.message, "image download failed");
            failed(&state.store, &image, &e.message).await;
        }
    }
}

/// Marks `image` (if it is still the same object) Failed with `why`.
async fn failed(store: &SharedStore, image: &Image, why: &str) {
    let result = store
        .modify::<Image, _>(&image.metadata.name, |img| {
            if img.metadata.id != image.metadata.id || img.status.phase != ImagePhase::Downloading {
                return false;
            }
            img.status.phase = ImagePhase::Failed;
            img.status.reason = Some(why.to_string());
            true
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(image = %image.metadata.name, error = %e, "cannot record the failed download");
    }
}

async fn fetch(state: &AppState, image: &Image, url: reqwest::Url) -> ApiResult<Image> {
    let expected = image
        .status
        .download
        .as_ref()
        .map(|d| d.sha256.clone())
        .ok_or_else(|| ApiError::conflict("the download was not recorded"))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| ApiError::internal("Cannot make an HTTP client", &e))?;
    let resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| ApiError::bad_gateway(format!("Cannot download {url}: {}", chain(&e))))?;
    if !resp.status().is_success() {
        return Err(ApiError::bad_gateway(format!("{url} answered {}", resp.status())));
    }
    let total = resp.content_length();
    let partial = images::partial_file(state, image, ImagePart::Disk).await?;
    let (progress, watch) = tokio::sync::watch::channel(0u64);
    let reporter = tokio::spawn(report(state.store.clone(), image.metadata.name.clone(), total, watch));
    let stream = resp
        .bytes_stream()
        .map(|chunk| chunk.map_err(|e| ApiError::bad_gateway(format!("Download interrupted: {}", chain(&e)))));
    let received = images::receive(stream, &partial, Some(&progress)).await;
    drop(progress);
    let _ = reporter.await;
    let checked = received.and_then(|(size, sha256)| match total {
        Some(total) if total != size => Err(ApiError::bad_gateway(format!(
            "Download interrupted after {size} of {total} bytes"
        ))),
        _ if sha256 != expected => Err(ApiError::invalid(
            "sha256",
            format!("checksum mismatch: the file's SHA-256 is {sha256}, {expected} was expected"),
        )),
        _ => Ok((size, sha256)),
    });
    let (size, sha256) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    images::finish_file(state, image, ImagePart::Disk, &partial, size, sha256).await
}

/// Writes the bytes downloaded into the image's status, at most every
/// REPORT_EVERY and once more at the end.
async fn report(store: SharedStore, name: String, total: Option<u64>, mut done: tokio::sync::watch::Receiver<u64>) {
    let mut last = Instant::now();
    loop {
        let ended = done.changed().await.is_err();
        if !ended && last.elapsed() < REPORT_EVERY {
            continue;
        }
        last = Instant::now();
        let bytes = *done.borrow_and_update();
        let _ = store
            .modify::<Image, _>(&name, |img| match img.status.download.as_mut() {
                Some(d) if img.status.phase == ImagePhase::Downloading => {
                    d.bytes_done = bytes;
                    d.bytes_total = total;
                    true
                }
                _ => false,
            })
            .await;
        if ended {
            return;
        }
    }
}

/// At server start: a download that was running when the server stopped
/// will not finish; its image is Failed (and its partial file removed).
pub async fn fail_interrupted(state: &AppState) {
    let images = match state.store.list_all::<Image>().await {
        Ok(images) => images,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for interrupted image downloads");
            return;
        }
    };
    for image in images.iter().filter(|i| i.status.phase == ImagePhase::Downloading) {
        let partial = images::image_dir(state, image).join("disk.partial");
        let _ = tokio::fs::remove_file(&partial).await;
        failed(
            &state.store,
            image,
            "the download was interrupted by a server restart; start it again",
        )
        .await;
    }
}
