//! Choosing a node without scoring every node. Two things make a decision
//! cheap while keeping it exactly the one a full scan makes:
//!
//! 1. **Empty nodes in classes.** An empty node's filter result and score
//!    depend only on what the node is (readiness, cordon, capacity, labels —
//!    its zone among them —, cost, runtime) and on its zone's VMs, never on
//!    VMs of its own. Empty nodes that are alike form a class; a decision
//!    filters and scores one of them (the first by name, which is also the
//!    one ties go to) and counts the class's size. A fleet of identical
//!    hosts is a handful of classes, however many of them are empty.
//! 2. **Capacity first.** For a request without node selector or runtime
//!    constraints, the filters before the capacity check depend only on
//!    readiness, cordon and VM count; these and the free capacity are
//!    checked first, so the nodes a request does not fit (most nodes of a
//!    well-packed cluster) are counted under the same rejection a full
//!    filter gives, without the full filter (affinity counts, guards).
//!
//! So the decision, its score, the runners-up and every count are those of
//! the full scan (`tests.rs` checks it on random clusters against one).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{Candidate, Cluster, Decision, NodeInfo, Rejection, Request, Score, Unschedulable, RUNNERS_UP};

/// What makes two empty nodes alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Signature {
    ready: bool,
    schedulable: bool,
    vcpus: u64,
    memory_mib: u64,
    labels: Vec<(String, String)>,
    cost_bits: u64,
    runtime: Option<(String, Vec<String>, Vec<String>)>,
}

impl Signature {
    fn of(n: &NodeInfo) -> Signature {
        Signature {
            ready: n.ready,
            schedulable: n.schedulable,
            vcpus: n.capacity.vcpus,
            memory_mib: n.capacity.memory_mib,
            labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            cost_bits: n.cost_per_hour.to_bits(),
            runtime: n.runtime.as_ref().map(|r| {
                (
                    r.accel.clone(),
                    r.machine_types.iter().cloned().collect(),
                    r.cpu_models.iter().cloned().collect(),
                )
            }),
        }
    }
}

/// Classes of alike nodes, and which of their nodes are empty now.
#[derive(Debug, Clone, Default)]
pub(crate) struct Classes {
    class_of: Vec<u32>,
    /// Per node, its position in name order (ties between nodes of equal
    /// score go to the first by name).
    rank: Vec<u32>,
    /// Per class, its empty nodes as (rank, index), in name order.
    empty: Vec<BTreeSet<(u32, usize)>>,
}

impl Classes {
    pub(crate) fn new(nodes: &[NodeInfo]) -> Classes {
        let mut ids: HashMap<Signature, u32> = HashMap::new();
        let class_of: Vec<u32> = nodes
            .iter()
            .map(|n| {
                let next = ids.len() as u32;
                *ids.entry(Signature::of(n)).or_insert(next)
            })
            .collect();
        let mut by_name: Vec<usize> = (0..nodes.len()).collect();
        by_name.sort_by(|a, b| nodes[*a].name.cmp(&nodes[*b].name));
        let mut rank = vec![0u32; nodes.len()];
        for (r, i) in by_name.into_iter().enumerate() {
            rank[i] = r as u32;
        }
        let mut empty = vec![BTreeSet::new(); ids.len()];
        for (i, c) in class_of.iter().enumerate() {
            empty[*c as usize].insert((rank[i], i));
        }
        Classes { class_of, rank, empty }
    }

    /// Node `i` got its first VM.
    pub(crate) fn node_filled(&mut self, i: usize) {
        let key = (self.rank[i], i);
        self.empty[self.class_of[i] as usize].remove(&key);
    }

    /// Node `i` lost its last VM.
    pub(crate) fn node_emptied(&mut self, i: usize) {
        let key = (self.rank[i], i);
        self.empty[self.class_of[i] as usize].insert(key);
    }
}

/// The best feasible nodes so far, best first (at most RUNNERS_UP + 1).
struct Top<'a> {
    cluster: &'a Cluster,
    best: Vec<(usize, Score)>,
}

impl Top<'_> {
    /// Offers node `i` with score `s`; returns whether it was kept.
    fn offer(&mut self, i: usize, s: Score) -> bool {
        let rank = &self.cluster.classes.rank;
        let better = |(j, t): &(usize, Score)| s.total > t.total || (s.total == t.total && rank[i] < rank[*j]);
        if self.best.len() <= RUNNERS_UP || self.best.last().is_some_and(better) {
            let pos = self.best.iter().position(better).unwrap_or(self.best.len());
            self.best.insert(pos, (i, s));
            self.best.truncate(RUNNERS_UP + 1);
            return true;
        }
        false
    }
}

