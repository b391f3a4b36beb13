//! Target side of a live migration: a paused QEMU waiting for the stream
//! with NBD exports of its disks (prepare), the VM run once the source has
//! stopped (finish), and whatever a failed migration left removed (discard).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use novacron_api::agent::{Finished, PrepareRequest, Prepared, VmRef};
use novacron_api::{MigrationStepKind, Vm};
use novacron_dwcp::Role;
use novacron_qmp::commands::{
    BlockExportAdd, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters, NbdServerStart, NbdServerStop,
    QueryMigrate,
};
use novacron_qmp::types::{
    MigrationCapability as Cap, MigrationCapabilityStatus, MigrationInfo, MigrationStatus as QemuMigration,
    MultiFdCompression, QapiString, SocketAddressLegacy,
};
use novacron_qmp::Qmp;

use super::timeline::Timeline;
use super::{MigrationError, Migrations, MULTIFD_CHANNELS, QMP_TIMEOUT, TARGET_CALL_TIMEOUT};
use crate::qemu::{self, VmDir, DISK_NODES};
use crate::reconcile::prepare_launch;

/// How long `finish` may take: less than the source's wait for it, so that
/// it never outlives the wait.
const FINISH_WITHIN: Duration = Duration::from_secs(100);
const _: () = assert!(FINISH_WITHIN.as_secs() < TARGET_CALL_TIMEOUT.as_secs());

/// The name QEMU knows the NBD listener's socket by.
const NBD_LISTENER: &str = "nbd-listener";

impl Migrations {
    /// Start of every incoming migration: the VM directory here, which must not
    /// have a QEMU yet. A migration of the VM away from this node may still
    /// be cleaning up (its status is final a moment before its driver lets
    /// go): wait for it, or its cleanup would remove what this one prepares.
    pub(super) async fn begin_incoming(&self, vm: &Vm) -> Result<VmDir, MigrationError> {
        let deadline = Instant::now() + super::driver::CLAIM_WAIT;
        while self.node.claims.is_claimed(&vm.metadata.id) {
            if Instant::now() >= deadline {
                return Err(MigrationError::Conflict(format!(
                    "a migration of VM {} away from this node is still finishing",
                    vm.metadata.name
                )));
            }
            tokio::time::sleep(super::POLL_EVERY).await;
        }
        let dir = self.dir(&vm.metadata.id);
        if dir.running_pid().is_some() {
            return Err(MigrationError::Conflict(format!(
                "VM {} already has a QEMU on this node",
                vm.metadata.name
            )));
        }
        Ok(dir)
    }

    /// The VM's snapshot layers, fetched from the source while it runs (they
    /// never change), and its disks as overlays on the same layers as there:
    /// the mirrors then copy only what was written since.
    async fn receive_snapshots(&self, req: &PrepareRequest, dir: &VmDir) -> Result<(), MigrationError> {
        let source: novacron_api::Node = self.node.client.get(&req.source_node).await?;
        let vm = &req.vm;
        let secret = self.node.agent_secret();
        crate::snapshots::fetch_layers(
            &self.http,
            &secret,
            &source.spec.address,
            &vm.metadata.id,
            dir,
            &req.snapshots,
        )
        .await?;
        if let Some((base, format)) = self.image_base(vm).await? {
            crate::snapshots::repoint_at_image(dir, &req.snapshots, &base, &format).await?;
        }
        crate::snapshots::overlay_on_layers(dir, &req.disk_layers).await?;
        crate::snapshots::write(dir, &req.snapshots)?;
        Ok(())
    }

