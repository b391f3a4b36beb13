//! Placement constraints of a VM, the cluster's scheduler settings, and the
//! explanations and plans the scheduler returns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::types::Metadata;

/// Where a VM may and would like to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Placement {
    /// Node labels the node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<AffinityRule>,
    /// Zone (node label `topology.novacron.io/zone`) the VM wants to be near.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_zone: Option<String>,
    /// When several VMs wait for room, higher priorities are placed first.
    #[serde(default)]
    pub priority: i32,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        *self == Placement::default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AffinityScope {
    #[default]
    Node,
    Zone,
}

/// Near (or, with `anti`, away from) VMs whose labels include `selector`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AffinityRule {
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub scope: AffinityScope,
    #[serde(default)]
    pub anti: bool,
    /// Required rules filter nodes; preferred ones (false) only score.
    #[serde(default = "default_true")]
    pub required: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingProfile {
    /// Fill nodes before using new ones.
    Binpack,
    /// Keep nodes evenly used (the emptiest node first).
    #[default]
    Spread,
}

/// Relative weights of the scoring objectives (only ratios matter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScoreWeights {
    pub packing: f64,
    pub cost: f64,
    pub headroom: f64,
    pub latency: f64,
    pub affinity: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            packing: 1.0,
            cost: 0.0,
            headroom: 0.0,
            latency: 0.5,
            affinity: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ZoneLatency {
    pub a: String,
    pub b: String,
    pub ms: f64,
}

/// Cluster-wide scheduler settings (one object, named `cluster`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchedulerConfig {
    pub metadata: Metadata,
    #[serde(flatten)]
    pub settings: SchedulerSettings,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            metadata: Metadata::new("cluster", Default::default()),
            settings: SchedulerSettings::default(),
        }
    }
}

/// The settings themselves; also the body of `PUT /v1/scheduler`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SchedulerSettings {
    #[serde(default)]
    pub profile: SchedulingProfile,
    /// vCPUs allocatable per host vCPU (1 = no overcommit).
    #[serde(default = "one")]
    pub cpu_overcommit: f64,
    /// Memory allocatable per MiB of host memory.
    #[serde(default = "one")]
    pub memory_overcommit: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms_per_node: Option<u32>,
    #[serde(default)]
    pub weights: ScoreWeights,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone_latency_ms: Vec<ZoneLatency>,
    /// Latency between different zones not listed above.
    #[serde(default = "default_zone_latency")]
    pub default_zone_latency_ms: f64,
    /// CPU model new VMs get unless they ask for one: a baseline every
    /// node can offer, so VMs can move between them.
    #[serde(default = "default_cpu_model")]
    pub default_cpu_model: String,
}

/// QEMU's 64-bit baseline CPU: every x86-64 host and TCG offer it.
pub fn default_cpu_model() -> String {
    "qemu64".into()
}

fn one() -> f64 {
    1.0
}

fn default_zone_latency() -> f64 {
    50.0
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            profile: SchedulingProfile::default(),
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            max_vms_per_node: None,
            weights: ScoreWeights::default(),
            zone_latency_ms: Vec::new(),
            default_zone_latency_ms: default_zone_latency(),
            default_cpu_model: default_cpu_model(),
        }
    }
}

/// One node's score, objective by objective (0..1 each) and weighted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CandidateScore {
    pub node: String,
    pub total: f64,
    pub packing: f64,
    pub cost: f64,
    pub headroom: f64,
    pub latency: f64,
    pub affinity: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RejectionCount {
    pub reason: String,
    pub nodes: usize,
}

/// Why a VM goes (or would go) where it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementExplanation {
    /// The chosen node; absent when none fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub total_nodes: usize,
    pub feasible: usize,
    /// Nodes filtered out, by the filter that rejected them.
    pub rejected: Vec<RejectionCount>,
    /// The winner first, then the runners-up.
    pub candidates: Vec<CandidateScore>,
    /// One line: "node-2 (score 0.81); 812 nodes: insufficient memory, ...".
    pub summary: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RebalanceMode {
    /// Even out node utilisation.
    #[default]
    Balance,
    /// Empty the least used nodes.
    Consolidate,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RebalanceRequest {
    #[serde(default)]
    pub mode: RebalanceMode,
    /// Most moves in the plan (default 10).
    #[serde(default)]
    pub max_moves: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub memory_mib: u64,
}

/// A plan of live migrations and what it is predicted to achieve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalancePlan {
    pub mode: RebalanceMode,
    pub moves: Vec<PlannedMove>,
    /// Standard deviation of node utilisation (0 = even).
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub nodes_used_before: usize,
    pub nodes_used_after: usize,
    /// Memory the moves copy.
    pub moved_mib: u64,
}
