//! HTTP routes, one module per resource.

pub mod audit;
pub mod backup_chunks;
pub mod backup_policies;
pub mod backup_sync;
pub mod backups;
pub mod events;
pub mod health;
pub mod identity;
pub mod image_download;
pub mod images;
pub mod migrations;
pub mod networks;
pub mod nodes;
pub mod pki;
pub mod projects;
pub mod rebuild;
pub mod scheduler;
pub mod security_groups;
pub mod snapshots;
pub mod templates;
pub mod vm_nics;
pub mod vm_stats;
pub mod vms;
pub mod volumes;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use novacron_api::selector::{FieldSelector, LabelSelector};
use novacron_api::{
    AuditRecord, ClusterTrust, Image, List, Migration, Network, Node, Object, OverlayPeers, Project, Resource, Role,
    SecurityGroup, Token, User, Verb, Vm, Volume, WatchEvent, WatchEventType,
};
use novacron_store::{decode_record, EventType, StoreExt};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::limits::Held;
use crate::AppState;

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Label selector: `k=v`, `k!=v`, `k`, `!k`, comma-separated.
    #[param(
        pattern = r"^(!?[A-Za-z0-9._/-]+|[A-Za-z0-9._/-]+(=|==|!=)[A-Za-z0-9._-]*)(,(!?[A-Za-z0-9._/-]+|[A-Za-z0-9._/-]+(=|==|!=)[A-Za-z0-9._-]*))*$"
    )]
    pub label_selector: Option<String>,
    /// Field selector: `field=v`, `field!=v`, comma-separated, on the kind's
    /// selectable fields (VMs: `status.node`, `status.phase`; migrations:
    /// `status.source_node`, `status.target_node`, `status.phase`, `spec.vm`;
    /// every kind: `metadata.name`, `metadata.project`). A watch sends an
    /// object that stops matching as `Deleted`, and one that starts as `Added`.
    pub field_selector: Option<String>,
    /// Page size (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Token from the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue", pattern = "^([2-7][0-9a-f])*$")]
    pub continue_token: Option<String>,
    /// Stream changes as newline-delimited JSON instead of listing.
    pub watch: Option<bool>,
    /// With `watch`: send changes after this revision (default: now).
    pub resource_version: Option<u64>,
    /// With `watch`: also send `{"type":"Bookmark","resource_version":N}`
    /// lines while changes pass that the selection leaves out (at most one a
    /// second), so the watcher can resume from a recent revision.
    pub allow_bookmarks: Option<bool>,
    /// Only objects of this project.
    pub project: Option<String>,
}

/// An object kind, the resource its permissions are checked as, and the
/// fields a field selector may name.
pub trait Guarded: Object {
    const RESOURCE: Resource;
    const SELECTABLE: &'static [&'static str];
}

macro_rules! guarded {
    ($($t:ty => $r:ident $([$($f:literal),*])?),*) => {
        $(impl Guarded for $t {
            const RESOURCE: Resource = Resource::$r;
            const SELECTABLE: &'static [&'static str] = &["metadata.name", "metadata.project" $($(, $f)*)?];
        })*
    };
}
/// The fields each list operation's field selector may name, for the
/// document (`/v1/KIND` and the kind's selectable fields).
pub fn selectable_fields() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("/v1/vms", Vm::SELECTABLE),
        ("/v1/images", Image::SELECTABLE),
        ("/v1/migrations", Migration::SELECTABLE),
        ("/v1/nodes", Node::SELECTABLE),
        ("/v1/trust", ClusterTrust::SELECTABLE),
        ("/v1/networks", Network::SELECTABLE),
        ("/v1/overlay-peers", OverlayPeers::SELECTABLE),
        ("/v1/security-groups", SecurityGroup::SELECTABLE),
        ("/v1/volumes", Volume::SELECTABLE),
        ("/v1/backup-policies", novacron_api::BackupPolicy::SELECTABLE),
        ("/v1/events", novacron_api::Event::SELECTABLE),
    ]
}

