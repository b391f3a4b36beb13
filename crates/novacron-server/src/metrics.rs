//! The control plane's Prometheus metrics, served at `/metrics` as
//! OpenMetrics text to callers with `metrics:read`: API request durations
//! and scheduler decisions as they happen, and nodes, VMs and migrations as
//! the store holds them at each scrape. Names follow KubeVirt's style
//! (`novacron_<object>_<what>_<unit>`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use novacron_api::migration::Migration;
use novacron_api::{Node, Resource, Verb, Vm};
use novacron_metrics::{gauges, VmLabels, OPENMETRICS};
use novacron_store::StoreExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{authorize, Principal};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route's pattern (`/v1/vms/{name}`), not the path: one series per route.
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndedLabels {
    phase: String,
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: String,
}

/// Metrics counted as things happen on this server (the rest is read from
/// the store at each scrape).
pub struct Metrics {
    requests: Family<RequestLabels, Histogram>,
    scheduler_decisions: Histogram,
    unschedulable: Counter,
    migrations_ended: Family<EndedLabels, Counter>,
    migration_durations: Family<TransportLabels, Histogram>,
    migration_downtimes: Family<TransportLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 1 ms to ~33 s.
            requests: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            // 10 µs to ~0.3 s.
            scheduler_decisions: Histogram::new(exponential_buckets(0.000_01, 2.0, 16)),
            unschedulable: Counter::default(),
            migrations_ended: Family::default(),
            // 0.5 s to ~34 min.
            migration_durations: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.5, 2.0, 12))),
            // 1 ms to ~16 s.
            migration_downtimes: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15))),
        }
    }
}

impl Metrics {
    /// One placement decision of the scheduler, and whether it found a node.
    pub fn placement(&self, took: std::time::Duration, placed: bool) {
        self.scheduler_decisions.observe(took.as_secs_f64());
        if !placed {
            self.unschedulable.inc();
        }
    }

    /// Migration `m` has just ended (its final status): counted by outcome
    /// and transport; a completed one's duration and downtime observed.
    pub fn migration_ended(&self, m: &Migration) {
        let transport = transport_of(m);
        let ended = EndedLabels {
            phase: m.status.phase.to_string(),
            transport: transport.clone(),
        };
        self.migrations_ended.get_or_create(&ended).inc();
        if m.status.phase != novacron_api::MigrationPhase::Completed {
            return;
        }
        let labels = TransportLabels { transport };
        if let Some(ms) = m.status.total_time_ms {
            self.migration_durations
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
        }
        if let Some(ms) = m.status.downtime_ms {
            self.migration_downtimes
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
        }
    }
}

/// A migration's transport as a label (`none` before it has one).
fn transport_of(m: &Migration) -> String {
    m.status
        .transport
        .map(|t| t.to_string())
        .unwrap_or_else(|| "none".into())
}

