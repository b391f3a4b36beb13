//! Placement: pick a node for a VM, explain the choice, and plan rebalancing
//! moves. Pure and deterministic: no I/O, same input → same answer.
//!
//! A [`Cluster`] is a snapshot of nodes and the VMs bound to them. [`Cluster::place`]
//! runs every node through the filters (readiness, cordon, node selector,
//! VM count, capacity with overcommit, required affinity and anti-affinity),
//! counts each rejected node under the filter that rejected it, and scores
//! the feasible ones with weighted objectives that are each normalised to
//! 0..1, so a weight means what it says. [`Cluster::commit`] records a
//! placement, so a batch of VMs can be placed one after another.

mod place;
mod rebalance;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

pub use rebalance::{Move, Plan, RebalanceMode};

/// vCPUs and memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
}

/// Node label naming a node's zone.
pub const ZONE_LABEL: &str = "topology.novacron.io/zone";

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub ready: bool,
    pub schedulable: bool,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    /// Cost per hour (any currency), for the cost objective.
    pub cost_per_hour: f64,
    /// What the node's QEMU runs; `None` when the node did not say (it is
    /// then not filtered on these).
    pub runtime: Option<Runtime>,
}

/// A node's accelerator and what its QEMU offers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Runtime {
    pub accel: String,
    pub machine_types: BTreeSet<String>,
    pub cpu_models: BTreeSet<String>,
}

impl NodeInfo {
    pub fn new(name: &str, vcpus: u64, memory_mib: u64) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            ready: true,
            schedulable: true,
            capacity: Resources { vcpus, memory_mib },
            labels: BTreeMap::new(),
            cost_per_hour: 0.0,
            runtime: None,
        }
    }

    pub fn zone(&self) -> Option<&str> {
        self.labels.get(ZONE_LABEL).map(String::as_str)
    }
}

/// Where an affinity term looks for matching VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Node,
    Zone,
}

/// "Near" (affinity) or "away from" (anti-affinity) VMs whose labels match
/// `selector`, on the same node or in the same zone. Required terms filter;
/// preferred ones score.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityTerm {
    pub selector: BTreeMap<String, String>,
    pub scope: Scope,
    pub anti: bool,
    pub required: bool,
}

/// A VM to place.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    pub vcpus: u64,
    pub memory_mib: u64,
    /// The VM's labels (what other VMs' affinity terms match).
    pub labels: BTreeMap<String, String>,
    /// Node labels the node must have.
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Vec<AffinityTerm>,
    /// The zone the VM wants to be close to.
    pub preferred_zone: Option<String>,
    /// Versioned machine type the VM was pinned to, if any.
    pub machine: Option<String>,
    pub cpu_model: Option<String>,
    /// The accelerator a running VM uses: its memory can only move to a
    /// node with the same one.
    pub accel: Option<String>,
}

impl Request {
    pub fn new(vcpus: u64, memory_mib: u64) -> Request {
        Request {
            vcpus,
            memory_mib,
            ..Default::default()
        }
    }
}

/// Pack VMs onto few nodes, or spread them out (the default, as Nova's RAM
/// weigher does: the emptiest node first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    Binpack,
    #[default]
    Spread,
}

/// How much each objective counts; only their ratios matter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Binpack: nodes in use first, fuller first, then the largest empty
    /// node; spread: emptier nodes first.
    pub packing: f64,
    /// Cheaper nodes first.
    pub cost: f64,
    /// More vCPU headroom left (real CPUs, not overcommitted ones).
    pub headroom: f64,
    /// Nodes in (or near) the VM's preferred zone.
    pub latency: f64,
    /// Preferred affinity and anti-affinity terms satisfied.
    pub affinity: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            packing: 1.0,
            cost: 0.0,
            headroom: 0.0,
            latency: 0.5,
            affinity: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub profile: Profile,
    /// vCPUs allocatable per physical vCPU (e.g. 4.0).
    pub cpu_overcommit: f64,
    /// Memory allocatable per MiB of RAM (1.0 = none).
    pub memory_overcommit: f64,
    /// VMs per node; `None` = no limit.
    pub max_vms_per_node: Option<u32>,
    pub weights: Weights,
    /// Latency in ms between zones; unlisted pairs of different zones count
    /// as `default_zone_latency_ms`, the same zone as 0.
    pub zone_latency_ms: BTreeMap<(String, String), f64>,
    pub default_zone_latency_ms: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            profile: Profile::default(),
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            max_vms_per_node: None,
            weights: Weights::default(),
            zone_latency_ms: BTreeMap::new(),
            default_zone_latency_ms: 50.0,
        }
    }
}

