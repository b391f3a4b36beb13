//! `POST /v1/vms/{name}/template`: a stopped VM's root disk, flattened by
//! its agent, becomes a template image; `vm clone` stamps VMs out of it
//! (an overlay on it, or a full copy). The VM itself stays, stopped.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use novacron_api::{
    validate, Image, ImageFormat, ImagePart, ImageSpec, MakeTemplate, Metadata, PowerState, Resource, Verb, Vm,
    VmPhase, VmTemplate,
};
use novacron_store::StoreExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::find_authorized;
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

/// Label a template image carries: the VM it was made of.
pub const TEMPLATE_OF_LABEL: &str = "novacron.io/template-of";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(make_template))
}

/// Make a template image of a stopped VM (its root disk, flattened, and its
/// hardware and cloud-init settings for the clones).
#[utoipa::path(post, path = "/v1/vms/{name}/template", tag = "vms", params(("name" = String, Path)),
    request_body = MakeTemplate,
    responses((status = 201, body = Image), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not stopped, or the image name is taken", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn make_template(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    authorize(&p, Resource::Images, Verb::Create, Some(&vm.metadata.project))?;
    let req: MakeTemplate = body.parse()?;
    let image_name = req.image.unwrap_or_else(|| vm.metadata.name.clone());
    validate::name("image", &image_name)?;
    if vm.spec.power_state != PowerState::Stopped || vm.status.phase != VmPhase::Stopped {
        return Err(ApiError::conflict(format!(
            "VM {:?} is {}: stop it first; templates are made of stopped VMs",
            vm.metadata.name, vm.status.phase
        )));
    }
    super::vms::refuse_while_migrating(&state, &vm.metadata.name).await?;
    let source = state.store.get_obj::<Image>(&vm.spec.image).await?;
    if source.is_some_and(|i| i.spec.format == ImageFormat::Kernel) {
        return Err(ApiError::conflict(format!(
            "VM {:?} boots a kernel image; templates are made of disk-image VMs",
            vm.metadata.name
        )));
    }
    let node = super::vms::bound_node(&state, &vm).await?;

    let mut metadata = Metadata::new(
        &image_name,
        [(TEMPLATE_OF_LABEL.to_string(), vm.metadata.name.clone())].into(),
    );
    metadata.project = vm.metadata.project.clone();
    let mut nics: Vec<(u8, String)> = (0..vm.spec.nics.len())
        .map(|i| {
            (
                novacron_api::network::nic_slot(&vm.spec.nics, i),
                vm.spec.nics[i].network.clone(),
            )
        })
        .collect();
    nics.sort();
    let template = VmTemplate {
        source_vm: vm.metadata.name.clone(),
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        machine: vm.spec.machine.clone(),
        cpu_model: vm.spec.cpu_model.clone(),
        networks: nics.into_iter().map(|(_, n)| n).collect(),
        cloud_init: vm.spec.cloud_init.clone().map(|mut c| {
            c.hostname = None;
            c
        }),
    };
    let image = Image {
        metadata,
        spec: ImageSpec {
            format: ImageFormat::Qcow2,
            kernel_args: None,
            public: false,
            template: Some(template),
        },
        status: Default::default(),
    };
    let image = state.store.create_obj(&image).await?;
    let stored = async {
        let resp = crate::proxy::root_image(&state, &node, &vm).await?;
        super::images::store_file(&state, &image, ImagePart::Disk, Body::from_stream(resp.bytes_stream())).await
    }
    .await;
    match stored {
        Ok(image) => {
            tracing::info!(vm = %vm.metadata.name, image = %image.metadata.name, "made a template");
            Ok((StatusCode::CREATED, Json(image)))
        }
        Err(e) => {
            // No half-made template: the record goes with its files.
            let _ = state.store.delete_obj::<Image>(&image.metadata.name, None).await;
            let _ = tokio::fs::remove_dir_all(super::images::image_dir(&state, &image)).await;
            Err(e)
        }
    }
}
