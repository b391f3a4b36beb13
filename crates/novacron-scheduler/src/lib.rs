//! Placement: pick a node for a VM from an immutable snapshot of the nodes.
//! Pure and deterministic: no I/O, same input → same answer. Every rejected
//! node is counted under the filter that rejected it, so an unplaceable VM
//! can say why.

use std::collections::BTreeMap;
use std::fmt;

/// What the scheduler needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    pub schedulable: bool,
    pub capacity_vcpus: u32,
    pub capacity_memory_mib: u64,
    pub allocated_vcpus: u32,
    pub allocated_memory_mib: u64,
}

impl NodeView {
    pub fn free_vcpus(&self) -> u32 {
        self.capacity_vcpus.saturating_sub(self.allocated_vcpus)
    }
    pub fn free_memory_mib(&self) -> u64 {
        self.capacity_memory_mib.saturating_sub(self.allocated_memory_mib)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Why a node was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    NotReady,
    Cordoned,
    InsufficientMemory,
    InsufficientCpu,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::NotReady => "not ready",
            Rejection::Cordoned => "cordoned",
            Rejection::InsufficientMemory => "insufficient memory",
            Rejection::InsufficientCpu => "insufficient vCPU",
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

fn filter(node: &NodeView, req: &Request) -> Result<(), Rejection> {
    if !node.ready {
        return Err(Rejection::NotReady);
    }
    if !node.schedulable {
        return Err(Rejection::Cordoned);
    }
    if node.free_memory_mib() < req.memory_mib {
        return Err(Rejection::InsufficientMemory);
    }
    if node.free_vcpus() < req.vcpus {
        return Err(Rejection::InsufficientCpu);
    }
    Ok(())
}

/// Chooses the feasible node with the most free memory (ties: more free vCPU,
/// then name, so the choice is deterministic).
pub fn place<'a>(req: &Request, nodes: &'a [NodeView]) -> Result<&'a NodeView, Unschedulable> {
    let mut rejections = BTreeMap::new();
    let mut best: Option<&NodeView> = None;
    for node in nodes {
        match filter(node, req) {
            Err(r) => *rejections.entry(r).or_insert(0) += 1,
            Ok(()) => {
                let key = |n: &NodeView| (n.free_memory_mib(), n.free_vcpus(), std::cmp::Reverse(n.name.clone()));
                if best.is_none_or(|b| key(node) > key(b)) {
                    best = Some(node);
                }
            }
        }
    }
    best.ok_or(Unschedulable {
        total_nodes: nodes.len(),
        rejections,
    })
}

/// True when some node could hold the request if it were empty: a request
/// that fails this can never be placed and is rejected up front.
pub fn fits_some_node(req: &Request, nodes: &[NodeView]) -> bool {
    nodes.is_empty()
        || nodes
            .iter()
            .any(|n| n.capacity_memory_mib >= req.memory_mib && n.capacity_vcpus >= req.vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, free_mem: u64, free_cpu: u32) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            schedulable: true,
            capacity_vcpus: 8,
            capacity_memory_mib: 8192,
            allocated_vcpus: 8 - free_cpu,
            allocated_memory_mib: 8192 - free_mem,
        }
    }

    #[test]
    fn most_free_memory_wins() {
        let nodes = vec![node("a", 1024, 4), node("b", 4096, 1), node("c", 2048, 8)];
        let req = Request {
            vcpus: 1,
            memory_mib: 512,
        };
        assert_eq!(place(&req, &nodes).map(|n| n.name.as_str()), Ok("b"));
    }

    #[test]
    fn rejections_are_explained() {
        let mut down = node("d", 8192, 8);
        down.ready = false;
        let mut cordoned = node("e", 8192, 8);
        cordoned.schedulable = false;
        let nodes = vec![node("a", 256, 4), node("b", 4096, 0), down, cordoned];
        let err = place(
            &Request {
                vcpus: 1,
                memory_mib: 512,
            },
            &nodes,
        )
        .expect_err("no fit");
        assert_eq!(
            err.to_string(),
            "0/4 nodes available: 1 not ready, 1 cordoned, 1 insufficient memory, 1 insufficient vCPU"
        );
        assert_eq!(
            place(
                &Request {
                    vcpus: 1,
                    memory_mib: 1
                },
                &[]
            )
            .expect_err("none")
            .to_string(),
            "no nodes registered"
        );
    }

    proptest! {
        #[test]
        fn placement_never_overcommits(
            frees in proptest::collection::vec((0u64..8192, 0u32..8), 0..20),
            mem in 1u64..8192, cpu in 1u32..8,
        ) {
            let nodes: Vec<_> = frees.iter().enumerate().map(|(i, (m, c))| node(&format!("n{i}"), *m, *c)).collect();
            let req = Request { vcpus: cpu, memory_mib: mem };
            match place(&req, &nodes) {
                Ok(n) => prop_assert!(n.free_memory_mib() >= mem && n.free_vcpus() >= cpu),
                Err(e) => {
                    prop_assert!(nodes.iter().all(|n| n.free_memory_mib() < mem || n.free_vcpus() < cpu));
                    prop_assert_eq!(e.rejections.values().sum::<usize>(), nodes.len());
                }
            }
        }
    }
}