    /// Prepares this node to receive a VM: disks, paused QEMU waiting for the
    /// migration stream, NBD exports of its disks.
    pub(crate) async fn prepare(&self, req: PrepareRequest) -> Result<Prepared, MigrationError> {
        let vm = &req.vm;
        let dir = self.begin_incoming(vm).await?;
        // The target's own steps, from the start of the call (the source places them).
        let steps = Timeline::new(Instant::now());
        let result = async {
            let fetching = steps.begin(MigrationStepKind::ImageFetch);
            // Blank volume disks of the source's sizes, which its mirrors fill.
            std::fs::create_dir_all(&dir.path).map_err(MigrationError::io("create the VM's directory"))?;
            for a in &vm.spec.volumes {
                qemu::create_disk(&dir.volume(&a.id), None, Some(a.size_mib)).await?;
            }
            if !req.snapshots.is_empty() {
                self.receive_snapshots(&req, &dir).await?;
            }
            let mut spec = prepare_launch(&self.node, vm, &dir, true).await?;
            steps.end(fetching, None);
            // QEMU appends to the log (logappend=on): seed it with the source's history.
            std::fs::write(dir.console_log(), &req.console_log).map_err(MigrationError::io("write the console log"))?;
            spec.incoming = true;
            let starting = steps.begin(MigrationStepKind::QemuStart);
            qemu::launch(&self.node.qemu, &spec, &dir).await?;
            let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
            steps.end(starting, None);
            // QEMU listens on a socket we bound: its port is known and
            // nobody can take it between choosing and listening.
            let host = self.node.host.trim_start_matches('[').trim_end_matches(']');
            let nbd_listener = std::net::TcpListener::bind((host, 0))
                .map_err(MigrationError::io("listen for the disks' NBD streams"))?;
            let nbd_port = nbd_listener
                .local_addr()
                .map_err(MigrationError::io("read the NBD listener's port"))?
                .port();
            qmp.pass_fd(NBD_LISTENER, nbd_listener.as_fd()).await?;
            drop(nbd_listener);
            let addr = SocketAddressLegacy::Fd(QapiString {
                str: NBD_LISTENER.into(),
            });
            qmp.run(&NbdServerStart::new(addr)).await?;
            let mut disks = vec![DISK_NODES[0].to_string()];
            if spec.data_disk.is_some() {
                disks.push(DISK_NODES[1].to_string());
            }
            disks.extend(
                spec.volumes
                    .iter()
                    .map(|(slot, _, _)| novacron_api::volume::node_name(*slot)),
            );
            for d in &disks {
                qmp.run(&BlockExportAdd::nbd(d.as_str(), d.as_str(), true)).await?;
            }
            // late-block-activate: the disks become active only at our `cont`,
            // after the source drained its mirrors and the NBD server stopped;
            // otherwise activation at the end of the incoming stream could
            // re-read qcow2 metadata while the last mirror writes still arrive.
            let capabilities = vec![
                MigrationCapabilityStatus::new(Cap::LateBlockActivate, true),
                MigrationCapabilityStatus::new(Cap::PostcopyRam, req.postcopy),
                MigrationCapabilityStatus::new(Cap::Multifd, req.multifd),
                MigrationCapabilityStatus::new(Cap::DirtyBitmaps, true),
            ];
            qmp.run(&MigrateSetCapabilities { capabilities }).await?;
            // The disks' tracking bitmaps arrive under the disks' names.
            let tops = crate::snapshots::top_nodes(&qmp).await?;
            let mut params = MigrateSetParameters {
                block_bitmap_mapping: Some(crate::backup::export::migration_mapping(&tops)),
                ..Default::default()
            };
            if req.multifd {
                params.multifd_channels = Some(MULTIFD_CHANNELS);
                params.multifd_compression = Some(MultiFdCompression::Zstd);
            }
            qmp.run(&params).await?;
            if let Some(carried) = &req.backup_chain {
                crate::backup::chain::import(&dir.path, carried).map_err(|e| MigrationError::Invalid(e.to_string()))?;
            }
            // Port 0: QEMU binds a free port itself and reports it.
            qmp.run(&MigrateIncoming::new(format!("tcp:{}:0", self.node.host)))
                .await?;
            let info = qmp.run(&QueryMigrate).await?;
            let port = match info.incoming_port() {
                Ok(Some(port)) => port,
                Ok(None) => {
                    return Err(MigrationError::QemuFailed(format!(
                        "the incoming migration names no TCP port ({})",
                        describe(&info)
                    )))
                }
                Err(e) => {
                    return Err(MigrationError::QemuFailed(format!(
                        "the incoming migration's port is not a number: {e}"
                    )))
                }
            };
            let uri = format!("tcp:{}:{port}", self.node.host);
            if let (Some(session), Some(d)) = (&req.dwcp_session, &self.dwcp) {
                let at = |port: u16| {
                    format!("{}:{port}", self.node.host)
                        .parse::<std::net::SocketAddr>()
                        .or_else(|_| format!("127.0.0.1:{port}").parse())
                        .map_err(|e| MigrationError::Invalid(format!("bad local address: {e}")))
                };
                d.receiver.expect(
                    session,
                    HashMap::from([(Role::Migration, at(port)?), (Role::Nbd, at(nbd_port)?)]),
                );
            }
            Ok::<_, MigrationError>(Prepared {
                nbd_host: self.node.host.clone(),
                nbd_port,
                migrate_uri: uri,
                disks,
                steps: steps.steps(),
            })
        }
        .await;
        if result.is_err() {
            self.discard(&vm.metadata.id).await;
        }
        result
    }