guarded!(Vm => Vms ["status.node", "status.phase"],
    Image => Images,
    Migration => Migrations ["status.source_node", "status.target_node", "status.phase", "spec.vm"],
    Network => Networks, SecurityGroup => Networks, Volume => Volumes, novacron_api::BackupPolicy => Backups,
    novacron_api::Event => Events ["involved.kind", "involved.name", "topic", "type", "node"],
    novacron_api::Webhook => Webhooks,
    Node => Nodes, ClusterTrust => Nodes, OverlayPeers => Nodes, Project => Projects, User => Users, Role => Roles, Token => Tokens, AuditRecord => Audit);

/// The fields that tie an object to the node it concerns: a node's
/// certificate lists, watches and writes only objects with its name in one
/// of them (its VMs; the migrations it is source or target of; itself).
/// `None`: the kind concerns no node, so a node may read it and write none.
fn node_fields(resource: Resource) -> Option<&'static [&'static str]> {
    match resource {
        Resource::Vms => Some(&["status.node"]),
        Resource::Migrations => Some(&["status.source_node", "status.target_node"]),
        Resource::Nodes => Some(&["metadata.name"]),
        _ => None,
    }
}

/// A node's certificate lists and watches only what concerns its node.
fn confine_to_node<T: Guarded>(p: &Principal, fields: &FieldSelector) -> ApiResult<()> {
    let Some(node) = &p.node else {
        return Ok(());
    };
    let required = match T::RESOURCE {
        Resource::Vms | Resource::Migrations => node_fields(T::RESOURCE).unwrap_or_default(),
        _ => return Ok(()),
    };
    if required.iter().any(|field| fields.requires(field, node)) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "Node {node:?} may only list {} of its own node: add field_selector {}={node}",
        T::KIND,
        required.join(format!("={node} or ").as_str())
    )))
}

/// A node's certificate changes only objects that concern its node: a
/// compromised host must not touch another host's VMs or migrations.
fn node_may_change<T: Guarded>(p: &Principal, obj: &T) -> ApiResult<()> {
    let Some(node) = &p.node else {
        return Ok(());
    };
    let value = serde_json::to_value(obj).map_err(|e| ApiError::internal("Cannot encode object", &e))?;
    // The same reading of a field as a field selector's: `field=node` for any of them.
    let concerns_node = node_fields(T::RESOURCE).is_some_and(|fields| {
        fields
            .iter()
            .any(|field| FieldSelector::parse(&format!("{field}={node}"), fields).is_ok_and(|one| one.matches(&value)))
    });
    if concerns_node {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "node {node:?} may change only its own objects, not {} {:?}",
        T::KIND,
        obj.meta().name
    )))
}

/// Whether the caller sees an object of `project` of this kind: objects in
/// projects are visible inside the caller's project; public images everywhere.
fn visible<T: Guarded>(p: &Principal, value: &serde_json::Value) -> bool {
    if !T::RESOURCE.in_project() {
        return true;
    }
    let project = value["metadata"]["project"].as_str().unwrap_or_default();
    p.sees(project) || (T::RESOURCE == Resource::Images && value["spec"]["public"].as_bool() == Some(true))
}

/// Looks an object up by name or id and checks that the caller may `verb` it.
/// Objects of other projects are reported as not found.
pub async fn find_authorized<T: Guarded>(state: &AppState, p: &Principal, key: &str, verb: Verb) -> ApiResult<T> {
    if let Err(refused) = authorize(p, T::RESOURCE, verb, None) {
        // The audit record of a refusal names the project of the object named in the path.
        if T::RESOURCE.in_project() {
            if let Ok(obj) = find::<T>(state, key).await {
                p.audit.set_project(&obj.meta().project);
            }
        }
        return Err(refused);
    }
    let obj = find::<T>(state, key).await?;
    if verb != Verb::Read {
        node_may_change(p, &obj)?;
    }
    if T::RESOURCE.in_project() {
        let project = obj.meta().project.clone();
        if p.sees(&project) {
            authorize(p, T::RESOURCE, verb, Some(&project))?;
        } else {
            // Only reading a public image crosses projects.
            let value = serde_json::to_value(&obj).map_err(|e| ApiError::internal("Cannot encode object", &e))?;
            if verb != Verb::Read || !visible::<T>(p, &value) {
                return Err(ApiError::not_found(format!("{} {key:?}", T::KIND)));
            }
        }
    }
    Ok(obj)
}

