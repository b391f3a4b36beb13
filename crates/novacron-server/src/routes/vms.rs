//! `/v1/vms`: create, read, lifecycle actions, delete, console and logs.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use novacron_api::{
    validate, CreateVm, Image, ImagePhase, Metadata, Node, PowerState, Resource, StopVm, Verb, Vm, VmPhase, VmStatus,
};
use novacron_store::StoreExt;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{find_authorized, list_or_watch, ListQuery};
use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, JsonBody};
use crate::limits::{Held, MAX_CONSOLE_MESSAGE};
use crate::{proxy, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(get_vm, delete_vm))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(reboot_vm))
        .routes(routes!(pause_vm))
        .routes(routes!(resume_vm))
        .routes(routes!(put_vm_status))
        .routes(routes!(finalize_vm))
        .routes(routes!(vm_logs))
        .routes(routes!(vm_console))
        .routes(routes!(vm_exec))
}

/// List VMs (paginated), or watch them with `watch=true`.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(ListQuery),
    responses((status = 200, body = novacron_api::List<Vm>), (status = 422, body = novacron_api::ErrorBody)))]
async fn list_vms(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_or_watch::<Vm>(&state, &p, q, |_| {}).await
}

/// Create a VM. It is placed on a node by the scheduler and started unless
/// `spec.power_state` is `Stopped`.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = Vm), (status = 400, body = novacron_api::ErrorBody),
        (status = 409, body = novacron_api::ErrorBody), (status = 422, body = novacron_api::ErrorBody)))]
async fn create_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    // The role first, the project (named in the body) once it is read.
    authorize(&p, Resource::Vms, Verb::Create, None)?;
    let req: CreateVm = body.parse()?;
    let vm = create(&state, &p, req, None).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Creates the VM `req` asks for (checked as a create by `p`); with
/// `restore`, its disks are that backup's.
pub(super) async fn create(
    state: &AppState,
    p: &Principal,
    req: CreateVm,
    restore: Option<novacron_api::backup::RestoreSource>,
) -> ApiResult<Vm> {
    let state = state.clone();
    let project = p.project_for(req.project.clone());
    authorize(p, Resource::Vms, Verb::Create, Some(&project))?;
    let quota = super::projects::require_project(&state, &project).await?.quota;
    validate::create_vm(&req)?;
    let image = usable_image(&state, &req.spec.image, &project, "spec.image").await?;
    if req.spec.full_copy && image.spec.format == novacron_api::ImageFormat::Kernel {
        return Err(ApiError::invalid(
            "spec.full_copy",
            format!(
                "image {:?} boots a kernel directly and has no disk to copy",
                req.spec.image
            ),
        ));
    }
    if req.spec.cloud_init.is_some() && image.spec.format == novacron_api::ImageFormat::Kernel {
        return Err(ApiError::invalid(
            "spec.cloud_init",
            format!(
                "image {:?} boots a kernel directly and runs no cloud-init; use a disk image (qcow2 or raw)",
                req.spec.image
            ),
        ));
    }
    validate_placement(&req.spec.placement)?;
    let config = crate::scheduling::load_config(&state.store).await?;
    // From the node cache once it has listed (it is read on every create).
    let empty = if state.nodes.synced() {
        state.nodes.with(|nodes| {
            let nodes: Vec<&Node> = nodes.values().collect();
            crate::scheduling::snapshot::<_, Vm>(&nodes, &[], &[], &config, None)
        })
    } else {
        let nodes = state.store.list_all::<Node>().await?;
        crate::scheduling::snapshot::<_, Vm>(&nodes, &[], &[], &config, None)
    };
    if !empty.fits_some_node(&crate::scheduling::request_for(&req.spec, &req.labels)) {
        let too_big = (0..empty.nodes.len()).all(|i| empty.allocatable(i).memory_mib < req.spec.memory_mib);
        let (field, what) = if too_big {
            ("spec.memory_mib", "memory")
        } else {
            ("spec.vcpus", "vcpus")
        };
        return Err(ApiError::invalid(
            field,
            format!("requested {what} is larger than any node's capacity"),
        ));
    }
    let mut spec = req.spec;
    spec.restore_from = restore;
    if spec.nics.is_empty() && !req.no_default_network {
        if let Some(net) = default_network(&state, &project).await? {
            spec.nics.push(novacron_api::NicSpec::on(&net));
        }
    }
    // The machine family is pinned to a versioned type on the first node the
    // VM is placed on; the CPU model is the cluster's baseline unless asked.
    spec.machine.get_or_insert_with(|| DEFAULT_MACHINE.to_string());
    spec.cpu_model
        .get_or_insert_with(|| config.settings.default_cpu_model.clone());
    // Record the root disk size the agent will create, so quotas count real sizes.
    let image_mib = image.status.virtual_size_bytes.div_ceil(1024 * 1024);
    spec.disk_mib = Some(match image.spec.format {
        novacron_api::ImageFormat::Kernel => spec.disk_mib.unwrap_or(1024),
        _ => spec.disk_mib.unwrap_or(0).max(image_mib),
    });
    let mut metadata = Metadata::new(&req.name, req.labels);
    metadata.project = project.clone();
    let vm = Vm {
        metadata,
        spec,
        status: VmStatus {
            phase: VmPhase::Pending,
            reason: Some("Waiting for the scheduler".into()),
            ..Default::default()
        },
    };
    // Quota check and create under one lock, so two creates cannot both fit.
    // A project without limits on VMs has nothing to count (counting lists
    // every VM: at 10,000 VMs it was most of a create's time).
    let _quota_guard = if super::projects::limits_vms(&quota) {
        let guard = state.lock_quota().await?;
        super::projects::check_quota(&state, &project, &quota, &vm).await?;
        Some(guard)
    } else {
        None
    };
    let mut vm = vm;
    super::security_groups::resolve_nic_groups(&state, &project, &mut vm.spec.nics).await?;
    novacron_api::network::assign_slots(&mut vm.spec.nics).map_err(ApiError::from)?;
    let claimed = crate::ipam::claim_nics(&state.store, &project, &vm.metadata.id, &mut vm.spec.nics).await?;
    let vm = match state.store.create_obj(&vm).await {
        Ok(vm) => vm,
        Err(e) => {
            claimed.release(&state.store).await;
            return Err(e.into());
        }
    };
    if !vm.spec.nics.is_empty() {
        super::security_groups::refresh_members(&state, &project).await?;
    }
    tracing::info!(vm = %vm.metadata.name, restore_from = ?vm.spec.restore_from, "created VM");
    state.placement_wakeup.notify_one();
    Ok(vm)
}

