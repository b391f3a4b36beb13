//! The Prometheus families the server and the agents both serve: each
//! running VM's counters (CPU time, resident memory, drive and NIC traffic)
//! with the same names and labels whoever serves them, and the helpers that
//! turn values read at a scrape into gauges and counters.

use std::sync::atomic::AtomicU64;

use novacron_api::agent::{VmDiskStats, VmNicStats, VmStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The Content-Type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// A family of gauges set to values read now.
pub fn gauges<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, f64)>,
) {
    let family = Family::<L, FloatGauge>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(value);
    }
    registry.register(name, help, family);
}

/// A family of counters at totals read now (from /proc, QEMU, an agent).
pub fn counters<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, f64)>,
) {
    let family = Family::<L, FloatCounter>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).inc_by(value);
    }
    registry.register(name, help, family);
}

/// Which VM counters are of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub vm: String,
    pub project: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriveLabels {
    vm: String,
    project: String,
    node: String,
    drive: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    vm: String,
    project: String,
    node: String,
    interface: String,
}

/// The families of running VMs' counters (`novacron_vm_cpu_usage_seconds_total`, ...).
pub fn register_vm_stats(registry: &mut Registry, each: &[(VmLabels, &VmStats)]) {
    counters(
        registry,
        "novacron_vm_cpu_usage_seconds",
        "CPU time the VM's QEMU used (vCPUs and I/O threads)",
        each.iter().map(|(l, s)| (l.clone(), s.cpu_seconds)),
    );
    gauges(
        registry,
        "novacron_vm_memory_resident_bytes",
        "The VM's QEMU memory resident in the host's RAM",
        each.iter().map(|(l, s)| (l.clone(), s.resident_bytes as f64)),
    );
    let drives: Vec<(DriveLabels, &VmDiskStats)> = each
        .iter()
        .flat_map(|(l, s)| {
            s.disks.iter().map(move |d| {
                let labels = DriveLabels {
                    vm: l.vm.clone(),
                    project: l.project.clone(),
                    node: l.node.clone(),
                    drive: d.drive.clone(),
                };
                (labels, d)
            })
        })
        .collect();
    let drive = |name: &str, help: &str, value: fn(&VmDiskStats) -> u64, registry: &mut Registry| {
        counters(
            registry,
            name,
            help,
            drives.iter().map(|(l, d)| (l.clone(), value(d) as f64)),
        );
    };
    drive(
        "novacron_vm_storage_read_traffic_bytes",
        "Bytes the guest read from the drive",
        |d| d.read_bytes,
        registry,
    );
    drive(
        "novacron_vm_storage_write_traffic_bytes",
        "Bytes the guest wrote to the drive",
        |d| d.write_bytes,
        registry,
    );
    drive(
        "novacron_vm_storage_iops_read",
        "Reads the guest made from the drive",
        |d| d.read_ops,
        registry,
    );
    drive(
        "novacron_vm_storage_iops_write",
        "Writes the guest made to the drive",
        |d| d.write_ops,
        registry,
    );
    let nics: Vec<(InterfaceLabels, &VmNicStats)> = each
        .iter()
        .flat_map(|(l, s)| {
            s.nics.iter().map(move |i| {
                let labels = InterfaceLabels {
                    vm: l.vm.clone(),
                    project: l.project.clone(),
                    node: l.node.clone(),
                    interface: i.interface.clone(),
                };
                (labels, i)
            })
        })
        .collect();
    counters(
        registry,
        "novacron_vm_network_receive_bytes",
        "Bytes the guest received on the NIC",
        nics.iter().map(|(l, i)| (l.clone(), i.receive_bytes as f64)),
    );
    counters(
        registry,
        "novacron_vm_network_transmit_bytes",
        "Bytes the guest sent on the NIC",
        nics.iter().map(|(l, i)| (l.clone(), i.transmit_bytes as f64)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_counters_are_encoded_with_their_labels() {
        let stats = VmStats {
            vm_id: "id-1".into(),
            cpu_seconds: 1.5,
            resident_bytes: 4096,
            disks: vec![VmDiskStats {
                drive: "root".into(),
                read_bytes: 10,
                write_bytes: 20,
                read_ops: 1,
                write_ops: 2,
            }],
            nics: vec![VmNicStats {
                interface: "nic0".into(),
                receive_bytes: 7,
                transmit_bytes: 8,
            }],
        };
        let labels = VmLabels {
            vm: "web-1".into(),
            project: "default".into(),
            node: "node-1".into(),
        };
        let mut registry = Registry::default();
        register_vm_stats(&mut registry, &[(labels, &stats)]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"novacron_vm_cpu_usage_seconds_total{vm="web-1",project="default",node="node-1"} 1.5"#,
            r#"novacron_vm_memory_resident_bytes{vm="web-1",project="default",node="node-1"} 4096.0"#,
            r#"novacron_vm_storage_write_traffic_bytes_total{vm="web-1",project="default",node="node-1",drive="root"} 20.0"#,
            r#"novacron_vm_network_transmit_bytes_total{vm="web-1",project="default",node="node-1",interface="nic0"} 8.0"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
