//! Events: what happened to which object, kept in the store (kind `event`)
//! so they can be listed and watched like any object, and handed to the
//! webhooks. Most are read off changes to VMs, migrations and nodes as the
//! store reports them (one place sees every writer: API, agents,
//! controllers); refusals the API makes (quota) are recorded where they
//! happen. Old events are pruned: at most [`MAX_EVENTS`], none older than
//! [`EVENT_TTL`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use novacron_api::error::chain;
use novacron_api::{Event, Metadata, Migration, MigrationPhase, Node, Object, ObjectRef, Severity, Vm, VmPhase};
use novacron_store::{decode_record, EventType, SharedStore, StoreError, StoreExt};
use serde::de::DeserializeOwned;

use crate::webhooks::Dispatcher;

/// Events kept at most; the oldest go first.
pub const MAX_EVENTS: usize = 10_000;
/// Events older than this are pruned.
pub const EVENT_TTL: Duration = Duration::from_secs(24 * 3600);

/// An event before it has a name and a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub involved: ObjectRef,
    pub project: String,
    pub topic: String,
    pub severity: Severity,
    pub reason: String,
    pub message: String,
    pub node: Option<String>,
}

impl Draft {
    fn about<T: Object>(obj: &T, topic: &str, message: String) -> Draft {
        let m = obj.meta();
        Draft {
            involved: ObjectRef {
                kind: T::KIND.to_string(),
                name: m.name.clone(),
                id: m.id.clone(),
            },
            project: m.project.clone(),
            topic: format!("{}.{topic}", T::KIND),
            severity: Severity::Normal,
            reason: String::new(),
            message,
            node: None,
        }
    }

    fn warning(mut self) -> Draft {
        self.severity = Severity::Warning;
        self
    }

    fn reason(mut self, reason: Option<&str>) -> Draft {
        self.reason = reason.unwrap_or_default().to_string();
        self
    }

    fn on(mut self, node: Option<&str>) -> Draft {
        self.node = node.filter(|n| !n.is_empty()).map(str::to_string);
        self
    }
}

/// Writes events and hands them to the webhooks.
pub struct Recorder {
    store: SharedStore,
    webhooks: Arc<Dispatcher>,
    /// Orders events of the same millisecond (names sort by time).
    sequence: AtomicU64,
}

impl Recorder {
    pub fn new(store: SharedStore, webhooks: Arc<Dispatcher>) -> Recorder {
        Recorder {
            store,
            webhooks,
            sequence: AtomicU64::new(0),
        }
    }

    /// Stores the event and queues its deliveries (which never wait here).
    pub async fn record(&self, draft: Draft) -> Result<Event, StoreError> {
        let now = Utc::now();
        loop {
            let seq = self.sequence.fetch_add(1, Ordering::Relaxed) % 1_000_000;
            // Names sort by time: lists and pruning read them oldest first.
            let name = format!("{:013}-{seq:06}", now.timestamp_millis().max(0));
            let mut metadata = Metadata::new(&name, Default::default());
            metadata.project = draft.project.clone();
            metadata.created_at = now;
            let event = Event {
                metadata,
                involved: draft.involved.clone(),
                topic: draft.topic.clone(),
                severity: draft.severity,
                reason: draft.reason.clone(),
                message: draft.message.clone(),
                node: draft.node.clone(),
            };
            match self.store.create_obj(&event).await {
                Err(StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
                Ok(event) => {
                    tracing::debug!(topic = %event.topic, object = %event.involved, "event");
                    self.webhooks.dispatch(&event);
                    return Ok(event);
                }
            }
        }
    }

    /// Records without waiting (for the API's refusals): a failure is logged.
    pub fn emit(self: &Arc<Self>, draft: Draft) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.record(draft).await {
                tracing::warn!(error = %chain(&e), "cannot record an event");
            }
        });
    }

    /// A refused request that would have taken `project` over a quota.
    pub fn quota_exceeded(self: &Arc<Self>, project: &str, message: &str) {
        self.emit(Draft {
            involved: ObjectRef {
                kind: "project".into(),
                name: project.to_string(),
                id: String::new(),
            },
            project: project.to_string(),
            topic: "project.quota_exceeded".into(),
            severity: Severity::Warning,
            reason: "QuotaExceeded".into(),
            message: message.to_string(),
            node: None,
        });
    }

    /// A backup of `vm` that ended: `Ok(name of the backup)` or why it failed.
    pub fn backup_ended(self: &Arc<Self>, vm: &Vm, outcome: Result<&str, &str>) {
        let draft = match outcome {
            Ok(backup) => Draft::about(vm, "backup", format!("Backup {backup} taken")),
            Err(why) => Draft::about(vm, "backup", format!("Backup failed: {why}")).warning(),
        };
        let topic = if outcome.is_ok() {
            "backup.completed"
        } else {
            "backup.failed"
        };
        self.emit(Draft {
            topic: topic.into(),
            ..draft.on(vm.status.node.as_deref())
        });
    }
}

