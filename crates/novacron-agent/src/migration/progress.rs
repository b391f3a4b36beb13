//! A running migration's progress, from QEMU's and DWCP's own figures.

use novacron_api::{DwcpFigures, MigrationProgress};
use novacron_qmp::types::MigrationStats;

pub(super) fn progress_from(ram: Option<&MigrationStats>, disk_total: u64) -> MigrationProgress {
    let Some(r) = ram else {
        return MigrationProgress {
            disk_total_bytes: disk_total,
            disk_transferred_bytes: disk_total,
            ..Default::default()
        };
    };
    let throughput = (r.mbps * 1e6 / 8.0) as u64;
    let dirty = r.dirty_pages_rate * r.page_size.max(4096);
    let eta = if throughput > dirty {
        Some(r.remaining as f64 / (throughput - dirty) as f64)
    } else {
        None
    };
    let percent = if r.total > 0 {
        (100.0 * (r.total - r.remaining.min(r.total)) as f64 / r.total as f64).min(100.0)
    } else {
        0.0
    };
    MigrationProgress {
        transferred_bytes: r.transferred + disk_total,
        remaining_bytes: r.remaining,
        total_bytes: r.total + disk_total,
        disk_transferred_bytes: disk_total,
        disk_total_bytes: disk_total,
        dirty_rate_bytes_s: dirty,
        throughput_bytes_s: throughput,
        iteration: r.dirty_sync_count,
        eta_s: eta,
        percent,
    }
}

pub(super) fn dwcp_figures(st: &novacron_dwcp::StatsSnapshot) -> DwcpFigures {
    DwcpFigures {
        streams: st.streams,
        rtt_ms: st.rtt_ms,
        zstd_level: st.zstd_level,
        raw_bytes: st.raw_bytes,
        wire_bytes: st.wire_bytes,
        pages: st.pages,
        pages_known: st.pages_ref,
        pages_delta: st.pages_delta,
        prefill_bytes: st.prefill_bytes,
        link_bytes_s: st.wire_bytes_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_eta_from_qemu_numbers() {
        let ram = MigrationStats {
            transferred: 100,
            remaining: 1000,
            total: 2000,
            duplicate: 0,
            normal: 0,
            normal_bytes: 0,
            dirty_pages_rate: 0,
            mbps: 8.0,
            dirty_sync_count: 1,
            postcopy_requests: 0,
            page_size: 4096,
            multifd_bytes: 0,
            pages_per_second: 0,
            precopy_bytes: 0,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            dirty_sync_missed_zero_copy: 0,
        };
        let p = progress_from(Some(&ram), 50);
        assert_eq!(p.throughput_bytes_s, 1_000_000);
        assert_eq!(p.total_bytes, 2050);
        assert!((p.percent - 50.0).abs() < 1e-9);
        assert!(p.eta_s.is_some_and(|e| (e - 0.001).abs() < 1e-9));
    }
}
