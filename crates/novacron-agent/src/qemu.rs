//! QEMU processes: the per-VM state directory, the command line, launching
//! (daemonized, so a VM outlives an agent restart), liveness and killing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("Cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU failed to start: {0}")]
    Start(String),
    #[error("QEMU did not start within {0:?}")]
    StartTimeout(Duration),
    #[error("qemu-img failed: {0}")]
    Img(String),
    #[error("Socket path {0} is too long for a unix socket")]
    PathTooLong(String),
    #[error("I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QemuError + '_ {
    move |source| QemuError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Files of one VM on this node.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub path: PathBuf,
}

impl VmDir {
    pub fn new(vms_root: &Path, vm_id: &str) -> Self {
        VmDir {
            path: vms_root.join(vm_id),
        }
    }
    pub fn qmp(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }
    /// Second QMP monitor, used only by the migration driver (a QMP socket
    /// serves one client at a time, and the reconciler holds the first).
    pub fn qmp_migrate(&self) -> PathBuf {
        self.path.join("qmp-migrate.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.path.join("console.sock")
    }
    /// Local ends of a DWCP session for the source QEMU's NBD mirror and migration stream.
    pub fn dwcp_nbd_socket(&self) -> PathBuf {
        self.path.join("dwcp-nbd.sock")
    }
    pub fn dwcp_migration_socket(&self) -> PathBuf {
        self.path.join("dwcp-migration.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }
    pub fn launch_spec(&self) -> PathBuf {
        self.path.join("launch.json")
    }
    pub fn root_disk(&self) -> PathBuf {
        self.path.join("root.qcow2")
    }
    /// Gives the file now named `file` (a disk of this VM, `disk` being
    /// "root" or "data") a name of its own for QEMU to open it by, which
    /// nothing renames while QEMU runs: `DISK.open-N.qcow2`, the lowest N
    /// free. QEMU reopens a node's file by its name when it changes the
    /// node's access mode (a snapshot's old top becomes a read-only
    /// backing), and by then the disk's own name names the snapshot's
    /// overlay.
    pub fn open_alias(&self, disk: &str, file: &Path) -> Result<PathBuf, QemuError> {
        let mut n = 0u32;
        loop {
            let alias = self.path.join(format!("{disk}.open-{n}.qcow2"));
            match std::fs::hard_link(file, &alias) {
                Ok(()) => return Ok(alias),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(io_err(&alias)(e)),
            }
        }
    }
    /// Removes the names QEMU opened disks by (it is not running).
    pub fn remove_open_aliases(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let alias = ["root.open-", "data.open-"].iter().any(|p| name.starts_with(p)) && name.ends_with(".qcow2");
            if alias {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    pub fn data_disk(&self) -> PathBuf {
        self.path.join("data.qcow2")
    }
    /// An attached volume's disk (crate::volumes).
    pub fn volume(&self, id: &str) -> PathBuf {
        self.path.join(format!("vol-{id}.qcow2"))
    }
    /// Ids of the volumes whose disks are in this directory.
    pub fn volume_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_prefix("vol-")?.strip_suffix(".qcow2")?;
                novacron_api::volume::valid_id(id).then(|| id.to_string())
            })
            .collect()
    }
    /// A disk by the name a cold migration gives it: `root`, `data` or
    /// `vol-ID`.
    pub fn disk_file(&self, name: &str) -> Option<PathBuf> {
        match name {
            "root" => Some(self.root_disk()),
            "data" => Some(self.data_disk()),
            _ => name
                .strip_prefix("vol-")
                .filter(|id| novacron_api::volume::valid_id(id))
                .map(|id| self.volume(id)),
        }
    }
    /// Every disk file present, named as [`Self::disk_file`] reads them.
    pub fn disk_files(&self) -> Vec<(String, PathBuf)> {
        let mut disks: Vec<(String, PathBuf)> = [("root", self.root_disk()), ("data", self.data_disk())]
            .into_iter()
            .filter(|(_, p)| p.exists())
            .map(|(n, p)| (n.to_string(), p))
            .collect();
        disks.extend(
            self.volume_ids()
                .into_iter()
                .map(|id| (format!("vol-{id}"), self.volume(&id))),
        );
        disks
    }
    /// The QEMU guest agent's virtio-serial port (crate::guest).
    pub fn guest_agent(&self) -> PathBuf {
        self.path.join("qga.sock")
    }
    /// The cloud-init NoCloud seed (crate::seed).
    pub fn seed(&self) -> PathBuf {
        self.path.join("seed.iso")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }

    /// Pid of the running QEMU of this VM, if there is one. The pid must still
    /// belong to a QEMU started for this directory (pids get reused).
    pub fn running_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile()).ok()?.trim().parse().ok()?;
        process_is_ours(pid, &self.path).then_some(pid)
    }
}