impl Cluster {
    /// Like [`Cluster::place`], without node `exclude` (a migration's source).
    pub fn place_excluding(&self, req: &Request, exclude: Option<usize>) -> Result<Decision, Unschedulable> {
        let mut rejections: BTreeMap<Rejection, usize> = BTreeMap::new();
        let mut top = Top {
            cluster: self,
            best: Vec::with_capacity(RUNNERS_UP + 2),
        };
        let mut feasible = 0;
        let terms = self.term_counts(req);
        let zone_scores = req.preferred_zone.as_deref().map(|z| self.zone_scores(z));
        // Only readiness, cordon and VM count come before capacity.
        let plain =
            req.node_selector.is_empty() && req.accel.is_none() && req.machine.is_none() && req.cpu_model.is_none();
        let (cpu_ratio, mem_ratio) = (self.settings.cpu_overcommit, self.settings.memory_overcommit);
        let max_vms = self.settings.max_vms_per_node;
        for i in 0..self.nodes.len() {
            if self.vm_counts[i] == 0 || Some(i) == exclude {
                continue;
            }
            if plain {
                let n = &self.nodes[i];
                let early = if !n.ready {
                    Some(Rejection::NotReady)
                } else if !n.schedulable {
                    Some(Rejection::Cordoned)
                } else if max_vms.is_some_and(|m| self.vm_counts[i] >= m) {
                    Some(Rejection::TooManyVms)
                } else {
                    let alloc = self.allocated[i];
                    let cap = n.capacity;
                    if alloc.memory_mib + req.memory_mib > (cap.memory_mib as f64 * mem_ratio).floor() as u64 {
                        Some(Rejection::InsufficientMemory)
                    } else if alloc.vcpus + req.vcpus > (cap.vcpus as f64 * cpu_ratio).floor() as u64 {
                        Some(Rejection::InsufficientCpu)
                    } else {
                        None
                    }
                };
                if let Some(r) = early {
                    *rejections.entry(r).or_insert(0) += 1;
                    continue;
                }
            }
            match self.filter(i, req, &terms) {
                Err(r) => *rejections.entry(r).or_insert(0) += 1,
                Ok(()) => {
                    feasible += 1;
                    top.offer(i, self.score(i, req, &terms, zone_scores.as_deref()));
                }
            }
        }
        for members in &self.classes.empty {
            let mut members = members.iter().map(|(_, i)| *i).filter(|i| Some(*i) != exclude);
            let Some(first) = members.next() else {
                continue;
            };
            let size = 1 + members.clone().count();
            match self.filter(first, req, &terms) {
                Err(r) => *rejections.entry(r).or_insert(0) += size,
                Ok(()) => {
                    feasible += size;
                    let s = self.score(first, req, &terms, zone_scores.as_deref());
                    // Alike nodes score alike: they follow in name order
                    // while they still make the list.
                    if top.offer(first, s) {
                        for i in members {
                            if !top.offer(i, s) {
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.decision(top, feasible, rejections, exclude)
    }

    /// The best node of `top` with its runners-up, or why there is none.
    fn decision(
        &self,
        top: Top<'_>,
        feasible: usize,
        rejections: BTreeMap<Rejection, usize>,
        exclude: Option<usize>,
    ) -> Result<Decision, Unschedulable> {
        let total_nodes = self.nodes.len() - usize::from(exclude.is_some());
        let mut best = top.best.into_iter();
        let Some((index, score)) = best.next() else {
            return Err(Unschedulable {
                total_nodes,
                rejections,
            });
        };
        Ok(Decision {
            node: self.nodes[index].name.clone(),
            index,
            score,
            runners_up: best
                .map(|(i, s)| Candidate {
                    node: self.nodes[i].name.clone(),
                    score: s,
                })
                .collect(),
            feasible,
            rejections,
        })
    }

    /// Every node filtered and scored, one by one: what
    /// [`Cluster::place_excluding`] must agree with.
    #[cfg(test)]
    pub(crate) fn place_by_full_scan(&self, req: &Request, exclude: Option<usize>) -> Result<Decision, Unschedulable> {
        let mut rejections: BTreeMap<Rejection, usize> = BTreeMap::new();
        let mut top = Top {
            cluster: self,
            best: Vec::new(),
        };
        let mut feasible = 0;
        let terms = self.term_counts(req);
        let zone_scores = req.preferred_zone.as_deref().map(|z| self.zone_scores(z));
        for i in (0..self.nodes.len()).filter(|i| Some(*i) != exclude) {
            match self.filter(i, req, &terms) {
                Err(r) => *rejections.entry(r).or_insert(0) += 1,
                Ok(()) => {
                    feasible += 1;
                    top.offer(i, self.score(i, req, &terms, zone_scores.as_deref()));
                }
            }
        }
        self.decision(top, feasible, rejections, exclude)
    }
}