/// The image `name` if VMs of `project` may boot it: theirs or public, and Ready.
pub(super) async fn usable_image(state: &AppState, name: &str, project: &str, field: &str) -> ApiResult<Image> {
    let image = match state.store.get_obj::<Image>(name).await? {
        Some(img) if img.metadata.project == project || img.spec.public => img,
        _ => {
            return Err(ApiError::invalid(
                field,
                format!("unknown image {name:?} in project {project:?}"),
            ))
        }
    };
    if image.status.phase != ImagePhase::Ready {
        return Err(ApiError::invalid(
            field,
            format!("image {name:?} is {:?}, not Ready", image.status.phase),
        ));
    }
    Ok(image)
}

/// What a deleted VM held on networks goes back: its addresses, its
/// places in security groups.
async fn released(state: &AppState, vm: &Vm) -> ApiResult<()> {
    crate::ipam::release_owner(&state.store, &vm.metadata.id).await;
    // The agent moves the volumes of a deleted VM to its node's pool.
    if !vm.status.volumes.is_empty() {
        let mut gone = vm.clone();
        gone.status.volumes.clear();
        super::volumes::record_location(state, &gone, &vm.status.volumes).await;
    }
    if !vm.spec.nics.is_empty() {
        super::security_groups::refresh_members(state, &vm.metadata.project).await?;
    }
    Ok(())
}

/// The label that makes a network its project's default: VMs created
/// without NICs join it.
pub const DEFAULT_NETWORK_LABEL: &str = "novacron.io/default";