/// Times every request, by route pattern, method and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16().to_string(),
    };
    state
        .metrics
        .requests
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// The control plane's metrics in the OpenMetrics text format (for
/// Prometheus; needs `metrics:read`).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
async fn scrape(State(state): State<AppState>, Extension(p): Extension<Principal>) -> ApiResult<Response> {
    authorize(&p, Resource::Metrics, Verb::Read, None)?;
    if let Some(own) = &p.project {
        return Err(ApiError::forbidden(format!(
            "the metrics cover every project; this token is limited to {own:?}"
        )));
    }
    let nodes = state.store.list_all::<Node>().await?;
    let vms = state.store.list_all::<Vm>().await?;
    let migrations = state.store.list_all::<Migration>().await?;
    let mut registry = Registry::default();
    let m = &state.metrics;
    registry.register(
        "novacron_api_request_duration_seconds",
        "API requests by route, method and status",
        m.requests.clone(),
    );
    registry.register(
        "novacron_scheduler_decision_duration_seconds",
        "Time the scheduler took to place one VM",
        m.scheduler_decisions.clone(),
    );
    registry.register(
        "novacron_scheduler_unschedulable",
        "Placement decisions that found no node",
        m.unschedulable.clone(),
    );
    registry.register(
        "novacron_migrations_ended",
        "Migrations that ended while this server ran, by outcome and transport",
        m.migrations_ended.clone(),
    );
    registry.register(
        "novacron_migrations_duration_seconds",
        "How long completed migrations took, by transport",
        m.migration_durations.clone(),
    );
    registry.register(
        "novacron_migrations_downtime_seconds",
        "Guest downtime of completed migrations, by transport",
        m.migration_downtimes.clone(),
    );
    // Every Ready node's VM counters, at once; a node that does not answer
    // in time is left out (and says so in novacron_node_stats_up).
    let asked = nodes.iter().filter(|n| n.status.ready).map(|n| {
        let state = &state;
        async move { (n.metadata.name.clone(), crate::proxy::vm_stats(state, n).await) }
    });
    let stats = futures::future::join_all(asked).await;
    register_nodes(&mut registry, &nodes);
    register_vms(&mut registry, &vms);
    register_vm_stats(&mut registry, &vms, &stats);
    register_migrations(&mut registry, &migrations);
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)
        .map_err(|e| ApiError::internal("Cannot encode the metrics", &e))?;
    Ok(([(CONTENT_TYPE, OPENMETRICS)], body).into_response())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

