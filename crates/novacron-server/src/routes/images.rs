//! `/v1/images`: create an image record, upload its files, serve them to agents.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use novacron_api::{
    validate, CreateImage, Image, ImageFile, ImageFormat, ImagePart, ImagePhase, ImageSpec, ImageStatus, Metadata,
    Resource, Verb,
};
use novacron_store::StoreExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_images, create_image))
        .routes(routes!(get_image, delete_image))
        .routes(routes!(upload_image_file, download_image_file))
}

/// List images, or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/images", tag = "images", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Image>)))]
async fn list_images(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<Image>(&state, &p, q, |_| {}).await
}

/// Create an image record; upload its files next.
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = CreateImage,
    responses((status = 201, body = Image), (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_image(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    // The role first, the project (named in the body) once it is read.
    authorize(&p, Resource::Images, Verb::Create, None)?;
    let req: CreateImage = body.parse()?;
    let project = p.project_for(req.project.clone());
    authorize(&p, Resource::Images, Verb::Create, Some(&project))?;
    if req.public && p.project.is_some() {
        return Err(ApiError::forbidden(
            "only a token for all projects can make a public image",
        ));
    }
    super::projects::require_project(&state, &project).await?;
    validate::name("name", &req.name)?;
    validate::labels("labels", &req.labels)?;
    if let Some(args) = &req.kernel_args {
        if req.format != ImageFormat::Kernel {
            return Err(ApiError::invalid(
                "kernel_args",
                "kernel arguments apply to kernel images only",
            ));
        }
        if args.len() > 1024 || args.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "kernel_args",
                "kernel arguments must be at most 1024 printable characters",
            ));
        }
    }
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project;
    let image = Image {
        metadata,
        spec: ImageSpec {
            format: req.format,
            kernel_args: req.kernel_args,
            public: req.public,
            template: None,
        },
        status: ImageStatus::default(),
    };
    let image = state.store.create_obj(&image).await?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// Get an image by name or id.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    responses((status = 200, body = Image), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_image(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(find_authorized::<Image>(&state, &p, &name, Verb::Read).await?))
}