    /// The source has stopped for good and the disks are in sync: run here.
    pub(crate) async fn finish(&self, migration: &str, req: &VmRef) -> Result<Finished, MigrationError> {
        let (vm_id, console_log) = (req.vm_id.as_str(), req.console_log.as_slice());
        let dir = self.dir(vm_id);
        let pid = dir
            .running_pid()
            .ok_or_else(|| MigrationError::Conflict("target QEMU is gone".into()))?;
        let qmp = Qmp::connect(&dir.qmp_migrate(), QMP_TIMEOUT).await?;
        // Wait until the source's last state has landed: the stream completed, or
        // (post-copy) the switch happened and the rest follows on demand. All of
        // it within the source's wait for this call (`target_call`), so that a
        // source that gave up never finds the VM running here after all.
        let called = Instant::now();
        let deadline = called + FINISH_WITHIN;
        loop {
            let info = qmp.run(&QueryMigrate).await?;
            // No status yet: the stream has not begun arriving; wait for it
            // like for the other unfinished states.
            if matches!(
                info.status,
                Some(QemuMigration::Completed | QemuMigration::PostcopyActive)
            ) {
                break;
            }
            if info.status == Some(QemuMigration::Failed) || Instant::now() > deadline {
                return Err(MigrationError::QemuFailed(format!(
                    "incoming side is {}",
                    describe(&info)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::debug!(
            migration,
            waited_ms = called.elapsed().as_millis() as u64,
            "finish: memory is here"
        );
        // The source answered its mirror's last writes itself: they must have
        // landed here before the disks change hands.
        if req.dwcp_disks > 0 {
            let dwcp = self
                .dwcp
                .as_ref()
                .ok_or_else(|| MigrationError::Invalid("DWCP disks, but DWCP is off here".into()))?;
            dwcp.receiver
                .disks_settled(
                    migration,
                    req.dwcp_disks,
                    deadline.saturating_duration_since(Instant::now()),
                )
                .await
                .map_err(|e| MigrationError::Dwcp(format!("the disks did not arrive whole: {e}")))?;
            tracing::debug!(
                migration,
                waited_ms = called.elapsed().as_millis() as u64,
                "finish: disks settled"
            );
        }
        qmp.run(&NbdServerStop).await?;
        // Still paused, so QEMU writes nothing to the log while we append.
        if !console_log.is_empty() {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(dir.console_log()) {
                let _ = f.write_all(console_log);
            }
        }
        let st = qmp.query_status().await?;
        if !st.running {
            qmp.cont().await?;
        }
        // The network learns where the guest runs now (every host's VXLAN
        // device and bridge move its MAC here); the guest runs either way.
        if let Err(e) = qmp.announce_self().await {
            tracing::warn!(migration, error = %novacron_api::error::chain(&e), "cannot announce the guest's NICs");
        }
        let resumed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64() * 1e3);
        Ok(Finished { pid, resumed_at })
    }

    /// Removes whatever a migration left here.
    pub(crate) async fn discard(&self, vm_id: &str) {
        let dir = self.dir(vm_id);
        if let Some(pid) = dir.running_pid() {
            qemu::kill_and_wait(pid, &dir).await;
        }
        self.node.net.detach(vm_id).await;
        let _ = std::fs::remove_dir_all(&dir.path);
    }
}

/// QEMU's migration state in words, for errors.
fn describe(info: &MigrationInfo) -> String {
    match (info.status, &info.error_desc) {
        (Some(s), Some(why)) => format!("{s}: {why}"),
        (Some(s), None) => s.to_string(),
        (None, _) => "without a migration".into(),
    }
}