/// What a change is to a watcher that sees only objects passing `matches`:
/// an object that starts to match is added, one that stops is deleted.
fn seen_as(ev: &novacron_store::Event, matches: impl Fn(&serde_json::Value) -> bool) -> Option<WatchEventType> {
    let now = matches(&ev.record.value);
    match ev.event_type {
        EventType::Added => now.then_some(WatchEventType::Added),
        EventType::Deleted => now.then_some(WatchEventType::Deleted),
        EventType::Modified => {
            // History from before events kept the previous object: assume it
            // matched, so a watcher never keeps an object that left.
            let was = ev.prev.as_ref().is_none_or(&matches);
            match (was, now) {
                (true, true) => Some(WatchEventType::Modified),
                (false, true) => Some(WatchEventType::Added),
                (true, false) => Some(WatchEventType::Deleted),
                (false, false) => None,
            }
        }
    }
}

/// The store key a `continue` token stands for.
pub fn decode_continue(token: Option<&str>) -> ApiResult<Option<String>> {
    token
        .map(|c| {
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::invalid("continue", "invalid continue token"))
        })
        .transpose()
}

/// Refuses (409) to delete `what` while VMs use it; `uses` says whether a VM does.
pub async fn refuse_while_used(state: &AppState, what: &str, uses: impl Fn(&Vm) -> bool) -> ApiResult<()> {
    let users: Vec<String> = state
        .store
        .list_all::<Vm>()
        .await?
        .into_iter()
        .filter(|v| uses(v))
        .map(|v| v.metadata.name)
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "{what} is used by {} VM(s): {}",
        users.len(),
        users.join(", ")
    )))
}

/// Looks an object up by name, then by id.
pub async fn find<T: Object>(state: &AppState, key: &str) -> ApiResult<T> {
    if let Some(obj) = state.store.get_obj::<T>(key).await? {
        return Ok(obj);
    }
    if let Some(obj) = state.store.get_obj_by_id::<T>(key).await? {
        return Ok(obj);
    }
    Err(ApiError::not_found(format!("{} {key:?}", T::KIND)))
}

/// Bookmarks a watch gets at most this often.
const BOOKMARK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One line of a watch stream.
fn json_line(value: &impl serde::Serialize) -> bytes::Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    bytes::Bytes::from(line)
}