/// The project's default network (the first by name, if several are labelled).
async fn default_network(state: &AppState, project: &str) -> ApiResult<Option<String>> {
    let mut names: Vec<String> = state
        .store
        .list_all::<novacron_api::Network>()
        .await?
        .into_iter()
        .filter(|n| {
            n.metadata.project == project
                && n.metadata.deletion_requested_at.is_none()
                && n.metadata.labels.get(DEFAULT_NETWORK_LABEL).map(String::as_str) == Some("true")
        })
        .map(|n| n.metadata.name)
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// Machine type family of new VMs (QEMU's i440FX PC).
pub const DEFAULT_MACHINE: &str = "pc";

/// Get a VM by name or id.
#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vm), (status = 404, body = novacron_api::ErrorBody)))]
async fn get_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Remove the object even if its node cannot clean up (node down).
    #[serde(default)]
    pub force: bool,
}

/// Delete a VM: its agent stops QEMU and removes its disks and state, then the
/// object goes away. A VM not yet placed is removed at once.
#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path), DeleteQuery),
    responses((status = 202, body = Vm), (status = 204), (status = 404, body = novacron_api::ErrorBody)))]
async fn delete_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<Response> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Delete).await?;
    let name = vm.metadata.name.clone();
    refuse_while_migrating(&state, &name).await?;
    if vm.status.node.is_none() || q.force {
        state.store.delete_obj::<Vm>(&name, None).await?;
        released(&state, &vm).await?;
        tracing::info!(vm = %name, force = q.force, "deleted VM");
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let vm = state
        .store
        .modify::<Vm, _>(&name, |v| {
            if v.metadata.deletion_requested_at.is_some() {
                return false;
            }
            v.metadata.deletion_requested_at = Some(Utc::now());
            v.status.phase = VmPhase::Deleting;
            v.status.reason = Some("Deletion requested".into());
            true
        })
        .await?;
    tracing::info!(vm = %name, "deletion requested");
    Ok((StatusCode::ACCEPTED, Json(vm)).into_response())
}

/// Applies a spec change for a lifecycle action.
pub(super) async fn act(
    state: &AppState,
    p: &Principal,
    name: &str,
    change: impl Fn(&mut Vm) -> Result<(), ApiError> + Send + Sync,
) -> ApiResult<Json<Vm>> {
    let vm = find_authorized::<Vm>(state, p, name, Verb::Update).await?;
    let name = vm.metadata.name;
    refuse_while_migrating(state, &name).await?;
    // `modify` retries on conflicts; the closure records a refusal instead of failing.
    let refusal = parking_lot::Mutex::new(None);
    let vm = state
        .store
        .modify::<Vm, _>(&name, |v| {
            if v.metadata.deletion_requested_at.is_some() {
                *refusal.lock() = Some(ApiError::conflict(format!("VM {name:?} is being deleted")));
                return false;
            }
            let before = v.spec.clone();
            if let Err(e) = change(v) {
                *refusal.lock() = Some(e);
                return false;
            }
            if v.spec != before {
                v.metadata.generation += 1;
                true
            } else {
                false
            }
        })
        .await?;
    if let Some(e) = refusal.into_inner() {
        return Err(e);
    }
    Ok(Json(vm))
}

/// Start a VM (also restarts a Failed one).
#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 404, body = novacron_api::ErrorBody), (status = 409, body = novacron_api::ErrorBody)))]
async fn start_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vm>> {
    let phase = find_authorized::<Vm>(&state, &p, &name, Verb::Update)
        .await?
        .status
        .phase;
    let failed = matches!(phase, VmPhase::Failed | VmPhase::Stopped);
    act(&state, &p, &name, |v| {
        v.spec.power_state = PowerState::Running;
        v.spec.stop_grace_s = None;
        if failed {
            // A new generation tells the agent that the user asked again.
            v.spec.start_request += 1;
        }
        Ok(())
    })
    .await
}

/// Stop a VM: ACPI power button, then kill after the timeout; `force` kills at once.
#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms", params(("name" = String, Path)), request_body = StopVm,
    responses((status = 200, body = Vm), (status = 404, body = novacron_api::ErrorBody)))]
async fn stop_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Vm>> {
    find_authorized::<Vm>(&state, &p, &name, Verb::Update).await?;
    // The body is optional: an empty one means a graceful stop with the VM's timeout.
    let req: StopVm = body.parse_or_default()?;
    if req.timeout_s.is_some_and(|t| t > 3600) {
        return Err(ApiError::invalid("timeout_s", "timeout must be at most 3600 s"));
    }
    act(&state, &p, &name, |v| {
        v.spec.power_state = PowerState::Stopped;
        v.spec.stop_grace_s = Some(if req.force {
            0
        } else {
            req.timeout_s.unwrap_or(v.spec.stop_timeout_s)
        });
        Ok(())
    })
    .await
}

