//! Cold migration of a stopped VM: the source hands the target its disks'
//! names, the target pulls the files from the source agent. Nothing runs
//! anywhere until the user starts the VM.

use std::time::Instant;

use chrono::Utc;
use novacron_api::agent::ColdRequest;
use novacron_api::error::chain;
use novacron_api::{Migration, MigrationPhase, MigrationStatus, MigrationStrategy, Node, Vm};
use serde_json::Value;

use super::console_log::read_log_from;
use super::source::SourceCtx;
use super::{MigrationError, Migrations};

impl Migrations {
    /// Cold migration of a stopped VM: the target pulls the disk files from
    /// this agent; nothing runs anywhere until the user starts the VM.
    pub(super) async fn transfer_cold(
        &self,
        m: &Migration,
        vm: &Vm,
        ctx: &mut SourceCtx,
        started: Instant,
    ) -> Result<MigrationStatus, MigrationError> {
        let name = &m.metadata.name;
        let dir = self.dir(&vm.metadata.id);
        if dir.running_pid().is_some() {
            return Err(MigrationError::Conflict(
                "the VM has a running QEMU; migrate it live".into(),
            ));
        }
        let target: Node = self.node.client.get(&m.status.target_node).await?;
        ctx.target = Some(target.clone());
        let disks: Vec<(String, u64)> = dir
            .disk_files()
            .into_iter()
            .filter_map(|(n, p)| std::fs::metadata(&p).ok().map(|md| (n, md.len())))
            .collect();
        let total: u64 = disks.iter().map(|(_, len)| len).sum();
        self.write_status(name, |s| {
            s.phase = MigrationPhase::Transferring;
            s.started_at = Some(Utc::now());
            s.strategy = Some(MigrationStrategy::Cold);
            s.strategy_reason = Some("stopped VM: its disks are copied, there is no memory to move".into());
            s.progress.disk_total_bytes = total;
        })
        .await;
        self.check_cancel(name)?;
        ctx.target_prepared = true;
        let (console_log, _) = read_log_from(&dir.console_log(), 0);
        let req = ColdRequest {
            vm: vm.clone(),
            source_node: self.node.name.clone(),
            disks: disks.iter().map(|(n, _)| n.clone()).collect(),
            console_log,
            snapshots: crate::snapshots::list(&dir)?,
            backup_chain: crate::backup::chain::export(&dir.path)
                .map_err(|e| MigrationError::Invalid(e.to_string()))?,
        };
        let _: Value = self.target_call(&target, "receive-cold", &m.metadata.id, &req).await?;
        ctx.target_running = true;
        let mut status = self.latest(name).map(|m| m.status).unwrap_or_default();
        status.progress.disk_transferred_bytes = total;
        status.progress.transferred_bytes = total;
        status.progress.total_bytes = total;
        status.progress.percent = 100.0;
        status.total_time_ms = Some(started.elapsed().as_millis() as u64);
        status.bytes_sent = Some(total);
        status.finished_at = Some(Utc::now());
        Ok(status)
    }

    /// This node's copy of the VM's disk image (fetched if it has none), with
    /// its format; none for a kernel image.
    pub(super) async fn image_base(&self, vm: &Vm) -> Result<Option<(std::path::PathBuf, String)>, MigrationError> {
        let image: novacron_api::Image = self.node.client.get(&vm.spec.image).await?;
        if image.spec.format == novacron_api::ImageFormat::Kernel {
            return Ok(None);
        }
        let base = self
            .node
            .images
            .ensure(&self.node.client, &image, novacron_api::ImagePart::Disk)
            .await
            .map_err(MigrationError::Image)?;
        Ok(Some((base, image.spec.format.to_string())))
    }

    /// Target side of a cold migration: copy the disks from the source agent
    /// and point the root overlay at this node's copy of the base image.
    pub(crate) async fn receive_cold(&self, req: ColdRequest) -> Result<(), MigrationError> {
        let vm = &req.vm;
        let dir = self.begin_incoming(vm).await?;
        let result = async {
            std::fs::create_dir_all(&dir.path).map_err(MigrationError::io("create the VM's directory"))?;
            let source: Node = self.node.client.get(&req.source_node).await?;
            let secret = self.node.agent_secret();
            for disk in &req.disks {
                let Some(path) = dir.disk_file(disk) else {
                    return Err(MigrationError::Invalid(format!("unknown disk {disk:?}")));
                };
                let url = format!(
                    "{}/agent/v1/vms/{}/disks/{disk}",
                    source.spec.address.trim_end_matches('/'),
                    vm.metadata.id
                );
                crate::peers::download(&self.http, &url, &secret, &path)
                    .await
                    .map_err(|e| MigrationError::Target(format!("fetching {disk}: {}", chain(&e))))?;
            }
            crate::snapshots::fetch_layers(
                &self.http,
                &secret,
                &source.spec.address,
                &vm.metadata.id,
                &dir,
                &req.snapshots,
            )
            .await?;
            // The root disk (or its oldest layer) names the source's cached
            // base image: repoint it at ours.
            if let Some((base, format)) = self.image_base(vm).await? {
                crate::snapshots::repoint_at_image(&dir, &req.snapshots, &base, &format).await?;
            }
            if !req.snapshots.is_empty() {
                crate::snapshots::write(&dir, &req.snapshots)?;
            }
            std::fs::write(dir.console_log(), &req.console_log).map_err(MigrationError::io("write the console log"))?;
            if let Some(carried) = &req.backup_chain {
                crate::backup::chain::import(&dir.path, carried).map_err(|e| MigrationError::Invalid(e.to_string()))?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.discard(&vm.metadata.id).await;
        }
        result
    }
}
