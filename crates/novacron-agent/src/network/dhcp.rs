//! DHCP and DNS for the guests of one network on this host: Debian's
//! dnsmasq, one per network, bound to the network's bridge. It answers
//! only reservations (`static` range): one file per local VM in a hosts
//! directory, which dnsmasq reads as it changes. Like QEMU it runs
//! daemonized, so guests keep their DHCP server through an agent restart,
//! and the agent re-adopts it by its pidfile.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{link, NetError};
use crate::qemu::process_is_ours;

/// One network's dnsmasq and its files.
pub(super) struct Dhcp {
    pub dir: PathBuf,
}

/// What dnsmasq tells the guests of a network.
pub(super) struct DhcpConfig<'a> {
    pub bridge: &'a str,
    pub network: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

impl Dhcp {
    pub fn new(dir: PathBuf) -> Dhcp {
        Dhcp { dir }
    }
    fn pidfile(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }
    fn hosts_dir(&self) -> PathBuf {
        self.dir.join("hosts.d")
    }
    fn host_file(&self, vm_id: &str) -> PathBuf {
        self.hosts_dir().join(vm_id)
    }

    /// The pid of this network's dnsmasq, when it runs.
    fn running(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile()).ok()?.trim().parse().ok()?;
        process_is_ours(pid, &self.dir).then_some(pid)
    }

    /// Starts dnsmasq unless it runs already.
    pub async fn ensure(&self, cfg: &DhcpConfig<'_>) -> Result<(), NetError> {
        if self.running().is_some() {
            return Ok(());
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| NetError::Io { path, source }
        };
        std::fs::create_dir_all(self.hosts_dir()).map_err(io(&self.hosts_dir()))?;
        let dir = |name: &str| self.dir.join(name).display().to_string();
        let args = [
            "--conf-file=/dev/null".to_string(),
            format!("--pid-file={}", dir("dnsmasq.pid")),
            format!("--dhcp-leasefile={}", dir("leases")),
            format!("--log-facility={}", dir("dnsmasq.log")),
            format!("--dhcp-hostsdir={}", dir("hosts.d")),
            format!("--interface={}", cfg.bridge),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            // Reservations only: an unknown MAC gets no address.
            format!("--dhcp-range={},static,{},1h", cfg.network, cfg.netmask),
            format!("--dhcp-option=option:router,{}", cfg.gateway),
            format!("--dhcp-option=option:dns-server,{}", cfg.gateway),
            format!("--dhcp-option=option:mtu,{}", cfg.mtu),
            "--dhcp-authoritative".into(),
            "--no-hosts".into(),
            // The agent runs as root; dnsmasq would drop to a user that cannot write the leases.
            "--user=root".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        link::run("dnsmasq", &args).await?;
        tracing::info!(bridge = cfg.bridge, dir = %self.dir.display(), "started dnsmasq");
        Ok(())
    }

    /// Reserves `ip` for `mac` (the NICs of one VM on this network).
    pub fn set_host(&self, vm_id: &str, entries: &[(String, Ipv4Addr, String)]) -> Result<(), NetError> {
        let body: String = entries
            .iter()
            .map(|(mac, ip, name)| format!("{mac},{ip},{name}\n"))
            .collect();
        let path = self.host_file(vm_id);
        let old = std::fs::read_to_string(&path).ok();
        if old.as_deref() == Some(body.as_str()) {
            return Ok(());
        }
        super::write_whole(&path, body.as_bytes())?;
        // dnsmasq reads new entries by itself but forgets old ones only on SIGHUP.
        if old.is_some() {
            self.reload();
        }
        Ok(())
    }

    fn reload(&self) {
        if let Some(pid) = self.running() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
        }
    }

    /// Drops a VM's reservations; dnsmasq forgets removed files on SIGHUP.
    pub fn remove_host(&self, vm_id: &str) {
        if std::fs::remove_file(self.host_file(vm_id)).is_ok() {
            self.reload();
        }
    }

    /// VMs with reservations here.
    pub fn hosts(&self) -> Vec<String> {
        std::fs::read_dir(self.hosts_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".tmp"))
            .collect()
    }

    /// Stops dnsmasq and removes its files (the network left this host).
    pub fn stop(&self) {
        if let Some(pid) = self.running() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