/// Serves a list page or, with `watch=true`, a watch stream. `present` fills
/// in derived fields before an object is returned.
pub async fn list_or_watch<T: Guarded>(
    state: &AppState,
    p: &Principal,
    q: ListQuery,
    present: impl FnOnce(&mut [T]) + Send,
) -> ApiResult<Response> {
    authorize(p, T::RESOURCE, Verb::Read, None)?;
    let selector = LabelSelector::parse(q.label_selector.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::invalid("label_selector", e.message))?;
    let fields = FieldSelector::parse(q.field_selector.as_deref().unwrap_or(""), T::SELECTABLE)
        .map_err(|e| ApiError::invalid("field_selector", e.message))?;
    confine_to_node::<T>(p, &fields)?;
    let caller = p.clone();
    let only_project = q.project.clone();
    let matches = move |value: &serde_json::Value| {
        let labels = &value["metadata"]["labels"];
        selector.matches_by(|k| labels.get(k).and_then(serde_json::Value::as_str))
            && fields.matches(value)
            && visible::<T>(&caller, value)
            && only_project
                .as_deref()
                .is_none_or(|wanted| value["metadata"]["project"].as_str() == Some(wanted))
    };
    if q.watch.unwrap_or(false) {
        let from = match q.resource_version {
            Some(rv) => rv,
            None => state.store.revision().await?,
        };
        let slot = state.open_streams.open(&p.token, Held::Watch)?;
        let events = state.watch_hub.watch(&state.store, T::KIND, from).await?;
        let bookmarks = q.allow_bookmarks.unwrap_or(false);
        let mut last_line = std::time::Instant::now();
        let lines = events.filter_map(move |ev| {
            // The stream holds its place until the client goes away.
            let _held = &slot;
            let out = match ev {
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream ended");
                    Some(Err(std::io::Error::other(e.to_string())))
                }
                Ok(ev) => match seen_as(&ev, &matches) {
                    Some(event_type) => decode_record::<T>(ev.record.clone()).ok().map(|object| {
                        last_line = std::time::Instant::now();
                        Ok(json_line(&WatchEvent { event_type, object }))
                    }),
                    None if bookmarks && last_line.elapsed() >= BOOKMARK_EVERY => {
                        last_line = std::time::Instant::now();
                        Some(Ok(json_line(&novacron_api::WatchBookmark {
                            kind: novacron_api::BookmarkType::Bookmark,
                            resource_version: ev.record.rev,
                        })))
                    }
                    None => None,
                },
            };
            futures::future::ready(out)
        });
        return Ok(([(CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response());
    }

    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let after = decode_continue(q.continue_token.as_deref())?;
    let filter = move |r: &novacron_store::Record| matches(&r.value);
    let page = state
        .store
        .list(T::KIND, Some(&filter), after.as_deref(), limit as usize)
        .await?;
    let mut items = page
        .items
        .into_iter()
        .map(decode_record::<T>)
        .collect::<Result<Vec<T>, _>>()?;
    present(&mut items);
    Ok(Json(List {
        items,
        continue_token: page.more_after.map(hex::encode),
        resource_version: page.revision,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use novacron_store::{Event, EventType, Record};
    use serde_json::{json, Value};

    use super::*;

    fn event(event_type: EventType, node: &str, prev_node: Option<Option<&str>>) -> Event {
        Event {
            event_type,
            record: Record {
                kind: "vm".into(),
                name: "a".into(),
                id: "id-a".into(),
                rev: 2,
                value: json!({"status": {"node": node}}),
            },
            prev: prev_node.map(|n| json!({"status": {"node": n}})),
        }
    }

    #[test]
    fn objects_that_enter_or_leave_a_selection_are_added_or_deleted() {
        let on_node_2 = |v: &Value| v["status"]["node"] == "node-2";
        let seen = |ev: Event| seen_as(&ev, on_node_2);
        assert_eq!(
            seen(event(EventType::Added, "node-2", None)),
            Some(WatchEventType::Added)
        );
        assert_eq!(seen(event(EventType::Added, "node-1", None)), None);
        let moved = |from: Option<&str>, to| seen(event(EventType::Modified, to, Some(from)));
        assert_eq!(moved(Some("node-2"), "node-2"), Some(WatchEventType::Modified));
        assert_eq!(moved(Some("node-1"), "node-1"), None);
        assert_eq!(moved(Some("node-1"), "node-2"), Some(WatchEventType::Added));
        assert_eq!(moved(Some("node-2"), "node-1"), Some(WatchEventType::Deleted));
        assert_eq!(moved(None, "node-2"), Some(WatchEventType::Added));
        // History without the previous object: a watcher never keeps an object that left.
        assert_eq!(
            seen(event(EventType::Modified, "node-1", None)),
            Some(WatchEventType::Deleted)
        );
        assert_eq!(
            seen(event(EventType::Deleted, "node-2", None)),
            Some(WatchEventType::Deleted)
        );
        assert_eq!(seen(event(EventType::Deleted, "node-1", None)), None);
    }
}