impl Settings {
    fn latency(&self, a: &str, b: &str) -> f64 {
        if a == b {
            return 0.0;
        }
        let key = if a < b { (a, b) } else { (b, a) };
        self.zone_latency_ms
            .get(&(key.0.to_string(), key.1.to_string()))
            .copied()
            .unwrap_or(self.default_zone_latency_ms)
    }
}

/// Why a node was not chosen, in the order the filters run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    NotReady,
    Cordoned,
    NodeSelector,
    TooManyVms,
    InsufficientMemory,
    InsufficientCpu,
    Affinity,
    AntiAffinity,
    MachineType,
    CpuModel,
    Accelerator,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::NotReady => "not ready",
            Rejection::Cordoned => "cordoned",
            Rejection::NodeSelector => "node selector mismatch",
            Rejection::TooManyVms => "at max VMs",
            Rejection::InsufficientMemory => "insufficient memory",
            Rejection::InsufficientCpu => "insufficient vCPU",
            Rejection::Affinity => "required affinity not met",
            Rejection::AntiAffinity => "required anti-affinity violated",
            Rejection::MachineType => "QEMU lacks the VM's machine type",
            Rejection::CpuModel => "QEMU cannot run the VM's CPU model here",
            Rejection::Accelerator => "different accelerator than the running VM",
        })
    }
}

/// No node fits; counts of rejected nodes per reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub total_nodes: usize,
    pub rejections: BTreeMap<Rejection, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total_nodes == 0 {
            return f.write_str("no nodes registered");
        }
        write!(f, "0/{} nodes available", self.total_nodes)?;
        let parts: Vec<String> = self.rejections.iter().map(|(r, n)| format!("{n} {r}")).collect();
        if !parts.is_empty() {
            write!(f, ": {}", parts.join(", "))?;
        }
        Ok(())
    }
}

/// A node's score, objective by objective (each 0..1) and weighted total.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    pub packing: f64,
    pub cost: f64,
    pub headroom: f64,
    pub latency: f64,
    pub affinity: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node: String,
    pub score: Score,
}

/// A placement with its explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub node: String,
    /// Index of the node in the cluster.
    pub index: usize,
    pub score: Score,
    /// The best other nodes, best first (at most [`RUNNERS_UP`]).
    pub runners_up: Vec<Candidate>,
    pub feasible: usize,
    pub rejections: BTreeMap<Rejection, usize>,
}

pub const RUNNERS_UP: usize = 3;

/// A VM bound to a node.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub name: String,
    pub node: usize,
    pub request: Request,
    /// Whether the rebalancer may move it (not when it is already moving,
    /// or is a reservation rather than a VM).
    pub movable: bool,
}

/// A snapshot of the nodes and their VMs. `nodes` must not change after
/// [`Cluster::new`] (their classes are computed there).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<NodeInfo>,
    pub vms: Vec<VmInfo>,
    pub settings: Settings,
    allocated: Vec<Resources>,
    vm_counts: Vec<u32>,
    zones: Vec<Option<u32>>,
    zone_names: Vec<String>,
    /// (label key, value) -> VMs with it, per node index and per zone index.
    by_label: HashMap<(String, String), LabelCount>,
    cost_range: (f64, f64),
    /// Required anti-affinity selectors of placed VMs, by the node (node
    /// scope) or zone (zone scope) they guard: (VM, selector).
    anti_by_node: HashMap<usize, Vec<Guard>>,
    anti_by_zone: HashMap<u32, Vec<Guard>>,
    /// Empty nodes in classes of identical ones (see `place`).
    classes: place::Classes,
    /// Node index by name (the first, should two share one).
    by_name: HashMap<String, usize>,
}

/// A placed VM's required anti-affinity: (the VM, the labels it keeps away).
type Guard = (String, BTreeMap<String, String>);

#[derive(Debug, Clone, Default)]
struct LabelCount {
    per_node: HashMap<usize, u32>,
    per_zone: HashMap<u32, u32>,
}

