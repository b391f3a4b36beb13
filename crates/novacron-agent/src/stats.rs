//! Counters of the VMs running on this node, for the server's metrics: the
//! CPU time and resident memory of each QEMU process (`/proc`), its drives'
//! I/O (QMP `query-blockstats`) and its taps' traffic (`/proc/net/dev`, of
//! this agent's network namespace, turned round to the guest's side).

use std::collections::HashMap;
use std::time::Duration;

use novacron_api::agent::{VmDiskStats, VmNicStats, VmStats};
use novacron_qmp::commands::QueryBlockstats;
use novacron_qmp::Qmp;

use crate::node::NodeContext;
use crate::qemu::VmDir;

/// How long a VM's monitor may take to answer; one held by a migration or
/// a backup does not hold up the rest.
const QMP_WAIT: Duration = Duration::from_secs(1);

/// Every running VM's counters.
pub async fn collect(node: &NodeContext) -> Vec<VmStats> {
    let Ok(entries) = std::fs::read_dir(&node.vms_root) else {
        return Vec::new();
    };
    let taps = taps();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = VmDir::new(&node.vms_root, &id);
        let Some(pid) = dir.running_pid() else {
            continue;
        };
        let Some((cpu_seconds, resident_bytes)) = process(pid) else {
            continue;
        };
        let prefix = crate::network::tap_prefix(&id, &node.name);
        let nics = taps
            .iter()
            .filter_map(|(name, (rx, tx))| {
                let slot = name.strip_prefix(&prefix)?;
                Some(VmNicStats {
                    interface: format!("nic{slot}"),
                    // What the tap receives, the guest sent.
                    receive_bytes: *tx,
                    transmit_bytes: *rx,
                })
            })
            .collect();
        out.push(VmStats {
            disks: drives(&dir).await,
            vm_id: id,
            cpu_seconds,
            resident_bytes,
            nics,
        });
    }
    out
}

/// CPU seconds and resident bytes of process `pid`.
fn process(pid: u32) -> Option<(f64, u64)> {
    use nix::unistd::{sysconf, SysconfVar};
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of proc(5), counted from field 3 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = sysconf(SysconfVar::CLK_TCK).ok()??;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok()??;
    Some((ticks as f64 / per_second as f64, pages * page as u64))
}

/// The VM's drives' counters, or none if its monitor is busy.
async fn drives(dir: &VmDir) -> Vec<VmDiskStats> {
    let asked = async {
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_WAIT).await.ok()?;
        qmp.run(&QueryBlockstats).await.ok()
    };
    let Ok(Some(stats)) = tokio::time::timeout(QMP_WAIT * 2, asked).await else {
        return Vec::new();
    };
    stats
        .into_iter()
        .filter_map(|s| {
            // `root-dev`, or a QOM path ending in it.
            let qdev = s.qdev?;
            let device = qdev.rsplit('/').find(|p| p.ends_with("-dev"))?;
            Some(VmDiskStats {
                drive: device.trim_end_matches("-dev").to_string(),
                read_bytes: s.stats.rd_bytes,
                write_bytes: s.stats.wr_bytes,
                read_ops: s.stats.rd_operations,
                write_ops: s.stats.wr_operations,
            })
        })
        .collect()
}

/// Every interface of this network namespace: (received, sent) bytes.
fn taps() -> HashMap<String, (u64, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/net/dev") else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let c: Vec<u64> = counters.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            Some((name.trim().to_string(), (*c.first()?, *c.get(8)?)))
        })
        .collect()
}