/// Starts the loops that read events off the store's changes, and pruning.
pub fn spawn(recorder: Arc<Recorder>, store: SharedStore, set: &mut tokio::task::JoinSet<()>) {
    set.spawn(follow::<Vm>(recorder.clone(), store.clone(), vm_events));
    set.spawn(follow::<Migration>(recorder.clone(), store.clone(), migration_events));
    set.spawn(follow::<Node>(recorder, store.clone(), node_events));
    set.spawn(prune_loop(store));
}

/// Follows changes to `T` from now on; each becomes zero or more events.
/// Changes made while the server was down are not replayed: their outcome
/// is in the objects themselves.
async fn follow<T: Object + DeserializeOwned>(
    recorder: Arc<Recorder>,
    store: SharedStore,
    derive: fn(Option<&T>, Option<&T>) -> Vec<Draft>,
) {
    loop {
        let from = match store.revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %chain(&e), kind = T::KIND, "cannot follow changes for events");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut changes = match store.watch(T::KIND, from).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %chain(&e), kind = T::KIND, "cannot follow changes for events");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(change) = changes.next().await {
            let change = match change {
                Ok(c) => c,
                Err(e) => {
                    // Fell behind: some events are lost, the objects are not.
                    tracing::warn!(error = %chain(&e), kind = T::KIND, "events missed changes; following again from now");
                    break;
                }
            };
            let prev = change.prev.and_then(|v| serde_json::from_value::<T>(v).ok());
            let now = match decode_record::<T>(change.record) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), kind = T::KIND, "undecodable object in a change");
                    continue;
                }
            };
            let drafts = match change.event_type {
                EventType::Added => derive(None, Some(&now)),
                EventType::Modified => match &prev {
                    Some(p) => derive(Some(p), Some(&now)),
                    None => Vec::new(),
                },
                EventType::Deleted => derive(Some(&now), None),
            };
            for draft in drafts {
                if let Err(e) = recorder.record(draft).await {
                    tracing::warn!(error = %chain(&e), "cannot record an event");
                }
            }
        }
    }
}