/// Delete an image no VM uses.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = novacron_api::ErrorBody)))]
async fn delete_image(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let image = find_authorized::<Image>(&state, &p, &name, Verb::Delete).await?;
    let image_name = image.metadata.name.clone();
    super::refuse_while_used(&state, &format!("image {image_name:?}"), |v| v.spec.image == image_name).await?;
    state
        .store
        .delete_obj::<Image>(&image.metadata.name, Some(image.metadata.resource_version))
        .await?;
    let dir = image_dir(&state, &image);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove image files");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

pub(super) fn image_dir(state: &AppState, image: &Image) -> PathBuf {
    state.images_dir().join(&image.metadata.id)
}

fn parse_part(image: &Image, part: &str) -> ApiResult<ImagePart> {
    let part = ImagePart::parse(part)
        .ok_or_else(|| ApiError::invalid("part", format!("unknown image part {part:?} (disk, kernel, initrd)")))?;
    if !image.required_parts().contains(&part) {
        return Err(ApiError::invalid(
            "part",
            format!("a {} image has no {} part", image.spec.format, part.as_str()),
        ));
    }
    Ok(part)
}

/// What `qemu-img info` says about an uploaded disk.
#[derive(serde::Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

async fn inspect_disk(path: &std::path::Path, expected: ImageFormat) -> ApiResult<u64> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| ApiError::internal("Cannot run qemu-img", &e))?;
    if !out.status.success() {
        return Err(ApiError::invalid(
            "body",
            format!("not a disk image: {}", String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    let info: QemuImgInfo =
        serde_json::from_slice(&out.stdout).map_err(|e| ApiError::internal("Unexpected qemu-img output", &e))?;
    if info.format != expected.to_string() {
        return Err(ApiError::invalid(
            "body",
            format!("image is {}, not {expected}", info.format),
        ));
    }
    if info.backing_filename.is_some() {
        return Err(ApiError::invalid("body", "images with a backing file are not accepted"));
    }
    Ok(info.virtual_size)
}

/// Upload one file of an image (streamed). The image becomes Ready when it
/// has every file its format needs.
#[utoipa::path(put, path = "/v1/images/{name}/files/{part}", tag = "images",
    params(("name" = String, Path), ("part" = String, Path, description = "disk, kernel or initrd", pattern = "^(disk|kernel|initrd)$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Image), (status = 422, body = novacron_api::ErrorBody)))]
async fn upload_image_file(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, part)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Image>> {
    let image = find_authorized::<Image>(&state, &p, &name, Verb::Create).await?;
    let part = parse_part(&image, &part)?;
    store_file(&state, &image, part, body).await.map(Json)
}

/// Receives one file of an image, checks it, and records it; the image is
/// Ready once it has every file its format needs. A failed or interrupted
/// transfer leaves no file behind.
pub(super) async fn store_file(state: &AppState, image: &Image, part: ImagePart, body: Body) -> ApiResult<Image> {
    let partial = partial_file(state, image, part).await?;
    let stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(|e| ApiError::bad_request(format!("Upload interrupted: {e}"))));
    let (size, sha256) = match receive(stream, &partial, None).await {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    finish_file(state, image, part, &partial, size, sha256).await
}

/// Where a file of the image is written until it is complete and checked.
pub(super) async fn partial_file(state: &AppState, image: &Image, part: ImagePart) -> ApiResult<PathBuf> {
    let dir = image_dir(state, image);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal("Cannot create image directory", &e))?;
    Ok(dir.join(format!("{}.partial", part.as_str())))
}

/// Checks a received file (a disk must be an image of the declared format),
/// moves it in place and records it. On failure the file is removed.
pub(super) async fn finish_file(
    state: &AppState,
    image: &Image,
    part: ImagePart,
    partial: &std::path::Path,
    size: u64,
    sha256: String,
) -> ApiResult<Image> {
    let virtual_size = if part == ImagePart::Disk {
        match inspect_disk(partial, image.spec.format).await {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(partial).await;
                return Err(e);
            }
        }
    } else {
        0
    };
    let final_path = image_dir(state, image).join(part.as_str());
    tokio::fs::rename(partial, &final_path)
        .await
        .map_err(|e| ApiError::internal("Cannot store image file", &e))?;
    let file = ImageFile {
        part,
        size_bytes: size,
        sha256,
    };
    let image = state
        .store
        .modify::<Image, _>(&image.metadata.name, |img| {
            img.status.files.retain(|f| f.part != part);
            img.status.files.push(file.clone());
            img.status.files.sort_by_key(|f| f.part.as_str());
            if part == ImagePart::Disk {
                img.status.virtual_size_bytes = virtual_size;
            }
            let complete = img.required_parts().iter().all(|p| img.file(*p).is_some());
            img.status.phase = if complete {
                ImagePhase::Ready
            } else {
                ImagePhase::Uploading
            };
            img.status.reason = None;
            true
        })
        .await?;
    tracing::info!(image = %image.metadata.name, part = part.as_str(), size, "image file stored");
    Ok(image)
}

/// Writes `stream` to `path`; its size and hex SHA-256. `progress`, if
/// given, follows the bytes written.
pub(super) async fn receive(
    stream: impl futures::Stream<Item = ApiResult<bytes::Bytes>>,
    path: &std::path::Path,
    progress: Option<&tokio::sync::watch::Sender<u64>>,
) -> ApiResult<(u64, String)> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::internal("Cannot create image file", &e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal("Cannot write image file", &e))?;
        if let Some(p) = progress {
            p.send_replace(size);
        }
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::internal("Cannot write image file", &e))?;
    if size == 0 {
        return Err(ApiError::invalid("body", "empty upload"));
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Download one file of an image (agents cache images this way).
#[utoipa::path(get, path = "/v1/images/{name}/files/{part}", tag = "images",
    params(("name" = String, Path), ("part" = String, Path, description = "disk, kernel or initrd", pattern = "^(disk|kernel|initrd)$")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = novacron_api::ErrorBody),
        (status = 422, description = "Not a part of images: disk, kernel or initrd", body = novacron_api::ErrorBody)))]
async fn download_image_file(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((name, part)): Path<(String, String)>,
) -> ApiResult<Response> {
    let image = find_authorized::<Image>(&state, &p, &name, Verb::Read).await?;
    let part = parse_part(&image, &part)?;
    if image.file(part).is_none() {
        return Err(ApiError::not_found(format!(
            "{} file of image {:?}",
            part.as_str(),
            image.metadata.name
        )));
    }
    let file = tokio::fs::File::open(image_dir(&state, &image).join(part.as_str()))
        .await
        .map_err(|e| ApiError::internal("Cannot open image file", &e))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok(([(CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}