/// Reset a running VM.
#[utoipa::path(post, path = "/v1/vms/{name}/reboot", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 409, body = novacron_api::ErrorBody)))]
async fn reboot_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vm>> {
    act(&state, &p, &name, |v| {
        if v.spec.power_state != PowerState::Running || v.status.phase != VmPhase::Running {
            return Err(ApiError::conflict("Only a running VM can be rebooted"));
        }
        v.spec.reboot_generation += 1;
        Ok(())
    })
    .await
}

/// Pause a VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 409, body = novacron_api::ErrorBody)))]
async fn pause_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vm>> {
    act(&state, &p, &name, |v| {
        if v.spec.power_state == PowerState::Stopped {
            return Err(ApiError::conflict("A stopped VM cannot be paused"));
        }
        v.spec.power_state = PowerState::Paused;
        Ok(())
    })
    .await
}

/// Resume a paused VM.
#[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 409, body = novacron_api::ErrorBody)))]
async fn resume_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vm>> {
    act(&state, &p, &name, |v| {
        if v.spec.power_state != PowerState::Paused {
            return Err(ApiError::conflict("Only a paused VM can be resumed"));
        }
        v.spec.power_state = PowerState::Running;
        Ok(())
    })
    .await
}

/// Agent: replace a VM's status (compare-and-swap on `metadata.resource_version`).
#[utoipa::path(put, path = "/v1/vms/{name}/status", tag = "agent", params(("name" = String, Path)), request_body = Vm,
    responses((status = 200, body = Vm), (status = 409, body = novacron_api::ErrorBody)))]
async fn put_vm_status(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<Vm>> {
    let mut vm = find_authorized::<Vm>(&state, &p, &name, Verb::Status).await?;
    let body: Vm = body.parse()?;
    // The caller's revision makes the store's compare-and-swap reject stale writers (409).
    vm.metadata.resource_version = body.metadata.resource_version;
    if vm.status.node.is_some() && body.status.node != vm.status.node {
        return Err(ApiError::invalid("status.node", "an agent cannot rebind a VM"));
    }
    let unplugged = vm.status.nics != body.status.nics;
    let volumes_before = std::mem::take(&mut vm.status.volumes);
    vm.status = body.status;
    let vm = state.store.update_obj(&vm).await?;
    if unplugged {
        super::vm_nics::release_removed(&state, &vm.metadata.name).await;
    }
    if vm.status.volumes != volumes_before {
        super::volumes::record_location(&state, &vm, &volumes_before).await;
    }
    Ok(Json(vm))
}

/// Agent: a deleted VM's process and disks are gone; remove the object.
#[utoipa::path(post, path = "/v1/vms/{name}/finalize", tag = "agent", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = novacron_api::ErrorBody)))]
async fn finalize_vm(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Status).await?;
    if vm.metadata.deletion_requested_at.is_none() {
        return Err(ApiError::conflict("VM deletion was not requested"));
    }
    state
        .store
        .delete_obj::<Vm>(&vm.metadata.name, Some(vm.metadata.resource_version))
        .await?;
    released(&state, &vm).await?;
    tracing::info!(vm = %vm.metadata.name, "VM deleted");
    state.placement_wakeup.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the stream open and send new output as it comes.
    #[serde(default)]
    pub follow: bool,
}

/// The VM's serial console output.
#[utoipa::path(get, path = "/v1/vms/{name}/logs", tag = "vms", params(("name" = String, Path), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not placed on a node yet", body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn vm_logs(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Read).await?;
    let node = bound_node(&state, &vm).await?;
    proxy::logs(&state, &node, &vm, q.follow).await
}