fn lower(phase: impl std::fmt::Display) -> String {
    let s = phase.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A VM made, deleted, in a new phase, or found unschedulable.
pub fn vm_events(before: Option<&Vm>, after: Option<&Vm>) -> Vec<Draft> {
    match (before, after) {
        (None, Some(vm)) => vec![Draft::about(
            vm,
            "created",
            format!(
                "VM created: {} vCPU, {} MiB, image {}",
                vm.spec.vcpus, vm.spec.memory_mib, vm.spec.image
            ),
        )],
        (Some(vm), None) => vec![Draft::about(vm, "deleted", "VM deleted".into()).on(vm.status.node.as_deref())],
        (Some(old), Some(vm)) => {
            let (was, now) = (&old.status, &vm.status);
            let reason = now.reason.as_deref();
            let mut out = Vec::new();
            if was.phase != now.phase {
                let mut message = match (now.phase, now.node.as_deref()) {
                    (VmPhase::Scheduled, Some(node)) => format!("Placed on node {node}"),
                    (phase, Some(node)) => format!("{phase} on node {node}"),
                    (phase, None) => format!("{phase}"),
                };
                if let Some(r) = reason {
                    message.push_str(": ");
                    message.push_str(r);
                }
                let d = Draft::about(vm, &lower(now.phase), message)
                    .reason(reason)
                    .on(now.node.as_deref());
                out.push(if now.phase == VmPhase::Failed { d.warning() } else { d });
            }
            let unschedulable = |r: Option<&str>| r.and_then(|r| r.strip_prefix("Unschedulable: ")).map(str::to_string);
            if let Some(why) = unschedulable(reason) {
                if unschedulable(was.reason.as_deref()).as_deref() != Some(&why) {
                    out.push(
                        Draft::about(vm, "unschedulable", format!("No node can take the VM: {why}"))
                            .reason(Some("Unschedulable"))
                            .warning(),
                    );
                }
            }
            out
        }
        (None, None) => Vec::new(),
    }
}

/// A migration started, completed, failed or cancelled.
pub fn migration_events(before: Option<&Migration>, after: Option<&Migration>) -> Vec<Draft> {
    let (Some(old), Some(m)) = (before, after) else {
        return Vec::new();
    };
    let (was, now) = (&old.status, &m.status);
    if was.phase == now.phase {
        return Vec::new();
    }
    let route = format!("VM {} from {} to {}", m.spec.vm, now.source_node, now.target_node);
    let transport = now.transport.map(|t| format!(" over {t}")).unwrap_or_default();
    let draft = match now.phase {
        MigrationPhase::Completed => {
            let figures = match (now.total_time_ms, now.downtime_ms) {
                (Some(t), Some(d)) => format!(" in {:.1} s, downtime {d} ms", t as f64 / 1000.0),
                _ => String::new(),
            };
            Draft::about(m, "completed", format!("Moved {route}{transport}{figures}"))
        }
        MigrationPhase::Failed => {
            let why = now.error.as_deref().unwrap_or("no reason given");
            Draft::about(m, "failed", format!("Moving {route} failed: {why}"))
                .reason(now.error.as_deref())
                .warning()
        }
        MigrationPhase::Cancelled => Draft::about(m, "cancelled", format!("Moving {route} was cancelled")),
        _ if was.phase == MigrationPhase::Pending => Draft::about(m, "started", format!("Moving {route}{transport}")),
        _ => return Vec::new(),
    };
    vec![draft.on(Some(&now.source_node))]
}

/// A node registered, Ready or NotReady, cordoned or uncordoned.
pub fn node_events(before: Option<&Node>, after: Option<&Node>) -> Vec<Draft> {
    // Nodes are cluster-wide: their events are in no project.
    let about = |n: &Node, topic: &str, message: String| Draft {
        project: String::new(),
        ..Draft::about(n, topic, message).on(Some(&n.metadata.name))
    };
    match (before, after) {
        (None, Some(n)) => vec![about(n, "registered", format!("Node registered at {}", n.spec.address))],
        (Some(n), None) => vec![about(n, "deleted", "Node removed".into())],
        (Some(old), Some(n)) => {
            let mut out = Vec::new();
            if old.status.ready != n.status.ready {
                let reason = n.status.ready_reason.as_deref();
                out.push(if n.status.ready {
                    about(n, "ready", "Node is Ready".into()).reason(reason)
                } else {
                    let why = reason.unwrap_or("no heartbeat");
                    about(n, "not_ready", format!("Node is NotReady: {why}"))
                        .reason(reason)
                        .warning()
                });
            }
            if old.spec.schedulable != n.spec.schedulable {
                out.push(if n.spec.schedulable {
                    about(n, "uncordoned", "Node takes new VMs again".into())
                } else {
                    about(n, "cordoned", "Node takes no new VMs".into())
                });
            }
            out
        }
        (None, None) => Vec::new(),
    }
}

/// Deletes events past [`MAX_EVENTS`] or older than [`EVENT_TTL`], every minute.
async fn prune_loop(store: SharedStore) {
    loop {
        if let Err(e) = prune(&store, MAX_EVENTS, EVENT_TTL).await {
            tracing::warn!(error = %chain(&e), "cannot prune events");
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

pub async fn prune(store: &SharedStore, keep: usize, ttl: Duration) -> Result<usize, StoreError> {
    let events = store.list_all::<Event>().await?;
    let cutoff = Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let excess = events.len().saturating_sub(keep);
    let mut pruned = 0;
    // Names sort by time: the oldest come first.
    for (i, e) in events.iter().enumerate() {
        if i >= excess && e.metadata.created_at >= cutoff {
            break;
        }
        match store.delete(Event::KIND, &e.metadata.name, None).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => pruned += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use novacron_api::VmSpec;

    use super::*;

    fn vm(phase: VmPhase, node: Option<&str>, reason: Option<&str>) -> Vm {
        let mut vm = Vm {
            metadata: Metadata::new("web-1", Default::default()),
            spec: VmSpec::new("img", 1, 128),
            status: Default::default(),
        };
        vm.status.phase = phase;
        vm.status.node = node.map(str::to_string);
        vm.status.reason = reason.map(str::to_string);
        vm
    }

    #[test]
    fn vm_changes_become_events() {
        let topics = |a: Option<&Vm>, b: Option<&Vm>| vm_events(a, b).into_iter().map(|d| d.topic).collect::<Vec<_>>();
        let pending = vm(VmPhase::Pending, None, None);
        assert_eq!(topics(None, Some(&pending)), ["vm.created"]);
        let stuck = vm(VmPhase::Pending, None, Some("Unschedulable: no node has 128 MiB free"));
        assert_eq!(topics(Some(&pending), Some(&stuck)), ["vm.unschedulable"]);
        // The same refusal again is not news.
        assert!(topics(Some(&stuck), Some(&stuck)).is_empty());
        let placed = vm(VmPhase::Scheduled, Some("node-1"), None);
        let ev = vm_events(Some(&stuck), Some(&placed));
        assert_eq!(ev[0].topic, "vm.scheduled");
        assert_eq!(ev[0].message, "Placed on node node-1");
        assert_eq!(ev[0].node.as_deref(), Some("node-1"));
        let failed = vm(VmPhase::Failed, Some("node-1"), Some("QEMU exited with status 1"));
        let ev = vm_events(Some(&placed), Some(&failed));
        assert_eq!(ev[0].topic, "vm.failed");
        assert_eq!(ev[0].severity, Severity::Warning);
        assert_eq!(ev[0].reason, "QEMU exited with status 1");
        assert_eq!(topics(Some(&failed), None), ["vm.deleted"]);
        assert_eq!(lower(VmPhase::Running), "running");
        assert_eq!(lower(MigrationPhase::PreparingTarget), "preparing_target");
    }

    #[test]
    fn migration_and_node_changes_become_events() {
        let mut m = Migration {
            metadata: Metadata::new("mig-1", Default::default()),
            spec: serde_json::from_value(serde_json::json!({"vm": "web-1"})).unwrap(),
            status: Default::default(),
        };
        let pending = m.clone();
        m.status.phase = MigrationPhase::PreparingTarget;
        m.status.source_node = "node-1".into();
        m.status.target_node = "node-2".into();
        let topics = |a: &Migration, b: &Migration| {
            migration_events(Some(a), Some(b))
                .into_iter()
                .map(|d| d.topic)
                .collect::<Vec<_>>()
        };
        assert_eq!(topics(&pending, &m), ["migration.started"]);
        let mut moving = m.clone();
        moving.status.phase = MigrationPhase::Transferring;
        assert!(topics(&m, &moving).is_empty());
        let mut failed = moving.clone();
        failed.status.phase = MigrationPhase::Failed;
        failed.status.error = Some("target refused".into());
        let ev = migration_events(Some(&moving), Some(&failed));
        assert_eq!(ev[0].topic, "migration.failed");
        assert_eq!(
            ev[0].message,
            "Moving VM web-1 from node-1 to node-2 failed: target refused"
        );

        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": Metadata::new("node-1", Default::default()),
            "spec": {"address": "http://127.0.0.1:9"},
            "status": {"capacity": {"vcpus": 2, "memory_mib": 1024}, "ready": true}
        }))
        .unwrap();
        let mut down = node.clone();
        down.status.ready = false;
        down.spec.schedulable = false;
        let ev = node_events(Some(&node), Some(&down));
        let got: Vec<_> = ev.iter().map(|d| (d.topic.as_str(), d.project.as_str())).collect();
        assert_eq!(got, [("node.not_ready", ""), ("node.cordoned", "")]);
    }
}