/// True when `pid` is alive (not a zombie) and its command line mentions `dir`.
pub fn process_is_ours(pid: u32, dir: &Path) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // Field 3, after the parenthesised command name, is the state.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Everything needed to (re)start a VM's QEMU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub name: String,
    /// The VM's project (for its metrics' labels); specs written before it
    /// was recorded have none.
    #[serde(default)]
    pub project: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: String,
    /// Versioned machine type (`pc-i440fx-10.0`); launch specs written
    /// before it was recorded start as `pc`.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// CPU model; `None` (launch specs written before it was recorded):
    /// `host` under KVM, `max` under TCG.
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// Direct kernel boot: kernel, initrd, command line.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    pub root_disk: PathBuf,
    pub data_disk: Option<PathBuf>,
    /// cloud-init seed, attached as a read-only CD-ROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<PathBuf>,
    /// Start with vCPUs paused.
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`).
    #[serde(default)]
    pub incoming: bool,
    /// virtio-net NICs on taps the agent made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::network::AttachedNic>,
    /// Attached volumes: slot, volume id, disk file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<(u8, String, PathBuf)>,
}

fn default_machine() -> String {
    "pc".into()
}

/// Block node names of a VM's disks, as used by QMP (mirror, NBD export).
pub const DISK_NODES: [&str; 2] = ["root", "data"];
/// Block node of the cloud-init seed: not mirrored on migration, since
/// the target writes the same bytes (crate::seed).
pub const SEED_NODE: &str = "cidata";

impl LaunchSpec {
    pub fn args(&self, dir: &VmDir) -> Result<Vec<String>, QemuError> {
        for sock in [dir.qmp(), dir.qmp_migrate(), dir.console(), dir.guest_agent()] {
            // sun_path holds 108 bytes including the terminating NUL.
            if sock.as_os_str().len() > 107 {
                return Err(QemuError::PathTooLong(sock.display().to_string()));
            }
        }
        let p = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", self.name),
            "-accel".into(),
            self.accel.clone(),
            "-machine".into(),
            self.machine.clone(),
            "-cpu".into(),
            match &self.cpu_model {
                Some(model) => model.clone(),
                None if self.accel == "kvm" => "host".into(),
                None => "max".into(),
            },
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-daemonize".into(),
            "-pidfile".into(),
            p(&dir.pidfile()),
            "-D".into(),
            p(&dir.qemu_log()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(&dir.qmp())),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(&dir.qmp_migrate())),
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                p(&dir.console()),
                p(&dir.console_log())
            ),
            "-serial".into(),
            "chardev:serial0".into(),
        ];
        if self.nics.is_empty() {
            a.extend(["-nic".into(), "none".into()]);
        }
        for nic in &self.nics {
            // The agent made the tap: QEMU runs no scripts.
            a.push("-netdev".into());
            a.push(format!(
                "tap,id={},ifname={},script=no,downscript=no",
                nic.netdev_id(),
                nic.tap
            ));
            // host_mtu tells the guest the overlay's MTU; the fixed PCI
            // address keeps the hardware the same after NICs come and go.
            a.push("-device".into());
            a.push(format!(
                "virtio-net-pci,netdev={},id={},mac={},host_mtu={},addr={}",
                nic.netdev_id(),
                nic.device_id(),
                nic.mac,
                nic.mtu,
                nic.pci_addr()
            ));
        }
        if let Some((kernel, initrd, cmdline)) = &self.kernel {
            a.extend([
                "-kernel".into(),
                p(kernel),
                "-initrd".into(),
                p(initrd),
                "-append".into(),
                cmdline.clone(),
            ]);
        }
        for (id, disk) in [
            (DISK_NODES[0], Some(&self.root_disk)),
            (DISK_NODES[1], self.data_disk.as_ref()),
        ] {
            if let Some(disk) = disk {
                // -blockdev gives the format node a stable name for QMP (mirror, NBD export).
                a.push("-blockdev".into());
                a.push(format!(
                    "driver=qcow2,node-name={id},discard=unmap,file.driver=file,file.filename={}",
                    p(disk)
                ));
                a.push("-device".into());
                // Direct kernel boot claims boot index 0 itself.
                let boot = if id == "root" && self.kernel.is_none() {
                    ",bootindex=0"
                } else {
                    ""
                };
                a.push(format!("virtio-blk-pci,drive={id},id={id}-dev{boot}"));
            }
        }
        for (slot, id, disk) in &self.volumes {
            use novacron_api::volume;
            a.push("-blockdev".into());
            a.push(format!(
                "driver=qcow2,node-name={},discard=unmap,file.driver=file,file.filename={}",
                volume::node_name(*slot),
                p(disk)
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-blk-pci,drive={},id={},serial={},addr={}",
                volume::node_name(*slot),
                volume::device_id(*slot),
                volume::serial(id),
                volume::pci_addr(*slot)
            ));
        }
        if let Some(seed) = &self.seed {
            a.push("-blockdev".into());
            a.push(format!(
                "driver=raw,node-name={SEED_NODE},read-only=on,file.driver=file,file.filename={}",
                p(seed)
            ));
            a.push("-device".into());
            a.push(format!("ide-cd,drive={SEED_NODE},id={SEED_NODE}-dev"));
        }
        // Disk-image guests (those with a seed) get a port for their guest agent.
        if self.seed.is_some() {
            a.extend([
                "-chardev".into(),
                format!("socket,id=qga0,path={},server=on,wait=off", p(&dir.guest_agent())),
                "-device".into(),
                "virtio-serial-pci,id=vser0".into(),
                "-device".into(),
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            ]);
        }
        if self.paused || self.incoming {
            a.push("-S".into());
        }
        if self.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        Ok(a)
    }
}

/// A VM as the agent launches them, paused (nothing boots): for tests that
/// drive QEMU's block layer through the VM's devices.
#[cfg(test)]
pub(crate) fn paused_spec(dir: &VmDir, with_data_disk: bool) -> LaunchSpec {
    LaunchSpec {
        name: "paused".into(),
        project: String::new(),
        vcpus: 1,
        memory_mib: 64,
        accel: "tcg".into(),
        machine: "pc".into(),
        cpu_model: Some("qemu64".into()),
        kernel: None,
        root_disk: dir.root_disk(),
        data_disk: with_data_disk.then(|| dir.data_disk()),
        seed: None,
        paused: true,
        incoming: false,
        nics: Vec::new(),
        volumes: Vec::new(),
    }
}

/// Kills a daemonized QEMU when dropped: tests that launch one clean up
/// however they end.
#[cfg(test)]
pub(crate) struct KillOnDrop(pub u32);

#[cfg(test)]
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Starts QEMU daemonized. Returns its pid once QMP is listening.
pub async fn launch(qemu: &str, spec: &LaunchSpec, dir: &VmDir) -> Result<u32, QemuError> {
    // QEMU opens the disks by names of their own (VmDir::open_alias).
    dir.remove_open_aliases();
    let mut opened = spec.clone();
    opened.root_disk = dir.open_alias("root", &spec.root_disk)?;
    if let Some(data) = &spec.data_disk {
        opened.data_disk = Some(dir.open_alias("data", data)?);
    }
    let args = opened.args(dir)?;
    let json = serde_json::to_vec_pretty(spec).unwrap_or_default();
    std::fs::write(dir.launch_spec(), json).map_err(io_err(&dir.launch_spec()))?;
    for stale in [
        dir.pidfile(),
        dir.qmp(),
        dir.qmp_migrate(),
        dir.console(),
        dir.guest_agent(),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    // With -daemonize the parent exits once the guest is set up; errors before
    // that point go to its stderr.
    let child = tokio::process::Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| QemuError::Spawn {
            program: qemu.to_string(),
            source,
        })?;
    let timeout = Duration::from_secs(60);
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| QemuError::StartTimeout(timeout))?
        .map_err(|source| QemuError::Spawn {
            program: qemu.to_string(),
            source,
        })?;
    if !out.status.success() {
        // With -D, QEMU reports startup errors in its log file rather than on stderr.
        let log = std::fs::read_to_string(dir.qemu_log()).unwrap_or_default();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = [stderr.trim(), log.lines().last().unwrap_or("").trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(QemuError::Start(if msg.is_empty() {
            format!("exit status {}", out.status)
        } else {
            msg
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = dir.running_pid() {
            if dir.qmp().exists() {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            return Err(QemuError::Start("QEMU exited right after starting".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGKILL and waits until the process is gone.
pub async fn kill_and_wait(pid: u32, dir: &VmDir) {
    if !process_is_ours(pid, &dir.path) {
        return;
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    wait_gone(pid, dir, Duration::from_secs(10)).await;
}

/// Waits until the process is gone; true if it went within `timeout`.
pub async fn wait_gone(pid: u32, dir: &VmDir, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_is_ours(pid, &dir.path) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Runs `qemu-img ARGS`; its standard output on success.
pub(crate) async fn qemu_img_output(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, QemuError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|source| QemuError::Spawn {
            program: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(QemuError::Img(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(out.stdout)
}

/// Runs `qemu-img ARGS`; on failure removes `partial` (what it was writing).
async fn qemu_img(args: &[&std::ffi::OsStr], partial: &Path) -> Result<(), QemuError> {
    qemu_img_output(args).await.map(drop).inspect_err(|_| {
        let _ = std::fs::remove_file(partial);
    })
}

/// Creates a qcow2 disk atomically: an overlay of `backing` (with its format),
/// or blank when `backing` is None.
pub async fn create_disk(path: &Path, backing: Option<(&Path, &str)>, size_mib: Option<u64>) -> Result<(), QemuError> {
    let tmp = path.with_extension("qcow2.partial");
    let size = size_mib.map(|s| format!("{s}M"));
    let mut args: Vec<&std::ffi::OsStr> = ["create", "-q", "-f", "qcow2"].map(std::ffi::OsStr::new).to_vec();
    if let Some((base, fmt)) = &backing {
        args.extend([
            std::ffi::OsStr::new("-F"),
            fmt.as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
        ]);
    }
    args.push(tmp.as_os_str());
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    qemu_img(&args, &tmp).await?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A qcow2 of `size` bytes at `path` on `backing` (format `format`),
/// made without opening the backing (a running QEMU holds it, or it does
/// not answer yet); nothing is left at `path` on failure.
pub async fn create_overlay_unchecked(path: &Path, backing: &str, format: &str, size: u64) -> Result<(), QemuError> {
    let size = size.to_string();
    let args: [&std::ffi::OsStr; 11] = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-u".as_ref(),
        "-F".as_ref(),
        format.as_ref(),
        "-b".as_ref(),
        backing.as_ref(),
        path.as_os_str(),
        size.as_ref(),
    ];
    qemu_img(&args, path).await
}

/// A blank qcow2 of `size` bytes without a backing file in its header
/// (QEMU gives it a backing node when it adds it): scratch space such as
/// a backup's fleecing overlay.
pub async fn create_scratch_qcow2(path: &Path, size: u64) -> Result<(), QemuError> {
    let size = size.to_string();
    let args: [&std::ffi::OsStr; 6] = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        size.as_ref(),
    ];
    qemu_img(&args, path).await
}

/// `qemu-img info` of the qcow2 at `path` (its backing chain not opened);
/// also of a disk a running QEMU holds (its header names the same backing
/// file and size as long as no block job changes them).
pub async fn image_info(path: &Path) -> Result<serde_json::Value, QemuError> {
    let out = qemu_img_output(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
    ])
    .await?;
    serde_json::from_slice(&out).map_err(|e| QemuError::Img(format!("qemu-img info printed no JSON: {e}")))
}

/// The size a guest sees of the qcow2 at `path`, in bytes.
pub async fn virtual_size(path: &Path) -> Result<u64, QemuError> {
    image_info(path).await?["virtual-size"]
        .as_u64()
        .ok_or_else(|| QemuError::Img(format!("qemu-img info gave no virtual-size for {}", path.display())))
}

/// Grows the qcow2 at `path` (not in use by a QEMU) to `size_mib`.
pub async fn grow_disk(path: &Path, size_mib: u64) -> Result<(), QemuError> {
    let size = format!("{size_mib}M");
    qemu_img_output(&[
        "resize".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        size.as_ref(),
    ])
    .await
    .map(drop)
}

/// Copies `src` and everything under it (its backing chain) into one
/// standalone qcow2 at `dest`.
pub async fn flatten_disk(src: &Path, dest: &Path) -> Result<(), QemuError> {
    qemu_img(
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ],
        dest,
    )
    .await
}

/// A full clone's root disk: an independent copy of `base`, grown to
/// `size_mib` when that is larger, created atomically. `percent` follows
/// the copy (qemu-img's own progress).
pub async fn copy_disk(
    path: &Path,
    base: &Path,
    size_mib: Option<u64>,
    percent: &std::sync::atomic::AtomicU8,
) -> Result<(), QemuError> {
    let tmp = path.with_extension("qcow2.partial");
    if let Err(e) = convert_with_progress(base, &tmp, percent).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(size) = size_mib {
        let size = format!("{size}M");
        qemu_img(
            &[
                "resize".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                tmp.as_os_str(),
                size.as_ref(),
            ],
            &tmp,
        )
        .await?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// `qemu-img convert -p` of `src` (and its backing chain) into a standalone
/// qcow2, its progress lines (`    (12.34/100%)` ending in CR) read into `percent`.
async fn convert_with_progress(
    src: &Path,
    dest: &Path,
    percent: &std::sync::atomic::AtomicU8,
) -> Result<(), QemuError> {
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new("qemu-img")
        .args(["convert", "-p", "-O", "qcow2"])
        .arg(src)
        .arg(dest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| QemuError::Spawn {
            program: "qemu-img".into(),
            source,
        })?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| QemuError::Img("qemu-img convert has no output pipe".into()))?;
    let mut buf = [0u8; 256];
    let mut line = Vec::new();
    loop {
        let n = stdout.read(&mut buf).await.map_err(io_err(dest))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(p) = progress_percent(&String::from_utf8_lossy(&line)) {
                    percent.store(p, std::sync::atomic::Ordering::Relaxed);
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    let out = child.wait_with_output().await.map_err(|source| QemuError::Spawn {
        program: "qemu-img".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(QemuError::Img(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// The whole percent of a qemu-img progress line, `    (12.34/100%)`.
fn progress_percent(line: &str) -> Option<u8> {
    let done = line.trim().strip_prefix('(')?.split('/').next()?;
    let value: f64 = done.trim().parse().ok()?;
    (0.0..=100.0).contains(&value).then_some(value as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_what_a_vm_needs() {
        let dir = VmDir::new(Path::new("/var/lib/nc/vms"), "1234");
        let spec = LaunchSpec {
            name: "web".into(),
            project: "default".into(),
            vcpus: 2,
            memory_mib: 256,
            accel: "tcg".into(),
            machine: "pc-i440fx-10.0".into(),
            cpu_model: Some("qemu64".into()),
            kernel: Some(("/k".into(), "/i".into(), "console=ttyS0".into())),
            root_disk: dir.root_disk(),
            data_disk: Some(dir.data_disk()),
            seed: Some(dir.seed()),
            paused: false,
            incoming: false,
            nics: vec![crate::network::AttachedNic {
                tap: "nc0123456789a2".into(),
                mac: "52:54:0a:14:00:05".into(),
                mtu: 1450,
                slot: 2,
            }],
            volumes: vec![(
                3,
                "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
                dir.volume("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b"),
            )],
        };
        let args = spec.args(&dir).expect("args").join(" ");
        for want in [
            "-accel tcg",
            "-machine pc-i440fx-10.0",
            "-cpu qemu64",
            "-m 256M",
            "-smp 2",
            "-daemonize",
            "-kernel /k",
            "drive=data",
            "qmp.sock,server=on",
            "-netdev tap,id=net2,ifname=nc0123456789a2,script=no,downscript=no",
            "virtio-net-pci,netdev=net2,id=nic2,mac=52:54:0a:14:00:05,host_mtu=1450,addr=0x12",
            "driver=raw,node-name=cidata,read-only=on,file.driver=file,file.filename=/var/lib/nc/vms/1234/seed.iso",
            "ide-cd,drive=cidata,id=cidata-dev",
            "driver=qcow2,node-name=vol3,discard=unmap,file.driver=file,file.filename=/var/lib/nc/vms/1234/vol-0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b.qcow2",
            "virtio-blk-pci,drive=vol3,id=vol3-dev,serial=0f8e2a4c-1b2d-4e5f-8,addr=0x1b",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ] {
            assert!(args.contains(want), "missing {want} in {args}");
        }
        assert!(!args.contains(" -S"));
        let long = VmDir::new(Path::new(&"/x".repeat(60)), "id");
        assert!(matches!(spec.args(&long), Err(QemuError::PathTooLong(_))));
    }

    #[test]
    fn qemu_img_progress_lines_read_as_percent() {
        assert_eq!(progress_percent("    (12.34/100%)"), Some(12));
        assert_eq!(progress_percent("    (100.00/100%)"), Some(100));
        assert_eq!(progress_percent("garbage"), None);
        assert_eq!(progress_percent("(250.0/100%)"), None);
    }

    #[test]
    fn foreign_pids_are_not_ours() {
        let me = std::process::id();
        assert!(!process_is_ours(me, Path::new("/definitely/not/in/my/cmdline")));
        assert!(!process_is_ours(u32::MAX - 1, Path::new("/")));
    }
}