/// Interactive serial console over a WebSocket (binary frames both ways).
#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "vms", params(("name" = String, Path)),
    responses((status = 101, description = "WebSocket upgrade"), (status = 404, body = novacron_api::ErrorBody),
        (status = 400, description = "Not a WebSocket upgrade request", body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not running", body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody)))]
async fn vm_console(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Console).await?;
    let ws = ws.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let node = bound_node(&state, &vm).await?;
    if !matches!(vm.status.phase, VmPhase::Running | VmPhase::Paused | VmPhase::Starting) {
        return Err(ApiError::conflict(format!(
            "VM {:?} is not running ({})",
            vm.metadata.name, vm.status.phase
        )));
    }
    let slot = state.open_streams.open(&p.token, Held::Console)?;
    let upstream = proxy::connect_console(&state, &node, &vm).await?;
    Ok(ws
        .max_message_size(MAX_CONSOLE_MESSAGE)
        .max_frame_size(MAX_CONSOLE_MESSAGE)
        .on_upgrade(move |socket| async move {
            // The session holds its place until either side closes.
            let _held = slot;
            proxy::pump_console(socket, upstream).await
        }))
}

/// Runs a command in the guest through its QEMU guest agent and returns
/// what it printed (its own permission, `vms:exec`; audited like every call
/// that changes or acts).
#[utoipa::path(post, path = "/v1/vms/{name}/exec", tag = "vms", params(("name" = String, Path)),
    request_body = novacron_api::ExecRequest,
    responses((status = 200, body = novacron_api::ExecResult), (status = 404, body = novacron_api::ErrorBody),
        (status = 409, description = "The VM is not running, or no guest agent answers in it", body = novacron_api::ErrorBody),
        (status = 422, body = novacron_api::ErrorBody),
        (status = 502, description = "The VM's agent failed to answer", body = novacron_api::ErrorBody),
        (status = 503, description = "The VM is not placed, or its agent cannot be reached", body = novacron_api::ErrorBody),
        (status = 504, description = "The command did not end in time", body = novacron_api::ErrorBody)))]
async fn vm_exec(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<novacron_api::ExecResult>> {
    let vm = find_authorized::<Vm>(&state, &p, &name, Verb::Exec).await?;
    let req: novacron_api::ExecRequest = body.parse()?;
    req.validate()?;
    if vm.status.phase != VmPhase::Running {
        return Err(ApiError::conflict(format!(
            "VM {:?} is not running ({})",
            vm.metadata.name, vm.status.phase
        )));
    }
    let node = bound_node(&state, &vm).await?;
    proxy::exec(&state, &node, &vm, &req).await.map(Json)
}

/// Placement constraints are checked like labels: bad keys or values are 422s.
pub(crate) fn validate_placement(p: &novacron_api::Placement) -> ApiResult<()> {
    validate::labels("spec.placement.node_selector", &p.node_selector)?;
    if p.affinity.len() > 16 {
        return Err(ApiError::invalid(
            "spec.placement.affinity",
            "at most 16 affinity rules",
        ));
    }
    for (i, rule) in p.affinity.iter().enumerate() {
        let field = format!("spec.placement.affinity[{i}].selector");
        if rule.selector.is_empty() {
            return Err(ApiError::invalid(&field, "a rule needs at least one label"));
        }
        validate::labels(&field, &rule.selector)?;
    }
    if let Some(z) = &p.preferred_zone {
        validate::name("spec.placement.preferred_zone", z)?;
    }
    Ok(())
}

/// Whether the VM is in the state its spec asks for: running, paused or
/// stopped (not starting, stopping or failed).
pub(super) fn settled(vm: &Vm) -> bool {
    matches!(
        (vm.spec.power_state, vm.status.phase),
        (PowerState::Stopped, VmPhase::Stopped)
            | (PowerState::Running, VmPhase::Running)
            | (PowerState::Paused, VmPhase::Paused)
    )
}

pub(super) async fn refuse_while_migrating(state: &AppState, vm: &str) -> ApiResult<()> {
    match super::migrations::active_migration(state, vm).await? {
        Some(m) => Err(ApiError::conflict(format!(
            "VM {vm:?} is being migrated by {:?}; cancel it first",
            m.metadata.name
        ))),
        None => Ok(()),
    }
}

pub(super) async fn bound_node(state: &AppState, vm: &Vm) -> ApiResult<Node> {
    let Some(node) = vm.status.node.as_deref() else {
        return Err(ApiError::conflict(format!(
            "VM {:?} is not placed on a node yet",
            vm.metadata.name
        )));
    };
    state
        .store
        .get_obj::<Node>(node)
        .await?
        .ok_or_else(|| ApiError::unavailable(format!("node {node:?} of the VM is gone")))
}