impl Cluster {
    pub fn new(nodes: Vec<NodeInfo>, settings: Settings) -> Cluster {
        let mut zone_names: Vec<String> = Vec::new();
        let zones = nodes
            .iter()
            .map(|n| {
                n.zone().map(|z| match zone_names.iter().position(|x| x == z) {
                    Some(i) => i as u32,
                    None => {
                        zone_names.push(z.to_string());
                        (zone_names.len() - 1) as u32
                    }
                })
            })
            .collect();
        let (lo, hi) = nodes.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), n| {
            (lo.min(n.cost_per_hour), hi.max(n.cost_per_hour))
        });
        Cluster {
            allocated: vec![Resources::default(); nodes.len()],
            vm_counts: vec![0; nodes.len()],
            zones,
            zone_names,
            by_label: HashMap::new(),
            cost_range: if lo.is_finite() { (lo, hi) } else { (0.0, 0.0) },
            anti_by_node: HashMap::new(),
            anti_by_zone: HashMap::new(),
            classes: place::Classes::new(&nodes),
            by_name: nodes
                .iter()
                .enumerate()
                .rev()
                .map(|(i, n)| (n.name.clone(), i))
                .collect(),
            nodes,
            vms: Vec::new(),
            settings,
        }
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn allocated(&self, node: usize) -> Resources {
        self.allocated[node]
    }

    pub fn vm_count(&self, node: usize) -> u32 {
        self.vm_counts[node]
    }

    /// What a node may hold with overcommit.
    pub fn allocatable(&self, node: usize) -> Resources {
        let c = self.nodes[node].capacity;
        Resources {
            vcpus: (c.vcpus as f64 * self.settings.cpu_overcommit).floor() as u64,
            memory_mib: (c.memory_mib as f64 * self.settings.memory_overcommit).floor() as u64,
        }
    }

    /// Records a VM on a node (placed by [`Cluster::place`] or already there).
    pub fn commit(&mut self, name: &str, node: usize, request: Request) {
        self.commit_with(name, node, request, true);
    }

    /// Records something the rebalancer must leave where it is.
    pub fn commit_fixed(&mut self, name: &str, node: usize, request: Request) {
        self.commit_with(name, node, request, false);
    }

    pub(crate) fn commit_with(&mut self, name: &str, node: usize, request: Request, movable: bool) {
        if self.vm_counts[node] == 0 {
            self.classes.node_filled(node);
        }
        self.allocated[node].vcpus += request.vcpus;
        self.allocated[node].memory_mib += request.memory_mib;
        self.vm_counts[node] += 1;
        let zone = self.zones[node];
        for (k, v) in &request.labels {
            let entry = self.by_label.entry((k.clone(), v.clone())).or_default();
            *entry.per_node.entry(node).or_default() += 1;
            if let Some(z) = zone {
                *entry.per_zone.entry(z).or_default() += 1;
            }
        }
        for term in request.affinity.iter().filter(|t| t.required && t.anti) {
            let entry = (name.to_string(), term.selector.clone());
            match (term.scope, zone) {
                (Scope::Node, _) => self.anti_by_node.entry(node).or_default().push(entry),
                (Scope::Zone, Some(z)) => self.anti_by_zone.entry(z).or_default().push(entry),
                // A node without a zone shares a zone with nobody.
                (Scope::Zone, None) => {}
            }
        }
        self.vms.push(VmInfo {
            name: name.to_string(),
            node,
            request,
            movable,
        });
    }

    /// Takes VM number `vm` off its node (for moves); returns it.
    pub(crate) fn uncommit(&mut self, vm: usize) -> VmInfo {
        let info = self.vms.swap_remove(vm);
        let node = info.node;
        if let Some(list) = self.anti_by_node.get_mut(&node) {
            list.retain(|(name, _)| *name != info.name);
        }
        if let Some(list) = self.zones[node].and_then(|z| self.anti_by_zone.get_mut(&z)) {
            list.retain(|(name, _)| *name != info.name);
        }
        self.allocated[node].vcpus -= info.request.vcpus;
        self.allocated[node].memory_mib -= info.request.memory_mib;
        self.vm_counts[node] -= 1;
        if self.vm_counts[node] == 0 {
            self.classes.node_emptied(node);
        }
        let zone = self.zones[node];
        for (k, v) in &info.request.labels {
            if let Some(entry) = self.by_label.get_mut(&(k.clone(), v.clone())) {
                decrement(&mut entry.per_node, node);
                if let Some(z) = zone {
                    decrement(&mut entry.per_zone, z);
                }
            }
        }
        info
    }

    /// Counts of the VMs each of `req`'s affinity terms matches, per node and
    /// per zone: from the label index for one-label selectors, else by one
    /// scan of the VMs. Done once per placement, not per node.
    fn term_counts(&self, req: &Request) -> Vec<Cow<'_, LabelCount>> {
        req.affinity
            .iter()
            .map(|term| {
                if term.selector.len() == 1 {
                    let key = term.selector.iter().next().map(|(k, v)| (k.clone(), v.clone()));
                    return key
                        .and_then(|k| self.by_label.get(&k))
                        .map(Cow::Borrowed)
                        .unwrap_or_default();
                }
                let mut counts = LabelCount::default();
                for vm in &self.vms {
                    if !term.selector.is_empty()
                        && term.selector.iter().all(|(k, v)| vm.request.labels.get(k) == Some(v))
                    {
                        *counts.per_node.entry(vm.node).or_default() += 1;
                        if let Some(z) = self.zones[vm.node] {
                            *counts.per_zone.entry(z).or_default() += 1;
                        }
                    }
                }
                Cow::Owned(counts)
            })
            .collect()
    }

    fn near(&self, counts: &LabelCount, scope: Scope, node: usize) -> u32 {
        match scope {
            Scope::Node => counts.per_node.get(&node).copied().unwrap_or(0),
            Scope::Zone => self.zones[node]
                .and_then(|z| counts.per_zone.get(&z).copied())
                .unwrap_or(0),
        }
    }

    fn filter(&self, node: usize, req: &Request, terms: &[Cow<'_, LabelCount>]) -> Result<(), Rejection> {
        let n = &self.nodes[node];
        if !n.ready {
            return Err(Rejection::NotReady);
        }
        if !n.schedulable {
            return Err(Rejection::Cordoned);
        }
        if req.node_selector.iter().any(|(k, v)| n.labels.get(k) != Some(v)) {
            return Err(Rejection::NodeSelector);
        }
        if let Some(rt) = &n.runtime {
            if req.accel.as_ref().is_some_and(|a| *a != rt.accel) {
                return Err(Rejection::Accelerator);
            }
            if req.machine.as_ref().is_some_and(|m| !rt.machine_types.contains(m)) {
                return Err(Rejection::MachineType);
            }
            if req.cpu_model.as_ref().is_some_and(|c| !rt.cpu_models.contains(c)) {
                return Err(Rejection::CpuModel);
            }
        }
        if self
            .settings
            .max_vms_per_node
            .is_some_and(|m| self.vm_counts[node] >= m)
        {
            return Err(Rejection::TooManyVms);
        }
        let alloc = self.allocated[node];
        let limit = self.allocatable(node);
        if alloc.memory_mib + req.memory_mib > limit.memory_mib {
            return Err(Rejection::InsufficientMemory);
        }
        if alloc.vcpus + req.vcpus > limit.vcpus {
            return Err(Rejection::InsufficientCpu);
        }
        for (term, counts) in req.affinity.iter().zip(terms).filter(|(t, _)| t.required) {
            let near = self.near(counts, term.scope, node);
            if term.anti && near > 0 {
                return Err(Rejection::AntiAffinity);
            }
            // Affinity to a group with no VMs yet does not block its first member.
            if !term.anti && near == 0 && !counts.per_node.is_empty() {
                return Err(Rejection::Affinity);
            }
        }
        // VMs already here (or in the zone) that must stay away from this one.
        let guarding = self
            .anti_by_node
            .get(&node)
            .into_iter()
            .chain(self.zones[node].and_then(|z| self.anti_by_zone.get(&z)))
            .flatten();
        for (_, selector) in guarding {
            if selector.iter().all(|(k, v)| req.labels.get(k) == Some(v)) {
                return Err(Rejection::AntiAffinity);
            }
        }
        Ok(())
    }

    /// Latency score (0..1) of each zone for a VM preferring `want`.
    fn zone_scores(&self, want: &str) -> Vec<f64> {
        let max = self
            .settings
            .zone_latency_ms
            .values()
            .copied()
            .fold(self.settings.default_zone_latency_ms, f64::max);
        self.zone_names
            .iter()
            .map(|have| {
                if max <= 0.0 {
                    1.0
                } else {
                    (1.0 - self.settings.latency(want, have) / max).clamp(0.0, 1.0)
                }
            })
            .collect()
    }

    fn score(&self, node: usize, req: &Request, terms: &[Cow<'_, LabelCount>], zone_scores: Option<&[f64]>) -> Score {
        let n = &self.nodes[node];
        let w = &self.settings.weights;
        let alloc = self.allocated[node];
        let limit = self.allocatable(node);
        // Share of the node used after placement, by the dominant resource.
        let share = |used: u64, cap: u64| if cap == 0 { 1.0 } else { used as f64 / cap as f64 };
        let after =
            share(alloc.vcpus + req.vcpus, limit.vcpus).max(share(alloc.memory_mib + req.memory_mib, limit.memory_mib));
        let packing = match self.settings.profile {
            // Fewest hosts: a node in use before an empty one, the fullest
            // first; a new node only when none in use fits, the largest
            // first. (Scoring empty nodes by how full the VM makes them
            // opened small nodes first: 26% more hosts than first-fit on
            // mixed node sizes, bench/scheduler.)
            Profile::Binpack if self.vm_counts[node] > 0 => 0.5 + 0.5 * after,
            Profile::Binpack => 0.5 * (1.0 - after),
            Profile::Spread => 1.0 - after,
        };
        let (lo, hi) = self.cost_range;
        let cost = if hi > lo {
            1.0 - (n.cost_per_hour - lo) / (hi - lo)
        } else {
            1.0
        };
        let real = n.capacity.vcpus.max(1) as f64;
        let headroom = (1.0 - (alloc.vcpus + req.vcpus) as f64 / real).clamp(0.0, 1.0);
        let latency = match (zone_scores, self.zones[node]) {
            (None, _) => 1.0,
            (Some(_), None) => 0.0,
            (Some(scores), Some(z)) => scores[z as usize],
        };
        let preferred = req.affinity.iter().zip(terms).filter(|(t, _)| !t.required);
        let (mut met, mut count) = (0usize, 0usize);
        for (term, counts) in preferred {
            count += 1;
            if (self.near(counts, term.scope, node) > 0) != term.anti {
                met += 1;
            }
        }
        let affinity = if count == 0 { 1.0 } else { met as f64 / count as f64 };
        let parts = [
            (w.packing, packing),
            (w.cost, cost),
            (w.headroom, headroom),
            (w.latency, latency),
            (w.affinity, affinity),
        ];
        let sum_w: f64 = parts.iter().map(|(w, _)| w.max(0.0)).sum();
        let total = if sum_w > 0.0 {
            parts.iter().map(|(w, s)| w.max(0.0) * s).sum::<f64>() / sum_w
        } else {
            0.0
        };
        Score {
            packing,
            cost,
            headroom,
            latency,
            affinity,
            total,
        }
    }

    /// Chooses the best feasible node. Ties go to the node that comes first
    /// by name, so the answer does not depend on input order.
    pub fn place(&self, req: &Request) -> Result<Decision, Unschedulable> {
        self.place_excluding(req, None)
    }

    /// Whether `node` passes every filter for `req`, and if not, which filter failed.
    pub fn check(&self, node: usize, req: &Request) -> Result<(), Rejection> {
        let terms = self.term_counts(req);
        self.filter(node, req, &terms)
    }

    /// True when some node could hold the request if it were empty.
    pub fn fits_some_node(&self, req: &Request) -> bool {
        self.nodes.is_empty()
            || (0..self.nodes.len()).any(|i| {
                let a = self.allocatable(i);
                a.memory_mib >= req.memory_mib && a.vcpus >= req.vcpus
            })
    }

    /// Utilisation of a node by its dominant resource (0..1, allocatable basis).
    pub fn utilisation(&self, node: usize) -> f64 {
        let a = self.allocated[node];
        let l = self.allocatable(node);
        let share = |used: u64, cap: u64| if cap == 0 { 0.0 } else { used as f64 / cap as f64 };
        share(a.vcpus, l.vcpus).max(share(a.memory_mib, l.memory_mib))
    }

    /// Standard deviation of node utilisation over Ready nodes: 0 = even.
    pub fn imbalance(&self) -> f64 {
        let u: Vec<f64> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].ready)
            .map(|i| self.utilisation(i))
            .collect();
        if u.is_empty() {
            return 0.0;
        }
        let mean = u.iter().sum::<f64>() / u.len() as f64;
        (u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / u.len() as f64).sqrt()
    }

    /// Nodes with at least one VM.
    pub fn nodes_used(&self) -> usize {
        self.vm_counts.iter().filter(|c| **c > 0).count()
    }

    pub fn zone_name(&self, node: usize) -> Option<&str> {
        self.zones[node].map(|z| self.zone_names[z as usize].as_str())
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(c) = map.get_mut(&key) {
        *c = c.saturating_sub(1);
        if *c == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests;
