//! Output formats: tables for people, JSON/YAML for programs.

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use comfy_table::{presets::NOTHING, Table};
use novacron_api::units::format_mib;
use novacron_api::{Image, Migration, Node, Vm};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

pub fn print_data<T: Serialize>(format: Format, value: &T) -> Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_norway::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

pub fn age(t: DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn vm_row(vm: &Vm) -> Vec<String> {
    vec![
        vm.metadata.name.clone(),
        vm.status.phase.to_string(),
        vm.status.node.clone().unwrap_or_else(|| "-".into()),
        vm.spec.vcpus.to_string(),
        format_mib(vm.spec.memory_mib),
        vm.spec.image.clone(),
        age(vm.metadata.created_at),
        vm.status.reason.clone().unwrap_or_default(),
    ]
}

pub const VM_HEADER: &[&str] = &["NAME", "PHASE", "NODE", "VCPUS", "MEMORY", "IMAGE", "AGE", "REASON"];

pub fn vms(format: Format, items: &[Vm]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(VM_HEADER);
    for vm in items {
        t.add_row(vm_row(vm));
    }
    println!("{t}");
    Ok(())
}

/// One line per NIC: network, address, MAC, and for a running VM whether
/// the NIC is plugged in yet (or still being unplugged).
pub fn nic_lines(vm: &Vm) -> Vec<String> {
    let running = vm.status.qemu_pid.is_some();
    let plugged = |mac: Option<&str>| vm.status.nics.iter().any(|p| Some(p.mac.as_str()) == mac);
    let mut lines: Vec<String> = vm
        .spec
        .nics
        .iter()
        .map(|n| {
            let state = match (running, plugged(n.mac.as_deref())) {
                (false, _) => "",
                (true, true) => " plugged",
                (true, false) => " plugging",
            };
            format!(
                "{} {} {}{state}",
                n.network,
                n.ip.as_deref().unwrap_or("-"),
                n.mac.as_deref().unwrap_or("-")
            )
        })
        .collect();
    for p in &vm.status.nics {
        if !vm.spec.nics.iter().any(|n| n.mac.as_deref() == Some(p.mac.as_str())) {
            lines.push(format!("{} {} {} unplugging", p.network, p.ip, p.mac));
        }
    }
    lines
}

pub fn vm(format: Format, vm: &Vm) -> Result<()> {
    if format != Format::Table {
        return print_data(format, vm);
    }
    let mut t = table(&["FIELD", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("name", vm.metadata.name.clone()),
        ("id", vm.metadata.id.clone()),
        ("phase", vm.status.phase.to_string()),
        ("reason", vm.status.reason.clone().unwrap_or_default()),
        ("node", vm.status.node.clone().unwrap_or_else(|| "-".into())),
        ("vcpus", vm.spec.vcpus.to_string()),
        ("memory", format_mib(vm.spec.memory_mib)),
        ("image", vm.spec.image.clone()),
        ("power state", format!("{:?}", vm.spec.power_state)),
        ("run strategy", format!("{:?}", vm.spec.run_strategy)),
        (
            "qemu pid",
            vm.status.qemu_pid.map(|p| p.to_string()).unwrap_or_default(),
        ),
        ("accel", vm.status.accel.clone().unwrap_or_default()),
        ("machine", vm.spec.machine.clone().unwrap_or_else(|| "pc".into())),
        ("cpu model", vm.spec.cpu_model.clone().unwrap_or_else(|| "-".into())),
        ("restarts", vm.status.restarts.to_string()),
        ("nics", nic_lines(vm).join("\n")),
        ("volumes", volume_lines(vm).join("\n")),
        (
            "snapshots",
            vm.status
                .snapshots
                .iter()
                .map(|s| format!("{}{}", s.name, if s.current { " (current)" } else { "" }))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("guest", guest_lines(vm).join("\n")),
        (
            "live restore",
            vm.status
                .live_restore
                .as_ref()
                .map(|l| {
                    let percent = (l.done * 100).checked_div(l.size).unwrap_or(0);
                    let from = vm.spec.restore_from.as_ref().map(|s| s.to_string()).unwrap_or_default();
                    match &l.error {
                        Some(e) => format!("from {from}: {percent}%, stopped: {e}"),
                        None => format!("from {from}: {percent}%"),
                    }
                })
                .unwrap_or_default(),
        ),
        (
            "labels",
            vm.metadata
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("created", vm.metadata.created_at.to_rfc3339()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

/// Attached volumes (size, and whether plugged), and those being detached.
fn volume_lines(vm: &Vm) -> Vec<String> {
    let held = |id: &str| vm.status.volumes.iter().find(|v| v.id == id);
    let mut lines: Vec<String> = vm
        .spec
        .volumes
        .iter()
        .map(|a| {
            let state = match held(&a.id) {
                Some(h) if h.size_mib < a.size_mib => "growing",
                Some(h) if h.plugged || vm.status.qemu_pid.is_none() => "attached",
                _ => "attaching",
            };
            format!("{} {} {state}", a.volume, format_mib(a.size_mib))
        })
        .collect();
    for h in &vm.status.volumes {
        if !vm.spec.volumes.iter().any(|a| a.id == h.id) {
            lines.push(format!("{} {} detaching", h.volume, format_mib(h.size_mib)));
        }
    }
    if lines.is_empty() {
        lines.push("-".into());
    }
    lines
}

/// What the guest agent reports: OS, host name, addresses; "-" without one.
fn guest_lines(vm: &Vm) -> Vec<String> {
    let Some(g) = &vm.status.guest else {
        return vec!["- (no guest agent answers)".into()];
    };
    let mut lines = vec![format!(
        "{} ({}), host name {}",
        g.os.as_deref().unwrap_or("unknown OS"),
        g.kernel.as_deref().unwrap_or("unknown kernel"),
        g.hostname.as_deref().unwrap_or("-")
    )];
    for i in &g.interfaces {
        lines.push(format!(
            "{} {} {}",
            i.name,
            i.mac.as_deref().unwrap_or("-"),
            i.addresses.join(" ")
        ));
    }
    lines
}

pub fn nodes(format: Format, items: &[Node]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&[
        "NAME",
        "STATUS",
        "SCHEDULABLE",
        "VCPUS",
        "MEMORY",
        "VMS",
        "ACCEL",
        "ADDRESS",
        "AGE",
    ]);
    for n in items {
        let status = if n.status.ready {
            "Ready".to_string()
        } else {
            "NotReady".to_string()
        };
        t.add_row(vec![
            n.metadata.name.clone(),
            status,
            if n.spec.schedulable {
                "yes".into()
            } else {
                "no (cordoned)".into()
            },
            format!("{}/{}", n.status.allocated.vcpus, n.status.capacity.vcpus),
            format!(
                "{}/{}",
                format_mib(n.status.allocated.memory_mib),
                format_mib(n.status.capacity.memory_mib)
            ),
            n.status.vm_count.to_string(),
            n.status.accel.clone(),
            n.spec.address.clone(),
            age(n.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn images(format: Format, items: &[Image]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&["NAME", "FORMAT", "PHASE", "SIZE", "VIRTUAL SIZE", "SHA256", "AGE"]);
    for i in items {
        let size: u64 = i.status.files.iter().map(|f| f.size_bytes).sum();
        let sha = i
            .status
            .files
            .first()
            .map(|f| f.sha256[..12.min(f.sha256.len())].to_string())
            .unwrap_or_default();
        t.add_row(vec![
            i.metadata.name.clone(),
            i.spec.format.to_string(),
            format!("{:?}", i.status.phase),
            format_mib(size.div_ceil(1024 * 1024)),
            if i.status.virtual_size_bytes > 0 {
                format_mib(i.status.virtual_size_bytes.div_ceil(1024 * 1024))
            } else {
                "-".into()
            },
            sha,
            age(i.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn opt_ms(v: Option<u64>) -> String {
    v.map(|ms| format!("{ms}ms")).unwrap_or_else(|| "-".into())
}

pub fn migrations(format: Format, items: &[Migration]) -> Result<()> {
    if format != Format::Table {
        return print_data(format, &items);
    }
    let mut t = table(&[
        "NAME", "VM", "FROM", "TO", "PHASE", "PROGRESS", "STRATEGY", "TOTAL", "DOWNTIME", "AGE",
    ]);
    for m in items {
        t.add_row(vec![
            m.metadata.name.clone(),
            m.spec.vm.clone(),
            m.status.source_node.clone(),
            m.status.target_node.clone(),
            m.status.phase.to_string(),
            format!("{:.0}%", m.status.progress.percent),
            m.status
                .strategy
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| "-".into()),
            opt_ms(m.status.total_time_ms),
            opt_ms(m.status.downtime_ms),
            age(m.metadata.created_at),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn migration_plan(format: Format, p: &novacron_api::MigrationPlan) -> Result<()> {
    if format != Format::Table {
        return print_data(format, p);
    }
    let x = &p.prediction;
    let mut t = table(&["FIELD", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("vm", p.vm.clone()),
        ("from", p.source_node.clone()),
        ("to", p.target_node.clone()),
        (
            "transport",
            match &p.transport_reason {
                Some(why) => format!("{} ({why})", p.transport),
                None => p.transport.to_string(),
            },
        ),
        ("strategy", x.strategy.map(|s| format!("{s:?}")).unwrap_or_default()),
        ("predicted time", format!("{:.1}s", x.total_s)),
        ("predicted downtime", format!("{:.0}ms", x.downtime_ms)),
        (
            "predicted wire bytes",
            format!("{} ({})", x.wire_bytes, human_bytes(x.wire_bytes)),
        ),
        (
            "link",
            format!(
                "{}/s measured, rtt {:.1}ms, {} streams",
                human_bytes(x.link_bytes_s as u64),
                x.rtt_ms,
                x.streams
            ),
        ),
        ("dirty rate", format!("{}/s", human_bytes(x.dirty_rate_bytes_s as u64))),
        (
            "guest memory",
            format!(
                "{:.0}% zero pages; rest compresses to {:.0}%; {:.0}% already on the target",
                x.zero_page_share * 100.0,
                x.compression * 100.0,
                x.known_page_share * 100.0
            ),
        ),
        ("why", x.reason.clone()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1}MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0}KiB", b / 1024.0)
    }
}

pub fn migration(format: Format, m: &Migration) -> Result<()> {
    if format != Format::Table {
        return print_data(format, m);
    }
    let p = &m.status.progress;
    let mut t = table(&["FIELD", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("name", m.metadata.name.clone()),
        ("vm", m.spec.vm.clone()),
        ("from", m.status.source_node.clone()),
        ("to", m.status.target_node.clone()),
        ("phase", m.status.phase.to_string()),
        (
            "strategy",
            m.status.strategy.map(|s| format!("{s:?}")).unwrap_or_default(),
        ),
        ("why", m.status.strategy_reason.clone().unwrap_or_default()),
        (
            "transport",
            match (&m.status.transport, &m.status.transport_reason) {
                (Some(t), Some(why)) => format!("{t} ({why})"),
                (Some(t), None) => t.to_string(),
                _ => m.spec.transport.to_string(),
            },
        ),
        (
            "predicted",
            m.status
                .prediction
                .as_ref()
                .map(|p| {
                    format!(
                        "{:.1}s, downtime {:.0}ms, {} on the wire",
                        p.total_s,
                        p.downtime_ms,
                        human_bytes(p.wire_bytes)
                    )
                })
                .unwrap_or_else(|| "-".into()),
        ),
        ("progress", format!("{:.1}% (pass {})", p.percent, p.iteration)),
        (
            "transferred",
            format!("{} bytes (disks {})", p.transferred_bytes, p.disk_transferred_bytes),
        ),
        ("dirty rate", format!("{} bytes/s", p.dirty_rate_bytes_s)),
        ("throughput", format!("{} bytes/s", p.throughput_bytes_s)),
        ("eta", p.eta_s.map(|e| format!("{e:.1}s")).unwrap_or_else(|| "-".into())),
        ("total time", opt_ms(m.status.total_time_ms)),
        ("downtime", opt_ms(m.status.downtime_ms)),
        ("downtime (QEMU's view)", opt_ms(m.status.qemu_downtime_ms)),
        (
            "bytes sent",
            m.status.bytes_sent.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
        ),
        (
            "wire bytes",
            m.status.wire_bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
        ),
        (
            "dwcp",
            m.status
                .dwcp
                .as_ref()
                .map(|d| {
                    format!(
                        "{} streams, rtt {:.1}ms, zstd {}, {} pages ({} known, {} delta), {} -> {} ({:.1}x)",
                        d.streams,
                        d.rtt_ms,
                        d.zstd_level,
                        d.pages,
                        d.pages_known,
                        d.pages_delta,
                        human_bytes(d.raw_bytes),
                        human_bytes(d.wire_bytes),
                        d.raw_bytes as f64 / d.wire_bytes.max(1) as f64
                    )
                })
                .unwrap_or_else(|| "-".into()),
        ),
        ("error", m.status.error.clone().unwrap_or_default()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    if !m.status.timeline.is_empty() {
        let mut steps = table(&["STEP", "START", "LENGTH", "DETAIL"]);
        for s in &m.status.timeline {
            steps.add_row(vec![
                s.step.to_string(),
                format!("{:.2}s", s.start_ms as f64 / 1000.0),
                s.duration_ms
                    .map_or_else(|| "running".into(), |d| format!("{:.2}s", d as f64 / 1000.0)),
                s.detail.clone().unwrap_or_default(),
            ]);
        }
        println!("{steps}");
    }
    Ok(())
}