fn register_nodes(registry: &mut Registry, nodes: &[Node]) {
    let each = |f: fn(&Node) -> f64| {
        nodes
            .iter()
            .map(move |n| {
                (
                    NodeLabels {
                        node: n.metadata.name.clone(),
                    },
                    f(n),
                )
            })
            .collect::<Vec<_>>()
    };
    gauges(
        registry,
        "novacron_node_ready",
        "1 when the node's agent is Ready",
        each(|n| f64::from(u8::from(n.status.ready))),
    );
    gauges(
        registry,
        "novacron_node_schedulable",
        "1 unless the node is cordoned",
        each(|n| f64::from(u8::from(n.spec.schedulable))),
    );
    gauges(
        registry,
        "novacron_node_capacity_cpu_cores",
        "vCPUs the node offers",
        each(|n| f64::from(n.status.capacity.vcpus)),
    );
    gauges(
        registry,
        "novacron_node_capacity_memory_bytes",
        "Memory the node offers",
        each(|n| n.status.capacity.memory_mib as f64 * MIB),
    );
    gauges(
        registry,
        "novacron_node_allocated_cpu_cores",
        "vCPUs of the VMs placed on the node",
        each(|n| f64::from(n.status.allocated.vcpus)),
    );
    gauges(
        registry,
        "novacron_node_allocated_memory_bytes",
        "Memory of the VMs placed on the node",
        each(|n| n.status.allocated.memory_mib as f64 * MIB),
    );
    gauges(
        registry,
        "novacron_node_vms",
        "VMs placed on the node",
        each(|n| f64::from(n.status.vm_count)),
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmPhaseLabels {
    vm: String,
    project: String,
    node: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

fn register_vms(registry: &mut Registry, vms: &[Vm]) {
    let labels = |v: &Vm| VmPhaseLabels {
        vm: v.metadata.name.clone(),
        project: v.metadata.project.clone(),
        node: v.status.node.clone().unwrap_or_default(),
        phase: v.status.phase.to_string(),
    };
    gauges(
        registry,
        "novacron_vm_phase",
        "1 for each VM, labelled with its phase and node",
        vms.iter().map(|v| (labels(v), 1.0)),
    );
    gauges(
        registry,
        "novacron_vm_vcpus",
        "vCPUs of the VM",
        vms.iter().map(|v| (labels(v), f64::from(v.spec.vcpus))),
    );
    gauges(
        registry,
        "novacron_vm_memory_bytes",
        "Memory of the VM",
        vms.iter().map(|v| (labels(v), v.spec.memory_mib as f64 * MIB)),
    );
    let mut by_phase = std::collections::BTreeMap::<String, f64>::new();
    for v in vms {
        *by_phase.entry(v.status.phase.to_string()).or_default() += 1.0;
    }
    gauges(
        registry,
        "novacron_vms",
        "VMs by phase",
        by_phase.into_iter().map(|(phase, n)| (PhaseLabels { phase }, n)),
    );
}

type NodeStats = (String, ApiResult<Vec<novacron_api::agent::VmStats>>);

fn register_vm_stats(registry: &mut Registry, vms: &[Vm], stats: &[NodeStats]) {
    let by_id: std::collections::HashMap<&str, &Vm> = vms.iter().map(|v| (v.metadata.id.as_str(), v)).collect();
    gauges(
        registry,
        "novacron_node_stats_up",
        "1 when the node's agent gave its VMs' counters at this scrape",
        stats
            .iter()
            .map(|(node, got)| (NodeLabels { node: node.clone() }, f64::from(u8::from(got.is_ok())))),
    );
    // The counters of the VMs the store knows, labelled as the store names them.
    let each: Vec<(VmLabels, &novacron_api::agent::VmStats)> = stats
        .iter()
        .filter_map(|(node, got)| Some((node.as_str(), got.as_ref().ok()?)))
        .flat_map(|(node, list)| list.iter().map(move |s| (node, s)))
        .filter_map(|(node, s)| {
            let v = by_id.get(s.vm_id.as_str())?;
            let labels = VmLabels {
                vm: v.metadata.name.clone(),
                project: v.metadata.project.clone(),
                node: node.to_string(),
            };
            Some((labels, s))
        })
        .collect();
    novacron_metrics::register_vm_stats(registry, &each);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    migration: String,
    vm: String,
    phase: String,
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    phase: String,
    transport: String,
}

fn register_migrations(registry: &mut Registry, migrations: &[Migration]) {
    let transport = transport_of;
    let labels = |m: &Migration| MigrationLabels {
        migration: m.metadata.name.clone(),
        vm: m.spec.vm.clone(),
        phase: m.status.phase.to_string(),
        transport: transport(m),
    };
    let each = |f: fn(&Migration) -> Option<f64>| {
        migrations
            .iter()
            .filter_map(|m| Some((labels(m), f(m)?)))
            .collect::<Vec<_>>()
    };
    gauges(
        registry,
        "novacron_migration_data_processed_bytes",
        "Bytes a migration has sent",
        each(|m| Some(m.status.progress.transferred_bytes as f64)),
    );
    gauges(
        registry,
        "novacron_migration_data_remaining_bytes",
        "Bytes a migration has still to send",
        each(|m| Some(m.status.progress.remaining_bytes as f64)),
    );
    gauges(
        registry,
        "novacron_migration_dirty_memory_rate_bytes",
        "Bytes per second the guest dirties during the migration",
        each(|m| Some(m.status.progress.dirty_rate_bytes_s as f64)),
    );
    gauges(
        registry,
        "novacron_migration_throughput_bytes",
        "Bytes per second the migration sends",
        each(|m| Some(m.status.progress.throughput_bytes_s as f64)),
    );
    gauges(
        registry,
        "novacron_migration_duration_seconds",
        "How long the migration took (once ended)",
        each(|m| m.status.total_time_ms.map(|t| t as f64 / 1000.0)),
    );
    gauges(
        registry,
        "novacron_migration_downtime_seconds",
        "The guest's downtime in the migration (once ended)",
        each(|m| m.status.downtime_ms.map(|t| t as f64 / 1000.0)),
    );
    let mut by_outcome = std::collections::BTreeMap::<(String, String), f64>::new();
    for m in migrations {
        *by_outcome
            .entry((m.status.phase.to_string(), transport(m)))
            .or_default() += 1.0;
    }
    gauges(
        registry,
        "novacron_migrations",
        "Migrations the store holds, by phase and transport",
        by_outcome
            .into_iter()
            .map(|((phase, transport), n)| (OutcomeLabels { phase, transport }, n)),
    );
}
