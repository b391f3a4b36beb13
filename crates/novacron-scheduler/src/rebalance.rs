//! Rebalancing (DRS-like): a bounded list of live moves that lowers the
//! imbalance of node utilisation, or empties whole nodes (consolidate). Every
//! move passes the same filters as a placement, so no constraint breaks;
//! each move costs the VM's memory (what live migration copies).

use crate::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RebalanceMode {
    /// Even out utilisation across nodes.
    #[default]
    Balance,
    /// Empty the least used nodes so they can be switched off.
    Consolidate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// What the move copies.
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub moves: Vec<Move>,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub nodes_used_before: usize,
    pub nodes_used_after: usize,
    pub moved_mib: u64,
}

/// Smallest improvement worth a move.
const MIN_GAIN: f64 = 1e-6;
/// VMs of the fullest node tried per move, smallest first.
const CANDIDATES_PER_MOVE: usize = 16;

impl Cluster {
    /// Plans at most `max_moves` moves. The plan is simulated on a copy; the
    /// cluster itself is unchanged.
    pub fn rebalance(&self, mode: RebalanceMode, max_moves: usize) -> Plan {
        let mut sim = self.clone();
        let moves = match mode {
            RebalanceMode::Balance => sim.balance(max_moves),
            RebalanceMode::Consolidate => sim.consolidate(max_moves),
        };
        Plan {
            moved_mib: moves.iter().map(|m| m.memory_mib).sum(),
            imbalance_before: self.imbalance(),
            imbalance_after: sim.imbalance(),
            nodes_used_before: self.nodes_used(),
            nodes_used_after: sim.nodes_used(),
            moves,
        }
    }

    pub(crate) fn move_vm(&mut self, vm: usize, to: usize) -> Move {
        let info = self.uncommit(vm);
        let from = self.nodes[info.node].name.clone();
        let m = Move {
            vm: info.name.clone(),
            from,
            to: self.nodes[to].name.clone(),
            memory_mib: info.request.memory_mib,
        };
        self.commit_with(&info.name, to, info.request, info.movable);
        m
    }

    /// Greedy: from the fullest node, the move that lowers the imbalance most
    /// per MiB copied; stop when no move helps.
    fn balance(&mut self, max_moves: usize) -> Vec<super::Move> {
        let mut moves = Vec::new();
        let ready: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].ready).collect();
        if ready.len() < 2 {
            return moves;
        }
        let n = ready.len() as f64;
        while moves.len() < max_moves {
            let util: Vec<f64> = (0..self.nodes.len()).map(|i| self.utilisation(i)).collect();
            let sum: f64 = ready.iter().map(|&i| util[i]).sum();
            let sumsq: f64 = ready.iter().map(|&i| util[i] * util[i]).sum();
            let variance = |sum: f64, sumsq: f64| (sumsq / n - (sum / n).powi(2)).max(0.0);
            let before = variance(sum, sumsq);
            let Some(&hot) = ready.iter().max_by(|&&a, &&b| {
                util[a]
                    .total_cmp(&util[b])
                    .then_with(|| self.nodes[b].name.cmp(&self.nodes[a].name))
            }) else {
                break;
            };
            let mut on_hot: Vec<usize> = (0..self.vms.len())
                .filter(|&v| self.vms[v].node == hot && self.vms[v].movable)
                .collect();
            on_hot.sort_by(|&a, &b| {
                self.vms[a]
                    .request
                    .memory_mib
                    .cmp(&self.vms[b].request.memory_mib)
                    .then_with(|| self.vms[a].name.cmp(&self.vms[b].name))
            });
            on_hot.truncate(CANDIDATES_PER_MOVE);
            let mut best: Option<(f64, usize, usize)> = None;
            let share = |used: u64, cap: u64| if cap == 0 { 1.0 } else { used as f64 / cap as f64 };
            for &v in &on_hot {
                let req = self.vms[v].request.clone();
                let terms = self.term_counts(&req);
                let (ha, hl) = (self.allocated(hot), self.allocatable(hot));
                let hot_after =
                    share(ha.vcpus - req.vcpus, hl.vcpus).max(share(ha.memory_mib - req.memory_mib, hl.memory_mib));
                // The VM still counts on its node here, which can only make the
                // affinity checks stricter, never looser.
                for &t in &ready {
                    if t == hot || self.filter(t, &req, &terms).is_err() {
                        continue;
                    }
                    let (a, l) = (self.allocated(t), self.allocatable(t));
                    let t_after =
                        share(a.vcpus + req.vcpus, l.vcpus).max(share(a.memory_mib + req.memory_mib, l.memory_mib));
                    let s = sum - util[hot] - util[t] + hot_after + t_after;
                    let sq = sumsq - util[hot].powi(2) - util[t].powi(2) + hot_after.powi(2) + t_after.powi(2);
                    let gain = before - variance(s, sq);
                    if gain <= MIN_GAIN {
                        continue;
                    }
                    let per_mib = gain / req.memory_mib.max(1) as f64;
                    if best.is_none_or(|(g, _, _)| per_mib > g) {
                        best = Some((per_mib, v, t));
                    }
                }
            }
            match best {
                Some((_, v, t)) => moves.push(self.move_vm(v, t)),
                None => break,
            }
        }
        moves
    }

    /// Empties nodes, least used first, when all their VMs fit elsewhere
    /// within the move budget; a node that cannot be emptied is left as it was.
    fn consolidate(&mut self, max_moves: usize) -> Vec<super::Move> {
        let mut moves = Vec::new();
        let mut order: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.vm_count(i) > 0).collect();
        order.sort_by(|&a, &b| {
            self.utilisation(a)
                .total_cmp(&self.utilisation(b))
                .then_with(|| self.nodes[a].name.cmp(&self.nodes[b].name))
        });
        let mut emptied = Vec::new();
        for node in order {
            let count = self.vm_count(node) as usize;
            let pinned = self.vms.iter().any(|vm| vm.node == node && !vm.movable);
            if pinned || moves.len() + count > max_moves {
                continue;
            }
            let mut planned: Vec<(Move, usize)> = Vec::new();
            let mut ok = true;
            while let Some(v) = self.vms.iter().position(|vm| vm.node == node) {
                let req = self.vms[v].request.clone();
                // Pack onto the fullest nodes that are not being emptied.
                let target = (0..self.nodes.len())
                    .filter(|&t| {
                        t != node && !emptied.contains(&t) && self.vm_count(t) > 0 && self.check(t, &req).is_ok()
                    })
                    .max_by(|&a, &b| {
                        self.utilisation(a)
                            .total_cmp(&self.utilisation(b))
                            .then_with(|| self.nodes[b].name.cmp(&self.nodes[a].name))
                    });
                match target {
                    Some(t) => planned.push((self.move_vm(v, t), node)),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                moves.extend(planned.into_iter().map(|(m, _)| m));
                emptied.push(node);
            } else {
                // Put back what moved, last first.
                for (m, from) in planned.into_iter().rev() {
                    if let Some(v) = self.vms.iter().position(|vm| vm.name == m.vm) {
                        self.move_vm(v, from);
                    }
                }
            }
        }
        moves
    }
}
